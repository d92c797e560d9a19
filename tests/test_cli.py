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
                 "--micro-batch", "--hop", "--num-gpus", "--ast-actors", "--clap-actors", "--zero-shot", "--zero-shot-prompt", "--flush-every", "--run-id",
                 "--precision", "--max-error-rate", "--rows-per-file", "--shard-files", "--long-file-s", "--stall-timeout"):
        assert flag in out


def test_demo_job_runs_on_local_defaults(tmp_path):
    proc = _run("jobs.demo", "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"run_id"')))
    assert summary["files_seen"] == 9 and summary["ok"] == 6 and summary["error"] == 3
    assert "UNTRAINED" in proc.stderr
    shown = proc.stdout.split('Search "a dog barking"', 1)[1]   # it ends by showing what it built
    assert len([line for line in shown.splitlines() if "window" in line]) == 3
    assert "jobs.serve --output" in shown and "jobs.tag --input /your/audio" in shown
    clips = pd.read_parquet(tmp_path / "output" / "clips")
    assert len(clips) == 9 and set(clips.status) == {"ok", "error"}


def _tag(checkpoints, *args):
    return _run("jobs.tag", "--ast-model", checkpoints["ast"], "--clap-model", checkpoints["clap"], *args)


def test_a_run_whose_files_all_failed_for_a_transient_reason_exits_1(checkpoints, tmp_path):
    """No gs:// backend (gcsfs) is installed: like expired credentials, every read fails. The rows are
    written and committed (the files are retried next run), but the scheduler must see a failure."""
    manifest = tmp_path / "files.csv"
    manifest.write_text("uri,size_bytes,modified\n" + "".join(
        f"gs://bucket/clip{i}.wav,100,2026-11-01T00:00:00+00:00\n" for i in range(3)))
    proc = _tag(checkpoints, "--input", str(manifest), "--output", str(tmp_path / "out"), "--run-id", "broken")
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["error"], summary["transient_errors"], summary["succeeded"]) == (3, 3, False)
    assert summary["failure"].startswith("every one of the 3 processed files failed for a transient reason")
    assert "storage error reading file" in summary["failure"] and "failed: every one" in proc.stderr
    clips = pd.read_parquet(tmp_path / "out" / "clips")
    assert len(clips) == 3 and set(clips.error.str.split(" \\(").str[0]) == {"storage error reading file"}


def test_max_error_rate_fails_a_run_with_too_many_bad_files(checkpoints, tmp_path):
    from tests.audio import encode, signal

    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "good.wav").write_bytes(encode(signal(1.0, 16_000), 16_000, "WAV", "PCM_16"))
    (corpus / "empty.wav").write_bytes(b"")
    proc = _tag(checkpoints, "--input", str(corpus), "--output", str(tmp_path / "out"), "--max-error-rate", "0.25")
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["error"], summary["succeeded"]) == (1, 1, False)
    assert summary["failure"] == "1 of 2 processed files are errors (50.0%), more than --max-error-rate 0.25"
    assert len(pd.read_parquet(tmp_path / "out" / "clips")) == 2  # committed all the same


def test_bad_arguments_are_usage_errors_before_ray_starts():
    """Each default is shown once (none as "None"); bad values exit 2 with argparse's message, at once."""
    helptext = _run("jobs.tag", "--help").stdout
    assert "(default: None)" not in helptext and "input and output:" in helptext
    assert "--features-on {cpu,gpu}" in helptext
    for flag, value, message in (("--num-gpus", "lots", "GPU share"), ("--hop", "20", "at most 10"),
                                 ("--top-k", "0", "positive"), ("--max-error-rate", "2", "fraction"),
                                 ("--features-on", "tpu", "invalid choice")):
        proc = _run("jobs.tag", "--input", "x", "--output", "y", flag, value, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (flag, proc.stderr[-500:])


def test_an_unloadable_checkpoint_is_one_line_and_exit_2(checkpoints, tmp_path):
    """A model source that is not there, or a checkpoint without safetensors weights: exit 2, one line
    naming the source, before any file is read."""
    import shutil

    from tests.audio import encode, signal

    no_weights = tmp_path / "ast-no-weights"
    shutil.copytree(checkpoints["ast"], no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "a.wav").write_bytes(encode(signal(1.0, 16_000), 16_000, "WAV"))
    for source, message in ((tmp_path / "missing", "cannot load the AST checkpoint"),
                            (no_weights, "has no .safetensors weights")):
        proc = _run("jobs.tag", "--input", str(audio), "--output", str(tmp_path / "out"),
                    "--ast-model", str(source), "--clap-model", checkpoints["clap"], timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and str(source) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "clips").exists()


def test_bad_input_is_one_line_and_exit_7(checkpoints, tmp_path):
    """A manifest without a uri column, and an input that lists nothing: one clear line, exit 7."""
    manifest = tmp_path / "files.csv"
    manifest.write_text("name,size\na.wav,1\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, message in ((manifest, "needs a 'uri' or 'path' column"), (empty, "lists no audio files")):
        proc = _run("jobs.tag", "--input", str(source), "--output", str(tmp_path / "out"),
                    "--ast-model", checkpoints["ast"], "--clap-model", checkpoints["clap"], timeout=300)
        assert proc.returncode == 7, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr
