"""CPU cost per clip of the real job against the one-thread floor, measured in the same run.

The job (`run_tag_job`, tiny random-weight models, real local Ray, 10 s 44.1 kHz stereo FLAC) runs over
two corpus sizes, back to back, on one Ray instance already started and warmed by `--warm` runs of the
small corpus (task workers that import torch and the pipeline during a measured run add ~2.6 s of CPU to
that run: up to ~10 ms per clip of noise in the featurize workers' share).
Around each run:
- whole-machine busy core-seconds from /proc/stat (all CPUs, total minus idle and iowait): what the
  issue asks for; it also counts any other work on the machine, so it needs a quiet machine;
- CPU seconds of this process and every descendant (Ray's GCS, raylet, workers, decoder children),
  from /proc/PID/stat (utime + stime + reaped children's), split by role: robust to other work on a
  shared machine, and it says where the time goes.
Marginal cost per clip = (busy(large) - busy(small)) / (large - small): start-up, model load and the
last batch's drain cancel.

The floor, timed in the same process on one thread, clip by clip (median process CPU time):
libsndfile decode to float32, soxr HQ to 16 kHz and to 48 kHz (one channel), and the bare float32
FFTs both spectrograms need (998 x 512 for AST, 1000 x 1024 for CLAP). `floor_one_resample` is
benchmarks/features.py's floor (48 kHz only). Alongside: our Featurize work in-process on one thread
(decode + features, no Ray, no child process) and the tiny models' forward pass per window.

Usage: python -m benchmarks.cpu_cost [--sizes 64 320] [--repeats 1] [--floor-clips 16] [--warm 2]
       [--out benchmarks/results/cpu_cost.json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.corpus import make_corpus

log = logging.getLogger("benchmarks.cpu_cost")
TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """Busy core-seconds of the whole machine since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / TICK  # user nice system idle iowait irq softirq steal


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def role(pid: int) -> str:
    """What a process in our tree does, from its command line (Ray sets workers' titles)."""
    if pid == os.getpid():
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    for key, name in (("pipeline.tagging.isolation", "decoder_child"), ("gcs_server", "ray_gcs"), ("raylet", "raylet"),
                      ("WriteResults", "sink_task"),  # a task worker's title names the task it runs now
                      ("Featurize", "featurize_worker"), ("ray::IDLE", "featurize_worker"),  # idle task workers
                      ("AstTagger", "ast_actor"), ("ClapEmbedder", "clap_actor"),
                      ("DashboardAgent", "ray_agents"), ("RuntimeEnvAgent", "ray_agents"),
                      ("ray::", "ray_data_actors")):  # _StatsActor, _AutoscalingCoordinatorActor, ...
        if key in cmd:
            return name
    return "ray_other"


def tree_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds incl. reaped children) for this process and all its descendants."""
    kids, out, todo = _children(), {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (role(pid), sum(int(v) for v in fields[11:15]) / TICK)  # utime stime cutime cstime
    return out


def tree_delta(before: dict, after: dict) -> dict[str, float]:
    by_role: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        prev = before.get(pid, (name, 0.0))[1]
        by_role[name] = by_role.get(name, 0.0) + cpu - prev
    return by_role


def run_job(root: Path, models: dict, audio: Path, name: str) -> dict:
    from pipeline.tagging.job import TagJobConfig, run_tag_job

    tree0, busy0, wall0 = tree_cpu(), machine_busy_s(), time.perf_counter()
    summary = run_tag_job(TagJobConfig(input=str(audio), output=str(root / "out" / name),
                                       ast_model=models["ast"], clap_model=models["clap"]))
    wall, busy, tree1 = time.perf_counter() - wall0, machine_busy_s() - busy0, tree_cpu()
    if summary["ok"] != summary["files_seen"]:
        raise RuntimeError(f"benchmark job left {summary['error']} error rows: {summary}")
    split = tree_delta(tree0, tree1)
    started: dict[str, int] = {}  # processes that started during the run, by role (start-up CPU included)
    for pid, (name, _) in tree1.items():
        if pid not in tree0:
            started[name] = started.get(name, 0) + 1
    return {"files": summary["files_seen"], "wall_s": wall, "machine_busy_s": busy,
            "tree_cpu_s": sum(split.values()), "tree_split_s": split, "processes_started": started}


def floor_and_parts(files: list[Path], models: dict, repeats: int = 3) -> dict:
    """Median one-thread CPU ms per clip: the floor(s), our featurize work in-process, tiny models."""
    import pyarrow as pa
    import soundfile as sf
    import soxr
    import torch

    import pipeline.tagging.featurize as featurize_module
    from pipeline.audio.decode import Decoder
    from pipeline.models.embedder import ClapEmbedder
    from pipeline.tagging.featurize import Featurize
    from pipeline.tagging.job import TagJobConfig, model_stages
    from pipeline.tagging.resources import ResourcePlan
    from pipeline.tagging.sources import ListingConfig, list_inputs
    from pipeline.models.tagger import AstTagger

    datas = [f.read_bytes() for f in files]
    zeros = torch.zeros((998, 512))

    def floor(data: bytes, both: bool = True) -> None:
        x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        if both:
            soxr.resample(x[:, 0], rate, 16_000, quality="HQ")
        w48 = soxr.resample(x[:, 0], rate, 48_000, quality="HQ")
        torch.fft.rfft(zeros)
        torch.fft.rfft(torch.from_numpy(np.ascontiguousarray(w48[:480_000])).reshape(1000, 480), n=1024)

    cfg = TagJobConfig(input=str(files[0].parent), output="unused", ast_model=models["ast"],
                       clap_model=models["clap"])
    stages = model_stages(cfg, ResourcePlan(1, 1, 0.0, 1, 1, 1, 1))
    featurize = Featurize(stages.featurize)
    listed = [list_inputs(ListingConfig(str(f))) for f in files]
    rows = pa.concat_tables(list(featurize(listed[0])))
    ast, clap = AstTagger(stages.tagger), ClapEmbedder(stages.embedder)
    jobs = {"floor": lambda i: floor(datas[i]), "floor_one_resample": lambda i: floor(datas[i], both=False),
            "featurize_in_process": lambda i: list(featurize(listed[i])),
            "tiny_ast_per_window": lambda i: ast(rows.slice(0, 1)),
            "tiny_clap_per_window": lambda i: clap(rows.slice(0, 1))}
    times = {k: [] for k in jobs}
    # in-process decode: a decoder child's CPU time is not this process's
    isolated, featurize_module.shared_decoder = featurize_module.shared_decoder, Decoder
    try:
        _time_all(jobs, times, len(files), repeats)
    finally:
        featurize_module.shared_decoder = isolated
    return {k: float(np.median(v)) * 1000 for k, v in times.items()}


def _time_all(jobs: dict, times: dict, clips: int, repeats: int) -> None:
    from benchmarks.features import one_thread

    with one_thread():
        for name, fn in jobs.items():
            fn(0)  # first calls allocate
        for r in range(repeats):
            for i in range(clips):
                for name, fn in jobs.items():
                    c0 = time.process_time()
                    fn(i)
                    times[name].append(time.process_time() - c0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs=2, default=[64, 320])
    p.add_argument("--repeats", type=int, default=1, help="runs per size (interleaved small, large); medians")
    p.add_argument("--floor-clips", type=int, default=16)
    p.add_argument("--warm", type=int, default=2, help="unmeasured runs of the small corpus first")
    p.add_argument("--out", default="benchmarks/results/cpu_cost.json")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    for noisy in ("pipeline", "transformers", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import ray

    from pipeline.demo import build_tiny_ast, build_tiny_clap

    small, large = sorted(args.sizes)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root / "large", large)
        (root / "small").mkdir()
        for f in sorted((root / "large").iterdir())[:small]:
            (root / "small" / f.name).symlink_to(f)
        models = {"ast": str(build_tiny_ast(root / "models" / "ast")),
                  "clap": str(build_tiny_clap(root / "models" / "clap"))}
        parts = floor_and_parts(sorted((root / "large").iterdir())[:args.floor_clips], models)
        log.info("one thread, ms per clip: %s", {k: round(v, 2) for k, v in parts.items()})
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        for w in range(args.warm):  # worker imports, page cache
            run_job(root, models, root / "small", f"warm-{w}")
        runs = {small: [], large: []}
        for r in range(args.repeats):
            for n in (small, large):
                runs[n].append(run_job(root, models, root / ("small" if n == small else "large"), f"{n}-{r}"))
                log.info("%d files: %s", n, {k: (round(v, 2) if isinstance(v, float) else v)
                                             for k, v in runs[n][-1].items() if k != "tree_split_s"})
        ray.shutdown()
    result = summarise(runs, small, large, parts)
    result.update({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}".strip(", "),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "load_avg_1min_at_end": os.getloadavg()[0], "clip": "10 s, 44.1 kHz stereo FLAC",
                   "models": "tiny random-weight AST + CLAP", "sizes": [small, large], "repeats": args.repeats,
                   "warm_runs": args.warm})
    report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


FEATURIZE_ROLES = ("featurize_worker", "sink_task", "decoder_child")
MODEL_ROLES = ("ast_actor", "clap_actor")


def matched(runs: dict, small: int, large: int) -> tuple[dict, bool]:
    """The runs of each size that started the same processes (by role): a process started during a run
    adds its start-up (a task worker importing torch and the pipeline: ~2.6 s of CPU) to that run, and
    Ray starts task workers at random, so only runs with equal starts cancel it. The pattern most runs
    share; (all runs, False) if no pattern occurs at both sizes."""
    def key(r):
        return tuple(sorted(r.get("processes_started", {}).items()))

    common = {key(r) for r in runs[small]} & {key(r) for r in runs[large]}
    if not common:
        return runs, False
    best = max(common, key=lambda k: sum(key(r) == k for n in (small, large) for r in runs[n]))
    return {n: [r for r in runs[n] if key(r) == best] for n in (small, large)}, True


def summarise(runs: dict, small: int, large: int, parts: dict) -> dict:
    all_runs = runs
    runs, starts_match = matched(runs, small, large)

    def med(n, key):
        return float(np.median([r[key] for r in runs[n]]))

    def marginal(key):
        return (med(large, key) - med(small, key)) / (large - small) * 1000

    roles = sorted({k for rs in runs.values() for r in rs for k in r["tree_split_s"]})
    split = {k: round((float(np.median([r["tree_split_s"].get(k, 0.0) for r in runs[large]]))
                       - float(np.median([r["tree_split_s"].get(k, 0.0) for r in runs[small]])))
                      / (large - small) * 1000, 2) for k in roles}
    machine_ms, tree_ms = marginal("machine_busy_s"), marginal("tree_cpu_s")
    models_ms = parts["tiny_ast_per_window"] + parts["tiny_clap_per_window"]
    steady = (large - small) / (med(large, "wall_s") - med(small, "wall_s"))
    featurize_ms = sum(v for k, v in split.items() if k in FEATURIZE_ROLES)
    ray_ms = sum(v for k, v in split.items() if k not in FEATURIZE_ROLES + MODEL_ROLES)
    return {
        "marginal_core_ms_per_clip_machine": round(machine_ms, 2),
        "marginal_core_ms_per_clip_process_tree": round(tree_ms, 2),
        "marginal_split_ms_per_clip": split,
        "floor_ms_per_clip": round(parts["floor"], 2),
        "ratio_machine_over_floor": round(machine_ms / parts["floor"], 2),
        "ratio_process_tree_over_floor": round(tree_ms / parts["floor"], 2),
        "one_thread_ms": {k: round(v, 2) for k, v in parts.items()},
        # what a GPU node's CPUs do per clip: the job less the tiny models' forward passes (which a GPU
        # runs); pipeline/tagging/resources.py's FEATURE_WINDOWS_PER_CORE is 1000 / this
        "cpu_side_ms_per_clip": round(min(machine_ms, tree_ms) - models_ms, 2),
        "ratio_cpu_side_over_floor": round((min(machine_ms, tree_ms) - models_ms) / parts["floor"], 2),
        # the feature stage as the job runs it (task workers, sink tasks included, and decoder children),
        # and what Ray and the driver cost: mostly per unit of time (polling, heartbeats, metrics), so per
        # clip it shrinks as clips/s grows
        "featurize_ms_per_clip": round(featurize_ms, 2),
        "ratio_featurize_over_floor": round(featurize_ms / parts["floor"], 2),
        "ray_and_driver_ms_per_clip": round(ray_ms, 2),
        "ray_and_driver_cores": round(ray_ms * steady / 1000, 3),
        "steady_clips_per_s": round(steady, 2),
        "runs_used": {str(n): len(rs) for n, rs in runs.items()},
        "process_starts_matched": starts_match,
        "runs": {str(n): [{k: (round(v, 3) if isinstance(v, float) else
                               {a: round(b, 3) for a, b in v.items()} if isinstance(v, dict) else v)
                           for k, v in r.items()} for r in rs] for n, rs in all_runs.items()},
    }


def report(result: dict) -> None:
    print(f"marginal CPU per clip, job with tiny models, {result['sizes'][0]} vs {result['sizes'][1]} files; "
          f"{result['machine']}, load average {result['load_avg_1min_at_end']:.1f} at end")
    print(f"{'measure':<44}{'ms/clip':>10}{'/ floor':>9}")
    print(f"{'whole machine (/proc/stat)':<44}{result['marginal_core_ms_per_clip_machine']:>10}"
          f"{result['ratio_machine_over_floor']:>9}")
    print(f"{'process tree (driver, Ray, workers, children)':<44}"
          f"{result['marginal_core_ms_per_clip_process_tree']:>10}{result['ratio_process_tree_over_floor']:>9}")
    print(f"{'floor (decode + 2 resamples + bare FFTs)':<44}{result['floor_ms_per_clip']:>10}{1.0:>9}")
    print(f"{'  less the tiny models (one thread)':<44}{result['cpu_side_ms_per_clip']:>10}"
          f"{result['ratio_cpu_side_over_floor']:>9}")
    print(f"{'  featurize: task workers + decoder children':<44}{result['featurize_ms_per_clip']:>10}"
          f"{result['ratio_featurize_over_floor']:>9}")
    print(f"{'  Ray processes and the driver':<44}{result['ray_and_driver_ms_per_clip']:>10}"
          f"   ({result['ray_and_driver_cores']} cores)")
    print(f"steady state: {result['steady_clips_per_s']} clips/s; runs used per size {result['runs_used']}"
          + ("" if result["process_starts_matched"] else " (WARNING: no small and large run started the same "
                                                         "processes: start-up does not cancel)"))
    print("\nmarginal ms per clip by process role:")
    for k, v in sorted(result["marginal_split_ms_per_clip"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<24}{v:>8}")
    print("\none thread, ms per clip (median CPU time):")
    for k, v in result["one_thread_ms"].items():
        print(f"  {k:<24}{v:>8}")


if __name__ == "__main__":
    raise SystemExit(main())
