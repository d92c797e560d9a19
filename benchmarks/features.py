"""Feature stage, one thread: clips/s of our decode + resample + AST fbank + CLAP mel, against the
reference way (soundfile, soxr, HF ASTFeatureExtractor + ClapFeatureExtractor; parity checked on every
clip in the same run) and against the floor (decode + one resample + the bare FFTs both spectrograms
need), with the cost of each of our steps and of alternatives measured alongside (speed-ups tried
and rejected, the torchaudio fbank we replaced).

Everything is timed interleaved (for each clip: ours, reference, floor, each step, each candidate, in
a rotating order), so load from other work hits all of them alike. Two clocks: CPU time of this
process (what one core spends; robust to other processes on a shared machine) and wall time.
Figures are medians over clips x repeats.

Usage: python -m benchmarks.features [--clips 12] [--repeats 3] [--out benchmarks/results/features.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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
import torchaudio.compliance.kaldi as kaldi

from pipeline.audio.decode import Decoder, _downmix
from pipeline.audio.features_ast import AstFbank, AstFbankConfig
from pipeline.audio.features_clap import ClapMel, ClapMelConfig
from pipeline.audio.windows import sample_span

STEPS = ("read", "downmix", "resample_16k", "resample_48k", "ast_fbank", "ast_fft_f32", "clap_mel", "clap_fft_f64")
CANDIDATES = ("one_resample_48k_to_16k", "clap_mel_fft_f32", "clap_fft_f64_numpy", "ast_fbank_torchaudio")


def corpus(fmt: str, clips: int) -> list[bytes]:
    """10 s, 44.1 kHz stereo: a tone plus noise, different per clip and channel."""
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


def clap_frames_f64(wave48: np.ndarray) -> torch.Tensor:
    """The overlapping float64 frames ClapMel feeds its FFT (reflect-padded, centred)."""
    padded = np.pad(wave48.astype(np.float64), 512, mode="reflect")
    return torch.from_numpy(padded).as_strided((1001, 1024), (480, 1))


class ClapMelF32:
    """Rejected candidate: the CLAP mel with a float32 STFT (torch.stft), for its cost and parity."""

    def __init__(self, config: ClapMelConfig):
        from transformers.audio_utils import mel_filter_bank

        self.filters = torch.from_numpy(np.asarray(mel_filter_bank(
            num_frequency_bins=513, num_mel_filters=config.num_mel_bins, min_frequency=config.frequency_min,
            max_frequency=config.frequency_max, sampling_rate=config.sample_rate, norm="slaney",
            mel_scale="slaney"), dtype=np.float32))
        self.window = torch.hann_window(1024, periodic=True)

    def __call__(self, wave48: np.ndarray) -> np.ndarray:
        spec = torch.stft(torch.from_numpy(wave48), 1024, 480, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        r = torch.view_as_real(spec)
        power = (r[..., 0].square() + r[..., 1].square()).T.contiguous()
        return (10 * torch.log10(torch.clamp(power @ self.filters, min=1e-10))).numpy()


def chirp48() -> np.ndarray:
    """10 s sweep at 48 kHz: tonal, so most mel bands sit far below the frame's loudest one."""
    t = np.arange(480_000) / 48_000
    return (0.3 * np.sin(2 * np.pi * (150 + 120 * t) * t)).astype(np.float32)


@contextlib.contextmanager
def one_thread():
    """torch and numpy's OpenBLAS (HF's extractors call np.dot) on one thread, restored afterwards.
    Without the OpenBLAS limit its idle thread spins after every call, and on a shared 2-core machine
    that CPU time was charged to whatever ran next (the floor came out slower than ours)."""
    get_blas, set_blas = _openblas_threads()
    torch_before, blas_before = torch.get_num_threads(), get_blas()
    torch.set_num_threads(1)
    set_blas(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_before)
        set_blas(blas_before)


def _openblas_threads():
    """(get, set) thread-count functions of the OpenBLAS that numpy loaded."""
    for path in sorted(Path(np.__file__).parent.parent.glob("numpy.libs/*openblas*")):
        lib = ctypes.CDLL(str(path))            # already loaded by numpy: the same instance
        for prefix, suffix in (("scipy_openblas_", "64_"), ("openblas_", "")):
            if hasattr(lib, f"{prefix}set_num_threads{suffix}"):
                return getattr(lib, f"{prefix}get_num_threads{suffix}"), getattr(lib, f"{prefix}set_num_threads{suffix}")
    if os.environ.get("OPENBLAS_NUM_THREADS") == "1":
        return (lambda: 1), (lambda n: None)
    raise RuntimeError("cannot find numpy's OpenBLAS to limit it to one thread; run with OPENBLAS_NUM_THREADS=1")


def clip_jobs(data, run_ours, run_ref, decoder, fbank, mel, mel_f32) -> dict:
    """Zero-argument callables for one clip: the three ways, each of our steps alone, the candidates."""
    x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = _downmix(x)
    audio = decoder(data)
    w16, w48 = audio.waves[16_000], audio.waves[48_000][:480_000]
    frames64, zeros = clap_frames_f64(w48), torch.zeros((998, 512))
    return {
        "ours": lambda: run_ours(data), "reference": lambda: run_ref(data), "floor": lambda: floor(data),
        "read": lambda: sf.read(io.BytesIO(data), dtype="float32", always_2d=True),
        "downmix": lambda: _downmix(x),
        "resample_16k": lambda: soxr.resample(mono, rate, 16_000, quality="HQ"),
        "resample_48k": lambda: soxr.resample(mono, rate, 48_000, quality="HQ"),
        "ast_fbank": lambda: fbank(w16),
        "ast_fft_f32": lambda: torch.fft.rfft(zeros),
        "clap_mel": lambda: mel([w48]),
        "clap_fft_f64": lambda: torch.fft.rfft(frames64),
        "one_resample_48k_to_16k": lambda: soxr.resample(audio.waves[48_000], 48_000, 16_000, quality="HQ"),
        "clap_mel_fft_f32": lambda: mel_f32(w48),
        "clap_fft_f64_numpy": lambda: np.fft.rfft(frames64.numpy()),
        "ast_fbank_torchaudio": lambda: kaldi.fbank(torch.from_numpy(w16).unsqueeze(0), window_type="hanning",
                                                    num_mel_bins=128, dither=0.0),
    }


def interleaved(jobs: list[dict], repeats: int) -> dict:
    """name -> (median CPU s, median wall s) per call, each name timed once per clip per repeat, the
    order rotating from clip to clip."""
    names = list(jobs[0])
    for job in jobs[:2]:
        for fn in job.values():
            fn()
    cpu = {n: [] for n in names}
    wall = {n: [] for n in names}
    k = 0
    for _ in range(repeats):
        for job in jobs:
            k += 1
            for name in names[k % len(names):] + names[:k % len(names)]:
                c0, w0 = time.process_time(), time.perf_counter()
                job[name]()
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    return {n: (float(np.median(cpu[n])), float(np.median(wall[n]))) for n in names}


def parity(items, run_ours, run_ref, decoder, fbank, mel_f32, ast_fe, clap_fe) -> dict:
    """Max abs differences against the reference over every clip (and, for the float32 CLAP
    candidate, a chirp: the corpus's tone-plus-noise clips hide its error)."""
    out = {"ast_max_abs": 0.0, "clap_max_abs_db": 0.0, "one_resample_ast_max_abs": 0.0, "clap_fft_f32_max_abs_db": 0.0}
    def worse(key, ours_value, ref_value):
        out[key] = max(out[key], float(np.abs(ours_value - ref_value).max()))

    for data in items:
        (a, c), (ra, rc) = run_ours(data), run_ref(data)
        worse("ast_max_abs", a, ra)
        worse("clap_max_abs_db", c, rc)
        w48 = decoder(data).waves[48_000]
        worse("one_resample_ast_max_abs", fbank(soxr.resample(w48, 48_000, 16_000, quality="HQ")), ra)
        worse("clap_fft_f32_max_abs_db", mel_f32(w48[:480_000]), rc[0])
    chirp = chirp48()
    ref_chirp = clap_fe(chirp, sampling_rate=48_000, return_tensors="np")["input_features"][0, 0]
    out["clap_fft_f32_chirp_max_abs_db"] = float(np.abs(mel_f32(chirp) - ref_chirp).max())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/features.json")
    args = p.parse_args(argv)
    with one_thread():
        result = run(args.clips, args.repeats)
    report(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def run(clips: int, repeats: int) -> dict:
    from transformers import ASTFeatureExtractor, ClapFeatureExtractor

    ast_fe, clap_fe = ASTFeatureExtractor(), ClapFeatureExtractor(frequency_min=50, frequency_max=14_000,
                                                                   truncation="rand_trunc")
    decoder, fbank, mel = Decoder(), AstFbank(AstFbankConfig()), ClapMel(ClapMelConfig())
    mel_f32 = ClapMelF32(ClapMelConfig())
    run_ours, run_ref = ours(decoder, fbank, mel), reference(ast_fe, clap_fe)
    rows = []
    for fmt in ("WAV", "FLAC", "MP3"):
        items = corpus(fmt, clips)
        jobs = [clip_jobs(d, run_ours, run_ref, decoder, fbank, mel, mel_f32) for d in items]
        t = interleaved(jobs, repeats)
        cpu = {n: v[0] for n, v in t.items()}
        wall = {n: v[1] for n, v in t.items()}
        rows.append({
            "format": fmt,
            **{f"{k}_clips_per_s_cpu": round(1 / cpu[k], 1) for k in ("ours", "reference", "floor")},
            **{f"{k}_clips_per_s_wall": round(1 / wall[k], 1) for k in ("ours", "reference", "floor")},
            "speedup_vs_reference_cpu": round(cpu["reference"] / cpu["ours"], 2),
            "ours_over_floor_cpu": round(cpu["ours"] / cpu["floor"], 2),
            "speedup_vs_reference_wall": round(wall["reference"] / wall["ours"], 2),
            "ours_over_floor_wall": round(wall["ours"] / wall["floor"], 2),
            "split_ms_cpu": {n: round(cpu[n] * 1000, 2) for n in ("ours", "floor", *STEPS, *CANDIDATES)},
            "split_ms_wall": {n: round(wall[n] * 1000, 2) for n in ("ours", "floor", *STEPS, *CANDIDATES)},
            "parity": parity(items, run_ours, run_ref, decoder, fbank, mel_f32, ast_fe, clap_fe),
        })
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 thread", "date": time.strftime("%Y-%m-%d"),
            "load_avg_1min_at_end": os.getloadavg()[0], "clip": "10 s, 44.1 kHz stereo",
            "clips": clips, "repeats": repeats, "rows": rows}


def report(result: dict) -> None:
    print(f"clips/s, one thread; CPU time (wall time); load average {result['load_avg_1min_at_end']:.1f}")
    print(f"{'format':<6} {'ours':>13} {'reference':>13} {'floor':>13} {'x ref':>11} {'/floor':>11}")
    for r in result["rows"]:
        def both(key):
            return f"{r[f'{key}_cpu']} ({r[f'{key}_wall']})"
        print(f"{r['format']:<6} {both('ours_clips_per_s'):>13} {both('reference_clips_per_s'):>13} "
              f"{both('floor_clips_per_s'):>13} {both('speedup_vs_reference'):>11} {both('ours_over_floor'):>11}")
    print("\nms per clip, CPU (wall)")
    print(f"{'step':<24}" + "".join(f"{r['format']:>16}" for r in result["rows"]))
    for step in ("ours", "floor", *STEPS, *CANDIDATES):
        print(f"{step:<24}" + "".join(f"{r['split_ms_cpu'][step]:>7} ({r['split_ms_wall'][step]:>6})"
                                    for r in result["rows"]))
    print("\nparity, max abs over every clip")
    for key in result["rows"][0]["parity"]:
        print(f"{key:<32}" + "".join(f"{r['parity'][key]:>12.2e}" for r in result["rows"]))


if __name__ == "__main__":
    raise SystemExit(main())
