"""Hooks from the losses into the fused kernels (``cpu`` on NumPy, ``cuda`` on CuPy)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ce_engine.kernels import cpu, cuda
from ce_engine.layout import Array
from ce_engine.reduction import derivative_scale, reduction_denominator
from ce_engine.registry import LossInputs, LossTerms


def fast_index_cross_entropy(inp: LossInputs, targets: Array, valid: Array) -> LossTerms | None:
    """Softmax CE with validated index targets through a fused kernel, or None when the case
    is not covered (input kinds other than logits, float64 compute).

    ``targets`` (M,) class ids (0 where not counted) and ``valid`` (M,) come from the loss's
    own validation. Covered on NumPy (``kernels.cpu``) and CuPy (``kernels.cuda``): class
    weights, ignore_index, label smoothing, temperature, sample weights, any reduction; the
    reduction's scale is folded into the gradient (``LossTerms.derivatives_scaled``).
    """
    xp, opts, layout = inp.xp, inp.options, inp.layout
    z = inp.logits
    if opts.input_kind != "logits" or z.dtype != np.float32 or z.ndim != 2 or z.size == 0:
        return None
    if inp.want & {"hessian", "hessian_diag", "hvp"}:  # second derivatives: the generic path
        return None
    impl: Any
    extra: dict[str, Any] = {}
    if xp is np:
        impl = cpu.softmax_cross_entropy_rows
        z = np.ascontiguousarray(z)
        extra["row_max"] = inp.row_max  # the online softmax on CUDA finds it in its one read
    elif cuda.is_device_array(z):
        impl = cuda.softmax_cross_entropy_rows
        z = xp.ascontiguousarray(z)
    else:
        return None
    want = inp.want
    weight = None
    if opts.weight is not None:  # float64 on the CPU, where the per-row arithmetic is float64
        weight = xp.asarray(np.asarray(opts.weight, dtype=np.float64 if xp is np else np.float32))
    s = inp.sample_weight
    grad_scale = None
    if "grad" in want:
        w_y = weight[targets] if weight is not None else xp.ones(targets.shape, np.float32)
        share = xp.where(valid, w_y, 0) * (s if s is not None else 1)
        grad_scale = (
            derivative_scale(opts, reduction_denominator(opts, layout, share))
            if inp.fold_reduction
            else 1.0
        )
    out = impl(
        z,
        targets,
        valid,
        weight=weight,
        label_smoothing=opts.label_smoothing,
        temperature=opts.temperature,
        sample_weight=s,
        grad_scale=grad_scale,
        probabilities="probabilities" in want,
        log_probabilities="log_probabilities" in want,
        **extra,
    )
    return LossTerms(
        per_sample=out.per_sample,
        valid_weight=out.valid_weight,
        valid=valid,
        arrays=out.arrays,
        derivatives_scaled=grad_scale is not None and inp.fold_reduction,
    )


#: Outputs the BCE kernel produces (second derivatives and log-probabilities: generic path).
BCE_KERNEL_OUTPUTS = frozenset({"loss", "per_sample", "grad", "probabilities"})


def fast_binary_cross_entropy(
    inp: LossInputs, labels: Array, element_scale: Array, pos_weight: Array | None
) -> cpu.BinaryCrossEntropyRows | None:
    """Sigmoid BCE through the CPU kernel (``kernels.cpu.binary_cross_entropy_rows``), or None
    when not covered: CuPy, probability inputs, float64 compute, a temperature, or outputs
    beyond loss / per_sample / grad / probabilities.

    ``labels`` (M, C) are the loss's validated, smoothed labels (0 on rows not counted),
    ``element_scale`` its weights v_ic = [i counted]·s_i·w_ic as (M, 1) or (M, C), and
    ``pos_weight`` (C,): ``per_sample`` is Σ_c v_ic·ℓ_ic as in the reference.
    """
    xp, opts = inp.xp, inp.options
    z = inp.logits
    if xp is not np or opts.input_kind != "logits" or opts.temperature != 1.0:
        return None
    if z.dtype != np.float32 or z.ndim != 2 or z.size == 0 or inp.want - BCE_KERNEL_OUTPUTS:
        return None
    uniform = element_scale.shape[-1] == 1 and bool((element_scale == 1).all())
    return cpu.binary_cross_entropy_rows(
        np.ascontiguousarray(z),
        labels,
        pos_weight=pos_weight,
        element_weight=None if uniform else np.broadcast_to(element_scale, z.shape),
        grad_scale=1.0 if "grad" in inp.want else None,
        probabilities="probabilities" in inp.want,
    )
