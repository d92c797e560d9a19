"""Peak memory of a tagging job at 1x and 10x corpus size: is the job streaming, or does something
grow with the corpus? Target: peak at 10x <= 1.2x peak at 1x.

Each size runs the real job (tiny random-weight models, 10 s 44.1 kHz stereo FLAC clips) in its own
process with its own local Ray; this process samples the proportional set size (PSS, so shared pages
are not counted twice) of that process and all its descendants (driver, raylet, GCS, workers) from
/proc every 0.2 s. Linux only. Sized so 10x runs in about a minute here.

Usage: python -m benchmarks.memory [--files 64] [--factor 10] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.proctree import Sampling, descendants

log = logging.getLogger("benchmarks.memory")


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def tree_pss_mb(root: int) -> float:
    """PSS in MB of `root` and all its descendants."""
    return sum(_pss_kb(pid) for pid in descendants(root)) / 1024


class PeakMemory(Sampling):
    """Context manager: samples tree_pss_mb(pid) in a thread; `peak_mb` when done."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.2):
        super().__init__(interval_s)
        self.pid, self.peak_mb = pid or os.getpid(), 0.0

    def sample(self) -> None:
        self.peak_mb = max(self.peak_mb, tree_pss_mb(self.pid))


def _run_one(files: int, root: Path) -> None:
    """Child process: build corpus and models, run the job, print its summary as JSON."""
    import ray

    from benchmarks.corpus import make_corpus
    from pipeline.demo import build_tiny_ast, build_tiny_clap
    from pipeline.tagging.job import TagJobConfig, run_tag_job

    make_corpus(root / "audio", files)
    ast, clap = build_tiny_ast(root / "models" / "ast"), build_tiny_clap(root / "models" / "clap")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    summary = run_tag_job(TagJobConfig(input=str(root / "audio"), output=str(root / "out"),
                                       ast_model=str(ast), clap_model=str(clap)))
    ray.shutdown()
    sys.stdout.write(json.dumps(summary) + "\n")


def measure(files: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        started = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.memory", "--one", str(files), "--root", tmp],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        with PeakMemory(proc.pid) as peak:
            out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"job with {files} files failed (exit {proc.returncode})")
    summary = json.loads(out.strip().splitlines()[-1])
    return {"files": files, "ok": summary["ok"], "wall_s": round(time.time() - started, 1),
            "peak_pss_mb": round(peak.peak_mb)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=64, help="corpus size at 1x")
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/memory.json")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level="WARNING")
    if args.one:
        _run_one(args.one, Path(args.root))
        return 0
    runs = [measure(args.files), measure(args.files * args.factor)]
    ratio = runs[1]["peak_pss_mb"] / runs[0]["peak_pss_mb"]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
              "runs": runs, "ratio": round(ratio, 3), "target": 1.2}
    print(f"{'files':>7}{'ok':>7}{'wall s':>9}{'peak PSS MB':>13}")
    for r in runs:
        print(f"{r['files']:>7}{r['ok']:>7}{r['wall_s']:>9}{r['peak_pss_mb']:>13}")
    print(f"peak at {args.factor}x / 1x = {ratio:.2f} (target <= 1.2)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
