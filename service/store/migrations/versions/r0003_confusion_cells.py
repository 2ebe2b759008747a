"""A run's softmax confusion matrix moves out of ``runs.metric_state`` into sparse rows.

Each non-zero cell of a stored dense ``confusion`` statistic becomes a ``confusion_cells`` row
and the JSON state keeps an empty table in its place, so a batch upserts the cells it touches
instead of rewriting C² numbers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # as runs.pk


def upgrade() -> None:
    op.create_table(
        "confusion_cells",
        sa.Column("run_pk", BIGINT, sa.ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True),
        sa.Column("true_class", sa.Integer, primary_key=True),
        sa.Column("pred_class", sa.Integer, primary_key=True),
        sa.Column("weight", sa.Double, nullable=False),
    )
    op.create_index("ix_confusion_cells_run_weight", "confusion_cells", ["run_pk", "weight"])
    _move_dense_states()


def _tables() -> tuple[sa.TableClause, sa.TableClause]:
    runs = sa.table("runs", sa.column("pk"), sa.column("metric_state", sa.JSON))
    cells = sa.table(
        "confusion_cells",
        sa.column("run_pk"),
        sa.column("true_class"),
        sa.column("pred_class"),
        sa.column("weight"),
    )
    return runs, cells


def _softmax_confusion_runs(bind: Any, runs: sa.TableClause) -> list[int]:
    """Primary keys of the runs whose state holds a softmax confusion statistic (states are
    then read one run at a time: a store's states never sit in memory together)."""
    found = []
    for pk, state in bind.execute(sa.select(runs.c.pk, runs.c.metric_state)).yield_per(64):
        stats = (state or {}).get("stats") or {}
        if state and state.get("family", "softmax") == "softmax" and "confusion" in stats:
            found.append(pk)
    return found


def _move_dense_states() -> None:
    from ce_engine.metrics.cells import Cells
    from ce_engine.metrics.state import _pack, _unpack

    bind = op.get_bind()
    runs, cells = _tables()
    for pk in _softmax_confusion_runs(bind, runs):
        state = bind.execute(sa.select(runs.c.metric_state).where(runs.c.pk == pk)).scalar_one()
        table = _unpack(state["stats"]["confusion"])
        dense = table.dense() if isinstance(table, Cells) else table
        true, pred = dense.nonzero()
        for start in range(0, true.size, 10_000):
            chunk = slice(start, start + 10_000)
            bind.execute(
                cells.insert(),
                [
                    {"run_pk": pk, "true_class": int(t), "pred_class": int(p), "weight": float(w)}
                    for t, p, w in zip(
                        true[chunk], pred[chunk], dense[true, pred][chunk], strict=True
                    )
                ],
            )
        empty = Cells(dense.shape[0], np.zeros(0, np.int64), np.zeros(0))
        state["stats"]["confusion"] = _pack(empty)
        bind.execute(runs.update().where(runs.c.pk == pk).values(metric_state=state))


def downgrade() -> None:
    """Dense statistics again (what revision 0002 reads), then the table goes."""
    from ce_engine.metrics.state import _pack

    bind = op.get_bind()
    runs, cells = _tables()
    for pk in _softmax_confusion_runs(bind, runs):
        state = bind.execute(sa.select(runs.c.metric_state).where(runs.c.pk == pk)).scalar_one()
        size = int(state["num_classes"])
        dense = np.zeros((size, size))
        rows = sa.select(cells.c.true_class, cells.c.pred_class, cells.c.weight).where(
            cells.c.run_pk == pk
        )
        for true, pred, weight in bind.execute(rows):
            dense[true, pred] = weight
        state["stats"]["confusion"] = _pack(dense)
        bind.execute(runs.update().where(runs.c.pk == pk).values(metric_state=state))
    op.drop_index("ix_confusion_cells_run_weight", table_name="confusion_cells")
    op.drop_table("confusion_cells")
