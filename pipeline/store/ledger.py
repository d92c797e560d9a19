"""Run commits and the "current table": what a reader should see, and what a rerun may skip.

A run's workers write part files under OUTPUT/<table>/<run_id>/ as it goes; at the end the driver
commits them to the Delta tables OUTPUT/clips and OUTPUT/segments (pipeline/store/delta.py: the current
table, what any reader sees), then writes the run's manifest, OUTPUT/_commits/<run_id>.json, naming
every part file it vouches for (the ledger of all runs, also of earlier settings). A run that died is
invisible. A rerun adopts the complete part files of a dead run with the same settings (they were
renamed into place only when complete), so the work done before the kill is not redone; each clip has
exactly one row in the current table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store import delta
from pipeline.store.writer import METADATA_KEY, OutputError, remove_quietly, write_part

log = logging.getLogger(__name__)

TABLES = ("clips", "segments")
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


def _root(output: str):
    fs, root = fsspec.core.url_to_fs(output)
    return fs, root.rstrip("/")


def read_commits(output: str) -> list[dict]:
    """Committed manifests, oldest first."""
    fs, root = _root(output)
    paths = fs.glob(f"{root}/_commits/*.json")
    commits = []
    for path in paths:
        with fs.open(path, "r") as f:
            commits.append(json.load(f))
    return sorted(commits, key=lambda c: (c["committed_at"], c["run_id"]))


def commit(output: str, run_id: str, settings_hash: str, parts: dict[str, list[str]]) -> str:
    """Write the run's manifest last, under a temporary name then renamed: the run is now visible."""
    fs, root = _root(output)
    relative = {t: sorted(_relative(root, p) for p in parts.get(t, [])) for t in TABLES}
    manifest = {"run_id": run_id, "settings_hash": settings_hash, "committed_at": time.time(),
                "parts": relative}
    fs.makedirs(f"{root}/_commits", exist_ok=True)
    final, temp = f"{root}/_commits/{run_id}.json", f"{root}/_commits/_tmp-{run_id}.json"
    try:
        with fs.open(temp, "w") as f:
            json.dump(manifest, f, indent=1)
        fs.mv(temp, final)
    except OSError as e:
        remove_quietly(fs, temp)
        raise OutputError(f"cannot commit run {run_id} under {output}: {e}. Nothing of this run is "
                          "committed; complete parts are adopted by the next run") from e
    return final


def _relative(root: str, path: str) -> str:
    """Part paths in manifests are relative to OUTPUT, so the output can be moved or mirrored."""
    return path[len(root) + 1:] if path.startswith(root + "/") else path


def _committed_paths(output: str, commits: list[dict], table: str) -> list[str]:
    _, root = _root(output)
    return [f"{root}/{p}" for c in commits for p in c["parts"][table]]


def orphan_parts(output: str, settings_hash: str) -> dict[str, list[str]]:
    """Complete part files of runs that never committed, written with `settings_hash`. Files in the
    Delta tables count as committed (a run that died between its Delta commit and its manifest)."""
    fs, root = _root(output)
    commits = read_commits(output)
    committed = {p for t in TABLES for p in _committed_paths(output, commits, t)}
    committed |= {p for t in TABLES for p in delta.data_files(output, t)}
    found = {}
    for table in TABLES:
        paths = [p for p in fs.glob(f"{root}/{table}/*/part-*.parquet") if p not in committed]
        found[table] = [p for p in paths if _settings_hash(fs, p) == settings_hash]
    return found


def adoptable_parts(output: str, found: dict[str, list[str]]) -> dict[str, list[str]]:
    """Of a dead run's complete parts (`orphan_parts`), what a rerun may commit: every clips part, and of the
    segments parts only the windows of clips those clips parts name. A file whose windows were split across
    batches has its windows in the workers' segments parts before the driver writes its clip row, so a
    dead run can leave windows of a clip no complete clips part names; that file is processed again, and
    its windows must not be committed twice. A segments part holding such windows is replaced by a copy
    without them (`-adopted` added to its name; the original, never committed, is deleted)."""
    fs, _ = _root(output)
    clips = _read_parts(fs, found["clips"], ["clip_id"])
    ids = clips.column("clip_id").combine_chunks() if clips is not None else pa.array([], pa.string())
    segments = []
    for path in found["segments"]:
        with fs.open(path, "rb") as f:
            part = pq.read_table(f)
        keep = pc.is_in(part.column("clip_id"), value_set=ids)
        kept = pc.sum(keep).as_py() or 0
        if kept == len(part):
            segments.append(path)
            continue
        if kept:
            directory, name = path.rsplit("/", 1)
            # the schema's run metadata comes with the rows
            segments.append(write_part(fs, directory, name[: -len(".parquet")] + "-adopted.parquet", part.filter(keep)))
        log.info("adopting %d of the %d windows in %s: the others belong to clips with no complete clip row",
                 kept, len(part), path)
        fs.rm(path)
    return {"clips": found["clips"], "segments": segments}


def _settings_hash(fs, path: str) -> str | None:
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    return json.loads(meta[METADATA_KEY]).get("settings_hash") if METADATA_KEY in meta else None


def _read_parts(fs, paths: list[str], columns: list[str] | None = None) -> pa.Table | None:
    tables = []
    for path in paths:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns).replace_schema_metadata(None))
    return pa.concat_tables(tables) if tables else None


def committed_identity(output: str, settings_hash: str, batch_rows: int = 262_144) -> Iterator[pa.RecordBatch]:
    """IDENTITY and error columns of the current table's clip rows (the Delta table OUTPUT/clips) in
    record batches, if they were produced with `settings_hash`; nothing when the table has other
    settings or does not exist."""
    dt = delta.open_table(output, "clips")
    if dt is None or delta.table_settings(dt) != settings_hash:
        return
    yield from delta.iter_batches(output, "clips", IDENTITY + ["error"], batch_rows, dt)


def parts_identity(output: str, paths: list[str]) -> pa.Table | None:
    """IDENTITY and error columns of the clip rows in these part files (e.g. adopted ones)."""
    fs, _ = _root(output)
    return _read_parts(fs, list(paths), IDENTITY + ["error"])


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


def done_files(output: str, settings_hash: str, extra_parts: list[str] = ()) -> pa.Table | None:
    """IDENTITY columns of clip rows already produced with `settings_hash` (in the current table, or in
    `extra_parts`, e.g. adopted ones), except rows whose error is transient."""
    tables = [pa.Table.from_batches([b]) for b in committed_identity(output, settings_hash)]
    tables += [t for t in [parts_identity(output, extra_parts)] if t is not None]
    return not_transient(pa.concat_tables(tables)) if tables else None


def read_current(output: str, table: str = "clips", settings_hash: str | None = None,
                 columns: list[str] | None = None) -> pa.Table:
    """The current row per clip (clips), or that row's windows (segments), sorted by clip_id (then
    segment_index); only `columns` if given.

    That is the Delta table OUTPUT/<table> (pipeline/store/delta.py). Results of other settings
    (`settings_hash` not the table's) come from the run manifests: the latest committed row per clip
    among runs with those settings, so results of different settings are never mixed.
    """
    dt = delta.open_table(output, "clips")
    if dt is not None and settings_hash in (None, delta.table_settings(dt)):
        keys = ["clip_id"] + (["segment_index"] if table == "segments" else [])
        read = None if columns is None else list(columns) + [k for k in keys if k not in columns]
        rows = delta.read_table(output, table, read)
        if rows is None:
            raise LookupError(f"no current {table} rows under {output}")
        rows = rows.sort_by([(k, "ascending") for k in keys])
        return rows if columns is None else rows.select(columns)
    commits = read_commits(output)
    if not commits:
        raise FileNotFoundError(f"no committed runs under {output}")
    settings_hash = settings_hash or commits[-1]["settings_hash"]
    commits = [c for c in commits if c["settings_hash"] == settings_hash]
    fs, _ = _root(output)
    ranked = []
    for rank, c in enumerate(commits):  # a part's rank is that of the commit that vouches for it
        part = _read_parts(fs, _committed_paths(output, [c], "clips"))
        if part is not None:
            ranked.append(part.append_column("_rank", pa.array(np.full(len(part), rank))))
    if not ranked:
        raise LookupError(f"no committed clip rows with settings {settings_hash} under {output}")
    clips = pa.concat_tables(ranked).sort_by([("clip_id", "ascending"), ("_rank", "descending")])
    ids = clips.column("clip_id").to_numpy(zero_copy_only=False)
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    current = clips.filter(pa.array(first)).drop_columns(["_rank"])
    if table == "clips":
        return current.select(columns) if columns else current
    segments = _read_parts(fs, _committed_paths(output, commits, "segments"))
    if segments is None:
        raise LookupError(f"no committed segment rows with settings {settings_hash} under {output}")
    keys = pc.binary_join_element_wise(current.column("clip_id"), current.column("run_id"), "/")
    seg_keys = pc.binary_join_element_wise(segments.column("clip_id"), segments.column("run_id"), "/")
    segments = segments.filter(pc.is_in(seg_keys, keys))
    segments = segments.sort_by([("clip_id", "ascending"), ("segment_index", "ascending")])
    return segments.select(columns) if columns else segments
