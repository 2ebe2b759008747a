"""The new metric families over every transport: REST JSON, REST protobuf, gRPC and OIP v2,
stateless and in runs (one app serving REST in process and gRPC on a free port, SQLite file).

Metrics responses hold nulls (undefined AUROC), nested dicts (``{macro, per_class}``), lists of
dicts (curves, ``warnings``): each transport must carry them unchanged. Values are checked
against scikit-learn once here; the families' own tests check them in depth.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
from sklearn.metrics import f1_score, roc_auc_score

import ce_engine
from ce_engine.metrics import BINARY_METRICS, SOFTMAX_METRICS
from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.proto import (
    PROTOBUF_MEDIA_TYPE,
    batch_to_proto,
    create_run_to_proto,
    request_to_proto,
    response_from_proto,
    run_from_proto,
)
from tests.test_grpc_runs import Stack, _stack, details, rpc_error
from tests.test_metrics_binary import assert_nested_close

RNG = np.random.default_rng(1700)
N, L = 48, 4
Z = (RNG.integers(-4, 5, size=(N, L)) / 2.0).astype(np.float64)  # ties
Y = (RNG.random((N, L)) < 0.4).astype(np.float64)
Y[:, 2] = 0.0  # a label with no positives: null AUROC, warnings
W = RNG.uniform(0.5, 2.0, size=N)
BCE_OPTIONS = {"threshold": [0.5, 0.3, 0.5, 0.7], "n_thresholds": 9}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async for value in _stack(tmp_path):
        yield value


def engine_metrics(loss: str, z: np.ndarray, y: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    return ce_engine.evaluate(loss, z, y, backend="numpy", **kwargs).metrics


def check_bce_against_sklearn(m: dict[str, Any]) -> None:
    defined = [0, 1, 3]
    want = roc_auc_score(Y[:, defined], Z[:, defined], average=None, sample_weight=W)
    got = [m["auroc"]["per_class"][i] for i in defined]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert m["auroc"]["per_class"][2] is None
    pred = 1 / (1 + np.exp(-Z)) > np.asarray(BCE_OPTIONS["threshold"])
    assert m["macro_f1"] == pytest.approx(
        f1_score(Y, pred, average="macro", sample_weight=W, zero_division=0), rel=1e-12
    )
    assert {w["metric"] for w in m["warnings"]} == {
        "auroc",
        "average_precision",
        "roc_curve",
        "pr_curve",
    }


async def test_rest_json_and_protobuf_carry_binary_metrics(stack: Stack) -> None:
    body = {
        "loss": "binary_cross_entropy",
        "logits": Z.tolist(),
        "targets": Y.tolist(),
        "sample_weight": W.tolist(),
        "options": BCE_OPTIONS,
        "metrics": list(BINARY_METRICS),
    }
    answer = await stack.rest.post("/v1/evaluate", json=body)
    assert answer.status_code == 200, answer.text
    metrics = answer.json()["metrics"]
    assert list(metrics) == [*BINARY_METRICS, "warnings"]
    check_bce_against_sklearn(metrics)
    expected = engine_metrics(
        "binary_cross_entropy", Z, Y, sample_weight=W, options=BCE_OPTIONS, metrics=BINARY_METRICS
    )
    assert_nested_close(metrics, orjson.loads(orjson.dumps(expected)), rtol=0)

    message = request_to_proto(
        "binary_cross_entropy",
        Z,
        Y,
        sample_weight=W,
        options=BCE_OPTIONS,
        metrics=list(BINARY_METRICS),
    )
    answer = await stack.rest.post(
        "/v1/evaluate",
        content=message.SerializeToString(),
        headers={"content-type": PROTOBUF_MEDIA_TYPE},
    )
    assert answer.status_code == 200, answer.text
    decoded = response_from_proto(pb.EvaluateResponse.FromString(answer.content))
    assert_nested_close(decoded["metrics"], metrics, rtol=0)  # Struct: nulls, nesting, lists


async def test_grpc_evaluate_carries_softmax_ranking_metrics(stack: Stack) -> None:
    z = RNG.standard_normal((60, 3)) * 2
    y = RNG.integers(0, 3, size=60)
    message = request_to_proto("cross_entropy", z, y, metrics=list(SOFTMAX_METRICS))
    decoded = response_from_proto(await stack.stub.Evaluate(message))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert decoded["metrics"]["auroc"]["macro"] == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr"), abs=1e-12
    )
    expected = engine_metrics("cross_entropy", z, y, metrics=SOFTMAX_METRICS)
    assert_nested_close(decoded["metrics"], orjson.loads(orjson.dumps(expected)), rtol=0)


@pytest.mark.parametrize("as_list", [False, True])
async def test_oip_metrics_parameter(stack: Stack, as_list: bool) -> None:
    names = ["auroc", "average_precision", "f1", "confusion_matrix", "roc_curve"]
    request = {
        "inputs": [
            {"name": "logits", "datatype": "FP64", "shape": [N, L], "data": Z.ravel().tolist()},
            {"name": "targets", "datatype": "FP64", "shape": [N, L], "data": Y.ravel().tolist()},
            {"name": "sample_weight", "datatype": "FP64", "shape": [N], "data": W.tolist()},
        ],
        "parameters": {**BCE_OPTIONS, "metrics": names if as_list else ",".join(names)},
    }
    answer = await stack.rest.post("/v2/models/binary_cross_entropy/infer", json=request)
    assert answer.status_code == 200, answer.text
    (output,) = [o for o in answer.json()["outputs"] if o["name"] == "metrics"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1]
    metrics = orjson.loads(output["data"][0])
    expected = engine_metrics(
        "binary_cross_entropy", Z, Y, sample_weight=W, options=BCE_OPTIONS, metrics=names
    )
    assert_nested_close(metrics, orjson.loads(orjson.dumps(expected)), rtol=0)
    assert metrics["auroc"]["per_class"][2] is None and metrics["warnings"]


async def test_unsupported_metric_is_422_on_every_transport(stack: Stack) -> None:
    names = ["auroc", "top_k_accuracy"]
    offers = f"binary_cross_entropy offers: {', '.join(BINARY_METRICS)}"
    body = {"loss": "binary_cross_entropy", "logits": Z.tolist(), "targets": Y.tolist()}
    answer = await stack.rest.post("/v1/evaluate", json={**body, "metrics": names})
    assert answer.status_code == 422
    [error] = answer.json()["errors"]
    assert error["loc"] == ["metrics", 1] and error["msg"].endswith(offers)

    message = request_to_proto("binary_cross_entropy", Z, Y, metrics=names)
    answer = await stack.rest.post(
        "/v1/evaluate",
        content=message.SerializeToString(),
        headers={"content-type": PROTOBUF_MEDIA_TYPE},
    )
    assert answer.status_code == 422

    failure = await rpc_error(stack.stub.Evaluate(message))
    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(failure)[0][0]["loc"] == ["metrics", 1]

    oip = {
        "inputs": [
            {"name": "logits", "datatype": "FP64", "shape": [N, L], "data": Z.ravel().tolist()},
            {"name": "targets", "datatype": "FP64", "shape": [N, L], "data": Y.ravel().tolist()},
        ],
        "parameters": {"metrics": names},
    }
    answer = await stack.rest.post("/v2/models/binary_cross_entropy/infer", json=oip)
    assert answer.status_code == 422

    run = {"name": "r", "loss": "focal", "options": {"variant": "softmax"}, "metrics": ["f1"]}
    assert (await stack.rest.post("/v1/runs", json=run)).status_code == 201
    run["metrics"] = ["f1", "subset_accuracy"]
    answer = await stack.rest.post("/v1/runs", json=run)
    assert answer.status_code == 422
    assert answer.json()["errors"][0]["loc"] == ["body", "metrics", 1]
    assert "top_k_accuracy" in answer.json()["detail"]  # what softmax focal offers


async def test_binary_run_over_rest_and_grpc_equals_one_evaluation(stack: Stack) -> None:
    """Random splits pushed over REST and gRPC into one run: exact metrics equal one stateless
    evaluation, ranking metrics equal the binned state of that evaluation (same bins)."""
    created = await stack.rest.post(
        "/v1/runs",
        json={
            "name": "multi-label",
            "loss": "binary_cross_entropy",
            "options": BCE_OPTIONS,
            "metrics": list(BINARY_METRICS),
        },
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    cuts = sorted(RNG.choice(np.arange(1, N), size=4, replace=False).tolist())
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, N], strict=True)):
        if i % 2:
            await stack.stub.AddBatch(batch_to_proto(run_id, f"b{i}", Z[a:b], Y[a:b], W[a:b]))
        else:
            batch = {"logits": Z[a:b].tolist(), "targets": Y[a:b].tolist()}
            answer = await stack.rest.post(
                f"/v1/runs/{run_id}/batches",
                json={"batch_id": f"b{i}", **batch, "sample_weight": W[a:b].tolist()},
            )
            assert answer.status_code == 200, answer.text
            assert "macro" in answer.json()["batch"]["metrics"]["auroc"]  # summary scalar only
    whole = ce_engine.evaluate(
        "binary_cross_entropy", Z, Y, sample_weight=W, options=BCE_OPTIONS, metrics=BINARY_METRICS
    )
    assert whole.metric_state is not None
    curves = ("roc_curve", "pr_curve")  # GET run leaves them to the detail endpoint
    binned = orjson.loads(orjson.dumps(whole.metric_state.compute()))
    rest_run = (await stack.rest.get(f"/v1/runs/{run_id}")).json()
    grpc_run = run_from_proto(await stack.stub.GetRun(pb.GetRunRequest(run_id=run_id)))
    for name in curves:
        detail = (await stack.rest.get(f"/v1/runs/{run_id}/metrics/{name}")).json()
        assert_nested_close(detail["value"], binned.pop(name), rtol=1e-12, where=name)
    binned["warnings"] = [w for w in binned["warnings"] if w["metric"] not in curves]
    assert_nested_close(rest_run["metrics"], binned, rtol=1e-12)
    assert_nested_close(grpc_run["metrics"], rest_run["metrics"], rtol=0)
    exact = orjson.loads(orjson.dumps(whole.metrics))
    for name in BINARY_METRICS:
        if name not in ("auroc", "average_precision", "roc_curve", "pr_curve"):
            assert_nested_close(rest_run["metrics"][name], exact[name], rtol=1e-12, where=name)


async def test_grpc_create_run_with_binary_metrics(stack: Stack) -> None:
    message = create_run_to_proto(
        "g", "focal", options={"variant": "sigmoid"}, metrics=["auroc", "hamming_loss"]
    )
    run = run_from_proto(await stack.stub.CreateRun(message))
    assert run["metrics_requested"] == ["auroc", "hamming_loss"]
    await stack.stub.AddBatch(batch_to_proto(run["id"], "one", Z, Y))
    got = run_from_proto(await stack.stub.GetRun(pb.GetRunRequest(run_id=run["id"])))
    assert got["metrics"]["auroc"]["per_class"][2] is None
    assert got["metrics"]["hamming_loss"] == pytest.approx(
        np.mean((1 / (1 + np.exp(-Z)) > 0.5) != Y), rel=1e-12
    )


async def test_linear_cross_entropy_metrics_over_protobuf_grpc_and_oip(stack: Stack) -> None:
    """features / weight / bias travel as tensors of their own on every transport."""
    x = RNG.standard_normal((30, 5))
    w = RNG.standard_normal((7, 5))
    b = RNG.standard_normal(7)
    y = RNG.integers(0, 7, size=30)
    names = ["accuracy", "top_k_accuracy", "nll", "perplexity", "entropy", "ece", "brier"]
    linear = {"features": x, "weight": w, "bias": b}
    options = {"chunk_elements": 21, "top_k": [1, 3]}
    expected = orjson.loads(
        orjson.dumps(
            ce_engine.evaluate(
                "linear_cross_entropy", None, y, options=options, metrics=names, **linear
            ).metrics
        )
    )
    z = x @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert expected["nll"] == pytest.approx(-np.log(p[np.arange(30), y]).mean(), rel=1e-12)

    answer = await stack.rest.post(
        "/v1/evaluate",
        json={
            "loss": "linear_cross_entropy",
            "targets": y.tolist(),
            **{k: v.tolist() for k, v in linear.items()},
            "options": options,
            "metrics": names,
        },
    )
    assert answer.status_code == 200, answer.text
    assert_nested_close(answer.json()["metrics"], expected, rtol=0)

    message = request_to_proto(
        "linear_cross_entropy", None, y, options=options, metrics=names, **linear
    )
    answer = await stack.rest.post(
        "/v1/evaluate",
        content=message.SerializeToString(),
        headers={"content-type": PROTOBUF_MEDIA_TYPE},
    )
    assert answer.status_code == 200, answer.text
    decoded = response_from_proto(pb.EvaluateResponse.FromString(answer.content))
    assert_nested_close(decoded["metrics"], expected, rtol=0)
    decoded = response_from_proto(await stack.stub.Evaluate(message))
    assert_nested_close(decoded["metrics"], expected, rtol=0)

    inputs = [
        {"name": name, "datatype": "FP64", "shape": list(v.shape), "data": v.ravel().tolist()}
        for name, v in linear.items()
    ]
    inputs.append({"name": "targets", "datatype": "INT64", "shape": [30], "data": y.tolist()})
    answer = await stack.rest.post(
        "/v2/models/linear_cross_entropy/infer",
        json={"inputs": inputs, "parameters": {**options, "metrics": names}},
    )
    assert answer.status_code == 200, answer.text
    (output,) = [o for o in answer.json()["outputs"] if o["name"] == "metrics"]
    assert_nested_close(orjson.loads(output["data"][0]), expected, rtol=0)
