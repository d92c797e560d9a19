"""Resampling on the model actors' device (`--features-on gpu`), window by window.

The resampler is torchaudio.functional.resample at its defaults (a Hann-windowed sinc, 6 zero crossings,
roll-off 0.99): what HF's audio-classification pipeline applies to audio at another rate. With source
rate o and target rate q (both divided by their gcd) and a W-sample half-width, resampling a whole file of
n samples computes output block m (samples m*q ... m*q + q - 1) from source samples [m*o - W, m*o + o + W),
zeros outside the file, and keeps ceil(q*n/o) samples. So the samples [a, a + L) of one window need only
blocks a // q to (a + L - 1) // q: `span` names the source samples they read. The CPU workers ship that
slice of the source waveform per window (zeros past the file's ends), and `Resample` on the actor gives
what resampling the whole file and cutting the window out gives (to float rounding of the convolution).
Each row is resampled on its own, so its values never depend on the other rows of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from pipeline.audio.windows import sample_span

LOWPASS_WIDTH = 6   # zero crossings of the sinc on each side (torchaudio's default)
ROLLOFF = 0.99      # cut-off as a fraction of the lower Nyquist frequency (torchaudio's default)
# what the settings record (tagging/job.py's run_metadata): results depend on it
DEVICE_RESAMPLER = {"method": "torchaudio.functional.resample", "window": "hann", "lowpass_filter_width": LOWPASS_WIDTH,
                    "rolloff": ROLLOFF}
PLAN_FIELDS = ("source_step", "target_step", "half_width", "offset", "count", "crop", "length")


@dataclass(frozen=True)
class Span:
    """What one window at the target rate reads from the source waveform (all in samples)."""

    first: int    # first source sample read (negative, or past the file's end: zeros)
    count: int    # source samples read
    crop: int     # output samples computed before the window's first one
    length: int   # the window's real output samples; the rest of the window is zero padding
    source_step: int   # o: source rate / gcd
    target_step: int   # q: target rate / gcd
    half_width: int    # W


@lru_cache(maxsize=256)
def _steps(rate: int, target: int) -> tuple[int, int, int]:
    g = math.gcd(rate, target)
    o, q = rate // g, target // g
    return o, q, math.ceil(LOWPASS_WIDTH * o / (min(o, q) * ROLLOFF))


def span(rate: int, target: int, frames: int, start_s: float, window_s: float) -> Span:
    """The source samples that window [start_s, start_s + window_s) at `target` Hz needs from a file of
    `frames` samples at `rate` Hz."""
    window = sample_span(start_s, window_s, target)
    a, size = window.start, window.stop - window.start
    if rate == target:
        return Span(a, size, 0, max(0, min(size, frames - a)), 1, 1, 0)
    o, q, width = _steps(rate, target)
    total = -(-q * frames // o)                      # ceil(q * frames / o): torchaudio's output length
    first_block, crop = divmod(a, q)
    blocks = -(-(crop + size) // q)
    return Span(first_block * o - width, blocks * o + 2 * width, crop, max(0, min(size, total - a)), o, q, width)


def kernel(source_step: int, target_step: int, half_width: int) -> torch.Tensor:
    """(q, 1, 2W + o) float32 filters, computed as torchaudio computes them for a float32 waveform."""
    o, q = source_step, target_step
    base = min(o, q) * ROLLOFF
    idx = torch.arange(-half_width, half_width + o, dtype=torch.float32)[None, None] / o
    t = torch.arange(0, -q, -1, dtype=torch.float32)[:, None, None] / q + idx
    t *= base
    t = t.clamp_(-LOWPASS_WIDTH, LOWPASS_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_WIDTH / 2) ** 2
    t *= math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels *= window * (base / o)
    return kernels


class Resample:
    """Callable on the device: ((B, S) float32 source slices, (B, 7) int64 plans) -> ((B, window) float32
    waves at `target` Hz, zero-padded, (B,) lengths). A plan row (PLAN_FIELDS) says where the row's span
    starts in its slice; a row of zeros is a micro-batch's padding (length 0)."""

    def __init__(self, target: int, window_s: float, device: torch.device | str = "cpu"):
        self.target, self.window_s = target, window_s
        self.size = sample_span(0.0, window_s, target).stop
        self.device = torch.device(device)
        self._kernels: dict[tuple[int, int, int], torch.Tensor] = {}

    def plan(self, rates: np.ndarray, firsts: np.ndarray, frames: np.ndarray, starts_s: np.ndarray) -> np.ndarray:
        """(N, 7) int64 plans for rows whose slices start at source sample `firsts`, from files of
        `frames` samples at `rates` Hz, for windows starting at `starts_s`."""
        plans = np.zeros((len(rates), len(PLAN_FIELDS)), np.int64)
        for i, (rate, first, n, start_s) in enumerate(zip(rates.tolist(), firsts.tolist(), frames.tolist(),
                                                          starts_s.tolist())):
            s = span(int(rate), self.target, int(n), float(start_s), self.window_s)
            plans[i] = (s.source_step, s.target_step, s.half_width, s.first - first, s.count, s.crop, s.length)
        return plans

    def __call__(self, slices: torch.Tensor, plans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros((slices.shape[0], self.size), dtype=torch.float32, device=slices.device)
        rows = plans.tolist()
        for i, (o, q, width, offset, count, crop, length) in enumerate(rows):
            if length <= 0:
                continue
            if offset < 0 or offset + count > slices.shape[1]:
                raise ValueError(f"row {i}: its slice does not hold samples [{offset}, {offset + count})")
            x = slices[i, offset:offset + count]
            if o != q:  # torchaudio's strided conv1d as a matmul: cuDNN may run float32 convs in TF32
                x = (x.unfold(0, 2 * width + o, o) @ self._kernel(o, q, width).T).reshape(-1)
            out[i, :length] = x[crop:crop + length]
        return out, torch.tensor([r[6] for r in rows], dtype=torch.int64, device=slices.device)

    def _kernel(self, o: int, q: int, width: int) -> torch.Tensor:
        """(q, 2W + o) filters on the device."""
        key = (o, q, width)
        if key not in self._kernels:
            self._kernels[key] = kernel(o, q, width)[:, 0].to(self.device)
        return self._kernels[key]


def slice_bounds(spans: list[Span]) -> tuple[int, int]:
    """[first, end) source samples that hold every span: what a worker ships for one window."""
    return min(s.first for s in spans), max(s.first + s.count for s in spans)
