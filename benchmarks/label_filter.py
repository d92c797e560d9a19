"""A new label filter at scale: the time, bytes read and memory to get one label's score for every row
from the index's label-major score shards (pipeline/retrieval/labels.py), cold (the file's pages evicted
from the page cache, as after a service restart on a node that has not read them) and warm.

Synthetic scores, N rows x L labels (sigmoid-like: most near 0), written through the index's own
ScoreShardWriter in record batches of `--batch` rows (one shard, as a fresh build writes). Bytes read are
the process's storage reads (/proc/self/io read_bytes); memory is the growth of peak RSS (VmHWM).

Usage: python -m benchmarks.label_filter [--n 10000000] [--labels 527] [--batch 65536] [--repeats 3]
       [--data /work/bench-data] [--out benchmarks/results/label_filter.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.arrow import fixed_list
from pipeline.retrieval.labels import ScoreShardWriter, read_label

log = logging.getLogger("benchmarks.label_filter")


def _io_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _evict(path: str) -> None:
    """Drop the file's clean pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_scores(path: str, n: int, labels: int, batch: int, seed: int = 0) -> float:
    started = time.time()
    writer = ScoreShardWriter(path, labels)
    for start in range(0, n, batch):
        rng = np.random.default_rng([seed, start])
        m = min(batch, n - start)
        writer.write(fixed_list(rng.random((m, labels), dtype=np.float32) ** 8))
    writer.close()
    return time.time() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--labels", type=int, default=527)
    p.add_argument("--batch", type=int, default=65_536)
    p.add_argument("--repeats", type=int, default=3, help="labels filtered, each cold then warm")
    p.add_argument("--data", default=None, help="directory for the shard (default: a temporary one)")
    p.add_argument("--out", default="benchmarks/results/label_filter.json")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    root = Path(tempfile.mkdtemp(prefix="label-filter-", dir=args.data))
    try:
        path = str(root / "segments-bench-s000.arrow")
        write_s = write_scores(path, args.n, args.labels, args.batch)
        size = os.path.getsize(path)
        log.info("wrote %d x %d scores (%.1f GB) in %.0f s", args.n, args.labels, size / 1e9, write_s)
        runs = []
        for label in np.linspace(0, args.labels - 1, args.repeats).astype(int):
            for state in ("cold", "warm"):
                if state == "cold":
                    _evict(path)
                io0, hwm0, t0 = _io_read_bytes(), _hwm_bytes(), time.perf_counter()
                keep = read_label([path], int(label)) >= 0.5
                wall = time.perf_counter() - t0
                runs.append({"label": int(label), "state": state, "wall_s": round(wall, 3),
                             "read_mb": round((_io_read_bytes() - io0) / 1e6, 1),
                             "peak_rss_growth_mb": round((_hwm_bytes() - hwm0) / 1e6, 1), "kept": int(keep.sum())})
                log.info("%s", runs[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def stat(state, key):
        values = [r[key] for r in runs if r["state"] == state]
        return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}

    result = {"n": args.n, "labels": args.labels, "batch_rows": args.batch, "file_gb": round(size / 1e9, 2),
              "write_s": round(write_s, 1), "runs": runs,
              **{f"{state}_{key}": stat(state, key) for state in ("cold", "warm")
                 for key in ("wall_s", "read_mb", "peak_rss_growth_mb")},
              "all_labels_mb": round(args.n * args.labels * 4 / 1e6),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"one label of {args.n:,} rows x {args.labels} labels ({result['file_gb']} GB of scores); "
          f"{result['machine']}, {result['date']}")
    print(f"{'':<8}{'wall s (median [min, max])':>30}{'read MB':>22}{'RSS growth MB':>18}")
    for state in ("cold", "warm"):
        w, r, m = (result[f"{state}_{k}"] for k in ("wall_s", "read_mb", "peak_rss_growth_mb"))
        print(f"{state:<8}{w['median']:>12.3f} [{w['min']:.3f}, {w['max']:.3f}]{r['median']:>14.1f}"
              f" [{r['min']:.0f}, {r['max']:.0f}]{m['median']:>10.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
