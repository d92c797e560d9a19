"""Small conversions between numpy matrices and Arrow fixed-size-list columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def fixed_list(matrix: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """(rows, width) float32 matrix -> fixed_size_list<float32, width>; rows where `valid` is False are null."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1], mask=mask)


def to_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float32, width> column -> (rows, width) float32 matrix (null rows hold zeros)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False)
    matrix = values[column.offset * width:(column.offset + len(column)) * width].reshape(len(column), width)
    if column.null_count:
        matrix = matrix.copy()
        matrix[~np.asarray(column.is_valid())] = 0.0
    return matrix


def blobs_to_array(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """Binary column of float32 buffers (all non-null) -> (rows, *shape) float32 array (a copy)."""
    return np.stack([np.frombuffer(b, dtype=np.float32).reshape(shape) for b in column.to_pylist()])
