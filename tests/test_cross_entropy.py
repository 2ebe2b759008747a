"""Softmax cross-entropy vs an independent float64 reference, finite differences, stability."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from tests.reference import central_difference, softmax_ce

RNG = np.random.default_rng(1234)


def rows_of(z: np.ndarray, class_axis: int) -> np.ndarray:
    moved = np.moveaxis(z, class_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def reference_value(
    per: np.ndarray, den: np.ndarray, n: int, m: int, reduction: str, normalization: str
) -> float | None:
    total = per.sum()
    if reduction == "sum":
        return total
    if reduction == "none":
        return None
    d = {"valid": den.sum(), "batch_size": n, "all": m, "none": 1.0}[normalization]
    return total / d


SHAPES = [((7, 5), -1), ((3, 4, 6), -1), ((2, 5, 3), 1), ((6,), -1)]
DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
TOL = {np.float16: 2e-3, ml_dtypes.bfloat16: 2e-3, np.float32: 2e-5, np.float64: 1e-12}


@pytest.mark.parametrize(("shape", "class_axis"), SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fmt", ["index", "probabilities"])
def test_matches_reference_over_shapes_and_dtypes(shape, class_axis, dtype, fmt):
    z = (RNG.standard_normal(shape) * 3).astype(dtype)
    c = shape[class_axis]
    positions = tuple(d for i, d in enumerate(shape) if i != class_axis % len(shape))
    if fmt == "index":
        targets = RNG.integers(0, c, size=positions)
        flat_t = targets.reshape(-1)
    else:
        raw = RNG.random(shape)
        targets = raw / raw.sum(axis=class_axis, keepdims=True)
        flat_t = rows_of(targets, class_axis)
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        targets,
        options={"class_axis": class_axis},
        outputs=["per_sample"],
        backend="numpy",
    )
    per, den, _ = softmax_ce(rows_of(z.astype(np.float64), class_axis), flat_t, fmt=fmt)
    tol = TOL[dtype]
    expected_dtype = "float64" if dtype is np.float64 else "float32"
    assert res.compute_dtype == expected_dtype
    assert res.value == pytest.approx(per.sum() / den.sum(), rel=tol)
    assert res.sum == pytest.approx(per.sum(), rel=tol)
    assert res.denominator == pytest.approx(den.sum())
    np.testing.assert_allclose(res.outputs["per_sample"].reshape(-1), per, rtol=tol, atol=tol)
    assert res.outputs["per_sample"].shape == positions


OPTION_CASES = [
    {},
    {"weight": [0.5, 1.0, 2.0, 0.0, 3.0]},
    {"ignore_index": 2},
    {"label_smoothing": 0.1},
    {"temperature": 2.5},
    {
        "weight": [0.5, 1.0, 2.0, 1.5, 3.0],
        "ignore_index": 1,
        "label_smoothing": 0.2,
        "temperature": 0.7,
    },
]


@pytest.mark.parametrize("opts", OPTION_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalization", ["valid", "batch_size", "all", "none"])
@pytest.mark.parametrize("log_base", ["e", "2"])
@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_index_options_reductions(opts, reduction, normalization, log_base, with_sample_weight):
    n, c = 9, 5
    z = RNG.standard_normal((n, c)) * 2
    y = RNG.integers(0, c, size=n)
    y[3] = 2  # make sure ignore_index=2 / 1 hit something
    y[4] = 1
    sw = RNG.random(n) + 0.1 if with_sample_weight else None
    options = {**opts, "reduction": reduction, "normalization": normalization, "log_base": log_base}
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        options=options,
        outputs=["per_sample", "grad"],
        sample_weight=sw,
        backend="numpy",
    )
    per, den, counted = softmax_ce(
        z,
        y,
        fmt="index",
        weight=opts.get("weight"),
        ignore_index=opts.get("ignore_index", -100),
        label_smoothing=opts.get("label_smoothing", 0.0),
        temperature=opts.get("temperature", 1.0),
        sample_weight=sw,
    )
    unit = math.log(2) if log_base == "2" else 1.0
    expected = reference_value(per, den, n, n, reduction, normalization)
    if expected is None:
        assert res.value is None
    else:
        assert res.value == pytest.approx(expected / unit, rel=1e-12)
    np.testing.assert_allclose(res.outputs["per_sample"], per / unit, rtol=1e-12, atol=1e-15)
    assert res.count == int(counted.sum())
    assert res.ignored == n - int(counted.sum())
    assert res.unit == ("bits" if log_base == "2" else "nats")

    def reduced(zz: np.ndarray) -> float:
        p, d, _ = softmax_ce(
            zz,
            y,
            fmt="index",
            weight=opts.get("weight"),
            ignore_index=opts.get("ignore_index", -100),
            label_smoothing=opts.get("label_smoothing", 0.0),
            temperature=opts.get("temperature", 1.0),
            sample_weight=sw,
        )
        v = reference_value(p, d, n, n, "sum" if reduction == "none" else reduction, normalization)
        return float(v) / unit

    np.testing.assert_allclose(
        res.outputs["grad"], central_difference(reduced, z), rtol=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("fmt", ["probabilities", "multi_hot"])
@pytest.mark.parametrize(
    "opts", [{}, {"weight": [1.0, 2.0, 0.5, 1.0]}, {"label_smoothing": 0.3}, {"temperature": 1.7}]
)
def test_dense_targets_value_and_grad(fmt, opts):
    n, c = 6, 4
    z = RNG.standard_normal((n, c))
    if fmt == "probabilities":
        raw = RNG.random((n, c))
        t = raw / raw.sum(axis=1, keepdims=True)
    else:
        t = (RNG.random((n, c)) > 0.5).astype(np.float64)
        t[2] = 0.0  # a row without positives: ignored and counted as such
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        t,
        options={**opts, "target_format": fmt},
        outputs=["grad"],
        backend="numpy",
    )
    per, den, counted = softmax_ce(
        z,
        t,
        fmt=fmt,
        weight=opts.get("weight"),
        label_smoothing=opts.get("label_smoothing", 0.0),
        temperature=opts.get("temperature", 1.0),
    )
    assert res.value == pytest.approx(per.sum() / den.sum(), rel=1e-12)
    assert res.count == counted.sum()

    def f(zz: np.ndarray) -> float:
        p, d, _ = softmax_ce(
            zz,
            t,
            fmt=fmt,
            weight=opts.get("weight"),
            label_smoothing=opts.get("label_smoothing", 0.0),
            temperature=opts.get("temperature", 1.0),
        )
        return float(p.sum() / d.sum())

    np.testing.assert_allclose(res.outputs["grad"], central_difference(f, z), rtol=1e-6, atol=1e-9)


def test_auto_target_format():
    z = RNG.standard_normal((3, 4))
    assert ce_engine.evaluate("cross_entropy", z, np.array([0, 1, 3])).count == 3
    multi = np.array([[True, False, True, False]] * 3)
    hot = ce_engine.evaluate("cross_entropy", z, multi)
    dense = ce_engine.evaluate("cross_entropy", z, multi.astype(float) / 2)
    assert hot.value == pytest.approx(dense.value)
    with pytest.raises(InputValidationError, match="cannot infer target_format"):
        ce_engine.evaluate("cross_entropy", z, np.array([0.0, 1.0, 2.0]))


def test_pytorch_documented_formula_smoothing_ignore_weights():
    """PyTorch: (1−ε)·Σ w_y(−log p_y)/Σ w_y + ε/C·Σ_i Σ_c w_c(−log p_ic)/Σ w_y (ignored dropped)."""
    n, c, eps = 8, 6, 0.15
    z = RNG.standard_normal((n, c)) * 3
    y = RNG.integers(0, c, size=n)
    y[[1, 5]] = -100
    w = RNG.random(c) + 0.2
    keep = y != -100
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    w_y = w[y[keep]]
    nll = -(w_y * logp[keep, y[keep]]).sum() / w_y.sum()
    smooth = -(logp[keep] * w).sum() / w_y.sum()
    expected = (1 - eps) * nll + eps / c * smooth
    res = ce_engine.evaluate(
        "cross_entropy", z, y, options={"weight": w.tolist(), "label_smoothing": eps}
    )
    assert res.value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_extreme_logits_stay_finite(scale, smoothing):
    z = np.array(
        [[scale, -scale, 0.0], [-scale, scale, scale], [scale, scale, -scale]], dtype=np.float32
    )
    y = np.array([1, 0, 2])
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        options={"label_smoothing": smoothing},
        outputs=["grad", "per_sample"],
        backend="numpy",
    )
    assert res.value is not None and math.isfinite(res.value)
    assert np.isfinite(res.outputs["grad"]).all()
    assert np.isfinite(res.outputs["per_sample"]).all()
    # −log p_y for a gap of 2·scale between the max and the target logit
    assert res.outputs["per_sample"][0] == pytest.approx(
        (1 - smoothing) * 2 * scale + smoothing / 3 * (2 * scale + scale), rel=1e-5
    )


def test_minus_inf_logits_mask_classes():
    z = np.array([[0.0, -np.inf, 1.0], [2.0, -np.inf, -np.inf]])
    res = ce_engine.evaluate("cross_entropy", z, np.array([2, 0]), outputs=["grad", "per_sample"])
    p0 = np.exp(1.0) / (1 + np.exp(1.0))
    np.testing.assert_allclose(res.outputs["per_sample"], [-math.log(p0), 0.0])
    assert np.isfinite(res.outputs["grad"]).all()
    assert res.outputs["grad"][0, 1] == 0.0
    masked_target = ce_engine.evaluate(
        "cross_entropy",
        z,
        np.array([1, 0]),
        options={"nan_policy": "propagate"},
        outputs=["per_sample"],
    )
    assert masked_target.outputs["per_sample"][0] == math.inf
    assert masked_target.non_finite == {"count": 1, "positions": [[0]]}


def test_out_of_range_label_names_position():
    z = np.zeros((2, 3, 4))
    y = np.array([[0, 1, 2], [3, 9, 0]])
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("cross_entropy", z, y)
    assert info.value.errors[0].loc == ("targets", 1, 1)
    assert "out of range [0, 4)" in info.value.errors[0].msg


def test_nan_policy():
    z = RNG.standard_normal((4, 3))
    z[2, 1] = np.nan
    y = np.array([0, 1, 2, 1])
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("cross_entropy", z, y)
    assert info.value.errors[0].loc == ("logits", 2, 1)
    omitted = ce_engine.evaluate(
        "cross_entropy", z, y, options={"nan_policy": "omit"}, outputs=["grad"]
    )
    kept = ce_engine.evaluate("cross_entropy", z[[0, 1, 3]], y[[0, 1, 3]])
    assert omitted.value == pytest.approx(kept.value)
    assert omitted.ignored == 1 and np.all(omitted.outputs["grad"][2] == 0)
    with np.errstate(invalid="ignore"):
        propagated = ce_engine.evaluate("cross_entropy", z, y, options={"nan_policy": "propagate"})
    assert propagated.value is not None and math.isnan(propagated.value)
    z[2, 1] = np.inf
    with pytest.raises(InputValidationError, match="inf"):
        ce_engine.evaluate("cross_entropy", z, y)


def test_probability_outputs_and_input_kinds():
    z = RNG.standard_normal((5, 4))
    y = RNG.integers(0, 4, size=5)
    res = ce_engine.evaluate("cross_entropy", z, y, outputs=["probabilities", "log_probabilities"])
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(res.outputs["probabilities"], p, rtol=1e-12)
    np.testing.assert_allclose(res.outputs["log_probabilities"], np.log(p), rtol=1e-12)
    from_logp = ce_engine.evaluate(
        "cross_entropy", np.log(p), y, options={"input_kind": "log_probabilities"}
    )
    from_p = ce_engine.evaluate("cross_entropy", p, y, options={"input_kind": "probabilities"})
    assert from_logp.value == pytest.approx(res.value, rel=1e-12)
    assert from_p.value == pytest.approx(res.value, rel=1e-6)


def test_option_and_output_errors():
    z = np.zeros((2, 3))
    y = np.array([0, 1])
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("cross_entropy", z, y, options={"reduction": "avg", "bogus": 1})
    locs = {e.loc for e in info.value.errors}
    assert ("options", "reduction") in locs and ("options", "bogus") in locs
    with pytest.raises(InputValidationError, match="weight has 2 entries"):
        ce_engine.evaluate("cross_entropy", z, y, options={"weight": [1.0, 2.0]})
    with pytest.raises(InputValidationError, match="class_axis"):
        ce_engine.evaluate("cross_entropy", z, y, options={"class_axis": 3})
    with pytest.raises(InputValidationError, match="unknown loss"):
        ce_engine.evaluate("nope", z, y)
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("cross_entropy", z, y, outputs=["grad", "bogus"])
    assert info.value.errors[0].loc == ("outputs", 1)
    with pytest.raises(InputValidationError, match="sample_weight"):
        ce_engine.evaluate("cross_entropy", z, y, sample_weight=np.array([1.0, -1.0]))
    with pytest.raises(InputValidationError, match="temperature applies"):
        ce_engine.evaluate(
            "cross_entropy", z, y, options={"input_kind": "log_probabilities", "temperature": 2.0}
        )


def test_all_ignored_mean_is_none():
    res = ce_engine.evaluate(
        "cross_entropy", np.zeros((2, 3)), np.array([-100, -100]), outputs=["grad"]
    )
    assert res.value is None and res.denominator == 0.0 and res.count == 0
    assert np.all(res.outputs["grad"] == 0)


def test_backend_errors():
    with pytest.raises(ce_engine.BackendUnavailableError):
        ce_engine.evaluate("cross_entropy", np.zeros((1, 2)), np.array([0]), backend="tpu")
