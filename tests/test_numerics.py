"""Numerics (issue 14): float32 accuracy on every path, temperature, overflow, non-finite
results, probability inputs, and the documented conventions.

References are plain float64 (or exact rational) arithmetic written here; tolerances are
derived from float32's rounding of the inputs' shift and of the answer (``float32_bounds``),
never from the spacing of float32 at the row maximum.
"""

from __future__ import annotations

import importlib
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from ce_engine.kernels import cpu

api_module = importlib.import_module("ce_engine.api")
U = 2.0**-24  # float32 unit roundoff


def reference(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 from the float32 logits: (ℓ (N,), p (N, C), x = z − max (N, C))."""
    x = z.astype(np.float64) - z.astype(np.float64).max(axis=1, keepdims=True)
    lse = np.log(np.exp(x).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    return lse[:, 0] - x[rows, y], np.exp(x - lse), x


def float32_bounds(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample and per-gradient-entry error bounds of a float32 evaluation done right.

    The float32 shift x_c = z_c − m rounds by U·|x_c|, which moves lse by Σ_c p_c U|x_c|
    and x_y by U|x_y|; exp rounds each term by at most 2U (the maximum, exp(0) = 1, not at
    all), which moves ℓ by at most 2U(1 − p_y); the answer itself rounds by U·ℓ. Twice the
    sum: ℓ's error is a few float32 ulps of ℓ itself, not of the row maximum (2⁻¹⁹ at 20).
    Gradient entries (p_j − [j = y])/N: U·p_j·(|x_j| + Σ p|x| + 4) + 2U·|g|, twice.
    """
    per, p, x = reference(z, y)
    rows = np.arange(len(y))
    spread = (p * np.abs(x)).sum(axis=1)
    loss_bound = 2 * U * (spread + np.abs(x[rows, y]) + 2 * (1 - p[rows, y]) + per)
    g = p.copy()
    g[rows, y] -= 1.0
    grad_bound = 2 * U * (p * (np.abs(x) + spread[:, None] + 4) + 2 * np.abs(g)) / len(y)
    return loss_bound, grad_bound + 1e-44  # float32 subnormals: absolute spacing 1.4e-45


def confident_batch(n: int, c: int, offset: float, margin: float, seed: int) -> tuple:
    """Logits with row maxima near ``offset`` and the target ahead by about ``margin``."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * 2 + offset).astype(np.float32)
    y = rng.integers(0, c, size=n)
    z[np.arange(n), y] += np.float32(margin)
    return z, y


def issue_batch() -> tuple[np.ndarray, np.ndarray]:
    z = np.zeros((20000, 4), np.float32)
    z[:, 0] = np.linspace(10, 14, 20000)
    return z, np.zeros(20000, np.int64)


def spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[bool]:
    """Records whether ``module.name`` ran and answered (not None)."""
    calls: list[bool] = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


# small-batch lane: default options, N·C ≤ 16k; kernel: any option (here the default, spelled
# out) or more logits; generic: second-order outputs take the xp-generic loss code
PATHS = {
    "lane": ({}, ["per_sample", "grad"]),
    "kernel": ({"ignore_index": -100}, ["per_sample", "grad"]),
    "kernel+probabilities": ({"ignore_index": -100}, ["per_sample", "grad", "probabilities"]),
    "kernel+log_probabilities": ({}, ["per_sample", "grad", "log_probabilities"]),
    "generic": ({}, ["per_sample", "grad", "hessian_diag"]),
}
BATCHES = [
    ("issue", *issue_batch()),
    *[
        (f"{n}x{c} max~{offset:g} margin {margin:g}", *confident_batch(n, c, offset, margin, i))
        for i, (n, c, offset, margin) in enumerate(
            [
                (200, 10, 12.0, 14.0),
                (1500, 10, 12.0, 14.0),
                (60, 200, -1e4, 12.0),
                (120, 1000, 1e4, 16.0),
                (300, 64, -25.0, 20.0),
                (400, 300, 70.0, 9.0),
                (2000, 8, 0.0, 0.0),
            ]
        )
    ],
]


CASES = [
    pytest.param(path, z, y, id=f"{path}-{name}")
    for name, z, y in BATCHES
    for path in PATHS
    if path != "lane" or z.size <= api_module.SMALL_BATCH_ELEMENTS
]


@pytest.mark.parametrize(("path", "z", "y"), CASES)
def test_float32_error_is_a_few_ulps_of_the_loss_on_every_path(monkeypatch, path, z, y):
    """Confident rows have ℓ ≈ 1e-5 next to row maxima of 10–1e4: value, per_sample and grad
    stay within a few float32 ulps of the float64 answer, whatever outputs are requested."""
    options, outputs = PATHS[path]
    n = z.shape[0]
    lane = spy(monkeypatch, api_module, "_small_cross_entropy")
    kernel = spy(monkeypatch, cpu, "softmax_cross_entropy_rows")
    res = ce_engine.evaluate(
        "cross_entropy", z, y, options=options, outputs=outputs, backend="numpy"
    )
    if path == "lane":
        assert lane == [True]
    elif path.startswith("kernel"):
        assert not any(lane) and kernel == [True]
    else:
        assert not any(lane) and not kernel
    per, _, _ = reference(z, y)
    loss_bound, grad_bound = float32_bounds(z, y)
    assert abs(res.value - per.mean()) <= loss_bound.mean(), (res.value, per.mean())
    got = res.outputs["per_sample"].astype(np.float64)
    assert np.all(np.abs(got - per) <= loss_bound), np.max(np.abs(got - per) / loss_bound)
    want_grad = reference(z, y)[1]
    want_grad[np.arange(n), y] -= 1.0
    want_grad /= n
    err = np.abs(res.outputs["grad"].astype(np.float64) - want_grad)
    assert np.all(err <= grad_bound), np.max(err / grad_bound)


def test_issue_reproducer_mean_loss():
    """The audit's case: ours was 3.34560e-5 against an exact 3.34269e-5 (1e-3 too high)."""
    z, y = issue_batch()
    exact = float(np.mean(np.log1p(3.0 * np.exp(-z[:, 0].astype(np.float64)))))
    for outputs in (["loss"], ["log_probabilities"], ["probabilities", "grad"]):
        res = ce_engine.evaluate("cross_entropy", z, y, outputs=outputs, backend="numpy")
        assert res.value == pytest.approx(exact, rel=1e-6), outputs


# ---------------------------------------------------------------- 2. temperature below 1

HUGE64 = np.array([[1e308, -1e308, 0.0]])
HUGE32 = np.array([[3e38, -3e38, 0.0]], np.float32)
SECOND = ["grad", "hessian", "hessian_diag", "hvp"]


@pytest.mark.parametrize("z", [HUGE64, HUGE32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    ("loss", "targets", "extra"),
    [
        ("cross_entropy", np.array([0]), {}),
        ("cross_entropy", np.array([[1.0, 0.0, 0.0]]), {}),
        ("kl_divergence", np.array([[1.0, 0.0, 0.0]]), {}),
        ("kl_divergence", None, {"target_kind": "logits"}),  # target logits = the logits
    ],
    ids=["ce-index", "ce-probabilities", "kl", "kl-target-logits"],
)
def test_temperature_below_one_shifts_before_scaling(z, loss, targets, extra):
    """p = softmax((z − m)/T) = (1, 0, 0): loss 0, gradient 0, Hessian 0 (z/T first is inf)."""
    t = z if targets is None else targets
    if t.dtype.kind == "f":
        t = t.astype(z.dtype)
    v = np.ones_like(z)
    for outputs in (["grad"], SECOND):  # fused kernel (float32, index) and generic path
        res = ce_engine.evaluate(
            loss, z, t, options={"temperature": 0.5, **extra}, outputs=outputs, vector=v
        )
        assert res.value == 0.0
        for name in outputs:
            assert np.all(res.outputs[name] == 0), name


def test_temperature_below_one_in_focal_metrics_and_hinge():
    focal = ce_engine.evaluate(
        "focal",
        HUGE64,
        np.array([0]),
        options={"variant": "softmax", "temperature": 0.5},
        outputs=["grad"],
    )
    assert focal.value == 0.0 and np.all(focal.outputs["grad"] == 0)
    for dtype in (np.float64, np.float32):  # generic metric code and the fused row pass
        metrics = ce_engine.evaluate(
            "cross_entropy",
            HUGE64.astype(dtype) if dtype == np.float64 else HUGE32,
            np.array([0]),
            options={"temperature": 0.5},
            metrics=["nll", "entropy", "brier", "accuracy"],
        ).metrics
        assert metrics == {"nll": 0.0, "entropy": 0.0, "brier": 0.0, "accuracy": 1.0}
    # margins m + (z_j − z_y)/T: z/T first is inf − inf for a tie at ±1e308
    hinge = ce_engine.evaluate(
        "multiclass_hinge", np.array([[1e308, 1e308]]), np.array([0]), options={"temperature": 0.5}
    )
    assert hinge.value == 1.0


# ------------------------------------------------ 3. label smoothing with class weights


@pytest.mark.parametrize(
    ("z", "expected"),
    [
        # float32 1e38 is 99999996802856924650656260769173209088: the exact rational answer
        (
            np.array([[1e38, -1e38, 0.0]], np.float32),
            Fraction(1, 30) * (2 * 2 * Fraction(float(np.float32(1e38))))
            + Fraction(1, 30) * Fraction(1, 2) * Fraction(float(np.float32(1e38))),
        ),
        (
            np.array([[8e307, -8e307, 0.0]]),
            Fraction(1, 30) * 2 * 2 * Fraction(8e307) + Fraction(1, 60) * Fraction(8e307),
        ),
    ],
    ids=["float32", "float64"],
)
def test_label_smoothing_with_class_weights_has_no_intermediate_overflow(z, expected):
    """ℓ = 0.9·w_y·0 + (ε/C)·Σ_c w_c·(0 − x_c): w_c·x_c overflows, (ε/C)·w_c·x_c does not."""
    opts = {"label_smoothing": 0.1, "weight": [1.0, 2.0, 0.5]}
    for outputs in (["grad"], ["grad", "hessian_diag"]):  # kernel (float32) and generic
        res = ce_engine.evaluate("cross_entropy", z, np.array([0]), options=opts, outputs=outputs)
        assert res.value == pytest.approx(
            float(expected), rel=1e-12 if z.dtype == np.float64 else 1e-6
        )
        assert np.isfinite(res.outputs["grad"]).all()


# ------------------------------------------------------------ 4. non-finite results


@pytest.mark.parametrize(
    ("targets", "outputs"),
    [
        (np.array([1]), ["loss"]),  # fused kernel
        (np.array([1]), ["grad", "hessian_diag"]),  # generic path
        (np.array([[0.0, 1.0]], np.float32), ["grad"]),  # probability targets
    ],
    ids=["kernel", "generic", "probabilities"],
)
def test_float32_loss_beyond_float32_has_its_float64_sum(targets, outputs):
    """ℓ = 3e38 − (−3e38) = 6e38 > float32's maximum, but the float64 sum holds it."""
    z = np.array([[3e38, -3e38]], np.float32)
    res = ce_engine.evaluate("cross_entropy", z, targets, outputs=outputs)
    exact = 2 * float(np.float32(3e38))
    assert res.sum == pytest.approx(exact, rel=1e-12) and res.value == res.sum
    assert res.denominator == 1.0


@pytest.mark.parametrize(
    ("loss", "z", "targets", "options"),
    [
        ("binary_cross_entropy", [[3e38, 3e38]], [[0.0, 0.0]], {}),  # fused BCE kernel
        ("binary_cross_entropy", [[3e38, 3e38]], [[0.0, 0.0]], {"temperature": 1.0 + 1e-9}),
        ("focal", [[3e38, 3e38]], [[0.0, 0.0]], {"alpha": None, "gamma": 0.0}),
        ("multiclass_hinge", [[0.0, 3e38, 3e38]], [0], {}),
    ],
    ids=["bce-kernel", "bce-generic", "focal-sigmoid", "hinge"],
)
def test_row_sums_beyond_float32_are_float64_in_every_loss(loss, z, targets, options):
    """Two terms of 3e38 each: their float32 row sum is inf, the float64 one 6e38."""
    z32 = np.array(z, np.float32)
    t = np.array(targets, np.float32) if isinstance(targets[0], list) else np.array(targets)
    res = ce_engine.evaluate(loss, z32, t, options={"reduction": "sum", **options})
    exact = 2 * float(np.float32(3e38))
    assert res.value == pytest.approx(exact, rel=1e-6)


def test_per_sample_beyond_float32_is_a_located_422():
    z = np.array([[0.0, 1.0], [3e38, -3e38]], np.float32)
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("cross_entropy", z, np.array([0, 1]), outputs=["grad", "per_sample"])
    err = info.value.errors[0]
    assert (err.loc, err.type) == (("outputs", 1), "non_finite_result")
    assert "[1]" in err.msg and "float64" in err.msg


MASKED = np.array([[0.5, 1.0, 0.0], [0.0, -np.inf, 1.0], [2.0, 0.0, -np.inf]], np.float32)
MASKED_Y = np.array([0, 1, 2])  # rows 1 and 2 put their mass on a −inf logit: ℓ = +inf


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", ["cross_entropy", "multiclass_hinge", "focal"])
def test_infinite_loss_under_each_nan_policy(dtype, loss):
    z = MASKED.astype(dtype)
    options = {"variant": "softmax"} if loss == "focal" else {}
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate(loss, z, MASKED_Y, options=options)
    err = info.value.errors[0]
    assert (err.loc, err.type) == (("logits", 1), "non_finite_result")
    assert "-inf" in err.msg
    propagated = ce_engine.evaluate(
        loss, z, MASKED_Y, options={**options, "nan_policy": "propagate"}, outputs=["per_sample"]
    )
    assert propagated.value == math.inf and propagated.sum == math.inf
    assert propagated.non_finite == {"count": 2, "positions": [[1], [2]]}
    omitted = ce_engine.evaluate(loss, z, MASKED_Y, options={**options, "nan_policy": "omit"})
    first_row = ce_engine.evaluate(loss, z[:1], MASKED_Y[:1], options=options)
    assert omitted.count == 1 and omitted.ignored == 2
    rel = 1e-12 if dtype == np.float64 else 1e-6  # float32: the lane against the kernel
    assert omitted.value == pytest.approx(first_row.value, rel=rel)
    assert omitted.non_finite == {"count": 2, "positions": [[1], [2]]}


def test_omit_lists_the_positions_with_non_finite_inputs_too():
    z = np.array([[0.5, 1.0], [np.nan, 0.0], [1.0, 2.0]])
    res = ce_engine.evaluate(
        "cross_entropy", z, np.array([0, 1, 1]), options={"nan_policy": "omit"}
    )
    assert res.count == 2 and res.non_finite == {"count": 1, "positions": [[1]]}
    clean = ce_engine.evaluate("cross_entropy", z[[0, 2]], np.array([0, 1]), options={})
    assert clean.non_finite == {}


@pytest.mark.parametrize(
    ("kwargs", "loc"),
    [
        ({"sample_weight": np.array([1e308, 1e308])}, ("sample_weight",)),
        ({"options": {"weight": [1e308, 1e308]}}, ("options", "weight")),
    ],
    ids=["sample_weight", "class-weights"],
)
def test_weights_whose_sum_overflows_name_the_field(kwargs, loc):
    """Σ_i s_i·w_{y_i} = 2e308: the mean has no finite denominator (was value 0.0)."""
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("cross_entropy", np.zeros((2, 2)), np.array([0, 1]), **kwargs)
    assert info.value.errors[0].loc == loc
    assert info.value.errors[0].type == "weight_overflow"


def test_sample_weight_beyond_the_float32_compute_dtype_is_located():
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate(
            "cross_entropy",
            np.zeros((2, 2), np.float32),
            np.array([0, 1]),
            sample_weight=np.array([1.0, 1e39]),
        )
    assert info.value.errors[0].loc == ("sample_weight", 1)


# ------------------------------------------------------------- 6. probability inputs


@pytest.mark.parametrize(
    ("loss", "x", "loc", "kind"),
    [
        ("cross_entropy", [[1.7, 1.7, 1.7]], ("logits", 0, 0), "probability_range"),
        ("kl_divergence", [[0.5, 0.6, -0.1]], ("logits", 0, 2), "probability_range"),
        ("binary_cross_entropy", [[0.5, -0.2]], ("logits", 0, 1), "probability_range"),
        ("cross_entropy", [[0.2, 0.3, 0.5], [0.5, 0.4, 0.05]], ("logits", 1), "probability_sum"),
        ("kl_divergence", [[0.2, 0.2, 0.2]], ("logits", 0), "probability_sum"),
    ],
)
def test_probability_inputs_outside_their_range_are_located(loss, x, loc, kind):
    x = np.array(x)
    targets = {
        "cross_entropy": np.zeros(len(x), np.int64),
        "kl_divergence": np.full(x.shape, 1.0 / x.shape[1]),
        "binary_cross_entropy": np.ones(x.shape),
    }[loss]
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate(loss, x, targets, options={"input_kind": "probabilities"})
    assert (info.value.errors[0].loc, info.value.errors[0].type) == (loc, kind)


def test_probability_inputs_within_the_tolerances_are_clipped_and_answered():
    x = np.array([[1.0 + 5e-7, -5e-7, 0.0], [0.5, 0.4995, 0.0]])  # off by < 1e-6; Σ = 0.9995
    res = ce_engine.evaluate(
        "cross_entropy", x, np.array([0, 1]), options={"input_kind": "probabilities"}
    )
    eps = 1e-7
    expected = (-math.log(1 - eps) - math.log(0.4995)) / 2
    assert res.value == pytest.approx(expected, rel=1e-12)
    loose = ce_engine.evaluate(
        "cross_entropy",
        np.array([[0.5, 0.4, 0.05]]),
        np.array([0]),
        options={"input_kind": "probabilities", "sum_tolerance": 0.1},
    )
    assert loose.value == pytest.approx(-math.log(0.5), rel=1e-12)
    bce = ce_engine.evaluate(
        "binary_cross_entropy",
        np.array([[0.3, 0.3]]),  # elementwise: rows need not sum to 1
        np.array([[1.0, 0.0]]),
        options={"input_kind": "probabilities"},
    )
    assert bce.value == pytest.approx(-(math.log(0.3) + math.log(0.7)) / 2, rel=1e-12)


def test_sum_tolerance_is_in_the_registry():
    for name, spec in ce_engine.all_losses().items():
        assert spec.defaults()["sum_tolerance"] == 1e-3, name
        assert "sum_tolerance" in spec.options_schema()["properties"], name


# -------------------------------------------------------------- 7. conventions, in README

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_states_the_numerical_conventions():
    text = README.read_text()
    match = re.search(r"^## Numerical conventions\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README has no 'Numerical conventions' section"
    section = match.group(1)
    for needle in (
        "0·(−inf)",  # torch gives NaN, we give the limit
        "log_loss",  # sklearn clips at float64 eps
        "1e-7",  # keras focal clips
        "torchmetrics",  # ECE bins [lo, hi) in float32 with a bin at 1.0; ours (lo, hi]
        "N·C",  # KL reduction mean: torch divides by N·C, we by positions
        "non_finite_result",  # the rule for non-finite answers
        "sum_tolerance",
    ):
        assert needle in section, needle
