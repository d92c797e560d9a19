"""Float16 vector shards (pipeline.retrieval.vectors): FAISS reads the streamed file as its own index, gathers and
blocks return the stored rows, and exact search (FAISS fp16 scan, and BLAS for batches) equals numpy."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline.retrieval.vectors import VectorStore, write_shard


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5_000, 32)).astype(np.float32)
    root = tmp_path_factory.mktemp("vectors")
    shards = [(str(root / "a.faiss"), write_shard(str(root / "a.faiss"), [rows[:1000], rows[1000:3001]], 32)),
              (str(root / "b.faiss"), write_shard(str(root / "b.faiss"), iter([rows[3001:]]), 32))]
    return VectorStore(shards, 32), rows.astype(np.float16).astype(np.float32)


def test_shard_is_a_faiss_fp16_index(store):
    vectors, stored = store
    index = faiss.read_index(vectors.path(0), faiss.IO_FLAG_MMAP_IFC)
    assert (index.ntotal, index.d) == (3001, 32)
    np.testing.assert_array_equal(index.reconstruct_n(0, 3001), stored[:3001])


def test_get_and_blocks_return_the_stored_rows(store):
    vectors, stored = store
    assert len(vectors) == 5_000
    rows = [4999, 0, 3001, 3000, 17, 3000]
    np.testing.assert_array_equal(vectors.get(rows), stored[rows])  # read row by row
    many = np.random.default_rng(1).integers(0, 3001, VectorStore.PREAD_ROWS + 1)
    np.testing.assert_array_equal(vectors.get(many), stored[many])  # a larger gather maps the shard
    seen = list(vectors.blocks(700, first_row=2500))
    assert [start for start, _ in seen][:3] == [2500, 3001, 3701] and seen[0][1].shape == (501, 32)
    np.testing.assert_array_equal(np.concatenate([b for _, b in seen]), stored[2500:])


@pytest.mark.parametrize("queries", [1, 3, VectorStore.BATCH_QUERIES + 4])  # FAISS scan and BLAS paths
def test_exact_search_equals_numpy(store, queries):
    vectors, stored = store
    rng = np.random.default_rng(queries)
    q = rng.standard_normal((queries, 32)).astype(np.float32)
    mask = rng.random(5_000) < 0.2
    for keep in (None, mask):
        scores, rows = vectors.search(q, 7, keep)
        full = q @ stored.T
        if keep is not None:
            full[:, ~keep] = -np.inf
        expected = np.argsort(-full, axis=1, kind="stable")[:, :7]
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), atol=1e-4)
    few = np.zeros(5_000, bool)
    few[[5, 4000]] = True
    scores, rows = vectors.search(q, 4, few)  # fewer matches than k: padded with -1 / -inf
    assert set(rows[0, :2]) == {5, 4000} and (rows[:, 2:] == -1).all() and np.isinf(scores[:, 2:]).all()
