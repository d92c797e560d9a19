"""The index's AST label scores, stored label-major, so a label filter reads one label, not all of them.

    {table}-{gen}-s{i}.arrow     Arrow IPC: one float32 column per label (named by its index), one record
                                 batch per batch of index rows, rows in index order; shards like the
                                 vector shards (an update appends one, older ones are kept)

A filter on one label reads that column's buffers only (IpcReadOptions.included_fields: positional reads
of a local file, ranged reads of one on object storage): 4 B a row, 40 MB at 10M windows, against the
2.1 KB a row (21 GB) of reading every row's 527 scores. Not a memory map: a page fault reads ahead
(8 MB here), which read 25x the column's bytes. Scores stay float32, so a filter is exact.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from pipeline.arrow import to_matrix


def label_schema(num_labels: int) -> pa.Schema:
    return pa.schema([pa.field(str(j), pa.float32(), nullable=False) for j in range(num_labels)])


class ScoreShardWriter:
    """Writes one score shard from the index rows' `scores` columns (fixed_size_list<float32, labels>)."""

    def __init__(self, path: str, num_labels: int):
        self.path, self.rows = path, 0
        self.schema = label_schema(num_labels)
        self._sink = pa.OSFile(path, "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)

    def write(self, scores: pa.ChunkedArray | pa.Array) -> None:
        matrix = to_matrix(scores)                                              # (rows, labels)
        if matrix.shape[1] != len(self.schema):
            raise ValueError(f"{matrix.shape[1]} scores a row, the shard has {len(self.schema)} labels")
        columns = np.ascontiguousarray(matrix.T)                                # (labels, rows): one copy
        self._writer.write_batch(pa.RecordBatch.from_arrays([pa.array(c) for c in columns], schema=self.schema))
        self.rows += len(matrix)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


def read_label(sources: list, label: int) -> np.ndarray:
    """One label's score for every row, in index order, from the shards' files (local paths, or open
    binary file objects with seek: ranged reads)."""
    options = pa.ipc.IpcReadOptions(included_fields=[label], use_threads=False)
    parts = []
    for source in sources:
        handle = pa.OSFile(str(source)) if isinstance(source, (str, os.PathLike)) else pa.PythonFile(source, "r")
        with handle:
            reader = pa.ipc.open_file(handle, options=options)
            for i in range(reader.num_record_batches):
                column = reader.get_batch(i).column(0)
                parts.append(column.to_numpy(zero_copy_only=False))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
