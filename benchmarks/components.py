"""CPU cost of each featurize component, this tree against an earlier commit, in the same process.

The `pipeline` package of `--before` (a git ref) is exported to a temporary directory under the name
`pipeline_before`, so both versions load side by side; for each clip (10 s, 44.1 kHz stereo FLAC,
benchmarks/corpus.py) and each version, in alternating order, one thread, it times:
- read_bytes: the file's bytes (pipeline/audio/storage.py), local file;
- decode: `Decoder` in-process (libsndfile, downmix, checks, soxr HQ to 16 and 48 kHz);
- ast_fbank, clap_mel: one window each, into a preallocated slot as featurize does;
- featurize_in_process: `Featurize` on the file with the decoder in-process (cpu_cost's measure);
- featurize_isolated_worker / _child: `Featurize` as the job runs it, the decoder in its child
  process; CPU time of this process and of the child (/proc/PID/task/*/schedstat, ns) per file.
Medians (and 10th percentiles: on a shared machine the low end is less disturbed by other work) of
CPU ms per clip over clips x repeats.

Usage: python -m benchmarks.components [--before main] [--clips 16] [--repeats 5]
       [--out benchmarks/results/components_before_after.json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import child_cpu_s, cpu_model
from benchmarks.corpus import make_corpus
from benchmarks.features import one_thread

VERSIONS = ("before", "after")


def export_before(ref: str, root: Path) -> str:
    """`git archive` the ref's pipeline package into root/pipeline_before, imports renamed; its name."""
    repo = Path(__file__).resolve().parent.parent
    tar = subprocess.run(["git", "-C", str(repo), "archive", ref, "pipeline"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=tar, check=True)
    (root / "pipeline").rename(root / "pipeline_before")
    for f in (root / "pipeline_before").rglob("*.py"):
        f.write_text(re.sub(r"\bpipeline\.", "pipeline_before.", f.read_text()))
    sys.path.insert(0, str(root))
    # decoder children run `python -m pipeline_before.tagging.isolation` (`pipeline_before.isolation` before the split)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), str(repo), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", ref], check=True,
                          capture_output=True, text=True).stdout.strip()


def tagging_module(package: str, name: str):
    """Module `name` of the tagging job in one version of the pipeline package: under `tagging/` since
    the package was split into subsystem folders, at the package's top level in refs before that."""
    tagging = f"{package}.tagging"
    return importlib.import_module(f"{tagging if importlib.util.find_spec(tagging) else package}.{name}")


def version_jobs(package: str, files: list[Path]) -> dict:
    """name -> (fn(i) -> child pid or None) for one version of the pipeline package."""
    import pyarrow as pa  # noqa: F401  (Featurize's tables)

    decode = tagging_module(package, "decode")
    storage = tagging_module(package, "storage")
    featurize = tagging_module(package, "featurize")
    isolation = tagging_module(package, "isolation")
    sources = importlib.import_module("pipeline.tagging.sources")
    config = featurize.FeaturizeConfig()
    in_process, isolated = featurize.Featurize(config), featurize.Featurize(config)
    in_process(sources.list_inputs(sources.ListingConfig(str(files[0]))))  # builds the extractors
    ast, clap = featurize._extractors(config.ast, config.clap)
    decoder = decode.Decoder(isolated._decode_config)
    child = isolation.shared_decoder(isolated._decode_config)
    listed = [sources.list_inputs(sources.ListingConfig(str(f))) for f in files]
    datas = [f.read_bytes() for f in files]
    waves = [decoder(d).waves for d in datas]
    ast_out = np.empty((config.ast.max_length, config.ast.num_mel_bins), np.float32)
    clap_out = np.empty((config.clap.channels, config.clap.num_frames, config.clap.num_mel_bins), np.float32)
    real_shared = featurize.shared_decoder

    def run_in_process(i):
        featurize.shared_decoder = decode.Decoder
        try:
            list(in_process(listed[i]))
        finally:
            featurize.shared_decoder = real_shared

    return {
        "read_bytes": lambda i: storage.read_bytes(str(files[i])),
        "decode": lambda i: decoder(datas[i]),
        "ast_fbank": lambda i: ast(waves[i][16_000][:163_840], out=ast_out),
        "clap_mel": lambda i: clap.one(waves[i][48_000][:480_000], out=clap_out),
        "featurize_in_process": run_in_process,
        "featurize_isolated": lambda i: (list(isolated(listed[i])), child.pid)[1],
    }


def measure(files: list[Path], repeats: int) -> dict:
    jobs = {v: version_jobs("pipeline_before" if v == "before" else "pipeline", files) for v in VERSIONS}
    names = list(jobs["after"])
    times = {v: {n: [] for n in names + ["featurize_isolated_child"]} for v in VERSIONS}
    child_last = {}
    with one_thread():
        for v in VERSIONS:
            for n in names:
                pid = jobs[v][n](0)
            child_last[v] = child_cpu_s(pid)
        for r in range(repeats):
            for i in range(len(files)):
                order = VERSIONS if (r + i) % 2 == 0 else VERSIONS[::-1]
                for n in names:
                    for v in order:
                        c0 = time.process_time()
                        pid = jobs[v][n](i)
                        times[v][n].append(time.process_time() - c0)
                        if n == "featurize_isolated":  # the child idles between files: its time since is this file's
                            now = child_cpu_s(pid)
                            times[v]["featurize_isolated_child"].append(now - child_last[v])
                            child_last[v] = now
    return times


def summarise(times: dict) -> dict:
    out = {}
    for n in times["after"]:
        row = {}
        for v in VERSIONS:
            x = np.asarray(times[v][n]) * 1000
            row[f"{v}_median_ms"] = round(float(np.median(x)), 3)
            row[f"{v}_p10_ms"] = round(float(np.percentile(x, 10)), 3)
        row["after_over_before_median"] = round(row["after_median_ms"] / row["before_median_ms"], 3)
        out[n] = row
    for v in VERSIONS:  # the job's path: worker + decoder child
        w, c = out["featurize_isolated"], out["featurize_isolated_child"]
        out.setdefault("featurize_isolated_total", {})[f"{v}_median_ms"] = round(
            w[f"{v}_median_ms"] + c[f"{v}_median_ms"], 3)
    t = out["featurize_isolated_total"]
    t["after_over_before_median"] = round(t["after_median_ms"] / t["before_median_ms"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="main")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/components_before_after.json")
    args = p.parse_args(argv)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        before = export_before(args.before, root)
        make_corpus(root / "clips", args.clips)
        times = measure(sorted((root / "clips").iterdir()), args.repeats)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    result = {"components_cpu_ms_per_clip": summarise(times),
              "before": f"{args.before} ({before})", "after": f"working tree at {head}",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_avg_1min_at_start": load0[0], "load_avg_1min_at_end": os.getloadavg()[0],
              "clip": "10 s, 44.1 kHz stereo FLAC", "clips": args.clips, "repeats": args.repeats,
              "threads": "one (torch and OpenBLAS)", "clock": "process CPU time; decoder child: schedstat"}
    print(f"{'component (CPU ms per clip)':<30}{'before':>9}{'after':>9}{'ratio':>7}{'p10 before':>12}{'p10 after':>11}")
    for n, row in result["components_cpu_ms_per_clip"].items():
        print(f"{n:<30}{row['before_median_ms']:>9}{row['after_median_ms']:>9}{row['after_over_before_median']:>7}"
              f"{row.get('before_p10_ms', ''):>12}{row.get('after_p10_ms', ''):>11}")
    print(f"machine {result['machine']}; load average {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
