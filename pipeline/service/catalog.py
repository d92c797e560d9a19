"""The current clips table by clip_id, for a service: metadata, top labels, windows and source URI.

Read once from the committed output (`read_current`) with the index's settings, keeping only the small
columns (no scores or embeddings), so a lookup is a dict probe and a row slice.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from pipeline.store.ledger import read_current

log = logging.getLogger(__name__)

CLIP_COLUMNS = ["clip_id", "uri", "status", "error", "size_bytes", "modified", "duration_s", "sample_rate",
                "channels", "decoder", "num_segments", "labels", "zero_shot", "run_id"]
SEGMENT_COLUMNS = ["segment_index", "start_s", "end_s", "labels"]


class Catalog:
    """Clip rows of the current table; `playable_uri`, `labels`, `details` take a clip_id (unknown: None or [])."""

    def __init__(self, output: str, settings_hash: str | None = None):
        clips = read_current(output, "clips", settings_hash)
        self.clips = clips.select([c for c in CLIP_COLUMNS if c in clips.column_names])
        self._row = {cid: i for i, cid in enumerate(self.clips.column("clip_id").to_pylist())}
        self._uris = self.clips.column("uri").to_pylist()
        self._status = self.clips.column("status").to_pylist()
        self._labels = [_rounded(x) for x in self.clips.column("labels").to_pylist()]
        try:
            segments = read_current(output, "segments", settings_hash, columns=["clip_id"] + SEGMENT_COLUMNS)
        except LookupError:  # every file failed: no windows at all
            segments = None
        self.segments, self._spans = _group(segments)
        log.info("catalog: %d clips, %d windows", len(self.clips), len(self.segments or []))

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self._row

    def playable_uri(self, clip_id: str) -> str | None:
        """The URI of a clip whose row is ok (decoded and indexed); None otherwise."""
        row = self._row.get(clip_id)
        return None if row is None or self._status[row] != "ok" else self._uris[row]

    def labels(self, clip_id: str) -> list[dict]:
        row = self._row.get(clip_id)
        return [] if row is None else self._labels[row]

    def details(self, clip_id: str) -> dict | None:
        """Every small column of the clip's row, plus its windows with their top labels."""
        row = self._row.get(clip_id)
        if row is None:
            return None
        out = self.clips.slice(row, 1).to_pylist()[0]
        out["labels"], out["zero_shot"] = self._labels[row], _rounded(out.get("zero_shot"))
        start, stop = self._spans.get(clip_id, (0, 0))
        windows = self.segments.slice(start, stop - start).to_pylist() if stop > start else []
        out["segments"] = [{**w, "labels": _rounded(w["labels"])} for w in windows]
        return out


def _group(segments: pa.Table | None) -> tuple[pa.Table | None, dict[str, tuple[int, int]]]:
    """Windows sorted by clip, and each clip's [start, stop) row span."""
    if segments is None or not len(segments):
        return None, {}
    ids = np.asarray(segments.column("clip_id").to_numpy(zero_copy_only=False))
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # read_current sorts by clip_id
    stops = np.r_[starts[1:], len(ids)]
    spans = {str(ids[a]): (int(a), int(b)) for a, b in zip(starts, stops)}
    return segments.select(SEGMENT_COLUMNS), spans


def _rounded(labels: list[dict] | None) -> list[dict]:
    return [{"label": d["label"], "score": round(float(d["score"]), 4)} for d in labels or []]
