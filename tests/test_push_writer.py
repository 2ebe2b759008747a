"""Batch pushes written by the push writer's process (``CE_EVAL_PUSH_WRITER``): the same
answers and aggregates as transactions in the server's threads, exactly once through retries,
errors carried back as the service's, and a writer that dies costing one 503."""

from __future__ import annotations

import logging
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


def _started(
    planes: tuple[RunsDataPlane, RunsDataPlane], seed: int, count: int
) -> tuple[RunsDataPlane, PushWriter, str, list[dict[str, Any]]]:
    """The writer's plane, its writer, a run, and ``count`` pushes of which the first is in
    (so the writer runs)."""
    _, plane = planes
    writer = plane.writer
    assert writer is not None
    run_id = plane.create_run(RUN)["id"]
    pushes = _pushes(seed, count)
    plane.add_batch(run_id, dict(pushes[0]))
    assert writer._worker is not None
    return plane, writer, run_id, pushes


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
    plane, writer, run_id, pushes = _started(planes, 7, 4)
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
    plane, writer, run_id, pushes = _started(planes, 8, 2)
    assert writer._worker is not None
    process = writer._worker[0]
    writer.close()
    assert process.poll() == 0
    with pytest.raises(Unavailable, match="shutting down"):
        plane.add_batch(run_id, dict(pushes[1]))


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


def _locked_database(plane: RunsDataPlane) -> Any:
    """A connection of the test's own holding the SQLite write lock of ``plane``'s database
    (``rollback()`` releases it)."""
    database = plane.store.url.database
    assert database is not None
    return _locked_file(database)


def _locked_file(database: str | Path) -> Any:
    """A connection holding the write lock of the SQLite file ``database``."""
    import sqlite3

    connection = sqlite3.connect(database, isolation_level=None, timeout=30)
    connection.execute("BEGIN IMMEDIATE")
    return connection


def test_a_push_waits_for_the_writer_at_most_its_timeout(
    planes: tuple[RunsDataPlane, RunsDataPlane],
) -> None:
    """The database's write lock held elsewhere past the writer's timeout: that push is a
    503 within the timeout (the writer killed, nothing stored), the next one finds a new
    writer, and the batch counts once."""
    import time

    plane, writer, run_id, pushes = _started(planes, 10, 2)
    writer.timeout = 1.0
    lock = _locked_database(plane)
    began = time.monotonic()
    try:
        with pytest.raises(Unavailable, match="push writer died") as info:
            plane.add_batch(run_id, dict(pushes[1]))
    finally:
        lock.rollback()
        lock.close()
    assert time.monotonic() - began < 10 and info.value.headers["Retry-After"] == "1"
    assert plane.add_batch(run_id, dict(pushes[1]))["duplicate"] is False
    assert plane.get_run(run_id)["batches"] == 2


def test_close_with_a_push_in_flight_kills_the_writer_and_starts_no_other(
    planes: tuple[RunsDataPlane, RunsDataPlane],
) -> None:
    import threading
    import time

    plane, writer, run_id, pushes = _started(planes, 11, 3)
    process = writer._worker[0]
    lock = _locked_database(plane)
    answers: list[Any] = []

    def push(batch: dict[str, Any]) -> None:
        try:
            answers.append(plane.add_batch(run_id, dict(batch)))
        except Exception as exc:
            answers.append(exc)

    try:
        in_flight = threading.Thread(target=push, args=(pushes[1],), daemon=True)
        in_flight.start()
        time.sleep(0.5)  # waiting for the database, in the writer
        began = time.monotonic()
        writer.close(wait=0.5)
        assert time.monotonic() - began < 5
        in_flight.join(30)
    finally:
        lock.rollback()
        lock.close()
    assert len(answers) == 1 and isinstance(answers[0], Unavailable)
    assert process.poll() is not None and writer._worker is None
    with pytest.raises(Unavailable, match="shutting down"):
        plane.add_batch(run_id, dict(pushes[2]))
    assert writer._worker is None


def test_an_integrity_error_other_than_the_batch_key_is_no_retry(
    planes: tuple[RunsDataPlane, RunsDataPlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the batch row's unique key makes a push a retry; any other constraint failing in
    the transaction is an error of its own (500), not an endless "retry" answer."""
    from sqlalchemy.exc import IntegrityError

    from service.store import pushes as store_pushes

    plane, _ = planes
    run_id = plane.create_run(RUN)["id"]

    def failing(*_args: Any) -> None:
        raise IntegrityError("INSERT INTO confusion_blocks", {}, Exception("PRIMARY KEY"))

    monkeypatch.setattr(store_pushes, "add_block", failing)
    with pytest.raises(IntegrityError, match="confusion_blocks"):
        plane.add_batch(run_id, dict(_pushes(12, 1)[0]))
    monkeypatch.undo()
    assert plane.get_run(run_id)["batches"] == 0


def test_a_run_deleted_after_its_closed_answer_drops_the_cached_config(
    planes: tuple[RunsDataPlane, RunsDataPlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    plane, _ = planes
    run_id = plane.create_run(RUN)["id"]
    first, second = _pushes(13, 2)
    plane.add_batch(run_id, dict(first))
    other = RunsDataPlane(plane.settings, plane.store)  # another replica closes, then deletes
    other.close_run(run_id)
    write = RunsDataPlane.write_batch

    def then_deleted(self: RunsDataPlane, batch: Any) -> Any:
        outcome = write(self, batch)
        other.delete_run(run_id)
        return outcome

    monkeypatch.setattr(RunsDataPlane, "write_batch", then_deleted)
    assert plane.configs.get(run_id) is not None
    with pytest.raises(NotFound):
        plane.add_batch(run_id, dict(second))
    assert plane.configs.get(run_id) is None


async def test_serve_closes_the_workers_after_grpc_not_the_lifespan(tmp_path: Path) -> None:
    """With gRPC served, the lifespan's shutdown leaves the workers to ``ce-eval serve``,
    which stops them once gRPC's grace period is over (its pushes still write)."""
    from service.http.app import create_app

    url = f"sqlite:///{tmp_path / 'lifespan.db'}"
    app = create_app(Settings(database_url=url, log_level="warning", push_writer=True))
    writer = app.state.runs.writer
    app.state.serve_closes_workers = True
    async with app.router.lifespan_context(app):
        pass
    assert not writer._closed
    app.state.close_workers()
    assert writer._closed


def test_a_writer_that_cannot_start_leaves_pushes_to_the_servers_threads(
    planes: tuple[RunsDataPlane, RunsDataPlane],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its interpreter exits before it is ready (injected by a ``sitecustomize`` that only
    new processes import): pushes are stored all the same, in the server's threads, and the
    server says why once."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    _, plane = planes
    run_id = plane.create_run(RUN)["id"]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ce_eval.runs")
    logger.addHandler(handler)
    try:
        for push in _pushes(14, 2):
            assert plane.add_batch(run_id, dict(push))["duplicate"] is False
    finally:
        logger.removeHandler(handler)
    assert plane.writer is None and plane.get_run(run_id)["batches"] == 2
    assert [r.getMessage() for r in records] == [
        "push writer could not start: pushes write in the server's threads"
    ]


@pytest.mark.parametrize("writer", [False, True], ids=["threads", "writer"])
async def test_a_push_waiting_for_the_database_holds_no_compute_thread(
    tmp_path: Path, writer: bool
) -> None:
    """One compute thread, and the database's write lock held elsewhere: a push waits for
    it, and an evaluation sent meanwhile is answered before the lock is released (the push
    waits in a thread of its own, not in the compute thread)."""
    import asyncio
    import base64

    from service.http.app import create_app

    def b64(array: np.ndarray) -> dict[str, Any]:
        data = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()
        return {"dtype": str(array.dtype), "shape": list(array.shape), "data": data}

    database = tmp_path / "runs.db"
    settings = Settings(
        database_url=f"sqlite:///{database}",
        backend="numpy",
        log_level="warning",
        compute_threads=1,
        push_writer=writer,
    )
    app = create_app(settings)
    part = batches(30, C, 2, rows=8)
    big = batches(31, 64, 1, rows=512)[0]  # over INLINE_ELEMENTS: runs in a compute thread
    evaluation = {
        "loss": "cross_entropy",
        "logits": b64(big["logits"]),
        "targets": b64(big["targets"]),
    }
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as api,
    ):
        created = await api.post("/v1/runs", json={"name": "wait", "loss": "cross_entropy"})
        path = f"/v1/runs/{created.json()['id']}/batches"

        def push(i: int) -> Any:
            body = {"batch_id": f"b{i}", **{k: b64(v) for k, v in part[i].items()}}
            return api.post(path, json=body)

        assert (await push(0)).status_code == 200  # (the writer started)
        lock = _locked_file(database)
        try:
            pushing = asyncio.ensure_future(push(1))
            await asyncio.sleep(0.5)
            assert not pushing.done()
            answer = await asyncio.wait_for(api.post("/v1/evaluate", json=evaluation), 10)
            assert answer.status_code == 200, answer.text
            assert not pushing.done()
        finally:
            lock.rollback()
            lock.close()
        pushed = await asyncio.wait_for(pushing, 30)
        assert pushed.status_code == 200 and pushed.json()["seq"] == 2
