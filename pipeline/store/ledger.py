"""What is committed, read from the one ledger (the Delta tables, pipeline/store/delta.py): what a reader
should see (`read_current`), and what a rerun may skip (`committed_identity`, `not_transient`).

A run's workers write part files under OUTPUT/<table>/<run_id>/ as it goes; the driver commits them to
the Delta tables shard by shard. A part file that no commit names is not a result: a killed run's
uncommitted parts are left for `jobs.maintain` to vacuum and their files are processed again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.store import delta

log = logging.getLogger(__name__)

IDENTITY = ["clip_id", "size_bytes", "modified", "etag"]
# Errors that say nothing about a file's content: a rerun tries those files again even if unchanged.
# A decoder killed from outside (the kernel's OOM killer, a node shutting down) looks like a crash, so
# crashes and out-of-memory are retried too; a file that really crashes the decoder costs one retry per run.
TRANSIENT_ERRORS = ("storage error reading file", "permission denied reading file",
                    "permission denied listing directory", "file not found", "decoding timed out",
                    "decoder crashed", "out of memory decoding file")


def is_transient(error: str | None) -> bool:
    """Whether an error row's reason ("reason" or "reason (detail)") is retried by the next run."""
    return bool(error) and error.startswith(TRANSIENT_ERRORS)


def committed_identity(output: str, settings_hash: str, batch_rows: int = 262_144) -> Iterator[pa.RecordBatch]:
    """IDENTITY and error columns of the current table's clip rows (the Delta table OUTPUT/clips) in
    record batches, if they were produced with `settings_hash`; nothing when the table has other
    settings or does not exist."""
    dt = delta.open_table(output, "clips")
    if dt is None or delta.table_settings(dt) != settings_hash:
        return
    yield from delta.iter_batches(output, "clips", IDENTITY + ["error"], batch_rows, dt)


def not_transient(done: pa.Table | None) -> pa.Table | None:
    """IDENTITY columns of the rows that need no retry: all but those whose error is transient
    (TRANSIENT_ERRORS; those files are tried again)."""
    if done is None:
        return None
    errors = done.column("error")  # "reason" or "reason (detail)"; vectorised twin of is_transient
    transient = pa.array(np.zeros(len(done), dtype=bool))
    for reason in TRANSIENT_ERRORS:
        transient = pc.or_(transient, pc.fill_null(pc.starts_with(errors, reason), False))
    return done.filter(pc.invert(transient)).select(IDENTITY)


def done_files(output: str, settings_hash: str) -> pa.Table | None:
    """IDENTITY columns of clip rows in the current table produced with `settings_hash`, except rows whose
    error is transient."""
    tables = [pa.Table.from_batches([b]) for b in committed_identity(output, settings_hash)]
    return not_transient(pa.concat_tables(tables)) if tables else None


def read_current(output: str, table: str = "clips", settings_hash: str | None = None,
                 columns: list[str] | None = None) -> pa.Table:
    """The current row per clip (clips), or that row's windows (segments), sorted by clip_id (then
    segment_index); only `columns` if given.

    That is the Delta table OUTPUT/<table>. With `settings_hash` of earlier settings, the tables as they
    were at their newest commit with those settings (Delta time travel; gone once vacuumed)."""
    dt = delta.open_table(output, table)
    if dt is None:
        raise FileNotFoundError(f"no committed runs under {output}")
    if settings_hash not in (None, delta.table_settings(dt)):
        found = delta.versions_with_settings(output, settings_hash)
        if found is None:
            raise LookupError(f"no commit with settings {settings_hash} under {output}")
        dt = delta.open_table(output, table, found[table])
    keys = ["clip_id"] + (["segment_index"] if table == "segments" else [])
    read = None if columns is None else list(columns) + [k for k in keys if k not in columns]
    rows = delta.read_table(output, table, read, dt)
    if rows is None:
        raise LookupError(f"no current {table} rows under {output}")
    rows = rows.sort_by([(k, "ascending") for k in keys])
    return rows if columns is None else rows.select(columns)
