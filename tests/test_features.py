"""Parity of decoding and features with the HF extractors, on real encoded audio."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.decode import Decoder
from pipeline.features_ast import AstFbank, AstFbankConfig
from pipeline.features_clap import ClapMel, ClapMelConfig
from pipeline.windows import WindowConfig, plan_windows, sample_span
from tests import reference as ref
from tests.audio import encode, encode_m4a, signal

CASES = [  # (format, subtype, rate Hz, channels, seconds)
    ("WAV", "PCM_16", 8_000, 1, 0.05),
    ("FLAC", None, 22_050, 2, 3.3),
    ("OGG", None, 44_100, 2, 7.0),
    ("MP3", None, 48_000, 1, 10.0),
    ("WAV", "FLOAT", 96_000, 2, 2.0),
    ("WAV", "PCM_24", 44_100, 6, 1.0),
    ("M4A", None, 44_100, 2, 2.5),
    ("FLAC", None, 16_000, 1, 60.0),
]


def _bytes(fmt, subtype, rate, channels, seconds):
    samples = signal(seconds, rate, channels, seed=rate + channels)
    return encode_m4a(samples, rate) if fmt == "M4A" else encode(samples, rate, fmt, subtype)


@pytest.fixture(scope="module")
def extractors(checkpoints):
    return (AstFbank(AstFbankConfig.from_pretrained(checkpoints["ast"])),
            ClapMel(ClapMelConfig.from_pretrained(checkpoints["clap"])))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}Hz-{c[3]}ch-{c[4]}s")
def test_decode_and_features_match_reference(case, checkpoints, extractors):
    fbank, mel = extractors
    data = _bytes(*case)
    audio = Decoder()(data)
    wave, rate = ref.load_mono(data)
    assert audio.source_rate == rate and audio.channels == case[3]
    wave16, wave48 = ref.resample(wave, rate, 16_000), ref.resample(wave, rate, 48_000)
    np.testing.assert_array_equal(audio.waves[16_000], wave16)
    np.testing.assert_array_equal(audio.waves[48_000], wave48)
    for w in plan_windows(audio.duration_s, WindowConfig()):
        a16 = wave16[sample_span(w.start_s, 10.24, 16_000)]
        a48 = wave48[sample_span(w.start_s, 10.0, 48_000)]
        ours_ast = fbank(audio.waves[16_000][sample_span(w.start_s, 10.24, 16_000)])
        np.testing.assert_allclose(ours_ast, ref.ast_features(checkpoints["ast"], a16), atol=1e-4, rtol=0)
        ours_mel = mel([audio.waves[48_000][sample_span(w.start_s, 10.0, 48_000)]])[0]
        np.testing.assert_allclose(ours_mel, ref.clap_features(checkpoints["clap"], a48), atol=1e-3, rtol=0)


def test_clap_mel_batch_equals_single(extractors):
    _, mel = extractors
    waves = [signal(s, 48_000, seed=i)[:, 0] for i, s in enumerate((0.3, 4.0, 10.0))]
    batched = mel(waves)
    for i, w in enumerate(waves):
        np.testing.assert_array_equal(batched[i], mel([w])[0])


def test_windows_cover_long_audio_deterministically():
    ws = plan_windows(60.0, WindowConfig(hop_s=10.0))
    assert [(w.start_s, w.end_s) for w in ws] == [(k * 10.0, k * 10.0 + 10) for k in range(6)]
    ws = plan_windows(25.0, WindowConfig(hop_s=10.0))
    assert [(w.start_s, w.end_s) for w in ws] == [(0, 10), (10, 20), (15, 25)]
    ws = plan_windows(23.0, WindowConfig(hop_s=5.0))
    assert [w.start_s for w in ws] == [0, 5, 10, 13] and ws[-1].end_s == 23.0
    assert [(w.start_s, w.end_s) for w in plan_windows(4.0)] == [(0.0, 4.0)]
    assert len(plan_windows(10.0)) == 1
    with pytest.raises(ValueError):
        WindowConfig(hop_s=12.0)


def test_fusion_config_features_match_reference():
    from transformers import ClapFeatureExtractor

    hf = ClapFeatureExtractor(frequency_min=50, frequency_max=14_000, truncation="fusion")
    mel = ClapMel(ClapMelConfig(truncation="fusion"))
    wave = signal(3.0, 48_000, seed=7)[:, 0]
    ours = mel([wave])[0]
    theirs = hf(wave, sampling_rate=48_000, return_tensors="np")["input_features"][0]
    assert ours.shape == theirs.shape == (4, 1001, 64)
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


def test_hour_long_file_streams_features_in_bounded_blocks(tmp_path):
    """An hour of audio: 360 windows, never more than `windows_per_block` windows' features at once."""
    import pyarrow as pa

    from pipeline.featurize import Featurize, FeaturizeConfig
    from pipeline.sources import ListingConfig, list_inputs

    rate, seconds = 8_000, 3600
    t = np.arange(rate * seconds, dtype=np.float32) / rate
    path = tmp_path / "hour.wav"
    import soundfile as sf

    sf.write(path, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate, subtype="PCM_16")
    del t
    files = list_inputs(ListingConfig(str(path)))
    sizes, indices = [], []
    for block in Featurize(FeaturizeConfig(windows_per_block=16))(files):
        assert isinstance(block, pa.Table)
        sizes.append(len(block))
        indices += block.column("segment_index").to_pylist()
    assert max(sizes) <= 16 and sum(sizes) == 360
    assert indices == list(range(360))
