"""Stage 4, CLAP features: the log-mel (dB) that the checkpoint's ClapFeatureExtractor computes.

Vectorised over a batch of windows in float64 torch (the reference is per-clip numpy, float64 FFTs).
Windows are at most `max_length_s` long, so the reference's random crop never applies; short windows
are repeat-padded then zero-padded ("repeatpad"), as the reference does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ClapMelConfig:
    """Rate in Hz, window/hop in samples, frequencies in Hz, clip length in seconds."""

    sample_rate: int = 48_000
    num_mel_bins: int = 64
    fft_window_size: int = 1024
    hop_length: int = 480
    frequency_min: float = 50.0
    frequency_max: float = 14_000.0
    max_length_s: int = 10
    truncation: str = "rand_trunc"   # "rand_trunc": Slaney mel, 1 channel; "fusion": HTK mel, 4 channels
    padding: str = "repeatpad"

    @classmethod
    def from_pretrained(cls, source: str) -> "ClapMelConfig":
        """Read the checkpoint's preprocessor config (hub id or local directory)."""
        from transformers import ClapFeatureExtractor

        from pipeline.checkpoints import resolve

        fe = ClapFeatureExtractor.from_pretrained(resolve(source))
        return cls(sample_rate=fe.sampling_rate, num_mel_bins=fe.feature_size,
                   fft_window_size=fe.fft_window_size, hop_length=fe.hop_length,
                   frequency_min=float(fe.frequency_min), frequency_max=float(fe.frequency_max),
                   max_length_s=int(fe.max_length_s), truncation=fe.truncation, padding=fe.padding)

    @property
    def max_samples(self) -> int:
        return self.max_length_s * self.sample_rate

    @property
    def num_frames(self) -> int:
        return self.max_samples // self.hop_length + 1

    @property
    def channels(self) -> int:
        return 4 if self.truncation == "fusion" else 1

    def to_dict(self) -> dict:
        return asdict(self)


class ClapMel:
    """Callable: list of mono waveforms (<= max_samples each) -> (B, channels, frames, mels) float32."""

    def __init__(self, config: ClapMelConfig = ClapMelConfig()):
        from transformers.audio_utils import mel_filter_bank

        self.config = config
        fusion = config.truncation == "fusion"
        filters = mel_filter_bank(
            num_frequency_bins=config.fft_window_size // 2 + 1, num_mel_filters=config.num_mel_bins,
            min_frequency=config.frequency_min, max_frequency=config.frequency_max,
            sampling_rate=config.sample_rate, norm=None if fusion else "slaney",
            mel_scale="htk" if fusion else "slaney",
        )
        self._filters = torch.from_numpy(np.asarray(filters, dtype=np.float64))  # (freqs, mels)
        self._window = torch.hann_window(config.fft_window_size, periodic=True, dtype=torch.float64)

    def pad(self, wave: np.ndarray) -> np.ndarray:
        """Repeat-pad (or zero-pad) one window to exactly max_samples, as the reference does."""
        n_max = self.config.max_samples
        if len(wave) > n_max:
            raise ValueError(f"window of {len(wave)} samples exceeds {n_max}")
        if len(wave) < n_max and self.config.padding in ("repeat", "repeatpad"):
            reps = n_max // len(wave)
            wave = np.tile(wave, reps + 1)[:n_max] if self.config.padding == "repeat" else np.tile(wave, reps)
        return np.pad(wave, (0, n_max - len(wave)))

    def __call__(self, waves: list[np.ndarray]) -> np.ndarray:
        c = self.config
        batch = torch.from_numpy(np.stack([self.pad(np.asarray(w, dtype=np.float64)) for w in waves]))
        spec = torch.stft(batch, n_fft=c.fft_window_size, hop_length=c.hop_length, window=self._window,
                          center=True, pad_mode="reflect", onesided=True, return_complex=True)
        power = spec.real.square() + spec.imag.square()                     # (B, freqs, frames)
        mel = torch.clamp(torch.matmul(power.transpose(1, 2), self._filters), min=1e-10)
        db = (10.0 * torch.log10(mel)).to(torch.float32)                     # (B, frames, mels)
        return db.unsqueeze(1).expand(-1, c.channels, -1, -1).contiguous().numpy()
