"""The search index next to the data: OUTPUT/_index/ (a local path or object storage).

    index.json                    model, settings hash, commits covered, rows, labels, and per table the
                                  names of its files (below); written last, so it always names complete files
    {table}-{gen}.arrow           row metadata: clip_id, uri, duration_s, run_id, live, scores (+ segment_index,
                                  start_s, end_s for segments); Arrow IPC, memory-mapped
    {table}-{gen}.ivfpq           FAISS IVF-PQ over the rows (ANN id = row number); absent for small tables
    {table}-{gen}-v{i}.faiss      the rows' CLAP embeddings as float16 shards (pipeline.vectors): exact search
                                  and re-ranking of ANN candidates

Every file is written once under a new generation name and never changed, so a cached copy of a name
is always valid. Rows are append-only: an update appends the rows of new commits (a new vector shard,
`add` to the IVF lists, no retraining) and marks rows that a newer result replaced as not `live` (search
skips them). `rebuild=True`, a settings change or too many dead rows starts over (and retrains).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.arrow import to_matrix
from pipeline.commits import read_commits, read_current
from pipeline.vectors import VectorStore, write_shard
from pipeline.writer import METADATA_KEY

log = logging.getLogger(__name__)

TABLES = ("clips", "segments")
COLUMNS = {
    "clips": ["clip_id", "uri", "duration_s", "run_id", "scores", "clap_embedding"],
    "segments": ["clip_id", "uri", "segment_index", "start_s", "end_s", "run_id", "scores", "clap_embedding"],
}
FORMAT = 2  # 1: HNSW over float32 vectors in the Arrow files (before issue 15)


@dataclass(frozen=True)
class AnnConfig:
    """IVF-PQ with exact re-ranking. Rows are first projected on the `project_dim` leading directions
    of the training sample's (uncentred) second moment, then randomly rotated (0: no projection); the
    IVF and PQ work in that space, the re-ranking on the full vectors. `nlist` IVF lists (None: 4 sqrt(N)
    rounded to a power of two, at most `max_nlist`); `pq_m` sub-quantizers of `pq_bits` each per row;
    k-means trains on `train_rows` rows or `train_per_list` per list, whichever is more; a query scans
    `probe_fraction` of the lists (at most `max_probes`) and re-scores `rerank` x k of the best candidates
    exactly against the float16 vectors. Tables under `min_rows` get no ANN (exact search is as cheap).
    Measured choices: BENCHMARKS.md, Search."""

    project_dim: int = 128
    nlist: int | None = None
    max_nlist: int = 8192
    pq_m: int = 64
    pq_bits: int = 4   # 4: fast-scan PQ (SIMD table lookups in registers); 8: classic PQ, finer, slower to scan
    probe_fraction: float = 0.1875
    max_probes: int = 1024    # the fraction's cap: 1024 of 8192 lists at 10M keeps ~7 ms at recall 0.976
    filter_probe_exponent: float = 0.5  # a filter keeping a fraction f of rows scans f ** -exponent times the lists
    min_scan_rows: int = 40_000   # small tables have short lists: probe enough of them to scan this many rows
    rerank: int = 50
    train_rows: int = 200_000
    train_per_list: int = 40   # FAISS warns below 39 training rows per centroid
    kmeans_iters: int = 12
    min_rows: int = 20_000
    shard_rows: int = 1 << 20
    rebuild_dead_fraction: float = 0.2

    def lists(self, n: int) -> int:
        if self.nlist:
            return self.nlist
        return int(min(self.max_nlist, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))))

    def probes(self, nlist: int, rows: int) -> int:
        """Lists a query scans: `probe_fraction` of them (at most `max_probes`), or enough for
        `min_scan_rows` rows."""
        wanted = max(min(self.probe_fraction * nlist, self.max_probes), self.min_scan_rows * nlist / max(1, rows))
        return max(1, min(nlist, math.ceil(wanted)))


def index_dir(output: str) -> str:
    return output.rstrip("/") + "/_index"


# ANN ------------------------------------------------------------------------------------------------

def projection(sample: np.ndarray, out_dim: int, seed: int = 0):
    """A FAISS linear map (no bias) onto the `out_dim` leading eigenvectors of the sample's uncentred
    second moment, then a random rotation that spreads their variance evenly over the PQ sub-quantizers.
    Uncentred, so inner products of projected vectors are those of the vectors' parts in the kept
    subspace (a centring would add a per-row term and change the ranking)."""
    import faiss

    dim = sample.shape[1]
    moment = sample.T.astype(np.float64) @ sample.astype(np.float64) / max(1, len(sample))
    _, vectors = np.linalg.eigh(moment)          # ascending eigenvalues
    leading = vectors[:, ::-1][:, :out_dim]       # dim x out_dim
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((out_dim, out_dim)))
    matrix = np.ascontiguousarray((leading @ rotation).T, np.float32)  # out_dim x dim
    transform = faiss.LinearTransform(dim, out_dim, False)
    faiss.copy_array_to_vector(matrix.ravel(), transform.A)
    transform.is_trained = True
    return transform


class Ann:
    """The ANN of one index table: `ivf`, an IVF-PQ (behind the projection, a FAISS IndexPreTransform, when
    there is one) for unfiltered queries, and `flat`, 4-bit PQ codes of the same projected rows in row
    order (a FAISS IndexPQ, 32 B a row) from which a filtered query scans only the matching rows."""

    def __init__(self, ivf, flat):
        self.ivf, self.flat = ivf, flat

    @property
    def ntotal(self) -> int:
        return int(self.ivf.ntotal)

    def project(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        return project(self.ivf, x)

    def add(self, block: np.ndarray) -> None:
        self.ivf.add(block)
        self.flat.add(self.project(block))


def project(ivf, x: np.ndarray) -> np.ndarray:
    """Rows in the space the IVF-PQ works in: through the projection of an IndexPreTransform, else as given."""
    import faiss

    if isinstance(ivf, faiss.IndexPreTransform):
        for i in range(ivf.chain.size()):
            x = faiss.downcast_VectorTransform(ivf.chain.at(i)).apply(x)
    return x


def train_ann(store: VectorStore, ann: AnnConfig, seed: int = 0) -> Ann:
    """A trained, empty ANN (inner product) for the rows of `store`, from a random sample of them: the
    IVF-PQ behind the projection of `ann.project_dim` (a FAISS IndexPreTransform) when that is smaller than
    dim, and the flat PQ codes for filtered queries."""
    import faiss

    n, nlist = len(store), ann.lists(len(store))
    rows = min(n, max(ann.train_rows, ann.train_per_list * nlist))
    sample = store.get(np.sort(np.random.default_rng(seed).choice(n, rows, replace=False)))
    started = time.time()
    project_to = 0 < ann.project_dim < store.dim
    dim = ann.project_dim if project_to else store.dim
    pq = f"PQ{ann.pq_m}x4fs" if ann.pq_bits == 4 else f"PQ{ann.pq_m}x{ann.pq_bits}"
    # a flat (exact) coarse quantizer: an HNSW one capped recall at 0.62 with 8192 lists (BENCHMARKS.md, Search)
    index = faiss.index_factory(dim, f"IVF{nlist},{pq}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = ann.kmeans_iters
    if project_to:
        transform, inner = projection(sample, dim, seed), index
        index = faiss.IndexPreTransform(transform, inner)
        index.referenced_objects = [transform, inner]  # the C++ object does not own them until written
    index.train(sample)
    flat = faiss.IndexPQ(dim, ann.pq_m, 4, faiss.METRIC_INNER_PRODUCT)
    flat.train(project(index, sample))
    log.info("%sIVF%d,%s and flat PQ%dx4 trained on %d rows in %.0f s", f"projection to {dim}, " if project_to else "",
             nlist, pq, ann.pq_m, rows, time.time() - started)
    return Ann(index, flat)


def add_rows(index: Ann, store: VectorStore, first_row: int = 0, rows_per_block: int = 65_536) -> None:
    """Add rows `first_row`.. of `store` to the IVF lists and the flat codes; ids are row numbers, so rows
    come in order."""
    if index.ntotal != first_row:
        raise ValueError(f"the ANN index holds {index.ntotal} rows, the next to add is {first_row}")
    started = time.time()
    for _, block in store.blocks(rows_per_block, first_row):
        index.add(block)
    log.info("added %d rows to the IVF lists in %.0f s", len(store) - first_row, time.time() - started)


def read_ann(ivf_path: str, flat_path: str) -> Ann:
    import faiss

    return Ann(faiss.read_index(ivf_path), faiss.read_index(flat_path))


# Files ------------------------------------------------------------------------------------------------

class IndexFiles:
    """The files of OUTPUT/_index/: `info()` reads index.json, `path(name)` gives a local path (for an
    index in object storage, a download into a local cache on first use: names never change, so a
    cached file is never stale), `stage` + `publish` write a new generation."""

    def __init__(self, output: str):
        self.output = output
        self.fs, self.root = fsspec.core.url_to_fs(index_dir(output))
        self.remote = not isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        self.cache = _cache_dir(output) if self.remote else self.root
        self._lock = threading.Lock()
        self.stage = None

    def info(self) -> dict | None:
        if self.remote:
            if not self.fs.exists(f"{self.root}/index.json"):
                return None
            text = self.fs.cat_file(f"{self.root}/index.json").decode()
        else:
            path = os.path.join(self.root, "index.json")
            if not os.path.exists(path):
                return None
            with open(path) as f:
                text = f.read()
        return json.loads(text)

    def path(self, name: str) -> str:
        local = os.path.join(self.cache, name)
        if self.remote and not os.path.exists(local):
            with self._lock:
                if not os.path.exists(local):
                    started = time.time()
                    tmp = f"{local}.part-{uuid.uuid4().hex[:8]}"
                    self.fs.get_file(f"{self.root}/{name}", tmp)
                    os.replace(tmp, local)
                    log.info("fetched %s (%.0f MB) in %.1f s", name, os.path.getsize(local) / 2**20,
                             time.time() - started)
        return local

    def new_stage(self) -> str:
        base = self.root if not self.remote else None
        if base:
            os.makedirs(base, exist_ok=True)
        self.stage = tempfile.mkdtemp(prefix=".stage-", dir=base)
        return self.stage

    def publish(self, info: dict) -> None:
        """Move (or upload) the staged files, then index.json; then delete files no longer named."""
        names = sorted(os.listdir(self.stage))
        self.fs.makedirs(self.root, exist_ok=True)
        for name in names:
            src = os.path.join(self.stage, name)
            if self.remote:
                self.fs.put_file(src, f"{self.root}/{name}")
                os.makedirs(self.cache, exist_ok=True)
                os.replace(src, os.path.join(self.cache, name))
            else:
                os.replace(src, os.path.join(self.root, name))
        data = json.dumps(info, indent=1)
        if self.remote:
            self.fs.pipe_file(f"{self.root}/index.json", data.encode())
        else:
            with open(os.path.join(self.stage, "index.json"), "w") as f:
                f.write(data)
            os.replace(os.path.join(self.stage, "index.json"), os.path.join(self.root, "index.json"))
        shutil.rmtree(self.stage, ignore_errors=True)
        keep = set(referenced(info)) | {"index.json"}
        for path in self.fs.ls(self.root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name not in keep and not name.startswith(".stage-"):
                self.fs.rm(path, recursive=True)


def referenced(info: dict) -> list[str]:
    names = []
    for entry in info.get("tables", {}).values():
        names += [entry["meta"]] + [v["file"] for v in entry["vectors"]]
        names += [entry[k] for k in ("ann", "codes") if entry.get(k)]
    return names


def _cache_dir(output: str) -> str:
    from pipeline.checkpoints import cache_dir

    path = cache_dir() / "indexes" / hashlib.sha256(output.encode()).hexdigest()[:20]
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def fetch_index(output: str) -> IndexFiles | None:
    """The index of OUTPUT, with its small parts (index.json, row metadata, ANN) local; vector shards
    are fetched on first use. None when there is no index."""
    files = IndexFiles(output)
    info = files.info()
    if info is None:
        return None
    if info.get("format") != FORMAT:
        raise ValueError(f"the index under {index_dir(output)} has format {info.get('format', 1)}, this code "
                         f"reads {FORMAT}: run `python -m jobs.index --output {output} --rebuild`")
    for entry in info["tables"].values():
        files.path(entry["meta"])
        if entry["ann"]:
            files.path(entry["ann"])
    return files


def store_of(files: IndexFiles, entry: dict, dim: int) -> VectorStore:
    return VectorStore([(v["file"], v["rows"]) for v in entry["vectors"]], dim, fetch=files.path)


# Build ------------------------------------------------------------------------------------------------

class _TableWriter:
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

    def meta(self, batches: Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema) -> str:
        name = f"{self.table}-{self.gen}.arrow"
        with pa.OSFile(os.path.join(self.files.stage, name), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            for batch in batches:
                w.write(batch)
        return name

    def ann_index(self, index: Ann | None) -> dict:
        """Write the ANN's two files; their names for the index.json entry ("ann": IVF-PQ, "codes": flat)."""
        import faiss

        if index is None:
            return {"ann": None, "codes": None}
        names = {"ann": f"{self.table}-{self.gen}.ivfpq", "codes": f"{self.table}-{self.gen}.pq"}
        faiss.write_index(index.ivf, os.path.join(self.files.stage, names["ann"]))
        faiss.write_index(index.flat, os.path.join(self.files.stage, names["codes"]))
        return names


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


def _fresh(writer: _TableWriter, files: IndexFiles, meta: pa.Table, blocks, dim: int, ann: AnnConfig) -> dict:
    """A table's files from scratch: vector shards, a newly trained ANN, the metadata; its index.json entry."""
    vectors = writer.shards(blocks, dim)
    store = VectorStore([(v["file"], v["rows"]) for v in vectors], dim, fetch=lambda name: os.path.join(files.stage, name))
    index = _build_ann(store, ann)
    return {"rows": len(meta), "meta": writer.meta([meta], meta.schema), **writer.ann_index(index),
            "vectors": vectors}


def _extend(writer: _TableWriter, files: IndexFiles, entry: dict, meta: pa.Table, added: np.ndarray, dim: int,
            ann: AnnConfig) -> dict:
    """A table's files after appending `added` rows (the last rows of `meta`): the old shards plus one new,
    the ANN with the rows added to its lists (trained now if the table just passed `min_rows`)."""
    previous_rows = entry["rows"]
    vectors = entry["vectors"] + (writer.shards([added], dim, first=len(entry["vectors"])) if len(added) else [])
    staged = {v["file"] for v in vectors} - {v["file"] for v in entry["vectors"]}
    store = VectorStore([(v["file"], v["rows"]) for v in vectors], dim,
                        fetch=lambda name: os.path.join(files.stage, name) if name in staged else files.path(name))
    started = time.time()
    if entry["ann"]:
        index = read_ann(files.path(entry["ann"]), files.path(entry["codes"]))
        add_rows(index, store, first_row=previous_rows)
    else:
        index = _build_ann(store, ann)
    log.info("%s: %d rows appended in %.1f s", writer.table, len(store) - previous_rows, time.time() - started)
    return {"rows": len(meta), "meta": writer.meta([meta], meta.schema), **writer.ann_index(index),
            "vectors": vectors}


def _build_ann(store: VectorStore, ann: AnnConfig, timings: dict | None = None):
    """Train and fill an ANN over `store` (None below `min_rows`); seconds per stage into `timings`."""
    if len(store) < ann.min_rows:
        return None
    started = time.time()
    index = train_ann(store, ann)
    trained = time.time()
    add_rows(index, store)
    if timings is not None:
        timings.update(train_s=round(trained - started, 1), add_s=round(time.time() - trained, 1))
    return index


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
    files = IndexFiles(output)
    old = files.info()
    if old and (old.get("format") != FORMAT or old["settings_hash"] != settings):
        log.info("settings or index format changed since the index was built: full rebuild")
        rebuild = True
    gen = uuid.uuid4().hex[:8]
    files.new_stage()
    info = {"format": FORMAT, "settings_hash": settings, "commits": covered, "model": meta["models"]["clap"],
            "labels": meta.get("labels") or _label_names(meta), "built_at": time.time(), "ann": asdict(ann),
            "dim": None, "rows": {}, "live": {}, "tables": {}}
    for table in TABLES:
        new = current[table]
        embeddings = to_matrix(new.column("clap_embedding"))
        dim = embeddings.shape[1] if len(new) else (old or {}).get("dim") or 512
        info["dim"] = dim
        new = new.drop_columns(["clap_embedding"]).append_column("live", pa.array(np.ones(len(new), bool)))
        writer = _TableWriter(files, table, gen, ann)
        entry = None if rebuild or not old else old["tables"][table]
        if entry is not None:
            with pa.memory_map(files.path(entry["meta"])) as source:
                previous = pa.ipc.open_file(source).read_all()
            keys_now = set(zip(new.column("clip_id").to_pylist(), new.column("run_id").to_pylist()))
            keys_old = list(zip(previous.column("clip_id").to_pylist(), previous.column("run_id").to_pylist()))
            live = np.array([k in keys_now for k in keys_old], bool) & np.asarray(previous.column("live"))
            known = set(keys_old)
            is_new = np.array([k not in known for k in zip(new.column("clip_id").to_pylist(),
                                                           new.column("run_id").to_pylist())], bool)
            added, added_vectors = new.filter(pa.array(is_new)), embeddings[is_new]
            dead = 1 - (live.sum() + len(added)) / max(1, len(previous) + len(added))
            if dead > ann.rebuild_dead_fraction:
                log.info("%s: %.0f%% of indexed rows replaced: full rebuild", table, dead * 100)
                entry = None
        if entry is None:
            table_out = new
            info["tables"][table] = _fresh(writer, files, table_out, [embeddings], dim, ann)
        else:
            table_out = pa.concat_tables([previous.set_column(previous.schema.get_field_index("live"), "live",
                                                              pa.array(live)), added])
            info["tables"][table] = _extend(writer, files, entry, table_out, added_vectors, dim, ann)
        info["rows"][table] = len(table_out)
        info["live"][table] = int(np.asarray(table_out.column("live")).sum())
    files.publish(info)
    log.info("index %s: %s rows (%s live), commits %s", index_dir(output), info["rows"], info["live"], covered)
    return info


def _label_names(meta: dict) -> list[str]:
    from pipeline.checkpoints import label_names

    return label_names(meta["models"]["ast"]["source"])


# Synthetic --------------------------------------------------------------------------------------------

def write_synthetic_index(output: str, blocks: Iterable[np.ndarray] | np.ndarray,
                          ann: AnnConfig = AnnConfig()) -> dict:
    """An index over given vectors (one 10 s window per fake clip), for benchmarks and ANN tests: the same
    files and code as a real index, without running the tagging job. `blocks` (row blocks, or one
    matrix) stream to disk, so N can exceed memory. Clips and segments share every file."""
    if isinstance(blocks, np.ndarray):
        blocks = [blocks]
    files = IndexFiles(output)
    files.new_stage()
    gen = uuid.uuid4().hex[:8]
    writer = _TableWriter(files, "segments", gen, ann)
    counted = []

    def counting(stream):
        for block in stream:
            counted.append(len(block))
            yield block

    blocks = iter(blocks)
    first = next(blocks)
    dim = first.shape[1]
    started = time.time()
    vectors = writer.shards(counting(_chain(first, blocks)), dim)
    n = sum(counted)
    timings = {"write_s": round(time.time() - started, 1)}
    log.info("wrote %d float16 rows in %.0f s", n, timings["write_s"])
    schema = _synthetic_batch(0, 1).schema
    meta = writer.meta((_synthetic_batch(s, min(1 << 20, n - s)) for s in range(0, n, 1 << 20)), schema)
    store = VectorStore([(v["file"], v["rows"]) for v in vectors], dim,
                        fetch=lambda name: os.path.join(files.stage, name))
    index = _build_ann(store, ann, timings)
    entry = {"rows": n, "meta": meta, **writer.ann_index(index), "vectors": vectors}
    info = {"format": FORMAT, "settings_hash": "synthetic", "commits": [], "labels": ["synthetic"],
            "built_at": time.time(), "model": {"source": "synthetic", "revision": "none", "untrained": True},
            "ann": asdict(ann), "dim": dim, "rows": {t: n for t in TABLES}, "live": {t: n for t in TABLES},
            "tables": {t: entry for t in TABLES}}
    files.publish(info)
    return {**info, "build_stages_s": timings}


def append_synthetic_index(output: str, vectors: np.ndarray, ann: AnnConfig = AnnConfig()) -> dict:
    """Append rows to a synthetic index the way `build_index` appends new commits: one new vector shard,
    `add` to the IVF lists, no retraining."""
    files = IndexFiles(output)
    info = files.info()
    entry = info["tables"]["segments"]
    files.new_stage()
    writer = _TableWriter(files, "segments", uuid.uuid4().hex[:8], ann)
    with pa.memory_map(files.path(entry["meta"])) as source:
        previous = pa.ipc.open_file(source).read_all()
    meta = pa.concat_tables([previous, pa.Table.from_batches([_synthetic_batch(entry["rows"], len(vectors))])])
    entry = _extend(writer, files, entry, meta, vectors, info["dim"], ann)
    n = entry["rows"]
    info.update(rows={t: n for t in TABLES}, live={t: n for t in TABLES}, tables={t: entry for t in TABLES},
                built_at=time.time())
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
