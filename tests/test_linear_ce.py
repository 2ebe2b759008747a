"""linear_cross_entropy: value and dX/dW/db vs a plain reference + finite differences, chunking,
memory bound, input validation."""

from __future__ import annotations

import importlib
import math
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from tests.reference import central_difference, reduce_reference, softmax_ce

LCE_MODULE = importlib.import_module("ce_engine.losses.linear_cross_entropy")


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The small ``chunk_elements`` of these tests exercise many chunks (no production floor)."""
    monkeypatch.setattr(LCE_MODULE, "MIN_CHUNK_ELEMENTS", 1)


RNG = np.random.default_rng(17)
N, D, C = 7, 3, 5
GRADS = ["per_sample", "grad_features", "grad_weight", "grad_bias"]


def objective(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    y: np.ndarray,
    *,
    fmt: str = "index",
    opts: dict | None = None,
    sample_weight: np.ndarray | None = None,
) -> float:
    """J = reduce(CE(X Wᵀ + b)) + (λ/2)‖W‖², from plain loops."""
    opts = opts or {}
    n, c = x.shape[0], w.shape[0]
    z = np.zeros((n, c))
    for i in range(n):
        for j in range(c):
            z[i, j] = sum(x[i, k] * w[j, k] for k in range(x.shape[1])) + (0 if b is None else b[j])
    per, den, _ = softmax_ce(
        z,
        y,
        fmt=fmt,
        weight=opts.get("weight"),
        ignore_index=opts.get("ignore_index", -100),
        label_smoothing=opts.get("label_smoothing", 0.0),
        temperature=opts.get("temperature", 1.0),
        sample_weight=sample_weight,
    )
    reduction = opts.get("reduction", "mean")
    value = reduce_reference(
        per,
        den,
        n=n,
        m=n,
        reduction="sum" if reduction == "none" else reduction,
        normalization=opts.get("normalization", "valid"),
    )
    unit = math.log(2) if opts.get("log_base") == 2 else 1.0
    return float(value) / unit + 0.5 * opts.get("l2", 0.0) * float((w**2).sum())


CASES = [
    {},
    {"l2": 0.3},
    {"weight": [0.5, 1.0, 2.0, 1.5, 3.0], "ignore_index": 2},
    {"label_smoothing": 0.2, "temperature": 1.7},
    {"reduction": "sum", "log_base": 2},
    {"reduction": "none", "l2": 0.1},
    {"normalization": "batch_size", "chunk_elements": 1},
    {"chunk_elements": 12, "l2": 0.05, "label_smoothing": 0.1},
]


@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_value_and_parameter_gradients(opts, with_bias, with_sample_weight):
    x = RNG.standard_normal((N, D))
    w = RNG.standard_normal((C, D))
    b = RNG.standard_normal(C) if with_bias else None
    y = RNG.integers(0, C, size=N)
    y[1] = 2
    sw = RNG.random(N) + 0.1 if with_sample_weight else None
    res = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        y,
        features=x,
        weight=w,
        bias=b,
        options=opts,
        outputs=GRADS,
        sample_weight=sw,
    )
    expected = objective(x, w, b, y, opts=opts, sample_weight=sw)
    if opts.get("reduction") == "none":
        assert res.value is None
        assert res.sum + res.extras["penalty"] == pytest.approx(expected, rel=1e-12)
    else:
        assert res.value == pytest.approx(expected, rel=1e-12)
    if opts.get("l2"):
        assert res.extras["penalty"] == pytest.approx(0.5 * opts["l2"] * (w**2).sum(), rel=1e-12)
    assert res.outputs["per_sample"].shape == (N,)

    def f_x(xx: np.ndarray) -> float:
        return objective(xx, w, b, y, opts=opts, sample_weight=sw)

    def f_w(ww: np.ndarray) -> float:
        return objective(x, ww, b, y, opts=opts, sample_weight=sw)

    np.testing.assert_allclose(
        res.outputs["grad_features"], central_difference(f_x, x), rtol=1e-6, atol=1e-8
    )
    np.testing.assert_allclose(
        res.outputs["grad_weight"], central_difference(f_w, w), rtol=1e-6, atol=1e-8
    )
    b0 = b if b is not None else np.zeros(C)
    np.testing.assert_allclose(
        res.outputs["grad_bias"],
        central_difference(lambda bb: objective(x, w, bb, y, opts=opts, sample_weight=sw), b0),
        rtol=1e-6,
        atol=1e-8,
    )


@pytest.mark.parametrize("fmt", ["probabilities", "multi_hot"])
def test_dense_targets(fmt):
    x = RNG.standard_normal((N, D))
    w = RNG.standard_normal((C, D))
    if fmt == "probabilities":
        t = RNG.random((N, C))
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = (RNG.random((N, C)) > 0.5).astype(np.float64)
        t[0] = 0
    opts = {"target_format": fmt, "chunk_elements": 10}
    res = ce_engine.evaluate(
        "linear_cross_entropy", None, t, features=x, weight=w, options=opts, outputs=GRADS
    )
    assert res.value == pytest.approx(objective(x, w, None, t, fmt=fmt), rel=1e-12)
    np.testing.assert_allclose(
        res.outputs["grad_weight"],
        central_difference(lambda ww: objective(x, ww, None, t, fmt=fmt), w),
        rtol=1e-6,
        atol=1e-8,
    )


def test_float32_inputs_and_seed_formula():
    """Seed: dW = Xᵀ(P − Y)/N + λW for the plain mean."""
    x = RNG.standard_normal((64, 8)).astype(np.float32)
    w = RNG.standard_normal((10, 8)).astype(np.float32)
    y = RNG.integers(0, 10, size=64)
    res = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        y,
        features=x,
        weight=w,
        options={"l2": 0.01, "chunk_elements": 50},
        outputs=["grad_weight"],
    )
    z = x.astype(np.float64) @ w.T.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dw = (p - np.eye(10)[y]).T @ x.astype(np.float64) / 64 + 0.01 * w
    assert res.compute_dtype == "float32"
    np.testing.assert_allclose(res.outputs["grad_weight"], dw, rtol=1e-4, atol=1e-6)


def test_nan_policy_on_features():
    x = RNG.standard_normal((4, D))
    w = RNG.standard_normal((C, D))
    y = np.array([0, 1, 2, 3])
    x[2, 1] = np.nan
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("linear_cross_entropy", None, y, features=x, weight=w)
    assert info.value.errors[0].loc == ("features", 2, 1)
    omitted = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        y,
        features=x,
        weight=w,
        options={"nan_policy": "omit"},
        outputs=["grad_features"],
    )
    kept = ce_engine.evaluate(
        "linear_cross_entropy", None, y[[0, 1, 3]], features=x[[0, 1, 3]], weight=w
    )
    assert omitted.value == pytest.approx(kept.value) and omitted.ignored == 1
    assert np.all(omitted.outputs["grad_features"][2] == 0)


def test_bad_target_location_is_of_the_whole_batch():
    x = RNG.standard_normal((9, D))
    w = RNG.standard_normal((C, D))
    y = np.zeros(9, dtype=np.int64)
    y[7] = 99
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate(
            "linear_cross_entropy",
            None,
            y,
            features=x,
            weight=w,
            options={"chunk_elements": 2 * C},
        )
    assert info.value.errors[0].loc == ("targets", 7)


def test_input_errors():
    x, w, y = np.zeros((3, 2)), np.zeros((4, 2)), np.array([0, 1, 2])
    cases = [
        ({"features": None, "weight": w}, ("features",), "required"),
        ({"features": x, "weight": None}, ("weight",), "required"),
        ({"features": x, "weight": np.zeros((4, 3))}, ("weight",), "must have shape [C, 2]"),
        ({"features": x, "weight": w, "bias": np.zeros(3)}, ("bias",), "must have shape [4]"),
        ({"features": x[0], "weight": w}, ("features",), "2 dimension(s)"),
        ({"features": x.astype(bool), "weight": w}, ("features",), "numeric"),
    ]
    for kwargs, loc, msg in cases:
        with pytest.raises(InputValidationError) as info:
            ce_engine.evaluate("linear_cross_entropy", None, y, **kwargs)
        assert info.value.errors[0].loc == loc and msg in info.value.errors[0].msg
    with pytest.raises(InputValidationError, match="not logits"):
        ce_engine.evaluate("linear_cross_entropy", np.zeros((3, 4)), y, features=x, weight=w)
    with pytest.raises(InputValidationError, match="confusion_matrix is not supported for linear"):
        ce_engine.evaluate(
            "linear_cross_entropy", None, y, features=x, weight=w, metrics=["confusion_matrix"]
        )
    with pytest.raises(InputValidationError, match="only for linear-layer losses"):
        ce_engine.evaluate("cross_entropy", np.zeros((3, 4)), y, features=x)
    with pytest.raises(InputValidationError, match="not supported for linear_cross_entropy"):
        ce_engine.evaluate("linear_cross_entropy", None, y, features=x, weight=w, outputs=["grad"])
    with pytest.raises(InputValidationError, match="out of range"):
        ce_engine.evaluate("linear_cross_entropy", None, np.array([0, 1, 4]), features=x, weight=w)


def test_peak_memory_stays_below_the_logits():
    """The (N, C) logits are never formed whole: peak extra memory ≪ N·C·itemsize."""
    n, d, c = 512, 32, 4000
    x = RNG.standard_normal((n, d)).astype(np.float32)
    w = RNG.standard_normal((c, d)).astype(np.float32)
    y = RNG.integers(0, c, size=n)
    outputs = ["grad_features", "grad_weight", "grad_bias"]
    tracemalloc.start()
    try:
        ce_engine.evaluate(
            "linear_cross_entropy",
            None,
            y,
            features=x,
            weight=w,
            options={"chunk_elements": 1 << 16},
            outputs=outputs,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    logits_bytes = n * c * 4
    assert peak < 0.25 * logits_bytes + 2 * w.nbytes + x.nbytes


# ---- metrics, chunk by chunk -----------------------------------------------------------------

LINEAR_METRICS = ["accuracy", "top_k_accuracy", "nll", "perplexity", "entropy", "ece", "brier"]


def traced_peak(run: Callable[[], object]) -> int:
    """tracemalloc's peak of ``run()`` in bytes (NumPy reports its buffers to it)."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("n", "c"), [(512, 4000), (2048, 4000), (512, 16000)])
def test_metrics_add_at_most_a_chunk_and_o_of_n_plus_c_to_the_peak(n: int, c: int) -> None:
    """The metrics reduce inside the row chunks: extra peak ≤ two float64 chunks + 32 (N + C)
    bytes, nowhere near the N·C logits."""
    chunk = 1 << 16
    x = RNG.standard_normal((n, 32)).astype(np.float32)
    w = RNG.standard_normal((c, 32)).astype(np.float32)
    y = RNG.integers(0, c, size=n)

    def evaluate(metrics: list[str]) -> Callable[[], object]:
        return lambda: ce_engine.evaluate(
            "linear_cross_entropy",
            None,
            y,
            features=x,
            weight=w,
            options={"chunk_elements": chunk, "top_k": [5]},
            outputs=["grad_features", "grad_weight", "grad_bias"],
            metrics=metrics,
        )

    without = traced_peak(evaluate([]))
    with_metrics = traced_peak(evaluate(LINEAR_METRICS))
    assert with_metrics - without <= 2 * chunk * 8 + 32 * (n + c)
    assert with_metrics < 0.25 * n * c * 4 + 2 * w.nbytes + x.nbytes


@pytest.mark.filterwarnings("ignore:.k. .* greater than or equal to .n_classes.")
@pytest.mark.parametrize("chunk_elements", [1, 3 * 6, 10**6])  # 1 row, 3 rows, one chunk
@pytest.mark.parametrize("case", ["plain", "weighted_ignored", "bits_temperature"])
def test_metrics_from_chunks_match_sklearn_on_the_full_logits(
    chunk_elements: int, case: str
) -> None:
    from tests.test_metrics import check_against_sklearn, softmax

    n, d, c = 40, 4, 6
    x = RNG.standard_normal((n, d))
    w = RNG.standard_normal((c, d))
    b = RNG.standard_normal(c)
    y = RNG.integers(0, c, size=n)
    opts: dict = {"chunk_elements": chunk_elements, "top_k": [1, 2, 6]}
    sw = None
    if case == "weighted_ignored":
        y[::4] = -100
        sw = RNG.uniform(0.1, 2.0, size=n)
    if case == "bits_temperature":
        opts.update(log_base=2, temperature=1.7)
    res = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        y,
        features=x,
        weight=w,
        bias=b,
        options=opts,
        metrics=[*LINEAR_METRICS, "mce", "reliability"],
        sample_weight=sw,
        backend="numpy",
    )
    keep = y != -100
    z = (x @ w.T + b) / opts.get("temperature", 1.0)
    check_against_sklearn(
        res.metrics,
        y[keep],
        softmax(z[keep]),
        None if sw is None else sw[keep],
        log_base="2" if case == "bits_temperature" else "e",
    )
    assert res.metric_state is not None and res.metric_state.stats["count"] == int(keep.sum())


def test_metrics_from_chunks_equal_cross_entropy_on_materialised_logits() -> None:
    """The chunked path equals the general path on the same logits (float64)."""
    n, d, c = 33, 5, 7
    x = RNG.standard_normal((n, d))
    w = RNG.standard_normal((c, d))
    q = RNG.random((n, c)) ** 2
    q /= q.sum(axis=1, keepdims=True)
    x[[3, 20], 1] = np.nan  # nan_policy omit drops rows of features
    opts = {"nan_policy": "omit", "n_bins": 7}
    names = ["nll", "perplexity", "entropy", "brier", "accuracy", "ece"]
    chunked = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        q,
        features=x,
        weight=w,
        options={**opts, "chunk_elements": 2 * c},
        metrics=names,
    )
    z = np.where(np.isnan(x), np.nan, x) @ w.T
    full = ce_engine.evaluate("cross_entropy", z, q, options=opts, metrics=names)
    assert chunked.metrics.keys() == full.metrics.keys()
    for name in names:
        assert chunked.metrics[name] == pytest.approx(full.metrics[name], rel=1e-12), name


def test_metrics_of_no_rows_are_the_empty_state() -> None:
    res = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        np.zeros(0, dtype=np.int64),
        features=np.zeros((0, 3)),
        weight=np.ones((4, 3)),
        metrics=["accuracy", "top_k_accuracy"],
    )
    assert res.metrics == {"accuracy": None, "top_k_accuracy": {"1": None}}


def test_metric_errors_are_raised_before_any_chunk_and_located_in_the_batch() -> None:
    x = RNG.standard_normal((6, 2))
    w = RNG.standard_normal((3, 2))
    y = np.array([0, 1, 2, 0, 7, 1])
    with pytest.raises(InputValidationError) as err:  # error location in the whole batch
        ce_engine.evaluate(
            "linear_cross_entropy",
            None,
            y,
            features=x,
            weight=w,
            options={"chunk_elements": 6},
            metrics=["accuracy"],
        )
    assert err.value.errors[0].loc == ("targets", 4)
    multi_hot = RNG.random((6, 3)) < 0.5
    with pytest.raises(InputValidationError) as err:
        ce_engine.evaluate(
            "linear_cross_entropy",
            None,
            multi_hot,
            features=x,
            weight=w,
            metrics=["nll", "accuracy"],
        )
    assert [e.loc for e in err.value.errors] == [("metrics", 1)]
