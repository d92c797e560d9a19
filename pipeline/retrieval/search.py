"""Search over the tagging output: text, audio-by-example and more-like-this, exact or ANN, with filters,
at segment level or merged per clip; zero-shot label scoring; near-duplicate pairs.

A `Searcher` is built once (it memory-maps the index and loads the CLAP text tower lazily) and then
answers queries in memory, so a service can hold one.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.checkpoints import DEFAULT_PROMPT
from pipeline.retrieval.labels import read_label
from pipeline.store import delta
from pipeline.retrieval.ann import AnnConfig, project
from pipeline.retrieval.files import fetch_index, store_of

log = logging.getLogger(__name__)


class SearchError(ValueError):
    """A query that cannot be answered as asked (unknown clip, unknown label, mismatched model, ...)."""


@dataclass(frozen=True)
class Filters:
    """Keep rows whose `label` score >= min_score, duration >= min_duration_s, URI starts with uri_prefix."""

    label: str | None = None
    min_score: float = 0.0
    min_duration_s: float | None = None
    uri_prefix: str | None = None

    def active(self) -> bool:
        return bool(self.label or self.min_duration_s or self.uri_prefix)


@dataclass(frozen=True)
class Hit:
    clip_id: str
    uri: str
    score: float
    start_s: float | None
    end_s: float | None
    duration_s: float | None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def rerank(vectors, queries: np.ndarray, cand: np.ndarray, k: int,
           want: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Each query's ANN candidates (row numbers, -1: none) re-scored exactly against the float16 `vectors`
    (a VectorStore): (scores, rows) of the best k, each (len(queries), k), and the queries with fewer than
    `want` candidates (left empty: score -inf, row -1)."""
    scores = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    short = []
    for i, q in enumerate(queries):
        found = cand[i][cand[i] >= 0]
        if len(found) < want:
            short.append(i)
            continue
        exact = vectors.get(found) @ q
        top = np.lexsort((found, -exact))[:k]
        scores[i, :len(top)], rows[i, :len(top)] = exact[top], found[top]
    return scores, rows, short


class _Mask:
    """Rows a query may return: a bool per row, its count, and the packed bitmap FAISS filters with."""

    def __init__(self, keep: np.ndarray):
        self.keep = keep
        self.count = int(keep.sum())
        self.all = self.count == len(keep)
        self._bits = None if self.all else np.packbits(keep, bitorder="little")
        self.subset = None  # (rows, FAISS PQ fast-scan index over their codes), built on first use

    def selector(self):
        import faiss

        return None if self.all else faiss.IDSelectorBitmap(len(self.keep), faiss.swig_ptr(self._bits))


class _Table:
    """One index table: memory-mapped row metadata with its filter columns, the float16 vectors
    (fetched on first use), the IVF-PQ (read into memory on first ANN search) and the flat PQ codes
    (fetched and read on the first filtered ANN search)."""

    MASKS_KEPT = 16  # per-filter masks cached (10 MB each at 10M rows): a service sees the same filters often

    def __init__(self, files, entry: dict, dim: int, nprobe: int | None, rerank: int | None):
        self._meta_path = files.path(entry["meta"])
        self._source = pa.memory_map(self._meta_path)
        self.data = pa.ipc.open_file(self._source).read_all()
        self.vectors = store_of(files, entry, dim)
        self.live = np.asarray(self.data.column("live"))
        # the index's calibration (calibrate.py) gives the defaults; indexes built before it have none
        self.calibration = entry.get("calibration") or {}
        self.nprobe = nprobe or self.calibration.get("nprobe")
        self.rerank = rerank or self.calibration.get("rerank") or AnnConfig.rerank
        self.filter_exponent = AnnConfig.filter_probe_exponent
        self._ann_path = files.path(entry["ann"]) if entry["ann"] else None
        self._ann = None
        self._files, self._codes_name = files, entry.get("codes")
        self._score_shards = entry["scores"]
        self._codes = None
        self._lock = threading.Lock()
        self._masks: OrderedDict = OrderedDict()

    @property
    def ann(self):
        """The IVF-PQ, loaded on first ANN search (exact-only searchers never hold it in memory)."""
        if self._ann is None and self._ann_path:
            with self._lock:
                if self._ann is None:
                    import faiss

                    index = faiss.read_index(self._ann_path)
                    self.nlist = faiss.extract_index_ivf(index).nlist
                    if self.nprobe is None:
                        self.nprobe = AnnConfig().probes(self.nlist, index.ntotal)
                    self._ann = index
        return self._ann

    def subset(self, mask: _Mask):
        """(rows, index) for a filtered search that scans only the mask's rows: a FAISS PQ fast-scan index
        over their codes, built on the filter's first ANN query (a gather of 32 B a row) and kept with
        its cached mask; None when the index has no flat codes."""
        import faiss

        if mask.subset is None and self._codes_name:
            with self._lock:
                if self._codes is None:
                    flat = faiss.read_index(self._files.path(self._codes_name))
                    codes = faiss.vector_to_array(flat.codes).reshape(flat.ntotal, flat.code_size)
                    flat.reset()  # keeps the trained quantizer; the codes live in `codes`
                    self._codes = (flat, codes)
            flat, codes = self._codes
            rows = np.flatnonzero(mask.keep)
            part = faiss.clone_index(flat)
            part.add_sa_codes(np.ascontiguousarray(codes[rows]))
            mask.subset = (rows, faiss.IndexPQFastScan(part))
        return mask.subset

    def clip_ids(self, rows) -> np.ndarray:
        return np.asarray(self.data.column("clip_id").take(pa.array(np.asarray(rows, np.int64))).to_pylist(), object)

    def rows_of(self, clip_id: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(pc.equal(self.data.column("clip_id"), clip_id)) & self.live)

    def mask(self, filters: Filters, labels: list[str]) -> _Mask:
        with self._lock:
            if filters in self._masks:
                self._masks.move_to_end(filters)
                return self._masks[filters]
        found = _Mask(self._keep(filters, labels))
        with self._lock:
            self._masks[filters] = found
            while len(self._masks) > self.MASKS_KEPT:
                self._masks.popitem(last=False)
        return found

    def _label_scores(self, label: int) -> np.ndarray:
        """One label's score per row, from the label-major score shards (labels.py): that label's column
        only, 4 B a row."""
        sources = [self._files.ranged(shard["file"]) for shard in self._score_shards]
        try:
            return read_label(sources, label)
        finally:
            for source in sources:
                if not isinstance(source, str):
                    source.close()

    def _keep(self, filters: Filters, labels: list[str]) -> np.ndarray:
        keep = self.live.copy()
        if filters.label:
            if filters.label not in labels:
                raise SearchError(f"unknown label {filters.label!r}")
            column = labels.index(filters.label)
            keep &= self._label_scores(column) >= filters.min_score
        if filters.min_duration_s:
            durations = self.data.column("duration_s").to_numpy(zero_copy_only=False)
            keep &= np.nan_to_num(durations, nan=-1.0) >= filters.min_duration_s
        if filters.uri_prefix:
            keep &= np.asarray(pc.starts_with(self.data.column("uri"), filters.uri_prefix).fill_null(False))
        return keep


class Searcher:
    """Holds an index in memory and answers queries; see `text`, `audio`, `like`, `zero_shot`, `duplicates`."""

    def __init__(self, output: str, nprobe: int | None = None, rerank: int | None = None,
                 exact: bool = False, clap_model: str | None = None, exact_below: int = 1_000,
                 subset_fraction: float = 0.3):
        """`nprobe`: IVF lists scanned per query; `rerank`: ANN candidates re-scored exactly per hit asked
        for; None: the settings the index was calibrated to at build (index.json, calibrate.py), else
        AnnConfig's (`probe_fraction` of the lists, `rerank`). `exact_below`: searches over fewer matching rows
        than this go exact (a gather of that many rows, ~1 ms; 10k rows took 9.2 ms at 1M, the filter's
        own codes 1.2 ms: BENCHMARKS.md, Search). `subset_fraction`: a filter keeping at most this
        fraction of the rows scans the PQ codes of its rows only (all of them, no IVF probing); a wider
        one probes the IVF lists."""
        self.output = output
        self.exact_below, self.subset_fraction = exact_below, subset_fraction
        files = fetch_index(output)
        if files is None:
            raise SearchError(f"no index under {output}: run `python -m jobs.index --output {output}`")
        self.info = files.info()
        self.model = self.info["model"]
        if clap_model and clap_model != self.model["source"]:
            raise SearchError(f"the index was embedded with {self.model['source']} "
                              f"(revision {self.model['revision']}), not {clap_model}")
        self.labels = self.info["labels"]
        self.tables = {name: _Table(files, self.info["tables"][name], self.info["dim"], nprobe, rerank)
                       for name in ("clips", "segments")}
        self.stale = self._stale()
        self.exact = exact or self.stale
        if self.stale:
            log.warning("index does not cover the latest commits: exact search over the indexed rows; "
                        "run `python -m jobs.index --output %s` to update", output)
        self._text = None
        self._audio = None

    def _stale(self) -> bool:
        """Whether shards were committed since the index was built (compaction commits no shard)."""
        clips = delta.open_table(self.output, "clips")
        return clips is not None and (delta.shard_seq(clips), delta.table_settings(clips)) != (
            self.info["shard"], self.info["settings_hash"])

    def settings(self) -> dict:
        """How unfiltered queries are answered, for reports: {"exact": bool, "rerank", "nprobe" (None:
        AnnConfig's share of the lists, set on the first ANN query), "calibration" (the segments
        table's entry in index.json: recall@k measured at build against exact search, target, settings,
        number of label queries; {} for an index built before calibration)}."""
        table = self.tables["segments"]
        return {"exact": self.exact, "rerank": table.rerank, "nprobe": table.nprobe, "calibration": table.calibration}

    def warm(self) -> None:
        """Load now what the first ANN query would load (the IVF-PQ of the segments table)."""
        if not self.exact:
            _ = self.tables["segments"].ann

    # queries -------------------------------------------------------------------------------------
    def text(self, query: str, k: int = 10, filters: Filters = Filters(), segments: bool = False) -> list[Hit]:
        return self.vector(self.embed_text([query])[0], k, filters, segments)

    def audio(self, data: bytes, k: int = 10, filters: Filters = Filters(), segments: bool = False) -> list[Hit]:
        return self.vector(self.embed_audio(data), k, filters, segments)

    def like(self, clip_id: str, k: int = 10, filters: Filters = Filters(), segments: bool = False) -> list[Hit]:
        clips = self.tables["clips"]
        rows = clips.rows_of(clip_id)
        if not len(rows):
            raise SearchError(f"unknown clip_id {clip_id!r}")
        hits = self.vector(clips.vectors.get(rows[:1])[0], k + 1, filters, segments)
        return [h for h in hits if h.clip_id != clip_id][:k]

    def vector(self, query: np.ndarray, k: int, filters: Filters = Filters(), segments: bool = False) -> list[Hit]:
        """Top-k by cosine: windows (`segments=True`) or clips (each clip's best window)."""
        table = self.tables["segments"]
        mask = table.mask(filters, self.labels)
        query = np.asarray(query, np.float32)
        if segments:
            rows, scores = self._top(table, query, mask, k)
        else:
            rows, scores = self._top_clips(table, query, mask, k)
        return [self._hit(table, r, s) for r, s in zip(rows, scores)]

    def embed_text(self, texts: list[str]) -> np.ndarray:
        if self._text is None:
            from pipeline.retrieval.encoders import TextEncoder

            self._text = TextEncoder(self.model["source"])
        return self._text(texts)

    def embed_audio(self, data: bytes) -> np.ndarray:
        if self._audio is None:
            from pipeline.retrieval.encoders import AudioEncoder

            self._audio = AudioEncoder(self.model["source"])
        return self._audio(data)

    def zero_shot(self, labels: list[str], prompt: str = DEFAULT_PROMPT, top: int = 3) -> list[dict]:
        """Per clip, the `top` labels of a user's label set by CLAP audio-text similarity (softmax)."""
        text = self.embed_text([prompt.format(label=label) for label in labels])
        clips = self.tables["clips"]
        out = []
        uris = clips.data.column("uri")
        for start, block in clips.vectors.blocks():
            live = np.flatnonzero(clips.live[start:start + len(block)])
            if not len(live):
                continue
            logits = self._text.logit_scale * (block[live] @ text.T)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
            rows = live + start
            ids, block_uris = clips.clip_ids(rows), uris.take(pa.array(rows)).to_pylist()
            out += [{"clip_id": ids[i], "uri": block_uris[i],
                     "labels": [{"label": labels[j], "score": float(probs[i, j])} for j in order[i]]}
                    for i in range(len(rows))]
        return out

    def duplicates(self, threshold: float = 0.95, neighbours: int = 10) -> list[dict]:
        """Pairs of live clips with cosine >= threshold (each pair once, highest first)."""
        clips = self.tables["clips"]
        mask = clips.mask(Filters(), self.labels)
        pairs = {}
        for start, block in clips.vectors.blocks(4096):
            rows = np.flatnonzero(clips.live[start:start + len(block)])
            if not len(rows):
                continue
            cand_scores, cand = self._search(clips, block[rows], mask, neighbours + 1)
            for i, r in enumerate(rows + start):
                for j, s in zip(cand[i], cand_scores[i]):
                    if j >= 0 and j != r and s >= threshold:
                        pairs[tuple(sorted((int(r), int(j))))] = float(s)
        uris = clips.data.column("uri")
        out = []
        for (a, b), s in sorted(pairs.items(), key=lambda p: -p[1]):
            ids = clips.clip_ids([a, b])
            out.append({"clip_a": ids[0], "uri_a": uris[a].as_py(), "clip_b": ids[1], "uri_b": uris[b].as_py(),
                        "score": s})
        return out

    # internals ------------------------------------------------------------------------------------
    def _top(self, table: _Table, query: np.ndarray, mask: _Mask, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows among `mask` for one query; never fewer than min(k, matches)."""
        k = min(k, mask.count)
        if k == 0:
            return np.array([], int), np.array([], np.float32)
        scores, rows = self._search(table, query[None, :], mask, k)
        return rows[0], scores[0]

    def _search(self, table: _Table, queries: np.ndarray, mask: _Mask, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (len(queries), k), best first, exact scores. Candidates from the IVF-PQ
        (the mask as an id selector) or, under a filter keeping at most `subset_fraction` of the rows,
        from a scan of those rows' PQ codes; then the `rerank * k` best re-scored against the float16
        vectors. Exact when the ANN is off or stale, or the mask is selective enough that exact is
        cheaper. A query whose candidates hold fewer than min(k, matches) rows is answered exactly."""
        want = min(k, mask.count)
        if not self.exact and mask.count >= self.exact_below and table.ann is not None:
            import faiss

            queries = np.ascontiguousarray(queries, np.float32)
            candidates = max(k * table.rerank, k)
            subset = table.subset(mask) if mask.count <= self.subset_fraction * len(mask.keep) else None
            if subset is not None:  # a filter: scan the codes of its rows only
                kept, index = subset
                _, found = index.search(project(table.ann, queries), min(candidates, len(kept)))
                cand = np.where(found >= 0, kept[np.maximum(found, 0)], -1)
            else:
                # probe f ** -filter_exponent as many lists for a mask keeping a fraction f of the rows
                widen = (len(mask.keep) / mask.count) ** table.filter_exponent
                nprobe = min(table.nlist, math.ceil(table.nprobe * widen))
                params = faiss.SearchParametersIVF(nprobe=nprobe, sel=mask.selector())
                _, cand = table.ann.search(queries, candidates, params=params)
            scores, rows, short = rerank(table.vectors, queries, cand, k, want)
            if not short:
                return scores, rows
            log.info("ANN returned fewer than %d hits under the filter for %d queries: exact search", want, len(short))
            scores[short], rows[short] = self._exact(table, queries[short], mask, k)
            return scores, rows
        return self._exact(table, queries, mask, k)

    def _exact(self, table: _Table, queries: np.ndarray, mask: _Mask, k: int) -> tuple[np.ndarray, np.ndarray]:
        if mask.count <= max(self.exact_below, 1):  # few rows: gather them (random reads) and score in memory
            rows = np.flatnonzero(mask.keep)
            scores = queries @ table.vectors.get(rows).T
            order = np.lexsort((np.broadcast_to(rows, scores.shape), -scores), axis=1)[:, :k]
            out_scores, out_rows = np.take_along_axis(scores, order, axis=1), rows[order]
            pad = k - out_rows.shape[1]
            return (np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf),
                    np.pad(out_rows, ((0, 0), (0, pad)), constant_values=-1))
        return table.vectors.search(queries, k, None if mask.all else mask.keep)

    def _top_clips(self, table: _Table, query, mask: _Mask, k) -> tuple[np.ndarray, np.ndarray]:
        """Best window per clip, top-k clips: widen the window search until k distinct clips are found."""
        want = k * 4
        while True:
            rows, scores = self._top(table, query, mask, want)
            _, first = np.unique(table.clip_ids(rows), return_index=True)
            best = np.sort(first)  # rows are by score, so a clip's first row is its best window
            if len(best) >= k or len(rows) == mask.count:
                return rows[best][:k], scores[best][:k]
            want *= 4

    def _hit(self, table: _Table, row: int, score: float) -> Hit:
        d = table.data
        return Hit(clip_id=d.column("clip_id")[row].as_py(), uri=d.column("uri")[row].as_py(), score=float(score),
                   start_s=d.column("start_s")[row].as_py(), end_s=d.column("end_s")[row].as_py(),
                   duration_s=d.column("duration_s")[row].as_py())
