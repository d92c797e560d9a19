"""The ledger's cost of a run with nothing new, after 1, 10 and 100 earlier runs, and after maintenance
(issue 21: "a run with nothing new costs the same after 100 earlier runs as after 1").

One synthetic OUTPUT is built run by run with the commit path itself (`PartWriter` parts, `commit_shard`),
no Ray and no models: each run is one shard of `--clips` clip rows (300) with `--windows` windows each
(3), written in parts of one worker batch (`--batch-windows` windows, 512: a segments part and a clips
part per batch, as the workers' sink writes them); from the second run on, `--changed` (30) of them are
files of the previous run processed again (changed files), so every commit after the first also removes
and rewrites files. Widths are tiny (3 labels, 4-d AST, 2-d CLAP): the no-op run reads only the clips'
identity columns, whatever the widths.

At 1, 10 and 100 runs, again after `maintain` (compact, checkpoint, vacuum with retention 0) on the
100-run OUTPUT, and on a reference OUTPUT holding the same rows from one run in one part per table, it times what `run_tag_job` does on the driver around an empty listing (`noop_run`):
check_writable, take the lease, `delta.recover`, open the clips table, `table_settings_values`,
`table_settings`, `SkipCheck.build` over the current table, `shard_seq`, release. Median and range of
`--repeats` runs (after one warm-up), their CPU time (median: less sensitive to other work on a shared
machine), each stage's median, the tables' data files and log entries
(`_delta_log` commit files; the ones a reader replays after the newest checkpoint in brackets), and how
long the last run before the point took to write and commit its shard.

Usage: python -m benchmarks.ledger [--runs 1 10 100] [--repeats 7] [--out benchmarks/results/ledger.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrow import fixed_list
from pipeline.store import delta
from pipeline.store.writer import PartWriter
from schemas import clips_schema, segments_schema
from schemas.tables import LABEL_TYPE

log = logging.getLogger("benchmarks.ledger")

DIMS = (3, 4, 2)   # labels, AST width, CLAP width: tiny, the ledger reads none of them
SETTINGS = delta.Settings("5e771a6550000000", {"synthetic": "benchmarks.ledger", "dims": list(DIMS)})
SCHEMAS = {"clips": clips_schema(*DIMS), "segments": segments_schema(*DIMS)}


def clip_id(n: int) -> str:
    """The clip_id of synthetic file number `n` (a hash of its URI, as the job's listing makes it)."""
    return hashlib.sha256(f"/corpus/{n:08d}.flac".encode()).hexdigest()[:20]


def _labels(scores: np.ndarray) -> pa.Array:
    return pa.array([[{"label": "l0", "score": float(s[0])}] for s in scores], LABEL_TYPE)


def clip_rows(numbers: list[int], run_id: str, windows: int, rng: np.random.Generator) -> pa.Table:
    """Ok clip rows of synthetic files `numbers`, in the clips schema (sizes change with the run, as a
    changed file's would)."""
    n = len(numbers)
    scores = rng.random((n, DIMS[0]), np.float32)
    columns = {
        "clip_id": [clip_id(k) for k in numbers], "uri": [f"/corpus/{k:08d}.flac" for k in numbers],
        "status": ["ok"] * n, "error": pa.nulls(n, pa.string()), "warning": pa.nulls(n, pa.string()),
        "size_bytes": [100_000 + k + len(run_id) for k in numbers], "modified": [f"{run_id}T00:00:00+00:00"] * n,
        "etag": [f"{k:08d}-{run_id}" for k in numbers], "duration_s": [10.0 * windows] * n,
        "sample_rate": pa.array([44_100] * n, pa.int32()), "channels": pa.array([2] * n, pa.int32()),
        "decoder": ["soundfile"] * n, "num_segments": pa.array([windows] * n, pa.int32()),
        "labels": _labels(scores), "zero_shot": pa.nulls(n, LABEL_TYPE), "scores": fixed_list(scores),
        "ast_embedding": fixed_list(rng.random((n, DIMS[1]), np.float32)),
        "clap_embedding": fixed_list(rng.random((n, DIMS[2]), np.float32)), "run_id": [run_id] * n}
    return pa.table(columns, schema=SCHEMAS["clips"])


def segment_rows(clips: pa.Table, windows: int, rng: np.random.Generator) -> pa.Table:
    """`windows` windows of every clip row, in the segments schema."""
    n = len(clips) * windows
    take = np.repeat(np.arange(len(clips)), windows)
    scores = rng.random((n, DIMS[0]), np.float32)
    start = np.tile(np.arange(windows) * 10.0, len(clips))
    columns = {
        "clip_id": clips.column("clip_id").take(take), "uri": clips.column("uri").take(take),
        "segment_index": pa.array(np.tile(np.arange(windows), len(clips)), pa.int32()),
        "start_s": start, "end_s": start + 10.0, "labels": _labels(scores), "scores": fixed_list(scores),
        "ast_embedding": fixed_list(rng.random((n, DIMS[1]), np.float32)),
        "clap_embedding": fixed_list(rng.random((n, DIMS[2]), np.float32)),
        "run_id": clips.column("run_id").take(take)}
    return pa.table(columns, schema=SCHEMAS["segments"])


def commit_run(output: str, seq: int, run_id: str, numbers: list[int], reprocessed: list[int] = (),
               windows: int = 3, batch_clips: int = 85, seed: int = 0,
               fault: Callable[[str], None] = lambda step: None) -> dict[str, list[str]]:
    """One run's shard `seq`: clip rows of files `numbers` (`reprocessed`: those of them already in the
    table, whose older rows the commit replaces) and their windows, written as parts of `batch_clips`
    clips (segments part first, as the sink writes them) and committed with `commit_shard`. Returns the
    part files, by table."""
    rng = np.random.default_rng(seed + seq)
    metadata = {"settings_hash": SETTINGS.hash, "run_id": run_id, "synthetic": True}
    writers = {t: PartWriter(output, t, run_id, SCHEMAS[t], metadata) for t in delta.TABLES}
    for start in range(0, len(numbers), batch_clips):
        clips = clip_rows(numbers[start:start + batch_clips], run_id, windows, rng)
        writers["segments"].write(segment_rows(clips, windows, rng))
        writers["clips"].write(clips)
        for table in delta.TABLES:
            writers[table].flush()
    parts = {t: w.files for t, w in writers.items()}
    delta.commit_shard(output, seq, run_id, SETTINGS, parts, SCHEMAS,
                       pa.array([clip_id(k) for k in reprocessed], pa.string()), fault=fault)
    return parts


def extend(output: str, start: int, stop: int, clips: int, changed: int, windows: int, batch_windows: int) -> float:
    """Runs start+1..stop: run k processes `clips - changed` new files and, from the second run on,
    `changed` files of run k-1 again (changed files: their older rows and windows are replaced). Returns
    the last run's seconds (writing its parts and committing them)."""
    new = clips - changed
    for k in range(start + 1, stop + 1):
        again = list(range((k - 2) * new, (k - 2) * new + changed)) if k > 1 else []
        t = time.perf_counter()
        commit_run(output, k, f"run{k:04d}", list(range((k - 1) * new, k * new)) + again, again, windows,
                   max(1, batch_windows // windows))
    return time.perf_counter() - t


def noop_run(output: str) -> dict[str, float]:
    """What run_tag_job does on the driver around a listing with nothing new, stage by stage (seconds):
    no Ray, no models, the run's settings taken to be the table's."""
    from pipeline.store.lease import Lease
    from pipeline.store.writer import check_writable
    from pipeline.tagging.job import SkipCheck

    times, t, cpu = {}, time.perf_counter(), time.process_time()   # "lease": check_writable, acquire, release

    def lap(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[stage], t = times.get(stage, 0.0) + now - t, now

    check_writable(output)
    lease = Lease(output, f"noop-{os.getpid()}")
    lease.acquire()
    lap("lease")
    delta.recover(output)
    lap("recover")
    clips = delta.open_table(output, "clips")
    lap("open")
    delta.table_settings_values(clips)
    settings_hash = delta.table_settings(clips)
    lap("settings")
    skip = SkipCheck.build(output, settings_hash)
    delta.shard_seq(clips)
    lap("skip_check")
    lease.release()
    lap("lease")
    if len(skip.done) != clip_count(clips):
        raise RuntimeError(f"the skip check found {len(skip.done)} done files, the table has {clip_count(clips)}")
    times["total"] = sum(times.values())
    times["cpu"] = time.process_time() - cpu
    return times


def clip_count(dt) -> int:
    return int(pc.sum(delta._adds(dt).column("num_records")).as_py() or 0)


def ledger_size(output: str) -> dict:
    """Per table: current data files, files under the table (data files and the ones vacuum has not yet
    deleted), commit files in the log, and commits a reader replays after the newest checkpoint."""
    sizes = {}
    for table in delta.TABLES:
        dt = delta.open_table(output, table)
        root = Path(delta.table_uri(output, table))
        log_dir = root / "_delta_log"
        commits = sorted(int(p.name.split(".")[0]) for p in log_dir.glob("*.json"))
        checkpoints = [int(p.name.split(".")[0]) for p in log_dir.glob("*.checkpoint*.parquet")]
        since = max(checkpoints, default=-1)
        sizes[table] = {"data_files": len(delta._adds(dt)), "version": dt.version(),
                        "files_on_disk": sum(1 for p in root.rglob("*.parquet") if "_delta_log" not in p.parts),
                        "log_commits": len(commits), "checkpoints": len(checkpoints),
                        "replayed_commits": sum(1 for v in commits if v > since)}
    sizes["clips"]["rows"] = clip_count(delta.open_table(output, "clips"))
    return sizes


def measure(output: str, label: str, runs: int, repeats: int) -> dict:
    noop_run(output)   # warm-up: first opens, page cache
    samples = [noop_run(output) for _ in range(repeats)]
    totals, cpus = [s["total"] for s in samples], [s["cpu"] for s in samples]
    point = {"state": label, "earlier_runs": runs, "repeats": repeats,
             "noop_s": {"median": statistics.median(totals), "min": min(totals), "max": max(totals)},
             "noop_cpu_s": {"median": statistics.median(cpus), "min": min(cpus), "max": max(cpus)},
             "stage_median_s": {k: statistics.median(s[k] for s in samples) for k in samples[0]
                                if k not in ("total", "cpu")},
             **ledger_size(output)}
    log.info("%s: no-op run %.3f s (%.3f-%.3f)", label, point["noop_s"]["median"], min(totals), max(totals))
    return point


def run_maintenance(output: str) -> tuple[float, dict]:
    """jobs.maintain's work (under the lease): compact, checkpoint, vacuum with retention 0."""
    from pipeline.store.lease import Lease
    from pipeline.store.maintain import MaintainConfig, maintain

    start = time.perf_counter()
    with Lease(output, "maintenance", purpose="maintain") as lease:
        report = maintain(MaintainConfig(output, retention_hours=0), check=lease.check)
    return time.perf_counter() - start, report


def table(points: list[dict]) -> str:
    head = ("| OUTPUT | clip rows | no-op run, median s (range) | its CPU s | lease | recover | open + settings "
            "| skip check "
            "| data files (clips / segments) | log commits (replayed) clips / segments "
            "| last run's write + commit s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for p in points:
        s, n, c, g = p["stage_median_s"], p["noop_s"], p["clips"], p["segments"]
        last = f"{p['last_run_s']:.2f}" if "last_run_s" in p else "-"
        rows.append(f"| {p['state']} | {c['rows']:,} | {n['median']:.3f} ({n['min']:.3f}-{n['max']:.3f}) | "
                    f"{p['noop_cpu_s']['median']:.3f} | "
                    f"{s['lease']:.3f} | {s['recover']:.3f} | {s['open'] + s['settings']:.3f} | "
                    f"{s['skip_check']:.3f} | "
                    f"{c['data_files']} / {g['data_files']} | {c['log_commits']} ({c['replayed_commits']}) / "
                    f"{g['log_commits']} ({g['replayed_commits']}) | {last} |")
    return "\n".join([head, *rows])


def main(argv=None) -> int:
    from benchmarks import machine, write_result

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[1, 10, 100], help="earlier runs to measure after")
    p.add_argument("--clips", type=int, default=300, help="clip rows per run (the first: clips - changed)")
    p.add_argument("--changed", type=int, default=30, help="of them, files of the previous run processed again")
    p.add_argument("--windows", type=int, default=3, help="windows per clip")
    p.add_argument("--batch-windows", type=int, default=512, help="windows per part (a worker batch)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/ledger.json")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    load_start, started = os.getloadavg()[0], time.perf_counter()
    points, built, build_s = [], 0, {}
    with tempfile.TemporaryDirectory(prefix="ledger-") as tmp:
        output = str(Path(tmp) / "out")
        for runs in sorted(args.runs):
            t = time.perf_counter()
            last_run_s = extend(output, built, runs, args.clips, args.changed, args.windows, args.batch_windows)
            build_s[runs], built = round(time.perf_counter() - t, 1), runs
            label = f"after {runs} run{'s' if runs > 1 else ''}"
            points.append({**measure(output, label, runs, args.repeats), "last_run_s": last_run_s})
        maintain_s, report = run_maintenance(output)
        points.append(measure(output, f"after {built} runs, then maintain", built, args.repeats))
        # the same rows from one run in one part per table: what is left once history and files are gone
        rows, reference = points[-1]["clips"]["rows"], str(Path(tmp) / "reference")
        t = time.perf_counter()
        commit_run(reference, 1, "run0001", list(range(rows)), windows=args.windows, batch_clips=rows)
        points.append({**measure(reference, f"1 run of {rows:,} clips, one part", 1, args.repeats),
                       "last_run_s": time.perf_counter() - t})
    result = {
        "benchmark": "ledger", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "load_avg_1min_at_start": load_start, "load_avg_1min_at_end": os.getloadavg()[0],
        "command": " ".join(["python -m benchmarks.ledger", *(argv if argv is not None else sys.argv[1:])]),
        "deltalake": _version("deltalake"), "pyarrow": pa.__version__,
        "per_run": {"clips": args.clips, "changed": args.changed, "windows": args.windows,
                    "batch_windows": args.batch_windows, "widths": dict(zip(("labels", "ast", "clap"), DIMS))},
        "build_s": build_s, "maintain_s": round(maintain_s, 2), "maintain_report": report,
        "wall_s": round(time.perf_counter() - started, 1), "points": points}
    write_result(args.out, result)
    print(f"machine {result['machine']}, {result['date']}, load average {load_start:.1f} -> "
          f"{result['load_avg_1min_at_end']:.1f}; maintain took {maintain_s:.1f} s")
    print(table(points))
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    raise SystemExit(main())
