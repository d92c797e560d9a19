"""Feature stage, one thread: clips/s of our decode + resample + AST fbank + CLAP mel, against the
reference way (soundfile, soxr, HF ASTFeatureExtractor + ClapFeatureExtractor; parity checked in the
same run) and against the floor (decode + one resample + the bare FFTs both spectrograms need).

Usage: python -m benchmarks.features [--clips 12] [--repeats 3] [--out benchmarks/results/features.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from pipeline.decode import Decoder
from pipeline.features_ast import AstFbank, AstFbankConfig
from pipeline.features_clap import ClapMel, ClapMelConfig
from pipeline.windows import sample_span


def corpus(fmt: str, clips: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    t = np.arange(441_000) / 44_100
    out = []
    for i in range(clips):
        x = np.stack([0.2 * np.sin(2 * np.pi * (220 + 20 * i + c) * t) + 0.02 * rng.standard_normal(len(t))
                      for c in range(2)], axis=1).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, x, 44_100, format=fmt)
        out.append(buf.getvalue())
    return out


def ours(decoder, fbank, mel):
    def run(data):
        audio = decoder(data)
        a = fbank(audio.waves[16_000][sample_span(0, 10.24, 16_000)])
        c = mel([audio.waves[48_000][sample_span(0, 10.0, 48_000)]])
        return a, c[0]
    return run


def reference(ast_fe, clap_fe):
    def run(data):
        x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        mono = x.mean(axis=1, dtype=np.float32)
        w16 = soxr.resample(mono, rate, 16_000, quality="HQ").astype(np.float32)
        w48 = soxr.resample(mono, rate, 48_000, quality="HQ").astype(np.float32)
        a = ast_fe(w16, sampling_rate=16_000, return_tensors="np")["input_values"][0]
        c = clap_fe(w48[:480_000], sampling_rate=48_000, return_tensors="np")["input_features"][0]
        return a, c
    return run


def floor(data):
    x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    w48 = soxr.resample(x[:, 0], rate, 48_000, quality="HQ")
    torch.fft.rfft(torch.zeros((998, 512)))                                              # AST: 998 frames
    torch.fft.rfft(torch.from_numpy(np.ascontiguousarray(w48[:480_000])).reshape(1000, 480), n=1024)  # CLAP


def timed(fn, items, repeats) -> float:
    """Median seconds per clip over `repeats` passes."""
    fn(items[0])
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for data in items:
            fn(data)
        runs.append((time.perf_counter() - t) / len(items))
    return float(np.median(runs))


def split(items, decoder, fbank, mel, repeats) -> dict:
    """Median ms per clip of each of our steps."""
    steps = {"decode": [], "resample": [], "ast_fbank": [], "clap_mel": []}
    for _ in range(repeats):
        for data in items:
            t0 = time.perf_counter()
            x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
            t1 = time.perf_counter()
            audio = decoder(data)
            t2 = time.perf_counter()
            fbank(audio.waves[16_000][:163_840])
            t3 = time.perf_counter()
            mel([audio.waves[48_000][:480_000]])
            t4 = time.perf_counter()
            steps["decode"].append(t1 - t0)
            steps["resample"].append(max(0.0, (t2 - t1) - (t1 - t0)))
            steps["ast_fbank"].append(t3 - t2)
            steps["clap_mel"].append(t4 - t3)
    return {k: round(float(np.median(v)) * 1000, 2) for k, v in steps.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/features.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import ASTFeatureExtractor, ClapFeatureExtractor

    ast_fe, clap_fe = ASTFeatureExtractor(), ClapFeatureExtractor(frequency_min=50, frequency_max=14_000,
                                                                   truncation="rand_trunc")
    decoder, fbank, mel = Decoder(), AstFbank(AstFbankConfig()), ClapMel(ClapMelConfig())
    rows = []
    for fmt in ("WAV", "FLAC", "MP3"):
        items = corpus(fmt, args.clips)
        a, c = ours(decoder, fbank, mel)(items[0])
        ra, rc = reference(ast_fe, clap_fe)(items[0])
        t_ours = timed(ours(decoder, fbank, mel), items, args.repeats)
        t_ref = timed(reference(ast_fe, clap_fe), items, args.repeats)
        t_floor = timed(floor, items, args.repeats)
        rows.append({"format": fmt, "ours_clips_per_s": round(1 / t_ours, 2), "reference_clips_per_s": round(1 / t_ref, 2),
                     "floor_clips_per_s": round(1 / t_floor, 2), "speedup_vs_reference": round(t_ref / t_ours, 2),
                     "ours_over_floor": round(t_ours / t_floor, 2),
                     "parity_ast_max_abs": float(np.abs(a - ra).max()), "parity_clap_max_abs_db": float(np.abs(c - rc).max()),
                     "split_ms": split(items, decoder, fbank, mel, 1)})
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 thread", "date": time.strftime("%Y-%m-%d"),
              "clip": "10 s, 44.1 kHz stereo", "rows": rows}
    print(f"{'format':<6} {'ours/s':>8} {'ref/s':>8} {'floor/s':>8} {'x ref':>6} {'/floor':>7}  split ms (decode, resample, fbank, mel)")
    for r in rows:
        s = r["split_ms"]
        print(f"{r['format']:<6} {r['ours_clips_per_s']:>8} {r['reference_clips_per_s']:>8} {r['floor_clips_per_s']:>8} "
              f"{r['speedup_vs_reference']:>6} {r['ours_over_floor']:>7}  {s['decode']}, {s['resample']}, {s['ast_fbank']}, {s['clap_mel']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
