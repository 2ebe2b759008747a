"""The statements of a batch push, in SQLAlchemy Core: the hot path of every run, so no unit of
work and no identity map. Rows come back as detached ``Run`` / ``Batch`` objects (plain values;
nothing is written unless these functions write it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import orjson
from sqlalchemy import Table, bindparam, func, insert, select, text, tuple_, update
from sqlalchemy.orm import Session

from service.store.models import Batch, Run, RunSlice


@dataclass(frozen=True)
class SliceTotals:
    """One (key, value) of a batch or of a run: loss sums and merged states."""

    count: int
    ignored: int
    sum: float
    denominator: float
    metric_state: dict[str, Any] | None
    replicate_state: dict[str, Any] | None
    fingerprint: dict[str, Any] | None = None  # of the slice's example ids


RUNS = cast(Table, Run.__table__)
BATCHES = cast(Table, Batch.__table__)

#: Columns a push changes on the run's row.
TOTALS = (
    "batches",
    "count",
    "ignored",
    "sum",
    "denominator",
    "metric_state",
    "updated_at",
    "replicate_state",
    "intervals",
    "fingerprint",
    "paired_ids",
)
SLICES = cast(Table, RunSlice.__table__)
#: Slice values of one key a comparison loads (the largest by count): bounds its time.
MAX_SLICE_VALUES_LOADED = 20
#: (key, value) pairs per query (PostgreSQL takes at most 65535 parameters).
SLICE_QUERY_CHUNK = 1000

# Built once (these run on every push): statements with bound parameters.
_LOCK_RUN = select(RUNS).where(RUNS.c.id == bindparam("run_id")).with_for_update()
_LOCK_OWNED_RUN = _LOCK_RUN.where(RUNS.c.owner == bindparam("owner"))
_FIND_BATCH = select(BATCHES).where(
    BATCHES.c.run_pk == bindparam("run_pk"), BATCHES.c.batch_id == bindparam("batch_id")
)
_UPDATE_TOTALS = update(RUNS).where(RUNS.c.pk == bindparam("run_pk"))
_UNNEST_UPSERT = text(
    "INSERT INTO confusion_cells (run_pk, true_class, pred_class, weight) "
    "SELECT :run_pk, u.t, u.p, u.w FROM unnest(CAST(:t AS integer[]), CAST(:p AS integer[]), "
    "CAST(:w AS double precision[])) AS u(t, p, w) "
    "ON CONFLICT (run_pk, true_class, pred_class) "
    "DO UPDATE SET weight = confusion_cells.weight + excluded.weight"
)
# SQLite: the cells as one JSON array of [true, pred, weight] (``WHERE true``: SQLite's parser
# needs it between a SELECT and ON CONFLICT). Floats round-trip exactly through JSON text.
_JSON_EACH_UPSERT = text(
    "INSERT INTO confusion_cells (run_pk, true_class, pred_class, weight) "
    "SELECT :run_pk, json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), "
    "json_extract(j.value, '$[2]') FROM json_each(:cells) AS j WHERE true "
    "ON CONFLICT (run_pk, true_class, pred_class) "
    "DO UPDATE SET weight = confusion_cells.weight + excluded.weight"
)


def lock_run(session: Session, run_id: str, principal: str | None) -> Run | None:
    """The run's row, locked for the transaction (``FOR UPDATE``; SQLite's writer lock is the
    transaction's), or None when missing or not ``principal``'s (None: any run)."""
    query, params = _LOCK_RUN, {"run_id": run_id}
    if principal is not None:
        query, params = _LOCK_OWNED_RUN, {**params, "owner": principal}
    row = session.connection().execute(query, params).mappings().one_or_none()
    return None if row is None else Run(**row)


def find_batch(session: Session, run_pk: int, batch_id: str) -> Batch | None:
    """The run's batch with this idempotency key, if stored."""
    params = {"run_pk": run_pk, "batch_id": batch_id}
    row = session.connection().execute(_FIND_BATCH, params).mappings().one_or_none()
    return None if row is None else Batch(**row)


def insert_batch(session: Session, row: dict[str, Any]) -> None:
    """One batch row (``IntegrityError`` when its ``(run_pk, batch_id)`` exists)."""
    session.connection().execute(insert(BATCHES), row)


def update_totals(session: Session, run: Run, totals: dict[str, Any]) -> None:
    """Write ``totals`` (the ``TOTALS`` columns) to the run's row and to ``run``."""
    session.connection().execute(_UPDATE_TOTALS, {"run_pk": run.pk, **totals})
    for name, value in totals.items():
        setattr(run, name, value)


def add_cells(session: Session, run_pk: int, rows: Any, cols: Any, weights: Any) -> None:
    """Upsert confusion cells: weight += the batch's sum (O(cells), not O(C²)). The caller
    holds the run's lock, so cells are added in batch order, as a dense sum would be.
    One statement: PostgreSQL ``INSERT … SELECT unnest(arrays)``, SQLite ``… json_each(array)``."""
    if len(rows) == 0:
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(
            _UNNEST_UPSERT, {"run_pk": run_pk, "t": list(rows), "p": list(cols), "w": list(weights)}
        )
        return
    cells = orjson.dumps(list(zip(rows, cols, weights, strict=True))).decode()
    connection.execute(_JSON_EACH_UPSERT, {"run_pk": run_pk, "cells": cells})


def slice_value_counts(session: Session, run_pk: int) -> dict[str, int]:
    """Slice key → the number of values the run has for it."""
    query = (
        select(SLICES.c.key, func.count()).where(SLICES.c.run_pk == run_pk).group_by(SLICES.c.key)
    )
    return {str(k): int(n) for k, n in session.connection().execute(query)}


def load_slices(
    session: Session, run_pk: int, wanted: list[tuple[str, str]]
) -> dict[tuple[str, str], SliceTotals]:
    """The stored totals of these (key, value) pairs of the run, if any."""
    found = {}
    for start in range(0, len(wanted), SLICE_QUERY_CHUNK):
        chunk = wanted[start : start + SLICE_QUERY_CHUNK]
        query = select(SLICES).where(
            SLICES.c.run_pk == run_pk, tuple_(SLICES.c.key, SLICES.c.value).in_(chunk)
        )
        for row in session.connection().execute(query).mappings():
            found[row["key"], row["value"]] = SliceTotals(
                count=row["count"],
                ignored=row["ignored"],
                sum=row["sum"],
                denominator=row["denominator"],
                metric_state=row["metric_state"],
                replicate_state=row["replicate_state"],
                fingerprint=row["fingerprint"],
            )
    return found


def put_slice(
    session: Session, run_pk: int, key: str, value: str, totals: SliceTotals, *, new: bool
) -> None:
    """Insert (``new``) or overwrite the run's totals of slice ``key`` = ``value``."""
    fields = {
        "count": totals.count,
        "ignored": totals.ignored,
        "sum": totals.sum,
        "denominator": totals.denominator,
        "metric_state": totals.metric_state,
        "replicate_state": totals.replicate_state,
        "fingerprint": totals.fingerprint,
    }
    connection = session.connection()
    if new:
        connection.execute(insert(SLICES), {"run_pk": run_pk, "key": key, "value": value, **fields})
    else:
        connection.execute(
            update(SLICES)
            .where(SLICES.c.run_pk == run_pk, SLICES.c.key == key, SLICES.c.value == value)
            .values(**fields)
        )


def slice_rows(session: Session, run_pk: int, key: str) -> list[Any]:
    """The run's slice rows of ``key`` without their replicate states (name order)."""
    columns = [c for c in SLICES.c if c.name != "replicate_state"]
    query = (
        select(*columns)
        .where(SLICES.c.run_pk == run_pk, SLICES.c.key == key)
        .order_by(SLICES.c.value)
    )
    return list(session.connection().execute(query))


def slice_replicates(
    session: Session, run_pk: int, key: str, values: list[str]
) -> dict[str, dict[str, Any] | None]:
    """Slice value → its stored replicate state, for these values of ``key``."""
    if not values:
        return {}
    query = select(SLICES.c.value, SLICES.c.replicate_state).where(
        SLICES.c.run_pk == run_pk, SLICES.c.key == key, SLICES.c.value.in_(values)
    )
    return {str(v): state for v, state in session.connection().execute(query)}


def slice_totals(
    session: Session, run_pk: int, *, pairs: list[tuple[str, str]] | None = None, key: str = ""
) -> dict[tuple[str, str], Any]:
    """The run's slice totals with their replicate states: of the (key, value) ``pairs``, or
    of the ``MAX_SLICE_VALUES_LOADED`` largest values of ``key``."""
    if pairs is not None:
        return load_slices(session, run_pk, pairs)
    rows = sorted(slice_rows(session, run_pk, key), key=lambda r: (-r.count, r.value))
    values = [(key, str(row.value)) for row in rows[:MAX_SLICE_VALUES_LOADED]]
    return load_slices(session, run_pk, values)
