"""Reduction constants shared by the loss API and the fused kernels (no loss code here)."""

from __future__ import annotations

import math

import numpy as np

from ce_engine.layout import Array, Layout
from ce_engine.options import CommonOptions

LN2 = math.log(2.0)


def reduction_denominator(opts: CommonOptions, layout: Layout, valid_weight: Array) -> float:
    """The denominator of ``mean``/``batchmean`` per ``normalization`` (1 for sum/none)."""
    if opts.reduction == "batchmean":
        return float(layout.batch_size)
    if opts.normalization == "valid":
        return float(valid_weight.sum(dtype=np.float64))
    if opts.normalization == "batch_size":
        return float(layout.batch_size)
    if opts.normalization == "all":
        return float(layout.num_positions)
    return 1.0


def derivative_scale(opts: CommonOptions, denominator: float) -> float:
    """Factor from derivatives of Σ_i s_i ℓ_i to those of the reduced loss (incl. log base)."""
    base_scale = 1.0 / LN2 if opts.log_base == "2" else 1.0
    if opts.reduction in ("mean", "batchmean"):
        return (1.0 / denominator if denominator > 0 else 0.0) * base_scale
    return base_scale
