"""What a long run says while it runs: a progress line on the driver every `every_s` seconds (and at each
shard's end), and counters where Ray's metrics go (`ray.util.metrics`: the Ray dashboard's Prometheus
endpoint, so a Grafana on it can plot a run).

The line: files done of those to process so far (the listing streams: "+" while it is still listing),
ok and errors, clips/s and audio hours per second since processing started, and the time left at that
rate for the files listed so far.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from pipeline.tagging.summary import RunSummary

log = logging.getLogger(__name__)

EVERY_S = 30.0


class Progress:
    """Logs `summary`'s progress at most every `every_s` seconds; exports its counts as Ray metrics."""

    def __init__(self, summary: RunSummary, every_s: float = EVERY_S):
        self.summary, self.every_s = summary, every_s
        self.listing_done = False
        self._started: float | None = None     # when the first file was handed to the pipeline
        self._last = time.monotonic()
        self._exported: Counter = Counter()
        self._metrics = _metrics()

    def started(self) -> None:
        if self._started is None:
            self._started = time.monotonic()

    def tick(self, force: bool = False) -> None:
        """Log a line if `every_s` passed since the last (or `force`), and export the counters."""
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        self._export()
        s = self.summary
        todo, done = s.files_seen - s.skipped_unchanged, s.ok + s.error
        elapsed = now - self._started if self._started is not None else 0.0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f"{_duration((todo - done) / rate)} left" if rate > 0 and todo > done else "-"
        log.info("progress: %d of %d%s files done (%d ok, %d errors), %.1f clips/s, %.3f audio h/s, %s%s",
                 done, todo, "" if self.listing_done else "+", s.ok, s.error, rate,
                 s.audio_seconds / 3600 / elapsed if elapsed > 0 else 0.0, left,
                 "" if self.listing_done else " (listing continues)")

    def _export(self) -> None:
        """Add what changed since the last export to the Ray counters (they only go up)."""
        if self._metrics is None:
            return
        files, windows, errors = self._metrics
        s = self.summary
        now = Counter({("files", "ok"): s.ok, ("files", "error"): s.error, ("windows", ""): s.segments,
                       **{("errors", reason): n for reason, n in s.errors_by_reason.items()}})
        for key, value in now.items():
            delta = value - self._exported[key]
            if delta > 0:
                kind, tag = key
                if kind == "files":
                    files.inc(delta, tags={"status": tag})
                elif kind == "windows":
                    windows.inc(delta)
                else:
                    errors.inc(delta, tags={"reason": tag})
        self._exported = now


def _metrics():
    """Ray counters (None outside a Ray driver or worker)."""
    try:
        from ray.util.metrics import Counter as RayCounter

        return (RayCounter("audio_tagging_files", "files given a row, by status", tag_keys=("status",)),
                RayCounter("audio_tagging_windows", "windows of ok files tagged and embedded"),
                RayCounter("audio_tagging_errors", "error rows by reason", tag_keys=("reason",)))
    except Exception as e:   # metrics are a convenience: a run never fails for them
        log.debug("Ray metrics unavailable: %s", e)
        return None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def quiet_ray_data(level: int) -> None:
    """Ray Data's per-operator progress dumps go to DEBUG unless the run logs at DEBUG (they stay in Ray's own
    ray-data.log either way)."""
    if level > logging.DEBUG:
        for name in ("ray.data._internal.progress.logging_progress", "ray.data._internal.execution.streaming_executor"):
            logging.getLogger(name).setLevel(logging.WARNING)
