"""Calibration of an index table's ANN for the queries it will get (issue 23): at build time, query-like
text (the AST checkpoint's label names as the tagging job's zero-shot prompts, through the CLAP text
tower) is searched with candidate settings against exact search over the table's own live rows, and the
cheapest setting reaching the target recall@k goes into index.json, where `Searcher` takes its defaults.

Text queries sit apart from the audio rows (CLAP's modality gap), so settings measured with row-like
queries overstate their recall (BENCHMARKS.md, "Queries from another distribution"). The same query
embeddings serve twice: before training, their mean direction becomes an axis of the ANN's projection
(ann.py, `projection`); after it, the settings are measured, each probe count with growing re-rank
depths, and the fastest setting that reaches the target is kept. Mixing the queries' second moment
into the projection, or whitening by it, made recall worse (BENCHMARKS.md, Search).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.checkpoints import DEFAULT_PROMPT
from pipeline.retrieval.ann import AnnConfig
from pipeline.retrieval.search import _Mask, rerank
from pipeline.retrieval.vectors import VectorStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    """Up to `max_queries` label prompts; recall@`k` (share of exact search's top k found, averaged over
    the queries) must reach `target_recall`. At each of `probe_factors` times the default probes (capped
    at the list count), `reranks` (ANN candidates re-scored per hit asked for) are tried in order up to
    the first that reaches the target; of the settings that reach it, the one with the lowest median
    time per query (one query at a time, as the Searcher answers them) is kept, else the best measured
    (with a warning).
    An update keeps a calibration while the table has at most `keep_growth` more rows than when it was
    measured (see `needs_calibration`)."""

    target_recall: float = 0.95
    k: int = 10
    reranks: tuple[int, ...] = (20, 50, 100, 200, 400)
    probe_factors: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    max_queries: int = 200
    keep_growth: float = 0.25


def query_texts(labels: list[str], max_queries: int) -> list[str]:
    """Up to `max_queries` labels, evenly spaced through the list (the same sample on every build), in
    the tagging job's zero-shot prompt."""
    if len(labels) > max_queries:
        labels = [labels[i] for i in np.linspace(0, len(labels) - 1, max_queries).round().astype(int)]
    return [DEFAULT_PROMPT.format(label=label) for label in labels]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the queries' true rows (row -1: none) among the found rows, over all queries (with k true
    rows each, the mean of per-query recall@k; a ratio of counts, so a target such as 0.95 compares exactly)."""
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def ann_rows(ivf, store: VectorStore, mask: _Mask, queries: np.ndarray, k: int, nprobe: int, depth: int,
             truth: np.ndarray) -> tuple[np.ndarray, float]:
    """(top-k rows, median ms per query) as unfiltered `Searcher` queries find them, one at a time:
    `k * depth` IVF-PQ candidates from `nprobe` lists (widened as the Searcher widens them when rows
    are dead), re-ranked exactly; a query with fewer than k candidates gets the exact answer (`truth`),
    as the Searcher falls back to exact search."""
    import faiss

    nlist = faiss.extract_index_ivf(ivf).nlist
    widen = (len(mask.keep) / mask.count) ** AnnConfig.filter_probe_exponent
    params = faiss.SearchParametersIVF(nprobe=min(nlist, math.ceil(nprobe * widen)), sel=mask.selector())
    rows, ms = np.empty((len(queries), k), np.int64), []
    for i in range(len(queries)):
        started = time.perf_counter()
        _, cand = ivf.search(queries[i:i + 1], max(k * depth, k), params=params)
        _, rows[i:i + 1], short = rerank(store, queries[i:i + 1], cand, k, min(k, mask.count))
        ms.append((time.perf_counter() - started) * 1000)
        if short:
            rows[i] = truth[i]
    return rows, float(np.median(ms))


def calibrate_table(ivf, store: VectorStore, live: np.ndarray, queries: np.ndarray, ann: AnnConfig,
                    config: CalibrationConfig) -> dict:
    """Measure the candidate settings on one table (from `ann`'s default probes); its calibration entry."""
    import faiss

    k = config.k
    mask = _Mask(live)
    queries = np.ascontiguousarray(queries, np.float32)
    truth = store.search(queries, k, None if mask.all else live)[1]
    nlist = int(faiss.extract_index_ivf(ivf).nlist)
    nprobe = ann.probes(nlist, ivf.ntotal)
    measured = []
    for probes in dict.fromkeys(max(1, min(nlist, math.ceil(nprobe * f))) for f in config.probe_factors):
        for depth in config.reranks:
            found, ms = ann_rows(ivf, store, mask, queries, k, probes, depth, truth)
            measured.append({"nprobe": probes, "rerank": depth, "recall": recall(found, truth), "ms": round(ms, 3)})
            if measured[-1]["recall"] >= config.target_recall:
                break  # deeper at these probes costs more for no need
    reached = [m for m in measured if m["recall"] >= config.target_recall]
    chosen = min(reached, key=lambda m: m["ms"]) if reached else None
    if chosen is None:
        chosen = max(measured, key=lambda m: m["recall"])
        log.warning("no setting reached recall@%d %.3f: best %s", k, config.target_recall, chosen)
    return {"needed": True, "reached": chosen["recall"] >= config.target_recall, **chosen,
            "target_recall": config.target_recall, "k": k, "queries": len(queries), "nlist": nlist,
            "rows": len(store), "live": mask.count, "reranks": list(config.reranks),
            "probe_factors": list(config.probe_factors), "measured": measured}


def needs_calibration(entry: dict, config: CalibrationConfig) -> bool:
    """Whether a table entry's calibration must be (re)computed. An update that appends rows (new shards
    added to the IVF lists, centroids and codebooks unchanged) keeps it while the table has grown by at
    most `keep_growth` since it was measured: the new rows come from the same model and the lists grow
    in proportion, so recall at a depth drifts slowly, and measuring costs an exact search of every row
    for each query (at 10M rows, 200 queries x 10M rows x 512 values), far more than the update itself.
    Past that growth a fixed depth re-ranks a shrinking share of the table, so it is measured again; a
    full build (retrained ANN), an entry without a calibration or with other targets always is."""
    previous = entry.get("calibration")
    if not entry["ann"]:
        return False
    if not previous or not previous.get("needed"):
        return True
    same = (previous["target_recall"], previous["k"], previous["reranks"], previous["probe_factors"]) == (
        config.target_recall, config.k, list(config.reranks), list(config.probe_factors))
    return not same or entry["rows"] > previous["rows"] * (1 + config.keep_growth)


class QueryEmbeddings:
    """The calibration's query-like embeddings for an index (`query_texts` of its labels through the text
    tower of its CLAP checkpoint), embedded on first call and kept: the ANN's training and the
    calibration share them, and the text tower loads only if one of them needs it."""

    def __init__(self, clap_source: str, labels: list[str], config: CalibrationConfig):
        self.clap_source, self.texts = clap_source, query_texts(labels, config.max_queries)
        self._embedded = None

    def __call__(self) -> np.ndarray:
        if self._embedded is None:
            from pipeline.retrieval.encoders import TextEncoder

            self._embedded = np.asarray(TextEncoder(self.clap_source)(self.texts), np.float32)
        return self._embedded


def calibrate(info: dict, path: Callable[[str], str], ann: AnnConfig = AnnConfig(),
              config: CalibrationConfig = CalibrationConfig(), queries: Callable[[], np.ndarray] | None = None) -> None:
    """Set every table entry's "calibration" in `info` (index.json before it is published; `path` turns
    a file name into a local path): not needed for a table without an ANN (exact search), kept or
    measured again (`needs_calibration`) otherwise. `queries` gives the query embeddings (default:
    `QueryEmbeddings` of the index's labels), called only when a table is measured."""
    import faiss

    queries = queries or QueryEmbeddings(info["model"]["source"], info["labels"], config)
    for table, entry in info["tables"].items():
        if not entry["ann"]:
            entry["calibration"] = {"needed": False, "why": f"no ANN under {ann.min_rows} rows: search is exact"}
            continue
        if not needs_calibration(entry, config):
            log.info("%s: calibration kept (measured at %d rows, now %d)", table, entry["calibration"]["rows"],
                     entry["rows"])
            continue
        ivf = faiss.read_index(path(entry["ann"]))
        store = VectorStore([(v["file"], v["rows"]) for v in entry["vectors"]], info["dim"], fetch=path)
        with pa.memory_map(path(entry["meta"])) as source:
            live = np.asarray(pa.ipc.open_file(source).read_all().column("live"))
        entry["calibration"] = c = calibrate_table(ivf, store, live, queries(), ann, config)
        log.info("%s: calibrated on %d label queries: re-rank %d, nprobe %d of %d lists, recall@%d %.3f (target %.2f), "
                 "%.1f ms a query", table, c["queries"], c["rerank"], c["nprobe"], c["nlist"], c["k"], c["recall"],
                 c["target_recall"], c["ms"])

