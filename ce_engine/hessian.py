"""Second-order outputs: full Hessian, its diagonal and Hessian-vector products (DESIGN §2).

Two shapes of per-position Hessian w.r.t. the logits cover the family:
- softmax (cross-entropy, KL on logits): H_i = s_i (diag p_i − p_i p_iᵀ) / T², s_i the weighted
  target mass Σ_c w_c q_ic times the sample weight;
- diagonal (sigmoid BCE, and any loss whose inputs are probabilities or log-probabilities):
  H_i = diag(d_i).
All functions are of Σ_i ℓ_i (reduction scaling happens in ``ce_engine.api.reduce_terms``).
"""

from __future__ import annotations

from types import ModuleType

from ce_engine.errors import InputValidationError
from ce_engine.layout import Array, Layout

#: Largest class count for the full (C, C) Hessian per position; beyond it use ``hvp``.
MAX_FULL_HESSIAN_CLASSES = 256
#: Largest number of elements M·C·C of a full Hessian output.
MAX_FULL_HESSIAN_ELEMENTS = 1 << 26

SECOND_ORDER = frozenset({"hessian", "hessian_diag", "hvp"})


def check_full_hessian(layout: Layout) -> None:
    """422 when the full Hessian is too large to return (suggests ``hvp`` / ``hessian_diag``)."""
    c, m = layout.num_classes, layout.num_positions
    if c > MAX_FULL_HESSIAN_CLASSES:
        raise InputValidationError.single(
            ("outputs",),
            f"output 'hessian' needs C <= {MAX_FULL_HESSIAN_CLASSES} classes (got {c}); "
            "request 'hvp' with a `vector` (any C) or 'hessian_diag' instead",
            "hessian_too_large",
        )
    if m * c * c > MAX_FULL_HESSIAN_ELEMENTS:
        raise InputValidationError.single(
            ("outputs",),
            f"output 'hessian' would hold {m * c * c} elements (over "
            f"{MAX_FULL_HESSIAN_ELEMENTS}); request 'hvp' or 'hessian_diag', or send fewer rows",
            "hessian_too_large",
        )


def softmax_hessian(xp: ModuleType, p: Array, scale: Array) -> Array:
    """H_i = scale_i (diag p_i − p_i p_iᵀ), (M, C, C)."""
    h = -(p[:, :, None] * p[:, None, :])
    idx = xp.arange(p.shape[1])
    h[:, idx, idx] += p
    h *= scale[:, None, None]
    return h


def softmax_hessian_diag(p: Array, scale: Array) -> Array:
    """diag H_i = scale_i (p_i − p_i²), (M, C)."""
    return (p - p * p) * scale[:, None]


def softmax_hvp(xp: ModuleType, p: Array, vector: Array, scale: Array) -> Array:
    """H_i v_i = scale_i (p_i ∘ v_i − p_i (p_i · v_i)), (M, C); never forms H."""
    pv = xp.sum(p * vector, axis=-1, keepdims=True)
    return p * (vector - pv) * scale[:, None]


def diagonal_hessian(xp: ModuleType, diag: Array) -> Array:
    """diag(d_i) as (M, C, C)."""
    m, c = diag.shape
    h = xp.zeros((m, c, c), dtype=diag.dtype)
    idx = xp.arange(c)
    h[:, idx, idx] = diag
    return h


def second_order(
    xp: ModuleType,
    want: frozenset[str],
    layout: Layout,
    vector: Array | None,
    *,
    p: Array | None = None,
    scale: Array | None = None,
    diag: Array | None = None,
) -> dict[str, Array]:
    """The requested second-order outputs, from softmax ``p`` + ``scale`` or a ``diag`` Hessian.

    ``scale`` already holds s_i / T² (softmax case); ``diag`` holds d_i (diagonal case).
    """
    out: dict[str, Array] = {}
    if not want & SECOND_ORDER:
        return out
    if "hessian" in want:
        check_full_hessian(layout)
    if diag is not None:
        if "hessian" in want:
            out["hessian"] = diagonal_hessian(xp, diag)
        if "hessian_diag" in want:
            out["hessian_diag"] = diag
        if "hvp" in want:
            out["hvp"] = diag * vector
        return out
    assert p is not None and scale is not None
    if "hessian" in want:
        out["hessian"] = softmax_hessian(xp, p, scale)
    if "hessian_diag" in want:
        out["hessian_diag"] = softmax_hessian_diag(p, scale)
    if "hvp" in want:
        out["hvp"] = softmax_hvp(xp, p, vector, scale)
    return out
