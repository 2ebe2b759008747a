"""Softmax cross-entropy (sparse, dense and multi-hot targets).

Reference: ``torch.nn.functional.cross_entropy`` (weight, ignore_index, label_smoothing),
``optax.softmax_cross_entropy``.
"""

from __future__ import annotations

from ce_engine.errors import InputValidationError
from ce_engine.kernels.dispatch import fast_index_cross_entropy
from ce_engine.layout import Array
from ce_engine.losses._common import (
    class_weights,
    first_true,
    log_softmax,
    resolve_target_format,
    times_log,
)
from ce_engine.options import CrossEntropyOptions
from ce_engine.registry import LossInputs, LossSpec, LossTerms, register

FORMULA = (
    "ℓ_i = −Σ_c w_c q_ic log p_ic,  p_i = softmax(z_i / T),  q ← (1 − ε)·q + ε/C;  "
    "∂ℓ_i/∂z_ij = (p_ij Σ_c w_c q_ic − w_j q_ij) / T"
)


def _log_probs(inp: LossInputs) -> tuple[Array, Array]:
    """(log p, ∂ log p-input factor): log-probabilities of the rows per ``input_kind``."""
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


def _index_targets(inp: LossInputs) -> tuple[Array, Array]:
    """Validated class ids (M,) with ignored positions set to 0, and the counted mask (M,)."""
    xp, layout, opts = inp.xp, inp.layout, inp.options
    y = layout.to_positions(inp.targets).astype(xp.int64, copy=False)
    c = layout.num_classes
    ignored = (y == opts.ignore_index) if opts.ignore_index is not None else xp.zeros(y.shape, bool)
    bad = first_true(xp, ~ignored & ((y < 0) | (y >= c)))
    if bad is not None:
        raise InputValidationError.single(
            ("targets", *layout.position(bad)),
            f"class index {int(y[bad])} is out of range [0, {c})"
            + (
                f" and is not ignore_index ({opts.ignore_index})"
                if opts.ignore_index is not None
                else ""
            ),
            "class_index_out_of_range",
        )
    valid = ~ignored
    if inp.exclude is not None:
        valid &= ~inp.exclude
    return xp.where(valid, y, 0), valid


def _dense_targets(inp: LossInputs, fmt: str) -> tuple[Array, Array]:
    """Target distributions q (M, C) before smoothing, and the counted mask (M,)."""
    xp, layout = inp.xp, inp.layout
    q = layout.to_rows(inp.xp, inp.targets).astype(inp.logits.dtype, copy=False)
    check_nan = inp.options.nan_policy == "raise"
    bad = first_true(xp, xp.isnan(q) | xp.isinf(q)) if check_nan else None
    if bad is not None:
        row, cls = divmod(bad, layout.num_classes)
        raise InputValidationError.single(
            ("targets", *layout.element(row, cls)), "target is NaN or infinite", "non_finite"
        )
    bad = first_true(xp, q < 0)
    if bad is not None:
        row, cls = divmod(bad, layout.num_classes)
        raise InputValidationError.single(
            ("targets", *layout.element(row, cls)), "targets must be >= 0", "negative_target"
        )
    valid = xp.ones(layout.num_positions, dtype=bool)
    if fmt == "multi_hot":
        bad = first_true(xp, (q != 0) & (q != 1))
        if bad is not None:
            row, cls = divmod(bad, layout.num_classes)
            raise InputValidationError.single(
                ("targets", *layout.element(row, cls)),
                "multi_hot targets must be 0 or 1",
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


def cross_entropy(inp: LossInputs) -> LossTerms:
    """Softmax cross-entropy per position.

    ℓ_i = −Σ_c w_c q_ic log p_ic with p_i = softmax(z_i / T) (or the given (log-)probabilities),
    q_i = one-hot(y_i) | given distribution | y_i / Σ y_i (multi-hot), smoothed to (1 − ε)q + ε/C.
    ∂ℓ_i/∂z_ij = (p_ij Σ_c w_c q_ic − w_j q_ij) / T for logits; −w_j q_ij / p_ij for
    probabilities (0 where clipped); −w_j q_ij for log-probabilities.
    The ``valid`` denominator is Σ_i s_i w_{y_i} for index targets, Σ_i s_i over counted rows
    otherwise (PyTorch).
    """
    xp, opts, layout = inp.xp, inp.options, inp.layout
    opts_ce: CrossEntropyOptions = opts
    dtype = inp.logits.dtype
    c = layout.num_classes
    eps_ls = opts_ce.label_smoothing
    w = class_weights(xp, opts_ce.weight, c, dtype)
    fmt = resolve_target_format(opts_ce.target_format, inp.targets, layout)
    if fmt == "index":
        y, valid = _index_targets(inp)
        fast = fast_index_cross_entropy(inp, y, valid)
        if fast is not None:  # fused kernel (logits input, float32 compute)
            return fast
    log_p, clipped = _log_probs(inp)
    s = inp.sample_weight

    if fmt == "index":
        rows = xp.arange(layout.num_positions)
        w_y = w[y] if w is not None else xp.ones(y.shape, dtype)
        w_y = xp.where(valid, w_y, 0).astype(dtype, copy=False)
        loss = times_log(xp, -w_y, log_p[rows, y])
        if eps_ls:
            smooth = xp.sum(
                times_log(xp, -w if w is not None else -xp.ones(c, dtype), log_p), axis=-1
            )
            loss = (1.0 - eps_ls) * loss + (eps_ls / c) * xp.where(valid, smooth, 0)
        valid_weight = w_y
        wq = None  # built only where needed (see _grad)
        q_mass = (1.0 - eps_ls) * w_y + (
            (eps_ls / c) * (float(w.sum()) if w is not None else float(c))
        ) * valid.astype(dtype)
    else:
        q, valid = _dense_targets(inp, fmt)
        if eps_ls:
            q = xp.where(valid[:, None], (1.0 - eps_ls) * q + eps_ls / c, 0)
        wq = q * w if w is not None else q
        loss = xp.sum(times_log(xp, -wq, log_p), axis=-1)
        valid_weight = valid.astype(dtype)
        q_mass = xp.sum(wq, axis=-1)
        y = rows = None

    if s is not None:
        loss = loss * s
        valid_weight = valid_weight * s
    arrays: dict[str, Array] = {}
    need_p = bool(inp.want & {"grad", "probabilities"})
    p = xp.exp(log_p) if need_p else None
    if "probabilities" in inp.want:
        arrays["probabilities"] = p
    if "log_probabilities" in inp.want:
        arrays["log_probabilities"] = log_p
    if "grad" in inp.want:
        arrays["grad"] = _grad(inp, p, clipped, q_mass, w, wq, y, rows, valid)
    return LossTerms(per_sample=loss, valid_weight=valid_weight, valid=valid, arrays=arrays)


def _grad(
    inp: LossInputs,
    p: Array,
    clipped: Array | None,
    q_mass: Array,
    w: Array | None,
    wq: Array | None,
    y: Array,
    rows: Array,
    valid: Array,
) -> Array:
    """∂ Σ_i s_i ℓ_i / ∂ input (see :func:`cross_entropy`)."""
    xp, opts, c = inp.xp, inp.options, inp.layout.num_classes
    dtype = inp.logits.dtype
    eps_ls = opts.label_smoothing
    if wq is None and opts.input_kind == "logits":
        # index targets: p·Σw q − w q without materialising q (one (M, C) array in all)
        grad = p * q_mass[:, None]
        if eps_ls:
            grad -= (eps_ls / c) * (w if w is not None else xp.ones(c, dtype)) * valid[:, None]
        w_y = w[y] if w is not None else xp.ones(y.shape, dtype)
        grad[rows, y] -= (1.0 - eps_ls) * xp.where(valid, w_y, 0)
        if opts.temperature != 1.0:
            grad /= dtype.type(opts.temperature)
    else:
        if wq is None:
            wq = xp.zeros_like(inp.logits)
            if eps_ls:
                wq += (eps_ls / c) * (w if w is not None else xp.ones(c, dtype))
            w_y = w[y] if w is not None else xp.ones(y.shape, dtype)
            wq[rows, y] += (1.0 - eps_ls) * w_y
            wq *= valid[:, None]
        if opts.input_kind == "logits":
            grad = p * q_mass[:, None] - wq
            if opts.temperature != 1.0:
                grad /= dtype.type(opts.temperature)
        elif opts.input_kind == "log_probabilities":
            grad = -wq
        else:
            inside = (inp.logits > opts.eps) & (inp.logits < 1.0 - opts.eps)
            grad = xp.where(inside, -wq / clipped, 0)
    if inp.sample_weight is not None:
        grad *= inp.sample_weight[:, None]
    return grad.astype(dtype, copy=False)


register(
    LossSpec(
        name="cross_entropy",
        compute=cross_entropy,
        options_model=CrossEntropyOptions,
        outputs=frozenset({"loss", "per_sample", "grad", "probabilities", "log_probabilities"}),
        summary="Softmax cross-entropy with index, probability or multi-hot targets.",
        formula=FORMULA,
    )
)
