"""The crash matrix's tools: run `jobs.tag` in its own process group with the fault hook set (it SIGKILLs
the driver at a named step of a shard's commit sequence), and check what a plain Delta reader sees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from deltalake import DeltaTable

from pipeline.store.faults import ENV
from pipeline.store.writer import METADATA_KEY

REPO = Path(__file__).resolve().parents[1]


def tag(corpus, out, checkpoints: dict, run_id: str, *args: str, fault: str | None = None,
        timeout_s: float = 600) -> tuple[int, dict | None, str]:
    """Run the job to its end (or its fault); returns (exit status, summary or None, stderr's tail). The
    killed driver's process group (the local Ray it started) is killed after it, as a node loss would."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    cmd = [sys.executable, "-m", "jobs.tag", "--input", str(corpus), "--output", str(out), "--ast-model",
           checkpoints["ast"], "--clap-model", checkpoints["clap"], "--batch-size", "2", "--run-id", run_id, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    stdout, stderr = proc.communicate(timeout=timeout_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    lines = stdout.decode().strip().splitlines()
    summary = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    return proc.returncode, summary, stderr.decode()[-4000:]


def plain_tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Both current tables as a plain Delta reader sees them (no code of ours), or None before any commit."""
    if not (out / "clips" / "_delta_log").exists():
        return None
    return DeltaTable(str(out / "clips")).to_pandas(), DeltaTable(str(out / "segments")).to_pandas()


def assert_consistent(out: Path, uris: set[str] | None = None) -> pd.DataFrame | None:
    """What a plain reader sees is whole: each file at most once (exactly the `uris` if given, and then no
    window outside a clip row either), every clip row with all its windows once (windows join clip rows on
    clip_id and run_id), and one settings over the clip rows and their windows. Returns the clips table."""
    tables = plain_tables(out)
    if tables is None:
        assert uris is None, "nothing committed"
        return None
    clips, segments = tables
    assert clips.clip_id.is_unique and clips.uri.is_unique, clips.uri.value_counts().head()
    assert not segments.duplicated(["clip_id", "run_id", "segment_index"]).any()
    windows = segments.groupby(["clip_id", "run_id"]).segment_index.apply(sorted)
    for clip in clips.itertuples():
        expected = list(range(clip.num_segments)) if clip.status == "ok" else None
        assert windows.get((clip.clip_id, clip.run_id)) == expected, (clip.uri, clip.run_id, clip.status)
    joined = segments.merge(clips[["clip_id", "run_id"]], on=["clip_id", "run_id"])
    if uris is not None:
        assert set(clips.uri) == uris
        assert len(joined) == len(segments), "windows of no clip row left behind after a clean run"
    hashes = {_settings(out, "clips", uri) for uri in DeltaTable(str(out / "clips")).file_uris()}
    live = set(zip(joined.clip_id, joined.run_id))
    for uri in DeltaTable(str(out / "segments")).file_uris():
        ids = pq.read_table(uri.removeprefix("file://"), columns=["clip_id", "run_id"])
        if set(zip(ids.column("clip_id").to_pylist(), ids.column("run_id").to_pylist())) & live:
            hashes.add(_settings(out, "segments", uri))
    assert len(hashes) <= 1, f"clip rows or their windows of several settings: {hashes}"
    return clips


def _settings(out: Path, table: str, uri: str) -> str:
    meta = pq.read_schema(uri.removeprefix("file://")).metadata
    return json.loads(meta[METADATA_KEY])["settings_hash"]


def assert_same_results(out: Path, reference: Path) -> None:
    """The two outputs' current tables hold the same files with the same results, window for window."""
    mine, theirs = plain_tables(out), plain_tables(reference)
    for (a, b), keys in zip(zip(mine, theirs), (["uri"], ["uri", "segment_index"])):
        a = a.drop(columns=["run_id"]).sort_values(keys).reset_index(drop=True)
        b = b.drop(columns=["run_id"]).sort_values(keys).reset_index(drop=True)
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
        for column in a.columns:
            for x, y in zip(a[column], b[column]):
                same = np.array_equal(np.asarray(x, dtype=object if column in ("labels",) else None),
                                      np.asarray(y, dtype=object if column in ("labels",) else None)) \
                    if isinstance(x, (list, np.ndarray)) else (x == y or (pd.isna(x) and pd.isna(y)))
                assert same, (column, x, y)
