"""Stage 4, CLAP features: the log-mel (dB) that the checkpoint's ClapFeatureExtractor computes.

The reference is per-clip numpy with float64 FFTs. The FFT must stay float64: a float32 FFT's rounding
is ~1e-7 of a frame's energy, which moves quiet bands of tonal or band-limited audio (far below the
frame's loudest band, yet above the 1e-10 power floor) by up to ~0.2 dB against a 1e-3 dB bar. After
the windowing (done on the float64 spectrum, `_hann`) every step is a relative error only: the
reference itself stores the spectrum as complex64, and the power and mel sums add non-negative terms,
so the power is rounded to float32 and the mel product runs in float32.

Windows are at most `max_length_s` long, so the reference's random crop never applies; short windows
are repeat-padded then zero-padded ("repeatpad"), as the reference does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.audio.mel_bands import MelBands


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


# Frames per FFT call: a block's float64 spectrum (~1 MB) and Hann band stay in cache for the passes
# over them (the whole window's spectrum is 8 MB)
_CHUNK_FRAMES = 128


class ClapMel:
    """Callable: list of mono waveforms (<= max_samples each) -> (B, channels, frames, mels) float32.

    Windows are computed one at a time (a window's float64 spectrum is ~8 MB), so a batch gives
    exactly the values of its windows computed alone. Buffers are kept across calls, so one instance
    is not for concurrent use from several threads (featurize builds one per worker process).
    """

    def __init__(self, config: ClapMelConfig = ClapMelConfig()):
        from transformers.audio_utils import mel_filter_bank

        self.config = config
        fusion = config.truncation == "fusion"
        filters = np.asarray(mel_filter_bank(
            num_frequency_bins=config.fft_window_size // 2 + 1, num_mel_filters=config.num_mel_bins,
            min_frequency=config.frequency_min, max_frequency=config.frequency_max,
            sampling_rate=config.sample_rate, norm=None if fusion else "slaney",
            mel_scale="htk" if fusion else "slaney",
        ), dtype=np.float64)                                                    # (freqs, mels)
        used = np.flatnonzero(filters.any(axis=1))
        self._lo, self._hi = int(used[0]), int(used[-1]) + 1                     # FFT bins any filter uses
        # /16: `_hann` returns -4 X_w; a power-of-two scale is exact
        self._filters = MelBands(filters[self._lo:self._hi] / 16.0)
        self._conj = torch.tensor([1.0, -1.0], dtype=torch.float64)
        # kept across calls (fresh multi-MB float64 buffers per window cost page faults), with their views
        # per block of frames made once (each torch call costs microseconds)
        self._padded = torch.empty(config.max_samples + config.fft_window_size, dtype=torch.float64)
        band = torch.empty((_CHUNK_FRAMES, self._hi - self._lo, 2), dtype=torch.float64)
        self._power = torch.empty((config.num_frames, self._hi - self._lo))
        frames = self._padded.as_strided((config.num_frames, config.fft_window_size), (config.hop_length, 1))
        self._blocks = []
        for i in range(0, config.num_frames, _CHUNK_FRAMES):
            j = min(i + _CHUNK_FRAMES, config.num_frames)
            self._blocks.append((frames[i:j], band[:j - i], band[:j - i, :, 0], band[:j - i, :, 1],
                                 self._power[i:j]))

    def __call__(self, waves: list[np.ndarray]) -> np.ndarray:
        c = self.config
        out = np.empty((len(waves), c.channels, c.num_frames, c.num_mel_bins), dtype=np.float32)
        for i, wave in enumerate(waves):
            self.one(wave, out[i])
        return out

    def one(self, wave: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Features of one window written into `out` ((channels, frames, mels) float32)."""
        self._log_mel_into(wave, torch.from_numpy(out[0]))
        out[1:] = out[0]
        return out

    def log_mel(self, wave: np.ndarray) -> torch.Tensor:
        """(frames, mels) float32 dB of one window."""
        out = torch.empty((self.config.num_frames, self.config.num_mel_bins))
        self._log_mel_into(wave, out)
        return out

    def _log_mel_into(self, wave: np.ndarray, out: torch.Tensor) -> None:
        """Write the (frames, mels) float32 dB of one window into `out` (contiguous)."""
        c = self.config
        half = c.fft_window_size // 2
        p = self._padded.numpy()
        self._pad_into(np.asarray(wave), p[half:half + c.max_samples])
        p[:half] = p[2 * half:half:-1]                                           # centred frames, reflect
        p[-half:] = p[-half - 2:-2 * half - 2:-1]
        for frames, band, re, im, power in self._blocks:
            spec = torch.view_as_real(torch.fft.rfft(frames))                    # float64 (frames, bins, 2)
            self._hann(spec, band).square_()
            torch.add(re, im, out=power)                          # |X_w|^2 summed in float64, stored float32
        self._filters(self._power, out=out).clamp_min_(1e-10).log10_().mul_(10.0)

    def _hann(self, spec: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """-4 times bins [lo, hi) of the periodic-Hann-windowed spectrum, from the unwindowed one, written
        into `out`: the window is 0.5 - 0.5 cos(2 pi n / N), so -4 X_w[k] = X[k-1] + X[k+1] - 2 X[k]. In
        float64 this equals windowing the frames first (to ~1e-16 of the frame's energy), and it saves
        writing out windowed frames: the FFT reads the overlapping frames straight from the padded signal."""
        n, lo, hi = spec.shape[-2], self._lo, self._hi
        if 0 < lo and hi < n:                                                    # the usual case, fewest calls
            torch.add(spec[:, lo - 1:hi - 1], spec[:, lo + 1:hi + 1], out=out)
            return out.sub_(spec[:, lo:hi], alpha=2.0)
        near = spec[..., max(lo - 1, 0):min(hi + 1, n), :]
        if lo == 0:                                                              # X[-1] = conj(X[1])
            near = torch.cat([spec[..., 1:2, :] * self._conj, near], dim=-2)
        if hi == n:                                                              # X[N/2 + 1] = conj(X[N/2 - 1])
            near = torch.cat([near, spec[..., n - 2:n - 1, :] * self._conj], dim=-2)
        return torch.add(near[..., :-2, :], near[..., 2:, :], out=out).sub_(near[..., 1:-1, :], alpha=2.0)

    def _pad_into(self, wave: np.ndarray, out: np.ndarray) -> None:
        """Repeat-pad (or zero-pad) one window into `out` (max_samples long), as the reference does."""
        n, n_max = len(wave), len(out)
        if n > n_max:
            raise ValueError(f"window of {n} samples exceeds {n_max}")
        if n == 0:
            raise ValueError("empty window")
        filled = n
        if n < n_max and self.config.padding == "repeatpad":
            filled = n_max // n * n
        elif n < n_max and self.config.padding == "repeat":
            filled = n_max
        reps = -(-filled // n)
        out[:filled] = np.tile(wave, reps)[:filled] if reps > 1 else wave
        out[filled:] = 0.0
