"""GPU (CuPy) results vs the NumPy path: the fused CUDA kernels and the engine on ``cupy``.

Run with ``pytest -m gpu`` on a machine with a CUDA device; elsewhere every test skips and
says why. Inputs are fresh random data (never zeros); outputs are poisoned before in-place use.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import ce_engine
from ce_engine.backend import cupy_status
from ce_engine.kernels import cpu, cuda

CUPY, CUPY_REASON = cupy_status()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUPY is None, reason=f"needs CuPy and a CUDA device: {CUPY_REASON}"),
]
RNG = np.random.default_rng(77)
ALL_OUTPUTS = ["per_sample", "grad", "probabilities", "log_probabilities"]
SHAPES = [(1, 1), (33, 10), (64, 1000), (5, 1025), (3, 32000), (2, 128256)]
OPTION_CASES = [
    {},
    {"weight": "random", "ignore_index": 1},
    {"label_smoothing": 0.1, "temperature": 0.7},
    {"weight": "random", "label_smoothing": 0.2, "temperature": 1.5, "ignore_index": 0},
]


def host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def bf16_words(z: np.ndarray) -> np.ndarray:
    return z.astype(ml_dtypes.bfloat16).view(np.uint16)


@pytest.mark.parametrize(("m", "c"), SHAPES)
@pytest.mark.parametrize("opts", OPTION_CASES)
def test_engine_on_cupy_matches_numpy(m, c, opts):
    z = (RNG.standard_normal((m, c)) * 3).astype(np.float32)
    y = RNG.integers(0, c, size=m)
    if m > 2:
        y[:2] = [0, 1 % c]
    options = dict(opts)
    if options.get("weight") == "random":
        options["weight"] = (RNG.random(c) + 0.1).tolist()
    sw = (RNG.random(m) + 0.5).astype(np.float32)
    kwargs = {"options": options, "outputs": ALL_OUTPUTS, "sample_weight": sw}
    on_gpu = ce_engine.evaluate("cross_entropy", z, y, backend="cupy", **kwargs)
    on_cpu = ce_engine.evaluate("cross_entropy", z, y, backend="numpy", **kwargs)
    assert on_gpu.backend == "cupy"
    assert on_gpu.count == on_cpu.count
    assert on_gpu.denominator == pytest.approx(on_cpu.denominator, rel=1e-6)
    assert on_gpu.value == pytest.approx(on_cpu.value, rel=1e-5, abs=1e-6)
    for key in ALL_OUTPUTS:
        np.testing.assert_allclose(
            host(on_gpu.outputs[key]), on_cpu.outputs[key], rtol=1e-4, atol=1e-6, err_msg=key
        )


@pytest.mark.parametrize(("m", "c"), SHAPES)
@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16"])
def test_ce_kernel_dtypes_match_numpy(m, c, kind):
    cp = CUPY
    z = (RNG.standard_normal((m, c)) * 4).astype(np.float32)
    if kind == "float16":
        dev, widened = cp.asarray(z.astype(np.float16)), z.astype(np.float16).astype(np.float32)
    elif kind == "bfloat16":
        words = bf16_words(z)
        dev, widened = cp.asarray(words), z.astype(ml_dtypes.bfloat16).astype(np.float32)
    else:
        dev, widened = cp.asarray(z), z
    y = RNG.integers(0, c, size=m)
    valid = RNG.random(m) > 0.2
    w = (RNG.random(c) + 0.2).astype(np.float32)
    kwargs = {"label_smoothing": 0.1, "temperature": 1.3, "grad_scale": 0.25}
    got = cuda.softmax_cross_entropy_rows(
        dev, cp.asarray(y), cp.asarray(valid), weight=cp.asarray(w), probabilities=True, **kwargs
    )
    ref = cpu.softmax_cross_entropy_rows(widened, y, valid, weight=w, probabilities=True, **kwargs)
    np.testing.assert_allclose(host(got.per_sample), ref.per_sample, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(host(got.valid_weight), ref.valid_weight, rtol=1e-6)
    for key in ("grad", "probabilities"):
        np.testing.assert_allclose(
            host(got.arrays[key]), ref.arrays[key], rtol=1e-4, atol=1e-7, err_msg=key
        )


@pytest.mark.parametrize("c", [10, 5000, 128256])
def test_ce_kernel_in_place_and_every_element_written(c):
    cp = CUPY
    z = RNG.standard_normal((7, c)).astype(np.float32)
    y = RNG.integers(0, c, size=7)
    ref = cpu.softmax_cross_entropy_rows(z, y, grad_scale=1.0, label_smoothing=0.1)
    work = cp.asarray(z)
    got = cuda.softmax_cross_entropy_rows(
        work, cp.asarray(y), grad_scale=1.0, label_smoothing=0.1, grad_out=work
    )
    np.testing.assert_allclose(host(work), ref.arrays["grad"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(host(got.per_sample), ref.per_sample, rtol=1e-5)
    poisoned = cp.full((7, c), cp.nan, dtype=cp.float32)
    cuda.softmax_cross_entropy_rows(cp.asarray(z), cp.asarray(y), grad_scale=1.0, grad_out=poisoned)
    assert bool(cp.isfinite(poisoned).all())


def test_ce_kernel_extremes():
    cp = CUPY
    z = np.array([[1e30, -1e30, 0.0], [0.0, -np.inf, 1.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    y = np.array([1, 2, 0])
    for eps in (0.0, 0.2):
        ref = cpu.softmax_cross_entropy_rows(z, y, grad_scale=1.0, label_smoothing=eps)
        got = cuda.softmax_cross_entropy_rows(
            cp.asarray(z), cp.asarray(y), grad_scale=1.0, label_smoothing=eps
        )
        np.testing.assert_allclose(host(got.per_sample), ref.per_sample, rtol=1e-5)
        assert bool(cp.isfinite(got.arrays["grad"]).all())
        np.testing.assert_allclose(host(got.arrays["grad"]), ref.arrays["grad"], atol=1e-6)


@pytest.mark.parametrize(("m", "c"), [(1, 1), (40, 7), (9, 3000)])
@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16"])
def test_bce_kernel_matches_numpy(m, c, kind):
    cp = CUPY
    z = (RNG.standard_normal((m, c)) * 6).astype(np.float32)
    z.flat[0] = np.inf if m * c > 1 else z.flat[0]
    t = (RNG.random((m, c)) > 0.5).astype(np.float32)
    if m * c > 1:
        t.flat[0] = 1.0  # +inf logit on a positive label: loss 0
    pw = (RNG.random(c) * 2).astype(np.float32)
    v = RNG.random((m, c)).astype(np.float32)
    if kind == "bfloat16":
        dev, widened = cp.asarray(bf16_words(z)), z.astype(ml_dtypes.bfloat16).astype(np.float32)
    elif kind == "float16":
        dev, widened = cp.asarray(z.astype(np.float16)), z.astype(np.float16).astype(np.float32)
    else:
        dev, widened = cp.asarray(z), z
    kwargs = {"label_smoothing": 0.05, "grad_scale": 0.5, "probabilities": True}
    got = cuda.binary_cross_entropy_rows(
        dev, cp.asarray(t), pos_weight=cp.asarray(pw), element_weight=cp.asarray(v), **kwargs
    )
    ref = cpu.binary_cross_entropy_rows(widened, t, pos_weight=pw, element_weight=v, **kwargs)
    np.testing.assert_allclose(host(got.per_sample), ref.per_sample, rtol=1e-4, atol=1e-5)
    for key in ("grad", "probabilities"):
        np.testing.assert_allclose(host(got.arrays[key]), ref.arrays[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("m", "c"), [(1, 1), (300, 10), (50, 2000)])
def test_metrics_pass_matches_numpy(m, c):
    cp = CUPY
    z = RNG.standard_normal((m, c)).astype(np.float32)
    z[: min(m, 5), : min(c, 3)] = 2.5  # ties
    y = RNG.integers(0, c, size=m)
    got = cuda.classification_pass(cp.asarray(z), cp.asarray(y), n_bins=15)
    ref = cpu.softmax_row_stats(z, y, want=frozenset({"confidence", "rank"}))
    np.testing.assert_array_equal(host(got["prediction"]), ref["prediction"])
    np.testing.assert_array_equal(host(got["rank"]), ref["rank"])
    np.testing.assert_allclose(host(got["confidence"]), ref["confidence"], rtol=1e-5)
    ref_bin = np.clip(np.ceil(ref["confidence"] * 15).astype(int) - 1, 0, 14)
    # a confidence within rounding of a bin edge may fall either side
    assert np.mean(host(got["bin"]) == ref_bin) > 0.99


def test_bfloat16_goes_to_the_device_as_words():
    z = RNG.standard_normal((16, 50)).astype(ml_dtypes.bfloat16)
    y = RNG.integers(0, 50, size=16)
    on_gpu = ce_engine.evaluate("cross_entropy", z, y, backend="cupy", outputs=["grad"])
    on_cpu = ce_engine.evaluate("cross_entropy", z, y, backend="numpy", outputs=["grad"])
    assert on_gpu.value == pytest.approx(on_cpu.value, rel=1e-5)
    np.testing.assert_allclose(host(on_gpu.outputs["grad"]), on_cpu.outputs["grad"], atol=1e-6)


def _assert_tree_close(got, want, rtol):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            _assert_tree_close(got[key], want[key], rtol)
    elif isinstance(want, list):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _assert_tree_close(a, b, rtol)
    elif want is None or isinstance(want, str):
        assert got == want
    else:
        assert got == pytest.approx(want, rel=rtol, abs=1e-9)


@pytest.mark.parametrize("loss", ["binary_cross_entropy", "focal", "cross_entropy"])
def test_metric_families_on_cupy_match_numpy(loss):
    from ce_engine.metrics import BINARY_METRICS, SOFTMAX_METRICS

    z = (RNG.integers(-6, 7, size=(500, 6)) / 3.0).astype(np.float64)  # ties for the ranking
    if loss == "cross_entropy":
        names, y = list(SOFTMAX_METRICS), RNG.integers(0, 6, size=500)
        y[:7] = -100
    else:
        names, y = list(BINARY_METRICS), (RNG.random((500, 6)) < 0.3).astype(np.float64)
        y[:, 5] = 0.0  # undefined AUROC: null + warnings on both backends
    sw = RNG.random(500) + 0.5
    kwargs = {"metrics": names, "sample_weight": sw, "options": {"n_thresholds": 64}}
    on_gpu = ce_engine.evaluate(loss, z, y, backend="cupy", **kwargs)
    on_cpu = ce_engine.evaluate(loss, z, y, backend="numpy", **kwargs)
    assert on_gpu.backend == "cupy"
    _assert_tree_close(on_gpu.metrics, on_cpu.metrics, 1e-12)  # exact ranking included
    _assert_tree_close(on_gpu.metric_state.compute(), on_cpu.metric_state.compute(), 1e-12)


def test_linear_cross_entropy_metrics_on_cupy_match_numpy():
    x = RNG.standard_normal((300, 16)).astype(np.float32)
    w = RNG.standard_normal((500, 16)).astype(np.float32)
    y = RNG.integers(0, 500, size=300)
    names = ["accuracy", "top_k_accuracy", "nll", "perplexity", "entropy", "ece", "brier"]
    kwargs = {"features": x, "weight": w, "metrics": names, "options": {"chunk_elements": 5000}}
    on_gpu = ce_engine.evaluate("linear_cross_entropy", None, y, backend="cupy", **kwargs)
    on_cpu = ce_engine.evaluate("linear_cross_entropy", None, y, backend="numpy", **kwargs)
    _assert_tree_close(on_gpu.metrics, on_cpu.metrics, 2e-5)
