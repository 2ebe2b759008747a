"""gRPC ``EvaluateStream``: one ``EvaluateRequest`` sent as a stream of ``EvaluateChunk`` pieces
(its serialized bytes in order, ``total_bytes`` in the first), against a real ``ce-eval serve``.
The SDK streams requests over ``stream_bytes``; the answer is the unary ``Evaluate``'s. Every
malformed stream is a documented status naming what is wrong, the declared size is checked
before anything else is read, and a stalled stream ends in DEADLINE_EXCEEDED."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest

from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.proto import request_chunks, stream_chunks
from ce_eval_client.sdk import EvaluationError, GrpcClient
from service.codecs.proto import chunk_parts
from service.errors import MalformedBody
from tests.servers import ServeProcess, start_serve

KEY = "stream-key-0123456789"
MAX_BODY = 2 * 1024 * 1024
ENV = {
    "CE_EVAL_API_KEYS": KEY,
    "CE_EVAL_MAX_BODY_BYTES": str(MAX_BODY),
    "CE_EVAL_BODY_TIMEOUT_S": "1",
    "CE_EVAL_MAX_BUFFERED_BYTES": str(3 * 1024 * 1024),
}
AUTH = (("authorization", f"Bearer {KEY}"),)
METHOD = "/ce_eval.v1.LossEvaluation/EvaluateStream"


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    process = start_serve(ENV)
    yield process
    process.stop()


def _chunk(data: bytes = b"", total: int | None = None) -> bytes:
    message = pb.EvaluateChunk(data=data)
    if total is not None:
        message.total_bytes = total
    return message.SerializeToString()


def _call(channel: grpc.Channel, messages: Iterator[bytes], auth: bool = True) -> grpc.RpcError:
    stream = channel.stream_unary(METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        stream(messages, timeout=30, metadata=AUTH if auth else ())
    return info.value


def _call_holding(
    channel: grpc.Channel, first: bytes, rest: bytes | None = None
) -> tuple[grpc.RpcError, float]:
    """The error of a stream that sends ``first``, then holds (up to 10 s, until the call has
    ended) before ``rest``; and the seconds the call took."""
    release = threading.Event()

    def messages() -> Iterator[bytes]:
        yield first
        release.wait(10)
        if rest is not None:
            yield rest

    started = time.monotonic()
    try:
        error = _call(channel, messages())
    finally:
        release.set()
    return error, time.monotonic() - started


def _request_bytes() -> bytes:
    logits = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    chunks = request_chunks("cross_entropy", logits, np.array([0, 3, 1]))
    return b"".join(bytes(c) for c in chunks)


def test_stream_chunks_carry_the_request_bytes_in_order_with_the_total_first() -> None:
    chunks: list[bytes | memoryview] = [b"abc", memoryview(b"defghij"), b"", b"k"]
    pieces = [pb.EvaluateChunk.FromString(p) for p in stream_chunks(chunks, piece_bytes=3)]
    assert [p.data for p in pieces] == [b"abc", b"def", b"ghi", b"jk"]
    assert pieces[0].total_bytes == 11
    assert all(not p.HasField("total_bytes") for p in pieces[1:])


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        _chunk(b"xyz", 3),
        _chunk(b"", 0),
        _chunk(b"data"),
        _chunk(b"first") + _chunk(b"second", 9),  # a repeated field: the last one wins
        _chunk(b"a", 1) + b"\x18\x07" + b"\x22\x02hi",  # unknown fields are skipped
        b"\x18\x00" * 200_000 + _chunk(b"z", 1),  # many unknown fields: the C parser's work
    ],
)
def test_chunk_parts_read_what_protobuf_reads(raw: bytes) -> None:
    data, total = chunk_parts(raw)
    expected = pb.EvaluateChunk.FromString(raw)
    assert bytes(data) == expected.data
    assert total == (expected.total_bytes if expected.HasField("total_bytes") else None)


@pytest.mark.parametrize("raw", [b"\x0a\x05ab", b"\xff", b"\x0a"])
def test_chunk_parts_refuse_malformed_bytes(raw: bytes) -> None:
    with pytest.raises(MalformedBody, match="EvaluateChunk"):
        chunk_parts(raw)


def test_a_streamed_request_answers_as_the_unary_one(server: ServeProcess) -> None:
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((64, 50)).astype(np.float32)
    targets = rng.integers(0, 50, 64)
    call = {
        "outputs": ["loss", "grad"],
        "metrics": ["accuracy", "nll"],
        "options": {"label_smoothing": 0.1},
    }
    with GrpcClient(server.grpc_target, api_key=KEY) as unary:
        expected = unary.evaluate("cross_entropy", logits, targets, **call)
    with GrpcClient(server.grpc_target, api_key=KEY, stream_bytes=0, piece_bytes=1000) as streaming:
        got = streaming.evaluate("cross_entropy", logits, targets, **call)
    assert got.value == expected.value and got.metrics == expected.metrics
    np.testing.assert_array_equal(got.outputs["grad"], expected.outputs["grad"])
    # independent reference: label-smoothed mean cross-entropy in float64
    z = logits.astype(np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    reference = -(0.9 * log_p[np.arange(64), targets] + 0.1 * log_p.mean(1)).mean()
    assert got.value == pytest.approx(reference, rel=1e-6)
    rpcs = httpx.get(f"{server.url}/metrics").text
    assert 'route="/ce_eval.v1.LossEvaluation/EvaluateStream"' in rpcs


def test_requests_over_stream_bytes_take_the_stream(server: ServeProcess) -> None:
    before = _stream_calls(server)
    logits = np.zeros((300, 1000), np.float32)  # 1.2 MB: over a stream_bytes of 1 MiB
    with GrpcClient(server.grpc_target, api_key=KEY, stream_bytes=1 << 20) as client:
        assert client.evaluate("cross_entropy", logits, np.zeros(300, np.int64)).value == (
            pytest.approx(np.log(1000))
        )
        client.evaluate("cross_entropy", logits[:10], np.zeros(10, np.int64))  # unary
    assert _stream_calls(server) == before + 1


def _stream_calls(server: ServeProcess) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if (
            line.startswith("ce_eval_requests_total")
            and "EvaluateStream" in line
            and ('status="OK"' in line)
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_empty_stream_is_invalid_argument(channel: grpc.Channel) -> None:
    error = _call(channel, iter([]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no chunk" in (error.details() or "")


def test_the_first_chunk_must_declare_total_bytes(channel: grpc.Channel) -> None:
    body = _request_bytes()
    error = _call(channel, iter([_chunk(body)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "total_bytes" in (error.details() or "")


def test_a_declared_size_over_the_body_limit_is_refused_before_reading_on(
    channel: grpc.Channel,
) -> None:
    # the server answers without waiting for more
    error, seconds = _call_holding(channel, _chunk(b"x" * 10, MAX_BODY + 1))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_BODY) in (error.details() or "")
    assert seconds < 8


@pytest.mark.parametrize(
    ("pieces", "words"),
    [
        (lambda b: [_chunk(b[:5], len(b)), _chunk(b[5:] + b"!")], "longer than"),
        (lambda b: [_chunk(b[:5], len(b))], "ended after 5"),
        (lambda b: [_chunk(b[:5], len(b)), _chunk(b[5:], len(b) + 1)], "total_bytes"),
        (lambda b: [_chunk(b[:5], len(b)), b"\xff"], "EvaluateChunk"),
        (lambda b: [_chunk(b"\xff" * len(b), len(b))], "EvaluateRequest"),
        (lambda b: [_chunk(b[:5], len(b)), _chunk(b"", len(b)), _chunk(b[5:])], "no data"),
        (lambda b: [_chunk(b"", len(b)), _chunk(b)], "no data"),
    ],
    ids=[
        "too-long",
        "too-short",
        "another-total",
        "malformed-chunk",
        "malformed-request",
        "empty-chunk",
        "empty-first-chunk",
    ],
)
def test_a_stream_that_does_not_add_up_is_invalid_argument(
    channel: grpc.Channel, pieces: object, words: str
) -> None:
    body = _request_bytes()
    error = _call(channel, iter(pieces(body)))  # type: ignore[operator]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (error.details() or "")


def test_a_stalled_stream_ends_in_deadline_exceeded(channel: grpc.Channel) -> None:
    body = _request_bytes()  # held past CE_EVAL_BODY_TIMEOUT_S = 1
    error, seconds = _call_holding(channel, _chunk(body[:5], len(body)), _chunk(body[5:]))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seconds < 8


def test_a_stream_without_a_key_is_unauthenticated(channel: grpc.Channel) -> None:
    body = _request_bytes()
    error = _call(channel, iter([_chunk(body, len(body))]), auth=False)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_sdk_stream_errors_carry_the_problem(server: ServeProcess) -> None:
    with (
        GrpcClient(server.grpc_target, api_key=KEY, stream_bytes=0) as client,
        pytest.raises(EvaluationError) as info,
    ):
        client.evaluate("cross_entropy", np.zeros((2, 3), np.float32), np.array([0, 5]))
    assert info.value.status == "INVALID_ARGUMENT"
    assert info.value.problem["status"] == 422


def test_streams_past_the_buffer_budget_are_unavailable_until_the_holder_ends(
    server: ServeProcess, channel: grpc.Channel
) -> None:
    release = threading.Event()

    def holding() -> Iterator[bytes]:
        yield _chunk(b"x" * 10, MAX_BODY)  # 2 MiB of the 3 MiB budget, held
        release.wait(10)

    stream = channel.stream_unary(METHOD, request_serializer=None, response_deserializer=None)
    holder = stream.future(holding(), timeout=30, metadata=AUTH)
    try:
        for _ in range(100):  # until the server holds the first stream's buffer
            error = _call(channel, iter([_chunk(b"y", MAX_BODY)]))
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                break
            time.sleep(0.05)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "CE_EVAL_MAX_BUFFERED_BYTES" in (error.details() or "")
        assert ("retry-after", "1") in (error.trailing_metadata() or ())
    finally:
        release.set()
    with pytest.raises(grpc.RpcError) as info:
        holder.result(timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # ended after 10 bytes
    logits = np.zeros((500, 1000), np.float32)  # 2 MB: the budget is free again
    with GrpcClient(server.grpc_target, api_key=KEY, stream_bytes=0) as client:
        assert client.evaluate("cross_entropy", logits, np.zeros(500, np.int64)).value == (
            pytest.approx(np.log(1000))
        )
