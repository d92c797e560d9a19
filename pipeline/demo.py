"""Local defaults: a small generated audio corpus and small random-weight checkpoints.

The checkpoints use the real AST and CLAP architectures (ASTConfig, ClapConfig) at small sizes with
random weights. They exercise the exact loading and inference code users hit with the published
checkpoints, but their labels and embeddings are meaningless: they are UNTRAINED.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

UNTRAINED_NOTE = "random weights, untrained: outputs exercise the code path but carry no meaning"
TINY_AST_LABELS = ["Speech", "Music", "Dog", "Bark", "Rain", "Siren", "Engine", "Silence"]


def build_tiny_ast(path: str | Path, seed: int = 0) -> Path:
    """Save a small random-weight ASTForAudioClassification with its feature extractor."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(seed)
    path = Path(path)
    config = ASTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_mel_bins=128, max_length=1024,
        id2label=dict(enumerate(TINY_AST_LABELS)),
        label2id={name: i for i, name in enumerate(TINY_AST_LABELS)},
    )
    model = ASTForAudioClassification(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    ASTFeatureExtractor().save_pretrained(path)
    _mark_untrained(path)
    return path


def build_tiny_tokenizer(path: str | Path) -> None:
    """Save a tiny byte-level BPE tokenizer in RoBERTa's format (what ClapProcessor loads)."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaTokenizerFast

    corpus = [
        "This is a sound of dog barking.", "rain on a tin roof", "a siren in the city",
        "engine idling", "people talking in a cafe", "birds singing at dawn", "music with drums",
    ]
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 10, vocab_size=300, min_frequency=1, special_tokens=specials)
    bpe._tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", pad_token="<pad>",
                               eos_token="</s>", unk_token="<unk>", mask_token="<mask>",
                               model_max_length=77)
    tok.save_pretrained(path)


def build_tiny_clap(path: str | Path, seed: int = 0) -> Path:
    """Save a small random-weight ClapModel (HTSAT audio tower, rand_trunc) with processor files."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    torch.manual_seed(seed)
    path = Path(path)
    build_tiny_tokenizer(path)
    config = ClapConfig(
        text_config=dict(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80, projection_dim=16),
        audio_config=dict(patch_embeds_hidden_size=8, hidden_size=64, depths=[1, 1, 1, 1],
                          num_attention_heads=[1, 1, 2, 2], projection_dim=16, num_mel_bins=64,
                          spec_size=256, window_size=8, enable_fusion=False),
        projection_dim=16,
    )
    model = ClapModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    ClapFeatureExtractor(frequency_min=50, frequency_max=14000, truncation="rand_trunc",
                         padding="repeatpad").save_pretrained(path)
    _mark_untrained(path)
    return path


def _mark_untrained(path: Path) -> None:
    (path / "UNTRAINED.txt").write_text(UNTRAINED_NOTE + "\n")


def write_sample_corpus(directory: str | Path, seed: int = 0) -> list[Path]:
    """A small mixed corpus: tones and noise in wav/flac/ogg at odd rates, stereo, a 25 s file,
    and a few broken files (empty, text named .flac, truncated wav) to show error rows."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = [("tone_440_16k.wav", 16_000, 1, 3.0, "WAV"), ("chirp_44k_stereo.flac", 44_100, 2, 5.0, "FLAC"),
             ("noise_22k.ogg", 22_050, 1, 2.0, "OGG"), ("tone_8k.wav", 8_000, 1, 0.05, "WAV"),
             ("long_48k.flac", 48_000, 1, 25.0, "FLAC"), ("tone_96k.wav", 96_000, 2, 1.5, "WAV")]
    paths = []
    for name, rate, channels, seconds, fmt in specs:
        t = np.arange(int(rate * seconds)) / rate
        base = 0.3 * np.sin(2 * np.pi * (220 + 200 * t) * t) + 0.05 * rng.standard_normal(len(t))
        data = np.stack([base * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)
        sf.write(directory / name, data, rate, format=fmt)
        paths.append(directory / name)
    (directory / "empty.wav").write_bytes(b"")
    (directory / "notes_named.flac").write_text("this is text, not audio\n")
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16_000, np.float32), 16_000, format="WAV", subtype="PCM_16")
    (directory / "header_only.wav").write_bytes(buf.getvalue()[:44])
    paths += [directory / n for n in ("empty.wav", "notes_named.flac", "header_only.wav")]
    return paths


def prepare_demo(root: str | Path) -> dict:
    """Create (once) the sample corpus and tiny checkpoints under `root`; return their paths."""
    root = Path(root)
    paths = {"input": root / "audio", "ast": root / "models" / "tiny-ast", "clap": root / "models" / "tiny-clap",
             "output": root / "output"}
    if not paths["input"].exists():
        write_sample_corpus(paths["input"])
    if not (paths["ast"] / "config.json").exists():
        build_tiny_ast(paths["ast"])
    if not (paths["clap"] / "config.json").exists():
        build_tiny_clap(paths["clap"])
    log.info("demo corpus %s; checkpoints %s, %s (%s)", paths["input"], paths["ast"], paths["clap"],
             UNTRAINED_NOTE)
    return {k: str(v) for k, v in paths.items()}
