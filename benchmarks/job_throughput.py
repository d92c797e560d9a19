"""End-to-end tagging-job throughput against the model-only bound and the naive per-file loop, on the
same corpus and checkpoints, back to back in one process.

Per repeat, in this order:
1. job: the real job (`run_tag_job`) through local Ray over the whole corpus, into a fresh output.
   Wall time from the call to its summary: listing, actor start, model load, decode, features, models,
   Parquet, commit. Two 1-file runs before the repeats measure the fixed cost (cold, then warm).
2. bound: the job's AstTagger and ClapEmbedder (same classes and code path, loaded once) on window rows
   the job's Featurize stage computed beforehand, AST then CLAP, each with every core as torch threads,
   at the job's micro-batch: what the models allow on this machine with decode and features free.
3. naive: a Python loop over the first --naive-files files: soundfile + soxr, transformers'
   audio-classification pipeline (sigmoid, top 5) and ClapProcessor + ClapModel per file, torch's
   default threads (benchmarks.models.naive).
Medians over repeats; ratios job/bound and job/naive, on the whole wall time and on the steady state
((files - 1) / (job wall - warm 1-file wall): start-up, model load and the last batch's drain taken out). Parity in the same run: the job's CLAP
embeddings and top-5 labels against the naive loop's on the files both saw.

Sized for a 2-core machine: --size tiny (default, 256 files, ~1 min) or --size full (published sizes,
48 files, 2 repeats, ~7 min: full-size AST costs ~1.3 s per 10 s window at 2 threads here; a job has
~10 s of fixed cost, so a smaller corpus measures mostly start-up).

Usage: python -m benchmarks.job_throughput [--size tiny|full] [--files N] [--repeats N]
       [--naive-files N] [--out PATH]
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

from benchmarks.corpus import build_full_size, make_corpus

log = logging.getLogger("benchmarks.job_throughput")

DEFAULTS = {"tiny": {"files": 256, "repeats": 3, "naive_files": 32},
            "full": {"files": 48, "repeats": 2, "naive_files": 8}}


def run_job(root: Path, models: dict, audio: Path, name: str) -> tuple[float, dict]:
    from pipeline.tagging.job import TagJobConfig, run_tag_job

    started = time.perf_counter()
    summary = run_tag_job(TagJobConfig(input=str(audio), output=str(root / "out" / name),
                                       ast_model=models["ast"], clap_model=models["clap"]))
    wall = time.perf_counter() - started
    if summary["ok"] != summary["files_seen"]:
        raise RuntimeError(f"benchmark job left {summary['error']} error rows: {summary}")
    return wall, summary


class Bound:
    """The job's model stages on preloaded window rows, all cores as threads."""

    def __init__(self, models: dict, audio: Path, threads: int):
        from benchmarks.models import preload
        from pipeline.models.embedder import ClapEmbedder
        from pipeline.tagging.job import TagJobConfig, model_stages
        from pipeline.tagging.resources import ResourcePlan
        from pipeline.models.tagger import AstTagger

        cfg = TagJobConfig(input=str(audio), output="unused", ast_model=models["ast"], clap_model=models["clap"])
        stages = model_stages(cfg, ResourcePlan(1, 1, 0.0, threads, threads, threads, threads))
        self.rows = preload(audio, stages)
        self.ast, self.clap = AstTagger(stages.tagger), ClapEmbedder(stages.embedder)
        self.threads = threads
        self.ast(self.rows.slice(0, stages.tagger.micro_batch))  # first call allocates; untimed
        self.clap(self.rows.slice(0, stages.embedder.micro_batch))

    def time(self) -> float:
        from benchmarks.models import torch_threads

        with torch_threads(self.threads):
            started = time.perf_counter()
            self.ast(self.rows)
            self.clap(self.rows)
            return time.perf_counter() - started


def job_vs_naive(out: Path, naive_tags: list, naive_embeddings: np.ndarray, files: list[Path]) -> dict:
    """Top-5 label agreement and CLAP cosine of the job's rows against the naive loop's outputs."""
    from pipeline.store.ledger import read_current

    clips = read_current(str(out)).to_pandas()
    clips = clips.set_index(clips.uri.str.rsplit("/", n=1).str[-1])
    agree, cosines = [], []
    for path, tags, emb in zip(files, naive_tags, naive_embeddings):
        row = clips.loc[path.name]
        ours = [entry["label"] for entry in row.labels][:len(tags)]
        agree.append(len(set(ours) & {t["label"] for t in tags}) / len(tags))
        e = np.asarray(row.clap_embedding, np.float64)
        cosines.append(float(e @ emb / np.linalg.norm(e) / np.linalg.norm(emb)))
    return {"files": len(files), "top5_agreement": round(float(np.mean(agree)), 4),
            "clap_cosine_min": round(min(cosines), 7)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--files", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--naive-files", type=int)
    p.add_argument("--out", default=None, help="default: benchmarks/results/job_<size>.json")
    args = p.parse_args(argv)
    sized = {k: getattr(args, k) or v for k, v in DEFAULTS[args.size].items()}
    logging.basicConfig(level="INFO", format="%(message)s")
    for noisy in ("pipeline", "transformers", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import ray
    import torch

    from benchmarks.models import naive
    from pipeline.demo import build_tiny_ast, build_tiny_clap

    cores = os.cpu_count() or 1
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root / "audio", sized["files"])
        make_corpus(root / "one", 1)
        if args.size == "full":
            models = build_full_size(root / "models")
        else:
            models = {"ast": str(build_tiny_ast(root / "models" / "ast")),
                      "clap": str(build_tiny_clap(root / "models" / "clap"))}
        files = sorted((root / "audio").iterdir())
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        cold_s, _ = run_job(root, models, root / "one", "one-cold")  # first run: worker imports, page cache
        fixed_s, _ = run_job(root, models, root / "one", "one")
        log.info("job on 1 file: %.1f s cold, %.1f s warm (fixed cost)", cold_s, fixed_s)
        bound = Bound(models, root / "audio", cores)
        job_s, bound_s, naive_fps, summary = [], [], [], None
        for r in range(sized["repeats"]):
            wall, summary = run_job(root, models, root / "audio", f"run{r}")
            job_s.append(wall)
            bound_s.append(bound.time())
            row, tags, embeddings = naive(files[:sized["naive_files"]], models, default_threads)
            naive_fps.append(row["files_per_s"])
            log.info("repeat %d: job %.1f s, bound %.1f s, naive %.3f files/s", r, job_s[-1], bound_s[-1],
                     naive_fps[-1])
        parity = job_vs_naive(root / "out" / f"run{sized['repeats'] - 1}", tags, embeddings,
                              files[:sized["naive_files"]])
        ray.shutdown()
    n = sized["files"]
    job_fps, bound_fps = n / float(np.median(job_s)), n / float(np.median(bound_s))
    marginal_fps = (n - 1) / (float(np.median(job_s)) - fixed_s)  # steady state: fixed cost taken out
    naive_median = float(np.median(naive_fps))
    result = {
        "machine": f"{platform.machine()}, {cores} CPUs, {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"), "load_avg_1min_at_end": os.getloadavg()[0], "models": args.size,
        "clip": "10 s, 44.1 kHz stereo FLAC", **sized, "job_fixed_s_1_file": round(fixed_s, 1),
        "job_cold_s_1_file": round(cold_s, 1),
        "job_wall_s": [round(s, 1) for s in job_s], "bound_wall_s": [round(s, 1) for s in bound_s],
        "naive_files_per_s": naive_fps, "job_files_per_s": round(job_fps, 3),
        "job_audio_s_per_s": round(10 * job_fps, 2), "bound_files_per_s": round(bound_fps, 3),
        "bound_threads": cores, "naive_files_per_s_median": round(naive_median, 3), "naive_threads": default_threads,
        "job_over_bound": round(job_fps / bound_fps, 3), "job_over_naive": round(job_fps / naive_median, 3),
        "job_marginal_files_per_s": round(marginal_fps, 3),
        "job_marginal_over_bound": round(marginal_fps / bound_fps, 3),
        "job_marginal_over_naive": round(marginal_fps / naive_median, 3),
        "job_vs_naive_parity": parity, "summary": summary,
    }
    print(f"{'models':<7}{'files':>6}{'job files/s':>13}{'bound':>8}{'naive':>8}{'job/bound':>11}"
          f"{'job/naive':>11}{'fixed s':>9}")
    print(f"{args.size:<7}{n:>6}{result['job_files_per_s']:>13}{result['bound_files_per_s']:>8}"
          f"{result['naive_files_per_s_median']:>8}{result['job_over_bound']:>11}{result['job_over_naive']:>11}"
          f"{result['job_fixed_s_1_file']:>9}")
    print(f"steady state (files - 1) / (job wall - warm 1-file wall): {result['job_marginal_files_per_s']} "
          f"files/s = {result['job_marginal_over_bound']} x bound, {result['job_marginal_over_naive']} x naive")
    print(f"job vs naive loop on {parity['files']} files: top-5 agreement {parity['top5_agreement']}, "
          f"CLAP cosine min {parity['clap_cosine_min']}")
    out = Path(args.out or f"benchmarks/results/job_{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
