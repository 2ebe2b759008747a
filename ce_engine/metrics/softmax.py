"""Metrics of the softmax losses: one distribution p_i over C classes per position.

A batch is reduced to a :class:`~ce_engine.metrics.state.MetricState` of family ``softmax``.

Definitions, per counted position i with sample weight s_i (1 without ``sample_weight``),
probabilities p_i (softmax(z_i / T) for logits, the values as sent for ``input_kind``
probabilities, exp of them for log_probabilities) and W = Σ_i s_i:

- label y_i: the class id for index targets, argmax_c q_ic (first maximum) for probability
  targets; multi_hot targets have no single label, so metrics that need one answer 422.
- prediction ŷ_i = argmax_c p_ic (first maximum, as ``numpy.argmax``); confidence
  κ_i = max_c p_ic.
- ``accuracy`` = Σ_i s_i [ŷ_i = y_i] / W.
- ``top_k_accuracy`` = {k: Σ_i s_i [rank_i(y_i) < k] / W} where classes are ranked by score
  descending and ties go to the larger class id (``sklearn.metrics.top_k_accuracy_score``).
- ``nll`` = Σ_i s_i (−Σ_c q_ic log p_ic) / W in ``log_base`` units, q_i = one-hot(y_i) for index
  targets, the target distribution for probabilities and y_i / Σ_c y_ic for multi_hot
  (no class weights, no label smoothing: the plain log loss, ``sklearn.metrics.log_loss``).
  Probability inputs are clipped to [eps, 1 − eps] inside the log, as in the loss.
- ``perplexity`` = base^nll = exp(nll in nats).
- ``entropy`` = Σ_i s_i (−Σ_c p_ic log p_ic) / W in ``log_base`` units (0 · log 0 = 0).
- ``brier`` = Σ_i s_i Σ_c (p_ic − q_ic)² / W (range [0, 2]; sklearn's multiclass form, not halved).
- ``ece`` / ``mce`` / ``reliability``: ``n_bins`` equal-width bins B_b = (b/n, (b+1)/n] on κ, a
  confidence of exactly 0 in the first bin (torchmetrics); per bin the weight n_b, mean
  confidence conf_b and accuracy acc_b. ECE = Σ_b n_b |acc_b − conf_b| / W, MCE = max over
  non-empty bins of |acc_b − conf_b|; ``reliability`` = {bin_edges, confidence, accuracy,
  count} (0 for the means of empty bins).
- ``confusion_matrix`` (C × C): entry [t, c] = Σ s_i over positions with y_i = t, ŷ_i = c (rows
  true, columns predicted, ``sklearn.metrics.confusion_matrix``); C ≤ ``max_confusion_classes``.
- per class c: tp_c, predicted_c, support_c (weighted); ``precision`` = tp/predicted, ``recall``
  = tp/support, ``f1`` = 2 tp / (predicted + support), 0 where a denominator is 0
  (sklearn ``zero_division=0``); ``support``; ``macro_f1`` = mean F1 over the classes that occur
  (support or predicted > 0, sklearn's default labels), ``weighted_f1`` = Σ_c f1_c support_c / W,
  ``micro_f1`` = 2 Σtp / (Σpredicted + Σsupport) (= accuracy for single-label data).
- ``auroc``, ``average_precision``, ``roc_curve``, ``pr_curve``: one-vs-rest per class c, the
  positives the positions with y_i = c (weight s_i), the negatives the others, scored by p_ic
  (ranked by log p_ic for logits and log-probabilities, so that underflow to p = 0 makes no
  ties); ``macro`` = mean over the classes where the value is defined
  (``sklearn.metrics.roc_auc_score(multi_class="ovr", average="macro")``). Exact in a stateless
  evaluation, binned in a run: see :mod:`ce_engine.metrics.ranking`.
- ``nll`` is ``sklearn.metrics.log_loss`` (in ``log_base`` units); there is no separate
  ``log_loss`` key.

Positions not counted by the loss (``ignore_index``, ``nan_policy: omit``, multi_hot rows with
no positive label) are not counted here either. Means over zero weight are None.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ce_engine.backend import to_numpy
from ce_engine.errors import InputValidationError
from ce_engine.kernels.cpu import softmax_row_stats
from ce_engine.layout import Array, Layout
from ce_engine.losses._common import first_true, log_softmax, resolve_target_format
from ce_engine.metrics import ranking
from ce_engine.metrics.bins import uniform_searchsorted
from ce_engine.metrics.cells import Cells
from ce_engine.metrics.check import check_request
from ce_engine.metrics.state import MetricState, stat_shapes
from ce_engine.options import CommonOptions


def _masked_log(xp: ModuleType, coef: Array, log_p: Array) -> Array:
    """log p where ``coef`` ≠ 0, else 0: so that coef · log p follows 0 · log 0 = 0."""
    return xp.where(coef != 0, log_p, 0)


def _option(options: Any, name: str) -> Any:
    return getattr(options, name, None)


def _labels_and_mask(
    xp: ModuleType, targets: Array, layout: Layout, options: CommonOptions, fmt: str
) -> tuple[Array, Array | None, Array]:
    """(labels (M,), target distributions q (M, C) or None for index targets, counted (M,)).

    Dense targets give labels = argmax_c q_c (first maximum).
    """
    c = layout.num_classes
    if fmt == "index":
        y = layout.to_positions(targets).astype(xp.int64, copy=False)
        ignore = _option(options, "ignore_index")
        counted = y != ignore if ignore is not None else xp.ones(y.shape, dtype=bool)
        bad = first_true(xp, counted & ((y < 0) | (y >= c)))
        if bad is not None:
            raise InputValidationError.single(
                ("targets", *layout.position(bad)),
                f"class index {int(y[bad])} is out of range [0, {c})",
                "class_index_out_of_range",
            )
        return xp.where(counted, y, 0), None, counted
    q = layout.to_rows(xp, targets).astype(xp.float64, copy=False)
    if _option(options, "target_kind") == "logits":
        q = xp.exp(log_softmax(xp, q))
    counted = ~xp.isnan(q).any(axis=-1)  # as the loss: rows with a NaN target are not counted
    if fmt == "multi_hot":
        positives = xp.sum(q, axis=-1)
        counted &= positives > 0
        q = q / xp.maximum(positives, 1.0)[:, None]
    return xp.argmax(q, axis=-1), q, counted


#: Metric sums → the per-row statistic of ``kernels.cpu.softmax_row_stats`` they need.
_ROW_STAT_OF = {
    "top_k_hits": "rank",
    "nll": "nll",
    "entropy": "entropy",
    "brier": "brier",
    "bin_count": "confidence",
}


def _fused_row_stats(xp: ModuleType, options: CommonOptions, q: Array | None, rows: Array) -> bool:
    """Whether ``kernels.cpu.softmax_row_stats`` covers the batch (NumPy, logits, class ids)."""
    return xp is np and options.input_kind == "logits" and q is None and rows.ndim == 2


def _row_stats(
    xp: ModuleType,
    rows: Array,
    labels: Array,
    q: Array | None,
    options: CommonOptions,
    want: frozenset[str],
    with_prediction: bool,
) -> dict[str, Array]:
    """The per-row statistics of ``kernels.cpu.softmax_row_stats`` in xp-generic code: any
    backend and input kind; with target distributions ``q``, nll and brier are against q.
    p and log p are formed only when a probability statistic is wanted."""
    m, c = rows.shape
    ar = xp.arange(m)
    out: dict[str, Array] = {}
    if with_prediction:  # every label metric, ece & co included (multi_hot has none)
        out["prediction"] = xp.argmax(rows, axis=-1)
    if "rank" in want:
        score_y = rows[ar, labels][:, None]
        # sklearn ranks by a stable ascending sort reversed: among ties the larger id first
        above = rows > score_y
        above |= (rows == score_y) & (xp.arange(c)[None, :] > labels[:, None])
        out["rank"] = above.sum(axis=-1)
    if not want & {"nll", "entropy", "brier", "confidence"}:
        return out
    if options.input_kind == "logits":
        log_p = log_softmax(xp, rows, options.temperature)
        p = xp.exp(log_p)
    elif options.input_kind == "log_probabilities":
        log_p, p = rows, xp.exp(rows)
    else:
        p, log_p = rows, xp.log(xp.clip(rows, options.eps, 1.0 - options.eps))
    if "nll" in want:
        dense_nll = None if q is None else -xp.sum(q * _masked_log(xp, q, log_p), axis=-1)
        out["nll"] = -log_p[ar, labels] if dense_nll is None else dense_nll
    if "entropy" in want:
        out["entropy"] = -xp.sum(p * _masked_log(xp, p, log_p), axis=-1)
    if "brier" in want:
        if q is None:  # Σ_c (p_c − y_c)² = Σ_c p_c² − 2 p_y + 1 without a one-hot (M, C) array
            p_y = p[ar, labels].astype(xp.float64)
            out["brier"] = xp.sum(p * p, axis=-1, dtype=xp.float64) - 2.0 * p_y + 1.0
        else:
            out["brier"] = xp.sum((p - q) ** 2, axis=-1)
    if "confidence" in want:
        out["confidence"] = p[ar, out["prediction"]]
    return out


def _ranking_inputs(
    xp: ModuleType, rows: Array, labels: Array, w: Array, options: CommonOptions
) -> tuple[Array, Array, Array, Array]:
    """(score, p, positive weights, negative weights), each (M, C), for one-vs-rest ranking."""
    if options.input_kind == "probabilities":
        p = rows.astype(xp.float64, copy=False)
        score = p
    else:
        score = rows.astype(xp.float64, copy=False)
        if options.input_kind == "logits":
            score = log_softmax(xp, score, options.temperature)
        p = xp.exp(score)
    hit = labels[:, None] == xp.arange(rows.shape[1])[None, :]
    return score, p, xp.where(hit, w[:, None], 0.0), xp.where(hit, 0.0, w[:, None])


@dataclass(frozen=True)
class PositionStats:
    """The counted positions of a softmax batch and their per-position metric quantities.

    ``kept`` (M',) are the row indices of the counted positions (None when every row counts);
    ``rows``, ``labels`` and ``q`` are restricted to them; ``weight`` (M',) float64 is s_i
    (1 without ``sample_weight``); ``per_row`` holds the statistics of
    :func:`~ce_engine.kernels.cpu.softmax_row_stats` the requested metrics need (``prediction``,
    ``rank``, ``nll``, ``entropy``, ``brier``, ``confidence``); ``correct`` (M',) float64 is
    [ŷ_i = y_i] (None without a prediction).
    """

    kept: Array | None
    rows: Array
    labels: Array
    q: Array | None
    weight: Array
    per_row: dict[str, Array]
    correct: Array | None


def top_k_hit(xp: ModuleType, rank: Array, top_k: tuple[int, ...]) -> Array:
    """(M, K) float64: [rank_i(y_i) < k] for each k of ``top_k``."""
    ks = xp.asarray(top_k, dtype=xp.int64)
    return (rank[:, None] < ks[None, :]).astype(xp.float64)


def calibration_bin(xp: ModuleType, confidence: Array, n_bins: int) -> Array:
    """(M,) int64 bin of each confidence κ_i: b with b/n < κ_i ≤ (b+1)/n, 0 for κ_i = 0."""
    edges = xp.linspace(0.0, 1.0, n_bins + 1)
    # bins (lo, hi]: searchsorted 'left' gives i with edges[i-1] < κ ≤ edges[i]
    return xp.clip(uniform_searchsorted(xp, edges, confidence, "left") - 1, 0, n_bins - 1)


def softmax_position_stats(
    shapes: dict[str, tuple[int, ...]],
    xp: ModuleType,
    rows: Array,
    targets: Array,
    layout: Layout,
    options: CommonOptions,
    sample_weight: Array | None,
    exclude: Array | None,
    fmt: str,
) -> PositionStats:
    """The counted positions and the per-position quantities behind the statistics ``shapes``
    (:func:`~ce_engine.metrics.state.stat_shapes`) of a validated request; ``fmt`` the
    resolved target format. Arguments otherwise as :func:`softmax_metric_state`."""
    labels, q, counted = _labels_and_mask(xp, targets, layout, options, fmt)
    if exclude is not None:
        counted &= ~exclude
    keep = None
    if not bool(counted.all()):
        keep = xp.nonzero(counted)[0]
        rows = rows[keep]
        labels = labels[keep]
        q = q[keep] if q is not None else None
        sample_weight = sample_weight[keep] if sample_weight is not None else None
    m = int(rows.shape[0])
    w = (
        sample_weight.astype(xp.float64)
        if sample_weight is not None
        else xp.ones(m, dtype=xp.float64)
    )
    # NumPy, logits, class-id targets: one chunked pass, no (M, C) temporaries
    want = frozenset(stat for key, stat in _ROW_STAT_OF.items() if key in shapes)
    if _fused_row_stats(xp, options, q, rows):
        per_row = softmax_row_stats(rows, labels, temperature=options.temperature, want=want)
    else:
        per_row = _row_stats(xp, rows, labels, q, options, want, fmt != "multi_hot")
    predicted: Array = per_row.get("prediction")
    correct: Array = None if predicted is None else (predicted == labels).astype(xp.float64)
    return PositionStats(keep, rows, labels, q, w, per_row, correct)


def batch_positions(
    names: Iterable[str],
    xp: ModuleType,
    rows: Array,
    targets: Array,
    layout: Layout,
    options: CommonOptions,
    sample_weight: Array | None,
    exclude: Array | None,
    loss: str = "cross_entropy",
) -> PositionStats:
    """:func:`softmax_position_stats` for the metric request ``names`` (validated as in
    :func:`softmax_metric_state`)."""
    c = layout.num_classes
    fmt = resolve_target_format(_option(options, "target_format") or "auto", targets, layout)
    request = check_request(list(names), loss, options, fmt, c)
    shapes = stat_shapes(
        "softmax", request.names, c, request.top_k, options.n_bins, options.n_thresholds
    )
    return softmax_position_stats(
        shapes, xp, rows, targets, layout, options, sample_weight, exclude, fmt
    )


def softmax_metric_state(
    names: Iterable[str],
    xp: ModuleType,
    rows: Array,
    targets: Array,
    layout: Layout,
    options: CommonOptions,
    sample_weight: Array | None,
    exclude: Array | None,
    loss: str = "cross_entropy",
    *,
    exact: bool = False,
    positions: PositionStats | None = None,
) -> tuple[MetricState, dict[str, Any]]:
    """Reduce one batch to a softmax :class:`MetricState` (one vectorised pass over the rows);
    with ``exact``, also the batch's exact ranking values (``ranking.ranking_values`` of its
    distinct scores), else {}. ``positions``: the batch's :func:`batch_positions` for these
    ``names`` when already computed (a run with bootstrap replicates shares them).

    ``rows`` (M, C) are the loss inputs with the class axis last (logits, probabilities or
    log-probabilities per ``options.input_kind``); ``targets`` as sent; ``sample_weight`` (M,);
    ``exclude`` (M,) marks positions dropped by ``nan_policy: omit``. Raises
    :class:`InputValidationError` for unknown or unsupported metrics, ``top_k`` > C, a
    confusion matrix over more than ``options.max_confusion_classes`` classes and ranking
    histograms over ``ranking.MAX_RANKING_CELLS``.
    """
    names_list = list(names)
    c = layout.num_classes
    fmt = resolve_target_format(_option(options, "target_format") or "auto", targets, layout)
    request = check_request(names_list, loss, options, fmt, c)
    names_t, top_k = request.names, request.top_k
    n_thr = options.n_thresholds
    shapes = stat_shapes("softmax", names_t, c, top_k, options.n_bins, n_thr)
    counted = positions or softmax_position_stats(
        shapes, xp, rows, targets, layout, options, sample_weight, exclude, fmt
    )
    rows, labels, w = counted.rows, counted.labels, counted.weight
    per_row, correct = counted.per_row, counted.correct
    predicted: Array = per_row.get("prediction")
    sums: dict[str, Any] = {"weight": w.sum(), "count": int(rows.shape[0])}

    def wsum(per_row: Array) -> Array:
        return (w * per_row.astype(xp.float64, copy=False)).sum()

    if "correct" in shapes:
        sums["correct"] = wsum(correct)
    if "top_k_hits" in shapes:
        sums["top_k_hits"] = (top_k_hit(xp, per_row["rank"], top_k) * w[:, None]).sum(axis=0)
    for key in ("nll", "entropy", "brier"):
        if key in shapes:
            sums[key] = wsum(per_row[key])
    if "bin_count" in shapes:
        n_bins = options.n_bins
        confidence = per_row["confidence"].astype(xp.float64)
        b = calibration_bin(xp, confidence, n_bins)
        sums["bin_count"] = xp.bincount(b, weights=w, minlength=n_bins)
        sums["bin_confidence"] = xp.bincount(b, weights=w * confidence, minlength=n_bins)
        sums["bin_correct"] = xp.bincount(b, weights=w * correct, minlength=n_bins)
    if "confusion" in shapes:  # sparse: a batch touches at most M of the C² cells
        sums["confusion"] = Cells.of(c, to_numpy(labels), to_numpy(predicted), to_numpy(w))
    if "tp" in shapes:
        sums["tp"] = xp.bincount(labels, weights=w * correct, minlength=c)
        sums["predicted"] = xp.bincount(predicted, weights=w, minlength=c)
        sums["support"] = xp.bincount(labels, weights=w, minlength=c)
    exact_values: dict[str, Any] = {}
    if "rank_pos" in shapes:
        score, p, pos, neg = _ranking_inputs(xp, rows, labels, w, options)
        sums["rank_pos"], sums["rank_neg"] = ranking.histograms(xp, p, pos, neg, n_thr)
        if exact:
            points = ranking.exact_points(xp, score, p, pos, neg)
            exact_values = ranking.ranking_values(points, names_t)
        del score, p, pos, neg

    stats: dict[str, Any] = {}
    for key, shape in shapes.items():
        if key == "count":
            stats[key] = int(sums[key])
        elif isinstance(sums[key], Cells):
            stats[key] = sums[key]
        elif shape:
            stats[key] = to_numpy(sums[key]).astype(np.float64, copy=False).reshape(shape)
        else:
            stats[key] = float(sums[key])
    state = MetricState(
        names_t, c, top_k, options.n_bins, options.log_base, stats, "softmax", n_thr
    )
    return state, exact_values
