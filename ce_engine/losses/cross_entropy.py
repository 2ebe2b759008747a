"""Softmax cross-entropy (sparse, dense and multi-hot targets).

Reference: ``torch.nn.functional.cross_entropy`` (weight, ignore_index, label_smoothing),
``optax.softmax_cross_entropy``.
"""

from __future__ import annotations

from ce_engine.hessian import SECOND_ORDER, second_order
from ce_engine.kernels.dispatch import fast_index_cross_entropy
from ce_engine.layout import Array
from ce_engine.losses._common import (
    class_weights,
    dense_targets,
    index_targets,
    input_log_probs,
    resolve_target_format,
    times_log,
)
from ce_engine.options import CrossEntropyOptions
from ce_engine.registry import LOGIT_OUTPUTS, LossInputs, LossSpec, LossTerms, register

FORMULA = (
    "ℓ_i = −Σ_c w_c q_ic log p_ic,  p_i = softmax(z_i / T),  q ← (1 − ε)·q + ε/C;  "
    "∂ℓ_i/∂z_ij = (p_ij Σ_c w_c q_ic − w_j q_ij) / T"
)


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
        y, valid = index_targets(inp)
        fast = fast_index_cross_entropy(inp, y, valid)
        if fast is not None:  # fused kernel (logits input, float32 compute)
            return fast
    log_p, clipped = input_log_probs(inp)
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
        q, valid = dense_targets(inp, fmt)
        if eps_ls:
            q = xp.where(valid[:, None], (1.0 - eps_ls) * q + eps_ls / c, 0)
        wq = q * w if w is not None else q
        loss = xp.sum(times_log(xp, -wq, log_p), axis=-1)
        valid_weight = valid.astype(dtype)
        q_mass = xp.sum(wq, axis=-1)
        y = rows = None

    if s is not None:
        loss = xp.where(s != 0, loss, 0) * s  # weight 0 counts 0, also against ℓ = ∞
        valid_weight = valid_weight * s
    arrays: dict[str, Array] = {}
    need_p = bool(inp.want & {"grad", "probabilities", *SECOND_ORDER})
    p = xp.exp(log_p) if need_p else None
    if "probabilities" in inp.want:
        arrays["probabilities"] = p
    if "log_probabilities" in inp.want:
        arrays["log_probabilities"] = log_p
    if "grad" in inp.want:
        arrays["grad"] = _grad(inp, p, clipped, q_mass, w, wq, y, rows, valid)
    if inp.want & SECOND_ORDER:
        if opts.input_kind == "logits":
            scale = q_mass * s if s is not None else q_mass
            scale = scale / dtype.type(opts.temperature**2)
            arrays.update(second_order(xp, inp.want, layout, inp.vector, p=p, scale=scale))
        else:
            diag = xp.zeros_like(inp.logits)  # log-probabilities: ℓ is linear in the input
            if clipped is not None:
                if wq is None:
                    wq = _dense_wq(inp, w, y, rows, valid)
                inside = (inp.logits > opts.eps) & (inp.logits < 1.0 - opts.eps)
                diag = xp.where(inside, wq / (clipped * clipped), 0)
                if s is not None:
                    diag *= s[:, None]
            arrays.update(second_order(xp, inp.want, layout, inp.vector, diag=diag))
    return LossTerms(per_sample=loss, valid_weight=valid_weight, valid=valid, arrays=arrays)


def _dense_wq(inp: LossInputs, w: Array | None, y: Array, rows: Array, valid: Array) -> Array:
    """w_c q_ic as (M, C) for index targets (smoothed; 0 on rows not counted)."""
    xp, c, dtype = inp.xp, inp.layout.num_classes, inp.logits.dtype
    eps_ls = inp.options.label_smoothing
    wq = xp.zeros_like(inp.logits)
    if eps_ls:
        wq += (eps_ls / c) * (w if w is not None else xp.ones(c, dtype))
    w_y = w[y] if w is not None else xp.ones(y.shape, dtype)
    wq[rows, y] += (1.0 - eps_ls) * w_y
    wq *= valid[:, None]
    return wq


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
            wq = _dense_wq(inp, w, y, rows, valid)
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
        outputs=LOGIT_OUTPUTS | SECOND_ORDER,
        summary="Softmax cross-entropy with index, probability or multi-hot targets.",
        formula=FORMULA,
    )
)
