"""Runs of the new metric families end to end: random splits of one data set pushed as batches
by two client processes, to one `ce-eval serve` on a SQLite file or to two replicas on one
PostgreSQL database, equal one stateless evaluation of the whole data set. Metrics binned in
runs (AUROC, average precision, curves) are compared with the same binning: the state of that
one evaluation."""

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
from ce_engine.metrics import BINARY_METRICS, RANKING_METRICS, SOFTMAX_METRICS
from tests.servers import PostgresCluster, ServerProcess
from tests.test_metrics_binary import assert_nested_close

CASES = {
    "binary_cross_entropy": (list(BINARY_METRICS), {"n_thresholds": 50, "threshold": 0.4}),
    "cross_entropy": (list(SOFTMAX_METRICS), {"n_thresholds": 50, "top_k": [1, 2]}),
}


def data_set(loss: str, n: int = 300) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(loss))
    logits = rng.standard_normal((n, 4)) * 2
    if loss == "binary_cross_entropy":
        targets: np.ndarray = (rng.random((n, 4)) < 1 / (1 + np.exp(-logits))).astype(np.float64)
        targets[:, 3] = 0.0  # a label without positives
    else:
        targets = rng.integers(0, 4, size=n)
    return {"logits": logits, "targets": targets, "sample_weight": rng.uniform(0.5, 2.0, size=n)}


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
    whole = data_set(loss)
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
        (f"b{i:02d}", {k: v[order[a:b]] for k, v in whole.items()})
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
        whole["logits"],
        whole["targets"],
        options=options,
        metrics=names,
        sample_weight=whole["sample_weight"],
        backend="numpy",
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
