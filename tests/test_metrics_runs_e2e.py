"""Runs of the new metric families end to end: random splits of one data set pushed as batches
by two client processes, to one `ce-eval serve` on a SQLite file or to two replicas on one
PostgreSQL database, equal one stateless evaluation of the whole data set. Metrics binned in
runs (AUROC, average precision, curves) are compared with the same binning: the state of that
one evaluation. Losses: the sigmoid ones (``binary_cross_entropy``, sigmoid ``focal`` on
(N, d, L) logits with soft labels and one threshold per label), ``cross_entropy``, and
``linear_cross_entropy``, whose batches carry rows of features and the same weight and bias
(the longer batches span several row chunks)."""

from __future__ import annotations

import base64
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import ce_engine
from ce_engine.metrics import (
    BINARY_METRICS,
    LINEAR_METRICS,
    RANKING_METRICS,
    SOFTMAX_METRICS,
)
from tests.servers import PostgresCluster, ServerProcess
from tests.test_metrics_binary import assert_nested_close

CASES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "binary_cross_entropy": (list(BINARY_METRICS), {"n_thresholds": 50, "threshold": 0.4}),
    "focal": (
        list(BINARY_METRICS),
        {"variant": "sigmoid", "gamma": 1.5, "n_thresholds": 50, "threshold": [0.3, 0.5, 0.7]},
    ),
    "cross_entropy": (list(SOFTMAX_METRICS), {"n_thresholds": 50, "top_k": [1, 2]}),
    # 65536 // C = 32 rows per chunk: the longer batches and the whole set span several chunks
    "linear_cross_entropy": (list(LINEAR_METRICS), {"top_k": [1, 5], "chunk_elements": 1}),
}


def data_set(loss: str, n: int = 300) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(tensors with one row per example, split into batches; tensors every batch carries)."""
    rng = np.random.default_rng(len(loss))
    sample_weight = rng.uniform(0.5, 2.0, size=n)
    if loss == "linear_cross_entropy":
        features = rng.standard_normal((n, 8))
        shared = {"weight": rng.standard_normal((2048, 8)), "bias": rng.standard_normal(2048)}
        logits = features @ shared["weight"].T + shared["bias"]
        # the class ranked 0..7 by the logits, so top-1 and top-5 accuracy are far from 0 and 1
        ranked = np.argsort(-logits, axis=1)
        targets = ranked[np.arange(n), rng.integers(0, 8, size=n)]
        rows = {"features": features, "targets": targets, "sample_weight": sample_weight}
        return rows, shared
    if loss == "focal":
        logits = rng.standard_normal((n, 2, 3)) * 2
        targets = (rng.random((n, 2, 3)) < 1 / (1 + np.exp(-logits))).astype(np.float64)
        soft = rng.random((n, 2, 3)) < 0.2
        targets[soft] = rng.uniform(0.1, 0.9, size=int(soft.sum()))
        targets[..., 2] = 0.0  # a label without positives
        return {"logits": logits, "targets": targets, "sample_weight": sample_weight}, {}
    logits = rng.standard_normal((n, 4)) * 2
    if loss == "binary_cross_entropy":
        targets = (rng.random((n, 4)) < 1 / (1 + np.exp(-logits))).astype(np.float64)
        targets[:, 3] = 0.0  # a label without positives
    else:
        targets = rng.integers(0, 4, size=n)
    return {"logits": logits, "targets": targets, "sample_weight": sample_weight}, {}


def _tensor(array: np.ndarray) -> dict[str, Any]:
    contiguous = np.ascontiguousarray(array)
    return {
        "dtype": contiguous.dtype.name,
        "shape": list(contiguous.shape),
        "data": base64.b64encode(contiguous.tobytes()).decode(),
    }


def push(url: str, run_id: str, batches: list[tuple[str, dict[str, np.ndarray]]]) -> list[int]:
    """Runs in a client process: POST each batch (base64 tensors); returns the status codes."""
    statuses = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for batch_id, batch in batches:
            body = {"batch_id": batch_id, **{k: _tensor(v) for k, v in batch.items()}}
            statuses.append(client.post(f"/v1/runs/{run_id}/batches", json=body).status_code)
    return statuses


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def servers(request: pytest.FixtureRequest, tmp_path: Path, serve: Any) -> list[ServerProcess]:
    """One server on a SQLite file, or two replicas on one PostgreSQL database."""
    if request.param == "sqlite":
        return [serve(f"sqlite:///{tmp_path / 'runs.db'}").start()]
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    database = cluster.create_database()
    first = serve(database).start()  # migrates first; the second finds the schema in place
    return [first, serve(database).start()]


@pytest.mark.parametrize("loss", list(CASES))
def test_two_processes_pushing_random_splits_equal_one_evaluation(
    servers: list[ServerProcess], loss: str
) -> None:
    names, options = CASES[loss]
    whole, shared = data_set(loss)
    n = len(whole["sample_weight"])
    run = httpx.post(
        f"{servers[0].url}/v1/runs",
        json={"name": "split", "loss": loss, "options": options, "metrics": names},
    )
    assert run.status_code == 201, run.text
    run_id = run.json()["id"]
    rng = np.random.default_rng(17)
    order = rng.permutation(n)  # random rows per batch, random batch sizes
    cuts = sorted(rng.choice(np.arange(1, n), size=11, replace=False).tolist())
    batches = [
        (f"b{i:02d}", {**{k: v[order[a:b]] for k, v in whole.items()}, **shared})
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, n], strict=True))
    ]
    halves = [batches[0::2], batches[1::2]]
    urls = [servers[i % len(servers)].url for i in range(2)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        statuses = list(pool.map(push, urls, [run_id] * 2, halves))
    assert all(s == 200 for part in statuses for s in part), statuses

    got = httpx.get(f"{servers[-1].url}/v1/runs/{run_id}").json()
    one = ce_engine.evaluate(
        loss,
        whole.get("logits"),
        whole["targets"],
        options=options,
        metrics=names,
        sample_weight=whole["sample_weight"],
        backend="numpy",
        features=whole.get("features"),
        **shared,
    )
    assert one.metric_state is not None
    assert got["batches"] == len(batches) and got["count"] == one.count
    assert got["value"] == pytest.approx(one.value, rel=1e-12)
    exact = json.loads(json.dumps(one.metrics))
    binned = json.loads(json.dumps(one.metric_state.compute()))
    curves = {"roc_curve", "pr_curve"} & set(binned)  # served by the detail endpoint only
    assert set(got["metrics"]) == set(binned) - curves
    for name in curves:
        detail = httpx.get(f"{servers[0].url}/v1/runs/{run_id}/metrics/{name}").json()
        assert detail["classes"] == list(range(got["num_classes"]))
        got["metrics"][name] = detail["value"]
    for name, value in got["metrics"].items():
        want = binned[name] if name in RANKING_METRICS or name == "warnings" else exact[name]
        if name == "warnings":  # GET run warns about what it answers: not the curves
            want = [w for w in want if w["metric"] not in curves]
        assert_nested_close(value, want, rtol=1e-9, where=name)


def push_labelled(url: str, run_id: str, batches: list[dict[str, Any]]) -> list[int]:
    """Runs in a client process: POST each JSON batch body; returns the status codes."""
    with httpx.Client(base_url=url, timeout=60) as client:
        return [client.post(f"/v1/runs/{run_id}/batches", json=b).status_code for b in batches]


def test_intervals_and_slices_are_the_same_from_two_processes_as_from_one_batch(
    servers: list[ServerProcess],
) -> None:
    """Random splits pushed by two processes (two replicas on PostgreSQL) give the intervals
    and slices of the whole set pushed as one batch (float sums to 1e-12: addition order)."""
    rng = np.random.default_rng(23)
    n = 240
    logits, targets = rng.standard_normal((n, 6)) * 2, rng.integers(0, 6, n)
    ids = [f"row-{i}" for i in range(n)]
    lang = [["en", "de", "fr", "ja"][i] for i in rng.integers(0, 4, n)]
    config = {
        "loss": "cross_entropy",
        "metrics": ["accuracy", "top_k_accuracy", "nll", "brier", "ece"],
        "options": {"top_k": [1, 3]},
        "confidence": {"replicates": 100, "seed": 11},
        "slice_keys": ["lang"],
    }

    def body(batch_id: str, rows: Any) -> dict[str, Any]:
        return {
            "batch_id": batch_id,
            "logits": logits[rows].tolist(),
            "targets": targets[rows].tolist(),
            "example_ids": [ids[i] for i in rows],
            "slices": {"lang": [lang[i] for i in rows]},
        }

    run_ids = []
    for name in ("split", "whole"):
        created = httpx.post(f"{servers[0].url}/v1/runs", json={"name": name, **config})
        assert created.status_code == 201, created.text
        run_ids.append(created.json()["id"])
    order = rng.permutation(n)
    cuts = sorted(rng.choice(np.arange(1, n), size=9, replace=False).tolist())
    parts = [order[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    batches = [body(f"b{i}", part) for i, part in enumerate(parts)]
    urls = [servers[i % len(servers)].url for i in range(2)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        statuses = list(
            pool.map(push_labelled, urls, [run_ids[0]] * 2, [batches[0::2], batches[1::2]])
        )
    assert all(s == 200 for part in statuses for s in part), statuses
    assert push_labelled(servers[0].url, run_ids[1], [body("all", np.arange(n))]) == [200]

    split, whole = (httpx.get(f"{servers[-1].url}/v1/runs/{r}").json() for r in run_ids)
    assert split["fingerprint"] == whole["fingerprint"] and split["paired_ids"] is True
    assert set(split["intervals"]) >= {"value", "accuracy", "top_k_accuracy.3", "ece", "brier"}
    assert_nested_close(split["intervals"], whole["intervals"], rtol=1e-12, where="intervals")
    pages = [
        httpx.get(f"{servers[0].url}/v1/runs/{r}/slices", params={"key": "lang", "sort": "slice"})
        for r in run_ids
    ]
    split_page, whole_page = (page.json() for page in pages)
    assert [r["slice"] for r in split_page["slices"]] == ["ja", "fr", "en", "de"]
    assert_nested_close(split_page["slices"], whole_page["slices"], rtol=1e-12, where="slices")
