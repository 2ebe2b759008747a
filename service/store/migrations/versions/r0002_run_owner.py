"""Runs belong to the principal (API key id) that created them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable, no default: runs created before (or with auth off) have no owner.
    op.add_column("runs", sa.Column("owner", sa.String(64), nullable=True))
    op.create_index("ix_runs_owner", "runs", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_runs_owner", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("owner")
