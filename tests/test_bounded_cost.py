"""Bounded cost per request: error lists and echoes of client input are capped, option sizes
that would turn a small request into a long Python loop are refused or floored, and run
listings take a bounded number of tag filters."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
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


async def test_200k_unknown_option_keys_give_a_small_body(client: httpx.AsyncClient) -> None:
    options = {f"opt{i}": 1 for i in range(200_000)}
    r = await client.post("/v1/evaluate", json={**BODY, "options": options})
    assert r.status_code == 422
    assert len(r.content) < 16 * 1024
    body = r.json()
    assert len(body["errors"]) == 20
    assert body["errors_total"] == 200_000
    assert body["errors"][0]["type"] == "unknown_option"
    assert "200000 errors in all" in body["detail"]


async def test_few_errors_have_no_count(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/evaluate", json={**BODY, "options": {"bogus": 1}})
    assert r.status_code == 422
    assert len(r.json()["errors"]) == 1 and "errors_total" not in r.json()


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


