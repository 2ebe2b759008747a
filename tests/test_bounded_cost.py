"""Bounded cost per request: error lists and echoes of client input are capped, option sizes
that would turn a small request into a long Python loop are refused or floored, and run
listings take a bounded number of tag filters."""

from __future__ import annotations

import base64
import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

import ce_engine
from service.config import Settings
from service.errors import ValidationFailed
from service.http.app import create_app

lce_module = importlib.import_module("ce_engine.losses.linear_cross_entropy")
MB = 1 << 20
BODY: dict[str, Any] = {"loss": "cross_entropy", "logits": [[1.0, 2.0, 0.5]], "targets": [1]}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'runs.db'}",
        max_body_bytes=16 * MB,
        log_level="warning",
        backend="numpy",
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c


# ---- errors: at most 20 items plus the count ----


async def test_65_unknown_option_keys_give_20_items_and_the_count(
    client: httpx.AsyncClient,
) -> None:
    options = {f"opt{i}": 1 for i in range(64)}
    r = await client.post("/v1/evaluate", json={**BODY, "options": options})
    assert r.status_code == 422
    body = r.json()
    assert len(body["errors"]) == 20
    assert body["errors_total"] == 64
    assert body["errors"][0]["type"] == "unknown_option"
    assert "64 errors in all" in body["detail"]


@pytest.mark.parametrize(
    ("field", "value", "cap"),
    [
        ("options", {f"opt{i}": 1 for i in range(200_000)}, 64),
        ("metrics", ["accuracy"] * 200_000, 64),
        ("outputs", ["loss"] * 200_000, 32),
    ],
)
async def test_name_lists_over_their_cap_are_one_error(
    client: httpx.AsyncClient, field: str, value: object, cap: int
) -> None:
    """200k option keys, metric or output names: one 422 item naming the cap, before any name
    is looked at (they cost a Python loop and an error message each)."""
    r = await client.post("/v1/evaluate", json={**BODY, field: value})
    assert r.status_code == 422
    body = r.json()
    assert len(r.content) < 4096
    assert [(e["loc"], e["type"]) for e in body["errors"]] == [([field], "too_long")]
    assert f"at most {cap} items" in body["errors"][0]["msg"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("options", {f"opt{i}": 1 for i in range(65)}), ("metrics", ["accuracy"] * 65)],
)
async def test_runs_cap_their_name_lists_too(
    client: httpx.AsyncClient, field: str, value: object
) -> None:
    r = await client.post("/v1/runs", json={"name": "r", "loss": "cross_entropy", field: value})
    assert r.status_code == 422
    assert [e["type"] for e in r.json()["errors"]] == ["too_long"]


async def test_few_errors_have_no_count(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/evaluate", json={**BODY, "options": {"bogus": 1}})
    assert r.status_code == 422
    assert len(r.json()["errors"]) == 1 and "errors_total" not in r.json()


@pytest.mark.parametrize(
    "request_fields",
    [
        {"options": {f"opt{i}": 1 for i in range(5000)}},
        {"metrics": [f"metric{i}" for i in range(5000)]},
        {"outputs": [f"output{i}" for i in range(5000)]},
    ],
    ids=["options", "metrics", "outputs"],
)
def test_unknown_names_get_at_most_20_guesses(
    monkeypatch: pytest.MonkeyPatch, request_fields: dict[str, Any]
) -> None:
    """The "did you mean" guess (a difflib search per name) is worked out for the first 20
    unknown names of a list only: every name is still reported and counted."""
    errors_module = importlib.import_module("ce_engine.errors")
    searches: list[str] = []
    real = errors_module.difflib.get_close_matches

    def counted(word: str, *args: Any, **kwargs: Any) -> list[str]:
        searches.append(word)
        return real(word, *args, **kwargs)

    monkeypatch.setattr(errors_module.difflib, "get_close_matches", counted)
    with pytest.raises(ce_engine.InputValidationError) as caught:
        ce_engine.evaluate(
            "cross_entropy", np.zeros((1, 3)), np.zeros(1, np.int64), **request_fields
        )
    assert len(caught.value.errors) == 5000
    assert len(searches) == 20


def test_grpc_error_details_are_capped() -> None:
    from google.rpc import error_details_pb2, status_pb2

    from service.grpc.server import ERRORS_METADATA_KEY, ERRORS_TOTAL_METADATA_KEY, error_trailers

    items = [{"loc": ["options", f"k{i}"], "msg": "unknown", "type": "x"} for i in range(500)]
    trailers = dict(error_trailers(ValidationFailed("bad", items)))
    assert len(orjson.loads(trailers[ERRORS_METADATA_KEY])) == 20
    assert trailers[ERRORS_TOTAL_METADATA_KEY] == "500"
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert len(bad_request.field_violations) == 20


# ---- echoes: client names cut to CE_EVAL_ECHO_MAX_CHARS with their length ----

LONG = "x" * MB
CLIPPED = f"'{'x' * 64}…' ({MB} characters)"


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"loss": LONG}, ["loss"]),
        ({"metrics": [LONG]}, ["metrics", 0]),
        ({"outputs": ["loss", LONG]}, None),
        ({"options": {LONG: 1}}, ["options", "x" * 64 + "…"]),
    ],
    ids=["loss", "metric", "output", "option-key"],
)
async def test_1mb_names_are_echoed_clipped(
    client: httpx.AsyncClient, patch: dict[str, Any], loc: list[Any] | None
) -> None:
    r = await client.post("/v1/evaluate", json={**BODY, **patch})
    assert r.status_code == 422, r.text[:300]
    assert len(r.content) < 16 * 1024
    assert "x" * 65 not in r.text
    body = r.json()
    if loc is not None:
        assert body["errors"][0]["loc"] == loc
        assert CLIPPED in body["errors"][0]["msg"]


def test_quoted_clips_with_length() -> None:
    from ce_engine.errors import quoted

    assert quoted("abc") == "'abc'"
    assert quoted("y" * 100, 4) == "'yyyy…' (100 characters)"
    assert quoted(LONG) == CLIPPED


async def test_echo_limit_is_a_setting(tmp_path: Path) -> None:
    app = create_app(Settings(log_level="warning", echo_max_chars=8, backend="numpy"))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            r = await c.post("/v1/evaluate", json={**BODY, "loss": "z" * 1000})
        assert r.status_code == 422
        assert "'zzzzzzzz…' (1000 characters)" in r.json()["errors"][0]["msg"]
    finally:
        ce_engine.errors.set_echo_max_chars(Settings().echo_max_chars)


async def test_1mb_run_id_and_tag_key_are_clipped(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/v1/runs/{'r' * 60_000}")
    assert r.status_code in (404, 422)
    assert len(r.content) < 16 * 1024
    run = {"name": "n", "loss": "cross_entropy", "tags": {"k" * MB: "v"}}
    r = await client.post("/v1/runs", json=run)
    assert r.status_code == 422
    assert len(r.content) < 16 * 1024
    assert "k" * 65 not in r.text


# ---- compute bombs: top_k lists and chunk sizes ----


@pytest.mark.parametrize(
    ("top_k", "needle"),
    [(list(range(1, 34)), "32"), ([1, 2, 2], "distinct"), ([0], "greater than or equal to 1")],
    ids=["too-many", "duplicate", "zero"],
)
async def test_top_k_list_is_bounded(
    client: httpx.AsyncClient, top_k: list[int], needle: str
) -> None:
    logits = [[float(j) for j in range(40)]]
    body = {**BODY, "logits": logits, "targets": [3], "metrics": ["top_k_accuracy"]}
    r = await client.post("/v1/evaluate", json={**body, "options": {"top_k": top_k}})
    assert r.status_code == 422, r.text[:300]
    error = r.json()["errors"][0]
    assert error["loc"][:2] == ["options", "top_k"]
    assert needle in error["msg"]


async def test_top_k_over_c_names_the_bound(client: httpx.AsyncClient) -> None:
    body = {**BODY, "metrics": ["top_k_accuracy"], "options": {"top_k": [1, 4]}}
    r = await client.post("/v1/evaluate", json=body)
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["options", "top_k", 1]
    assert "(3)" in r.json()["errors"][0]["msg"]


def test_top_k_accuracy_equals_float64_reference() -> None:
    rng = np.random.default_rng(7)
    n, c = 200, 50
    logits = rng.normal(size=(n, c))
    targets = rng.integers(0, c, size=n)
    ks = [1, 3, 5, 10, 32, 50]
    result = ce_engine.evaluate(
        "cross_entropy", logits, targets, metrics=["top_k_accuracy"], options={"top_k": ks}
    )
    got = result.metrics["top_k_accuracy"]
    # rank of the target = number of classes scoring strictly higher
    rank = (logits > logits[np.arange(n), targets][:, None]).sum(axis=1)
    for k in ks:
        assert got[str(k)] == pytest.approx(float(np.mean(rank < k)), abs=1e-12)


def test_chunk_elements_has_a_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """N = C = 2048, D = 1, chunk_elements 1: at most a few dozen chunks, and the same value."""
    n = c = 2048
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 1))
    w = rng.normal(size=(c, 1))
    t = rng.integers(0, c, size=n)
    calls = 0
    inner = lce_module.cross_entropy

    def counting(part: Any) -> Any:
        nonlocal calls
        calls += 1
        return inner(part)

    monkeypatch.setattr(lce_module, "cross_entropy", counting)
    result = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        t,
        features=x,
        weight=w,
        options={"chunk_elements": 1},
        outputs=["loss"],
    )
    assert calls <= n * c // lce_module.MIN_CHUNK_ELEMENTS + 1
    z = x @ w.T
    zmax = z.max(axis=1, keepdims=True)
    lse = (zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))).astype(np.float64)
    assert float(result.value) == pytest.approx(float(np.mean(lse - z[np.arange(n), t])), rel=1e-9)


# ---- tag filters ----


async def test_more_than_32_tag_filters_is_422(client: httpx.AsyncClient) -> None:
    params = [("tag", f"k{i}:v") for i in range(1100)]
    r = await client.get("/v1/runs", params=params)
    assert r.status_code == 422, r.text[:300]
    error = r.json()["errors"][0]
    assert error["loc"] == ["query", "tag"]
    assert "32" in error["msg"]
    ok = await client.get("/v1/runs", params=params[:32])
    assert ok.status_code == 200


# ---- C×C metrics count in the answer's size before the work ----------------------------


def _bounded_app(tmp_path: Path, limit: int) -> httpx.AsyncClient:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'runs.db'}", max_response_bytes=limit, backend="numpy"
    )
    app = create_app(settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def _b64_zeros(rows: int, classes: int) -> dict[str, object]:
    raw = np.zeros((rows, classes), np.float32).tobytes()
    return {"dtype": "float32", "shape": [rows, classes], "data": base64.b64encode(raw).decode()}


async def test_a_stateless_confusion_matrix_over_the_answer_limit_is_413(tmp_path: Path) -> None:
    """4096 classes: 16.8M cells, up to 25 JSON bytes each (400 MiB) > 64 MiB."""
    async with _bounded_app(tmp_path, 64 * 2**20) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        async with app.router.lifespan_context(app):
            body = {
                "loss": "cross_entropy",
                "logits": _b64_zeros(2, 4096),
                "targets": [0, 1],
                "metrics": ["confusion_matrix"],
                "options": {"max_confusion_classes": 4096},
            }
            r = await client.post("/v1/evaluate", json=body)
            assert r.status_code == 413, r.text
            assert r.json()["errors"][0]["loc"] == ["metrics", "confusion_matrix"]
            small = await client.post("/v1/evaluate", json={**body, "logits": _b64_zeros(2, 100)})
            assert small.status_code == 200
            binary = {  # multi-label: L·2·2 cells, however many labels
                "loss": "binary_cross_entropy",
                "logits": _b64_zeros(2, 4096),
                "targets": _b64_zeros(2, 4096),
                "metrics": ["confusion_matrix"],
            }
            assert (await client.post("/v1/evaluate", json=binary)).status_code == 200


async def test_a_wide_confusion_run_answers_each_push_in_a_few_kilobytes(
    tmp_path: Path,
) -> None:
    """A push answer holds scalars only, whatever C: at C = 2048 (a C² matrix would be about
    100 MiB of JSON) it is under 4 KB; the detail endpoint answers top=K, and the whole matrix
    over CE_EVAL_MAX_RESPONSE_BYTES is a 413 saying what to ask for."""
    async with _bounded_app(tmp_path, 16 * 2**20) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        async with app.router.lifespan_context(app):
            run = await client.post(
                "/v1/runs",
                json={
                    "name": "wide",
                    "loss": "cross_entropy",
                    "metrics": ["confusion_matrix"],
                    "options": {"max_confusion_classes": 4096},
                },
            )
            assert run.status_code == 201, run.text
            run_id = run.json()["id"]
            batch = {"batch_id": "b0", "logits": _b64_zeros(2, 2048), "targets": [0, 1]}
            pushed = await client.post(f"/v1/runs/{run_id}/batches", json=batch)
            assert pushed.status_code == 200, pushed.text
            assert len(pushed.content) < 4096
            url = f"/v1/runs/{run_id}/metrics/confusion_matrix"
            top = (await client.get(url, params={"top": 5})).json()["top"]
            assert top == [{"true": 1, "pred": 0, "count": 1.0}]  # zeros: argmax is class 0
            whole = await client.get(url)  # 2048² cells ≈ 48 MiB estimated, over 16 MiB
            assert whole.status_code == 413
            assert "top" in whole.json()["detail"] and "classes" in whole.json()["detail"]
