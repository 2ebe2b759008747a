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
    log_softmax_lse,
    refine_in_float64,
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

    Numerics: log p = x − lse with x = (z − max)/T and lse summed in float64
    (``_common.log_sum_exp``); per-position losses and weights are float64 sums, the target
    term of index targets lse_i − x_iy is taken in float64 from z_iy − m_i, and each weight is
    multiplied into its term before summing (ε/C·w_c·log p_c, never w_c·log p_c first). With a
    float32 compute dtype, positions whose loss still comes out non-finite (an intermediate
    beyond float32, e.g. z − m for |z| near 3.4e38) are recomputed from float64 logits.
    """
    fmt = resolve_target_format(inp.options.target_format, inp.targets, inp.layout)
    # one check of the class weights (count, range of the compute dtype) for every path
    class_weights(inp.xp, inp.options.weight, inp.layout.num_classes, inp.logits.dtype)
    if fmt == "index":
        y, valid = index_targets(inp)
        fast = fast_index_cross_entropy(inp, y, valid)
        terms = fast if fast is not None else _generic(inp, fmt, y, valid)
        targets = y
    else:
        terms = _generic(inp, fmt, None, None)
        targets = inp.layout.to_rows(inp.xp, inp.targets)
    return refine_in_float64(inp, terms, targets, cross_entropy)


def _generic(inp: LossInputs, fmt: str, y: Array | None, valid: Array | None) -> LossTerms:
    """:func:`cross_entropy` in xp-generic code (any backend, dtype, input kind, targets)."""
    xp, opts, layout = inp.xp, inp.options, inp.layout
    opts_ce: CrossEntropyOptions = opts
    dtype = inp.logits.dtype
    f64 = xp.float64
    c = layout.num_classes
    eps_ls = opts_ce.label_smoothing
    w = class_weights(xp, opts_ce.weight, c, dtype)
    z = inp.logits
    m = lse = None
    if opts.input_kind == "logits":
        m = xp.max(z, axis=-1) if inp.row_max is None else inp.row_max
        log_p, lse = log_softmax_lse(xp, z, opts.temperature, m)
        clipped = None
    else:
        log_p, clipped = input_log_probs(inp)
    s = inp.sample_weight

    p_target = None
    if y is not None and valid is not None:
        rows = xp.arange(layout.num_positions)
        w_y = w[y] if w is not None else xp.ones(y.shape, dtype)
        w_y = xp.where(valid, w_y, 0).astype(dtype, copy=False)
        if lse is not None and m is not None:  # −log p_y = lse − x_y in float64 from z_y − m
            x_y = z[rows, y].astype(f64) - m.astype(f64)
            if opts.temperature != 1.0:
                x_y /= opts.temperature
            target_nll = lse - x_y
            p_target = xp.exp(-target_nll)
        else:
            target_nll = -log_p[rows, y].astype(f64)
        loss = xp.where(w_y != 0, w_y.astype(f64) * target_nll, 0)
        if eps_ls:
            coef = (eps_ls / c) * (w if w is not None else xp.ones(c, dtype))
            smooth = -xp.sum(times_log(xp, coef.astype(dtype), log_p), axis=-1, dtype=f64)
            loss = (1.0 - eps_ls) * loss + xp.where(valid, smooth, 0)
        valid_weight = w_y.astype(f64)
        wq = None  # built only where needed (see _grad)
        q_mass = (1.0 - eps_ls) * w_y
        if eps_ls:
            w_total = float(w.sum(dtype=f64)) if w is not None else float(c)
            q_mass = q_mass + (eps_ls / c) * w_total * valid.astype(dtype)
    else:
        q, valid = dense_targets(inp, fmt)
        if eps_ls:
            q = xp.where(valid[:, None], (1.0 - eps_ls) * q + eps_ls / c, 0)
        wq = q * w if w is not None else q
        loss = -xp.sum(times_log(xp, wq, log_p), axis=-1, dtype=f64)
        valid_weight = valid.astype(f64)
        q_mass = xp.sum(wq, axis=-1)
        rows = None

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
        arrays["grad"] = _grad(inp, p, clipped, q_mass, w, wq, y, rows, valid, p_target)
    if inp.want & SECOND_ORDER:
        if opts.input_kind == "logits":
            scale = q_mass * s if s is not None else q_mass
            scale = scale / dtype.type(opts.temperature) / dtype.type(opts.temperature)
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
    p_target: Array | None = None,
) -> Array:
    """∂ Σ_i s_i ℓ_i / ∂ input (see :func:`cross_entropy`); ``p_target`` (M,) float64 p_iy of
    index targets gives their entries without float32's cancellation in p_iy − 1."""
    xp, opts, c = inp.xp, inp.options, inp.layout.num_classes
    dtype = inp.logits.dtype
    eps_ls = opts.label_smoothing
    if wq is None and opts.input_kind == "logits":
        # index targets: p·Σw q − w q without materialising q (one (M, C) array in all)
        grad = p * q_mass[:, None]
        if eps_ls:
            grad -= (eps_ls / c) * (w if w is not None else xp.ones(c, dtype)) * valid[:, None]
        w_y = xp.where(valid, w[y] if w is not None else xp.ones(y.shape, dtype), 0)
        if p_target is None:
            grad[rows, y] -= (1.0 - eps_ls) * w_y
        else:  # q_mass·p_y − (ε/C)·w_y − (1 − ε)·w_y, in float64
            grad[rows, y] = q_mass * p_target - ((1.0 - eps_ls) + eps_ls / c) * w_y
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
