"""The write-time schema check rejects what pyarrow itself would let through; part files store the
vector columns as the lists Delta declares, width checked, and read back as fixed-size lists."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.store.writer import PartWriter
from pipeline.tagging.aggregate import clips_table
from schemas import WIDTH_KEY, SchemaError, clips_schema, fixed_width, segments_schema, stored_schema, validate_table

SCHEMA = clips_schema(num_labels=3, ast_dim=4, clap_dim=2)


def _row(**over):
    row = {"clip_id": "c1", "uri": "/a.wav", "status": "ok", "error": None, "size_bytes": 10,
           "modified": "2026-01-01T00:00:00+00:00", "etag": None, "duration_s": 1.0, "sample_rate": 16000,
           "channels": 1, "decoder": "soundfile", "warning": None, "num_segments": 1,
           "labels": [{"label": "Dog", "score": 0.9}], "zero_shot": None, "scores": np.ones(3, np.float32),
           "ast_embedding": np.ones(4, np.float32), "clap_embedding": np.ones(2, np.float32), "run_id": "r"}
    return {**row, **over}


def test_valid_rows_pass_and_types_are_fixed_size():
    table = clips_table([_row(), _row(clip_id="c2", status="error", error="empty file", scores=None,
                                      zero_shot=None, ast_embedding=None, clap_embedding=None, labels=None, num_segments=0)],
                        SCHEMA)
    validate_table(table, SCHEMA)
    assert table.schema.field("clap_embedding").type == pa.list_(pa.float32(), 2)
    assert table.column("clap_embedding").null_count == 1


@pytest.mark.parametrize("row,message", [
    (_row(status="done"), "status must be"),
    (_row(error="oops"), "ok row carries an error"),
    (_row(status="error"), "error row has no reason"),
    (_row(clap_embedding=None), "ok row has no clap_embedding"),
    (_row(uri=None), "'uri' is declared non-null"),
])
def test_bad_rows_are_rejected(row, message):
    with pytest.raises(SchemaError, match=message):
        validate_table(clips_table([row], SCHEMA), SCHEMA)


def test_extra_missing_or_mistyped_columns_are_rejected():
    table = clips_table([_row()], SCHEMA)
    with pytest.raises(SchemaError, match="columns"):
        validate_table(table.append_column("extra", pa.array([1])), SCHEMA)
    with pytest.raises(SchemaError, match="columns"):
        validate_table(table.drop_columns(["etag"]), SCHEMA)
    with pytest.raises(SchemaError, match="type"):
        validate_table(table.set_column(1, "uri", pa.array([b"/a.wav"], pa.binary())), SCHEMA)
    with pytest.raises(ValueError, match="keys"):
        clips_table([{**_row(), "surprise": 1}], SCHEMA)
    with pytest.raises(SchemaError, match="declared"):
        validate_table(table, segments_schema(3, 4, 2))


def _ok_and_error_rows() -> pa.Table:
    return clips_table([_row(scores=np.array([0.1, 0.2, 0.3], np.float32)),
                        _row(clip_id="c2", status="error", error="empty file", scores=None, ast_embedding=None,
                             clap_embedding=None, labels=None, num_segments=0)], SCHEMA)


def test_the_stored_form_keeps_the_width_check():
    stored = _ok_and_error_rows().cast(stored_schema(SCHEMA))
    assert stored.schema.field("scores").type == pa.list_(pa.float32())
    assert stored.schema.field("scores").metadata == {WIDTH_KEY: b"3"}
    validate_table(stored, SCHEMA)
    validate_table(stored, stored_schema(SCHEMA))
    short = pa.array([[1.0, 2.0], None], pa.list_(pa.float32()))
    with pytest.raises(SchemaError, match="'scores' has values of 2 elements, declared width 3"):
        validate_table(stored.set_column(stored.schema.get_field_index("scores"), "scores", short), SCHEMA)
    wide = pa.array([[1.0, 2.0, 3.0], None], pa.list_(pa.float64()))
    with pytest.raises(SchemaError, match="'scores' has type"):
        validate_table(stored.set_column(stored.schema.get_field_index("scores"), "scores", wide), SCHEMA)
    with pytest.raises(SchemaError, match="'scores' has type"):
        validate_table(_ok_and_error_rows(), clips_schema(num_labels=4, ast_dim=4, clap_dim=2))


def test_part_files_hold_lists_and_read_back_as_the_declared_fixed_size_lists(tmp_path):
    table = _ok_and_error_rows()
    writer = PartWriter(str(tmp_path), "clips", "run1", SCHEMA, {"settings_hash": "h"})
    writer.write(table)
    writer.flush()
    (path,) = writer.files
    assert [pq.read_schema(path).field(name).type for name in ("scores", "ast_embedding", "clap_embedding")] \
        == [pa.list_(pa.float32())] * 3
    back = fixed_width(pq.read_table(path))
    assert back.schema.remove_metadata().equals(SCHEMA)   # the declared types
    assert all(field.metadata is None for field in back.schema), "the width is in the type again"
    assert back.select(["scores", "ast_embedding", "clap_embedding"]).equals(
        table.select(["scores", "ast_embedding", "clap_embedding"]))
    batch = fixed_width(pq.read_table(path, columns=["clip_id", "clap_embedding"]).to_batches()[0])
    assert batch.schema.field("clap_embedding").type == pa.list_(pa.float32(), 2)


def test_part_files_keep_dictionaries_for_names_and_none_for_model_outputs(tmp_path):
    """Scores and embeddings hardly repeat a value: a dictionary only costs time and bytes there."""
    writer = PartWriter(str(tmp_path), "clips", "run1", SCHEMA, {})
    writer.write(_ok_and_error_rows())
    writer.flush()
    row_group = pq.ParquetFile(writer.files[0]).metadata.row_group(0)
    encodings = {row_group.column(i).path_in_schema: row_group.column(i).encodings
                 for i in range(row_group.num_columns)}
    dictionary = {path for path, used in encodings.items() if any("DICTIONARY" in e for e in used)}
    assert {"clip_id", "status", "labels.list.element.label", "run_id"} <= dictionary
    assert not dictionary & {"scores.list.element", "ast_embedding.list.element", "clap_embedding.list.element",
                             "labels.list.element.score", "zero_shot.list.element.score"}


def test_a_writer_refuses_a_vector_of_another_width(tmp_path):
    writer = PartWriter(str(tmp_path), "clips", "run1", clips_schema(num_labels=4, ast_dim=4, clap_dim=2), {})
    with pytest.raises(SchemaError, match="scores"):
        writer.write(_ok_and_error_rows())
