"""Binary REST (application/x-protobuf), OIP v2 edge cases and the async SDK, in process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import orjson
import pytest
from fastapi import FastAPI, Request

from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.proto import PROTOBUF_MEDIA_TYPE, request_to_proto
from ce_eval_client.sdk import AsyncClient, EvaluationError
from service.config import Settings
from service.dataplane.buffers import BufferBudget
from service.errors import MalformedBody, Unavailable
from service.http.app import create_app
from service.http.bodies import LARGE_BODY_BYTES, read_body
from tests.reference import softmax_ce

RNG = np.random.default_rng(11)
PB = {"content-type": PROTOBUF_MEDIA_TYPE}


def _body(**kwargs: object) -> bytes:
    logits = kwargs.pop("logits", RNG.standard_normal((3, 4)).astype(np.float32))
    targets = kwargs.pop("targets", np.array([0, 1, 3]))
    return request_to_proto("cross_entropy", logits, targets, **kwargs).SerializeToString()  # type: ignore[arg-type]


def _non_finite_option(path: tuple[str, ...], value: float) -> bytes:
    """A Struct option holding NaN/±inf (protobuf allows it, JSON and our options do not)."""
    message = request_to_proto("cross_entropy", np.zeros((1, 2), np.float32), np.zeros(1, int))
    if len(path) == 1:
        message.options[path[0]] = value
    else:
        message.options.get_or_create_struct(path[0])[path[1]] = value
    return message.SerializeToString()


async def test_protobuf_in_protobuf_out(client: httpx.AsyncClient) -> None:
    logits = RNG.standard_normal((3, 4)).astype(np.float32)
    response = await client.post(
        "/v1/evaluate", content=_body(logits=logits, outputs=["per_sample"]), headers=PB
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == PROTOBUF_MEDIA_TYPE
    answer = pb.EvaluateResponse.FromString(response.content)
    per, den, _ = softmax_ce(logits.astype(np.float64), np.array([0, 1, 3]), fmt="index")
    assert answer.value == pytest.approx(per.sum() / den.sum(), rel=1e-6)
    per_sample = np.frombuffer(answer.outputs["per_sample"].data, np.float32)
    assert answer.outputs["per_sample"].dtype == "float32"
    np.testing.assert_allclose(per_sample, per, rtol=1e-5)


async def test_protobuf_in_json_out_when_accept_asks(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/evaluate", content=_body(), headers={**PB, "accept": "application/json"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["count"] == 3


async def test_json_in_protobuf_out_when_accept_asks(client: httpx.AsyncClient) -> None:
    request = {"loss": "cross_entropy", "logits": [[0.0, 1.0], [2.0, 0.5]], "targets": [1, 0]}
    response = await client.post(
        "/v1/evaluate", json=request, headers={"accept": PROTOBUF_MEDIA_TYPE}
    )
    assert response.status_code == 200
    assert pb.EvaluateResponse.FromString(response.content).denominator == 2.0


@pytest.mark.parametrize(
    ("body", "status", "loc"),
    [
        (b"\xff\xff\xff", 400, ["body"]),
        (b"", 400, None),
        (_body(targets=np.array([0, 1, 4])), 422, ["targets", 2]),
        (_body(options={"reduction": "avg"}), 422, ["options", "reduction"]),
        (_non_finite_option(("temperature",), float("nan")), 422, ["options", "temperature"]),
        (_non_finite_option(("temperature",), float("-inf")), 422, ["options", "temperature"]),
        (_non_finite_option(("x", "y"), float("inf")), 422, ["options", "x", "y"]),
    ],
    ids=["garbage", "empty", "label", "option", "nan", "-inf", "nested-inf"],
)
async def test_protobuf_bad_input_is_a_problem(
    client: httpx.AsyncClient, body: bytes, status: int, loc: list[object] | None
) -> None:
    response = await client.post("/v1/evaluate", content=body, headers=PB)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    if loc is not None:
        assert response.json()["errors"][0]["loc"] == loc


async def test_other_media_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/evaluate", content=b"x", headers={"content-type": "application/x-msgpack"}
    )
    assert response.status_code == 415


async def test_oip_metadata_and_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2")).json()["extensions"] == ["binary_tensor_data"]
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200
    meta = (await client.get("/v2/models/cross_entropy")).json()
    assert meta["name"] == "cross_entropy" and {o["name"] for o in meta["outputs"]} >= {
        "loss",
        "grad",
    }
    outputs = {o["name"]: o["datatype"] for o in meta["outputs"]}
    assert outputs["metrics"] == outputs["non_finite"] == "BYTES"
    assert "auroc" in meta["parameters"]["metrics"]
    linear = (await client.get("/v2/models/linear_cross_entropy")).json()
    assert [i["name"] for i in linear["inputs"]][:3] == ["features", "targets", "weight"]
    assert (await client.get("/v2/models/cross_entropy/versions/1/ready")).status_code == 200
    missing = await client.get("/v2/models/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def _oip(inputs: list[dict[str, object]], **extra: object) -> dict[str, object]:
    return {"inputs": inputs, **extra}


LOGITS = {"name": "logits", "datatype": "FP32", "shape": [2, 2], "data": [0.0, 1.0, 2.0, 0.5]}
TARGETS = {"name": "targets", "datatype": "INT64", "shape": [2], "data": [1, 0]}


async def test_oip_json_tensors(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v2/models/cross_entropy/infer",
        json=_oip([LOGITS, TARGETS], id="r1", parameters={"reduction": "sum"}),
    )
    assert response.status_code == 200
    body = response.json()
    per, _, _ = softmax_ce(np.array([[0.0, 1.0], [2.0, 0.5]]), np.array([1, 0]), fmt="index")
    assert body["id"] == "r1" and body["outputs"][0]["name"] == "loss"
    assert body["outputs"][0]["data"][0] == pytest.approx(per.sum(), rel=1e-6)
    assert body["parameters"]["reduction"] == "sum"


@pytest.mark.parametrize(
    ("request_body", "headers", "status", "loc"),
    [
        (_oip([{**LOGITS, "datatype": "BYTES"}, TARGETS]), {}, 422, ["inputs", 0, "datatype"]),
        (_oip([{**LOGITS, "name": "x"}, TARGETS]), {}, 422, ["inputs", 0, "name"]),
        (_oip([{**LOGITS, "data": [1.0]}, TARGETS]), {}, 422, ["inputs", 0, "data"]),
        (_oip([LOGITS, {**TARGETS, "data": [1, 7]}]), {}, 422, ["targets", 1]),
        (_oip([LOGITS, TARGETS], parameters={"gamma_x": 1}), {}, 422, ["options", "gamma_x"]),
        (
            _oip([{**LOGITS, "parameters": {"binary_data_size": 64}}, TARGETS]),
            {"inference-header-content-length": "0"},
            400,
            ["header", "inference-header-content-length"],
        ),
        (
            _oip([{**LOGITS, "data": None, "parameters": {"binary_data_size": 64}}, TARGETS]),
            {},
            422,
            ["inputs", 0, "parameters", "binary_data_size"],
        ),
    ],
    ids=["bytes-type", "unknown-input", "short-data", "label", "option", "header", "size"],
)
async def test_oip_bad_input(
    client: httpx.AsyncClient,
    request_body: dict[str, object],
    headers: dict[str, str],
    status: int,
    loc: list[object],
) -> None:
    content = orjson.dumps(request_body)
    if headers.get("inference-header-content-length") == "0":
        headers = {"inference-header-content-length": str(len(content) + 1)}
    response = await client.post("/v2/models/cross_entropy/infer", content=content, headers=headers)
    assert response.status_code == status
    body = response.json()
    assert body["errors"][0]["loc"] == loc and body["error"]


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.mark.parametrize("transport", ["protobuf", "oip", "base64"])
async def test_async_client(app: FastAPI, transport: str) -> None:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    logits = RNG.standard_normal((5, 3)).astype(np.float32)
    targets = np.array([0, 2, 1, 1, 0])
    async with AsyncClient(transport=transport, http=http) as client:  # type: ignore[arg-type]
        result = await client.evaluate("cross_entropy", logits, targets, outputs=["per_sample"])
        per, den, _ = softmax_ce(logits.astype(np.float64), targets, fmt="index")
        assert result.value == pytest.approx(per.sum() / den.sum(), rel=1e-6)
        np.testing.assert_allclose(result.outputs["per_sample"], per, rtol=1e-5)
        with pytest.raises(EvaluationError) as info:
            await client.evaluate("cross_entropy", logits, targets, options={"eps": 2})
        assert info.value.status == 422 and info.value.errors[0]["loc"] == ["options", "eps"]


async def test_openapi_documents_protobuf_and_oip(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    body = schema["paths"]["/v1/evaluate"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", PROTOBUF_MEDIA_TYPE}
    assert "/v2/models/{loss}/infer" in schema["paths"]


@pytest.fixture
async def big_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    settings = Settings(
        max_body_bytes=64 * 1024 * 1024,
        max_elements=10_000_000,
        log_level="warning",
        database_url=f"sqlite:///{tmp_path / 'ce-eval.db'}",
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.mark.parametrize("transport", ["protobuf", "oip", "base64"])
async def test_large_bodies_arrive_whole(big_app: FastAPI, transport: str) -> None:
    """Bodies over LARGE_BODY_BYTES, sent in 1 MiB pieces, are read into one buffer."""
    logits = RNG.standard_normal((1100, 1000)).astype(np.float32)  # 4.4 MB
    assert logits.nbytes > LARGE_BODY_BYTES
    targets = RNG.integers(0, 1000, size=1100)
    targets[7] = 999
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=big_app), base_url="http://test")
    async with AsyncClient(transport=transport, http=http) as client:  # type: ignore[arg-type]
        result = await client.evaluate("cross_entropy", logits, targets, outputs=["per_sample"])
    per, den, _ = softmax_ce(logits.astype(np.float64), targets, fmt="index")
    assert result.value == pytest.approx(per.sum() / den.sum(), rel=1e-6)
    np.testing.assert_allclose(result.outputs["per_sample"], per, rtol=1e-4)


LIMIT = 8 * 1024 * 1024


async def _read(
    declared: int | bytes,
    parts: list[bytes],
    *more_headers: tuple[bytes, bytes],
    budget: BufferBudget | None = None,
) -> bytes | memoryview:
    messages = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    length = declared if isinstance(declared, bytes) else b"%d" % declared
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", length), *more_headers],
        "app": SimpleNamespace(
            state=SimpleNamespace(
                settings=Settings(max_body_bytes=LIMIT),
                dataplane=SimpleNamespace(buffers=budget or BufferBudget(LIMIT)),
            )
        ),
    }
    return await read_body(Request(scope, receive))


async def test_read_body_fills_one_read_only_buffer() -> None:
    parts = [bytes([i]) * (LARGE_BODY_BYTES // 3 + i) for i in range(4)]
    body = await _read(sum(map(len, parts)), parts)
    assert isinstance(body, memoryview) and body.readonly
    assert bytes(body) == b"".join(parts)
    small = await _read(5, [b"ab", b"cde"])
    assert small == b"abcde"
    odd = await _read("²".encode("latin-1"), [b"ab"])  # isdigit() but not int(): read as is
    assert odd == b"ab"


@pytest.mark.parametrize(
    ("declared", "headers"),
    [
        (LARGE_BODY_BYTES, [(b"content-length", b"7")]),  # two lengths: which one holds?
        (LARGE_BODY_BYTES, [(b"transfer-encoding", b"chunked")]),  # framed by chunks
        (b"0" * 4990 + b"7", []),  # beyond int()'s 4300 digits
        (LIMIT + 1, []),  # over the body limit: never allocated
    ],
    ids=["two-lengths", "chunked", "4991-digits", "over-the-limit"],
)
async def test_read_body_reads_doubtful_lengths_as_framed(
    declared: int | bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Only one plain Content-Length within the limit sizes the buffer; else the chunks."""
    body = await _read(declared, [b"abc", b"defg"], *headers)
    assert body == b"abcdefg"


@pytest.mark.parametrize(("extra", "message"), [(1, "longer than"), (-1, "ended after")])
async def test_read_body_rejects_a_body_unlike_its_content_length(extra: int, message: str) -> None:
    parts = [b"x" * LARGE_BODY_BYTES, b"y" * 10]
    with pytest.raises(MalformedBody, match=message):
        await _read(LARGE_BODY_BYTES + 10 - extra, parts)


async def test_read_body_is_503_when_the_buffer_budget_is_spent() -> None:
    budget = BufferBudget(LARGE_BODY_BYTES + 5)
    held = await _read(LARGE_BODY_BYTES, [b"x" * LARGE_BODY_BYTES], budget=budget)
    assert budget.held == LARGE_BODY_BYTES
    with pytest.raises(Unavailable, match="CE_EVAL_MAX_BUFFERED_BYTES") as info:
        await _read(LARGE_BODY_BYTES, [b"y" * LARGE_BODY_BYTES], budget=budget)
    assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "1"
    del held  # the last view of the first body: its bytes go back
    assert budget.held == 0
    assert len(await _read(LARGE_BODY_BYTES, [b"z" * LARGE_BODY_BYTES], budget=budget)) > 0


@pytest.mark.parametrize("transport", ["protobuf", "oip", "base64", "json"])
async def test_sdk_sends_big_endian_arrays(app: FastAPI, transport: str) -> None:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    logits = RNG.standard_normal((5, 3)).astype(">f8")
    targets = np.array([0, 2, 1, 1, 0], dtype=">i8")
    async with AsyncClient(transport=transport, http=http) as client:  # type: ignore[arg-type]
        result = await client.evaluate("cross_entropy", logits, targets, outputs=["per_sample"])
    per, den, _ = softmax_ce(logits.astype(np.float64), targets.astype(np.int64), fmt="index")
    assert result.value == pytest.approx(per.sum() / den.sum(), rel=1e-12)
    np.testing.assert_allclose(result.outputs["per_sample"], per, rtol=1e-12)
