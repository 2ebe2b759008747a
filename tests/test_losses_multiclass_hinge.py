"""Multi-class hinge (Weston–Watkins, Crammer–Singer) vs plain references and subgradients."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from tests.reference import central_difference, reduce_reference

RNG = np.random.default_rng(3)
N, C = 7, 5


def reference(
    z: np.ndarray,
    y: np.ndarray,
    *,
    variant: str = "weston_watkins",
    margin: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    m, c = z.shape
    per, den = np.zeros(m), np.zeros(m)
    for i in range(m):
        if int(y[i]) == ignore_index:
            continue
        s = 1.0 if sample_weight is None else float(sample_weight[i])
        scores = [float(v) / temperature for v in z[i]]
        t = int(y[i])
        if variant == "weston_watkins":
            loss = sum(max(0.0, margin - scores[t] + scores[j]) for j in range(c) if j != t)
        else:
            loss = max(0.0, margin + max(scores[j] for j in range(c) if j != t) - scores[t])
        per[i], den[i] = s * loss, s
    return per, den


CASES = [
    {},
    {"variant": "crammer_singer"},
    {"margin": 0.5},
    {"variant": "crammer_singer", "margin": 2.0, "temperature": 0.5},
    {"ignore_index": 1},
    {"margin": 0.0},
]


@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize(
    ("reduction", "normalization"),
    [("mean", "valid"), ("mean", "batch_size"), ("sum", "valid"), ("none", "valid")],
)
@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_value_and_subgradient(opts, reduction, normalization, with_sample_weight):
    z = RNG.standard_normal((N, C)) * 2
    y = RNG.integers(0, C, size=N)
    y[0] = 1
    sw = RNG.random(N) + 0.1 if with_sample_weight else None
    res = ce_engine.evaluate(
        "multiclass_hinge",
        z,
        y,
        options={**opts, "reduction": reduction, "normalization": normalization},
        outputs=["per_sample", "grad"],
        sample_weight=sw,
    )
    per, den = reference(z, y, sample_weight=sw, **opts)
    expected = reduce_reference(
        per, den, n=N, m=N, reduction=reduction, normalization=normalization
    )
    if expected is None:
        assert res.value is None
    else:
        assert res.value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(res.outputs["per_sample"], per, rtol=1e-12)

    def f(zz: np.ndarray) -> float:
        p, d = reference(zz, y, sample_weight=sw, **opts)
        red = "sum" if reduction == "none" else reduction
        return float(reduce_reference(p, d, n=N, m=N, reduction=red, normalization=normalization))

    # random normal scores sit away from the kinks, where the subgradient is the gradient
    np.testing.assert_allclose(res.outputs["grad"], central_difference(f, z), rtol=1e-6, atol=1e-8)


def test_crammer_singer_matches_sklearn_hinge_loss():
    from sklearn.metrics import hinge_loss

    z = RNG.standard_normal((N, C))
    y = np.arange(N) % C
    res = ce_engine.evaluate("multiclass_hinge", z, y, options={"variant": "crammer_singer"})
    assert res.value == pytest.approx(hinge_loss(y, z, labels=np.arange(C)), rel=1e-12)


def test_kink_gets_zero_subgradient_and_bits():
    z = np.array([[1.0, 0.0, -5.0]])  # margin exactly met for class 1
    res = ce_engine.evaluate(
        "multiclass_hinge", z, np.array([0]), options={"log_base": 2}, outputs=["grad"]
    )
    assert res.value == 0.0 and np.all(res.outputs["grad"] == 0)
    z = np.array([[0.0, 0.5, -5.0]])
    res = ce_engine.evaluate("multiclass_hinge", z, np.array([0]), options={"log_base": 2})
    assert res.value == pytest.approx(1.5 / math.log(2))


@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("variant", ["weston_watkins", "crammer_singer"])
def test_extreme_scores(scale, variant):
    z = np.array([[scale, -scale, 0.0], [-scale, scale, scale]], dtype=np.float32)
    res = ce_engine.evaluate(
        "multiclass_hinge",
        z,
        np.array([0, 0]),
        options={"variant": variant},
        outputs=["per_sample", "grad"],
    )
    expected = (2 if variant == "weston_watkins" else 1) * (1 + 2 * scale)
    np.testing.assert_allclose(res.outputs["per_sample"], [0.0, expected], rtol=1e-6)
    assert np.isfinite(res.outputs["grad"]).all()


def test_masked_classes():
    z = np.array([[2.0, -np.inf, 0.0], [-np.inf, 1.0, 0.0]])
    res = ce_engine.evaluate(
        "multiclass_hinge",
        z,
        np.array([0, 0]),
        options={"nan_policy": "propagate"},  # row 1's loss is +inf: a 422 under raise
        outputs=["per_sample", "grad"],
    )
    assert res.outputs["per_sample"][0] == 0.0 and res.outputs["per_sample"][1] == math.inf
    assert np.isfinite(res.outputs["grad"]).all()
    assert res.non_finite == {"count": 1, "positions": [[1]]}
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("multiclass_hinge", z, np.array([0, 0]))
    assert (info.value.errors[0].loc, info.value.errors[0].type) == (
        ("logits", 1),
        "non_finite_result",
    )


def test_errors():
    z = np.zeros((2, 3))
    with pytest.raises(InputValidationError, match="out of range"):
        ce_engine.evaluate("multiclass_hinge", z, np.array([0, 3]))
    with pytest.raises(InputValidationError, match="needs targets of shape"):
        ce_engine.evaluate("multiclass_hinge", z, np.zeros((2, 3)))
    with pytest.raises(InputValidationError, match="input_kind"):
        ce_engine.evaluate(
            "multiclass_hinge", z, np.array([0, 1]), options={"input_kind": "probabilities"}
        )
    for output in ("hessian", "hessian_diag", "hvp", "probabilities"):
        with pytest.raises(InputValidationError, match="not supported for multiclass_hinge"):
            ce_engine.evaluate("multiclass_hinge", z, np.array([0, 1]), outputs=[output])
