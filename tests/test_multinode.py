"""A Ray cluster of three nodes on this machine, started with `ray start` (private ports and temp dirs):
a head with no CPUs for tasks, a worker advertising a GPU (the model actors require it; CUDA is absent,
so the models run on CPU) and a CPU-only worker. Inputs and outputs are on the S3 test server; the job
is submitted with `ray job submit`. The CPU-only worker is killed by its process id mid-run (some but
not all clip rows written), and the job still ends with every file exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.store import delta
from pipeline.store.ledger import read_current
from tests.audio import encode, signal as make_signal
from tests.s3 import MotoS3, free_port
from tests.test_job_submit import submit_job

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET, FILES, RUN = "multinode", 24, "multi"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _ports(*names: str) -> list[str]:
    """Every agent port of its own: other Rays on this machine hold the defaults."""
    return [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", *names)]


@pytest.fixture
def cluster(tmp_path):
    """(dashboard address, env, {name: Popen}): head, `gpu` and `cpu` worker nodes, each `ray start
    --block` in its own process group; killing a group stops exactly that node."""
    port, dash = free_port(), free_port()
    # a temp dir per node (short: Ray's unix socket paths are length-limited): nodes sharing one would
    # share runtime_resources, and one node's agent replaces the job's working_dir under another's driver
    temps = {name: tempfile.mkdtemp(prefix="rm", dir="/tmp") for name in ("head", "gpu", "cpu")}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    nodes: dict[str, subprocess.Popen] = {}
    logs = {}

    def start(name: str, args: list[str]) -> None:
        logs[name] = open(tmp_path / f"{name}.log", "wb")
        nodes[name] = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                                        "--disable-usage-stats", *args], env=env, stdout=logs[name],
                                       stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        for proc in nodes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for temp in temps.values():
            subprocess.run(["pkill", "-9", "-f", temp], check=False)  # services that left the process groups
            shutil.rmtree(temp, ignore_errors=True)

    try:
        start("head", ["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temps['head']}",
                       *_ports("ray-client-server-port")])
        address = f"http://127.0.0.1:{dash}"
        _wait(lambda: JobSubmissionClient(address).list_jobs() is not None, 120, nodes, tmp_path)
        worker = [f"--address=127.0.0.1:{port}"]
        start("gpu", [*worker, "--num-cpus=3", "--num-gpus=1", f"--temp-dir={temps['gpu']}", *_ports()])
        start("cpu", [*worker, "--num-cpus=2", f"--temp-dir={temps['cpu']}", *_ports()])
        _wait(lambda: len([n for n in _alive(address) if n["resources_total"].get("CPU")]) == 2, 120, nodes, tmp_path)
        yield address, env, nodes
    finally:
        stop()
        for f in logs.values():
            f.close()


def _alive(address: str) -> list[dict]:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=address) if n["state"] == "ALIVE"]


def _wait(ready, timeout: float, nodes: dict, logs: Path) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if ready():
                return
        except Exception:
            pass
        dead = [name for name, p in nodes.items() if p.poll() is not None]
        if time.time() > deadline or dead:
            text = "".join((logs / f"{n}.log").read_text()[-1500:] for n in nodes)
            raise RuntimeError(f"ray cluster did not start (dead: {dead}): {text}")
        time.sleep(1)


def test_job_survives_losing_a_worker_node(cluster, checkpoints, monkeypatch):
    address, env, nodes = cluster
    with MotoS3() as s3:
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": s3.endpoint}.items():
            monkeypatch.setenv(k, v)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        for i in range(FILES):
            with fs.open(f"{BUCKET}/in/f{i:02d}.wav", "wb") as f:
                f.write(encode(make_signal(4.0 + i % 3 * 8, 16_000, seed=i), 16_000, "WAV"))
        runtime_env = {"env_vars": {**S3_ENV, "AWS_ENDPOINT_URL": s3.endpoint, "HF_HUB_OFFLINE": "1"}}
        submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "multi-1",
                  "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--",
                  "python", "-m", "jobs.tag", "--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/out",
                  "--ast-model", checkpoints["ast"], "--clap-model", checkpoints["clap"], "--run-id", RUN,
                  "--precision", "fp32", "--batch-size", "2", "--rows-per-file", "2", "--flush-every", "0.5",
                  "--stall-timeout", "300"]
        submit_job(submit, env)

        client = JobSubmissionClient(address)
        (cpu_node,) = [n["node_id"] for n in _alive(address) if n["resources_total"].get("CPU") == 2]
        written = _clip_rows_when_first_part_appears(fs, client)
        os.killpg(nodes["cpu"].pid, signal.SIGKILL)  # the CPU-only worker node, by its process id
        assert 0 < written < FILES, f"not mid-run: {written} of {FILES} clip rows written before the kill"
        from ray.util.state import list_tasks

        ran_there = {t["name"] for t in list_tasks(address=address, filters=[("node_id", "=", cpu_node)], limit=1000)}
        # featurize runs in the read tasks that take files from the run's feed (ReadFeedSource)
        assert any("Featurize" in name or "FeedSource" in name for name in ran_there), \
            f"the killed node did no featurize work: {ran_there}"

        deadline = time.time() + 600
        while (status := client.get_job_status("multi-1")) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                    JobStatus.STOPPED):
            assert time.time() < deadline, "job did not finish"
            time.sleep(2)
        logs = client.get_job_logs("multi-1")
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert cpu_node not in {n["node_id"] for n in _alive(address)}
        summary = json.loads([line for line in logs.splitlines() if line.startswith('{"run_id"')][-1])
        assert (summary["processed"], summary["ok"], summary["error"]) == (FILES, FILES, 0), summary

        # exactly once: the committed data files hold one clip row per file and each window once
        output = f"s3://{BUCKET}/out"
        clips = [pq.read_table(fs.open(p, "rb")) for p in delta.data_files(output, "clips")]
        ids = [i for t in clips for i in t.column("clip_id").to_pylist()]
        assert len(ids) == FILES == len(set(ids))
        segments = [pq.read_table(fs.open(p, "rb")) for p in delta.data_files(output, "segments")]
        windows = [w for t in segments for w in zip(t.column("clip_id").to_pylist(), t.column("segment_index").to_pylist())]
        assert len(windows) == len(set(windows))
        current = read_current(output).to_pandas()
        assert len(current) == FILES and set(current.uri) == {f"s3://{BUCKET}/in/f{i:02d}.wav" for i in range(FILES)}
        assert (current.status == "ok").all()
        per_clip = read_current(output, "segments").to_pandas().groupby("clip_id").size()
        assert (per_clip.reindex(current.clip_id).to_numpy() == current.num_segments.to_numpy()).all()
        assert current.num_segments.max() == 2


def _clip_rows_when_first_part_appears(fs, client: JobSubmissionClient) -> int:
    """Clip rows in the run's part files when the first one appears (the job still running)."""
    deadline = time.time() + 600
    while True:
        assert time.time() < deadline, "no clip part was written"
        status = client.get_job_status("multi-1")
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs("multi-1")[-4000:]
        fs.invalidate_cache()
        parts = fs.glob(f"{BUCKET}/out/clips/{RUN}/part-*.parquet")
        if parts:
            return sum(pq.read_metadata(fs.open(p, "rb")).num_rows for p in parts)
        time.sleep(0.2)
