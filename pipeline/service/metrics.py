"""Prometheus metrics for the search service: requests and latency per route, as ASGI middleware.

Routes are labelled by their template (`/api/clips/{clip_id}`), never the raw path, so the number of
series stays fixed whatever clients send; requests that match no route count as "unmatched". Latency
is measured until the last byte of the response is handed to the server (for audio, the whole stream).
Each app gets its own registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The registry and the two request metrics; `render()` gives the exposition text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, prefix: str = "audio_search"):
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{prefix}_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram(f"{prefix}_http_request_duration_seconds", "HTTP request latency in seconds",
                                 ["route", "method"], buckets=BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request and observes its latency under the matched route's template."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # set by the router on a match
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route, scope["method"]).observe(time.perf_counter() - start)
