"""Helpers shared by the loss modules (xp-generic).

Softmax numerics live here, once: x = (z − max)/T (:func:`shift_scale`: shift first, then
scale), log Σ exp(x) summed in float64 (:func:`log_sum_exp`), the float64 recomputation of
positions whose float32 loss overflowed in an intermediate (:func:`refine_in_float64`), and the
range checks of probability inputs (:func:`check_probabilities`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from ce_engine.dtypes import is_floating
from ce_engine.errors import InputValidationError
from ce_engine.layout import Array, Layout
from ce_engine.registry import LossInputs, LossTerms


def shift_scale(
    xp: ModuleType, z: Array, temperature: float = 1.0, row_max: Array | None = None
) -> Array:
    """x = (z − m)/T, m = max_c z_c per row (last axis; ``row_max`` when known): shift first,
    then scale.

    Scaling first would overflow: z/T with |z| near the dtype's maximum and T < 1 is ±inf,
    while x ≤ 0 always and its maximum is exactly 0.
    """
    m = xp.max(z, axis=-1, keepdims=True) if row_max is None else row_max[..., None]
    with np.errstate(over="ignore"):  # beyond the dtype: −inf, p = 0 (refine_in_float64)
        x = z - m
        if temperature != 1.0:
            x /= x.dtype.type(temperature)
    return x


def log_sum_exp(xp: ModuleType, x: Array) -> Array:
    """log Σ_c exp(x_c) per row (last axis, kept) of shifted logits x (max 0), in float64.

    exp runs in x's dtype, the sum (in [1, C]) and its log in float64: a float32 sum would
    round 1 + r to float32's spacing at 1, the whole of a confident row's loss r ≪ 1.
    """
    return xp.log(xp.sum(xp.exp(x), axis=-1, keepdims=True, dtype=xp.float64))


def log_softmax(xp: ModuleType, z: Array, temperature: float = 1.0) -> Array:
    """log p = x − log Σ_c exp(x_c), x = (z − max)/T, row-wise over the last axis.

    Rows of −inf only are rejected earlier (see ``ce_engine.api``); a −inf entry gives log p = −inf.
    """
    return log_softmax_lse(xp, z, temperature)[0]


def log_softmax_lse(
    xp: ModuleType, z: Array, temperature: float = 1.0, row_max: Array | None = None
) -> tuple[Array, Array]:
    """(log p in z's dtype, lse = log Σ_c exp(x_c) per row (M,) in float64): see
    :func:`log_softmax`; ``row_max`` (M,) is max_c z_c when known."""
    x = shift_scale(xp, z, temperature, row_max)
    lse = log_sum_exp(xp, x)
    x -= lse.astype(x.dtype)
    return x, lse[..., 0]


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
    with np.errstate(over="ignore"):
        w = np.asarray(weight, dtype=dtype)
    beyond = np.flatnonzero(~np.isfinite(w))  # finite as sent (options), not in float32
    if beyond.size:
        raise InputValidationError.single(
            ("options", "weight", int(beyond[0])),
            f"class weight {weight[int(beyond[0])]} is beyond the range of "
            f"{np.dtype(dtype).name} (the compute dtype): send float64 logits",
        )
    return xp.asarray(w)


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
    """z / T for the elementwise (sigmoid) losses, which have no row maximum to shift by: z/T
    overflows only where σ(z/T) is 0 or 1 anyway. Temperature needs ``input_kind: logits``."""
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


#: How far outside [0, 1] a probability input may lie (rounding) before it is a 422.
PROBABILITY_TOLERANCE = 1e-6


def check_probabilities(inp: LossInputs, distribution: bool) -> None:
    """422 at the first probability input outside [0, 1] by more than
    ``PROBABILITY_TOLERANCE`` and, with ``distribution`` (softmax losses), at the first counted
    position whose probabilities sum to 1 ± more than ``options.sum_tolerance``.

    Inside the range the loss clips to [eps, 1 − eps]; outside it clipping would answer a
    number for an input that is not a probability. NaN is left to ``nan_policy``.
    """
    xp, x, layout = inp.xp, inp.logits, inp.layout
    if not x.size:
        return
    tol = PROBABILITY_TOLERANCE
    if not (float(xp.min(x)) >= -tol and float(xp.max(x)) <= 1.0 + tol):  # NaN: the masks
        reject_first(
            xp,
            (x < -tol) | (x > 1.0 + tol),
            x,
            layout,
            "logits",
            "probability {value} is outside [0, 1] (input_kind 'probabilities')",
            "probability_range",
        )
    if not distribution:
        return
    total = xp.sum(x, axis=-1, dtype=xp.float64)
    off = xp.abs(total - 1.0) > inp.options.sum_tolerance
    if inp.exclude is not None:
        off &= ~inp.exclude
    bad = first_true(xp, off)
    if bad is not None:
        raise InputValidationError.single(
            ("logits", *layout.position(bad)),
            f"the probabilities of this position sum to {float(total[bad])}, not 1 "
            f"(options.sum_tolerance {inp.options.sum_tolerance})",
            "probability_sum",
        )


def input_log_probs(inp: LossInputs) -> tuple[Array, Array | None]:
    """(log p, clipped probabilities or None): log-probabilities of the rows per ``input_kind``.

    Probability inputs are checked first (:func:`check_probabilities`, rows summing to 1).
    """
    xp, z, opts = inp.xp, inp.logits, inp.options
    if opts.input_kind != "logits" and opts.temperature != 1.0:
        raise InputValidationError.single(
            ("options", "temperature"), "temperature applies to input_kind 'logits' only"
        )
    if opts.input_kind == "logits":
        return log_softmax(xp, z, opts.temperature), None
    if opts.input_kind == "log_probabilities":
        return z, None
    check_probabilities(inp, distribution=True)
    clipped = xp.clip(z, opts.eps, 1.0 - opts.eps)
    return xp.log(clipped), clipped


def refine_in_float64(
    inp: LossInputs, terms: LossTerms, targets: Array, loss: Callable[[LossInputs], LossTerms]
) -> LossTerms:
    """With a float32 compute dtype, recompute from float64 logits the positions whose loss
    is not finite, so that an intermediate beyond float32's range (z − m, w·log p near
    ±3.4e38) never turns a loss that is finite in float64 into ±inf. Genuinely non-finite
    losses (mass on a −inf logit) stay so. Only ``per_sample`` changes (float64 there).

    ``targets`` are the loss's targets as rows or positions (M, …) and ``loss`` the loss
    function itself, run on the bad rows alone with the same options.
    """
    xp, per = inp.xp, terms.per_sample
    if inp.logits is None or inp.logits.dtype != np.float32:
        return terms
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(per.sum(dtype=xp.float64))):
            return terms
    bad = xp.nonzero(~xp.isfinite(per))[0]
    if not bad.size:
        return terms
    s, exclude = inp.sample_weight, inp.exclude
    rows = LossInputs(
        xp,
        Layout.of((int(bad.size), inp.layout.num_classes), -1),
        inp.logits[bad].astype(xp.float64),
        targets[bad],
        inp.options,
        None if s is None else s[bad].astype(xp.float64),
        None if exclude is None else exclude[bad],
        frozenset({"loss"}),
    )
    redone = loss(rows)
    per = per.astype(xp.float64)  # copies: the kernels' arrays stay untouched
    per[bad] = redone.per_sample
    extras = {}
    for key, values in terms.per_sample_extras.items():
        extras[key] = values.astype(xp.float64)
        extras[key][bad] = redone.per_sample_extras[key]
    return dataclasses.replace(terms, per_sample=per, per_sample_extras=extras)
