"""How many model actors run, and with what CPU/GPU share, given the cluster's resources.

GPU clusters: by default AST and CLAP actors each take half a GPU, so one of each shares every GPU,
and model actors take batches of GPU_BATCH windows. CPU-only clusters: models fall back to CPU with no
flag; actor CPU shares shrink (logical CPUs) when the cluster is small, so that at least one CPU stays
free for reading and featurizing; otherwise read tasks never get a slot and the job stalls.

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
ASSUMED_MFU = 0.3                  # achieved fraction of peak (assumed; no GPU measured)
FLOPS_PER_WINDOW = 218.5e9         # AST base 206.7 G + CLAP HTSAT-tiny audio 11.8 G (flop_counter)
FEATURE_WINDOWS_PER_CORE = 7.0     # 10 s FLAC clips per core per second, decode to features (measured)
CPU_BATCH, GPU_BATCH = 32, 256     # windows per model actor call


def cores_per_gpu(accelerator: str) -> float | None:
    """CPU cores that keep one GPU of this type busy with features, or None if the type is unknown."""
    peak = GPU_PEAK_TFLOPS.get(accelerator)
    if peak is None:
        return None
    return peak * 1e12 * ASSUMED_MFU / FLOPS_PER_WINDOW / FEATURE_WINDOWS_PER_CORE


@dataclass(frozen=True)
class ResourcePlan:
    ast_actors: int
    clap_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    batch_size: int = CPU_BATCH  # windows per model actor call

    @property
    def cpu_threads(self) -> int:
        """Torch intra-op threads per actor on CPU."""
        return max(1, round(self.cpus_per_actor))


def plan_resources(cluster: dict, num_gpus: str | float = "auto", ast_actors: int | None = None,
                   clap_actors: int | None = None, cpus_per_actor: float = 1.0) -> ResourcePlan:
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
    if share > 0:
        default = max(1, math.floor(total_gpus / (2 * share))) if total_gpus >= 2 * share else 1
    else:
        default = 1
    n_ast, n_clap = ast_actors or default, clap_actors or default
    cpus = cpus_per_actor
    if share == 0 and (n_ast + n_clap) * cpus > total_cpus - 1:
        cpus = max(0.25, (total_cpus - 1) / (n_ast + n_clap)) if total_cpus > 1 else 0.25
        log.info("small CPU cluster (%g CPUs): model actors take %.2f logical CPUs each", total_cpus, cpus)
    if share > 0:
        _warn_if_cpu_starved(cluster, total_cpus, total_gpus)
    plan = ResourcePlan(n_ast, n_clap, share, cpus, GPU_BATCH if share > 0 else CPU_BATCH)
    log.info("resource plan: %s", plan)
    return plan


def _warn_if_cpu_starved(cluster: dict, total_cpus: float, total_gpus: float) -> None:
    for key in cluster:
        if key.startswith("accelerator_type:"):
            accelerator = key.split(":", 1)[1]
            needed = cores_per_gpu(accelerator)
            if needed and total_cpus / total_gpus < needed:
                log.warning("%g CPUs for %g %s GPUs: features for one GPU need about %.0f cores "
                            "(BENCHMARKS.md, GPU sizing); the GPUs will wait on the CPU stage",
                            total_cpus, total_gpus, accelerator, needed)
