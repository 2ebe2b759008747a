"""Slow and idle HTTP clients against a real ``ce-eval serve``: header and body read timeouts
measure progress, and the connection cap refuses cheaply while /healthz keeps answering."""

from __future__ import annotations

import resource
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.servers import ServerProcess, serving, start_serve

ENV = {
    "CE_EVAL_HEADER_TIMEOUT_S": "1",
    "CE_EVAL_BODY_TIMEOUT_S": "1",
    "CE_EVAL_MAX_CONNECTIONS": "40",
}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = start_serve(ENV)
    yield process
    code, stderr = process.stop(timeout=20)
    assert code == 0, stderr
    assert "Traceback" not in stderr and "Too many open files" not in stderr, stderr


def _connect(server: ServerProcess) -> socket.socket:
    address = urlsplit(server.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and the seconds that took."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def test_headers_trickled_past_the_timeout_get_408_and_a_closed_socket(
    server: ServerProcess,
) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        data, seconds = _read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"headers" in data
    assert seconds < 5


def test_a_connection_that_sends_nothing_is_closed(server: ServerProcess) -> None:
    with _connect(server) as sock:
        data, seconds = _read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408") and seconds < 5


def test_a_stalled_body_gets_408(server: ServerProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/evaluate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"loss":'
        )
        data, seconds = _read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"body" in data and seconds < 5


def test_a_slow_body_that_keeps_progressing_is_served(server: ServerProcess) -> None:
    """The body timeout measures time without a byte, not the upload's total time."""
    body = b'{"loss": "cross_entropy", "logits": [[1.0, 2.0]], "targets": [1]}'
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/evaluate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        )
        started = time.monotonic()
        for piece in (body[:20], body[20:40], body[40:]):
            sock.sendall(piece)
            time.sleep(0.6)
        data, _ = _read_until_closed(sock, 10)
    assert time.monotonic() - started > 1.5  # longer than body_timeout_s in all
    assert data.startswith(b"HTTP/1.1 200"), data


def test_beyond_the_connection_cap_new_connections_are_refused_cheaply(
    server: ServerProcess,
) -> None:
    held = [_connect(server) for _ in range(40)]
    try:
        for sock in held:  # half-sent requests, so that all 40 stay open
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.2)
        with _connect(server) as extra:
            data, seconds = _read_until_closed(extra, 5)
        assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in data
        assert seconds < 1
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the refused ones leave nothing behind: /healthz answers again
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.slow
def test_healthz_answers_within_1s_while_2000_half_open_connections_are_held() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2300:
        pytest.skip(f"the hard descriptor limit ({hard}) cannot hold 2,000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2300), hard))
    process = start_serve({"CE_EVAL_HEADER_TIMEOUT_S": "30"})
    held: list[socket.socket] = []
    try:
        for _ in range(2000):
            sock = _connect(process)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            held.append(sock)
        worst = 0.0
        for _ in range(5):
            started = time.monotonic()
            assert httpx.get(f"{process.url}/healthz", timeout=5).status_code == 200
            worst = max(worst, time.monotonic() - started)
        assert worst < 1.0
    finally:
        for sock in held:
            sock.close()
        code, stderr = process.stop(timeout=30)
    assert code == 0 and "Too many open files" not in stderr, stderr


@pytest.mark.parametrize(
    "field",
    [
        {"sample_weight": [1] * 4_000_000},
        {"options": {f"k{i}": 1 for i in range(200_000)}},
    ],
    ids=["4M-sample-weights", "200k-option-keys"],
)
def test_healthz_stays_fast_while_a_large_body_with_tiny_logits_is_parsed(
    server: ServerProcess, field: dict[str, object]
) -> None:
    """Tiny logits beside huge other fields: the body's size, not the logits', decides that
    parsing and validation run off the event loop."""
    body = orjson.dumps({"loss": "cross_entropy", "logits": [[1.0, 2.0]], "targets": [1], **field})
    answers: list[int] = []

    def post() -> None:
        answers.append(
            httpx.post(
                f"{server.url}/v1/evaluate",
                content=body,
                headers={"content-type": "application/json"},
                timeout=120,
            ).status_code
        )

    worker = threading.Thread(target=post)
    worst = 0.0
    with httpx.Client(base_url=server.url, timeout=10) as client:
        worker.start()
        while worker.is_alive():
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.02)
    worker.join()
    assert answers and answers[0] == 422  # the weights' length / the unknown options
    assert worst < 1.0


def test_a_keep_alive_connection_stays_usable_after_every_kind_of_error() -> None:
    """Each bad request (400, 401, 404, 413 by length and while streaming, 415, 422, OIP 422) is
    followed by a valid one on the same pooled connection, three times over."""
    key = {"X-API-Key": "k1"}
    json_type = {"content-type": "application/json"}
    bad: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/evaluate", {"content": b"{nope", "headers": {**key, **json_type}}),
        ("POST", "/v1/evaluate", {"content": b"x" * 1000, "headers": {**key}}),
        ("POST", "/v1/evaluate", {"json": {"loss": "nope"}, "headers": key}),
        ("GET", "/nope", {"headers": key}),
        ("POST", "/v1/evaluate", {"content": b"x" * 200_000, "headers": {**key, **json_type}}),
        ("POST", "/v1/evaluate", {"content": iter([b"x" * 50_000] * 4), "headers": key}),
        ("POST", "/v1/evaluate", {"content": b"x" * 50_000, "headers": json_type}),
        (
            "POST",
            "/v2/models/cross_entropy/infer",
            {
                "json": {
                    "inputs": [{"name": "logits", "shape": [1], "datatype": "UINT8", "data": [300]}]
                },
                "headers": key,
            },
        ),
    ]
    good = {"loss": "cross_entropy", "logits": [[1.0, 2.0]], "targets": [1]}
    env = {"CE_EVAL_MAX_BODY_BYTES": "65536", "CE_EVAL_API_KEYS": "k1"}
    with serving(env) as process, httpx.Client(base_url=process.url, timeout=10) as client:
        statuses = []
        for _ in range(3):
            for method, path, kwargs in bad:
                statuses.append(client.request(method, path, **kwargs).status_code)
                assert client.post("/v1/evaluate", json=good, headers=key).status_code == 200
    assert set(statuses) == {400, 401, 404, 413, 415, 422}
