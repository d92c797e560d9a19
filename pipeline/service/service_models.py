"""Response shapes of the search service (they make the OpenAPI schema). Times in seconds, sizes in bytes."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorOut(BaseModel):
    error: str


class Label(BaseModel):
    label: str
    score: float


class HitOut(BaseModel):
    """A clip (its best window reported) or, with `segments=true`, one window."""

    clip_id: str
    uri: str
    score: float
    start_s: float | None
    end_s: float | None
    duration_s: float | None
    labels: list[Label]  # the clip's top AST labels


class SearchOut(BaseModel):
    hits: list[HitOut]
    took_ms: float
    stale_index: bool  # the index misses recent commits; results are exact over what it holds


class SegmentOut(BaseModel):
    segment_index: int
    start_s: float
    end_s: float
    labels: list[Label]


class ClipOut(BaseModel):
    clip_id: str
    uri: str
    status: str
    error: str | None
    size_bytes: int | None
    modified: str | None
    duration_s: float | None
    sample_rate: int | None
    channels: int | None
    decoder: str | None
    num_segments: int
    labels: list[Label]
    zero_shot: list[Label]
    run_id: str
    segments: list[SegmentOut]


class InfoOut(BaseModel):
    model: dict
    labels: list[str]
    rows: dict[str, int]
    live: dict[str, int]
    versions: dict[str, int] | None   # Delta versions of clips and segments the index covers
    stale_index: bool
    limits: dict[str, int]
