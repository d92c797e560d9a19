"""How many model actors run, and with what CPU/GPU share, given the cluster's resources.

GPU clusters: by default AST and CLAP actors each take half a GPU, so one of each shares every GPU.
CPU-only clusters: models fall back to CPU with no flag; actor CPU shares shrink (logical CPUs) when
the cluster is small, so that at least one CPU stays free for reading and featurizing; otherwise read
tasks never get a slot and the job stalls.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourcePlan:
    ast_actors: int
    clap_actors: int
    gpus_per_actor: float
    cpus_per_actor: float

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
    plan = ResourcePlan(n_ast, n_clap, share, cpus)
    log.info("resource plan: %s", plan)
    return plan
