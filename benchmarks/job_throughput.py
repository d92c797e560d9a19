"""End-to-end tagging-job throughput on this machine: files/s and audio-seconds/s.

Builds a corpus of 10 s, 44.1 kHz stereo FLAC clips and random-weight checkpoints (tiny, or the
published architectures' full sizes), runs the real job through local Ray, prints a table and writes
JSON. Usage: python -m benchmarks.job_throughput [--files 64] [--size tiny|full] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger("benchmarks.job_throughput")


def make_corpus(directory: Path, files: int, seconds: float = 10.0, rate: int = 44_100) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    for i in range(files):
        tone = 0.2 * np.sin(2 * np.pi * (200 + 10 * i) * t)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=64)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--out", default="benchmarks/results/job_throughput.json")
    args = p.parse_args(argv)
    logging.basicConfig(level="WARNING")
    import ray

    from pipeline.demo import build_tiny_ast, build_tiny_clap
    from pipeline.job import TagJobConfig, run_tag_job

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root / "audio", args.files)
        if args.size == "full":
            models = build_full_size(root / "models")
        else:
            models = {"ast": str(build_tiny_ast(root / "models" / "ast")),
                      "clap": str(build_tiny_clap(root / "models" / "clap"))}
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        started = time.time()
        summary = run_tag_job(TagJobConfig(input=str(root / "audio"), output=str(root / "out"),
                                           ast_model=models["ast"], clap_model=models["clap"]))
        wall = time.time() - started
        ray.shutdown()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"), "models": args.size, "files": args.files,
        "clip_seconds": 10.0, "wall_s": round(wall, 2), "files_per_s": round(args.files / wall, 3),
        "audio_s_per_s": round(10.0 * args.files / wall, 2), "summary": summary,
    }
    print(f"{'models':<8}{'files':>7}{'wall s':>9}{'files/s':>9}{'audio s/s':>11}")
    print(f"{args.size:<8}{args.files:>7}{result['wall_s']:>9}{result['files_per_s']:>9}{result['audio_s_per_s']:>11}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
