"""The ledger's cost of a run with nothing new, after 1, 10 and 100 earlier runs, and after maintenance
(issue 21: "a run with nothing new costs the same after 100 earlier runs as after 1").

One synthetic OUTPUT is built run by run with the commit path itself (`PartWriter` parts, `commit_shard`),
no Ray and no models: each run is one shard of `--clips` clip rows with `--windows` windows each, written
in parts of one worker batch (`--batch-windows` windows: a segments part and a clips part per batch, as
the workers' sink writes them), of which `--changed` are clips of the previous run processed again
(changed files), so every commit after the first also removes and rewrites files. Widths are tiny (3
labels, 4-d AST, 2-d CLAP): the no-op run reads only the clips' identity columns, whatever the widths.

At 1, 10 and 100 runs, and again after `maintain` (compact, checkpoint, vacuum with retention 0) on the
100-run OUTPUT, it times what `run_tag_job` does on the driver around an empty listing (`noop_run`):
check_writable, take the lease, `delta.recover`, open the clips table, `table_settings_values`,
`table_settings`, `SkipCheck.build` over the current table, `shard_seq`, release. Median and range of
`--repeats` runs, each stage's median, the tables' data files and log entries (`_delta_log` commit files;
the ones a reader replays after the last checkpoint in brackets).

Usage: python -m benchmarks.ledger [--runs 1 10 100] [--repeats 7] [--out benchmarks/results/ledger.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

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
