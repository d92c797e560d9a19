"""`ray job submit` against a real local head (started on loopback by the test, stopped after)."""

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

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.store.ledger import read_current
from tests.audio import encode, signal as make_signal
from tests.s3 import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def head():
    """A Ray head on 127.0.0.1 in its own process group; killing the group stops exactly this head
    (never `ray stop`, which would stop every Ray on the machine)."""
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
         "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp}",
         # every agent port of its own: another Ray on this machine (the suite's) holds the defaults
         *(f"--{name}={free_port()}" for name in (
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port"))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"

    def stop():
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        # head services that left the process group still name our private temp dir
        subprocess.run(["pkill", "-9", "-f", temp], check=False)
        shutil.rmtree(temp, ignore_errors=True)

    deadline = time.time() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                output = proc.stdout.read().decode()[-2000:] if proc.poll() is not None else ""
                stop()
                raise RuntimeError("ray head did not start: " + output)
            time.sleep(1)
    yield address, env
    stop()


def test_submitted_job_succeeds_and_writes_output(head, checkpoints, tmp_path):
    address, env = head
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.wav").write_bytes(encode(make_signal(1.0 + i, 16_000, seed=i), 16_000, "WAV"))
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "tag-nightly-1",
              "--working-dir", str(REPO), "--no-wait", "--",
              "python", "-m", "jobs.tag", "--input", str(corpus), "--output", str(out),
              "--ast-model", checkpoints["ast"], "--clap-model", checkpoints["clap"], "--run-id", "submitted"]
    submit_job(submit, env)

    client = JobSubmissionClient(address)
    deadline = time.time() + 600
    while (status := client.get_job_status("tag-nightly-1")) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "job did not finish"
        time.sleep(2)
    logs = client.get_job_logs("tag-nightly-1")
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    summary = json.loads([line for line in logs.splitlines() if line.startswith('{"run_id"')][-1])
    assert summary["ok"] == 3 and summary["succeeded"]
    assert len(read_current(str(out))) == 3

    again = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0, "a reused submission id must be refused (no double scheduled run)"


def submit_job(submit: list[str], env: dict) -> None:
    """Run a `ray job submit` command, retrying for up to 2 minutes while the head answers before its
    job agent has registered ("No available agent"); any other failure fails the test."""
    deadline = time.time() + 120
    while True:
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0 or "No available agent" not in done.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stderr[-3000:]
