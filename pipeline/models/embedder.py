"""Stage 5b, CLAP embedding actor: window log-mels -> L2-normalised audio embeddings.

Windows are at most 10 s, so `is_longer` is always False: no random fusion crops, and (unlike HF's
extractor with fusion checkpoints) no randomly chosen "longer" clip per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.arrow import blobs_to_array, fixed_list, where
from pipeline.audio.features_clap import ClapMelConfig
from pipeline.audio.features_device import ClapMelBatch
from pipeline.audio.resample_device import Resample
from pipeline.checkpoints import load_clap
from pipeline.models.device import WAVE_COLUMNS, Placement, Staging, run_fixed_batches, wave_inputs

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("clap_features",) + WAVE_COLUMNS


@dataclass(frozen=True)
class EmbedderConfig:
    """Checkpoint source; feature shape (channels, frames, mels); fixed micro-batch; CPU threads."""

    source: str
    feature_shape: tuple[int, int, int] = (1, 1001, 64)
    micro_batch: int = 8
    cpu_threads: int = 1
    precision: str = "fp32"   # "fp32" or "bf16" (device.PRECISIONS), whatever the device
    mel: ClapMelConfig | None = None   # set: features computed here from waveforms (--features-on gpu)
    window_s: float = 10.0             # the window's length, in seconds (--features-on gpu)


class ClapEmbedder:
    """Callable for `map_batches(batch_format="pyarrow")` on an actor pool.

    Reads `clap_features`, or with `config.mel` the source slices `wave` (featurize.py; resampled and
    featurized on the actor's device: float64 FFT, float32 mel); adds `clap_embedding` (null on error
    rows); drops its inputs, the source slices included.
    """

    def __init__(self, config: EmbedderConfig):
        self.config = config
        self.placement = Placement.detect(config.cpu_threads, config.precision)
        self.staging = [Staging(self.placement), Staging(self.placement)]
        self.mel = ClapMelBatch(config.mel, self.placement.device) if config.mel else None
        self.resample = Resample(config.mel.sample_rate, config.window_s, self.placement.device) if config.mel else None
        self.model = self.placement.prepare(load_clap(config.source))
        self.dim = self.model.config.projection_dim
        log.info("CLAP %s loaded on %s (%s)", config.source, self.placement.device, self.placement.precision)

    def _forward(self, features):
        is_longer = torch.zeros((features.shape[0], 1), dtype=torch.bool, device=features.device)
        out = self.model.get_audio_features(input_features=features, is_longer=is_longer)
        return (out.pooler_output,)

    def _forward_waves(self, slices, plans):
        return self._forward(self.placement.cast(self.mel(*self.resample(slices, plans))))

    def embed(self, features: np.ndarray) -> np.ndarray:
        """(N, channels, frames, mels) log-mels -> (N, dim) normalised embeddings."""
        (embeddings,) = run_fixed_batches(self._forward, features, self.config.micro_batch, self.placement,
                                          self.staging[0])
        return embeddings

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = np.asarray(pc.equal(batch.column("status"), "ok").fill_null(False))
        embeddings = np.zeros((len(batch), self.dim), np.float32)
        if ok.any() and self.mel is not None:
            (embeddings[ok],) = run_fixed_batches(self._forward_waves, wave_inputs(batch, ok, self.resample),
                                                  self.config.micro_batch, self.placement, self.staging, cast=False)
        elif ok.any():
            features = blobs_to_array(where(batch.column("clap_features"), ok),
                                      self.config.feature_shape)
            embeddings[ok] = self.embed(features)
        batch = batch.drop_columns([c for c in INPUT_COLUMNS if c in batch.column_names])
        return batch.append_column("clap_embedding", fixed_list(embeddings, ok))
