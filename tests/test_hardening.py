"""Backpressure (503), API keys (401/403/429), graceful shutdown, codec fuzzing."""

from __future__ import annotations

import base64
import signal
import threading
import time
from collections.abc import AsyncIterator

import anyio
import httpx
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.codecs.tensors import decode_tensor
from service.config import Settings
from service.errors import PayloadTooLarge, ServiceError, ValidationFailed
from service.http.app import create_app
from tests.servers import serving as serve

BODY = {"loss": "cross_entropy", "logits": [[1.0, 2.0, 0.5]], "targets": [1]}


def make_client(**overrides: object) -> httpx.AsyncClient:
    app = create_app(Settings(log_level="warning", **overrides))  # type: ignore[arg-type]
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    client.app = app  # type: ignore[attr-defined]
    return client


async def test_queue_full_is_503_with_retry_after() -> None:
    async with make_client(max_inflight=1) as client:
        admission = client.app.state.dataplane.admission  # type: ignore[attr-defined]
        with admission.admit():  # one evaluation in flight
            r = await client.post("/v1/evaluate", json=BODY)
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["errors"][0]["type"] == "queue_full"
        assert (await client.post("/v1/evaluate", json=BODY)).status_code == 200
        assert admission.inflight == 0


async def test_draining_refuses_and_readyz_503() -> None:
    async with make_client() as client:
        client.app.state.dataplane.admission.draining = True  # type: ignore[attr-defined]
        assert (await client.get("/readyz")).status_code == 503
        r = await client.post("/v1/evaluate", json=BODY)
        assert r.status_code == 503 and r.json()["errors"][0]["type"] == "draining"
        assert (await client.get("/healthz")).status_code == 200


async def test_api_keys() -> None:
    async with make_client(api_keys="k-one, k-two") as client:
        missing = await client.post("/v1/evaluate", json=BODY)
        assert missing.status_code == 401
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await client.post("/v1/evaluate", json=BODY, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 403
        bearer = await client.post(
            "/v1/evaluate", json=BODY, headers={"Authorization": "Bearer k-two"}
        )
        assert bearer.status_code == 200
        header = await client.post("/v1/evaluate", json=BODY, headers={"X-API-Key": "k-one"})
        assert header.status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # public by default
        assert (await client.get("/v1/losses")).status_code == 401


@pytest.mark.parametrize("keys", ["k\u00e9y1", "ok,tab\tkey", "caf\u00e9,x"])
def test_api_keys_outside_printable_ascii_are_refused_at_start_up(keys: str) -> None:
    """A header arrives as Latin-1 bytes: a UTF-8 key such as 'kéy1' could never match."""
    with pytest.raises(ValueError, match=r"CE_EVAL_API_KEYS: key \d holds .*printable ASCII"):
        Settings(api_keys=keys)


def test_printable_ascii_keys_are_accepted() -> None:
    assert Settings(api_keys="k-one, K_two!~").api_key_list() == ["k-one", "K_two!~"]


async def test_rate_limit_per_key_429() -> None:
    async with make_client(api_keys="a,b", rate_limit_per_s=0.5, rate_limit_burst=2) as client:
        codes = [
            (await client.get("/v1/losses", headers={"X-API-Key": "a"})).status_code
            for _ in range(3)
        ]
        assert codes == [200, 200, 429]
        limited = await client.get("/v1/losses", headers={"X-API-Key": "a"})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        # another key has its own bucket
        assert (await client.get("/v1/losses", headers={"X-API-Key": "b"})).status_code == 200


def test_sigterm_drains_inflight_and_readyz_turns_503() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1500, 8000)).astype("<f4")
    payload = {
        "loss": "cross_entropy",
        "logits": {
            "dtype": "float32",
            "shape": list(logits.shape),
            "data": base64.b64encode(logits.tobytes()).decode(),
        },
        "targets": rng.integers(0, 8000, size=1500).tolist(),
        "outputs": ["grad", "probabilities", "log_probabilities"],
        "tensor_encoding": "base64",
    }
    results: dict[str, int] = {}
    env = {
        "CE_EVAL_DRAIN_DELAY_S": "1.5",
        "CE_EVAL_MAX_BODY_BYTES": str(256 * 1024 * 1024),
        "CE_EVAL_MAX_RESPONSE_BYTES": str(256 * 1024 * 1024),  # three 48 MB outputs
    }
    with serve(env=env) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:

            def slow() -> None:
                results["slow"] = client.post("/v1/evaluate", json=payload).status_code

            worker = threading.Thread(target=slow)
            worker.start()
            deadline = time.monotonic() + 30
            while client.get("/readyz").json()["checks"]["inflight"].startswith("0/"):
                assert time.monotonic() < deadline, "the slow request never started"
                time.sleep(0.01)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            with httpx.Client(base_url=server.url, timeout=10) as other:
                assert other.get("/readyz").status_code == 503
                refused = other.post("/v1/evaluate", json=BODY)
                assert refused.status_code == 503 and "retry-after" in refused.headers
            worker.join(timeout=60)
        assert server.process.wait(timeout=30) == 0  # a clean drain exits 0
    assert results["slow"] == 200


# ---- codec fuzzing: any input → a decoded array or a 413/422, never anything else ----

DTYPES = [
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int32",
    "int64",
    "uint8",
    "bool",
    "complex64",
    "object",
    "",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(min_value=-3, max_value=2**40), max_size=6)
    | st.just("x")
    | st.lists(st.text(max_size=3), max_size=2),
    data=st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
    | st.text(max_size=20)
    | st.integers(),
)
@example(dtype="float32", shape=[0, 10**6, 10**6, 10**6, 10**6], data="")
def test_decode_tensor_fuzz(dtype: str, shape: object, data: object) -> None:
    try:
        array = decode_tensor({"dtype": dtype, "shape": shape, "data": data}, ("logits",), 10**6)
    except (ValidationFailed, PayloadTooLarge) as exc:
        assert exc.errors and exc.errors[0]["loc"][0] == "logits"
        return
    assert isinstance(array, np.ndarray) and list(array.shape) == shape


nested = st.recursive(
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**70), 2**70)
    | st.booleans()
    | st.text(max_size=2)
    | st.none(),
    lambda children: st.lists(children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=nested)
def test_decode_nested_fuzz(value: object) -> None:
    try:
        array = decode_tensor(value, ("targets",), 10**6)
    except (ValidationFailed, PayloadTooLarge) as exc:
        assert exc.errors[0]["loc"][0] == "targets"
        return
    assert array.dtype.kind in "biuf"


def test_shape_product_overflow_is_413_before_allocation() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_tensor(
            {"dtype": "float32", "shape": [2**62, 2**62, 16], "data": ""}, ("logits",), 10**6
        )


def test_huge_dimension_beside_a_zero_one_is_413() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_tensor(
            {"dtype": "float32", "shape": [0, 2**40, 2**40], "data": ""}, ("logits",), 10**6
        )


@pytest.mark.parametrize("bad", ["ab" * 1000, {"k": 1}, [3], 2.5, None, True, -1])
def test_bad_dimension_after_a_huge_one_is_a_short_422(bad: object) -> None:
    """Every dimension is type-checked before the product: no 500, no giant message."""
    with pytest.raises(ValidationFailed) as info:
        decode_tensor({"dtype": "float32", "shape": [10**9, bad], "data": ""}, ("logits",), 10**6)
    assert info.value.errors[0]["loc"] == ["logits", "shape", 1]
    assert len(str(info.value)) < 300


def test_too_many_elements_message_stays_short() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        decode_tensor({"dtype": "float32", "shape": [10**9] * 32, "data": ""}, ("logits",), 10**6)
    assert len(str(info.value)) < 400


async def test_per_request_compute_limit_is_413() -> None:
    rng = np.random.default_rng(0)
    linear = {
        "loss": "linear_cross_entropy",
        "features": rng.standard_normal((8, 16)).tolist(),
        "weight": rng.standard_normal((50, 16)).tolist(),
        "targets": rng.integers(0, 50, 8).tolist(),
    }
    hessian = {
        "loss": "cross_entropy",
        "logits": rng.standard_normal((4, 30)).tolist(),
        "targets": [0, 1, 2, 3],
        "outputs": ["hessian"],
    }
    # 8·50·16 = 6400 multiply-adds for the linear layer, 4·30·30 = 3600 for the Hessian
    async with make_client(max_work=5000) as client:
        over = await client.post("/v1/evaluate", json=linear)
        assert over.status_code == 413, over.text
        assert over.json()["errors"][0]["type"] == "too_much_work"
        assert (await client.post("/v1/evaluate", json=hessian)).status_code == 200
    async with make_client(max_work=3000) as client:
        over = await client.post("/v1/evaluate", json=hessian)
        assert over.status_code == 413 and over.json()["errors"][0]["loc"] == ["outputs"]
        plain = {**hessian, "outputs": ["loss"]}
        assert (await client.post("/v1/evaluate", json=plain)).status_code == 200
    async with make_client(max_work=7000) as client:
        assert (await client.post("/v1/evaluate", json=linear)).status_code == 200


async def test_one_key_cannot_take_every_compute_thread() -> None:
    """Key B keeps both compute threads busy with slow work; key A's request still gets a
    thread at once (B holds at most compute_threads − 1 of them, its other work waits)."""
    from service.dataplane.admission import current_principal
    from service.dataplane.evaluate import DataPlane

    dataplane = DataPlane(Settings(compute_threads=2, max_inflight=16))

    async def as_key(key: str, seconds: float) -> float:
        current_principal.set(key)  # each task has its own context
        started = time.monotonic()
        await dataplane.run_admitted(time.sleep, seconds)
        return time.monotonic() - started

    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(as_key, "key-b", 1.5)
        await anyio.sleep(0.2)  # B's work holds its share, the rest of it waits
        waited = await as_key("key-a", 0.0)
        assert waited < 0.5
        group.cancel_scope.cancel()


async def test_without_keys_the_whole_pool_is_shared() -> None:
    from service.dataplane.evaluate import DataPlane

    dataplane = DataPlane(Settings(compute_threads=2))
    started = time.monotonic()
    async with anyio.create_task_group() as group:
        for _ in range(2):
            group.start_soon(dataplane.run_admitted, time.sleep, 0.5)
    assert time.monotonic() - started < 0.9  # both ran at once: no per-key share with auth off


async def test_failed_authentication_is_throttled_per_client_address() -> None:
    async with make_client(api_keys="good-key", auth_failures_per_minute=3) as client:
        for _ in range(3):
            wrong = await client.post("/v1/evaluate", json=BODY, headers={"X-API-Key": "guess"})
            assert wrong.status_code == 403
        throttled = await client.post("/v1/evaluate", json=BODY, headers={"X-API-Key": "guess"})
        assert throttled.status_code == 429
        assert int(throttled.headers["retry-after"]) >= 1
        assert throttled.json()["errors"][0]["type"] == "auth_throttled"
        # While throttled, a valid key cannot be told from an invalid one.
        good = await client.post("/v1/evaluate", json=BODY, headers={"X-API-Key": "good-key"})
        assert good.status_code == 429


def test_the_failure_throttle_is_per_address_and_refills() -> None:
    from service.auth import Authenticator

    auth = Authenticator(["good-key"], failures_per_minute=60)  # one per second, burst 60
    for _ in range(60):
        with pytest.raises(ServiceError) as info:
            auth.authenticate("guess", "10.0.0.1")
        assert info.value.status_code == 403
    with pytest.raises(ServiceError) as info:
        auth.authenticate("good-key", "10.0.0.1")
    assert info.value.status_code == 429
    assert auth.authenticate("good-key", "10.0.0.2") is not None  # another address
    time.sleep(1.1)  # a token back
    assert auth.authenticate("good-key", "10.0.0.1") is not None


async def test_a_request_that_arrived_before_sigterm_completes_while_its_body_uploads() -> None:
    """Draining refuses new requests only: one whose headers came before the signal, with its
    body still uploading, is evaluated; the next one gets 503."""
    app = create_app(Settings(database_url="sqlite://"))
    admission = app.state.dataplane.admission
    body = orjson.dumps({**BODY, "sample_weight": [1.0] * len(BODY["targets"])})
    halfway = anyio.Event()
    resume = anyio.Event()

    async def upload() -> AsyncIterator[bytes]:
        yield body[:10]
        halfway.set()
        await resume.wait()
        yield body[10:]

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers: list[httpx.Response] = []

        async def slow() -> None:
            answers.append(
                await client.post(
                    "/v1/evaluate", content=upload(), headers={"content-type": "application/json"}
                )
            )

        async with anyio.create_task_group() as group:
            group.start_soon(slow)
            await halfway.wait()
            admission.draining = True  # what SIGTERM does
            resume.set()
        assert answers[0].status_code == 200, answers[0].text
        late = await client.post("/v1/evaluate", json=BODY)
        assert late.status_code == 503 and late.json()["errors"][0]["type"] == "draining"
