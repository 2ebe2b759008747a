"""What a batch push costs the store: the statements of its one write transaction, and a
retry answered from the store without writing anything."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, event

from service.store import Store
from tests.test_runs_details import batches, runs_plane


def sqlite_statements(engine: Engine) -> list[str]:
    """The SQL a SQLite engine's connections run from now on, as SQLite runs it (parameters
    inlined; the transaction control too): seen by the database, whichever way a statement
    was sent (``Connection.execute`` or :mod:`service.store.prepared`'s DBAPI cursor)."""
    statements: list[str] = []

    @event.listens_for(engine, "checkout")
    def trace(dbapi_connection: Any, *_args: Any) -> None:
        dbapi_connection.set_trace_callback(statements.append)

    return statements


@pytest.fixture
def recorded(tmp_path: Any) -> Iterator[tuple[Store, Any, list[str]]]:
    """A SQLite store, its runs data plane, and the SQL statements it runs from now on."""
    store, runs = runs_plane(f"sqlite:///{tmp_path / 'runs.db'}")
    yield store, runs, sqlite_statements(store.engine)
    store.dispose()


def _heads(statements: list[str]) -> list[str]:
    """Each statement's first three words."""
    return [" ".join(statement.split()[:3]) for statement in statements]


def _run(runs: Any, metrics: list[str], c: int) -> str:
    options = {"max_confusion_classes": c} if "confusion_matrix" in metrics else {}
    body = {"name": "cost", "loss": "cross_entropy", "options": options, "metrics": metrics}
    return str(runs.create_run(body)["id"])


#: A confusion run's push also appends the batch's cells and checks whether a merge is due.
CELLS = ["INSERT INTO confusion_blocks", "SELECT coalesce(sum(cells), 0),"]


@pytest.mark.parametrize(
    "metrics, extra",
    [(["accuracy", "nll", "ece"], []), (["accuracy", "confusion_matrix"], CELLS)],
    ids=["scalar", "confusion"],
)
def test_a_push_to_a_known_run_is_one_transaction_of_few_statements(
    recorded: tuple[Store, Any, list[str]], metrics: list[str], extra: list[str]
) -> None:
    """Lock the run's row, insert the batch (its unique key finds a retry), update the totals:
    no lookup of the batch id before the insert."""
    _, runs, statements = recorded
    c = 12
    run_id = _run(runs, metrics, c)
    first, second = batches(1, c, 2, rows=16)
    runs.add_batch(run_id, {"batch_id": "a", **first})  # the run's configuration is cached now
    statements.clear()
    runs.add_batch(run_id, {"batch_id": "b", **second})
    head = ["BEGIN IMMEDIATE", "SELECT runs.pk, runs.id,", "INSERT INTO batches"]
    assert _heads(statements) == head + extra + ["UPDATE runs SET", "COMMIT"]


def test_a_retry_fails_its_insert_writes_nothing_and_is_answered_from_the_store(
    recorded: tuple[Store, Any, list[str]],
) -> None:
    _, runs, statements = recorded
    c = 12
    run_id = _run(runs, ["accuracy", "confusion_matrix"], c)
    parts = batches(2, c, 2, rows=16)
    answers = [runs.add_batch(run_id, {"batch_id": f"b{i}", **p}) for i, p in enumerate(parts)]
    statements.clear()
    again = runs.add_batch(run_id, {"batch_id": "b0", **parts[0]})
    heads = _heads(statements)
    assert heads[:4] == [
        "BEGIN IMMEDIATE", "SELECT runs.pk, runs.id,", "INSERT INTO batches", "ROLLBACK"
    ]  # fmt: skip
    assert not any(s.startswith(("UPDATE", "INSERT INTO confusion")) for s in heads)
    assert again["duplicate"] is True and again["seq"] == 1
    assert again["batch"] == answers[0]["batch"]
    assert again["run"]["batches"] == 2 and again["run"]["count"] == answers[1]["run"]["count"]
    other = {**parts[0], "targets": (parts[0]["targets"] + 1) % c}
    with pytest.raises(Exception, match="batch_id") as info:
        runs.add_batch(run_id, {"batch_id": "b0", **other})
    assert getattr(info.value, "status_code", None) == 409
    matrix = np.asarray(runs.run_metric(run_id, "confusion_matrix")["matrix"])
    assert matrix.sum() == pytest.approx(sum(float(p["sample_weight"].sum()) for p in parts))
