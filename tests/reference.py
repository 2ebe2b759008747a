"""Independent float64 references written plainly (loops over samples), for the tests only."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def log_softmax_row(z: np.ndarray) -> np.ndarray:
    m = max(float(v) for v in z if v != -math.inf)
    total = sum(math.exp(float(v) - m) for v in z if v != -math.inf)
    return np.array([float(v) - m - math.log(total) for v in z])


def softmax_ce(
    z: np.ndarray,
    targets: np.ndarray,
    *,
    fmt: str,
    weight: np.ndarray | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows z (M, C) → (per-sample loss s_i ℓ_i, valid-denominator share, counted mask)."""
    m_rows, c = z.shape
    w = np.ones(c) if weight is None else np.asarray(weight, float)
    losses = np.zeros(m_rows)
    den = np.zeros(m_rows)
    counted = np.zeros(m_rows, bool)
    for i in range(m_rows):
        s = 1.0 if sample_weight is None else float(sample_weight[i])
        if fmt == "index":
            if ignore_index is not None and int(targets[i]) == ignore_index:
                continue
            q = np.zeros(c)
            q[int(targets[i])] = 1.0
            share = w[int(targets[i])]
        elif fmt == "multi_hot":
            positives = float(np.sum(targets[i]))
            if positives == 0:
                continue
            q = np.asarray(targets[i], float) / positives
            share = 1.0
        else:
            q = np.asarray(targets[i], float)
            share = 1.0
        q = (1.0 - label_smoothing) * q + label_smoothing / c
        logp = log_softmax_row(np.asarray(z[i], float) / temperature)
        loss = 0.0
        for j in range(c):
            if q[j] * w[j] != 0:
                loss -= w[j] * q[j] * logp[j]
        losses[i] = s * loss
        den[i] = s * share
        counted[i] = True
    return losses, den, counted


def central_difference(
    f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6
) -> np.ndarray:
    """∂f/∂x by central differences, float64."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        orig = x[idx]
        x[idx] = orig + h
        up = f(x)
        x[idx] = orig - h
        down = f(x)
        x[idx] = orig
        grad[idx] = (up - down) / (2 * h)
    return grad


def reduce_reference(
    per: np.ndarray,
    den: np.ndarray,
    *,
    n: int,
    m: int,
    reduction: str,
    normalization: str = "valid",
) -> float | None:
    """Σ per / denominator per DESIGN §2 (None for ``none``), from per-position terms."""
    total = float(per.sum())
    if reduction == "sum":
        return total
    if reduction == "none":
        return None
    if reduction == "batchmean":
        return total / n
    d = {"valid": float(den.sum()), "batch_size": n, "all": m, "none": 1.0}[normalization]
    return total / d


def softplus(x: float) -> float:
    """log(1 + eˣ) for one float, plainly."""
    if x > 0:
        return x + math.log1p(math.exp(-x))
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
