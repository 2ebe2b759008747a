"""Evaluation metrics as mergeable, fixed-size states (DESIGN §2).

A batch is reduced to a :class:`MetricState`: weighted sums and counts only (totals, per-bin
sums, per-class counts, a confusion matrix), so merging two states is element-wise addition and
computing on a merged state equals computing on the concatenated batches.

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

Positions not counted by the loss (``ignore_index``, ``nan_policy: omit``, multi_hot rows with
no positive label) are not counted here either. Means over zero weight are None.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import numpy as np

from ce_engine.backend import to_numpy
from ce_engine.errors import ErrorItem, InputValidationError
from ce_engine.kernels.cpu import softmax_row_stats
from ce_engine.layout import Array, Layout
from ce_engine.losses._common import first_true, log_softmax, resolve_target_format
from ce_engine.options import CommonOptions

METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "top_k_accuracy",
    "nll",
    "perplexity",
    "entropy",
    "ece",
    "mce",
    "reliability",
    "brier",
    "confusion_matrix",
    "precision",
    "recall",
    "f1",
    "support",
    "macro_f1",
    "micro_f1",
    "weighted_f1",
)

#: Metrics defined without a single label per position (valid for multi_hot targets too).
LABEL_FREE_METRICS = frozenset({"nll", "perplexity", "entropy", "brier"})
_PER_CLASS = frozenset(
    {"precision", "recall", "f1", "support", "macro_f1", "micro_f1", "weighted_f1"}
)
_BINNED = frozenset({"ece", "mce", "reliability"})

#: Losses whose outputs are not a softmax distribution over classes: no metric applies.
_NOT_SOFTMAX = {
    "binary_cross_entropy": "its outputs are independent sigmoids, not a softmax distribution",
    "linear_cross_entropy": "its logits are never materialised",
}

LN2 = math.log(2.0)


def supported_metrics(loss: str) -> tuple[str, ...]:
    """Metric names a loss accepts (focal accepts them with ``variant: softmax`` only)."""
    return () if loss in _NOT_SOFTMAX else METRIC_NAMES


def _stat_shapes(
    names: Iterable[str], num_classes: int, top_k: tuple[int, ...], n_bins: int
) -> dict[str, tuple[int, ...]]:
    """The sufficient statistics the metrics ``names`` need, with their shapes (() = scalar)."""
    wanted = set(names)
    shapes: dict[str, tuple[int, ...]] = {"weight": (), "count": ()}
    if "accuracy" in wanted:
        shapes["correct"] = ()
    if "top_k_accuracy" in wanted:
        shapes["top_k_hits"] = (len(top_k),)
    if wanted & {"nll", "perplexity"}:
        shapes["nll"] = ()
    if "entropy" in wanted:
        shapes["entropy"] = ()
    if "brier" in wanted:
        shapes["brier"] = ()
    if wanted & _BINNED:
        for key in ("bin_count", "bin_confidence", "bin_correct"):
            shapes[key] = (n_bins,)
    if "confusion_matrix" in wanted:
        shapes["confusion"] = (num_classes, num_classes)
    if wanted & _PER_CLASS:
        for key in ("tp", "predicted", "support"):
            shapes[key] = (num_classes,)
    return shapes


#: Statistics with at least this many elements are stored packed (see MetricState.to_dict).
PACKED_STAT_SIZE = 1024


def _pack(value: Any) -> Any:
    if not isinstance(value, np.ndarray):
        return value
    if value.size < PACKED_STAT_SIZE:
        return value.tolist()
    data = zlib.compress(np.ascontiguousarray(value, dtype="<f8").tobytes(), 1)
    return {
        "dtype": "float64",
        "shape": list(value.shape),
        "zlib_base64": base64.b64encode(data).decode("ascii"),
    }


def _unpack(value: Any) -> np.ndarray:
    if isinstance(value, dict):
        if value.get("dtype") != "float64":
            raise ValueError(f"packed statistic of dtype {value.get('dtype')!r}, want float64")
        try:
            shape = tuple(int(d) for d in value["shape"])
        except OverflowError:
            raise ValueError(f"packed statistic has shape {value['shape']!r}") from None
        size = math.prod(shape) * 8
        if size > 8 * 4096 * 4096 or min(shape, default=0) < 0:  # ≤ a 4096-class confusion
            raise ValueError(f"packed statistic of shape {list(shape)} is out of range")
        inflate = zlib.decompressobj()
        try:
            packed = base64.b64decode(value["zlib_base64"], validate=True)
            raw = inflate.decompress(packed, size + 1)
        except zlib.error as exc:
            raise ValueError(f"packed statistic is not zlib data: {exc}") from None
        if len(raw) != size or not inflate.eof or inflate.unused_data:
            raise ValueError(f"packed statistic does not hold {list(shape)} float64 values")
        return np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(shape)
    return np.asarray(value, np.float64)


@dataclass
class MetricState:
    """Fixed-size sufficient statistics for the requested metrics; merge = addition.

    ``stats`` holds host values only: ``count`` (int, positions counted), ``weight`` (float,
    W = Σ s_i) and, per requested metric, float64 NumPy arrays or floats of weighted sums
    (nll and entropy in nats; ``log_base`` applies in :meth:`compute`).
    """

    names: tuple[str, ...]
    num_classes: int
    top_k: tuple[int, ...]
    n_bins: int
    log_base: str  # "e" | "2"
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(
        cls,
        names: Iterable[str],
        num_classes: int,
        top_k: Iterable[int] = (1, 5),
        n_bins: int = 15,
        log_base: str = "e",
    ) -> MetricState:
        """The state of zero positions (the identity of :meth:`merge`)."""
        names_t, top_k_t = tuple(names), tuple(top_k)
        stats: dict[str, Any] = {}
        for key, shape in _stat_shapes(names_t, num_classes, top_k_t, n_bins).items():
            stats[key] = 0 if key == "count" else (np.zeros(shape) if shape else 0.0)
        return cls(names_t, num_classes, top_k_t, n_bins, log_base, stats)

    def _config(self) -> tuple[Any, ...]:
        return (self.names, self.num_classes, self.top_k, self.n_bins, self.log_base)

    def merge(self, other: MetricState) -> MetricState:
        """Element-wise sum of the statistics; ValueError when the states are incompatible."""
        if self._config() != other._config():
            fields = ("names", "num_classes", "top_k", "n_bins", "log_base")
            diff = [
                f"{f}: {a!r} != {b!r}"
                for f, a, b in zip(fields, self._config(), other._config(), strict=True)
                if a != b
            ]
            raise ValueError(f"cannot merge incompatible metric states ({'; '.join(diff)})")
        if self.stats.keys() != other.stats.keys():
            raise ValueError("cannot merge metric states holding different statistics")
        stats = {key: self.stats[key] + other.stats[key] for key in self.stats}
        return replace(self, stats=stats)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: arrays as (nested) lists of floats, those of at least
        ``PACKED_STAT_SIZE`` elements (a confusion matrix) as ``{dtype, shape, zlib_base64}``: the
        little-endian float64 bytes zlib-compressed, in base64 (exact, and for a mostly-zero
        1000-class confusion matrix ~100× smaller and ~5× faster to (de)serialise than lists)."""
        return {
            "names": list(self.names),
            "num_classes": self.num_classes,
            "top_k": list(self.top_k),
            "n_bins": self.n_bins,
            "log_base": self.log_base,
            "stats": {key: _pack(value) for key, value in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricState:
        """Inverse of :meth:`to_dict`; ValueError when the statistics do not fit the config."""
        try:
            names = tuple(str(n) for n in data["names"])
            num_classes = int(data["num_classes"])
            top_k = tuple(int(k) for k in data["top_k"])
            n_bins = int(data["n_bins"])
            log_base = str(data["log_base"])
            raw = dict(data["stats"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a metric state: {exc!r}") from None
        unknown = [n for n in names if n not in METRIC_NAMES]
        if unknown or log_base not in ("e", "2"):
            raise ValueError(f"not a metric state: names {unknown} / log_base {log_base!r}")
        shapes = _stat_shapes(names, num_classes, top_k, n_bins)
        if raw.keys() != shapes.keys():
            raise ValueError(f"metric state statistics {sorted(raw)} do not match {sorted(shapes)}")
        stats: dict[str, Any] = {}
        for key, shape in shapes.items():
            try:
                value = int(raw[key]) if key == "count" else _unpack(raw[key])
            except (TypeError, ValueError, KeyError, OverflowError) as exc:
                raise ValueError(f"metric state {key!r} is not numeric: {exc}") from None
            if isinstance(value, int):
                stats[key] = value
            elif value.shape != shape:
                raise ValueError(f"metric state {key!r} has shape {value.shape}, want {shape}")
            else:
                stats[key] = value if shape else float(value)
        return cls(names, num_classes, top_k, n_bins, log_base, stats)

    def compute(self) -> dict[str, Any]:
        """{name: value} for the requested metrics (see the module docstring)."""
        st = self.stats
        total = float(st["weight"])
        scale = 1.0 / LN2 if self.log_base == "2" else 1.0

        def mean(key: str) -> float | None:
            return float(st[key]) / total if total > 0 else None

        out: dict[str, Any] = {}
        for name in self.names:
            if name == "accuracy":
                out[name] = mean("correct")
            elif name == "top_k_accuracy":
                out[name] = {
                    str(k): (float(h) / total if total > 0 else None)
                    for k, h in zip(self.top_k, st["top_k_hits"], strict=True)
                }
            elif name == "nll":
                nll = mean("nll")
                out[name] = None if nll is None else nll * scale
            elif name == "perplexity":
                nll = mean("nll")
                out[name] = None if nll is None else _exp(nll)
            elif name == "entropy":
                ent = mean("entropy")
                out[name] = None if ent is None else ent * scale
            elif name == "brier":
                out[name] = mean("brier")
            elif name in _BINNED:
                out[name] = self._calibration(name, total)
            elif name == "confusion_matrix":
                out[name] = st["confusion"].tolist()
            else:
                out[name] = self._per_class(name, total)
        return out

    def _calibration(self, name: str, total: float) -> Any:
        count = self.stats["bin_count"]
        conf = self.stats["bin_confidence"]
        correct = self.stats["bin_correct"]
        filled = count > 0
        safe = np.where(filled, count, 1.0)
        conf_mean = np.where(filled, conf / safe, 0.0)
        acc_mean = np.where(filled, correct / safe, 0.0)
        if name == "ece":
            return float(np.abs(correct - conf).sum() / total) if total > 0 else None
        if name == "mce":
            gaps = np.abs(acc_mean - conf_mean)[filled]
            return float(gaps.max()) if gaps.size else None
        return {
            "bin_edges": np.linspace(0.0, 1.0, self.n_bins + 1).tolist(),
            "confidence": conf_mean.tolist(),
            "accuracy": acc_mean.tolist(),
            "count": count.tolist(),
        }

    def _per_class(self, name: str, total: float) -> Any:
        tp, predicted, support = (self.stats[k] for k in ("tp", "predicted", "support"))
        if name == "support":
            return support.tolist()
        if name == "micro_f1":
            den = float(predicted.sum() + support.sum())
            return 2.0 * float(tp.sum()) / den if den > 0 else None
        f1 = _ratio(2.0 * tp, predicted + support)
        if name == "precision":
            return _ratio(tp, predicted).tolist()
        if name == "recall":
            return _ratio(tp, support).tolist()
        if name == "f1":
            return f1.tolist()
        if name == "macro_f1":
            present = (support > 0) | (predicted > 0)
            return float(f1[present].mean()) if present.any() else None
        assert name == "weighted_f1"
        return float((f1 * support).sum() / support.sum()) if support.sum() > 0 else None


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (sklearn ``zero_division=0``)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _check_request(
    names: list[str], loss: str, options: CommonOptions, fmt: str, num_classes: int
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Validate metric names against the loss and targets; returns (names, top_k)."""
    errors: list[ErrorItem] = []
    for i, name in enumerate(names):
        if name not in METRIC_NAMES:
            errors.append(
                ErrorItem(
                    ("metrics", i),
                    f"unknown metric {name!r}; available: {', '.join(METRIC_NAMES)}",
                    "unknown_metric",
                )
            )
        elif loss in _NOT_SOFTMAX or (loss == "focal" and _option(options, "variant") != "softmax"):
            why = _NOT_SOFTMAX.get(loss, "the sigmoid variant has no softmax distribution")
            errors.append(
                ErrorItem(
                    ("metrics", i),
                    f"metric {name} is not supported for {loss} ({why})",
                    "unsupported_metric",
                )
            )
        elif fmt == "multi_hot" and name not in LABEL_FREE_METRICS:
            errors.append(
                ErrorItem(
                    ("metrics", i),
                    f"metric {name} needs one label per position; multi_hot targets have "
                    f"several (label-free metrics: {', '.join(sorted(LABEL_FREE_METRICS))})",
                    "unsupported_metric",
                )
            )
        elif name == "confusion_matrix" and num_classes > options.max_confusion_classes:
            errors.append(
                ErrorItem(
                    ("metrics", i),
                    f"metric confusion_matrix needs C ≤ options.max_confusion_classes "
                    f"({options.max_confusion_classes}), logits have {num_classes} classes",
                    "too_many_classes",
                )
            )
    top_k: tuple[int, ...] = ()
    if "top_k_accuracy" in names:
        explicit = "top_k" in options.model_fields_set
        for j, k in enumerate(options.top_k):
            if k <= num_classes:
                top_k += () if k in top_k else (k,)
            elif explicit:
                errors.append(
                    ErrorItem(
                        ("options", "top_k", j),
                        f"k = {k} exceeds the number of classes ({num_classes})",
                        "top_k_too_large",
                    )
                )
    if errors:
        raise InputValidationError(errors)
    return tuple(dict.fromkeys(names)), top_k


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


def metric_state(
    names: Iterable[str],
    xp: ModuleType,
    rows: Array,
    targets: Array,
    layout: Layout,
    options: CommonOptions,
    sample_weight: Array | None,
    exclude: Array | None,
    loss: str = "cross_entropy",
) -> MetricState:
    """Reduce one batch to a :class:`MetricState` (one vectorised pass over the rows).

    ``rows`` (M, C) are the loss inputs with the class axis last (logits, probabilities or
    log-probabilities per ``options.input_kind``); ``targets`` as sent; ``sample_weight`` (M,);
    ``exclude`` (M,) marks positions dropped by ``nan_policy: omit``. Raises
    :class:`InputValidationError` for unknown or unsupported metrics, ``top_k`` > C and a
    confusion matrix over more than ``options.max_confusion_classes`` classes.
    """
    names_list = list(names)
    c = layout.num_classes
    fmt = resolve_target_format(_option(options, "target_format") or "auto", targets, layout)
    names_t, top_k = _check_request(names_list, loss, options, fmt, c)
    shapes = _stat_shapes(names_t, c, top_k, options.n_bins)
    labels, q, counted = _labels_and_mask(xp, targets, layout, options, fmt)
    if exclude is not None:
        counted &= ~exclude
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
    sums: dict[str, Any] = {"weight": w.sum(), "count": m}

    def wsum(per_row: Array) -> Array:
        return (w * per_row.astype(xp.float64, copy=False)).sum()

    # NumPy, logits, class-id targets: one chunked pass, no (M, C) temporaries
    want = frozenset(stat for key, stat in _ROW_STAT_OF.items() if key in shapes)
    if _fused_row_stats(xp, options, q, rows):
        per_row = softmax_row_stats(rows, labels, temperature=options.temperature, want=want)
    else:
        per_row = _row_stats(xp, rows, labels, q, options, want, fmt != "multi_hot")
    predicted: Array = per_row.get("prediction")
    correct: Array = None if predicted is None else (predicted == labels).astype(xp.float64)
    if "correct" in shapes:
        sums["correct"] = wsum(correct)
    if "top_k_hits" in shapes:
        ks = xp.asarray(top_k, dtype=xp.int64)
        sums["top_k_hits"] = ((per_row["rank"][:, None] < ks[None, :]) * w[:, None]).sum(axis=0)
    for key in ("nll", "entropy", "brier"):
        if key in shapes:
            sums[key] = wsum(per_row[key])
    if "bin_count" in shapes:
        n_bins = options.n_bins
        confidence = per_row["confidence"].astype(xp.float64)
        edges = xp.linspace(0.0, 1.0, n_bins + 1)
        # bins (lo, hi]: searchsorted 'left' gives i with edges[i-1] < κ ≤ edges[i]
        b = xp.clip(xp.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
        sums["bin_count"] = xp.bincount(b, weights=w, minlength=n_bins)
        sums["bin_confidence"] = xp.bincount(b, weights=w * confidence, minlength=n_bins)
        sums["bin_correct"] = xp.bincount(b, weights=w * correct, minlength=n_bins)
    if "confusion" in shapes:
        flat = xp.bincount(labels * c + predicted, weights=w, minlength=c * c)
        sums["confusion"] = flat.reshape(c, c)
    if "tp" in shapes:
        sums["tp"] = xp.bincount(labels, weights=w * correct, minlength=c)
        sums["predicted"] = xp.bincount(predicted, weights=w, minlength=c)
        sums["support"] = xp.bincount(labels, weights=w, minlength=c)

    stats: dict[str, Any] = {}
    for key, shape in shapes.items():
        if key == "count":
            stats[key] = int(sums[key])
        elif shape:
            stats[key] = to_numpy(sums[key]).astype(np.float64, copy=False).reshape(shape)
        else:
            stats[key] = float(sums[key])
    return MetricState(names_t, c, top_k, options.n_bins, options.log_base, stats)
