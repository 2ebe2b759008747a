"""Prometheus metrics (prometheus-client) and the ASGI middleware that records them.

Names (a contract for dashboards and alerts):
- ``ce_eval_requests_total{transport,route,method,status}``: requests. ``transport="http"``:
  by route *template* (``/v1/runs/{run_id}``, never the raw path; ``<unmatched>`` for
  unknown paths) and HTTP status; ``transport="grpc"``: by full RPC name
  (``/ce_eval.v1.LossEvaluation/Evaluate``), method ``POST``, status the gRPC code name
  (``OK``, ``INVALID_ARGUMENT``, …).
- ``ce_eval_request_duration_seconds{route,method}``: histogram of request latency.
- ``ce_eval_evaluate_duration_seconds{loss,backend}``: histogram of engine time per evaluation.
- ``ce_eval_rejected_total{reason}``: requests answered 4xx/5xx, by reason.
- ``ce_eval_inflight``: HTTP requests in progress.
- ``ce_eval_batches_total{outcome}``: run batches, ``accepted`` or ``duplicate`` (replayed).
- ``ce_eval_build_info{version,python}``: always 1.

Several worker processes: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before start;
each process then writes its samples there and ``/metrics`` aggregates all of them.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter(
    "ce_eval_requests_total",
    "Requests by transport, route template (HTTP) or RPC (gRPC), method and status.",
    ["transport", "route", "method", "status"],
)
REQUEST_DURATION = Histogram(
    "ce_eval_request_duration_seconds",
    "HTTP request latency.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
EVALUATE_DURATION = Histogram(
    "ce_eval_evaluate_duration_seconds",
    "Engine time per evaluation.",
    ["loss", "backend"],
    buckets=LATENCY_BUCKETS,
)
REJECTED = Counter("ce_eval_rejected_total", "Requests answered with an error.", ["reason"])
INFLIGHT = Gauge("ce_eval_inflight", "HTTP requests in progress.", multiprocess_mode="livesum")
BATCHES = Counter("ce_eval_batches_total", "Run batches by outcome.", ["outcome"])
BUILD_INFO = Gauge(
    "ce_eval_build_info", "Build information.", ["version", "python"], multiprocess_mode="max"
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)

#: HTTP status → ``ce_eval_rejected_total`` reason (the problem types of service.errors).
REJECTION_REASONS = {
    400: "malformed_body",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation",
    429: "rate_limited",
    503: "unavailable",
}
UNMATCHED_ROUTE = "<unmatched>"


@functools.cache
def _evaluate_duration(loss: str, backend: str) -> Any:
    """The labelled histogram child (``labels()`` costs a locked lookup per call)."""
    return EVALUATE_DURATION.labels(loss, backend)


def observe_evaluate(loss: str, backend: str, seconds: float) -> None:
    _evaluate_duration(loss, backend).observe(seconds)


def count_request(transport: str, route: str, method: str, status: str) -> None:
    REQUESTS.labels(transport, route, method, status).inc()


def count_batch(outcome: str) -> None:
    BATCHES.labels(outcome).inc()


def rejection_reason(status: int) -> str:
    return REJECTION_REASONS.get(status, "server_error" if status >= 500 else "client_error")


def exposition() -> tuple[bytes, str]:
    """The text exposition format; merged over processes when ``PROMETHEUS_MULTIPROC_DIR``."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def route_template(scope: Scope) -> str:
    """The matched route's path template (set by the router on the shared scope)."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


class PrometheusMiddleware:
    """Pure ASGI: in-flight gauge, request counter and latency by route template, rejections."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        INFLIGHT.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            INFLIGHT.dec()
            route = route_template(scope)
            method = scope["method"]
            count_request("http", route, method, str(status))
            REQUEST_DURATION.labels(route, method).observe(time.perf_counter() - started)
            if status >= 400:
                REJECTED.labels(rejection_reason(status)).inc()
