"""Any Delta reader reads the job's current tables, with no code of ours (issue 24).

One real run over good and broken files (error rows: null vectors), then every reader a user may pick:
deltalake to pandas and to Arrow, Polars `read_delta` and `scan_delta`, DuckDB's `delta_scan` with the
delta extension from its registry package, and Daft where it is installed (daft 0.7 needs pyarrow<26,
so only `make test-lowest` has it). Each must see one row per file (per window in segments), the same
ids as `read_current`, and our vectors. `make test-lowest` runs this module on the lowest supported
pyarrow, where a data file that disagrees with the Delta schema breaks deltalake's reader.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipeline.retrieval.index import build_index
from pipeline.store import delta
from pipeline.store.ledger import read_current
from pipeline.tagging.job import TagJobConfig, run_tag_job
from schemas import WIDTH_KEY
from tests.audio import broken_files, encode, signal

REPO = Path(__file__).resolve().parents[1]
GOOD = {"short.wav": 1.0, "mid.wav": 2.5, "two_windows.wav": 14.0}   # seconds
BROKEN = ("empty.wav", "random_bytes.wav", "nan_samples.wav")
VECTORS = ("scores", "ast_embedding", "clap_embedding")
TABLES = ("clips", "segments")


@pytest.fixture(scope="module")
def output(checkpoints, local_ray, tmp_path_factory) -> Path:
    """OUTPUT of one real run over GOOD and BROKEN files."""
    root = tmp_path_factory.mktemp("readers")
    corpus, out = root / "in", root / "out"
    corpus.mkdir()
    for i, (name, seconds) in enumerate(GOOD.items()):
        (corpus / name).write_bytes(encode(signal(seconds, 16_000, seed=i), 16_000, "WAV", "PCM_16"))
    bad = broken_files()
    for name in BROKEN:
        (corpus / name).write_bytes(bad[name])
    summary = run_tag_job(TagJobConfig(input=str(corpus), output=str(out), ast_model=checkpoints["ast"],
                                       clap_model=checkpoints["clap"], run_id="readers"))
    assert (summary["ok"], summary["error"], summary["segments"]) == (len(GOOD), len(BROKEN), len(GOOD) + 1)
    return out


@pytest.fixture(scope="module")
def ours(output) -> dict[str, dict]:
    """{table: {key: row}} as our reader (read_current) returns them, vectors as float32 arrays."""
    return {table: {_key(row, table): row for row in _records(read_current(str(output), table).to_pylist())}
            for table in TABLES}


def readme_reading_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("### Reading the current table\n", 1)[1].split("\n## ", 1)[0]


def readme_block(info: str) -> str:
    """The README's code block whose info string is `info` (e.g. "sql current-clips")."""
    return readme_reading_section().split(f"```{info}\n", 1)[1].split("```", 1)[0]


def load_duckdb_delta() -> None:
    """Load DuckDB's real delta extension into the default connection, the way the README says (from
    the duckdb-extension-delta package: nothing is downloaded)."""
    exec(readme_block("python duckdb-delta"), {})


def _deltalake_pandas(uri: str) -> list[dict]:
    return DeltaTable(uri).to_pandas().to_dict("records")


def _deltalake_arrow(uri: str) -> list[dict]:
    return DeltaTable(uri).to_pyarrow_table().to_pylist()


def _polars_read(uri: str) -> list[dict]:
    import polars as pl

    return pl.read_delta(uri).to_dicts()


def _polars_scan(uri: str) -> list[dict]:
    import polars as pl

    return pl.scan_delta(uri).collect().to_dicts()


def _duckdb(uri: str) -> list[dict]:
    load_duckdb_delta()
    result = duckdb.sql(f"SELECT * FROM delta_scan('{uri}')")
    return [dict(zip(result.columns, row)) for row in result.fetchall()]


def _daft(uri: str) -> list[dict]:
    import daft

    columns = daft.read_deltalake(uri).to_pydict()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


READERS = {"deltalake-pandas": _deltalake_pandas, "deltalake-arrow": _deltalake_arrow,
           "polars-read_delta": _polars_read, "polars-scan_delta": _polars_scan, "duckdb-delta_scan": _duckdb,
           "daft": _daft}
NO_DAFT = pytest.mark.skipif(importlib.util.find_spec("daft") is None,
                             reason="daft 0.7 needs pyarrow<26: only `make test-lowest` installs it")


def _key(row: dict, table: str):
    return row["clip_id"] if table == "clips" else (row["clip_id"], row["segment_index"])


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _records(rows: list[dict]) -> list[dict]:
    """Rows with their vectors as float32 arrays (None for null), whatever container the reader used."""
    return [{**row, **{name: None if _is_null(row[name]) else np.asarray(row[name], np.float32)
                       for name in VECTORS}} for row in rows]


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("reader", [pytest.param(name, marks=NO_DAFT if name == "daft" else ())
                                    for name in READERS])
def test_every_delta_reader_sees_our_current_table(output, ours, reader, table):
    rows = _records(READERS[reader](str(output / table)))
    theirs = {_key(row, table): row for row in rows}
    assert len(theirs) == len(rows), "one row per file (per window in segments)"
    assert sorted(theirs) == sorted(ours[table])
    if table == "clips":
        assert sorted(Path(row["uri"]).name for row in rows) == sorted([*GOOD, *BROKEN])
    for key, mine in ours[table].items():
        row = theirs[key]
        assert row["run_id"] == mine["run_id"]
        if table == "clips":
            assert row["status"] == mine["status"], key
        for name in VECTORS:
            if mine[name] is None:
                assert row[name] is None, (key, name)
            else:
                assert row[name] is not None and len(row[name]) == len(mine[name]), (key, name)
                np.testing.assert_array_equal(row[name], mine[name], err_msg=f"{key} {name}")


def test_data_files_have_the_delta_schemas_types_and_our_readers_get_fixed_size_lists(output):
    for table in TABLES:
        logged = pa.schema(DeltaTable(str(output / table)).schema().to_arrow())
        widths = {}
        for path in delta.data_files(str(output), table):
            stored = pq.read_schema(path)
            for field in logged:   # list type equality ignores the item's name ("element" / "item")
                assert stored.field(field.name).type == field.type, (path, field.name)
            widths = {name: int(stored.field(name).metadata[WIDTH_KEY]) for name in VECTORS}
        current = read_current(str(output), table)
        batches = list(delta.iter_batches(str(output), table, list(VECTORS)))
        for name, width in widths.items():
            assert current.schema.field(name).type == pa.list_(pa.float32(), width)
            assert current.schema.field(name).metadata is None, "the width is in the type now"
            assert all(b.schema.field(name).type == pa.list_(pa.float32(), width) for b in batches)
    info = build_index(str(output))   # the index reads them through iter_batches / read_current
    assert info["rows"] == {"clips": len(GOOD), "segments": len(GOOD) + 1}
    assert info["dim"] == widths["clap_embedding"]


def test_readme_reading_section_runs_as_written(output, ours):
    namespace = {}
    for block in re.findall(r"```python[^\n]*\n(.*?)```", readme_reading_section(), re.S):
        exec(block.replace('"OUTPUT', f'"{output}'), namespace)
    assert sorted(namespace["clips"].clip_id) == sorted(ours["clips"])
    assert namespace["segments"].schema.field("clap_embedding").type.list_size > 0
    rows = duckdb.sql(readme_block("sql current-clips").replace("'OUTPUT", f"'{output}")).fetchall()
    assert [row[0] for row in rows] == sorted(ours["clips"])
