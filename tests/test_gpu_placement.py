"""GPU placement without a GPU: on a Ray cluster whose node declares one GPU, the AST and CLAP actors
take half a GPU each (both share it), and still compute correct results on CPU because CUDA is absent."""

from __future__ import annotations

import math

import json
import threading
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.tagging.job import TagJobConfig, model_stages, run_tag_job
from pipeline.tagging.resources import PlacementError, cores_per_gpu, plan_resources
from pipeline.store.writer import METADATA_KEY
from pipeline.audio.windows import sample_span
from tests import reference as ref
from tests.audio import encode, signal


@pytest.fixture
def gpu_cluster():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_actors_share_one_gpu_and_fall_back_to_cpu(gpu_cluster, checkpoints, tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    files = {f"clip{i}.wav": signal(2.0 + i, 16_000, seed=i) for i in range(3)}
    for name, samples in files.items():
        (corpus / name).write_bytes(encode(samples, 16_000, "WAV", "FLOAT"))
    assert ray.cluster_resources()["GPU"] == 1

    lowest = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            lowest.append(ray.available_resources().get("GPU", 0.0))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # fp32 explicitly: "auto" would be bf16 on a GPU plan, and CUDA is absent, so the parity below
    # is fp32 on CPU; the metadata records the precision and the planned device
    cfg = TagJobConfig(input=str(corpus), output=str(tmp_path / "out"), ast_model=checkpoints["ast"],
                       clap_model=checkpoints["clap"], precision="fp32", run_id="gpu")
    summary = run_tag_job(cfg)
    stop.set()
    watcher.join()

    assert summary["ok"] == 3
    assert min(lowest) == pytest.approx(0.0), "both actors should hold half the GPU at once"
    part = next((tmp_path / "out" / "clips" / "gpu").glob("part-*.parquet"))
    assert json.loads(pq.read_schema(part).metadata[METADATA_KEY])["compute"] == {"precision": "fp32", "device": "gpu",
                                                                                  "micro_batch": 128}
    clips = pd.read_parquet(tmp_path / "out" / "clips")
    for row in clips.itertuples():
        wave = files[row.uri.rsplit("/", 1)[-1]][:, 0]
        _, pooled = ref.ast_reference(checkpoints["ast"], wave[sample_span(0, 10.24, 16_000)])
        np.testing.assert_allclose(row.ast_embedding, pooled, atol=1e-4, rtol=0)
        clap = ref.clap_reference(checkpoints["clap"], ref.resample(wave, 16_000, 48_000))
        assert float(np.dot(row.clap_embedding, clap)) >= 0.9999


def test_resource_plans():
    gpu = plan_resources({"CPU": 16, "GPU": 4})
    assert (gpu.ast_actors, gpu.clap_actors, gpu.gpus_per_actor, gpu.ast_cpus, gpu.clap_cpus) == (4, 4, 0.5, 1, 1)
    one = plan_resources({"CPU": 8, "GPU": 1}, num_gpus=0.25)
    assert (one.ast_actors, one.gpus_per_actor) == (2, 0.25)
    # CPU only: the cores go to AST (~94% of model time) in actors of <= 8 threads; one CLAP actor;
    # at least one logical CPU stays free so featurize tasks are always scheduled.
    for cpus in (2, 3, 4, 8, 16, 64, 96):
        plan = plan_resources({"CPU": cpus})
        assert plan.gpus_per_actor == 0 and plan.clap_actors == 1
        reserved = plan.ast_actors * plan.ast_cpus + plan.clap_actors * plan.clap_cpus
        assert reserved <= max(0.5, cpus - 1) + 1e-9, (cpus, plan)
        assert 1 <= plan.ast_threads <= 8 and plan.ast_actors * plan.ast_threads >= 0.85 * cpus - 1, (cpus, plan)
        assert plan.ast_threads >= plan.clap_threads
    assert plan_resources({"CPU": 2}).ast_threads == 2  # a 2-core machine's second core is not left idle
    big = plan_resources({"CPU": 64})
    assert (big.ast_actors, big.ast_threads, big.clap_threads) == (8, 8, 4)
    assert plan_resources({"CPU": 16}, ast_actors=4).ast_threads == 4
    with pytest.raises(ValueError, match="has 0 GPUs"):
        plan_resources({"CPU": 4}, num_gpus=0.5)
    with pytest.raises(PlacementError, match="at least 2 whole CPUs"):  # was AST 0.47 + CLAP 0.03: no CPU
        plan_resources({"CPU": 1})                                     # left for featurize, a silent wait


def test_precision_follows_the_plan_unless_given(checkpoints):
    def stages(precision, plan):
        cfg = TagJobConfig(input=".", output=".", ast_model=checkpoints["ast"], clap_model=checkpoints["clap"],
                           precision=precision)
        s = model_stages(cfg, plan)
        return s.tagger.precision, s.embedder.precision

    gpu, cpu = plan_resources({"CPU": 16, "GPU": 1}), plan_resources({"CPU": 16})
    assert stages("auto", gpu) == ("bf16", "bf16") and stages("auto", cpu) == ("fp32", "fp32")
    assert stages("fp32", gpu) == ("fp32", "fp32") and stages("bf16", cpu) == ("bf16", "bf16")
    with pytest.raises(ValueError, match="precision"):
        stages("fp16", gpu)
    # auto takes the table's precision when OUTPUT has a table: the cluster's shape does not change settings
    assert model_stages(TagJobConfig(input=".", output=".", ast_model=checkpoints["ast"],
                                     clap_model=checkpoints["clap"]), cpu, "bf16").tagger.precision == "bf16"
    assert model_stages(TagJobConfig(input=".", output=".", ast_model=checkpoints["ast"],
                                     clap_model=checkpoints["clap"]), gpu, "fp32").tagger.precision == "fp32"


def test_gpu_plans_follow_the_sizing_formula(caplog):
    assert plan_resources({"CPU": 16}).batch_size == 32
    starved = plan_resources({"CPU": 8, "GPU": 1, "accelerator_type:A100": 1})
    assert starved.batch_size == 256
    needed = cores_per_gpu("A100")  # 312 TFLOP/s x 0.24 / 218.5 GFLOP per window / 20 windows/s per core
    assert needed == pytest.approx(312e12 * 0.24 / 218.5e9 / 20.0)
    assert "needs about 17 cores" in caplog.text and "A100" in caplog.text
    caplog.clear()
    plan_resources({"CPU": 18, "GPU": 1, "accelerator_type:A100": 1})
    assert "needs about" not in caplog.text
    # issue 13's node (16 cores, one H100) is CPU-bound: the warning must say so
    plan_resources({"CPU": 16, "GPU": 1, "accelerator_type:H100": 1})
    assert "needs about 54 cores" in caplog.text


def test_a_cpu_starved_gpu_cluster_is_advised_to_compute_features_on_the_gpus(caplog):
    """The planner sizes cores per GPU from the mode's measured CPU cost, and names --features-on gpu
    when the cluster is short of cores for features on the CPU."""
    on_cpu, on_gpu = cores_per_gpu("A100", "cpu"), cores_per_gpu("A100", "gpu")
    assert on_gpu < on_cpu
    between = math.ceil(on_gpu) + 1
    assert between < on_cpu
    plan_resources({"CPU": between, "GPU": 1, "accelerator_type:A100": 1})
    assert f"--features-on gpu computes the features on the GPUs and needs about {on_gpu:.0f}" in caplog.text
    assert "(enough here)" in caplog.text
    caplog.clear()
    plan_resources({"CPU": between, "GPU": 1, "accelerator_type:A100": 1}, features_on="gpu")
    assert "needs about" not in caplog.text
    plan_resources({"CPU": 4, "GPU": 1, "accelerator_type:A100": 1}, features_on="gpu")
    assert f"with --features-on gpu one GPU needs about {on_gpu:.0f} cores" in caplog.text


def _every_placement_works(nodes: list[dict], plan) -> bool:
    """Brute force over every order in which Ray could place the actors and every node it could pick
    for each: no actor is ever left with no node to fit on, and once all are placed some node has a
    whole CPU left for featurize tasks. Actors of a plan with `node` may only go to that node."""
    actors = [(plan.ast_cpus, plan.gpus_per_actor)] * plan.ast_actors + \
             [(plan.clap_cpus, plan.gpus_per_actor)] * plan.clap_actors
    allowed = {i for i, n in enumerate(nodes) if plan.node in (None, n["node_id"])}
    seen = set()

    def go(free: tuple, left: tuple) -> bool:
        if (free, left) in seen:
            return True
        seen.add((free, left))
        if not left:
            return any(c >= 1 - 1e-9 for c, _ in free)
        for actor in set(left):
            rest = list(left)
            rest.remove(actor)
            fits = [i for i in allowed if free[i][0] >= actor[0] - 1e-9 and free[i][1] >= actor[1] - 1e-9]
            if not fits:
                return False
            for i in fits:
                nxt = list(free)
                nxt[i] = (round(free[i][0] - actor[0], 6), round(free[i][1] - actor[1], 6))
                if not go(tuple(nxt), tuple(sorted(rest))):
                    return False
        return True

    return go(tuple((float(n.get("CPU", 0)), float(n.get("GPU", 0))) for n in nodes), tuple(sorted(actors)))


def _nodes(*shapes) -> list[dict]:
    return [{"CPU": c, "GPU": g, "node_id": f"n{i}"} for i, (c, g) in enumerate(shapes)]


def test_plans_from_node_shapes_place_whatever_ray_picks():
    # the cluster: two 1-CPU nodes. Planned from the totals, AST 0.94 and CLAP 0.06 could land
    # on different nodes, leaving no whole CPU for featurize tasks (the job waited forever)
    two = _nodes((1, 0), (1, 0))
    from_totals = plan_resources({"CPU": 2})
    assert (from_totals.ast_cpus, from_totals.clap_cpus) == (0.94, 0.06)
    assert not _every_placement_works(two, from_totals)
    plan = plan_resources(two)
    assert plan.node == "n0" and plan.ast_cpus + plan.clap_cpus <= 1 and _every_placement_works(two, plan)
    for shapes in ([(2, 0), (2, 0)], [(1, 0), (2, 0)], [(1, 0)] * 3, [(4, 0), (4, 0)], [(8, 0), (8, 0)],
                   [(16, 0)] * 3, [(3, 0), (5, 0)], [(0, 0), (2, 0), (1, 0)]):
        nodes = _nodes(*shapes)
        plan = plan_resources(nodes)
        assert plan.gpus_per_actor == 0 and _every_placement_works(nodes, plan), (shapes, plan)
        assert plan.ast_cpus == int(plan.ast_cpus) or plan.node is not None, (shapes, plan)
    big = plan_resources(_nodes(*[(16, 0)] * 4))  # 64 CPUs in 4 nodes: most of them still go to AST
    assert big.ast_actors * big.ast_cpus >= 0.75 * 64 and big.ast_threads == 8
    # GPU nodes: the actors need their CPU share on the GPU node; featurize needs a whole CPU somewhere
    for shapes in ([(0, 0), (2, 1), (2, 0)], [(1, 1), (1, 0)], [(4, 4)], [(8, 2), (8, 2)], [(2, 1), (2, 1)]):
        nodes = _nodes(*shapes)
        plan = plan_resources(nodes)
        assert plan.gpus_per_actor == 0.5 and _every_placement_works(nodes, plan), (shapes, plan)
    assert plan_resources(_nodes((8, 2), (8, 2))).ast_actors == 4  # one AST and one CLAP per GPU
    with pytest.raises(PlacementError, match=r"featurize tasks one whole CPU; nodes: n0: CPU 1, GPU 1"):
        plan_resources(_nodes((1, 1)))
    with pytest.raises(PlacementError, match="at least 2 whole CPUs"):
        plan_resources(_nodes((1, 0), (0, 0)))
    with pytest.raises(PlacementError, match="no node has 1 GPU"):
        plan_resources(_nodes((4, 0.5), (4, 0.5)), num_gpus=1)
