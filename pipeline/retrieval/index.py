"""Build or update the search index (files.py) from the tagging output's current tables (rows.py).

Rows are append-only: an update appends the rows of new commits (a new vector shard, `add` to the IVF
lists, no retraining) and marks rows that a newer result replaced as not `live` (search skips them).
`rebuild=True`, a settings change or too many dead rows starts over (and retrains).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.retrieval.ann import Ann, AnnConfig, add_rows, build_ann, read_ann
from pipeline.retrieval.calibrate import CalibrationConfig, QueryEmbeddings, calibrate
from pipeline.retrieval.files import FORMAT, IndexFiles, index_dir
from pipeline.retrieval.labels import ScoreShardWriter
from pipeline.retrieval.rows import (TABLES, ast_labels, data_metadata, index_parts, index_rows, meta_schema,
                                     ok_clips, row_keys)
from pipeline.retrieval.vectors import VectorStore, write_shard
from pipeline.store import delta

log = logging.getLogger(__name__)


class TableWriter:
    """Writes one table's files of a new generation into the stage directory."""

    def __init__(self, files: IndexFiles, table: str, gen: str, ann: AnnConfig):
        self.files, self.table, self.gen, self.ann = files, table, gen, ann

    def shards(self, blocks: Iterable[np.ndarray], dim: int, first: int = 0) -> list[dict]:
        """Write row blocks as shards of at most `shard_rows` rows; [{"file", "rows"}]."""
        out, pending = [], _rebatch(blocks, self.ann.shard_rows)
        for i, shard_blocks in enumerate(pending):
            name = f"{self.table}-{self.gen}-v{first + i:03d}.faiss"
            rows = write_shard(os.path.join(self.files.stage, name), shard_blocks, dim)
            out.append({"file": name, "rows": rows})
        return out

    def rows(self, parts: Iterable[tuple[pa.Table, np.ndarray]], schema: pa.Schema,
             before: Iterable[pa.RecordBatch] = (), first_scores: int = 0) -> Iterator[np.ndarray]:
        """Write the row metadata file as rows stream by: the `before` batches (an earlier generation's
        rows), then each part's metadata, passing its vectors on (to `shards`). `schema` is the parts'
        (with `scores`); the parts' scores go label-major to a score shard (labels.py) numbered
        `first_scores`, the rest to the metadata file. Once exhausted, `meta_name` and `meta_rows` name
        the metadata file and count its rows, `score_shards` lists the new score shard (if any rows)."""
        name, count = f"{self.table}-{self.gen}.arrow", 0
        meta_schema = schema.remove(schema.get_field_index("scores"))
        shard_name = f"{self.table}-{self.gen}-s{first_scores:03d}.arrow"
        scores = None
        with pa.OSFile(os.path.join(self.files.stage, name), "wb") as sink, \
                pa.ipc.new_file(sink, meta_schema) as w:
            for batch in before:
                w.write(batch)
                count += len(batch)
            for meta, vectors in parts:
                meta = meta if meta.schema.equals(schema) else meta.cast(schema)
                if len(meta):
                    if scores is None:
                        scores = ScoreShardWriter(os.path.join(self.files.stage, shard_name),
                                                  schema.field("scores").type.list_size)
                    scores.write(meta.column("scores"))
                w.write(meta.drop_columns(["scores"]))
                count += len(meta)
                if len(vectors):
                    yield vectors
        if scores is not None:
            scores.close()
        self.meta_name, self.meta_rows = name, count
        self.score_shards = [{"file": shard_name, "rows": scores.rows}] if scores is not None else []

    def ann_index(self, index: Ann | None) -> dict:
        """Write the ANN's two files; their names for the index.json entry ("ann": IVF-PQ, "codes": flat),
        and whether its projection has the query axis."""
        import faiss

        if index is None:
            return {"ann": None, "codes": None, "query_axis": False}
        names = {"ann": f"{self.table}-{self.gen}.ivfpq", "codes": f"{self.table}-{self.gen}.pq"}
        faiss.write_index(index.ivf, os.path.join(self.files.stage, names["ann"]))
        faiss.write_index(index.flat, os.path.join(self.files.stage, names["codes"]))
        return {**names, "query_axis": index.query_axis}


def _rebatch(blocks: Iterable[np.ndarray], rows: int) -> Iterator[Iterator[np.ndarray]]:
    """Group a stream of row blocks into runs of at most `rows` rows (each run an iterator of blocks)."""
    blocks = iter(blocks)
    carry = [None]

    def run() -> Iterator[np.ndarray]:
        left = rows
        while left:
            block = carry[0] if carry[0] is not None else next(blocks, None)
            carry[0] = None
            if block is None:
                return
            if len(block) > left:
                block, carry[0] = block[:left], block[left:]
            left -= len(block)
            yield block

    while True:
        first = carry[0] if carry[0] is not None else next(blocks, None)
        if first is None:
            return
        carry[0] = first
        yield run()


def write_fresh(writer: TableWriter, files: IndexFiles, parts: Iterable[tuple[pa.Table, np.ndarray]],
                schema: pa.Schema, dim: int, ann: AnnConfig, timings: dict | None = None,
                queries: Callable[[], np.ndarray] | None = None) -> dict:
    """A table's files from scratch, streamed from (metadata, vectors) parts: the metadata, vector shards,
    a newly trained ANN (with the query axis of `queries`, calibrate.py); its index.json entry."""
    started = time.time()
    vectors = writer.shards(writer.rows(parts, schema), dim)
    if timings is not None:
        timings["write_s"] = round(time.time() - started, 1)
    log.info("%s: wrote %d rows in %.0f s", writer.table, writer.meta_rows, time.time() - started)
    store = VectorStore([(v["file"], v["rows"]) for v in vectors], dim, fetch=lambda name: os.path.join(files.stage, name))
    index = build_ann(store, ann, timings, queries)
    return {"rows": writer.meta_rows, "meta": writer.meta_name, **writer.ann_index(index), "vectors": vectors,
            "scores": writer.score_shards}


def extend_table(writer: TableWriter, files: IndexFiles, entry: dict, previous: Iterable[pa.RecordBatch],
                 parts: Iterable[tuple[pa.Table, np.ndarray]], schema: pa.Schema, dim: int, ann: AnnConfig,
                 queries: Callable[[], np.ndarray] | None = None) -> dict:
    """A table's files after appending rows: the `previous` metadata batches (live flags updated) then the
    new parts' rows; the old vector and score shards plus new ones; the ANN with the rows added to its lists (trained now
    if the table just passed `min_rows`)."""
    previous_rows = entry["rows"]
    vectors = entry["vectors"] + writer.shards(writer.rows(parts, schema, previous, len(entry["scores"])), dim,
                                               first=len(entry["vectors"]))
    staged = {v["file"] for v in vectors} - {v["file"] for v in entry["vectors"]}
    store = VectorStore([(v["file"], v["rows"]) for v in vectors], dim,
                        fetch=lambda name: os.path.join(files.stage, name) if name in staged else files.path(name))
    started = time.time()
    kept = {}
    if entry["ann"] and entry.get("codes"):
        index = read_ann(files.path(entry["ann"]), files.path(entry["codes"]), entry.get("query_axis", False))
        add_rows(index, store, first_row=previous_rows)
        kept = {"calibration": entry["calibration"]} if entry.get("calibration") else {}  # calibrate.py decides
    else:  # no ANN yet (a small table), or one written before the flat codes: train one now
        index = build_ann(store, ann, queries=queries)
    log.info("%s: %d rows appended in %.1f s", writer.table, len(store) - previous_rows, time.time() - started)
    return {"rows": writer.meta_rows, "meta": writer.meta_name, **writer.ann_index(index), "vectors": vectors,
            "scores": entry["scores"] + writer.score_shards, **kept}


def build_index(output: str, rebuild: bool = False, ann: AnnConfig = AnnConfig(),
                calibration: CalibrationConfig = CalibrationConfig()) -> dict:
    """Create or update the index under OUTPUT/_index/ for the newest settings; returns index.json.
    Rows stream from the current (Delta) table into the index files a batch at a time, so the driver
    never holds the table's embeddings or scores (a full build); an update reads every current row's
    (clip_id, run_id) to mark replaced rows, then streams only the new rows. Before index.json is
    published, each table's ANN is calibrated for text queries (calibrate.py: measured on a full build,
    kept or measured again on an update)."""
    clips = delta.open_table(output, "clips")
    if clips is None or not delta.data_files(output, "clips", clips):
        raise FileNotFoundError(f"no committed results under {output}: run jobs.tag first")
    settings = delta.table_settings(clips)
    covered = {"versions": delta.versions(output), "shard": delta.shard_seq(clips)}
    meta = data_metadata(output, clips)
    ok = ok_clips(output, settings)
    files = IndexFiles(output)
    old = files.info()
    if old and (old.get("format") != FORMAT or old["settings_hash"] != settings):
        log.info("settings or index format changed since the index was built: full rebuild")
        rebuild = True
    gen = uuid.uuid4().hex[:8]
    files.new_stage()
    info = {"format": FORMAT, "settings_hash": settings, **covered, "model": meta["models"]["clap"],
            "labels": meta.get("labels") or ast_labels(meta), "built_at": time.time(), "ann": asdict(ann),
            "dim": None, "rows": {}, "live": {}, "tables": {}}
    queries = QueryEmbeddings(info["model"]["source"], info["labels"], calibration)  # training and calibration
    for table in TABLES:
        batches = index_rows(output, table, settings, ok)
        first = next(batches, None)  # its schema gives the embedding width; it is indexed with the rest
        batches = itertools.chain([first] if first is not None else [], batches)
        dim = first.schema.field("clap_embedding").type.list_size if first is not None else (old or {}).get("dim") or 512
        info["dim"] = dim
        schema = meta_schema(output, table, settings, ok, first)
        writer = TableWriter(files, table, gen, ann)
        entry = None if rebuild or not old else old["tables"][table]
        if entry is not None:
            with pa.memory_map(files.path(entry["meta"])) as source:
                previous = pa.ipc.open_file(source).read_all()
            now = [row_keys(r) for r in index_rows(output, table, settings, ok, ["clip_id", "run_id"])]
            now = pa.chunked_array(now, pa.string()).combine_chunks() if now else pa.array([], pa.string())
            before = row_keys(previous)
            live = np.asarray(pc.is_in(before, value_set=now)) & np.asarray(previous.column("live"))
            added = len(now) - int(pc.sum(pc.is_in(now, value_set=before)).as_py() or 0)
            dead = 1 - (live.sum() + added) / max(1, len(previous) + added)
            if dead > ann.rebuild_dead_fraction:
                log.info("%s: %.0f%% of indexed rows replaced: full rebuild", table, dead * 100)
                entry = None
        if entry is None:
            info["tables"][table] = write_fresh(writer, files, index_parts(batches), schema, dim, ann, queries=queries)
            info["live"][table] = info["tables"][table]["rows"]
        else:
            kept = previous.set_column(previous.schema.get_field_index("live"), "live", pa.array(live))
            info["tables"][table] = extend_table(writer, files, entry, kept.to_batches(),
                                                 index_parts(batches, before), schema, dim, ann, queries)
            info["live"][table] = int(live.sum()) + info["tables"][table]["rows"] - len(previous)
        info["rows"][table] = info["tables"][table]["rows"]
    calibrate(info, files.staged_or_path, ann, calibration, queries)
    files.publish(info)
    log.info("index %s: %s rows (%s live), Delta versions %s", index_dir(output), info["rows"], info["live"],
             covered["versions"])
    return info
