"""The search index next to the data: OUTPUT/_index/.

    index.json        model (CLAP source, revision), settings hash, commits covered, row counts, labels
    clips.arrow       one row per indexed clip: clip_id, uri, duration_s, run_id, live, scores, clap_embedding
    segments.arrow    one row per indexed window: the same plus segment_index, start_s, end_s
    clips.faiss, segments.faiss   HNSW (inner product) over the rows above, ANN id = row number

Arrow IPC files are memory-mapped at search time. Rows are append-only: an update appends the rows of
new commits and marks rows that a newer result replaced as not `live` (search skips them), so the ANN
index only ever grows by `add`. `rebuild=True` (or too many dead rows) starts over.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.arrow import to_matrix
from pipeline.commits import read_commits, read_current
from pipeline.writer import METADATA_KEY

log = logging.getLogger(__name__)

TABLES = ("clips", "segments")
COLUMNS = {
    "clips": ["clip_id", "uri", "duration_s", "run_id", "scores", "clap_embedding"],
    "segments": ["clip_id", "uri", "segment_index", "start_s", "end_s", "run_id", "scores", "clap_embedding"],
}


@dataclass(frozen=True)
class AnnConfig:
    """HNSW graph degree `m`, build and search beam widths."""

    m: int = 32
    ef_construction: int = 80
    ef_search: int = 320   # 100k vectors: 4.9 ms at recall@10 0.998 (BENCHMARKS.md, Search; search.json)
    rebuild_dead_fraction: float = 0.2


def index_dir(output: str) -> str:
    return output.rstrip("/") + "/_index"


def _current_with_duration(output: str, settings_hash: str) -> dict[str, pa.Table]:
    clips = read_current(output, "clips", settings_hash, columns=COLUMNS["clips"] + ["status"])
    clips = clips.filter(pc.equal(clips.column("status"), "ok"))
    segments = read_current(output, "segments", settings_hash, columns=COLUMNS["segments"])
    durations = dict(zip(clips.column("clip_id").to_pylist(), clips.column("duration_s").to_pylist()))
    segments = segments.append_column(
        "duration_s", pa.array([durations.get(c) for c in segments.column("clip_id").to_pylist()], pa.float64()))
    return {"clips": clips.select(COLUMNS["clips"]),
            "segments": segments.select(COLUMNS["segments"] + ["duration_s"])}


def _data_metadata(output: str, commits: list[dict]) -> dict:
    fs, root = fsspec.core.url_to_fs(output)
    part = f"{root.rstrip('/')}/{commits[-1]['parts']['clips'][0]}"
    with fs.open(part, "rb") as f:
        return json.loads(pq.read_schema(f).metadata[METADATA_KEY])


def build_index(output: str, rebuild: bool = False, ann: AnnConfig = AnnConfig()) -> dict:
    """Create or update the index under OUTPUT/_index/ for the newest settings; returns index.json."""
    import faiss

    commits = [c for c in read_commits(output) if c["parts"]["clips"]]
    if not commits:
        raise FileNotFoundError(f"no committed results under {output}: run jobs.tag first")
    settings = commits[-1]["settings_hash"]
    covered = [c["run_id"] for c in read_commits(output) if c["settings_hash"] == settings]
    meta = _data_metadata(output, commits)
    current = _current_with_duration(output, settings)
    local = _LocalIndexDir(output)
    old = local.read_json()
    if old and (old["settings_hash"] != settings):
        log.info("settings changed since the index was built: full rebuild")
        rebuild = True
    info = {"settings_hash": settings, "commits": covered, "model": meta["models"]["clap"],
            "labels": meta.get("labels") or _label_names(meta), "built_at": time.time(), "ann": ann.__dict__,
            "rows": {}, "live": {}}
    for table in TABLES:
        new = current[table].append_column("live", pa.array(np.ones(len(current[table]), bool)))
        previous = None if rebuild or not old else local.read_table(table)
        if previous is not None:
            keys_now = set(zip(new.column("clip_id").to_pylist(), new.column("run_id").to_pylist()))
            keys_old = list(zip(previous.column("clip_id").to_pylist(), previous.column("run_id").to_pylist()))
            live = np.array([k in keys_now for k in keys_old]) & np.asarray(previous.column("live"))
            known = set(keys_old)
            added = new.filter(pa.array([k not in known for k in zip(new.column("clip_id").to_pylist(),
                                                                     new.column("run_id").to_pylist())]))
            dead = 1 - (live.sum() + len(added)) / max(1, len(previous) + len(added))
            if dead > ann.rebuild_dead_fraction:
                log.info("%s: %.0f%% of indexed rows replaced: full rebuild", table, dead * 100)
                previous = None
        if previous is None:
            table_out, index = new, _new_hnsw(new, ann, faiss)
        else:
            table_out = pa.concat_tables([previous.set_column(previous.schema.get_field_index("live"), "live",
                                                              pa.array(live)), added])
            index = local.read_faiss(table, faiss)
            if len(added):
                index.add(np.ascontiguousarray(to_matrix(added.column("clap_embedding"))))
        local.write_table(table, table_out)
        local.write_faiss(table, index, faiss)
        info["rows"][table] = len(table_out)
        info["live"][table] = int(np.asarray(table_out.column("live")).sum())
    local.write_json(info)
    local.publish()
    log.info("index %s: %s rows (%s live), commits %s", index_dir(output), info["rows"], info["live"], covered)
    return info


def _label_names(meta: dict) -> list[str]:
    from pipeline.checkpoints import label_names

    return label_names(meta["models"]["ast"]["source"])


def _new_hnsw(table: pa.Table, ann: AnnConfig, faiss):
    vectors = np.ascontiguousarray(to_matrix(table.column("clap_embedding")))
    index = faiss.IndexHNSWFlat(vectors.shape[1], ann.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ann.ef_construction
    index.add(vectors)
    return index


class _LocalIndexDir:
    """Reads the published index and stages a new one; local files are published by rename, remote
    ones uploaded (index.json last, so a reader never pairs new vectors with an old manifest)."""

    def __init__(self, output: str):
        self.fs, root = fsspec.core.url_to_fs(index_dir(output))
        self.remote_root = root
        self.local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        self.read_root = root if self.local else fetch_index(output)
        self.stage = tempfile.mkdtemp(prefix="index-")

    def read_json(self) -> dict | None:
        path = os.path.join(self.read_root, "index.json") if self.read_root else None
        if not path or not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def read_table(self, table: str) -> pa.Table:
        with pa.memory_map(os.path.join(self.read_root, f"{table}.arrow")) as source:
            return pa.ipc.open_file(source).read_all()

    def read_faiss(self, table: str, faiss):
        return faiss.read_index(os.path.join(self.read_root, f"{table}.faiss"))

    def write_table(self, table: str, data: pa.Table) -> None:
        with pa.OSFile(os.path.join(self.stage, f"{table}.arrow"), "wb") as sink:
            with pa.ipc.new_file(sink, data.schema) as writer:
                writer.write_table(data)

    def write_faiss(self, table: str, index, faiss) -> None:
        faiss.write_index(index, os.path.join(self.stage, f"{table}.faiss"))

    def write_json(self, info: dict) -> None:
        with open(os.path.join(self.stage, "index.json"), "w") as f:
            json.dump(info, f, indent=1)

    def publish(self) -> None:
        names = [f"{t}.{ext}" for t in TABLES for ext in ("arrow", "faiss")] + ["index.json"]
        self.fs.makedirs(self.remote_root, exist_ok=True)
        for name in names:
            src, dst = os.path.join(self.stage, name), f"{self.remote_root}/{name}"
            if self.local:
                os.replace(src, dst)
            else:
                self.fs.put_file(src, dst)


def fetch_index(output: str) -> str | None:
    """Local directory holding the index of OUTPUT (a cached download when OUTPUT is remote)."""
    fs, root = fsspec.core.url_to_fs(index_dir(output))
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return root
    if not fs.exists(f"{root}/index.json"):
        return None
    from pipeline.checkpoints import cache_dir

    import hashlib

    local = cache_dir() / "indexes" / hashlib.sha256(output.encode()).hexdigest()[:20]
    local.mkdir(parents=True, exist_ok=True)
    for name in ("index.json",) + tuple(f"{t}.{e}" for t in TABLES for e in ("arrow", "faiss")):
        if fs.exists(f"{root}/{name}"):
            fs.get_file(f"{root}/{name}", str(local / name))
    return str(local)


def write_synthetic_index(output: str, vectors: np.ndarray, ann: AnnConfig = AnnConfig()) -> None:
    """An index over given vectors (one window per fake clip), for benchmarks and ANN tests: the same
    files and code as a real index, without running the tagging job."""
    import faiss

    n = len(vectors)
    ids = pa.array([f"c{i:08d}" for i in range(n)])
    from pipeline.arrow import fixed_list

    table = pa.table({
        "clip_id": ids, "uri": pa.array([f"synthetic://{i}" for i in range(n)]),
        "segment_index": pa.array(np.zeros(n, np.int32)), "start_s": pa.array(np.zeros(n)),
        "end_s": pa.array(np.full(n, 10.0)), "run_id": pa.array(["synthetic"] * n),
        "scores": fixed_list(np.zeros((n, 1), np.float32)), "clap_embedding": fixed_list(vectors),
        "duration_s": pa.array(np.full(n, 10.0)), "live": pa.array(np.ones(n, bool)),
    })
    local = _LocalIndexDir(output)
    index = _new_hnsw(table, ann, faiss)  # clips and segments hold the same rows in the same order
    for name in TABLES:
        data = table if name == "segments" else table.drop_columns(["segment_index", "start_s", "end_s"])
        local.write_table(name, data)
        local.write_faiss(name, index, faiss)
    local.write_json({"settings_hash": "synthetic", "commits": [], "labels": ["none"], "built_at": time.time(),
                      "model": {"source": "synthetic", "revision": "none", "untrained": True},
                      "ann": ann.__dict__, "rows": {t: n for t in TABLES}, "live": {t: n for t in TABLES}})
    local.publish()
