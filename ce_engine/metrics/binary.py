"""Metrics of the sigmoid losses (``binary_cross_entropy``, sigmoid ``focal``): each label a task.

Rows (M, L): the logits z (or probabilities, ``input_kind: probabilities``) with the label
axis last; labels y ∈ [0, 1] of the same shape. Per counted position i with sample weight s_i
(W = Σ_i s_i) and label l: p_il = σ(z_il / T) (the value as sent for probabilities), the
prediction ŷ_il = [p_il > t_l] at the decision ``threshold`` t (one for all labels or one per
label; torchmetrics' ``preds > threshold``), the positive weight a_il = s_i y_il and the
negative weight b_il = s_i (1 − y_il), so a soft label counts as y positive and 1 − y negative.
Per label: tp = Σ_i a ŷ, fp = Σ_i b ŷ, fn = Σ_i a (1 − ŷ), tn = Σ_i b (1 − ŷ).

- ``accuracy`` = Σ_l (tp + tn) / (W L), element-wise (torchmetrics ``MultilabelAccuracy``
  with ``average="micro"``); ``hamming_loss`` = Σ_l (fp + fn) / (W L)
  (``sklearn.metrics.hamming_loss``).
- ``subset_accuracy`` = Σ_i s_i Π_l (ŷ y + (1 − ŷ)(1 − y)) / W: the exact-match ratio
  (``sklearn.metrics.accuracy_score`` on multi-label data; for soft labels the probability that
  every label matches).
- ``precision`` tp/(tp + fp), ``recall`` tp/(tp + fn), ``f1`` 2tp/(2tp + fp + fn), ``support``
  tp + fn, per label, 0 where a denominator is 0 (sklearn ``zero_division=0``);
  ``macro_f1`` = mean of f1 over all L labels, ``micro_f1`` = 2Σtp / (2Σtp + Σfp + Σfn),
  ``weighted_f1`` = Σ f1·support / Σ support, ``samples_f1`` = Σ_i s_i F1_i / W with
  F1_i = 2 Σ_l ŷ y / (Σ_l ŷ + Σ_l y) (sklearn ``f1_score(average=…)`` on multi-label data).
- ``confusion_matrix`` (L, 2, 2) = [[tn, fp], [fn, tp]] per label
  (``sklearn.metrics.multilabel_confusion_matrix``).
- ``nll`` = Σ_i s_i Σ_l −[y log p + (1 − y) log(1 − p)] / (W L) in ``log_base`` units, from the
  logits by softplus (exact at any magnitude), probabilities clipped to [eps, 1 − eps]
  (``sklearn.metrics.log_loss`` of the flattened elements); ``brier`` = Σ s (p − y)² / (W L)
  (``sklearn.metrics.brier_score_loss`` of the flattened elements).
- ``ece`` / ``mce`` / ``reliability`` over all (position, label) elements with confidence p and
  outcome y: ``n_bins`` bins (lo, hi], p = 0 in the first, per bin the weight, mean p and mean y
  (torchmetrics ``BinaryCalibrationError`` of the flattened elements, ``norm`` l1 / max).
- ``auroc``, ``average_precision``, ``roc_curve``, ``pr_curve`` per label, ranked by z (by p
  for probability inputs): :mod:`ce_engine.metrics.ranking`; exact in a stateless evaluation,
  binned in a run.

Positions not counted by the loss (``nan_policy: omit``, NaN labels) are not counted here. Means
over zero weight are None. Element weights (``weight``), ``pos_weight`` and label smoothing
shape the loss only.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

import numpy as np

from ce_engine.backend import to_numpy
from ce_engine.errors import InputValidationError
from ce_engine.layout import Array, Layout
from ce_engine.metrics import ranking
from ce_engine.metrics.bins import uniform_searchsorted
from ce_engine.metrics.check import check_request
from ce_engine.metrics.state import MetricState, stat_shapes
from ce_engine.options import CommonOptions


def _times(xp: ModuleType, coef: Array, value: Array) -> Array:
    """coef · value with 0 · ∞ = 0 (a label of 0 against a logit of ±∞)."""
    return xp.where(coef != 0, coef * xp.where(coef != 0, value, 0), 0)


def _scores(
    xp: ModuleType, rows: Array, y: Array, options: CommonOptions, with_nll: bool
) -> tuple[Array, Array, Array | None]:
    """(ranking score, p, Σ_l of the element NLL per row or None), all float64.

    From logits, with t = log1p(e^−|z|): softplus(−z) = max(−z, 0) + t, so
    p = σ(z) = exp(−max(−z, 0) − t) and the element NLL
    y softplus(−z) + (1 − y) softplus(z) = t + y max(−z, 0) + (1 − y) max(z, 0), every term
    ≥ 0 (no cancellation at any magnitude)."""
    z = rows.astype(xp.float64, copy=False)
    if options.input_kind != "logits":
        if not with_nll:
            return z, z, None
        clipped = xp.clip(z, options.eps, 1.0 - options.eps)
        return z, z, -(y * xp.log(clipped) + (1.0 - y) * xp.log1p(-clipped)).sum(axis=-1)
    if options.temperature != 1.0:
        z = z / options.temperature
    t = xp.log1p(xp.exp(-xp.abs(z)))
    neg_part = xp.maximum(-z, 0.0)
    p = xp.exp(-(neg_part + t))
    if not with_nll:
        return z, p, None
    pos_part = xp.maximum(z, 0.0)
    if bool(xp.isinf(z).any()):  # 0 · ∞ = 0: a label of 0 (or 1) against a logit of ±∞
        terms = _times(xp, y, neg_part) + _times(xp, 1.0 - y, pos_part)
    else:
        terms = y * neg_part + (1.0 - y) * pos_part
    terms += t
    return z, p, terms.sum(axis=-1)


def binary_metric_state(
    names: Iterable[str],
    xp: ModuleType,
    rows: Array,
    targets: Array,
    layout: Layout,
    options: CommonOptions,
    sample_weight: Array | None,
    exclude: Array | None,
    loss: str = "binary_cross_entropy",
    *,
    exact: bool = False,
) -> tuple[MetricState, dict[str, Any]]:
    """Reduce one batch to a binary :class:`MetricState`; with ``exact``, also the batch's exact
    ranking values, else {}. Arguments as :func:`ce_engine.metrics.softmax_metric_state`,
    with ``targets`` labels of the logits' shape."""
    num_labels = layout.num_classes
    request = check_request(list(names), loss, options, None, num_labels)
    names_t = request.names
    n_thr = options.n_thresholds
    shapes = stat_shapes("binary", names_t, num_labels, (), options.n_bins, n_thr)
    if tuple(targets.shape) != layout.shape:
        raise InputValidationError.single(
            ("targets",),
            f"targets must have the logits' shape {list(layout.shape)}, got {list(targets.shape)}",
            "shape_mismatch",
        )
    y = layout.to_rows(xp, targets).astype(xp.float64, copy=False)
    counted = ~xp.isnan(y).any(axis=-1)
    if exclude is not None:
        counted &= ~exclude
    if not bool(counted.all()):
        keep = xp.nonzero(counted)[0]
        rows, y = rows[keep], y[keep]
        sample_weight = sample_weight[keep] if sample_weight is not None else None
    m = int(rows.shape[0])
    w = (
        sample_weight.astype(xp.float64)
        if sample_weight is not None
        else xp.ones(m, dtype=xp.float64)
    )
    score, p, nll = _scores(xp, rows, y, options, "nll" in shapes)
    predicted = p > xp.asarray(np.asarray(request.threshold, dtype=np.float64))
    sums: dict[str, Any] = {"weight": w.sum(), "count": m}
    hits: Array = None
    if shapes.keys() & {"tp", "samples_f1"}:
        hits = xp.where(predicted, y, 0.0)  # ŷ y
    if "tp" in shapes:
        # ŷ(1 − y) = ŷ − ŷy, y(1 − ŷ) = y − ŷy, (1 − y)(1 − ŷ) = (1 − y) − ŷ(1 − y): exact
        # in floating point for ŷ ∈ {0, 1}; one matrix-vector product per sum
        false_pos = predicted - hits
        sums["tp"] = w @ hits
        sums["fp"] = w @ false_pos
        sums["fn"] = w @ (y - hits)
        sums["tn"] = w @ ((1.0 - y) - false_pos)
        del false_pos
    if "exact_match" in shapes:
        sums["exact_match"] = w @ xp.prod(xp.where(predicted, y, 1.0 - y), axis=-1)
    if "samples_f1" in shapes:
        den = predicted.sum(axis=-1) + y.sum(axis=-1)
        f1 = xp.where(den > 0, 2.0 * hits.sum(axis=-1) / xp.where(den > 0, den, 1.0), 0.0)
        sums["samples_f1"] = w @ f1
    if nll is not None:
        sums["nll"] = w @ nll
    if "brier" in shapes:
        sums["brier"] = w @ ((p - y) ** 2).sum(axis=-1)
    if "bin_count" in shapes:
        n_bins = options.n_bins
        edges = xp.linspace(0.0, 1.0, n_bins + 1)
        # bins (lo, hi]: searchsorted 'left' gives i with edges[i-1] < p ≤ edges[i]
        b = xp.clip(uniform_searchsorted(xp, edges, p.ravel(), "left") - 1, 0, n_bins - 1)
        ones = xp.broadcast_to(w[:, None], p.shape).ravel()
        sums["bin_count"] = xp.bincount(b, weights=ones, minlength=n_bins)
        sums["bin_confidence"] = xp.bincount(b, weights=(w[:, None] * p).ravel(), minlength=n_bins)
        sums["bin_correct"] = xp.bincount(b, weights=(w[:, None] * y).ravel(), minlength=n_bins)
    exact_values: dict[str, Any] = {}
    if "rank_pos" in shapes:
        pos, neg = w[:, None] * y, w[:, None] * (1.0 - y)
        sums["rank_pos"], sums["rank_neg"] = ranking.histograms(xp, p, pos, neg, n_thr)
        if exact:
            points = ranking.exact_points(xp, score, p, pos, neg)
            exact_values = ranking.ranking_values(points, names_t)

    stats: dict[str, Any] = {}
    for key, shape in shapes.items():
        if key == "count":
            stats[key] = int(sums[key])
        elif shape:
            stats[key] = to_numpy(sums[key]).astype(np.float64, copy=False).reshape(shape)
        else:
            stats[key] = float(sums[key])
    state = MetricState(
        names_t,
        num_labels,
        (),
        options.n_bins,
        options.log_base,
        stats,
        "binary",
        n_thr,
        request.threshold,
    )
    return state, exact_values
