"""Runs are scoped to the API key that created them (auth on); unchanged with auth off.

Two keys on one real app (SQLite file and PostgreSQL): every runs operation by the other key
answers 404 exactly as for a run that does not exist.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from service.auth import key_id
from service.config import Settings
from service.http.app import create_app
from service.store import Store
from tests.servers import PostgresCluster
from tests.test_runs import as_json, make_batches

KEY_A = "key-a-0123456789"
KEY_B = "key-b-9876543210"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database()


async def _client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        database_url=database_url, api_keys=f"{KEY_A},{KEY_B}", log_level="warning", backend="numpy"
    )
    async for client in _client(settings):
        yield client


def as_a() -> dict[str, str]:
    return {"X-API-Key": KEY_A}


def as_b() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY_B}"}


async def create(api: httpx.AsyncClient, headers: dict[str, str], name: str) -> dict[str, Any]:
    body = {"name": name, "loss": "cross_entropy", "metrics": ["accuracy"], "tags": {"t": "x"}}
    response = await api.post("/v1/runs", json=body, headers=headers)
    assert response.status_code == 201, response.text
    run: dict[str, Any] = response.json()
    return run


def batch(batch_id: str, seed: int = 1) -> dict[str, Any]:
    return {"batch_id": batch_id, **as_json(make_batches(seed, [4])[0])}


def assert_not_found(response: httpx.Response, loc: list[Any]) -> None:
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["loc"] == loc


async def test_another_key_gets_404_for_every_runs_operation(api):
    run = await create(api, as_a(), "a-run")
    assert (
        await api.post(f"/v1/runs/{run['id']}/batches", json=batch("0"), headers=as_a())
    ).is_success
    other = await create(api, as_b(), "b-run")
    run_path = f"/v1/runs/{run['id']}"

    # Exactly the answers of a run that does not exist (same status, same error location).
    for method, path, body in [
        ("GET", run_path, None),
        ("GET", f"{run_path}/batches", None),
        ("POST", f"{run_path}/batches", batch("1")),
        ("POST", f"{run_path}/batches", batch("0")),  # even a replay of an accepted batch
        ("POST", f"{run_path}/close", None),
        ("DELETE", run_path, None),
    ]:
        response = await api.request(method, path, json=body, headers=as_b())
        missing = await api.request(
            method, path.replace(run["id"], "run_missing"), json=body, headers=as_b()
        )
        assert_not_found(response, ["path", "run_id"])
        assert response.json()["detail"] == missing.json()["detail"].replace(
            "run_missing", run["id"]
        )
    compare = await api.get("/v1/runs/compare", params={"ids": f"{other['id']},{run['id']}"},
                            headers=as_b())  # fmt: skip
    assert_not_found(compare, ["query", "ids", 1])
    assert run["id"] in compare.json()["detail"] and other["id"] not in compare.json()["detail"]

    listed_b = (await api.get("/v1/runs", params={"tag": "t:x"}, headers=as_b())).json()
    assert [r["id"] for r in listed_b["runs"]] == [other["id"]]
    listed_a = (await api.get("/v1/runs", headers=as_a())).json()
    assert [r["id"] for r in listed_a["runs"]] == [run["id"]]

    # Nothing the other key did changed the run.
    mine = (await api.get(run_path, headers=as_a())).json()
    assert (mine["status"], mine["batches"]) == ("open", 1)
    series = (await api.get(f"{run_path}/batches", headers=as_a())).json()["batches"]
    assert [b["batch_id"] for b in series] == ["0"]
    # The owner itself can do everything.
    assert (await api.post(f"{run_path}/batches", json=batch("1", 2), headers=as_a())).is_success
    assert (await api.get("/v1/runs/compare", params={"ids": run["id"]},
                          headers=as_a())).status_code == 200  # fmt: skip
    closed = await api.post(f"{run_path}/close", headers=as_a())
    assert closed.json()["status"] == "closed"
    assert (await api.delete(run_path, headers=as_a())).status_code == 204
    assert (await api.get(f"/v1/runs/{other['id']}", headers=as_b())).status_code == 200


async def test_runs_need_a_valid_key_when_auth_is_on(api):
    assert (await api.get("/v1/runs")).status_code == 401
    assert (await api.get("/v1/runs", headers={"X-API-Key": "wrong"})).status_code == 403
    assert (await api.get("/dashboard")).status_code == 200  # public: it asks for a key itself
    assert (await api.get("/static/dashboard/dashboard.js")).status_code == 200


async def test_owner_is_the_key_id_and_never_the_key(api, database_url):
    run = await create(api, as_a(), "owned")
    store = Store(database_url)
    with store.engine.connect() as connection:
        owner = connection.execute(
            text("SELECT owner FROM runs WHERE id = :id"), {"id": run["id"]}
        ).scalar()
    store.dispose()
    assert owner == key_id(KEY_A) and KEY_A not in owner
    assert "owner" not in run


async def test_auth_off_sees_every_run_including_owned_ones(database_url):
    """Runs made with auth on stay reachable to an operator who turns auth off (no owner check),
    and runs made with auth off have no owner, so no key sees them later."""
    keyed = Settings(database_url=database_url, api_keys=KEY_A, log_level="warning")
    async for api in _client(keyed):
        owned = await create(api, as_a(), "owned")
    async for api in _client(Settings(database_url=database_url, log_level="warning")):
        unowned = await create(api, {}, "unowned")
        listed = (await api.get("/v1/runs")).json()["runs"]
        assert [r["id"] for r in listed] == [unowned["id"], owned["id"]]
        assert (await api.get(f"/v1/runs/{owned['id']}")).status_code == 200
        compare = await api.get(
            "/v1/runs/compare", params={"ids": f"{owned['id']},{unowned['id']}"}
        )
        assert compare.status_code == 200
    async for api in _client(keyed):
        assert (await api.get(f"/v1/runs/{unowned['id']}", headers=as_a())).status_code == 404
        listed = (await api.get("/v1/runs", headers=as_a())).json()["runs"]
        assert [r["id"] for r in listed] == [owned["id"]]


def test_migration_0002_keeps_existing_runs_without_an_owner(database_url):
    store = Store(database_url)
    store.upgrade("0001")
    with store.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO runs (id, name, status, loss, options, metrics_requested, created_at,"
                " updated_at, batches, count, ignored, sum, denominator) VALUES ('run_old', 'old',"
                " 'open', 'cross_entropy', '{}', '[]', '2026-01-01T00:00:00Z',"
                " '2026-01-01T00:00:00Z', 0, 0, 0, 0.0, 0.0)"
            )
        )
    store.upgrade()
    assert store.current_revision() == "0005"
    with store.engine.connect() as connection:
        assert connection.execute(text("SELECT id, owner FROM runs")).all() == [("run_old", None)]
    from alembic import command

    from service.store import alembic_config

    with store.engine.begin() as connection:  # and back
        command.downgrade(alembic_config(connection), "0001")
    with store.engine.connect() as connection:
        assert connection.execute(text("SELECT id FROM runs")).all() == [("run_old",)]
    store.dispose()


def test_cli_sends_its_api_key(tmp_path, serve, monkeypatch):
    from tests.test_runs_e2e import cli

    server = serve(f"sqlite:///{tmp_path / 'runs.db'}", CE_EVAL_API_KEYS=f"{KEY_A},{KEY_B}")
    server.start()
    created = cli("run", "create", "--url", server.url, "--api-key", KEY_A, "--name", "mine",
                  "--id-only")  # fmt: skip
    assert created.returncode == 0, created.stderr
    run_id = created.stdout.strip()
    monkeypatch.setenv("CE_EVAL_API_KEY", KEY_A)  # the environment variable works too
    shown = cli("run", "show", "--url", server.url, run_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["name"] == "mine"
    other = cli("run", "show", "--url", server.url, "--api-key", KEY_B, run_id)
    assert other.returncode == 1 and "404" in other.stderr
    monkeypatch.delenv("CE_EVAL_API_KEY")
    anonymous = cli("run", "list", "--url", server.url, "--retries", "0")
    assert anonymous.returncode == 1 and "401" in anonymous.stderr


def test_data_plane_scopes_by_the_principal_an_adapter_passes(tmp_path):
    """What a gRPC servicer does: the principal from its interceptor, as a keyword."""
    from service.dataplane.runs import RunsDataPlane
    from service.errors import NotFound

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = Store(url)
    store.upgrade()
    runs = RunsDataPlane(Settings(database_url=url, backend="numpy"), store)
    run = runs.create_run({"name": "rpc", "loss": "cross_entropy"}, principal="p1")
    stream = [batch(f"s{i}", i) for i in range(3)]
    assert runs.add_batches(run["id"], stream, principal="p1")["accepted"] == 3
    calls = [
        lambda p: runs.get_run(run["id"], principal=p),
        lambda p: runs.list_batches(run["id"], principal=p),
        lambda p: runs.add_batches(run["id"], stream, principal=p),
        lambda p: runs.add_batch(run["id"], stream[0], principal=p),
        lambda p: runs.compare([run["id"]], principal=p),
        lambda p: runs.close_run(run["id"], principal=p),
        lambda p: runs.delete_run(run["id"], principal=p),
    ]
    for call in calls:
        with pytest.raises(NotFound) as caught:
            call("p2")
        assert caught.value.grpc_code == "NOT_FOUND"
    assert runs.list_runs(principal="p2")["runs"] == []
    assert [r["id"] for r in runs.list_runs(principal="p1")["runs"]] == [run["id"]]
    assert runs.get_run(run["id"])["batches"] == 3  # principal None: auth off, all visible
    for call in calls:
        call("p1")
    store.dispose()
