"""Metrics through ``POST /v1/evaluate`` (real app over ASGI): values vs sklearn, 422s."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from ce_engine.metrics import METRIC_NAMES
from tests.test_metrics import check_against_sklearn, softmax

RNG = np.random.default_rng(77)
Z = RNG.standard_normal((40, 5)) * 2
Y = RNG.integers(0, 5, size=40)
W = RNG.uniform(0.1, 2.0, size=40)

pytestmark = pytest.mark.filterwarnings("ignore:.k. .* greater than or equal to .n_classes.")


async def post(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    payload = {"loss": "cross_entropy", "logits": Z.tolist(), "targets": Y.tolist(), **body}
    return await client.post("/v1/evaluate", json=payload)


def error_locs(response: httpx.Response) -> list[list[Any]]:
    assert response.status_code == 422, response.text
    return [item["loc"] for item in response.json()["errors"]]


async def test_all_metrics_match_sklearn(client: httpx.AsyncClient) -> None:
    r = await post(
        client,
        sample_weight=W.tolist(),
        metrics=list(METRIC_NAMES),
        options={"top_k": [1, 3, 5]},
    )
    assert r.status_code == 200, r.text
    metrics = r.json()["metrics"]
    assert list(metrics) == list(METRIC_NAMES)
    check_against_sklearn(metrics, Y, softmax(Z), W)


@pytest.mark.parametrize("name", METRIC_NAMES)
async def test_each_metric_alone(client: httpx.AsyncClient, name: str) -> None:
    r = await post(client, metrics=[name], options={"log_base": 2, "top_k": [2]})
    assert r.status_code == 200, r.text
    metrics = r.json()["metrics"]
    assert list(metrics) == [name]
    check_against_sklearn(metrics, Y, softmax(Z), None, log_base="2")


async def test_unknown_metric_is_422(client: httpx.AsyncClient) -> None:
    r = await post(client, metrics=["accuracy", "roc_auc"])
    assert error_locs(r) == [["metrics", 1]]
    assert "roc_auc" in r.json()["errors"][0]["msg"]


async def test_top_k_above_num_classes_is_422(client: httpx.AsyncClient) -> None:
    r = await post(client, metrics=["top_k_accuracy"], options={"top_k": [1, 6]})
    assert error_locs(r) == [["options", "top_k", 1]]


async def test_confusion_matrix_over_class_limit_is_422(client: httpx.AsyncClient) -> None:
    r = await post(client, metrics=["confusion_matrix"], options={"max_confusion_classes": 3})
    assert error_locs(r) == [["metrics", 0]]
    assert "max_confusion_classes" in r.json()["errors"][0]["msg"]
    r = await post(client, metrics=["confusion_matrix"], options={"max_confusion_classes": 10**6})
    assert error_locs(r) == [["options", "max_confusion_classes"]]


async def test_label_metric_with_multi_hot_targets_is_422(client: httpx.AsyncClient) -> None:
    multi_hot = (RNG.random((40, 5)) < 0.3).tolist()
    r = await post(client, targets=multi_hot, metrics=["entropy", "accuracy"])
    assert error_locs(r) == [["metrics", 1]]
    r = await post(client, targets=multi_hot, metrics=["entropy", "nll", "brier"])
    assert r.status_code == 200, r.text


async def test_malformed_metrics_field_is_422(client: httpx.AsyncClient) -> None:
    r = await post(client, metrics="accuracy")
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"][0] == "metrics"


async def test_catalog_lists_metrics(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/losses")
    assert r.status_code == 200
    losses = {loss["name"]: loss for loss in r.json()["losses"]}
    ce = losses["cross_entropy"]
    assert ce["metrics"] == [*METRIC_NAMES, "auroc", "average_precision", "roc_curve", "pr_curve"]
    assert ce["defaults"]["max_confusion_classes"] == 1024
    bce = losses["binary_cross_entropy"]["metrics"]
    assert {"auroc", "average_precision", "subset_accuracy", "samples_f1"} <= set(bce)
    assert "top_k_accuracy" not in bce
    linear = losses["linear_cross_entropy"]["metrics"]
    assert {"accuracy", "top_k_accuracy", "nll", "perplexity", "entropy", "ece", "brier"} <= set(
        linear
    )
    assert "confusion_matrix" not in linear
    focal = losses["focal"]
    assert focal["metrics_by_variant"]["sigmoid"] == bce
    assert focal["metrics_by_variant"]["softmax"] == ce["metrics"]
    assert set(focal["metrics"]) == set(bce) | set(ce["metrics"])
    assert ce["metrics_by_variant"] is None
