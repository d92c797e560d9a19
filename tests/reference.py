"""The HF reference, run one file (or one window) at a time, the way users do it today."""

from __future__ import annotations

import io
from functools import lru_cache

import av
import numpy as np
import soundfile as sf
import soxr
import torch
from transformers import (ASTFeatureExtractor, ASTForAudioClassification, ClapFeatureExtractor,
                          ClapModel)


def load_mono(data: bytes) -> tuple[np.ndarray, int]:
    """soundfile (PyAV for AAC/MP4), downmixed by mean: the usual user-side loader."""
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except sf.LibsndfileError:
        with av.open(io.BytesIO(data)) as c:
            stream = c.streams.audio[0]
            rs = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=stream.rate)
            chunks = [o.to_ndarray() for f in c.decode(stream) for o in rs.resample(f)]
            chunks += [o.to_ndarray() for o in rs.resample(None)]
            samples, rate = np.concatenate(chunks, axis=1).T, stream.rate
    return samples.mean(axis=1, dtype=np.float32), int(rate)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    return wave if rate == target else soxr.resample(wave, rate, target, quality="HQ").astype(np.float32)


def resample_like_hf_pipeline(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """What HF's audio-classification pipeline does to audio at another rate: torchaudio's resample, defaults."""
    import torchaudio.functional as F

    return wave if rate == target else F.resample(torch.from_numpy(wave), rate, target).numpy()


@lru_cache(maxsize=4)
def _ast(source: str):
    return ASTFeatureExtractor.from_pretrained(source), ASTForAudioClassification.from_pretrained(source).eval()


@lru_cache(maxsize=4)
def _clap(source: str):
    return ClapFeatureExtractor.from_pretrained(source), ClapModel.from_pretrained(source).eval()


def ast_features(source: str, wave16: np.ndarray) -> np.ndarray:
    return _ast(source)[0](wave16, sampling_rate=16_000, return_tensors="np")["input_values"][0]


def clap_features(source: str, wave48: np.ndarray) -> np.ndarray:
    return _clap(source)[0](wave48, sampling_rate=48_000, return_tensors="np")["input_features"][0]


def ast_reference(source: str, wave16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, pooled embedding) of one clip through HF's extractor and model."""
    extractor, model = _ast(source)
    inputs = extractor(wave16, sampling_rate=16_000, return_tensors="pt")
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=False)
        pooled = model.audio_spectrogram_transformer(inputs["input_values"]).pooler_output
    return out.logits[0].numpy(), pooled[0].numpy()


def clap_reference(source: str, wave48: np.ndarray) -> np.ndarray:
    """Normalised audio embedding of one clip through HF's extractor and ClapModel."""
    extractor, model = _clap(source)
    inputs = extractor(wave48, sampling_rate=48_000, return_tensors="pt")
    with torch.inference_mode():
        return model.get_audio_features(**inputs).pooler_output[0].numpy()
