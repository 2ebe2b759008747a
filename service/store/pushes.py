"""The statements of a batch push, in SQLAlchemy Core: the hot path of every run, so no unit of
work and no identity map. Runs come back as detached ``Run`` objects, batches as dicts (plain
values; nothing is written unless these functions write it). The statements every push runs
(lock the run, insert the batch, write the totals, append and size the confusion blocks) go
through :class:`~service.store.prepared.Prepared`: compiled once, run on the DBAPI cursor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from sqlalchemy import (
    Connection,
    Table,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from ce_engine.metrics.cells import Cells
from service.store.models import Batch, ConfusionBlock, Run, RunSlice
from service.store.prepared import Prepared


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
BLOCKS = cast(Table, ConfusionBlock.__table__)

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
_FIND_BATCH = select(BATCHES).where(
    BATCHES.c.run_pk == bindparam("run_pk"), BATCHES.c.batch_id == bindparam("batch_id")
)
#: The columns a push gives a batch row (the primary key is the database's).
BATCH_COLUMNS = (
    "run_pk", "batch_id", "seq", "content_hash", "count", "sum", "denominator", "result",
    "created_at",
)  # fmt: skip
# inline: no RETURNING of the new primary key (PostgreSQL), which nothing reads
_INSERT_BATCH = insert(BATCHES).values({name: bindparam(name) for name in BATCH_COLUMNS}).inline()
_INSERT_BLOCK = insert(BLOCKS).values(
    {name: bindparam(name) for name in ("run_pk", "seq", "batches", "cells", "data")}
)
_UPDATE_TOTALS = (
    update(RUNS)
    .where(RUNS.c.pk == bindparam("run_pk"))
    .values({name: bindparam(name) for name in TOTALS})
)
_BLOCK_SIZES = text(
    "SELECT coalesce(sum(cells), 0), coalesce((SELECT cells FROM confusion_blocks "
    "WHERE run_pk = :run_pk ORDER BY seq LIMIT 1), 0), count(*) FROM confusion_blocks "
    "WHERE run_pk = :run_pk"
)
#: A run's blocks are merged into one once the blocks after its first hold at least this many
#: cells and at least as many as the first: each cell is rewritten O(1) times on average, and
#: a read merges at most about twice the run's cells plus this many.
COMPACT_MIN_CELLS = 65536
#: ... or once it has more blocks than this and than 1/``COMPACT_MAX_BLOCKS`` of the first's
#: cells (small batches): a read's rows stay O(the run's cells / 256 + 256), and a merge of the
#: first block's F cells comes after at least F / 256 batches (≤ 256 cells rewritten a batch).
#: Only whole prefixes are merged: each cell stays the in-order sum of its batches.
COMPACT_MAX_BLOCKS = 256


def _prepared(connection: Connection, statement: Any, columns: Any = ()) -> Prepared:
    return Prepared.of(statement, connection, columns)


def lock_run(connection: Connection, run_id: str) -> Run | None:
    """The run's row, locked for the transaction (``FOR UPDATE``; SQLite's writer lock is the
    transaction's), or None when missing."""
    row = _prepared(connection, _LOCK_RUN, RUNS.c).one_or_none(connection, {"run_id": run_id})
    return None if row is None else Run(**row)


def find_batch(session: Session, run_pk: int, batch_id: str) -> dict[str, Any] | None:
    """The run's batch with this idempotency key (its columns), if stored."""
    params = {"run_pk": run_pk, "batch_id": batch_id}
    row = session.connection().execute(_FIND_BATCH, params).mappings().one_or_none()
    return None if row is None else dict(row)


def insert_batch(connection: Connection, row: dict[str, Any]) -> None:
    """One batch row (``BATCH_COLUMNS``; ``IntegrityError`` when its ``(run_pk, batch_id)``
    exists)."""
    _prepared(connection, _INSERT_BATCH).execute(connection, row)


def update_totals(connection: Connection, run: Run, totals: dict[str, Any]) -> None:
    """Write ``totals`` (the ``TOTALS`` columns) to the run's row and to ``run``."""
    _prepared(connection, _UPDATE_TOTALS).execute(connection, {"run_pk": run.pk, **totals})
    for name, value in totals.items():
        setattr(run, name, value)


def pack_cells(cells: Cells) -> bytes:
    """A block's ``data``: the cell ids (int64) then their weights (float64), little-endian."""
    return cells.index.astype("<i8").tobytes() + cells.weight.astype("<f8").tobytes()


def unpack_cells(size: int, count: int, data: bytes) -> Cells:
    """The table a block's ``data`` holds (``ValueError`` when it is not ``count`` cells)."""
    if len(data) != 16 * count:
        raise ValueError(f"a confusion block of {count} cells holds {len(data)} bytes")
    index = np.frombuffer(data, "<i8", count).astype(np.int64)
    weight = np.frombuffer(data, "<f8", count, offset=8 * count).astype(np.float64)
    return Cells(size, index, weight)


def add_block(connection: Connection, run_pk: int, seq: int, cells: Cells) -> None:
    """Append batch ``seq``'s confusion cells to the run (one row, whatever the run holds).
    The caller holds the run's lock, so blocks are written in batch order."""
    row = {
        "run_pk": run_pk,
        "seq": seq,
        "batches": 1,
        "cells": int(cells.index.size),
        "data": pack_cells(cells),
    }
    _prepared(connection, _INSERT_BLOCK).execute(connection, row)


def load_cells(connection: Connection, run_pk: int, size: int) -> Cells:
    """The run's confusion cells: Σ of its blocks in ``seq`` order (one statement, so one
    snapshot; each cell's sum adds the batches in order, as a running dense sum would)."""
    rows = connection.execute(
        select(BLOCKS.c.cells, BLOCKS.c.data)
        .where(BLOCKS.c.run_pk == run_pk)
        .order_by(BLOCKS.c.seq)
    )
    return Cells.merge(size, [unpack_cells(size, n, data) for n, data in rows])


def compact_when_due(connection: Connection, run_pk: int, size: int) -> bool:
    """Merge the run's blocks into one (under the run's lock) once those after the first hold
    ≥ max(``COMPACT_MIN_CELLS``, the first's cells) cells, or there are more than
    max(``COMPACT_MAX_BLOCKS``, the first's cells / ``COMPACT_MAX_BLOCKS``); True when it
    did."""
    sizes = _prepared(connection, _BLOCK_SIZES).scalars(connection, {"run_pk": run_pk})
    total, first, count = (int(n) for n in sizes)
    many = count > max(COMPACT_MAX_BLOCKS, first // COMPACT_MAX_BLOCKS)
    if total - first < max(COMPACT_MIN_CELLS, first) and not many:
        return False
    blocks = connection.execute(
        select(BLOCKS.c.seq, BLOCKS.c.batches).where(BLOCKS.c.run_pk == run_pk)
    ).all()
    merged = load_cells(connection, run_pk, size)
    connection.execute(delete(BLOCKS).where(BLOCKS.c.run_pk == run_pk))
    row = {
        "run_pk": run_pk,
        "seq": max(seq for seq, _ in blocks),
        "batches": sum(batches for _, batches in blocks),
        "cells": int(merged.index.size),
        "data": pack_cells(merged),
    }
    connection.execute(insert(BLOCKS), row)
    return True


def slice_value_counts(connection: Connection, run_pk: int) -> dict[str, int]:
    """Slice key → the number of values the run has for it."""
    query = (
        select(SLICES.c.key, func.count()).where(SLICES.c.run_pk == run_pk).group_by(SLICES.c.key)
    )
    return {str(k): int(n) for k, n in connection.execute(query)}


def load_slices(
    connection: Connection, run_pk: int, wanted: list[tuple[str, str]]
) -> dict[tuple[str, str], SliceTotals]:
    """The stored totals of these (key, value) pairs of the run, if any."""
    found = {}
    for start in range(0, len(wanted), SLICE_QUERY_CHUNK):
        chunk = wanted[start : start + SLICE_QUERY_CHUNK]
        query = select(SLICES).where(
            SLICES.c.run_pk == run_pk, tuple_(SLICES.c.key, SLICES.c.value).in_(chunk)
        )
        for row in connection.execute(query).mappings():
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
    connection: Connection, run_pk: int, key: str, value: str, totals: SliceTotals, *, new: bool
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
        return load_slices(session.connection(), run_pk, pairs)
    rows = sorted(slice_rows(session, run_pk, key), key=lambda r: (-r.count, r.value))
    values = [(key, str(row.value)) for row in rows[:MAX_SLICE_VALUES_LOADED]]
    return load_slices(session.connection(), run_pk, values)
