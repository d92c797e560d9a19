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


def blobs_from_rows(rows: np.ndarray, valid: np.ndarray) -> pa.BinaryArray:
    """Binary column whose valid entries are the rows of `rows` (one per True in `valid`, in order) as
    float32 buffers, and whose other entries are null. Zero-copy: the column's data buffer is `rows`."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    if len(rows) != int(valid.sum()):
        raise ValueError(f"{len(rows)} feature rows for {int(valid.sum())} valid entries")
    width = rows[0].nbytes if len(rows) else 0
    if rows.nbytes >= 2**31:  # binary offsets are int32
        raise ValueError(f"{rows.nbytes} bytes of features in one column chunk; the limit is 2 GiB")
    offsets = np.zeros(len(valid) + 1, dtype=np.int32)
    np.cumsum(valid * width, out=offsets[1:])
    mask = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.binary(), len(valid), [mask, pa.py_buffer(offsets), pa.py_buffer(rows)],
                                 null_count=int((~valid).sum()))


def blobs_from_buffer(values: np.ndarray, ends: np.ndarray, valid: np.ndarray) -> pa.BinaryArray:
    """Binary column of float32 slices of `values` lying back to back: entry i ends at `ends[i]` values
    (non-decreasing; an entry where `valid` is False is null and empty). Zero-copy: the data buffer is `values`."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    if values.nbytes >= 2**31:  # binary offsets are int32
        raise ValueError(f"{values.nbytes} bytes in one column chunk; the limit is 2 GiB")
    offsets = np.zeros(len(valid) + 1, dtype=np.int32)
    offsets[1:] = 4 * np.asarray(ends, np.int64)
    mask = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.binary(), len(valid), [mask, pa.py_buffer(offsets), pa.py_buffer(values)],
                                 null_count=int((~valid).sum()))


def blobs_to_padded(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Binary column of float32 buffers of any lengths (all non-null) -> (rows, longest) float32 array,
    each row zero-padded; read in place, without a copy, when they lie back to back and are equally long."""
    chunks = [c for c in (column.chunks if isinstance(column, pa.ChunkedArray) else [column]) if len(c)]
    sizes = [np.diff(np.frombuffer(c.buffers()[1], np.int32)[c.offset:c.offset + len(c) + 1]) for c in chunks]
    if any(c.null_count for c in chunks):
        raise ValueError("waveform column has null entries")
    if len(chunks) == 1 and (sizes[0] == sizes[0][0]).all():
        return blobs_to_array(chunks[0], (-1,))
    rows = sum(len(c) for c in chunks)
    out = np.zeros((rows, max((int(s.max()) for s in sizes), default=0) // 4), np.float32)
    i = 0
    for chunk in chunks:
        for value in chunk:
            row = np.frombuffer(value.as_buffer(), np.float32)
            out[i, :len(row)] = row
            i += 1
    return out


def blobs_to_array(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """Binary column of float32 buffers (all non-null, each of `shape`; one -1 in `shape`: inferred from the
    first buffer) -> (rows, *shape) float32 array.

    A chunk whose buffers lie back to back (what `blobs_from_rows` builds, after Ray's transport) is
    read in place, read-only; only several chunks are concatenated (one copy)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if -1 in shape:  # one dimension from the buffers' size
        first = next((c for c in chunks if len(c)), None)
        known = -int(np.prod(shape))
        if first is None:
            shape = tuple(0 if d == -1 else d for d in shape)
        else:
            width = np.frombuffer(first.buffers()[1], np.int32)[first.offset:first.offset + 2]
            shape = tuple(int(width[1] - width[0]) // 4 // known if d == -1 else d for d in shape)
    size = int(np.prod(shape)) * 4
    parts = []
    for chunk in chunks:
        if not len(chunk):
            continue
        if chunk.null_count:
            raise ValueError("feature column has null entries")
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        if not (np.diff(offsets) == size).all():
            raise ValueError(f"feature buffers are not all {size} bytes")
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        parts.append(data.view(np.float32).reshape((len(chunk),) + tuple(shape)))
    if not parts:
        return np.zeros((0,) + tuple(shape), np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def where(column: pa.ChunkedArray, ok: np.ndarray) -> pa.ChunkedArray:
    """The rows of `column` where `ok`; the column itself (no copy) when every row is."""
    return column if ok.all() else column.filter(pa.array(ok))
