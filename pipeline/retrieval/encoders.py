"""Query encoders for search: text through the CLAP text tower, audio through the job's own decode,
window and CLAP feature code, so a query lands in the same space as the stored embeddings."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.checkpoints import SAFE_LOAD, resolve
from pipeline.audio.decode import DecodeConfig, Decoder
from pipeline.models.embedder import ClapEmbedder, EmbedderConfig
from pipeline.audio.features_clap import ClapMel, ClapMelConfig
from pipeline.audio.windows import WindowConfig, plan_windows, sample_span


class TextEncoder:
    """Callable: list of texts -> (N, dim) L2-normalised CLAP text embeddings."""

    def __init__(self, clap_source: str, max_length: int = 77):
        from transformers import AutoTokenizer, ClapModel

        local = resolve(clap_source)
        self.tokenizer = AutoTokenizer.from_pretrained(local)
        self.model = ClapModel.from_pretrained(local, **SAFE_LOAD).eval()
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> np.ndarray:
        inputs = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(**inputs)
        return out.pooler_output.float().numpy()

    @property
    def logit_scale(self) -> float:
        """CLAP's learned temperature for audio-text logits."""
        return float(self.model.logit_scale_a.detach().exp())


class AudioEncoder:
    """Callable: audio file bytes -> one L2-normalised CLAP embedding (normalised mean of windows)."""

    def __init__(self, clap_source: str, hop_s: float = 10.0):
        self.mel_config = ClapMelConfig.from_pretrained(clap_source)
        self.mel = ClapMel(self.mel_config)
        self.decoder = Decoder(DecodeConfig(rates=(self.mel_config.sample_rate,)))
        self.windows = WindowConfig(hop_s=hop_s)
        c = self.mel_config
        # micro-batch 1, as the job on CPU: a one-window query is never padded to 8 windows of compute
        self.embedder = ClapEmbedder(EmbedderConfig(clap_source, (c.channels, c.num_frames, c.num_mel_bins),
                                                    micro_batch=1))

    def __call__(self, data: bytes) -> np.ndarray:
        audio = self.decoder(data)
        rate = self.mel_config.sample_rate
        wave = audio.waves[rate]
        spans = [sample_span(w.start_s, self.windows.clap_window_s, rate)
                 for w in plan_windows(audio.duration_s, self.windows)]
        embeddings = self.embedder.embed(self.mel([wave[s] for s in spans]))
        mean = embeddings.mean(axis=0)
        return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)
