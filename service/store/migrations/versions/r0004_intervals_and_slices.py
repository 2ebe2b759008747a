"""Bootstrap intervals, example-id fingerprints, slices and the gate's verdict (issue 18).

New nullable ``runs`` columns (runs created before have none of these) and the ``run_slices``
table of per-slice aggregates.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # as runs.pk
COLUMNS = (
    ("confidence", sa.JSON),
    ("replicate_state", sa.JSON),
    ("intervals", sa.JSON),
    ("fingerprint", sa.JSON),
    ("paired_ids", sa.Boolean),
    ("slice_keys", sa.JSON),
    ("max_slice_values", sa.Integer),
    ("gate", sa.JSON),
)


def upgrade() -> None:
    for name, kind in COLUMNS:
        op.add_column("runs", sa.Column(name, kind(), nullable=True))
    op.create_table(
        "run_slices",
        sa.Column("run_pk", BIGINT, sa.ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(200), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("ignored", sa.BigInteger, nullable=False),
        sa.Column("sum", sa.Double, nullable=False),
        sa.Column("denominator", sa.Double, nullable=False),
        sa.Column("metric_state", sa.JSON, nullable=True),
        sa.Column("replicate_state", sa.JSON, nullable=True),
        sa.Column("fingerprint", sa.JSON, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("run_slices")
    for name, _ in reversed(COLUMNS):
        if op.get_bind().dialect.name == "sqlite":
            # In place (SQLite ≥ 3.35), not the batch mode's copy of the table: dropping the
            # old ``runs`` would cascade to its confusion cells.
            op.execute(f"ALTER TABLE runs DROP COLUMN {name}")
        else:
            op.drop_column("runs", name)
