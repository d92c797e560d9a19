"""Stage 3, AST features: Kaldi log-mel filterbank, 128 bins, 10 ms hop, normalised for the checkpoint.

Matches transformers' ASTFeatureExtractor (torchaudio path): `kaldi.fbank` with a Hanning window,
25 ms frames, dither 0, then zero-pad or cut to `max_length` frames, then (x - mean) / (2 * std).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi


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


class AstFbank:
    """Callable: mono float32 waveform at `sample_rate` -> (max_length, num_mel_bins) float32."""

    def __init__(self, config: AstFbankConfig = AstFbankConfig()):
        self.config = config

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        c = self.config
        fbank = kaldi.fbank(
            torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)).unsqueeze(0),
            htk_compat=True, sample_frequency=c.sample_rate, use_energy=False, window_type="hanning",
            num_mel_bins=c.num_mel_bins, dither=0.0, frame_length=c.frame_length_ms,
            frame_shift=c.frame_shift_ms,
        )
        out = np.zeros((c.max_length, c.num_mel_bins), dtype=np.float32)
        n = min(c.max_length, fbank.shape[0])
        out[:n] = fbank[:n].numpy()
        if c.do_normalize:
            out = (out - c.mean) / (c.std * 2)
        return out.astype(np.float32, copy=False)
