"""The ANN of an index table: IVF-PQ over a projection of the embeddings (unfiltered queries) and flat
PQ codes of the same rows (filtered queries), candidates re-ranked exactly by search.py. Training,
adding rows, reading it back."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.retrieval.vectors import VectorStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnConfig:
    """IVF-PQ with exact re-ranking. Rows are first projected on the `project_dim` leading directions
    of the training sample's (uncentred) second moment, then randomly rotated (0: no projection); the
    IVF and PQ work in that space, the re-ranking on the full vectors. `nlist` IVF lists (None: 4 sqrt(N)
    rounded to a power of two, at most `max_nlist`); `pq_m` sub-quantizers of `pq_bits` each per row;
    k-means trains on `train_rows` rows or `train_per_list` per list, whichever is more; a query scans
    `probe_fraction` of the lists (at most `max_probes`) and re-scores `rerank` x k of the best candidates
    exactly against the float16 vectors. Tables under `min_rows` get no ANN (exact search is as cheap).
    `query_axis`: the projection keeps the mean direction of the calibration's query embeddings as an
    axis of its own (`projection`). Measured choices: BENCHMARKS.md, Search."""

    project_dim: int = 128
    query_axis: bool = True
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


def projection(sample: np.ndarray, out_dim: int, seed: int = 0, query_mean: np.ndarray | None = None,
               axis_width: int = 2):
    """A FAISS linear map (no bias) onto the `out_dim` leading eigenvectors of the sample's uncentred
    second moment, then a random rotation that spreads their variance evenly over the PQ sub-quantizers.
    Uncentred, so inner products of projected vectors are those of the vectors' parts in the kept
    subspace (a centring would add a per-row term and change the ranking).

    With `query_mean` (the mean of query-like embeddings, calibrate.py), its direction is a kept axis of
    its own, outside the rotation: the last `axis_width` outputs (one PQ sub-quantizer's width) are that
    axis and zeros, and the leading directions are taken orthogonal to it. Every text query carries
    that common direction (CLAP's modality gap), so each row's share of it is a fixed term of every
    query's score; PQ codes it alone, finely, instead of mixing it into every sub-quantizer, where its
    error dominated the ranking of text queries (BENCHMARKS.md, "Calibrated for text": at 1M the
    calibrated re-rank depth halves, 4.7 -> 2.1 ms a query at recall@10 0.96-0.97)."""
    import faiss

    dim = sample.shape[1]
    moment = sample.T.astype(np.float64) @ sample.astype(np.float64) / max(1, len(sample))
    spread = out_dim
    if query_mean is not None:
        axis = np.asarray(query_mean, np.float64) / np.linalg.norm(query_mean)
        away = np.eye(dim) - np.outer(axis, axis)
        moment = away @ moment @ away        # its leading eigenvectors are orthogonal to the axis
        spread = out_dim - axis_width
    _, vectors = np.linalg.eigh(moment)          # ascending eigenvalues
    leading = vectors[:, ::-1][:, :spread]       # dim x spread
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((spread, spread)))
    matrix = (leading @ rotation).T              # spread x dim
    if query_mean is not None:
        matrix = np.vstack([matrix, axis[None], np.zeros((axis_width - 1, dim))])
    matrix = np.ascontiguousarray(matrix, np.float32)  # out_dim x dim
    transform = faiss.LinearTransform(dim, out_dim, False)
    faiss.copy_array_to_vector(matrix.ravel(), transform.A)
    transform.is_trained = True
    return transform


class Ann:
    """The ANN of one index table: `ivf`, an IVF-PQ (behind the projection, a FAISS IndexPreTransform, when
    there is one) for unfiltered queries, and `flat`, 4-bit PQ codes of the same projected rows in row
    order (a FAISS IndexPQ, 32 B a row) from which a filtered query scans only the matching rows.
    `query_axis`: whether the projection keeps the queries' mean direction as an axis (`projection`)."""

    def __init__(self, ivf, flat, query_axis: bool = False):
        self.ivf, self.flat, self.query_axis = ivf, flat, query_axis

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


def train_ann(store: VectorStore, ann: AnnConfig, seed: int = 0, queries: np.ndarray | None = None) -> Ann:
    """A trained, empty ANN (inner product) for the rows of `store`, from a random sample of them: the
    IVF-PQ behind the projection of `ann.project_dim` (a FAISS IndexPreTransform) when that is smaller than
    dim, and the flat PQ codes for filtered queries. `queries`: query-like embeddings (calibrate.py),
    whose mean direction the projection keeps as an axis of its own (`projection`)."""
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
    query_axis = project_to and queries is not None and len(queries) > 0
    if project_to:
        mean = np.asarray(queries, np.float64).mean(axis=0) if query_axis else None
        transform, inner = projection(sample, dim, seed, mean, dim // ann.pq_m), index
        index = faiss.IndexPreTransform(transform, inner)
        index.referenced_objects = [transform, inner]  # the C++ object does not own them until written
    index.train(sample)
    flat = faiss.IndexPQ(dim, ann.pq_m, 4, faiss.METRIC_INNER_PRODUCT)
    flat.train(project(index, sample))
    log.info("%sIVF%d,%s and flat PQ%dx4 trained on %d rows in %.0f s",
             f"projection to {dim}{' with the query axis' if query_axis else ''}, " if project_to else "",
             nlist, pq, ann.pq_m, rows, time.time() - started)
    return Ann(index, flat, query_axis)


def add_rows(index: Ann, store: VectorStore, first_row: int = 0, rows_per_block: int = 65_536) -> None:
    """Add rows `first_row`.. of `store` to the IVF lists and the flat codes; ids are row numbers, so rows
    come in order."""
    if index.ntotal != first_row:
        raise ValueError(f"the ANN index holds {index.ntotal} rows, the next to add is {first_row}")
    started = time.time()
    for _, block in store.blocks(rows_per_block, first_row):
        index.add(block)
    log.info("added %d rows to the IVF lists in %.0f s", len(store) - first_row, time.time() - started)


def read_ann(ivf_path: str, flat_path: str, query_axis: bool = False) -> Ann:
    import faiss

    return Ann(faiss.read_index(ivf_path), faiss.read_index(flat_path), query_axis)


def build_ann(store: VectorStore, ann: AnnConfig, timings: dict | None = None,
              queries: Callable[[], np.ndarray] | None = None):
    """Train and fill an ANN over `store` (None below `min_rows`), with the query axis (`train_ann`) of
    the embeddings `queries` gives when `ann.query_axis`; seconds per stage into `timings`."""
    if len(store) < ann.min_rows:
        return None
    started = time.time()
    index = train_ann(store, ann, queries=queries() if queries and ann.query_axis else None)
    trained = time.time()
    add_rows(index, store)
    if timings is not None:
        timings.update(train_s=round(trained - started, 1), add_s=round(time.time() - trained, 1))
    return index
