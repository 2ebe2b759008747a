"""Sigmoid BCE vs a plain float64 reference, finite differences, stability, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from tests.reference import central_difference, reduce_reference, softplus

RNG = np.random.default_rng(7)
N, C = 6, 4


def reference(
    z: np.ndarray,
    y: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    pos_weight: np.ndarray | float | None = None,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    input_kind: str = "logits",
    eps: float = 1e-7,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows (M, C) → (per-position s_i Σ_c ℓ_ic, denominator share s_i·C)."""
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    m, c = z.shape
    w = np.ones((m, c)) if weight is None else np.broadcast_to(weight, (m, c))
    pw = np.ones(c) if pos_weight is None else np.broadcast_to(pos_weight, (c,))
    per, den = np.zeros(m), np.zeros(m)
    for i in range(m):
        s = 1.0 if sample_weight is None else float(sample_weight[i])
        total = 0.0
        for j in range(c):
            t = y[i, j] * (1 - label_smoothing) + label_smoothing / 2
            if input_kind == "logits":
                x = sigmoid_plain(z[i, j] / temperature)
                log_p = -softplus(-z[i, j] / temperature)
                log_1mp = -softplus(z[i, j] / temperature)
            else:
                x = min(max(z[i, j], eps), 1 - eps)
                log_p, log_1mp = math.log(x), math.log(1 - x)
            total += -w[i, j] * (pw[j] * t * log_p + (1 - t) * log_1mp)
        per[i] = s * total
        den[i] = s * c
    return per, den


def sigmoid_plain(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def rows(a: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(a, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


OPTION_CASES = [
    {},
    {"pos_weight": 3.0},
    {"pos_weight": [0.5, 1.0, 2.0, 4.0]},
    {"weight": [1.0, 0.0, 2.0, 0.5]},
    {"weight": "full"},
    {"label_smoothing": 0.1},
    {"temperature": 2.0},
    {"pos_weight": [2.0, 1.0, 1.0, 3.0], "weight": [1.0, 2.0, 0.5, 1.0], "label_smoothing": 0.2},
]


def _resolve(opts: dict, shape: tuple[int, ...]) -> dict:
    if opts.get("weight") == "full":
        return {**opts, "weight": (RNG.random(shape) + 0.1).tolist()}
    return opts


@pytest.mark.parametrize("opts", OPTION_CASES)
@pytest.mark.parametrize(
    ("reduction", "normalization"),
    [
        ("mean", "valid"),
        ("mean", "batch_size"),
        ("mean", "all"),
        ("sum", "valid"),
        ("none", "valid"),
    ],
)
@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_value_and_grad_match_reference(opts, reduction, normalization, with_sample_weight):
    z = RNG.standard_normal((N, C)) * 2
    y = (RNG.random((N, C)) > 0.5).astype(np.float64)
    y[0, 0] = 0.3  # soft label
    opts = _resolve(opts, (N, C))
    sw = RNG.random(N) + 0.1 if with_sample_weight else None
    options = {**opts, "reduction": reduction, "normalization": normalization}
    res = ce_engine.evaluate(
        "binary_cross_entropy",
        z,
        y,
        options=options,
        outputs=["per_sample", "grad"],
        sample_weight=sw,
    )
    kw = {
        "weight": None if "weight" not in opts else np.asarray(opts["weight"]),
        "pos_weight": None if "pos_weight" not in opts else np.asarray(opts["pos_weight"]),
        "label_smoothing": opts.get("label_smoothing", 0.0),
        "temperature": opts.get("temperature", 1.0),
        "sample_weight": sw,
    }
    per, den = reference(z, y, **kw)
    expected = reduce_reference(
        per, den, n=N, m=N, reduction=reduction, normalization=normalization
    )
    if expected is None:
        assert res.value is None
    else:
        assert res.value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(res.outputs["per_sample"], per, rtol=1e-12)

    def f(zz: np.ndarray) -> float:
        p, d = reference(zz, y, **kw)
        red = "sum" if reduction == "none" else reduction
        return float(reduce_reference(p, d, n=N, m=N, reduction=red, normalization=normalization))

    np.testing.assert_allclose(res.outputs["grad"], central_difference(f, z), rtol=1e-6, atol=1e-7)


def test_class_axis_and_log_base_bits():
    z = RNG.standard_normal((2, C, 3))
    y = (RNG.random((2, C, 3)) > 0.5).astype(np.float32)
    res = ce_engine.evaluate(
        "binary_cross_entropy",
        z,
        y,
        options={"class_axis": 1, "log_base": 2},
        outputs=["grad", "per_sample"],
    )
    per, den = reference(rows(z, 1), rows(y, 1))
    assert res.value == pytest.approx(per.sum() / den.sum() / math.log(2), rel=1e-12)
    assert res.unit == "bits" and res.outputs["per_sample"].shape == (2, 3)
    assert res.outputs["grad"].shape == z.shape


def test_probability_inputs_value_and_grad():
    x = RNG.uniform(0.05, 0.95, (N, C))
    x[0, 0], x[1, 1] = 0.0, 1.0  # clipped: gradient 0 there
    y = (RNG.random((N, C)) > 0.5).astype(np.float64)
    opts = {"input_kind": "probabilities", "pos_weight": 2.0}
    res = ce_engine.evaluate("binary_cross_entropy", x, y, options=opts, outputs=["grad"])
    per, den = reference(x, y, input_kind="probabilities", pos_weight=2.0)
    assert res.value == pytest.approx(per.sum() / den.sum(), rel=1e-12)

    def f(xx: np.ndarray) -> float:
        p, d = reference(xx, y, input_kind="probabilities", pos_weight=2.0)
        return float(p.sum() / d.sum())

    inner = central_difference(f, x, h=1e-7)
    inner[0, 0] = inner[1, 1] = 0.0
    np.testing.assert_allclose(res.outputs["grad"], inner, rtol=1e-5, atol=1e-7)
    with pytest.raises(InputValidationError, match="temperature applies"):
        ce_engine.evaluate("binary_cross_entropy", x, y, options={**opts, "temperature": 2.0})


def test_probability_and_log_probability_outputs():
    z = RNG.standard_normal((N, C))
    y = (RNG.random((N, C)) > 0.5).astype(np.float64)
    res = ce_engine.evaluate(
        "binary_cross_entropy", z, y, outputs=["probabilities", "log_probabilities"]
    )
    np.testing.assert_allclose(res.outputs["probabilities"], 1 / (1 + np.exp(-z)), rtol=1e-12)
    np.testing.assert_allclose(res.outputs["log_probabilities"], -np.log1p(np.exp(-z)), rtol=1e-12)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_extreme_logits_stay_finite(scale):
    z = np.array([[scale, -scale], [-scale, scale]], dtype=np.float32)
    y = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    res = ce_engine.evaluate(
        "binary_cross_entropy",
        z,
        y,
        options={"pos_weight": 2.0},
        outputs=["per_sample", "grad", "hessian_diag"],
    )
    per = res.outputs["per_sample"]
    np.testing.assert_allclose(per, [scale + 2 * scale, 2 * scale + scale], rtol=1e-6)
    assert np.isfinite(res.outputs["grad"]).all() and np.isfinite(res.outputs["hessian_diag"]).all()
    confident = ce_engine.evaluate("binary_cross_entropy", z, 1 - y, outputs=["grad", "per_sample"])
    assert np.all(confident.outputs["per_sample"] == 0) and np.all(confident.outputs["grad"] == 0)


def test_minus_inf_logit_with_negative_label_is_zero():
    z = np.array([[-np.inf, 0.0]])
    res = ce_engine.evaluate("binary_cross_entropy", z, np.array([[0.0, 1.0]]), outputs=["grad"])
    assert res.sum == pytest.approx(math.log(2))
    assert np.isfinite(res.outputs["grad"]).all() and res.outputs["grad"][0, 0] == 0


def test_nan_targets_policies():
    z = RNG.standard_normal((3, 2))
    y = np.array([[0.0, 1.0], [np.nan, 1.0], [1.0, 1.0]])
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("binary_cross_entropy", z, y)
    assert info.value.errors[0].loc == ("targets", 1, 0)
    omitted = ce_engine.evaluate("binary_cross_entropy", z, y, options={"nan_policy": "omit"})
    kept = ce_engine.evaluate("binary_cross_entropy", z[[0, 2]], y[[0, 2]])
    assert omitted.value == pytest.approx(kept.value)
    assert (omitted.count, omitted.ignored) == (4, 2)  # elements: row 1's two labels are dropped


@pytest.mark.parametrize("loss", ["binary_cross_entropy", "focal"])
def test_count_is_the_number_of_counted_labels(loss: str) -> None:
    """Element-wise losses count labels (elements), not positions: 1-D logits of N labels count
    N, (N, C) logits count N·C, as the ``valid`` mean divides by (PyTorch's mean over elements)."""
    z = RNG.standard_normal(7)
    y = (RNG.random(7) > 0.5).astype(np.float64)
    flat = ce_engine.evaluate(loss, z, y)
    assert (flat.count, flat.ignored, flat.denominator) == (7, 0, 7.0)
    z2, y2 = RNG.standard_normal((5, 3)), (RNG.random((5, 3)) > 0.5).astype(np.float64)
    y2[2, 1] = np.nan
    rows = ce_engine.evaluate(loss, z2, y2, options={"nan_policy": "omit"})
    assert (rows.count, rows.ignored, rows.denominator) == (12, 3, 12.0)
    softmax = ce_engine.evaluate("focal", z2, np.arange(5) % 3, options={"variant": "softmax"})
    assert (softmax.count, softmax.ignored) == (5, 0)  # one prediction per position


def test_errors_name_the_field():
    z = np.zeros((2, 3))
    y = np.zeros((2, 3))
    cases = [
        ({"pos_weight": [1.0, 2.0]}, y, "pos_weight has 2 entries"),
        ({"weight": [[1.0, 2.0]]}, y, "weight must have shape"),
        ({"pos_weight": -1.0}, y, "pos_weight must be finite"),
        ({"input_kind": "log_probabilities"}, y, "input_kind"),
        ({}, np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]), r"labels must lie in \[0, 1\]"),
        ({}, np.zeros(2), "targets must have the logits' shape"),
    ]
    for opts, t, msg in cases:
        with pytest.raises(InputValidationError, match=msg):
            ce_engine.evaluate("binary_cross_entropy", z, t, options=opts)


def test_position_of_only_minus_inf_logits_is_valid_for_sigmoid_losses() -> None:
    """Each sigmoid is independent: z = −inf with y = 0 costs 0 (softplus(−inf) = 0)."""
    z = np.array([[-np.inf, -np.inf], [0.0, 1.0]])
    y = np.array([[0.0, 0.0], [1.0, 0.0]])
    res = ce_engine.evaluate(
        "binary_cross_entropy", z, y, outputs=["per_sample"], options={"reduction": "sum"}
    )
    expected = math.log(2.0) + math.log1p(math.exp(1.0))
    assert res.value == pytest.approx(expected, rel=1e-12)
    focal = ce_engine.evaluate("focal", z, y, options={"variant": "sigmoid"})
    assert focal.value is not None and math.isfinite(focal.value)
    with pytest.raises(ce_engine.InputValidationError, match="-inf"):
        ce_engine.evaluate("cross_entropy", z, np.array([0, 1]))
