"""The push hot path's statements on the DBAPI cursor (``service.store.prepared``) write and
read what the same Core statements do through ``Connection.execute``, on SQLite and
PostgreSQL, and raise the errors ``Connection.execute`` raises."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Connection, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from ce_engine.metrics.cells import Cells
from service.store import Store, prepared, pushes
from service.store.prepared import Prepared
from tests.servers import PostgresCluster
from tests.test_runs_details import runs_plane


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated store holding two runs, ``a`` and ``b``, alike but for their ids."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'runs.db'}"
    else:
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        url = cluster.create_database()
    made, runs = runs_plane(url)
    for name in "ab":
        runs.create_run(
            {
                "name": name,
                "loss": "cross_entropy",
                "metrics": ["accuracy", "confusion_matrix"],
                "options": {"max_confusion_classes": 5},
                "tags": {"team": "x"},
            }
        )
    yield made
    made.dispose()


def _pks(connection: Connection) -> tuple[int, int]:
    a, b = connection.execute(select(pushes.RUNS.c.pk).order_by(pushes.RUNS.c.pk)).scalars()
    return a, b


def _row(connection: Connection, table: Any, **where: Any) -> dict[str, Any]:
    """One row as Core reads it, and as the database holds it (the raw column values)."""
    query = select(table).where(*(table.c[k] == v for k, v in where.items()))
    typed = dict(connection.execute(query).mappings().one())
    clause = " AND ".join(f"{k} = :{k}" for k in where)
    raw = connection.execute(text(f"SELECT * FROM {table.name} WHERE {clause}"), where).one()
    return {"typed": typed, "raw": tuple(raw)}


def _without(row: dict[str, Any], *names: str) -> dict[str, Any]:
    index = [i for i, c in enumerate(row["typed"]) if c in names]
    return {
        "typed": {k: v for k, v in row["typed"].items() if k not in names},
        "raw": tuple(v for i, v in enumerate(row["raw"]) if i not in index),
    }


def test_the_locked_run_row_reads_as_core_reads_it(store: Store) -> None:
    with store.engine.begin() as connection:
        a, _ = _pks(connection)
        run_id = connection.execute(select(pushes.RUNS.c.id).where(pushes.RUNS.c.pk == a)).scalar()
        core = dict(connection.execute(pushes._LOCK_RUN, {"run_id": run_id}).mappings().one())
        fast = Prepared.of(pushes._LOCK_RUN, connection, pushes.RUNS.c)
        assert fast.one_or_none(connection, {"run_id": run_id}) == core
        assert fast.one_or_none(connection, {"run_id": "missing"}) is None
        assert core["created_at"].tzinfo is not None and core["options"] is not None
        run = pushes.lock_run(connection, run_id)
        assert run is not None
        assert {c: getattr(run, c) for c in core} == core


def test_batch_rows_totals_and_blocks_are_written_as_core_writes_them(store: Store) -> None:
    when = datetime(2026, 12, 5, 14, 0, 1, 123456, tzinfo=UTC) + timedelta(hours=1)
    result = {"value": 0.1, "sum": 2.5, "metrics": {"accuracy": 1 / 3}, "ignored": 0}
    with store.engine.begin() as connection:
        a, b = _pks(connection)
        batch = {
            "batch_id": "x", "seq": 7, "content_hash": "ab" * 32, "count": 2**40,
            "sum": 0.1 + 0.2, "denominator": 1e-300, "result": result, "created_at": when,
        }  # fmt: skip
        connection.execute(pushes._INSERT_BATCH, {**batch, "run_pk": a})
        pushes.insert_batch(connection, {**batch, "run_pk": b})
        core, fast = (_row(connection, pushes.BATCHES, run_pk=pk) for pk in (a, b))
        assert _without(fast, "pk", "run_pk") == _without(core, "pk", "run_pk")
        assert fast["typed"]["created_at"] == when and fast["typed"]["result"] == result

        totals: dict[str, Any] = {
            "batches": 3, "count": 9, "ignored": 1, "sum": -0.0, "denominator": 3.0,
            "metric_state": {"names": ["accuracy"], "correct": [1.5, 2.0]},
            "updated_at": when, "replicate_state": None, "intervals": {"accuracy": [0.1, 0.2]},
            "fingerprint": {"count": 3, "h1": 12345678901234, "h2": 9}, "paired_ids": True,
        }  # fmt: skip
        connection.execute(pushes._UPDATE_TOTALS, {"run_pk": a, **totals})
        run = pushes.lock_run(connection, str(_row(connection, pushes.RUNS, pk=b)["typed"]["id"]))
        assert run is not None
        pushes.update_totals(connection, run, totals)
        core, fast = (_row(connection, pushes.RUNS, pk=pk) for pk in (a, b))
        ours = ("pk", "id", "name", "created_at")  # the runs differ in these alone
        assert _without(fast, *ours) == _without(core, *ours)
        assert {k: fast["typed"][k] for k in totals} == totals
        assert {k: getattr(run, k) for k in totals} == totals

        cells = Cells(5, np.array([0, 6, 24]), np.array([1.0, 0.5, 2.0]))
        block = {"seq": 7, "batches": 1, "cells": 3, "data": pushes.pack_cells(cells)}
        connection.execute(pushes._INSERT_BLOCK, {**block, "run_pk": a})
        pushes.add_block(connection, b, 7, cells)
        core, fast = (_row(connection, pushes.BLOCKS, run_pk=pk) for pk in (a, b))
        assert _without(fast, "run_pk") == _without(core, "run_pk")

        sizes = Prepared.of(pushes._BLOCK_SIZES, connection)
        assert sizes.scalars(connection, {"run_pk": b}) == tuple(
            connection.execute(pushes._BLOCK_SIZES, {"run_pk": a}).one()
        )


def test_errors_are_raised_as_connection_execute_raises_them(store: Store) -> None:
    row = {
        "batch_id": "x", "seq": 1, "content_hash": "0" * 64, "count": 1, "sum": 1.0,
        "denominator": 1.0, "result": {}, "created_at": datetime.now(UTC),
    }  # fmt: skip
    with store.engine.connect() as connection:
        with connection.begin():
            a, _ = _pks(connection)
            pushes.insert_batch(connection, {**row, "run_pk": a})
        for bad in ({**row, "run_pk": a}, {**row, "run_pk": 10**9}):  # unique key, foreign key
            with connection.begin(), pytest.raises(IntegrityError) as info:
                pushes.insert_batch(connection, bad)
            assert isinstance(info.value.orig, connection.dialect.loaded_dbapi.IntegrityError)
        with connection.begin():  # the connection goes on
            assert connection.execute(select(pushes.BATCHES.c.seq)).scalars().all() == [1]


def test_a_disposed_engines_compiled_statements_go_with_it(tmp_path: Path) -> None:
    made = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    made.upgrade()
    with made.transaction() as connection:
        assert pushes.lock_run(connection, "missing") is None
        assert connection.info[prepared.INFO_KEY]
    dialect = weakref.ref(made.engine.dialect)
    made.dispose()
    del made, connection
    gc.collect()
    assert dialect() is None


@pytest.mark.postgres
def test_a_dropped_connection_is_invalidated_and_raised_as_sqlalchemy_does(
    postgres_cluster: PostgresCluster,
) -> None:
    """The database ends the session mid-transaction (a restart, a failover): an
    ``OperationalError`` that says the connection was invalidated (the push answers 503), and
    the pool's next connection works."""
    made, _ = runs_plane(postgres_cluster.create_database())
    try:
        with made.engine.connect() as connection:
            pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with made.engine.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(OperationalError) as info:
                pushes.lock_run(connection, "missing")
            assert info.value.connection_invalidated and connection.invalidated
        with made.transaction() as connection:
            assert pushes.lock_run(connection, "missing") is None
    finally:
        made.dispose()
