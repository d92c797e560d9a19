"""A real S3-protocol server on loopback (moto's server), and a proxy in front of it that fails
chosen requests the way object stores do (503 SlowDown), for the storage tests."""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moto.server import ThreadedMotoServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's S3 server on 127.0.0.1; `endpoint` is its URL."""

    def __init__(self):
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        _forget_s3_filesystems()
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop()
        _forget_s3_filesystems()


def _forget_s3_filesystems() -> None:
    """fsspec caches S3 filesystems by their arguments, not by the endpoint they read from the
    environment: one bound to a stopped server would otherwise serve the next test's s3:// URLs."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


class FlakyProxy:
    """Forwards HTTP to `upstream`; GETs whose path contains a `fail_always` marker always get 503, and
    the first `fail_first` GETs of each other object under `prefix` get 503 before succeeding."""

    def __init__(self, upstream_port: int, prefix: str, fail_first: int = 1, fail_always: str = "cursed"):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
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
                body = self._body()
                target = self.path.split("?", 1)[0]
                if self.command == "GET":
                    with lock:
                        proxy.gets[target] = proxy.gets.get(target, 0) + 1
                if self.command == "GET" and prefix in target and "list-type" not in self.path:
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

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
