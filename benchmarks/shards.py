"""What committing in shards costs a run: the same corpus tagged as one shard and as several.

Each run is `python -m jobs.tag` in its own process (its own local Ray, as a scheduled job starts), with
tiny random-weight checkpoints, into a fresh OUTPUT; wall time from start to exit. Runs alternate one
shard / several shards, `--repeats` times each. Per-shard overhead = (median wall with S shards - median
wall with one) / (S - 1): what each extra commit point costs the run. Before the single streaming
execution each shard was its own Ray Data execution (actors started and drained per shard); `--repo`
runs another checkout (e.g. a git worktree of an older commit) with the same corpus and checkpoints.

Usage: python -m benchmarks.shards [--files 420] [--shard-files 60] [--repeats 3] [--repo PATH]
       [--label NAME] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.corpus import make_corpus

log = logging.getLogger("benchmarks.shards")
REPO = Path(__file__).resolve().parents[1]


def run_job(repo: Path, audio: Path, out: Path, models: dict, shard_files: int) -> tuple[float, dict]:
    """Wall seconds of one `jobs.tag` process, and its summary."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(repo)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.tag", "--input", str(audio), "--output", str(out), "--ast-model",
           models["ast"], "--clap-model", models["clap"], "--shard-files", str(shard_files), "--log-level", "WARNING"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"jobs.tag exited {proc.returncode}: {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return wall, summary


def table(result: dict) -> str:
    lines = ["| shards | wall s, median [min, max] | runs |", "|---|---|---|"]
    for key in ("one", "several"):
        r = result[key]
        lines.append(f"| {r['shards']} | {r['median_s']:.1f} [{min(r['walls_s']):.1f}, {max(r['walls_s']):.1f}] "
                     f"| {len(r['walls_s'])} |")
    lines.append(f"\nper extra shard: {result['per_shard_overhead_s']:.2f} s ({result['label']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=420)
    p.add_argument("--seconds", type=float, default=1.0, help="seconds of audio per file")
    p.add_argument("--shard-files", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose jobs.tag runs")
    p.add_argument("--label", default="this checkout")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "shards.json")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    from pipeline.demo import build_tiny_ast, build_tiny_clap

    shards = -(-args.files // args.shard_files)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {"ast": str(build_tiny_ast(root / "ast")), "clap": str(build_tiny_clap(root / "clap"))}
        make_corpus(root / "audio", args.files, seconds=args.seconds)
        walls = {"one": [], "several": []}
        for r in range(args.repeats):
            for key, shard_files in (("one", args.files), ("several", args.shard_files)):
                wall, summary = run_job(args.repo, root / "audio", root / f"out-{key}-{r}", models, shard_files)
                if summary["ok"] != args.files:
                    raise RuntimeError(f"expected {args.files} ok files: {summary}")
                walls[key].append(round(wall, 2))
                log.info("repeat %d, %s shard(s): %.1f s", r + 1, 1 if key == "one" else shards, wall)
    one, several = statistics.median(walls["one"]), statistics.median(walls["several"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True,
                            text=True).stdout.strip()
    result = {"benchmark": "shards", "label": args.label, "commit": commit, "files": args.files,
              "seconds_per_file": args.seconds, "shard_files": args.shard_files,
              "one": {"shards": 1, "walls_s": walls["one"], "median_s": one},
              "several": {"shards": shards, "walls_s": walls["several"], "median_s": several},
              "per_shard_overhead_s": round((several - one) / max(1, shards - 1), 3),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    print(table(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
