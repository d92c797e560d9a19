"""Maintenance of an OUTPUT's Delta tables (`python -m jobs.maintain`): finish a half-committed shard,
compact small data files, checkpoint the log, and vacuum files no version within the retention needs.

Runs under OUTPUT's lease (a tagging run and maintenance never overlap). Compaction rewrites small files
with our own writer, so the files keep their Arrow schema (fixed-size lists) and run metadata, and is
committed with dataChange=false: readers and the skip check see the same rows. Vacuum deletes what no
version within `retention_hours` references, including parts of killed runs that were never committed;
earlier settings stay readable by time travel only within that retention.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
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


def maintain(cfg: MaintainConfig) -> dict:
    """Recover, compact, checkpoint and vacuum both tables; returns what was done, per table."""
    report = {"recovered_shard": delta.recover(cfg.output)}
    for table in delta.TABLES:
        dt = delta.open_table(cfg.output, table)
        if dt is None:
            continue
        merged = compact(cfg, table, dt)
        dt = delta.open_table(cfg.output, table)
        dt.create_checkpoint()
        dt.cleanup_metadata()
        removed = dt.vacuum(retention_hours=int(cfg.retention_hours), dry_run=False,
                            enforce_retention_duration=False, full=True) if cfg.vacuum else []
        report[table] = {"files_merged": merged, "files_vacuumed": len(removed), "version": dt.version(),
                         "files": len(delta.data_files(cfg.output, table, delta.open_table(cfg.output, table)))}
        log.info("%s: %d small files merged, %d files vacuumed, checkpoint at version %d", table, merged,
                 len(removed), dt.version())
    return report


def compact(cfg: MaintainConfig, table: str, dt) -> int:
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
    actions, group, rows = [], [], 0
    for entry in small + [None]:
        if entry is not None:
            group.append(entry)
            rows += entry["num_records"] or 0
        if group and (entry is None or rows >= cfg.target_rows):
            actions += _merge(fs, root, directory, group)
            group, rows = [], 0
    info = delta.newest_commit_info(dt) or {}
    keep = {k: v for k, v in info.items() if k in (delta.SETTINGS_KEY, delta.SETTINGS_JSON)}
    commit = [AddAction(a["path"], a["size"], {}, a["mtime"], False, a["stats"]) if "stats" in a else
              RemoveAction(path=a["path"], data_change=False, deletion_timestamp=a["deleted"], size=a["size"],
                           partition_values={}) for a in actions]
    dt.create_write_transaction(commit, mode="append", schema=dt.schema(), commit_properties=CommitProperties(
        custom_metadata={**keep, delta.RUN_KEY: "maintenance", delta.PREFIX + "operation": "compact"}))
    return len(small)


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
