"""The crash matrix, fixed subset (the seeded soak over random kill points is in `make reliability`):
the driver is SIGKILLed at each named step of a shard's commit sequence, in a chain of runs over one
OUTPUT with several shards of files split across batches, a changed file and a transient error row.
After each kill a plain Delta reader sees a consistent table; after a clean rerun, the table equals
that of one clean run."""

from __future__ import annotations

import time


from pipeline.store.lease import Lease
from tests.audio import encode, signal
from tests.crash import assert_consistent, assert_same_results, tag


def _corpus(directory, files: int = 6, seconds: float = 25.0):
    """`files` WAVs, every other one 60 s (6 windows: with --shard-files 3 a shard's windows exceed a sink
    batch of 16, so files are split across batches and the driver writes their clip rows)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        length = 60.0 if i % 2 else seconds
        (directory / f"f{i}.wav").write_bytes(encode(signal(length, 16_000, seed=i), 16_000, "WAV", "PCM_16"))
    manifest = directory.parent / f"{directory.name}.txt"   # a listed file that is missing: a transient error row
    manifest.write_text("".join(f"{directory / f'f{i}.wav'}\n" for i in range(files)) + f"{directory / 'gone.wav'}\n")
    return manifest


def test_kills_at_every_commit_step_then_a_clean_rerun_equal_one_clean_run(checkpoints, tmp_path):
    manifest, out = _corpus(tmp_path / "in"), tmp_path / "out"
    uris = {line for line in manifest.read_text().splitlines()}
    shards = ("--shard-files", "3")
    # the steps before any commit (lease-acquired, parts-written) and more orders are in the soak (test_soak.py)
    chain = [("a", "segments-added@2", ()), ("b", "clips-committed@1", ()), ("c", "rewrites-written@1", ()),
             ("d", "segments-cleaned@1", ()),
             # a settings change (--replace-settings): killed after its first shard into the staging tables
             # (readers still see the old table), resumed by the next, killed inside its swap, finished
             ("f", "clips-committed@1", ("--hop", "5", "--replace-settings")),
             ("g", "swap-clips-committed@1", ("--hop", "5", "--replace-settings"))]
    for run_id, fault, extra in chain:
        if run_id == "c":   # a file changes between runs: its row and windows are replaced, never doubled
            (tmp_path / "in" / "f1.wav").write_bytes(encode(signal(14.0, 16_000, seed=99), 16_000, "WAV"))
        status, _, stderr = tag(manifest, out, checkpoints, run_id, *shards, *extra, fault=fault)
        assert status == -9, f"{fault}: {stderr}"
        assert_consistent(out)
        if run_id == "a":
            _assert_index_holds_the_windows_of_clip_rows_only(out)
        if run_id == "f":
            staged = _assert_replacement_staged_beside_the_table(out)
        if run_id == "g":   # resumed f's staging tables: f's rows stay, g added the rest
            assert set(_staged_clips(staged).run_id) == {"f", "g"}
    (tmp_path / "in" / "f2.wav").write_bytes(encode(signal(3.0, 16_000, seed=98), 16_000, "WAV"))
    shards = (*shards, "--hop", "5")
    status, summary, stderr = tag(manifest, out, checkpoints, "clean", *shards)
    assert status == 0, stderr
    assert summary["error"] == 1 and summary["processed"] >= 2
    assert_consistent(out, uris)

    reference = tmp_path / "reference"
    status, _, stderr = tag(manifest, reference, checkpoints, "ref", *shards)
    assert status == 0, stderr
    assert_same_results(out, reference)


def _assert_index_holds_the_windows_of_clip_rows_only(out):
    """Killed after a shard's windows were committed and before its clip rows: an index built now holds
    the committed clip rows and their windows, not the shard's windows that have no clip row yet."""
    from pipeline.retrieval.index import build_index
    from tests.crash import plain_tables

    info = build_index(str(out))
    clips, segments = plain_tables(out)
    ok = clips[clips.status == "ok"]
    joined = segments.merge(ok[["clip_id", "run_id"]], on=["clip_id", "run_id"])
    assert 0 < len(joined) < len(segments)   # the half-committed shard's windows are in the table
    assert (info["rows"]["segments"], info["rows"]["clips"]) == (len(joined), len(ok))


def _staged_clips(staged):
    from deltalake import DeltaTable

    return DeltaTable(str(staged)).to_pandas()


def _assert_replacement_staged_beside_the_table(out):
    """A replacement killed after its first shard: its rows are in its staging tables (nested in the
    tables' roots), the current table is untouched (the old settings, no row of the replacement)."""
    from tests.crash import plain_tables

    (staged,) = (out / "clips").glob("_replace-*")
    clips, _ = plain_tables(out)
    assert "f" not in set(clips.run_id) and 0 < len(_staged_clips(staged)) < 7
    return staged


def test_a_second_run_is_refused_at_once_while_the_output_is_held(checkpoints, tmp_path):
    manifest, out = _corpus(tmp_path / "in", files=1), tmp_path / "out"
    with Lease(str(out), "holder", purpose="tag"):
        started = time.monotonic()
        status, _, stderr = tag(manifest, out, checkpoints, "second", fault=None)
        assert status == 4, stderr
        assert "held by run holder" in stderr and time.monotonic() - started < 30
    assert not (out / "clips").exists(), "the refused run did no work"
