"""How many model actors run, and with what CPU/GPU share, given the shapes of the cluster's nodes.

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
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)


# CPU per clip with features on the CPU / on the GPU, in one session's `benchmarks.cpu_cost` runs
# (cpu_cost_cpu_run{3,4,5}.json, cpu_cost_gpu_run{3..7}.json): featurize tasks and decoder children,
# median 24.7 ms / 11.9 (decode and downmix only; the actors resample), plus Ray and the driver at the
# CPU mode's ~5 ms a clip (~0.18 of a core whatever the mode: on a GPU node both modes run at the GPUs'
# pace): 1.8 of the medians; one matched pair of runs gave 1.55-1.69. Decode is what is left on the CPU.
# With the sink as actors (cpu_cost_{cpu,gpu}_sinkactor_run{1,2,3}.json, every pair matched): 32.8 / 17.1
# ms, and with Ray and the driver at the CPU mode's ~8 ms, 1.6.
GPU_MODE_SPEEDUP = 1.6
# Dense fp16/bf16 tensor peak, TFLOP/s, from the vendors' spec sheets, by Ray accelerator type.
GPU_PEAK_TFLOPS = {"T4": 65.0, "L4": 121.0, "A10G": 70.0, "A100": 312.0, "H100": 989.0}
# Achieved fraction of peak, measured (issue 13, one H100, random-weight full-size models): weights cast
# to bf16 at micro-batch 128, AST + CLAP ~1,100 windows/s x 218.5 GFLOP / 989 TFLOP/s = 0.24.
GPU_MFU = 0.24
FLOPS_PER_WINDOW = 218.5e9         # AST base 206.7 G + CLAP HTSAT-tiny audio 11.8 G (flop_counter)
# 10 s FLAC clips the job's CPU side (everything but the models' forward passes) handles per busy
# core-second. Issue 13 measured 62.6 busy core-ms per clip for the job on its H100 node before the
# changes, against a one-thread floor of 25.6 ms there. python -m benchmarks.cpu_cost now measures the
# CPU side at 1.68x the floor on 2 cores (cpu_cost_shm_run1.json; the feature stage alone 1.48x, and
# Ray's ~0.14 of a core that a busier node spreads thinner): ~43 ms per clip at that node's floor, 23 per
# core-second; 20 leaves room for the model actors' host work (staging copies), not measured on a GPU.
# Not the one-thread feature rate: Ray, the decoder child, copies and the driver cost CPU too.
# --features-on gpu leaves decode and downmix on the CPU: the rate there is this one
# times the ratio of the two modes' CPU sides measured on one machine in one session (benchmarks.cpu_cost
# --features-on cpu / gpu; BENCHMARKS.md, "Resampling on the actors").
FEATURE_WINDOWS_PER_CORE = {"cpu": 20.0, "gpu": 20.0 * GPU_MODE_SPEEDUP}
CPU_BATCH, GPU_BATCH = 32, 256     # windows per model actor call
CPU_MICRO, GPU_MICRO = 1, 128      # windows per forward pass: on CPU 1 is as fast as any and never pads;
                                   # on a GPU 128 reaches the model-only bound (issue 13: 8 gave a third)
CLAP_SHARE = 0.06                  # CLAP audio / (AST + CLAP audio) CPU time per window (measured)
MAX_THREADS = 8                    # torch threads per AST actor on CPU; more actors beyond that
FEATURIZE_RESERVE = 32             # keep one logical CPU per this many free for featurize tasks


def cores_per_gpu(accelerator: str, features_on: str = "cpu") -> float | None:
    """CPU cores that keep one GPU of this type busy with features computed where `features_on` says
    ("cpu": featurize tasks; "gpu": the model actors), or None if the type is unknown."""
    peak = GPU_PEAK_TFLOPS.get(accelerator)
    if peak is None:
        return None
    return peak * 1e12 * GPU_MFU / FLOPS_PER_WINDOW / FEATURE_WINDOWS_PER_CORE[features_on]


class PlacementError(RuntimeError):
    """The plan's actors and featurize tasks cannot all be placed on the cluster's nodes; the message says
    which resource falls short on which nodes. Raised before any work starts, instead of a job that waits."""


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
    node: str | None = None       # Ray node id the model actors are kept on (soft affinity), when their
                                  # fractional CPU shares only fit together on one node


def node_shapes() -> list[dict]:
    """Resources of each alive node of the connected Ray cluster (`ray.nodes()`), with its `node_id`."""
    import ray

    return [{**n["Resources"], "node_id": n["NodeID"]} for n in ray.nodes() if n.get("Alive")]


def plan_resources(cluster: dict | list[dict], num_gpus: str | float = "auto", ast_actors: int | None = None,
                   clap_actors: int | None = None, features_on: str = "cpu") -> ResourcePlan:
    """Plan from the nodes' shapes (`node_shapes()`), or from one dict of resources taken as one node.

    `num_gpus` is 'auto', 0, or a per-actor GPU fraction. Every actor's request fits on some node, and
    whichever nodes Ray puts the actors on, one whole CPU stays free for featurize tasks on some node;
    otherwise PlacementError says why. `features_on` (where features are computed) only sizes the
    warning for a GPU cluster with too few cores per GPU, which names --features-on gpu when it helps.
    """
    nodes = [cluster] if isinstance(cluster, dict) else [n for n in cluster if n.get("CPU", 0) or n.get("GPU", 0)]
    if not nodes:
        raise PlacementError("no alive Ray node has a CPU or a GPU")
    total_gpus = sum(float(n.get("GPU", 0)) for n in nodes)
    total_cpus = sum(float(n.get("CPU", 1 if len(nodes) == 1 else 0)) for n in nodes)
    if num_gpus == "auto":
        share = 0.5 if total_gpus > 0 else 0.0
    else:
        share = float(num_gpus)
        if share < 0 or share > 1 and share != int(share):
            raise ValueError(f"--num-gpus must be auto, 0, a fraction or a whole number, got {num_gpus}")
        if share > 0 and total_gpus < share:
            raise ValueError(f"--num-gpus {share} per actor, but the cluster has {total_gpus:g} GPUs")
    if share == 0 and total_cpus < 1.5:  # the actors' shares and one whole CPU for a featurize task
        raise PlacementError(_shortfall(nodes, "model actors and featurize tasks need at least 2 whole CPUs "
                                        "(one node with 2, or two nodes with 1)"))
    if share == 0 and len(nodes) == 1:
        plan = _cpu_plan(total_cpus, ast_actors, clap_actors)
    elif share == 0:
        plan = _multi_node_cpu_plan(nodes, ast_actors, clap_actors)
    else:
        plan = _gpu_plan(nodes, share, ast_actors, clap_actors)
        totals = {k: v for n in nodes for k, v in n.items() if k.startswith("accelerator_type:")}
        _warn_if_cpu_starved(totals, total_cpus, total_gpus, features_on)
    log.info("resource plan: %s", plan)
    return plan


def _cpu_plan(total_cpus: float, ast_actors: int | None, clap_actors: int | None,
              reserve: float | None = None) -> ResourcePlan:
    """Split a CPU-only node by measured cost: per 10 s window AST takes ~2.9 s of one core, CLAP's
    audio tower ~0.18 s and featurizing ~0.02 s (BENCHMARKS.md). So AST gets nearly every core, in
    actors of at most MAX_THREADS threads; one CLAP actor gets CLAP_SHARE of them; FEATURIZE_RESERVE
    logical CPUs stay free so featurize tasks are always scheduled (`reserve` overrides that, e.g. 0
    when other nodes run them). Threads may exceed the logical shares on small clusters: featurize and
    CLAP are busy only a few percent of the time."""
    reserve = max(1.0, math.ceil(total_cpus / FEATURIZE_RESERVE)) if reserve is None else reserve
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


def _multi_node_cpu_plan(nodes: list[dict], ast_actors: int | None, clap_actors: int | None) -> ResourcePlan:
    """CPU-only cluster of several nodes. Ray may put any actor on any node with room, so fractional
    shares fragment: AST 0.94 on one 1-CPU node and CLAP 0.06 on another leave no whole CPU anywhere.
    Whole-CPU shares cannot fragment (a node's leftover stays whole): pick the AST share that reserves
    the most AST CPUs while any placement of the actors fits and leaves a CPU. A cluster too small for
    that keeps every model actor on its largest node, with fractional shares as on one node."""
    cpus = [math.floor(n.get("CPU", 0)) for n in nodes]
    base = _cpu_plan(float(sum(cpus)), ast_actors, clap_actors)
    clap = max(1, math.floor(base.clap_cpus))
    best = None
    for ast in range(max(1, math.floor(base.ast_cpus)), 0, -1):
        size = max(ast, clap)  # each actor, of either kind, takes at most one `size` slot of a node
        slots = sum(c // size for c in cpus)
        room = (sum(cpus) - 1 - base.clap_actors * clap) // ast
        n_ast = base.ast_actors if ast_actors else min(base.ast_actors, slots - base.clap_actors, room)
        if n_ast >= 1 and slots >= n_ast + base.clap_actors and n_ast * ast + base.clap_actors * clap < sum(cpus):
            if best is None or n_ast * ast > best[0] * best[1]:
                best = (n_ast, ast)
    if best is not None:
        n_ast, ast = best
        threads = max(ast, min(base.ast_threads, max(cpus)))
        return replace(base, ast_actors=n_ast, ast_cpus=float(ast), clap_cpus=float(clap), ast_threads=threads)
    largest = max(range(len(nodes)), key=lambda i: cpus[i])
    others = any(c >= 1 for i, c in enumerate(cpus) if i != largest)
    if cpus[largest] < 1 or (not others and cpus[largest] < 2):
        raise PlacementError(_shortfall(nodes, "model actors and featurize tasks need at least 2 whole CPUs "
                                        "(one node with 2, or two nodes with 1)"))
    plan = _cpu_plan(float(cpus[largest]), ast_actors, clap_actors, reserve=0.0 if others else None)
    node = nodes[largest].get("node_id")
    log.info("small multi-node CPU cluster: model actors kept on node %s (%d CPUs), featurize elsewhere",
             node, cpus[largest])
    return replace(plan, node=node)


def _gpu_plan(nodes: list[dict], share: float, ast_actors: int | None, clap_actors: int | None) -> ResourcePlan:
    """Actors of `share` GPU each, one AST and one CLAP per GPU by default, each with one logical CPU, or
    less when a GPU node has too few CPUs for its actors plus one for featurize tasks."""
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= share]
    if not gpu_nodes:
        raise PlacementError(_shortfall(nodes, f"no node has {share:g} GPU for one model actor"))
    default = max(1, sum(math.floor(n["GPU"] / (2 * share) + 1e-9) for n in gpu_nodes))
    n_ast, n_clap = ast_actors or default, clap_actors or default
    total = n_ast + n_clap
    cpu_elsewhere = any(n.get("CPU", 0) >= 1 for n in nodes if n.get("GPU", 0) < share)
    cpus = 1.0
    for n in gpu_nodes:  # worst case: a GPU node hosts as many actors as its GPUs allow
        hosted = min(math.floor(n["GPU"] / share + 1e-9), total)
        cpus = min(cpus, (math.floor(n.get("CPU", 0)) - (0 if cpu_elsewhere else 1)) / hosted)
    cpus = math.floor(cpus * 1000) / 1000
    slots = sum(min(math.floor(n["GPU"] / share + 1e-9), math.floor(n.get("CPU", 0) / cpus) if cpus > 0 else 0)
                for n in gpu_nodes)
    if cpus <= 0 or slots < total:
        raise PlacementError(_shortfall(nodes, f"{n_ast} AST and {n_clap} CLAP actors of {share:g} GPU each "
                                        "need a CPU share on their GPU node, and featurize tasks one whole CPU"))
    return ResourcePlan(n_ast, n_clap, share, cpus, cpus, 1, 1, GPU_BATCH, GPU_MICRO)


def _shortfall(nodes: list[dict], need: str) -> str:
    shapes = ", ".join(f"{n.get('node_id', f'node {i}')}: CPU {n.get('CPU', 0):g}, GPU {n.get('GPU', 0):g}"
                       for i, n in enumerate(nodes))
    return f"cannot place the job on this cluster: {need}; nodes: {shapes}"


def _warn_if_cpu_starved(cluster: dict, total_cpus: float, total_gpus: float, features_on: str = "cpu") -> None:
    for key in cluster:
        if key.startswith("accelerator_type:"):
            accelerator = key.split(":", 1)[1]
            needed = cores_per_gpu(accelerator, features_on)
            if not needed or total_cpus / total_gpus >= needed:
                continue
            advice = ""
            if features_on == "cpu":
                on_gpu = cores_per_gpu(accelerator, "gpu")
                advice = (f"; --features-on gpu computes the features on the GPUs and needs about {on_gpu:.0f} "
                          f"cores per GPU" + (" (enough here)" if total_cpus / total_gpus >= on_gpu else ""))
            log.warning("%g CPUs for %g %s GPUs: with --features-on %s one GPU needs about %.0f cores to keep it "
                        "busy (BENCHMARKS.md, GPU sizing); the GPUs will wait on the CPU stage%s",
                        total_cpus, total_gpus, accelerator, features_on, needed, advice)
