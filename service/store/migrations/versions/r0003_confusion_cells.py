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


def _move_dense_states() -> None:
    import numpy as np

    from ce_engine.metrics.cells import Cells
    from ce_engine.metrics.state import _pack, _unpack

    bind = op.get_bind()
    runs = sa.table("runs", sa.column("pk"), sa.column("metric_state", sa.JSON))
    cells = sa.table(
        "confusion_cells",
        sa.column("run_pk"),
        sa.column("true_class"),
        sa.column("pred_class"),
        sa.column("weight"),
    )
    for pk, state in bind.execute(sa.select(runs.c.pk, runs.c.metric_state)).all():
        stats: dict[str, Any] = (state or {}).get("stats") or {}
        if state is None or state.get("family", "softmax") != "softmax" or "confusion" not in stats:
            continue
        table = _unpack(stats["confusion"])
        dense = table.dense() if isinstance(table, Cells) else table
        rows = [
            {"run_pk": pk, "true_class": int(t), "pred_class": int(p), "weight": float(dense[t, p])}
            for t, p in zip(*dense.nonzero(), strict=True)
        ]
        if rows:
            bind.execute(cells.insert(), rows)
        stats["confusion"] = _pack(Cells(dense.shape[0], np.zeros(0, np.int64), np.zeros(0)))
        state["stats"] = stats
        bind.execute(runs.update().where(runs.c.pk == pk).values(metric_state=state))


def downgrade() -> None:
    op.drop_index("ix_confusion_cells_run_weight", table_name="confusion_cells")
    op.drop_table("confusion_cells")
