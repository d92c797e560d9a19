"""A real S3-protocol server on loopback (moto's server), and a proxy in front of it that fails
chosen requests the way object stores do (503 SlowDown), for the storage tests."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's S3 server on 127.0.0.1, in its own process; `endpoint` is its URL.

    Its own process, not a thread of the test's: delta-rs holds the GIL while it waits for a response,
    so a server thread in the same process could not answer (the request times out)."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def __enter__(self):
        _forget_s3_filesystems()
        self._proc = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                                       "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self._proc)
        return self

    def __exit__(self, *exc):
        self._proc.kill()
        self._proc.wait()
        _forget_s3_filesystems()

    def use(self, monkeypatch, cache_dir) -> None:
        """Point boto, s3fs and pyarrow at this server (test credentials) and the model/index cache at
        `cache_dir`, for the rest of the test."""
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                           "AUDIO_TAGGING_CACHE": str(cache_dir)}.items():
            monkeypatch.setenv(key, value)
        _forget_s3_filesystems()


def _wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for port {port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s:g} s")


def _forget_s3_filesystems() -> None:
    """fsspec caches S3 filesystems by their arguments, not by the endpoint they read from the
    environment: one bound to a stopped server would otherwise serve the next test's s3:// URLs."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


class FlakyProxy:
    """Forwards HTTP to `upstream`; GETs whose path contains a `fail_always` marker always get 503, and
    the first `fail_first` GETs of each other object under `prefix` get 503 before succeeding; GETs of
    objects under `prefix` wait `delay_s` first (an object store's first-byte latency). Runs in its own
    process (see MotoS3); `failed` and `gets` count requests by path."""

    def __init__(self, upstream_port: int, prefix: str, fail_first: int = 1, fail_always: str = "cursed",
                 delay_s: float = 0.0):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._args = [str(self.port), str(upstream_port), prefix, str(fail_first), fail_always, str(delay_s)]
        self._proc: subprocess.Popen | None = None

    @property
    def failed(self) -> dict[str, int]:
        return self._stats()["failed"]

    @property
    def gets(self) -> dict[str, int]:
        return self._stats()["gets"]

    def _stats(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", STATS_PATH)
        stats = json.loads(conn.getresponse().read())
        conn.close()
        return stats

    def __enter__(self):
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.s3", *self._args])
        _wait_for_port(self.port, self._proc)
        return self

    def __exit__(self, *exc):
        self._proc.kill()
        self._proc.wait()


STATS_PATH = "/__proxy_stats"


class _ProxyServer:
    """FlakyProxy's server, in the process `python -m tests.s3 PORT UPSTREAM PREFIX FAIL_FIRST FAIL_ALWAYS
    DELAY_S`."""

    def __init__(self, port: int, upstream_port: int, prefix: str, fail_first: int, fail_always: str,
                 delay_s: float = 0.0):
        self.port = port
        self.failed: dict[str, int] = {}
        self.gets: dict[str, int] = {}
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue" and keeps connections alive

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline().strip():
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _forward(self):
                if self.path == STATS_PATH:
                    with lock:
                        data = json.dumps({"failed": proxy.failed, "gets": proxy.gets}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                body = self._body()
                target = self.path.split("?", 1)[0]
                if self.command == "GET":
                    with lock:
                        proxy.gets[target] = proxy.gets.get(target, 0) + 1
                if self.command == "GET" and prefix in target and "list-type" not in self.path:
                    time.sleep(delay_s)
                    with lock:
                        n = proxy.failed.get(target, 0)
                        fail = fail_always in target or n < fail_first
                        if fail:
                            proxy.failed[target] = n + 1
                    if fail:
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(SLOW_DOWN)))
                        self.end_headers()
                        self.wfile.write(SLOW_DOWN)
                        return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items()  # Host kept: it is signed
                           if k.lower() not in ("transfer-encoding", "expect")}
                if body:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)


if __name__ == "__main__":
    port, upstream, prefix, fail_first, fail_always, delay_s = sys.argv[1:7]
    _ProxyServer(int(port), int(upstream), prefix, int(fail_first), fail_always,
                 float(delay_s)).server.serve_forever()
