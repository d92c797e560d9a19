"""Feature columns: contiguous float32 rows -> Arrow binary column (zero-copy) -> rows again, also after
the Arrow IPC round trip Ray's object store does."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.arrow import blobs_from_rows, blobs_to_array, where


def _ipc_round_trip(table: pa.Table) -> pa.Table:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def test_rows_round_trip_with_nulls_and_ipc():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, 4, 5)).astype(np.float32)
    valid = np.array([True, False, True, True, False])
    column = blobs_from_rows(rows, valid)
    assert column.type == pa.binary() and column.null_count == 2
    assert np.shares_memory(np.frombuffer(column.buffers()[2], np.float32), rows)  # built without a copy
    assert [v is None for v in column.to_pylist()] == [False, True, False, False, True]
    np.testing.assert_array_equal(np.frombuffer(column[2].as_py(), np.float32).reshape(4, 5), rows[1])
    table = _ipc_round_trip(pa.table({"ok": valid, "f": column}))
    back = blobs_to_array(where(table.column("f"), valid), (4, 5))
    np.testing.assert_array_equal(back, rows)
    sliced = blobs_to_array(pa.chunked_array([column.slice(2, 2), blobs_from_rows(rows[:1], [True])]), (4, 5))
    np.testing.assert_array_equal(sliced, np.concatenate([rows[1:3], rows[:1]]))


def test_wrong_sizes_and_nulls_are_refused():
    rows = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError):
        blobs_from_rows(rows, [True, True, True])
    with pytest.raises(ValueError):
        blobs_to_array(blobs_from_rows(rows, [True, False, True]), (3,))
    with pytest.raises(ValueError):
        blobs_to_array(blobs_from_rows(rows, [True, True]), (4,))
