"""The skip check's compact done set: the same answer as an Arrow `is_in` anti-join on the identity
string, in 16 bytes per done file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.store.ledger import IDENTITY
from pipeline.tagging.keyset import KeySet
from pipeline.tagging.skip import DoneSet, identity_key
from pipeline.tagging.sources import FILE_SCHEMA


def arrow_anti_join(listed: pa.Table, done: pa.Table) -> pa.Table:
    """The skip check before DoneSet (pipeline/job.py at cd50b72): `is_in` on one composite string key."""
    return listed.filter(pc.invert(pc.is_in(identity_key(listed), value_set=identity_key(done))))


def random_listing(rng: np.random.Generator, n: int) -> pa.Table:
    """Rows drawn from few values, so identities repeat and differ in one column at a time; ~1/3 nulls."""
    def maybe_null(values):
        return [None if rng.random() < 0.33 else v for v in values]
    return pa.Table.from_pylist([
        {"clip_id": f"c{rng.integers(40)}", "uri": "u", "size_bytes": maybe_null([int(rng.integers(3))])[0],
         "modified": maybe_null([f"m{rng.integers(3)}"])[0], "etag": maybe_null([f"e{rng.integers(3)}"])[0]}
        for _ in range(n)], schema=FILE_SCHEMA)


@pytest.mark.parametrize("seed", range(5))
def test_done_set_equals_the_arrow_anti_join_on_random_tables_with_nulls(seed):
    rng = np.random.default_rng(seed)
    listed, done = random_listing(rng, 400), random_listing(rng, 300).select(IDENTITY)
    expected = arrow_anti_join(listed, done)
    assert 0 < len(expected) < len(listed)  # the draw really has both skipped and kept rows
    assert DoneSet(done).new_or_changed(listed).equals(expected)
    # built batch by batch (as read from storage), in small batches so its runs get merged
    batches = done.to_batches(max_chunksize=7)
    assert DoneSet(iter(batches)).new_or_changed(listed).equals(expected)


def test_null_matches_null_but_not_the_text_of_a_null():
    done = pa.Table.from_pylist([{"clip_id": "a", "size_bytes": 1, "modified": None, "etag": None}],
                                schema=pa.schema([FILE_SCHEMA.field(c) for c in IDENTITY]))
    listed = pa.Table.from_pylist([{"clip_id": "a", "size_bytes": 1, "modified": m, "etag": None}
                                   for m in (None, "", "None", "null")], schema=FILE_SCHEMA)
    assert DoneSet(done).new_or_changed(listed).column("modified").to_pylist() == ["", "None", "null"]


def test_done_set_holds_16_bytes_per_done_file_in_numpy_arrays():
    n = 10_000
    done = pa.table({"clip_id": [f"{i:020x}" for i in range(n)], "size_bytes": pa.array(range(n), pa.int64()),
                     "modified": ["2026-11-01T00:00:00+00:00"] * n, "etag": pa.nulls(n, pa.string())})
    done_set = DoneSet(done.to_batches(max_chunksize=1000))
    assert len(done_set) == n and done_set.keys.nbytes == 16 * n
    assert all(isinstance(a, np.ndarray) and a.dtype == np.uint64 for run in done_set.keys._runs for a in run)
    assert len(done_set.keys._runs) <= 4  # merged as it grew, not one run per batch


def test_key_set_tells_apart_keys_that_share_their_high_half():
    keys = KeySet()
    keys.add(np.array([5, 5, 9, 5], np.uint64), np.array([1, 2, 1, 3], np.uint64))
    keys.add(np.array([5, 7], np.uint64), np.array([4, 1], np.uint64))
    found = keys.contains(np.array([5, 5, 5, 5, 9, 9, 7, 1], np.uint64), np.array([1, 3, 4, 6, 1, 2, 1, 1], np.uint64))
    assert found.tolist() == [True, True, True, False, True, False, True, False]
