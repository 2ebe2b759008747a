"""Focal loss, sigmoid and softmax variants (Lin et al., "Focal Loss for Dense Object
Detection", 2017).

Reference: ``torchvision.ops.sigmoid_focal_loss`` (sigmoid variant, same defaults α = 0.25,
γ = 2); the softmax variant is the multi-class form −α_t (1 − p_t)^γ log p_t.
"""

from __future__ import annotations

from types import ModuleType

from ce_engine.errors import InputValidationError
from ce_engine.layout import Array
from ce_engine.losses._common import (
    dense_targets,
    index_targets,
    label_rows,
    log_softmax,
    per_class,
    resolve_target_format,
    scaled_logits,
    sigmoid,
    softplus,
    times_log,
)
from ce_engine.options import FocalOptions
from ce_engine.registry import LOGIT_OUTPUTS, LossInputs, LossSpec, LossTerms, register

FORMULA = (
    "sigmoid: ℓ_ic = α_t (1 − p_t)^γ BCE(z_ic, y_ic), p = σ(z), p_t = p y + (1 − p)(1 − y), "
    "α_t = α y + (1 − α)(1 − y);  softmax: ℓ_i = −Σ_c α_c q_ic (1 − p_ic)^γ log p_ic"
)


def _sigmoid_focal(inp: LossInputs, alpha: Array | None) -> tuple[Array, Array, Array, Array]:
    """(element losses, element gradients w.r.t. z/T, p, counted mask); see :func:`focal`."""
    xp, gamma = inp.xp, inp.options.gamma
    y, valid = label_rows(inp)
    z = scaled_logits(inp)
    p, p_neg = sigmoid(xp, z), sigmoid(xp, -z)  # σ(z), 1 − σ(z) without cancellation
    bce = times_log(xp, y, softplus(xp, -z)) + times_log(xp, 1 - y, softplus(xp, z))
    one_minus_pt = p * (1 - y) + p_neg * y
    modulator = one_minus_pt**gamma
    # d(1 − p_t)/dz = σ(z)σ(−z)(1 − 2y); divide by (1 − p_t) to keep (1 − p_t)^(γ−1) finite
    positive = one_minus_pt > 0
    ratio = xp.where(positive, p * p_neg / xp.where(positive, one_minus_pt, 1), 0)
    grad = modulator * (p - y) + times_log(xp, gamma * modulator * ratio * (1 - 2 * y), bce)
    loss = times_log(xp, modulator, bce)
    if alpha is not None:
        alpha_t = alpha * y + (1 - alpha) * (1 - y)
        loss = loss * alpha_t
        grad = grad * alpha_t
    return loss, grad, p, valid


def _softmax_focal(
    inp: LossInputs, alpha: Array | None
) -> tuple[Array, Array, Array, Array, Array]:
    """(row losses, gradients w.r.t. z/T, p, log p, counted mask); see :func:`focal`."""
    xp, gamma, layout = inp.xp, inp.options.gamma, inp.layout
    fmt = resolve_target_format(inp.options.target_format, inp.targets, layout)
    if fmt == "index":
        y, valid = index_targets(inp)
        q = _one_hot(xp, y, layout.num_classes, inp.logits.dtype) * valid[:, None]
    else:
        q, valid = dense_targets(inp, fmt)
    log_p = log_softmax(xp, inp.logits, inp.options.temperature)
    p = xp.exp(log_p)
    one_minus_p = -xp.expm1(log_p)
    modulator = one_minus_p**gamma
    aq = q * alpha if alpha is not None else q
    loss = -xp.sum(times_log(xp, aq * modulator, log_p), axis=-1, dtype=xp.float64)
    # u_c = α_c q_c p_c g'(p_c), g(p) = −(1 − p)^γ log p; p log p / (1 − p) → −1 as p → 1
    positive = one_minus_p > 0
    plogp = times_log(xp, p, log_p)
    ratio = xp.where(positive, plogp / xp.where(positive, one_minus_p, 1), -1)
    u = aq * modulator * (gamma * ratio - 1)
    grad = u - p * xp.sum(u, axis=-1, keepdims=True)
    return loss, grad, p, log_p, valid


def _one_hot(xp: ModuleType, y: Array, num_classes: int, dtype: object) -> Array:
    return (y[:, None] == xp.arange(num_classes)[None, :]).astype(dtype)


def focal(inp: LossInputs) -> LossTerms:
    """Focal loss per position, with its analytic gradient.

    sigmoid (labels y ∈ [0, 1] of the logits' shape, as torchvision ``sigmoid_focal_loss``):
      ℓ_i = Σ_c α_t (1 − p_t)^γ [y softplus(−z) + (1 − y) softplus(z)], p = σ(z),
      p_t = p y + (1 − p)(1 − y), α_t = α y + (1 − α)(1 − y) (α null: α_t = 1);
      ∂/∂z = α_t [(1 − p_t)^γ (p − y) + γ (1 − p_t)^(γ−1) p (1 − p)(1 − 2y)·BCE];
      ``mean`` divides by the number of counted elements (torchvision's ``.mean()``).
    softmax (index or probability targets q): ℓ_i = −Σ_c α_c q_ic (1 − p_ic)^γ log p_ic,
      p = softmax(z / T); with u_c = α_c q_c [γ (1 − p_c)^(γ−1) p_c log p_c − (1 − p_c)^γ],
      ∂ℓ_i/∂z_j = (u_j − p_j Σ_c u_c) / T.
    """
    xp, opts, layout = inp.xp, inp.options, inp.layout
    o: FocalOptions = opts
    dtype = inp.logits.dtype
    c = layout.num_classes
    alpha = per_class(xp, o.alpha, c, dtype, "alpha")
    arrays: dict[str, Array] = {}
    if o.variant == "sigmoid":
        if o.target_format == "index":
            raise InputValidationError.single(
                ("options", "target_format"),
                "the sigmoid variant takes labels of the logits' shape, not class indices",
            )
        el_loss, grad, p, valid = _sigmoid_focal(inp, alpha)
        loss = xp.sum(el_loss, axis=-1, dtype=xp.float64)
        share = dtype.type(c)
        if "log_probabilities" in inp.want:
            arrays["log_probabilities"] = -softplus(xp, -scaled_logits(inp))
    else:
        loss, grad, p, log_p, valid = _softmax_focal(inp, alpha)
        share = dtype.type(1)
        if "log_probabilities" in inp.want:
            arrays["log_probabilities"] = log_p
    scale = valid.astype(dtype)
    if inp.sample_weight is not None:
        scale = scale * inp.sample_weight
    loss = times_log(xp, scale, loss)
    if "probabilities" in inp.want:
        arrays["probabilities"] = p
    if "grad" in inp.want:
        if o.temperature != 1.0:
            grad = grad / dtype.type(o.temperature)
        arrays["grad"] = (grad * scale[:, None]).astype(dtype, copy=False)
    return LossTerms(
        per_sample=loss,
        valid_weight=scale * share,
        valid=valid,
        arrays=arrays,
        predictions_per_position=int(share),  # sigmoid: each label counts
    )


register(
    LossSpec(
        name="focal",
        compute=focal,
        elementwise=lambda options: options.variant == "sigmoid",
        options_model=FocalOptions,
        outputs=LOGIT_OUTPUTS,
        summary="Focal loss: sigmoid (torchvision) or softmax variant, alpha/gamma.",
        formula=FORMULA,
    )
)
