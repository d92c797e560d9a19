"""The search index next to the data: OUTPUT/_index/ (a local path or object storage).

    index.json                    model, settings hash, Delta versions and shard covered, rows, labels, and per table the
                                  names of its files (below); written last, so it always names complete files
    {table}-{gen}.arrow           row metadata: clip_id, uri, duration_s, run_id, live, scores (+ segment_index,
                                  start_s, end_s for segments); Arrow IPC, memory-mapped
    {table}-{gen}.ivfpq           FAISS IVF-PQ over the rows' 128-d projection (ANN id = row number); absent
                                  for small tables
    {table}-{gen}.pq              the same rows' PQ codes in row order (FAISS IndexPQ): filtered queries scan
                                  the codes of the filter's rows
    {table}-{gen}-v{i}.faiss      the rows' CLAP embeddings as float16 shards (pipeline.retrieval.vectors): exact search
                                  and re-ranking of ANN candidates

Every file is written once under a new generation name and never changed, so a cached copy of a name
is always valid. Rows are append-only: an update appends the rows of new commits (a new vector shard,
`add` to the IVF lists, no retraining) and marks rows that a newer result replaced as not `live` (search
skips them). `rebuild=True`, a settings change or too many dead rows starts over (and retrains).
"""

from __future__ import annotations

import hashlib
import itertools
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

from pipeline.store import delta
from pipeline.arrow import to_matrix
from pipeline.store.ledger import read_current
from pipeline.retrieval.vectors import VectorStore, write_shard
from pipeline.store.writer import METADATA_KEY

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

    def rows(self, parts: Iterable[tuple[pa.Table, np.ndarray]], schema: pa.Schema,
             before: Iterable[pa.RecordBatch] = ()) -> Iterator[np.ndarray]:
        """Write the row metadata file as rows stream by: the `before` batches (an earlier generation's
        rows), then each part's metadata, passing its vectors on (to `shards`). Once exhausted,
        `meta_name` and `meta_rows` name the file and count its rows."""
        name, count = f"{self.table}-{self.gen}.arrow", 0
        with pa.OSFile(os.path.join(self.files.stage, name), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            for batch in before:
                w.write(batch)
                count += len(batch)
            for meta, vectors in parts:
                w.write(meta if meta.schema.equals(schema) else meta.cast(schema))
                count += len(meta)
                if len(vectors):
                    yield vectors
        self.meta_name, self.meta_rows = name, count

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


def _fresh(writer: _TableWriter, files: IndexFiles, parts: Iterable[tuple[pa.Table, np.ndarray]],
           schema: pa.Schema, dim: int, ann: AnnConfig, timings: dict | None = None) -> dict:
    """A table's files from scratch, streamed from (metadata, vectors) parts: the metadata, vector shards,
    a newly trained ANN; its index.json entry."""
    started = time.time()
    vectors = writer.shards(writer.rows(parts, schema), dim)
    if timings is not None:
        timings["write_s"] = round(time.time() - started, 1)
    log.info("%s: wrote %d rows in %.0f s", writer.table, writer.meta_rows, time.time() - started)
    store = VectorStore([(v["file"], v["rows"]) for v in vectors], dim, fetch=lambda name: os.path.join(files.stage, name))
    index = _build_ann(store, ann, timings)
    return {"rows": writer.meta_rows, "meta": writer.meta_name, **writer.ann_index(index), "vectors": vectors}


def _extend(writer: _TableWriter, files: IndexFiles, entry: dict, previous: Iterable[pa.RecordBatch],
            parts: Iterable[tuple[pa.Table, np.ndarray]], schema: pa.Schema, dim: int, ann: AnnConfig) -> dict:
    """A table's files after appending rows: the `previous` metadata batches (live flags updated) then the
    new parts' rows; the old shards plus new ones; the ANN with the rows added to its lists (trained now
    if the table just passed `min_rows`)."""
    previous_rows = entry["rows"]
    vectors = entry["vectors"] + writer.shards(writer.rows(parts, schema, previous), dim, first=len(entry["vectors"]))
    staged = {v["file"] for v in vectors} - {v["file"] for v in entry["vectors"]}
    store = VectorStore([(v["file"], v["rows"]) for v in vectors], dim,
                        fetch=lambda name: os.path.join(files.stage, name) if name in staged else files.path(name))
    started = time.time()
    if entry["ann"] and entry.get("codes"):
        index = read_ann(files.path(entry["ann"]), files.path(entry["codes"]))
        add_rows(index, store, first_row=previous_rows)
    else:  # no ANN yet (a small table), or one written before the flat codes: train one now
        index = _build_ann(store, ann)
    log.info("%s: %d rows appended in %.1f s", writer.table, len(store) - previous_rows, time.time() - started)
    return {"rows": writer.meta_rows, "meta": writer.meta_name, **writer.ann_index(index), "vectors": vectors}


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


def _current_batches(output: str, table: str, settings_hash: str, columns: list[str],
                     batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The current rows of `table` with `settings_hash`, only `columns`, in batches: streamed from the
    Delta table when it holds these settings (the driver holds one batch at a time); results of other
    settings (Delta time travel) are read whole."""
    dt = delta.open_table(output, "clips")
    if dt is not None and delta.table_settings(dt) == settings_hash:
        yield from delta.iter_batches(output, table, columns, batch_rows)
    else:
        yield from read_current(output, table, settings_hash, columns=columns).to_batches(batch_rows)


def _ok_clips(output: str, settings_hash: str) -> pa.Table:
    """clip_id and duration_s of the current clips whose status is ok (~50 B a file)."""
    parts = list(_index_rows(output, "clips", settings_hash, None, ["clip_id", "duration_s"]))
    return pa.concat_tables(parts) if parts else pa.table({"clip_id": pa.array([], pa.string()),
                                                           "duration_s": pa.array([], pa.float64())})


def _index_rows(output: str, table: str, settings_hash: str, ok: pa.Table | None,
                columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows an index table holds, as tables of COLUMNS[table] (or `columns` of them) + duration_s for
    segments (from `ok`, see `_ok_clips`): clips whose status is ok, and the windows of the current clips."""
    full, columns = columns is None, columns or COLUMNS[table]
    wanted = columns + (["status"] if table == "clips" else [])
    for batch in _current_batches(output, table, settings_hash, wanted):
        rows = pa.Table.from_batches([batch])
        if table == "clips":
            rows = rows.filter(pc.equal(rows.column("status"), "ok")).select(columns)
        elif full:
            where = pc.index_in(rows.column("clip_id"), value_set=ok.column("clip_id").combine_chunks())
            rows = rows.append_column("duration_s", ok.column("duration_s").take(where))
        if len(rows):
            yield rows


def _keys(rows: pa.Table) -> pa.Array:
    """(clip_id, run_id) of each row as one string: a row of the index is a clip's result of one run."""
    return pc.binary_join_element_wise(rows.column("clip_id"), rows.column("run_id"), "\x1f").combine_chunks()


def _parts(rows: Iterable[pa.Table], known: pa.Array | None = None) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(metadata with live = True, embeddings) of index rows; with `known` keys, only the rows not among them."""
    for part in rows:
        if known is not None:
            part = part.filter(pc.invert(pc.is_in(_keys(part), value_set=known)))
            if not len(part):
                continue
        vectors = to_matrix(part.column("clap_embedding"))
        meta = part.drop_columns(["clap_embedding"]).append_column("live", pa.array(np.ones(len(part), bool)))
        yield meta, vectors


def _data_metadata(output: str, clips) -> dict:
    """The run metadata stored in a data file of the current clips table."""
    fs, _ = fsspec.core.url_to_fs(output)
    with fs.open(delta.data_files(output, "clips", clips)[0], "rb") as f:
        return json.loads(pq.read_schema(f).metadata[METADATA_KEY])


def build_index(output: str, rebuild: bool = False, ann: AnnConfig = AnnConfig()) -> dict:
    """Create or update the index under OUTPUT/_index/ for the newest settings; returns index.json.
    Rows stream from the current (Delta) table into the index files a batch at a time, so the driver
    never holds the table's embeddings or scores (a full build); an update reads every current row's
    (clip_id, run_id) to mark replaced rows, then streams only the new rows."""
    clips = delta.open_table(output, "clips")
    if clips is None or not delta.data_files(output, "clips", clips):
        raise FileNotFoundError(f"no committed results under {output}: run jobs.tag first")
    settings = delta.table_settings(clips)
    covered = {"versions": delta.versions(output), "shard": delta.shard_seq(clips)}
    meta = _data_metadata(output, clips)
    ok = _ok_clips(output, settings)
    files = IndexFiles(output)
    old = files.info()
    if old and (old.get("format") != FORMAT or old["settings_hash"] != settings):
        log.info("settings or index format changed since the index was built: full rebuild")
        rebuild = True
    gen = uuid.uuid4().hex[:8]
    files.new_stage()
    info = {"format": FORMAT, "settings_hash": settings, **covered, "model": meta["models"]["clap"],
            "labels": meta.get("labels") or _label_names(meta), "built_at": time.time(), "ann": asdict(ann),
            "dim": None, "rows": {}, "live": {}, "tables": {}}
    for table in TABLES:
        batches = _index_rows(output, table, settings, ok)
        first = next(batches, None)  # its schema gives the embedding width; it is indexed with the rest
        batches = itertools.chain([first] if first is not None else [], batches)
        dim = first.schema.field("clap_embedding").type.list_size if first is not None else (old or {}).get("dim") or 512
        info["dim"] = dim
        schema = _meta_schema(output, table, settings, ok, first)
        writer = _TableWriter(files, table, gen, ann)
        entry = None if rebuild or not old else old["tables"][table]
        if entry is not None:
            with pa.memory_map(files.path(entry["meta"])) as source:
                previous = pa.ipc.open_file(source).read_all()
            now = [_keys(r) for r in _index_rows(output, table, settings, ok, ["clip_id", "run_id"])]
            now = pa.chunked_array(now, pa.string()).combine_chunks() if now else pa.array([], pa.string())
            before = _keys(previous)
            live = np.asarray(pc.is_in(before, value_set=now)) & np.asarray(previous.column("live"))
            added = len(now) - int(pc.sum(pc.is_in(now, value_set=before)).as_py() or 0)
            dead = 1 - (live.sum() + added) / max(1, len(previous) + added)
            if dead > ann.rebuild_dead_fraction:
                log.info("%s: %.0f%% of indexed rows replaced: full rebuild", table, dead * 100)
                entry = None
        if entry is None:
            info["tables"][table] = _fresh(writer, files, _parts(batches), schema, dim, ann)
            info["live"][table] = info["tables"][table]["rows"]
        else:
            kept = previous.set_column(previous.schema.get_field_index("live"), "live", pa.array(live))
            info["tables"][table] = _extend(writer, files, entry, kept.to_batches(), _parts(batches, before),
                                            kept.schema, dim, ann)
            info["live"][table] = int(live.sum()) + info["tables"][table]["rows"] - len(previous)
        info["rows"][table] = info["tables"][table]["rows"]
    files.publish(info)
    log.info("index %s: %s rows (%s live), Delta versions %s", index_dir(output), info["rows"], info["live"],
             covered["versions"])
    return info


def _meta_schema(output: str, table: str, settings: str, ok: pa.Table, first: pa.Table | None) -> pa.Schema:
    """The schema of a table's row metadata file (its index rows less the embedding, plus `live`)."""
    if first is None:  # no rows: the columns' types from the (empty) current table
        first = read_current(output, table, settings, columns=COLUMNS[table])
        if table == "segments":
            first = first.append_column("duration_s", pa.array([], pa.float64()))
    return first.schema.remove(first.schema.get_field_index("clap_embedding")).append(pa.field("live", pa.bool_()))


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
    blocks = iter(blocks)
    first = next(blocks)
    dim = first.shape[1]

    def parts():
        start = 0
        for block in _chain(first, blocks):
            yield pa.Table.from_batches([_synthetic_batch(start, len(block))]), block
            start += len(block)

    timings = {}
    entry = _fresh(writer, files, parts(), _synthetic_batch(0, 1).schema, dim, ann, timings)
    n = entry["rows"]
    info = {"format": FORMAT, "settings_hash": "synthetic", "versions": None, "shard": 0, "labels": ["synthetic"],
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
    added = [(pa.Table.from_batches([_synthetic_batch(entry["rows"], len(vectors))]), vectors)]
    entry = _extend(writer, files, entry, previous.to_batches(), added, previous.schema, info["dim"], ann)
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
