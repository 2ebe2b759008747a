"""Evaluation metrics requested through ``evaluate(..., metrics=[...])``."""

from __future__ import annotations

from typing import Any

from ce_engine.errors import ErrorItem, InputValidationError
from ce_engine.layout import Array, Layout
from ce_engine.options import CommonOptions

METRIC_NAMES: tuple[str, ...] = ()


def compute_metrics(
    names: list[str],
    xp: Any,
    rows: Array,
    targets: Array,
    layout: Layout,
    opts: CommonOptions,
    sample_weight: Array | None,
    exclude: Array | None,
) -> dict[str, Any]:
    unknown = [
        ErrorItem(("metrics", i), f"unknown metric {n!r}", "unknown_metric")
        for i, n in enumerate(names)
        if n not in METRIC_NAMES
    ]
    if unknown:
        raise InputValidationError(unknown)
    return {}
