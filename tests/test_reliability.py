"""Reliability, fast cases: a damaged corpus mixed with good files, hostile names, decode timeouts,
an unwritable or full output, unreadable inputs, run ids that would escape the output (issue 6's
suite; slow cases: README)."""

from __future__ import annotations

import contextlib
import functools
import io
import mmap
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from signal import SIGCONT, SIGSEGV, SIGSTOP

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import jobs.tag

from pipeline.store.ledger import read_current
from pipeline.audio.decode import DecodeConfig, DecodeError, Decoder
from pipeline.tagging.isolation import IsolatedDecoder
from pipeline.tagging.job import TagJobConfig, run_tag_job
from pipeline.store.writer import OutputError
from tests.audio import broken_files, encode, encode_m4a, signal


def _wav_with_rate(rate: int) -> bytes:
    data = bytearray(encode(signal(0.5, 16_000), 16_000, "WAV", "PCM_16"))
    data[24:28] = struct.pack("<I", rate)             # fmt chunk: sample rate
    data[28:32] = struct.pack("<I", min(rate * 2, 2**32 - 1))  # byte rate
    return bytes(data)


@functools.cache
def _bomb(hours: float = 7.0, channels: int = 8, rate: int = 1_000) -> bytes:
    """A 0.2 MB FLAC of silence that declares `hours` of `channels`-channel audio: fully decoded and
    resampled to 48 kHz it would need ~5 GB (a decompression bomb)."""
    buf, zeros, left = io.BytesIO(), np.zeros((1 << 20, channels), np.float32), int(hours * 3600 * rate)
    with sf.SoundFile(buf, "w", rate, channels, format="FLAC") as f:
        while left > 0:
            f.write(zeros[:min(left, len(zeros))])
            left -= len(zeros)
    return buf.getvalue()


def damaged() -> dict[str, bytes]:
    flac = encode(signal(4.0, 44_100, 2, seed=7), 44_100, "FLAC")
    ogg = encode(signal(4.0, 44_100, seed=8), 44_100, "OGG")
    return {**broken_files(), "truncated.flac": flac[: len(flac) // 2], "truncated.ogg": ogg[: len(ogg) // 2],
            "absurd_rate_4ghz.wav": _wav_with_rate(4_000_000_000), "absurd_rate_1hz.wav": _wav_with_rate(1),
            "flac_named.mp3": flac, "bomb_7h_8ch.flac": _bomb()}


GOOD = {
    "six_channels.wav": encode(signal(3.0, 48_000, 6, seed=1), 48_000, "WAV", "PCM_24"),
    "plain.flac": encode(signal(12.0, 22_050, seed=2), 22_050, "FLAC"),
    "ünïcødé näme ♪.wav": encode(signal(2.0, 16_000, seed=3), 16_000, "WAV"),
    "..dots..and spaces.ogg": encode(signal(2.0, 32_000, seed=4), 32_000, "OGG"),
    "song.m4a": encode_m4a(signal(2.0, 44_100, 2, seed=5), 44_100),
}


def _run(directory, out, checkpoints, run_id):
    return run_tag_job(TagJobConfig(input=str(directory), output=str(out), ast_model=checkpoints["ast"],
                                    clap_model=checkpoints["clap"], run_id=run_id))


def test_damaged_corpus_loses_nothing_and_good_results_are_unchanged(checkpoints, tmp_path, local_ray):
    mixed, clean = tmp_path / "mixed", tmp_path / "clean"
    for directory, files in ((mixed, {**GOOD, **damaged()}), (clean, GOOD)):
        (directory / "sub").mkdir(parents=True)
        for name, data in files.items():
            (directory / "sub" / name).write_bytes(data)
    summary = _run(mixed, tmp_path / "out-mixed", checkpoints, "mixed")
    _run(clean, tmp_path / "out-clean", checkpoints, "clean")

    rows = read_current(str(tmp_path / "out-mixed")).to_pandas()
    assert len(rows) == len(GOOD) + len(damaged()) == summary["files_seen"] and rows.clip_id.is_unique
    assert all(str(tmp_path / "out-mixed") not in u for u in rows.uri)
    errors = rows[rows.status == "error"]
    assert errors.error.map(bool).all()
    by_name = rows.set_index(rows.uri.map(lambda u: u.rsplit("/", 1)[-1]))
    assert by_name.loc["absurd_rate_4ghz.wav"].error.startswith("not a decodable audio file")
    assert by_name.loc["absurd_rate_1hz.wav"].error.startswith("implausible sample rate")
    assert by_name.loc["flac_named.mp3"].status == "ok"
    assert by_name.loc["bomb_7h_8ch.flac"].error.startswith("audio too long (file declares 7.00 h")
    for name in ("truncated.flac", "truncated.ogg"):  # decodable up to the cut, or a clear reason
        row = by_name.loc[name]
        assert row.status == "ok" or row.error, name

    clean_rows = read_current(str(tmp_path / "out-clean")).to_pandas()
    for name in GOOD:
        a = by_name.loc[name]
        assert a.status == "ok", (name, a.error)
        b = clean_rows[clean_rows.uri.str.endswith("/" + name)].iloc[0]
        assert np.array_equal(a.clap_embedding, b.clap_embedding) and np.array_equal(a.scores, b.scores), name
    for path in (tmp_path / "out-mixed").rglob("*"):
        assert path.resolve().is_relative_to((tmp_path / "out-mixed").resolve())


def test_decode_timeout_gives_a_reason():
    data = encode_m4a(signal(60.0, 44_100, 2), 44_100)
    with pytest.raises(DecodeError, match="decoding timed out"):
        Decoder(DecodeConfig(timeout_s=0.01))(data)
    assert Decoder(DecodeConfig(timeout_s=60))(data).decoder == "pyav"


def test_decompression_bombs_are_refused_without_decoding_them():
    bomb = _bomb()
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="file declares 7.00 h"):  # from the header, nothing decoded
            Decoder()(bomb)
        assert tracemalloc.get_traced_memory()[1] < 20 << 20
    finally:
        tracemalloc.stop()
    # a stream without a declared length (AAC in m4a, through FFmpeg) is cut off as it passes the limit
    with pytest.raises(DecodeError, match=r"decodes to more than 2\.[01] s, maximum 2\.0 s"):  # not 20 s
        Decoder(DecodeConfig(max_duration_s=2.0))(encode_m4a(signal(20.0, 16_000), 16_000))


def test_isolated_decoder_gives_the_in_process_results():
    decoder = IsolatedDecoder(DecodeConfig())
    try:
        for name, data in GOOD.items():
            ours, direct = decoder(data), Decoder()(data)
            assert (ours.duration_s, ours.channels, ours.decoder) == (direct.duration_s, direct.channels,
                                                                       direct.decoder), name
            for rate, wave in direct.waves.items():
                np.testing.assert_array_equal(ours.waves[rate], wave)
        for name, data in broken_files().items():
            try:
                Decoder()(data)
                continue
            except DecodeError as e:
                expected = e.reason
            with pytest.raises(DecodeError) as info:
                decoder(data)
            assert info.value.reason == expected, name
    finally:
        decoder.close()


def test_the_decoder_child_reads_local_files_itself(tmp_path):
    """decode_file sends a local path, not the bytes; what the child reads and its storage errors are
    what the worker would have got."""
    decoder = IsolatedDecoder(DecodeConfig())
    try:
        for name in ("plain.flac", "ünïcødé näme ♪.wav", "song.m4a"):
            path = tmp_path / name
            path.write_bytes(GOOD[name])
            ours, direct = decoder.decode_file(str(path)), Decoder()(GOOD[name])
            for rate, wave in direct.waves.items():
                np.testing.assert_array_equal(ours.waves[rate], wave)
        (tmp_path / "empty.wav").write_bytes(b"")
        for uri, reason in ((tmp_path / "vanished.wav", "file not found"),
                            (tmp_path, "path is a directory, not a file"), (tmp_path / "empty.wav", "empty file")):
            with pytest.raises(DecodeError) as info:
                decoder.decode_file(str(uri))
            assert info.value.reason == reason
        assert decoder(GOOD["plain.flac"]).duration_s == 12.0  # bytes still work after path requests
    finally:
        decoder.close()


def test_waveforms_come_through_shared_memory_and_long_ones_through_the_pipe(tmp_path):
    """Lent waveforms are views of the shared buffer; copies (the default) outlive the next
    file's decode; a file whose waveforms do not fit the buffer comes over the pipe, with the same values."""
    a, b, long = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "long.flac"
    sf.write(a, signal(1.0, 22_050), 22_050)
    sf.write(b, signal(1.5, 44_100, seed=1), 44_100)
    long.write_bytes(GOOD["plain.flac"])  # 12 s: 3 MB of waveforms at 16 + 48 kHz
    expected = {p: Decoder().decode_file(str(p)).waves for p in (a, b, long)}
    decoder = IsolatedDecoder(DecodeConfig(), shared_bytes=1 << 20)
    try:
        lent_a = decoder.decode_file(str(a), lend=True).waves
        for rate, wave in expected[a].items():
            np.testing.assert_array_equal(lent_a[rate], wave)
            assert isinstance(lent_a[rate].base.obj, mmap.mmap)
        owned_a = decoder.decode_file(str(a)).waves
        piped = decoder.decode_file(str(long), lend=True).waves  # too long for 1 MiB: the pipe
        lent_b = decoder.decode_file(str(b), lend=True).waves    # overwrites the shared buffer
        for path, waves in ((a, owned_a), (long, piped), (b, lent_b)):
            for rate, wave in expected[path].items():
                np.testing.assert_array_equal(waves[rate], wave)
        assert all(w.base is None for w in (*owned_a.values(), *piped.values()))  # their own memory
    finally:
        decoder.close()


def test_a_decoder_that_stops_responding_is_killed_and_replaced():
    data, decoder = GOOD["plain.flac"], IsolatedDecoder(DecodeConfig(timeout_s=0.5), grace_s=0.5)
    try:
        decoder(data)
        stuck = decoder.pid
        os.kill(stuck, SIGSTOP)  # like a C call that never returns: no Python, no signal handler runs
        started = time.monotonic()
        with pytest.raises(DecodeError, match="decoding timed out"):
            decoder(data)
        assert time.monotonic() - started < 60  # the wait is 1 s; unbounded, this call would never return
        assert not Path(f"/proc/{stuck}").exists()
        again = decoder(data)  # the next file gets a fresh decoder
        assert decoder.pid != stuck
        np.testing.assert_array_equal(again.waves[16_000], Decoder()(data).waves[16_000])
    finally:
        decoder.close()


def test_a_decoder_crash_is_an_error_for_that_file_only():
    data, decoder = GOOD["plain.flac"], IsolatedDecoder(DecodeConfig())
    try:
        decoder(data)
        victim = decoder.pid
        os.kill(victim, SIGSTOP)
        outcome = {}

        def call():
            try:
                decoder(data)
            except DecodeError as e:
                outcome["error"] = e

        caller = threading.Thread(target=call)
        caller.start()
        while decoder.busy_since is None and caller.is_alive():
            time.sleep(0.01)
        os.kill(victim, SIGSEGV)  # delivered on SIGCONT: the decoder segfaults mid-file
        os.kill(victim, SIGCONT)
        caller.join(60)
        assert outcome["error"].reason == "decoder crashed" and "SIGSEGV" in outcome["error"].detail
        assert decoder(data).duration_s == 12.0
    finally:
        decoder.close()


def test_unwritable_output_fails_before_any_work(checkpoints, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    started = time.time()
    with pytest.raises(OutputError, match="not writable"):
        _run(tmp_path, blocker / "out", checkpoints, "never")
    assert time.time() - started < 5


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "", ".hidden", "x" * 81, "name with space"])
def test_run_ids_cannot_escape_the_output(run_id, tmp_path):
    with pytest.raises(ValueError, match="run id"):
        TagJobConfig(input=str(tmp_path), output=str(tmp_path), run_id=run_id)


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A real tmpfs of `size` mounted at `path` (needs root or CAP_SYS_ADMIN, as in CI here)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _args(corpus, out, checkpoints, run_id):
    return ["--input", str(corpus), "--output", str(out), "--ast-model", checkpoints["ast"],
            "--clap-model", checkpoints["clap"], "--run-id", run_id]


def test_disk_full_at_the_output_leaves_nothing_half_written(checkpoints, tmp_path, local_ray, caplog):
    corpus = tmp_path / "in"
    corpus.mkdir()
    for name, data in GOOD.items():
        (corpus / name).write_bytes(data)
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 4096))  # room for the start probe only
        out = disk / "results"
        assert jobs.tag.main(_args(corpus, out, checkpoints, "full")) == 3
        assert "No space left on device" in caplog.text and "The shard in flight is not committed" in caplog.text
        written = [p for p in out.rglob("*") if p.is_file()]
        assert not [p for p in written if p.name.startswith("_tmp-")], written
        for part in (p for p in written if p.suffix == ".parquet"):
            pq.read_table(part)  # whatever is visible is complete
        with pytest.raises(FileNotFoundError):
            read_current(str(out))

        filler.unlink()  # space freed: the next scheduled run completes, each file exactly once
        assert jobs.tag.main(_args(corpus, out, checkpoints, "after")) == 0
        rows = read_current(str(out)).to_pandas()
        assert len(rows) == len(GOOD) and rows.clip_id.is_unique and (rows.status == "ok").all()


def _without_root_override() -> list[str]:
    """Command prefix under which file permissions apply: as root, drop the capabilities that bypass
    them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) with util-linux setpriv."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be made to apply")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


def test_unreadable_files_and_directories_are_rows_and_retried_when_fixed(checkpoints, tmp_path, local_ray):
    corpus, out = tmp_path / "in", tmp_path / "out"
    (corpus / "locked_dir").mkdir(parents=True)
    (corpus / "good.wav").write_bytes(GOOD["ünïcødé näme ♪.wav"])
    (corpus / "locked.flac").write_bytes(GOOD["plain.flac"])
    (corpus / "locked_dir" / "inner.ogg").write_bytes(GOOD["..dots..and spaces.ogg"])
    os.chmod(corpus / "locked.flac", 0)
    os.chmod(corpus / "locked_dir", 0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([*_without_root_override(), sys.executable, "-m", "jobs.tag",
                               *_args(corpus, out, checkpoints, "locked")], cwd=Path(__file__).parents[1],
                              env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.chmod(corpus / "locked.flac", 0o644)
        os.chmod(corpus / "locked_dir", 0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_current(str(out)).to_pandas().set_index("uri")
    assert rows.loc[str(corpus / "good.wav")].status == "ok"
    assert rows.loc[str(corpus / "locked.flac")].error.startswith("permission denied reading file")
    assert rows.loc[str(corpus / "locked_dir")].error == "permission denied listing directory"
    assert len(rows) == 3

    # permissions fixed: the next run retries the denied file and finds the directory's files
    summary = run_tag_job(TagJobConfig(input=str(corpus), output=str(out), ast_model=checkpoints["ast"],
                                       clap_model=checkpoints["clap"], run_id="fixed"))
    assert summary["processed"] == 2 and summary["ok"] == 2
    rows = read_current(str(out)).to_pandas().set_index("uri")
    assert rows.loc[str(corpus / "locked.flac")].status == "ok"
    assert rows.loc[str(corpus / "locked_dir" / "inner.ogg")].status == "ok"
