"""Helpers shared by the loss modules (xp-generic)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ce_engine.dtypes import is_floating
from ce_engine.errors import InputValidationError
from ce_engine.layout import Array, Layout


def log_softmax(xp: ModuleType, z: Array, temperature: float = 1.0) -> Array:
    """log p = z/T − max − log Σ exp(z/T − max), row-wise over the last axis.

    Rows of −inf only are rejected earlier (see ``ce_engine.api``); a −inf entry gives log p = −inf.
    """
    zs = z / z.dtype.type(temperature) if temperature != 1.0 else z
    row_max = xp.max(zs, axis=-1, keepdims=True)
    shifted = zs - row_max
    lse = xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))
    shifted -= lse
    return shifted


def times_log(xp: ModuleType, coef: Array, log_p: Array) -> Array:
    """coef · log p with the convention 0 · log 0 = 0 (so −inf entries with no mass give 0)."""
    return xp.where(coef != 0, coef * xp.where(coef != 0, log_p, 0), 0)


def class_weights(
    xp: ModuleType, weight: list[float] | None, num_classes: int, dtype: Any
) -> Array | None:
    """Per-class weight vector w (C,), or None when not given."""
    if weight is None:
        return None
    if len(weight) != num_classes:
        raise InputValidationError.single(
            ("options", "weight"),
            f"weight has {len(weight)} entries but logits have {num_classes} classes",
        )
    return xp.asarray(np.asarray(weight, dtype=dtype))


def resolve_target_format(fmt: str, targets: Array, layout: Layout) -> str:
    """Pick index / probabilities / multi_hot from dtype and shape when ``fmt`` is ``auto``."""
    shape = tuple(targets.shape)
    kind = np.dtype(targets.dtype).kind
    if fmt == "auto":
        if kind in "iu" and shape == layout.positions_shape:
            return "index"
        if kind == "b" and shape == layout.shape:
            return "multi_hot"
        if (kind in "iuf" or is_floating(targets.dtype)) and shape == layout.shape:
            return "probabilities"
        raise InputValidationError.single(
            ("targets",),
            f"cannot infer target_format from targets of dtype {np.dtype(targets.dtype).name} "
            f"and shape {list(shape)}: expected integer class ids of shape "
            f"{list(layout.positions_shape)} or per-class values of the logits' shape "
            f"{list(layout.shape)}",
            "target_format",
        )
    expected = layout.positions_shape if fmt == "index" else layout.shape
    if shape != expected:
        raise InputValidationError.single(
            ("targets",),
            f"target_format {fmt!r} needs targets of shape {list(expected)}, got {list(shape)}",
            "shape_mismatch",
        )
    if fmt == "index" and kind not in "iu":
        raise InputValidationError.single(
            ("targets",),
            f"index targets must be integers, got {np.dtype(targets.dtype).name}",
            "dtype",
        )
    return fmt


def first_true(xp: ModuleType, mask: Array) -> int | None:
    """Flat index of the first True in ``mask``, or None (one device→host sync)."""
    flat = mask.reshape(-1)
    if flat.size == 0 or not bool(flat.any()):
        return None
    return int(xp.argmax(flat))
