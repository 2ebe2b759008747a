"""The HTTP protocol's body buffer: uvicorn's parsed chunks are handed to the app without its two
copies, byte for byte, whether a body arrives in one piece or in many small writes; a large body
is received straight into its buffer, with the same answers, timeouts and budget."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from ce_eval_client.proto import request_chunks
from service.config import Settings
from service.http.app import create_app
from service.http.bodies import LARGE_BODY_BYTES
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


def _request(body: bytes, extra: str = "") -> bytes:
    return (
        "POST /v1/evaluate HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-protobuf\r\n"
        f"Accept: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode()


def _responses(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """``count`` keep-alive answers read off ``sock``, as (head, body) (each with a
    Content-Length)."""
    data, answers = b"", []
    while len(answers) < count:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if len(rest) >= length:
                answers.append((head, rest[:length]))
                data = rest[length:]
                continue
        chunk = sock.recv(1 << 16)
        assert chunk, "connection closed early"
        data += chunk
    return answers


def _answers(sock: socket.socket, count: int) -> list[dict[str, object]]:
    """``count`` 200 answers' JSON."""
    answers = []
    for head, body in _responses(sock, count):
        assert head.startswith(b"HTTP/1.1 200"), head
        answers.append(dict(orjson.loads(body)))
    return answers


def test_pipelined_bodies_each_reach_their_own_request(server: ServerProcess) -> None:
    rng = np.random.default_rng(5)
    bodies = []
    for rows in (70, 90):  # each body over uvicorn's 64 KiB read pause
        logits = rng.standard_normal((rows, 300)).astype(np.float32)
        chunks = request_chunks("cross_entropy", logits, np.zeros(rows, np.int64))
        bodies.append((b"".join(bytes(c) for c in chunks), logits))
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(b"".join(_request(body) + body for body, _ in bodies))
        answers = _answers(sock, 2)
    for answer, (_, logits) in zip(answers, bodies, strict=True):
        z = logits.astype(np.float64)
        reference = np.mean(np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[:, 0])
        assert answer["value"] == pytest.approx(reference, rel=1e-6)


def _after_100_continue(port: int, body: bytes) -> dict[str, object]:
    """The answer to ``body`` sent only once the server has asked for it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(_request(body, "Expect: 100-continue\r\n"))
        interim = sock.recv(1 << 16)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        sock.sendall(body)
        (answer,) = _answers(sock, 1)
    return answer


def test_expect_100_continue_then_the_body(server: ServerProcess) -> None:
    logits = np.zeros((200, 100), np.float32)
    body = b"".join(
        bytes(c) for c in request_chunks("cross_entropy", logits, np.zeros(200, np.int64))
    )
    answer = _after_100_continue(server.http_port, body)
    assert answer["value"] == pytest.approx(np.log(100), rel=1e-6)


def test_large_bodies_past_the_buffer_budget_are_503_until_the_holder_ends() -> None:
    size = 5 * 1024 * 1024  # over LARGE_BODY_BYTES: read into a budgeted buffer
    server = start_serve({"CE_EVAL_MAX_BUFFERED_BYTES": str(6 * 1024 * 1024)})
    try:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as holder:
            holder.sendall(_request(b"x" * size) + b"x" * 1000)  # declared, then held
            for _ in range(100):  # until the server holds the first body's buffer
                with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as s:
                    s.sendall(_request(b"y" * size))  # no body sent: refused before reading
                    ((head, problem),) = _responses(s, 1)
                if head.startswith(b"HTTP/1.1 503"):
                    break
                time.sleep(0.05)
            assert head.startswith(b"HTTP/1.1 503"), head
            assert b"retry-after: 1" in head.lower() and b"CE_EVAL_MAX_BUFFERED_BYTES" in problem
            holder.sendall(b"x" * (size - 1000))  # the rest: no evaluation request, a 4xx
            assert _responses(holder, 1)[0][0].startswith(b"HTTP/1.1 4")
        logits = np.zeros((1400, 1000), np.float32)  # 5.6 MB: the budget is free again
        body = b"".join(
            bytes(c) for c in request_chunks("cross_entropy", logits, np.zeros(1400, np.int64))
        )
        assert _post(server.http_port, body, len(body))["value"] == pytest.approx(np.log(1000))
    finally:
        server.stop()


# Bodies from LARGE_BODY_BYTES (4 MiB) on are received straight into their buffer (_BodySink)
LARGE_ENV = {"CE_EVAL_BODY_TIMEOUT_S": "1", "CE_EVAL_MAX_BUFFERED_BYTES": str(6 * 1024 * 1024)}


@pytest.fixture(scope="module")
def large_server() -> Iterator[ServerProcess]:
    process = start_serve(LARGE_ENV)
    yield process
    code, stderr = process.stop(timeout=20)
    assert code == 0 and "Traceback" not in stderr, stderr


def _large_case(seed: int, rows: int = 1100) -> tuple[bytes, float]:
    """A ``rows``×1000 float32 protobuf body (1100 rows: 4.4 MB) and its float64 mean loss."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, 1000)).astype(np.float32)
    targets = rng.integers(0, 1000, rows)
    body = b"".join(bytes(c) for c in request_chunks("cross_entropy", logits, targets))
    z = logits.astype(np.float64)
    m = z.max(1)
    reference = np.mean(np.log(np.exp(z - m[:, None]).sum(1)) + m - z[np.arange(rows), targets])
    return body, float(reference)


async def test_a_large_body_received_in_place_answers_as_the_chunked_path(
    large_server: ServerProcess, tmp_path: Path
) -> None:
    body, reference = _large_case(7)
    assert len(body) >= LARGE_BODY_BYTES
    whole = _post(large_server.http_port, body, len(body))
    trickled = _post(large_server.http_port, body, 65536, pause_every=4)
    app = create_app(Settings(log_level="warning", database_url=f"sqlite:///{tmp_path / 'db'}"))
    async with (  # in process: no BODY_INTO, the body comes chunk by chunk (the general path)
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        answer = await c.post(
            "/v1/evaluate",
            content=body,
            headers={"content-type": "application/x-protobuf", "accept": "application/json"},
        )
    assert answer.status_code == 200, answer.text
    assert whole["value"] == trickled["value"] == answer.json()["value"]
    assert whole["value"] == pytest.approx(reference, rel=1e-6)


def test_a_request_pipelined_after_a_large_body_is_parsed_from_its_first_byte(
    large_server: ServerProcess,
) -> None:
    large, large_reference = _large_case(8)
    small, small_reference = _large_case(9, rows=20)
    with socket.create_connection(("127.0.0.1", large_server.http_port), timeout=30) as sock:
        sock.sendall(_request(large) + large + _request(small) + small)
        first, second = _answers(sock, 2)
    assert first["value"] == pytest.approx(large_reference, rel=1e-6)
    assert second["value"] == pytest.approx(small_reference, rel=1e-6)


def test_a_large_body_after_100_continue(large_server: ServerProcess) -> None:
    body, reference = _large_case(10)
    answer = _after_100_continue(large_server.http_port, body)
    assert answer["value"] == pytest.approx(reference, rel=1e-6)


def test_a_large_body_that_stalls_gets_408_and_a_closed_socket(large_server: ServerProcess) -> None:
    body, _ = _large_case(11)
    with socket.create_connection(("127.0.0.1", large_server.http_port), timeout=30) as sock:
        sock.sendall(_request(body) + body[: 1 << 20])  # then nothing: CE_EVAL_BODY_TIMEOUT_S=1
        started = time.monotonic()
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    assert b"body not received within 1 s" in data and time.monotonic() - started < 5


def test_a_large_body_cut_off_gives_its_buffer_back(large_server: ServerProcess) -> None:
    """Two 4.4 MB buffers pass the 6 MiB budget: a leaked first buffer would 503 the next."""
    body, reference = _large_case(12)
    with socket.create_connection(("127.0.0.1", large_server.http_port), timeout=30) as sock:
        sock.sendall(_request(body) + body[: 1 << 20])
        time.sleep(0.2)  # the server is receiving it into its buffer
    for _ in range(50):  # until the server has seen the close (bounded)
        with socket.create_connection(("127.0.0.1", large_server.http_port), timeout=30) as sock:
            sock.sendall(_request(body) + body)
            ((head, answer),) = _responses(sock, 1)
        if not head.startswith(b"HTTP/1.1 503"):
            break
        time.sleep(0.1)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert orjson.loads(answer)["value"] == pytest.approx(reference, rel=1e-6)


def _until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes (a reset counts as closing: a server that closes
    with bytes it never read, as after a ``Connection: close`` body, resets)."""
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_bytes_after_a_large_body_with_connection_close_are_never_parsed(
    large_server: ServerProcess,
) -> None:
    body, reference = _large_case(13)
    with socket.create_connection(("127.0.0.1", large_server.http_port), timeout=30) as sock:
        sock.sendall(_request(body, "Connection: close\r\n") + body + b"JUNK JUNK\r\n\r\n")
        data = _until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200"), data[:300]  # one answer, no 400 for the junk
    value = orjson.loads(data.partition(b"\r\n\r\n")[2])["value"]
    assert value == pytest.approx(reference, rel=1e-6)


def test_a_client_that_half_closes_after_a_large_body_gets_its_answer(
    large_server: ServerProcess,
) -> None:
    body, reference = _large_case(14)
    with socket.create_connection(("127.0.0.1", large_server.http_port), timeout=30) as sock:
        sock.sendall(_request(body, "Connection: close\r\n") + body)
        sock.shutdown(socket.SHUT_WR)  # EOF while the request is being served
        data = _until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200"), data[:300]
    assert orjson.loads(data.partition(b"\r\n\r\n")[2])["value"] == pytest.approx(reference, 1e-6)
