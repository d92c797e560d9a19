"""Search over the tagging output: text, audio-by-example and more-like-this, exact or ANN, with filters,
at segment level or merged per clip; zero-shot label scoring; near-duplicate pairs.

A `Searcher` is built once (it memory-maps the index and loads the CLAP text tower lazily) and then
answers queries in memory, so a service can hold one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrow import to_matrix
from pipeline.commits import read_commits
from pipeline.index import AnnConfig, fetch_index

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


class _Table:
    """One memory-mapped table of vectors with its filter columns and its ANN index."""

    def __init__(self, directory: str, name: str, ef_search: int):
        self._source = pa.memory_map(os.path.join(directory, f"{name}.arrow"))
        self.data = pa.ipc.open_file(self._source).read_all()
        self.vectors = to_matrix(self.data.column("clap_embedding"))
        self.live = np.asarray(self.data.column("live"))
        self.clip_ids = np.asarray(self.data.column("clip_id").to_numpy(zero_copy_only=False))
        self.ef_search = ef_search
        self._ann_path = os.path.join(directory, f"{name}.faiss")
        self._ann = None

    @property
    def ann(self):
        """The HNSW index, loaded on first ANN search (exact-only searchers never hold it in memory)."""
        if self._ann is None and os.path.exists(self._ann_path):
            import faiss

            self._ann = faiss.read_index(self._ann_path)
        return self._ann

    def mask(self, filters: Filters, labels: list[str]) -> np.ndarray:
        keep = self.live.copy()
        if filters.label:
            if filters.label not in labels:
                raise SearchError(f"unknown label {filters.label!r}")
            column = labels.index(filters.label)
            keep &= to_matrix(self.data.column("scores"))[:, column] >= filters.min_score
        if filters.min_duration_s:
            durations = self.data.column("duration_s").to_numpy(zero_copy_only=False)
            keep &= np.nan_to_num(durations, nan=-1.0) >= filters.min_duration_s
        if filters.uri_prefix:
            keep &= np.asarray(pc.starts_with(self.data.column("uri"), filters.uri_prefix).fill_null(False))
        return keep


class Searcher:
    """Holds an index in memory and answers queries; see `text`, `audio`, `like`, `zero_shot`, `duplicates`."""

    def __init__(self, output: str, ef_search: int = AnnConfig.ef_search, exact: bool = False, clap_model: str | None = None,
                 exact_below: int = 20_000):
        """`exact_below`: searches over fewer matching rows than this go exact (cheap, and HNSW with a
        very selective filter loses recall)."""
        self.output = output
        self.exact_below = exact_below
        directory = fetch_index(output)
        if directory is None or not os.path.exists(os.path.join(directory, "index.json")):
            raise SearchError(f"no index under {output}: run `python -m jobs.index --output {output}`")
        with open(os.path.join(directory, "index.json")) as f:
            self.info = json.load(f)
        self.model = self.info["model"]
        if clap_model and clap_model != self.model["source"]:
            raise SearchError(f"the index was embedded with {self.model['source']} "
                              f"(revision {self.model['revision']}), not {clap_model}")
        self.labels = self.info["labels"]
        self.tables = {name: _Table(directory, name, ef_search) for name in ("clips", "segments")}
        self.stale = self._stale()
        self.exact = exact or self.stale
        if self.stale:
            log.warning("index does not cover the latest commits: exact search over the indexed rows; "
                        "run `python -m jobs.index --output %s` to update", output)
        self._text = None
        self._audio = None

    def _stale(self) -> bool:
        covered = set(self.info["commits"])
        latest = [c for c in read_commits(self.output) if c["settings_hash"] == self.info["settings_hash"]]
        return any(c["run_id"] not in covered for c in latest)

    # queries -------------------------------------------------------------------------------------
    def text(self, query: str, k: int = 10, filters: Filters = Filters(), segments: bool = False) -> list[Hit]:
        return self.vector(self.embed_text([query])[0], k, filters, segments)

    def audio(self, data: bytes, k: int = 10, filters: Filters = Filters(), segments: bool = False) -> list[Hit]:
        return self.vector(self.embed_audio(data), k, filters, segments)

    def like(self, clip_id: str, k: int = 10, filters: Filters = Filters(), segments: bool = False) -> list[Hit]:
        clips = self.tables["clips"]
        rows = np.flatnonzero((clips.clip_ids == clip_id) & clips.live)
        if not len(rows):
            raise SearchError(f"unknown clip_id {clip_id!r}")
        hits = self.vector(clips.vectors[rows[0]], k + 1, filters, segments)
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
            from pipeline.encoders import TextEncoder

            self._text = TextEncoder(self.model["source"])
        return self._text(texts)

    def embed_audio(self, data: bytes) -> np.ndarray:
        if self._audio is None:
            from pipeline.encoders import AudioEncoder

            self._audio = AudioEncoder(self.model["source"])
        return self._audio(data)

    def zero_shot(self, labels: list[str], prompt: str = "This is a sound of {label}.", top: int = 3) -> list[dict]:
        """Per clip, the `top` labels of a user's label set by CLAP audio-text similarity (softmax)."""
        text = self.embed_text([prompt.format(label=label) for label in labels])
        clips = self.tables["clips"]
        rows = np.flatnonzero(clips.live)
        logits = self._text.logit_scale * (clips.vectors[rows] @ text.T)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
        uris = clips.data.column("uri").to_pylist()
        return [{"clip_id": clips.clip_ids[r], "uri": uris[r],
                 "labels": [{"label": labels[j], "score": float(probs[i, j])} for j in order[i]]}
                for i, r in enumerate(rows)]

    def duplicates(self, threshold: float = 0.95, neighbours: int = 10) -> list[dict]:
        """Pairs of live clips with cosine >= threshold (each pair once, highest first)."""
        clips = self.tables["clips"]
        rows = np.flatnonzero(clips.live)
        pairs = {}
        for start in range(0, len(rows), 4096):
            block = rows[start:start + 4096]
            if self.exact or clips.ann is None:
                sims = clips.vectors[block] @ clips.vectors.T
                sims[:, ~clips.live] = -np.inf
                cand = np.argsort(-sims, axis=1)[:, :neighbours + 1]
                cand_scores = np.take_along_axis(sims, cand, axis=1)
            else:
                cand_scores, cand = clips.ann.search(np.ascontiguousarray(clips.vectors[block]), neighbours + 1)
            for i, r in enumerate(block):
                for j, s in zip(cand[i], cand_scores[i]):
                    if j >= 0 and j != r and clips.live[j] and s >= threshold:
                        pairs[tuple(sorted((int(r), int(j))))] = float(s)
        uris = clips.data.column("uri").to_pylist()
        return [{"clip_a": clips.clip_ids[a], "uri_a": uris[a], "clip_b": clips.clip_ids[b], "uri_b": uris[b],
                 "score": s} for (a, b), s in sorted(pairs.items(), key=lambda p: -p[1])]

    # internals ------------------------------------------------------------------------------------
    def _top(self, table: _Table, query: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows among `mask`: ANN with the mask as an id selector, exact when the ANN is off,
        stale, or the mask is selective enough that exact is cheaper; never fewer than min(k, matches)."""
        matches = int(mask.sum())
        k = min(k, matches)
        if k == 0:
            return np.array([], int), np.array([], np.float32)
        if not self.exact and matches >= self.exact_below and table.ann is not None:
            import faiss

            params = faiss.SearchParametersHNSW(efSearch=max(table.ef_search, k))
            if matches < len(mask):
                params.sel = faiss.IDSelectorBitmap(np.packbits(mask, bitorder="little"))
            scores, rows = table.ann.search(query[None, :], k, params=params)
            rows, scores = rows[0], scores[0]
            if (rows >= 0).sum() == k:
                return rows, scores
            log.info("ANN returned fewer than %d hits under the filter: exact search", k)
        if matches > len(mask) // 4:  # score every row in place: no copy of the matrix
            scores = table.vectors @ query
            scores[~mask] = -np.inf
            candidates = np.arange(len(mask))
        else:
            candidates = np.flatnonzero(mask)
            scores = table.vectors[candidates] @ query
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((candidates[top], -scores[top]))]
        return candidates[top], scores[top]

    def _top_clips(self, table: _Table, query, mask, k) -> tuple[np.ndarray, np.ndarray]:
        """Best window per clip, top-k clips: widen the window search until k distinct clips are found."""
        want = k * 4
        while True:
            rows, scores = self._top(table, query, mask, want)
            _, first = np.unique(table.clip_ids[rows], return_index=True)
            best = np.sort(first)  # rows are by score, so a clip's first row is its best window
            if len(best) >= k or len(rows) == int(mask.sum()):
                return rows[best][:k], scores[best][:k]
            want *= 4

    def _hit(self, table: _Table, row: int, score: float) -> Hit:
        d = table.data
        return Hit(clip_id=str(table.clip_ids[row]), uri=d.column("uri")[row].as_py(), score=float(score),
                   start_s=d.column("start_s")[row].as_py(), end_s=d.column("end_s")[row].as_py(),
                   duration_s=d.column("duration_s")[row].as_py())
