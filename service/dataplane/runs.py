"""Runs data plane: persistent, exactly-once aggregates of evaluation batches (DESIGN §3).

Protocol-agnostic, like :mod:`service.dataplane.evaluate`: the REST router and the gRPC servicer
call these (blocking) methods with plain Python values and get JSON-ready dicts back; failures are
:class:`service.errors.ServiceError` subclasses (404, 409, 422, 503).

Exactness: a run keeps ``sum``, ``denominator`` and ``count`` of the loss and the merged metric
state; its ``value`` is ``sum / denominator`` over all batches (never a mean of means) and its
metrics are computed from the merged state, so both equal one evaluation over the concatenated
batches. Each batch is counted exactly once: the batch row (unique per run and ``batch_id``) and
the aggregate update are written in one transaction that holds the run's row lock.

Scoping: every method takes ``principal`` (the API key id from :mod:`service.auth`, None when
auth is off) as a keyword. A run created by a principal records it as ``owner``; a principal sees
only its own runs, and any other run answers 404 exactly as a missing one. With ``principal``
None (auth off) every run is visible and new runs have no owner.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Generic, Literal, Protocol, TypeVar

import anyio
import blake3
import numpy as np
import orjson
import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator
from sqlalchemy import Connection, Select, delete, exists, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

import ce_engine
from ce_engine.errors import quoted
from ce_engine.metrics import MetricState, scalar_metrics, supported_metrics
from ce_engine.metrics.bootstrap import (
    Fingerprint,
    ReplicateState,
    default_example_hashes,
    example_id_hashes,
    poisson_weights,
)
from ce_engine.metrics.cells import Cells
from ce_eval_client.wire import wire_array, wire_name
from service.config import Settings
from service.dataplane import gate as gating
from service.dataplane import run_details, slices
from service.dataplane.evaluate import (
    DataPlane,
    decode_limit_error,
    engine_error,
    validation_error_from_pydantic,
)
from service.dataplane.push_writer import PushWriter, WriterUnstartable
from service.errors import (
    Conflict,
    MalformedBody,
    NonFiniteResult,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    ValidationFailed,
)
from service.logs import get_logger
from service.schemas import BATCH_TENSORS, MAX_METRIC_NAMES, MAX_OPTION_KEYS
from service.store import Batch, ConfusionBlock, Run, RunSlice, RunTag, Store, pushes
from service.store.models import utcnow

log = get_logger("ce_eval.runs")
RunStatus = Literal["open", "closed"]
MAX_LIST_LIMIT = 500
MAX_TAG_FILTERS = 32  # tag=k:v filters one listing may AND together (each is a subquery)
MAX_SERIES_LIMIT = 10_000
MAX_COMPARE = 20
MAX_COMPARE_SLICE_RUNS = 5  # runs a compare with slice_key may name
RUN_CONFIG_CACHE = 4096  # open runs whose configuration a replica keeps (pushes skip a read)
#: Merged confusion tables a replica keeps, keyed by (run id, batches): a run read again
#: without a push in between is not merged again. At most this many, of this many cells in
#: all (16 bytes a cell: 64 MiB); a larger table is merged for each read.
CELLS_CACHE = 8
CELLS_CACHE_MAX_CELLS = 1 << 22


class CreateRunRequest(BaseModel):
    """``POST /v1/runs`` body: a run's fixed configuration."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200, description="Display name.")
    loss: str = Field(..., description="A loss name from GET /v1/losses.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        max_length=MAX_OPTION_KEYS,
        description="Loss options applied to every batch.",
    )
    metrics: list[str] = Field(
        default_factory=list,
        max_length=MAX_METRIC_NAMES,
        description="Metrics to aggregate (DESIGN §2 names).",
    )
    class_names: list[Annotated[str, Field(max_length=100)]] | None = Field(
        None, max_length=100_000, description="Display names of the classes (dashboard)."
    )
    tags: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="Labels, filterable as `tag=k:v`."
    )
    confidence: slices.Confidence | None = Field(
        None, description="Bootstrap intervals: {replicates ≤ 1000, level, seed}."
    )
    slice_keys: list[str] = Field(
        default_factory=list,
        max_length=slices.MAX_SLICE_KEYS,
        description="Keys each batch slices its examples by (`slices`); at most 8.",
    )
    max_slice_values: int = Field(
        slices.DEFAULT_SLICE_VALUES,
        ge=1,
        le=slices.MAX_SLICE_VALUES,
        description="Distinct values a slice key may take in the run (the state's bound).",
    )

    @field_validator("tags")
    @classmethod
    def _tag_keys(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            if not key or len(key) > 100 or ":" in key:
                raise ValueError(f"tag key {quoted(key)} must be 1-100 characters without ':'")
            if len(value) > 500:
                raise ValueError(f"tag {quoted(key)}: value longer than 500 characters")
        return tags


class AddBatchRequest(BaseModel):
    """``POST /v1/runs/{id}/batches`` body. ``batch_id`` is the idempotency key."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    batch_id: str = Field(
        ..., min_length=1, max_length=200, description="Unique per run; retries reuse it."
    )
    logits: Any = Field(
        None, description="(N, C) or (N, d1.., C), as in /v1/evaluate; not for linear losses."
    )
    targets: Any = Field(..., description="As in /v1/evaluate.")
    sample_weight: Any = Field(None, description="(N,) or positions' shape.")
    features: Any = Field(None, description="linear_cross_entropy: features X (N, D).")
    weight: Any = Field(None, description="linear_cross_entropy: weight W (C, D).")
    bias: Any = Field(None, description="linear_cross_entropy: bias b (C,).")
    example_ids: list[Annotated[StrictStr, Field(max_length=128)] | StrictInt] | None = Field(
        None, description="(N,) stable ids of the examples (strings ≤ 128 chars or integers)."
    )
    slices: dict[str, list[Any]] | None = Field(
        None,
        max_length=slices.MAX_SLICE_KEYS,
        description="Each declared slice key → one string per example.",
    )


def _parse(model: type[BaseModel], payload: Any, settings: Settings) -> Any:
    if isinstance(payload, model):
        return payload
    if not isinstance(payload, dict):
        raise MalformedBody("the request body must be a JSON object")
    try:
        return model.model_validate(payload)
    except pydantic.ValidationError as exc:
        raise validation_error_from_pydantic(exc, settings.echo_max_chars) from None


#: A pushed batch: its JSON object, the parsed request, or the body's parser (run in the
#: evaluation's compute thread).
BatchPayload = (
    Mapping[str, Any] | AddBatchRequest | Callable[[], Mapping[str, Any] | AddBatchRequest]
)


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> Any: ...

    def hexdigest(self) -> str: ...


def content_hash(
    arrays: Mapping[str, np.ndarray | None],
    labels: bytes | None = None,
    algorithm: Callable[[], _Hasher] = blake3.blake3,
) -> str:
    """Hex digest (``algorithm``: BLAKE3, 32 bytes) over each tensor's name, wire dtype, shape
    and little-endian C-order bytes; with ``labels`` (the batch's ids and slices as sorted
    JSON), the digest of that hex digest followed by them."""
    digest = algorithm()
    for name in sorted(arrays):
        array = arrays[name]
        if array is None:
            digest.update(f"{name}:none;".encode())
            continue
        contiguous = wire_array(array)
        digest.update(f"{name}:{wire_name(contiguous.dtype)}:{list(contiguous.shape)};".encode())
        digest.update(contiguous.reshape(-1).view(np.uint8).data)
    value = digest.hexdigest()
    if labels is None:
        return value
    outer = algorithm()
    outer.update(value.encode() + labels)
    return outer.hexdigest()


@dataclass(frozen=True)
class BatchDigest:
    """A batch's content digest (BLAKE3, :func:`content_hash`); batches stored before it carry
    the SHA-256 of the same bytes, computed only when a stored digest is not this one."""

    value: str
    arrays: Mapping[str, np.ndarray | None]
    labels: bytes | None

    def matches(self, stored: str) -> bool:
        if stored == self.value:
            return True
        return stored == content_hash(self.arrays, self.labels, hashlib.sha256)


def _isoformat(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _encode_cursor(kind: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def _decode_cursor(kind: str, cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, position = raw.partition(":")
        value = int(position)
        if prefix != kind or not 0 <= value < 2**63:
            raise ValueError(prefix)
        return value
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValidationFailed(
            "cursor is not one this endpoint returned",
            [{"loc": ["query", "cursor"], "msg": "invalid cursor", "type": "cursor"}],
        ) from None


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The chartable part of metrics (``ce_engine.metrics.scalar_metrics``): numbers (None
    over zero weight), small ``{k: number}`` maps (top-k accuracy) and the ``macro`` of AUROC
    and average precision; per-class lists, matrices, bins and curves are left out."""
    return scalar_metrics(metrics)


def _not_found(run_id: str) -> NotFound:
    return NotFound(
        f"run {quoted(run_id)} not found",
        [{"loc": ["path", "run_id"], "msg": "no run with this id", "type": "not_found"}],
    )


class RunClosed(Conflict):
    """409 over HTTP; FAILED_PRECONDITION over gRPC (the run exists but takes no batches)."""

    grpc_code = "FAILED_PRECONDITION"


def _closed(run_id: str) -> RunClosed:
    return RunClosed(
        f"run {quoted(run_id)} is closed; it accepts no more batches",
        [{"loc": ["path", "run_id"], "msg": "run is closed", "type": "run_closed"}],
    )


def _content_conflict(batch_id: str) -> Conflict:
    return Conflict(
        f"batch_id {quoted(batch_id)} was already used with different content",
        [
            {
                "loc": ["body", "batch_id"],
                "msg": "batch_id reused with different content",
                "type": "batch_conflict",
            }
        ],
    )


def _refuse_non_finite(
    result: _Totals, run_sum: float, run_denominator: float, weighted: bool
) -> None:
    """A run never stores a non-finite aggregate (DESIGN §7): a batch whose value, sum or
    denominator is not finite, or would make the run's not finite, is a 422 and counts
    nothing (``nan_policy: raise`` has answered 422 in the engine already)."""
    positions = result.non_finite.get("positions") or [[]]
    checks = (
        ("sum", result.sum, run_sum + result.sum, ["logits", *positions[0]]),
        (
            "denominator",
            result.denominator,
            run_denominator + result.denominator,
            ["sample_weight" if weighted else "logits"],
        ),
    )
    for name, batch_value, run_value, loc in checks:
        if not math.isfinite(batch_value):
            msg = f"the batch's {name} is {batch_value}"
        elif not math.isfinite(run_value):
            msg = f"the run's {name} would become {run_value} (beyond float64)"
        else:
            continue
        msg += ": a run stores finite aggregates only, the batch was not counted"
        raise NonFiniteResult(msg, [{"loc": loc, "msg": msg, "type": "non_finite_result"}])
    if result.value is not None and not math.isfinite(result.value):
        msg = f"the batch's value is {result.value}: the batch was not counted"
        raise NonFiniteResult(msg, [{"loc": ["logits"], "msg": msg, "type": "non_finite_result"}])


def _refuse_non_finite_state(state: ReplicateState | None, where: str, weighted: bool) -> None:
    """A replicate (weights up to 18 × the sample weights) that left float64 is a 422: the run
    keeps finite states only, the batch was not counted."""
    if state is None or all(np.isfinite(v).all() for v in state.stats.values()):
        return
    msg = (
        f"a bootstrap replicate of {where} is not finite (example weights up to 18 × the "
        "sample weights): the batch was not counted"
    )
    loc = ["body", "sample_weight" if weighted else "logits"]
    raise NonFiniteResult(msg, [{"loc": loc, "msg": msg, "type": "non_finite_result"}])


def _store_unavailable(exc: Exception) -> Unavailable:
    return Unavailable(
        f"the run store is unavailable ({type(exc).__name__}); retry later",
        headers={"Retry-After": "1"},
    )


@dataclass
class BatchesSummary:
    """Running summary of a stream of :meth:`RunsDataPlane.add_batch` answers (the answer of
    :meth:`RunsDataPlane.add_batches`; adapters that admit each batch apart build it too)."""

    run_id: str
    accepted: int = 0
    duplicates: int = 0
    run: dict[str, Any] | None = None

    def add(self, answer: Mapping[str, Any]) -> None:
        if answer["duplicate"]:
            self.duplicates += 1
        else:
            self.accepted += 1
        self.run = answer["run"]

    def to_dict(self) -> dict[str, Any]:
        """``{run_id, batches, accepted, duplicates, run}``; ``run`` must be set."""
        assert self.run is not None
        return {
            "run_id": self.run_id,
            "batches": self.accepted + self.duplicates,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "run": self.run,
        }


@dataclass(frozen=True)
class RunConfig:
    """What a push needs before it takes the run's lock: fixed at creation, so a replica may
    keep it (``RunConfigCache``) for as long as the run is open."""

    pk: int
    owner: str | None
    loss: str
    options: Mapping[str, Any]
    metrics: Sequence[str]
    tags: Mapping[str, str]
    confidence: Mapping[str, Any] | None
    slice_keys: Sequence[str]
    max_slice_values: int
    replicate_numbers: int  # an upper bound of one replicate state's numbers (0: none)

    @classmethod
    def of(cls, run: Run) -> RunConfig:
        options = ce_engine.get_loss(run.loss).parse_options(run.options)
        numbers = 0
        if run.confidence is not None:
            numbers = slices.replicate_numbers(
                int(run.confidence["replicates"]),
                getattr(options, "n_bins", 15),
                len(getattr(options, "top_k", ())),
            )
        return cls(
            pk=run.pk,
            owner=run.owner,
            loss=run.loss,
            options=dict(run.options),
            metrics=list(run.metrics_requested),
            tags={t.key: t.value for t in run.tags},
            confidence=run.confidence,
            slice_keys=list(run.slice_keys or ()),
            max_slice_values=run.max_slice_values or slices.DEFAULT_SLICE_VALUES,
            replicate_numbers=numbers,
        )


class _BatchStored(Exception):
    """The batch row's insert hit its unique key (run, batch_id)."""


class _Unwritten(enum.Enum):
    """Why a write transaction wrote nothing without an error (answered from the store)."""

    CLOSED = "closed"
    STORED = "stored"  # this batch_id


#: What :meth:`RunsDataPlane.write_batches` says of one batch.
BatchOutcome = dict[str, Any] | _Unwritten | ServiceError


class _Refused(Exception):
    """A lone batch's refusal, carried out of its transaction (rolled back)."""

    def __init__(self, outcome: BatchOutcome) -> None:
        self.outcome = outcome


@dataclass(frozen=True)
class PreparedBatch:
    """A batch evaluated, before its write transaction (:meth:`RunsDataPlane.write_batch`):
    plain values, which the push writer's process receives pickled. ``result``: the batch's
    own (value, sum, denominator, count, ignored, metrics)."""

    run_id: str
    principal: str | None
    config: RunConfig
    batch_id: str
    content_hash: str
    result: dict[str, Any]
    non_finite: dict[str, Any]
    weighted: bool
    state: MetricState | None
    cells: Cells | None
    replicates: ReplicateState | None
    slices: dict[str, dict[str, pushes.SliceTotals]]
    fingerprint: Fingerprint
    paired: bool

    @property
    def value(self) -> float | None:
        value: float | None = self.result["value"]
        return value

    @property
    def sum(self) -> float:
        return float(self.result["sum"])

    @property
    def denominator(self) -> float:
        return float(self.result["denominator"])

    @property
    def count(self) -> int:
        return int(self.result["count"])


@dataclass(frozen=True)
class PendingBatch:
    """A prepared batch and, for answering a retry from the store, its digest (which holds
    the batch's arrays: it stays in the server)."""

    batch: PreparedBatch
    digest: BatchDigest


class _Totals(Protocol):
    """A batch's loss totals (an engine result, a prepared batch)."""

    @property
    def value(self) -> float | None: ...

    @property
    def sum(self) -> float: ...

    @property
    def denominator(self) -> float: ...

    @property
    def non_finite(self) -> dict[str, Any]: ...


_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


class LruCache(Generic[_Key, _Value]):
    """A thread-safe least-recently-used map of at most ``size`` entries, and with ``weigh``
    of at most ``max_weight`` Σ weigh(value) (a value heavier than that is not kept)."""

    def __init__(
        self,
        size: int,
        max_weight: int | None = None,
        weigh: Callable[[_Value], int] | None = None,
    ) -> None:
        self.size = size
        self.max_weight = max_weight
        self.weigh = weigh
        self.weight = 0
        self._entries: OrderedDict[_Key, tuple[_Value, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: _Key) -> _Value | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: _Key, value: _Value) -> None:
        weight = 0 if self.weigh is None else self.weigh(value)
        if self.max_weight is not None and weight > self.max_weight:
            return
        with self._lock:
            self._pop(key)
            self._entries[key] = (value, weight)
            self.weight += weight
            while len(self._entries) > self.size or (
                self.max_weight is not None and self.weight > self.max_weight
            ):
                self._pop(next(iter(self._entries)))

    def discard(self, key: _Key) -> None:
        with self._lock:
            self._pop(key)

    def _pop(self, key: _Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.weight -= entry[1]


class RunConfigCache(LruCache[str, "RunConfig"]):
    """``run id → RunConfig`` of open runs. Safe because a run's configuration never changes
    and its id is never reused: a run closed or deleted elsewhere (another replica) is still
    found out under the run's lock, before anything is written."""

    def __init__(self, size: int = RUN_CONFIG_CACHE) -> None:
        super().__init__(size)


class RunsDataPlane:
    """Create runs, add batches exactly once, read aggregates, series and comparisons.

    ``on_evaluate(loss, backend, seconds)`` and ``on_batch(outcome)`` are optional telemetry
    hooks (``outcome`` is ``accepted`` or ``duplicate``); ``on_run(summary, run_id)`` gets the
    summary of a monitored run (tagged ``baseline``) after each batch and its close, that of
    its baseline once per replica, and None when one is deleted.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        dataplane: DataPlane | None = None,
        *,
        on_evaluate: Callable[[str, str, float], None] | None = None,
        on_batch: Callable[[str], None] | None = None,
        on_run: Callable[[dict[str, Any] | None, str], None] | None = None,
        writer: PushWriter | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        #: runs the pushes' write transactions in a process of its own (None: in the caller's)
        self.writer = writer
        #: threads of pushes waiting for their write transaction (apart from anyio's default
        #: threads, which readiness and the run reads use); admission bounds them too
        self.write_limiter = anyio.CapacityLimiter(settings.max_inflight)
        self.dataplane = dataplane or DataPlane(settings)
        self.on_evaluate = on_evaluate
        self.on_batch = on_batch
        self.on_run = on_run
        self.configs = RunConfigCache()
        self.cells: LruCache[tuple[str, int], Cells] = LruCache(
            CELLS_CACHE, CELLS_CACHE_MAX_CELLS, lambda cells: int(cells.index.size)
        )
        self._merging = threading.Lock()  # one confusion merge at a time on this replica
        self._baselines_seen: set[str] = set()

    # ------------------------------------------------------------------ runs

    def create_run(
        self, payload: Mapping[str, Any] | CreateRunRequest, *, principal: str | None = None
    ) -> dict[str, Any]:
        """Validate the configuration (loss, options, metrics) and store a new open run owned by
        ``principal``."""
        request: CreateRunRequest = _parse(CreateRunRequest, payload, self.settings)
        try:
            spec = ce_engine.get_loss(request.loss)
            options = spec.parse_options(request.options)
        except ce_engine.EngineError as exc:
            raise engine_error(exc) from None
        if options.reduction == "none":
            raise ValidationFailed(
                "runs aggregate a reduced loss; reduction 'none' is not supported",
                [
                    {
                        "loc": ["body", "options", "reduction"],
                        "msg": "use mean, sum or batchmean for a run",
                        "type": "unsupported_reduction",
                    }
                ],
            )
        available = supported_metrics(spec.name, options)
        unknown = [
            {
                "loc": ["body", "metrics", i],
                "msg": f"metric {quoted(m)} is not available for {spec.name}",
                "type": "unknown_metric",
            }
            for i, m in enumerate(request.metrics)
            if m not in available
        ]
        if unknown:
            raise ValidationFailed(
                f"unsupported metrics; {spec.name} offers: {', '.join(available) or 'none'}",
                unknown,
            )
        keys = slices.check_slice_keys(request.slice_keys)
        if "max_slice_values" in request.model_fields_set and not keys:
            raise ValidationFailed(
                "max_slice_values bounds slice_keys' values: declare slice_keys too",
                [
                    {
                        "loc": ["body", "max_slice_values"],
                        "msg": "given without slice_keys",
                        "type": "extra",
                    }
                ],
            )
        slices.check_state_budget(
            request.confidence,
            getattr(options, "n_bins", 15),
            len(getattr(options, "top_k", ())),
            len(keys),
            request.max_slice_values,
        )
        now = utcnow()
        run = Run(
            id="run_" + uuid.uuid4().hex[:20],
            name=request.name,
            status="open",
            loss=spec.name,
            options=dict(request.options),
            metrics_requested=list(dict.fromkeys(request.metrics)),
            class_names=request.class_names,
            created_at=now,
            updated_at=now,
            batches=0,
            count=0,
            ignored=0,
            sum=0.0,
            denominator=0.0,
            metric_state=None,
            tags=[RunTag(key=k, value=v) for k, v in request.tags.items()],
            owner=principal,
            confidence=None if request.confidence is None else request.confidence.model_dump(),
            slice_keys=keys or None,
            max_slice_values=request.max_slice_values if keys else None,
        )
        with _store_guard(), self.store.write() as session:
            session.add(run)
        return self._run_dict(run)

    def get_run(self, run_id: str, *, principal: str | None = None) -> dict[str, Any]:
        """The run's summary plus its small arrays (``run_details.small_metrics``, the confusion
        matrix and class names up to ``run_detail_max_classes`` classes)."""
        with _store_guard(), self.store.read() as session:
            run = self._load(session, run_id, principal)
            state = self._state(run)
            limit = self.settings.run_detail_max_classes
            if state is None:
                return self._summary(run, None, {})
            metrics = run_details.small_metrics(state, limit)
            softmax = state.family == "softmax"
            if softmax and "confusion_matrix" in state.names and state.num_classes <= limit:
                whole = self._confusion_detail(session, run, state, run_details.DetailQuery())
                metrics["confusion_matrix"] = whole["matrix"]
            return self._summary(run, state, metrics)

    def run_metric(
        self,
        run_id: str,
        name: str,
        query: run_details.DetailQuery | None = None,
        *,
        principal: str | None = None,
    ) -> dict[str, Any]:
        """One statistic of the run in full (``GET /v1/runs/{id}/metrics/{name}``, see
        :mod:`service.dataplane.run_details`): 404 for a name not in the run's ``details``,
        422 for a query it does not take."""
        query = query or run_details.DetailQuery()
        with _store_guard(), self.store.read() as session:
            run = self._load(session, run_id, principal)
            offered = run_details.details(run.metrics_requested)
            if name not in offered:
                raise run_details.not_in_run(name, offered)
            state = self._state(run)
            if state is None:
                raise NotFound(
                    f"run {quoted(run_id)} has no batches yet",
                    [{"loc": ["path", "run_id"], "msg": "no batches yet", "type": "no_batches"}],
                )
            binary = state.family == "binary"
            run_details.check_query(name, query, state.num_classes, binary)
            names = run.class_names
            if name == "confusion_matrix":
                if binary:
                    return run_details.binary_matrix(state, query.classes, query.normalize)
                return self._confusion_detail(session, run, state, query)
            if name == "per_class":
                return run_details.per_class_table(state, query, names)
            if name == "reliability":
                return run_details.reliability(state)
            if name in ("roc_curve", "pr_curve"):
                limit = self.settings.run_detail_max_classes
                shown = len(query.classes) if query.classes is not None else state.num_classes
                if shown <= max(limit, run_details.MAX_CLASSES):  # else 422 (name classes)
                    points = shown * (state.n_thresholds + 1) * 3
                    self.dataplane.check_response_size(
                        {name: points * run_details.NUMBER_BYTES},
                        "the curves (ask for fewer classes)",
                    )
                return run_details.curves(state, name, query.classes, limit)
            return {"name": name, "value": state.compute(only=(name,))[name]}

    def run_slices(
        self,
        run_id: str,
        key: str,
        query: slices.SliceQuery | None = None,
        *,
        principal: str | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/runs/{id}/slices?key=…``: each value of slice key ``key`` with its count,
        loss ``value``, scalar metrics and intervals, sorted, paged; values with fewer than
        ``min_slice_size`` examples are left out and counted in ``hidden``."""
        query = query or slices.SliceQuery()
        with _store_guard(), self.store.read() as session:
            run = self._load(session, run_id, principal)
            declared = run.slice_keys or []
            if key not in declared:
                raise ValidationFailed(
                    f"run {quoted(run_id)} has no slice key {quoted(key)}; its keys: "
                    f"{', '.join(declared) or 'none'}",
                    [
                        {
                            "loc": ["query", "key"],
                            "msg": "not a slice key of the run",
                            "type": "enum",
                        }
                    ],
                )
            rows = pushes.slice_rows(session, run.pk, key)
            reduction = self._reduction(run)
            table = []
            for row in rows:
                state = (
                    None if row.metric_state is None else MetricState.from_dict(row.metric_state)
                )
                metrics = {} if state is None else _scalar_metrics(_summary_values(state))
                table.append(
                    {
                        "slice": row.value,
                        "count": row.count,
                        "ignored": row.ignored,
                        "value": _run_value(reduction, row.sum, row.denominator, 1),
                        "metrics": metrics,
                    }
                )
            shown = [r for r in table if r["count"] >= query.min_slice_size]
            page = slices.sort_page(shown, query)
            replicates = pushes.slice_replicates(session, run.pk, key, [r["slice"] for r in page])
        for row in page:
            stored = replicates.get(row["slice"])
            parsed = None if stored is None else ReplicateState.from_dict(stored)
            row["intervals"] = slices.intervals(
                parsed, {"value": row["value"], **row["metrics"]}, run.confidence
            )
        return {
            "run_id": run.id,
            "key": key,
            "values": len(table),
            "hidden": len(table) - len(shown),
            "slices": page,
        }

    def list_runs(
        self,
        *,
        name: str | None = None,
        tags: Sequence[str] = (),
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        principal: str | None = None,
    ) -> dict[str, Any]:
        """Newest first. ``name`` matches a substring; each ``tags`` item is ``key:value``
        (all must match). ``next_cursor`` is null on the last page."""
        if status is not None and status not in ("open", "closed"):
            raise ValidationFailed(
                f"status must be open or closed, got {quoted(status)}",
                [{"loc": ["query", "status"], "msg": "open or closed", "type": "enum"}],
            )
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValidationFailed(
                f"limit must be between 1 and {MAX_LIST_LIMIT}",
                [{"loc": ["query", "limit"], "msg": "out of range", "type": "limit"}],
            )
        if len(tags) > MAX_TAG_FILTERS:
            raise ValidationFailed(
                f"at most {MAX_TAG_FILTERS} tag filters, got {len(tags)}",
                [
                    {
                        "loc": ["query", "tag"],
                        "msg": f"at most {MAX_TAG_FILTERS} tag filters",
                        "type": "too_many_tag_filters",
                    }
                ],
            )
        query = _owned(select(Run), principal).order_by(Run.pk.desc()).limit(limit + 1)
        if name:
            query = query.where(Run.name.contains(name, autoescape=True))
        if status:
            query = query.where(Run.status == status)
        for i, tag in enumerate(tags):
            key, sep, value = tag.partition(":")
            if not sep or not key:
                raise ValidationFailed(
                    f"tag filter {quoted(tag)} must be key:value",
                    [{"loc": ["query", "tag", i], "msg": "expected key:value", "type": "tag"}],
                )
            query = query.where(
                exists().where(RunTag.run_pk == Run.pk, RunTag.key == key, RunTag.value == value)
            )
        if cursor:
            query = query.where(Run.pk < _decode_cursor("runs", cursor))
        with _store_guard(), self.store.read() as session:
            rows = list(session.scalars(query))
        page = rows[:limit]
        next_cursor = _encode_cursor("runs", page[-1].pk) if len(rows) > limit else None
        return {"runs": [self._run_dict(r) for r in page], "next_cursor": next_cursor}

    def close_run(self, run_id: str, *, principal: str | None = None) -> dict[str, Any]:
        """Close the run (idempotent); later batches get 409."""
        self.configs.discard(run_id)
        with _store_guard(), self.store.write() as session:
            run = self._load(session, run_id, principal, lock=True)
            if run.status != "closed":
                run.status = "closed"
                run.closed_at = run.updated_at = utcnow()
            summary = self._run_dict(run)
        self._monitor(summary, principal)
        return summary

    def delete_run(self, run_id: str, *, principal: str | None = None) -> None:
        """Delete the run, its tags and its batches."""
        self.configs.discard(run_id)
        with _store_guard(), self.store.write() as session:
            run = self._load(session, run_id, principal, lock=True)
            session.execute(delete(Batch).where(Batch.run_pk == run.pk))
            session.execute(delete(ConfusionBlock).where(ConfusionBlock.run_pk == run.pk))
            session.execute(delete(RunSlice).where(RunSlice.run_pk == run.pk))
            session.delete(run)
        if self.on_run is not None:
            self.on_run(None, run_id)

    def compare(
        self,
        run_ids: Sequence[str],
        *,
        principal: str | None = None,
        baseline: str | None = None,
        slice_key: str | None = None,
    ) -> dict[str, Any]:
        """Several runs side by side: ``runs`` in the order asked and ``table`` = scalar metric
        (and ``value``) → {run id: number}; with ``baseline`` (one of the ids) also ``deltas``
        of the others against it (:func:`service.dataplane.gate.compare_deltas`, on the slices
        of ``slice_key`` too)."""
        ids = [i for i in dict.fromkeys(run_ids) if i]
        if not 1 <= len(ids) <= MAX_COMPARE:
            raise ValidationFailed(
                f"ids must name between 1 and {MAX_COMPARE} runs, comma-separated",
                [{"loc": ["query", "ids"], "msg": "1 to 20 run ids", "type": "ids"}],
            )
        with _store_guard(), self.store.read() as session:
            query = _owned(select(Run), principal).where(Run.id.in_(ids))
            found = {r.id: r for r in session.scalars(query)}
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFound(
                    f"runs not found: {', '.join(missing)}",
                    [
                        {
                            "loc": ["query", "ids", ids.index(m)],
                            "msg": "no run",
                            "type": "not_found",
                        }
                        for m in missing
                    ],
                )
            runs = [self._run_dict(found[i]) for i in ids]
            views = None
            if slice_key is not None:
                _check_compare_slices(slice_key, baseline, [found[i] for i in ids])
            if baseline is not None:
                if baseline not in found:
                    raise ValidationFailed(
                        f"baseline {quoted(baseline)} must be one of ids",
                        [{"loc": ["query", "baseline"], "msg": "not in ids", "type": "baseline"}],
                    )
                views = [self._view(session, found[i], key=slice_key or "") for i in ids]
        table: dict[str, dict[str, Any]] = {"value": {r["id"]: r["value"] for r in runs}}
        for run in runs:
            for key, value in _scalar_metrics(run["metrics"]).items():
                table.setdefault(key, {})[run["id"]] = value
        answer: dict[str, Any] = {"runs": runs, "table": table}
        if views is not None and baseline is not None:
            answer["baseline"] = baseline
            answer["deltas"] = gating.compare_deltas(views, baseline)
        return answer

    def gate(self, run_id: str, payload: Any, *, principal: str | None = None) -> dict[str, Any]:
        """``POST /v1/runs/{id}/gate``: non-inferiority checks of this run against
        ``baseline`` (:func:`service.dataplane.gate.run_gate`); the answer is stored on the run
        (its summary's ``gate``)."""
        request = gating.parse_gate_request(payload)
        pairs = sorted({c.slice for c in request.checks if c.slice is not None})
        with _store_guard(), self.store.read() as session:
            run = self._load(session, run_id, principal)
            candidate = self._view(session, run, pairs=pairs)
            try:
                base = self._load(session, request.baseline, principal)
            except NotFound:
                raise NotFound(
                    f"baseline run {quoted(request.baseline)} not found",
                    [{"loc": ["body", "baseline"], "msg": "no run", "type": "not_found"}],
                ) from None
            baseline = self._view(session, base, pairs=pairs)
            at = (run.batches, run.count, base.batches, base.count)
        answer = gating.run_gate(candidate, baseline, request.checks, request.allow_inconclusive)
        answer["at"] = {  # what the verdict saw: a later batch makes it stale
            "batches": at[0],
            "count": at[1],
            "baseline_batches": at[2],
            "baseline_count": at[3],
        }
        with _store_guard(), self.store.write() as session:
            self._load(session, run_id, principal, lock=True).gate = answer
        return answer

    def _view(
        self,
        session: Session,
        run: Run,
        *,
        pairs: Sequence[tuple[str, str]] | None = None,
        key: str = "",
    ) -> gating.RunReplicates:
        """The run's point values and replicates for the gate and the comparison, with those
        of its slices ``pairs`` (or of every value of slice ``key``)."""
        reduction = self._reduction(run)
        value = _run_value(reduction, run.sum, run.denominator, run.batches)
        totals = pushes.slice_totals(session, run.pk, pairs=list(pairs) if pairs else None, key=key)
        parts = {
            where: _replicates_of(
                run,
                f"{run.id}@{where[0]}={where[1]}",
                _run_value(reduction, t.sum, t.denominator, 1),
                t.metric_state,
                t.replicate_state,
                t.fingerprint,
            )
            for where, t in totals.items()
            if pairs or key
        }
        return _replicates_of(
            run, run.id, value, run.metric_state, run.replicate_state, run.fingerprint, parts
        )

    # --------------------------------------------------------------- batches

    def add_batch(
        self,
        run_id: str,
        payload: Mapping[str, Any] | AddBatchRequest,
        *,
        principal: str | None = None,
    ) -> dict[str, Any]:
        """Evaluate one batch with the run's loss and metrics and add it to the aggregates:
        :meth:`prepare_batch`, then :meth:`finish_batch`.

        The same ``batch_id`` with the same content (BLAKE3 of the decoded tensors) answers the
        stored batch result again with ``duplicate: true`` and changes nothing; with different
        content it is a 409, as is any batch for a closed run.

        One write transaction when the run's configuration is cached (``configs``; the push
        writer's may hold other pushes too, :meth:`write_batches`):
        the batch is evaluated first, then the run is locked, the batch row inserted (a stored
        ``batch_id`` fails the insert: the transaction is rolled back and the retry answered
        from the store) and the aggregates updated. Otherwise a read first finds the run (404),
        a replay or a closed run before any evaluation.
        """
        pending = self.prepare_batch(run_id, payload, principal=principal)
        return pending if isinstance(pending, dict) else self.finish_batch(pending)

    async def add_batch_async(
        self,
        run_id: str,
        payload: BatchPayload,
        *,
        principal: str | None = None,
    ) -> dict[str, Any]:
        """:meth:`add_batch` from an event loop, within the admission bound (503 when full):
        the evaluation in a compute thread, the write transaction in another thread, so that
        a push waiting for the push writer or the database holds no compute thread.

        ``payload`` may be the body's parser (a callable): it then runs in the evaluation's
        compute thread, one hop for both."""
        with self.dataplane.admission.admit():
            prepare = partial(self._prepare_parsed, principal=principal)
            pending = await self.dataplane.in_thread(prepare, run_id, payload)
            if isinstance(pending, dict):
                return pending
            return await anyio.to_thread.run_sync(
                self.finish_batch, pending, limiter=self.write_limiter
            )

    def _prepare_parsed(
        self,
        run_id: str,
        payload: BatchPayload,
        *,
        principal: str | None = None,
    ) -> dict[str, Any] | PendingBatch:
        parsed = payload() if callable(payload) else payload
        return self.prepare_batch(run_id, parsed, principal=principal)

    def prepare_batch(
        self,
        run_id: str,
        payload: Mapping[str, Any] | AddBatchRequest,
        *,
        principal: str | None = None,
    ) -> dict[str, Any] | PendingBatch:
        """The batch validated and evaluated, ready for its write transaction; or the stored
        answer of a retry found before any evaluation (the run's configuration not cached)."""
        request: AddBatchRequest = _parse(AddBatchRequest, payload, self.settings)
        arrays, digest = self._decode_batch(request)
        logits, sample_weight = arrays["logits"], arrays["sample_weight"]
        linear = _linear(arrays)

        config = self.configs.get(run_id)
        if config is not None and principal is not None and config.owner != principal:
            raise _not_found(run_id)
        if config is None:
            with _store_guard(), self.store.read() as session:
                run = self._load(session, run_id, principal)
                replay = self._replay(session, run, request.batch_id, digest)
                if replay is not None:
                    return replay
                if run.status == "closed":
                    raise _closed(run_id)
                config = RunConfig.of(run)
            self.configs.put(run_id, config)

        rows = logits if logits is not None else linear.get("features")
        examples = 0 if rows is None or rows.ndim == 0 else int(rows.shape[0])
        groups = self._check_batch_cost(config, request, arrays, examples)
        identity = _identity(request.example_ids, request.batch_id, examples)
        weights = None
        if config.confidence is not None:
            weights = poisson_weights(
                identity.h1, int(config.confidence["replicates"]), int(config.confidence["seed"])
            )
        started = time.perf_counter()
        result = self._evaluate(config, arrays, weights)
        if self.on_evaluate is not None:
            self.on_evaluate(config.loss, result.backend, time.perf_counter() - started)
        _refuse_non_finite(result, 0.0, 0.0, sample_weight is not None)
        state, cells = _split_cells(result.metric_state)
        batch_slices = {
            key: {
                value: self._slice_totals(config, arrays, weights, result, where, identity)
                for value, where in rows.items()
            }
            for key, rows in groups.items()
        }
        prepared = PreparedBatch(
            run_id=run_id,
            principal=principal,
            config=config,
            batch_id=request.batch_id,
            content_hash=digest.value,
            result={
                "value": result.value,
                "sum": result.sum,
                "denominator": result.denominator,
                "count": result.count,
                "ignored": result.ignored,
                "metrics": _scalar_metrics(result.metrics),
            },
            non_finite=result.non_finite,
            weighted=sample_weight is not None,
            state=state,
            cells=cells,
            replicates=result.replicate_state,
            slices=batch_slices,
            fingerprint=identity.fingerprint,
            paired=identity.paired,
        )
        return PendingBatch(prepared, digest)

    def finish_batch(self, pending: PendingBatch) -> dict[str, Any]:
        """The write transaction of a prepared batch (in the push writer, or here) and its
        answer: a closed run's 409, or a stored ``batch_id`` answered from the store."""
        prepared = pending.batch
        run_id, principal = prepared.run_id, prepared.principal
        try:
            outcome = self._write(prepared)
        except NotFound:
            self.configs.discard(run_id)
            raise
        if not isinstance(outcome, dict):  # the run is closed, or this batch_id is stored
            try:
                with _store_guard(), self.store.read() as session:
                    run = self._load(session, run_id, principal)
                    replay = self._replay(session, run, prepared.batch_id, pending.digest)
            except NotFound:  # deleted meanwhile
                self.configs.discard(run_id)
                raise
            if replay is not None:
                return replay
            if outcome is _Unwritten.STORED:  # a batch row goes only with its run
                raise RuntimeError(f"batch {prepared.batch_id!r} was stored, then not found")
            self.configs.discard(run_id)
            raise _closed(run_id)
        if self.on_batch is not None:
            self.on_batch("accepted")
        self._monitor(outcome["run"], principal)
        return outcome

    def _write(self, batch: PreparedBatch) -> dict[str, Any] | _Unwritten:
        """``write_batch`` in the push writer, or here: without one, or with one that cannot
        start (then from now on; it logs why)."""
        if self.writer is not None:
            try:
                return self.writer.write_batch(batch)
            except WriterUnstartable:
                self.writer = None
        return self.write_batch(batch)

    def write_batch(self, batch: PreparedBatch) -> dict[str, Any] | _Unwritten:
        """:meth:`write_batches` of this batch alone, its refusal raised."""
        outcome = self.write_batches([batch])[0]
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    def write_batches(self, batches: Sequence[PreparedBatch]) -> list[BatchOutcome]:
        """The write transaction of pushes, in order (one, or the push writer's group: those
        queued while its last transaction ran). The runs are locked first, in id order (a
        deadlock between two replicas' groups needs two orders); then each batch inserts its
        batch row and adds itself to its run's slices, confusion blocks and totals; each run's
        totals are written once, at the end.

        A batch's outcome is the one it would get alone after those before it: its answer;
        ``CLOSED`` (the run is closed); ``STORED`` (its insert failed on the unique key, before
        any check of the merge); or its refusal (404, 422). A refused or stored batch writes
        nothing: alone, its transaction is rolled back; in a group, each batch's statements
        follow a savepoint it is rolled back to. Any other error (503: the store) rolls back
        the whole transaction and is raised. Runs in this process or in the push writer's
        (``CE_EVAL_PUSH_WRITER``)."""
        outcomes: list[BatchOutcome] = []
        grouped = len(batches) > 1
        try:
            with _store_guard(), self.store.transaction() as connection:
                # in id order: two replicas' groups lock shared runs in the same order
                ids = sorted({b.run_id for b in batches})
                runs = {i: pushes.lock_run(connection, i) for i in ids}
                written: dict[str, tuple[Run, dict[str, Any]]] = {}
                for batch in batches:
                    run = runs[batch.run_id]
                    if run is None or batch.principal not in (None, run.owner):
                        outcomes.append(_not_found(batch.run_id))
                        continue
                    if run.status == "closed":
                        outcomes.append(_Unwritten.CLOSED)
                        continue
                    if grouped:
                        connection.exec_driver_sql("SAVEPOINT push")
                    before = {name: getattr(run, name) for name in pushes.TOTALS}
                    try:
                        answer, totals = self._add_to_run(connection, run, batch)
                    except (_BatchStored, ServiceError) as exc:
                        refused: BatchOutcome = (
                            _Unwritten.STORED if isinstance(exc, _BatchStored) else exc
                        )
                        if not grouped:
                            raise _Refused(refused) from exc  # out of the transaction
                        connection.exec_driver_sql("ROLLBACK TO SAVEPOINT push")
                        for name, value in before.items():
                            setattr(run, name, value)
                        outcomes.append(refused)
                        continue
                    written[run.id] = run, totals
                    outcomes.append(answer)
                for run, totals in written.values():
                    pushes.update_totals(connection, run, totals)
        except _Refused as exc:
            return [exc.outcome]
        return outcomes

    def _add_to_run(
        self, connection: Connection, run: Run, batch: PreparedBatch
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Insert the batch's row (``_BatchStored`` on its unique key), check and add it to
        ``run``'s slices and confusion blocks, and set ``run``'s totals to the new ones: the
        batch's answer and those totals (``pushes.TOTALS``, for the caller to write)."""
        config = batch.config
        row: dict[str, Any] = {
            "run_pk": run.pk,
            "batch_id": batch.batch_id,
            "seq": run.batches + 1,
            "content_hash": batch.content_hash,
            "count": batch.count,
            "sum": batch.sum,
            "denominator": batch.denominator,
            "result": batch.result,
            "created_at": utcnow(),
        }
        try:
            pushes.insert_batch(connection, row)
        except IntegrityError as exc:
            raise _BatchStored from exc
        _refuse_non_finite(batch, run.sum, run.denominator, batch.weighted)
        merged = self._merge_state(run.metric_state, batch.state)
        replicates = _merge_replicates(run.replicate_state, batch.replicates)
        _refuse_non_finite_state(replicates, "the run", batch.weighted)
        if batch.slices:
            self._add_slices(connection, run, config, batch.slices)
        if batch.cells is not None:
            pushes.add_block(connection, run.pk, row["seq"], batch.cells)
            pushes.compact_when_due(connection, run.pk, batch.cells.size)
        totals: dict[str, Any] = {
            "batches": row["seq"],
            "count": run.count + batch.count,
            "ignored": run.ignored + batch.result["ignored"],
            "sum": run.sum + batch.sum,
            "denominator": run.denominator + batch.denominator,
            "metric_state": None if merged is None else merged.to_dict(),
            "updated_at": row["created_at"],
            "replicate_state": None if replicates is None else replicates.to_dict(),
            "intervals": None,  # the answer's, below
            "fingerprint": batch.fingerprint.merge(
                Fingerprint.from_dict(run.fingerprint)
                if run.fingerprint is not None
                else Fingerprint(0, 0, 0)
            ).to_dict(),
            "paired_ids": batch.paired and (run.paired_ids or run.batches == 0),
        }
        for name, total in totals.items():  # the answer is made from the new totals
            setattr(run, name, total)
        answer = self._batch_answer(
            run, row, duplicate=False, state=merged, tags=config.tags, replicates=replicates
        )
        totals["intervals"] = run.intervals = answer["run"]["intervals"]
        return answer, totals

    def _decode_batch(self, request: AddBatchRequest) -> tuple[dict[str, Any], BatchDigest]:
        """The batch's tensors (413 over ``max_elements``) and its content digest: of the
        tensors, then of ``example_ids`` and ``slices`` with it when given."""
        arrays = {
            name: self.dataplane.decode(getattr(request, name), name) for name in BATCH_TENSORS
        }
        total = sum(a.size for a in arrays.values() if a is not None)
        if total > self.settings.max_elements:
            raise decode_limit_error(total, self.settings.max_elements)
        linear = _linear(arrays)
        if linear and arrays["logits"] is not None:
            raise ValidationFailed(
                "send logits, or features and weight (linear_cross_entropy), not both",
                [{"loc": ["body", "logits"], "msg": "logits beside features", "type": "extra"}],
            )
        # the digest of a logits batch is as before linear batches existed (stored batches replay)
        hashed = {k: arrays[k] for k in ("logits", "targets", "sample_weight")} | linear
        labels = None
        if request.example_ids is not None or request.slices is not None:
            labels = orjson.dumps(
                {"example_ids": request.example_ids, "slices": request.slices},
                option=orjson.OPT_SORT_KEYS,
            )
        return arrays, BatchDigest(content_hash(hashed, labels), hashed, labels)

    def _check_batch_cost(
        self,
        config: RunConfig,
        request: AddBatchRequest,
        arrays: Mapping[str, Any],
        examples: int,
    ) -> dict[str, dict[str, np.ndarray]]:
        """Before any work: the batch's ids and slices against the run (422), its N × B
        weights against ``max_elements`` and its work against ``max_work`` (413). Returns the
        slice key → value → rows groups."""
        by_key = slices.check_batch_fields(
            request.example_ids, request.slices, config.slice_keys, examples,
            config.max_slice_values,
        )  # fmt: skip
        groups = {key: slices.slice_rows(values) for key, values in by_key.items()}
        touched = sum(len(g) for g in groups.values())  # slice states read, merged, written
        draws = 0 if config.confidence is None else int(config.confidence["replicates"])
        if examples * draws > self.settings.max_elements:
            raise PayloadTooLarge(
                f"{examples} examples × {draws} replicates is over the limit of "
                f"{self.settings.max_elements} weights (CE_EVAL_MAX_ELEMENTS): send smaller "
                "batches",
                [
                    {
                        "loc": ["body", "logits"],
                        "msg": f"rows × the run's confidence.replicates ({draws}) over the limit",
                        "type": "too_many_weights",
                    }
                ],
            )
        # each slice key evaluates the batch's rows once more; the replicates are (N, B) weights
        # times the statistics
        linear = _linear(arrays)
        self.dataplane.check_work(
            arrays["logits"],
            linear,
            repeat=1 + len(by_key),
            extra=examples * draws * slices.REPLICATE_WORK * (1 + len(by_key))
            + touched * (slices.SLICE_VALUE_WORK + 20 * config.replicate_numbers),
        )
        return groups

    def _monitor(self, run: dict[str, Any], principal: str | None) -> None:
        """``on_run`` of a monitored run, and of its baseline until found once. Telemetry never
        fails a request: its errors are logged."""
        baseline = run["tags"].get("baseline")
        if self.on_run is None or baseline is None:
            return
        try:
            self.on_run(run, run["id"])
            if baseline not in self._baselines_seen:
                with contextlib.suppress(NotFound):
                    self.on_run(self.get_run(baseline, principal=principal), baseline)
                    self._baselines_seen.add(baseline)
        except Exception:
            log.exception("exporting run gauges failed", extra={"run_id": run["id"]})

    def _evaluate(
        self, config: RunConfig, arrays: Mapping[str, Any], weights: np.ndarray | None
    ) -> ce_engine.EvaluationResult:
        """The run's loss and metrics of these tensors (with ``weights``: the replicates)."""
        linear = _linear(arrays)
        try:
            return ce_engine.evaluate(
                config.loss,
                arrays["logits"],
                arrays["targets"],
                options=config.options,
                outputs=("loss",),
                metrics=config.metrics,
                sample_weight=arrays["sample_weight"],
                backend=self.settings.backend,
                metric_values=run_details.summary_names(config.metrics),
                replicate_weights=weights,
                **linear,
            )
        except ce_engine.EngineError as exc:
            raise engine_error(exc) from None

    def _slice_totals(
        self,
        config: RunConfig,
        arrays: Mapping[str, Any],
        weights: np.ndarray | None,
        result: ce_engine.EvaluationResult,
        rows: np.ndarray,
        identity: _Identity,
    ) -> pushes.SliceTotals:
        """One slice value of the batch: its examples ``rows`` evaluated alone, and their
        replicates from the batch's per-example sums."""
        sub = self._evaluate(config, slices.take_rows(arrays, rows), None)
        state, _ = _split_cells(sub.metric_state)
        replicates = None
        if weights is not None and result.example_statistics is not None:
            drawn = result.example_statistics.replicates(weights, rows)
            _refuse_non_finite_state(drawn, "a slice", arrays["sample_weight"] is not None)
            replicates = drawn.to_dict()
        return pushes.SliceTotals(
            count=sub.count,
            ignored=sub.ignored,
            sum=sub.sum,
            denominator=sub.denominator,
            metric_state=None if state is None else state.to_dict(),
            replicate_state=replicates,
            fingerprint=Fingerprint.of(identity.h1[rows], identity.h2[rows]).to_dict(),
        )

    @staticmethod
    def _add_slices(
        connection: Connection,
        run: Run,
        config: RunConfig,
        batch: Mapping[str, Mapping[str, pushes.SliceTotals]],
    ) -> None:
        """Add the batch's slice totals to the run's (under the run's lock); 422 naming the
        first value beyond ``max_slice_values`` of its key, before anything is written."""
        wanted = [(key, value) for key, values in batch.items() for value in values]
        stored = pushes.load_slices(connection, run.pk, wanted)
        known = pushes.slice_value_counts(connection, run.pk)
        for key, values in batch.items():
            new = [v for v in values if (key, v) not in stored]
            room = config.max_slice_values - known.get(key, 0)
            if len(new) > room:
                raise ValidationFailed(
                    f"slice key {quoted(key)} would get more than {config.max_slice_values} "
                    f"values (max_slice_values); {quoted(new[room])} is one too many",
                    [
                        {
                            "loc": ["body", "slices", key],
                            "msg": f"value {quoted(new[room])} is beyond max_slice_values",
                            "type": "too_many_slice_values",
                        }
                    ],
                )
        merged = {
            (key, value): add
            if stored.get((key, value)) is None
            else _add_totals(stored[key, value], add)
            for key, values in batch.items()
            for value, add in values.items()
        }
        for (key, value), totals in merged.items():
            if not (math.isfinite(totals.sum) and math.isfinite(totals.denominator)):
                raise NonFiniteResult(
                    f"slice {key}={value}: its loss sums would leave float64; the batch was not "
                    "counted",
                    [
                        {
                            "loc": ["body", "slices", key],
                            "msg": "non-finite slice",
                            "type": "non_finite_result",
                        }
                    ],
                )
        for (key, value), totals in merged.items():
            pushes.put_slice(connection, run.pk, key, value, totals, new=(key, value) not in stored)

    def add_batches(
        self,
        run_id: str,
        payloads: Iterable[Mapping[str, Any] | AddBatchRequest],
        *,
        principal: str | None = None,
    ) -> dict[str, Any]:
        """Add a stream of batches in order (e.g. a client-streaming RPC); each is its own
        transaction, so a failure part-way keeps the batches before it. Returns the summary
        ``{run_id, batches, accepted, duplicates, run}``; the first failing batch raises."""
        summary = BatchesSummary(run_id)
        for payload in payloads:
            summary.add(self.add_batch(run_id, payload, principal=principal))
        if summary.run is None:
            summary.run = self.get_run(run_id, principal=principal)
        return summary.to_dict()

    def list_batches(
        self,
        run_id: str,
        *,
        limit: int = 1000,
        cursor: str | None = None,
        principal: str | None = None,
    ) -> dict[str, Any]:
        """Per-batch series in arrival order: each batch's own ``value``/sums/scalar metrics and
        the run's running ``cumulative_value`` after it (for loss curves)."""
        if not 1 <= limit <= MAX_SERIES_LIMIT:
            raise ValidationFailed(
                f"limit must be between 1 and {MAX_SERIES_LIMIT}",
                [{"loc": ["query", "limit"], "msg": "out of range", "type": "limit"}],
            )
        after = _decode_cursor("batches", cursor) if cursor else 0
        with _store_guard(), self.store.read() as session:
            run = self._load(session, run_id, principal)
            prior_sum, prior_den = session.execute(
                select(
                    func.coalesce(func.sum(Batch.sum), 0.0),
                    func.coalesce(func.sum(Batch.denominator), 0.0),
                ).where(Batch.run_pk == run.pk, Batch.seq <= after)
            ).one()
            rows = list(
                session.scalars(
                    select(Batch)
                    .where(Batch.run_pk == run.pk, Batch.seq > after)
                    .order_by(Batch.seq)
                    .limit(limit + 1)
                )
            )
        reduction = self._reduction(run)
        running_sum, running_den = float(prior_sum), float(prior_den)
        series = []
        for batch in rows[:limit]:
            running_sum += batch.sum
            running_den += batch.denominator
            series.append(
                {
                    "seq": batch.seq,
                    "batch_id": batch.batch_id,
                    **batch.result,
                    "cumulative_value": _run_value(reduction, running_sum, running_den, 1),
                    "created_at": _isoformat(batch.created_at),
                }
            )
        next_cursor = _encode_cursor("batches", rows[limit - 1].seq) if len(rows) > limit else None
        return {"run_id": run.id, "batches": series, "next_cursor": next_cursor}

    # --------------------------------------------------------------- helpers

    @staticmethod
    def _load(
        session: Session,
        run_id: str,
        principal: str | None,
        *,
        lock: bool = False,
    ) -> Run:
        """The run (404 if missing or not ``principal``'s), row-locked with ``lock``."""
        query = _owned(select(Run), principal).where(Run.id == run_id)
        if lock:
            query = query.with_for_update()
        run = session.scalars(query).one_or_none()
        if run is None:
            raise _not_found(run_id)
        return run

    def _replay(
        self,
        session: Session,
        run: Run,
        batch_id: str,
        digest: BatchDigest,
        tags: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """The stored answer again when ``batch_id`` is stored with this content, 409 when with
        other content, None when new."""
        existing = pushes.find_batch(session, run.pk, batch_id)
        if existing is None:
            return None
        if not digest.matches(existing["content_hash"]):
            raise _content_conflict(batch_id)
        if self.on_batch is not None:
            self.on_batch("duplicate")
        return self._batch_answer(run, existing, duplicate=True, tags=tags)

    @staticmethod
    def _merge_state(
        stored: dict[str, Any] | None, state: MetricState | None
    ) -> MetricState | None:
        """The run's stored state plus the batch's (422 when they do not fit together)."""
        if state is None:
            return None if stored is None else MetricState.from_dict(stored)
        if stored is None:
            return state
        try:
            merged = MetricState.from_dict(stored).merge(state)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValidationFailed(
                f"this batch's metrics cannot be merged into the run: {exc}",
                [{"loc": ["body", "logits"], "msg": str(exc), "type": "metric_state_mismatch"}],
            ) from None
        return merged

    def _batch_answer(
        self,
        run: Run,
        batch: Mapping[str, Any],
        *,
        duplicate: bool,
        state: MetricState | None = None,
        tags: Mapping[str, str] | None = None,
        replicates: ReplicateState | None = None,
    ) -> dict[str, Any]:
        """``state``, ``replicates``: the run's parsed states when the caller has them;
        ``tags``: likewise."""
        return {
            "run_id": run.id,
            "batch_id": batch["batch_id"],
            "seq": batch["seq"],
            "duplicate": duplicate,
            "batch": dict(batch["result"]),
            "run": self._run_dict(run, state, tags, replicates),
        }

    @staticmethod
    def _reduction(run: Run) -> tuple[str, str, str]:
        options = ce_engine.get_loss(run.loss).parse_options(run.options)
        normalization = "batch_size" if options.reduction == "batchmean" else options.normalization
        unit = "bits" if options.log_base == "2" else "nats"
        return options.reduction, normalization, unit

    @staticmethod
    def _state(run: Run) -> MetricState | None:
        return None if run.metric_state is None else MetricState.from_dict(run.metric_state)

    def _confusion_detail(
        self, session: Session, run: Run, state: MetricState, query: run_details.DetailQuery
    ) -> dict[str, Any]:
        c, names = state.num_classes, run.class_names
        if query.top is None and query.classes is None:
            self.dataplane.check_response_size(
                {"confusion_matrix": run_details.NUMBER_BYTES * c * c},
                "the whole matrix (ask for top=K or classes=…)",
            )
        cells = self._cells(session, run, c)
        totals = cells.row_totals() if query.normalize else None
        if query.top is not None:
            top = run_details.largest_cells(cells, query.top)
            return run_details.top_cells(top, c, totals, names)
        return run_details.matrix_block(cells, query.classes, totals, names)

    def _cells(self, session: Session, run: Run, size: int) -> Cells:
        """The run's merged confusion table (cached per (run, batches) on this replica). One
        merge at a time: concurrent reads of a run wait for its first merge and find it
        cached, and the merges' memory is one run's at most."""
        key = (run.id, run.batches)
        cells = self.cells.get(key)
        if cells is not None:
            return cells
        with self._merging:
            cells = self.cells.get(key)
            if cells is None:
                cells = pushes.load_cells(session.connection(), run.pk, size)
                self.cells.put(key, cells)
        return cells

    def _run_dict(
        self,
        run: Run,
        state: MetricState | None = None,
        tags: Mapping[str, str] | None = None,
        replicates: ReplicateState | None = None,
    ) -> dict[str, Any]:
        """The run's summary: totals and scalar metrics, whatever its class count (``state``,
        ``replicates``: the run's parsed states when the caller has them)."""
        if state is None:
            state = self._state(run)
        metrics: dict[str, Any] = {}
        if state is not None:
            metrics = _scalar_metrics(state.compute(run_details.summary_names(state.names)))
        return self._summary(run, state, metrics, tags, replicates)

    def _summary(
        self,
        run: Run,
        state: MetricState | None,
        metrics: dict[str, Any],
        tags: Mapping[str, str] | None = None,
        replicates: ReplicateState | None = None,
    ) -> dict[str, Any]:
        """The run's fields with ``metrics`` (computed once by the caller from ``state``);
        ``tags`` given spares loading them, ``replicates`` parsing them."""
        reduction, normalization, unit = self._reduction(run)
        names, limit = run.class_names, self.settings.run_detail_max_classes
        value = _run_value((reduction, normalization, unit), run.sum, run.denominator, run.batches)
        intervals = run.intervals  # as of the last push
        if replicates is not None or (intervals is None and run.confidence is not None):
            intervals = slices.intervals(replicates, {"value": value, **metrics}, run.confidence)
        return {
            "id": run.id,
            "name": run.name,
            "status": run.status,
            "loss": run.loss,
            "options": run.options,
            "metrics_requested": run.metrics_requested,
            "class_names": names if names is not None and len(names) <= limit else None,
            "tags": dict(tags) if tags is not None else {t.key: t.value for t in run.tags},
            "created_at": _isoformat(run.created_at),
            "updated_at": _isoformat(run.updated_at),
            "closed_at": _isoformat(run.closed_at),
            "batches": run.batches,
            "count": run.count,
            "ignored": run.ignored,
            "sum": run.sum,
            "denominator": run.denominator,
            "value": value,
            "reduction": reduction,
            "normalization": normalization,
            "unit": unit,
            "num_classes": None if state is None else state.num_classes,
            "metrics": metrics,
            "details": run_details.details(run.metrics_requested),
            "confidence": run.confidence,
            "intervals": intervals,
            "no_interval": (
                slices.without_interval(run.metrics_requested) if run.confidence else []
            ),
            "paired_ids": run.paired_ids,
            "fingerprint": run.fingerprint,
            "slice_keys": run.slice_keys or [],
            "gate": run.gate,
        }


def _linear(arrays: Mapping[str, Any]) -> dict[str, Any]:
    """A linear_cross_entropy batch's ``features``, ``weight``, ``bias`` (those given)."""
    return {k: arrays[k] for k in ("features", "weight", "bias") if arrays.get(k) is not None}


def _split_cells(state: MetricState | None) -> tuple[MetricState | None, Cells | None]:
    """(the state with an empty confusion table, the batch's cells): the run keeps its
    confusion matrix as ``confusion_blocks``, not in the JSON state."""
    if state is None or not isinstance(table := state.stats.get("confusion"), Cells):
        return state, None
    empty = Cells(table.size, table.index[:0], table.weight[:0])
    return replace(state, stats={**state.stats, "confusion": empty}), table


@dataclass(frozen=True)
class _Identity:
    """A batch's example identity: h1 (the bootstrap key), the id set's fingerprint, and
    whether the ids were the client's (else (batch_id, position))."""

    h1: np.ndarray
    h2: np.ndarray
    fingerprint: Fingerprint
    paired: bool


def _identity(example_ids: Sequence[Any] | None, batch_id: str, examples: int) -> _Identity:
    if example_ids is None:
        h1, h2 = default_example_hashes(batch_id, examples)
        return _Identity(h1, h2, Fingerprint.of(h1, h2), False)
    try:
        h1, h2 = example_id_hashes(example_ids)
    except ce_engine.EngineError as exc:
        raise engine_error(exc) from None
    return _Identity(h1, h2, Fingerprint.of(h1, h2), True)


def _merge_replicates(
    stored: dict[str, Any] | None, batch: ReplicateState | None
) -> ReplicateState | None:
    if batch is None:
        return None if stored is None else ReplicateState.from_dict(stored)
    if stored is None:
        return batch
    with np.errstate(over="ignore", invalid="ignore"):  # refused when not finite
        return ReplicateState.from_dict(stored).merge(batch)


def _check_compare_slices(key: str, baseline: str | None, runs: Sequence[Run]) -> None:
    """``slice_key`` needs a ``baseline``, at most ``MAX_COMPARE_SLICE_RUNS`` runs, and to be a
    slice key of every run (422 naming it)."""
    problem = None
    if baseline is None:
        problem = "slice_key needs baseline (the deltas are per slice value)"
    elif len(runs) > MAX_COMPARE_SLICE_RUNS:
        problem = f"slice_key compares at most {MAX_COMPARE_SLICE_RUNS} runs"
    else:
        lacking = [r.id for r in runs if key not in (r.slice_keys or [])]
        if lacking:
            problem = f"runs without slice key {quoted(key)}: {', '.join(lacking)}"
    if problem is not None:
        raise ValidationFailed(
            problem, [{"loc": ["query", "slice_key"], "msg": problem, "type": "slice_key"}]
        )


def _flat(values: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar values by name, a top-k map as ``top_k_accuracy.k``; other maps left out."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, Mapping):
            if name == "top_k_accuracy":
                out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def _replicates_of(
    run: Run,
    label: str,
    value: float | None,
    metric_state: dict[str, Any] | None,
    replicate_state: dict[str, Any] | None,
    fingerprint: dict[str, Any] | None,
    slices_of: Mapping[tuple[str, str], gating.RunReplicates] | None = None,
) -> gating.RunReplicates:
    """A run's (or a slice's) :class:`gating.RunReplicates` from its stored states; pairing is
    judged on ``fingerprint``, the id set of those examples."""
    state = None if metric_state is None else MetricState.from_dict(metric_state)
    metrics = {} if state is None else _scalar_metrics(_summary_values(state))
    points = {k: v for k, v in _flat({"value": value, **metrics}).items() if _number(v)}
    replicates: dict[str, np.ndarray] = {}
    if replicate_state is not None:
        computed = ReplicateState.from_dict(replicate_state).compute()
        replicates = _flat({("value" if k == "loss" else k): v for k, v in computed.items()})
    confidence = run.confidence or {}
    return gating.RunReplicates(
        run_id=label,
        values=points,
        replicates=replicates,
        level=float(confidence.get("level", 0.95)),
        seed=int(confidence.get("seed", 0)),
        count=int(confidence.get("replicates", 0)) if replicates else 0,
        fingerprint=None if fingerprint is None else Fingerprint.from_dict(fingerprint),
        paired_ids=bool(run.paired_ids),
        slices=dict(slices_of or {}),
    )


def _summary_values(state: MetricState) -> dict[str, Any]:
    """The state's summary metrics only (no per-class tables or curves)."""
    values: dict[str, Any] = state.compute(run_details.summary_names(state.names))
    return values


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _merge_dicts(
    kind: type[MetricState] | type[ReplicateState],
    a: dict[str, Any] | None,
    b: dict[str, Any] | None,
) -> dict[str, Any] | None:
    if a is None or b is None:
        return a if b is None else b
    with np.errstate(over="ignore", invalid="ignore"):  # refused when not finite
        state = kind.from_dict(a).merge(kind.from_dict(b))  # type: ignore[arg-type]
    if isinstance(state, ReplicateState):
        _refuse_non_finite_state(state, "a slice", weighted=True)
    merged: dict[str, Any] = state.to_dict()
    return merged


def _add_totals(a: pushes.SliceTotals, b: pushes.SliceTotals) -> pushes.SliceTotals:
    return pushes.SliceTotals(
        count=a.count + b.count,
        ignored=a.ignored + b.ignored,
        sum=a.sum + b.sum,
        denominator=a.denominator + b.denominator,
        metric_state=_merge_dicts(MetricState, a.metric_state, b.metric_state),
        replicate_state=_merge_dicts(ReplicateState, a.replicate_state, b.replicate_state),
        fingerprint=_fingerprint_sum(a.fingerprint, b.fingerprint),
    )


def _fingerprint_sum(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        return a if b is None else b
    return Fingerprint.from_dict(a).merge(Fingerprint.from_dict(b)).to_dict()


def _run_value(
    reduction: tuple[str, str, str], total: float, denominator: float, batches: int
) -> float | None:
    """The reduced loss of all batches as one evaluation would give it (None before any)."""
    kind, normalization, _ = reduction
    if batches == 0:
        return None
    if kind == "sum" or normalization == "none":
        return total
    return total / denominator if denominator > 0 else None


_Query = TypeVar("_Query", bound=Select[Any])


def _owned(query: _Query, principal: str | None) -> _Query:
    """Only ``principal``'s runs when auth is on (None: every run)."""
    return query if principal is None else query.where(Run.owner == principal)


@contextmanager
def _store_guard() -> Iterator[None]:
    """A lost or unreachable database becomes 503 + Retry-After (never a 500): failed or
    timed-out connects, connections dropped mid-transaction (server restart) and a pool with no
    free connection in time."""
    try:
        yield
    except (OperationalError, InterfaceError, PoolTimeout) as exc:
        raise _store_unavailable(exc) from exc
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        raise _store_unavailable(exc) from exc
