"""The current table in an open format: OUTPUT/clips and OUTPUT/segments are Delta Lake tables.

The part files the workers write (pipeline/tagging/sink.py) are the tables' data files, unchanged: the driver
only commits their paths to each table's transaction log (`_delta_log/`), so Spark, DuckDB, Polars,
pandas (through `deltalake`) and Trino read the current table without our code: one row per clip (per
window in segments), all with the settings of the newest run. A run commits, in one transaction per
table (segments first, then clips):
- its part files (adds);
- when its settings equal the table's: the files holding older rows of the clips it processed again
  (changed files, retried transient errors) are removed, and copies without those rows are added;
- when its settings differ (other models, precision or feature settings): an overwrite, so the table
  never mixes settings. Such a run reprocesses every file, so it carries a full table.
The run's settings hash is stored in each commit's commitInfo (`audio_tagging.settings_hash`).

Delta stores fixed-size lists as plain lists in its schema (the Parquet files keep FixedSizeList): a
reader gets FLOAT[512] back by casting, e.g. DuckDB `clap_embedding::FLOAT[512]`, Spark
`array<float>` as is, pyarrow `pc.cast(col, pa.list_(pa.float32(), 512))`; `read_current` reads the
files' own schema, so it returns fixed-size lists directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SETTINGS_KEY = "audio_tagging.settings_hash"
TABLES = ("segments", "clips")   # commit order: a clip row never lands before its windows


def storage_options(output: str) -> dict[str, str] | None:
    """delta-rs options for OUTPUT's store, from the same environment fsspec uses (AWS_* variables)."""
    if not output.startswith(("s3://", "s3a://")):
        return None
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    # one committer per OUTPUT (the job's driver): no lock service needed for the log's renames
    options.setdefault("AWS_S3_ALLOW_UNSAFE_RENAME", os.environ.get("AWS_S3_ALLOW_UNSAFE_RENAME", "true"))
    return options


def table_uri(output: str, table: str) -> str:
    return f"{output.rstrip('/')}/{table}"


def open_table(output: str, table: str):
    """The Delta table, or None if OUTPUT has none yet (no run committed, or output of an older version)."""
    from deltalake import DeltaTable

    uri = table_uri(output, table)
    if not DeltaTable.is_deltatable(uri, storage_options=storage_options(output)):
        return None
    return DeltaTable(uri, storage_options=storage_options(output))


def table_settings(dt) -> str | None:
    """Settings hash of the newest run committed to the table."""
    for entry in dt.history():   # newest first
        if SETTINGS_KEY in entry:
            return entry[SETTINGS_KEY]
    return None


def data_files(output: str, table: str, dt=None) -> list[str]:
    """Paths (fsspec form, as the job's writers name them) of the table's current data files."""
    dt = dt if dt is not None else open_table(output, table)
    if dt is None:
        return []
    _, root = fsspec.core.url_to_fs(table_uri(output, table))
    return [f"{root.rstrip('/')}/{p}" for p in _adds(dt).column("path").to_pylist()]


def read_table(output: str, table: str, columns: list[str] | None = None, dt=None) -> pa.Table | None:
    """The current rows of a table (only `columns` if given), in the data files' own schema."""
    paths = data_files(output, table, dt)
    if not paths:
        return None
    fs, _ = fsspec.core.url_to_fs(output)
    dataset = pads.dataset(paths, format="parquet", filesystem=fs)
    return dataset.to_table(columns=columns).replace_schema_metadata(None)


def iter_batches(output: str, table: str, columns: list[str], batch_rows: int = 262_144, dt=None):
    """The current rows' `columns` in record batches (streamed: the driver holds one at a time)."""
    paths = data_files(output, table, dt)
    if paths:
        fs, _ = fsspec.core.url_to_fs(output)
        yield from pads.dataset(paths, format="parquet", filesystem=fs).to_batches(columns=columns,
                                                                                   batch_size=batch_rows)


def publish(output: str, run_id: str, settings_hash: str, parts: dict[str, list[str]],
            schemas: dict[str, pa.Schema], reprocessed: pa.Array) -> dict[str, int]:
    """Commit a run's part files to both tables (segments first); rows of `reprocessed` clip_ids that
    an earlier run committed with the same settings are removed in the same transaction. Returns the
    new table versions."""
    from deltalake import Schema as DeltaSchema
    from deltalake.transaction import CommitProperties, create_table_with_add_actions

    fs, _ = fsspec.core.url_to_fs(output)
    commit = CommitProperties(custom_metadata={SETTINGS_KEY: settings_hash, "audio_tagging.run_id": run_id})
    versions = {}
    for table in TABLES:
        uri = table_uri(output, table)
        _, root = fsspec.core.url_to_fs(uri)
        root = root.rstrip("/")
        adds = [_add_action(fs, root, path) for path in parts.get(table, [])]
        dt = open_table(output, table)
        if dt is None:
            create_table_with_add_actions(uri, DeltaSchema.from_arrow(schemas[table]), adds, mode="error",
                                          storage_options=storage_options(output), commit_properties=commit)
        elif table_settings(dt) != settings_hash:
            log.info("%s: settings changed (%s -> %s): the run's rows replace the whole table", table,
                     table_settings(dt), settings_hash)
            dt.create_write_transaction(adds, mode="overwrite", schema=schemas[table], commit_properties=commit)
        else:
            actions = adds + _without(dt, fs, root, reprocessed, run_id, schemas[table])
            dt.create_write_transaction(actions, mode="append", schema=schemas[table], commit_properties=commit)
        dt = open_table(output, table)
        versions[table] = dt.version()
        log.info("committed %d files of run %s to Delta table %s (version %d)", len(adds), run_id, uri,
                 versions[table])
    return versions


def _adds(dt) -> pa.Table:
    """The table's current add actions (path, size_bytes, ...) as a pyarrow table."""
    return pa.table(dt.get_add_actions(flatten=True))


def _add_action(fs, root: str, path: str):
    from deltalake.transaction import AddAction

    if not path.startswith(root + "/"):
        raise ValueError(f"part {path} is not under its table {root}")
    info = fs.info(path)
    rows = pq.ParquetFile(fs.open(path, "rb")).metadata.num_rows
    modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or time.time()
    if hasattr(modified, "timestamp"):
        modified = modified.timestamp()
    return AddAction(path[len(root) + 1:], int(info["size"]), {}, int(float(modified) * 1000), True,
                     json.dumps({"numRecords": rows}))


def _without(dt, fs, root: str, clip_ids: pa.Array, run_id: str, schema: pa.Schema) -> list:
    """Remove actions for the table's files that hold rows of `clip_ids`, and add actions for copies of
    those files without them (what a MERGE does). Only the clip_id column of each file is read to find
    them, one file at a time."""
    from deltalake.transaction import RemoveAction

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
        actions.append(RemoveAction(path=entry["path"], data_change=True, deletion_timestamp=int(time.time() * 1000),
                                    size=entry["size_bytes"], partition_values={}))
        if len(kept):
            name = hashlib.sha256(entry["path"].encode()).hexdigest()[:20]
            copy = f"{root}/{run_id}/rewrite-{name}.parquet"
            fs.makedirs(f"{root}/{run_id}", exist_ok=True)
            with fs.open(copy, "wb") as f:
                pq.write_table(kept, f, compression="zstd")
            actions.append(_add_action(fs, root, copy))
        log.info("%s: %d older rows of reprocessed clips removed", entry["path"], len(old) - len(kept))
    return actions
