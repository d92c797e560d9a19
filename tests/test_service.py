"""Search service over real job output (tiny checkpoints): the HTTP API through a real uvicorn server on
loopback, byte ranges against the original files, input bounds, path traversal, OpenAPI, metrics, the
entry point's loopback default, the Runs view (run summaries, commit history, label counts), and both web
pages in a real headless Chromium."""

from __future__ import annotations

import http.client
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests
import uvicorn

from pipeline.store.delta import open_table, read_table, table_settings, table_settings_values
from pipeline.store.ledger import read_current
from pipeline.retrieval.index import build_index
from pipeline.tagging.job import TagJobConfig, run_tag_job
from pipeline.retrieval.search import Filters, Searcher
from pipeline.service.service import MAX_UPLOAD_BYTES, create_app, serve
from tests.audio import encode, signal

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = os.environ.get("AUDIO_SEARCH_SCREENSHOT")  # e.g. docs/screenshot.png, to refresh the README image


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, checkpoints, local_ray):
    """A corpus of generated files (one 25 s, so windows start at 0, 10 and 15 s; one broken), tagged and indexed."""
    corpus, out = tmp_path_factory.mktemp("svc-corpus"), tmp_path_factory.mktemp("svc-out")
    files = {
        "long_walk.wav": encode(signal(25.0, 16_000, seed=1), 16_000, "WAV", "PCM_16"),
        "rain_on_roof.flac": encode(signal(3.0, 22_050, seed=2), 22_050, "FLAC"),
        "dog_park.ogg": encode(signal(6.0, 44_100, 2, seed=3), 44_100, "OGG"),
        "street_siren.wav": encode(signal(4.0, 48_000, seed=4), 48_000, "WAV", "FLOAT"),
        "broken.wav": b"this is not audio\n" * 20,
    }
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    run_tag_job(TagJobConfig(input=str(corpus), output=str(out), ast_model=checkpoints["ast"],
                             clap_model=checkpoints["clap"], run_id="svc"))
    build_index(str(out))
    clips = read_current(str(out))
    ids = {Path(u).name: c for u, c in zip(clips.column("uri").to_pylist(), clips.column("clip_id").to_pylist())}
    return corpus, out, ids


class _Server:
    """A real uvicorn server on 127.0.0.1 and an OS-chosen free port, in a daemon thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(tagged):
    _, out, _ = tagged
    running = _Server(create_app(str(out)))
    yield running
    running.stop()


def get(server, path, **kwargs) -> requests.Response:
    return requests.get(server.url + path, timeout=60, **kwargs)


def raw(server, method: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """A request whose path goes on the wire exactly as given (no client-side normalisation of ../)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for key, value in (headers or {}).items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def assert_json_error(response: requests.Response, status: int, contains: str = "") -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert contains in message and "Traceback" not in response.text and 'File "' not in response.text
    return message


# --- API -------------------------------------------------------------------------------------------------

def test_text_search_matches_the_searcher(server, tagged):
    _, out, ids = tagged
    searcher = Searcher(str(out))
    body = get(server, "/api/search", params={"q": "dog barking in the rain", "k": 3}).json()
    direct = searcher.text("dog barking in the rain", k=3)
    assert [h["clip_id"] for h in body["hits"]] == [h.clip_id for h in direct]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in direct], abs=1e-5)
    assert all(h["labels"] and {"label", "score"} == set(h["labels"][0]) for h in body["hits"])
    assert body["stale_index"] is False and body["took_ms"] >= 0

    windows = get(server, "/api/search", params={"q": "footsteps", "k": 10, "segments": "true",
                                                "min_duration": 20}).json()["hits"]
    assert {h["clip_id"] for h in windows} == {ids["long_walk.wav"]}
    assert sorted((h["start_s"], h["end_s"]) for h in windows) == [(0, 10), (10, 20), (15, 25)]
    label = get(server, "/api/info").json()["labels"][0]
    filtered = get(server, "/api/search", params={"q": "x", "k": 5, "label": label, "min_score": 0.5}).json()["hits"]
    expected = searcher.text("x", 5, Filters(label=label, min_score=0.5))
    assert [h["clip_id"] for h in filtered] == [h.clip_id for h in expected]


def test_search_by_upload_and_more_like_this(server, tagged):
    corpus, _, ids = tagged
    files = {"file": ("query.flac", (corpus / "rain_on_roof.flac").read_bytes(), "audio/flac")}
    hits = requests.post(server.url + "/api/search/audio", files=files, params={"k": 2}, timeout=120).json()["hits"]
    assert hits[0]["clip_id"] == ids["rain_on_roof.flac"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    like = get(server, f"/api/like/{ids['rain_on_roof.flac']}", params={"k": 2}).json()["hits"]
    assert len(like) == 2 and ids["rain_on_roof.flac"] not in {h["clip_id"] for h in like}


def test_clip_details(server, tagged):
    _, _, ids = tagged
    clip = get(server, f"/api/clips/{ids['long_walk.wav']}").json()
    assert (clip["status"], clip["duration_s"], clip["sample_rate"], clip["channels"]) == ("ok", 25.0, 16_000, 1)
    assert clip["uri"].endswith("long_walk.wav") and clip["labels"] and clip["num_segments"] == 3
    assert [(s["start_s"], s["end_s"]) for s in clip["segments"]] == [(0, 10), (10, 20), (15, 25)]
    assert all(s["labels"] and s["labels"][0]["score"] >= s["labels"][-1]["score"] for s in clip["segments"])
    broken = get(server, f"/api/clips/{ids['broken.wav']}").json()
    assert broken["status"] == "error" and "not a decodable audio file" in broken["error"]
    assert broken["segments"] == [] and broken["labels"] == []


def test_audio_streams_the_original_file_with_ranges(server, tagged):
    corpus, _, ids = tagged
    data = (corpus / "long_walk.wav").read_bytes()
    size, url = len(data), f"/api/audio/{ids['long_walk.wav']}"
    whole = get(server, url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes" and whole.headers["content-type"] == "audio/wav"
    assert get(server, f"/api/audio/{ids['rain_on_roof.flac']}").headers["content-type"] == "audio/flac"
    assert get(server, f"/api/audio/{ids['dog_park.ogg']}", headers={"Range": "bytes=0-3"}).content == b"OggS"

    for header, start, end in [("bytes=0-99", 0, 99), ("bytes=1000-", 1000, size - 1),
                               ("bytes=-100", size - 100, size - 1), ("bytes=500-500", 500, 500),
                               (f"bytes={size - 10}-{size + 500}", size - 10, size - 1),
                               ("bytes=-99999999", 0, size - 1)]:
        part = get(server, url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == data[start:end + 1], header
        assert part.headers["content-range"] == f"bytes {start}-{end}/{size}", header
        assert int(part.headers["content-length"]) == end - start + 1 and part.headers["accept-ranges"] == "bytes"

    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0", "bytes=9-3", "bytes=abc", "bytes=-"):
        bad = get(server, url, headers={"Range": header})
        assert_json_error(bad, 416)
        assert bad.headers["content-range"] == f"bytes */{size}", header
    for ignored in ("items=0-5", "bytes=0-1,5-9"):  # other units and multiple ranges: the whole file
        assert get(server, url, headers={"Range": ignored}).content == data
    head = requests.head(server.url + url, headers={"Range": "bytes=-100"}, timeout=60)
    assert head.status_code == 206 and head.headers["content-range"] == f"bytes {size - 100}-{size - 1}/{size}"
    assert head.content == b""
    # Only indexed (status ok) clips are served: the broken file's row exists, its bytes are not offered.
    assert_json_error(get(server, f"/api/audio/{ids['broken.wav']}"), 404, "no playable audio")


def test_audio_source_reads_ranges_from_object_storage(monkeypatch):
    """The same reader the audio endpoint uses, on an s3:// URI (moto's S3 server on loopback)."""
    import fsspec
    import s3fs

    from pipeline.service.media import ByteRange, SourceFile, content_type, parse_range
    from tests.s3 import MotoS3

    data = encode(signal(10.0, 16_000, seed=7), 16_000, "WAV", "PCM_16")  # 320 kB: two read chunks
    with MotoS3() as moto:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            fs = fsspec.filesystem("s3")
            fs.mkdir("audio")
            fs.pipe("audio/raw/clip.wav", data)
            source = SourceFile("s3://audio/raw/clip.wav")
            assert source.size == len(data) and content_type(source.uri) == "audio/wav"
            assert b"".join(source.read(None)) == data
            tail = parse_range("bytes=-100", source.size)
            assert tail == ByteRange(len(data) - 100, len(data) - 1) and b"".join(source.read(tail)) == data[-100:]
            assert b"".join(source.read(ByteRange(10, 300_000))) == data[10:300_001]
            with pytest.raises(FileNotFoundError):
                SourceFile("s3://audio/raw/missing.wav")
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def test_service_over_an_index_in_object_storage(tagged, monkeypatch, tmp_path):
    """The tagging output in the S3 test server: jobs.index builds the index there, and a service started
    on the s3:// URI answers as the local one does; the float16 vectors are fetched on first use."""
    import fsspec
    import s3fs

    from tests.s3 import MotoS3

    _, out, _ = tagged
    local = create_app(str(out), preload=False)
    with MotoS3() as moto:
        moto.use(monkeypatch, tmp_path / "cache")
        try:
            fs = fsspec.filesystem("s3")
            fs.mkdir("tagged")
            fs.put(str(out), "tagged/out", recursive=True)
            fs.rm("tagged/out/_index", recursive=True)
            proc = subprocess.run([sys.executable, "-m", "jobs.index", "--output", "s3://tagged/out"], cwd=REPO,
                                  capture_output=True, text=True, timeout=300, env=os.environ)
            assert proc.returncode == 0, proc.stderr
            info = json.loads(fs.cat_file("tagged/out/_index/index.json"))
            assert info["live"] == {"clips": 4, "segments": 6}
            shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # start as a fresh node would
            remote_server, local_server = _Server(create_app("s3://tagged/out", preload=False)), _Server(local)
            try:
                cache = next((tmp_path / "cache" / "indexes").iterdir())
                vector_files = {v["file"] for t in info["tables"].values() for v in t["vectors"]}
                assert not vector_files & {p.name for p in cache.iterdir()}
                params = {"q": "dog barking in the rain", "k": 3, "segments": "true"}
                remote = get(remote_server, "/api/search", params=params).json()["hits"]
                expected = get(local_server, "/api/search", params=params).json()["hits"]
                assert [(h["clip_id"], h["start_s"]) for h in remote] == [(h["clip_id"], h["start_s"]) for h in expected]
                assert [h["score"] for h in remote] == pytest.approx([h["score"] for h in expected], abs=1e-6)
                assert {info["tables"]["segments"]["vectors"][0]["file"]} <= {p.name for p in cache.iterdir()}
            finally:
                remote_server.stop()
                local_server.stop()
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


BAD_REQUESTS = [
    ("/api/search", {"q": "rain", "k": 0}, 422, "k"),
    ("/api/search", {"q": "rain", "k": 1000}, 422, "less than or equal to 100"),
    ("/api/search", {"q": "rain", "k": "many"}, 422, "k"),
    ("/api/search", {"q": "r" * 1001}, 422, "at most 1000 characters"),
    ("/api/search", {"q": "   "}, 400, "blank"),
    ("/api/search", {}, 422, "q"),
    ("/api/search", {"q": "rain", "label": "Not A Label"}, 400, "unknown label"),
    ("/api/search", {"q": "rain", "min_duration": -1}, 422, "min_duration"),
    ("/api/clips/XYZ", {}, 422, "clip_id"),
    ("/api/clips/0123456789ABCDEF0123", {}, 422, "clip_id"),
    ("/api/clips/0123456789abcdef0123", {}, 404, "unknown clip_id"),
    ("/api/like/0123456789abcdef0123", {}, 404, "unknown clip_id"),
    ("/api/audio/0123456789abcdef0123", {}, 404, "unknown clip_id"),
    ("/api/audio/0123456789abcdef01234", {}, 422, "clip_id"),
    ("/no/such/route", {}, 404, ""),
]


@pytest.mark.parametrize("path, params, status, contains", BAD_REQUESTS)
def test_bad_requests_get_a_json_4xx(server, path, params, status, contains):
    assert_json_error(get(server, path, params=params), status, contains)


def test_bad_uploads_get_a_json_4xx(server, tagged):
    corpus, _, ids = tagged
    post = lambda files: requests.post(server.url + "/api/search/audio", files=files, timeout=120)
    assert_json_error(post({"file": ("notes.txt", b"just text", "text/plain")}), 415, "expected an audio file")
    assert_json_error(post({"file": ("noise.wav", b"RIFF but not really" * 50, "audio/wav")}), 400,
                      "cannot decode the upload: not a decodable audio file")
    assert_json_error(post({"file": ("empty.wav", b"", "audio/wav")}), 400, "empty")
    assert_json_error(post({"file": ("big.wav", b"\0" * (MAX_UPLOAD_BYTES + 1), "audio/wav")}), 413, "larger than")
    assert_json_error(post({"other": ("x.wav", b"x", "audio/wav")}), 422, "file")
    # A declared body over the limit is refused before a byte of it is read.
    status, body = raw(server, "POST", "/api/search/audio",
                          {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(10 ** 9)})
    assert status == 413 and "larger than" in json.loads(body)["error"]
    assert_json_error(get(server, f"/api/like/{ids['broken.wav']}"), 404, "not in the search index")


@pytest.mark.parametrize("path", [
    "/api/audio/../../../../etc/passwd", "/api/audio/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/audio/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/api/audio/%2Fetc%2Fpasswd", "/api/audio//etc/passwd",
    "/api/audio/..%5c..%5cetc%5cpasswd", "/api/clips/..%2F..%2Fetc%2Fpasswd", "/api/audio/?uri=/etc/passwd",
    "/api/audio/0123456789abcdef0123/../../../etc/passwd", "/api/audio/file:%2F%2F%2Fetc%2Fpasswd",
])
def test_path_traversal_is_refused(server, path):
    status, body = raw(server, "GET", path)
    assert 400 <= status < 500 and b"root:" not in body
    assert "error" in json.loads(body)


def test_openapi_schema(server):
    schema = get(server, "/openapi.json").json()
    assert {"/api/search", "/api/search/audio", "/api/like/{clip_id}", "/api/clips/{clip_id}",
            "/api/audio/{clip_id}", "/api/info"} <= set(schema["paths"])
    k = next(p for p in schema["paths"]["/api/search"]["get"]["parameters"] if p["name"] == "k")
    assert (k["schema"]["minimum"], k["schema"]["maximum"]) == (1, 100)
    clip_id = schema["paths"]["/api/clips/{clip_id}"]["get"]["parameters"][0]
    assert clip_id["schema"]["pattern"] == "^[0-9a-f]{20}$"


def _count(text: str, route: str, status: str) -> float:
    """The value of audio_search_http_requests_total for GET `route` with `status` (0 when absent)."""
    labels = f'{{method="GET",route="{route}",status="{status}"}}'
    found = re.search(re.escape(f"audio_search_http_requests_total{labels} ") + r"(\S+)", text)
    return float(found.group(1)) if found else 0.0


def test_metrics_count_requests_per_route(server, tagged):
    _, _, ids = tagged
    before = get(server, "/metrics").text
    get(server, "/api/search", params={"q": "rain", "k": 2})
    get(server, "/api/search", params={"q": "rain", "k": 0})
    get(server, f"/api/clips/{ids['long_walk.wav']}")
    after = get(server, "/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    for route, status in [("/api/search", "200"), ("/api/search", "422"), ("/api/clips/{clip_id}", "200")]:
        assert _count(after.text, route, status) == _count(before, route, status) + 1, (route, status)
    latency = r'audio_search_http_request_duration_seconds_count\{method="GET",route="/api/search"\} \d'
    assert re.search(latency, after.text)
    assert ids["long_walk.wav"] not in after.text  # routes are labelled by template, never by raw path


def _outward_address() -> str | None:
    """This host's address on its default route (a UDP connect sends nothing), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))
            return s.getsockname()[0]
        except OSError:
            return None


def test_serve_binds_loopback_by_default(tagged, tmp_path):
    from jobs.serve import parse_args

    assert parse_args(["--output", "x"]).host == "127.0.0.1" and parse_args(["--index", "x"]).output == "x"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    _, out, _ = tagged
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--output", str(out), "--port", str(port)],
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Uvicorn running" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert f"http://127.0.0.1:{port}" in log.read_text()
        assert requests.get(f"http://127.0.0.1:{port}/api/info", timeout=30).json()["live"]["clips"] == 4
        address = _outward_address()
        if address and not address.startswith("127."):  # not reachable through another interface
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://{address}:{port}/api/info", timeout=5)
    finally:
        proc.terminate()
        proc.wait(30)


def test_unexpected_errors_are_a_json_500_without_internals(tagged):
    _, out, _ = tagged
    app = create_app(str(out), preload=False)

    @app.get("/fail", include_in_schema=False)
    def fail():
        raise RuntimeError("secret internals at /srv/private")

    running = _Server(app)
    try:
        response = get(running, "/fail")
        assert response.status_code == 500 and response.json() == {"error": "internal error (see the server log)"}
        assert "secret" not in response.text
    finally:
        running.stop()


# --- Runs view: API -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def more_runs(tagged, checkpoints, local_ray, tmp_path_factory):
    """A copy of the tagged output (run svc) with two more runs over a manifest of its files plus a new
    broken one: svc-2 commits that file's error row and fails (--max-error-rate 0), svc-3 finds nothing new."""
    _, out, _ = tagged
    root = tmp_path_factory.mktemp("svc-runs")
    copy = root / "out"
    shutil.copytree(out, copy)
    (root / "garbled.wav").write_bytes(b"still not audio\n" * 20)
    manifest = root / "inputs.txt"
    manifest.write_text("\n".join(read_current(str(out)).column("uri").to_pylist() + [str(root / "garbled.wav")]))
    job = dict(input=str(manifest), output=str(copy), ast_model=checkpoints["ast"], clap_model=checkpoints["clap"])
    run_tag_job(TagJobConfig(**job, run_id="svc-2", max_error_rate=0.0))
    run_tag_job(TagJobConfig(**job, run_id="svc-3"))
    return copy


@pytest.fixture(scope="module")
def runs_server(more_runs):
    running = _Server(create_app(str(more_runs), preload=False))
    yield running
    running.stop()


def _commits(output: Path) -> dict[str, dict]:
    """{run_id: {"versions", "shards"}} read straight from the clips table's Delta history."""
    found = {}
    for entry in sorted(open_table(str(output), "clips").history(), key=lambda e: e["version"]):
        run = found.setdefault(entry["audio_tagging.run_id"], {"versions": [], "shards": []})
        run["versions"].append(entry["version"])
        run["shards"].append(int(entry["audio_tagging.shard_seq"]))
    return found


SUMMARY_KEYS = ("wall_s", "files_seen", "skipped_unchanged", "processed", "ok", "error", "errors_by_reason",
                "warnings_by_reason", "segments", "clips_per_s", "audio_hours", "succeeded", "failure")


def test_runs_api_lists_every_run_newest_first(runs_server, more_runs, server):
    body = get(runs_server, "/api/runs").json()
    assert [r["run_id"] for r in body["runs"]] == ["svc-3", "svc-2", "svc"]
    runs = {r["run_id"]: r for r in body["runs"]}
    for run_id, run in runs.items():
        path = more_runs / "_runs" / f"{run_id}.json"
        summary = json.loads(path.read_text())
        assert {k: run[k] for k in SUMMARY_KEYS} == {k: summary[k] for k in SUMMARY_KEYS} and run["summary"]
        finished, started = datetime.fromisoformat(run["finished"]), datetime.fromisoformat(run["started"])
        assert finished.utcoffset() == timedelta(0)
        assert finished.timestamp() == pytest.approx(path.stat().st_mtime, abs=1)
        assert (finished - started).total_seconds() == pytest.approx(run["wall_s"], abs=2e-3)  # each time to the ms
    commits = _commits(more_runs)
    assert set(commits) == {"svc", "svc-2"}
    assert {k: {"versions": r["versions"], "shards": r["shards"]} for k, r in runs.items() if r["committed"]} == commits
    dt = open_table(str(more_runs), "clips")
    assert runs["svc"]["settings_hash"] == runs["svc-2"]["settings_hash"] == table_settings(dt)
    assert body["settings"] == {table_settings(dt): table_settings_values(dt)}
    first = runs["svc"]
    assert (first["processed"], first["ok"], first["error"], first["succeeded"]) == (5, 4, 1, True)
    failed = runs["svc-2"]
    assert (failed["skipped_unchanged"], failed["processed"], failed["error"], failed["succeeded"]) == (5, 1, 1, False)
    assert failed["errors_by_reason"] == {"not a decodable audio file": 1} and "max-error-rate" in failed["failure"]
    idle = runs["svc-3"]   # nothing new: a summary, no commit
    assert (idle["committed"], idle["versions"], idle["settings_hash"]) == (False, [], None)
    assert (idle["files_seen"], idle["skipped_unchanged"], idle["processed"]) == (6, 6, 0)
    assert [r["run_id"] for r in get(server, "/api/runs").json()["runs"]] == ["svc"]
    assert {"/api/runs", "/api/labels"} <= set(get(runs_server, "/openapi.json").json()["paths"])


def test_labels_api_counts_each_label_over_the_current_table(runs_server, more_runs):
    rows = read_current(str(more_runs), columns=["labels"]).column("labels").to_pylist()
    expected = Counter(label["label"] for labels in rows for label in labels or [])
    body = get(runs_server, "/api/labels").json()
    most_first = sorted(expected.items(), key=lambda lc: (-lc[1], lc[0]))
    assert [(c["label"], c["clips"]) for c in body["labels"]] == most_first
    assert len(body["labels"]) > 1 and max(expected.values()) <= 4
    assert (body["version"], body["clips"], body["labelled"]) == (open_table(str(more_runs), "clips").version(), 6, 4)


def test_runs_reader_edge_cases(more_runs, tmp_path):
    """The cap, a run that committed but saved no summary, files that are not summaries, a commit not made
    by the job, and the label counts re-read only when the table's version changes."""
    from deltalake import DeltaTable

    from pipeline.service.runs import LabelCounts, Runs
    from pipeline.service.service_models import RunsOut

    out = tmp_path / "out"
    shutil.copytree(more_runs, out)
    assert [r["run_id"] for r in Runs(str(out), limit=2)()["runs"]] == ["svc-3", "svc-2"]
    (out / "_runs" / "svc.json").unlink()      # as if svc had been stopped after its commit
    (out / "_runs" / "_tmp-svc-4.json").write_text("{")   # a summary being written
    (out / "_runs" / "notes.json").write_text("[1, 2]")   # not a summary
    runs = RunsOut.model_validate(Runs(str(out))()).model_dump()["runs"]   # as the route answers
    assert [r["run_id"] for r in runs] == ["svc-3", "svc-2", "svc"]
    stopped = runs[2]
    assert (stopped["summary"], stopped["committed"], stopped["ok"], stopped["finished"]) == (False, True, None, None)
    assert stopped["versions"] == _commits(more_runs)["svc"]["versions"] and stopped["last_commit"]

    counts = LabelCounts(str(out))
    before = counts()
    assert counts() is before   # same version: not read again
    DeltaTable(str(out / "clips")).delete("uri LIKE '%long_walk.wav'")   # a commit without our run id
    after = counts()
    assert (after["version"], after["clips"], after["labelled"]) == (before["version"] + 1, 5, 3)
    # read_table, not read_current: delta-rs's rewritten file holds string views, which read_current cannot sort
    rows = read_table(str(out), "clips", ["labels"]).column("labels").to_pylist()
    assert {c["label"]: c["clips"] for c in after["labels"]} == Counter(x["label"] for r in rows for x in r or [])
    assert [r["run_id"] for r in Runs(str(out))()["runs"]] == ["svc-3", "svc-2", "svc"]
    assert Runs(str(tmp_path / "none"))() == {"runs": [], "settings": {}}
    assert LabelCounts(str(tmp_path / "none"))()["labels"] == []



def test_runs_reader_over_object_storage(more_runs, monkeypatch, tmp_path):
    """The same output in the S3 test server: the same runs and label counts; a summary saved after the
    first request shows in the next one (listings are not served from s3fs's cache)."""
    import fsspec
    import s3fs

    from pipeline.service.runs import LabelCounts, Runs
    from tests.s3 import MotoS3

    local = Runs(str(more_runs))()
    with MotoS3() as moto:
        moto.use(monkeypatch, tmp_path / "cache")
        fs = fsspec.filesystem("s3")
        fs.mkdir("tagged")
        fs.put(str(more_runs), "tagged/out", recursive=True)
        runs = Runs("s3://tagged/out")
        remote = runs()
        # The objects' times are their upload's (so is the order), not the local files'.
        same = lambda body: {r["run_id"]: {k: v for k, v in r.items() if k not in ("started", "finished")}
                             for r in body["runs"]}
        assert same(remote) == same(local)
        assert remote["settings"] == local["settings"] and all(r["finished"] for r in remote["runs"])
        assert LabelCounts("s3://tagged/out")() == LabelCounts(str(more_runs))()
        summary = {**json.loads((more_runs / "_runs" / "svc-3.json").read_text()), "run_id": "svc-4"}
        other = s3fs.S3FileSystem(skip_instance_cache=True)   # another machine's job: not this cache's writer
        other.pipe("tagged/out/_runs/svc-4.json", json.dumps(summary).encode())
        assert {r["run_id"] for r in runs()["runs"]} == {"svc-4", "svc-3", "svc-2", "svc"}

# --- web page in a real browser ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"headless browser test needs {' and '.join(missing)} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="headless browser test needs selenium")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _search(driver, server, query: str, segments: bool = False, min_duration: str = ""):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server.url + "/")
    WebDriverWait(driver, 60).until(lambda d: "clips" in d.find_element(By.ID, "info").text)
    driver.find_element(By.ID, "q").send_keys(query)
    if segments:
        driver.find_element(By.ID, "segments").click()
    driver.find_element(By.ID, "min-duration").send_keys(min_duration)
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, 60).until(lambda d: "result" in d.find_element(By.ID, "status").text)
    return driver.find_elements(By.CSS_SELECTOR, "#results li.result")


def _play(driver, row) -> dict:
    """Click the row's play button; the audio element's time when it started playing, and its state after."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    audio = row.find_element(By.TAG_NAME, "audio")
    driver.execute_script("const a = arguments[0]; a.addEventListener('playing', "
                          "() => { a.dataset.startedAt = a.currentTime; }, {once: true});", audio)
    row.find_element(By.CSS_SELECTOR, "button.play").click()
    WebDriverWait(driver, 30).until(lambda d: audio.get_attribute("data-started-at") is not None)
    time.sleep(0.7)
    state = driver.execute_script("const a = arguments[0]; return {paused: a.paused, time: a.currentTime, "
                                  "ready: a.readyState, error: a.error && a.error.message};", audio)
    return {"started_at": float(audio.get_attribute("data-started-at")), **state}


def test_page_searches_shows_tags_and_plays_from_the_hit(browser, server, tagged):
    from selenium.webdriver.common.by import By

    _, _, ids = tagged
    rows = _search(browser, server, "dog barking in the rain")
    assert len(rows) == 4  # every ok clip; the broken file has no embedding
    for row in rows:
        assert row.find_elements(By.CSS_SELECTOR, ".chip") and "score" in row.text
        src = row.find_element(By.TAG_NAME, "audio").get_attribute("src")
        assert src.endswith(f"/api/audio/{row.get_attribute('data-clip-id')}")
    if SCREENSHOT:
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(SCREENSHOT)
    first = _play(browser, rows[0])
    assert not first["paused"] and first["error"] is None and first["ready"] >= 2
    assert first["started_at"] == pytest.approx(float(rows[0].get_attribute("data-start")), abs=0.3)

    windows = _search(browser, server, "footsteps", segments=True, min_duration="20")
    assert {r.get_attribute("data-clip-id") for r in windows} == {ids["long_walk.wav"]} and len(windows) == 3
    row = next(r for r in windows if float(r.get_attribute("data-start")) > 0)
    start = float(row.get_attribute("data-start"))
    played = _play(browser, row)
    assert not played["paused"] and played["error"] is None
    assert played["started_at"] == pytest.approx(start, abs=0.3) and played["time"] > start


def test_page_more_like_this(browser, server, tagged):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    rows = _search(browser, server, "rain")
    target = rows[0].get_attribute("data-clip-id")
    rows[0].find_element(By.CSS_SELECTOR, "button.like").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "status").text.startswith("More like"))
    like = browser.find_elements(By.CSS_SELECTOR, "#results li.result")
    assert like and target not in {r.get_attribute("data-clip-id") for r in like}


def test_runs_page_shows_every_run_and_the_label_chart(browser, runs_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(runs_server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: "clips" in d.find_element(By.ID, "info").text)
    browser.find_element(By.ID, "runs-link").click()
    WebDriverWait(browser, 60).until(lambda d: "newest first" in d.find_element(By.ID, "info").text)
    assert browser.current_url == runs_server.url + "/runs"
    api = get(runs_server, "/api/runs").json()["runs"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    assert [r.get_attribute("data-run-id") for r in rows] == [r["run_id"] for r in api] == ["svc-3", "svc-2", "svc"]
    for row, run in zip(rows, api):
        text = {c: row.find_element(By.CSS_SELECTOR, f"td.{c}").text for c in
                ("run-id", "files", "processed", "ok", "errors", "rate", "settings", "commits", "result", "when")}
        assert (text["run-id"], text["files"], text["processed"], text["ok"]) == (
            run["run_id"], str(run["files_seen"]), str(run["processed"]), str(run["ok"]))
        assert text["errors"].split("\n")[0] == str(run["error"])
        assert all(f"{reason}: {n}" in text["errors"] for reason, n in run["errors_by_reason"].items())
        # two decimals on the page; JS rounds 0.125 up where Python rounds it to even, so compare as numbers
        assert len(text["rate"].split(".")[1]) == 2 and abs(float(text["rate"]) - run["clips_per_s"]) <= 0.005 + 1e-9
        assert text["settings"] == (run["settings_hash"] or "–")[:8]
        assert (text["commits"] == "nothing committed") == (not run["committed"])
        assert text["when"] == run["finished"][:19].replace("T", " ")
        failed = "failed" in row.get_attribute("class").split()
        assert failed == (run["succeeded"] is False) and ("failed" in text["result"]) == failed
        if failed:
            assert run["failure"] in text["result"]
    assert [r.get_attribute("data-failed") for r in rows] == ["false", "true", "false"]

    labels = get(runs_server, "/api/labels").json()["labels"]
    bars = browser.find_elements(By.CSS_SELECTOR, "#chart .bar-row")
    assert [(b.get_attribute("data-label"), int(b.get_attribute("data-clips"))) for b in bars] == \
        [(c["label"], c["clips"]) for c in labels] and len(labels) > 1
    widths = [b.size["width"] for b in browser.find_elements(By.CSS_SELECTOR, "#chart .bar")]
    assert len(widths) == len(labels) and widths[0] > 0
    for width, count in zip(widths, labels):
        assert width == pytest.approx(widths[0] * count["clips"] / labels[0]["clips"], abs=2)
