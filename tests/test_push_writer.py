"""Batch pushes written by the push writer's process (``CE_EVAL_PUSH_WRITER``): the same
answers and aggregates as transactions in the server's threads, exactly once through retries,
errors carried back as the service's, and a writer that dies costing one 503."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.config import Settings
from service.dataplane.push_writer import PushWriter
from service.dataplane.runs import RunsDataPlane
from service.errors import Conflict, NonFiniteResult, NotFound, Unavailable
from service.store import Store
from tests.servers import start_serve
from tests.test_runs_details import batches

C = 12
#: A run with every kind of state a push carries: metrics, the confusion matrix, bootstrap
#: replicates, slices.
RUN = {
    "name": "writer",
    "loss": "cross_entropy",
    "options": {"max_confusion_classes": C},
    "metrics": ["accuracy", "nll", "ece", "confusion_matrix"],
    "confidence": {"replicates": 20, "seed": 3},
    "slice_keys": ["split"],
}


def _plane(tmp_path: Path, name: str, writer: bool) -> tuple[Store, RunsDataPlane]:
    url = f"sqlite:///{tmp_path / f'{name}.db'}"
    settings = Settings(database_url=url, backend="numpy", log_level="warning", push_writer=writer)
    store = Store(url)
    store.upgrade()
    return store, RunsDataPlane(settings, store, writer=PushWriter(settings) if writer else None)


@pytest.fixture
def planes(tmp_path: Path) -> Iterator[tuple[RunsDataPlane, RunsDataPlane]]:
    """(in the server's threads, through the writer) on two databases."""
    made = [_plane(tmp_path, "threads", False), _plane(tmp_path, "writer", True)]
    yield made[0][1], made[1][1]
    for store, runs in made:
        if runs.writer is not None:
            runs.writer.close()
        store.dispose()


def _pushes(seed: int, count: int) -> list[dict[str, Any]]:
    out = []
    for i, part in enumerate(batches(seed, C, count, rows=24)):
        ids = [f"b{i}-{k}" for k in range(24)]
        split = ["train" if k % 3 else "test" for k in range(24)]
        out.append({"batch_id": f"b{i}", **part, "example_ids": ids, "slices": {"split": split}})
    return out


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _without_times(v)
            for k, v in value.items()
            if k not in ("id", "run_id", "created_at", "updated_at")
        }
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_the_writer_answers_as_the_servers_threads(
    planes: tuple[RunsDataPlane, RunsDataPlane],
) -> None:
    """Every push answer, the run, its slices and its confusion matrix: equal, value for
    value, with the writer's process and without it."""
    pushes = _pushes(4, 5)
    answers, runs = [], []
    for plane in planes:
        run_id = plane.create_run(RUN)["id"]
        answers.append([_without_times(plane.add_batch(run_id, dict(p))) for p in pushes])
        retry = plane.add_batch(run_id, dict(pushes[1]))
        assert retry["duplicate"] is True
        runs.append(
            (
                _without_times(plane.get_run(run_id)),
                _without_times(plane.run_slices(run_id, "split")),
                plane.run_metric(run_id, "confusion_matrix")["matrix"],
            )
        )
    assert answers[0] == answers[1]
    assert runs[0] == runs[1]
    assert runs[1][0]["batches"] == 5 and runs[1][0]["count"] == 5 * 24


def test_retries_closed_and_unknown_runs_through_the_writer(
    planes: tuple[RunsDataPlane, RunsDataPlane],
) -> None:
    _, plane = planes
    run_id = plane.create_run(RUN)["id"]
    first, second = _pushes(5, 2)
    accepted = plane.add_batch(run_id, dict(first))
    again = plane.add_batch(run_id, dict(first))
    assert again["duplicate"] is True and again["batch"] == accepted["batch"]
    other = {**first, "targets": (first["targets"] + 1) % C}
    with pytest.raises(Conflict, match="batch_id"):
        plane.add_batch(run_id, other)
    plane.close_run(run_id)
    with pytest.raises(Conflict) as closed:
        plane.add_batch(run_id, dict(second))
    assert closed.value.errors[0]["type"] == "run_closed"
    assert plane.add_batch(run_id, dict(first))["duplicate"] is True
    assert plane.get_run(run_id)["batches"] == 1
    plane.configs.put("run_gone", plane.configs.get(run_id))  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        plane.add_batch("run_gone", dict(second))
    assert plane.configs.get("run_gone") is None


def test_an_error_in_the_writers_transaction_comes_back_as_the_services(
    planes: tuple[RunsDataPlane, RunsDataPlane],
) -> None:
    """The second batch would take the run's loss sum past float64 (checked under the run's
    lock): 422 with its field, and nothing of it stored."""
    _, plane = planes
    run_id = plane.create_run({"name": "big", "loss": "cross_entropy", "metrics": ["nll"]})["id"]
    part = batches(6, C, 1, rows=4)[0]
    z, y = part["logits"].astype(np.float64), part["targets"]
    top = z.max(axis=1)
    losses = top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - z[np.arange(4), y]
    weight = 1e308 / losses.sum()  # the batch's loss sum: 1e308, finite; two of them: not
    heavy = {**part, "logits": z, "sample_weight": np.full(4, weight)}
    plane.add_batch(run_id, {"batch_id": "a", **heavy})
    with pytest.raises(NonFiniteResult) as info:
        plane.add_batch(run_id, {"batch_id": "b", **heavy})
    assert info.value.status_code == 422
    assert "the run's sum would become" in info.value.errors[0]["msg"]
    assert plane.get_run(run_id)["batches"] == 1


def test_a_writer_that_dies_costs_one_503_and_each_batch_counts_once(
    planes: tuple[RunsDataPlane, RunsDataPlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while idle: the next push starts a new one. Killed with a push in flight: that
    push is a 503, its retry is answered (stored once), the next push finds a new writer."""
    _, plane = planes
    writer = plane.writer
    assert writer is not None
    run_id = plane.create_run(RUN)["id"]
    pushes = _pushes(7, 4)
    plane.add_batch(run_id, dict(pushes[0]))
    assert writer._worker is not None
    os.kill(writer._worker[0].pid, signal.SIGKILL)
    writer._worker[0].wait(10)
    plane.add_batch(run_id, dict(pushes[1]))  # a new writer
    send = type(writer._worker[1]).send

    def send_then_die(conn: Any, message: Any) -> None:
        send(conn, message)
        assert writer._worker is not None
        os.kill(writer._worker[0].pid, signal.SIGKILL)

    monkeypatch.setattr(type(writer._worker[1]), "send", send_then_die)
    with pytest.raises(Unavailable, match="push writer died") as info:
        plane.add_batch(run_id, dict(pushes[2]))
    assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "1"
    monkeypatch.undo()
    plane.add_batch(run_id, dict(pushes[2]))  # the retry: stored once, whatever happened
    plane.add_batch(run_id, dict(pushes[3]))
    run = plane.get_run(run_id)
    assert run["batches"] == 4 and run["count"] == 4 * 24


def test_close_stops_the_writer_and_later_pushes_are_503(
    planes: tuple[RunsDataPlane, RunsDataPlane],
) -> None:
    _, plane = planes
    writer = plane.writer
    assert writer is not None
    run_id = plane.create_run(RUN)["id"]
    plane.add_batch(run_id, dict(_pushes(8, 1)[0]))
    assert writer._worker is not None
    process = writer._worker[0]
    writer.close()
    assert process.poll() == 0
    with pytest.raises(Unavailable, match="shutting down"):
        plane.add_batch(run_id, dict(_pushes(9, 1)[0]))


def test_served_pushes_go_through_the_writer() -> None:
    server = start_serve({"CE_EVAL_PUSH_WRITER": "true"})
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            run = http.post("/v1/runs", json={"name": "s", "loss": "cross_entropy"}).json()
            rng = np.random.default_rng(1)
            for i in range(3):
                body = {
                    "batch_id": f"b{i}",
                    "logits": rng.standard_normal((4, 3)).tolist(),
                    "targets": rng.integers(0, 3, 4).tolist(),
                }
                r = http.post(f"/v1/runs/{run['id']}/batches", json=body)
                assert r.status_code == 200, r.text
            assert http.get(f"/v1/runs/{run['id']}").json()["count"] == 12
        assert server.process is not None
        assert any("service.dataplane.push_writer" in c for c in _children(server.process.pid))
    finally:
        server.stop()
    assert "push writer died" not in server.log()


def _children(pid: int) -> list[str]:
    """Command lines of ``pid``'s child processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.parametrize(
    "url", ["sqlite:///:memory:", "sqlite:///file:writer?mode=memory&cache=shared&uri=true"]
)
async def test_a_database_in_memory_keeps_its_pushes_in_the_server(url: str) -> None:
    """Another process would open another, empty database: no writer there."""
    from service.http.app import create_app

    settings = Settings(database_url=url, backend="numpy", log_level="warning", push_writer=True)
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        run = (await c.post("/v1/runs", json={"name": "m", "loss": "cross_entropy"})).json()
        body = {"batch_id": "a", "logits": [[0.0, 1.0], [2.0, 0.5]], "targets": [1, 0]}
        r = await c.post(f"/v1/runs/{run['id']}/batches", json=body)
        assert r.status_code == 200, r.text
        assert (await c.get(f"/v1/runs/{run['id']}")).json()["count"] == 2
    assert app.state.runs.writer is None
