"""Stages 3-4 on the model actors' device (`--features-on gpu`): batched torch versions of the AST fbank
and the CLAP log-mel, computed where the model runs, from the windows that resample_device.Resample
makes there of the source slices the CPU workers ship.

The same operations as features_ast.AstFbank and features_clap.ClapMel, on a batch: (B, samples) float32
waves zero-padded to one window, with each row's real length. A row's values never depend on the other
rows or on the padding (frames that reach past a row's length are replaced by the padding value the
reference uses; repeat-padding is done here, per row, from the row's own samples; a length of 0 marks a
row that only pads a micro-batch, computed as a full window and meaningless), and the model actors
call these inside their fixed-size micro-batches, so results are batch-independent on any device. The
CLAP FFT stays float64 (features_clap's docstring says why): on consumer GPUs with slow float64 this is the
costlier half; datacenter GPUs (A100, H100) run float64 at half the float32 rate or better.
"""

from __future__ import annotations

import torch

from pipeline.audio.features_ast import _EPSILON, _PREEMPHASIS, AstFbank, AstFbankConfig
from pipeline.audio.features_clap import ClapMel, ClapMelConfig

# CLAP rows per float64 FFT: a row's frames and spectrum are ~16 MB, so 16 rows bound the transient to
# ~256 MB whatever the micro-batch
_CLAP_ROWS = 16


class AstFbankBatch:
    """Callable: ((B, samples) float32 waves, (B,) int lengths) on `device` -> (B, max_length, mels)."""

    def __init__(self, config: AstFbankConfig, device: torch.device | str = "cpu"):
        host = AstFbank(config)
        self.config = config
        self.device = torch.device(device)
        self.frame_length, self.frame_shift, self.fft_length = host.frame_length, host.frame_shift, host.fft_length
        self._banks = host._banks.to(self.device)
        self._window = host._window.to(self.device)
        self._epsilon = _EPSILON.to(self.device)

    def __call__(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        c = self.config
        b, n = waves.shape
        lengths = torch.where(lengths > 0, lengths, n)
        if n < self.frame_length or int(lengths.min()) < self.frame_length:
            raise ValueError(f"a window shorter than one {self.frame_length}-sample frame")
        m = min(c.max_length, 1 + (n - self.frame_length) // self.frame_shift)
        frames = waves.unfold(1, self.frame_length, self.frame_shift)[:, :m]        # (B, m, frame_length)
        x = frames - torch.mean(frames, dim=2).unsqueeze(2)                          # remove DC offset
        padded = torch.zeros((b, m, self.fft_length), device=waves.device)
        pre = padded[..., :self.frame_length]
        torch.sub(x[..., 1:], _PREEMPHASIS * x[..., :-1], out=pre[..., 1:])
        torch.sub(x[..., :1], _PREEMPHASIS * x[..., :1], out=pre[..., :1])
        pre.mul_(self._window)
        spec = torch.view_as_real(torch.fft.rfft(padded))
        power = spec[..., 0].square().add_(spec[..., 1].square())
        logmel = self._banks(power.reshape(b * m, -1)).clamp_min_(self._epsilon).log_().reshape(b, m, -1)
        out = torch.zeros((b, c.max_length, c.num_mel_bins), device=waves.device)
        frames_of_row = torch.clamp(1 + (lengths.to(waves.device) - self.frame_length) // self.frame_shift,
                                    max=m)
        real = torch.arange(m, device=waves.device).unsqueeze(0) < frames_of_row.unsqueeze(1)
        out[:, :m] = logmel * real.unsqueeze(2)                   # frames past a row's end: 0, as the reference
        if c.do_normalize:
            out.sub_(c.mean).div_(c.std * 2)
        return out


class ClapMelBatch:
    """Callable: ((B, samples) float32 waves, (B,) int lengths) on `device` -> (B, channels, frames, mels)."""

    def __init__(self, config: ClapMelConfig, device: torch.device | str = "cpu"):
        host = ClapMel(config)
        self.config = config
        self.device = torch.device(device)
        self._lo, self._hi = host._lo, host._hi
        self._filters = host._filters.to(self.device)                # 1/16 of the reference's filters
        n = config.fft_window_size
        self._hann = torch.hann_window(n, periodic=True, dtype=torch.float64, device=self.device)

    def __call__(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        c = self.config
        b = waves.shape[0]
        out = torch.empty((b, c.channels, c.num_frames, c.num_mel_bins), device=waves.device)
        for i in range(0, b, _CLAP_ROWS):
            out[i:i + _CLAP_ROWS, 0] = self._log_mel(self._pad(waves[i:i + _CLAP_ROWS], lengths[i:i + _CLAP_ROWS]))
        out[:, 1:] = out[:, :1]
        return out

    def _pad(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each row repeat-padded (or zero-padded) from its own first `length` samples to max_samples, in
        float64, as ClapMel._pad_into does."""
        c = self.config
        n_max = c.max_samples
        lengths = lengths.to(waves.device).long()
        lengths = torch.where(lengths > 0, lengths, min(waves.shape[1], n_max))
        if waves.shape[1] < n_max:
            waves = torch.nn.functional.pad(waves, (0, n_max - waves.shape[1]))
        if int(lengths.min()) <= 0 or int(lengths.max()) > n_max:
            raise ValueError(f"window lengths must be in [1, {n_max}] samples")
        filled = lengths
        if c.padding == "repeatpad":
            filled = torch.where(lengths < n_max, n_max // lengths * lengths, lengths)
        elif c.padding == "repeat":
            filled = torch.full_like(lengths, n_max)
        at = torch.arange(n_max, device=waves.device).unsqueeze(0)
        x = torch.gather(waves[:, :n_max].double(), 1, at % lengths.unsqueeze(1))
        return x * (at < filled.unsqueeze(1))

    def _log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """(B, max_samples) float64 -> (B, frames, mels) float32 dB: centred, reflect-padded frames, periodic
        Hann, float64 FFT; the power of the bins any filter uses, stored float32; mel; 10 log10."""
        c = self.config
        half = c.fft_window_size // 2
        x = torch.nn.functional.pad(x.unsqueeze(1), (half, half), mode="reflect").squeeze(1)
        frames = x.unfold(1, c.fft_window_size, c.hop_length)                   # (B, frames, fft)
        spec = torch.view_as_real(torch.fft.rfft(frames * self._hann)[..., self._lo:self._hi])
        power = (spec[..., 0].square() + spec[..., 1].square()).mul_(16.0).float()  # filters are /16
        b, f, k = power.shape
        mel = self._filters(power.reshape(b * f, k)).reshape(b, f, -1)
        return mel.clamp_min_(1e-10).log10_().mul_(10.0)
