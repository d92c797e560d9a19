"""The rows an index holds, read from the tagging output's current tables: clips whose status is ok and
the windows of the current clips, streamed in batches, with their keys and the run's metadata."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.arrow import to_matrix
from pipeline.store import delta
from pipeline.store.ledger import read_current
from pipeline.store.writer import METADATA_KEY

TABLES = ("clips", "segments")
COLUMNS = {
    "clips": ["clip_id", "uri", "duration_s", "run_id", "scores", "clap_embedding"],
    "segments": ["clip_id", "uri", "segment_index", "start_s", "end_s", "run_id", "scores", "clap_embedding"],
}


def current_batches(output: str, table: str, settings_hash: str, columns: list[str],
                    batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The current rows of `table` with `settings_hash`, only `columns`, in batches: streamed from the
    Delta table when it holds these settings (the driver holds one batch at a time); results of other
    settings (Delta time travel) are read whole."""
    dt = delta.open_table(output, "clips")
    if dt is not None and delta.table_settings(dt) == settings_hash:
        yield from delta.iter_batches(output, table, columns, batch_rows)
    else:
        yield from read_current(output, table, settings_hash, columns=columns).to_batches(batch_rows)


def ok_clips(output: str, settings_hash: str) -> pa.Table:
    """clip_id, run_id and duration_s of the current clips whose status is ok (~60 B a file)."""
    parts = list(index_rows(output, "clips", settings_hash, None, ["clip_id", "run_id", "duration_s"]))
    return pa.concat_tables(parts) if parts else pa.table({
        "clip_id": pa.array([], pa.string()), "run_id": pa.array([], pa.string()),
        "duration_s": pa.array([], pa.float64())})


def index_rows(output: str, table: str, settings_hash: str, ok: pa.Table | None,
               columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows an index table holds, as tables of COLUMNS[table] (or `columns` of them) + duration_s for
    segments (from `ok`, see `ok_clips`): clips whose status is ok, and the windows of those clip rows
    (joined on clip_id and run_id: windows a half-committed shard added before its clip rows, which the
    next run's recovery commits or replaces, are left out until then)."""
    full, columns = columns is None, columns or COLUMNS[table]
    wanted = columns + (["status"] if table == "clips" else [c for c in ("clip_id", "run_id") if c not in columns])
    ok_keys = row_keys(ok) if table == "segments" else None
    for batch in current_batches(output, table, settings_hash, wanted):
        rows = pa.Table.from_batches([batch])
        if table == "clips":
            rows = rows.filter(pc.equal(rows.column("status"), "ok")).select(columns)
        else:
            where = pc.index_in(row_keys(rows), value_set=ok_keys)
            rows = rows.filter(pc.is_valid(where))
            if full:
                rows = rows.append_column("duration_s", ok.column("duration_s").take(where.filter(pc.is_valid(where))))
            rows = rows.select(columns + (["duration_s"] if full else []))
        if len(rows):
            yield rows


def row_keys(rows: pa.Table) -> pa.Array:
    """(clip_id, run_id) of each row as one string: a row of the index is a clip's result of one run."""
    return pc.binary_join_element_wise(rows.column("clip_id"), rows.column("run_id"), "\x1f").combine_chunks()


def index_parts(rows: Iterable[pa.Table], known: pa.Array | None = None) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(metadata with live = True, embeddings) of index rows; with `known` keys, only the rows not among them."""
    for part in rows:
        if known is not None:
            part = part.filter(pc.invert(pc.is_in(row_keys(part), value_set=known)))
            if not len(part):
                continue
        vectors = to_matrix(part.column("clap_embedding"))
        meta = part.drop_columns(["clap_embedding"]).append_column("live", pa.array(np.ones(len(part), bool)))
        yield meta, vectors


def data_metadata(output: str, clips) -> dict:
    """The run metadata stored in a data file of the current clips table."""
    fs, _ = fsspec.core.url_to_fs(output)
    with fs.open(delta.data_files(output, "clips", clips)[0], "rb") as f:
        return json.loads(pq.read_schema(f).metadata[METADATA_KEY])


def meta_schema(output: str, table: str, settings: str, ok: pa.Table, first: pa.Table | None) -> pa.Schema:
    """The schema of a table's row metadata file (its index rows less the embedding, plus `live`)."""
    if first is None:  # no rows: the columns' types from the (empty) current table
        first = read_current(output, table, settings, columns=COLUMNS[table])
        if table == "segments":
            first = first.append_column("duration_s", pa.array([], pa.float64()))
    return first.schema.remove(first.schema.get_field_index("clap_embedding")).append(pa.field("live", pa.bool_()))


def ast_labels(meta: dict) -> list[str]:
    from pipeline.checkpoints import label_names

    return label_names(meta["models"]["ast"]["source"])
