"""Second-order outputs (hessian, hessian_diag, hvp) vs finite differences of plain references."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from tests import test_losses_binary_cross_entropy as bce_ref
from tests import test_losses_kl_divergence as kl_ref
from tests.reference import central_difference, reduce_reference, softmax_ce

RNG = np.random.default_rng(21)
N, C = 3, 4
SECOND = ["hessian", "hessian_diag", "hvp", "grad"]


def hessian_fd(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """(x.size, x.size) matrix of ∂²f/∂x_j∂x_k by central differences, float64."""
    x = np.array(x, dtype=np.float64)
    flat = x.reshape(-1)
    n = flat.size
    out = np.zeros((n, n))

    def at(dj: int, sj: float, dk: int, sk: float) -> float:
        y = flat.copy()
        y[dj] += sj * h
        y[dk] += sk * h
        return f(y.reshape(x.shape))

    for j in range(n):
        for k in range(j, n):
            value = (at(j, 1, k, 1) - at(j, 1, k, -1) - at(j, -1, k, 1) + at(j, -1, k, -1)) / (
                4 * h * h
            )
            out[j, k] = out[k, j] = value
    return out


def block_diagonal(hessian: np.ndarray) -> np.ndarray:
    """Per-position (M, C, C) → the (M·C, M·C) Hessian w.r.t. all logits (row-major)."""
    m, c, _ = hessian.shape
    full = np.zeros((m * c, m * c))
    for i in range(m):
        full[i * c : (i + 1) * c, i * c : (i + 1) * c] = hessian[i]
    return full


def check_second_order(res: ce_engine.EvaluationResult, f, z: np.ndarray, v: np.ndarray) -> None:
    expected = hessian_fd(f, z)
    h = res.outputs["hessian"]
    np.testing.assert_allclose(block_diagonal(h), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        res.outputs["hessian_diag"], np.diagonal(h, axis1=1, axis2=2), rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(
        res.outputs["hvp"], np.einsum("mij,mj->mi", h, v), rtol=1e-10, atol=1e-14
    )
    np.testing.assert_allclose(res.outputs["hessian"], np.transpose(h, (0, 2, 1)), atol=1e-15)


CE_CASES = [
    ({}, "index"),
    ({"weight": [0.5, 1.0, 2.0, 1.5], "label_smoothing": 0.2, "temperature": 0.7}, "index"),
    ({"reduction": "sum", "log_base": 2}, "index"),
    ({"reduction": "none"}, "index"),
    ({"target_format": "probabilities", "temperature": 1.5}, "probabilities"),
    ({"target_format": "multi_hot", "weight": [1.0, 2.0, 0.5, 1.0]}, "multi_hot"),
]


@pytest.mark.parametrize(("opts", "fmt"), CE_CASES)
@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_cross_entropy_second_order(opts, fmt, with_sample_weight):
    z = RNG.standard_normal((N, C))
    if fmt == "index":
        t = np.array([0, 3, 1])
    elif fmt == "probabilities":
        t = RNG.random((N, C))
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = np.array([[1.0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0]])
    sw = RNG.random(N) + 0.5 if with_sample_weight else None
    v = RNG.standard_normal((N, C))
    res = ce_engine.evaluate(
        "cross_entropy", z, t, options=opts, outputs=SECOND, vector=v, sample_weight=sw
    )
    reduction = opts.get("reduction", "mean")
    unit = math.log(2) if opts.get("log_base") == 2 else 1.0

    def f(zz: np.ndarray) -> float:
        per, den, _ = softmax_ce(
            zz,
            t,
            fmt=fmt,
            weight=opts.get("weight"),
            label_smoothing=opts.get("label_smoothing", 0.0),
            temperature=opts.get("temperature", 1.0),
            sample_weight=sw,
        )
        red = "sum" if reduction == "none" else reduction
        return float(reduce_reference(per, den, n=N, m=N, reduction=red)) / unit

    check_second_order(res, f, z, v)


@pytest.mark.parametrize("input_kind", ["probabilities", "log_probabilities"])
def test_cross_entropy_probability_inputs(input_kind):
    p = RNG.uniform(0.05, 0.9, (N, C))
    p /= p.sum(axis=1, keepdims=True)  # probability inputs are distributions
    z = p if input_kind == "probabilities" else np.log(p)
    y = np.array([2, 0, 1])
    v = RNG.standard_normal((N, C))
    opts = {"input_kind": input_kind, "label_smoothing": 0.1}
    res = ce_engine.evaluate("cross_entropy", z, y, options=opts, outputs=SECOND, vector=v)

    def f(zz: np.ndarray) -> float:
        logp = np.log(zz) if input_kind == "probabilities" else zz
        q = np.full((N, C), 0.1 / C)
        q[np.arange(N), y] += 0.9
        return float(-(q * logp).sum() / N)

    check_second_order(res, f, z, v)
    np.testing.assert_allclose(res.outputs["grad"], central_difference(f, z), rtol=1e-6)
    if input_kind == "log_probabilities":
        assert np.all(res.outputs["hessian"] == 0)


BCE_CASES = [
    {},
    {"pos_weight": [2.0, 0.5, 1.0, 3.0], "weight": [1.0, 0.0, 2.0, 1.0]},
    {"label_smoothing": 0.1, "temperature": 2.0, "reduction": "sum"},
    {"input_kind": "probabilities", "pos_weight": 2.0},
]


@pytest.mark.parametrize("opts", BCE_CASES)
def test_binary_cross_entropy_second_order(opts):
    probs = opts.get("input_kind") == "probabilities"
    z = RNG.uniform(0.05, 0.95, (N, C)) if probs else RNG.standard_normal((N, C)) * 2
    y = (RNG.random((N, C)) > 0.5).astype(np.float64)
    sw = RNG.random(N) + 0.5
    v = RNG.standard_normal((N, C))
    res = ce_engine.evaluate(
        "binary_cross_entropy", z, y, options=opts, outputs=SECOND, vector=v, sample_weight=sw
    )
    kw = {
        "weight": None if "weight" not in opts else np.asarray(opts["weight"]),
        "pos_weight": None if "pos_weight" not in opts else np.asarray(opts["pos_weight"]),
        "label_smoothing": opts.get("label_smoothing", 0.0),
        "temperature": opts.get("temperature", 1.0),
        "input_kind": opts.get("input_kind", "logits"),
        "sample_weight": sw,
    }

    def f(zz: np.ndarray) -> float:
        per, den = bce_ref.reference(zz, y, **kw)
        return float(reduce_reference(per, den, n=N, m=N, reduction=opts.get("reduction", "mean")))

    check_second_order(res, f, z, v)
    # sigmoid BCE: the Hessian is diagonal
    off = res.outputs["hessian"] * (1 - np.eye(C))
    assert np.all(off == 0)


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"target_kind": "logits", "temperature": 2.0},
        {"input_kind": "probabilities"},
        {"input_kind": "log_probabilities", "reduction": "mean"},
    ],
)
def test_kl_divergence_second_order(opts):
    kind = opts.get("input_kind", "logits")
    z = RNG.uniform(0.05, 0.9, (N, C)) if kind == "probabilities" else RNG.standard_normal((N, C))
    if kind == "probabilities":
        z /= z.sum(axis=1, keepdims=True)  # probability inputs are distributions
    if kind == "log_probabilities":
        z = np.log(RNG.uniform(0.05, 0.9, (N, C)))
    t = RNG.standard_normal((N, C)) if opts.get("target_kind") == "logits" else None
    if t is None:
        t = RNG.random((N, C))
        t /= t.sum(axis=1, keepdims=True)
    v = RNG.standard_normal((N, C))
    sw = RNG.random(N) + 0.5
    res = ce_engine.evaluate(
        "kl_divergence", z, t, options=opts, outputs=SECOND, vector=v, sample_weight=sw
    )
    kw = {k: opts[k] for k in ("target_kind", "input_kind", "temperature") if k in opts}

    def f(zz: np.ndarray) -> float:
        kl = kl_ref.reference(zz, t, sample_weight=sw, **kw)[0]
        return float(
            reduce_reference(kl, sw, n=N, m=N, reduction=opts.get("reduction", "batchmean"))
        )

    check_second_order(res, f, z, v)


def test_layout_of_second_order_outputs():
    z = RNG.standard_normal((2, C, 3))  # classes on axis 1, positions (2, 3)
    y = RNG.integers(0, C, size=(2, 3))
    v = RNG.standard_normal((2, C, 3))
    res = ce_engine.evaluate(
        "cross_entropy", z, y, options={"class_axis": 1}, outputs=SECOND, vector=v
    )
    assert res.outputs["hessian"].shape == (2, 3, C, C)
    assert res.outputs["hessian_diag"].shape == z.shape
    assert res.outputs["hvp"].shape == z.shape
    flat = ce_engine.evaluate(
        "cross_entropy",
        np.moveaxis(z, 1, -1).reshape(6, C),
        y.reshape(6),
        outputs=SECOND,
        vector=np.moveaxis(v, 1, -1).reshape(6, C),
    )
    np.testing.assert_allclose(res.outputs["hessian"].reshape(6, C, C), flat.outputs["hessian"])
    np.testing.assert_allclose(
        np.moveaxis(res.outputs["hvp"], 1, -1).reshape(6, C), flat.outputs["hvp"]
    )


def test_large_class_count_needs_hvp():
    c = 300
    z = RNG.standard_normal((2, c))
    y = np.array([5, 299])
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("cross_entropy", z, y, outputs=["hessian"])
    assert "hvp" in info.value.errors[0].msg and info.value.errors[0].loc == ("outputs",)
    v = RNG.standard_normal((2, c))
    res = ce_engine.evaluate("cross_entropy", z, y, outputs=["hvp", "hessian_diag"], vector=v)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = np.stack([(np.diag(p[i]) - np.outer(p[i], p[i])) @ v[i] for i in range(2)]) / 2
    np.testing.assert_allclose(res.outputs["hvp"], expected, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(res.outputs["hessian_diag"], (p - p * p) / 2, rtol=1e-10)


def test_hvp_needs_vector_of_logits_shape():
    z = np.zeros((2, 3))
    with pytest.raises(InputValidationError, match="needs `vector`"):
        ce_engine.evaluate("cross_entropy", z, np.array([0, 1]), outputs=["hvp"])
    with pytest.raises(InputValidationError, match="vector must have the logits' shape"):
        ce_engine.evaluate("binary_cross_entropy", z, z, outputs=["hvp"], vector=np.zeros((3, 2)))


@pytest.mark.parametrize("loss", ["focal", "multiclass_hinge"])
@pytest.mark.parametrize("output", ["hessian", "hessian_diag", "hvp"])
def test_other_losses_answer_not_supported(loss, output):
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate(
            loss, np.zeros((2, 3)), np.array([0, 1]), outputs=[output], vector=np.zeros((2, 3))
        )
    assert f"not supported for {loss}" in info.value.errors[0].msg


@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "kl_divergence"])
def test_extreme_logits_finite_second_order(scale, loss):
    z = np.array([[scale, -scale, 0.0], [-scale, scale, scale]], dtype=np.float32)
    t = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    v = np.ones_like(z)
    res = ce_engine.evaluate(loss, z, t, outputs=SECOND, vector=v)
    for key in SECOND:
        assert np.isfinite(res.outputs[key]).all(), key
