"""Object storage through a real S3-protocol server (moto) behind a proxy that fails requests:
inputs, manifests, checkpoints and outputs in the bucket; retries; a file that never reads is a row."""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import fsspec
import pytest
import ray

from pipeline.checkpoints import resolve
from pipeline.store.ledger import read_current
from pipeline.tagging.job import TagJobConfig, run_tag_job
from tests.audio import broken_files, encode, signal
from tests.s3 import FlakyProxy, MotoS3

BUCKET = "tagging"
ACCESS_KEY, SECRET_KEY = "AKIATESTMARKER0042", "secret-marker-9f8e7d6c5b4a"


@pytest.fixture(scope="module")
def s3(tmp_path_factory, checkpoints):
    """moto behind a flaky proxy; env points every S3 client (driver and Ray workers) at the proxy."""
    if ray.is_initialized():
        ray.shutdown()
    saved = dict(os.environ)
    with MotoS3() as moto, FlakyProxy(moto.port, prefix=f"/{BUCKET}/audio/") as proxy:
        os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=proxy.endpoint,
                          AWS_MAX_ATTEMPTS="2",
                          AUDIO_TAGGING_CACHE=str(tmp_path_factory.mktemp("cache")))
        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)
        for name in ("ast", "clap"):
            fs.put(checkpoints[name], f"{BUCKET}/models/{name}", recursive=True)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        yield fs, proxy
        ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _upload(fs, files: dict[str, bytes], prefix: str) -> None:
    for name, data in files.items():
        with fs.open(f"{BUCKET}/{prefix}/{name}", "wb") as f:
            f.write(data)


def test_job_reads_and_writes_s3_with_retries(s3):
    fs, proxy = s3
    good = {f"clip{i}.flac": encode(signal(1.5 + i, 22_050, 2, seed=i), 22_050, "FLAC") for i in range(4)}
    _upload(fs, {**good, "cursed.wav": encode(signal(1.0, 16_000), 16_000, "WAV"),
                 "empty.wav": broken_files()["empty.wav"]}, "audio/run1")
    cfg = TagJobConfig(input=f"s3://{BUCKET}/audio/run1/", output=f"s3://{BUCKET}/out",
                       ast_model=f"s3://{BUCKET}/models/ast", clap_model=f"s3://{BUCKET}/models/clap",
                       run_id="s3-a")
    summary = run_tag_job(cfg)
    assert (summary["files_seen"], summary["ok"], summary["error"]) == (6, 4, 2)

    clips = read_current(f"s3://{BUCKET}/out").to_pandas().set_index("uri")
    assert len(clips) == 6 and set(clips[clips.status == "ok"].index) == {
        f"s3://{BUCKET}/audio/run1/{n}" for n in good}
    cursed = clips.loc[f"s3://{BUCKET}/audio/run1/cursed.wav"]
    assert cursed.status == "error" and cursed.error.startswith("storage error reading file")
    assert "SlowDown" in cursed.error or "503" in cursed.error or "reduce your request rate" in cursed.error
    for name in good:  # every good file was refused at first and read on a retry
        assert proxy.failed[f"/{BUCKET}/audio/run1/{name}"] >= 1
    assert clips.loc[f"s3://{BUCKET}/audio/run1/empty.wav"].error.startswith("empty file")
    assert fs.exists(f"{BUCKET}/out/clips/_delta_log") and fs.exists(f"{BUCKET}/out/_runs/s3-a.json")
    (lease,) = fs.glob(f"{BUCKET}/out/_lease/*.json")   # created with a conditional put, released at the end
    assert json.loads(fs.cat(lease))["run_id"] == "s3-a" and json.loads(fs.cat(lease))["released"]
    assert not fs.glob(f"{BUCKET}/out/clips/s3-a/_tmp*")

    # A storage error is transient: the rerun tries cursed.wav again (and it fails again); the rest
    # (ok rows and the permanently broken empty.wav) are skipped.
    rerun = run_tag_job(TagJobConfig(**{**cfg.__dict__, "run_id": "s3-b"}))
    assert (rerun["processed"], rerun["skipped_unchanged"], rerun["error"]) == (1, 5, 1)
    again = read_current(f"s3://{BUCKET}/out").to_pandas().set_index("uri")
    assert len(again) == 6 and again.loc[f"s3://{BUCKET}/audio/run1/cursed.wav"].run_id == "s3-b"
    assert (again.status == "ok").sum() == 4


def test_manifest_lists_files_and_missing_ones_become_rows(s3, tmp_path):
    fs, _ = s3
    _upload(fs, {"a.wav": encode(signal(1.0, 16_000), 16_000, "WAV"),
                 "b.ogg": encode(signal(2.0, 44_100), 44_100, "OGG")}, "curated")
    manifest = "\n".join([f"s3://{BUCKET}/curated/a.wav", f"s3://{BUCKET}/curated/b.ogg",
                          f"s3://{BUCKET}/curated/missing.wav", "# comment"]) + "\n"
    with fs.open(f"{BUCKET}/lists/set1.txt", "w") as f:
        f.write(manifest)
    summary = run_tag_job(TagJobConfig(
        input=f"s3://{BUCKET}/lists/set1.txt", output=str(tmp_path / "out"),
        ast_model=f"s3://{BUCKET}/models/ast", clap_model=f"s3://{BUCKET}/models/clap", run_id="m1"))
    assert (summary["files_seen"], summary["ok"], summary["error"]) == (3, 2, 1)
    clips = read_current(str(tmp_path / "out")).to_pandas().set_index("uri")
    assert clips.loc[f"s3://{BUCKET}/curated/missing.wav"].error.startswith("file not found")


def _resolve_in_process(source: str) -> str:
    return resolve(source)


def test_checkpoint_downloads_once_per_node_under_concurrency(s3, tmp_path):
    fs, proxy = s3
    fs.put(str(Path(resolve(f"s3://{BUCKET}/models/ast"))), f"{BUCKET}/models/ast-copy", recursive=True)
    os.environ["AUDIO_TAGGING_CACHE"] = str(tmp_path / "fresh-cache")
    before = {k: v for k, v in proxy.gets.items() if "/models/ast-copy/" in k}
    # spawned, not forked: a fork of this process (Ray's gRPC threads running) can leave its GCS client hung
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = list(pool.map(_resolve_in_process, [f"s3://{BUCKET}/models/ast-copy"] * 4))
    assert len(set(paths)) == 1 and (Path(paths[0]) / "model.safetensors").exists()
    after = {k: v for k, v in proxy.gets.items() if "/models/ast-copy/" in k}
    downloaded = {k: after[k] - before.get(k, 0) for k in after}
    assert downloaded and all(n == 1 for n in downloaded.values()), downloaded


def test_http_inputs_through_a_manifest(checkpoints, tmp_path, local_ray):
    """Real HTTP: files served by a loopback web server, named by a CSV manifest."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served = tmp_path / "www"
    served.mkdir()
    (served / "a.flac").write_bytes(encode(signal(2.0, 32_000, seed=1), 32_000, "FLAC"))
    (served / "b.wav").write_bytes(encode(signal(1.0, 11_025, 2, seed=2), 11_025, "WAV"))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        manifest = tmp_path / "list.csv"
        manifest.write_text(f"uri,label\n{base}/a.flac,x\n{base}/b.wav,y\n{base}/gone.wav,z\n")
        summary = run_tag_job(TagJobConfig(input=str(manifest), output=str(tmp_path / "out"),
                                           ast_model=checkpoints["ast"], clap_model=checkpoints["clap"],
                                           run_id="http"))
    finally:
        server.shutdown()
    assert (summary["files_seen"], summary["ok"], summary["error"]) == (3, 2, 1)
    clips = read_current(str(tmp_path / "out")).to_pandas().set_index("uri")
    assert clips.loc[f"{base}/b.wav"].channels == 2 and clips.loc[f"{base}/a.flac"].sample_rate == 32_000
    assert clips.loc[f"{base}/gone.wav"].error.startswith("file not found")


def test_no_credentials_in_logs_summaries_or_metadata(s3, caplog):
    """After the S3 runs above: neither key appears in any output object, nor in driver or worker logs
    at the job's log level (botocore's own DEBUG logging prints the access key id in request headers)."""
    fs, _ = s3
    caplog.set_level("INFO")
    run_tag_job(TagJobConfig(input=f"s3://{BUCKET}/audio/run1/", output=f"s3://{BUCKET}/out",
                             ast_model=f"s3://{BUCKET}/models/ast", clap_model=f"s3://{BUCKET}/models/clap",
                             run_id="s3-c"))
    fs.invalidate_cache()  # the fixture's filesystem listed OUTPUT before this run's commits
    outputs = [p for p in fs.find(f"{BUCKET}/out")]
    assert any(p.endswith(".parquet") for p in outputs) and any(p.endswith(".json") for p in outputs)
    for path in outputs:
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise AssertionError(f"listed but missing: {path}; listing {sorted(outputs)}") from None
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, path
    assert ACCESS_KEY not in caplog.text and SECRET_KEY not in caplog.text
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for log_file in logs.rglob("*"):
        if log_file.is_file():
            text = log_file.read_bytes()
            assert ACCESS_KEY.encode() not in text and SECRET_KEY.encode() not in text, log_file


def test_featurize_reads_object_storage_ahead_with_the_rows_of_reading_in_turn(s3, monkeypatch):
    """Files on S3 are read ahead in threads while earlier ones are featurized: the rows (features
    included, and the error row of a file deleted after listing, in its place) are those of reading each
    file in its turn, and reads of later files stay within the byte budget."""
    import pyarrow as pa

    from pipeline.audio import storage
    from pipeline.tagging.featurize import Featurize, FeaturizeConfig
    from pipeline.tagging.sources import ListingConfig, list_inputs

    fs, _ = s3
    clips = {f"c{i}.flac": encode(signal(1.0 + 0.25 * i, 22_050, 2, seed=i), 22_050, "FLAC") for i in range(6)}
    _upload(fs, {**clips, "gone.wav": encode(signal(1.0, 16_000), 16_000, "WAV")}, "ahead")
    listed = list_inputs(ListingConfig(f"s3://{BUCKET}/ahead/"))
    fs.rm(f"{BUCKET}/ahead/gone.wav")  # listed, then deleted: its read fails with "file not found"

    in_turn = pa.concat_tables(Featurize(FeaturizeConfig(), read_ahead_bytes=0)(listed))
    ahead = pa.concat_tables(Featurize(FeaturizeConfig())(listed))
    assert ahead.equals(in_turn)
    gone = ahead.filter(pa.compute.equal(ahead["uri"], f"s3://{BUCKET}/ahead/gone.wav")).to_pylist()
    assert [(r["status"], r["error"]) for r in gone] == [("error", "file not found")]
    assert (ahead["status"].to_pylist().count("ok"), ahead.num_rows) == (6, 7)

    # at each file handed out, the reads started for later files hold at most the budget (by listed size)
    files = listed.to_pylist()
    order = {f["uri"]: i for i, f in enumerate(files)}
    started: list[int] = []
    real_read = storage.read_bytes

    def recorded(uri, *args, **kwargs):
        started.append(order[uri])
        return real_read(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", recorded)
    budget = 2 * max(f["size_bytes"] for f in files)
    later_bytes = []
    for i, (file, data) in enumerate(storage.ReadAhead(files, max_bytes=budget, threads=4)):
        assert file["uri"] == files[i]["uri"] and (isinstance(data, bytes) or data.reason == "file not found")
        later_bytes.append(sum(files[j]["size_bytes"] for j in set(started) if j > i))
    assert max(later_bytes) <= budget and max(later_bytes) > 0  # read ahead, within the budget


def test_http_reads_retry_server_errors_but_never_a_refusal():
    """Over HTTP (whose client does not retry) our loop retries a 503 with backoff; a 403 is a permission
    row at once. botocore's own policy retries S3 (test above); credential errors are never retried."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from botocore.exceptions import ClientError, NoCredentialsError

    from pipeline.audio.decode import DecodeError
    from pipeline.audio.storage import RetryConfig, _final, read_bytes

    hits: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            self.send_response(int(self.path.strip("/")))
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        retry = RetryConfig(attempts=3, backoff_s=0.01)
        with pytest.raises(DecodeError, match="storage error reading file") as failed:
            read_bytes(f"{base}/503", retry)
        assert "after 3 attempts" in str(failed.value)
        with pytest.raises(DecodeError, match="permission denied reading file"):
            read_bytes(f"{base}/403", retry)
        with pytest.raises(DecodeError, match="file not found"):
            read_bytes(f"{base}/404", retry)
        assert hits["/503"] == 3 * hits["/403"] and hits["/404"] == hits["/403"]  # one attempt vs three
    finally:
        server.shutdown()
    for denied in (NoCredentialsError(), ClientError({"Error": {"Code": "ExpiredToken"}}, "GetObject")):
        assert _final(denied).reason == "permission denied reading file"
    assert _final(ClientError({"Error": {"Code": "SlowDown"}}, "GetObject")) is None


def test_s3_retry_budget_follows_botocores_environment(monkeypatch):
    """S3 reads use botocore's standard mode with 5 retries, unless AWS_MAX_ATTEMPTS / AWS_RETRY_MODE say
    otherwise (the fixture above sets 2 attempts: a file that always answers 503 fails in seconds)."""
    from pipeline.audio.storage import CLIENT_OPTIONS

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    assert CLIENT_OPTIONS["s3"]()["config_kwargs"]["retries"] == {"max_attempts": 5, "mode": "standard"}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert CLIENT_OPTIONS["s3a"]()["config_kwargs"]["retries"] == {"total_max_attempts": 2, "mode": "adaptive"}
