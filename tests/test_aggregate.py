"""Aggregation of window rows into clip rows: a clip is complete when every segment_index has arrived,
once; a repeated window (a retried task) is neither counted nor written twice."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.tagging.aggregate import FILE_COLUMNS, ClipAggregator
from pipeline.arrow import fixed_list

LABELS = ["a", "b", "c"]


def _windows(clip: str, indices: list[int], num_segments: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Window rows of one ok file (as they leave the CLAP actors) and their CLAP embeddings."""
    rng = np.random.default_rng(seed)
    n = len(indices)
    clap = rng.standard_normal((n, 2)).astype(np.float32)
    meta = {c: [None] * n for c in FILE_COLUMNS}
    meta.update(clip_id=[clip] * n, uri=[f"/{clip}.wav"] * n, num_segments=[num_segments] * n,
                duration_s=[10.0 * num_segments] * n)
    table = pa.table({**meta, "status": ["ok"] * n, "error": pa.nulls(n, pa.string()),
                      "error_detail": pa.nulls(n, pa.string()),
                      "segment_index": pa.array(indices, pa.int32()),
                      "start_s": [10.0 * i for i in indices], "end_s": [10.0 * i + 10 for i in indices],
                      "scores": fixed_list(rng.random((n, 3))), "ast_embedding": fixed_list(rng.random((n, 4))),
                      "clap_embedding": fixed_list(clap)})
    return table, clap


def test_a_repeated_window_does_not_complete_a_clip_early_or_skew_its_mean():
    agg = ClipAggregator(LABELS, top_k=2, run_id="r")
    first, clap_first = _windows("x", [0, 0], 3, seed=1)  # window 0 twice, e.g. a retried task
    segments, clips = agg.add(first)
    assert clips == [] and agg.pending == 1, "two copies of window 0 are not two of three windows"
    assert segments.column("segment_index").to_pylist() == [0]
    rest, clap_rest = _windows("x", [2, 1, 2], 3, seed=2)
    segments, clips = agg.add(rest)
    assert segments.column("segment_index").to_pylist() == [2, 1]
    assert len(clips) == 1 and clips[0]["num_segments"] == 3 and agg.pending == 0
    mean = (clap_first[0] + clap_rest[0] + clap_rest[1]).astype(np.float64) / 3
    np.testing.assert_allclose(clips[0]["clap_embedding"], mean / np.linalg.norm(mean), rtol=1e-6)

    late, _ = _windows("x", [1], 3, seed=3)  # a copy arriving after the clip was written
    segments, clips = agg.add(late)
    assert (len(segments), clips, agg.pending) == (0, [], 0)


def test_error_rows_give_one_clip_row_each():
    agg = ClipAggregator(LABELS, top_k=2, run_id="r")
    meta = {c: [None, None] for c in FILE_COLUMNS}
    meta.update(clip_id=["e", "e"], uri=["/e.wav", "/e.wav"], num_segments=[0, 0])
    rows = pa.table({**meta, "status": ["error"] * 2, "error": ["empty file"] * 2,
                     "error_detail": pa.nulls(2, pa.string()), "segment_index": pa.nulls(2, pa.int32()),
                     "start_s": pa.nulls(2, pa.float64()), "end_s": pa.nulls(2, pa.float64()),
                     "scores": fixed_list(np.zeros((2, 3)), [False, False]),
                     "ast_embedding": fixed_list(np.zeros((2, 4)), [False, False]),
                     "clap_embedding": fixed_list(np.zeros((2, 2)), [False, False])})
    _, clips = agg.add(rows)
    assert [(c["clip_id"], c["status"], c["error"]) for c in clips] == [("e", "error", "empty file")]
