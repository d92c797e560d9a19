"""Stage 6, aggregation: window rows (after both models) -> segments and clips rows.

Runs on the workers, over each batch leaving the models (pipeline/tagging/sink.py), and on the driver for the
windows of files that were split across batches. Streaming: a file's state lives only until all its windows have arrived, so memory is bounded by
the files in flight, not the corpus. A file is complete when it has a window for every
segment_index in 0..num_segments-1; a window that arrives twice (a retried task) is dropped, never
counted or written again. Per file, scores are the max over windows, the AST embedding is
the mean of window embeddings, and the CLAP embedding is the L2-normalised mean of window embeddings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrow import fixed_list, to_matrix
from schemas.tables import LABEL_TYPE

log = logging.getLogger(__name__)

FILE_COLUMNS = ("clip_id", "uri", "size_bytes", "modified", "etag", "duration_s", "sample_rate",
                "channels", "decoder", "warning", "num_segments")


def top_labels(scores: np.ndarray, names: list[str], k: int) -> list[dict]:
    """The k best (label, score) pairs, highest first; ties keep label order."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"label": names[i], "score": float(scores[i])} for i in order]


@dataclass(frozen=True)
class ZeroShot:
    """A user's label set embedded by the CLAP text tower: probabilities are softmax over the labels of
    logit_scale * cosine, as ClapModel's logits_per_audio."""

    labels: tuple[str, ...]
    text_embeddings: np.ndarray   # (labels, dim), L2-normalised
    logit_scale: float

    def __call__(self, audio_embedding: np.ndarray, k: int) -> list[dict]:
        logits = self.logit_scale * (self.text_embeddings.astype(np.float64) @ audio_embedding)
        probs = np.exp(logits - logits.max())
        return top_labels(probs / probs.sum(), list(self.labels), k)


PARTIAL_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("meta", pa.string()),   # FILE_COLUMNS as JSON
    ("scores", pa.list_(pa.float32())), ("ast_sum", pa.list_(pa.float64())), ("clap_sum", pa.list_(pa.float64())),
    ("seen", pa.list_(pa.int32())),
])


@dataclass
class _Partial:
    meta: dict
    scores: np.ndarray
    ast_sum: np.ndarray
    clap_sum: np.ndarray
    seen: set[int] = field(default_factory=set)  # segment_index values accumulated


@dataclass
class ClipAggregator:
    """Feed it window batches with `add`; it returns finished segments (a table) and clips (dicts)."""

    label_names: list[str]
    top_k: int
    run_id: str
    zero_shot: "ZeroShot | None" = None
    _partial: dict[str, _Partial] = field(default_factory=dict)
    _finished: set[str] = field(default_factory=set)  # clip_ids whose clip row was returned

    def add(self, batch: pa.Table) -> tuple[pa.Table, list[dict]]:
        ok = np.asarray(pc.equal(batch.column("status"), "ok").fill_null(False))
        clips = []
        for row in batch.filter(pa.array(~ok)).to_pylist():
            if row["clip_id"] not in self._finished:
                self._finished.add(row["clip_id"])
                clips.append(self._error_clip(row))
        windows = batch.filter(pa.array(ok))
        scores = to_matrix(windows.column("scores"))
        ast = to_matrix(windows.column("ast_embedding"))
        clap = to_matrix(windows.column("clap_embedding"))
        metas = windows.select(list(FILE_COLUMNS) + ["segment_index"]).to_pylist()
        new = np.ones(len(metas), dtype=bool)
        for i, meta in enumerate(metas):
            index = meta.pop("segment_index")
            partial = self._partial.get(meta["clip_id"])
            if meta["clip_id"] in self._finished or (partial is not None and index in partial.seen):
                new[i] = False
                log.warning("dropped a repeated window %d of %s", index, meta["uri"])
                continue
            done = self._accumulate(meta, index, scores[i], ast[i], clap[i])
            if done is not None:
                clips.append(done)
        if not new.all():
            windows, scores = windows.filter(pa.array(new)), scores[new]
        return self._segments(windows, scores), clips

    @property
    def pending(self) -> int:
        """Files with windows still outstanding."""
        return len(self._partial)

    def forget(self, clip_ids: list[str]) -> None:
        """Drop the running state of these files (they are processed again from the start)."""
        for clip_id in clip_ids:
            self._partial.pop(clip_id, None)

    def pending_ids(self) -> list[str]:
        """clip_ids of the files with windows still outstanding."""
        return list(self._partial)

    def _accumulate(self, meta: dict, index: int, scores, ast, clap) -> dict | None:
        p = self._partial.get(meta["clip_id"])
        if p is None:
            p = self._partial[meta["clip_id"]] = _Partial(meta, scores.copy(), ast.astype(np.float64),
                                                          clap.astype(np.float64))
        else:
            np.maximum(p.scores, scores, out=p.scores)
            p.ast_sum += ast
            p.clap_sum += clap
        p.seen.add(index)
        return self._finish(meta["clip_id"]) if len(p.seen) >= meta["num_segments"] else None

    def _finish(self, clip_id: str) -> dict:
        p = self._partial.pop(clip_id)
        self._finished.add(clip_id)
        n = len(p.seen)
        clap_mean = p.clap_sum / n
        clap_mean /= max(np.linalg.norm(clap_mean), 1e-12)
        return {**p.meta, "status": "ok", "error": None,
                "labels": top_labels(p.scores, self.label_names, self.top_k),
                "zero_shot": self.zero_shot(clap_mean, self.top_k) if self.zero_shot else None,
                "scores": p.scores.astype(np.float32),
                "ast_embedding": (p.ast_sum / n).astype(np.float32),
                "clap_embedding": clap_mean.astype(np.float32), "run_id": self.run_id}

    def take_partials(self) -> pa.Table | None:
        """The running state of every pending file as PARTIAL_SCHEMA rows (max of scores, sums of
        embeddings, segment indices seen), forgotten here: a worker hands them to the driver, whose
        `add_partials` merges the pieces of a file from several batches (~14 KB each, not its windows)."""
        if not self._partial:
            return None
        rows = [{"clip_id": c, "meta": json.dumps(p.meta), "scores": p.scores, "ast_sum": p.ast_sum,
                 "clap_sum": p.clap_sum, "seen": sorted(p.seen)} for c, p in self._partial.items()]
        self._partial.clear()
        return pa.Table.from_pylist(rows, schema=PARTIAL_SCHEMA)

    def add_partials(self, partials: pa.Table) -> list[dict]:
        """Merge `take_partials` rows; returns the clip rows of the files now complete."""
        done = []
        for row in partials.to_pylist():
            clip_id, seen = row["clip_id"], set(row["seen"])
            p = self._partial.get(clip_id)
            if clip_id in self._finished or (p is not None and p.seen & seen):
                log.warning("dropped a repeated piece (windows %s) of %s", sorted(seen), clip_id)
                continue
            scores = np.asarray(row["scores"], np.float32)
            ast, clap = np.asarray(row["ast_sum"], np.float64), np.asarray(row["clap_sum"], np.float64)
            if p is None:
                p = self._partial[clip_id] = _Partial(json.loads(row["meta"]), scores, ast, clap, seen)
            else:
                np.maximum(p.scores, scores, out=p.scores)
                p.ast_sum += ast
                p.clap_sum += clap
                p.seen |= seen
            if len(p.seen) >= p.meta["num_segments"]:
                done.append(self._finish(clip_id))
        return done

    def _error_clip(self, row: dict) -> dict:
        error = row["error"] + (f" ({row['error_detail']})" if row.get("error_detail") else "")
        meta = {k: row.get(k) for k in FILE_COLUMNS}
        return {**meta, "num_segments": 0, "status": "error", "error": error, "labels": None, "zero_shot": None,
                "scores": None, "ast_embedding": None, "clap_embedding": None, "run_id": self.run_id}

    def _segments(self, windows: pa.Table, scores: np.ndarray) -> pa.Table:
        labels = [top_labels(s, self.label_names, self.top_k) for s in scores]
        table = windows.select(["clip_id", "uri", "segment_index", "start_s", "end_s"])
        table = table.append_column("labels", pa.array(labels, type=LABEL_TYPE))
        for name in ("scores", "ast_embedding", "clap_embedding"):
            table = table.append_column(name, windows.column(name))
        return table.append_column("run_id", pa.array([self.run_id] * len(windows), pa.string()))


def clips_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Clip dicts -> table of `schema`; every row must carry exactly the schema's keys."""
    for row in rows:
        if set(row) != set(schema.names):
            raise ValueError(f"clip row keys {sorted(row)} differ from schema {schema.names}")
    columns = {}
    for f in schema:
        values = [r[f.name] for r in rows]
        if pa.types.is_fixed_size_list(f.type):
            valid = np.array([v is not None for v in values], dtype=bool)
            matrix = np.zeros((len(rows), f.type.list_size), np.float32)
            if valid.any():
                matrix[valid] = np.stack([v for v in values if v is not None])
            columns[f.name] = fixed_list(matrix, valid)
        else:
            columns[f.name] = pa.array(values, type=f.type)
    return pa.Table.from_pydict(columns, schema=schema)
