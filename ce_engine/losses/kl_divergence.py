"""Kullback–Leibler divergence KL(q ‖ p) of the model distribution p from the target q.

Reference: ``torch.nn.functional.kl_div(log p, q, reduction="batchmean")`` (``log_target``
for target log-probabilities), ``optax.kl_divergence``.
"""

from __future__ import annotations

import numpy as np

from ce_engine.hessian import SECOND_ORDER, second_order
from ce_engine.layout import Array
from ce_engine.losses._common import (
    dense_targets,
    input_log_probs,
    log_softmax,
    refine_in_float64,
    reject_first,
    resolve_target_format,
    times_log,
)
from ce_engine.options import KLDivergenceOptions
from ce_engine.registry import LOGIT_OUTPUTS, LossInputs, LossSpec, LossTerms, register

FORMULA = (
    "ℓ_i = Σ_c q_ic (log q_ic − log p_ic) = H(q_i, p_i) − H(q_i),  p_i = softmax(z_i / T);  "
    "∂ℓ_i/∂z_ij = (p_ij Σ_c q_ic − q_ij) / T;  H_i = Σ_c q_ic (diag p_i − p_i p_iᵀ) / T²"
)


def _target_distribution(inp: LossInputs) -> tuple[Array, Array, Array]:
    """(q, log q, counted mask) as rows (M, C) per ``target_kind``."""
    xp, layout = inp.xp, inp.layout
    kind = inp.options.target_kind
    resolve_target_format("probabilities", inp.targets, layout)  # shape check
    if kind == "probabilities":
        q, valid = dense_targets(inp, "probabilities")
        return q, xp.log(xp.where(q > 0, q, 1)), valid
    t = layout.to_rows(xp, inp.targets).astype(inp.logits.dtype, copy=False)
    if inp.options.nan_policy == "raise":
        reject_first(
            xp,
            xp.isnan(t) | (t == xp.inf),
            t,
            layout,
            "targets",
            "target is {value}",
            "non_finite",
        )
    log_q = log_softmax(xp, t, inp.options.temperature) if kind == "logits" else t
    valid = xp.ones(layout.num_positions, dtype=bool)
    if inp.exclude is not None:
        valid &= ~inp.exclude
    q = xp.where(valid[:, None], xp.exp(log_q), 0)
    return q, log_q, valid


def kl_divergence(inp: LossInputs) -> LossTerms:
    """KL(q ‖ p) per position, with the decomposition cross-entropy = entropy + KL.

    ℓ_i = Σ_c q_ic (log q_ic − log p_ic) (0·log 0 = 0), q_i from target probabilities, from
    target logits (q = softmax(t / T)) or target log-probabilities; p_i from the logits
    (softmax(z / T)), probabilities (clipped to [eps, 1 − eps]) or log-probabilities.
    Gradients: (p Σq − q)/T for logits, −q for log-probabilities, −q/x for probabilities.
    Hessian: Σq (diag p − p pᵀ)/T² for logits, diag(q/x²) for probabilities, 0 for
    log-probabilities. ``extras``: ``entropy`` = −Σ q log q and ``cross_entropy`` = −Σ q log p,
    reduced like the loss (sums for ``sum`` and ``none``), so cross_entropy = entropy + value.
    Numerics: softmax((z − max)/T) (shift, then scale), row sums in float64; with a float32
    compute dtype, positions whose KL is not finite are recomputed from float64 logits
    (``_common.refine_in_float64``). ``reduction: mean`` divides by the counted positions
    (PyTorch's ``mean`` divides by N·C).
    """
    terms = _kl_divergence(inp)
    rows = inp.layout.to_rows(inp.xp, inp.targets)
    return refine_in_float64(inp, terms, rows, _kl_divergence)


def _kl_divergence(inp: LossInputs) -> LossTerms:
    """:func:`kl_divergence` in the compute dtype (row sums in float64)."""
    xp, opts, layout = inp.xp, inp.options, inp.layout
    o: KLDivergenceOptions = opts
    dtype = inp.logits.dtype
    f64 = xp.float64
    q, log_q, valid = _target_distribution(inp)
    log_p, clipped = input_log_probs(inp)
    log_q = xp.where(q > 0, log_q, 0)  # 0·log 0 = 0, and no −inf − (−inf)
    entropy = -xp.sum(q * log_q, axis=-1, dtype=f64)
    cross = -xp.sum(times_log(xp, q, log_p), axis=-1, dtype=f64)
    with np.errstate(over="ignore"):  # beyond the dtype: refine_in_float64 redoes the row
        kl = xp.sum(times_log(xp, q, log_q - log_p), axis=-1, dtype=f64)  # not H(q,p) − H(q)
    scale = valid.astype(dtype)
    if inp.sample_weight is not None:
        scale = scale * inp.sample_weight
    entropy, cross = times_log(xp, scale, entropy), times_log(xp, scale, cross)
    loss = times_log(xp, scale, kl)
    arrays: dict[str, Array] = {}
    p = xp.exp(log_p) if o.input_kind == "logits" else None
    if "probabilities" in inp.want:
        arrays["probabilities"] = p if p is not None else xp.exp(log_p)
    if "log_probabilities" in inp.want:
        arrays["log_probabilities"] = log_p
    if "grad" in inp.want:
        arrays["grad"] = _grad(inp, q, p, clipped, scale)
    if inp.want & {"hessian", "hessian_diag", "hvp"}:
        if p is not None:
            t = dtype.type(o.temperature)
            mass = xp.sum(q, axis=-1) * scale / t / t  # not T²: it under/overflows first
            arrays.update(second_order(xp, inp.want, layout, inp.vector, p=p, scale=mass))
        else:
            diag = xp.zeros_like(q)
            if clipped is not None:
                inside = (inp.logits > o.eps) & (inp.logits < 1.0 - o.eps)
                diag = xp.where(inside, q / (clipped * clipped), 0) * scale[:, None]
            arrays.update(second_order(xp, inp.want, layout, inp.vector, diag=diag))
    return LossTerms(
        per_sample=loss,
        valid_weight=scale,
        valid=valid,
        arrays=arrays,
        per_sample_extras={"entropy": entropy, "cross_entropy": cross},
    )


def _grad(inp: LossInputs, q: Array, p: Array | None, clipped: Array | None, scale: Array) -> Array:
    xp, o = inp.xp, inp.options
    if p is not None:
        grad = p * xp.sum(q, axis=-1, keepdims=True) - q
        if o.temperature != 1.0:
            grad /= p.dtype.type(o.temperature)
    elif clipped is not None:
        inside = (inp.logits > o.eps) & (inp.logits < 1.0 - o.eps)
        grad = xp.where(inside, -q / clipped, 0)
    else:
        grad = -q
    return (grad * scale[:, None]).astype(inp.logits.dtype, copy=False)


register(
    LossSpec(
        name="kl_divergence",
        compute=kl_divergence,
        options_model=KLDivergenceOptions,
        outputs=LOGIT_OUTPUTS | SECOND_ORDER,
        summary="KL(q ‖ p) from target probabilities, logits or log-probabilities.",
        formula=FORMULA,
    )
)
