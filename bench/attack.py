"""Attack run: issue 21's hostile requests against a real ``ce-eval serve``, and what each gets.

``python -m bench.attack`` starts ``ce-eval serve`` (SQLite in a temporary directory, NumPy
backend, ``CE_EVAL_HEADER_TIMEOUT_S`` = ``CE_EVAL_BODY_TIMEOUT_S`` = 2 s) and sends, from this
process, the way a hostile client would (raw sockets where the attack is about the transport):

- slow clients: 2,000 half-sent headers held at once; bodies that stall; bodies trickled one
  byte a second; more connections than ``CE_EVAL_MAX_CONNECTIONS`` (a second server, cap 200);
- amplifiers: a 4096-class ``confusion_matrix`` run (create, push, GET) and evaluate,
  ``outputs: ["hessian"]`` on 1024×256 logits, 200k unknown option keys, 1 MB names echoed
  back, ``GET /v1/runs?limit=6`` over six 4096-class confusion runs, each holding a
  1024-row batch;
- compute bombs: ``linear_cross_entropy`` with ``chunk_elements: 1`` at N = C = 2048, D = 1, a
  ``top_k`` list 1..32768 on 1×32768 logits, 4M sample weights beside one row of logits, 1,100
  ``tag=`` filters;
- never a 500: OIP ``UINT8`` data 300, a protobuf ``Struct`` temperature of NaN (REST and gRPC).

Each attack is bounded (a few seconds, short client timeouts). During each one a child
process probes ``/healthz`` on a fresh connection every 50 ms; the row reports the worst probe
latency (and any probe that did not get 200). Client, probe and server share the machine's
cores, so the latency includes waiting for a core. RSS growth is the
server's ``VmRSS`` after − before and its ``VmHWM`` (peak) rise, from ``/proc/<pid>/status``.
Prints a Markdown table and writes ``bench/results/attack-*.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import math
import multiprocessing
import os
import platform
import resource
import selectors
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
import orjson

from bench._results import write_results

MB = 1 << 20
ENV = {
    "CE_EVAL_HEADER_TIMEOUT_S": "2",
    "CE_EVAL_BODY_TIMEOUT_S": "2",
    "CE_EVAL_LOG_LEVEL": "warning",
}
CAP_ENV = {**ENV, "CE_EVAL_MAX_CONNECTIONS": "200"}
JSON = {"content-type": "application/json"}
#: Classes of the runs listed (runs answer summaries, so their C does not bound the list).
RUN_CLASSES = 4096


@dataclass
class Target:
    """One running server: its address and process id."""

    url: str
    host: str
    port: int
    pid: int
    grpc_target: str


@dataclass
class Outcome:
    """What an attack reports: what was sent, what came back, how long the answer took."""

    sent: str
    statuses: Counter[str] = field(default_factory=Counter)
    answer_s: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _memory(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in MiB (empty where ``/proc`` is not readable)."""
    try:
        text = open(f"/proc/{pid}/status").read()  # noqa: SIM115
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def _probe_once(host: str, port: int) -> tuple[float, float, str]:
    """One ``GET /healthz`` on a fresh connection: its ``time.monotonic`` start and end and its
    status (``timeout`` past 5 s, ``error`` for a reset or refused connection, ``closed`` for
    no answer)."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = b""
            while len(data) < 12 and (chunk := sock.recv(4096)):
                data += chunk
        status = data[9:12].decode(errors="replace") or "closed"
    except TimeoutError:
        status = "timeout"
    except OSError:
        status = "error"
    return started, time.monotonic(), status


def _probe_loop(
    host: str, port: int, interval_s: float, ready: Any, stop: Any, results: Any
) -> None:
    found = [_probe_once(host, port)]
    ready.set()
    while not stop.is_set():
        stop.wait(interval_s)
        found.append(_probe_once(host, port))  # one more after the stop: past the attack's end
    results.send(found)


class HealthProbe:
    """``GET /healthz`` on a fresh connection every ``interval_s`` from a child process (so the
    attacking client's own work does not delay the probe).

    ``latencies`` and ``statuses`` are those of the probes that overlap the ``with`` block
    (``time.monotonic`` is one clock for every process), or of the first one after it where
    the block was shorter than the interval.
    """

    def __init__(self, target: Target, interval_s: float = 0.05) -> None:
        context = multiprocessing.get_context("fork")
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self._ready = context.Event()
        self._stop = context.Event()
        self._results, child_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_probe_loop,
            args=(target.host, target.port, interval_s, self._ready, self._stop, child_end),
            daemon=True,
        )
        self._began = 0.0

    def __enter__(self) -> HealthProbe:
        self._process.start()
        self._ready.wait(10)
        self._began = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        began, ended = self._began, time.monotonic()
        self._stop.set()
        probes = self._results.recv() if self._results.poll(15) else []
        self._process.join(timeout=5)
        overlapping = [p for p in probes if p[1] >= began and p[0] <= ended]
        after = [p for p in probes if p[0] > ended][:1]
        for start, end, status in overlapping or after:
            self.latencies.append(end - start)
            self.statuses[status] += 1


# ---- helpers ----------------------------------------------------------------------------------


def _connect(target: Target, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((target.host, target.port), timeout=timeout)


def _raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` towards ``wanted``; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = wanted if hard == resource.RLIM_INFINITY else min(max(soft, wanted), hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _drain(socks: list[socket.socket], limit_s: float) -> tuple[Counter[str], list[float], int]:
    """Read every socket until the server closes it (or ``limit_s``): the statuses of the
    answers (``closed`` without one, ``open`` when still open at the end), each socket's
    ``perf_counter`` time of closing (NaN while open), and how many were still open."""
    selector = selectors.DefaultSelector()
    got: list[bytes] = [b""] * len(socks)
    closed_at = [float("nan")] * len(socks)
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, data=i)
    statuses: Counter[str] = Counter()
    started = time.perf_counter()
    open_ = len(socks)
    while open_ and time.perf_counter() - started < limit_s:
        for key, _ in selector.select(timeout=0.2):
            i = key.data
            try:
                chunk = socks[i].recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if chunk:
                got[i] += chunk
                continue
            statuses[got[i][9:12].decode(errors="replace") if got[i] else "closed"] += 1
            selector.unregister(socks[i])
            closed_at[i] = time.perf_counter()
            open_ -= 1
    if open_:
        statuses["open"] += open_
    selector.close()
    return statuses, closed_at, open_


def _b64(array: np.ndarray) -> dict[str, Any]:
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
    }


def _size(n: float) -> str:
    if n >= MB:
        return f"{n / MB:.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.1f} KB"
    return f"{int(n)} B"


def _post(
    client: httpx.Client, path: str, body: bytes, headers: dict[str, str] = JSON
) -> httpx.Response:
    return client.post(path, content=body, headers=headers)


def _one(
    client: httpx.Client, method: str, path: str, sent: str, **kwargs: Any
) -> tuple[Outcome, httpx.Response]:
    """One request: its status, time and answer size."""
    started = time.perf_counter()
    r = client.request(method, path, **kwargs)
    outcome = Outcome(sent, Counter([str(r.status_code)]), time.perf_counter() - started)
    outcome.note = _answer_note(r)
    return outcome, r


def _clip(text: str, chars: int = 110) -> str:
    return text if len(text) <= chars else text[:chars] + "…"


def _answer_note(r: httpx.Response) -> str:
    """The answer's size and, for a problem, its first error's location and message (clipped)."""
    note = f"answer {_size(len(r.content))}"
    if r.status_code >= 400 and r.headers.get("content-type", "").endswith("json"):
        with contextlib.suppress(ValueError):
            problem = r.json()
            errors = problem.get("errors") or []
            if errors:
                first = errors[0]
                msg = _clip(str(first.get("msg", "")))
                note += f"; {'.'.join(map(str, first.get('loc', [])))}: {msg}"
            elif problem.get("detail") or problem.get("error"):
                note += f"; {_clip(str(problem.get('detail') or problem.get('error')))}"
    return note.replace("|", "/").replace("\n", " ")


# ---- slow clients -----------------------------------------------------------------------------


def slowloris(target: Target, client: httpx.Client) -> Outcome:
    """2,000 connections, each with a request line and one header and never the blank line."""
    count = 2000
    partial = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    socks: list[socket.socket] = []
    opened_at: list[float] = []
    started = time.perf_counter()
    try:
        for _ in range(count):
            sock = _connect(target)
            sock.sendall(partial)
            socks.append(sock)
            opened_at.append(time.perf_counter())
        opened_s = time.perf_counter() - started
        # how many were already answered / closed when the last one was opened
        selector = selectors.DefaultSelector()
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        already = len(selector.select(timeout=0))
        selector.close()
        time.sleep(0.5)  # held: the probe keeps measuring /healthz
        statuses, closed_at, left = _drain(socks, 10.0)
    finally:
        for sock in socks:
            sock.close()
    ages = [c - o for c, o in zip(closed_at, opened_at, strict=True) if not math.isnan(c)]
    closed = f"{min(ages):.2f}–{max(ages):.2f} s" if ages else "never"
    outcome = Outcome(f"{count} × {len(partial)} B half-sent headers", statuses)
    outcome.answer_s = time.perf_counter() - started
    outcome.note = (
        f"{count} opened in {opened_s:.1f} s, {count - already} held at once; each closed "
        f"{closed} after it opened (CE_EVAL_HEADER_TIMEOUT_S 2)"
        + (f"; {left} still open after 10 s" if left else "")
    )
    outcome.extra = {
        "opened_s": opened_s,
        "held_at_once": count - already,
        "still_open": left,
        "closed_after_s": [min(ages), max(ages)] if ages else None,
    }
    return outcome


def _slow_body_sockets(target: Target, count: int, length: int) -> list[socket.socket]:
    head = (
        "POST /v1/evaluate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {length}\r\n\r\n"
    ).encode()
    socks = []
    for _ in range(count):
        sock = _connect(target)
        sock.sendall(head + b'{"loss":')
        socks.append(sock)
    return socks


def slow_body_stall(target: Target, client: httpx.Client) -> Outcome:
    """200 requests whose body stops after 8 of its 100,000 declared bytes."""
    count = 200
    started = time.perf_counter()
    socks = _slow_body_sockets(target, count, 100_000)
    try:
        statuses, _, _ = _drain(socks, 8.0)
    finally:
        for sock in socks:
            sock.close()
    elapsed = time.perf_counter() - started
    return Outcome(
        f"{count} × headers + 8 of 100,000 body bytes, then nothing",
        statuses,
        elapsed,
        f"all answered/closed within {elapsed:.1f} s (CE_EVAL_BODY_TIMEOUT_S 2)",
    )


def slow_body_trickle(target: Target, client: httpx.Client) -> Outcome:
    """200 requests whose body arrives one byte a second, for 6 s (progress within the body
    timeout each time): the server keeps them, by design; the connection cap bounds them."""
    count, seconds = 200, 6
    started = time.perf_counter()
    socks = _slow_body_sockets(target, count, 100_000)
    try:
        for _ in range(seconds):
            time.sleep(1.0)
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b" ")
        statuses, _, _ = _drain(socks, 0.3)
    finally:
        for sock in socks:
            sock.close()
    return Outcome(
        f"{count} × 1 body byte/s for {seconds} s (100,000 declared)",
        statuses,
        time.perf_counter() - started,
        f"'open' = still connected after {seconds} s, no answer (progress resets the body timeout)",
    )


def connection_cap(target: Target, client: httpx.Client) -> Outcome:
    """300 half-sent requests against a server capped at 200 connections (a second server)."""
    count = 300
    partial = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    socks: list[socket.socket] = []
    refused: Counter[str] = Counter()
    started = time.perf_counter()
    try:
        for _ in range(count):
            try:
                sock = _connect(target)
                sock.sendall(partial)
                socks.append(sock)
            except OSError:
                refused["connect error"] += 1
        opened_s = time.perf_counter() - started
        statuses, _, _ = _drain(socks, 6.0)
    finally:
        for sock in socks:
            sock.close()
    statuses.update(refused)
    elapsed = time.perf_counter() - started
    return Outcome(
        f"{count} × half-sent headers, cap 200 (second server)",
        statuses,
        elapsed,
        f"opened in {opened_s:.2f} s; 503 = refused beyond the cap, 408 = the held ones at "
        "the header timeout; /healthz on a new connection shares the cap (503 while full)",
    )


# ---- amplifiers -------------------------------------------------------------------------------


def _confusion_run(client: httpx.Client, name: str) -> str:
    r = client.post(
        "/v1/runs",
        json={
            "name": name,
            "loss": "cross_entropy",
            "metrics": ["confusion_matrix"],
            "options": {"max_confusion_classes": 4096},
        },
    )
    r.raise_for_status()
    run_id: str = r.json()["id"]
    return run_id


def confusion_run(target: Target, client: httpx.Client) -> Outcome:
    """A 4096-class confusion run: create, push a 2×4096 batch, GET."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4096)).astype(np.float32)
    batch = orjson.dumps({"batch_id": "b0", "logits": _b64(logits), "targets": [0, 1]})
    started = time.perf_counter()
    run_id = _confusion_run(client, "attack-confusion-4096")
    pushed = _post(client, f"/v1/runs/{run_id}/batches", batch)
    got = client.get(f"/v1/runs/{run_id}")
    elapsed = time.perf_counter() - started
    return Outcome(
        f"create + push {_size(len(batch))} (2×4096) + GET",
        Counter([f"push {pushed.status_code}", f"GET {got.status_code}"]),
        elapsed,
        f"push {_answer_note(pushed)}; GET answer {_size(len(got.content))}",
    )


def hessian(target: Target, client: httpx.Client) -> Outcome:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((1024, 256)).astype(np.float32)
    targets = rng.integers(0, 256, size=1024)
    body = orjson.dumps(
        {
            "loss": "cross_entropy",
            "logits": _b64(logits),
            "targets": _b64(targets.astype(np.int64)),
            "outputs": ["hessian"],
        }
    )
    outcome, _ = _one(
        client, "POST", "/v1/evaluate", f"{_size(len(body))} (1024×256, hessian)",
        content=body, headers=JSON,
    )  # fmt: skip
    return outcome


TINY: dict[str, Any] = {"loss": "cross_entropy", "logits": [[1.0, 2.0, 0.5]], "targets": [1]}


Attack = Callable[[Target, httpx.Client, Any], Outcome]


def _json_attack(
    path: str, what: str, build: Callable[[], dict[str, Any]]
) -> tuple[Attack, Callable[[], Any]]:
    """A POST of a JSON body serialized before the attack starts (so the probe does not time
    this process building it), answered by its status, time and answer."""

    def send(target: Target, client: httpx.Client, raw: bytes) -> Outcome:
        outcome, _ = _one(
            client, "POST", path, f"{_size(len(raw))} {what}", content=raw, headers=JSON
        )
        return outcome

    return send, lambda: orjson.dumps(build())


option_keys = _json_attack(
    "/v1/evaluate", "200k option keys",
    lambda: {**TINY, "options": {f"k{i}": 1 for i in range(200_000)}},
)  # fmt: skip
echo_loss = _json_attack("/v1/evaluate", "1 MB loss name", lambda: {**TINY, "loss": "x" * MB})
echo_metric = _json_attack(
    "/v1/evaluate", "1 MB metric name", lambda: {**TINY, "metrics": ["x" * MB]}
)
echo_tag_key = _json_attack(
    "/v1/runs", "1 MB tag key (create run)",
    lambda: {"name": "n", "loss": "cross_entropy", "tags": {"k" * MB: "v"}},
)  # fmt: skip


def runs_list(target: Target, client: httpx.Client) -> Outcome:
    """Six confusion runs of RUN_CLASSES classes, each holding a 1024-row batch, then one
    ``GET /v1/runs?limit=6``."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((1024, RUN_CLASSES)).astype(np.float32)
    targets = np.arange(1024, dtype=np.int64) * (RUN_CLASSES // 1024)
    batch = orjson.dumps({"batch_id": "b0", "logits": _b64(logits), "targets": _b64(targets)})
    pushes: Counter[str] = Counter()
    fill_started = time.perf_counter()
    for i in range(6):
        run_id = _confusion_run(client, f"attack-list-{i}")
        pushes[f"push {_post(client, f'/v1/runs/{run_id}/batches', batch).status_code}"] += 1
    fill_s = time.perf_counter() - fill_started
    started = time.perf_counter()
    r = client.get("/v1/runs", params={"limit": 6})
    elapsed = time.perf_counter() - started
    statuses = Counter({**pushes, f"list {r.status_code}": 1})
    return Outcome(
        f"GET /v1/runs?limit=6 over 6 runs of {RUN_CLASSES} classes",
        statuses,
        elapsed,
        f"list answer {_size(len(r.content))} ({_size(len(r.content) / 6)} a run: summaries, "
        f"scalars only); filling the 6 runs took {fill_s:.1f} s "
        f"({_size(len(batch))} per push)",
        {"list_bytes": len(r.content), "fill_s": fill_s},
    )


# ---- compute bombs ----------------------------------------------------------------------------


def _linear_chunk_body() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    n = c = 2048
    return {
        "loss": "linear_cross_entropy",
        "features": _b64(rng.standard_normal((n, 1)).astype(np.float32)),
        "weight": _b64(rng.standard_normal((c, 1)).astype(np.float32)),
        "targets": _b64(rng.integers(0, c, size=n).astype(np.int64)),
        "options": {"chunk_elements": 1},
    }


def _top_k_body() -> dict[str, Any]:
    k = 32768
    logits = np.random.default_rng(4).standard_normal((1, k)).astype(np.float32)
    return {
        "loss": "cross_entropy",
        "logits": _b64(logits),
        "targets": [3],
        "metrics": ["top_k_accuracy"],
        "options": {"top_k": list(range(1, k + 1))},
    }


linear_chunk_bomb = _json_attack(
    "/v1/evaluate", "linear CE N=C=2048 D=1 chunk 1", _linear_chunk_body
)
top_k_bomb = _json_attack("/v1/evaluate", "top_k 1..32768 on 1×32768", _top_k_body)
sample_weights_bomb = _json_attack(
    "/v1/evaluate", "4M sample weights, 1×3 logits",
    lambda: {**TINY, "sample_weight": [1] * 4_000_000},
)  # fmt: skip
confusion_evaluate = _json_attack(
    "/v1/evaluate",
    "2×4096 logits, stateless confusion_matrix",
    lambda: {
        "loss": "cross_entropy",
        "logits": _b64(np.random.default_rng(5).standard_normal((2, 4096)).astype(np.float32)),
        "targets": [0, 1],
        "metrics": ["confusion_matrix"],
        "options": {"max_confusion_classes": 4096},
    },
)
oip_uint8 = _json_attack(
    "/v2/models/cross_entropy/infer", "OIP UINT8 data 300",
    lambda: {
        "inputs": [
            {"name": "logits", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]},
            {"name": "targets", "shape": [1], "datatype": "UINT8", "data": [300]},
        ]
    },
)  # fmt: skip


def tag_filters(target: Target, client: httpx.Client) -> Outcome:
    params = [("tag", f"k{i}:v") for i in range(1100)]
    size = len(urlencode(params))
    outcome, _ = _one(
        client, "GET", "/v1/runs", f"{_size(size)} query, 1100 tag filters", params=params
    )
    return outcome


# ---- never a 500 ------------------------------------------------------------------------------


def proto_nan_rest(target: Target, client: httpx.Client) -> Outcome:
    from ce_eval_client.proto import PROTOBUF_MEDIA_TYPE, request_to_proto

    message = request_to_proto(
        "cross_entropy", np.array([[1.0, 2.0]], np.float32), np.array([1]),
        options={"temperature": float("nan")},
    )  # fmt: skip
    raw = message.SerializeToString()
    outcome, _ = _one(
        client, "POST", "/v1/evaluate", f"{_size(len(raw))} protobuf, Struct temperature NaN",
        content=raw, headers={"content-type": PROTOBUF_MEDIA_TYPE},
    )  # fmt: skip
    return outcome


def proto_nan_grpc(target: Target, client: httpx.Client) -> Outcome:
    from ce_eval_client.sdk import EvaluationError, GrpcClient

    started = time.perf_counter()
    with GrpcClient(target.grpc_target, timeout=10) as grpc_client:
        try:
            grpc_client.evaluate(
                "cross_entropy", np.array([[1.0, 2.0]], np.float32), np.array([1]),
                options={"temperature": float("nan")},
            )  # fmt: skip
            status, note = "OK", ""
        except EvaluationError as exc:
            status, note = str(exc.status), str(exc)[:120]
    return Outcome(
        "gRPC Evaluate, Struct temperature NaN",
        Counter([status]),
        time.perf_counter() - started,
        note.replace("|", "/").replace("\n", " "),
    )


@dataclass
class Spec:
    """One attack: its group and name, how it is sent, what it needs built beforehand (outside
    the probe's measurement) and which server it goes to (``main``, or ``cap``: 200 connections)."""

    group: str
    name: str
    send: Attack
    prepare: Callable[[], Any] = lambda: None
    server: str = "main"


def _plain(group: str, name: str, fn: Callable[[Target, httpx.Client], Outcome], **kw: Any) -> Spec:
    return Spec(group, name, lambda target, client, _: fn(target, client), **kw)


def _built(group: str, name: str, pair: tuple[Attack, Callable[[], Any]]) -> Spec:
    return Spec(group, name, pair[0], pair[1])


ATTACKS: list[Spec] = [
    _plain("slow", "slowloris", slowloris),
    _plain("slow", "slow body: stalled", slow_body_stall),
    _plain("slow", "slow body: trickled", slow_body_trickle),
    _plain("slow", "connection cap", connection_cap, server="cap"),
    _plain("amplifier", "confusion run, 4096 classes", confusion_run),
    _built("amplifier", "confusion evaluate, 4096 classes", confusion_evaluate),
    _plain("amplifier", "hessian 1024×256", hessian),
    _built("amplifier", "200k unknown option keys", option_keys),
    _built("amplifier", "echo: loss name", echo_loss),
    _built("amplifier", "echo: metric name", echo_metric),
    _built("amplifier", "echo: tag key", echo_tag_key),
    _plain("amplifier", "runs list, 6 confusion runs", runs_list),
    _built("bomb", "linear CE chunk_elements 1", linear_chunk_bomb),
    _built("bomb", "top_k 1..32768", top_k_bomb),
    _built("bomb", "4M sample weights", sample_weights_bomb),
    _plain("bomb", "1100 tag filters", tag_filters),
    _built("500", "OIP UINT8 300", oip_uint8),
    _plain("500", "protobuf NaN temperature (REST)", proto_nan_rest),
    _plain("500", "protobuf NaN temperature (gRPC)", proto_nan_grpc),
]


def run_attack(spec: Spec, target: Target) -> dict[str, Any]:
    """One attack under the /healthz probe, with the server's memory before and after."""
    prepared = spec.prepare()
    before = _memory(target.pid)
    with (
        httpx.Client(base_url=target.url, timeout=httpx.Timeout(30.0, connect=5.0)) as client,
        HealthProbe(target) as probe,
    ):
        try:
            outcome = spec.send(target, client, prepared)
        except httpx.HTTPError as exc:  # a hang or a dropped connection: report, do not retry
            outcome = Outcome("(see note)", Counter([type(exc).__name__]), 0.0, str(exc)[:120])
    after = _memory(target.pid)
    not_ok = {s: n for s, n in probe.statuses.items() if s != "200"}
    return {
        "group": spec.group,
        "attack": spec.name,
        "sent": outcome.sent,
        "statuses": dict(outcome.statuses),
        "answer_s": outcome.answer_s,
        "rss_growth_mib": after.get("VmRSS", 0) - before.get("VmRSS", 0) if after else None,
        "peak_rss_growth_mib": after.get("VmHWM", 0) - before.get("VmHWM", 0) if after else None,
        "rss_mib": after.get("VmRSS"),
        "healthz_worst_ms": 1000 * max(probe.latencies) if probe.latencies else None,
        "healthz_probes": len(probe.latencies),
        "healthz_not_200": not_ok,
        "note": outcome.note,
        **({"extra": outcome.extra} if outcome.extra else {}),
    }


def _cell_statuses(statuses: dict[str, int]) -> str:
    return ", ".join(f"{s} ×{n}" if n > 1 else s for s, n in sorted(statuses.items()))


def format_row(row: dict[str, Any]) -> str:
    healthz = "–"
    if row["healthz_worst_ms"] is not None:
        healthz = f"{row['healthz_worst_ms']:.0f} ms (n={row['healthz_probes']}"
        if row["healthz_not_200"]:
            healthz += f"; {_cell_statuses(row['healthz_not_200'])}"
        healthz += ")"
    rss = "–"
    if row["rss_growth_mib"] is not None:
        rss = f"{row['rss_growth_mib']:+.0f} MiB (peak {row['peak_rss_growth_mib']:+.0f})"
    return (
        f"| {row['attack']} | {row['sent']} | {_cell_statuses(row['statuses'])} | "
        f"{row['answer_s']:.2f} s | {rss} | {healthz} | {row['note']} |"
    )


HEADER = (
    "| attack | sent | status | time to answer | server RSS growth | worst /healthz | note |\n"
    "|---|---|---|---|---|---|---|"
)


@contextlib.contextmanager
def _server(env: dict[str, str]) -> Iterator[tuple[Target, list[str]]]:
    """A ``ce-eval serve`` subprocess; yields its target and, after it stopped, a list holding
    its exit code and the tracebacks / 5xx in its log."""
    from tests.servers import start_serve

    server = start_serve(env)
    assert server.process is not None
    target = Target(server.url, "127.0.0.1", server.port, server.process.pid, server.grpc_target)
    findings: list[str] = []
    try:
        yield target, findings
    finally:
        code, log = server.stop(timeout=30)
        findings.append(f"exit code {code}")
        findings.append(f"{log.count('Traceback')} tracebacks in the log ({len(log)} chars)")
        shutil.rmtree(Path(server.log_path).parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="run the attacks whose name contains a word")
    args = parser.parse_args(argv)
    soft = _raise_fd_limit(4500)
    chosen = [a for a in ATTACKS if not args.only or any(w in a.name for w in args.only)]
    rows: list[dict[str, Any]] = []
    servers: dict[str, list[str]] = {}
    started = time.perf_counter()
    print(HEADER, flush=True)
    for which, env in (("main", ENV), ("cap", CAP_ENV)):
        todo = [a for a in chosen if a.server == which]
        if not todo:
            continue
        with _server(env) as (target, findings):
            for spec in todo:
                row = run_attack(spec, target)
                row["server"] = which
                rows.append(row)
                print(format_row(row), flush=True)
        servers[which] = findings
    total = time.perf_counter() - started
    print()
    for which, findings in servers.items():
        print(f"{which} server ({'cap 200' if which == 'cap' else 'default cap'}): "
              f"{'; '.join(findings)}")  # fmt: skip
    print(f"whole run {total:.0f} s, client fd soft limit {soft}, {os.cpu_count()} CPUs")
    write_results(
        {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "env": {"main": ENV, "cap": CAP_ENV},
            "attacks": rows,
            "servers": servers,
            "total_s": total,
        },
        "attack",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
