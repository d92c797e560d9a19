"""The index's files next to the data: OUTPUT/_index/ (a local path or object storage).

    index.json                    model, settings hash, Delta versions and shard covered, rows, labels, and per table the
                                  names of its files (below); written last, so it always names complete files
    {table}-{gen}.arrow           row metadata: clip_id, uri, duration_s, run_id, live (+ segment_index,
                                  start_s, end_s for segments); Arrow IPC, memory-mapped
    {table}-{gen}-s{i}.arrow      the rows' AST label scores, label-major shards (pipeline.retrieval.labels):
                                  a label filter reads one label's column
    {table}-{gen}.ivfpq           FAISS IVF-PQ over the rows' 128-d projection (ANN id = row number); absent
                                  for small tables
    {table}-{gen}.pq              the same rows' PQ codes in row order (FAISS IndexPQ): filtered queries scan
                                  the codes of the filter's rows
    {table}-{gen}-v{i}.faiss      the rows' CLAP embeddings as float16 shards (pipeline.retrieval.vectors): exact search
                                  and re-ranking of ANN candidates

Every file is written once under a new generation name and never changed, so a cached copy of a name
is always valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid

import fsspec

from pipeline.retrieval.vectors import VectorStore

log = logging.getLogger(__name__)

FORMAT = 3  # 1: HNSW over float32 vectors in the Arrow files (before issue 15); 2: scores in the row metadata


def index_dir(output: str) -> str:
    return output.rstrip("/") + "/_index"


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

    def staged_or_path(self, name: str) -> str:
        """A local path to `name`: in the stage if this build wrote it, else `path(name)`."""
        staged = os.path.join(self.stage, name) if self.stage else None
        return staged if staged and os.path.exists(staged) else self.path(name)

    def ranged(self, name: str):
        """A local path to `name` if there is one (a local index, or a cached file), else an open file on
        the store whose reads are ranged requests (for reading a part of a large file: one label's scores)."""
        local = os.path.join(self.cache, name)
        if not self.remote or os.path.exists(local):
            return local
        return self.fs.open(f"{self.root}/{name}", "rb", block_size=1 << 20, cache_type="none")

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
        names += [entry["meta"]] + [v["file"] for v in entry["vectors"] + entry.get("scores", [])]
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
