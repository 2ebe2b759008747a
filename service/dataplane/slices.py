"""Example identity, slices and bootstrap intervals of a run's batches (issue 18, DESIGN §8).

Pure helpers of :mod:`service.dataplane.runs`: request fields, the checks of a batch's
``example_ids`` and ``slices`` against the run (422 naming the field, before any work), the
per-slice evaluation of a batch, and the ``intervals`` of a run's answer.

- **Example ids**: a batch's ``example_ids`` (N strings of ≤ 128 characters, or N integers)
  are hashed (``ce_engine.metrics.bootstrap.example_id_hashes``); without them the ids are
  (``batch_id``, position) and the run is not ``paired_ids``. A run keeps the ``Fingerprint``
  of its id set (count and two hash sums mod 2⁶⁴), never the ids.
- **Intervals** (``confidence``): example i weighs w_ib ~ Poisson(1) in replicate b, drawn from
  (hash(id), b, seed) alone; a run keeps B replicates of its scalar statistics and answers the
  percentile interval of each (``ce_engine.metrics.intervals``).
- **Slices**: for each declared key, a batch names one value per example; each (key, value)
  keeps the run's aggregates over its examples only (loss sums, metric state without the
  confusion cells, replicates). At most ``max_slice_values`` values per key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ce_engine.metrics import CI_METRICS
from ce_engine.metrics.bootstrap import MAX_REPLICATES, ReplicateState
from ce_engine.metrics.intervals import replicate_intervals
from service.errors import ValidationFailed

MAX_SLICE_KEYS = 8
MAX_SLICE_VALUES = 4096  # the largest max_slice_values a run may declare
DEFAULT_SLICE_VALUES = 256
MAX_SLICE_VALUE_CHARS = 200
SLICE_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Multiply-adds per (example, replicate) counted against ``CE_EVAL_MAX_WORK``: the scalar
#: statistics and calibration bins of one weight (``ExampleStatistics.replicates``).
REPLICATE_WORK = 64
#: Multiply-adds counted per distinct slice value of a batch (one evaluation call each).
SLICE_VALUE_WORK = 1_000_000
#: Batch tensors with one row per example (sliced along axis 0); the others go whole.
ROW_TENSORS = ("logits", "targets", "sample_weight", "features")


class Confidence(BaseModel):
    """``confidence`` of ``POST /v1/runs``: Poisson-bootstrap intervals paired by example."""

    model_config = ConfigDict(extra="forbid")

    replicates: int = Field(200, ge=1, le=MAX_REPLICATES, description="B, bootstrap replicates.")
    level: float = Field(0.95, gt=0.0, lt=1.0, description="Coverage of the intervals.")
    seed: int = Field(0, ge=0, lt=2**63, description="Same seed + ids → same weights.")


#: Most replicate numbers a run may keep in all (its own and every possible slice's):
#: B × the statistics of one replicate × (1 + Σ max_slice_values), about 256 MB as float64.
MAX_REPLICATE_NUMBERS = 2**25


def replicate_numbers(replicates: int, n_bins: int, top_k: int) -> int:
    """An upper bound of the numbers of one replicate state: B × (8 scalar sums + top-k hits
    + 3 per calibration bin)."""
    return replicates * (8 + top_k + 3 * n_bins)


def check_state_budget(
    confidence: Confidence | None, n_bins: int, top_k: int, keys: int, max_values: int
) -> None:
    """422 at creation when the run's replicate states could exceed ``MAX_REPLICATE_NUMBERS``
    (naming ``confidence.replicates``)."""
    if confidence is None:
        return
    total = replicate_numbers(confidence.replicates, n_bins, top_k) * (1 + keys * max_values)
    if total > MAX_REPLICATE_NUMBERS:
        msg = (
            f"{confidence.replicates} replicates × {1 + keys * max_values} states (the run and "
            f"up to {keys} × {max_values} slice values) could keep {total:,} numbers, over "
            f"{MAX_REPLICATE_NUMBERS:,}: use fewer replicates, slice keys or max_slice_values"
        )
        raise ValidationFailed(
            msg, [{"loc": ["body", "confidence", "replicates"], "msg": msg, "type": "too_large"}]
        )


def check_slice_keys(keys: Sequence[str]) -> list[str]:
    """The declared keys (422 for a bad or repeated name)."""
    errors = [
        {
            "loc": ["body", "slice_keys", i],
            "msg": f"slice key {key!r} must match [A-Za-z0-9_.-]{{1,64}} and appear once",
            "type": "slice_key",
        }
        for i, key in enumerate(keys)
        if not SLICE_KEY.fullmatch(key) or keys.index(key) != i
    ]
    if errors:
        raise ValidationFailed("bad slice_keys", errors)
    return list(keys)


def check_batch_fields(
    example_ids: Sequence[Any] | None,
    slices: Mapping[str, Sequence[Any]] | None,
    slice_keys: Sequence[str],
    examples: int,
    max_values: int = MAX_SLICE_VALUES,
) -> dict[str, list[str]]:
    """422 unless ``example_ids`` has one entry per example and ``slices`` gives exactly the
    run's keys, each one string (≤ 200 characters, no control characters) per example and at
    most ``max_values`` distinct values a key (the run's ``max_slice_values``; the values the
    run already has are counted under its lock). Returns the slices."""
    errors: list[dict[str, Any]] = []
    if example_ids is not None and len(example_ids) != examples:
        errors.append(
            {
                "loc": ["body", "example_ids"],
                "msg": f"{len(example_ids)} ids for {examples} examples",
                "type": "shape_mismatch",
            }
        )
    given = dict(slices or {})
    for key in given:
        if key not in slice_keys:
            declared = ", ".join(slice_keys) or "none"
            errors.append(
                {
                    "loc": ["body", "slices", key],
                    "msg": f"the run declares no slice key {key!r} (declared: {declared})",
                    "type": "unknown_slice_key",
                }
            )
    for key in slice_keys:
        values = given.get(key)
        if values is None:
            errors.append(
                {
                    "loc": ["body", "slices", key],
                    "msg": f"the run declares slice key {key!r}: one value per example needed",
                    "type": "missing",
                }
            )
        elif len(values) != examples:
            errors.append(
                {
                    "loc": ["body", "slices", key],
                    "msg": f"{len(values)} values for {examples} examples",
                    "type": "shape_mismatch",
                }
            )
        else:
            bad = next((i for i, v in enumerate(values) if not _good_value(v)), None)
            distinct = len(set(values)) if bad is None else 0
            if bad is not None:
                errors.append(
                    {
                        "loc": ["body", "slices", key, bad],
                        "msg": f"slice values are strings of at most {MAX_SLICE_VALUE_CHARS} "
                        "characters, without control characters",
                        "type": "slice_value",
                    }
                )
            elif distinct > max_values:
                errors.append(
                    {
                        "loc": ["body", "slices", key],
                        "msg": f"{distinct} distinct values, over the run's max_slice_values "
                        f"({max_values})",
                        "type": "too_many_slice_values",
                    }
                )
    if errors:
        raise ValidationFailed("bad example_ids or slices for this run", errors)
    return {key: [str(v) for v in given[key]] for key in slice_keys}


def _good_value(value: Any) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= MAX_SLICE_VALUE_CHARS
        and not any(ord(c) < 32 or ord(c) == 127 for c in value)
    )


def slice_rows(values: Sequence[str]) -> dict[str, np.ndarray]:
    """value → the indices of its examples (ascending), values in first-seen order; one sort,
    O(N log N) whatever the number of values."""
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        groups.setdefault(value, []).append(i)
    return {value: np.asarray(rows, dtype=np.intp) for value, rows in groups.items()}


def take_rows(arrays: Mapping[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """The batch's tensors for the examples ``rows`` (per-example tensors along axis 0)."""
    return {
        name: (value[rows] if name in ROW_TENSORS and value is not None else value)
        for name, value in arrays.items()
    }


def intervals(
    state: ReplicateState | None,
    point: Mapping[str, Any],
    confidence: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """``{name: {value, ci: [lo, hi], level, replicates}}`` for the loss (``value``) and each
    scalar metric with an interval (top-k as ``top_k_accuracy.k``); ``point`` holds the point
    values (``value`` and the run's scalar metrics). None without ``confidence``."""
    if confidence is None:
        return None
    level, replicates = float(confidence["level"]), int(confidence["replicates"])
    out: dict[str, Any] = {}
    if state is None:
        return out
    bounds = replicate_intervals(state.compute(), level)
    for name, ci in bounds.items():
        key = "value" if name == "loss" else name
        if isinstance(ci, dict):
            values = point.get(key) or {}
            for k, sub in ci.items():
                value = values.get(k) if isinstance(values, Mapping) else None
                out[f"{key}.{k}"] = {
                    "value": value,
                    "ci": sub,
                    "level": level,
                    "replicates": replicates,
                }
        else:
            out[key] = {"value": point.get(key), "ci": ci, "level": level, "replicates": replicates}
    return out


def without_interval(metrics: Sequence[str]) -> list[str]:
    """The requested metrics that have no interval (the answer says so)."""
    return [m for m in metrics if m not in CI_METRICS]


MAX_SLICE_PAGE = 1000


@dataclass(frozen=True)
class SliceQuery:
    """``GET /v1/runs/{id}/slices`` paging: ``sort`` = ``count``, ``value`` (the loss),
    ``slice`` (the name) or a scalar metric (``top_k_accuracy.k``); missing values sort last."""

    sort: str = "count"
    order: str = "desc"
    limit: int = 100
    offset: int = 0
    min_slice_size: int = 0

    def __post_init__(self) -> None:
        errors = []
        if self.order not in ("asc", "desc"):
            errors.append(("order", "asc or desc"))
        if not 1 <= self.limit <= MAX_SLICE_PAGE:
            errors.append(("limit", f"between 1 and {MAX_SLICE_PAGE}"))
        if not 0 <= self.offset <= MAX_SLICE_VALUES * MAX_SLICE_KEYS:
            errors.append(("offset", f"between 0 and {MAX_SLICE_VALUES * MAX_SLICE_KEYS}"))
        if not 0 <= self.min_slice_size <= 2**53:
            errors.append(("min_slice_size", "a count ≥ 0"))
        if errors:
            raise ValidationFailed(
                "bad slice query: " + ", ".join(f"{name} must be {msg}" for name, msg in errors),
                [{"loc": ["query", n], "msg": m, "type": "value_error"} for n, m in errors],
            )


def _sort_key(row: Mapping[str, Any], sort: str) -> Any:
    if sort in ("count", "value", "slice"):
        return row[sort]
    name, _, k = sort.partition(".")
    value = row["metrics"].get(name)
    return value.get(k) if isinstance(value, Mapping) and k else value


def sort_page(rows: list[dict[str, Any]], query: SliceQuery) -> list[dict[str, Any]]:
    """``rows`` sorted by ``query.sort`` (422 when no row has it), then paged."""
    keys = [_sort_key(r, query.sort) for r in rows]
    if rows and all(k is None or isinstance(k, Mapping) for k in keys):
        raise ValidationFailed(
            f"cannot sort slices by {query.sort!r}: use count, value, slice or a scalar metric "
            "of the run",
            [{"loc": ["query", "sort"], "msg": "not a sortable field", "type": "enum"}],
        )
    present = [(k, r) for k, r in zip(keys, rows, strict=True) if k is not None]
    missing = [r for k, r in zip(keys, rows, strict=True) if k is None]
    present.sort(key=lambda kr: (kr[0], kr[1]["slice"]), reverse=query.order == "desc")
    ordered = [r for _, r in present] + missing
    return ordered[query.offset : query.offset + query.limit]
