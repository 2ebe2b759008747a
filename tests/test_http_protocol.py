"""The HTTP protocol's body buffer: uvicorn's parsed chunks are handed to the app without its two
copies, byte for byte, whether a body arrives in one piece or in many small writes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import numpy as np
import orjson
import pytest

from ce_eval_client.proto import request_chunks
from service.http.protocol import PendingBody
from tests.servers import ServerProcess, start_serve


def test_pending_body_hands_one_chunk_out_as_it_is_and_joins_several() -> None:
    body = PendingBody()
    chunk = b"x" * 100_000
    body += chunk
    assert len(body) == 100_000 and bytes(body) is chunk
    body += b"yz"
    assert len(body) == 100_002 and bytes(body) == chunk + b"yz"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = start_serve()
    yield process
    process.stop()


def _post(port: int, body: bytes, piece: int, pause_every: int = 0) -> dict[str, object]:
    head = (
        "POST /v1/evaluate HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-protobuf\r\n"
        f"Accept: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for i, start in enumerate(range(0, len(body), piece)):
            sock.sendall(body[start : start + piece])
            if pause_every and i % pause_every == 0:
                time.sleep(0.001)  # the server reads what came so far: many small chunks
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK", answer[:500]
    return dict(orjson.loads(rest.partition(b"\r\n\r\n")[2]))


def test_a_body_in_many_small_writes_answers_as_one_sent_at_once(server: ServerProcess) -> None:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((300, 1000)).astype(np.float32)  # 1.2 MB
    targets = rng.integers(0, 1000, 300)
    body = b"".join(bytes(c) for c in request_chunks("cross_entropy", logits, targets))
    whole = _post(server.http_port, body, len(body))
    trickled = _post(server.http_port, body, 4096, pause_every=16)
    assert whole["value"] == trickled["value"]
    z = logits.astype(np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    assert whole["value"] == pytest.approx(-log_p[np.arange(300), targets].mean(), rel=1e-6)
