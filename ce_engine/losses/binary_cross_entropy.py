"""Sigmoid (multi-label) binary cross-entropy.

Reference: ``torch.nn.functional.binary_cross_entropy_with_logits`` (weight, pos_weight),
``optax.sigmoid_binary_cross_entropy``.
"""

from __future__ import annotations

from ce_engine.hessian import SECOND_ORDER, second_order
from ce_engine.kernels.dispatch import fast_binary_cross_entropy
from ce_engine.losses._common import (
    check_probabilities,
    element_weights,
    label_rows,
    per_class,
    scaled_logits,
    sigmoid,
    softplus,
    times_log,
)
from ce_engine.options import BinaryCrossEntropyOptions
from ce_engine.registry import LOGIT_OUTPUTS, LossInputs, LossSpec, LossTerms, register

FORMULA = (
    "ℓ_ic = w_ic [pw_c y_ic softplus(−z_ic) + (1 − y_ic) softplus(z_ic)] "
    "= w_ic [(1 − y)·z + (1 + (pw − 1)·y)·softplus(−z)],  y ← (1 − ε)·y + ε/2;  "
    "∂ℓ/∂z = w [(1 − y) σ(z) − pw y σ(−z)];  ∂²ℓ/∂z² = w (pw y + 1 − y) σ(z) σ(−z)"
)


def binary_cross_entropy(inp: LossInputs) -> LossTerms:
    """Sigmoid binary cross-entropy, summed over the C labels of each position.

    ℓ_i = Σ_c w_ic [pw_c y_ic softplus(−z_ic) + (1 − y_ic) softplus(z_ic)] with z = logits / T,
    labels y ∈ [0, 1] of the logits' shape smoothed to (1 − ε)y + ε/2, ``pos_weight`` pw over
    the class axis and element weights w ((C,) or the logits' shape). The two-softplus form
    equals (1 − y)·z + (1 + (pw − 1)·y)·softplus(−z) and stays finite for any finite z.
    Probability inputs x ∈ [0, 1] (else 422; clipped to [eps, 1 − eps]):
    ℓ = −w [pw y log x + (1 − y) log(1 − x)].
    ``mean`` with ``valid`` divides by the number of counted elements Σ_i s_i·C (PyTorch's
    mean over all elements), and ``count`` is the number of counted elements (labels).
    """
    xp, opts, layout = inp.xp, inp.options, inp.layout
    o: BinaryCrossEntropyOptions = opts
    dtype = inp.logits.dtype
    c = layout.num_classes
    y, valid = label_rows(inp)
    if o.label_smoothing:
        y = xp.where(valid[:, None], y * (1.0 - o.label_smoothing) + o.label_smoothing / 2, 0)
    w = element_weights(xp, o.weight, layout, dtype)
    pw = per_class(xp, o.pos_weight, c, dtype, "pos_weight")
    scale = valid.astype(dtype)
    if inp.sample_weight is not None:
        scale = scale * inp.sample_weight
    el_scale = scale[:, None] * w if w is not None else scale[:, None]
    valid_weight = scale * dtype.type(c)
    fast = fast_binary_cross_entropy(inp, y, el_scale, pw)
    if fast is not None:  # fused kernel (NumPy, logits input, float32 compute)
        return LossTerms(
            per_sample=fast.per_sample,
            valid_weight=valid_weight,
            valid=valid,
            arrays=fast.arrays,
            predictions_per_position=c,
        )
    pos = y * pw if pw is not None else y  # pw·y
    neg = 1 - y
    z = scaled_logits(inp)
    arrays = {}
    if o.input_kind == "logits":
        log_p, log_1mp = -softplus(xp, -z), -softplus(xp, z)
        loss_el = -(times_log(xp, pos, log_p) + times_log(xp, neg, log_1mp))
    else:
        check_probabilities(inp, distribution=False)
        x = xp.clip(z, o.eps, 1.0 - o.eps)
        inside = (z > o.eps) & (z < 1.0 - o.eps)
        log_p, log_1mp = xp.log(x), xp.log1p(-x)
        loss_el = -(pos * log_p + neg * log_1mp)
    loss = xp.sum(
        times_log(xp, xp.broadcast_to(el_scale, loss_el.shape), loss_el), axis=-1, dtype=xp.float64
    )

    if "probabilities" in inp.want:
        arrays["probabilities"] = sigmoid(xp, z) if o.input_kind == "logits" else x
    if "log_probabilities" in inp.want:
        arrays["log_probabilities"] = log_p
    if "grad" in inp.want:
        if o.input_kind == "logits":
            g = neg * sigmoid(xp, z) - pos * sigmoid(xp, -z)
            if opts.temperature != 1.0:
                g /= dtype.type(opts.temperature)
        else:
            g = xp.where(inside, neg / (1 - x) - pos / x, 0)
        arrays["grad"] = (g * el_scale).astype(dtype, copy=False)
    if inp.want & {"hessian", "hessian_diag", "hvp"}:
        if o.input_kind == "logits":
            d = (pos + neg) * sigmoid(xp, z) * sigmoid(xp, -z)
            if opts.temperature != 1.0:
                d /= dtype.type(opts.temperature**2)
        else:
            d = xp.where(inside, pos / (x * x) + neg / ((1 - x) * (1 - x)), 0)
        arrays.update(
            second_order(xp, inp.want, layout, inp.vector, diag=(d * el_scale).astype(dtype))
        )
    return LossTerms(
        per_sample=loss,
        valid_weight=valid_weight,
        valid=valid,
        arrays=arrays,
        predictions_per_position=c,
    )


register(
    LossSpec(
        name="binary_cross_entropy",
        compute=binary_cross_entropy,
        elementwise=lambda options: True,
        options_model=BinaryCrossEntropyOptions,
        outputs=LOGIT_OUTPUTS | SECOND_ORDER,
        summary="Sigmoid binary cross-entropy for multi-label targets (pos_weight, weights).",
        formula=FORMULA,
    )
)
