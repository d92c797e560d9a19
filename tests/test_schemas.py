"""The write-time schema check rejects what pyarrow itself would let through."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.tagging.aggregate import clips_table
from schemas import SchemaError, clips_schema, segments_schema, validate_table

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
