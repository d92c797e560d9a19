"""One node at full speed: the job, the model-only bound and a plain DataLoader script on the same corpus.

Built for one GPU node (an H100/H200 with 16 cores: `--files 6000`, full-size random-weight AST base and
CLAP HTSAT-tiny, the defaults when CUDA is visible); on a machine without a GPU it runs the same three
things at small sizes with tiny models on CPU (the defaults there), so it keeps working everywhere.

1. job: `run_tag_job` through local Ray (default settings, --precision as given), after a 1-file run
   that measures the fixed cost (actor start, model load, drain). Whole run = files / wall; steady
   state = (files - 1) / (wall - 1-file wall).
2. bound: the job's own AstTagger and ClapEmbedder, loaded once, on random features of the job's shapes
   (no decode, no features), at the job's micro-batch and precision: AST alone, CLAP alone, both. With
   bf16, also its deviation from fp32 stages on the same windows (AST logits, CLAP cosine).
3. dataloader: the script users write (torch DataLoader, N worker processes each reading with
   soundfile, soxr to 16 and 48 kHz, HF's ASTFeatureExtractor and ClapFeatureExtractor; batches of 64 to
   the model under bf16 autocast on GPU (fp32 on CPU); top-5 labels + CLAP embedding to Parquet).
   Whole process = files / wall from its start (model load included); in loop = files after the first
   batch / time from the first batch to the end (Parquet write included).

While each runs, a sampler records whole-machine CPU busy % (/proc/stat) and GPU busy % (nvidia-smi,
utilization.gpu) every 0.5 s. The table gives clips/s, busy percentages and the ratios job/dataloader
and job/bound (the issue's targets: >= 450 clips/s steady and >= 2.5x the DataLoader script on one
H100 node).

Usage: python -m benchmarks.node [--files N] [--size full|tiny] [--precision auto|fp32|bf16]
       [--loader-workers N] [--bound-windows N] [--out benchmarks/results/node.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# Before torch loads: the bound runs its models in this process, whose OpenMP threads should sleep, not
# spin, between ops, as the job's model actors do (pipeline.tagging.job.MODEL_ENV).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
log = logging.getLogger("benchmarks.node")


class Sampler:
    """Whole-machine CPU busy % and GPU busy % every `period` s, in a thread, between start and stop."""

    def __init__(self, period: float = 0.5):
        self.period, self.cpu, self.gpu = period, [], []
        self._stop = threading.Event()
        self._nvidia = shutil.which("nvidia-smi")

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = _cpu_times()
        while not self._stop.wait(self.period):
            now = _cpu_times()
            busy, total = now[0] - last[0], now[1] - last[1]
            self.cpu.append(100.0 * busy / total if total else 0.0)
            last = now
            if self._nvidia:
                try:
                    out = subprocess.run([self._nvidia, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True, timeout=5).stdout.split()
                    self.gpu.append(float(np.mean([float(v) for v in out])))
                except (subprocess.SubprocessError, ValueError):
                    pass

    def summary(self) -> dict:
        return {"cpu_busy_pct": round(float(np.mean(self.cpu)), 1) if self.cpu else None,
                "gpu_busy_pct": round(float(np.mean(self.gpu)), 1) if self.gpu else None}


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def run_job(models: dict, audio: Path, out: Path, precision: str, features_on: str = "cpu") -> tuple[float, dict]:
    from pipeline.tagging.job import TagJobConfig, run_tag_job

    started = time.perf_counter()
    summary = run_tag_job(TagJobConfig(input=str(audio), output=str(out), ast_model=models["ast"],
                                       clap_model=models["clap"], precision=precision, features_on=features_on))
    if summary["ok"] != summary["files_seen"]:
        raise RuntimeError(f"benchmark job left error rows: {summary}")
    return time.perf_counter() - started, summary


def bound(models: dict, precision: str, windows: int) -> dict:
    """Windows/s of the job's model stages on random features of the job's shapes, in this process."""
    import pyarrow as pa
    import ray
    import torch

    from pipeline.arrow import blobs_from_rows
    from pipeline.models.embedder import ClapEmbedder
    from pipeline.tagging.job import TagJobConfig, model_stages
    from pipeline.tagging.resources import plan_resources
    from pipeline.models.tagger import AstTagger

    plan = plan_resources(ray.cluster_resources())
    stages = model_stages(TagJobConfig(input=".", output=".", ast_model=models["ast"], clap_model=models["clap"],
                                       precision=precision), plan)
    if not torch.cuda.is_available():  # the whole machine, as the job's plan would give the models
        stages = type(stages)(stages.featurize, *(type(c)(**{**c.__dict__, "cpu_threads": os.cpu_count()})
                                                  for c in (stages.tagger, stages.embedder)))
    ast, clap = AstTagger(stages.tagger), ClapEmbedder(stages.embedder)
    rng = np.random.default_rng(0)
    n = max(windows, stages.tagger.micro_batch)
    ast_rows = rng.standard_normal((n, stages.tagger.num_frames, stages.tagger.num_mel_bins), np.float32) * 0.5
    clap_rows = rng.standard_normal((n,) + stages.embedder.feature_shape, np.float32) * 10 - 40
    chunk = 512  # windows per column chunk (a binary chunk holds < 2 GiB)
    table = pa.concat_tables([
        pa.table({"status": ["ok"] * len(a), "ast_features": blobs_from_rows(a, np.ones(len(a), bool)),
                  "clap_features": blobs_from_rows(c, np.ones(len(c), bool))})
        for a, c in zip(np.split(ast_rows, range(chunk, n, chunk)), np.split(clap_rows, range(chunk, n, chunk)))])
    warm = table.slice(0, stages.tagger.micro_batch)
    ast(warm), clap(warm)  # first calls: allocation, cuDNN/cuBLAS autotuning

    def timed(fn, repeats: int = 3) -> float:
        """Best of `repeats` passes (a shared machine's other work only ever slows a pass down)."""
        best = float("inf")
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        return n / best

    batches = [table.slice(i, plan.batch_size) for i in range(0, n, plan.batch_size)]  # as the job calls them
    with Sampler() as s:
        result = {"ast_windows_per_s": timed(lambda: [ast(b) for b in batches]),
                  "clap_windows_per_s": timed(lambda: [clap(b) for b in batches]),
                  "both_windows_per_s": timed(lambda: [clap(ast(b)) for b in batches])}
    deviation = precision_deviation(stages, ast, clap, batches[0]) if stages.tagger.precision == "bf16" else None
    return {**{k: round(v, 1) for k, v in result.items()}, "windows": n, "batch": plan.batch_size,
            "bf16_vs_fp32": deviation,
            "micro_batch": stages.tagger.micro_batch,
            "precision": stages.tagger.precision, **s.summary()}


def precision_deviation(stages, ast, clap, rows) -> dict:
    """bf16 (the job's stages) against fp32 stages of the same checkpoints on the same windows: max abs
    AST logit difference (the product's fp32 bar is 1e-4) and min CLAP cosine (bar 0.9999). Random
    weights and random features: indicative only; trained checkpoints can differ."""
    import torch

    from pipeline.arrow import to_matrix
    from pipeline.models.embedder import ClapEmbedder
    from pipeline.models.tagger import AstTagger

    fp32 = (AstTagger(type(stages.tagger)(**{**stages.tagger.__dict__, "precision": "fp32"})),
            ClapEmbedder(type(stages.embedder)(**{**stages.embedder.__dict__, "precision": "fp32"})))
    logits, embeddings = [], []
    for a, c in ((ast, clap), fp32):
        out = c(a(rows))
        logits.append(torch.logit(torch.from_numpy(to_matrix(out.column("scores"))).double()).numpy())
        embeddings.append(to_matrix(out.column("clap_embedding")).astype(np.float64))
    cosine = (embeddings[0] * embeddings[1]).sum(1) / np.linalg.norm(embeddings[0], axis=1) / np.linalg.norm(
        embeddings[1], axis=1)
    return {"windows": len(rows), "ast_max_abs_logit": float(np.abs(logits[0] - logits[1]).max()),
            "clap_cosine_min": float(cosine.min())}


def dataloader_script(models: dict, audio: Path, out: Path, workers: int, batch: int = 64) -> dict:
    """The plain script: DataLoader workers decode and extract with HF's extractors, the main process
    runs both models on batches (bf16 autocast on GPU) and writes top-5 + CLAP embedding to Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import ASTForAudioClassification, ClapModel

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ast = ASTForAudioClassification.from_pretrained(models["ast"]).eval().to(device)
    clap = ClapModel.from_pretrained(models["clap"]).eval().to(device)
    labels = ast.config.id2label
    files = sorted(str(p) for p in audio.iterdir())
    loader = torch.utils.data.DataLoader(_HfClips(files, models), batch_size=batch, num_workers=workers,
                                         collate_fn=_collate, pin_memory=device == "cuda", prefetch_factor=4)
    rows, loop_started, first = [], None, 0
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                else torch.autocast("cpu", enabled=False))
    for uris, ast_x, clap_x in loader:
        if loop_started is None:
            loop_started, first = time.perf_counter(), len(uris)
        with torch.inference_mode(), autocast:
            scores = ast(ast_x.to(device, non_blocking=True)).logits.sigmoid().float()
            emb = clap.get_audio_features(input_features=clap_x.to(device, non_blocking=True)).pooler_output.float()
        top = scores.topk(5, dim=1)
        for uri, idx, val, e in zip(uris, top.indices.cpu().numpy(), top.values.cpu().numpy(), emb.cpu().numpy()):
            rows.append({"uri": uri, "labels": [labels[int(i)] for i in idx], "scores": val.tolist(),
                         "clap_embedding": e.tolist()})
    pq.write_table(pa.Table.from_pylist(rows), out)
    done = time.perf_counter()
    return {"files": len(rows), "batch": batch, "wall_s": round(done - started, 1),
            "whole_clips_per_s": round(len(rows) / (done - started), 2),
            "loop_clips_per_s": round((len(rows) - first) / max(done - loop_started, 1e-9), 2), "workers": workers}


class _HfClips:
    """Map-style dataset: path -> (path, AST input_values, CLAP input_features) via HF's extractors."""

    def __init__(self, files: list[str], models: dict):
        self.files, self.models, self._fe = files, models, None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import soundfile as sf
        import soxr
        from transformers import ASTFeatureExtractor, ClapFeatureExtractor

        if self._fe is None:
            self._fe = (ASTFeatureExtractor.from_pretrained(self.models["ast"]),
                        ClapFeatureExtractor.from_pretrained(self.models["clap"]))
        wave, rate = sf.read(self.files[i], dtype="float32", always_2d=True)
        mono = wave.mean(axis=1)
        w16, w48 = soxr.resample(mono, rate, 16_000), soxr.resample(mono, rate, 48_000)
        a = self._fe[0](w16, sampling_rate=16_000, return_tensors="np")["input_values"][0]
        c = self._fe[1](w48, sampling_rate=48_000, return_tensors="np")["input_features"][0]
        return self.files[i], a, c


def _collate(items):
    import torch

    uris, a, c = zip(*items)
    return list(uris), torch.from_numpy(np.stack(a)), torch.from_numpy(np.stack(c))


def main(argv=None) -> int:
    import torch

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=6000 if gpu else 48)
    p.add_argument("--size", choices=["full", "tiny"], default="full" if gpu else "tiny")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--features-on", default="cpu", choices=["cpu", "gpu"],
                   help="the job's mode: features in CPU tasks, or in the model actors on their GPU")
    p.add_argument("--loader-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--loader-batch", type=int, default=64 if gpu else 8, help="the DataLoader script's batch")
    p.add_argument("--bound-windows", type=int, default=2048 if gpu else 16)
    p.add_argument("--skip", nargs="*", default=[], choices=["job", "bound", "dataloader"])
    p.add_argument("--workdir", default=None, help="keep corpus and models here (default: a temp dir)")
    p.add_argument("--out", default="benchmarks/results/node.json")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    for noisy in ("pipeline", "transformers", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import ray

    from benchmarks.corpus import build_full_size, make_corpus
    from pipeline.demo import build_tiny_ast, build_tiny_clap

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_corpus(root / "audio", args.files)
        make_corpus(root / "one", 1)
        log.info("corpus of %d clips in %.0f s", args.files, time.perf_counter() - t0)
        models = (build_full_size(root / "models") if args.size == "full" else
                  {"ast": str(build_tiny_ast(root / "models" / "ast")),
                   "clap": str(build_tiny_clap(root / "models" / "clap"))})
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        result = {"files": args.files, "size": args.size, "precision": args.precision, "features_on": args.features_on}
        if "job" not in args.skip:
            run_job(models, root / "one", root / "out-cold", args.precision, args.features_on)  # imports, compile caches
            fixed_s, _ = run_job(models, root / "one", root / "out-one", args.precision, args.features_on)
            with Sampler() as s:
                wall, summary = run_job(models, root / "audio", root / "out-job", args.precision, args.features_on)
            result["job"] = {"wall_s": round(wall, 1), "fixed_s_1_file": round(fixed_s, 1),
                             "whole_clips_per_s": round(args.files / wall, 2),
                             "steady_clips_per_s": round((args.files - 1) / max(wall - fixed_s, 1e-9), 2),
                             **s.summary()}
            log.info("job: %s", result["job"])
        if "bound" not in args.skip:
            result["bound"] = bound(models, args.precision, args.bound_windows)
            log.info("bound: %s", result["bound"])
        ray.shutdown()
        if "dataloader" not in args.skip:
            with Sampler() as s:
                row = dataloader_script(models, root / "audio", root / "dataloader.parquet", args.loader_workers,
                                        args.loader_batch)
            result["dataloader"] = {**row, **s.summary()}
            log.info("dataloader: %s", result["dataloader"])
    result.update(ratios(result))
    result.update({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                              f"{torch.cuda.get_device_name() if gpu else 'no GPU'}, torch {torch.__version__}",
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "load_avg_1min_at_end": os.getloadavg()[0]})
    report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


def ratios(result: dict) -> dict:
    out = {}
    job, loader, bnd = result.get("job"), result.get("dataloader"), result.get("bound")
    if job and loader:
        out["job_over_dataloader_whole"] = round(job["whole_clips_per_s"] / loader["whole_clips_per_s"], 2)
        if loader["loop_clips_per_s"]:
            out["job_steady_over_dataloader_loop"] = round(job["steady_clips_per_s"] / loader["loop_clips_per_s"], 2)
    if job and bnd:  # a 10 s clip is one AST and one CLAP window
        out["job_steady_over_bound"] = round(job["steady_clips_per_s"] / bnd["both_windows_per_s"], 2)
    return out


def report(result: dict) -> None:
    print(f"{result['files']} clips of 10 s 44.1 kHz stereo FLAC, {result['size']} models; {result['machine']}; "
          f"load average {result['load_avg_1min_at_end']:.1f} at end")
    print(f"{'what':<12}{'whole clips/s':>15}{'steady clips/s':>16}{'CPU busy %':>12}{'GPU busy %':>12}")
    if "job" in result:
        j = result["job"]
        print(f"{'job':<12}{j['whole_clips_per_s']:>15}{j['steady_clips_per_s']:>16}{str(j['cpu_busy_pct']):>12}"
              f"{str(j['gpu_busy_pct']):>12}")
    if "dataloader" in result:
        d = result["dataloader"]
        print(f"{'dataloader':<12}{d['whole_clips_per_s']:>15}{d['loop_clips_per_s']:>16}{str(d['cpu_busy_pct']):>12}"
              f"{str(d['gpu_busy_pct']):>12}")
    if "bound" in result:
        b = result["bound"]
        print(f"bound ({b['precision']}, micro-batch {b['micro_batch']}), windows/s: AST {b['ast_windows_per_s']}, "
              f"CLAP {b['clap_windows_per_s']}, both {b['both_windows_per_s']} (GPU busy {b['gpu_busy_pct']}%)")
        if b.get("bf16_vs_fp32"):
            d = b["bf16_vs_fp32"]
            print(f"bf16 vs fp32 on {d['windows']} random windows: AST max abs logit {d['ast_max_abs_logit']:.2e}, "
                  f"CLAP cosine min {d['clap_cosine_min']:.6f}")
    for key in ("job_over_dataloader_whole", "job_steady_over_dataloader_loop", "job_steady_over_bound"):
        if key in result:
            print(f"{key}: {result[key]}")


if __name__ == "__main__":
    raise SystemExit(main())
