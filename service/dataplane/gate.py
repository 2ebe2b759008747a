"""Comparison of runs and the regression gate (DESIGN §8): pure functions of the runs' point
values and bootstrap replicates, :class:`RunReplicates`; the store queries stay in
:mod:`service.dataplane.runs`.

Deltas δ = m_B − m_A of a candidate B against a baseline A, and their percentile intervals
(:func:`ce_engine.metrics.intervals.delta_ci`):

- **paired** (:func:`paired`: both runs drew their weights from example ids, with the same seed
  and replicate count, over the same id set): the interval of δ_b = m_B,b − m_A,b;
- otherwise **unpaired**: the interval of every difference m_B,j − m_A,i.

A gate check is a non-inferiority test of one metric, overall or on one slice ``key=value``:

- ``max_decrease`` m (higher is better): ``pass`` iff lo(δ) > −m, ``fail`` iff hi(δ) < −m;
- ``max_increase`` m (lower is better): ``pass`` iff hi(δ) < m, ``fail`` iff lo(δ) > m;
- ``min`` x / ``max`` x: the candidate's own interval [lo, hi]; ``min`` passes iff lo > x and
  fails iff hi < x, ``max`` passes iff hi < x and fails iff lo > x;

and otherwise (the interval touches or straddles the threshold, or is undefined: a run without
``confidence``, a metric without an interval) ``inconclusive``, with a ``reason``. The gate
passes iff every check passes, ``inconclusive`` counting as a pass only with
``allow_inconclusive``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from ce_engine.errors import quoted
from ce_engine.metrics.bootstrap import Fingerprint
from ce_engine.metrics.catalog import ALL_METRICS, HIGHER_IS_BETTER
from ce_engine.metrics.intervals import (
    Verdict,
    bound_verdict,
    delta_ci,
    gate_verdict,
    percentile_ci,
)
from service.errors import ValidationFailed

CheckKind = Literal["max_decrease", "max_increase", "min", "max"]
CHECK_KINDS: tuple[CheckKind, ...] = get_args(CheckKind)
DELTA_KINDS: frozenset[str] = frozenset({"max_decrease", "max_increase"})
#: Most checks one gate request may carry.
MAX_CHECKS = 64
#: Longest metric name or slice text a check may carry, in characters.
MAX_NAME_CHARS = 200
CHECK_FIELDS = frozenset({"metric", "slice", *CHECK_KINDS})
GATE_FIELDS = frozenset({"baseline", "checks", "allow_inconclusive"})

Loc = list[str | int]
SliceKey = tuple[str, str]


@dataclass(frozen=True)
class RunReplicates:
    """What the gate and the comparison need of one run (or of one slice of it).

    ``values``: point values by name (``value`` the loss, the scalar metrics, top-k flattened
    as ``top_k_accuracy.5``); ``replicates``: the same names → (B,) replicate values (NaN where
    a replicate drew no weight), empty for a run without ``confidence`` (``count`` 0);
    ``level``, ``seed``, ``count`` = B: the run's ``confidence``; ``fingerprint``: of its
    example-id set; ``paired_ids``: whether its batches carried ``example_ids``; ``slices``:
    (key, value) → the same for the examples of that slice."""

    run_id: str
    values: Mapping[str, float | None]
    replicates: Mapping[str, np.ndarray]
    level: float
    seed: int
    count: int
    fingerprint: Fingerprint | None
    paired_ids: bool
    slices: Mapping[SliceKey, RunReplicates] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    """One gate check: ``metric`` on the whole run (``slice`` None) or on ``slice`` =
    (key, value); ``kind`` and its ``threshold`` (a margin ≥ 0 for the delta kinds, a bound
    for ``min`` / ``max``)."""

    metric: str
    slice: SliceKey | None
    kind: CheckKind
    threshold: float

    @property
    def slice_text(self) -> str | None:
        """``key=value``, as the request wrote it (None for the whole run)."""
        return None if self.slice is None else f"{self.slice[0]}={self.slice[1]}"


@dataclass(frozen=True)
class GateRequest:
    """A parsed ``POST /v1/runs/{id}/gate`` body."""

    baseline: str
    checks: list[Check]
    allow_inconclusive: bool = False


# ------------------------------------------------------------------------------ helpers


def paired(a: RunReplicates, b: RunReplicates) -> bool:
    """Whether replicate j of ``a`` and of ``b`` weighed every example alike: both runs took
    their weights from example ids, with the same seed and replicate count, over the same id
    set (equal fingerprints). A run without replicates pairs with nothing."""
    return (
        a.paired_ids
        and b.paired_ids
        and a.count > 0
        and a.seed == b.seed
        and a.count == b.count
        and a.fingerprint is not None
        and a.fingerprint == b.fingerprint
    )


def _base_name(metric: str) -> str:
    """``top_k_accuracy.K`` → ``top_k_accuracy``; ``value`` (the run's loss) → ``loss``."""
    if metric == "value":
        return "loss"
    return metric.split(".", 1)[0] if metric.startswith("top_k_accuracy.") else metric


def known_metric(metric: str) -> bool:
    """Whether ``metric`` names the loss (``value``) or a metric of the catalog."""
    return _base_name(metric) in ("loss", *ALL_METRICS)


def direction(metric: str) -> bool | None:
    """True when higher is better, False when lower is, None when the metric has no
    direction (``entropy``, metrics without an interval): ``value`` is the loss,
    ``top_k_accuracy.K`` is ``top_k_accuracy``."""
    return HIGHER_IS_BETTER.get(_base_name(metric))


def parse_slice(text: str) -> SliceKey:
    """``key=value`` → (key, value), split at the first ``=``; ValueError when there is no
    ``=`` or the key is empty."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"slice must be key=value, e.g. lang=de; got {quoted(text)}")
    return key, value


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _interval(lo: float, hi: float) -> list[float] | None:
    return None if math.isnan(lo) or math.isnan(hi) else [lo, hi]


def _item(loc: Loc, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


def _failed(items: list[dict[str, Any]]) -> ValidationFailed:
    first = items[0]
    where = ".".join(str(p) for p in first["loc"][1:])
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    return ValidationFailed(f"{where}: {first['msg']}{more}", items)


# ------------------------------------------------------------------------------ parsing


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _parse_check(raw: Any, i: int, items: list[dict[str, Any]]) -> Check | None:
    """One check, or None after appending its errors (loc ``body.checks.i[.field]``) to
    ``items``."""
    loc: Loc = ["body", "checks", i]
    if not isinstance(raw, Mapping):
        items.append(_item(loc, "a check must be an object", "type_error"))
        return None
    before = len(items)
    for key in raw:
        if key not in CHECK_FIELDS:
            msg = f"unknown field {quoted(key)}; a check has {', '.join(sorted(CHECK_FIELDS))}"
            items.append(_item([*loc, str(key)], msg, "extra_forbidden"))
    metric = raw.get("metric")
    if not isinstance(metric, str) or not 0 < len(metric) <= MAX_NAME_CHARS:
        msg = f"metric must be a name of 1 to {MAX_NAME_CHARS} characters"
        items.append(_item([*loc, "metric"], msg, "metric"))
    slice_key: SliceKey | None = None
    raw_slice = raw.get("slice")
    if raw_slice is not None:
        try:
            if not isinstance(raw_slice, str) or len(raw_slice) > MAX_NAME_CHARS:
                raise ValueError(f"slice must be key=value (at most {MAX_NAME_CHARS} characters)")
            slice_key = parse_slice(raw_slice)
        except ValueError as exc:
            items.append(_item([*loc, "slice"], str(exc), "slice"))
    given: list[CheckKind] = [k for k in CHECK_KINDS if raw.get(k) is not None]
    if not given:
        msg = f"a check needs exactly one of {', '.join(CHECK_KINDS)}"
        items.append(_item(loc, msg, "missing"))
    for extra in given[1:]:
        msg = f"a check takes exactly one of {', '.join(CHECK_KINDS)}; {given[0]} is given"
        items.append(_item([*loc, extra], msg, "exclusive"))
    threshold = math.nan
    if given:
        kind = given[0]
        threshold = raw[kind]
        if not _is_number(threshold) or not math.isfinite(threshold):
            items.append(_item([*loc, kind], f"{kind} must be a finite number", "number"))
        elif kind in DELTA_KINDS and threshold < 0:
            msg = f"{kind} is a margin and must be >= 0, got {threshold!r}"
            items.append(_item([*loc, kind], msg, "number"))
        elif isinstance(metric, str) and known_metric(metric):  # else: run_gate names it
            _check_direction(metric, kind, [*loc, kind], items)
    if len(items) > before or not isinstance(metric, str):
        return None
    return Check(metric, slice_key, given[0], float(threshold))


def _check_direction(metric: str, kind: str, loc: Loc, items: list[dict[str, Any]]) -> None:
    """A delta kind must match the metric's direction; metrics without one take min / max."""
    if kind not in DELTA_KINDS:
        return
    higher = direction(metric)
    if higher is None:
        msg = f"{quoted(metric)} has no better direction for a delta check: use min or max"
        items.append(_item(loc, msg, "direction"))
    elif higher != (kind == "max_decrease"):
        use = "max_decrease" if higher else "max_increase"
        better = "higher" if higher else "lower"
        msg = f"{quoted(metric)} is better when {better}: use {use}"
        items.append(_item(loc, msg, "direction"))


def parse_checks(payload: Any) -> list[Check]:
    """The ``checks`` list of a gate request: 1 to :data:`MAX_CHECKS` objects
    ``{metric, slice?, max_decrease | max_increase | min | max}`` with exactly one threshold,
    finite, margins ≥ 0, the delta kind matching the direction (:func:`direction`) of a known
    metric. :class:`ValidationFailed` naming every bad ``checks[i].field`` otherwise (that the
    metric and slice exist in the runs is for :func:`run_gate`, which knows them)."""
    loc: Loc = ["body", "checks"]
    if not isinstance(payload, list) or not payload:
        raise _failed([_item(loc, "checks must be a non-empty list", "type_error")])
    if len(payload) > MAX_CHECKS:
        msg = f"at most {MAX_CHECKS} checks, got {len(payload)}"
        raise _failed([_item(loc, msg, "too_long")])
    items: list[dict[str, Any]] = []
    checks = [_parse_check(raw, i, items) for i, raw in enumerate(payload)]
    if items:
        raise _failed(items)
    return [c for c in checks if c is not None]


def parse_gate_request(body: Any) -> GateRequest:
    """A whole ``POST /v1/runs/{id}/gate`` body ``{baseline, checks, allow_inconclusive?}``;
    :class:`ValidationFailed` naming the bad field otherwise."""
    if not isinstance(body, Mapping):
        raise _failed([_item(["body"], "the body must be a JSON object", "type_error")])
    items = [
        _item(["body", str(key)], f"unknown field {quoted(key)}", "extra_forbidden")
        for key in body
        if key not in GATE_FIELDS
    ]
    baseline = body.get("baseline")
    if not isinstance(baseline, str) or not 0 < len(baseline) <= MAX_NAME_CHARS:
        items.append(_item(["body", "baseline"], "baseline must be a run id", "baseline"))
    allow = body.get("allow_inconclusive", False)
    if not isinstance(allow, bool):
        items.append(_item(["body", "allow_inconclusive"], "must be true or false", "bool"))
    if items:
        raise _failed(items)
    return GateRequest(str(baseline), parse_checks(body.get("checks")), allow)


# ------------------------------------------------------------------------------ the gate


def _scope(run: RunReplicates, check: Check) -> RunReplicates | None:
    return run if check.slice is None else run.slices.get(check.slice)


def _validate(candidate: RunReplicates, baseline: RunReplicates, checks: Sequence[Check]) -> None:
    """Each check's metric and slice exist in the candidate (and, for a delta, the baseline),
    and a delta kind matches the metric's direction; :class:`ValidationFailed` naming every
    ``checks[i].metric`` / ``checks[i].slice`` / ``checks[i].<kind>`` that does not."""
    items: list[dict[str, Any]] = []
    for i, check in enumerate(checks):
        loc: Loc = ["body", "checks", i]
        runs = [("run", candidate)]
        if check.kind in DELTA_KINDS:
            runs.append(("baseline run", baseline))
        for what, run in runs:
            scope = _scope(run, check)
            if scope is None:
                msg = f"{what} {quoted(run.run_id)} has no slice {quoted(check.slice_text)}"
                items.append(_item([*loc, "slice"], msg, "unknown_slice"))
                break
            if check.metric not in scope.values:
                names = ", ".join(scope.values)
                msg = f"{what} {quoted(run.run_id)} has no metric {quoted(check.metric)}"
                msg += f"; it has {names}"
                items.append(_item([*loc, "metric"], msg, "unknown_metric"))
                break
        else:
            _check_direction(check.metric, check.kind, [*loc, check.kind], items)
    if items:
        raise _failed(items)


def _no_interval_reason(run: RunReplicates, metric: str) -> str | None:
    """Why ``run`` has no replicates of ``metric`` (None when it has)."""
    if run.count == 0:
        return f"run {run.run_id} has no confidence intervals (created without confidence)"
    if metric not in run.replicates:
        return f"{metric} has no bootstrap interval"
    return None


def _delta_entry(
    candidate: RunReplicates, baseline: RunReplicates, metric: str, level: float
) -> dict[str, Any]:
    """``{value, baseline, delta, ci, paired, reason}`` of δ = candidate − baseline for
    ``metric`` (both runs, or both slices, have it)."""
    value = _finite_or_none(candidate.values.get(metric))
    base = _finite_or_none(baseline.values.get(metric))
    delta = None if value is None or base is None else value - base
    is_paired = paired(candidate, baseline)
    ci: list[float] | None = None
    reason = _no_interval_reason(candidate, metric) or _no_interval_reason(baseline, metric)
    if reason is None:
        lo, hi = delta_ci(
            baseline.replicates[metric], candidate.replicates[metric], level, paired=is_paired
        )
        ci = _interval(lo, hi)
        if ci is None:
            reason = f"the interval of the {metric} delta is undefined (no replicate drew weight)"
    return {
        "value": value,
        "baseline": base,
        "delta": delta,
        "ci": ci,
        "paired": is_paired,
        "reason": reason,
    }


def _check_answer(
    candidate: RunReplicates, baseline: RunReplicates, check: Check, level: float
) -> dict[str, Any]:
    cand, base = _scope(candidate, check), _scope(baseline, check)
    assert cand is not None  # _validate
    answer: dict[str, Any] = {
        "metric": check.metric,
        "slice": check.slice_text,
        "kind": check.kind,
        "margin": check.threshold if check.kind in DELTA_KINDS else None,
        "bound": None if check.kind in DELTA_KINDS else check.threshold,
    }
    verdict: Verdict
    if check.kind in DELTA_KINDS:
        assert base is not None  # _validate
        entry = _delta_entry(cand, base, check.metric, level)
        ci = entry["ci"]
        higher = check.kind == "max_decrease"
        verdict = (
            "inconclusive" if ci is None else gate_verdict(ci[0], ci[1], check.threshold, higher)
        )
        reason = entry["reason"]
    else:
        has_base = base is not None and check.metric in base.values
        entry = {
            "value": _finite_or_none(cand.values.get(check.metric)),
            "baseline": _finite_or_none(base.values.get(check.metric)) if has_base else None,  # type: ignore[union-attr]
            "delta": None,
            "paired": None,
        }
        reason = _no_interval_reason(cand, check.metric)
        ci = None
        if reason is None:
            ci = _interval(*percentile_ci(cand.replicates[check.metric], level))
            if ci is None:
                reason = f"the interval of {check.metric} is undefined (no replicate drew weight)"
        bounds = {"minimum" if check.kind == "min" else "maximum": check.threshold}
        verdict = "inconclusive" if ci is None else bound_verdict(ci[0], ci[1], **bounds)
    answer.update(
        value=entry["value"],
        baseline=entry["baseline"],
        delta=entry["delta"],
        ci=ci,
        paired=entry["paired"],
        verdict=verdict,
        reason=reason,
    )
    return answer


def gate_passed(verdicts: Sequence[str], allow_inconclusive: bool) -> bool:
    """Every verdict ``pass`` (or ``inconclusive`` when ``allow_inconclusive``)."""
    accepted = {"pass", "inconclusive"} if allow_inconclusive else {"pass"}
    return all(v in accepted for v in verdicts)


def run_gate(
    candidate: RunReplicates,
    baseline: RunReplicates,
    checks: Sequence[Check],
    allow_inconclusive: bool = False,
) -> dict[str, Any]:
    """The answer of ``POST /v1/runs/{candidate}/gate`` (module docstring):
    ``{run_id, baseline, passed, paired, level, replicates, allow_inconclusive, checks:
    [{metric, slice, kind, margin, bound, value, baseline, delta, ci, paired, verdict,
    reason}]}``. Intervals are at the candidate's level; ``ci`` is that of δ for the delta
    kinds and of the candidate's metric for ``min`` / ``max``, None (with a ``reason``) when
    undefined. :class:`ValidationFailed` naming ``checks[i].metric`` / ``checks[i].slice``
    when a run lacks them."""
    _validate(candidate, baseline, checks)
    answers = [_check_answer(candidate, baseline, c, candidate.level) for c in checks]
    return {
        "run_id": candidate.run_id,
        "baseline": baseline.run_id,
        "passed": gate_passed([a["verdict"] for a in answers], allow_inconclusive),
        "paired": paired(candidate, baseline),
        "level": candidate.level,
        "replicates": candidate.count,
        "allow_inconclusive": allow_inconclusive,
        "checks": answers,
    }


# ------------------------------------------------------------------------------ compare


def _deltas(candidate: RunReplicates, baseline: RunReplicates) -> dict[str, Any]:
    """{metric: {value, baseline, delta, ci, paired}} for the metrics both have."""
    out: dict[str, Any] = {}
    for metric in candidate.values:
        if metric in baseline.values:
            entry = _delta_entry(candidate, baseline, metric, candidate.level)
            out[metric] = {k: entry[k] for k in ("value", "baseline", "delta", "ci", "paired")}
    return out


def compare_deltas(runs: Sequence[RunReplicates], baseline_id: str) -> dict[str, Any]:
    """The ``deltas`` of ``GET /v1/runs/compare?ids=…&baseline=…``: for each run but the
    baseline, ``{metric: {value, baseline, delta, ci, paired}, "slices": {"key=value":
    {metric: …}}}`` over the metrics both runs have, overall and on each slice both have
    (intervals at that run's level; ``ci`` None when either lacks replicates).
    :class:`ValidationFailed` naming ``query.baseline`` unless ``baseline_id`` is one of
    ``runs``."""
    base = next((r for r in runs if r.run_id == baseline_id), None)
    if base is None:
        msg = f"baseline {quoted(baseline_id)} must be one of ids"
        raise _failed([_item(["query", "baseline"], msg, "baseline")])
    out: dict[str, Any] = {}
    for run in runs:
        if run.run_id == baseline_id:
            continue
        entry = _deltas(run, base)
        entry["slices"] = {
            f"{key}={value}": _deltas(scope, base.slices[(key, value)])
            for (key, value), scope in run.slices.items()
            if (key, value) in base.slices
        }
        out[run.run_id] = entry
    return out
