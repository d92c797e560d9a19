"""Stage 5a, AST tagging actor: window fbanks -> sigmoid scores over the checkpoint's labels and the
pooled embedding (mean of the CLS and distillation tokens after the final LayerNorm).

AudioSet is multi-label, so scores are sigmoid(logits); HF's audio-classification pipeline defaults
to softmax, which is wrong here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrow import blobs_to_array, fixed_list, where
from pipeline.audio.features_ast import AstFbankConfig
from pipeline.audio.features_device import AstFbankBatch
from pipeline.audio.resample_device import Resample
from pipeline.checkpoints import load_ast
from pipeline.models.device import Placement, Staging, run_fixed_batches, wave_inputs

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("ast_features",)  # the waveform columns stay: the CLAP actor reads them next, and drops them


@dataclass(frozen=True)
class TaggerConfig:
    """Checkpoint source; `micro_batch` windows per forward pass (fixed, padded); CPU threads."""

    source: str
    num_frames: int = 1024
    num_mel_bins: int = 128
    micro_batch: int = 8
    cpu_threads: int = 1
    precision: str = "fp32"   # "fp32" or "bf16" (device.PRECISIONS), whatever the device
    fbank: AstFbankConfig | None = None   # set: features computed here from waveforms (--features-on gpu)
    window_s: float = 10.24               # the window's length, in seconds (--features-on gpu)


class AstTagger:
    """Callable for `map_batches(batch_format="pyarrow")` on an actor pool.

    Reads `ast_features`, or with `config.fbank` the source slices `wave` (featurize.py; resampled and
    featurized on the actor's device, in float32); adds `scores` and `ast_embedding` (null on error rows);
    drops `ast_features`.
    """

    def __init__(self, config: TaggerConfig):
        self.config = config
        self.placement = Placement.detect(config.cpu_threads, config.precision)
        self.staging = [Staging(self.placement), Staging(self.placement)]
        self.fbank = AstFbankBatch(config.fbank, self.placement.device) if config.fbank else None
        self.resample = (Resample(config.fbank.sample_rate, config.window_s, self.placement.device)
                         if config.fbank else None)
        self.model = self.placement.prepare(load_ast(config.source))
        self.num_labels = self.model.config.num_labels
        self.hidden = self.model.config.hidden_size
        log.info("AST %s loaded on %s (%s)", config.source, self.placement.device, self.placement.precision)

    def _forward(self, features):
        pooled = self.model.audio_spectrogram_transformer(features).pooler_output
        return self.model.classifier(pooled).sigmoid(), pooled

    def _forward_waves(self, slices, plans):
        return self._forward(self.placement.cast(self.fbank(*self.resample(slices, plans))))

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = np.asarray(pc.equal(batch.column("status"), "ok").fill_null(False))
        scores = np.zeros((len(batch), self.num_labels), np.float32)
        pooled = np.zeros((len(batch), self.hidden), np.float32)
        mb = self.config.micro_batch
        if ok.any() and self.fbank is not None:
            inputs = wave_inputs(batch, ok, self.resample)
            scores[ok], pooled[ok] = run_fixed_batches(self._forward_waves, inputs, mb, self.placement,
                                                       self.staging, cast=False)
        elif ok.any():
            shape = (self.config.num_frames, self.config.num_mel_bins)
            features = blobs_to_array(where(batch.column("ast_features"), ok), shape)
            scores[ok], pooled[ok] = run_fixed_batches(self._forward, features, mb, self.placement, self.staging)
        batch = batch.drop_columns([c for c in INPUT_COLUMNS if c in batch.column_names])
        batch = batch.append_column("scores", fixed_list(scores, ok))
        return batch.append_column("ast_embedding", fixed_list(pooled, ok))
