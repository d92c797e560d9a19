"""Stage 8, the run summary: counts, error reasons, audio hours, wall time, throughput."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import fsspec

from pipeline.store.ledger import is_transient
from pipeline.store.writer import remove_quietly

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """Counts of one run and its verdict: `failure` says why a run that wrote its rows still failed."""

    run_id: str
    max_error_rate: float | None = None   # fail the run when more of the processed files are errors
    files_seen: int = 0
    skipped_unchanged: int = 0
    ok: int = 0
    error: int = 0
    transient: int = 0
    errors_by_reason: Counter = field(default_factory=Counter)
    warnings_by_reason: Counter = field(default_factory=Counter)  # ok rows with a warning
    segments: int = 0
    audio_seconds: float = 0.0
    started: float = field(default_factory=time.time)
    wall_s: float = 0.0

    def count(self, clip: dict) -> None:
        if clip["status"] == "ok":
            self.ok += 1
            self.segments += clip["num_segments"]
            self.audio_seconds += clip["duration_s"] or 0.0
            if clip.get("warning"):
                self.warnings_by_reason[clip["warning"].split(": ", 1)[0]] += 1
        else:
            self.error += 1
            self.transient += is_transient(clip["error"])
            self.errors_by_reason[clip["error"].split(" (", 1)[0]] += 1

    def counts(self) -> dict:
        """The counts `count` keeps, for `merge` (the sink counts on the workers)."""
        return {"ok": self.ok, "error": self.error, "transient": self.transient, "segments": self.segments,
                "audio_seconds": self.audio_seconds, "errors_by_reason": dict(self.errors_by_reason),
                "warnings_by_reason": dict(self.warnings_by_reason)}

    def merge(self, counts: dict) -> None:
        """Add counts made elsewhere (`counts()` of another summary)."""
        for name in ("ok", "error", "transient", "segments", "audio_seconds"):
            setattr(self, name, getattr(self, name) + counts[name])
        self.errors_by_reason.update(counts["errors_by_reason"])
        self.warnings_by_reason.update(counts["warnings_by_reason"])

    def failure(self) -> str | None:
        """Why this run counts as failed (exit status 1), or None. Every file keeps its row either way."""
        processed = self.files_seen - self.skipped_unchanged
        if self.ok + self.error != processed:
            return f"{processed} files to process but {self.ok + self.error} rows written"
        if processed and self.transient == processed:
            reasons = ", ".join(r for r in sorted(self.errors_by_reason))
            return (f"every one of the {processed} processed files failed for a transient reason ({reasons}): "
                    "storage, credentials or the cluster are broken, not the files; they are retried by the next run")
        if self.max_error_rate is not None and processed and self.error / processed > self.max_error_rate:
            return (f"{self.error} of {processed} processed files are errors ({self.error / processed:.1%}), "
                    f"more than --max-error-rate {self.max_error_rate:g}")
        return None

    def finish(self) -> None:
        self.wall_s = time.time() - self.started

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id, "started": _iso(self.started),
            "finished": _iso(self.started + self.wall_s) if self.wall_s else None,
            "files_seen": self.files_seen, "skipped_unchanged": self.skipped_unchanged,
            "processed": self.files_seen - self.skipped_unchanged,
            "ok": self.ok, "error": self.error,
            "errors_by_reason": dict(sorted(self.errors_by_reason.items())),
            "warnings_by_reason": dict(sorted(self.warnings_by_reason.items())), "segments": self.segments,
            "audio_hours": round(self.audio_seconds / 3600, 6), "wall_s": round(self.wall_s, 3),
            "clips_per_s": round((self.ok + self.error) / self.wall_s, 3) if self.wall_s else None,
            "transient_errors": self.transient,
            "succeeded": self.failure() is None, "failure": self.failure(),
        }

    def log(self) -> None:
        d = self.to_dict()
        log.info("run %s: %d files listed, %d unchanged (skipped), %d ok, %d error, %.3f h audio, "
                 "%.1f s wall, %s clips/s", self.run_id, d["files_seen"], d["skipped_unchanged"], d["ok"],
                 d["error"], d["audio_hours"], d["wall_s"], d["clips_per_s"])
        for reason, n in d["errors_by_reason"].items():
            log.info("  error %-50s %d", reason, n)
        for reason, n in d["warnings_by_reason"].items():
            log.info("  warning %-48s %d", reason, n)
        if d["failure"]:
            log.error("run %s failed: %s", self.run_id, d["failure"])

    def save(self, output: str) -> str:
        fs, root = fsspec.core.url_to_fs(output)
        path = f"{root.rstrip('/')}/_runs/{self.run_id}.json"
        temp = f"{root.rstrip('/')}/_runs/_tmp-{self.run_id}.json"
        fs.makedirs(f"{root.rstrip('/')}/_runs", exist_ok=True)
        try:
            with fs.open(temp, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
            fs.mv(temp, path)
        except OSError:
            remove_quietly(fs, temp)
            raise
        return path


def _iso(t: float) -> str:
    """Epoch seconds as ISO 8601 UTC, to the millisecond (runs that end within a second keep their order)."""
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
