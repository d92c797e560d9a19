"""Response shapes of the search service (they make the OpenAPI schema). Times in seconds, sizes in bytes."""

from __future__ import annotations

from datetime import datetime

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


class RunOut(BaseModel):
    """One tagging run: its summary (OUTPUT/_runs/RUN_ID.json; counts are null without one) and what it
    committed to the clips table (its Delta history). Times are UTC."""

    run_id: str
    summary: bool                  # a summary was saved (false: stopped after committing)
    started: datetime | None       # the summary's time less wall_s
    finished: datetime | None      # when the summary was saved
    wall_s: float | None
    files_seen: int | None
    skipped_unchanged: int | None  # listed files already done with these settings
    processed: int | None
    ok: int | None
    error: int | None
    errors_by_reason: dict[str, int] | None
    warnings_by_reason: dict[str, int] | None
    segments: int | None           # 10 s windows written
    clips_per_s: float | None
    audio_hours: float | None
    succeeded: bool | None
    failure: str | None            # why the run failed (exit status 1)
    committed: bool                # false: nothing new, or stopped before its first commit
    settings_hash: str | None      # the settings its commits carry
    versions: list[int]            # Delta versions of the clips table it committed
    shards: list[int]              # shard sequence numbers it committed
    last_commit: datetime | None


class RunsOut(BaseModel):
    runs: list[RunOut]              # newest first, at most 500
    settings: dict[str, dict]       # settings hash -> the settings (models, features, precision...)


class LabelCountOut(BaseModel):
    label: str
    clips: int                      # clips with this label among their top-k labels


class LabelsOut(BaseModel):
    version: int | None             # Delta version of the clips table counted (null: no table yet)
    clips: int                      # rows of the current table
    labelled: int                   # rows with labels (status ok)
    labels: list[LabelCountOut]     # most clips first
