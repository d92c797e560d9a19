"""Embeddings on disk as float16 shards, for exact search and for re-ranking ANN candidates.

Each shard is a FAISS `IndexScalarQuantizer` (fp16, inner product) file: a small header, then the rows as
plain float16, row-major. So the same file is
- memory-mapped by FAISS (`IO_FLAG_MMAP_IFC`) for exact search: SIMD fp16 dot products over every row,
  on all cores, with an id selector for filters; one shard is mapped at a time and unmapped after, so an
  exact scan of 10M rows never keeps more than one shard's pages (`shard_rows` x 1 KB) in the process;
- read row by row (`pread`) to gather a few hundred candidate rows for re-ranking, or memory-mapped for
  larger gathers and unmapped after, so re-ranking over 10M rows does not accumulate resident pages.
  A kept mapping gathers faster (1000 rows of 10M: 1 ms against ~5 ms, syscalls being dear on this VM),
  but on Linux 6.18 each faulted row maps its whole large page-cache folio (~0.6 MB a row): the process
  held 6 GB after 10 such gathers, and dropping the pages (`MADV_DONTNEED`) made the next gathers fault
  them in again at ~8 ms (measured 2026-12-03; not kept).

Shards are written once and never changed: an index update appends a shard, a rebuild writes new ones.
Rows are numbered across shards in order (row = ANN id = metadata row).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)


def write_shard(path: str, blocks: Iterable[np.ndarray], dim: int) -> int:
    """Write float32/float16 row blocks as one fp16 shard at `path`; returns its row count.

    The header is FAISS's own (written by `faiss.write_index` for an empty index); the row count and
    the byte length of the codes are patched in once the rows are written, so rows stream to disk."""
    import faiss

    header = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    faiss.write_index(header, path)
    size = os.path.getsize(path)
    rows = 0
    with open(path, "r+b") as f:
        f.seek(size)
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float16)
            if block.ndim != 2 or block.shape[1] != dim:
                raise ValueError(f"expected rows of {dim} values, got shape {block.shape}")
            f.write(block.tobytes())
            rows += len(block)
        f.seek(size - 8)  # the codes vector's length, the last field before the codes
        f.write(np.uint64(rows * dim * 2).tobytes())
    # ntotal is an int64 right after the int32 dimension at the start of the header ("IxSQ" fourcc first)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(np.int64(rows).tobytes())
    return rows


class VectorStore:
    """The rows of one index table: `shards` is [(local path or name, rows)] in row order; `fetch`
    turns a name into a local path (a download for an index in object storage) on first use."""

    BATCH_QUERIES = 16  # from this many queries at once, exact search converts blocks and uses BLAS
    PREAD_ROWS = 4096   # gathers of up to this many rows of a shard read them (500 rows: 1.1 ms vs 1.7 mapped)

    def __init__(self, shards: list[tuple[str, int]], dim: int, fetch: Callable[[str], str] = lambda p: p):
        self.names = [name for name, _ in shards]
        counts = np.array([n for _, n in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.dim = dim
        self._fetch = fetch

    def __len__(self) -> int:
        return int(self.starts[-1])

    def path(self, shard: int) -> str:
        return self._fetch(self.names[shard])

    def _open(self, shard: int) -> np.ndarray:
        path = self.path(shard)
        n = int(self.starts[shard + 1] - self.starts[shard])
        return np.memmap(path, np.float16, "r", offset=os.path.getsize(path) - n * self.dim * 2, shape=(n, self.dim))

    def get(self, rows) -> np.ndarray:
        """float32 (len(rows), dim) for the given row numbers, in the given order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.dim), np.float32)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")  # page order: fewer, sequential faults
        shard_of = np.searchsorted(self.starts, rows[order], side="right") - 1
        for shard in np.unique(shard_of):
            pick = order[shard_of == shard]
            local = rows[pick] - self.starts[shard]
            if len(pick) <= self.PREAD_ROWS:
                out[pick] = self._pread(int(shard), local)
            else:
                array = self._open(int(shard))  # mapped for this gather only: the pages it touched leave
                out[pick] = array[local]        # the process with it (they stay in the page cache)
                del array
        return out

    def _pread(self, shard: int, local: np.ndarray) -> np.ndarray:
        """Rows of one shard by one pread each (into the page cache, not the process's resident set)."""
        path = self.path(shard)
        n = int(self.starts[shard + 1] - self.starts[shard])
        row_bytes = self.dim * 2
        base = os.path.getsize(path) - n * row_bytes
        buf = np.empty((len(local), self.dim), np.float16)
        view, read = memoryview(buf).cast("B"), os.preadv  # slices of one view: no array object per row
        fd = os.open(path, os.O_RDONLY)
        try:
            for i, offset in enumerate((base + local * row_bytes).tolist()):
                if read(fd, [view[i * row_bytes:(i + 1) * row_bytes]], offset) != row_bytes:
                    raise OSError(f"short read at byte {offset} of {path}")
        finally:
            os.close(fd)
        return buf

    def blocks(self, rows_per_block: int = 65_536, first_row: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block) over rows `first_row`.. in order, a block at a time."""
        for shard in range(len(self.names)):
            lo = int(self.starts[shard])
            if int(self.starts[shard + 1]) <= first_row:
                continue
            array = self._open(shard)  # its own mapping, dropped after the shard: a full pass keeps no pages
            for start in range(max(0, first_row - lo), len(array), rows_per_block):
                yield lo + start, np.asarray(array[start:start + rows_per_block], np.float32)
            del array

    def search(self, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by inner product over the rows where `mask` is True (all rows if None):
        (scores, rows), each (len(queries), k), best first; missing hits are row -1, score -inf."""
        import faiss

        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        best_scores = np.full((len(queries), k), -np.inf, np.float32)
        best_rows = np.full((len(queries), k), -1, np.int64)
        for shard in range(len(self.names)):
            lo, hi = int(self.starts[shard]), int(self.starts[shard + 1])
            part = None if mask is None else mask[lo:hi]
            if part is not None and not part.any():
                continue
            if len(queries) >= self.BATCH_QUERIES:
                scores, rows = self._search_blas(shard, queries, k, part)
            else:
                params = None
                if part is not None and not part.all():
                    bits = np.packbits(part, bitorder="little")
                    params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(len(part), faiss.swig_ptr(bits)))
                index = faiss.read_index(self.path(shard), faiss.IO_FLAG_MMAP_IFC)
                scores, rows = index.search(queries, k, params=params)
                del index  # unmaps the shard
            rows = np.where(rows >= 0, rows + lo, -1)
            scores = np.where(rows >= 0, scores, -np.inf)
            best_scores, best_rows = _merge(best_scores, best_rows, scores, rows, k)
        return best_scores, best_rows


    def _search_blas(self, shard: int, queries: np.ndarray, k: int, part: np.ndarray | None, block: int = 65_536):
        """Exact top-k within one shard for many queries: float16 blocks to float32, one matrix product
        each (FAISS's fp16 scan is per query; BLAS amortises each row over every query)."""
        array, n = self._open(shard), int(self.starts[shard + 1] - self.starts[shard])
        best_scores = np.full((len(queries), k), -np.inf, np.float32)
        best_rows = np.full((len(queries), k), -1, np.int64)
        for start in range(0, n, block):
            scores = queries @ np.asarray(array[start:start + block], np.float32).T
            if part is not None:
                scores[:, ~part[start:start + block]] = -np.inf
            take = min(k, scores.shape[1])
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            top_scores = np.take_along_axis(scores, top, axis=1)
            top_rows = np.where(np.isfinite(top_scores), top + start, -1)
            best_scores, best_rows = _merge(best_scores, best_rows, top_scores, top_rows, k)
        del array  # unmaps the shard
        return best_scores, best_rows


def _merge(scores_a, rows_a, scores_b, rows_b, k):
    scores = np.concatenate([scores_a, scores_b], axis=1)
    rows = np.concatenate([rows_a, rows_b], axis=1)
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
