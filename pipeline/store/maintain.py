"""Maintenance of an OUTPUT's Delta tables (`python -m jobs.maintain`): finish a half-committed shard,
compact small data files, checkpoint the log, and vacuum files no version within the retention needs.

Runs under OUTPUT's lease (a tagging run and maintenance never overlap). Compaction rewrites small files
with our own writer, so the merged files keep the parts' Arrow schema (types, and the vector columns'
widths in their field metadata) and run metadata, and is committed with dataChange=false: readers and
the skip check see the same rows. Vacuum deletes what no
version within `retention_hours` references, including parts of killed runs that were never committed;
earlier settings stay readable by time travel only within that retention.

What the next run reads from the log must survive maintenance's own commits (vacuum writes two per table)
and its log cleanup: every commit of ours carries the table's settings, as the job's commits do, and the
newest shard, once finished, is recorded as needing no cleanup (CLEANUP_ID), so that `delta.recover` never
needs that shard's plan again (a plan is found by reading the history back a few dozen commits, and log
cleanup deletes commits older than the checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store import delta
from pipeline.store.writer import METADATA_KEY, write_part

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaintainConfig:
    """What maintenance does: files under `small_rows` rows are merged into files of up to `target_rows`."""

    output: str
    small_rows: int = 10_000
    target_rows: int = 100_000
    retention_hours: float = 168.0    # Delta's default (7 days): time travel within it keeps working
    vacuum: bool = True


def maintain(cfg: MaintainConfig, check: Callable[[], None] = lambda: None) -> dict:
    """Recover, compact, checkpoint and vacuum both tables; returns what was done, per table. `check`
    (the lease's) is called before every commit and before vacuum deletes anything."""
    check()
    report = {"recovered_shard": delta.recover(cfg.output)}
    settle(cfg.output, check)
    for table in delta.TABLES:
        dt = delta.open_table(cfg.output, table)
        if dt is None:
            continue
        merged = compact(cfg, table, dt, check)
        dt = delta.open_table(cfg.output, table)
        info = commit_info(dt, "vacuum")   # read before log cleanup, which may drop the commits holding it
        dt.create_checkpoint()
        dt.cleanup_metadata()
        deleted = vacuum(cfg, table, dt, info, check) if cfg.vacuum else 0
        report[table] = {"files_merged": merged, "files_deleted": deleted, "version": dt.version(),
                         "files": len(delta.data_files(cfg.output, table, delta.open_table(cfg.output, table)))}
        log.info("%s: %d small files merged, %d files deleted by vacuum, checkpoint at version %d", table,
                 merged, deleted, dt.version())
    return report


def commit_info(dt, operation: str) -> dict[str, str]:
    """commitInfo for a maintenance commit: the table's settings, as every commit of ours records them."""
    info = delta.newest_commit_info(dt) or {}
    keep = {k: v for k, v in info.items() if k in (delta.SETTINGS_KEY, delta.SETTINGS_JSON)}
    return {**keep, delta.RUN_KEY: "maintenance", delta.PREFIX + "operation": operation}


def settle(output: str, check: Callable[[], None] = lambda: None) -> int | None:
    """Record that the newest shard needs no cleanup (segments' CLEANUP_ID = its number) when it never had
    any (a shard that replaced nothing commits no step 3). Call after `delta.recover`: the shard is then
    whole. Without it recover looks for that shard's plan on every run, and fails once maintenance's
    commits or log cleanup have put it out of reach. Returns the shard recorded, if any."""
    from deltalake import CommitProperties, Transaction

    segments = delta.open_table(output, "segments")
    seq = delta.shard_seq(segments)
    if not seq or (segments.transaction_version(delta.CLEANUP_ID) or 0) >= seq:
        return None
    check()
    segments.create_write_transaction([], mode="append", schema=segments.schema(), commit_properties=CommitProperties(
        custom_metadata=commit_info(segments, "settle"), app_transactions=[Transaction(delta.CLEANUP_ID, seq)]))
    log.info("segments: shard %d recorded as needing no cleanup", seq)
    return seq


def vacuum(cfg: MaintainConfig, table: str, dt, info: dict[str, str], check: Callable[[], None]) -> int:
    """Delete the table's files that no version within the retention needs, and files no commit names
    (parts of killed runs). Returns the files deleted: delta-rs also lists removed files it deleted
    before, until their tombstones expire."""
    from deltalake import CommitProperties

    fs, root = fsspec.core.url_to_fs(delta.table_uri(cfg.output, table))
    root = root.rstrip("/")
    there = set(fs.find(root)) if fs.exists(root) else set()
    check()
    # delta-rs takes whole hours: round up, so a retention under an hour never becomes 0
    paths = dt.vacuum(retention_hours=math.ceil(cfg.retention_hours), dry_run=False, enforce_retention_duration=False,
                      full=True, commit_properties=CommitProperties(custom_metadata=info))
    return sum(f"{root}/{p}" in there for p in paths)


def compact(cfg: MaintainConfig, table: str, dt, check: Callable[[], None] = lambda: None) -> int:
    """Merge the table's small files into files of up to `target_rows` rows, one commit
    (dataChange=false, the table's settings recorded as in every commit). Returns files merged."""
    from deltalake import CommitProperties
    from deltalake.transaction import AddAction, RemoveAction

    adds = delta._adds(dt).select(["path", "size_bytes", "num_records"]).to_pylist()
    small = [a for a in adds if (a["num_records"] or 0) < cfg.small_rows]
    if len(small) < 2:
        return 0
    fs, root = fsspec.core.url_to_fs(delta.table_uri(cfg.output, table))
    root = root.rstrip("/")
    directory = f"{root}/compacted-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    actions, group, rows, merged = [], [], 0, 0
    for entry in small + [None]:
        if entry is not None:
            group.append(entry)
            rows += entry["num_records"] or 0
        if group and (entry is None or rows >= cfg.target_rows):
            if len(group) > 1:   # a last group of one file would only be rewritten as itself
                actions += _merge(fs, root, directory, group)
                merged += len(group)
            group, rows = [], 0
    if not actions:
        return 0
    commit = [AddAction(a["path"], a["size"], {}, a["mtime"], False, a["stats"]) if "stats" in a else
              RemoveAction(path=a["path"], data_change=False, deletion_timestamp=a["deleted"], size=a["size"],
                           partition_values={}) for a in actions]
    check()
    dt.create_write_transaction(commit, mode="append", schema=dt.schema(),
                                commit_properties=CommitProperties(custom_metadata=commit_info(dt, "compact")))
    return merged


def _merge(fs, root: str, directory: str, group: list[dict]) -> list[dict]:
    """Write the rows of `group`'s files as one file; the actions removing them and adding it."""
    tables = []
    for entry in group:
        with fs.open(f"{root}/{entry['path']}", "rb") as f:
            tables.append(pq.read_table(f))
    meta = json.loads(tables[0].schema.metadata[METADATA_KEY])
    meta.update(run_id=None, compacted_from=len(group))   # rows keep their own run_id column
    merged = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    merged = merged.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    path = write_part(fs, directory, f"part-{secrets.token_hex(8)}.parquet", merged)
    now = int(time.time() * 1000)
    return [delta._add(fs, root, path)] + [{"path": e["path"], "size": e["size_bytes"], "deleted": now} for e in group]
