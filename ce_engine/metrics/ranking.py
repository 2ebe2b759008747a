"""Ranking metrics per class (or label): AUROC, average precision, ROC and PR curves.

Each of K columns is a binary task over elements e with a score s_e, a positive weight a_e and
a negative weight b_e (a = s·[y = c], b = s·[y ≠ c] one-vs-rest for softmax; a = s·y,
b = s·(1 − y) per label for sigmoid losses, so soft labels count as weights). Both evaluation
paths reduce a column to the same *points*: thresholds τ_1 > τ_2 > … with the cumulative
weights TP_k = Σ a_e [s_e ≥ τ_k] and FP_k = Σ b_e [s_e ≥ τ_k], a point dropped where it equals
the one before (zero-weight elements and empty bins add nothing). A = Σ a, B = Σ b, and with
the origin TP_0 = FP_0 = 0:

- AUROC = Σ_k (FP_k − FP_{k−1})(TP_k + TP_{k−1}) / (2 A B)  (the trapezoid under the ROC; ties
  count ½, the Mann–Whitney U / (A B));
- average precision AP = Σ_k (TP_k − TP_{k−1}) / A · TP_k / (TP_k + FP_k);
- ``roc_curve``: {fpr: FP/B, tpr: TP/A, thresholds}, origin first (threshold null), points
  thinned as ``sklearn.metrics.roc_curve(drop_intermediate=True)``;
- ``pr_curve``: {recall: TP/A, precision: TP/(TP + FP), thresholds}, (recall 0, precision 1,
  threshold null) first, i.e. ``sklearn.metrics.precision_recall_curve`` reversed.

AUROC is null where A = 0 or B = 0, AP and the PR curve where A = 0, each with a ``warnings``
entry; ``macro`` averages the classes where the value is defined.

**Exact points** (:func:`exact_points`): the distinct scores of the batch, by a sort; equal to
``roc_auc_score`` / ``average_precision_score`` (with ``sample_weight``).

**Binned points** (:func:`binned_points`): histograms of the probability p ∈ [0, 1] over
T = ``n_thresholds`` bins per class, bin j = max{j : t_j ≤ p} on t = ``linspace(0, 1, T)``, one for
the positive and one for the negative weight; merge = addition. The thresholds are t_j, so
TP_j = Σ_{i ≥ j} pos_i (torchmetrics ``BinaryAUROC(thresholds=T)``, torcheval
``BinaryBinnedAUROC(threshold=T)``, Keras ``AUC(num_thresholds=T)`` up to which side of an edge
counts). Within a bin every positive/negative pair counts as a tie, so

    |AUROC_binned − AUROC_exact| ≤ Σ_j pos_j neg_j / (2 A B),

which is 0 when the scores are already on the edges t_j (then both paths give the same points).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from types import ModuleType
from typing import Any

import numpy as np

from ce_engine.backend import to_numpy
from ce_engine.layout import Array
from ce_engine.metrics.bins import uniform_searchsorted

#: Largest histogram a ranking state keeps: classes × n_thresholds (two such arrays).
MAX_RANKING_CELLS = 1 << 20


def thresholds(n_thresholds: int) -> np.ndarray:
    """The bin edges t_j = ``numpy.linspace(0, 1, n_thresholds)``."""
    return np.linspace(0.0, 1.0, n_thresholds)


def histograms(
    xp: ModuleType, p: Array, pos: Array, neg: Array, n_thresholds: int
) -> tuple[np.ndarray, np.ndarray]:
    """(pos_hist, neg_hist), each (K, T) float64 on the host: Σ of the weights ``pos`` / ``neg``
    (M, K) of the elements of each column whose probability ``p`` (M, K) falls in bin j."""
    m, k = p.shape
    edges = xp.asarray(thresholds(n_thresholds))
    clipped = xp.clip(p.astype(xp.float64, copy=False), 0.0, 1.0)
    b = uniform_searchsorted(xp, edges, clipped, "right")
    flat = (xp.clip(b - 1, 0, n_thresholds - 1) + xp.arange(k)[None, :] * n_thresholds).ravel()
    size = k * n_thresholds

    def count(weights: Array) -> np.ndarray:
        h = xp.bincount(
            flat, weights=weights.astype(xp.float64, copy=False).ravel(), minlength=size
        )
        return to_numpy(h).reshape(k, n_thresholds)

    if m == 0:
        return np.zeros((k, n_thresholds)), np.zeros((k, n_thresholds))
    return count(pos), count(neg)


@dataclass
class Points:
    """The points of K columns, flat and host-side: ``col`` (P,) non-decreasing, within a
    column ``thr`` decreasing, ``tp``/``fp`` the cumulative weights; ``pos``/``neg`` (K,) the
    totals A and B."""

    col: np.ndarray
    thr: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    pos: np.ndarray
    neg: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.pos.shape[0])


def _points(
    xp: ModuleType, col: Array, thr: Array, tp: Array, fp: Array, pos: Array, neg: Array
) -> Points:
    """Drop the points equal to the one before them in their column (the origin before the
    first), then bring everything to the host."""
    first = xp.ones(col.shape, dtype=bool)
    first[1:] = col[1:] != col[:-1]
    prev_tp = xp.where(first, 0.0, xp.roll(tp, 1))
    prev_fp = xp.where(first, 0.0, xp.roll(fp, 1))
    keep = (tp != prev_tp) | (fp != prev_fp)
    return Points(
        col=to_numpy(col[keep]),
        thr=to_numpy(thr[keep]),
        tp=to_numpy(tp[keep]),
        fp=to_numpy(fp[keep]),
        pos=to_numpy(pos).astype(np.float64),
        neg=to_numpy(neg).astype(np.float64),
    )


def exact_points(xp: ModuleType, score: Array, reported: Array, pos: Array, neg: Array) -> Points:
    """Points at every distinct ``score`` (M, K) of each column (a descending sort);
    ``reported`` (M, K) is the threshold to report for each element (the probability, when
    the score is a logit or log-probability, monotone in it)."""
    m, k = score.shape
    if m == 0:
        zeros = xp.zeros(0)
        return _points(
            xp, xp.zeros(0, dtype=xp.int64), zeros, zeros, zeros, xp.zeros(k), xp.zeros(k)
        )
    # one transposed copy of the scores to sort; the other arrays are gathered from their
    # own (M, K) layout by flat index, and ``reported`` only at the points
    order = xp.argsort(-xp.ascontiguousarray(score.T), axis=1)
    flat = (order * k + xp.arange(k)[:, None]).ravel()
    sorted_s = score.ravel()[flat].reshape(k, m)
    a = pos.astype(xp.float64, copy=False).ravel()[flat].reshape(k, m)
    b = neg.astype(xp.float64, copy=False).ravel()[flat].reshape(k, m)
    ends = xp.ones((k, m), dtype=bool)
    ends[:, :-1] = sorted_s[:, 1:] != sorted_s[:, :-1]
    idx = xp.nonzero(ends.ravel())[0]
    return _points(
        xp,
        idx // m,
        reported.astype(xp.float64, copy=False).ravel()[flat[idx]],
        xp.cumsum(a, axis=1).ravel()[idx],
        xp.cumsum(b, axis=1).ravel()[idx],
        a.sum(axis=1),
        b.sum(axis=1),
    )


def binned_points(pos_hist: np.ndarray, neg_hist: np.ndarray) -> Points:
    """Points at the bin edges t_j, highest first, from (K, T) histograms."""
    k, n = pos_hist.shape
    tp = np.cumsum(pos_hist[:, ::-1], axis=1)
    fp = np.cumsum(neg_hist[:, ::-1], axis=1)
    col = np.repeat(np.arange(k), n)
    thr = np.tile(thresholds(n)[::-1], k)
    return _points(np, col, thr, tp.ravel(), fp.ravel(), tp[:, -1], fp[:, -1])


def _column_sums(points: Points, values: np.ndarray) -> np.ndarray:
    return np.bincount(points.col, weights=values, minlength=points.num_classes)


def _previous(points: Points, values: np.ndarray) -> np.ndarray:
    first = np.ones(points.col.shape, dtype=bool)
    first[1:] = points.col[1:] != points.col[:-1]
    return np.where(first, 0.0, np.roll(values, 1))


def auroc(points: Points) -> list[float | None]:
    """Per column AUROC (None where A = 0 or B = 0)."""
    d_fp = points.fp - _previous(points, points.fp)
    area = _column_sums(points, d_fp * (points.tp + _previous(points, points.tp)) / 2.0)
    defined = (points.pos > 0) & (points.neg > 0)
    value = area / np.where(defined, points.pos * points.neg, 1.0)
    return [float(v) if ok else None for v, ok in zip(value, defined, strict=True)]


def average_precision(points: Points) -> list[float | None]:
    """Per column AP = Σ_k ΔTP_k / A · precision_k (None where A = 0)."""
    d_tp = points.tp - _previous(points, points.tp)
    total = points.tp + points.fp
    precision = points.tp / np.where(total > 0, total, 1.0)
    value = _column_sums(points, d_tp * precision)
    defined = points.pos > 0
    value = value / np.where(defined, points.pos, 1.0)
    return [float(v) if ok else None for v, ok in zip(value, defined, strict=True)]


def _split(points: Points, *arrays: np.ndarray) -> list[list[np.ndarray]]:
    """Per column, the slices of ``arrays``."""
    bounds = np.searchsorted(points.col, np.arange(points.num_classes + 1))
    return [[a[lo:hi] for a in arrays] for lo, hi in pairwise(bounds)]


def _thin(fp: np.ndarray, tp: np.ndarray) -> np.ndarray:
    """sklearn's ``drop_intermediate``: keep the ends and the points where a slope changes."""
    if fp.size <= 2:
        return np.ones(fp.size, dtype=bool)
    keep = np.ones(fp.size, dtype=bool)
    keep[1:-1] = np.logical_or(np.diff(fp, 2), np.diff(tp, 2))
    return keep


def roc_curve(points: Points) -> list[dict[str, list[Any]] | None]:
    curves: list[dict[str, list[Any]] | None] = []
    for c, (thr, tp, fp) in enumerate(_split(points, points.thr, points.tp, points.fp)):
        a, b = points.pos[c], points.neg[c]
        if not (a > 0 and b > 0):
            curves.append(None)
            continue
        keep = _thin(fp, tp)
        curves.append(
            {
                "fpr": [0.0, *(fp[keep] / b).tolist()],
                "tpr": [0.0, *(tp[keep] / a).tolist()],
                "thresholds": [None, *thr[keep].tolist()],
            }
        )
    return curves


def pr_curve(points: Points) -> list[dict[str, list[Any]] | None]:
    curves: list[dict[str, list[Any]] | None] = []
    for c, (thr, tp, fp) in enumerate(_split(points, points.thr, points.tp, points.fp)):
        a = points.pos[c]
        if not a > 0:
            curves.append(None)
            continue
        total = tp + fp
        curves.append(
            {
                "recall": [0.0, *(tp / a).tolist()],
                "precision": [1.0, *(tp / np.where(total > 0, total, 1.0)).tolist()],
                "thresholds": [None, *thr.tolist()],
            }
        )
    return curves


def _macro(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _undefined(points: Points, name: str) -> list[dict[str, Any]]:
    """``warnings`` entries for the classes where ``name`` is undefined."""
    out = []
    checks = [("no_positives", points.pos <= 0, "no positive weight")]
    if name in ("auroc", "roc_curve"):
        checks.append(("no_negatives", points.neg <= 0, "no negative weight"))
    for kind, mask, what in checks:
        classes = np.nonzero(mask)[0].tolist()
        if classes:
            out.append(
                {
                    "metric": name,
                    "classes": classes,
                    "msg": f"{name} is undefined (null) for {len(classes)} class(es) with {what}; "
                    "the macro average leaves them out",
                    "type": kind,
                }
            )
    return out


def ranking_values(points: Points, names: Iterable[str]) -> dict[str, Any]:
    """{name: value} for the requested ranking metrics, plus ``warnings`` when a value is
    undefined for some class."""
    out: dict[str, Any] = {}
    warnings: list[dict[str, Any]] = []
    for name in names:
        if name == "auroc":
            per_class = auroc(points)
            out[name] = {"macro": _macro(per_class), "per_class": per_class}
        elif name == "average_precision":
            per_class = average_precision(points)
            out[name] = {"macro": _macro(per_class), "per_class": per_class}
        elif name == "roc_curve":
            out[name] = roc_curve(points)
        elif name == "pr_curve":
            out[name] = pr_curve(points)
        else:
            continue
        warnings += _undefined(points, name)
    if warnings:
        out["warnings"] = warnings
    return out


def binned_bound(pos_hist: np.ndarray, neg_hist: np.ndarray) -> list[float | None]:
    """Per column, the bound Σ_j pos_j neg_j / (2 A B) on |AUROC_binned − AUROC_exact|."""
    a, b = pos_hist.sum(axis=1), neg_hist.sum(axis=1)
    defined = (a > 0) & (b > 0)
    tied = (pos_hist * neg_hist).sum(axis=1) / (2.0 * np.where(defined, a * b, 1.0))
    return [float(v) if ok else None for v, ok in zip(tied, defined, strict=True)]
