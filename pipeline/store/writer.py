"""Stage 7, writing: validated Parquet part files under OUTPUT/<table>/<run_id>/.

Rows are buffered; a part file is written only when the caller flushes. Each part is written under a
name starting with "_" (which pyarrow, pandas and DuckDB's hive readers skip) and renamed when
complete, so a reader never sees a half-written file. The schema is checked before every write
(schemas.validate_table). The files store the vector columns as the Delta log declares them, plain
lists (schemas.stored_schema); their width is checked again on the table written. Writers of a batch
flush segments first (tagging/sink.py): a complete clips part never names a clip whose windows are still
only in memory (a crash between the two flushes leaves windows without a clip, which a rerun redoes,
never a clip without its windows).
"""

from __future__ import annotations

import json
import logging
import secrets

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import stored_schema, validate_table

log = logging.getLogger(__name__)

METADATA_KEY = b"audio_tagging"


class OutputError(OSError):
    """OUTPUT cannot be written (unwritable, full, gone): the job stops; nothing of the run is committed."""


class PartWriter:
    """Buffered, schema-checked writer of one table's part files for one run."""

    def __init__(self, output: str, table: str, run_id: str, schema: pa.Schema, metadata: dict,
                 rows_per_file: int = 20_000):
        self.fs, root = fsspec.core.url_to_fs(output)
        self.directory = f"{root.rstrip('/')}/{table}/{run_id}"
        self.schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        self.stored = stored_schema(self.schema)   # what the files hold: vector columns as lists
        self.rows_per_file = rows_per_file
        self.prefix = f"part-{secrets.token_hex(6)}"   # default names: unique per writer, never overwritten
        self.rows_written = 0
        self.flushes = 0                     # numbers the default names (`files` may be taken and reset)
        self.files: list[str] = []
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def write(self, table: pa.Table) -> None:
        """Buffer `table` (schema-checked now, in the declared or the stored form); it reaches storage at
        the next `flush`."""
        if len(table):
            validate_table(table, self.schema)
            self._buffer.append(table.cast(self.stored))
            self._buffered += len(table)

    @property
    def full(self) -> bool:
        """The buffer holds a part file's worth of rows."""
        return self._buffered >= self.rows_per_file

    def flush(self, name: str | None = None) -> None:
        """Write the buffered rows as one part file, named `name`.parquet (default PREFIX-NNNNN, PREFIX
        random per writer: the driver's writers of a run's shards share a folder)."""
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer).replace_schema_metadata(self.schema.metadata)
        validate_table(table, self.schema)   # the stored lists: every value still has the declared width
        final = write_part(self.fs, self.directory, f"{name or f'{self.prefix}-{self.flushes:05d}'}.parquet", table)
        self.files.append(final)
        self.flushes += 1
        self.rows_written += len(table)
        log.debug("wrote %d rows to %s", len(table), final)
        self._buffer, self._buffered = [], 0


def check_writable(output: str) -> None:
    """Fail at start, not after an hour of compute, if OUTPUT cannot be written."""
    fs, root = fsspec.core.url_to_fs(output)
    probe = f"{root.rstrip('/')}/_write_probe"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except OSError as e:
        raise OutputError(f"output location {output!r} is not writable: {e}") from e


def write_part(fs, directory: str, name: str, table: pa.Table) -> str:
    """Write `table` as the part file `directory`/`name` under a temporary name, then rename it: a part
    file that exists is complete. Returns its path; OutputError if it cannot be written."""
    final, temp = f"{directory}/{name}", f"{directory}/_tmp-{name}"
    try:
        fs.makedirs(directory, exist_ok=True)
        with fs.open(temp, "wb") as f:
            pq.write_table(table, f, compression="zstd", use_dictionary=dictionary_columns(table.schema))
        fs.mv(temp, final)
    except OSError as e:
        remove_quietly(fs, temp)
        raise OutputError(f"cannot write results to {directory}: {e}. The shard in flight is not committed "
                          "(earlier shards are); the next run processes its files again") from e
    return final


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Parquet leaf columns to dictionary-encode: all but the floats inside lists (scores, embeddings and
    the top-k labels' scores). Model outputs hardly ever repeat a value, so a dictionary only adds a hash
    of every value and a dictionary page: it made the parts 1.6x larger and their writes 2-4x slower
    (BENCHMARKS.md, "Part files without float dictionaries")."""
    def leaves(path: str, type_: pa.DataType, in_list: bool):
        if pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_):
            yield from leaves(f"{path}.list.element", type_.value_type, True)
        elif pa.types.is_struct(type_):
            for field in type_:
                yield from leaves(f"{path}.{field.name}", field.type, in_list)
        elif not (in_list and pa.types.is_floating(type_)):
            yield path

    return [leaf for field in schema for leaf in leaves(field.name, field.type, False)]


def remove_quietly(fs, path: str) -> None:
    """Best-effort removal of a temporary file after a failed write (it may not exist)."""
    try:
        fs.rm(path)
    except OSError:
        pass
