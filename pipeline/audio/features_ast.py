"""Stage 3, AST features: Kaldi log-mel filterbank, 128 bins, 10 ms hop, normalised for the checkpoint.

Matches transformers' ASTFeatureExtractor (torchaudio path): `kaldi.fbank` with a Hanning window,
25 ms frames, dither 0, then zero-pad or cut to `max_length` frames, then (x - mean) / (2 * std).

The fbank is computed here rather than through `kaldi.fbank`, which rebuilds its mel banks on every
call, computes an energy column it then drops, takes |X|^2 through a slow complex abs, and multiplies by
the mostly-zero mel matrix densely. Every step up to and including the FFT is the same float32 torch
operation, in the same order, on the same layout as torchaudio's, so the spectrum is bitwise
identical (tests/test_features.py checks it); only the power (re^2 + im^2) and the non-negative mel sums
round differently, a relative error of a few float32 ulps (log-mel within ~1.2e-7 of the reference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi

from pipeline.audio.mel_bands import MelBands


@dataclass(frozen=True)
class AstFbankConfig:
    """Sample rate in Hz, frame sizes in ms, `max_length` in frames; mean/std from the checkpoint."""

    sample_rate: int = 16_000
    num_mel_bins: int = 128
    max_length: int = 1024
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    mean: float = -4.2677393
    std: float = 4.5689974
    do_normalize: bool = True

    @classmethod
    def from_pretrained(cls, source: str) -> "AstFbankConfig":
        """Read the checkpoint's preprocessor config (hub id or local directory)."""
        from transformers import ASTFeatureExtractor

        from pipeline.checkpoints import resolve

        fe = ASTFeatureExtractor.from_pretrained(resolve(source))
        return cls(sample_rate=fe.sampling_rate, num_mel_bins=fe.num_mel_bins, max_length=fe.max_length,
                   mean=float(fe.mean), std=float(fe.std), do_normalize=bool(fe.do_normalize))

    def to_dict(self) -> dict:
        return asdict(self)


# kaldi.fbank defaults that ASTFeatureExtractor relies on
_PREEMPHASIS = 0.97
_LOW_FREQ_HZ = 20.0
_EPSILON = torch.tensor(torch.finfo(torch.float32).eps)


class AstFbank:
    """Callable: mono float32 waveform at `sample_rate` -> (max_length, num_mel_bins) float32."""

    def __init__(self, config: AstFbankConfig = AstFbankConfig()):
        self.config = config
        self.frame_shift = int(config.sample_rate * config.frame_shift_ms * 0.001)   # samples
        self.frame_length = int(config.sample_rate * config.frame_length_ms * 0.001)
        self.fft_length = 1 << (self.frame_length - 1).bit_length()
        banks, _ = kaldi.get_mel_banks(config.num_mel_bins, self.fft_length, float(config.sample_rate),
                                       _LOW_FREQ_HZ, 0.0, 100.0, -500.0, 1.0)
        # (fft bins, mels); kaldi has no weight on the Nyquist bin
        self._banks = MelBands(torch.nn.functional.pad(banks, (0, 1)).T)
        self._window = torch.hann_window(self.frame_length, periodic=False)

    def __call__(self, wave: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Features of one window, written into `out` ((max_length, num_mel_bins) float32) if given."""
        c = self.config
        logmel = self.log_mel(wave)
        if out is None:
            out = np.empty((c.max_length, c.num_mel_bins), dtype=np.float32)
        out[:len(logmel)] = logmel.numpy()
        out[len(logmel):] = 0.0
        if c.do_normalize:  # in place: the same float32 values as (out - mean) / (2 * std)
            out -= c.mean
            out /= c.std * 2
        return out

    def log_mel(self, wave: np.ndarray) -> torch.Tensor:
        """(frames, num_mel_bins) natural-log mel energies of at most `max_length` frames."""
        spec = torch.view_as_real(self._spectrum(wave))
        power = spec[..., 0].square().add_(spec[..., 1].square())
        return self._banks(power).clamp_min_(_EPSILON).log_()

    def _spectrum(self, wave: np.ndarray) -> torch.Tensor:
        """(frames, fft_length // 2 + 1) complex64 spectrum of at most `max_length` frames."""
        w = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
        if len(w) < self.frame_length:
            raise ValueError(f"{len(w)} samples is shorter than one {self.frame_length}-sample frame")
        m = min(self.config.max_length, 1 + (len(w) - self.frame_length) // self.frame_shift)
        frames = w.as_strided((m, self.frame_length), (self.frame_shift, 1))
        x = frames - torch.mean(frames, dim=1).unsqueeze(1)                     # remove DC offset
        padded = torch.zeros((m, self.fft_length))
        pre = padded[:, :self.frame_length]
        torch.sub(x[:, 1:], _PREEMPHASIS * x[:, :-1], out=pre[:, 1:])
        torch.sub(x[:, :1], _PREEMPHASIS * x[:, :1], out=pre[:, :1])
        pre.mul_(self._window)
        return torch.fft.rfft(padded)
