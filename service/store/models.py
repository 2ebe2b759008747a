"""SQLAlchemy 2 models of the run store: runs, their tags, batches, confusion blocks and slices.

The schema changes only through the Alembic migrations in ``service/store/migrations``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One evaluation run: its configuration and its exact running aggregates.

    ``sum``/``denominator``/``count`` are sums over the accepted batches; ``metric_state`` is the
    merged (added) metric state as ``MetricState.to_dict()``, or None when no metrics are kept.
    ``owner`` scopes the run to the API key that created it (revision 0002).
    """

    __tablename__ = "runs"

    pk: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    id: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)
    loss: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics_requested: Mapped[list[str]] = mapped_column(JSON, default=list)
    class_names: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    batches: Mapped[int] = mapped_column(Integer, default=0)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    ignored: Mapped[int] = mapped_column(BigInteger, default=0)
    sum: Mapped[float] = mapped_column(Double, default=0.0)
    denominator: Mapped[float] = mapped_column(Double, default=0.0)
    metric_state: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: Principal (API key id) that created the run; None when auth was off. When auth is on,
    #: only this principal sees the run.
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    #: Revision 0004 (bootstrap intervals, slices, the gate; all None for runs without them):
    #: ``confidence`` = {replicates, level, seed}; ``replicate_state`` the merged
    #: ``ReplicateState``; ``fingerprint`` the example-id set's ``Fingerprint``; ``paired_ids``
    #: whether every batch carried ``example_ids``; ``slice_keys`` / ``max_slice_values`` the
    #: declared slices (states in ``run_slices``); ``gate`` the last gate answer.
    confidence: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    replicate_state: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, nullable=True, deferred=True
    )
    #: The intervals of the last push (from ``replicate_state``), so summaries need not parse it.
    intervals: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fingerprint: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    paired_ids: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    slice_keys: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    max_slice_values: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gate: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (UniqueConstraint("id", name="uq_runs_id"),)

    tags: Mapped[list[RunTag]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )


class RunTag(Base):
    """``key: value`` labels of a run (a table, so ``tag=k:v`` filters are indexed everywhere)."""

    __tablename__ = "run_tags"

    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(String(500))

    run: Mapped[Run] = relationship(back_populates="tags")

    __table_args__ = (Index("ix_run_tags_key_value", "key", "value"),)


class Batch(Base):
    """One accepted batch of a run; ``(run_pk, batch_id)`` is unique (the idempotency key).

    ``content_hash`` is the BLAKE3 (batches stored by earlier releases: SHA-256) of the decoded
    tensors (dtype, shape, bytes); ``result`` is the batch's own answer (loss sums and scalar
    metrics), replayed for a duplicate.
    """

    __tablename__ = "batches"

    pk: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.pk", ondelete="CASCADE"))
    batch_id: Mapped[str] = mapped_column(String(200))
    seq: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    count: Mapped[int] = mapped_column(BigInteger)
    sum: Mapped[float] = mapped_column(Double)
    denominator: Mapped[float] = mapped_column(Double)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("run_pk", "batch_id", name="uq_batches_run_batch_id"),
        Index("ix_batches_run_seq", "run_pk", "seq"),
    )


class ConfusionBlock(Base):
    """Confusion cells of a run's softmax confusion matrix, appended as one row per batch: the
    run's matrix is the cell-wise sum of its blocks in ``seq`` order. A push writes one row
    (O(its cells), never a B-tree upsert per cell); the blocks are merged into one from time to
    time (``service.store.pushes.compact_when_due``), so a read merges O(the run's cells).

    ``data``: the ``cells`` distinct flat cell ids ``t·C + p`` (int64, ascending) then their
    weight sums (float64), little-endian."""

    __tablename__ = "confusion_blocks"

    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True)
    #: The last batch the block sums (a merged block: the last of its ``batches``).
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    batches: Mapped[int] = mapped_column(Integer)
    cells: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class RunSlice(Base):
    """The aggregates of one slice (``key`` = ``value``) of a run, as a run's own: loss sums,
    the merged metric state (without the confusion cells) and, with ``confidence``, the merged
    replicate state. A batch updates only the slice values it carries."""

    __tablename__ = "run_slices"

    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    ignored: Mapped[int] = mapped_column(BigInteger, default=0)
    sum: Mapped[float] = mapped_column(Double, default=0.0)
    denominator: Mapped[float] = mapped_column(Double, default=0.0)
    metric_state: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    replicate_state: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: The slice's own example-id set (pairing is judged per slice).
    fingerprint: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
