"""Focal loss (sigmoid, softmax) vs a plain float64 reference, finite differences, stability."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from tests.reference import central_difference, log_softmax_row, reduce_reference, sigmoid

RNG = np.random.default_rng(11)
N, C = 6, 4


def sigmoid_reference(
    z: np.ndarray,
    y: np.ndarray,
    *,
    alpha: float | list[float] | None = 0.25,
    gamma: float = 2.0,
    temperature: float = 1.0,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """torchvision sigmoid_focal_loss, summed over classes: (s_i Σ_c ℓ_ic, s_i·C)."""
    m, c = z.shape
    a = None if alpha is None else np.broadcast_to(np.asarray(alpha, float), (c,))
    per, den = np.zeros(m), np.zeros(m)
    for i in range(m):
        s = 1.0 if sample_weight is None else float(sample_weight[i])
        total = 0.0
        for j in range(c):
            x, t = float(z[i, j]) / temperature, float(y[i, j])
            p = sigmoid(x)
            ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            loss = ce * (1 - p_t) ** gamma
            if a is not None:
                loss *= a[j] * t + (1 - a[j]) * (1 - t)
            total += loss
        per[i], den[i] = s * total, s * c
    return per, den


def softmax_reference(
    z: np.ndarray,
    q: np.ndarray,
    *,
    alpha: float | list[float] | None = 0.25,
    gamma: float = 2.0,
    temperature: float = 1.0,
    counted: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """−Σ_c α_c q_c (1 − p_c)^γ log p_c per row: (s_i ℓ_i, s_i)."""
    m, c = z.shape
    a = np.ones(c) if alpha is None else np.broadcast_to(np.asarray(alpha, float), (c,))
    per, den = np.zeros(m), np.zeros(m)
    for i in range(m):
        if counted is not None and not counted[i]:
            continue
        s = 1.0 if sample_weight is None else float(sample_weight[i])
        log_p = log_softmax_row(np.asarray(z[i], float) / temperature)
        loss = 0.0
        for j in range(c):
            if q[i, j] != 0:
                loss -= a[j] * q[i, j] * (1 - math.exp(log_p[j])) ** gamma * log_p[j]
        per[i], den[i] = s * loss, s
    return per, den


SIGMOID_CASES = [
    {},
    {"alpha": None},
    {"alpha": 0.6, "gamma": 0.0},
    {"alpha": [0.1, 0.9, 0.5, 0.25], "gamma": 0.5},
    {"gamma": 3.0, "temperature": 1.5},
    {"target_format": "probabilities"},
]


@pytest.mark.parametrize("opts", SIGMOID_CASES)
@pytest.mark.parametrize(
    ("reduction", "normalization"), [("mean", "valid"), ("sum", "valid"), ("mean", "batch_size")]
)
@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_sigmoid_matches_torchvision_formula(opts, reduction, normalization, with_sample_weight):
    z = RNG.standard_normal((N, C)) * 2
    y = (RNG.random((N, C)) > 0.5).astype(np.float64)
    y[1, 2] = 0.3  # soft label
    sw = RNG.random(N) + 0.1 if with_sample_weight else None
    kw = {k: opts[k] for k in ("alpha", "gamma", "temperature") if k in opts}
    options = {**opts, "reduction": reduction, "normalization": normalization}
    res = ce_engine.evaluate(
        "focal", z, y, options=options, outputs=["per_sample", "grad"], sample_weight=sw
    )
    per, den = sigmoid_reference(z, y, sample_weight=sw, **kw)
    expected = reduce_reference(
        per, den, n=N, m=N, reduction=reduction, normalization=normalization
    )
    assert res.value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(res.outputs["per_sample"], per, rtol=1e-12)

    def f(zz: np.ndarray) -> float:
        p, d = sigmoid_reference(zz, y, sample_weight=sw, **kw)
        return float(
            reduce_reference(p, d, n=N, m=N, reduction=reduction, normalization=normalization)
        )

    np.testing.assert_allclose(res.outputs["grad"], central_difference(f, z), rtol=1e-6, atol=1e-8)


SOFTMAX_CASES = [
    {"variant": "softmax"},
    {"variant": "softmax", "alpha": None, "gamma": 0.0},
    {"variant": "softmax", "alpha": [0.1, 0.9, 0.5, 0.25], "gamma": 0.5},
    {"variant": "softmax", "gamma": 3.0, "temperature": 0.7},
    {"variant": "softmax", "ignore_index": 2, "target_format": "index"},
]


@pytest.mark.parametrize("opts", SOFTMAX_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_softmax_index_targets(opts, reduction, with_sample_weight):
    z = RNG.standard_normal((N, C)) * 2
    y = RNG.integers(0, C, size=N)
    y[2] = 2
    sw = RNG.random(N) + 0.1 if with_sample_weight else None
    q = np.eye(C)[y]
    counted = y != opts.get("ignore_index", -100)
    kw = {k: opts[k] for k in ("alpha", "gamma", "temperature") if k in opts}
    res = ce_engine.evaluate(
        "focal",
        z,
        y,
        options={**opts, "reduction": reduction},
        outputs=["per_sample", "grad"],
        sample_weight=sw,
    )
    per, den = softmax_reference(z, q, counted=counted, sample_weight=sw, **kw)
    expected = reduce_reference(per, den, n=N, m=N, reduction=reduction)
    if expected is None:
        assert res.value is None
    else:
        assert res.value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(res.outputs["per_sample"], per, rtol=1e-12, atol=1e-15)
    assert res.count == int(counted.sum())

    def f(zz: np.ndarray) -> float:
        p, d = softmax_reference(zz, q, counted=counted, sample_weight=sw, **kw)
        red = "sum" if reduction == "none" else reduction
        return float(reduce_reference(p, d, n=N, m=N, reduction=red))

    np.testing.assert_allclose(res.outputs["grad"], central_difference(f, z), rtol=1e-6, atol=1e-8)


def test_softmax_probability_targets_and_outputs():
    z = RNG.standard_normal((N, C))
    raw = RNG.random((N, C))
    q = raw / raw.sum(axis=1, keepdims=True)
    opts = {"variant": "softmax", "gamma": 1.5}
    res = ce_engine.evaluate(
        "focal", z, q, options=opts, outputs=["grad", "probabilities", "log_probabilities"]
    )
    per, den = softmax_reference(z, q, gamma=1.5)
    assert res.value == pytest.approx(per.sum() / den.sum(), rel=1e-12)

    def f(zz: np.ndarray) -> float:
        p, d = softmax_reference(zz, q, gamma=1.5)
        return float(p.sum() / d.sum())

    np.testing.assert_allclose(res.outputs["grad"], central_difference(f, z), rtol=1e-6, atol=1e-9)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(res.outputs["probabilities"], p, rtol=1e-12)
    np.testing.assert_allclose(res.outputs["log_probabilities"], np.log(p), rtol=1e-12)
    sig = ce_engine.evaluate("focal", z, (q > 0.3) * 1.0, outputs=["probabilities"])
    np.testing.assert_allclose(sig.outputs["probabilities"], 1 / (1 + np.exp(-z)), rtol=1e-12)


def test_gamma_zero_alpha_none_is_plain_cross_entropy():
    z = RNG.standard_normal((N, C))
    y = RNG.integers(0, C, size=N)
    focal = ce_engine.evaluate(
        "focal", z, y, options={"variant": "softmax", "gamma": 0.0, "alpha": None}
    )
    assert focal.value == pytest.approx(ce_engine.evaluate("cross_entropy", z, y).value, rel=1e-12)


@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("variant", ["sigmoid", "softmax"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_extreme_logits_stay_finite(scale, variant, gamma):
    z = np.array([[scale, -scale, 0.0], [-scale, scale, scale]], dtype=np.float32)
    if variant == "sigmoid":
        t = np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]], dtype=np.float32)
    else:
        t = np.array([0, 0])
    res = ce_engine.evaluate(
        "focal",
        z,
        t,
        options={"variant": variant, "gamma": gamma},
        outputs=["grad", "per_sample"],
    )
    assert np.isfinite(res.outputs["per_sample"]).all()
    assert np.isfinite(res.outputs["grad"]).all()
    # confident and wrong: softmax α·(2·scale); sigmoid α·scale + (1 − α)·scale
    expected = 0.25 * (2 * scale + math.log(2)) if variant == "softmax" else scale
    assert res.outputs["per_sample"][1] == pytest.approx(expected, rel=1e-5)


def test_errors():
    z = np.zeros((2, 3))
    with pytest.raises(InputValidationError, match="not class indices"):
        ce_engine.evaluate("focal", z, np.array([0, 1]), options={"target_format": "index"})
    with pytest.raises(InputValidationError, match="alpha has 2 entries"):
        ce_engine.evaluate(
            "focal", z, np.array([0, 1]), options={"variant": "softmax", "alpha": [0.1, 0.2]}
        )
    with pytest.raises(InputValidationError, match=r"alpha must lie in \[0, 1\]"):
        ce_engine.evaluate("focal", z, np.zeros((2, 3)), options={"alpha": 1.5})
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("focal", z, np.zeros((2, 3)), outputs=["hessian"])
    assert "not supported for focal" in info.value.errors[0].msg
