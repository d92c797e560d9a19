"""How many model actors run, and with what CPU/GPU share, given the cluster's resources.

GPU clusters: by default AST and CLAP actors each take half a GPU, so one of each shares every GPU,
and model actors take batches of GPU_BATCH windows. CPU-only clusters: models fall back to CPU with no
flag, and the cores go where the work is (AST ~94% of model time): AST actors get nearly all of them as
torch threads, one CLAP actor a few, and at least one logical CPU stays free for reading and
featurizing; otherwise read tasks never get a slot and the job stalls.

GPU sizing (BENCHMARKS.md, benchmarks/gpu_sizing.py): a GPU takes peak x MFU / FLOPS_PER_WINDOW windows
per second; one CPU core featurizes about FEATURE_WINDOWS_PER_CORE of them. A cluster with fewer CPUs
per GPU than the ratio leaves its GPUs waiting for features; the planner says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)


# Dense fp16/bf16 tensor peak, TFLOP/s, from the vendors' spec sheets, by Ray accelerator type.
GPU_PEAK_TFLOPS = {"T4": 65.0, "L4": 121.0, "A10G": 70.0, "A100": 312.0, "H100": 989.0}
# Achieved fraction of peak, measured (issue 13, one H100, random-weight full-size models): weights cast
# to bf16 at micro-batch 128, AST + CLAP ~1,100 windows/s x 218.5 GFLOP / 989 TFLOP/s = 0.24.
GPU_MFU = 0.24
FLOPS_PER_WINDOW = 218.5e9         # AST base 206.7 G + CLAP HTSAT-tiny audio 11.8 G (flop_counter)
# 10 s FLAC clips the job's CPU side (everything but the models' forward passes) handles per busy
# core-second. Issue 13 measured 62.6 busy core-ms per clip for the job on its H100 node before the
# changes; python -m benchmarks.cpu_cost measured the CPU-side roles (featurize, decoder children, driver,
# Ray) at 67.7 -> 48.6 ms per clip on 2 cores (-28%), so ~45 ms there: 22 per core-second, rounded down.
# Not the one-thread feature rate: Ray, the decoder child, copies and the driver cost CPU too.
FEATURE_WINDOWS_PER_CORE = 20.0
CPU_BATCH, GPU_BATCH = 32, 256     # windows per model actor call
CPU_MICRO, GPU_MICRO = 1, 128      # windows per forward pass: on CPU 1 is as fast as any and never pads;
                                   # on a GPU 128 reaches the model-only bound (issue 13: 8 gave a third)
CLAP_SHARE = 0.06                  # CLAP audio / (AST + CLAP audio) CPU time per window (measured)
MAX_THREADS = 8                    # torch threads per AST actor on CPU; more actors beyond that
FEATURIZE_RESERVE = 32             # keep one logical CPU per this many free for featurize tasks


def cores_per_gpu(accelerator: str) -> float | None:
    """CPU cores that keep one GPU of this type busy with features, or None if the type is unknown."""
    peak = GPU_PEAK_TFLOPS.get(accelerator)
    if peak is None:
        return None
    return peak * 1e12 * GPU_MFU / FLOPS_PER_WINDOW / FEATURE_WINDOWS_PER_CORE


@dataclass(frozen=True)
class ResourcePlan:
    """Actor counts, Ray resource shares (logical CPUs, GPU fractions) and torch threads per actor."""

    ast_actors: int
    clap_actors: int
    gpus_per_actor: float
    ast_cpus: float               # logical CPUs Ray reserves per AST actor
    clap_cpus: float              # ... per CLAP actor
    ast_threads: int = 1          # torch intra-op threads per AST actor on CPU
    clap_threads: int = 1
    batch_size: int = CPU_BATCH   # windows per model actor call
    micro_batch: int = CPU_MICRO  # windows per forward pass (fixed; a partial one is zero-padded)


def plan_resources(cluster: dict, num_gpus: str | float = "auto", ast_actors: int | None = None,
                   clap_actors: int | None = None) -> ResourcePlan:
    """Plan from `ray.cluster_resources()`; `num_gpus` is 'auto', 0, or a per-actor GPU fraction."""
    total_gpus = float(cluster.get("GPU", 0))
    total_cpus = float(cluster.get("CPU", 1))
    if num_gpus == "auto":
        share = 0.5 if total_gpus > 0 else 0.0
    else:
        share = float(num_gpus)
        if share < 0 or share > 1 and share != int(share):
            raise ValueError(f"--num-gpus must be auto, 0, a fraction or a whole number, got {num_gpus}")
        if share > 0 and total_gpus < share:
            raise ValueError(f"--num-gpus {share} per actor, but the cluster has {total_gpus:g} GPUs")
    if share == 0:
        plan = _cpu_plan(total_cpus, ast_actors, clap_actors)
    else:
        default = max(1, math.floor(total_gpus / (2 * share))) if total_gpus >= 2 * share else 1
        plan = ResourcePlan(ast_actors or default, clap_actors or default, share, 1.0, 1.0, 1, 1, GPU_BATCH,
                            GPU_MICRO)
        _warn_if_cpu_starved(cluster, total_cpus, total_gpus)
    log.info("resource plan: %s", plan)
    return plan


def _cpu_plan(total_cpus: float, ast_actors: int | None, clap_actors: int | None) -> ResourcePlan:
    """Split a CPU-only cluster by measured cost: per 10 s window AST takes ~2.9 s of one core, CLAP's
    audio tower ~0.18 s and featurizing ~0.02 s (BENCHMARKS.md). So AST gets nearly every core, in
    actors of at most MAX_THREADS threads; one CLAP actor gets CLAP_SHARE of them; FEATURIZE_RESERVE
    logical CPUs stay free so featurize tasks are always scheduled. Threads may exceed the logical
    shares on small clusters: featurize and CLAP are busy only a few percent of the time."""
    reserve = max(1.0, math.ceil(total_cpus / FEATURIZE_RESERVE))
    usable = max(0.5, total_cpus - reserve)
    clap_cores = max(1.0, round(total_cpus * CLAP_SHARE))
    n_clap = clap_actors or 1
    n_ast = ast_actors or max(1, math.ceil((total_cpus - clap_cores) / MAX_THREADS))
    if usable >= n_ast + clap_cores:
        clap_cpus, ast_cpus = clap_cores / n_clap, (usable - clap_cores) / n_ast
    else:  # small cluster: the models split what featurize leaves, in proportion to their work
        clap_cpus = usable * CLAP_SHARE / n_clap
        ast_cpus = usable * (1 - CLAP_SHARE) / n_ast
    ast_threads = max(1, min(MAX_THREADS, round((total_cpus - clap_cores * (total_cpus > 2)) / n_ast)))
    clap_threads = max(1, round(clap_cores / n_clap))
    if ast_cpus < 1:
        log.info("small CPU cluster (%g CPUs): AST actors reserve %.2f logical CPUs, CLAP %.2f; "
                 "%d torch threads per AST actor", total_cpus, ast_cpus, clap_cpus, ast_threads)
    return ResourcePlan(n_ast, n_clap, 0.0, round(ast_cpus, 3), round(clap_cpus, 3), ast_threads, clap_threads)


def _warn_if_cpu_starved(cluster: dict, total_cpus: float, total_gpus: float) -> None:
    for key in cluster:
        if key.startswith("accelerator_type:"):
            accelerator = key.split(":", 1)[1]
            needed = cores_per_gpu(accelerator)
            if needed and total_cpus / total_gpus < needed:
                log.warning("%g CPUs for %g %s GPUs: features for one GPU need about %.0f cores "
                            "(BENCHMARKS.md, GPU sizing); the GPUs will wait on the CPU stage",
                            total_cpus, total_gpus, accelerator, needed)
