"""Which metrics each loss offers, and the size class of each metric's response value.

Two families of metric state (``MetricState.family``):

- ``softmax``: one distribution per position (``cross_entropy``, softmax ``focal``,
  ``kl_divergence``, ``multiclass_hinge``, ``linear_cross_entropy``);
- ``binary``: one independent sigmoid per (position, label) (``binary_cross_entropy``, sigmoid
  ``focal``).

Ranking metrics (:data:`RANKING_METRICS`) are exact in a stateless evaluation and binned in a
run's merged state (see :mod:`ce_engine.metrics.ranking`); every other metric is exact in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

#: The softmax classification metrics that merge exactly (no binning), in response order.
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

#: Threshold-free ranking metrics: exact when stateless, from score histograms in runs.
RANKING_METRICS: tuple[str, ...] = ("auroc", "average_precision", "roc_curve", "pr_curve")

#: Metrics of the softmax losses (one-vs-rest ranking per class).
SOFTMAX_METRICS: tuple[str, ...] = METRIC_NAMES + RANKING_METRICS

#: Softmax metrics with a bootstrap confidence interval in runs (per replicate a few scalars
#: or ``n_bins`` bins: :mod:`ce_engine.metrics.bootstrap`); the others have none.
CI_METRICS: tuple[str, ...] = (
    "accuracy",
    "top_k_accuracy",
    "nll",
    "perplexity",
    "entropy",
    "ece",
    "mce",
    "brier",
)

#: Direction of each metric with an interval, and of ``loss``, for the gate: True when higher
#: is better; ``entropy`` has none (a check on it takes ``min`` / ``max`` only).
HIGHER_IS_BETTER: Mapping[str, bool] = {
    "loss": False,
    "accuracy": True,
    "top_k_accuracy": True,
    "nll": False,
    "perplexity": False,
    "ece": False,
    "mce": False,
    "brier": False,
}

#: Metrics of the binary / multi-label losses (each label a task).
BINARY_METRICS: tuple[str, ...] = (
    "accuracy",
    "subset_accuracy",
    "hamming_loss",
    "precision",
    "recall",
    "f1",
    "support",
    "macro_f1",
    "micro_f1",
    "weighted_f1",
    "samples_f1",
    "auroc",
    "average_precision",
    "roc_curve",
    "pr_curve",
    "nll",
    "brier",
    "ece",
    "mce",
    "reliability",
    "confusion_matrix",
)

#: Metrics of ``linear_cross_entropy``: the per-row ones, computed chunk by chunk from the
#: chunk's logits (O(1) state per metric; nothing of size C × C or N × C).
LINEAR_METRICS: tuple[str, ...] = (
    "accuracy",
    "top_k_accuracy",
    "nll",
    "perplexity",
    "entropy",
    "ece",
    "mce",
    "reliability",
    "brier",
)

#: Every metric name, in catalog order.
ALL_METRICS: tuple[str, ...] = tuple(dict.fromkeys(SOFTMAX_METRICS + BINARY_METRICS))

#: Softmax metrics defined without a single label per position (valid for multi_hot targets).
LABEL_FREE_METRICS = frozenset({"nll", "perplexity", "entropy", "brier"})

Family = Literal["softmax", "binary"]
Kind = Literal["scalar", "scalar_map", "per_class", "summary", "bins", "matrix", "curve", "list"]

#: The size class of each response key, so that a service can put scalars in summaries and
#: large values behind detail endpoints (C classes or labels, B = ``n_bins``,
#: T = ``n_thresholds``, N = counted positions):
#:
#: - ``scalar``: a number or null;
#: - ``scalar_map``: a few numbers keyed by a parameter (``top_k_accuracy``: {k: number});
#: - ``per_class``: a list of C numbers;
#: - ``summary``: ``{"macro": number | null, "per_class": [C numbers | null]}``;
#: - ``bins``: ``reliability``, lists of B (B + 1 edges);
#: - ``matrix``: ``confusion_matrix``, C × C (softmax) or C × 2 × 2 (binary);
#: - ``curve``: per class null or lists of points, ``roc_curve`` {fpr, tpr, thresholds} and
#:   ``pr_curve`` {recall, precision, thresholds} (the first threshold null): up to T + 1
#:   points in runs, N + 1 in a stateless evaluation;
#: - ``list``: ``warnings``, at most two entries per ranking metric.
METRIC_SHAPES: Mapping[str, Kind] = {
    "accuracy": "scalar",
    "top_k_accuracy": "scalar_map",
    "nll": "scalar",
    "perplexity": "scalar",
    "entropy": "scalar",
    "ece": "scalar",
    "mce": "scalar",
    "reliability": "bins",
    "brier": "scalar",
    "confusion_matrix": "matrix",
    "precision": "per_class",
    "recall": "per_class",
    "f1": "per_class",
    "support": "per_class",
    "macro_f1": "scalar",
    "micro_f1": "scalar",
    "weighted_f1": "scalar",
    "samples_f1": "scalar",
    "subset_accuracy": "scalar",
    "hamming_loss": "scalar",
    "auroc": "summary",
    "average_precision": "summary",
    "roc_curve": "curve",
    "pr_curve": "curve",
    "warnings": "list",
}


def metric_kind(name: str) -> Kind:
    """The size class of response key ``name`` (see :data:`METRIC_SHAPES`); KeyError if unknown."""
    return METRIC_SHAPES[name]


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The summary part of a metrics response: ``scalar`` values as floats (or None),
    ``scalar_map`` values as {key: float}, and of each ``summary`` only ``{"macro": float}``;
    per-class lists, matrices, bins, curves and warnings are left out."""
    kept: dict[str, Any] = {}
    for key, value in metrics.items():
        kind = METRIC_SHAPES.get(key)
        if kind == "scalar":
            kept[key] = None if value is None else float(value)
        elif kind == "scalar_map":
            kept[key] = {str(k): None if v is None else float(v) for k, v in value.items()}
        elif kind == "summary":
            macro = value["macro"]
            kept[key] = {"macro": None if macro is None else float(macro)}
    return kept


def metric_family(loss: str, options: Any = None) -> Family:
    """``binary`` for the sigmoid losses (``binary_cross_entropy``, sigmoid ``focal``)."""
    if loss == "binary_cross_entropy":
        return "binary"
    if loss == "focal":
        return "binary" if getattr(options, "variant", "sigmoid") == "sigmoid" else "softmax"
    return "softmax"


def supported_metrics(loss: str, options: Any = None) -> tuple[str, ...]:
    """Metric names ``loss`` accepts. ``focal`` depends on ``options.variant``; without options
    it lists both variants' metrics (sigmoid first)."""
    if loss == "linear_cross_entropy":
        return LINEAR_METRICS
    if loss == "focal" and options is None:
        return tuple(dict.fromkeys(BINARY_METRICS + SOFTMAX_METRICS))
    return BINARY_METRICS if metric_family(loss, options) == "binary" else SOFTMAX_METRICS


def metrics_by_variant(loss: str) -> dict[str, list[str]] | None:
    """For losses whose metrics depend on ``options.variant`` (``focal``): variant → names."""
    if loss != "focal":
        return None
    return {"sigmoid": list(BINARY_METRICS), "softmax": list(SOFTMAX_METRICS)}
