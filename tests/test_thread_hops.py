"""A request's work off the event loop takes one compute-thread hop: a large body is parsed in
the thread that then evaluates it (``/v1/evaluate``, a batch push in JSON or protobuf), not in a
hop of its own. Each hop costs two thread wake-ups and a second wait for a free compute thread
under load."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ce_eval_client.proto import PROTOBUF_MEDIA_TYPE, pb
from service.config import Settings
from service.dataplane.evaluate import INLINE_BODY_BYTES
from service.http.app import create_app
from tests.reference import softmax_ce

N, C = 64, 64  # 16 KiB of float32 logits: a body over INLINE_BODY_BYTES
RNG = np.random.default_rng(23)
LOGITS = RNG.standard_normal((N, C)).astype(np.float32)
TARGETS = RNG.integers(0, C, size=N)


def _b64(array: np.ndarray) -> dict[str, Any]:
    data = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": data}


def _reference() -> float:
    losses, shares, _ = softmax_ce(LOGITS.astype(np.float64), TARGETS, fmt="index")
    return float(losses.sum() / shares.sum())


@pytest.fixture
async def hops(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    """A client of the app, and the names of the functions its compute-thread hops ran."""
    settings = Settings(
        log_level="warning", backend="numpy", database_url=f"sqlite:///{tmp_path / 'h.db'}"
    )
    app = create_app(settings)
    ran: list[str] = []
    async with app.router.lifespan_context(app):
        dataplane = app.state.dataplane
        in_thread = dataplane.in_thread

        async def counted(fn: Callable[..., Any], *args: Any) -> Any:
            ran.append(getattr(fn, "__name__", repr(fn)))
            return await in_thread(fn, *args)

        dataplane.in_thread = counted
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, ran


async def test_a_large_evaluate_body_is_parsed_and_evaluated_in_one_hop(
    hops: tuple[httpx.AsyncClient, list[str]],
) -> None:
    client, ran = hops
    body = {"loss": "cross_entropy", "logits": _b64(LOGITS), "targets": _b64(TARGETS)}
    r = await client.post("/v1/evaluate", json=body)
    assert r.status_code == 200, r.text
    assert len(r.request.content) > INLINE_BODY_BYTES
    assert r.json()["value"] == pytest.approx(_reference(), rel=1e-6)
    assert len(ran) == 1, ran
    # Bad input parsed in that thread is still its 4xx, naming the field.
    r = await client.post(
        "/v1/evaluate",
        content=r.request.content[:-2],
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["errors"][0]["type"] == "json_invalid"


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
async def test_a_push_is_parsed_and_evaluated_in_one_hop(
    hops: tuple[httpx.AsyncClient, list[str]], encoding: str
) -> None:
    client, ran = hops
    r = await client.post("/v1/runs", json={"name": "h", "loss": "cross_entropy"})
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    ran.clear()
    if encoding == "json":
        batch = {"batch_id": "b0", "logits": _b64(LOGITS), "targets": _b64(TARGETS)}
        r = await client.post(f"/v1/runs/{run_id}/batches", json=batch)
    else:
        message = pb.AddBatchRequest(batch_id="b0")
        message.logits.dtype, message.logits.data = "float32", LOGITS.tobytes()
        message.logits.shape.extend(LOGITS.shape)
        message.targets.dtype, message.targets.data = "int64", TARGETS.astype(np.int64).tobytes()
        message.targets.shape.append(N)
        r = await client.post(
            f"/v1/runs/{run_id}/batches",
            content=message.SerializeToString(),
            headers={"content-type": PROTOBUF_MEDIA_TYPE},
        )
    assert r.status_code == 200, r.text
    assert r.json()["batch"]["value"] == pytest.approx(_reference(), rel=1e-6)
    assert len(ran) == 1, ran
    # A body that does not parse: the parse's 400 from that thread, and nothing counted.
    r = await client.post(
        f"/v1/runs/{run_id}/batches",
        content=b"\xff\x01" if encoding == "protobuf" else b'{"batch_id": ',
        headers={
            "content-type": PROTOBUF_MEDIA_TYPE if encoding == "protobuf" else "application/json"
        },
    )
    assert r.status_code == 400, r.text
    assert (await client.get(f"/v1/runs/{run_id}")).json()["batches"] == 1
