"""Maintenance (`python -m jobs.maintain`): compaction keeps every row, type, metadata and the ledger's
facts; vacuum deletes only what the current table does not need; it is refused while a run holds the
lease; it finishes a half-committed shard; and its own commits never hide from the next run what it
reads from the log. No Ray: tables are built from real part files (PartWriter) committed with
commit_shard (benchmarks/ledger.py's synthetic runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from benchmarks.ledger import SETTINGS, clip_id, commit_run
from jobs.exits import Exit
from pipeline.store import delta
from pipeline.store.lease import Lease, LeaseLost
from pipeline.store.ledger import done_files
from pipeline.store.maintain import MaintainConfig, maintain
from pipeline.store.writer import METADATA_KEY

REPO = Path(__file__).resolve().parents[1]
WINDOWS = 2
EMBEDDINGS = ("scores", "ast_embedding", "clap_embedding")


class Killed(Exception):
    """The driver died at a step of commit_shard (raised by its fault hook)."""


def kill_at(step: str):
    def fault(reached: str) -> None:
        if reached == step:
            raise Killed(step)
    return fault


@pytest.fixture
def output(tmp_path) -> str:
    """Three runs' shards of small parts (40 clips a part): 200 clips, then 200 new and 30 of the first
    run's again, then 200 new and 20 of the second's again (their older rows and windows replaced)."""
    out = str(tmp_path / "out")
    commit_run(out, 1, "r1", list(range(200)), windows=WINDOWS, batch_clips=40)
    commit_run(out, 2, "r2", list(range(200, 400)) + list(range(30)), reprocessed=list(range(30)),
               windows=WINDOWS, batch_clips=40)
    commit_run(out, 3, "r3", list(range(400, 600)) + list(range(200, 220)), reprocessed=list(range(200, 220)),
               windows=WINDOWS, batch_clips=40)
    return out


def run_maintain(out: str, *args: str) -> tuple[int, dict | None, str]:
    """`python -m jobs.maintain --output OUT ARGS` as a subprocess: exit status, its JSON report, stderr."""
    done = subprocess.run([sys.executable, "-m", "jobs.maintain", "--output", out, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    return done.returncode, json.loads(lines[-1]) if lines else None, done.stderr


def plain_rows(out: str, table: str) -> pd.DataFrame:
    """The table as a plain Delta reader sees it, sorted, with array cells as tuples (comparable)."""
    keys = ["clip_id"] + (["segment_index"] if table == "segments" else [])
    frame = DeltaTable(f"{out}/{table}").to_pandas().sort_values(keys).reset_index(drop=True)
    return frame.map(_plain)


def _plain(value):
    if isinstance(value, np.ndarray):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _plain(v)) for k, v in value.items()))
    return value


def table_files(out: str, table: str) -> set[str]:
    """Absolute paths of the data files the table's current version names."""
    return {uri.removeprefix("file://") for uri in DeltaTable(f"{out}/{table}").file_uris()}


def files_on_disk(out: str, table: str) -> set[str]:
    """Every file under the table's directory but its log."""
    root = Path(out) / table
    return {str(p) for p in root.rglob("*") if p.is_file() and "_delta_log" not in p.parts}


def ledger_state(out: str) -> dict:
    return {t: (delta.open_table(out, t).version(), delta.shard_seq(delta.open_table(out, t))) for t in delta.TABLES}


def test_compaction_merges_small_files_and_keeps_rows_types_metadata_and_ledger(output):
    before = {t: plain_rows(output, t) for t in delta.TABLES}
    files_before = {t: table_files(output, t) for t in delta.TABLES}
    stored = {t: pq.read_schema(min(files_before[t])).remove_metadata() for t in delta.TABLES}
    done_before = done_files(output, SETTINGS.hash).sort_by("clip_id")
    seq_before = {t: delta.shard_seq(delta.open_table(output, t)) for t in delta.TABLES}
    assert seq_before == {"segments": 3, "clips": 3}

    status, report, stderr = run_maintain(output)
    assert status == Exit.OK, stderr

    for table in delta.TABLES:
        assert report[table]["files_merged"] == len(files_before[table]), report
        files = table_files(output, table)
        assert len(files) < len(files_before[table]), f"{table}: {len(files)} files, {len(files_before[table])} before"
        pd.testing.assert_frame_equal(plain_rows(output, table), before[table])
        # the merged files store what the parts stored (types, and each field's metadata, where the
        # vector widths live), with the run metadata; our readers get fixed-size lists back
        for path in files:
            schema = pq.read_schema(path)
            assert METADATA_KEY in (schema.metadata or {}), f"{path} lost the run metadata"
            assert schema.remove_metadata().equals(stored[table], check_metadata=True), f"{path}: {schema}"
        read = delta.read_table(output, table, list(EMBEDDINGS))
        for name in EMBEDDINGS:
            field = read.schema.field(name)
            assert pa.types.is_fixed_size_list(field.type), f"{table}.{name}: {field}"
        dt = delta.open_table(output, table)
        assert delta.table_settings(dt) == SETTINGS.hash
        assert delta.table_settings_values(dt) == SETTINGS.values
        assert delta.shard_seq(dt) == seq_before[table], "compaction must not move the shard sequence"
    assert done_files(output, SETTINGS.hash).sort_by("clip_id").equals(done_before), "the skip check sees other rows"


def test_vacuum_deletes_uncommitted_and_removed_files_and_keeps_the_current_table(output):
    # a part a killed run wrote and never committed, and one it was still writing
    killed = Path(output) / "clips" / "r4-killed"
    killed.mkdir()
    shutil.copy(next(iter(table_files(output, "clips"))), killed / "part-0123456789ab-00000.parquet")
    (killed / "_tmp-part-0123456789ab-00001.parquet").write_bytes(b"PAR1 half written")
    removed_earlier = {t: files_on_disk(output, t) - table_files(output, t) for t in delta.TABLES}
    assert all(removed_earlier.values()), "the fixture's replaced rows should have removed files"
    before = {t: plain_rows(output, t) for t in delta.TABLES}
    first_version_files = {uri.removeprefix("file://") for uri in DeltaTable(f"{output}/clips", version=0).file_uris()}

    status, report, stderr = run_maintain(output, "--retention-hours", "0")
    assert status == Exit.OK, stderr

    for table in delta.TABLES:
        current = table_files(output, table)
        assert files_on_disk(output, table) == current, f"{table}: vacuum left files no version needs, or took one"
        assert not removed_earlier[table] & files_on_disk(output, table)
        pd.testing.assert_frame_equal(plain_rows(output, table), before[table])
        assert report[table]["files_deleted"] >= len(removed_earlier[table]), report
    assert not killed.exists() or not any(killed.iterdir()), "the killed run's parts are still there"
    assert first_version_files - table_files(output, "clips"), "version 0 should need files no longer current"
    with pytest.raises(FileNotFoundError):
        DeltaTable(f"{output}/clips", version=0).to_pandas()
        pytest.fail("time travel to a version from before a vacuum with retention 0 should fail: the files it "
                    "names are deleted (the documented cost of --retention-hours 0; the default 168 h keeps them)")


def test_vacuum_retention_under_an_hour_is_not_zero(output):
    """--retention-hours 0.5 keeps what a version from a minute ago needs (delta-rs takes whole hours)."""
    removed_earlier = files_on_disk(output, "clips") - table_files(output, "clips")
    maintain(MaintainConfig(output, retention_hours=0.5))
    assert removed_earlier <= files_on_disk(output, "clips"), "files removed minutes ago were vacuumed"
    assert len(DeltaTable(f"{output}/clips", version=0).to_pandas()) == 200, "time travel within retention works"


def test_maintenance_is_refused_while_a_run_holds_the_lease(output):
    state = ledger_state(output)
    on_disk = {t: files_on_disk(output, t) for t in delta.TABLES}
    with Lease(output, "holder"):
        status, report, stderr = run_maintain(output, "--retention-hours", "0")
    assert status == Exit.HELD, stderr
    assert report is None and "holder" in stderr, stderr
    assert ledger_state(output) == state, "a refused maintenance committed something"
    assert {t: files_on_disk(output, t) for t in delta.TABLES} == on_disk, "a refused maintenance deleted files"


def test_maintenance_stops_before_committing_once_its_lease_is_lost(output):
    state = ledger_state(output)
    on_disk = {t: files_on_disk(output, t) for t in delta.TABLES}

    def lost() -> None:
        raise LeaseLost("run maintenance lost its lease: taken over by another run")

    with pytest.raises(LeaseLost):
        maintain(MaintainConfig(output, retention_hours=0), check=lost)
    assert ledger_state(output) == state
    assert {t: files_on_disk(output, t) for t in delta.TABLES} == on_disk


def test_maintenance_finishes_a_half_committed_shard(output):
    new, again = list(range(600, 660)), list(range(400, 420))
    with pytest.raises(Killed):
        commit_run(output, 4, "r4", new + again, reprocessed=again, windows=WINDOWS, batch_clips=40,
                   fault=kill_at("segments-added"))
    assert {t: s for t, (_, s) in ledger_state(output).items()} == {"segments": 4, "clips": 3}

    status, report, stderr = run_maintain(output)
    assert status == Exit.OK, stderr
    assert report["recovered_shard"] == 4

    assert {t: s for t, (_, s) in ledger_state(output).items()} == {"segments": 4, "clips": 4}
    clips = plain_rows(output, "clips").set_index("clip_id")
    assert clips.index.is_unique and len(clips) == 660
    assert set(clips.loc[[clip_id(k) for k in new + again]].run_id) == {"r4"}
    segments = plain_rows(output, "segments")
    # every clip row has all its windows, of its own run, once: the replaced rows' windows were removed
    assert not segments.duplicated(["clip_id", "segment_index"]).any()
    assert (segments.groupby("clip_id").size() == WINDOWS).all() and set(segments.clip_id) == set(clips.index)
    joined = segments.join(clips.run_id.rename("clip_run"), on="clip_id")
    assert (joined.run_id == joined.clip_run).all()


def test_maintenance_keeps_what_the_next_run_reads_from_the_log(output):
    """The settings (the skip check's and the settings check's) and the newest shard's finished state
    (recover's) stay readable however often maintenance runs and whatever log it cleans up: its own
    commits (vacuum writes two) and log cleanup used to push the commits that hold them out of reach,
    after which a run saw no settings (everything reprocessed, as duplicates) or failed with exit 3."""
    commit_run(output, 4, "r4", list(range(600, 640)), windows=WINDOWS, batch_clips=40)  # replaces nothing
    maintain(MaintainConfig(output, retention_hours=0))
    # log entries now expire after a second (the default is 30 days); this commit records no settings
    for table in delta.TABLES:
        delta.open_table(output, table).alter.set_table_properties({"delta.logRetentionDuration": "interval 1 second"})
    for _ in range(2):   # nothing left to compact: their only commits are vacuum's
        time.sleep(1.2)
        maintain(MaintainConfig(output, retention_hours=0))
    assert not os.path.exists(f"{output}/segments/_delta_log/{0:020d}.json"), "the test expects expired log cleaned up"
    for table in delta.TABLES:
        dt = delta.open_table(output, table)
        assert delta.table_settings(dt) == SETTINGS.hash, f"{table}: settings no longer found in its log"
        assert delta.shard_seq(dt) == 4
    assert delta.recover(output) is None
    assert len(done_files(output, SETTINGS.hash)) == 640, "the skip check no longer sees the done files"


def test_our_readers_survive_a_users_own_delete(tmp_path):
    """A user's DELETE through delta-rs rewrites files in its own types (string_view, lists without our
    width metadata): read_current still sorts and returns fixed-size vectors, the other rows unchanged."""
    import pyarrow.compute as pc

    from pipeline.store.ledger import read_current

    out = str(tmp_path / "out")
    commit_run(out, 1, "r1", list(range(10)))
    before = read_current(out)
    gone = before.column("clip_id")[0].as_py()
    DeltaTable(out + "/clips").delete(f"clip_id = '{gone}'")
    after = read_current(out)
    assert after.schema == before.schema
    assert after.equals(before.filter(pc.not_equal(before.column("clip_id"), gone)))
