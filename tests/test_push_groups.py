"""Group commit of pushes (``RunsDataPlane.write_batches``): the pushes queued in the push
writer while a transaction runs are written by the next one together, and each gets what it
would have got alone, one after the other: the same answers, refusals, retries and closed or
unknown runs, and the same runs afterwards."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.config import Settings
from service.dataplane.runs import PreparedBatch, RunsDataPlane, _Unwritten
from service.errors import ServiceError
from service.store import Store
from tests.servers import PostgresCluster
from tests.test_push_writer import RUN, _locked_database, _plane, _pushes, planes  # noqa: F401
from tests.test_runs_details import batches
from tests.test_runs_push_cost import sqlite_statements

C = 12
TIMES = {"created_at", "updated_at", "closed_at"}
BIG = {"name": "big", "loss": "cross_entropy", "metrics": ["nll"]}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """Three databases: one to prepare batches in, one to write them one by one, one to write
    them as a group."""
    if request.param == "sqlite":
        return [f"sqlite:///{tmp_path / f'{name}.db'}" for name in ("scratch", "one", "group")]
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return [cluster.create_database() for _ in range(3)]


@pytest.fixture
def three(urls: list[str]) -> Iterator[list[RunsDataPlane]]:
    made = []
    for url in urls:
        store = Store(url)
        store.upgrade()
        settings = Settings(database_url=url, backend="numpy", log_level="warning")
        made.append(RunsDataPlane(settings, store))
    yield made
    for plane in made:
        plane.store.dispose()


def _heavy(seed: int) -> dict[str, Any]:
    """A batch whose loss sum is 1e308: finite, but two of them are not."""
    part = batches(seed, C, 1, rows=4)[0]
    z, y = part["logits"].astype(np.float64), part["targets"]
    top = z.max(axis=1)
    losses = top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - z[np.arange(4), y]
    return {**part, "logits": z, "sample_weight": np.full(4, 1e308 / losses.sum())}


def capture_prepared(plane: RunsDataPlane) -> list[PreparedBatch]:
    """The batches ``plane`` prepares from now on, in order (each written as before)."""
    made: list[PreparedBatch] = []
    write = plane._write

    def capture(batch: PreparedBatch) -> Any:
        made.append(batch)
        return write(batch)

    plane._write = capture  # type: ignore[method-assign]
    return made


def _prepared(scratch: RunsDataPlane) -> list[tuple[str, PreparedBatch]]:
    """(run role, prepared batch) pairs, made by pushing in ``scratch``: a full run's batches,
    one of them again (a retry), a closed run's batch, two heavy batches of which the second
    is refused (422), and an unknown run's batch."""
    made = capture_prepared(scratch)
    full, big, closed = (scratch.create_run(r)["id"] for r in (RUN, BIG, RUN))
    roles = {full: "full", big: "big", closed: "closed"}
    pushes = _pushes(21, 4)
    for run_id, body in [
        (full, pushes[0]),
        (full, pushes[1]),
        (closed, pushes[2]),
        (big, {"batch_id": "h0", **_heavy(5)}),
        (big, {"batch_id": "h1", **_heavy(6)}),
        (full, pushes[3]),
    ]:
        with contextlib.suppress(ServiceError):  # the second heavy batch: prepared all the same
            scratch.add_batch(run_id, dict(body))
    out = [(roles[b.run_id], b) for b in made]
    retry = out[0]
    missing = ("missing", replace(out[1][1], run_id="run_missing"))
    return [*out[:2], retry, *out[2:5], missing, out[5]]


def _runs(plane: RunsDataPlane) -> dict[str, str]:
    roles = {role: plane.create_run(r)["id"] for role, r in (("full", RUN), ("big", BIG))}
    roles["closed"] = plane.create_run(RUN)["id"]
    plane.close_run(roles["closed"])
    return {**roles, "missing": "run_missing"}


def _plain(outcome: Any, ids: dict[str, str]) -> Any:
    """An outcome with its run ids named by role and its times dropped."""
    if isinstance(outcome, ServiceError):
        return type(outcome).__name__, outcome.status_code, outcome.errors
    if not isinstance(outcome, dict | list):
        return outcome
    roles = {run_id: role for role, run_id in ids.items()}

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in TIMES}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return roles.get(value, value) if isinstance(value, str) else value

    return clean(outcome)


def test_a_group_writes_what_its_batches_write_one_by_one(three: list[RunsDataPlane]) -> None:
    scratch, one, group = three
    prepared = _prepared(scratch)
    assert len(prepared) == 8
    one_ids, group_ids = _runs(one), _runs(group)

    alone = []
    for role, batch in prepared:
        try:
            alone.append(one.write_batch(replace(batch, run_id=one_ids[role])))
        except ServiceError as exc:
            alone.append(exc)
    together = group.write_batches([replace(b, run_id=group_ids[r]) for r, b in prepared])

    assert [_plain(o, one_ids) for o in alone] == [_plain(o, group_ids) for o in together]
    kinds = [o["seq"] if isinstance(o, dict) else getattr(o, "status_code", o) for o in together]
    assert kinds == [1, 2, _Unwritten.STORED, _Unwritten.CLOSED, 1, 422, 404, 3]
    for role in ("full", "big", "closed"):
        a, b = one.get_run(one_ids[role]), group.get_run(group_ids[role])
        assert _plain(a, one_ids) == _plain(b, group_ids)
        batches_a = one.list_batches(one_ids[role])["batches"]
        batches_b = group.list_batches(group_ids[role])["batches"]
        assert _plain(batches_a, one_ids) == _plain(batches_b, group_ids)
    full = [
        p.run_metric(ids["full"], "confusion_matrix")
        for p, ids in ((one, one_ids), (group, group_ids))
    ]
    assert _plain(full[0], one_ids) == _plain(full[1], group_ids)
    slices = [p.run_slices(ids["full"], "split") for p, ids in ((one, one_ids), (group, group_ids))]
    assert _plain(slices[0], one_ids) == _plain(slices[1], group_ids)


def test_pushes_queued_behind_a_transaction_share_the_next_one(
    planes: tuple[RunsDataPlane, RunsDataPlane],  # noqa: F811
) -> None:
    """The database's write lock held elsewhere: the first push waits for it in the writer,
    seven more queue meanwhile, one of them a second copy of another (a client's retry);
    once the lock is released they are written in one transaction, each exactly once with
    its own answer, and the copy is answered as a duplicate."""
    _, plane = planes
    writer = plane.writer
    assert writer is not None
    run_id = plane.create_run(RUN)["id"]
    pushes = _pushes(22, 8)
    plane.add_batch(run_id, dict(pushes[0]))  # starts the writer
    assert (writer.transactions, writer.batches) == (1, 1)
    answers: list[Any] = []

    def push(body: dict[str, Any]) -> None:
        answers.append(plane.add_batch(run_id, dict(body)))

    lock = _locked_database(plane)
    threads = [threading.Thread(target=push, args=(pushes[1],))]
    try:
        threads[0].start()
        time.sleep(0.5)  # in the writer, waiting for the lock
        threads += [threading.Thread(target=push, args=(p,)) for p in [*pushes[2:], pushes[2]]]
        for thread in threads[1:]:
            thread.start()
        deadline = time.monotonic() + 10
        while len(writer._queue) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(writer._queue) == 7
    finally:
        lock.rollback()
        lock.close()
    for thread in threads:
        thread.join(30)
    assert (writer.transactions, writer.batches) == (3, 9)
    accepted = [a for a in answers if not a["duplicate"]]
    (again,) = [a for a in answers if a["duplicate"]]
    assert sorted(a["seq"] for a in accepted) == list(range(2, 9))
    (twin,) = [a for a in accepted if a["batch_id"] == again["batch_id"] == "b2"]
    assert again["seq"] == twin["seq"] and again["batch"] == twin["batch"]
    run = plane.get_run(run_id)
    assert run["batches"] == 8 and run["count"] == 8 * 24


def test_a_group_locks_its_runs_first_in_id_order(
    planes: tuple[RunsDataPlane, RunsDataPlane],  # noqa: F811
) -> None:
    """Two replicas' groups holding the same runs lock them in the same order (no deadlock):
    every run of a group is locked before its first batch row, by id."""
    plane, _ = planes
    made = capture_prepared(plane)
    ids = [plane.create_run(RUN)["id"] for _ in range(3)]
    for run_id, body in zip(ids, _pushes(23, 3), strict=True):
        plane.add_batch(run_id, dict(body))
    traced = sqlite_statements(plane.store.engine)
    group = [replace(b, batch_id=f"again-{i}") for i, b in enumerate(reversed(made))]
    outcomes = plane.write_batches(group)
    assert [o["seq"] for o in outcomes if isinstance(o, dict)] == [2, 2, 2]
    statements = [statement.split()[0] for statement in traced]
    locked = [
        re.search(r"runs\.id = '([^']+)'", s).group(1)  # type: ignore[union-attr]
        for s in traced
        if s.startswith("SELECT runs.pk")
    ]
    assert locked == sorted(ids)
    assert statements.index("INSERT") > statements.index("SELECT") + 2


def test_a_group_that_fails_as_a_whole_is_written_again_one_by_one(
    planes: tuple[RunsDataPlane, RunsDataPlane],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in one push's statements rolls its group back: the writer writes the group's
    pushes again one at a time, so that only that push fails (500) and the others are
    stored once."""
    from service.dataplane import push_writer

    plane, _ = planes
    made = capture_prepared(plane)
    run_id = plane.create_run(RUN)["id"]
    plane.add_batch(run_id, dict(_pushes(24, 1)[0]))
    group = [replace(made[0], batch_id=f"g{i}") for i in range(3)]
    add = RunsDataPlane._add_to_run

    def failing(self: RunsDataPlane, session: Any, run: Any, batch: PreparedBatch) -> Any:
        if batch.batch_id == "g1":
            raise RuntimeError("injected")
        return add(self, session, run, batch)

    monkeypatch.setattr(RunsDataPlane, "_add_to_run", failing)
    replies = push_writer._write(plane, group)
    assert [r[0] for r in replies] == ["ok", "crash", "ok"]
    assert "injected" in replies[1][1]
    assert [r[1]["seq"] for r in (replies[0], replies[2])] == [2, 3]
    run = plane.get_run(run_id)
    assert run["batches"] == 3 and run["count"] == 3 * 24
