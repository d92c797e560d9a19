"""The workers' aggregate-and-write stage: whole files become part files on the worker; windows of files
split across batches and files handed back to the long-file lane go back to the driver; a retried batch
rewrites the same part instead of adding a copy."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tagging.aggregate import FILE_COLUMNS
from pipeline.arrow import fixed_list
from pipeline.audio.decode import LONG_FILE
from pipeline.tagging.sink import SINK_SCHEMA, Collector, SinkConfig, WriteResults, from_ipc
from pipeline.tagging.summary import RunSummary
from schemas import clips_schema, segments_schema
from tests.test_aggregate import LABELS, _windows


def _error_rows(clip: str, error: str) -> pa.Table:
    meta = {c: [None] for c in FILE_COLUMNS}
    meta.update(clip_id=[clip], uri=[f"/{clip}.wav"], num_segments=[0], size_bytes=[10])
    return pa.table({**meta, "status": ["error"], "error": [error], "error_detail": pa.nulls(1, pa.string()),
                     "segment_index": pa.nulls(1, pa.int32()), "start_s": pa.nulls(1, pa.float64()),
                     "end_s": pa.nulls(1, pa.float64()), "scores": fixed_list(np.zeros((1, 3)), [False]),
                     "ast_embedding": fixed_list(np.zeros((1, 4)), [False]),
                     "clap_embedding": fixed_list(np.zeros((1, 2)), [False])})


def _config(out) -> SinkConfig:
    return SinkConfig(str(out), "run1", tuple(LABELS), 2, segments_schema(3, 4, 2), clips_schema(3, 4, 2),
                      json.dumps({"settings_hash": "h"}))


def _batch() -> pa.Table:
    whole, _ = _windows("x", [0, 1], 2, seed=1)
    split, _ = _windows("y", [0], 2, seed=2)   # window 1 of y is in another batch
    tables = [whole, split, _error_rows("e", "empty file"), _error_rows("l", LONG_FILE)]
    return pa.concat_tables([t.select(whole.schema.names) for t in tables], promote_options="permissive")


def test_whole_files_are_written_on_the_worker_and_the_rest_goes_back(tmp_path):
    (row,) = WriteResults(_config(tmp_path))(_batch()).cast(SINK_SCHEMA).to_pylist()
    (seg_part,), (clip_part,) = row["segments_parts"], row["clips_parts"]
    clips = pq.read_table(clip_part).to_pydict()
    assert sorted(clips["clip_id"]) == ["e", "x"] and row["clip_rows"] == 2
    assert sorted(row["clip_ids"]) == ["e", "x"]
    segments = pq.read_table(seg_part).to_pydict()
    assert sorted(zip(segments["clip_id"], segments["segment_index"])) == [("x", 0), ("x", 1)]
    (piece_part,) = [p["part"] for p in row["pieces"] if p["clip_id"] == "y"]   # y's window: a part of its own
    assert pq.read_table(piece_part).select(["clip_id", "segment_index"]).to_pylist() == [
        {"clip_id": "y", "segment_index": 0}]
    assert json.loads(pq.read_schema(clip_part).metadata[b"audio_tagging"]) == {"settings_hash": "h"}
    counts = json.loads(row["counts"])
    assert (counts["ok"], counts["error"], counts["segments"], counts["errors_by_reason"]) == (1, 1, 2, {"empty file": 1})
    piece = from_ipc(row["leftover"])   # y's running state, not its windows
    assert piece.column("clip_id").to_pylist() == ["y"] and piece.column("seen").to_pylist() == [[0]]
    assert from_ipc(row["handed_back"]).column("clip_id").to_pylist() == ["l"]

    # y's other window arrives in another batch; the driver merges the two pieces into y's clip row,
    # equal to aggregating both windows in one place
    other, _ = _windows("y", [1], 2, seed=3)
    (row2,) = WriteResults(_config(tmp_path))(other).to_pylist()
    assert row2["clips_parts"] == [] and row2["segments_parts"] == [] and len(row2["pieces"]) == 1
    driver = _config(tmp_path).aggregator()
    assert driver.add_partials(piece) == [] and driver.pending == 1
    (merged,) = driver.add_partials(from_ipc(row2["leftover"]))
    whole = _config(tmp_path).aggregator()
    first, _ = _windows("y", [0], 2, seed=2)
    whole.add(first)
    (expected,) = whole.add(other)[1]
    for key in ("scores", "ast_embedding", "clap_embedding"):
        np.testing.assert_array_equal(merged[key], expected[key])
    assert merged["labels"] == expected["labels"] and merged["num_segments"] == 2
    assert driver.add_partials(from_ipc(row2["leftover"])) == [], "a repeated piece is dropped"


def test_a_retried_batch_rewrites_its_part_and_another_batch_gets_its_own(tmp_path):
    sink = WriteResults(_config(tmp_path))
    first = sink(_batch()).to_pylist()[0]
    again = sink(_batch()).to_pylist()[0]
    assert first["clips_parts"] == again["clips_parts"] and first["segments_parts"] == again["segments_parts"]
    assert len(list((tmp_path / "clips" / "run1").glob("part-*.parquet"))) == 1
    other, _ = _windows("z", [0], 1, seed=4)
    third = sink(other.select(_batch().schema.names)).to_pylist()[0]
    assert third["clips_parts"] != first["clips_parts"]
    assert len(list((tmp_path / "clips" / "run1").glob("part-*.parquet"))) == 2


def test_a_batch_of_split_windows_writes_their_segments_and_no_clip(tmp_path):
    split, _ = _windows("y", [0], 2, seed=2)
    (row,) = WriteResults(_config(tmp_path))(split).to_pylist()
    assert (row["clips_parts"], row["clip_rows"], row["segments_parts"], len(row["pieces"])) == ([], 0, [], 1)
    assert len(from_ipc(row["leftover"])) == 1 and not (tmp_path / "clips").exists()


def test_the_collector_hands_over_whole_files_only(tmp_path):
    """What the driver commits is whole: files whole in a batch at once; a split file's windows (its
    pieces) only with its clip row, once its last window arrived."""
    config = _config(tmp_path)
    collector = Collector(config, RunSummary("run1"))
    row = WriteResults(config)(_batch())
    collector.add(row)
    assert collector.ready == 2
    parts, ids = collector.take()
    assert sorted(ids.to_pylist()) == ["e", "x"]
    assert parts["segments"] == row.column("segments_parts")[0].as_py()   # not y's piece
    other, _ = _windows("y", [1], 2, seed=3)
    row2 = WriteResults(config)(other)
    collector.add(row2)
    parts, ids = collector.finish()
    assert ids.to_pylist() == ["y"]
    windows = pa.concat_tables([pq.read_table(p) for p in parts["segments"]])
    assert sorted(windows.column("segment_index").to_pylist()) == [0, 1] and set(windows.column("clip_id").to_pylist()) == {"y"}
    (clip_part,) = parts["clips"]
    assert pq.read_table(clip_part).column("clip_id").to_pylist() == ["y"]
    assert collector.take()[1].to_pylist() == [] and collector.clip_rows == 3
