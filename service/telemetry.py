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
- ``ce_eval_run_value{run_id,metric}``: point value of a run's loss (``metric="value"``) or
  scalar metric (top-k as ``top_k_accuracy.5``); ``ce_eval_run_ci_low{run_id,metric}`` /
  ``ce_eval_run_ci_high{run_id,metric}``: the bounds of its bootstrap interval;
  ``ce_eval_run_open{run_id,baseline}``: 1 while the run is open, 0 once closed, ``baseline``
  the run it is compared against (its ``baseline`` tag, or ""). Set by
  :func:`export_run` / :func:`export_run_state`, dropped by :func:`forget_run`; the alert
  rules of ``deploy/prometheus/alerts.yml`` read them.

Several worker processes: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before start;
each process then writes its samples there and ``/metrics`` aggregates all of them.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import threading
import time
from collections.abc import Mapping, Sequence
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
IN_PLACE = Counter(
    "ce_eval_shared_memory_in_place_total",
    "Shared-memory logits evaluated in place by a worker process, by outcome "
    "(ok, error, truncated, died).",
    ["outcome"],
)
BUILD_INFO = Gauge(
    "ce_eval_build_info", "Build information.", ["version", "python"], multiprocess_mode="max"
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)
# Run gauges: the sample of the process that last wrote it is the run's (multiprocess mode).
RUN_VALUE = Gauge(
    "ce_eval_run_value",
    "Point value of a run's loss (metric=value) or scalar metric.",
    ["run_id", "metric"],
    multiprocess_mode="mostrecent",
)
RUN_CI_LOW = Gauge(
    "ce_eval_run_ci_low",
    "Lower bound of the bootstrap interval of a run's metric.",
    ["run_id", "metric"],
    multiprocess_mode="mostrecent",
)
RUN_CI_HIGH = Gauge(
    "ce_eval_run_ci_high",
    "Upper bound of the bootstrap interval of a run's metric.",
    ["run_id", "metric"],
    multiprocess_mode="mostrecent",
)
RUN_OPEN = Gauge(
    "ce_eval_run_open",
    "1 while a run is open, 0 once closed; baseline: the run it is compared against.",
    ["run_id", "baseline"],
    multiprocess_mode="mostrecent",
)
#: run id → the (gauge, labels) it set, so that :func:`forget_run` can drop them.
_RUN_SERIES: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}
_RUN_SERIES_LOCK = threading.Lock()  # worker threads export
#: Most runs with series in one process (monitored runs and their baselines): a run beyond it
#: is not exported, so clients' tags cannot grow the exposition without bound.
MAX_EXPORTED_RUNS = 1000

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


def count_in_place(outcome: str) -> None:
    IN_PLACE.labels(outcome).inc()


def _set(run_id: str, gauge: Any, labels: tuple[str, ...], value: float | None) -> None:
    series = _RUN_SERIES.setdefault(run_id, set())
    if value is None or not math.isfinite(value):
        if (gauge, labels) in series:
            gauge.remove(*labels)
            series.discard((gauge, labels))
        return
    gauge.labels(*labels).set(value)
    series.add((gauge, labels))


def export_run(
    run_id: str,
    values: Mapping[str, float | None],
    intervals: Mapping[str, Sequence[float | None] | None] | None = None,
) -> None:
    """Set ``ce_eval_run_value`` of each of ``values`` (``value`` the loss, the scalar
    metrics) and ``ce_eval_run_ci_low`` / ``_high`` of each of ``intervals`` ([lo, hi]); a
    None or non-finite number drops that series instead."""
    for metric, value in values.items():
        _set(run_id, RUN_VALUE, (run_id, metric), value)
    for metric, ci in (intervals or {}).items():
        lo, hi = (None, None) if ci is None else ci
        _set(run_id, RUN_CI_LOW, (run_id, metric), lo)
        _set(run_id, RUN_CI_HIGH, (run_id, metric), hi)


def export_run_state(run_id: str, is_open: bool, baseline: str | None = None) -> None:
    """Set ``ce_eval_run_open{run_id, baseline}`` to 1 (open) or 0 (closed)."""
    labels = (run_id, baseline or "")
    for gauge, old in list(_RUN_SERIES.get(run_id, ())):
        if gauge is RUN_OPEN and old != labels:  # the baseline changed
            _set(run_id, RUN_OPEN, old, None)
    _set(run_id, RUN_OPEN, labels, 1.0 if is_open else 0.0)


def forget_run(run_id: str) -> None:
    """Drop every series of ``run_id`` (a deleted run). In multiprocess mode the files of
    other processes keep theirs until they restart: ``ce_eval_run_open`` 0 is what tells a
    closed run everywhere."""
    for gauge, labels in _RUN_SERIES.pop(run_id, set()):
        gauge.remove(*labels)


def observe_run(run: Mapping[str, Any] | None, run_id: str) -> None:
    """Export a run summary's point values (top-k as ``top_k_accuracy.k``), intervals and open
    state (the runs data plane calls it for runs tagged ``baseline`` and for their baselines,
    so the series stay as few as the monitored runs, at most ``MAX_EXPORTED_RUNS``); None:
    the run ``run_id`` was deleted."""
    with _RUN_SERIES_LOCK:
        if run is None:
            forget_run(run_id)
            return
        if run_id not in _RUN_SERIES and len(_RUN_SERIES) >= MAX_EXPORTED_RUNS:
            return
        values: dict[str, Any] = {"value": run.get("value")}
        for name, value in (run.get("metrics") or {}).items():
            if isinstance(value, Mapping) and name == "top_k_accuracy":
                values.update({f"{name}.{k}": v for k, v in value.items()})
            elif isinstance(value, int | float) and not isinstance(value, bool):
                values[name] = value
        intervals = {k: entry["ci"] for k, entry in (run.get("intervals") or {}).items()}
        export_run(run["id"], values, intervals)
        baseline = (run.get("tags") or {}).get("baseline")
        export_run_state(run["id"], run.get("status") == "open", baseline)


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
