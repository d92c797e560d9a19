"""Parquet schemas of the tagging job's two tables, `clips` and `segments` (version 2).

Embedding and score widths depend on the checkpoints, so the schemas are built from those widths.
`validate_table` is the explicit write-time check: pyarrow's own casting silently drops unknown columns
and ignores `nullable=False`.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = "2"  # 2: clips.warning

LABEL_TYPE = pa.list_(pa.struct([pa.field("label", pa.string(), nullable=False),
                                 pa.field("score", pa.float32(), nullable=False)]))


class SchemaError(ValueError):
    """A table does not match its declared schema; raised before anything is written."""


def _embedding(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def clips_schema(num_labels: int, ast_dim: int, clap_dim: int) -> pa.Schema:
    """One row per input file. Times in seconds, rates in Hz, sizes in bytes."""
    return pa.schema([
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),          # "ok" or "error"
        pa.field("error", pa.string()),                            # reason, null when ok
        pa.field("warning", pa.string()),                          # ok but flawed: "reason: detail"
        pa.field("size_bytes", pa.int64()),
        pa.field("modified", pa.string()),                         # ISO-8601 UTC, from storage
        pa.field("etag", pa.string()),
        pa.field("duration_s", pa.float64()),
        pa.field("sample_rate", pa.int32()),                       # of the source file
        pa.field("channels", pa.int32()),                          # of the source file
        pa.field("decoder", pa.string()),                          # "soundfile" or "pyav"
        pa.field("num_segments", pa.int32(), nullable=False),
        pa.field("labels", LABEL_TYPE),                            # top-k by score, descending
        pa.field("zero_shot", LABEL_TYPE),                         # top-k of --zero-shot labels (softmax)
        pa.field("scores", _embedding(num_labels)),                # sigmoid, max over windows
        pa.field("ast_embedding", _embedding(ast_dim)),            # mean of window pooled outputs
        pa.field("clap_embedding", _embedding(clap_dim)),          # L2-normalised mean of windows
        pa.field("run_id", pa.string(), nullable=False),
    ])


def segments_schema(num_labels: int, ast_dim: int, clap_dim: int) -> pa.Schema:
    """One row per analysis window of an ok file; [start_s, end_s) is the CLAP window in seconds."""
    return pa.schema([
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("segment_index", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("labels", LABEL_TYPE, nullable=False),
        pa.field("scores", _embedding(num_labels), nullable=False),
        pa.field("ast_embedding", _embedding(ast_dim), nullable=False),
        pa.field("clap_embedding", _embedding(clap_dim), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ])


def validate_table(table: pa.Table, schema: pa.Schema) -> None:
    """Raise SchemaError unless `table` has exactly `schema`'s columns, types and non-null fields."""
    if table.schema.names != schema.names:
        raise SchemaError(f"columns {table.schema.names} != declared {schema.names}")
    for field in schema:
        column = table.column(field.name)
        if column.type != field.type:
            raise SchemaError(f"column {field.name!r} has type {column.type}, declared {field.type}")
        if not field.nullable and column.null_count:
            raise SchemaError(f"column {field.name!r} is declared non-null but has {column.null_count} nulls")
    if "status" in schema.names:
        _validate_status(table)


def _validate_status(table: pa.Table) -> None:
    status = table.column("status")
    if not pc.all(pc.is_in(status, pa.array(["ok", "error"]))).as_py() and len(table):
        raise SchemaError("status must be 'ok' or 'error'")
    is_ok = pc.equal(status, "ok")
    if pc.any(pc.and_(is_ok, pc.is_valid(table.column("error")))).as_py():
        raise SchemaError("an ok row carries an error reason")
    if pc.any(pc.and_(pc.invert(is_ok), pc.is_null(table.column("error")))).as_py():
        raise SchemaError("an error row has no reason")
    for name in ("scores", "ast_embedding", "clap_embedding"):
        if pc.any(pc.and_(is_ok, pc.is_null(table.column(name)))).as_py():
            raise SchemaError(f"an ok row has no {name}")
