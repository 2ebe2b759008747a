"""Validation of a metrics request against the loss, its options and the batch's shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ce_engine.errors import MAX_GUESSES, ErrorItem, InputValidationError, unknown_name
from ce_engine.metrics.catalog import (
    ALL_METRICS,
    LABEL_FREE_METRICS,
    RANKING_METRICS,
    Family,
    metric_family,
    supported_metrics,
)
from ce_engine.metrics.ranking import MAX_RANKING_CELLS


@dataclass(frozen=True)
class MetricRequest:
    """A validated request: names without repeats, the family, top-k values kept (k ≤ C) and
    the decision threshold per label (binary; one value for all labels, or L values)."""

    names: tuple[str, ...]
    family: Family
    top_k: tuple[int, ...]
    threshold: tuple[float, ...]


def _offers(loss: str, options: Any) -> str:
    return f"{loss} offers: {', '.join(supported_metrics(loss, options))}"


def _loss_label(loss: str, options: Any) -> str:
    return f"{loss} (variant {options.variant})" if loss == "focal" else loss


def check_request(
    names: list[str], loss: str, options: Any, fmt: str | None, num_classes: int
) -> MetricRequest:
    """Raise :class:`InputValidationError` listing every problem: unknown metrics, metrics the
    loss does not offer (naming what it offers), label metrics with multi_hot targets, a
    confusion matrix over ``max_confusion_classes``, ranking histograms over
    ``MAX_RANKING_CELLS``, ``top_k`` > C given explicitly, a per-label ``threshold`` of the
    wrong length. ``fmt`` is the softmax target format (None for the binary family)."""
    family = metric_family(loss, options)
    offered = supported_metrics(loss, options)
    errors: list[ErrorItem] = []
    for i, name in enumerate(names):
        loc = ("metrics", i)
        if name not in ALL_METRICS:
            msg = unknown_name("metric", name, offered, guess=len(errors) < MAX_GUESSES)
            errors.append(ErrorItem(loc, msg, "unknown_metric"))
        elif name not in offered:
            errors.append(
                ErrorItem(
                    loc,
                    f"metric {name} is not supported for {_loss_label(loss, options)}; "
                    f"{_offers(loss, options)}",
                    "unsupported_metric",
                )
            )
        elif fmt == "multi_hot" and name not in LABEL_FREE_METRICS:
            errors.append(
                ErrorItem(
                    loc,
                    f"metric {name} needs one label per position; multi_hot targets have "
                    f"several (label-free metrics: {', '.join(sorted(LABEL_FREE_METRICS))})",
                    "unsupported_metric",
                )
            )
        elif (
            name == "confusion_matrix"
            and family == "softmax"
            and num_classes > options.max_confusion_classes
        ):
            errors.append(
                ErrorItem(
                    loc,
                    f"metric confusion_matrix needs C ≤ options.max_confusion_classes "
                    f"({options.max_confusion_classes}), logits have {num_classes} classes",
                    "too_many_classes",
                )
            )
        elif name in RANKING_METRICS and num_classes * options.n_thresholds > MAX_RANKING_CELLS:
            errors.append(
                ErrorItem(
                    loc,
                    f"metric {name} keeps {num_classes} classes × options.n_thresholds "
                    f"({options.n_thresholds}) histogram bins, over {MAX_RANKING_CELLS}; "
                    "lower n_thresholds",
                    "too_many_classes",
                )
            )
    top_k: tuple[int, ...] = ()
    if "top_k_accuracy" in names and family == "softmax":
        explicit = "top_k" in options.model_fields_set
        kept: dict[int, None] = {}  # insertion-ordered set: linear in the list's length
        for j, k in enumerate(options.top_k):
            if k <= num_classes:
                kept[k] = None
            elif explicit:
                errors.append(
                    ErrorItem(
                        ("options", "top_k", j),
                        f"k = {k} exceeds the number of classes ({num_classes})",
                        "top_k_too_large",
                    )
                )
        top_k = tuple(kept)
    threshold: tuple[float, ...] = ()
    if family == "binary":
        raw = options.threshold
        threshold = tuple(float(t) for t in raw) if isinstance(raw, list) else (float(raw),)
        if isinstance(raw, list) and len(raw) != num_classes:
            errors.append(
                ErrorItem(
                    ("options", "threshold"),
                    f"threshold has {len(raw)} entries but logits have {num_classes} labels",
                    "shape_mismatch",
                )
            )
    if errors:
        raise InputValidationError(errors)
    return MetricRequest(tuple(dict.fromkeys(names)), family, top_k, threshold)
