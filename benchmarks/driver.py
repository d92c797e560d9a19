"""Driver-side ceilings of the job: aggregation + Parquet writing per window, and the skip check.

(a) Aggregate + write. The job's own `ClipAggregator`, `clips_table` and `RunWriters` (below: the driver's
writers before the workers' sink; two `PartWriter`s,
zstd Parquet, 20,000-row parts, to a temporary directory) over 256-window batches of full-size window
rows as they leave the CLAP actors (every FILE_COLUMNS column, status/error/error_detail, segment_index,
start_s/end_s, scores 527 x f32, AST embedding 768 x f32, CLAP embedding 512 x f32; random values),
one file's windows contiguous and in order. Timed: process CPU time (all threads) of the loop
`add` -> `clips_table` -> `write`, plus the final flush. Not timed: building the batches, i.e.
`iter_batches` itself (pulling ~7.3 KB per window from the object store), so the job's real ceiling
is lower. Two shapes: 1-window files (10 s) and 36-window files (6 min).

(b) Skip check. `pipeline.tagging.job._new_or_changed` (Arrow `is_in` on one composite identity key when
driver.json was measured; since issue 14 it is `skip.DoneSet`, see benchmarks/listing.py) on N
listed FILE_SCHEMA rows against 0.9 N done rows (IDENTITY columns), against a Python baseline (a set
of (clip_id, size_bytes, modified, etag) tuples, then a membership mask: the job's code before
df57bde). Each variant runs in its own subprocess: CPU seconds of the call, and peak RSS growth over
the loaded tables (VmHWM reset through /proc/self/clear_refs after the tables are built, so building
them does not count).

(c) The driver's CPU with Ray Data in between (issue 14): the same windows, as Ray blocks in the object
store, streamed either to the driver (`iter_batches`, then (a)'s loop: the job before issue 14) or
through the job's WriteResults tasks (aggregate + write on the workers, 1, 2 or 4 at a time) into its
Collector: driver-process CPU (all threads, Ray Data's executor included) per 1,000 windows.

CPU time, not wall time: the machine may be shared. Prints a table; writes a JSON result file.

Usage: python -m benchmarks.driver [--windows 20480] [--files-n 2000000]
       [--out benchmarks/results/driver.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from benchmarks import machine, write_result

log = logging.getLogger("benchmarks.driver")

NUM_LABELS, AST_DIM, CLAP_DIM = 527, 768, 512
BATCH = 256          # windows per batch from the CLAP actors (GPU_BATCH)
TOP_K = 5            # the job's default





class RunWriters:
    """The segments and clips writers of one run, flushed together, segments first."""

    def __init__(self, segments: PartWriter, clips: PartWriter):
        self.segments, self.clips = segments, clips

    def write(self, segments: pa.Table, clips: pa.Table | None) -> None:
        """Buffer a batch's finished windows and clips; flush both when either is full."""
        self.segments.write(segments)
        if clips is not None:
            self.clips.write(clips)
        if self.segments.full or self.clips.full:
            self.flush()

    def flush(self) -> None:
        # segments first: every clip row in a complete part has all its windows in complete parts
        self.segments.flush()
        self.clips.flush()

    def parts(self) -> dict[str, list[str]]:
        return {"clips": self.clips.files, "segments": self.segments.files}

def _window_batches(total: int, per_file: int, seed: int = 0) -> list[pa.Table]:
    """`total` window rows of ok files with `per_file` windows each (10 s windows), in BATCH-row tables."""
    from pipeline.tagging.aggregate import FILE_COLUMNS
    from pipeline.arrow import fixed_list

    rng = np.random.default_rng(seed)
    files = -(-total // per_file)
    total = files * per_file
    f = np.repeat(np.arange(files), per_file)
    index = np.tile(np.arange(per_file), files).astype(np.int32)
    uris = [f"s3://bucket/audio/{i % 997:03d}/file_{i:09d}.flac" for i in range(files)]
    meta = {
        "clip_id": pa.array([f"{i:020x}" for i in range(files)]).take(pa.array(f)),
        "uri": pa.array(uris).take(pa.array(f)),
        "size_bytes": pa.array(rng.integers(100_000, 10_000_000, files)[f], pa.int64()),
        "modified": pa.array([f"2026-11-{1 + i % 28:02d}T12:34:56+00:00" for i in range(files)]).take(pa.array(f)),
        "etag": pa.array([f'"{i:032x}"' for i in range(files)]).take(pa.array(f)),
        "duration_s": pa.array(np.full(total, 10.0 * per_file)),
        "sample_rate": pa.array(np.full(total, 44100, np.int32)),
        "channels": pa.array(np.full(total, 2, np.int32)),
        "decoder": pa.array(["soundfile"] * total),
        "warning": pa.nulls(total, pa.string()),
        "num_segments": pa.array(np.full(total, per_file, np.int32)),
    }
    assert set(meta) == set(FILE_COLUMNS), "FILE_COLUMNS changed: update the benchmark"
    table = pa.table({**{c: meta[c] for c in FILE_COLUMNS},
                      "status": pa.array(["ok"] * total), "error": pa.nulls(total, pa.string()),
                      "error_detail": pa.nulls(total, pa.string()),
                      "segment_index": pa.array(index, pa.int32()),
                      "start_s": pa.array(10.0 * index.astype(np.float64)),
                      "end_s": pa.array(10.0 * index.astype(np.float64) + 10.0),
                      "scores": fixed_list(rng.random((total, NUM_LABELS), dtype=np.float32)),
                      "ast_embedding": fixed_list(rng.standard_normal((total, AST_DIM), dtype=np.float32)),
                      "clap_embedding": fixed_list(rng.standard_normal((total, CLAP_DIM), dtype=np.float32))})
    return [table.slice(i, BATCH).combine_chunks() for i in range(0, total, BATCH)]


def aggregate_write(total: int, per_file: int, rows_per_file: int = 20_000) -> dict:
    """CPU seconds of the driver's aggregate + write loop over `total` windows of `per_file`-window files."""
    from pipeline.tagging.aggregate import ClipAggregator, clips_table
    from pipeline.store.writer import PartWriter
    from schemas import clips_schema, segments_schema

    batches = _window_batches(total, per_file)
    windows = sum(len(b) for b in batches)
    dims = (NUM_LABELS, AST_DIM, CLAP_DIM)
    names = [f"label_{i:03d}" for i in range(NUM_LABELS)]
    with tempfile.TemporaryDirectory() as out_dir:
        out = RunWriters(segments=PartWriter(out_dir, "segments", "bench", segments_schema(*dims), {}, rows_per_file),
                         clips=PartWriter(out_dir, "clips", "bench", clips_schema(*dims), {}, rows_per_file))
        agg = ClipAggregator(names, TOP_K, "bench")
        clips_n = 0
        start = time.process_time()
        for batch in batches:
            segments, clips = agg.add(batch)
            out.write(segments, clips_table(clips, out.clips.schema) if clips else None)
            clips_n += len(clips)
        out.flush()
        cpu = time.process_time() - start
        parts = out.parts()
        written = sum(os.path.getsize(p) for t in parts.values() for p in t)
    assert agg.pending == 0 and out.segments.rows_written == windows and clips_n == windows // per_file
    return {"windows_per_file": per_file, "windows": windows, "files": clips_n, "cpu_s": round(cpu, 3),
            "windows_per_cpu_s": round(windows / cpu), "files_per_cpu_s": round(clips_n / cpu),
            "parts": {t: len(v) for t, v in parts.items()}, "bytes_written": written}


def _tables(n: int, done_fraction: float = 0.9) -> tuple[pa.Table, pa.Table]:
    """N listed FILE_SCHEMA rows and the IDENTITY columns of the first done_fraction of them."""
    from pipeline.store.ledger import IDENTITY
    from pipeline.tagging.sources import FILE_SCHEMA

    rng = np.random.default_rng(1)
    uris = [f"s3://bucket/audio/{i % 997:03d}/file_{i:09d}.flac" for i in range(n)]
    listed = pa.table({"clip_id": [f"{i:020x}" for i in range(n)], "uri": uris,
                       "size_bytes": pa.array(rng.integers(100_000, 10_000_000, n), pa.int64()),
                       "modified": [f"2026-11-{1 + i % 28:02d}T12:34:56+00:00" for i in range(n)],
                       "etag": [f'"{i:032x}"' for i in range(n)],
                       "listing_error": pa.nulls(n, pa.string())}, schema=FILE_SCHEMA)
    del uris
    done = listed.slice(0, int(n * done_fraction)).select(IDENTITY)
    done = pa.table({c: done.column(c).combine_chunks() for c in IDENTITY})  # as read from Parquet: own buffers
    return listed, done


def python_set_anti_join(listed: pa.Table, done: pa.Table) -> pa.Table:
    """Baseline (pipeline/job.py before df57bde): listed rows whose IDENTITY tuple is not in a Python set
    of the done rows' tuples."""
    from pipeline.store.ledger import IDENTITY

    keys = set(zip(*(done.column(c).to_pylist() for c in IDENTITY)))
    mask = [k not in keys for k in zip(*(listed.column(c).to_pylist() for c in IDENTITY))]
    return listed.filter(pa.array(mask))


def _hwm_kb() -> int:
    """Peak RSS of this process (VmHWM) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def skip_worker(variant: str, n: int) -> dict:
    """Run one skip-check variant in this process: CPU seconds and peak RSS growth (bytes) of the call."""
    from pipeline.tagging.job import _new_or_changed

    listed, done = _tables(n)
    try:  # reset the high-water mark so building the tables does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _rss_kb()
    fn = _new_or_changed if variant == "arrow" else python_set_anti_join
    start = time.process_time()
    todo = fn(listed, done)
    cpu = time.process_time() - start
    peak = _hwm_kb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(todo) == n - len(done)
    return {"variant": variant, "listed": n, "done": len(done), "new": len(todo), "cpu_s": round(cpu, 3),
            "peak_rss_growth_bytes": (peak - base) * 1024, "hwm_reset": reset}


def skip_check(variant: str, n: int) -> dict:
    """`skip_worker` in a fresh subprocess, so the variants' peaks do not mix."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.driver", "--skip-worker", variant,
                           "--files-n", str(n)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ray_driver(total: int, per_file: int, mode: str, workers: int) -> dict:
    """CPU seconds of the driver process (all its threads: Ray Data's executor included) while the job's
    last stage streams `total` full-size windows through Ray Data (a local Ray already started):
    mode "driver": every window comes to the driver (`iter_batches`) and is aggregated and written there
    (the job before issue 14); mode "sink": `workers` WriteResults tasks at a time aggregate and write on
    the workers and the driver's Collector gets one row per batch (the job now)."""
    import ray

    from pipeline.tagging.aggregate import ClipAggregator, clips_table
    from pipeline.tagging.sink import Collector, SinkConfig, WriteResults
    from pipeline.tagging.summary import RunSummary
    from pipeline.store.writer import PartWriter
    from schemas import clips_schema, segments_schema

    batches = _window_batches(total, per_file)
    windows = sum(len(b) for b in batches)
    dims = (NUM_LABELS, AST_DIM, CLAP_DIM)
    names = [f"label_{i:03d}" for i in range(NUM_LABELS)]
    with tempfile.TemporaryDirectory() as out_dir:
        dataset = ray.data.from_arrow(batches)
        clips_n = 0
        if mode == "sink":
            sink = SinkConfig(out_dir, "bench", tuple(names), TOP_K, segments_schema(*dims), clips_schema(*dims), "{}")
            dataset = dataset.map_batches(WriteResults(sink), batch_format="pyarrow", batch_size=BATCH, num_cpus=0.25,
                                          concurrency=workers)
            collector = Collector(sink, RunSummary("bench"))
            start = time.process_time()
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                collector.add(batch)
            collector.finish()
            clips_n = collector.clip_rows
        else:
            out = RunWriters(segments=PartWriter(out_dir, "segments", "bench", segments_schema(*dims), {}),
                             clips=PartWriter(out_dir, "clips", "bench", clips_schema(*dims), {}))
            agg = ClipAggregator(names, TOP_K, "bench")
            start = time.process_time()
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                segments, clips = agg.add(batch)
                out.write(segments, clips_table(clips, out.clips.schema) if clips else None)
                clips_n += len(clips)
            out.flush()
        cpu = time.process_time() - start
    assert clips_n == windows // per_file, (clips_n, windows, per_file)
    return {"mode": mode, "workers": workers if mode == "sink" else 0, "windows_per_file": per_file,
            "windows": windows, "driver_cpu_s": round(cpu, 3),
            "driver_cpu_ms_per_1000_windows": round(1000 * cpu / windows * 1000, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=20_480, help="windows per aggregate+write shape")
    p.add_argument("--files-n", type=int, default=2_000_000, help="listed files for the skip check")
    p.add_argument("--out", default="benchmarks/results/driver.json")
    p.add_argument("--skip-worker", choices=["arrow", "python_set"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.skip_worker:
        print(json.dumps(skip_worker(args.skip_worker, args.files_n)))
        return 0
    logging.basicConfig(level="INFO", format="%(message)s")
    load_start = os.getloadavg()[0]
    agg = [aggregate_write(args.windows, per_file) for per_file in (1, 36)]
    skip = [skip_check(v, args.files_n) for v in ("arrow", "python_set")]
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    streamed = [ray_driver(args.windows, per_file, "driver", 0) for per_file in (1, 36)]
    streamed += [ray_driver(args.windows, per_file, "sink", w) for per_file in (1, 36) for w in (1, 2, 4)]
    ray.shutdown()

    print(f"\nAggregate + write on the driver (one process, {BATCH}-window batches, full-size rows)")
    print(f"{'windows/file':>13}{'windows':>9}{'files':>8}{'CPU s':>8}{'windows/CPU-s':>15}{'files/CPU-s':>13}")
    for r in agg:
        print(f"{r['windows_per_file']:>13}{r['windows']:>9}{r['files']:>8}{r['cpu_s']:>8.2f}"
              f"{r['windows_per_cpu_s']:>15,}{r['files_per_cpu_s']:>13,}")
    print(f"\nSkip check: {args.files_n:,} listed vs {int(args.files_n * 0.9):,} done (one subprocess each)")
    print(f"{'variant':>12}{'CPU s':>8}{'peak RSS growth GB':>20}")
    for r in skip:
        print(f"{r['variant']:>12}{r['cpu_s']:>8.2f}{r['peak_rss_growth_bytes'] / 1e9:>20.2f}")

    print(f"\nThe driver's CPU with Ray Data in between ({args.windows:,} full-size windows, {BATCH}-window batches)")
    print(f"{'mode':>7}{'sink tasks':>11}{'windows/file':>13}{'driver CPU s':>13}{'ms / 1000 windows':>19}")
    for r in streamed:
        print(f"{r['mode']:>7}{r['workers']:>11}{r['windows_per_file']:>13}{r['driver_cpu_s']:>13.2f}"
              f"{r['driver_cpu_ms_per_1000_windows']:>19.1f}")

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine(),
              "load_avg_1min_at_start": load_start, "load_avg_1min_at_end": os.getloadavg()[0],
              "python": platform.python_version(), "pyarrow": pa.__version__,
              "widths": {"labels": NUM_LABELS, "ast_dim": AST_DIM, "clap_dim": CLAP_DIM},
              "batch_windows": BATCH, "top_k": TOP_K, "rows_per_part": 20_000,
              "aggregate_write": agg, "skip_check": skip, "ray_driver": streamed}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
