"""Benchmark inputs shared by the scripts: a corpus of 10 s 44.1 kHz stereo FLAC clips and random-weight
checkpoints of the published architectures at full size."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import soundfile as sf


def make_corpus(directory: Path, files: int, seconds: float = 10.0, rate: int = 44_100,
                workers: int | None = None) -> None:
    """`files` stereo FLAC clips (a tone per file plus noise seeded by its index, so any subset is the
    same whatever the count), written by `workers` processes (default: every core; 6,000 clips take
    minutes on one)."""
    directory.mkdir(parents=True, exist_ok=True)
    jobs = [(directory, i, seconds, rate) for i in range(files)]
    workers = workers or min(os.cpu_count() or 1, max(1, files // 32))
    if workers == 1:
        for job in jobs:
            _write_clip(*job)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.starmap(_write_clip, jobs, chunksize=16)


def _write_clip(directory: Path, i: int, seconds: float, rate: int) -> None:
    rng = np.random.default_rng([0, i])
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.2 * np.sin(2 * np.pi * (200 + 10 * (i % 1000)) * t)  # 200 Hz to 10.19 kHz, below Nyquist
    data = np.stack([tone + 0.02 * rng.standard_normal(len(t)) for _ in range(2)], axis=1)
    sf.write(directory / f"clip{i:05d}.flac", data.astype(np.float32), rate)


def build_full_size(root: Path, seed: int = 0) -> dict:
    """Random-weight checkpoints at the published sizes (AST base 768x12, CLAP HTSAT-tiny + RoBERTa-base)."""
    import torch
    from transformers import (ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ClapConfig,
                              ClapFeatureExtractor, ClapModel)

    from pipeline.demo import build_tiny_tokenizer

    torch.manual_seed(seed)
    ast_dir, clap_dir = root / "ast-full", root / "clap-full"
    ASTForAudioClassification(ASTConfig(num_labels=527)).save_pretrained(ast_dir)
    ASTFeatureExtractor().save_pretrained(ast_dir)
    ClapModel(ClapConfig()).save_pretrained(clap_dir)
    ClapFeatureExtractor(frequency_min=50, frequency_max=14_000, truncation="rand_trunc").save_pretrained(clap_dir)
    build_tiny_tokenizer(clap_dir)
    return {"ast": str(ast_dir), "clap": str(clap_dir)}
