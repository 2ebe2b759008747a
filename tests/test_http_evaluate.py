"""POST /v1/evaluate and friends over the real app (httpx.ASGITransport), every status code."""

from __future__ import annotations

import base64
import logging

import httpx
import ml_dtypes
import numpy as np
import pytest

from service.config import Settings
from service.http.app import create_app
from service.logs import request_id_var
from tests.reference import softmax_ce

PROBLEM = "application/problem+json"
LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]
TARGETS = [0, 2]


def b64(array: np.ndarray, dtype: str) -> dict[str, object]:
    return {
        "dtype": dtype,
        "shape": list(array.shape),
        "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
    }


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["type"].startswith("urn:ce-eval:problem:")
    return body


async def test_evaluate_lists(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/evaluate",
        json={
            "loss": "cross_entropy",
            "logits": LOGITS,
            "targets": TARGETS,
            "outputs": ["grad", "per_sample"],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    per, den, _ = softmax_ce(np.array(LOGITS), np.array(TARGETS), fmt="index")
    assert body["value"] == pytest.approx(per.sum() / den.sum(), rel=1e-12)
    assert body["sum"] == pytest.approx(per.sum()) and body["denominator"] == 2.0
    assert body["count"] == 2 and body["ignored"] == 0
    assert body["reduction"] == "mean" and body["normalization"] == "valid"
    assert body["unit"] == "nats" and body["backend"] == "numpy"
    np.testing.assert_allclose(body["outputs"]["per_sample"], per, rtol=1e-12)
    assert np.array(body["outputs"]["grad"]).shape == (2, 3)
    assert body["elapsed_ms"] >= 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
async def test_evaluate_base64_in_and_out(client: httpx.AsyncClient, dtype: str) -> None:
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    logits = np.array(LOGITS).astype(np_dtype)
    r = await client.post(
        "/v1/evaluate",
        json={
            "loss": "cross_entropy",
            "logits": b64(logits, dtype),
            "targets": b64(np.array(TARGETS, dtype="<i4"), "int32"),
            "outputs": ["grad"],
            "tensor_encoding": "base64",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["compute_dtype"] == ("float64" if dtype == "float64" else "float32")
    grad = body["outputs"]["grad"]
    assert grad["shape"] == [2, 3] and grad["dtype"] == body["compute_dtype"]
    decoded = np.frombuffer(base64.b64decode(grad["data"]), dtype=grad["dtype"]).reshape(2, 3)
    z = logits.astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    onehot = np.eye(3)[TARGETS]
    np.testing.assert_allclose(decoded, (p - onehot) / 2, rtol=1e-5, atol=1e-6)


async def test_request_id_echoed_and_generated(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.get("/healthz")
    assert len(r.headers["x-request-id"]) == 32


async def test_a_500_carries_the_request_id_in_its_answer_and_its_log_line(
    settings: Settings,
) -> None:
    app = create_app(settings)
    ids: list[str] = []

    class Ids(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info:
                ids.append(request_id_var.get())

    handler = Ids()
    logging.getLogger().addHandler(handler)

    async def boom() -> None:
        raise RuntimeError("unexpected")

    app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/boom", headers={"X-Request-ID": "req-500"})
        assert r.status_code == 500
        assert r.headers["x-request-id"] == "req-500"
        assert r.headers["content-type"] == "application/problem+json"
        assert "unexpected" not in r.text  # no exception text to the client
        assert (await client.get("/healthz")).status_code == 200
    logging.getLogger().removeHandler(handler)
    assert ids == ["req-500"], "the exception is logged once, with the request's id"


async def test_a_request_id_cannot_split_a_header_or_a_log_line(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/healthz", headers={"X-Request-ID": "a b\x7fc\u00e9".encode("latin-1")})
    assert r.headers["x-request-id"] == "a\\x20b\\x7fc\\xe9"


async def test_health_ready_losses_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json()["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    catalog = (await client.get("/v1/losses")).json()["losses"]
    ce = next(item for item in catalog if item["name"] == "cross_entropy")
    assert ce["defaults"]["reduction"] == "mean" and ce["defaults"]["ignore_index"] == -100
    assert "label_smoothing" in ce["options_schema"]["properties"]
    assert "grad" in ce["outputs"]
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    asset = docs.text.split('src="')[1].split('"')[0]
    js = await client.get(asset)
    assert js.status_code == 200 and len(js.content) > 100_000
    schema = (await client.get("/openapi.json")).json()
    request = schema["components"]["schemas"]["EvaluateRequest"]
    assert "cross_entropy" in request["properties"]["loss"]["enum"]
    assert "CrossEntropyOptions" in schema["components"]["schemas"]


async def test_400_malformed_json(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    body = assert_problem(await client.post("/v1/evaluate", content=b"{bad", headers=headers), 400)
    assert body["errors"][0]["type"] == "json_invalid"
    assert_problem(await client.post("/v1/evaluate", content=b"", headers=headers), 400)
    assert_problem(await client.post("/v1/evaluate", content=b"[1, 2]", headers=headers), 400)


async def test_400_deeply_nested_json_is_rejected_fast() -> None:
    app = create_app(Settings(max_body_bytes=1024 * 1024, log_level="warning"))
    deep = b'{"loss": "cross_entropy", "logits": ' + b"[" * 150_000 + b"]" * 150_000 + b"}"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        r = await c.post("/v1/evaluate", content=deep, headers={"content-type": "application/json"})
    body = assert_problem(r, 400)
    assert "recursion" in str(body["detail"]).lower() or "depth" in str(body["detail"]).lower()


async def test_413_from_content_length(client: httpx.AsyncClient) -> None:
    big = b"{" + b" " * (64 * 1024 + 10) + b"}"
    r = await client.post("/v1/evaluate", content=big, headers={"content-type": "application/json"})
    body = assert_problem(r, 413)
    assert "exceeds the limit" in str(body["detail"])


async def test_413_while_streaming_without_content_length(client: httpx.AsyncClient) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(100):
            yield b" " * 1024

    r = await client.post(
        "/v1/evaluate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    assert_problem(r, 413)


async def test_413_too_many_elements(client: httpx.AsyncClient) -> None:
    data = {"dtype": "float32", "shape": [1000, 1000], "data": ""}
    r = await client.post(
        "/v1/evaluate", json={"loss": "cross_entropy", "logits": data, "targets": [0]}
    )
    body = assert_problem(r, 413)
    assert body["errors"][0]["loc"] == ["logits"]


async def test_415_media_type(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/evaluate",
        content=b"loss=x",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert_problem(r, 415)
    r = await client.post("/v1/evaluate", content=b"{}")
    assert_problem(r, 415)


@pytest.mark.parametrize(
    ("payload", "loc", "fragment"),
    [
        ({"logits": LOGITS, "targets": TARGETS}, ["loss"], "required"),
        ({"loss": "cross_entropy", "targets": TARGETS}, ["logits"], "required"),
        ({"loss": "nope", "logits": LOGITS, "targets": TARGETS}, ["loss"], "unknown loss"),
        (
            {"loss": "cross_entropy", "logits": LOGITS, "targets": [0, 7]},
            ["targets", 1],
            "out of range",
        ),
        (
            {"loss": "cross_entropy", "logits": [[1.0, 2.0], [3.0]], "targets": [0, 1]},
            ["logits"],
            "rectangular",
        ),
        ({"loss": "cross_entropy", "logits": [["a", "b"]], "targets": [0]}, ["logits"], "numbers"),
        (
            {
                "loss": "cross_entropy",
                "logits": LOGITS,
                "targets": TARGETS,
                "options": {"reduction": "avg"},
            },
            ["options", "reduction"],
            "mean",
        ),
        (
            {
                "loss": "cross_entropy",
                "logits": LOGITS,
                "targets": TARGETS,
                "options": {"label_smoothing": 2},
            },
            ["options", "label_smoothing"],
            "1",
        ),
        (
            {"loss": "cross_entropy", "logits": LOGITS, "targets": TARGETS, "outputs": ["x"]},
            ["outputs", 0],
            "unknown output 'x' for cross_entropy",
        ),
        (
            {"loss": "cross_entropy", "logits": LOGITS, "targets": TARGETS, "extra": 1},
            ["extra"],
            "not permitted",
        ),
        (
            {
                "loss": "cross_entropy",
                "logits": {"dtype": "float32", "shape": [2, 3], "data": "!!notbase64"},
                "targets": TARGETS,
            },
            ["logits", "data"],
            "base64",
        ),
        (
            {
                "loss": "cross_entropy",
                "logits": {
                    "dtype": "float32",
                    "shape": [2, 3],
                    "data": base64.b64encode(b"1234").decode(),
                },
                "targets": TARGETS,
            },
            ["logits", "data"],
            "bytes",
        ),
        (
            {
                "loss": "cross_entropy",
                "logits": {"dtype": "complex64", "shape": [1], "data": ""},
                "targets": TARGETS,
            },
            ["logits", "dtype"],
            "unknown dtype",
        ),
        (
            {
                "loss": "cross_entropy",
                "logits": {"dtype": "float32", "shape": [-1, 3], "data": ""},
                "targets": TARGETS,
            },
            ["logits", "shape", 0],
            ">= 0",
        ),
        (
            {
                "loss": "cross_entropy",
                "logits": b64(np.array([[1.0, np.nan, 0.0]], dtype="<f4"), "float32"),
                "targets": [0],
            },
            ["logits", 0, 1],
            "nan",
        ),
        (
            {"loss": "cross_entropy", "logits": LOGITS, "targets": TARGETS, "backend": "tpu"},
            ["backend"],
            "auto",
        ),
        (
            {"loss": "cross_entropy", "logits": LOGITS, "targets": TARGETS, "sample_weight": [1.0]},
            ["sample_weight"],
            "shape",
        ),
    ],
)
async def test_422_validation(
    client: httpx.AsyncClient, payload: dict[str, object], loc: list[object], fragment: str
) -> None:
    r = await client.post("/v1/evaluate", json=payload)
    body = assert_problem(r, 422)
    errors = body["errors"]
    assert isinstance(errors, list)
    assert any(e["loc"] == loc for e in errors), errors
    assert fragment.lower() in str(body).lower()


async def test_422_echo_is_truncated(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/evaluate",
        json={"loss": "cross_entropy", "logits": LOGITS, "targets": TARGETS, "outputs": "x" * 5000},
    )
    body = assert_problem(r, 422)
    echoed = body["errors"][0]["input"]
    assert isinstance(echoed, str) and len(echoed) <= 120


async def test_422_cupy_unavailable_is_precondition(client: httpx.AsyncClient) -> None:
    from ce_engine.backend import cupy_status

    if cupy_status()[0] is not None:
        pytest.skip("a CUDA device is present")
    r = await client.post(
        "/v1/evaluate",
        json={"loss": "cross_entropy", "logits": LOGITS, "targets": TARGETS, "backend": "cupy"},
    )
    body = assert_problem(r, 422)
    assert body["errors"][0]["loc"] == ["backend"]


async def test_404_and_405(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/nothing"), 404)
    assert_problem(await client.get("/v1/evaluate"), 405)


async def test_nd_logits_class_axis_over_http(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 3, 4))  # (N, C, d) PyTorch layout, classes on axis 1
    y = rng.integers(0, 3, size=(2, 4))
    r = await client.post(
        "/v1/evaluate",
        json={
            "loss": "cross_entropy",
            "logits": z.tolist(),
            "targets": y.tolist(),
            "options": {"class_axis": 1, "reduction": "none"},
            "outputs": ["per_sample", "grad"],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    rows = np.moveaxis(z, 1, -1).reshape(-1, 3)
    per, _, _ = softmax_ce(rows, y.reshape(-1), fmt="index")
    assert body["value"] is None
    np.testing.assert_allclose(np.array(body["outputs"]["per_sample"]).reshape(-1), per, rtol=1e-12)
    assert np.array(body["outputs"]["grad"]).shape == (2, 3, 4)


async def test_finite_float64_sum_of_float32_logits_is_answered(client: httpx.AsyncClient) -> None:
    """float32 [[3e38, -3e38]], target 1: ℓ = 6e38 overflows float32, not the float64 sum
    (was 200 with value and sum null)."""
    z = np.array([[3e38, -3e38]], np.float32)
    r = await client.post(
        "/v1/evaluate",
        json={"loss": "cross_entropy", "logits": b64(z, "float32"), "targets": [1]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    exact = 2 * float(np.float32(3e38))
    assert body["sum"] == pytest.approx(exact, rel=1e-12) and body["value"] == body["sum"]
    assert "non_finite" not in body


async def test_non_finite_result_is_a_located_422_or_listed(client: httpx.AsyncClient) -> None:
    """Target mass on a -inf logit: ℓ = +inf. raise → 422 non_finite_result at the position;
    propagate and omit answer 200 and list the position (never a silent null)."""
    z = np.array([[0.5, 1.0, 0.0], [0.0, -np.inf, 1.0]], np.float32)
    body = {"loss": "cross_entropy", "logits": b64(z, "float32"), "targets": [0, 1]}
    problem = assert_problem(await client.post("/v1/evaluate", json=body), 422)
    assert problem["type"] == "urn:ce-eval:problem:non-finite-result"
    assert problem["errors"][0]["loc"] == ["logits", 1]
    assert problem["errors"][0]["type"] == "non_finite_result"
    assert "-inf" in problem["errors"][0]["msg"]
    listed = {"count": 1, "positions": [[1]]}
    propagated = await client.post(
        "/v1/evaluate", json={**body, "options": {"nan_policy": "propagate"}}
    )
    assert propagated.status_code == 200, propagated.text
    assert propagated.json()["non_finite"] == listed
    omitted = await client.post("/v1/evaluate", json={**body, "options": {"nan_policy": "omit"}})
    assert omitted.status_code == 200, omitted.text
    got = omitted.json()
    assert got["non_finite"] == listed and got["count"] == 1 and got["ignored"] == 1
    per, _, _ = softmax_ce(z[:1].astype(np.float64), np.array([0]), fmt="index")
    assert got["value"] == pytest.approx(per[0], rel=1e-6)


async def test_weights_overflowing_float64_name_the_field(client: httpx.AsyncClient) -> None:
    body = {"loss": "cross_entropy", "logits": [[0.0, 0.0], [0.0, 0.0]], "targets": [0, 1]}
    problem = assert_problem(
        await client.post("/v1/evaluate", json={**body, "sample_weight": [1e308, 1e308]}), 422
    )
    assert problem["errors"][0]["loc"] == ["sample_weight"]
    assert problem["errors"][0]["type"] == "weight_overflow"
    problem = assert_problem(
        await client.post("/v1/evaluate", json={**body, "options": {"weight": [1e308, 1e308]}}),
        422,
    )
    assert problem["errors"][0]["loc"] == ["options", "weight"]


@pytest.mark.parametrize(
    ("loss", "logits", "targets", "loc"),
    [
        ("cross_entropy", [[1.7, 1.7, 1.7]], [0], ["logits", 0, 0]),  # was 1e-7
        ("binary_cross_entropy", [[-0.2]], [[1.0]], ["logits", 0, 0]),  # was 16.1
        ("cross_entropy", [[0.5, 0.4, 0.05]], [0], ["logits", 0]),  # sums to 0.95
    ],
)
async def test_probability_inputs_outside_their_range_are_422(
    client: httpx.AsyncClient, loss: str, logits: list, targets: list, loc: list
) -> None:
    body = {
        "loss": loss,
        "logits": logits,
        "targets": targets,
        "options": {"input_kind": "probabilities"},
    }
    problem = assert_problem(await client.post("/v1/evaluate", json=body), 422)
    assert problem["errors"][0]["loc"] == loc


@pytest.mark.parametrize(
    ("field", "value", "msg"),
    [
        ("logits", [[1.0, 2.0], [3.0]], "logits[1] has length 1, logits[0] has length 2"),
        ("logits", [[1.0], [2.0, 3.0]], "logits[1] has length 2, logits[0] has length 1"),
        (
            "logits",
            [[[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0]]],
            "logits[1] has length 2, logits[0] has length 1",
        ),
        (
            "logits",
            [[[1.0, 2.0]], [[3.0]]],
            "logits[1][0] has length 1, logits[0][0] has length 2",
        ),
        ("logits", [[1.0, 2.0], 3.0], "logits[1] is a number, logits[0] is a list of length 2"),
        ("logits", [[1.0, [2.0]], [3.0, 4.0]], "logits[0][1] is a list, logits[0][0] is a number"),
        ("targets", [[0], [1, 0]], "targets[1] has length 2, targets[0] has length 1"),
    ],
)
async def test_ragged_lists_say_which_row_has_which_length(
    client: httpx.AsyncClient, field: str, value: object, msg: str
) -> None:
    body: dict[str, object] = {
        "loss": "cross_entropy",
        "logits": [[1.0, 2.0], [3.0, 4.0]],
        "targets": [0, 1],
        field: value,
    }
    problem = assert_problem(await client.post("/v1/evaluate", json=body), 422)
    error = problem["errors"][0]  # type: ignore[index]
    assert error["loc"] == [field]
    assert error["type"] == "ragged"
    assert error["msg"] == f"not a rectangular array: {msg}"
    assert "inhomogeneous" not in repr(problem)


async def test_an_answer_over_max_response_bytes_is_refused_before_the_work() -> None:
    """1024×256 float32 logits asking for the full Hessian: 67M elements, over 1.5 GB as JSON
    lists. 413 naming the output and what to ask for instead; hessian_diag fits."""
    app = create_app(Settings(database_url="sqlite://", max_response_bytes=64 * 2**20))
    logits = np.zeros((1024, 256), np.float32)
    body = {
        "loss": "cross_entropy",
        "logits": b64(logits, "float32"),
        "targets": [0] * 1024,
        "outputs": ["hessian"],
        "tensor_encoding": "list",
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/v1/evaluate", json=body)
        problem = assert_problem(r, 413)
        error = problem["errors"][0]  # type: ignore[index]
        assert error["loc"] == ["outputs", "hessian"]
        assert "hessian_diag" in error["msg"] and "hvp" in error["msg"]
        # 1024·256·256 elements × 16 bytes as lists, well over 64 MiB.
        assert "1024.0 MiB" in error["msg"]
        ok = await client.post("/v1/evaluate", json={**body, "outputs": ["hessian_diag"]})
        assert ok.status_code == 200
        assert len(ok.content) < 64 * 2**20


def test_response_estimate_counts_each_output_in_its_encoding() -> None:
    from service.dataplane.evaluate import estimated_response_bytes

    z = np.zeros((10, 4), np.float64)
    sizes = estimated_response_bytes(z, {}, ["loss", "grad", "per_sample", "hessian"], "base64")
    assert sizes == {
        "grad": 40 * 8 * 4 // 3,
        "per_sample": 10 * 8 * 4 // 3,
        "hessian": 160 * 32 // 3,
    }
    assert estimated_response_bytes(z.astype(np.float32), {}, ["grad"], "raw") == {"grad": 160}


async def test_a_request_cancelled_at_the_end_of_the_shutdown_grace_gets_503() -> None:
    """uvicorn cancels what still runs when ``CE_EVAL_SHUTDOWN_GRACE_S`` is over: the answer is
    503 + Retry-After (another replica can take the request), not uvicorn's 500."""
    import asyncio

    from service.http.middleware import RequestContextMiddleware

    started = asyncio.Event()

    async def endless(scope: object, receive: object, send: object) -> None:
        started.set()
        await asyncio.sleep(3600)

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/evaluate", "headers": []}
    task = asyncio.create_task(RequestContextMiddleware(endless)(scope, receive, send))  # type: ignore[arg-type]
    await started.wait()
    task.cancel()
    await task
    assert sent[0]["status"] == 503
    headers = dict(sent[0]["headers"])  # type: ignore[arg-type]
    assert headers[b"retry-after"] == b"1" and b"x-request-id" in headers
    assert b"shut down" in sent[1]["body"]  # type: ignore[operator]
