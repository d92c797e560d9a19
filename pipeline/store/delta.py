"""The current table and the one ledger: OUTPUT/clips and OUTPUT/segments are Delta Lake tables.

The part files the workers write (pipeline/tagging/sink.py) are the tables' data files, unchanged: the driver
only commits their paths to each table's transaction log (`_delta_log/`), so Spark, DuckDB, Polars,
pandas (through `deltalake`) and Trino read the current table without our code: one row per clip (per
window in segments), all with one set of settings. What is committed, by which run, with which settings,
lives in that log and nowhere else:
- every commit's commitInfo carries the run id, the settings hash and the settings themselves
  (`audio_tagging.*`); earlier settings stay readable by time travel until the user vacuums;
- a shard is committed to both tables under one Delta app transaction (`APP_ID`, version = the shard's
  sequence number over the OUTPUT's life): a recommitted shard is a no-op;
- a shard is three commits (`commit_shard`): its windows are added to segments, then its clip rows to
  clips (replacing older rows of clips it processed again: changed files, retried transient errors, or
  the whole table on a settings change), then the replaced rows' windows are removed from segments. The
  first commit records the other two in its commitInfo (`audio_tagging.clips_plan`); a run killed
  between them leaves the shard half-committed, and the next run (or jobs.maintain) finishes it before
  anything else (`recover`). Readers join windows to clip rows on (clip_id, run_id): at every point each
  clip row has all its windows, once; windows of no current clip row are there only until step 3.

Delta has no fixed-size array: the vector columns are lists in its schema and in the data files too
(width in the files' field metadata, schemas.stored_schema), so every reader agrees; a reader gets
FLOAT[512] back by casting, e.g. DuckDB `clap_embedding::FLOAT[512]`, pyarrow
`pc.cast(col, pa.list_(pa.float32(), 512))`; `read_table` and `iter_batches` cast them back
(schemas.fixed_width).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.store.writer import write_part
from schemas import fixed_width

log = logging.getLogger(__name__)

PREFIX = "audio_tagging."
SETTINGS_KEY = PREFIX + "settings_hash"
SETTINGS_JSON = PREFIX + "settings"
RUN_KEY = PREFIX + "run_id"
SEQ_KEY = PREFIX + "shard_seq"
PLAN_KEY = PREFIX + "clips_plan"
APP_ID = "audio-tagging"          # the Delta app transaction id of a shard's first two commits
CLEANUP_ID = "audio-tagging-cleanup"   # and of its third (segments: windows of replaced clip rows removed)
TABLES = ("segments", "clips")   # commit order: a clip row never lands before its windows


class LedgerError(RuntimeError):
    """The two tables disagree in a way no rerun can repair (e.g. clips ahead of segments)."""


def storage_options(output: str) -> dict[str, str] | None:
    """delta-rs options for OUTPUT's store, from the same environment fsspec uses (AWS_* variables).
    delta-rs 1.x writes the log on S3 with conditional puts (put-if-absent), so no lock service and no
    AWS_S3_ALLOW_UNSAFE_RENAME are needed; one writer per OUTPUT is the lease's job (store/lease.py)."""
    if not output.startswith(("s3://", "s3a://")):
        return None
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    return options


class Staging(str):
    """OUTPUT, standing for the staging tables of a settings replacement: OUTPUT/{table}/{directory}.
    Nested in the current tables' roots (under a "_" name, which readers listing the root skip), so the
    swap adds their data files by relative paths; delta-rs does not read absolute ones. Every function
    here takes it where it takes OUTPUT."""

    directory: str

    def __new__(cls, output: str, directory: str) -> "Staging":
        staged = super().__new__(cls, output)
        staged.directory = directory
        return staged


def staging(output: str, settings_hash: str, base_version: int) -> Staging:
    """The staging tables of the replacement of OUTPUT's tables (at clips version `base_version`) by
    results with `settings_hash`: a killed replacement resumes in the same ones, with the same settings
    from the same table; any other replacement starts afresh."""
    return Staging(output, f"_replace-{settings_hash}-v{base_version}")


def table_uri(output: str, table: str) -> str:
    base = f"{output.rstrip('/')}/{table}"
    return f"{base}/{output.directory}" if isinstance(output, Staging) else base


def open_table(output: str, table: str, version: int | None = None):
    """The Delta table (at `version` if given), or None if OUTPUT has none yet."""
    from deltalake import DeltaTable

    uri = table_uri(output, table)
    if not DeltaTable.is_deltatable(uri, storage_options=storage_options(output)):
        return None
    return DeltaTable(uri, version=version, storage_options=storage_options(output))


def table_settings(dt) -> str | None:
    """Settings hash of the newest commit that records one (every commit of ours does)."""
    return (newest_commit_info(dt) or {}).get(SETTINGS_KEY)


def newest_commit_info(dt, key: str = SETTINGS_KEY, limit: int = 64) -> dict | None:
    """The newest commitInfo holding `key`: among the newest `limit` commits (every commit of ours carries
    the settings, so the newest one has them), else the whole history (another tool's commits)."""
    for entries in (dt.history(limit), dt.history()):
        for entry in entries:
            if key in entry:
                return entry
        if len(entries) < limit:
            break
    return None


def versions(output: str) -> dict[str, int] | None:
    """{table: Delta version} of both tables now, or None if there are none."""
    tables = {t: open_table(output, t) for t in TABLES}
    return None if any(dt is None for dt in tables.values()) else {t: dt.version() for t, dt in tables.items()}


def versions_with_settings(output: str, settings_hash: str) -> dict[str, int] | None:
    """{table: newest Delta version whose commit carries `settings_hash`} (time travel to earlier settings)."""
    found = {}
    for table in TABLES:
        dt = open_table(output, table)
        entry = next((e for e in (dt.history() if dt else []) if e.get(SETTINGS_KEY) == settings_hash), None)
        if entry is None:
            return None
        found[table] = entry["version"]
    return found


def shard_seq(dt) -> int:
    """The newest shard sequence number committed to the table (0: none)."""
    return (dt.transaction_version(APP_ID) or 0) if dt is not None else 0


def data_files(output: str, table: str, dt=None) -> list[str]:
    """Paths (fsspec form, as the job's writers name them) of the table's current data files."""
    dt = dt if dt is not None else open_table(output, table)
    if dt is None:
        return []
    _, root = fsspec.core.url_to_fs(table_uri(output, table))
    return [f"{root.rstrip('/')}/{p}" for p in _adds(dt).column("path").to_pylist()]


def read_table(output: str, table: str, columns: list[str] | None = None, dt=None) -> pa.Table | None:
    """The current rows of a table (only `columns` if given), vector columns as fixed-size lists."""
    paths = data_files(output, table, dt)
    if not paths:
        return None
    fs, _ = fsspec.core.url_to_fs(output)
    dataset = pads.dataset(paths, format="parquet", filesystem=fs)
    return fixed_width(_plain(dataset.to_table(columns=columns).replace_schema_metadata(None)))


def iter_batches(output: str, table: str, columns: list[str], batch_rows: int = 262_144, dt=None):
    """The current rows' `columns` in record batches (streamed: the driver holds one at a time), vector
    columns as fixed-size lists."""
    paths = data_files(output, table, dt)
    if paths:
        fs, _ = fsspec.core.url_to_fs(output)
        for batch in pads.dataset(paths, format="parquet", filesystem=fs).to_batches(columns=columns,
                                                                                      batch_size=batch_rows):
            yield fixed_width(_plain(batch))


def _plain(data):
    """`data` with view types (string_view, binary_view: what delta-rs writes when a user's DELETE or UPDATE
    rewrites files) cast to the plain ones our schemas declare; unchanged if it has none."""
    schema = pa.schema([f.with_type(_plain_type(f.type)) for f in data.schema], metadata=data.schema.metadata)
    return data if schema.equals(data.schema) else data.cast(schema)


def _plain_type(t: pa.DataType) -> pa.DataType:
    if t == pa.string_view():
        return pa.string()
    if t == pa.binary_view():
        return pa.binary()
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_plain_type(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)))
    return t


@dataclass(frozen=True)
class Settings:
    """What decides a run's results: `values` (models, feature settings, precision...) and their hash."""

    hash: str
    values: dict

    def commit_info(self, run_id: str, seq: int | None = None) -> dict[str, str]:
        info = {SETTINGS_KEY: self.hash, SETTINGS_JSON: json.dumps(self.values, sort_keys=True), RUN_KEY: run_id}
        return info if seq is None else {**info, SEQ_KEY: str(seq)}


def table_settings_values(dt) -> dict | None:
    """The settings (values) of the newest commit, None for tables made before they were recorded."""
    entry = newest_commit_info(dt)
    return json.loads(entry[SETTINGS_JSON]) if entry and SETTINGS_JSON in entry else None


def commit_shard(output: str, seq: int, run_id: str, settings: Settings, parts: dict[str, list[str]],
                 schemas: dict[str, pa.Schema], reprocessed: pa.Array, overwrite: str | None = None,
                 fault: Callable[[str], None] = lambda step: None) -> dict[str, int]:
    """Commit shard `seq` (its part files) to both tables in three Delta commits, each under an app
    transaction (a shard already committed is a no-op):
    1. segments: the shard's windows are added (APP_ID = seq); the commitInfo records steps 2 and 3;
    2. clips: the shard's clip rows are added, and the rows they replace removed (files holding rows of
       `reprocessed` clip_ids, found in the table as it is now, are swapped for copies without them), or,
       with `overwrite` (a settings change), the table is replaced (APP_ID = seq);
    3. segments: the windows of replaced clip rows are removed the same way, or with `overwrite` (a
       path prefix: the parts' folder) every file outside it (CLEANUP_ID = seq).
    At every point each clip row's windows (same clip_id and run_id) are all in segments, once.
    `fault(step)` is called between steps (the crash tests' hook). Returns the new table versions."""
    fs, _ = fsspec.core.url_to_fs(output)
    if shard_seq(open_table(output, "clips")) >= seq:
        log.info("shard %d is already committed: nothing to do", seq)
        return versions(output)
    plans = {}
    for table in TABLES:
        dt = open_table(output, table)
        _, root = fsspec.core.url_to_fs(table_uri(output, table))
        root = root.rstrip("/")
        adds = [_add(fs, root, path) for path in parts.get(table, [])]
        mode = "create" if dt is None else "overwrite" if overwrite is not None else "append"
        stale = _without(dt, fs, root, reprocessed, run_id) if mode == "append" else []
        if table == "clips":
            plans["clips"] = {"mode": mode, "actions": adds + stale, "schema": _schema_json(schemas[table])}
        else:
            plans["segments"] = {"mode": "create" if dt is None else "append", "actions": adds,
                                 "schema": _schema_json(schemas[table])}
            plans["cleanup"] = {"actions": stale, "keep_only": overwrite if mode == "overwrite" else None}
    fault("rewrites-written")
    info = settings.commit_info(run_id, seq)
    if shard_seq(open_table(output, "segments")) < seq:
        record = {"clips": plans["clips"], "cleanup": plans["cleanup"]}
        # a shard that replaces nothing has no step 3: recorded as done now, so its plan is never needed again
        apps = (APP_ID,) if _replaces(plans["cleanup"]) else (APP_ID, CLEANUP_ID)
        _apply(output, "segments", plans["segments"], apps, seq, {**info, PLAN_KEY: json.dumps(record)})
    fault("segments-added")
    _apply(output, "clips", plans["clips"], (APP_ID,), seq, info)
    fault("clips-committed")
    _cleanup(output, plans["cleanup"], seq, info)
    fault("segments-cleaned")
    return versions(output)


def swap_in(output: str, staged: Staging, run_id: str, settings: Settings, schemas: dict[str, pa.Schema],
            fault: Callable[[str], None] = lambda step: None) -> dict[str, int]:
    """Replace OUTPUT's tables by the staging tables' current rows, as the next shard (three commits,
    as `commit_shard`: readers see the old table until the clips commit, then the new one)."""
    parts = {t: data_files(staged, t) for t in TABLES}
    return commit_shard(output, shard_seq(open_table(output, "clips")) + 1, run_id, settings, parts, schemas,
                        pa.array([], pa.string()), overwrite=f"{staged.directory}/", fault=fault)


def recover(output: str) -> int | None:
    """Finish a shard that a killed run left half-committed: its clips commit (step 2) and the removal of
    replaced windows (step 3), from what its segments commit recorded. Returns the shard finished, if any."""
    segments, clips = open_table(output, "segments"), open_table(output, "clips")
    ahead, behind = shard_seq(segments), shard_seq(clips)
    if ahead not in (behind, behind + 1):
        raise LedgerError(f"{output}: segments is at shard {ahead} and clips at shard {behind}; only a "
                          "segments table one shard ahead (a kill between the two commits) can be finished")
    cleaned = (segments.transaction_version(CLEANUP_ID) or 0) if segments is not None else 0
    if ahead == 0 or (ahead == behind and cleaned >= ahead):
        return None
    entry = newest_commit_info(segments, PLAN_KEY)
    if entry is None or int(entry[SEQ_KEY]) != ahead:
        raise LedgerError(f"{output}: segments shard {ahead} recorded no plan to finish")
    record = json.loads(entry[PLAN_KEY])
    info = {k: v for k, v in entry.items() if k.startswith(PREFIX) and k != PLAN_KEY}
    log.warning("shard %d of run %s was left half-committed (the run was stopped between its commits): "
                "finishing it", ahead, entry.get(RUN_KEY))
    if ahead > behind:
        _apply(output, "clips", record["clips"], (APP_ID,), ahead, info)
    _cleanup(output, record["cleanup"], ahead, info)
    return ahead


def _cleanup(output: str, cleanup: dict, seq: int, info: dict[str, str]) -> None:
    """Step 3 of a shard: remove replaced windows (explicit actions, or every file outside `keep_only`)."""
    actions = list(cleanup["actions"])
    if cleanup["keep_only"]:
        now = int(time.time() * 1000)
        actions += [{"path": e["path"], "size": e["size_bytes"], "deleted": now}
                    for e in _adds(open_table(output, "segments")).select(["path", "size_bytes"]).to_pylist()
                    if not e["path"].startswith(cleanup["keep_only"])]
    if actions:
        dt = open_table(output, "segments")
        plan = {"mode": "append", "actions": actions, "schema": dt.schema().to_json()}
        _apply(output, "segments", plan, (CLEANUP_ID,), seq, info)


def _replaces(cleanup: dict) -> bool:
    """Whether a shard's step 3 has anything to remove."""
    return bool(cleanup["actions"] or cleanup["keep_only"])


def _apply(output: str, table: str, plan: dict, apps: tuple[str, ...], seq: int, info: dict[str, str]) -> None:
    """One Delta commit of `plan` (mode, actions as dicts, schema) under the app transactions (app, seq)."""
    from deltalake import CommitProperties, Schema as DeltaSchema, Transaction
    from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

    props = CommitProperties(custom_metadata=info, app_transactions=[Transaction(app, seq) for app in apps])
    actions = [AddAction(a["path"], a["size"], {}, a["mtime"], True, a["stats"]) if "stats" in a else
               RemoveAction(path=a["path"], data_change=True, deletion_timestamp=a["deleted"], size=a["size"],
                            partition_values={}) for a in plan["actions"]]
    schema = DeltaSchema.from_json(plan["schema"])
    uri = table_uri(output, table)
    if plan["mode"] == "create":
        create_table_with_add_actions(uri, schema, actions, mode="error", storage_options=storage_options(output),
                                      commit_properties=props)
    else:
        open_table(output, table).create_write_transaction(actions, mode=plan["mode"], schema=schema,
                                                           commit_properties=props)
    log.info("committed shard %d (%s, %d actions) to Delta table %s", seq, plan["mode"], len(actions), uri)


def _schema_json(schema: pa.Schema) -> str:
    from deltalake import Schema as DeltaSchema

    return DeltaSchema.from_arrow(schema).to_json()


def _adds(dt) -> pa.Table:
    """The table's current add actions (path, size_bytes, ...) as a pyarrow table."""
    return pa.table(dt.get_add_actions(flatten=True))


def _add(fs, root: str, path: str) -> dict:
    """An add action (as a dict) for the part file `path` under the table's `root`."""
    if not path.startswith(root + "/"):
        raise ValueError(f"part {path} is not under its table {root}")
    info = fs.info(path)
    rows = pq.ParquetFile(fs.open(path, "rb")).metadata.num_rows
    modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or time.time()
    if hasattr(modified, "timestamp"):
        modified = modified.timestamp()
    return {"path": path[len(root) + 1:], "size": int(info["size"]), "mtime": int(float(modified) * 1000),
            "stats": json.dumps({"numRecords": rows})}


def _without(dt, fs, root: str, clip_ids: pa.Array, run_id: str) -> list[dict]:
    """Remove actions for the table's files that hold rows of `clip_ids`, and add actions for copies of
    those files without them (what a MERGE does). Only the clip_id column of each file is read to find
    them, one file at a time. Copies are named by the file they replace and the run: never overwritten."""
    if not len(clip_ids):
        return []
    actions = []
    for entry in _adds(dt).select(["path", "size_bytes"]).to_pylist():
        path = f"{root}/{entry['path']}"
        with fs.open(path, "rb") as f:
            ids = pq.read_table(f, columns=["clip_id"]).column("clip_id")
        stale = pc.is_in(ids, value_set=clip_ids)
        if not pc.any(stale).as_py():
            continue
        with fs.open(path, "rb") as f:
            old = pq.read_table(f)
        kept = old.filter(pc.invert(stale))
        actions.append({"path": entry["path"], "size": entry["size_bytes"], "deleted": int(time.time() * 1000)})
        if len(kept):
            name = hashlib.sha256(entry["path"].encode()).hexdigest()[:20]
            copy = write_part(fs, f"{root}/{run_id}", f"rewrite-{name}.parquet", kept)
            actions.append(_add(fs, root, copy))
        log.info("%s: %d older rows of reprocessed clips removed", entry["path"], len(old) - len(kept))
    return actions
