"""Schemas of the tagging job's two tables, `clips` and `segments` (version 3).

Embedding and score widths depend on the checkpoints, so the schemas are built from those widths. The
declared schemas (`clips_schema`, `segments_schema`) are what the stages build and what our readers
return: the vector columns `scores`, `ast_embedding` and `clap_embedding` are `fixed_size_list<float32,
width>`. Delta's schema has no fixed-size array, so the data files store them as plain `list<float32>`
(`stored_schema`), each with its width in the field's metadata (`WIDTH_KEY`): the files then have the
types the Delta log declares, which every Delta reader needs (Polars refuses a mismatch; deltalake under
pyarrow 25 fails on null rows; tests/test_readers.py), and `fixed_width` casts what our readers read
back to the declared types.

`validate_table` is the explicit write-time check: pyarrow's own casting silently drops unknown columns
and ignores `nullable=False`. A vector column passes in either form, as long as every value has the
declared width.

Versions: 2 added `clips.warning`; 3 stores the vector columns as `list<float32>` (was
`fixed_size_list<float32, width>` in the files), width in the field metadata.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = "3"  # 2: clips.warning; 3: vector columns stored as list<float32>

WIDTH_KEY = b"audio_tagging.width"  # field metadata of a stored vector column: its width, in values

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


def vector_widths(schema: pa.Schema) -> dict[str, int]:
    """{column: width} of the fixed-width vector columns, from a declared or a stored schema."""
    widths = {}
    for field in schema:
        if pa.types.is_fixed_size_list(field.type):
            widths[field.name] = field.type.list_size
        elif field.metadata and WIDTH_KEY in field.metadata:
            widths[field.name] = int(field.metadata[WIDTH_KEY])
    return widths


def stored_schema(schema: pa.Schema) -> pa.Schema:
    """The data files' schema for a declared schema: vector columns as list<float32>, width in metadata."""
    fields = []
    for field in schema:
        if pa.types.is_fixed_size_list(field.type):
            metadata = {**(field.metadata or {}), WIDTH_KEY: str(field.type.list_size).encode()}
            field = pa.field(field.name, pa.list_(field.type.value_field), field.nullable, metadata)
        fields.append(field)
    return pa.schema(fields, metadata=schema.metadata)


VECTOR_COLUMNS = ("scores", "ast_embedding", "clap_embedding")


def fixed_width(data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """`data` as read from the data files, with its stored vector columns cast back to the declared
    fixed_size_list<float32, width> (the one place readers do it). The width comes from the field's
    metadata, or, for files another Delta writer rewrote (a user's DELETE: no field metadata), from the
    values when they all have one length. Files of schema version 2 (fixed-size lists) pass as they are."""
    fields, cast = [], False
    for field in data.schema:
        width = _stored_width(field, data.column(field.name))
        if width is not None:
            metadata = {k: v for k, v in (field.metadata or {}).items() if k != WIDTH_KEY} or None
            field, cast = pa.field(field.name, pa.list_(field.type.value_type, width), field.nullable, metadata), True
        fields.append(field)
    return data.cast(pa.schema(fields, metadata=data.schema.metadata)) if cast else data


def _stored_width(field: pa.Field, column) -> int | None:
    """The width of a stored (list) vector column, None for any other column."""
    if not pa.types.is_list(field.type) and not pa.types.is_large_list(field.type):
        return None
    if field.metadata and WIDTH_KEY in field.metadata:
        return int(field.metadata[WIDTH_KEY])
    if field.name not in VECTOR_COLUMNS:
        return None
    lengths = pc.unique(pc.drop_null(pc.list_value_length(column)))
    return lengths[0].as_py() if len(lengths) == 1 else None


def validate_table(table: pa.Table, schema: pa.Schema) -> None:
    """Raise SchemaError unless `table` has exactly `schema`'s columns, types and non-null fields. A vector
    column may be the declared fixed_size_list or a list<float32> whose every value has the width."""
    if table.schema.names != schema.names:
        raise SchemaError(f"columns {table.schema.names} != declared {schema.names}")
    widths = vector_widths(schema)
    for field in schema:
        column = table.column(field.name)
        if field.name in widths:
            _validate_vector(field, column, widths[field.name])
        elif column.type != field.type:
            raise SchemaError(f"column {field.name!r} has type {column.type}, declared {field.type}")
        if not field.nullable and column.null_count:
            raise SchemaError(f"column {field.name!r} is declared non-null but has {column.null_count} nulls")
    if "status" in schema.names:
        _validate_status(table)


def _validate_vector(field: pa.Field, column: pa.ChunkedArray, width: int) -> None:
    """The declared fixed_size_list, or a list of the same values whose every non-null entry has `width`."""
    declared = pa.list_(field.type.value_type, width)
    if column.type == declared:
        return
    if not (pa.types.is_list(column.type) and column.type.value_type == declared.value_type):
        raise SchemaError(f"column {field.name!r} has type {column.type}, declared {declared}")
    lengths = pc.drop_null(pc.list_value_length(column))
    if len(lengths) and not pc.all(pc.equal(lengths, width)).as_py():
        found = sorted(set(pc.unique(lengths).to_pylist()) - {width})
        raise SchemaError(f"column {field.name!r} has values of {found[0]} elements, declared width {width}")


def _validate_status(table: pa.Table) -> None:
    status = table.column("status")
    if not pc.all(pc.is_in(status, pa.array(["ok", "error"]))).as_py() and len(table):
        raise SchemaError("status must be 'ok' or 'error'")
    is_ok = pc.equal(status, "ok")
    if pc.any(pc.and_(is_ok, pc.is_valid(table.column("error")))).as_py():
        raise SchemaError("an ok row carries an error reason")
    if pc.any(pc.and_(pc.invert(is_ok), pc.is_null(table.column("error")))).as_py():
        raise SchemaError("an error row has no reason")
    for name in VECTOR_COLUMNS:
        if pc.any(pc.and_(is_ok, pc.is_null(table.column(name)))).as_py():
            raise SchemaError(f"an ok row has no {name}")
