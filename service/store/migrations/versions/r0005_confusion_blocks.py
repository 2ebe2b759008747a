"""A run's confusion cells move from one row per cell to one block per batch.

``confusion_cells`` (a B-tree upsert per cell a batch touches) becomes ``confusion_blocks``: a
push appends its batch's cells as one row, and the blocks are merged from time to time. Each
run's cells become one block covering all its batches.

Block ``data``: the distinct flat cell ids ``t·C + p`` (int64, ascending), then their weights
(float64), little-endian.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # as runs.pk
#: Cell rows per insert statement on the way down.
CHUNK = 10_000


def _tables() -> tuple[sa.TableClause, sa.TableClause, sa.TableClause]:
    runs = sa.table(
        "runs", sa.column("pk"), sa.column("batches"), sa.column("metric_state", sa.JSON)
    )
    cells = sa.table(
        "confusion_cells",
        sa.column("run_pk"),
        sa.column("true_class"),
        sa.column("pred_class"),
        sa.column("weight"),
    )
    blocks = sa.table(
        "confusion_blocks",
        sa.column("run_pk"),
        sa.column("seq"),
        sa.column("batches"),
        sa.column("cells"),
        sa.column("data", sa.LargeBinary),
    )
    return runs, cells, blocks


def _num_classes(bind: Any, runs: sa.TableClause, pk: int) -> tuple[int, int]:
    state, batches = bind.execute(
        sa.select(runs.c.metric_state, runs.c.batches).where(runs.c.pk == pk)
    ).one()
    return int(state["num_classes"]), int(batches)


def _create_cells_table() -> None:
    op.create_table(
        "confusion_cells",
        sa.Column("run_pk", BIGINT, sa.ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True),
        sa.Column("true_class", sa.Integer, primary_key=True),
        sa.Column("pred_class", sa.Integer, primary_key=True),
        sa.Column("weight", sa.Double, nullable=False),
    )
    op.create_index("ix_confusion_cells_run_weight", "confusion_cells", ["run_pk", "weight"])


def upgrade() -> None:
    op.create_table(
        "confusion_blocks",
        sa.Column("run_pk", BIGINT, sa.ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("batches", sa.Integer, nullable=False),
        sa.Column("cells", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    bind = op.get_bind()
    runs, cells, blocks = _tables()
    for (pk,) in bind.execute(sa.select(cells.c.run_pk).distinct()).all():
        size, batches = _num_classes(bind, runs, pk)
        rows = bind.execute(
            sa.select(cells.c.true_class, cells.c.pred_class, cells.c.weight).where(
                cells.c.run_pk == pk
            )
        ).all()
        pairs = [(t * size + p, w) for t, p, w in rows]
        table = np.array(pairs, dtype=[("k", "<i8"), ("w", "<f8")])
        table.sort(order="k")
        data = table["k"].tobytes() + table["w"].tobytes()
        row = {"run_pk": pk, "seq": batches, "batches": batches, "cells": len(rows), "data": data}
        bind.execute(blocks.insert(), [row])
    op.drop_index("ix_confusion_cells_run_weight", table_name="confusion_cells")
    op.drop_table("confusion_cells")


def downgrade() -> None:
    """One ``confusion_cells`` row per cell of the merged blocks, then the blocks go."""
    _create_cells_table()
    bind = op.get_bind()
    runs, cells, blocks = _tables()
    for (pk,) in bind.execute(sa.select(blocks.c.run_pk).distinct()).all():
        size, _ = _num_classes(bind, runs, pk)
        merged: dict[int, float] = {}
        rows = sa.select(blocks.c.cells, blocks.c.data).where(blocks.c.run_pk == pk)
        for count, data in bind.execute(rows.order_by(blocks.c.seq)):
            keys = np.frombuffer(data, "<i8", count)
            weights = np.frombuffer(data, "<f8", count, offset=8 * count)
            for key, weight in zip(keys.tolist(), weights.tolist(), strict=True):
                merged[key] = merged.get(key, 0.0) + weight
        items = [
            {"run_pk": pk, "true_class": k // size, "pred_class": k % size, "weight": w}
            for k, w in merged.items()
        ]
        for start in range(0, len(items), CHUNK):
            bind.execute(cells.insert(), items[start : start + CHUNK])
    op.drop_table("confusion_blocks")
