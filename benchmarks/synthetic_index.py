"""Synthetic search indexes for benchmarks and ANN tests: the real index files and code over given
vectors, without running the tagging job."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from pipeline.retrieval.ann import AnnConfig
from pipeline.retrieval.calibrate import CalibrationConfig, QueryEmbeddings, calibrate
from pipeline.retrieval.files import FORMAT, IndexFiles
from pipeline.retrieval.index import TableWriter, extend_table, write_fresh
from pipeline.retrieval.rows import TABLES


def write_synthetic_index(output: str, blocks: Iterable[np.ndarray] | np.ndarray, ann: AnnConfig = AnnConfig(),
                          calibration: CalibrationConfig | None = None, clap: str = "synthetic",
                          labels: list[str] = ("synthetic",), queries: np.ndarray | None = None) -> dict:
    """An index over given vectors (one 10 s window per fake clip), for benchmarks and ANN tests: the same
    files and code as a real index, without running the tagging job. `blocks` (row blocks, or one
    matrix) stream to disk, so N can exceed memory. Clips and segments share every file. With
    `calibration`, the ANN is calibrated as `build_index` does, with prompts of `labels` through the text
    tower of the CLAP checkpoint `clap` (its embedding width must be the vectors'), or with the given
    `queries` (embeddings) instead; those queries (or prompts) also give the ANN its query axis."""
    if isinstance(blocks, np.ndarray):
        blocks = [blocks]
    files = IndexFiles(output)
    files.new_stage()
    gen = uuid.uuid4().hex[:8]
    writer = TableWriter(files, "segments", gen, ann)
    blocks = iter(blocks)
    first = next(blocks)
    dim = first.shape[1]

    def parts():
        start = 0
        for block in _chain(first, blocks):
            yield pa.Table.from_batches([_synthetic_batch(start, len(block))]), block
            start += len(block)

    timings = {}
    embedded = _queries(clap, labels, calibration, queries)
    entry = write_fresh(writer, files, parts(), _synthetic_batch(0, 1).schema, dim, ann, timings, embedded)
    n = entry["rows"]
    info = {"format": FORMAT, "settings_hash": "synthetic", "versions": None, "shard": 0, "labels": list(labels),
            "built_at": time.time(), "model": {"source": clap, "revision": "none", "untrained": True},
            "ann": asdict(ann), "dim": dim, "rows": {t: n for t in TABLES}, "live": {t: n for t in TABLES},
            "tables": {t: entry for t in TABLES}}
    if calibration:
        started = time.time()
        calibrate(info, files.staged_or_path, ann, calibration, embedded)
        timings["calibrate_s"] = round(time.time() - started, 1)
    files.publish(info)
    return {**info, "build_stages_s": timings}


def _queries(clap: str, labels, calibration: CalibrationConfig | None, queries: np.ndarray | None):
    """What gives the calibration's query embeddings: the given ones, else (with a calibration) the
    labels' prompts through `clap`'s text tower, else nothing (no query axis)."""
    if queries is not None:
        return lambda: queries
    return QueryEmbeddings(clap, list(labels), calibration) if calibration else None


def append_synthetic_index(output: str, vectors: np.ndarray, ann: AnnConfig = AnnConfig(),
                           calibration: CalibrationConfig | None = None, queries: np.ndarray | None = None) -> dict:
    """Append rows to a synthetic index the way `build_index` appends new commits: one new vector shard,
    `add` to the IVF lists, no retraining; with `calibration`, the calibration kept or measured again."""
    files = IndexFiles(output)
    info = files.info()
    entry = info["tables"]["segments"]
    files.new_stage()
    writer = TableWriter(files, "segments", uuid.uuid4().hex[:8], ann)
    with pa.memory_map(files.path(entry["meta"])) as source:
        previous = pa.ipc.open_file(source).read_all()
    added = [(pa.Table.from_batches([_synthetic_batch(entry["rows"], len(vectors))]), vectors)]
    entry = extend_table(writer, files, entry, previous.to_batches(), added, added[0][0].schema, info["dim"], ann)
    n = entry["rows"]
    info.update(rows={t: n for t in TABLES}, live={t: n for t in TABLES}, tables={t: entry for t in TABLES},
                built_at=time.time())
    if calibration:
        calibrate(info, files.staged_or_path, ann, calibration,
                  _queries(info["model"]["source"], info["labels"], calibration, queries))
    files.publish(info)
    return info


def _chain(first, rest):
    yield first
    yield from rest


def _synthetic_batch(start: int, n: int) -> pa.RecordBatch:
    from pipeline.arrow import fixed_list

    ids = np.arange(start, start + n).astype(str)
    strings = lambda a: pa.chunked_array([pa.array(a)]).combine_chunks()  # numpy str arrays may convert chunked
    return pa.RecordBatch.from_pydict({
        "clip_id": strings(np.char.add("c", np.char.zfill(ids, 8))),
        "uri": strings(np.char.add("synthetic://", ids)),
        "segment_index": pa.array(np.zeros(n, np.int32)), "start_s": pa.array(np.zeros(n)),
        "end_s": pa.array(np.full(n, 10.0)), "run_id": pa.array(np.full(n, "synthetic")),
        # one label whose score is spread evenly over [0, 1) (golden-ratio sequence): `min_score` 0.9 keeps 10%
        "scores": fixed_list(((np.arange(start, start + n) * 0.6180339887498949) % 1.0).astype(np.float32)[:, None]),
        "duration_s": pa.array(np.full(n, 10.0)),
        "live": pa.array(np.ones(n, bool)),
    })
