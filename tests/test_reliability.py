"""Reliability, fast cases: a damaged corpus mixed with good files, hostile names, decode timeouts,
an unwritable output, run ids that would escape the output (issue 6's suite; slow cases: README)."""

from __future__ import annotations

import struct
import time

import numpy as np
import pandas as pd
import pytest

from pipeline.commits import read_current
from pipeline.decode import DecodeConfig, DecodeError, Decoder
from pipeline.job import TagJobConfig, run_tag_job
from tests.audio import broken_files, encode, encode_m4a, signal


def _wav_with_rate(rate: int) -> bytes:
    data = bytearray(encode(signal(0.5, 16_000), 16_000, "WAV", "PCM_16"))
    data[24:28] = struct.pack("<I", rate)             # fmt chunk: sample rate
    data[28:32] = struct.pack("<I", min(rate * 2, 2**32 - 1))  # byte rate
    return bytes(data)


def damaged() -> dict[str, bytes]:
    flac = encode(signal(4.0, 44_100, 2, seed=7), 44_100, "FLAC")
    ogg = encode(signal(4.0, 44_100, seed=8), 44_100, "OGG")
    return {**broken_files(), "truncated.flac": flac[: len(flac) // 2], "truncated.ogg": ogg[: len(ogg) // 2],
            "absurd_rate_4ghz.wav": _wav_with_rate(4_000_000_000), "absurd_rate_1hz.wav": _wav_with_rate(1),
            "flac_named.mp3": flac}


GOOD = {
    "six_channels.wav": encode(signal(3.0, 48_000, 6, seed=1), 48_000, "WAV", "PCM_24"),
    "plain.flac": encode(signal(12.0, 22_050, seed=2), 22_050, "FLAC"),
    "ünïcødé näme ♪.wav": encode(signal(2.0, 16_000, seed=3), 16_000, "WAV"),
    "..dots..and spaces.ogg": encode(signal(2.0, 32_000, seed=4), 32_000, "OGG"),
    "song.m4a": encode_m4a(signal(2.0, 44_100, 2, seed=5), 44_100),
}


def _run(directory, out, checkpoints, run_id):
    return run_tag_job(TagJobConfig(input=str(directory), output=str(out), ast_model=checkpoints["ast"],
                                    clap_model=checkpoints["clap"], run_id=run_id))


def test_damaged_corpus_loses_nothing_and_good_results_are_unchanged(checkpoints, tmp_path, local_ray):
    mixed, clean = tmp_path / "mixed", tmp_path / "clean"
    for directory, files in ((mixed, {**GOOD, **damaged()}), (clean, GOOD)):
        (directory / "sub").mkdir(parents=True)
        for name, data in files.items():
            (directory / "sub" / name).write_bytes(data)
    summary = _run(mixed, tmp_path / "out-mixed", checkpoints, "mixed")
    _run(clean, tmp_path / "out-clean", checkpoints, "clean")

    rows = read_current(str(tmp_path / "out-mixed")).to_pandas()
    assert len(rows) == len(GOOD) + len(damaged()) == summary["files_seen"] and rows.clip_id.is_unique
    assert all(str(tmp_path / "out-mixed") not in u for u in rows.uri)
    errors = rows[rows.status == "error"]
    assert errors.error.map(bool).all()
    by_name = rows.set_index(rows.uri.map(lambda u: u.rsplit("/", 1)[-1]))
    assert by_name.loc["absurd_rate_4ghz.wav"].error.startswith("not a decodable audio file")
    assert by_name.loc["absurd_rate_1hz.wav"].error.startswith("implausible sample rate")
    assert by_name.loc["flac_named.mp3"].status == "ok"
    for name in ("truncated.flac", "truncated.ogg"):  # decodable up to the cut, or a clear reason
        row = by_name.loc[name]
        assert row.status == "ok" or row.error, name

    clean_rows = read_current(str(tmp_path / "out-clean")).to_pandas()
    for name in GOOD:
        a = by_name.loc[name]
        assert a.status == "ok", (name, a.error)
        b = clean_rows[clean_rows.uri.str.endswith("/" + name)].iloc[0]
        assert np.array_equal(a.clap_embedding, b.clap_embedding) and np.array_equal(a.scores, b.scores), name
    for path in (tmp_path / "out-mixed").rglob("*"):
        assert path.resolve().is_relative_to((tmp_path / "out-mixed").resolve())


def test_decode_timeout_gives_a_reason():
    data = encode_m4a(signal(60.0, 44_100, 2), 44_100)
    with pytest.raises(DecodeError, match="decoding timed out"):
        Decoder(DecodeConfig(timeout_s=0.01))(data)
    assert Decoder(DecodeConfig(timeout_s=60))(data).decoder == "pyav"


def test_unwritable_output_fails_before_any_work(checkpoints, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    started = time.time()
    with pytest.raises(PermissionError, match="not writable"):
        _run(tmp_path, blocker / "out", checkpoints, "never")
    assert time.time() - started < 5


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "", ".hidden", "x" * 81, "name with space"])
def test_run_ids_cannot_escape_the_output(run_id, tmp_path):
    with pytest.raises(ValueError, match="run id"):
        TagJobConfig(input=str(tmp_path), output=str(tmp_path), run_id=run_id)
