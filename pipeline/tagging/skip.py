"""The incremental skip check: which listed files are new or changed since a run with the same settings.

A file is done when its identity (commits.IDENTITY: clip_id, size_bytes, modified, etag) is that of a
clip row already produced. The done identities are kept as a compact set of 128-bit hashes (16 bytes
per done file, in numpy arrays), built batch by batch, so a listing streamed in chunks is checked
chunk by chunk without the done table, a Python set or an Arrow hash table of strings in memory.

Collisions: a listed file is wrongly skipped only if its changed identity hashes to the same 128 bits
as a done one. With n done and m listed identities that has probability below n * m / 2^128: ~3e-23
for 10^8 of each (64 bits would give ~5e-4 there, one wrongly skipped file in a few thousand such runs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.store.ledger import IDENTITY
from pipeline.tagging.keyset import KeySet, split_digests

NULL = "\x00"  # stands for a null value in the identity key: no value contains it, so a null matches a null
SEPARATOR = "\x1f"


class DoneSet:
    """The identities of done files, as 128-bit hashes (`keys`, 16 bytes each)."""

    def __init__(self, done: pa.Table | Iterable[pa.Table] | None = None):
        """From a table of IDENTITY columns, or an iterator of such tables (record batches read from
        storage one at a time), or nothing."""
        self.keys = KeySet()
        if done is None:
            return
        for table in [done] if isinstance(done, (pa.Table, pa.RecordBatch)) else done:
            self.add(table)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, done: pa.Table | pa.RecordBatch) -> None:
        self.keys.add(*identity_hashes(done))

    def new_or_changed(self, listed: pa.Table) -> pa.Table:
        """The rows of `listed` whose identity is not done, in their order."""
        if not len(listed) or not len(self.keys):
            return listed
        return listed.filter(pa.array(~self.keys.contains(*identity_hashes(listed))))


def identity_hashes(table: pa.Table | pa.RecordBatch, slice_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """128-bit BLAKE2b hash of each row's identity key, as (hi, lo) uint64 arrays. The keys become
    Python strings `slice_rows` at a time, never all at once."""
    digests = bytearray()
    for start in range(0, len(table), slice_rows):
        key = identity_key(table.slice(start, slice_rows))
        digests += b"".join(hashlib.blake2b(k, digest_size=16).digest() for k in key.cast(pa.binary()).to_pylist())
    return split_digests(bytes(digests))


def identity_key(table: pa.Table | pa.RecordBatch) -> pa.Array:
    """IDENTITY columns joined into one string per row; a null becomes NULL, so a file without an etag
    (local files) still matches its own done row."""
    columns = [pc.cast(table.column(c), pa.string()) for c in IDENTITY]
    key = pc.binary_join_element_wise(*columns, SEPARATOR, null_handling="replace", null_replacement=NULL)
    return key.combine_chunks() if isinstance(key, pa.ChunkedArray) else key
