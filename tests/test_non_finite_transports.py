"""``non_finite`` (nan_policy propagate / omit) over binary REST and gRPC, as over REST JSON.

Expected positions and values come from a plain float64 cross-entropy written here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2_grpc as pb_grpc
from ce_eval_client.proto import PROTOBUF_MEDIA_TYPE, request_to_proto, response_from_proto
from ce_eval_client.sdk import Evaluation
from service.config import Settings
from tests.servers import in_process_stack

#: Row 1 has a NaN logit, row 3 puts its target on a -inf logit; rows 0, 2, 4 are finite.
LOGITS = np.array(
    [
        [0.5, 1.0, 0.0],
        [0.0, np.nan, 1.0],
        [2.0, -1.0, 0.5],
        [0.0, -np.inf, 1.0],
        [1.5, 0.25, -0.5],
    ],
    np.float32,
)
TARGETS = np.array([0, 2, 1, 1, 2])


def reference_losses(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ℓ_i = log Σ_c exp z_ic − z_{i,y_i} in float64 (NaN / inf where the inputs make it so)."""
    z = z.astype(np.float64)
    with np.errstate(all="ignore"):
        m = np.max(z, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
        return lse - z[np.arange(len(y)), y]


def expected(policy: str) -> tuple[list[list[int]], float]:
    """(non-finite positions, mean loss) of the reference under ``policy``."""
    losses = reference_losses(LOGITS, TARGETS)
    bad = ~np.isfinite(losses)
    positions = [[int(i)] for i in np.flatnonzero(bad)]
    with np.errstate(invalid="ignore"):
        value = float(losses[~bad].mean()) if policy == "omit" else float(losses.mean())
    return positions, value


def _message(policy: str) -> pb.EvaluateRequest:
    return request_to_proto("cross_entropy", LOGITS, TARGETS, options={"nan_policy": policy})


def _check(answer: dict[str, Any], policy: str) -> None:
    positions, value = expected(policy)
    assert positions == [[1], [3]]  # the reference itself: rows 1 and 3 are not finite
    assert answer["non_finite"] == {"count": len(positions), "positions": positions}
    if policy == "omit":
        assert answer["value"] == pytest.approx(value, rel=1e-6)
        assert answer["ignored"] == len(positions)
    else:
        assert np.isnan(answer["value"]) and np.isnan(value)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    async with in_process_stack(settings) as (_, rest, channel, _server):
        yield rest, pb_grpc.LossEvaluationStub(channel)


@pytest.mark.parametrize("policy", ["propagate", "omit"])
async def test_protobuf_rest_lists_non_finite_positions(
    stack: tuple[httpx.AsyncClient, Any], policy: str
) -> None:
    rest, _ = stack
    response = await rest.post(
        "/v1/evaluate",
        content=_message(policy).SerializeToString(),
        headers={"content-type": PROTOBUF_MEDIA_TYPE},
    )
    assert response.status_code == 200, response.content
    message = pb.EvaluateResponse.FromString(response.content)
    assert message.HasField("non_finite")
    _check(response_from_proto(message), policy)
    as_json = await rest.post(
        "/v1/evaluate",
        content=_message(policy).SerializeToString(),
        headers={"content-type": PROTOBUF_MEDIA_TYPE, "accept": "application/json"},
    )
    assert as_json.status_code == 200
    assert as_json.json()["non_finite"] == response_from_proto(message)["non_finite"]


@pytest.mark.parametrize("policy", ["propagate", "omit"])
async def test_grpc_evaluate_lists_non_finite_positions(
    stack: tuple[httpx.AsyncClient, Any], policy: str
) -> None:
    _, stub = stack
    message = await stub.Evaluate(_message(policy))
    assert message.HasField("non_finite")
    _check(response_from_proto(message), policy)
    positions, _ = expected(policy)
    evaluation = Evaluation.from_dict(response_from_proto(message))
    assert evaluation.non_finite == {"count": len(positions), "positions": positions}


async def test_finite_answers_carry_no_non_finite(stack: tuple[httpx.AsyncClient, Any]) -> None:
    _, stub = stack
    finite = np.delete(LOGITS, [1, 3], axis=0)
    message = await stub.Evaluate(
        request_to_proto(
            "cross_entropy", finite, TARGETS[[0, 2, 4]], options={"nan_policy": "omit"}
        )
    )
    assert not message.HasField("non_finite")
    assert "non_finite" not in response_from_proto(message)
    losses = reference_losses(finite, TARGETS[[0, 2, 4]])
    assert message.value == pytest.approx(float(losses.mean()), rel=1e-6)
