"""CPU fast paths vs the xp-generic reference path and plain float64 references.

Covers shapes around chunk boundaries, thread counts, dtypes, every CE option, outputs and
reductions, in-place gradients, and the BCE and metrics kernels.
"""

from __future__ import annotations

import importlib
import math
import threading

import ml_dtypes
import numpy as np
import pytest

import ce_engine
from ce_engine.kernels import cpu
from tests.reference import central_difference, softmax_ce

# the module (the package re-exports a function of the same name)
ce_module = importlib.import_module("ce_engine.losses.cross_entropy")
RNG = np.random.default_rng(20261123)
ALL_OUTPUTS = ["per_sample", "grad", "probabilities", "log_probabilities"]


def reference_path(monkeypatch: pytest.MonkeyPatch, *args, **kwargs):
    """``evaluate`` with the fused kernel switched off (the xp-generic loss code)."""
    with monkeypatch.context() as m:
        m.setattr(ce_module, "fast_index_cross_entropy", lambda *a: None)
        return ce_engine.evaluate(*args, **kwargs)


def count_calls(monkeypatch: pytest.MonkeyPatch, kernel: str) -> list[int]:
    """Counts calls of ``cpu.<kernel>`` (so a test knows the fast path ran)."""
    calls: list[int] = []
    original = getattr(cpu, kernel)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu, kernel, counting)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return count_calls(monkeypatch, "softmax_cross_entropy_rows")


def assert_same_result(fast, ref, rtol: float = 2e-5, atol: float = 1e-6) -> None:
    assert fast.count == ref.count and fast.ignored == ref.ignored
    assert fast.denominator == pytest.approx(ref.denominator, rel=1e-6)
    assert fast.sum == pytest.approx(ref.sum, rel=rtol, abs=atol)
    if ref.value is None:
        assert fast.value is None
    else:
        assert fast.value == pytest.approx(ref.value, rel=rtol, abs=atol)
    assert set(fast.outputs) == set(ref.outputs)
    for key, arr in ref.outputs.items():
        assert fast.outputs[key].shape == arr.shape, key
        assert fast.outputs[key].dtype == arr.dtype, key
        np.testing.assert_allclose(fast.outputs[key], arr, rtol=rtol, atol=atol, err_msg=key)


OPTION_CASES = [
    {},
    {"weight": "random"},
    {"weight": "with_zero"},
    {"ignore_index": 1},
    {"label_smoothing": 0.1},
    {"temperature": 0.6},
    {"weight": "random", "ignore_index": 0, "label_smoothing": 0.25, "temperature": 1.7},
]


def make_options(opts: dict, c: int) -> dict:
    out = dict(opts)
    if opts.get("weight") == "random":
        out["weight"] = (RNG.random(c) + 0.1).tolist()
    elif opts.get("weight") == "with_zero":
        w = RNG.random(c) + 0.1
        w[:: max(1, c // 3)] = 0.0
        out["weight"] = w.tolist()
    return out


@pytest.mark.parametrize(
    ("m", "c"), [(1, 1), (5, 3), (37, 10), (300, 64), (129, 65), (70, 1000), (3, 40_000)]
)
@pytest.mark.parametrize("opts", OPTION_CASES)
def test_fast_path_matches_reference_path(monkeypatch, kernel_calls, m, c, opts):
    z = (RNG.standard_normal((m, c)) * 4).astype(np.float32)
    y = RNG.integers(0, c, size=m)
    if m > 2:
        y[1] = 1 % c  # hit ignore_index 1 / 0 where present
        y[2] = 0
    sw = (RNG.random(m) + 0.2).astype(np.float32)
    options = make_options(opts, c)
    for reduction, normalization in [("mean", "valid"), ("sum", "valid"), ("none", "valid")]:
        kwargs = {
            "options": {**options, "reduction": reduction, "normalization": normalization},
            "outputs": ALL_OUTPUTS,
            "sample_weight": sw if reduction != "sum" else None,
            "backend": "numpy",
        }
        fast = ce_engine.evaluate("cross_entropy", z, y, **kwargs)
        ref = reference_path(monkeypatch, "cross_entropy", z, y, **kwargs)
        assert_same_result(fast, ref)
    assert len(kernel_calls) == 3


@pytest.mark.parametrize("normalization", ["valid", "batch_size", "all", "none"])
@pytest.mark.parametrize("log_base", ["e", "2"])
def test_folded_gradient_scale_all_normalizations(
    monkeypatch, kernel_calls, normalization, log_base
):
    z = RNG.standard_normal((4, 3, 7)).astype(np.float32)
    y = RNG.integers(0, 7, size=(4, 3))
    y[0, 0] = -100
    kwargs = {
        "options": {"normalization": normalization, "log_base": log_base, "weight": [2.0] * 7},
        "outputs": ["grad", "per_sample"],
        "backend": "numpy",
    }
    assert_same_result(
        ce_engine.evaluate("cross_entropy", z, y, **kwargs),
        reference_path(monkeypatch, "cross_entropy", z, y, **kwargs),
    )
    batchmean = {**kwargs, "options": {"reduction": "batchmean"}}
    assert_same_result(
        ce_engine.evaluate("cross_entropy", z, y, **batchmean),
        reference_path(monkeypatch, "cross_entropy", z, y, **batchmean),
    )
    assert kernel_calls


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("class_axis", [-1, 1])
def test_dtypes_and_layouts_against_float64_reference(kernel_calls, dtype, class_axis):
    shape = (6, 9, 4) if class_axis == 1 else (6, 4, 9)
    z = (RNG.standard_normal(shape) * 3).astype(dtype)
    y = RNG.integers(0, 9, size=(6, 4))
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        options={"class_axis": class_axis, "label_smoothing": 0.05},
        outputs=["per_sample", "grad"],
        backend="numpy",
    )
    assert kernel_calls and res.compute_dtype == "float32"
    rows = np.moveaxis(z.astype(np.float64), class_axis, -1).reshape(-1, 9)
    per, den, _ = softmax_ce(rows, y.reshape(-1), fmt="index", label_smoothing=0.05)
    np.testing.assert_allclose(res.outputs["per_sample"].reshape(-1), per, rtol=1e-5, atol=1e-6)
    assert res.value == pytest.approx(per.sum() / den.sum(), rel=1e-5)

    def reduced(flat: np.ndarray) -> float:
        p, d, _ = softmax_ce(flat, y.reshape(-1), fmt="index", label_smoothing=0.05)
        return float(p.sum() / d.sum())

    grad_rows = np.moveaxis(res.outputs["grad"], class_axis, -1).reshape(-1, 9)
    np.testing.assert_allclose(grad_rows, central_difference(reduced, rows), atol=2e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("chunk_bytes", [4, 1000, cpu.DEFAULT_CHUNK_BYTES])
@pytest.mark.parametrize("c", [7, 500])
def test_threads_and_chunks_do_not_change_results(threads, chunk_bytes, c):
    m = 2000 if c == 7 else 300  # above MIN_PARALLEL_ELEMENTS: the pool really runs
    z = RNG.standard_normal((m, c)).astype(np.float32)
    y = RNG.integers(0, c, size=m)
    valid = RNG.random(m) > 0.1
    w = (RNG.random(c) + 0.5).astype(np.float32)
    kwargs = {"weight": w, "label_smoothing": 0.1, "temperature": 1.3, "grad_scale": 0.5}
    base = cpu.softmax_cross_entropy_rows(z, y, valid, **kwargs, threads=1, chunk_bytes=1 << 30)
    got = cpu.softmax_cross_entropy_rows(
        z, y, valid, **kwargs, threads=threads, chunk_bytes=chunk_bytes, probabilities=True
    )
    np.testing.assert_allclose(got.per_sample, base.per_sample, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.arrays["grad"], base.arrays["grad"], rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(got.valid_weight, base.valid_weight)
    # every element written (outputs come from np.empty)
    assert np.isfinite(got.arrays["grad"]).all() and np.isfinite(got.arrays["probabilities"]).all()
    np.testing.assert_allclose(got.arrays["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(got.arrays["grad"][~valid] == 0) and np.all(got.per_sample[~valid] == 0)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("c", [6, 700])
def test_given_row_max_matches_float64_reference(c, in_place):
    """``row_max`` from the caller skips the chunks' max pass; rows whose max is moderate take
    exp(z) unshifted, others (here +200 and −100) the shifted path: all match float64."""
    m = 400
    z = RNG.standard_normal((m, c)).astype(np.float32)
    z[::7] += 200.0
    z[3::7] -= 100.0
    y = RNG.integers(0, c, size=m)
    z64 = z.astype(np.float64)
    shifted = z64 - z64.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    want_loss = -log_p[np.arange(m), y]
    want_grad = np.exp(log_p)
    want_grad[np.arange(m), y] -= 1.0
    for rows in (z, z[::7] - 200.0):  # mixed rows, then moderate rows only (one exp pass)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        k = rows.shape[0]
        work = rows.copy()
        got = cpu.softmax_cross_entropy_rows(
            work,
            y[::7][:k] if k < m else y,
            grad_scale=1.0,
            row_max=rows.max(axis=1),
            grad_out=work if in_place else None,
            threads=2,
            chunk_bytes=4096,
        )
        sel = slice(None) if k == m else slice(None, None, 7)
        np.testing.assert_allclose(got.per_sample, want_loss[sel], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.arrays["grad"], want_grad[sel], atol=1e-6)
        assert (got.arrays["grad"] is work) == in_place


@pytest.mark.parametrize("c", [5, 3000])
def test_in_place_gradient_overwrites_logits(c):
    z = RNG.standard_normal((50, c)).astype(np.float32)
    y = RNG.integers(0, c, size=50)
    kwargs = {"label_smoothing": 0.2, "temperature": 0.8, "grad_scale": 1 / 50}
    expected = cpu.softmax_cross_entropy_rows(z, y, **kwargs)
    work = z.copy()
    got = cpu.softmax_cross_entropy_rows(work, y, **kwargs, grad_out=work)
    assert got.arrays["grad"] is work
    np.testing.assert_allclose(work, expected.arrays["grad"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.per_sample, expected.per_sample, rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("c", [3, 100])
def test_minus_inf_and_huge_logits(smoothing, c):
    z = (RNG.standard_normal((4, c)) * 1e30).astype(np.float32)
    z[0, 1] = -np.inf
    z[1, :] = 1e4
    y = np.array([0, 2, 1, 0])
    w = np.ones(c)
    w[1] = 0.0  # the masked class carries no weight: its terms count 0
    for weight in (None, w.tolist()):
        # smoothing without a zero weight puts mass on the −inf class: ℓ_0 = +inf, answered
        # under nan_policy propagate (raise would make it a 422)
        res = ce_engine.evaluate(
            "cross_entropy",
            z,
            y,
            options={"label_smoothing": smoothing, "weight": weight, "nan_policy": "propagate"},
            outputs=["per_sample", "grad"],
            backend="numpy",
        )
        per, _, _ = softmax_ce(
            z.astype(np.float64), y, fmt="index", weight=weight, label_smoothing=smoothing
        )
        assert np.isfinite(res.outputs["grad"]).all()
        np.testing.assert_allclose(res.outputs["per_sample"], per, rtol=1e-5)
        if weight is None:  # row 1 is uniform: ℓ = log C whatever the smoothing
            assert res.outputs["per_sample"][1] == pytest.approx(math.log(c), rel=1e-5)
    target_masked = ce_engine.evaluate(
        "cross_entropy",
        z[:1],
        np.array([1]),
        options={"nan_policy": "propagate"},
        outputs=["per_sample"],
        backend="numpy",
    )
    assert target_masked.outputs["per_sample"][0] == math.inf
    assert target_masked.non_finite == {"count": 1, "positions": [[0]]}
    with pytest.raises(ce_engine.InputValidationError) as info:
        ce_engine.evaluate("cross_entropy", z[:1], np.array([1]), backend="numpy")
    assert info.value.errors[0].type == "non_finite_result"
    assert info.value.errors[0].loc == ("logits", 0)


def test_nan_policy_row_max_screen():
    z = RNG.standard_normal((6, 4)).astype(np.float32)
    y = RNG.integers(0, 4, size=6)
    for bad in (np.nan, np.inf):
        zz = z.copy()
        zz[4, 2] = bad
        with pytest.raises(ce_engine.InputValidationError) as info:
            ce_engine.evaluate("cross_entropy", zz, y, backend="numpy")
        assert info.value.errors[0].loc == ("logits", 4, 2)
    zz = z.copy()
    zz[3] = -np.inf
    with pytest.raises(ce_engine.InputValidationError, match="all logits"):
        ce_engine.evaluate("cross_entropy", zz, y, backend="numpy")
    omitted = ce_engine.evaluate(
        "cross_entropy", zz, y, options={"nan_policy": "omit"}, backend="numpy"
    )
    assert omitted.ignored == 1


def bce_reference(z, t, pw, v, eps):
    """Plain float64 BCE: −[pw·y·log σ(z) + (1 − y)·log(1 − σ(z))], y smoothed."""
    z = z.astype(np.float64)
    y = t * (1 - eps) + eps / 2
    log_sig = -np.logaddexp(0, -z)
    log_one_minus = -np.logaddexp(0, z)
    return -(v * (pw * y * log_sig + (1 - y) * log_one_minus))


@pytest.mark.parametrize(("m", "c"), [(1, 1), (9, 5), (300, 300)])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("threads", [1, 2])
def test_binary_cross_entropy_rows(m, c, with_weights, eps, threads):
    z = (RNG.standard_normal((m, c)) * 5).astype(np.float32)
    z.flat[0] = 60.0
    t = (RNG.random((m, c)) > 0.6).astype(np.float32)
    pw = (RNG.random(c) * 3).astype(np.float32) if with_weights else None
    v = RNG.random((m, c)).astype(np.float32) if with_weights else None
    out = cpu.binary_cross_entropy_rows(
        z,
        t,
        pos_weight=pw,
        element_weight=v,
        label_smoothing=eps,
        grad_scale=0.5,
        probabilities=True,
        threads=threads,
        chunk_bytes=256,
    )
    pw64 = np.ones(c) if pw is None else pw.astype(np.float64)
    v64 = np.ones((m, c)) if v is None else v.astype(np.float64)
    ref = bce_reference(z, t, pw64, v64, eps)
    np.testing.assert_allclose(out.per_sample, ref.sum(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        out.arrays["probabilities"], 1 / (1 + np.exp(-z.astype(float))), rtol=1e-6
    )
    if m * c <= 100:
        expected = central_difference(
            lambda zz: float(bce_reference(zz, t, pw64, v64, eps).sum()), z
        )
    else:  # ∂ℓ/∂z = v·((pw·y + 1 − y)·σ(z) − pw·y), checked by differences above
        y = t * (1 - eps) + eps / 2
        sig = 1 / (1 + np.exp(-z.astype(np.float64)))
        expected = v64 * ((pw64 * y + 1 - y) * sig - pw64 * y)
    np.testing.assert_allclose(out.arrays["grad"], 0.5 * expected, rtol=1e-4, atol=1e-5)


def test_binary_cross_entropy_extremes_and_in_place():
    z = np.array([[1e4, -1e4, np.inf, -np.inf, 0.0]], dtype=np.float32)
    t = np.array([[1.0, 0.0, 1.0, 0.0, 1.0]], dtype=np.float32)
    out = cpu.binary_cross_entropy_rows(z, t, grad_scale=1.0)
    assert out.per_sample[0] == pytest.approx(math.log(2), rel=1e-6)
    np.testing.assert_allclose(out.arrays["grad"], [[0, 0, 0, 0, -0.5]], atol=1e-7)
    work = z.copy()
    cpu.binary_cross_entropy_rows(work, t, grad_scale=1.0, grad_out=work)
    np.testing.assert_array_equal(work, out.arrays["grad"])
    wrong = cpu.binary_cross_entropy_rows(z, 1 - t)
    assert wrong.per_sample[0] == math.inf


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("c", [1, 6, 200])
def test_softmax_row_stats_against_float64_reference(c, temperature, dtype):
    m = 300
    z = RNG.standard_normal((m, c)).astype(dtype)
    z[:10, : min(c, 3)] = 1.0  # ties: argmax takes the first, the rank counts larger ids first
    y = RNG.integers(0, c, size=m)
    y[:20] = 0
    if c > 2:
        z[10:20, 1] = -np.inf  # p = 0 entries: 0·log 0 = 0 in the entropy
    got = cpu.softmax_row_stats(z, y, temperature=temperature, threads=2, chunk_bytes=4096)
    s = (z.astype(np.float64) - z.max(axis=1, keepdims=True)) / temperature
    p = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    r = np.arange(m)
    np.testing.assert_array_equal(got["prediction"], np.argmax(z, axis=1))
    for i in range(m):  # sklearn: descending score, the larger id first among ties
        order = sorted(range(c), key=lambda j: (-float(z[i, j]), -j))
        assert got["rank"][i] == order.index(y[i])
    tol = {"rtol": 2e-5 if dtype == np.float32 else 1e-12, "atol": 1e-6}
    np.testing.assert_allclose(got["confidence"], p.max(axis=1), **tol)
    np.testing.assert_allclose(got["nll"], -np.log(p[r, y]), **tol)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)
    np.testing.assert_allclose(got["entropy"], -plogp.sum(axis=1), **tol)
    np.testing.assert_allclose(
        got["brier"], ((p - np.eye(c)[y]) ** 2).sum(axis=1), rtol=1e-4, atol=1e-6
    )
    assert got["nll"].dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [6, 1000, 32000])
def test_softmax_row_stats_of_a_row_do_not_depend_on_its_batch(c, dtype):
    """A row's statistics are the same bits whether it comes alone, in a batch of 5 or 7, or
    with all the others (a run's pushes in any batch size add up to the whole set's)."""
    m = max(64, 400_000 // c)
    z = (RNG.standard_normal((m, c)) * 2).astype(dtype)
    y = RNG.integers(0, c, size=m)
    whole = cpu.softmax_row_stats(z, y)
    for name, values in cpu.softmax_row_stats(np.asfortranarray(z), y).items():
        np.testing.assert_array_equal(values, whole[name], err_msg=f"{name}, column-major")
    for size in (1, 5, 7):
        parts = [cpu.softmax_row_stats(z[i : i + size], y[i : i + size]) for i in range(0, m, size)]
        for name, values in whole.items():
            got = np.concatenate([part[name] for part in parts])
            np.testing.assert_array_equal(got, values, err_msg=f"{name}, batches of {size}")


@pytest.mark.parametrize("c", [6, 1000, 32000])
def test_loss_rows_of_a_row_do_not_depend_on_its_batch(c):
    """The fused losses' per-row sums (softmax with class weights and smoothing, sigmoid with
    element weights) are the same bits alone, in batches of 5 or 7, or with all rows."""
    m = max(64, 400_000 // c)
    z = (RNG.standard_normal((m, c)) * 2).astype(np.float32)
    y = RNG.integers(0, c, size=m)
    t = (RNG.random((m, c)) < 0.3).astype(np.float32)
    v = RNG.uniform(0.5, 2.0, size=(m, c)).astype(np.float32)
    w = RNG.uniform(0.5, 2.0, size=c)
    kernels = {
        "softmax": lambda a, b: (
            cpu.softmax_cross_entropy_rows(z[a:b], y[a:b], weight=w, label_smoothing=0.1).per_sample
        ),
        "sigmoid": lambda a, b: (
            cpu.binary_cross_entropy_rows(
                z[a:b], t[a:b], element_weight=v[a:b], label_smoothing=0.1
            ).per_sample
        ),
    }
    for name, rows in kernels.items():
        whole = rows(0, m)
        for size in (1, 5, 7):
            got = np.concatenate([rows(i, i + size) for i in range(0, m, size)])
            np.testing.assert_array_equal(got, whole, err_msg=f"{name}, batches of {size}")


@pytest.mark.parametrize("shape", [(12000, 7), (300, 500), (40, 3000), (50, 9)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_max_every_branch(monkeypatch, shape, threads):
    """One NumPy call, transposed small-C chunks, threaded row blocks: all equal np.max,
    NaN rows included."""
    z = RNG.standard_normal(shape).astype(np.float32)
    z[5, 1] = np.nan
    z[7] = -np.inf
    for limit in (cpu.PARALLEL_REDUCTION_ELEMENTS, 1):  # 1: every input takes the threads
        monkeypatch.setattr(cpu, "PARALLEL_REDUCTION_ELEMENTS", limit)
        np.testing.assert_array_equal(cpu.row_max(z, threads=threads), z.max(axis=1))


def test_concurrent_calls_with_different_pool_sizes():
    """Calls from several threads needing different pool sizes never see a shut-down pool."""
    errors: list[str] = []

    def worker(rows: int, threads: int) -> None:
        z = np.zeros((rows, 1024), np.float32)  # 128 rows per chunk: 2 and 3 chunks
        y = np.zeros(rows, np.int64)
        for _ in range(100):
            try:
                cpu.softmax_cross_entropy_rows(z, y, threads=threads)
            except Exception as exc:  # any error fails the test
                errors.append(repr(exc))
                return

    workers = [threading.Thread(target=worker, args=args) for args in ((256, 2), (384, 3))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []


def test_thread_setting():
    cpu.set_threads(3)
    try:
        assert cpu.get_threads() == 3
    finally:
        cpu.set_threads(None)
    assert cpu.get_threads() >= 1
    with pytest.raises(ValueError):
        cpu.set_threads(0)


def test_cuda_module_imports_and_declines_host_arrays():
    """The CUDA module imports without CuPy; host arrays never take the device path."""
    from ce_engine.kernels import cuda

    assert not cuda.is_device_array(np.zeros((2, 3), np.float32))
    assert "ce_rows_block<2>" in cuda._KERNEL_NAMES
    assert all(
        f"__global__ void {name.split('<')[0]}" in cuda.SOURCE for name in cuda._KERNEL_NAMES
    )


@pytest.mark.parametrize("policy", ["omit", "propagate"])
def test_nan_policies_and_all_ignored_match_reference_path(monkeypatch, kernel_calls, policy):
    z = RNG.standard_normal((6, 5)).astype(np.float32)
    z[2, 3] = np.nan
    z[4] = -np.inf
    y = np.array([0, 1, 2, -100, 4, 3])
    kwargs = {"options": {"nan_policy": policy}, "outputs": ALL_OUTPUTS, "backend": "numpy"}
    with np.errstate(invalid="ignore"):
        fast = ce_engine.evaluate("cross_entropy", z, y, **kwargs)
        ref = reference_path(monkeypatch, "cross_entropy", z, y, **kwargs)
    assert fast.count == ref.count and fast.ignored == ref.ignored
    assert (fast.value is None and ref.value is None) or fast.value == pytest.approx(
        ref.value, rel=2e-5, nan_ok=True
    )
    for key in ALL_OUTPUTS:
        np.testing.assert_allclose(fast.outputs[key], ref.outputs[key], rtol=2e-5, atol=1e-6)
    ignored = ce_engine.evaluate(
        "cross_entropy", z[:2], np.array([-100, -100]), outputs=["grad"], backend="numpy"
    )
    assert ignored.value is None and ignored.denominator == 0.0
    assert np.all(ignored.outputs["grad"] == 0)
    assert kernel_calls


@pytest.mark.parametrize("c", [10, 3000])
@pytest.mark.parametrize("chunk_bytes", [4, cpu.DEFAULT_CHUNK_BYTES])
def test_exp_without_max_shift_matches_float64(c, chunk_bytes):
    """Row maxima on both sides of the no-shift window [−30, 80 − log C] give the same math."""
    ceiling = 80.0 - math.log(c)
    offsets = np.array([-40.0, -29.0, 0.0, 50.0, ceiling - 1.0, ceiling + 1.0, 1e4, -1e4])
    z = (RNG.standard_normal((len(offsets), c)) + offsets[:, None]).astype(np.float32)
    z -= (z.max(axis=1) - offsets)[:, None]  # row maxima exactly at the offsets
    z[2, 0] = -np.inf
    y = RNG.integers(0, c, size=len(offsets))
    got = cpu.softmax_cross_entropy_rows(
        z, y, grad_scale=1.0, probabilities=True, chunk_bytes=chunk_bytes
    )
    z64 = z.astype(np.float64)
    log_p = z64 - z64.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    expected_grad = p.copy()
    expected_grad[np.arange(len(y)), y] -= 1.0
    np.testing.assert_allclose(got.per_sample, -log_p[np.arange(len(y)), y], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(got.arrays["probabilities"], p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.arrays["grad"], expected_grad, rtol=1e-5, atol=1e-7)


bce_module = importlib.import_module("ce_engine.losses.binary_cross_entropy")
BCE_CASES = [
    {},
    {"pos_weight": "random", "label_smoothing": 0.1},
    {"pos_weight": "scalar"},
    {"weight": "classes", "sample_weight": True},
    {"weight": "full_with_zeros"},
    {"nan_policy": "omit", "reduction": "sum"},
    {"class_axis": 1, "pos_weight": "random", "weight": "classes"},
]


@pytest.mark.parametrize("case", BCE_CASES, ids=lambda c: "-".join(c) or "default")
def test_bce_evaluate_takes_the_kernel_and_matches_the_generic_path(monkeypatch, case):
    """float32 logits through ``binary_cross_entropy_rows`` = the xp-generic loss code, and
    both ≈ the float64 evaluation; ±inf / NaN logits and zero weights included."""
    shape = (6, 5, 4) if case.get("class_axis") == 1 else (40, 7)
    axis = case.get("class_axis", -1)
    c = shape[axis]
    z = (RNG.standard_normal(shape) * 4).astype(np.float32)
    t = (RNG.random(shape) > 0.5).astype(np.float32)
    z.flat[0], z.flat[1] = -np.inf, 1e4
    t.flat[0] = 0.0  # −inf with label 0: a finite (zero) term
    options: dict = {k: v for k, v in case.items() if k in ("nan_policy", "reduction")}
    if "class_axis" in case:
        options["class_axis"] = 1
    if case.get("pos_weight") == "random":
        options["pos_weight"] = (RNG.random(c) * 3).tolist()
    if case.get("pos_weight") == "scalar":  # one weight for every class
        options["pos_weight"] = 2.5
    if case.get("weight") == "classes":
        options["weight"] = (RNG.random(c) + 0.5).tolist()
    if case.get("weight") == "full_with_zeros":
        w = RNG.random(shape)
        w.flat[2] = 0.0
        z.flat[2], t.flat[2] = -np.inf, 1.0  # ℓ = ∞ under weight 0: counts 0
        options["weight"] = w.tolist()
    if case.get("nan_policy") == "omit":
        z[3] = np.nan  # the whole position is dropped
    sw = (RNG.random(shape[0]) + 0.1).astype(np.float32) if case.get("sample_weight") else None
    outputs = ["loss", "per_sample", "grad", "probabilities"]
    calls = count_calls(monkeypatch, "binary_cross_entropy_rows")
    args = ("binary_cross_entropy", z, t)
    kwargs = {"options": options, "outputs": outputs, "sample_weight": sw, "backend": "numpy"}
    fast = ce_engine.evaluate(*args, **kwargs)
    assert calls == [1]
    with monkeypatch.context() as m:
        m.setattr(bce_module, "fast_binary_cross_entropy", lambda *a: None)
        generic = ce_engine.evaluate(*args, **kwargs)
    assert calls == [1]
    assert_same_result(fast, generic, rtol=1e-5, atol=1e-6)
    wide = ce_engine.evaluate("binary_cross_entropy", z.astype(np.float64), t, **kwargs)
    assert fast.value == pytest.approx(wide.value, rel=1e-5)
    np.testing.assert_allclose(fast.outputs["grad"], wide.outputs["grad"], rtol=1e-4, atol=1e-6)
    assert np.isfinite(fast.outputs["grad"]).all()


@pytest.mark.parametrize(
    ("outputs", "options"),
    [(["log_probabilities"], {}), (["hessian_diag"], {}), (["grad"], {"temperature": 2.0})],
)
def test_bce_kernel_not_taken_outside_its_cover(monkeypatch, outputs, options):
    monkeypatch.setattr(cpu, "binary_cross_entropy_rows", None)  # would raise if called
    z = RNG.standard_normal((8, 3)).astype(np.float32)
    t = (RNG.random((8, 3)) > 0.5).astype(np.float32)
    res = ce_engine.evaluate(
        "binary_cross_entropy", z, t, outputs=outputs, options=options, backend="numpy"
    )
    assert set(res.outputs) == set(outputs)


def test_bce_confident_rows_keep_relative_accuracy():
    """Well-classified elements have ℓ = log1p(exp(−|z|)) ≪ |z|: no cancellation against z."""
    z = np.tile(np.array([15.0, -15.0, 12.0, -20.0, 9.0], dtype=np.float32), (3, 200))
    t = (z > 0).astype(np.float32)
    pw = np.linspace(0.5, 2.0, z.shape[1]).astype(np.float32)
    for kwargs in ({}, {"pos_weight": pw}):
        out = cpu.binary_cross_entropy_rows(z, t, **kwargs)
        z64 = z.astype(np.float64)
        coef = t * (pw if kwargs else 1.0) + (1 - t)
        want = (coef * np.log1p(np.exp(-np.abs(z64)))).sum(axis=1)
        np.testing.assert_allclose(out.per_sample, want, rtol=1e-5)


metrics_module = importlib.import_module("ce_engine.metrics.softmax")
ALL_ROW_METRICS = ["accuracy", "top_k_accuracy", "nll", "perplexity", "entropy", "brier", "ece"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 1.5, "top_k": [1, 2, 5]}, {"ignore_index": 2}, {"nan_policy": "omit"}],
)
def test_metrics_fused_row_stats_match_the_generic_path(monkeypatch, options, dtype):
    z = (RNG.standard_normal((400, 9)) * 3).astype(dtype)
    z[:30, :4] = 1.0  # ties for argmax and the top-k ranks
    z[40, 3] = -np.inf
    y = RNG.integers(0, 9, size=400)
    y[40] = 4  # no mass on the −inf class (that loss is +inf: a 422 under nan_policy raise)
    if options.get("nan_policy") == "omit":
        z[50, 2] = np.nan
    sw = RNG.random(400) + 0.5
    args = ("cross_entropy", z, y)
    kwargs = {"options": options, "metrics": ALL_ROW_METRICS, "sample_weight": sw}
    fused = ce_engine.evaluate(*args, backend="numpy", **kwargs)
    monkeypatch.setattr(metrics_module, "_fused_row_stats", lambda *a: False)
    generic = ce_engine.evaluate(*args, backend="numpy", **kwargs)
    assert fused.metrics.keys() == generic.metrics.keys()
    rtol = 2e-5 if dtype == np.float32 else 1e-10
    for name, value in generic.metrics.items():
        got = fused.metrics[name]
        if isinstance(value, dict):  # top_k_accuracy: {k: value}
            assert got.keys() == value.keys()
            got, value = list(got.values()), list(value.values())
        np.testing.assert_allclose(got, value, rtol=rtol, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # fused kernel, generic path
def test_ce_zero_sample_weight_drops_an_infinite_row(dtype):
    z = RNG.standard_normal((4, 5)).astype(dtype)
    z[1, 2] = -np.inf
    y = np.array([0, 2, 1, 3])  # row 1: p_y = 0, ℓ = ∞
    sw = np.array([1.0, 0.0, 2.0, 1.0])
    res = ce_engine.evaluate(
        "cross_entropy", z, y, sample_weight=sw, outputs=["per_sample", "grad"], backend="numpy"
    )
    assert res.outputs["per_sample"][1] == 0 and np.isfinite(res.value)
    keep = [0, 2, 3]
    ref = ce_engine.evaluate("cross_entropy", z[keep], y[keep], sample_weight=sw[keep])
    assert res.value == pytest.approx(ref.value, rel=1e-6)
    assert np.all(res.outputs["grad"][1] == 0)


api_module = importlib.import_module("ce_engine.api")


def _small_cases():
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        for n, c in ((1, 1), (16, 10), (7, 300), (128, 128)):
            z = (rng.standard_normal((n, c)) * 3).astype(dtype)
            y = rng.integers(0, c, size=n)
            yield f"{np.dtype(dtype).name}-{n}x{c}", z, y, True
    z = rng.standard_normal((6, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0, 1])
    z_minus_inf = z.copy()
    z_minus_inf[2, 0] = -np.inf  # an entry with p = 0: still the lane
    yield "minus-inf-entry", z_minus_inf, y, True
    nan = z.copy()
    nan[1, 1] = np.nan
    yield "nan", nan, y, False  # the general path raises 422, located
    inf_loss = z.copy()
    inf_loss[2, 2] = -np.inf  # the target's logit: ℓ = ∞
    yield "infinite-loss", inf_loss, y, False
    yield "ignore-index", z, np.array([0, -100, 2, 3, 0, 1]), False
    yield "out-of-range", z, np.array([0, 9, 2, 3, 0, 1]), False
    yield "negative-int8", z, np.array([0, 1, -1, 3, 0, 1], np.int8), False  # not class C − 1
    yield "uint8", z, np.array([0, 1, 2, 3, 0, 1], np.uint8), True
    yield "big-endian", z.astype(">f4"), y, True
    yield "big-endian-float64", z.astype(">f8"), y, True  # computed in float64 on both paths
    yield "too-big", np.zeros((200, 100), np.float32), np.zeros(200, np.int64), False


@pytest.mark.parametrize(
    ("name", "z", "y", "lane"), list(_small_cases()), ids=lambda v: v if isinstance(v, str) else ""
)
@pytest.mark.parametrize("outputs", [["loss"], ["loss", "per_sample", "grad"]])
def test_small_batch_lane_matches_the_general_path(monkeypatch, name, z, y, lane, outputs):
    """The lane answers exactly the clean default-option case, with the general path's
    numbers; everything else falls through to the general path (errors included)."""
    taken: list[bool] = []
    original = api_module._small_cross_entropy

    def spy(*args):
        result = original(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(api_module, "_small_cross_entropy", spy)

    def run():
        try:
            return ce_engine.evaluate("cross_entropy", z, y, outputs=outputs, backend="numpy")
        except ce_engine.InputValidationError as exc:
            return exc.errors[0].to_dict()

    got = run()
    assert taken == [lane]
    monkeypatch.setattr(api_module, "_small_cross_entropy", lambda *a: None)
    ref = run()
    if isinstance(ref, dict):
        assert got == ref
        return
    assert_same_result(got, ref, rtol=1e-6 if z.dtype == np.float32 else 1e-12)
    assert (got.backend, got.compute_dtype, got.reduction) == (
        ref.backend,
        ref.compute_dtype,
        ref.reduction,
    )
    assert (got.normalization, got.unit, got.metrics, got.extras) == (
        ref.normalization,
        ref.unit,
        ref.metrics,
        ref.extras,
    )


def test_outputs_as_a_generator_reach_whichever_path_answers():
    z = RNG.standard_normal((4, 3)).astype(np.float32)
    for y in (np.array([0, 1, 2, 0]), np.array([0, -100, 2, 0])):  # lane, then general path
        res = ce_engine.evaluate("cross_entropy", z, y, outputs=(o for o in ["loss", "grad"]))
        assert set(res.outputs) == {"grad"} and res.outputs["grad"].shape == (4, 3)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_small_batch_lane_leaves_array_subclasses_to_the_general_path():
    z = np.zeros((2, 3), np.float32)
    masked = np.ma.masked_array([0, -1], mask=[False, True])
    with pytest.raises(ce_engine.InputValidationError, match="out of range"):
        ce_engine.evaluate("cross_entropy", z, masked)  # the general path sees the -1
    as_matrix = ce_engine.evaluate("cross_entropy", np.asmatrix(z), np.array([0, 1]))
    assert as_matrix.value == pytest.approx(math.log(3))


@pytest.mark.parametrize("c", [5, 15])
def test_uniform_rows_fall_in_the_exact_confidence_bin(c):
    """max p = 1/C exactly: with C = 5 (or 15) that is a bin edge of 15 bins, (lo, hi]."""
    z = np.zeros((4, c), np.float32)
    res = ce_engine.evaluate(
        "cross_entropy", z, np.arange(4) % c, metrics=["reliability"], backend="numpy"
    )
    counts = res.metrics["reliability"]["count"]
    expected_bin = math.ceil(15 / c) - 1  # 1/C ∈ (edge_{k-1}, edge_k] with edge_k = k/15
    assert counts[expected_bin] == 4 and sum(counts) == 4
