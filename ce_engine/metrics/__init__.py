"""Evaluation metrics as mergeable, fixed-size states (DESIGN §2).

A batch is reduced to a :class:`MetricState` of weighted sums, counts and histograms, so merging
two states is element-wise addition and computing on a merged state equals computing on the
concatenated batches. Definitions: :mod:`~ce_engine.metrics.softmax` (softmax losses),
:mod:`~ce_engine.metrics.binary` (sigmoid losses), :mod:`~ce_engine.metrics.ranking` (AUROC,
average precision, curves); which loss offers what and the size class of each response key:
:mod:`~ce_engine.metrics.catalog`.

Exact vs binned, one seam: :func:`evaluate_metrics` returns the batch's state and its values.
The values are ``state.compute()`` except the ranking metrics, which come from the batch's own
distinct scores (exact, as sklearn). A run merges the states and computes from them, so its
ranking metrics come from the score histograms (binned, ``n_thresholds`` bins); every other
metric is the same either way.
"""

from collections.abc import Iterable
from types import ModuleType
from typing import Any

from ce_engine.layout import Array, Layout
from ce_engine.metrics.binary import binary_metric_state
from ce_engine.metrics.catalog import (
    ALL_METRICS,
    BINARY_METRICS,
    CI_METRICS,
    HIGHER_IS_BETTER,
    LABEL_FREE_METRICS,
    LINEAR_METRICS,
    METRIC_NAMES,
    METRIC_SHAPES,
    RANKING_METRICS,
    SOFTMAX_METRICS,
    metric_family,
    metric_kind,
    metrics_by_variant,
    scalar_metrics,
    supported_metrics,
)
from ce_engine.metrics.softmax import PositionStats, softmax_metric_state
from ce_engine.metrics.state import PACKED_STAT_SIZE, MetricState
from ce_engine.options import CommonOptions


def evaluate_metrics(
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
    exact: bool = True,
    only: Iterable[str] | None = None,
    positions: PositionStats | None = None,
) -> tuple[MetricState, dict[str, Any]]:
    """(the batch's mergeable state, its metric values: those in ``only`` when given); with
    ``exact`` the ranking values are exact (the batch's distinct scores), else binned like a
    run's. Arguments as :func:`ce_engine.metrics.softmax.softmax_metric_state` (``positions``
    softmax only)."""
    if metric_family(loss, options) == "binary":
        state, exact_values = binary_metric_state(
            names, xp, rows, targets, layout, options, sample_weight, exclude, loss, exact=exact
        )
    else:
        state, exact_values = softmax_metric_state(
            names,
            xp,
            rows,
            targets,
            layout,
            options,
            sample_weight,
            exclude,
            loss,
            exact=exact,
            positions=positions,
        )
    metrics = state.compute(only)
    if exact_values:
        metrics.pop("warnings", None)
        metrics.update({k: v for k, v in exact_values.items() if k in metrics or k == "warnings"})
    return state, metrics


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
    """The batch's mergeable :class:`MetricState` alone (see :func:`evaluate_metrics`)."""
    batch = (
        binary_metric_state if metric_family(loss, options) == "binary" else softmax_metric_state
    )
    return batch(names, xp, rows, targets, layout, options, sample_weight, exclude, loss)[0]


__all__ = [
    "ALL_METRICS",
    "BINARY_METRICS",
    "CI_METRICS",
    "HIGHER_IS_BETTER",
    "LABEL_FREE_METRICS",
    "LINEAR_METRICS",
    "METRIC_NAMES",
    "METRIC_SHAPES",
    "PACKED_STAT_SIZE",
    "RANKING_METRICS",
    "SOFTMAX_METRICS",
    "MetricState",
    "evaluate_metrics",
    "metric_family",
    "metric_kind",
    "metric_state",
    "metrics_by_variant",
    "scalar_metrics",
    "supported_metrics",
]
