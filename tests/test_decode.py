"""Decoding real bytes: each kind of broken input gets a specific reason; odd but valid audio decodes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.audio.decode import LONG_FILE, DecodeConfig, DecodeError, Decoder
from pipeline.audio.storage import read_bytes
from tests.audio import BROKEN_REASONS, broken_files, encode, encode_m4a, signal

BROKEN = broken_files()
REASONS = BROKEN_REASONS


@pytest.mark.parametrize("name", sorted(REASONS))
def test_broken_input_has_a_reason(name):
    with pytest.raises(DecodeError) as info:
        Decoder()(BROKEN[name])
    assert info.value.reason == REASONS[name]
    assert "0x" not in str(info.value), "no object addresses in user-facing reasons"


@pytest.mark.parametrize("name,decoder,seconds,warning", [
    ("m4a_named.wav", "pyav", 1.5, None), ("fifty_ms.wav", "soundfile", 0.05, None),
    ("truncated.mp3", "soundfile", None, "body shorter than header declares: 0.89 s decoded of 3.00 s"),
    ("truncated_body.wav", "soundfile", None, "body shorter than header declares: 0.03 s decoded of 2.00 s"),
])
def test_damaged_but_decodable_input_gives_audio(name, decoder, seconds, warning):
    audio = Decoder()(BROKEN[name])
    assert audio.decoder == decoder
    assert audio.waves[16_000].dtype == np.float32 and np.isfinite(audio.waves[48_000]).all()
    if seconds:
        assert audio.duration_s == pytest.approx(seconds, abs=0.06)
    assert audio.warning == warning


@pytest.mark.parametrize("fmt,subtype,channels", [
    ("WAV", "PCM_16", 1), ("WAV", "PCM_24", 6), ("WAV", "FLOAT", 2), ("WAV", "PCM_U8", 1),
    ("FLAC", None, 2), ("OGG", None, 1), ("MP3", None, 2)])
def test_complete_files_carry_no_warning(fmt, subtype, channels):
    data = encode(signal(3.3, 22_050, channels, seed=3), 22_050, fmt, subtype)
    assert Decoder()(data).warning is None
    if fmt == "WAV":  # the same file cut in its body is flagged
        assert Decoder()(data[: len(data) * 2 // 3]).warning.startswith("body shorter than header declares")


def test_a_lane_hands_back_files_longer_than_it_takes():
    lane = Decoder(DecodeConfig(lane_s=20.0))
    for data in (encode(signal(21.0, 8_000), 8_000, "FLAC"), encode_m4a(signal(21.0, 8_000), 8_000)):
        with pytest.raises(DecodeError) as info:
            lane(data)
        assert info.value.reason == LONG_FILE
    assert lane(encode(signal(19.0, 8_000), 8_000, "FLAC")).duration_s == 19.0


def test_stereo_is_downmixed_by_mean_and_resampled_to_both_rates():
    samples = signal(1.0, 44_100, 2)
    audio = Decoder(DecodeConfig(rates=(44_100, 16_000)))(encode(samples, 44_100, "WAV", "FLOAT"))
    np.testing.assert_array_equal(audio.waves[44_100], samples.mean(axis=1, dtype=np.float32))
    assert len(audio.waves[16_000]) == 16_000 and audio.channels == 2


def test_too_short_and_too_long():
    with pytest.raises(DecodeError, match="audio too short"):
        Decoder()(encode(signal(0.01, 16_000), 16_000, "WAV"))
    with pytest.raises(DecodeError, match="audio too long"):
        Decoder(DecodeConfig(max_duration_s=1.0))(encode(signal(2.0, 16_000), 16_000, "WAV"))


def test_storage_errors_are_reasons(tmp_path):
    with pytest.raises(DecodeError, match="file not found"):
        read_bytes(str(tmp_path / "vanished.wav"))
    locked = tmp_path / "locked.wav"
    locked.write_bytes(b"RIFF")
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything; the directory case still exercises the mapping
        with pytest.raises(DecodeError, match="directory"):
            read_bytes(str(tmp_path))
    else:
        with pytest.raises(DecodeError, match="permission denied"):
            read_bytes(str(locked))


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_long_files_read_in_blocks_equal_one_read(fmt, monkeypatch):
    data = encode(signal(7.0, 44_100, 6, seed=11), 44_100, fmt)
    whole = Decoder()(data)
    monkeypatch.setattr("pipeline.audio.decode.WHOLE_READ_BYTES", 1 << 16)  # everything counts as long here
    monkeypatch.setattr("pipeline.audio.decode.BLOCK_FRAMES", 10_000)
    blocks = Decoder()(data)
    for rate in (16_000, 48_000):
        np.testing.assert_array_equal(blocks.waves[rate], whole.waves[rate])
    assert blocks.channels == 6 and blocks.duration_s == whole.duration_s == 7.0
