"""Parity of decoding and features with the HF extractors, on real encoded audio."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.audio.decode import Decoder
from pipeline.audio.features_ast import AstFbank, AstFbankConfig
from pipeline.audio.features_clap import ClapMel, ClapMelConfig
from pipeline.audio.windows import WindowConfig, plan_windows, sample_span
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


def _hard_signal(name: str, rate: int, seconds: float = 10.0) -> np.ndarray:
    """Inputs where a float32 spectrum or a misplaced floor would show: tones (most bands far below
    the loudest, above the power floor), near-silence, silence, DC, band-limited and clipped audio."""
    import soxr

    rng = np.random.default_rng(len(name))
    t = np.arange(int(seconds * rate)) / rate
    waves = {
        "tone_1k": lambda: 0.5 * np.sin(2 * np.pi * 1000 * t),
        "tone_off_bin": lambda: 0.3 * np.sin(2 * np.pi * 1234.5 * t),
        "tone_full_scale": lambda: 0.999 * np.sin(2 * np.pi * 440 * t),
        "chirp": lambda: 0.3 * np.sin(2 * np.pi * (150 + 120 * t) * t),
        "near_silent_noise": lambda: 1e-7 * rng.standard_normal(len(t)),
        "quiet_noise": lambda: 1e-4 * rng.standard_normal(len(t)),
        "lsb_16bit_noise": lambda: np.round(rng.standard_normal(len(t))) / 32768,
        "silence": lambda: np.zeros(len(t)),
        "dc": lambda: np.full(len(t), 0.5),
        "impulses": lambda: (np.arange(len(t)) % (rate // 10) == 0) * 0.9,
        "clipped_noise": lambda: np.clip(3 * rng.standard_normal(len(t)), -1, 1),
        "band_limited_8k_source": lambda: soxr.resample(0.1 * rng.standard_normal(int(seconds * 8_000)),
                                                        8_000, rate, quality="HQ")[:len(t)],
    }
    return waves[name]().astype(np.float32)


HARD = ["tone_1k", "tone_off_bin", "tone_full_scale", "chirp", "near_silent_noise", "quiet_noise",
        "lsb_16bit_noise", "silence", "dc", "impulses", "clipped_noise", "band_limited_8k_source"]


@pytest.mark.parametrize("name", HARD)
def test_features_match_reference_on_hard_signals(name, checkpoints, extractors):
    fbank, mel = extractors
    a16, a48 = _hard_signal(name, 16_000), _hard_signal(name, 48_000)
    np.testing.assert_allclose(fbank(a16), ref.ast_features(checkpoints["ast"], a16), atol=1e-4, rtol=0)
    np.testing.assert_allclose(mel([a48])[0], ref.clap_features(checkpoints["clap"], a48), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kwargs", [
    dict(frequency_min=0, frequency_max=24_000, truncation="rand_trunc", padding="repeatpad"),  # DC and Nyquist bins
    dict(frequency_min=0, frequency_max=24_000, truncation="fusion", padding="repeat"),
    dict(frequency_min=50, frequency_max=14_000, truncation="rand_trunc", padding="pad"),
], ids=lambda k: f"{k['frequency_min']}-{k['frequency_max']}Hz-{k['truncation']}-{k['padding']}")
def test_clap_mel_edge_settings_match_reference(kwargs):
    from transformers import ClapFeatureExtractor

    from pipeline.audio.features_device import ClapMelBatch

    hf = ClapFeatureExtractor(**kwargs)
    mel, batch = ClapMel(ClapMelConfig(**kwargs)), ClapMelBatch(ClapMelConfig(**kwargs))
    for wave in (signal(0.7, 48_000, seed=3)[:, 0], _hard_signal("tone_off_bin", 48_000, 2.0),
                 signal(10.0, 48_000, seed=4)[:, 0]):
        theirs = hf(wave, sampling_rate=48_000, return_tensors="np")["input_features"][0]
        np.testing.assert_allclose(mel([wave])[0], theirs, atol=1e-3, rtol=0)
        np.testing.assert_allclose(_batched(batch, [wave], 480_000)[0], theirs, atol=1e-3, rtol=0)


def _batched(extractor, waves: list[np.ndarray], samples: int) -> np.ndarray:
    """Rows of waves zero-padded to `samples`, with their lengths, through a device extractor (CPU)."""
    import torch

    batch = np.zeros((len(waves), samples), np.float32)
    for i, w in enumerate(waves):
        batch[i, :len(w)] = w
    return extractor(torch.from_numpy(batch), torch.tensor([len(w) for w in waves])).numpy()


def test_device_features_match_reference_and_are_batch_independent(checkpoints):
    """--features-on gpu's extractors (run here on the CPU device): full, short and padded windows of hard
    signals in one batch match the HF extractors; each row alone gives the same values, bitwise."""
    from pipeline.audio.features_device import AstFbankBatch, ClapMelBatch

    ast = AstFbankBatch(AstFbankConfig.from_pretrained(checkpoints["ast"]))
    clap = ClapMelBatch(ClapMelConfig.from_pretrained(checkpoints["clap"]))
    names = ["tone_off_bin", "near_silent_noise", "silence", "dc", "band_limited_8k_source", "chirp"]
    seconds = [10.0, 10.0, 0.03, 3.3, 10.0, 7.1]  # 0.03 s: repeat-padded ~333 times for CLAP
    a16 = [_hard_signal(n, 16_000, s + 0.24 * (s == 10.0)) for n, s in zip(names, seconds)]
    a48 = [_hard_signal(n, 48_000, s) for n, s in zip(names, seconds)]
    ours_ast, ours_clap = _batched(ast, a16, 163_840), _batched(clap, a48, 480_000)
    for i in range(len(names)):
        np.testing.assert_allclose(ours_ast[i], ref.ast_features(checkpoints["ast"], a16[i]), atol=1e-4, rtol=0)
        np.testing.assert_allclose(ours_clap[i], ref.clap_features(checkpoints["clap"], a48[i]), atol=1e-3, rtol=0)
    for i in (0, 2, 5):
        np.testing.assert_array_equal(_batched(ast, [a16[i]], 163_840)[0], ours_ast[i])
        np.testing.assert_array_equal(_batched(clap, [a48[i]], 480_000)[0], ours_clap[i])


def test_mel_bands_equal_the_dense_product():
    import torch
    import torchaudio.compliance.kaldi as kaldi
    from transformers.audio_utils import mel_filter_bank

    from pipeline.audio.mel_bands import MelBands

    kaldi_banks, _ = kaldi.get_mel_banks(128, 512, 16_000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
    slaney = mel_filter_bank(num_frequency_bins=513, num_mel_filters=64, min_frequency=50, max_frequency=14_000,
                             sampling_rate=48_000, norm="slaney", mel_scale="slaney")
    rng = np.random.default_rng(0)
    for filters in (torch.nn.functional.pad(kaldi_banks, (0, 1)).T.numpy().astype(np.float64), slaney):
        power = rng.exponential(size=(50, filters.shape[0])).astype(np.float32)
        ours = MelBands(filters)(torch.from_numpy(power)).numpy()
        np.testing.assert_allclose(ours, power.astype(np.float64) @ filters, rtol=1e-5)


def test_ast_spectrum_is_bitwise_torchaudios():
    """Up to the FFT our framing (DC offset, pre-emphasis, window, zero padding) is kaldi.fbank's,
    bitwise; an extractor used before gives what a fresh one gives."""
    import torch
    import torchaudio.compliance.kaldi as kaldi

    fbank = AstFbank(AstFbankConfig())
    waves = [signal(s, 16_000, seed=i)[:, 0] for i, s in enumerate((10.24, 0.05, 12.0, 3.0))]
    waves += [_hard_signal(name, 16_000, 10.24) for name in ("dc", "tone_full_scale", "near_silent_noise")]
    for wave in waves:
        frames, _ = kaldi._get_window(torch.from_numpy(wave), 512, 400, 160, "hanning", 0.42, True, True,
                                      1.0, 0.0, True, 0.97)
        assert torch.equal(fbank._spectrum(wave), torch.fft.rfft(frames)[:1024])
        np.testing.assert_array_equal(fbank(wave), AstFbank(AstFbankConfig())(wave))


def test_clap_mel_buffers_do_not_leak_between_windows():
    mel = ClapMel(ClapMelConfig())
    waves = [signal(s, 48_000, seed=i)[:, 0] for i, s in enumerate((10.0, 0.3, 4.0))]
    for wave in waves + waves[::-1]:
        np.testing.assert_array_equal(mel([wave]), ClapMel(ClapMelConfig())([wave]))
    np.testing.assert_array_equal(mel.log_mel(waves[1]).numpy(), ClapMel(ClapMelConfig())([waves[1]])[0, 0])


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


@pytest.fixture
def one_torch_thread():
    """Featurize runs as a one-CPU Ray task, for which Ray sets OMP_NUM_THREADS=1; run it the same way
    here (with two intra-op threads on a busy machine, each small torch op waits for a descheduled
    thread, and this test took minutes)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_hour_long_file_streams_features_in_bounded_blocks(tmp_path, one_torch_thread):
    """An hour of audio: 360 windows, never more than `windows_per_block` windows' features at once."""
    import pyarrow as pa

    from pipeline.tagging.featurize import Featurize, FeaturizeConfig
    from pipeline.tagging.sources import ListingConfig, list_inputs

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


def test_device_resample_of_each_window_equals_resampling_the_whole_file():
    """--features-on gpu: a window resampled on the actor from the slice the worker ships equals the
    window cut from torchaudio's resample of the whole file (what HF's pipeline runs), for down-, up-
    and pass-through rates, odd rates, files shorter than the filter and end-aligned last windows; a
    row's values do not depend on the other rows of its batch."""
    import torch
    import torchaudio.functional as F

    from pipeline.audio.resample_device import Resample, slice_bounds, span
    from pipeline.audio.windows import WindowConfig, plan_windows

    rng = np.random.default_rng(0)
    for target, window_s in ((16_000, 10.24), (48_000, 10.0)):
        resample = Resample(target, window_s)
        slices, firsts, frames, rates, starts, expected = [], [], [], [], [], []
        for rate in (8_000, 11_025, 16_000, 22_050, 44_056, 44_100, 48_000, 96_000):
            for seconds in (0.0004, 3.3, 23.7):
                n = max(2, int(seconds * rate))
                x = rng.standard_normal(n).astype(np.float32)
                whole = F.resample(torch.from_numpy(x), rate, target).numpy() if rate != target else x
                for w in plan_windows(n / rate, WindowConfig(hop_s=7.0)):
                    first, end = slice_bounds([span(rate, target, n, w.start_s, window_s)])
                    row = np.zeros(end - first, np.float32)
                    row[max(first, 0) - first:min(end, n) - first] = x[max(first, 0):min(end, n)]
                    a = round(w.start_s * target)
                    slices.append(row), firsts.append(first), frames.append(n), rates.append(rate)
                    starts.append(w.start_s), expected.append(whole[a:a + resample.size])
        width = max(len(s) for s in slices)
        padded = np.stack([np.pad(s, (0, width - len(s))) for s in slices])
        plans = resample.plan(np.array(rates), np.array(firsts), np.array(frames), np.array(starts))
        waves, lengths = resample(torch.from_numpy(padded), torch.from_numpy(plans))
        for i, want in enumerate(expected):
            assert int(lengths[i]) == len(want) > 0
            np.testing.assert_allclose(waves[i, :len(want)].numpy(), want, atol=1e-6, rtol=0)
            assert not waves[i, len(want):].any()
        for i in (0, len(expected) // 2, len(expected) - 1):
            alone, _ = resample(torch.from_numpy(padded[i:i + 1]), torch.from_numpy(plans[i:i + 1]))
            assert torch.equal(alone[0], waves[i])
