"""Multi-class hinge losses: Weston–Watkins (1999) and Crammer–Singer (2001).

Reference: Weston & Watkins, "Support Vector Machines for Multi-Class Pattern Recognition";
Crammer & Singer, "On the Algorithmic Implementation of Multiclass Kernel-based Vector
Machines" (= ``sklearn.metrics.hinge_loss`` for multi-class; ``torch.nn.functional.
multi_margin_loss`` is Weston–Watkins divided by C).
"""

from __future__ import annotations

import numpy as np

from ce_engine.layout import Array
from ce_engine.losses._common import (
    index_targets,
    resolve_target_format,
    times_log,
)
from ce_engine.options import MulticlassHingeOptions
from ce_engine.registry import LossInputs, LossSpec, LossTerms, register

FORMULA = (
    "weston_watkins: ℓ_i = Σ_{j≠y} max(0, m − z_iy + z_ij);  "
    "crammer_singer: ℓ_i = max(0, m + max_{j≠y} z_ij − z_iy);  subgradient 0 at the kink"
)


def multiclass_hinge(inp: LossInputs) -> LossTerms:
    """Multi-class hinge loss on scores z / T with integer targets y, margins formed as
    m + (z_ij − z_iy)/T (the difference first: no z/T overflows for T < 1).

    Weston–Watkins: ℓ_i = Σ_{j≠y_i} max(0, m − z_iy + z_ij); subgradient +1 at each active j,
    −(number active) at y. Crammer–Singer: ℓ_i = max(0, m + z_ik − z_iy), k = argmax_{j≠y} z_ij;
    subgradient +1 at k and −1 at y when active. "Active" is strictly positive, so the kink
    gets subgradient 0. A target score of −inf gives +inf loss (gradient 0 there).
    """
    xp, opts, layout = inp.xp, inp.options, inp.layout
    o: MulticlassHingeOptions = opts
    dtype = inp.logits.dtype
    resolve_target_format("index", inp.targets, layout)
    y, valid = index_targets(inp)
    z = inp.logits
    rows = xp.arange(layout.num_positions)
    z_y = z[rows, y]
    target_masked = z_y == -xp.inf
    z_y = xp.where(target_masked, 0, z_y)[:, None]
    is_target = xp.arange(layout.num_classes)[None, :] == y[:, None]
    grad = xp.zeros_like(z) if "grad" in inp.want else None
    with np.errstate(over="ignore"):  # a gap beyond the dtype is ±inf, as its margin
        gap = z - z_y  # z_ij − z_iy first, then / T: no z/T overflows for T < 1
        if o.temperature != 1.0:
            gap /= dtype.type(o.temperature)
    if o.variant == "weston_watkins":
        margins = xp.where(is_target, -xp.inf, o.margin + gap)
        active = margins > 0
        loss = xp.sum(xp.maximum(margins, 0), axis=-1, dtype=xp.float64)  # NaN propagates
        if grad is not None:
            grad += active
            grad[rows, y] -= xp.sum(active, axis=-1)
    else:
        others = xp.where(is_target, -xp.inf, gap)
        k = xp.argmax(others, axis=-1)
        margin = o.margin + others[rows, k]
        active = margin > 0
        loss = xp.maximum(margin, 0)
        if grad is not None:
            grad[rows, k] += active
            grad[rows, y] -= active
    loss = xp.where(target_masked, xp.inf, loss).astype(xp.float64, copy=False)
    scale = valid.astype(dtype)
    if inp.sample_weight is not None:
        scale = scale * inp.sample_weight
    arrays: dict[str, Array] = {}
    if grad is not None:
        grad = xp.where(target_masked[:, None], 0, grad) * scale[:, None]
        if o.temperature != 1.0:
            grad /= dtype.type(o.temperature)
        arrays["grad"] = grad.astype(dtype, copy=False)
    per_sample = times_log(xp, scale, loss)  # 0 · inf = 0 for positions not counted
    return LossTerms(per_sample=per_sample, valid_weight=scale, valid=valid, arrays=arrays)


register(
    LossSpec(
        name="multiclass_hinge",
        compute=multiclass_hinge,
        options_model=MulticlassHingeOptions,
        outputs=frozenset({"loss", "per_sample", "grad"}),
        summary="Multi-class hinge loss: Weston–Watkins or Crammer–Singer, margin 1.",
        formula=FORMULA,
    )
)
