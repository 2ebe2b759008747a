"""Bootstrap intervals and the regression gate, from replicate values (DESIGN §8).

Intervals are **percentile intervals** (Efron & Tibshirani 1993, §13.3): with α = 1 − level,
[q(α/2), q(1 − α/2)] of the B replicate values, q the sample quantile of
``numpy.percentile(..., method="linear")`` (Hyndman & Fan type 7, also R's default). Replicates
whose value is undefined (NaN: a replicate that drew no weight) are left out.

Deltas δ = m_B − m_A (B the candidate, A the baseline):

- **paired** (both runs used the same seed and replicate count on the same id set, so
  replicate b weighed every example alike in both): the percentile interval of
  δ_b = m_B,b − m_A,b;
- **unpaired** (independent replicates): the percentile interval of the B_A · B_B differences
  m_B,j − m_A,i over all pairs, i.e. of the convolution of the two bootstrap distributions
  (the distribution of the difference of two independent estimates).

The gate is a non-inferiority test on the interval [lo, hi] of δ with margin m ≥ 0
(:func:`gate_verdict`); absolute bounds test the interval of the metric itself
(:func:`bound_verdict`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from ce_engine.errors import InputValidationError

Verdict = Literal["pass", "fail", "inconclusive"]

#: Most pairs the unpaired delta interval forms (1000 × 1000 replicates).
MAX_UNPAIRED_PAIRS = 1_000_000


def check_level(level: float) -> float:
    """``level`` as a float in (0, 1); :class:`InputValidationError` naming
    ``confidence.level`` otherwise."""
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0 < level < 1:
        raise InputValidationError.single(
            ("confidence", "level"), f"level must be a number in (0, 1), got {level!r}"
        )
    return float(level)


def _finite(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return arr[~np.isnan(arr)]


def _quantiles(level: float) -> list[float]:
    """[100·α/2, 100·(1 − α/2)], α = 1 − level: the percentiles bounding the interval."""
    alpha = 1.0 - check_level(level)
    return [50.0 * alpha, 100.0 - 50.0 * alpha]


def percentile_ci(values: Any, level: float = 0.95) -> tuple[float, float]:
    """(lo, hi): the percentile interval at ``level`` of the replicate ``values`` (module
    docstring); (nan, nan) when no replicate value is defined."""
    quantiles = _quantiles(level)
    kept = _finite(values)
    if kept.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(kept, quantiles, method="linear")
    return float(lo), float(hi)


def delta_ci(
    a_replicates: Any, b_replicates: Any, level: float = 0.95, *, paired: bool = True
) -> tuple[float, float]:
    """(lo, hi) of δ = m_B − m_A from the replicate values of baseline A and candidate B.
    ``paired``: the interval of δ_b = m_B,b − m_A,b (same length; ValueError otherwise);
    else of every difference m_B,j − m_A,i (module docstring)."""
    a = np.asarray(a_replicates, dtype=np.float64).reshape(-1)
    b = np.asarray(b_replicates, dtype=np.float64).reshape(-1)
    if paired:
        if a.shape != b.shape:
            raise ValueError(f"paired replicates of lengths {a.size} and {b.size}")
        return percentile_ci(b - a, level)
    a, b = _finite(a), _finite(b)
    if a.size * b.size > MAX_UNPAIRED_PAIRS:
        raise ValueError(f"{a.size} × {b.size} replicate pairs exceed {MAX_UNPAIRED_PAIRS}")
    return percentile_ci(b[None, :] - a[:, None], level)


def _bad_bound(lo: float, hi: float) -> bool:
    return math.isnan(lo) or math.isnan(hi)


def gate_verdict(lo: float, hi: float, margin: float, higher_is_better: bool) -> Verdict:
    """Non-inferiority verdict on the interval [lo, hi] of δ = candidate − baseline.

    Higher is better (``max_decrease`` m): ``pass`` iff lo > −m, ``fail`` iff hi < −m.
    Lower is better (``max_increase`` m): ``pass`` iff hi < m, ``fail`` iff lo > m.
    Otherwise (the interval straddles the margin, touches it, or is undefined)
    ``inconclusive``. ValueError unless m is finite and ≥ 0."""
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be finite and ≥ 0, got {margin!r}")
    if _bad_bound(lo, hi):
        return "inconclusive"
    if higher_is_better:
        return "pass" if lo > -margin else "fail" if hi < -margin else "inconclusive"
    return "pass" if hi < margin else "fail" if lo > margin else "inconclusive"


def bound_verdict(
    lo: float, hi: float, minimum: float | None = None, maximum: float | None = None
) -> Verdict:
    """Verdict of absolute bounds on the interval [lo, hi] of a metric: ``min`` passes iff
    lo > min and fails iff hi < min; ``max`` passes iff hi < max and fails iff lo > max. With
    both, ``fail`` if either fails, ``pass`` if both pass, else ``inconclusive``; an undefined
    interval is ``inconclusive``. ValueError when neither bound is given."""
    if minimum is None and maximum is None:
        raise ValueError("bound_verdict needs minimum or maximum")
    if _bad_bound(lo, hi):
        return "inconclusive"
    verdicts: list[Verdict] = []
    if minimum is not None:
        verdicts.append("pass" if lo > minimum else "fail" if hi < minimum else "inconclusive")
    if maximum is not None:
        verdicts.append("pass" if hi < maximum else "fail" if lo > maximum else "inconclusive")
    if "fail" in verdicts:
        return "fail"
    return "pass" if all(v == "pass" for v in verdicts) else "inconclusive"


def replicate_intervals(values: dict[str, Any], level: float = 0.95) -> dict[str, Any]:
    """The percentile interval of each entry of ``ReplicateState.compute()``: {name: [lo, hi]}
    ({k: [lo, hi]} for ``top_k_accuracy``), None for a bound that is undefined.

    Entries with every replicate defined and the same count are one ``numpy.percentile`` along
    axis 1 (its per-row result is the 1-D one's, bit for bit); the others go through
    :func:`percentile_ci` one by one."""
    quantiles = _quantiles(level)
    entries = {
        (name, k): np.asarray(v, dtype=np.float64).reshape(-1)
        for name, reps in values.items()
        for k, v in (reps.items() if isinstance(reps, dict) else [(None, reps)])
    }
    bounds: dict[tuple[str, Any], list[float | None]] = {}
    whole = [key for key, v in entries.items() if v.size and not np.isnan(v).any()]
    sizes = {entries[key].size for key in whole}
    if len(sizes) == 1:
        stacked = np.stack([entries[key] for key in whole])
        q = np.percentile(stacked, quantiles, axis=1, method="linear")
        bounds = {key: [float(lo), float(hi)] for key, lo, hi in zip(whole, *q, strict=True)}
    for key, v in entries.items():
        if key not in bounds:
            bounds[key] = [None if math.isnan(x) else x for x in percentile_ci(v, level)]
    out: dict[str, Any] = {}
    for name, k in entries:  # the entries' order
        ci = bounds[name, k]
        if k is None:
            out[name] = ci
        else:
            out.setdefault(name, {})[k] = ci
    return out
