"""Runs with example ids, bootstrap intervals and slices (issue 18), over the real app on SQLite
and PostgreSQL.

References are written plainly here: the percentile interval of the replicate values
m_b = Σ_i w_ib x_i / Σ_i w_ib computed with NumPy from the examples' own correctness and
negative log-likelihood, with the weights w_ib of ``poisson_weights`` (their definition is
tested against a pure-Python generator in ``tests/test_bootstrap.py``); slice aggregates are
compared with a stateless evaluation of the slice's examples alone.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from ce_engine.metrics.bootstrap import example_id_hashes, poisson_weights
from tests import test_runs
from tests.test_runs import assert_close

api = test_runs.api  # the fixtures: the app on SQLite and on PostgreSQL
database_url = test_runs.database_url

C, B, SEED, LEVEL = 4, 64, 7, 0.9
LANGS = ["en", "de", "fr"]


def data(seed: int, n: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, C)) * 1.5
    targets = rng.integers(0, C, n)
    return {
        "logits": logits,
        "targets": targets,
        "ids": [f"ex-{seed}-{i}" for i in range(n)],
        "lang": [LANGS[i] for i in rng.integers(0, 3, n)],
    }


def batch_body(d: dict[str, Any], rows: slice | np.ndarray, batch_id: str) -> dict[str, Any]:
    idx = np.arange(len(d["ids"]))[rows]
    return {
        "batch_id": batch_id,
        "logits": d["logits"][idx].tolist(),
        "targets": d["targets"][idx].tolist(),
        "example_ids": [d["ids"][i] for i in idx],
        "slices": {"lang": [d["lang"][i] for i in idx]},
    }


def locs(response: httpx.Response) -> list[list[Any]]:
    """The error locations, without the ``body`` prefix some carry."""
    return [e["loc"][1:] if e["loc"][0] == "body" else e["loc"] for e in response.json()["errors"]]


async def new_run(api: httpx.AsyncClient, **fields: Any) -> str:
    body = {
        "name": "ci",
        "loss": "cross_entropy",
        "metrics": ["accuracy", "nll", "f1"],
        "confidence": {"replicates": B, "level": LEVEL, "seed": SEED},
        "slice_keys": ["lang"],
        **fields,
    }
    response = await api.post("/v1/runs", json=body)
    assert response.status_code == 201, response.text
    run_id: str = response.json()["id"]
    return run_id


async def push(api: httpx.AsyncClient, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post(f"/v1/runs/{run_id}/batches", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def reference(d: dict[str, Any], rows: np.ndarray | None = None) -> dict[str, list[float]]:
    """Plain Poisson bootstrap of accuracy and mean NLL over the examples ``rows``."""
    z, y = d["logits"], d["targets"]
    ids = np.asarray(d["ids"])
    if rows is not None:
        z, y, ids = z[rows], y[rows], ids[rows]
    shifted = z - z.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    nll = -log_p[np.arange(len(y)), y]
    correct = (z.argmax(axis=1) == y).astype(np.float64)
    w = poisson_weights(example_id_hashes(list(ids))[0], B, SEED).astype(np.float64)
    out = {}
    for name, x in (("accuracy", correct), ("nll", nll)):
        reps = (w * x[:, None]).sum(axis=0) / w.sum(axis=0)
        lo, hi = np.percentile(reps, [50 * (1 - LEVEL), 100 - 50 * (1 - LEVEL)])
        out[name] = [float(lo), float(hi)]
    return out


async def test_intervals_equal_a_plain_bootstrap_whatever_the_split_and_order(api):
    d = data(1, 90)
    first = await new_run(api)
    for i, rows in enumerate((slice(0, 40), slice(40, 70), slice(70, 90))):
        answer = await push(api, first, batch_body(d, rows, f"b{i}"))
    run = answer["run"]
    expected = reference(d)
    for name in ("accuracy", "nll"):
        assert_close(run["intervals"][name]["ci"], expected[name], name)
        assert run["intervals"][name]["level"] == LEVEL
        assert run["intervals"][name]["replicates"] == B
    assert_close(run["intervals"]["value"]["ci"], expected["nll"], "value")  # mean CE = NLL
    assert run["no_interval"] == ["f1"] and run["paired_ids"] is True
    assert run["fingerprint"]["count"] == 90

    # another split, in another order, into another run: the same intervals and fingerprint
    second = await new_run(api)
    order = np.random.default_rng(5).permutation(90)
    for i, part in enumerate(np.array_split(order, 4)[::-1]):
        other = await push(api, second, batch_body(d, part, f"p{i}"))
    assert other["run"]["fingerprint"] == run["fingerprint"]
    for name in ("accuracy", "nll", "value"):
        assert_close(other["run"]["intervals"][name]["ci"], run["intervals"][name]["ci"], name)

    # exactly once: a duplicate batch changes no replicate
    again = await push(api, first, batch_body(d, slice(0, 40), "b0"))
    assert again["duplicate"] is True
    fetched = (await api.get(f"/v1/runs/{first}")).json()
    assert fetched["intervals"] == run["intervals"] and fetched["batches"] == 3


async def test_slices_equal_a_stateless_evaluation_of_their_examples(api):
    d = data(2, 120)
    run_id = await new_run(api)
    for i, rows in enumerate((slice(0, 50), slice(50, 120))):
        await push(api, run_id, batch_body(d, rows, f"b{i}"))
    response = await api.get(f"/v1/runs/{run_id}/slices", params={"key": "lang"})
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["key"] == "lang" and page["values"] == 3 and page["hidden"] == 0
    lang = np.asarray(d["lang"])
    counts = [row["count"] for row in page["slices"]]
    assert counts == sorted(counts, reverse=True)
    for row in page["slices"]:
        rows = np.flatnonzero(lang == row["slice"])
        alone = await api.post(
            "/v1/evaluate",
            json={
                "loss": "cross_entropy",
                "metrics": ["accuracy", "nll"],
                "logits": d["logits"][rows].tolist(),
                "targets": d["targets"][rows].tolist(),
            },
        )
        expected = alone.json()
        assert row["count"] == len(rows)
        assert_close(row["value"], expected["value"], row["slice"])
        for name in ("accuracy", "nll"):
            assert_close(row["metrics"][name], expected["metrics"][name], name)
        want = reference(d, rows)
        for name in ("accuracy", "nll"):
            assert_close(row["intervals"][name]["ci"], want[name], f"{row['slice']}.{name}")

    worst = await api.get(
        f"/v1/runs/{run_id}/slices",
        params={"key": "lang", "sort": "accuracy", "order": "asc", "limit": 2},
    )
    accuracies = [r["metrics"]["accuracy"] for r in worst.json()["slices"]]
    assert len(accuracies) == 2 and accuracies == sorted(accuracies)
    smallest = min(counts)
    hidden = await api.get(
        f"/v1/runs/{run_id}/slices", params={"key": "lang", "min_slice_size": smallest + 1}
    )
    assert hidden.json()["hidden"] == counts.count(smallest)


async def test_a_value_beyond_max_slice_values_is_a_422_and_nothing_is_counted(api):
    d = data(3, 30)
    run_id = await new_run(api, max_slice_values=2)
    body = batch_body(d, slice(0, 10), "b0")
    body["slices"]["lang"] = ["en"] * 5 + ["de"] * 5
    await push(api, run_id, body)
    late = batch_body(d, slice(10, 20), "b1")
    late["slices"]["lang"] = ["en"] * 5 + ["xx"] * 5
    response = await api.post(f"/v1/runs/{run_id}/batches", json=late)
    assert response.status_code == 422
    problem = response.json()
    assert "xx" in problem["detail"]
    assert locs(response) == [["slices", "lang"]]
    run = (await api.get(f"/v1/runs/{run_id}")).json()
    assert run["batches"] == 1 and run["count"] == 10
    page = (await api.get(f"/v1/runs/{run_id}/slices", params={"key": "lang"})).json()
    assert sorted(r["slice"] for r in page["slices"]) == ["de", "en"]
    assert sum(r["count"] for r in page["slices"]) == 10


async def test_without_ids_the_run_is_not_paired_and_without_confidence_has_no_intervals(api):
    d = data(4, 20)
    run_id = await new_run(api, confidence=None, slice_keys=[])
    body = batch_body(d, slice(0, 20), "b0")
    del body["example_ids"], body["slices"]
    run = (await push(api, run_id, body))["run"]
    assert run["paired_ids"] is False and run["intervals"] is None and run["confidence"] is None
    assert run["fingerprint"]["count"] == 20
    with_ids = batch_body(d, slice(0, 20), "b1")
    del with_ids["slices"]
    assert (await push(api, run_id, with_ids))["run"]["paired_ids"] is False  # stays unpaired


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"slice_keys": ["a/b"]}, ["slice_keys", 0]),
        ({"slice_keys": ["a", "a"]}, ["slice_keys", 1]),
        ({"slice_keys": [f"k{i}" for i in range(9)]}, ["slice_keys"]),
        ({"confidence": {"replicates": 0}}, ["confidence", "replicates"]),
        ({"confidence": {"replicates": 1001}}, ["confidence", "replicates"]),
        ({"confidence": {"level": 1.0}}, ["confidence", "level"]),
        ({"confidence": {"seed": -1}}, ["confidence", "seed"]),
        ({"confidence": {"samples": 3}}, ["confidence", "samples"]),
        ({"max_slice_values": 0}, ["max_slice_values"]),
        ({"max_slice_values": 10, "slice_keys": []}, ["max_slice_values"]),
    ],
)
async def test_create_rejects_bad_confidence_and_slice_keys(api, fields, loc):
    body = {"name": "x", "loss": "cross_entropy", "metrics": ["accuracy"], **fields}
    response = await api.post("/v1/runs", json=body)
    assert response.status_code == 422, response.text
    assert loc in locs(response)


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        (lambda b: b["slices"].pop("lang"), ["slices", "lang"]),
        (lambda b: b["slices"].update(lang=b["slices"]["lang"][:-1]), ["slices", "lang"]),
        (lambda b: b["slices"].update(team=["a"] * 10), ["slices", "team"]),
        (lambda b: b["slices"]["lang"].__setitem__(3, 7), ["slices", "lang", 3]),
        (lambda b: b["slices"]["lang"].__setitem__(2, "x" * 201), ["slices", "lang", 2]),
        (lambda b: b.update(example_ids=b["example_ids"][:-1]), ["example_ids"]),
        (lambda b: b["example_ids"].__setitem__(0, "x" * 129), ["example_ids", 0]),
        (lambda b: b["example_ids"].__setitem__(0, 5), ["example_ids"]),
    ],
)
async def test_batches_with_bad_ids_or_slices_are_422_naming_the_field(api, change, loc):
    d = data(5, 10)
    run_id = await new_run(api)
    body = batch_body(d, slice(0, 10), "b0")
    change(body)
    response = await api.post(f"/v1/runs/{run_id}/batches", json=body)
    assert response.status_code == 422, response.text
    assert any(at[: len(loc)] == loc for at in locs(response)), response.text
    assert (await api.get(f"/v1/runs/{run_id}")).json()["batches"] == 0


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"key": "team"}, ["query", "key"]),
        ({"key": "lang", "sort": "f2"}, ["query", "sort"]),
        ({"key": "lang", "order": "up"}, ["query", "order"]),
        ({"key": "lang", "limit": 0}, ["query", "limit"]),
        ({"key": "lang", "offset": 10**20}, ["query", "offset"]),
        ({"key": "lang", "min_slice_size": -1}, ["query", "min_slice_size"]),
    ],
)
async def test_slices_endpoint_rejects_bad_queries(api, params, loc):
    d = data(6, 10)
    run_id = await new_run(api)
    await push(api, run_id, batch_body(d, slice(0, 10), "b0"))
    response = await api.get(f"/v1/runs/{run_id}/slices", params=params)
    assert response.status_code == 422, response.text
    assert loc in locs(response)
    missing = await api.get("/v1/runs/run_nope/slices", params={"key": "lang"})
    assert missing.status_code == 404


def test_replicate_weights_and_slice_work_are_bounded_before_any_work(tmp_path):
    """N × B weights over CE_EVAL_MAX_ELEMENTS, and work × (1 + slice keys) plus the replicates'
    over CE_EVAL_MAX_WORK, are 413 before the engine runs; nothing is counted."""
    from service.config import Settings
    from service.dataplane.runs import RunsDataPlane
    from service.errors import ServiceError
    from service.store import Store

    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    store.upgrade()
    calls = []
    settings = Settings(database_url=url, backend="numpy", max_elements=5_000, max_work=4_000_000)
    runs = RunsDataPlane(settings, store, on_evaluate=lambda *a: calls.append(a))
    d = data(7, 60)
    heavy = runs.create_run(
        {"name": "w", "loss": "cross_entropy", "confidence": {"replicates": 100}}
    )
    body = batch_body(d, slice(0, 60), "b0")
    del body["slices"]
    with pytest.raises(ServiceError) as weights:
        runs.add_batch(heavy["id"], body)  # 60 × 100 = 6000 weights > 5000
    assert weights.value.status_code == 413 and "replicates" in weights.value.detail
    sliced = runs.create_run(
        {
            "name": "s",
            "loss": "cross_entropy",
            "confidence": {"replicates": 2},
            "slice_keys": ["lang"],
        }
    )
    # 60 rows × 4 classes × 2 (one slice key) + 60 × 2 replicates × 64 × 2 + 10⁶ per distinct
    # slice value (one evaluation each): 60 values → over 4·10⁶; 3 values → under
    many = batch_body(d, slice(0, 60), "b0")
    many["slices"]["lang"] = [f"v{i}" for i in range(60)]
    with pytest.raises(ServiceError) as work:
        runs.add_batch(sliced["id"], many)
    assert work.value.status_code == 413
    assert calls == [] and runs.get_run(sliced["id"])["batches"] == 0
    small = batch_body(d, slice(0, 20), "b1")
    assert runs.add_batch(sliced["id"], small)["run"]["batches"] == 1
    assert len(calls) == 1  # the engine ran for the accepted batch only
    store.dispose()


async def gate_pair(api: httpx.AsyncClient) -> tuple[str, str, dict[str, Any]]:
    """A baseline and a correlated candidate (the baseline's logits plus noise) over the same
    examples, in runs with the same confidence."""
    base = data(8, 200)
    rng = np.random.default_rng(9)
    candidate = {**base, "logits": base["logits"] + rng.standard_normal(base["logits"].shape)}
    ids = []
    for d, name in ((base, "baseline"), (candidate, "candidate")):
        run_id = await new_run(api, name=name)
        for i, rows in enumerate((slice(0, 120), slice(120, 200))):
            await push(api, run_id, batch_body(d, rows, f"b{i}"))
        ids.append(run_id)
    return ids[0], ids[1], {"baseline": base, "candidate": candidate}


def paired_delta_ci(
    a: dict[str, Any], b: dict[str, Any], rows: np.ndarray | None = None
) -> list[float]:
    """Plain paired bootstrap of the accuracy difference b − a (same weights for both)."""
    ids = np.asarray(a["ids"])
    ca = (a["logits"].argmax(axis=1) == a["targets"]).astype(float)
    cb = (b["logits"].argmax(axis=1) == b["targets"]).astype(float)
    if rows is not None:
        ids, ca, cb = ids[rows], ca[rows], cb[rows]
    w = poisson_weights(example_id_hashes(list(ids))[0], B, SEED).astype(np.float64)
    deltas = (w * (cb - ca)[:, None]).sum(axis=0) / w.sum(axis=0)
    lo, hi = np.percentile(deltas, [50 * (1 - LEVEL), 100 - 50 * (1 - LEVEL)])
    return [float(lo), float(hi)]


async def test_gate_and_compare_give_the_paired_delta_interval(api):
    base_id, cand_id, sets = await gate_pair(api)
    want = paired_delta_ci(sets["baseline"], sets["candidate"])
    compared = await api.get(
        "/v1/runs/compare", params={"ids": f"{base_id},{cand_id}", "baseline": base_id}
    )
    assert compared.status_code == 200, compared.text
    accuracy = compared.json()["deltas"][cand_id]["accuracy"]
    assert accuracy["paired"] is True
    assert_close(accuracy["ci"], want, "compare")
    assert_close(accuracy["delta"], accuracy["value"] - accuracy["baseline"], "delta")

    lo, hi = want
    checks = [
        {"metric": "accuracy", "max_decrease": max(0.0, -lo) + 0.01},  # lo > −m: pass
        {"metric": "accuracy", "max_decrease": 0.0}
        if hi < 0
        else {"metric": "accuracy", "min": 0.0},
        {"metric": "nll", "max_increase": 10.0},
        {"metric": "accuracy", "slice": "lang=de", "max_decrease": 1.0},
    ]
    response = await api.post(
        f"/v1/runs/{cand_id}/gate", json={"baseline": base_id, "checks": checks}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["paired"] is True and answer["replicates"] == B and answer["level"] == LEVEL
    verdicts = [c["verdict"] for c in answer["checks"]]
    assert verdicts[0] == "pass" and verdicts[2] == "pass" and verdicts[3] == "pass"
    assert_close(answer["checks"][0]["ci"], want, "gate")
    de = np.flatnonzero(np.asarray(sets["baseline"]["lang"]) == "de")
    assert_close(
        answer["checks"][3]["ci"], paired_delta_ci(sets["baseline"], sets["candidate"], de), "de"
    )
    assert answer["passed"] is all(v == "pass" for v in verdicts)
    stored = (await api.get(f"/v1/runs/{cand_id}")).json()["gate"]
    assert stored == answer

    failing = await api.post(
        f"/v1/runs/{cand_id}/gate",
        json={"baseline": base_id, "checks": [{"metric": "accuracy", "min": 0.99}]},
    )
    assert failing.json()["passed"] is False
    assert failing.json()["checks"][0]["verdict"] == "fail"


@pytest.mark.parametrize(
    ("body", "status", "loc"),
    [
        ({"checks": [{"metric": "accuracy", "min": 0.5}]}, 422, ["baseline"]),
        (
            {"baseline": "run_nope", "checks": [{"metric": "accuracy", "min": 0.5}]},
            404,
            ["baseline"],
        ),
        (
            {"baseline": "BASE", "checks": [{"metric": "acuracy", "min": 0.5}]},
            422,
            ["checks", 0, "metric"],
        ),
        ({"baseline": "BASE", "checks": [{"metric": "accuracy"}]}, 422, ["checks", 0]),
        (
            {"baseline": "BASE", "checks": [{"metric": "ece", "max_decrease": 0.1}]},
            422,
            ["checks", 0],
        ),
        (
            {
                "baseline": "BASE",
                "checks": [{"metric": "accuracy", "slice": "lang=xx", "min": 0.1}],
            },
            422,
            ["checks", 0, "slice"],
        ),
        (
            {"baseline": "BASE", "checks": [{"metric": "accuracy", "min": 0.1}] * 65},
            422,
            ["checks"],
        ),
    ],
)
async def test_gate_rejects_bad_bodies_naming_the_field(api, body, status, loc):
    base_id, cand_id, _ = await gate_pair(api)
    if body.get("baseline") == "BASE":
        body = {**body, "baseline": base_id}
    response = await api.post(f"/v1/runs/{cand_id}/gate", json=body)
    assert response.status_code == status, response.text
    assert any(at[: len(loc)] == loc for at in locs(response)), response.text
    assert (await api.get(f"/v1/runs/{cand_id}")).json()["gate"] is None
    compared = await api.get(
        "/v1/runs/compare", params={"ids": f"{base_id},{cand_id}", "baseline": "run_other"}
    )
    assert compared.status_code == 422 and ["query", "baseline"] in locs(compared)


async def test_a_monitored_run_and_its_baseline_are_exported_to_prometheus(api):
    """Runs tagged ``baseline`` (and their baselines) get run gauges; others get none."""
    d = data(10, 40)
    base = await new_run(api, name="base")
    await push(api, base, batch_body(d, slice(0, 40), "b0"))
    quiet = await new_run(api, name="quiet")
    await push(api, quiet, batch_body(d, slice(0, 40), "b0"))
    watched = await new_run(api, name="watch", tags={"baseline": base})
    answer = await push(api, watched, batch_body(d, slice(0, 20), "b0"))
    text = (await api.get("/metrics")).text

    def sample(name: str, **labels: str) -> float | None:
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return None

    run = answer["run"]
    assert (
        sample("ce_eval_run_value", run_id=watched, metric="accuracy") == run["metrics"]["accuracy"]
    )
    assert (
        sample("ce_eval_run_ci_low", run_id=watched, metric="accuracy")
        == run["intervals"]["accuracy"]["ci"][0]
    )
    assert sample("ce_eval_run_open", run_id=watched, baseline=base) == 1.0
    based = (await api.get(f"/v1/runs/{base}")).json()
    assert (
        sample("ce_eval_run_ci_high", run_id=base, metric="value")
        == based["intervals"]["value"]["ci"][1]
    )
    assert sample("ce_eval_run_value", run_id=quiet, metric="accuracy") is None
    await api.post(f"/v1/runs/{watched}/close")
    text = (await api.get("/metrics")).text
    assert sample("ce_eval_run_open", run_id=watched, baseline=base) == 0.0
    await api.delete(f"/v1/runs/{watched}")
    text = (await api.get("/metrics")).text
    assert sample("ce_eval_run_value", run_id=watched, metric="accuracy") is None


async def test_review_cases_non_finite_replicates_retries_and_slice_value_checks(api):
    """A weight whose replicates leave float64 is a 422 and the run stays readable; a retry
    with its slice keys in another order is the same batch; a batch with more distinct values
    than max_slice_values, or a control character in one, is a 422 before any work."""
    run_id = await new_run(api, slice_keys=["lang", "team"], max_slice_values=3)
    huge = {
        "batch_id": "w",
        "logits": [[0.0, 0.0]],
        "targets": [0],
        "sample_weight": [1.7e308],
        "example_ids": ["a"],
        "slices": {"lang": ["en"], "team": ["x"]},
    }
    response = await api.post(f"/v1/runs/{run_id}/batches", json=huge)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["type"] == "non_finite_result"
    assert (await api.get(f"/v1/runs/{run_id}")).json()["batches"] == 0

    d = data(11, 6)
    body = batch_body(d, slice(0, 6), "b0")
    body["slices"] = {"lang": ["en", "de"] * 3, "team": ["x"] * 6}
    await push(api, run_id, body)
    again = {**body, "slices": {"team": ["x"] * 6, "lang": ["en", "de"] * 3}}
    retried = await push(api, run_id, again)
    assert retried["duplicate"] is True

    wide = batch_body(d, slice(0, 6), "b1")
    wide["slices"] = {"lang": ["a", "b", "c", "d", "e", "f"], "team": ["x"] * 6}
    response = await api.post(f"/v1/runs/{run_id}/batches", json=wide)
    assert response.status_code == 422 and ["slices", "lang"] in locs(response)
    control = batch_body(d, slice(0, 6), "b2")
    control["slices"] = {"lang": ["en"] * 5 + ["d\u0000e"], "team": ["x"] * 6}
    response = await api.post(f"/v1/runs/{run_id}/batches", json=control)
    assert response.status_code == 422 and ["slices", "lang", 5] in locs(response)
    assert (await api.get(f"/v1/runs/{run_id}")).json()["batches"] == 1


async def test_a_run_whose_replicate_states_could_exceed_the_budget_is_refused(api):
    """B × statistics × (1 + keys × max_slice_values) over MAX_REPLICATE_NUMBERS: 422 at
    creation, naming confidence.replicates."""
    from service.dataplane.slices import MAX_REPLICATE_NUMBERS, replicate_numbers

    body = {
        "name": "big",
        "loss": "cross_entropy",
        "metrics": ["accuracy", "ece"],
        "options": {"n_bins": 1000},
        "confidence": {"replicates": 1000},
        "slice_keys": ["lang"],
        "max_slice_values": 4096,
    }
    assert replicate_numbers(1000, 1000, 1) * 4097 > MAX_REPLICATE_NUMBERS
    response = await api.post("/v1/runs", json=body)
    assert response.status_code == 422 and ["confidence", "replicates"] in locs(response)
    small = {**body, "options": {}, "confidence": {"replicates": 200}, "max_slice_values": 256}
    assert (await api.post("/v1/runs", json=small)).status_code == 201


async def test_compare_per_slice_needs_a_baseline_and_a_shared_key(api):
    base_id, cand_id, sets = await gate_pair(api)
    ids = f"{base_id},{cand_id}"
    ok = await api.get(
        "/v1/runs/compare", params={"ids": ids, "baseline": base_id, "slice_key": "lang"}
    )
    assert ok.status_code == 200, ok.text
    de = ok.json()["deltas"][cand_id]["slices"]["lang=de"]["accuracy"]
    rows = np.flatnonzero(np.asarray(sets["baseline"]["lang"]) == "de")
    assert_close(de["ci"], paired_delta_ci(sets["baseline"], sets["candidate"], rows), "de")
    for params in (
        {"ids": ids, "slice_key": "lang"},
        {"ids": ids, "baseline": base_id, "slice_key": "team"},
    ):
        response = await api.get("/v1/runs/compare", params=params)
        assert response.status_code == 422 and ["query", "slice_key"] in locs(response)


async def test_a_slice_whose_examples_differ_between_runs_is_compared_unpaired(api):
    """Same ids overall, but the `de` slice holds other examples in the candidate: that
    slice's delta is unpaired while the whole run's is paired."""
    d = data(12, 60)
    base = await new_run(api, name="a")
    await push(api, base, batch_body(d, slice(0, 60), "b0"))
    moved = batch_body(d, slice(0, 60), "b0")
    moved["slices"]["lang"] = moved["slices"]["lang"][1:] + moved["slices"]["lang"][:1]
    cand = await new_run(api, name="b")
    await push(api, cand, moved)
    compared = await api.get(
        "/v1/runs/compare", params={"ids": f"{base},{cand}", "baseline": base, "slice_key": "lang"}
    )
    deltas = compared.json()["deltas"][cand]
    assert deltas["accuracy"]["paired"] is True
    assert {entry["accuracy"]["paired"] for entry in deltas["slices"].values()} == {False}
