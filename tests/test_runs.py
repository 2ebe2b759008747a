"""Runs API over the real app, on a real SQLite file and a real PostgreSQL server.

Expected aggregates always come from one stateless evaluation (``POST /v1/evaluate``) of all the
batches concatenated, never from the run store's own arithmetic.
"""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import text

from ce_engine.metrics import METRIC_NAMES
from service.config import Settings
from service.dataplane.runs import RunsDataPlane
from service.errors import ServiceError, Unavailable
from service.http.app import create_app
from service.store import Store
from tests.servers import PostgresCluster, free_port

ALL_METRICS = list(METRIC_NAMES)
NUM_CLASSES = 5
OPTIONS = {"ignore_index": -100, "weight": [1.0, 2.0, 0.5, 1.5, 1.0], "top_k": [1, 3]}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'runs.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database()


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        database_url=database_url,
        max_body_bytes=2 * 1024 * 1024,
        max_elements=20_000,
        log_level="warning",
        backend="numpy",
        max_inflight=64,  # the concurrency test sends 48 at once; backpressure is tested apart
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


def make_batches(seed: int, sizes: list[int]) -> list[dict[str, Any]]:
    """Random (logits, targets with some ignored, sample weights) batches."""
    rng = np.random.default_rng(seed)
    batches = []
    for n in sizes:
        logits = rng.standard_normal((n, NUM_CLASSES)) * 2.0
        targets = rng.integers(0, NUM_CLASSES, size=n)
        targets[rng.random(n) < 0.1] = -100
        weights = rng.uniform(0.5, 2.0, size=n)
        batches.append({"logits": logits, "targets": targets, "sample_weight": weights})
    return batches


def as_json(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() for k, v in batch.items()}


def as_base64(array: np.ndarray) -> dict[str, Any]:
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
    }


def concatenated(batches: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: np.concatenate([b[k] for b in batches]).tolist() for k in batches[0]}


def assert_close(actual: Any, expected: Any, where: str = "") -> None:
    """Recursive comparison: same structure, numbers equal to 1e-9 relative."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, f"{where}[{i}]")
    elif expected is None:
        assert actual is None, where
    else:
        assert math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12), (
            f"{where}: {actual} != {expected}"
        )


async def stateless(api: httpx.AsyncClient, batches: list[dict[str, Any]]) -> dict[str, Any]:
    response = await api.post(
        "/v1/evaluate",
        json={
            "loss": "cross_entropy",
            "options": OPTIONS,
            "metrics": ALL_METRICS,
            **concatenated(batches),
        },
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def create_run(api: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {
        "name": "eval",
        "loss": "cross_entropy",
        "options": OPTIONS,
        "metrics": ALL_METRICS,
        **fields,
    }
    response = await api.post("/v1/runs", json=body)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/v1/runs/{response.json()['id']}"
    run: dict[str, Any] = response.json()
    return run


async def add(api: httpx.AsyncClient, run_id: str, batch_id: str, batch: dict[str, Any]) -> Any:
    return await api.post(f"/v1/runs/{run_id}/batches", json={"batch_id": batch_id, **batch})


async def test_aggregates_equal_one_evaluation_of_the_concatenated_batches(api):
    batches = make_batches(1, [7, 1, 30, 12, 19])
    run = await create_run(api, tags={"model": "m1"})
    assert run["status"] == "open" and run["batches"] == 0 and run["value"] is None
    for i, batch in enumerate(batches):
        response = await add(api, run["id"], f"b{i}", as_json(batch))
        assert response.status_code == 200, response.text
        assert response.json()["duplicate"] is False
        assert response.json()["seq"] == i + 1
    expected = await stateless(api, batches)
    got = (await api.get(f"/v1/runs/{run['id']}")).json()
    assert got["batches"] == len(batches)
    assert got["count"] == expected["count"] and got["ignored"] == expected["ignored"]
    assert_close(got["sum"], expected["sum"], "sum")
    assert_close(got["denominator"], expected["denominator"], "denominator")
    assert_close(got["value"], expected["value"], "value")
    assert_close(got["metrics"], expected["metrics"], "metrics")
    # The mean of the batch means is not the answer (the batches differ in size and weight).
    means = [(await stateless(api, [b]))["value"] for b in batches]
    assert not math.isclose(sum(means) / len(means), got["value"], rel_tol=1e-6)


async def test_batch_answer_holds_the_batch_result_and_the_run_totals(api):
    batch = make_batches(2, [9])[0]
    run = await create_run(api)
    answer = (await add(api, run["id"], "only", as_json(batch))).json()
    expected = await stateless(api, [batch])
    assert answer["batch_id"] == "only" and answer["run_id"] == run["id"]
    assert_close(answer["batch"]["value"], expected["value"])
    assert answer["batch"]["count"] == expected["count"]
    assert_close(answer["batch"]["metrics"]["accuracy"], expected["metrics"]["accuracy"])
    assert answer["run"]["batches"] == 1
    assert_close(answer["run"]["value"], expected["value"])


async def test_duplicate_batch_is_answered_again_and_counted_once(api):
    first, second = make_batches(3, [8, 6])
    run = await create_run(api)
    original = (await add(api, run["id"], "a", as_json(first))).json()
    await add(api, run["id"], "b", as_json(second))
    # Same content, other encoding (base64 of the same float64/int64 arrays): still a duplicate.
    replay = await add(api, run["id"], "a", {k: as_base64(v) for k, v in first.items()})
    assert replay.status_code == 200, replay.text
    assert replay.json()["duplicate"] is True
    assert replay.json()["batch"] == original["batch"]
    assert replay.json()["seq"] == original["seq"] == 1
    got = (await api.get(f"/v1/runs/{run['id']}")).json()
    expected = await stateless(api, [first, second])
    assert got["batches"] == 2 and got["count"] == expected["count"]
    assert_close(got["value"], expected["value"])


async def test_reused_batch_id_with_other_content_is_a_conflict(api):
    first, second = make_batches(4, [5, 5])
    run = await create_run(api)
    await add(api, run["id"], "a", as_json(first))
    response = await add(api, run["id"], "a", as_json(second))
    assert response.status_code == 409
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["errors"][0]["loc"] == ["body", "batch_id"]
    # Same numbers as float32 are other content too (dtype is part of the content).
    as_f32 = {**as_json(first), "logits": as_base64(first["logits"].astype(np.float32))}
    assert (await add(api, run["id"], "a", as_f32)).status_code == 409
    assert (await api.get(f"/v1/runs/{run['id']}")).json()["batches"] == 1


async def test_closed_run_rejects_batches_but_answers_retries(api):
    first, second = make_batches(5, [4, 4])
    run = await create_run(api)
    await add(api, run["id"], "a", as_json(first))
    closed = await api.post(f"/v1/runs/{run['id']}/close")
    assert closed.status_code == 200 and closed.json()["status"] == "closed"
    assert closed.json()["closed_at"] is not None
    again = await api.post(f"/v1/runs/{run['id']}/close")
    assert again.status_code == 200 and again.json()["closed_at"] == closed.json()["closed_at"]
    rejected = await add(api, run["id"], "b", as_json(second))
    assert rejected.status_code == 409
    assert rejected.json()["errors"][0]["type"] == "run_closed"
    retry = await add(api, run["id"], "a", as_json(first))
    assert retry.status_code == 200 and retry.json()["duplicate"] is True
    assert (await api.get(f"/v1/runs/{run['id']}")).json()["batches"] == 1


async def test_batch_series_gives_each_batch_and_the_running_value(api):
    batches = make_batches(6, [3, 11, 6, 9])
    run = await create_run(api)
    for i, batch in enumerate(batches):
        await add(api, run["id"], f"s{i}", as_json(batch))
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await api.get(f"/v1/runs/{run['id']}/batches", params=params)).json()
        seen.extend(page["batches"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [b["batch_id"] for b in seen] == ["s0", "s1", "s2", "s3"]
    assert [b["seq"] for b in seen] == [1, 2, 3, 4]
    for i, point in enumerate(seen):
        own = await stateless(api, [batches[i]])
        prefix = await stateless(api, batches[: i + 1])
        assert_close(point["value"], own["value"], f"batch {i}")
        assert_close(point["metrics"]["accuracy"], own["metrics"]["accuracy"], f"batch {i}")
        assert_close(point["cumulative_value"], prefix["value"], f"prefix {i}")


async def test_list_filters_and_cursor_pagination(api):
    made = []
    for i in range(7):
        run = await create_run(
            api, name=f"exp-{i % 2}-{i}", tags={"team": "a" if i < 4 else "b", "i": str(i)}
        )
        made.append(run["id"])
    await api.post(f"/v1/runs/{made[1]}/close")
    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        response = await api.get("/v1/runs", params=params)
        assert response.status_code == 200
        pages.append([r["id"] for r in response.json()["runs"]])
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == made[::-1]

    async def ids(**params: Any) -> list[str]:
        response = await api.get("/v1/runs", params=params)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["runs"]]

    assert await ids(tag="team:b") == made[4:][::-1]
    assert await ids(tag=["team:a", "i:2"]) == [made[2]]
    assert await ids(name="exp-1") == [made[5], made[3], made[1]]
    assert await ids(status="closed") == [made[1]]
    assert await ids(status="open", name="exp-1") == [made[5], made[3]]
    assert await ids(name="100%") == []


async def test_compare_and_delete(api):
    one, two = make_batches(7, [10]), make_batches(8, [12])
    a = await create_run(api, name="a")
    b = await create_run(api, name="b")
    await add(api, a["id"], "x", as_json(one[0]))
    await add(api, b["id"], "x", as_json(two[0]))
    compared = await api.get("/v1/runs/compare", params={"ids": f"{b['id']},{a['id']}"})
    assert compared.status_code == 200
    body = compared.json()
    assert [r["id"] for r in body["runs"]] == [b["id"], a["id"]]
    assert_close(body["table"]["value"][a["id"]], (await stateless(api, one))["value"])
    assert_close(
        body["table"]["accuracy"][b["id"]], (await stateless(api, two))["metrics"]["accuracy"]
    )
    assert (await api.delete(f"/v1/runs/{a['id']}")).status_code == 204
    assert (await api.get(f"/v1/runs/{a['id']}")).status_code == 404
    assert (await api.get(f"/v1/runs/{a['id']}/batches")).status_code == 404
    assert (await api.delete(f"/v1/runs/{a['id']}")).status_code == 404
    missing = await api.get("/v1/runs/compare", params={"ids": f"{b['id']},{a['id']}"})
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["loc"] == ["query", "ids", 1]
    assert (await api.get(f"/v1/runs/{b['id']}")).json()["batches"] == 1


async def test_runs_without_metrics_and_with_sum_reduction(api):
    batches = make_batches(9, [6, 4])
    run = (
        await api.post(
            "/v1/runs",
            json={"name": "s", "loss": "cross_entropy", "options": {"reduction": "sum"}},
        )
    ).json()
    for i, batch in enumerate(batches):
        await add(api, run["id"], str(i), as_json(batch))
    got = (await api.get(f"/v1/runs/{run['id']}")).json()
    expected = await api.post(
        "/v1/evaluate",
        json={"loss": "cross_entropy", "options": {"reduction": "sum"}, **concatenated(batches)},
    )
    assert got["metrics"] == {}
    assert_close(got["value"], expected.json()["value"])


async def test_a_run_never_stores_a_non_finite_aggregate(api):
    """A batch with a non-finite sum (nan_policy propagate) or one that would overflow the
    run's float64 sum is a 422 and counts nothing (SQLite kept null; PostgreSQL answered 500)."""
    run = (
        await api.post(
            "/v1/runs",
            json={"name": "nf", "loss": "cross_entropy", "options": {"nan_policy": "propagate"}},
        )
    ).json()
    url = f"/v1/runs/{run['id']}/batches"
    masked = np.array([[0.0, -np.inf, 1.0], [1.0, 0.0, 0.0]])  # row 0's target has p = 0
    refused = await api.post(
        url, json={"batch_id": "inf", "logits": as_base64(masked), "targets": [1, 0]}
    )
    assert refused.status_code == 422, refused.text
    problem = refused.json()
    assert problem["type"].endswith("non-finite-result")
    assert problem["errors"][0]["loc"] == ["logits", 0]
    assert problem["errors"][0]["type"] == "non_finite_result"
    # each batch's ℓ = 1.5e308 is finite, the run's sum of two is not
    huge = {"logits": [[0.0, -1.5e308]], "targets": [1]}
    first = await api.post(url, json={"batch_id": "a", **huge})
    assert first.status_code == 200, first.text
    second = await api.post(url, json={"batch_id": "b", **huge})
    assert second.status_code == 422, second.text
    assert second.json()["errors"][0]["type"] == "non_finite_result"
    got = (await api.get(f"/v1/runs/{run['id']}")).json()
    assert got["batches"] == 1 and got["count"] == 1
    assert got["sum"] == 1.5e308 and got["value"] == 1.5e308
    assert (
        await api.post(url, json={"batch_id": "inf", "logits": [[0.0]], "targets": [0]})
    ).status_code == 200


async def test_batch_with_another_number_of_classes_is_rejected(api):
    run = await create_run(api)
    await add(api, run["id"], "a", as_json(make_batches(10, [4])[0]))
    other = {"logits": np.zeros((3, NUM_CLASSES + 1)).tolist(), "targets": [0, 1, 2]}
    response = await add(api, run["id"], "b", other)
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"][0] in ("options", "body", "logits")
    assert (await api.get(f"/v1/runs/{run['id']}")).json()["batches"] == 1


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"loss": "cross_entropy"}, ["name"]),
        ({"name": "", "loss": "cross_entropy"}, ["name"]),
        ({"name": "x"}, ["loss"]),
        ({"name": "x", "loss": "nope"}, ["loss"]),
        ({"name": "x", "loss": "cross_entropy", "options": {"reduction": "avg"}}, None),
        ({"name": "x", "loss": "cross_entropy", "options": {"reduction": "none"}}, None),
        ({"name": "x", "loss": "cross_entropy", "metrics": ["accuracy", "bogus"]}, None),
        ({"name": "x", "loss": "cross_entropy", "tags": {"a:b": "c"}}, ["tags"]),
        ({"name": "x", "loss": "cross_entropy", "tags": {"a": 1}}, ["tags", "a"]),
        ({"name": "x", "loss": "cross_entropy", "extra": 1}, ["extra"]),
    ],
)
async def test_create_run_rejects_bad_input(api, body, loc):
    response = await api.post("/v1/runs", json=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    if loc is not None:
        assert problem["errors"][0]["loc"][: len(loc)] == loc
    else:
        assert problem["errors"], problem
    assert (await api.get("/v1/runs")).json()["runs"] == []


async def test_create_run_error_locations_name_the_field(api):
    bad_reduction = await api.post(
        "/v1/runs", json={"name": "x", "loss": "cross_entropy", "options": {"reduction": "none"}}
    )
    assert bad_reduction.json()["errors"][0]["loc"] == ["body", "options", "reduction"]
    bad_metric = await api.post(
        "/v1/runs", json={"name": "x", "loss": "cross_entropy", "metrics": ["accuracy", "bogus"]}
    )
    assert bad_metric.json()["errors"][0]["loc"] == ["body", "metrics", 1]
    bad_option = await api.post(
        "/v1/runs", json={"name": "x", "loss": "cross_entropy", "options": {"reduction": "avg"}}
    )
    assert bad_option.json()["errors"][0]["loc"][:2] == ["options", "reduction"]


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"{", {"content-type": "application/json"}, 400),
        (b"[1, 2]", {"content-type": "application/json"}, 400),
        (b"", {"content-type": "application/json"}, 400),
        (b'{"name": "x"}', {"content-type": "text/plain"}, 415),
    ],
)
async def test_create_run_rejects_bad_bodies(api, content, headers, status):
    response = await api.post("/v1/runs", content=content, headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"


async def test_add_batch_rejects_bad_input(api):
    run = await create_run(api)
    url = f"/v1/runs/{run['id']}/batches"
    good = as_json(make_batches(11, [3])[0])

    async def post(body: Any, status: int) -> dict[str, Any]:
        response = await api.post(url, json=body)
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"
        problem: dict[str, Any] = response.json()
        return problem

    assert (await post(good, 422))["errors"][0]["loc"] == ["batch_id"]
    assert (await post({**good, "batch_id": ""}, 422))["errors"][0]["loc"] == ["batch_id"]
    assert (await post({**good, "batch_id": "x", "more": 1}, 422))["errors"][0]["loc"] == ["more"]
    ragged = {**good, "batch_id": "x", "logits": [[1.0, 2.0], [3.0]]}
    assert (await post(ragged, 422))["errors"][0]["loc"] == ["logits"]
    out_of_range = {**good, "batch_id": "x", "targets": [0, 7, 1]}
    assert (await post(out_of_range, 422))["errors"][0]["loc"][0] == "targets"
    nan_logits = np.zeros((3, NUM_CLASSES))
    nan_logits[1, 2] = np.nan
    non_finite = {**good, "batch_id": "x", "logits": as_base64(nan_logits)}
    assert (await post(non_finite, 422))["errors"][0]["loc"] == ["logits", 1, 2]
    bad_weight = {**good, "batch_id": "x", "sample_weight": [1.0, -1.0, 1.0]}
    assert (await post(bad_weight, 422))["errors"][0]["loc"][0] == "sample_weight"
    bad_b64 = {
        **good,
        "batch_id": "x",
        "logits": {"dtype": "float64", "shape": [3, 5], "data": "@"},
    }
    assert (await post(bad_b64, 422))["errors"][0]["loc"] == ["logits", "data"]
    huge = {"batch_id": "x", "logits": {"dtype": "float32", "shape": [10_000, 5], "data": ""},
            "targets": [0]}  # fmt: skip
    await post(huge, 413)
    missing = await api.post("/v1/runs/run_missing/batches", json={**good, "batch_id": "x"})
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["loc"] == ["path", "run_id"]
    bad_json = await api.post(url, content=b"{nope", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert (
        await api.post(url, content=b"{}", headers={"content-type": "text/csv"})
    ).status_code == 415
    assert (await api.get(f"/v1/runs/{run['id']}")).json()["batches"] == 0


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"status": "running"}, ["query", "status"]),
        ({"limit": 0}, ["query", "limit"]),
        ({"limit": 501}, ["query", "limit"]),
        ({"limit": "ten"}, ["query", "limit"]),
        ({"cursor": "garbage!"}, ["query", "cursor"]),
        ({"cursor": "YmF0Y2hlczox"}, ["query", "cursor"]),  # another endpoint's cursor
        ({"tag": "novalue"}, ["query", "tag", 0]),
        ({"name": "x" * 201}, ["query", "name"]),
    ],
)
async def test_list_runs_rejects_bad_queries(api, params, loc):
    response = await api.get("/v1/runs", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == loc


async def test_batches_and_compare_reject_bad_queries(api):
    run = await create_run(api)
    series = f"/v1/runs/{run['id']}/batches"
    for params, loc in [
        ({"limit": 0}, ["query", "limit"]),
        ({"limit": 10_001}, ["query", "limit"]),
        ({"cursor": "cnVuczox"}, ["query", "cursor"]),
    ]:
        response = await api.get(series, params=params)
        assert response.status_code == 422, params
        assert response.json()["errors"][0]["loc"] == loc
    assert (await api.get("/v1/runs/compare")).json()["errors"][0]["loc"] == ["query", "ids"]
    for ids in ("", ",,", ",".join(f"r{i}" for i in range(21))):
        response = await api.get("/v1/runs/compare", params={"ids": ids})
        assert response.status_code == 422, ids
        assert response.json()["errors"][0]["loc"] == ["query", "ids"]
    for method, path in [
        ("GET", "/v1/runs/run_nope"),
        ("POST", "/v1/runs/run_nope/close"),
        ("DELETE", "/v1/runs/run_nope"),
        ("GET", "/v1/runs/run_nope/batches"),
    ]:
        response = await api.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["errors"][0]["loc"] == ["path", "run_id"]


# -------------------------------------------------------------------------------- store itself


def test_migrations_match_the_models(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from service.store.models import Base

    store = Store(database_url)
    store.upgrade()
    store.upgrade()  # idempotent
    assert store.current_revision() == "0005"
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    store.dispose()


def test_sqlite_file_is_created_with_its_directory_in_wal_mode(tmp_path):
    path = tmp_path / "nested" / "dir" / "ce-eval.db"
    store = Store(f"sqlite:///{path}")
    assert not path.parent.exists()  # nothing on disk before the first connection
    store.upgrade()
    assert path.exists()
    with store.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    store.dispose()


def test_postgres_urls_use_psycopg3():
    from service.store import normalize_url

    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_unreachable_store_is_503_not_500():
    port = free_port()
    settings = Settings(database_url=f"postgresql+psycopg://nobody@127.0.0.1:{port}/none")
    runs = RunsDataPlane(settings, Store(settings.database_url))
    with pytest.raises(Unavailable) as caught:
        runs.get_run("run_x")
    assert caught.value.status_code == 503
    assert caught.value.headers["Retry-After"] == "1"


# ---------------------------------------------------------------- data plane (RPC adapters)


def test_data_plane_takes_decoded_arrays_and_streams_of_batches(database_url, tmp_path):
    """What a gRPC servicer does: plain dicts with NumPy arrays, AddBatches as an iterator."""
    settings = Settings(database_url=database_url, backend="numpy", log_level="warning")
    store = Store(database_url)
    store.upgrade()
    runs = RunsDataPlane(settings, store)
    run = runs.create_run({"name": "rpc", "loss": "cross_entropy", "metrics": ["accuracy"]})
    batches = make_batches(12, [5, 9, 4])
    stream = [{"batch_id": f"s{i}", **b} for i, b in enumerate(batches)]
    summary = runs.add_batches(run["id"], [*stream, stream[0]])
    assert (summary["batches"], summary["accepted"], summary["duplicates"]) == (4, 3, 1)
    import ce_engine

    expected = ce_engine.evaluate(
        "cross_entropy",
        *(np.concatenate([b[k] for b in batches]) for k in ("logits", "targets")),
        sample_weight=np.concatenate([b["sample_weight"] for b in batches]),
        metrics=["accuracy"],
    )
    assert summary["run"]["batches"] == 3
    assert_close(summary["run"]["value"], expected.value)
    assert_close(summary["run"]["metrics"]["accuracy"], expected.metrics["accuracy"])
    assert runs.add_batches(run["id"], [])["run"]["batches"] == 3
    # Errors carry the status codes an RPC adapter maps (DESIGN §4).
    with pytest.raises(ServiceError) as conflict:
        runs.add_batch(run["id"], {**stream[1], "batch_id": "s0"})
    assert (conflict.value.status_code, conflict.value.grpc_code) == (409, "ALREADY_EXISTS")
    with pytest.raises(ServiceError) as missing:
        runs.get_run("run_nope")
    assert (missing.value.status_code, missing.value.grpc_code) == (404, "NOT_FOUND")
    runs.close_run(run["id"])
    with pytest.raises(ServiceError) as closed:
        runs.add_batch(run["id"], {**stream[1], "batch_id": "late"})
    assert (closed.value.status_code, closed.value.grpc_code) == (409, "FAILED_PRECONDITION")
    store.dispose()


@pytest.mark.parametrize("position", [-1, 2**63, 10**30])
async def test_out_of_range_cursors_are_422(api, position):
    cursor = base64.urlsafe_b64encode(f"runs:{position}".encode()).decode().rstrip("=")
    response = await api.get("/v1/runs", params={"cursor": cursor})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["query", "cursor"]


async def test_concurrent_batches_in_one_process_are_each_counted_once(api):
    """Many requests at once through the worker threads (SQLite: BEGIN IMMEDIATE)."""
    import asyncio

    batches = make_batches(13, [6] * 24)
    run = await create_run(api, metrics=["accuracy", "confusion_matrix"])
    sends = [i for i in range(len(batches)) for _ in range(2)]
    answers = await asyncio.gather(
        *(add(api, run["id"], f"c{i}", as_json(batches[i])) for i in sends)
    )
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers][:2]
    assert sum(not a.json()["duplicate"] for a in answers) == len(batches)
    got = (await api.get(f"/v1/runs/{run['id']}")).json()
    expected = await stateless(api, batches)
    assert got["batches"] == len(batches) and got["count"] == expected["count"]
    assert_close(got["value"], expected["value"])
    assert_close(got["metrics"]["accuracy"], expected["metrics"]["accuracy"])


@pytest.mark.postgres
async def test_lost_database_gives_503_and_not_ready(postgres_cluster: PostgresCluster):
    import psycopg

    url = postgres_cluster.create_database()
    app = create_app(Settings(database_url=url, log_level="warning"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        ready = await c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["store"] == "ok"
        run = await create_run(c)
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(
            f"host=127.0.0.1 port={postgres_cluster.port} user=postgres dbname=postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        for method, path in [("GET", f"/v1/runs/{run['id']}"), ("GET", "/v1/runs")]:
            response = await c.request(method, path)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
        batch = await add(c, run["id"], "x", as_json(make_batches(14, [3])[0]))
        assert batch.status_code == 503
        not_ready = await c.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["checks"]["store"].startswith("unreachable")


async def test_wrong_methods_are_405_problems(api):
    for method, path in [
        ("PUT", "/v1/runs"),
        ("PATCH", "/v1/runs/run_x"),
        ("GET", "/v1/runs/run_x/close"),
        ("DELETE", "/v1/runs/run_x/batches"),
        ("POST", "/metrics"),
        ("POST", "/dashboard"),
    ]:
        response = await api.request(method, path)
        assert response.status_code == 405, (method, path)
        assert response.headers["content-type"] == "application/problem+json"


async def test_openapi_documents_the_runs_api(api):
    schema = (await api.get("/openapi.json")).json()
    for path in ("/v1/runs", "/v1/runs/compare", "/v1/runs/{run_id}", "/v1/runs/{run_id}/batches",
                 "/v1/runs/{run_id}/close", "/metrics", "/dashboard"):  # fmt: skip
        assert path in schema["paths"], path
    body = schema["paths"]["/v1/runs/{run_id}/batches"]["post"]["requestBody"]
    assert "batch_id" in body["content"]["application/json"]["schema"]["required"]
    detail = schema["paths"]["/v1/runs/{run_id}/metrics/{name}"]["get"]
    params = {p["name"] for p in detail["parameters"]}
    assert {"normalize", "top", "classes", "sort", "order", "limit", "offset"} <= params
    assert "404" in detail["responses"] and "422" in detail["responses"]


def test_a_push_to_a_known_run_is_one_transaction_and_replicas_still_see_close_and_delete(
    database_url,
):
    """Pushes after the first skip the read (the run's configuration is kept per replica), yet
    a run closed or deleted through another replica is refused under the run's lock, with
    nothing counted; a run is found by its owner only, cached or not."""
    from sqlalchemy import event

    settings = Settings(database_url=database_url, backend="numpy", log_level="warning")
    stores = [Store(database_url) for _ in range(2)]
    stores[0].upgrade()
    one, two = (RunsDataPlane(settings, store) for store in stores)
    transactions: list[int] = []
    event.listen(stores[0].engine, "begin", lambda _connection: transactions.append(1))
    batches = make_batches(14, [6, 7, 5, 4])
    stream = [{"batch_id": f"b{i}", **b} for i, b in enumerate(batches)]

    run = one.create_run(
        {"name": "r", "loss": "cross_entropy", "metrics": ["accuracy"]}, principal="k1"
    )
    one.add_batch(run["id"], stream[0], principal="k1")
    transactions.clear()
    answer = one.add_batch(run["id"], stream[1], principal="k1")
    assert len(transactions) == 1
    counted = int(sum((b["targets"] != -100).sum() for b in batches[:2]))
    assert answer["run"]["batches"] == 2 and answer["run"]["count"] == counted
    assert answer["run"]["tags"] == {}
    with pytest.raises(ServiceError) as stranger:
        one.add_batch(run["id"], stream[2], principal="k2")
    assert stranger.value.status_code == 404

    two.close_run(run["id"], principal="k1")
    with pytest.raises(ServiceError) as closed:
        one.add_batch(run["id"], stream[2], principal="k1")
    assert closed.value.status_code == 409
    again = one.add_batch(run["id"], stream[1], principal="k1")  # a retry is still answered
    assert again["duplicate"] and again["run"]["batches"] == 2

    tagged = one.create_run(
        {"name": "t", "loss": "cross_entropy", "metrics": [], "tags": {"team": "a"}}
    )
    one.add_batch(tagged["id"], stream[0])
    assert one.add_batch(tagged["id"], stream[1])["run"]["tags"] == {"team": "a"}
    assert one.add_batch(tagged["id"], stream[1])["run"]["tags"] == {"team": "a"}  # replayed
    two.delete_run(tagged["id"])
    with pytest.raises(ServiceError) as deleted:
        one.add_batch(tagged["id"], stream[2])
    assert deleted.value.status_code == 404
    assert one.get_run(run["id"], principal="k1")["count"] == counted
    for store in stores:
        store.dispose()
