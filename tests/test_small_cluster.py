"""A cluster of two 1-CPU nodes (the issue's case): the job plans from node shapes and completes; a
stage that no node can hold fails the run with the reason instead of waiting, over a table of files or
the run's feed."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest
import ray
from ray.cluster_utils import Cluster
from ray._private.state import actors as actor_table  # GCS table: the state API needs a dashboard

from pipeline.store.ledger import read_current
from pipeline.tagging.feed import FileFeed, Listing
from pipeline.tagging.job import TagJobConfig, _stream, build_dataset, model_stages, run_tag_job
from pipeline.tagging.resources import PlacementError, ResourcePlan, node_shapes, plan_resources
from pipeline.tagging.sources import FILE_SCHEMA
from tests.audio import encode, signal


@pytest.fixture(scope="module")
def two_one_cpu_nodes():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_job_completes_on_two_one_cpu_nodes(two_one_cpu_nodes, checkpoints, tmp_path):
    assert sorted(n["CPU"] for n in node_shapes()) == [1.0, 1.0]
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.wav").write_bytes(encode(signal(1.0 + i, 16_000, seed=i), 16_000, "WAV"))
    cfg = TagJobConfig(input=str(corpus), output=str(tmp_path / "out"), ast_model=checkpoints["ast"],
                       clap_model=checkpoints["clap"], run_id="two-nodes", stall_timeout_s=120)
    summary = run_tag_job(cfg)
    assert (summary["processed"], summary["ok"]) == (3, 3)
    assert len(read_current(str(tmp_path / "out"))) == 3
    # the plan keeps both model actors on one node (their fractional shares fit only together there)
    planned = plan_resources(node_shapes()).node
    models = [a for a in actor_table().values()
              if "AstTagger" in a["ActorClassName"] or "ClapEmbedder" in a["ActorClassName"]]
    assert planned and len(models) >= 2 and {a["Address"]["NodeID"] for a in models} == {planned}


def test_a_stage_no_node_can_hold_fails_with_the_reason(two_one_cpu_nodes, checkpoints):
    cfg = TagJobConfig(input=".", output=".", ast_model=checkpoints["ast"], clap_model=checkpoints["clap"])
    plan = ResourcePlan(1, 1, 0.0, 2.0, 0.5)  # an AST actor of 2 CPUs: neither node has them
    files = pa.Table.from_pylist([{"clip_id": "x", "uri": "/nonexistent.wav", "size_bytes": 1}], schema=FILE_SCHEMA)
    started = time.monotonic()
    with pytest.raises(PlacementError, match="made no progress for 15 s") as err:
        for _ in _stream(build_dataset(files, model_stages(cfg, plan), plan, 4), 15, plan):
            pass
    assert "ast_cpus=2.0" in str(err.value) and "CPU 1" in str(err.value)
    assert time.monotonic() - started < 120


def test_over_a_feed_a_stuck_stage_fails_and_a_slow_listing_does_not(two_one_cpu_nodes, checkpoints):
    """Over the run's feed a watchdog replaces Ray Data's no-progress guard: a stage no node can hold
    still fails the run with the reason; a listing that finds nothing new for longer than the timeout
    (skipping unchanged files) is not a stall."""
    cfg = TagJobConfig(input=".", output=".", ast_model=checkpoints["ast"], clap_model=checkpoints["clap"])
    files = pa.Table.from_pylist([{"clip_id": "x", "uri": "/nonexistent.wav", "size_bytes": 1}], schema=FILE_SCHEMA)

    stuck = ResourcePlan(1, 1, 0.0, 2.0, 0.5)
    feed = FileFeed.remote(100)
    listing = Listing(feed, iter([files]))
    listing.start()
    started = time.monotonic()
    with pytest.raises(PlacementError, match="made no progress for 8 s") as err:
        for _ in _stream(build_dataset(feed, model_stages(cfg, stuck), stuck, 4), 8, stuck, listing):
            pass
    assert "ast_cpus=2.0" in str(err.value) and time.monotonic() - started < 90

    # 16 s: once the file is fed, a featurize worker may have to start (torch and the pipeline imported)
    # and the row go through; 8 s was not always enough on a loaded 2-core machine
    def slow_listing():
        time.sleep(24)   # 1.5x the timeout with nothing to feed
        yield files

    plan = plan_resources(node_shapes())
    feed = FileFeed.remote(100)
    listing = Listing(feed, slow_listing())
    listing.start()
    rows = pa.concat_tables(list(_stream(build_dataset(feed, model_stages(cfg, plan), plan, 4), 16, plan, listing)))
    assert rows.column("clip_id").to_pylist() == ["x"] and rows.column("status").to_pylist() == ["error"]
    assert listing.result() == 1
