"""Incremental runs: unchanged files are skipped, new and changed ones processed, settings changes
reprocess, a killed driver or worker loses nothing and the rerun does not redo finished work."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from pipeline.commits import read_commits, read_current
from pipeline.job import TagJobConfig, run_tag_job
from tests.audio import encode, signal as make_signal

REPO = Path(__file__).resolve().parents[1]


def _write(directory: Path, name: str, seconds: float, seed: int) -> None:
    (directory / name).write_bytes(encode(make_signal(seconds, 16_000, seed=seed), 16_000, "WAV", "PCM_16"))


@pytest.fixture
def job(checkpoints, tmp_path, local_ray):
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()

    def run(run_id: str, **over) -> dict:
        cfg = TagJobConfig(input=str(corpus), output=str(out), ast_model=checkpoints["ast"],
                           clap_model=checkpoints["clap"], run_id=run_id, **over)
        return run_tag_job(cfg)

    return corpus, out, run


def test_rerun_skips_unchanged_and_processes_new_and_changed(job):
    corpus, out, run = job
    for i in range(3):
        _write(corpus, f"f{i}.wav", 1.0 + i, seed=i)
    first = run("r1")
    assert (first["processed"], first["ok"]) == (3, 3)

    again = run("r2")
    assert (again["processed"], again["skipped_unchanged"], again["ok"]) == (0, 3, 0)

    _write(corpus, "f1.wav", 7.5, seed=9)  # changed: other size
    _write(corpus, "f3.wav", 2.0, seed=3)  # new
    third = run("r3")
    assert (third["processed"], third["skipped_unchanged"]) == (2, 2)

    current = read_current(str(out)).to_pandas().set_index("uri")
    assert len(current) == 4 and current.clip_id.is_unique
    changed = current.loc[str(corpus / "f1.wav")]
    assert changed.run_id == "r3" and changed.duration_s == pytest.approx(7.5)
    assert current.loc[str(corpus / "f0.wav")].run_id == "r1"
    segments = read_current(str(out), "segments").to_pandas()
    assert set(segments.clip_id) == set(current.clip_id)
    assert (segments.groupby("clip_id").size() == current.set_index("clip_id").num_segments).all()

    sql = duckdb_current_sql(out)
    rows = duckdb.sql(sql).fetchall()
    assert sorted((r[0], r[1]) for r in rows) == sorted(zip(current.clip_id, current.run_id))


def test_changing_a_setting_reprocesses_everything(job):
    corpus, out, run = job
    for i in range(2):
        _write(corpus, f"f{i}.wav", 12.0, seed=i)
    run("h10")
    changed = run("h5", hop_s=5.0)
    assert changed["processed"] == 2 and changed["skipped_unchanged"] == 0
    current = read_current(str(out)).to_pandas()
    assert set(current.run_id) == {"h5"} and set(current.num_segments) == {2}
    old = read_commits(str(out))[0]["settings_hash"]
    assert set(read_current(str(out), settings_hash=old).to_pandas().run_id) == {"h10"}


def duckdb_current_sql(out: Path) -> str:
    """The README's DuckDB query for the current clips table (kept in one place: README.md)."""
    text = (REPO / "README.md").read_text()
    sql = text.split("```sql current-clips\n", 1)[1].split("```", 1)[0]
    return sql.replace("OUTPUT", str(out))


def _tag_process(corpus: Path, out: Path, checkpoints: dict, run_id: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.tag", "--input", str(corpus), "--output", str(out),
           "--ast-model", checkpoints["ast"], "--clap-model", checkpoints["clap"], "--batch-size", "2",
           "--flush-every", "0", "--run-id", run_id]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def test_killed_driver_then_rerun_gives_every_file_once(checkpoints, tmp_path):
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    for i in range(40):
        _write(corpus, f"f{i:02d}.wav", 3.0, seed=i)
    proc = _tag_process(corpus, out, checkpoints, "killed")
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "clips" / "killed").glob("part-*.parquet"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    assert not (out / "_commits" / "killed.json").exists()
    with pytest.raises(FileNotFoundError):
        read_current(str(out))  # nothing a reader would mistake for results

    rerun = _tag_process(corpus, out, checkpoints, "rerun")
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    logging.getLogger(__name__).info("rerun after kill: %s", summary)
    assert summary["skipped_unchanged"] >= 2 and summary["adopted_parts"] >= 2
    assert summary["processed"] + summary["skipped_unchanged"] == 40
    current = read_current(str(out)).to_pandas()
    assert len(current) == 40 and current.clip_id.is_unique and set(current.status) == {"ok"}
    assert {"killed", "rerun"} <= set(current.run_id)
    segments = read_current(str(out), "segments").to_pandas()
    assert len(segments) == 40 and segments.clip_id.is_unique


def test_killed_worker_mid_run_loses_nothing(job):
    corpus, out, run = job
    for i in range(12):
        _write(corpus, f"f{i:02d}.wav", 3.0, seed=i)
    killed = []

    def kill_an_actor():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
            for line in ps.splitlines():
                if "MapBatches(ClapEmbedder)" in line and "ray::" in line:
                    os.kill(int(line.split()[0]), signal.SIGKILL)
                    killed.append(line)
                    break
            time.sleep(0.2)

    killer = threading.Thread(target=kill_an_actor, daemon=True)
    killer.start()
    summary = run("worker-killed", batch_size=2)
    killer.join()
    assert killed, "no CLAP actor process was found to kill"
    assert summary["ok"] == 12
    current = read_current(str(out)).to_pandas()
    assert len(current) == 12 and current.clip_id.is_unique
