"""Evaluation metrics as mergeable, fixed-size states (DESIGN §2)."""

from ce_engine.metrics.softmax import (
    LABEL_FREE_METRICS,
    METRIC_NAMES,
    PACKED_STAT_SIZE,
    MetricState,
    metric_state,
    supported_metrics,
)

__all__ = [
    "LABEL_FREE_METRICS",
    "METRIC_NAMES",
    "PACKED_STAT_SIZE",
    "MetricState",
    "metric_state",
    "supported_metrics",
]
