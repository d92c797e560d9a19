"""CPU cost per clip of the real job against the one-thread floor, measured in the same run, in one of
two modes (`--features-on`): `cpu`, CPU workers compute the features; `gpu`, CPU workers only decode
and downmix and ship slices of the source waveform, and the model actors resample and compute the features.

The job (`run_tag_job`, tiny random-weight models, real local Ray, 10 s 44.1 kHz stereo FLAC) runs in
`--pairs` interleaved (small, large) pairs on one Ray instance, started and warmed first by `--warm`
runs of the small corpus (a task worker that starts during a measured run adds ~2.6 s of CPU to it).
Around each run:
- whole-machine busy core-seconds from /proc/stat (total minus idle and iowait): counts any other work
  on the machine too;
- CPU seconds of this process and every descendant (GCS, raylet, workers, decoder children) from
  /proc/PID/stat (utime + stime), sampled every 0.5 s during the run so that a process that exits before
  its end (the model actors) still counts, split by role: robust to other work.
Per pair, marginal cost per clip = (busy(large) - busy(small)) / (large - small): start-up, model load
and the last batch's drain cancel. Reported: the median and [min, max] over the pairs whose two runs
started the same processes (all pairs, with a warning, if none did).

CPU side (what a GPU node's CPUs do per clip):
- cpu mode: min(machine, process tree) less the tiny models' one-thread forward pass per window;
- gpu mode: min(machine, process tree) less the model actors' (ast_actor, clap_actor) marginal process-tree CPU.
Both modes also report process tree less the model actors.

The floor, timed on one thread in a fresh process, clip by clip (median CPU time), before the first pair,
between pairs and after the last (each pair's ratios use the mean of the two floors around it; the floor
reported is their median): libsndfile decode to float32, soxr HQ to 16 and 48 kHz
(one channel), and the bare float32 FFTs both spectrograms need (998 x 512 AST, 1000 x 1024 CLAP).
Alongside, timed in this process before and after the runs: the floor again, `floor_one_resample` (benchmarks/features.py's floor), `floor_no_fft` (decode + the two
resamples), `decode_only` (libsndfile's decode: the least a CPU worker does in either mode), our
Featurize in-process for the mode (no Ray, no child process), the tiny models per
window, and the object-store bytes per window of Featurize's output tables.

Usage: python -m benchmarks.cpu_cost [--features-on cpu|gpu] [--sizes 40 800] [--pairs 3]
       [--floor-clips 16] [--warm 2] [--out benchmarks/results/cpu_cost_{mode}.json]
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
from benchmarks.proctree import Sampling, descendants

log = logging.getLogger("benchmarks.cpu_cost")
TICK = os.sysconf("SC_CLK_TCK")
MODES = ("cpu", "gpu")


def machine_busy_s() -> float:
    """Busy core-seconds of the whole machine since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / TICK  # user nice system idle iowait irq softirq steal


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
                      ("WriteResults", "sink_task"),  # the sink actors (a task worker's title names its task)
                      ("Featurize", "featurize_worker"), ("ray::IDLE", "featurize_worker"),  # idle task workers
                      ("AstTagger", "ast_actor"), ("ClapEmbedder", "clap_actor"),
                      ("DashboardAgent", "ray_agents"), ("RuntimeEnvAgent", "ray_agents"),
                      ("ray::", "ray_data_actors")):  # _StatsActor, _AutoscalingCoordinatorActor, ...
        if key in cmd:
            return name
    return "ray_other"


def tree_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds: its own user + system time) for this process and all its descendants."""
    out = {}
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (role(pid), sum(int(v) for v in fields[11:13]) / TICK)  # utime stime
    return out


class TreeSampler(Sampling):
    """Samples tree_cpu() every `interval_s` seconds while a run goes on, so that a process that exits
    before the run's end (a model actor is killed as its run finishes; Ray's parent processes do not add
    their children's times to their own) still counts, with the CPU of its last sample. `seen`: pid ->
    (its last role, its last CPU seconds) over every process seen."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(interval_s)
        self.seen: dict[int, tuple[str, float]] = {}

    def sample(self) -> None:
        for pid, (name, cpu) in tree_cpu().items():
            if pid in self.seen and name in ("ray_other", "gone"):  # exiting: its command line is gone
                name = self.seen[pid][0]
            self.seen[pid] = (name, cpu)


def tree_delta(before: dict, after: dict) -> dict[str, float]:
    by_role: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        prev = before.get(pid, (name, 0.0))[1]
        by_role[name] = by_role.get(name, 0.0) + cpu - prev
    return by_role


def job_config(features_on: str, **kwargs):
    from pipeline.tagging.job import TagJobConfig

    return TagJobConfig(**kwargs, features_on=features_on)


def run_job(root: Path, models: dict, audio: Path, name: str, features_on: str) -> dict:
    from pipeline.tagging.job import run_tag_job

    cfg = job_config(features_on, input=str(audio), output=str(root / "out" / name), ast_model=models["ast"],
                     clap_model=models["clap"])
    tree0, busy0, wall0 = tree_cpu(), machine_busy_s(), time.perf_counter()
    with TreeSampler() as sampler:
        summary = run_tag_job(cfg)
    wall, busy, tree1 = time.perf_counter() - wall0, machine_busy_s() - busy0, sampler.seen
    if summary["ok"] != summary["files_seen"]:
        raise RuntimeError(f"benchmark job left {summary['error']} error rows: {summary}")
    split = tree_delta(tree0, tree1)
    started: dict[str, int] = {}  # processes that started during the run, by role (start-up CPU included)
    for pid, (name, _) in tree1.items():
        if pid not in tree0:
            started[name] = started.get(name, 0) + 1
    return {"files": summary["files_seen"], "wall_s": wall, "machine_busy_s": busy,
            "tree_cpu_s": sum(split.values()), "tree_split_s": split, "processes_started": started}


def floor_once(data: bytes, zeros, both: bool = True, fft: bool = True, resample: bool = True) -> None:
    """The floor's work for one clip: decode, the resample(s), the bare FFTs (`zeros`: the AST frames)."""
    import soundfile as sf
    import soxr
    import torch

    x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if not resample:
        return
    if both:
        soxr.resample(x[:, 0], rate, 16_000, quality="HQ")
    w48 = soxr.resample(x[:, 0], rate, 48_000, quality="HQ")
    if fft:
        torch.fft.rfft(zeros)
        torch.fft.rfft(torch.from_numpy(np.ascontiguousarray(w48[:480_000])).reshape(1000, 480), n=1024)


def fresh_floor_ms(files: list[Path], repeats: int = 3) -> float:
    """The floor alone, median one-thread CPU ms per clip, timed in a fresh process: in a process that
    has run other work the same code read up to 2x more (allocator state: page faults count as CPU)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_floor_ms_here, (files, repeats))


def _floor_ms_here(files: list[Path], repeats: int) -> float:
    import torch

    datas, zeros = [f.read_bytes() for f in files], torch.zeros((998, 512))
    times = {"floor": []}
    _time_all({"floor": lambda i: floor_once(datas[i], zeros)}, times, len(datas), repeats)
    return float(np.median(times["floor"])) * 1000


def floor_and_parts(files: list[Path], models: dict, features_on: str, repeats: int = 3) -> dict:
    """Median one-thread CPU ms per clip (`ms`): the floor(s), our Featurize in-process for the mode, the
    tiny models per window; and the object-store bytes per window of Featurize's output tables."""
    import pyarrow as pa
    import soundfile as sf
    import soxr
    import torch

    import pipeline.tagging.featurize as featurize_module
    from pipeline.audio.decode import Decoder
    from pipeline.models.embedder import ClapEmbedder
    from pipeline.models.tagger import AstTagger
    from pipeline.tagging.featurize import Featurize
    from pipeline.tagging.job import model_stages
    from pipeline.tagging.resources import ResourcePlan
    from pipeline.tagging.sources import ListingConfig, list_inputs

    datas = [f.read_bytes() for f in files]
    zeros = torch.zeros((998, 512))

    def floor(data: bytes, **parts) -> None:
        floor_once(data, zeros, **parts)

    cfg = job_config(features_on, input=str(files[0].parent), output="unused", ast_model=models["ast"],
                     clap_model=models["clap"])
    stages = model_stages(cfg, ResourcePlan(1, 1, 0.0, 1, 1, 1, 1))
    featurize = Featurize(stages.featurize)
    listed = [list_inputs(ListingConfig(str(f))) for f in files]
    ast, clap = AstTagger(stages.tagger), ClapEmbedder(stages.embedder)
    # in-process decode: a decoder child's CPU time is not this process's
    isolated, featurize_module.shared_decoder = featurize_module.shared_decoder, Decoder
    try:
        # all the clips in one call, as a task gets them: blocks of up to windows_per_block windows
        tables = list(featurize(pa.concat_tables(listed)))
        windows = sum(t.num_rows for t in tables)
        store_bytes = sum(t.nbytes for t in tables) / windows
        rows = tables[0]
        jobs = {"floor": lambda i: floor(datas[i]), "floor_one_resample": lambda i: floor(datas[i], both=False),
                "floor_no_fft": lambda i: floor(datas[i], fft=False),
                "decode_only": lambda i: floor(datas[i], resample=False),
                "featurize_in_process": lambda i: list(featurize(listed[i])),
                "tiny_ast_per_window": lambda i: ast(rows.slice(0, 1)),
                "tiny_clap_per_window": lambda i: clap(rows.slice(0, 1))}
        times = {k: [] for k in jobs}
        _time_all(jobs, times, len(files), repeats)
    finally:
        featurize_module.shared_decoder = isolated
    return {"ms": {k: float(np.median(v)) * 1000 for k, v in times.items()},
            "object_store_bytes_per_window": store_bytes, "windows": windows}


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
    p.add_argument("--features-on", choices=MODES, default="cpu",
                   help="cpu: workers compute the features; gpu: workers ship waveforms, model actors featurize")
    p.add_argument("--sizes", type=int, nargs=2, default=[40, 800])
    p.add_argument("--pairs", "--repeats", dest="pairs", type=int, default=3,
                   help="interleaved (small, large) pairs of runs; median and range over pairs")
    p.add_argument("--floor-clips", type=int, default=16)
    p.add_argument("--warm", type=int, default=2, help="unmeasured runs of the small corpus first")
    p.add_argument("--out", default=None, help="default: benchmarks/results/cpu_cost_{features_on}.json")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    for noisy in ("pipeline", "transformers", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import ray

    from pipeline.demo import build_tiny_ast, build_tiny_clap

    mode = args.features_on
    small, large = sorted(args.sizes)
    if small == large:
        p.error("--sizes must differ")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root / "large", large)
        (root / "small").mkdir()
        for f in sorted((root / "large").iterdir())[:small]:
            (root / "small" / f.name).symlink_to(f)
        models = {"ast": str(build_tiny_ast(root / "models" / "ast")),
                  "clap": str(build_tiny_clap(root / "models" / "clap"))}
        floor_files = sorted((root / "large").iterdir())[:args.floor_clips]
        before = floor_and_parts(floor_files, models, mode)
        log.info("one thread, ms per clip, before: %s", {k: round(v, 2) for k, v in before["ms"].items()})
        floors = [fresh_floor_ms(floor_files)]
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        for w in range(args.warm):  # worker imports, page cache
            run_job(root, models, root / "small", f"warm-{w}", mode)
        pairs = []
        for r in range(args.pairs):
            pair = {}
            for n, sub in ((small, "small"), (large, "large")):
                pair[sub] = run_job(root, models, root / sub, f"{n}-{r}", mode)
                log.info("pair %d, %d files: %s", r, n, {k: (round(v, 2) if isinstance(v, float) else v)
                                                         for k, v in pair[sub].items() if k != "tree_split_s"})
            pairs.append(pair)
            if r < args.pairs - 1:  # the machine's speed drifts: each pair is set against the floor around it
                floors.append(fresh_floor_ms(floor_files))
                log.info("floor between pairs %d and %d: %.2f ms", r, r + 1, floors[-1])
        ray.shutdown()
        after = floor_and_parts(floor_files, models, mode)
        log.info("one thread, ms per clip, after: %s", {k: round(v, 2) for k, v in after["ms"].items()})
        floors.append(fresh_floor_ms(floor_files))
    result = {"features_on": mode,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}".strip(", "),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_avg_1min_at_end": os.getloadavg()[0], "clip": "10 s, 44.1 kHz stereo FLAC",
              "models": "tiny random-weight AST + CLAP", "sizes": [small, large], "pairs": args.pairs,
              "warm_runs": args.warm, "floor_clips": len(floor_files)}
    result.update(summarise(pairs, small, large, before, after, mode, floors))
    report(result)
    out = Path(args.out or f"benchmarks/results/cpu_cost_{mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


FEATURIZE_ROLES = ("featurize_worker", "sink_task", "decoder_child")
MODEL_ROLES = ("ast_actor", "clap_actor")


def _starts(run: dict) -> tuple:
    return tuple(sorted(run.get("processes_started", {}).items()))


def pair_figures(pair: dict, small: int, large: int, floor_ms: float, models_ms: float, mode: str) -> dict:
    """One pair's marginal ms per clip (and cores, clips/s)."""
    s, l = pair["small"], pair["large"]

    def marginal(a: float, b: float) -> float:
        return (b - a) / (large - small) * 1000

    roles = set(s["tree_split_s"]) | set(l["tree_split_s"])
    split = {k: marginal(s["tree_split_s"].get(k, 0.0), l["tree_split_s"].get(k, 0.0)) for k in roles}
    machine, tree = marginal(s["machine_busy_s"], l["machine_busy_s"]), marginal(s["tree_cpu_s"], l["tree_cpu_s"])
    actors = sum(v for k, v in split.items() if k in MODEL_ROLES)
    featurize = sum(v for k, v in split.items() if k in FEATURIZE_ROLES)
    ray_ms = sum(v for k, v in split.items() if k not in FEATURIZE_ROLES + MODEL_ROLES)
    cpu_side = min(machine, tree) - (models_ms if mode == "cpu" else actors)
    steady = (large - small) / (l["wall_s"] - s["wall_s"])
    return {"machine": machine, "process_tree": tree, "model_actors": actors, "tree_minus_actors": tree - actors,
            "cpu_side": cpu_side, "ratio_cpu_side_over_floor": cpu_side / floor_ms, "featurize": featurize,
            "ratio_featurize_over_floor": featurize / floor_ms,
            "ratio_tree_minus_actors_over_floor": (tree - actors) / floor_ms, "ray_and_driver": ray_ms,
            "ray_and_driver_cores": ray_ms * steady / 1000, "steady_clips_per_s": steady, "split": split}


def _stat(values: list[float], digits: int = 2) -> dict:
    return {"median": round(float(np.median(values)), digits), "min": round(float(min(values)), digits),
            "max": round(float(max(values)), digits)}


def summarise(pairs: list[dict], small: int, large: int, before: dict, after: dict, mode: str,
              floors: list[float]) -> dict:
    """`floors`: the floor measured before the first pair, between pairs and after the last (ms per clip);
    each pair's ratios use the mean of the two around it, and the floor reported is their median."""
    parts = {k: (before["ms"][k] + after["ms"][k]) / 2 for k in before["ms"]}
    floor_ms = float(np.median(floors))
    models_ms = parts["tiny_ast_per_window"] + parts["tiny_clap_per_window"]  # one window per clip
    figures = [pair_figures(p, small, large, (floors[i] + floors[i + 1]) / 2, models_ms, mode)
               for i, p in enumerate(pairs)]
    # a process started during a run adds its start-up (a task worker importing torch and the pipeline:
    # ~2.6 s of CPU) to that run; only pairs whose two runs started the same processes cancel it
    matched = [_starts(p["small"]) == _starts(p["large"]) for p in pairs]
    used = [f for f, m in zip(figures, matched) if m] or figures

    def stat(key: str, digits: int = 2) -> dict:
        return _stat([f[key] for f in used], digits)

    headline = {
        "marginal_core_ms_per_clip_machine": stat("machine"),
        "marginal_core_ms_per_clip_process_tree": stat("process_tree"),
        "model_actors_ms_per_clip": stat("model_actors"),
        "tree_minus_actors_ms_per_clip": stat("tree_minus_actors"),
        "cpu_side_ms_per_clip": stat("cpu_side"),
        "ratio_cpu_side_over_floor": stat("ratio_cpu_side_over_floor", 3),
        "featurize_ms_per_clip": stat("featurize"),
        "ratio_featurize_over_floor": stat("ratio_featurize_over_floor", 3),
        "ratio_tree_minus_actors_over_floor": stat("ratio_tree_minus_actors_over_floor", 3),
        "ray_and_driver_ms_per_clip": stat("ray_and_driver"),
        "ray_and_driver_cores": stat("ray_and_driver_cores", 3),
        "steady_clips_per_s": stat("steady_clips_per_s"),
    }
    roles = sorted({k for f in used for k in f["split"]})
    return {
        # scalar = median over the pairs used (benchmarks/gpu_sizing.py reads cpu_side_ms_per_clip);
        # `range` = [min, max] over them
        **{k: v["median"] for k, v in headline.items()},
        "range": {k: [v["min"], v["max"]] for k, v in headline.items()},
        "cpu_side_definition": ("min(machine, process tree) - tiny models' one-thread forward pass per window"
                                if mode == "cpu" else "min(machine, process tree) - model actors' process-tree CPU"),
        "ratio_machine_over_floor": round(headline["marginal_core_ms_per_clip_machine"]["median"] / floor_ms, 3),
        "ratio_process_tree_over_floor": round(headline["marginal_core_ms_per_clip_process_tree"]["median"]
                                               / floor_ms, 3),
        "marginal_split_ms_per_clip": {k: _stat([f["split"].get(k, 0.0) for f in used]) for k in roles},
        "floor_ms_per_clip": round(floor_ms, 2),
        "floor_ms_per_clip_points": [round(f, 2) for f in floors],
        "floor_in_process_ms_before": round(before["ms"]["floor"], 2),
        "floor_in_process_ms_after": round(after["ms"]["floor"], 2),
        "tiny_models_ms_per_window": round(models_ms, 2),
        "object_store_bytes_per_window": round((before["object_store_bytes_per_window"]
                                                + after["object_store_bytes_per_window"]) / 2),
        "one_thread_ms": {"mean": {k: round(v, 2) for k, v in parts.items()},
                          "before": {k: round(v, 2) for k, v in before["ms"].items()},
                          "after": {k: round(v, 2) for k, v in after["ms"].items()}},
        "pairs_used": len(used),
        "pairs_matched": sum(matched),
        "process_starts_matched": any(matched),
        "pair_runs": [{"matched": m, "figures": _rounded(f), "small": _rounded(p["small"]),
                       "large": _rounded(p["large"])} for p, f, m in zip(pairs, figures, matched)],
    }


def _rounded(v, digits: int = 3):
    if isinstance(v, float):
        return round(v, digits)
    if isinstance(v, dict):
        return {k: _rounded(x, digits) for k, x in v.items()}
    return v


def report(result: dict) -> None:
    r, rng, floor = result, result["range"], result["floor_ms_per_clip"]
    print(f"marginal CPU per clip, features on {r['features_on']}, job with tiny models, {r['sizes'][0]} vs "
          f"{r['sizes'][1]} files, {r['pairs_used']} of {r['pairs']} pairs; {r['machine']}, load average "
          f"{r['load_avg_1min_at_end']:.1f} at end")
    print(f"{'measure':<46}{'median':>9}{'[min, max]':>20}{'/ floor':>9}")

    def row(label: str, key: str) -> None:
        lo, hi = rng[key]
        print(f"{label:<46}{r[key]:>9.2f}{f'[{lo:.2f}, {hi:.2f}]':>20}{r[key] / floor:>9.2f}")

    row("whole machine (/proc/stat)", "marginal_core_ms_per_clip_machine")
    row("process tree (driver, Ray, workers, children)", "marginal_core_ms_per_clip_process_tree")
    row("  model actors (ast_actor, clap_actor)", "model_actors_ms_per_clip")
    row("  process tree less the model actors", "tree_minus_actors_ms_per_clip")
    row("CPU side: " + ("less the tiny models (1 thread)" if r["features_on"] == "cpu"
                        else "less the model actors' processes"), "cpu_side_ms_per_clip")
    row("featurize: task workers + decoder children", "featurize_ms_per_clip")
    row("Ray processes and the driver", "ray_and_driver_ms_per_clip")
    print(f"{'floor (decode + 2 resamples + bare FFTs)':<46}{floor:>9.2f}"
          f"  median of {r['floor_ms_per_clip_points']} (before, between pairs, after)")
    for label, key in (("CPU side", "ratio_cpu_side_over_floor"), ("process tree less the model actors",
                                                                   "ratio_tree_minus_actors_over_floor"),
                       ("featurize", "ratio_featurize_over_floor")):
        lo, hi = rng[key]
        print(f"{label + ' / the floor around its pair':<46}{r[key]:>9.3f}{f'[{lo:.3f}, {hi:.3f}]':>20}")
    lo, hi = rng["steady_clips_per_s"]
    print(f"steady state {r['steady_clips_per_s']} clips/s [{lo}, {hi}]; Ray and the driver "
          f"{r['ray_and_driver_cores']} cores; object store {r['object_store_bytes_per_window']} bytes per window"
          + ("" if r["process_starts_matched"] else "\nWARNING: in no pair did the small and large run start the "
                                                   "same processes: start-up does not cancel"))
    print("\nmarginal ms per clip by process role: median [min, max]")
    for k, v in sorted(r["marginal_split_ms_per_clip"].items(), key=lambda kv: -kv[1]["median"]):
        print(f"  {k:<24}{v['median']:>8.2f}  [{v['min']:.2f}, {v['max']:.2f}]")
    print("\none thread, ms per clip (median CPU time): mean, before, after")
    for k, v in r["one_thread_ms"]["mean"].items():
        print(f"  {k:<24}{v:>8.2f}{r['one_thread_ms']['before'][k]:>9.2f}{r['one_thread_ms']['after'][k]:>9.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
