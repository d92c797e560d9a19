"""The entry points as a user runs them: real processes, real Ray, exit status and summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_help_explains_every_option():
    out = _run("jobs.tag", "--help").stdout
    for flag in ("--input", "--output", "--ast-model", "--clap-model", "--top-k", "--batch-size",
                 "--micro-batch", "--hop", "--num-gpus", "--ast-actors", "--clap-actors", "--zero-shot", "--zero-shot-prompt", "--flush-every", "--run-id"):
        assert flag in out


def test_demo_job_runs_on_local_defaults(tmp_path):
    proc = _run("jobs.demo", "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["files_seen"] == 9 and summary["ok"] == 6 and summary["error"] == 3
    assert "UNTRAINED" in proc.stderr
    clips = pd.read_parquet(tmp_path / "output" / "clips")
    assert len(clips) == 9 and set(clips.status) == {"ok", "error"}
