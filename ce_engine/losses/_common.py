"""Helpers shared by the loss modules (xp-generic)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ce_engine.dtypes import is_floating
from ce_engine.errors import InputValidationError
from ce_engine.layout import Array, Layout
from ce_engine.registry import LossInputs


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


def reject_first(
    xp: ModuleType, mask: Array, values: Array, layout: Layout, field: str, msg: str, type_: str
) -> None:
    """422 at the first True of an (M, C) ``mask``, located in ``field`` (logits' layout).

    ``msg`` may use ``{value}``: the offending entry of ``values``.
    """
    bad = first_true(xp, mask)
    if bad is None:
        return
    row, cls = divmod(bad, layout.num_classes)
    raise InputValidationError.single(
        (field, *layout.element(row, cls)), msg.format(value=float(values[row, cls])), type_
    )


def index_targets(inp: LossInputs) -> tuple[Array, Array]:
    """Validated class ids (M,) with ignored positions set to 0, and the counted mask (M,).

    The ids may be a view of the caller's targets: read them, never write into them.
    """
    xp, layout, opts = inp.xp, inp.layout, inp.options
    y = layout.to_positions(inp.targets).astype(xp.int64, copy=False)
    c = layout.num_classes
    ignore = opts.ignore_index
    in_range_ignore = ignore is not None and 0 <= ignore < c
    # every id a class and none can be ignore_index: all count, no masks needed
    clean = not in_range_ignore and bool(y.size) and int(y.min()) >= 0 and int(y.max()) < c
    if clean:
        valid = xp.ones(y.shape, dtype=bool)
    else:
        ignored = (y == ignore) if ignore is not None else xp.zeros(y.shape, bool)
        bad = first_true(xp, ~ignored & ((y < 0) | (y >= c)))
        if bad is not None:
            raise InputValidationError.single(
                ("targets", *layout.position(bad)),
                f"class index {int(y[bad])} is out of range [0, {c})"
                + (f" and is not ignore_index ({ignore})" if ignore is not None else ""),
                "class_index_out_of_range",
            )
        valid = ~ignored
    return _counted(xp, y, valid, inp.exclude, clean)


def _counted(
    xp: ModuleType, y: Array, valid: Array, exclude: Array | None, clean: bool
) -> tuple[Array, Array]:
    """(targets with the positions not counted set to 0, counted mask (M,)): ``valid`` less
    ``exclude``. ``clean`` (every position valid) returns ``y`` as is when none is excluded."""
    if exclude is not None:
        valid = valid & ~exclude
    elif clean:
        return y, valid
    return xp.where(valid if y.ndim == 1 else valid[:, None], y, 0), valid


def dense_targets(inp: LossInputs, fmt: str) -> tuple[Array, Array]:
    """Target distributions q (M, C) before smoothing, and the counted mask (M,)."""
    xp, layout = inp.xp, inp.layout
    q = layout.to_rows(inp.xp, inp.targets).astype(inp.logits.dtype, copy=False)
    check_nan = inp.options.nan_policy == "raise"
    if check_nan:
        reject_first(xp, ~xp.isfinite(q), q, layout, "targets", "target is {value}", "non_finite")
    reject_first(xp, q < 0, q, layout, "targets", "targets must be >= 0", "negative_target")
    valid = xp.ones(layout.num_positions, dtype=bool)
    if fmt == "multi_hot":
        reject_first(
            xp,
            (q != 0) & (q != 1),
            q,
            layout,
            "targets",
            "multi_hot targets must be 0 or 1, got {value}",
            "multi_hot",
        )
        positives = xp.sum(q, axis=-1)
        valid = positives > 0
        q = q / xp.maximum(positives, 1)[:, None]
    else:
        valid &= ~xp.isnan(q).any(axis=-1)  # nan_policy="omit" drops rows with a NaN target
    if inp.exclude is not None:
        valid &= ~inp.exclude
    return xp.where(valid[:, None], q, 0), valid


def softplus(xp: ModuleType, x: Array) -> Array:
    """log(1 + eˣ) = max(x, 0) + log1p(e^−|x|): finite for any finite x, 0 at −inf."""
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def sigmoid(xp: ModuleType, x: Array) -> Array:
    """σ(x) = exp(−softplus(−x)) (no overflow at any magnitude)."""
    return xp.exp(-softplus(xp, -x))


def scaled_logits(inp: LossInputs) -> Array:
    """z / T; temperature is only meaningful for ``input_kind: logits``."""
    opts = inp.options
    if opts.input_kind != "logits" and opts.temperature != 1.0:
        raise InputValidationError.single(
            ("options", "temperature"), "temperature applies to input_kind 'logits' only"
        )
    z = inp.logits
    return z / z.dtype.type(opts.temperature) if opts.temperature != 1.0 else z


def per_class(
    xp: ModuleType, value: float | list[float] | None, num_classes: int, dtype: Any, loc: str
) -> Array | None:
    """A number or a (C,) list as an array broadcastable over rows (M, C); None stays None."""
    if value is None:
        return None
    if isinstance(value, list) and len(value) != num_classes:
        raise InputValidationError.single(
            ("options", loc),
            f"{loc} has {len(value)} entries but logits have {num_classes} classes",
        )
    return xp.asarray(np.asarray(value, dtype=dtype))


def element_weights(
    xp: ModuleType, weight: list[Any] | None, layout: Layout, dtype: Any
) -> Array | None:
    """Element weights of shape (C,) or the logits' shape, as (C,) or rows (M, C)."""
    if weight is None:
        return None
    try:
        w = np.asarray(weight, dtype=dtype)
    except (ValueError, TypeError):
        raise InputValidationError.single(
            ("options", "weight"), "weight must be a rectangular array of numbers"
        ) from None
    if w.shape == (layout.num_classes,):
        out = w
    elif w.shape == layout.shape:
        out = layout.to_rows(np, w)
    else:
        raise InputValidationError.single(
            ("options", "weight"),
            f"weight must have shape [{layout.num_classes}] or the logits' shape "
            f"{list(layout.shape)}, got {list(w.shape)}",
            "shape_mismatch",
        )
    if not bool(np.all(np.isfinite(out) & (out >= 0))):
        raise InputValidationError.single(("options", "weight"), "weights must be finite and >= 0")
    return xp.asarray(out)


def label_rows(inp: LossInputs) -> tuple[Array, Array]:
    """Per-class labels y ∈ [0, 1] of the logits' shape as rows (M, C), and the counted mask.

    The labels may be a view of the caller's targets: read them, never write into them.
    """
    xp, layout = inp.xp, inp.layout
    if tuple(inp.targets.shape) != layout.shape:
        raise InputValidationError.single(
            ("targets",),
            f"targets must have the logits' shape {list(layout.shape)}, "
            f"got {list(inp.targets.shape)}",
            "shape_mismatch",
        )
    y = layout.to_rows(xp, inp.targets).astype(inp.logits.dtype, copy=False)
    # no NaN and all in range (min/max are NaN when any label is): no masks needed
    clean = bool(y.size) and float(y.min()) >= 0 and float(y.max()) <= 1
    valid = xp.ones(layout.num_positions, dtype=bool)
    if not clean:
        nan = xp.isnan(y)
        if inp.options.nan_policy == "raise":
            reject_first(xp, nan, y, layout, "targets", "target is NaN", "non_finite")
        reject_first(
            xp,
            (y < 0) | (y > 1),
            y,
            layout,
            "targets",
            "labels must lie in [0, 1], got {value}",
            "label_range",
        )
        if inp.options.nan_policy == "omit":
            valid = ~nan.any(axis=-1)
    return _counted(xp, y, valid, inp.exclude, clean)


def input_log_probs(inp: LossInputs) -> tuple[Array, Array | None]:
    """(log p, clipped probabilities or None): log-probabilities of the rows per ``input_kind``."""
    xp, z, opts = inp.xp, inp.logits, inp.options
    if opts.input_kind != "logits" and opts.temperature != 1.0:
        raise InputValidationError.single(
            ("options", "temperature"), "temperature applies to input_kind 'logits' only"
        )
    if opts.input_kind == "logits":
        return log_softmax(xp, z, opts.temperature), None
    if opts.input_kind == "log_probabilities":
        return z, None
    clipped = xp.clip(z, opts.eps, 1.0 - opts.eps)
    return xp.log(clipped), clipped
