"""Incremental runs: unchanged files are skipped, new and changed ones processed, settings changes
reprocess, a killed driver or worker loses nothing and the rerun does not redo finished work."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipeline.store.ledger import read_current
from pipeline.store.settings import SettingsChanged
from pipeline.tagging.job import TagJobConfig, run_tag_job
from pipeline.store.writer import METADATA_KEY
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

    # a plain Delta reader (no code of ours) sees the same current table: one row per clip
    plain = DeltaTable(str(out / "clips")).to_pandas()
    assert sorted(zip(plain.clip_id, plain.run_id)) == sorted(zip(current.clip_id, current.run_id))
    plain_segments = DeltaTable(str(out / "segments")).to_pandas()
    assert sorted(zip(plain_segments.clip_id, plain_segments.segment_index)) == sorted(
        zip(segments.clip_id, segments.segment_index))
    rows = duckdb_current(out)
    assert sorted((r[0], r[1]) for r in rows) == sorted(zip(current.clip_id, current.run_id))
    width = len(current.clap_embedding.iloc[0])
    assert duckdb.sql(f"SELECT clap_embedding::FLOAT[{width}] AS e FROM plain LIMIT 1").fetchall()


def test_changing_a_setting_reprocesses_everything(job):
    corpus, out, run = job
    for i in range(2):
        _write(corpus, f"f{i}.wav", 12.0, seed=i)
    run("h10")
    old = DeltaTable(str(out / "clips")).history()[0]["audio_tagging.settings_hash"]
    with pytest.raises(SettingsChanged, match=r"featurize\.windows\.hop_s \(10\.0 -> 5\.0\)"):
        run("h5-refused", hop_s=5.0)
    assert set(read_current(str(out)).to_pandas().run_id) == {"h10"}, "a refused run commits nothing"
    changed = run("h5", hop_s=5.0, replace_settings=True)
    assert changed["processed"] == 2 and changed["skipped_unchanged"] == 0
    current = read_current(str(out)).to_pandas()
    assert set(current.run_id) == {"h5"} and set(current.num_segments) == {2}
    assert set(DeltaTable(str(out / "clips")).to_pandas().run_id) == {"h5"}, "a plain reader sees one settings"
    assert set(DeltaTable(str(out / "segments")).to_pandas().run_id) == {"h5"}
    assert set(read_current(str(out), settings_hash=old).to_pandas().run_id) == {"h10"}  # time travel
    assert set(read_current(str(out), "segments", settings_hash=old).to_pandas().run_id) == {"h10"}


def duckdb_current(out: Path) -> list[tuple]:
    """The README's DuckDB query for the current clips table (kept in one place: README.md), through
    DuckDB's real `delta_scan`, the extension loaded as the README says (from its registry package)."""
    from tests.test_readers import load_duckdb_delta, readme_block

    load_duckdb_delta()
    return duckdb.sql(readme_block("sql current-clips").replace("'OUTPUT", f"'{out}")).fetchall()


def _tag_process(corpus: Path, out: Path, checkpoints: dict, run_id: str, *args: str,
                 module: str = "jobs.tag") -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", module, "--input", str(corpus), "--output", str(out),
           "--ast-model", checkpoints["ast"], "--clap-model", checkpoints["clap"], "--batch-size", "2",
           "--flush-every", "0", "--run-id", run_id, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _assert_every_clip_whole(out: Path, files: int) -> pd.DataFrame:
    """The current table has each file once, and every ok clip exactly its num_segments windows."""
    current = read_current(str(out)).to_pandas()
    assert len(current) == files and current.clip_id.is_unique and set(current.status) == {"ok"}
    segments = read_current(str(out), "segments").to_pandas()
    indices = segments.groupby("clip_id").segment_index.apply(sorted)
    for clip in current.itertuples():
        assert indices.get(clip.clip_id) == list(range(clip.num_segments)), (clip.uri, indices.get(clip.clip_id))
    return current


def test_crash_right_after_a_clips_part_loses_no_windows(checkpoints, tmp_path):
    """Part files are written when a buffer of --rows-per-file fills, not only on the timer: the clips
    part of a flush must never land before the windows of its clips (segments first, every time)."""
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    for i in range(12):
        _write(corpus, f"f{i:02d}.wav", 15.0, seed=i)  # two windows each
    crashed = _tag_process(corpus, out, checkpoints, "crashed", "--flush-every", "100000", "--rows-per-file", "3",
                           module="tests.crash_after_clips_part")
    _, stderr = crashed.communicate(timeout=600)
    assert crashed.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    assert list((out / "clips" / "crashed").glob("part-*.parquet")) and not (out / "clips" / "_delta_log").exists()

    rerun = _tag_process(corpus, out, checkpoints, "rerun")
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary["processed"] == 12, "uncommitted parts are not results: their files are processed again"
    current = _assert_every_clip_whole(out, 12)
    assert set(current.run_id) == {"rerun"}


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
    # the run commits as it streams (--flush-every 0: every sink row with whole files), so the kill may
    # land before or after its first commits: a reader sees nothing, or whole committed files only
    try:
        committed = len(_assert_every_clip_whole(out, len(read_current(str(out)))))
    except FileNotFoundError:
        committed = 0
    assert committed < 40, "the kill came after the last commit: the test proves nothing"

    rerun = _tag_process(corpus, out, checkpoints, "rerun")
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    # a kill between a shard's segments and clips commits leaves that shard for the rerun to finish from
    # what its segments commit recorded (store/delta.recover): its files are then the killed run's, done
    recovered = b"left half-committed" in stderr
    current = _assert_every_clip_whole(out, 40)
    finished = int((current.run_id == "killed").sum())
    logging.getLogger(__name__).info("rerun after kill (%d files committed before it, %d after recovery: %s): %s",
                                     committed, finished, recovered, summary)
    assert finished == committed or (recovered and committed < finished <= 40)
    assert (summary["processed"], summary["skipped_unchanged"]) == (40 - finished, finished)
    assert (current.run_id == "rerun").sum() == 40 - finished and set(current.run_id) <= {"killed", "rerun"}


def test_killed_worker_mid_run_loses_nothing(job):
    """The CLAP actor is killed once the first clips are written and while most are provably still to
    come (parts are flushed after every batch of 2 windows, so written rows trail the actor by little)."""
    corpus, out, run = job
    for i in range(12):
        _write(corpus, f"f{i:02d}.wav", 25.0, seed=i)  # three windows each
    parts = out / "clips" / "worker-killed"
    killed = {}

    def clips_written() -> int:
        return sum(pq.read_metadata(p).num_rows for p in parts.glob("part-*.parquet"))

    def kill_the_clap_actor_mid_run():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            before = clips_written()
            ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
            actors = [int(line.split()[0]) for line in ps.splitlines()
                      if "MapBatches(ClapEmbedder)" in line and "ray::" in line]
            if before >= 1 and actors:
                os.kill(actors[0], signal.SIGKILL)
                killed.update(before=before, after=clips_written())
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_clap_actor_mid_run, daemon=True)
    killer.start()
    summary = run("worker-killed", batch_size=2, flush_every_s=0.0)
    killer.join()
    assert killed, "the CLAP actor was never seen after the first clips were written"
    assert killed["after"] <= 8, f"kill landed too late to prove anything: {killed}"
    assert summary["ok"] == 12
    _assert_every_clip_whole(out, 12)


def test_another_precision_reprocesses_and_is_never_mixed_in(job):
    """Precision is a setting: a bf16 run redoes fp32 results (and is recorded as bf16), and going back
    to fp32 redoes them again: the current table never mixes the two. Earlier results stay readable."""
    corpus, out, run = job
    for i in range(2):
        _write(corpus, f"f{i}.wav", 3.0, seed=i)
    run("auto-cpu")  # auto on CPU is fp32
    bf16 = run("bf16", precision="bf16", replace_settings=True)
    assert (bf16["processed"], bf16["skipped_unchanged"]) == (2, 0)
    current = read_current(str(out)).to_pandas()
    assert set(current.run_id) == {"bf16"}
    compute = {}
    for run_id in ("auto-cpu", "bf16"):
        part = next((out / "clips").glob(f"**/{run_id}/part-*.parquet"))   # a replacement's: in its staging folder
        compute[run_id] = json.loads(pq.read_schema(part).metadata[METADATA_KEY])["compute"]
    assert compute == {"auto-cpu": {"precision": "fp32", "device": "cpu", "micro_batch": 1},
                       "bf16": {"precision": "bf16", "device": "cpu", "micro_batch": 1}}
    first = DeltaTable(str(out / "clips")).history()[-1]["audio_tagging.settings_hash"]
    fp32 = read_current(str(out), settings_hash=first).to_pandas()
    a, b = np.stack(fp32.sort_values("uri").clap_embedding), np.stack(current.sort_values("uri").clap_embedding)
    assert not np.array_equal(a, b), "bf16 compute should not give bitwise fp32 results"

    assert run("auto-again")["processed"] == 0, "auto takes the table's precision (bf16), whatever the cluster"
    back = run("fp32-again", precision="fp32", replace_settings=True)
    assert (back["processed"], back["skipped_unchanged"]) == (2, 0)
    again = read_current(str(out)).to_pandas()
    assert set(again.run_id) == {"fp32-again"} and set(DeltaTable(str(out / "clips")).to_pandas().run_id) == {"fp32-again"}
    c = np.stack(again.sort_values("uri").clap_embedding)
    np.testing.assert_array_equal(a, c)  # fp32 again: the same values as the first fp32 run


def test_crashed_and_out_of_memory_decodes_are_retried_next_run(tmp_path):
    """A decoder killed by the kernel's OOM killer looks like a crash: neither is final for a file."""
    from pipeline.tagging.aggregate import clips_table
    import pyarrow as pa

    from pipeline.store.ledger import done_files
    from pipeline.store.delta import Settings, commit_shard
    from pipeline.store.writer import PartWriter
    from schemas import clips_schema, segments_schema

    errors = {"a": "decoder crashed (decoder process killed by SIGKILL)",
              "b": "out of memory decoding file (12 bytes in)",
              "c": "decoding timed out (more than 600 s)",
              "d": "not a decodable audio file (libsndfile: ...; ffmpeg: ...)"}
    schema = clips_schema(3, 4, 2)
    rows = [{**{f.name: None for f in schema}, "clip_id": c, "uri": f"/{c}.wav", "status": "error", "error": e,
             "size_bytes": 12, "modified": "2026-11-01", "num_segments": 0, "run_id": "r"} for c, e in errors.items()]
    writer = PartWriter(str(tmp_path), "clips", "r", schema, {"settings_hash": "h"})
    writer.write(clips_table(rows, writer.schema))
    writer.flush()
    commit_shard(str(tmp_path), 1, "r", Settings("h", {}), {"clips": writer.files},
                 {"clips": schema, "segments": segments_schema(3, 4, 2)}, pa.array([], pa.string()))
    assert done_files(str(tmp_path), "h").column("clip_id").to_pylist() == ["d"]


def test_skip_check_is_an_anti_join_on_the_identity():
    """Unchanged files (a null etag or size matching a null) are skipped; another size, time or etag,
    or a new id, is kept; the listing's order is kept."""
    import pyarrow as pa

    from pipeline.tagging.job import _new_or_changed
    from pipeline.tagging.sources import FILE_SCHEMA

    rows = [{"clip_id": f"c{i}", "uri": f"u{i}", "size_bytes": None if i == 3 else i, "modified": "m",
             "etag": None if i % 2 else "e"} for i in range(7)]
    listed = pa.Table.from_pylist(rows, schema=FILE_SCHEMA)
    done = pa.Table.from_pylist([
        {"clip_id": "c0", "size_bytes": 0, "modified": "m", "etag": "e"},
        {"clip_id": "c1", "size_bytes": 1, "modified": "m", "etag": None},
        {"clip_id": "c3", "size_bytes": None, "modified": "m", "etag": None},
        {"clip_id": "c4", "size_bytes": 99, "modified": "m", "etag": "e"},   # changed size
        {"clip_id": "c5", "size_bytes": 5, "modified": "m2", "etag": None},  # changed time
        {"clip_id": "c6", "size_bytes": 6, "modified": "m", "etag": "other"},  # changed etag
        {"clip_id": "gone", "size_bytes": 1, "modified": "m", "etag": "e"},
    ], schema=pa.schema([FILE_SCHEMA.field(c) for c in ("clip_id", "size_bytes", "modified", "etag")]))
    assert _new_or_changed(listed, done).column("clip_id").to_pylist() == ["c2", "c4", "c5", "c6"]
    assert _new_or_changed(listed, None) is listed


def test_a_run_commits_in_shards_while_its_one_execution_streams(job, caplog):
    """Completed files are committed every --shard-files files or more (a Delta version of each table,
    under the app transaction of the shard's number) from the run's one Ray Data execution (its actors
    started once, not once per shard); the current table ends with every file once."""
    corpus, out, run = job
    for i in range(20):
        _write(corpus, f"f{i:02d}.wav", 1.0, seed=i)
    with caplog.at_level(logging.INFO):
        summary = run("sharded", shard_files=4, batch_size=1)   # sink batches of 8 windows
    assert (summary["files_seen"], summary["ok"]) == (20, 20)
    table = DeltaTable(str(out / "clips"))
    history = table.history()
    assert len(history) >= 2 and {h["audio_tagging.run_id"] for h in history} == {"sharded"}
    n = len(history)
    assert [h["audio_tagging.shard_seq"] for h in history] == [str(k) for k in range(n, 0, -1)]
    assert table.transaction_version("audio-tagging") == n == DeltaTable(str(out / "segments")).transaction_version("audio-tagging")
    rows = [0] + [DeltaTable(str(out / "clips"), version=v).to_pyarrow_table().num_rows for v in range(n)]
    added = [b - a for a, b in zip(rows, rows[1:])]
    assert sum(added) == 20 and all(rows >= 4 for rows in added[:-1])
    executions = {found.group(1) for r in caplog.records
                  if (found := re.search(r"Dataset (\S+) execution finished", r.getMessage()))}
    assert len(executions) == 1
    current = _assert_every_clip_whole(out, 20)
    assert set(current.run_id) == {"sharded"}
    _assert_no_feed_outlives_its_run()


def _assert_no_feed_outlives_its_run(wait_s: float = 20.0) -> None:
    """The run's FileFeed actor is killed when the run ends, not left in a Ray session that runs many."""
    from ray._private.state import actors as actor_table

    deadline = time.monotonic() + wait_s
    while True:
        alive = [a for a in actor_table().values() if a["ActorClassName"] == "FileFeed" and a["State"] != "DEAD"]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive


def test_shards_of_files_split_across_batches_lose_and_repeat_nothing(job):
    """Several shards whose files are split across the workers' batches (so the driver writes their clip
    rows): every shard's driver parts survive, and a plain Delta reader sees each file once with all its
    windows once (issue 21, case 1: driver parts of later shards overwrote earlier ones)."""
    corpus, out, run = job
    for i in range(8):
        _write(corpus, f"f{i}.wav", 60.0, seed=i)  # six windows each: 24 a shard, over a batch of 16
    summary = run("split", shard_files=4, batch_size=2)
    assert (summary["processed"], summary["ok"]) == (8, 8)
    assert len(DeltaTable(str(out / "clips")).history()) >= 2
    plain = DeltaTable(str(out / "clips")).to_pandas()
    assert len(plain) == 8 and plain.clip_id.is_unique
    windows = DeltaTable(str(out / "segments")).to_pandas()
    assert len(windows) == 48 and not windows.duplicated(["clip_id", "segment_index"]).any()
    assert run("split-again")["processed"] == 0
