"""Model stages alone: windows/s of AST and CLAP on preloaded features, CPU precision options with
their parity, and the naive per-file loop users run today, on the same 10 s 44.1 kHz stereo FLAC clips.

1. bound: the job's AstTagger and ClapEmbedder (same classes, same code path) called on window rows
   that the job's Featurize stage computed once beforehand, at each --micro-batches size, 1 thread
   (what each model actor gets on a 2-core machine). One 10 s clip is one AST and one CLAP window.
2. naive: a Python loop over the files: soundfile + soxr, transformers' audio-classification pipeline
   (sigmoid, top-k) and ClapProcessor + ClapModel.get_audio_features, one file at a time, torch's
   default thread count.
3. precision: fp32 at 1 and 2 threads, bf16 weights (the job's --precision bf16), bf16 autocast, dynamic int8 (nn.Linear), torch.compile, each
   timed at --precision-batch; parity against fp32 (1 thread) on the timed windows plus varied ones
   (by default eight: silence, noise, clipping, ...). The product's bar: AST logits within 1e-4, CLAP cosine >= 0.9999.

What is sized: --windows windows per timed pass (rounded up to whole micro-batches, so batch 16 times
16 windows), --varied-mixes extra parity windows, --naive-files files in the naive loop, --repeats
timed passes (median; passes of all candidates interleave so load from other work hits all alike).
Full-size AST costs ~3 s per window at 1 thread here, so the defaults take ~7 minutes on a quiet
2-core machine, plus torch.compile's first compile (1-5 min; cached by inductor afterwards;
--no-compile skips it). --size tiny takes ~15 s.

Usage: python -m benchmarks.models [--size tiny|full] [--windows 8] [--micro-batches 1,4,8,16]
       [--precision-batch 8] [--naive-files 4] [--repeats N] [--[no-]compile] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf
import torch

from benchmarks.corpus import build_full_size, make_corpus
from pipeline.arrow import to_matrix
from pipeline.models.device import Placement
from pipeline.models.embedder import ClapEmbedder
from pipeline.tagging.featurize import Featurize
from pipeline.tagging.job import TagJobConfig, model_stages
from pipeline.tagging.resources import ResourcePlan
from pipeline.tagging.sources import ListingConfig, list_inputs
from pipeline.models.tagger import AstTagger

log = logging.getLogger("benchmarks.models")

AST_LOGIT_BAR = 1e-4      # max abs logit difference the product accepts (vs the HF reference)
CLAP_COSINE_BAR = 0.9999  # min cosine the product accepts (vs the HF reference)


def preload(audio_dir: Path, stages) -> pa.Table:
    """Window rows (WINDOW_SCHEMAS["cpu"], features as float32 buffers) from the job's own Featurize stage."""
    files = list_inputs(ListingConfig(str(audio_dir)))
    rows = pa.concat_tables(list(Featurize(stages.featurize)(files)))
    if rows.column("status").to_pylist().count("ok") != len(rows):
        raise RuntimeError(f"benchmark corpus in {audio_dir} has files that do not decode")
    return rows


def make_varied_corpus(directory: Path, mixes: int = 1, rate: int = 44_100) -> None:
    """10 s stereo FLAC clips unlike the tone corpus, for parity only: silence, quiet and white noise,
    clipped sine, chirp, clicks, a 1 s clip, and `mixes` random tone mixes over noise.
    Low-precision errors vary a lot between inputs; silence and clipping are often the worst."""
    rng = np.random.default_rng(1)
    n = 10 * rate
    t = np.arange(n) / rate

    def mix():
        tones = sum(rng.uniform(0.01, 0.3) * np.sin(2 * np.pi * rng.uniform(50, 15_000) * t + rng.uniform(0, 6))
                    for _ in range(5))
        return tones + rng.uniform(0, 0.1) * rng.standard_normal(n)

    signals = {
        "silence": np.zeros(n), "quiet": 1e-4 * rng.standard_normal(n), "white": 0.3 * rng.standard_normal(n),
        "clipped": np.clip(3 * np.sin(2 * np.pi * 100 * t), -1, 1),
        "chirp": 0.3 * np.sin(2 * np.pi * (100 + 1000 * t) * t),
        "clicks": (rng.random(n) < 5e-4).astype(float), "short": 0.3 * rng.standard_normal(rate),
        **{f"mix{i}": mix() for i in range(mixes)},
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, x in signals.items():
        sf.write(directory / f"{name}.flac", np.stack([x, x], axis=1).astype(np.float32), rate)


def variant(stage, micro_batch: int, **attrs):
    """A shallow copy of a loaded stage (shares its weights) with another micro-batch and overrides."""
    clone = copy.copy(stage)
    clone.config = replace(stage.config, micro_batch=micro_batch)
    for name, value in attrs.items():
        setattr(clone, name, value)
    return clone


def outputs(stage, rows: pa.Table) -> np.ndarray:
    """AST logits (float64, from the sigmoid scores) or CLAP embeddings of `rows` through `stage`."""
    out = stage(rows)
    if isinstance(stage, AstTagger):
        return torch.logit(torch.from_numpy(to_matrix(out.column("scores"))).double()).numpy()
    return to_matrix(out.column("clap_embedding")).astype(np.float64)


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Entry:
    """One timed candidate: a stage variant over `rows` at `threads`; filled in by `race`."""

    stage: object
    rows: pa.Table
    threads: int = 1
    warm: bool = False
    warmup_s: float = 0.0
    wall: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    result: np.ndarray | None = None

    def timing(self) -> dict:
        s, c = float(np.median(self.wall)), float(np.median(self.cpu))
        return {"windows": len(self.rows), "s_per_window": round(s, 4), "windows_per_s": round(1 / s, 3),
                "cpu_s_per_window": round(c, 4), **({"warmup_s": round(self.warmup_s, 1)} if self.warm else {})}


def race(entries: dict, repeats: int, label: str = "") -> dict:
    """Time one pass of every entry per round, so that load from other work falls on all alike; wall
    and process CPU seconds per window (on a busy machine, CPU time at 1 thread is the better guess of
    quiet wall time). Entries with `warm` first run one micro-batch untimed: torch.compile compiles
    then; eager first calls measured no slower than later ones, so they skip it. An entry that
    raises is dropped and returned as its error message: an option that does not run is a finding."""
    errors = {}

    def attempt(key, e, fn):
        try:
            with torch_threads(e.threads):
                return fn()
        except Exception as error:
            log.warning("%s %s failed: %s: %s", label, key, type(error).__name__, error)
            errors[key] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            del entries[key]

    for key, e in [(k, e) for k, e in entries.items() if e.warm]:
        t = time.perf_counter()
        attempt(key, e, lambda: outputs(e.stage, e.rows.slice(0, e.stage.config.micro_batch)))
        e.warmup_s = time.perf_counter() - t
    for _ in range(repeats):
        for key, e in list(entries.items()):
            t, c = time.perf_counter(), time.process_time()
            result = attempt(key, e, lambda: outputs(e.stage, e.rows))
            if key in errors:
                continue
            e.result = result
            e.wall.append((time.perf_counter() - t) / len(e.rows))
            e.cpu.append((time.process_time() - c) / len(e.rows))
            log.info("%s %s: %.3f s per window (%.3f CPU s)", label, key, e.wall[-1], e.cpu[-1])
    return errors


def whole_batches(windows: int, micro_batch: int) -> int:
    return math.ceil(windows / micro_batch) * micro_batch


def parity(kind: str, got: np.ndarray, fp32: np.ndarray) -> dict:
    """AST: max abs logit difference and top-5 overlap; CLAP: min cosine; and whether the bar is met."""
    if kind == "ast":
        k = min(5, fp32.shape[1])
        top = lambda x: np.argsort(-x, axis=1)[:, :k]
        overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top(got), top(fp32))])
        diff = float(np.abs(got - fp32).max())
        return {"max_abs_logit": diff, "top5_agreement": round(float(overlap), 4), "meets_bar": diff <= AST_LOGIT_BAR}
    cos = np.sum(got * fp32, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(fp32, axis=1))
    return {"cosine_min": float(cos.min()), "meets_bar": bool(cos.min() >= CLAP_COSINE_BAR)}


def bound(stages: dict, rows: pa.Table, sizes: list[int], windows: int, repeats: int) -> list[dict]:
    """windows/s of each model at each micro-batch size, 1 thread."""
    entries = {(kind, b): Entry(variant(stage, b), rows.slice(0, whole_batches(windows, b)))
               for kind, stage in stages.items() for b in sizes}
    race(entries, repeats, "bound")
    return [{"model": kind, "micro_batch": b, **e.timing()} for (kind, b), e in entries.items()]


def clips_bound(rows: list[dict]) -> dict:
    """Clips/s the model stages allow (one AST + one CLAP window per clip), from each model's best
    micro-batch: serial on one core (also from CPU seconds, steadier on a busy machine), and with one
    single-thread actor per model on its own core (the job's plan; featurize needs CPU too)."""
    best = {m: max((r for r in rows if r["model"] == m), key=lambda r: r["windows_per_s"]) for m in ("ast", "clap")}
    a, c = best["ast"]["windows_per_s"], best["clap"]["windows_per_s"]
    return {"best_micro_batch": {m: r["micro_batch"] for m, r in best.items()},
            "ast_windows_per_s": a, "clap_windows_per_s": c,
            "per_core_clips_per_s": round(1 / (1 / a + 1 / c), 3),
            "per_core_clips_per_s_cpu": round(1 / sum(r["cpu_s_per_window"] for r in best.values()), 3),
            "one_core_each_clips_per_s": round(min(a, c), 3)}


def precision(stages: dict, rows: pa.Table, varied: pa.Table, batch: int, repeats: int, compile_: bool) -> list[dict]:
    """Each CPU option against fp32 at 1 thread: speed on `rows`; parity on `rows` plus `varied`
    (run once, untimed)."""
    from torch.ao.quantization import quantize_dynamic  # deprecated in favour of torchao, still works

    cpu_autocast = Placement(torch.device("cpu"), autocast_dtype=torch.bfloat16)
    cpu_bf16 = Placement(torch.device("cpu"), weight_dtype=torch.bfloat16)  # what --precision bf16 runs
    result = []
    for kind, stage in stages.items():
        entries = {
            "fp32": Entry(variant(stage, batch), rows),
            "fp32, 2 threads": Entry(variant(stage, batch), rows, threads=2),
            "bf16 weights (--precision bf16)": Entry(variant(stage, batch, placement=cpu_bf16,
                                                             model=cpu_bf16.prepare(copy.deepcopy(stage.model))), rows),
            "bf16 autocast": Entry(variant(stage, batch, placement=cpu_autocast), rows),
            "int8 dynamic (Linear)": Entry(variant(stage, batch, model=quantize_dynamic(
                stage.model, {torch.nn.Linear}, dtype=torch.qint8)), rows),
        }
        if compile_:
            compiled = variant(stage, batch)
            compiled._forward = torch.compile(compiled._forward, dynamic=False)  # fixed micro-batch shape
            entries["torch.compile"] = Entry(compiled, rows, warm=True)
        errors = race(entries, repeats, kind)
        for e in entries.values():
            with torch_threads(e.threads):
                e.result = np.concatenate([e.result, outputs(e.stage, varied)])
        fp32 = entries["fp32"]
        for name, e in entries.items():
            t = e.timing()
            result.append({"model": kind, "option": name, "micro_batch": batch, "threads": e.threads, **t,
                           "speedup": round(fp32.timing()["s_per_window"] / t["s_per_window"], 2),
                           "cpu_speedup": round(fp32.timing()["cpu_s_per_window"] / t["cpu_s_per_window"], 2),
                           "parity_windows": len(e.result), **parity(kind, e.result, fp32.result)})
        result += [{"model": kind, "option": name, "micro_batch": batch, "error": error}
                   for name, error in errors.items()]
    return result


def naive(files: list[Path], models: dict, threads: int, top_k: int = 5) -> tuple[dict, list, np.ndarray]:
    """files/s of the per-file loop users write, at `threads` (torch's default: users set none);
    returns its top-k labels and CLAP embeddings too."""
    import soxr
    from transformers import ClapModel, ClapProcessor
    from transformers import pipeline as hf_pipeline

    classifier = hf_pipeline("audio-classification", model=models["ast"], device="cpu")
    processor = ClapProcessor.from_pretrained(models["clap"])
    clap = ClapModel.from_pretrained(models["clap"]).eval()

    def one(path: Path):
        wave, rate = sf.read(path, dtype="float32", always_2d=True)
        mono = wave.mean(axis=1)
        tags = classifier(soxr.resample(mono, rate, 16_000), function_to_apply="sigmoid", top_k=top_k)
        inputs = processor(audio=soxr.resample(mono, rate, 48_000), sampling_rate=48_000, return_tensors="pt")
        with torch.inference_mode():
            embedding = clap.get_audio_features(**inputs).pooler_output[0].numpy()
        return tags, embedding

    with torch_threads(threads):
        one(files[0])
        started, cpu = time.perf_counter(), time.process_time()
        results = [one(f) for f in files]
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    row = {"files": len(files), "threads": threads, "wall_s": round(wall, 2),
           "files_per_s": round(len(files) / wall, 3), "cpu_s_per_file": round(cpu / len(files), 3)}
    log.info("naive loop: %s", row)
    return row, [r[0] for r in results], np.stack([r[1] for r in results]).astype(np.float64)


def naive_vs_ours(tags: list, embeddings: np.ndarray, stages: dict, rows: pa.Table, labels: list[str]) -> dict:
    """The naive loop's outputs against ours (fp32, same files): top-5 labels, scores, CLAP cosine."""
    n = len(tags)
    logits = outputs(stages["ast"], rows.slice(0, n))
    scores = 1 / (1 + np.exp(-logits))
    index = {name: i for i, name in enumerate(labels)}
    k = len(tags[0])
    agree = np.mean([len({t["label"] for t in tag} & {labels[j] for j in np.argsort(-s)[:k]}) / k
                     for tag, s in zip(tags, scores)])
    score_diff = max(abs(t["score"] - s[index[t["label"]]]) for tag, s in zip(tags, scores) for t in tag)
    ours = outputs(stages["clap"], rows.slice(0, n))
    return {"top5_agreement": round(float(agree), 4), "max_abs_score": float(score_diff),
            **{"clap_" + k: v for k, v in parity("clap", ours, embeddings).items() if k == "cosine_min"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "full"], default="full")
    p.add_argument("--windows", type=int, default=8, help="windows per timed pass (whole micro-batches)")
    p.add_argument("--micro-batches", default="1,4,8,16")
    p.add_argument("--precision-batch", type=int, default=8)
    p.add_argument("--naive-files", type=int, default=4)
    p.add_argument("--repeats", type=int, default=None, help="timed passes (default: 1 full, 3 tiny)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time torch.compile too (default: on for full, off for tiny: ~40 s to compile)")
    p.add_argument("--varied-mixes", type=int, default=1,
                   help="random tone mixes among the parity-only windows (7 + this; 1 = one micro-batch of 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", default=None, help="default: benchmarks/results/models.json (models_tiny.json)")
    args = p.parse_args(argv)
    default_threads = torch.get_num_threads()  # before the stages set 1 thread
    logging.basicConfig(level="INFO", format="%(message)s")
    for noisy in ("pipeline", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sizes = [int(b) for b in args.micro_batches.split(",")]
    repeats = args.repeats or (1 if args.size == "full" else 3)
    out = Path(args.out or f"benchmarks/results/models{'_tiny' if args.size == 'tiny' else ''}.json")
    from pipeline.checkpoints import label_names
    from pipeline.demo import build_tiny_ast, build_tiny_clap

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = max([whole_batches(args.windows, b) for b in sizes + [args.precision_batch]] + [args.naive_files])
        make_corpus(root / "audio", files)
        if args.size == "full":
            models = build_full_size(root / "models", args.seed)
        else:
            models = {"ast": str(build_tiny_ast(root / "models" / "ast", args.seed)),
                      "clap": str(build_tiny_clap(root / "models" / "clap", args.seed))}
        make_varied_corpus(root / "varied", args.varied_mixes)
        cfg = TagJobConfig(input=str(root / "audio"), output=str(root / "out"), ast_model=models["ast"],
                           clap_model=models["clap"])
        job = model_stages(cfg, ResourcePlan(1, 1, 0.0, 1.0, 1.0))
        t = time.perf_counter()
        rows, varied = preload(root / "audio", job), preload(root / "varied", job)
        log.info("preloaded %d + %d windows in %.1f s (job's Featurize stage)", len(rows), len(varied),
                 time.perf_counter() - t)
        stages = {"ast": AstTagger(job.tagger), "clap": ClapEmbedder(job.embedder)}
        bound_rows = bound(stages, rows, sizes, args.windows, repeats)
        clips = clips_bound(bound_rows)
        precision_rows = precision(stages, rows.slice(0, whole_batches(args.windows, args.precision_batch)),
                                   varied, args.precision_batch, repeats,
                                   args.size == "full" if args.compile is None else args.compile)
        naive_files = sorted((root / "audio").iterdir())[:args.naive_files]
        naive_row, tags, embeddings = naive(naive_files, models, default_threads)
        naive_row["parity_vs_ours_fp32"] = naive_vs_ours(tags, embeddings, stages, rows, label_names(models["ast"]))
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "models": args.size, "seed": args.seed,
              "clip": "10 s, 44.1 kHz stereo FLAC",
              "bars": {"ast_max_abs_logit": AST_LOGIT_BAR, "clap_cosine_min": CLAP_COSINE_BAR},
              "bound": bound_rows, "clips_bound": clips, "precision": precision_rows, "naive": naive_row}
    print_tables(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


def print_tables(r: dict) -> None:
    print(f"{'model':<6}{'micro-batch':>12}{'windows':>9}{'s/window':>10}{'CPU s/window':>14}{'windows/s':>11}")
    for b in r["bound"]:
        print(f"{b['model']:<6}{b['micro_batch']:>12}{b['windows']:>9}{b['s_per_window']:>10}"
              f"{b['cpu_s_per_window']:>14}{b['windows_per_s']:>11}")
    c = r["clips_bound"]
    print(f"clips/s bound, best micro-batch {c['best_micro_batch']}: one core runs both models "
          f"{c['per_core_clips_per_s']} (from CPU time {c['per_core_clips_per_s_cpu']}), "
          f"one core per model {c['one_core_each_clips_per_s']}")
    print(f"\n{'model':<6}{'option':<33}{'threads':>8}{'windows/s':>11}{'speedup':>9}{'CPU speedup':>13}"
          f"{'compile s':>11}  parity vs fp32")
    for o in r["precision"]:
        if "error" in o:
            print(f"{o['model']:<6}{o['option']:<33}  failed: {o['error'][:100]}")
            continue
        par = (f"max |dlogit| {o['max_abs_logit']:.2e}, top-5 {o['top5_agreement']:.3f}" if o["model"] == "ast"
               else f"cos min {o['cosine_min']:.7f}")
        print(f"{o['model']:<6}{o['option']:<33}{o['threads']:>8}{o['windows_per_s']:>11}{o['speedup']:>9}"
              f"{o['cpu_speedup']:>13}{o.get('warmup_s', '-'):>11}  {par}{'' if o['meets_bar'] else '  (fails bar)'}")
    n = r["naive"]
    q = n["parity_vs_ours_fp32"]
    print(f"\nnaive per-file loop (HF pipeline + ClapModel, {n['threads']} threads): {n['files']} files in "
          f"{n['wall_s']} s = {n['files_per_s']} files/s, {n['cpu_s_per_file']} CPU s per file; vs ours: "
          f"top-5 {q['top5_agreement']}, max |dscore| {q['max_abs_score']:.1e}, "
          f"CLAP cos min {q['clap_cosine_min']:.7f}")


if __name__ == "__main__":
    raise SystemExit(main())
