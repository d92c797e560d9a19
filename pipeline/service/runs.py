"""What the Runs view reads: each run's summary (OUTPUT/_runs/RUN_ID.json) joined with what it committed
(the Delta history of OUTPUT/clips), and the current clips table's label distribution.

Summaries are small and read on every request (local or object storage, through fsspec); the history
and the label counts are read again only when the clips table's Delta version changes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from dataclasses import dataclass, field

import fsspec
import pyarrow.compute as pc

from pipeline.store import delta

log = logging.getLogger(__name__)

MAX_RUNS = 500
SUMMARY_FIELDS = ("wall_s", "files_seen", "skipped_unchanged", "processed", "ok", "error", "errors_by_reason",
                  "warnings_by_reason", "segments", "clips_per_s", "audio_hours", "succeeded", "failure")


@dataclass
class Commits:
    """One run's commits to the clips table: its settings hash, Delta versions and shard numbers."""

    settings_hash: str | None = None
    versions: list[int] = field(default_factory=list)
    shards: list[int] = field(default_factory=list)
    last_commit: dt.datetime | None = None  # UTC


class _PerVersion:
    """A value computed from the clips table, recomputed only when the table's Delta version changes."""

    def __init__(self, output: str, compute, empty):
        self.output, self.compute, self.empty = output, compute, empty
        self._lock = threading.Lock()
        self._version, self._value = None, None

    def __call__(self):
        table = delta.open_table(self.output, "clips")
        if table is None:
            return self.empty
        with self._lock:
            if self._version != table.version():
                self._value, self._version = self.compute(self.output, table), table.version()
            return self._value


class Runs:
    """Every run (newest first, at most `limit`): its summary's counts and its commits; a run with a
    summary but no commit (nothing new, or stopped before its first) has `committed` false, a run with
    commits but no summary (stopped after them) has `summary` false and no counts."""

    def __init__(self, output: str, limit: int = MAX_RUNS):
        self.output, self.limit = output, limit
        self._history = _PerVersion(output, _commits_by_run, ({}, {}))

    def __call__(self) -> dict:
        commits, settings = self._history()
        summaries = read_summaries(self.output, self.limit)
        runs = {s["run_id"]: _row(s["run_id"], s, commits.get(s["run_id"])) for s in summaries}
        for run_id, c in commits.items():
            runs.setdefault(run_id, _row(run_id, None, c))
        # Runs whose summaries were left out (past the cap) are older than every one read: the cap drops them.
        newest = sorted(runs.values(), key=_when, reverse=True)[:self.limit]
        used = {r["settings_hash"] for r in newest}
        return {"runs": newest, "settings": {h: v for h, v in settings.items() if h in used}}


def read_summaries(output: str, limit: int = MAX_RUNS) -> list[dict]:
    """The newest `limit` run summaries (by file time), each with `finished`: the file's time (UTC)."""
    fs, root = fsspec.core.url_to_fs(output)
    folder = f"{root.rstrip('/')}/_runs"
    fs.invalidate_cache(folder)   # object stores cache listings; a new run must show
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    files = [e for e in entries if e.get("type") == "file" and _name(e["name"]).endswith(".json")
             and not _name(e["name"]).startswith("_")]   # _tmp-*.json: a summary being written
    files = sorted(files, key=lambda e: _time(_mtime(e)) or _EPOCH, reverse=True)[:limit]
    finished = {_name(e["name"]): _time(_mtime(e)) for e in files}
    data = fs.cat([e["name"] for e in files], on_error="omit") if files else {}
    summaries = []
    for path, raw in data.items():
        try:
            summary = json.loads(raw)
            summary["run_id"] = str(summary["run_id"])
        except (ValueError, KeyError, TypeError) as e:
            log.warning("skipping run summary %s: not a summary (%s)", path, e)
            continue
        summaries.append({**summary, "finished": _time(summary.get("finished")) or finished.get(_name(path))})
    return summaries


class LabelCounts(_PerVersion):
    """The current clips table's label distribution: {"version", "clips" (rows), "labelled" (rows with
    labels: status ok), "labels": [{label, clips}]}, the number of clips having each AST label among their
    top-k labels, most first; read once per Delta version."""

    def __init__(self, output: str):
        super().__init__(output, _count_labels, {"version": None, "clips": 0, "labelled": 0, "labels": []})


def _count_labels(output: str, table) -> dict:
    rows = delta.read_table(output, "clips", ["labels"], table)
    labels = rows.column("labels") if rows is not None else None
    counts = []
    if labels is not None and len(labels):
        names = pc.struct_field(pc.list_flatten(labels), "label")
        counts = [(d["values"], d["counts"]) for d in pc.value_counts(names).to_pylist()]
    ordered = sorted(counts, key=lambda lc: (-lc[1], lc[0]))
    labelled = pc.sum(pc.greater(pc.list_value_length(labels), 0)).as_py() if counts else 0
    return {"version": table.version(), "clips": 0 if rows is None else len(rows), "labelled": labelled or 0,
            "labels": [{"label": label, "clips": n} for label, n in ordered]}


def _commits_by_run(output: str, table) -> tuple[dict[str, Commits], dict[str, dict]]:
    """{run_id: Commits} and {settings hash: settings} from the whole history of the clips table."""
    runs, settings = {}, {}
    for entry in sorted(table.history(), key=lambda e: e["version"]):
        run_id = entry.get(delta.RUN_KEY)
        if run_id is None:   # a commit not made by the job (e.g. a user's OPTIMIZE)
            continue
        c = runs.setdefault(run_id, Commits())
        c.settings_hash = entry.get(delta.SETTINGS_KEY, c.settings_hash)
        c.versions.append(entry["version"])
        if delta.SEQ_KEY in entry:
            c.shards.append(int(entry[delta.SEQ_KEY]))
        c.last_commit = _time(entry.get("timestamp", 0) / 1000)
        if delta.SETTINGS_JSON in entry and c.settings_hash:
            settings[c.settings_hash] = json.loads(entry[delta.SETTINGS_JSON])
    return runs, settings


def _row(run_id: str, summary: dict | None, c: Commits | None) -> dict:
    """A run as the API shows it; without a summary its counts and times are None."""
    summary, c = summary or {}, c or Commits()
    finished, wall = summary.get("finished"), summary.get("wall_s")
    started = _time(summary.get("started")) or (finished - dt.timedelta(seconds=wall) if finished and wall
                                                else finished)
    return {"run_id": run_id, "summary": bool(summary), "started": started, "finished": finished,
            **{k: summary.get(k) for k in SUMMARY_FIELDS}, "committed": bool(c.versions),
            "settings_hash": c.settings_hash, "versions": c.versions, "shards": c.shards, "last_commit": c.last_commit}


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _when(run: dict) -> dt.datetime:
    return run.get("finished") or run.get("last_commit") or _EPOCH


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _mtime(info: dict):
    return info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")


def _time(value) -> dt.datetime | None:
    """A UTC datetime from epoch seconds, a datetime or an ISO 8601 string (None if none)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)
