"""Chunked, in-place, multi-threaded NumPy fast paths (float32).

Each kernel walks the rows in chunks small enough to stay in the core's cache, runs NumPy
ufuncs with ``out=`` into the output (or a per-thread scratch chunk), and spreads row blocks
over a thread pool: NumPy releases the GIL inside ufuncs and reductions, so blocks run in
parallel. Apart from the requested outputs (the gradient, probabilities, …) no full-size
temporary is allocated: the logits are read chunk by chunk, each chunk once from memory.

The math is the reference's (``ce_engine.losses.cross_entropy``); see each function.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = np.float32
FloatArray = npt.NDArray[np.float32]

#: Bytes of one row chunk: a chunk and its scratch stay in a core's L2 (1–2 MiB on servers).
DEFAULT_CHUNK_BYTES = 512 * 1024
#: Below this many elements the work runs on the calling thread (pool overhead dominates).
MIN_PARALLEL_ELEMENTS = 1 << 16
#: At most this many classes, the softmax kernel works on transposed chunks.
SMALL_CLASSES = 64

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_threads: int | None = None


def available_cores() -> int:
    """Cores this process may run on (affinity-aware where the platform tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


def get_threads() -> int:
    """Worker threads used by the kernels: ``set_threads``, else ``CE_EVAL_CPU_THREADS``,
    else the available cores."""
    if _threads is not None:
        return _threads
    env = os.environ.get("CE_EVAL_CPU_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return available_cores()


def set_threads(threads: int | None) -> None:
    """Set the pool size (``None`` → back to the default)."""
    global _threads
    if threads is not None and threads < 1:
        raise ValueError("threads must be >= 1")
    _threads = threads


def _executor(size: int) -> ThreadPoolExecutor:
    """The shared pool, with at least ``size`` workers.

    It only grows, and a replaced pool is never shut down here: a call still submitting to it
    from another thread keeps working (its idle workers exit once it is garbage-collected).
    """
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < size:
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="ce-cpu")
            _pool_size = size
        return _pool


def rows_per_chunk(num_classes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one float32 chunk is about ``chunk_bytes`` (at least one row)."""
    return max(1, chunk_bytes // (4 * max(1, num_classes)))


def run_blocks(
    num_rows: int,
    num_classes: int,
    work: Callable[[int, int], None],
    *,
    threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> None:
    """Call ``work(start, stop)`` over row chunks, spread over the thread pool.

    Each worker gets a contiguous block of rows and walks it chunk by chunk, so a worker's
    scratch stays hot. Work errors propagate to the caller.
    """
    if num_rows == 0:
        return
    step = rows_per_chunk(num_classes, chunk_bytes)
    if num_rows * num_classes < MIN_PARALLEL_ELEMENTS:
        n_threads = 1
    else:
        n_threads = max(1, threads if threads is not None else get_threads())
    n_threads = min(n_threads, -(-num_rows // step))

    def block(start: int, stop: int) -> None:
        with np.errstate(all="ignore"):  # ±inf/NaN follow IEEE rules; callers handle them
            for lo in range(start, stop, step):
                work(lo, min(lo + step, stop))

    if n_threads == 1:
        block(0, num_rows)
        return
    # block edges on chunk multiples, as even as the chunks allow
    chunks = -(-num_rows // step)
    edges = [min(num_rows, (chunks * t // n_threads) * step) for t in range(n_threads + 1)]
    pool = _executor(n_threads)
    futures = [
        pool.submit(block, edges[t], edges[t + 1])
        for t in range(n_threads)
        if edges[t] < edges[t + 1]
    ]
    for fut in futures:
        fut.result()


#: A max over rows splits over threads from this many elements (below, one NumPy call is
#: faster: the reduction is bound by memory bandwidth, which a second thread barely adds to).
PARALLEL_REDUCTION_ELEMENTS = 1 << 24


def row_max(rows: FloatArray, *, threads: int | None = None) -> FloatArray:
    """max_c z_ic per row (NaN when the row holds a NaN).

    One NumPy reduction, except for few classes (transposed chunks: NumPy's reductions over a
    short last axis are slow) and for very large inputs (threads over row blocks).
    """
    m_rows, c = rows.shape
    small_classes = c <= SMALL_CLASSES and rows.dtype == F32
    if m_rows * c < MIN_PARALLEL_ELEMENTS or (
        not small_classes and m_rows * c < PARALLEL_REDUCTION_ELEMENTS
    ):
        return np.max(rows, axis=1)
    if small_classes and m_rows * c < PARALLEL_REDUCTION_ELEMENTS:
        threads = 1
    out = np.empty(m_rows, dtype=rows.dtype)

    def work(lo: int, hi: int) -> None:
        if small_classes:  # see softmax_cross_entropy_rows
            t = _scratch.get("t", c, hi - lo)
            np.copyto(t, rows[lo:hi].T)
            np.max(t, axis=0, out=out[lo:hi])
        else:
            np.max(rows[lo:hi], axis=1, out=out[lo:hi])

    run_blocks(m_rows, c, work, threads=threads)
    return out


class _Scratch(threading.local):
    """Per-thread scratch chunks, grown on demand and reused across calls."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, str], npt.NDArray[np.floating]] = {}

    def get(self, name: str, rows: int, cols: int) -> FloatArray:
        """A float32 (rows, cols) scratch array."""
        return self._get(name, rows, cols, F32)

    def get64(self, name: str, rows: int, cols: int) -> npt.NDArray[np.float64]:
        """A float64 (rows, cols) scratch array."""
        return self._get(name, rows, cols, np.float64)

    def _get(self, name: str, rows: int, cols: int, dtype: type[np.floating]) -> Any:
        need = rows * cols
        key = (name, np.dtype(dtype).char)
        buf = self.buffers.get(key)
        if buf is None or buf.size < need:
            buf = np.empty(max(need, DEFAULT_CHUNK_BYTES // 4), dtype=dtype)
            self.buffers[key] = buf
        return buf[:need].reshape(rows, cols)


_scratch = _Scratch()


#: A per-row factor: an (M,) array, or a scalar when every row shares it.
Factor = npt.NDArray[np.floating] | float


def _per_row(v: Factor, m_rows: int, dtype: type[np.floating] = F32) -> Any:
    """A factor as an (M,) array of ``dtype``."""
    if isinstance(v, np.ndarray):
        return v.astype(dtype, copy=False)
    return np.full(m_rows, v, dtype=dtype)


def _part(v: Factor, lo: int, hi: int) -> Factor:
    """Rows ``lo:hi`` of a factor (a scalar stays a scalar)."""
    return v[lo:hi] if isinstance(v, np.ndarray) else v


def _row_sums64(
    chunk: npt.NDArray[np.floating],
    out: npt.NDArray[np.float64],
    transposed: bool,
    weights: npt.NDArray[np.float64] | None = None,
) -> None:
    """Σ_c w_c·chunk_ic per row, accumulated in float64 (w = 1 when None), for a float32 or
    float64 (rows, C) chunk or its (C, rows) transpose. NumPy's own loops, not BLAS: each row
    is summed the same way whatever rows share its chunk (BLAS kernels split a matrix-vector
    product by the matrix's shape, so a row's sum would depend on its batch), and a float64
    BLAS call from the pool's threads starts BLAS threads of its own, which stall on busy
    cores."""
    if transposed:  # C small: one elementwise add per class, in class order
        if weights is not None:
            weighted = _scratch.get64("row_sums", *chunk.shape)
            np.multiply(chunk, weights[:, None], out=weighted)
            chunk = weighted
        np.add.reduce(chunk, axis=0, dtype=np.float64, out=out)
    elif weights is not None:
        np.einsum("ij,j->i", chunk, weights, out=out)
    elif chunk.dtype == np.float64:  # (einsum sums a lone float64 row another way)
        np.add.reduce(chunk, axis=1, out=out)
    else:
        np.einsum("ij->i", chunk, dtype=np.float64, out=out)


def _row_dots64(
    a: npt.NDArray[np.floating], b: npt.NDArray[np.floating], out: npt.NDArray[np.float64]
) -> None:
    """Σ_c a_ic·b_ic per row of two (rows, C) chunks: float64 products (exact for float32
    factors), summed per row by NumPy's pairwise loop, the same bits in any batch."""
    products = _scratch.get64("row_dots", *a.shape)
    np.multiply(a, b, out=products)
    np.add.reduce(products, axis=1, out=out)


@dataclass
class SoftmaxCrossEntropyRows:
    """Per-row results of :func:`softmax_cross_entropy_rows` (float64 per-row sums on the CPU,
    float32 from the CUDA kernel; the arrays are float32)."""

    per_sample: npt.NDArray[np.floating]  # s_i·ℓ_i, 0 where not counted
    valid_weight: npt.NDArray[np.floating]  # s_i·w_{y_i}, 0 where not counted
    arrays: dict[str, FloatArray] = field(default_factory=dict)


def softmax_cross_entropy_rows(
    logits: FloatArray,
    targets: npt.NDArray[np.integer],
    valid: npt.NDArray[np.bool_] | None = None,
    *,
    weight: npt.NDArray[np.floating] | None = None,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    sample_weight: npt.NDArray[np.floating] | None = None,
    grad_scale: float | None = None,
    grad_out: FloatArray | None = None,
    probabilities: bool = False,
    log_probabilities: bool = False,
    row_max: FloatArray | None = None,
    threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> SoftmaxCrossEntropyRows:
    """Softmax cross-entropy with index targets, forward and backward in one chunked pass.

    With m_i = max_c z_ic, x_ic = (z_ic − m_i)/T (shift first, then scale: no z/T overflows),
    S_i = Σ_c exp(x_ic), lse_i = log S_i, p_ic = exp(x_ic)/S_i, ε the label smoothing, w the
    class weights (1 when absent), W = Σ_c w_c and s_i the sample weight:

        ℓ_i = (1 − ε)·w_y·(lse_i − x_iy) + (ε/C)·Σ_c w_c·(lse_i − x_ic)
        ∂(s_i ℓ_i)/∂z_ij = s_i/T · (p_ij·[(1 − ε)w_y + εW/C] − (ε/C)·w_j − (1 − ε)·w_y·[j = y])

    Numerics. The chunks evaluate exp in float32 on float32(x_ic) (the maximum gives
    exp(0) = 1 exactly) and accumulate S_i and Σ_c w_c·x_ic in float64; everything per row is
    float64: lse_i = log S_i, x_iy from z_iy − m_i, ℓ_i. So ℓ_i carries only the float32
    rounding of the shift and of the other classes' exp, never float32's spacing at m_i or at
    S_i: a confident row's ℓ_i ≈ Σ_{c≠y} p_ic keeps its relative precision. The gradient's
    target entry is formed in float64 from p_iy = e_iy/S_i, e_iy = exp(x_iy) as summed (no
    cancellation in p_iy − 1). With more than ``SMALL_CLASSES`` classes and no temperature,
    smoothing or log-probabilities, rows whose maximum lies in [−30, 80 − log C] skip the
    shift (exp(z) cannot overflow there; the formulas hold with m_i read as 0), and their
    ℓ_i = log S_i − log e_iy: e_iy, the float32 exp(z_iy) inside S_i, cancels its own rounding.

    Rows with ``valid`` False give 0 loss, 0 weight and a zero gradient row. ``grad_scale``
    (None → no gradient) multiplies the gradient (the reduction's 1/denominator, folded in so
    the gradient is written once). ``grad_out`` receives the gradient; it may be ``logits``
    itself (in place). ``row_max`` (M,) is m_i when the caller has it already (e.g. from its
    NaN screen): the chunks then skip their max pass. Terms with zero coefficient count 0
    (0·log 0 = 0, masked −inf classes).

    Only the (M, C) work runs per chunk (a handful of ufuncs, so that worker threads rarely
    wait for each other's GIL); the per-row arithmetic runs once over all rows afterwards.
    ``logits`` (M, C) float32 C-contiguous; ``targets`` (M,) class ids in [0, C) where valid.
    ``per_sample`` and ``valid_weight`` come back in float64, the arrays in float32.
    """
    if logits.dtype != F32 or logits.ndim != 2 or not logits.flags.c_contiguous:
        raise ValueError("logits must be a C-contiguous (M, C) float32 array")
    m_rows, c = logits.shape
    y = np.asarray(targets, dtype=np.intp).reshape(m_rows)
    ok = None if valid is None else np.asarray(valid, dtype=bool).reshape(m_rows)
    if ok is not None and ok.all():
        ok = None  # every row counts: the per-row factors below stay scalars
    if ok is not None:
        y = np.where(ok, y, 0)
    eps = float(label_smoothing)
    inv_t = 1.0 / temperature
    inv_t32 = F32(inv_t)
    w = None if weight is None else np.asarray(weight, dtype=np.float64).reshape(c)
    w32 = None if w is None else w.astype(F32)
    w_total = float(c) if w is None else float(w.sum())
    s = None if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(m_rows)

    # per-row factors (float64), a scalar where all rows share it: w_y, s_i (0 if not counted)
    w_y: Factor = 1.0 if w is None else w[y]
    row_scale: Factor = 1.0 if s is None else s
    counted: Factor = 1.0
    if ok is not None:
        counted = ok.astype(np.float64)
        w_y = w_y * counted
        row_scale = row_scale * counted
    valid_weight = _per_row(w_y * row_scale, m_rows, np.float64)

    grad: FloatArray | None = None
    if grad_scale is not None:
        if grad_out is None:
            grad = np.empty((m_rows, c), dtype=F32)
        else:
            if grad_out.shape != (m_rows, c) or grad_out.dtype != F32:
                raise ValueError("grad_out must be (M, C) float32")
            if not grad_out.flags.c_contiguous:
                raise ValueError("grad_out must be C-contiguous")
            grad = grad_out
    probs = np.empty((m_rows, c), dtype=F32) if probabilities else None
    log_probs = np.empty((m_rows, c), dtype=F32) if log_probabilities else None
    # per-row gradient factors: a_i = s_i·scale/T (0 where not counted)
    a = row_scale * ((grad_scale or 0.0) * inv_t)
    q_mass = (1.0 - eps) * w_y + ((eps / c) * w_total * counted if eps else 0.0)
    p_coef = a * q_mass  # ∂/∂z_ij = p_coef_i·p_ij − …
    smooth_coef = a * (eps / c)

    rows = np.arange(m_rows)
    z_y = logits[rows, y]  # gathered before an in-place gradient overwrites the logits
    known_max = row_max is not None
    mx = np.empty(m_rows, F32) if row_max is None else np.asarray(row_max, F32).reshape(m_rows)
    shift = np.empty(m_rows, F32)  # what the chunk subtracted before exp: m_i, or 0 unshifted
    raw = np.zeros(m_rows, bool)  # rows that took exp(z) unshifted
    total = np.empty(m_rows, np.float64)  # S_i
    e_y = np.empty(m_rows, F32)  # exp(f_iy), as summed in S_i
    smooth_sum = np.empty(m_rows, np.float64) if eps else None  # Σ_c w_c·f_ic
    # Few classes: work on a transposed (C, rows) scratch copy, where the per-row reductions
    # become elementwise ufuncs across C vectors (NumPy's reductions over a short last axis
    # are an order of magnitude slower per element).
    transposed = c <= SMALL_CLASSES
    # without temperature, smoothing or log-probabilities, rows whose max lies in
    # [−30, exp_ceiling] take exp(z) directly: Σ_c exp(z_ic) ≤ C·exp(m_i) stays finite. Not
    # for few classes, where the shift costs less than the float64 log that corrects exp(z_iy)
    plain = inv_t32 == 1 and not eps and log_probs is None and not transposed
    exp_ceiling = 80.0 - math.log(c)

    def moderate(m: FloatArray) -> bool:
        return m.size > 0 and float(m.min()) >= -30.0 and float(m.max()) <= exp_ceiling

    # (small inputs skip the test: it costs more than the shift it saves)
    all_unshifted = plain and known_max and m_rows * c >= MIN_PARALLEL_ELEMENTS and moderate(mx)

    def work(lo: int, hi: int) -> None:
        n = hi - lo
        z = logits[lo:hi]
        m = mx[lo:hi]
        if transposed:
            e = _scratch.get("t", c, n)
            np.copyto(e, z.T)
            src = e
        else:
            e = grad[lo:hi] if grad is not None else _scratch.get("g", n, c)
            src = z

        def per_row(v: Any) -> Any:
            if not isinstance(v, np.ndarray):
                return v
            return v[None, :] if transposed else v[:, None]

        if not known_max:
            np.max(src, axis=0 if transposed else 1, out=m)
        unshifted = all_unshifted or (plain and not known_max and moderate(m))
        if unshifted:
            shift[lo:hi] = 0
            raw[lo:hi] = True
            np.exp(src, out=e)
        else:
            shift[lo:hi] = m
            np.subtract(src, per_row(m), out=e)
            if inv_t32 != 1:
                np.multiply(e, inv_t32, out=e)
            if smooth_sum is not None:
                ss = smooth_sum[lo:hi]
                _row_sums64(e, ss, transposed, w)
                if w is not None and np.isnan(ss).any():
                    # w_c = 0 on a −inf class: that term counts 0, as in the reference
                    shifted = e.T if transposed else e
                    for i in np.flatnonzero(np.isnan(ss)):
                        ss[i] = np.where(w != 0, shifted[i] * w, 0).sum()
            if log_probs is not None:
                np.copyto(log_probs[lo:hi], e.T if transposed else e)
            np.exp(e, out=e)
        row_total = total[lo:hi]
        _row_sums64(e, row_total, transposed)
        if grad is not None or unshifted:
            r = np.arange(n)
            e_y[lo:hi] = e[y[lo:hi], r] if transposed else e[r, y[lo:hi]]
        if probs is not None:
            inv_total = (1.0 / row_total).astype(F32)
            np.multiply(e.T if transposed else e, inv_total[:, None], out=probs[lo:hi])
        if grad is not None:
            k = (_part(p_coef, lo, hi) / row_total).astype(F32)  # p_coef_i / S_i
            np.multiply(e, per_row(k), out=e)
            if eps:
                part = _part(smooth_coef, lo, hi)
                sc = part.astype(F32) if isinstance(part, np.ndarray) else F32(part)
                if w32 is None:
                    np.subtract(e, per_row(sc), out=e)
                else:
                    tmp = _scratch.get("w", *e.shape)
                    np.multiply(per_row(sc), w32[:, None] if transposed else w32[None, :], out=tmp)
                    np.subtract(e, tmp, out=e)
            if transposed:
                np.copyto(grad[lo:hi], e.T)
        if log_probs is not None:
            lse32 = np.log(row_total).astype(F32)
            np.subtract(log_probs[lo:hi], lse32[:, None], out=log_probs[lo:hi])

    run_blocks(m_rows, c, work, threads=threads, chunk_bytes=chunk_bytes)
    with np.errstate(all="ignore"):  # ±inf/NaN follow IEEE rules, as in the chunks
        lse = np.log(total)
        x_y = (z_y.astype(np.float64) - shift) * inv_t
        nll = lse - x_y
        # unshifted rows: less the rounding of the target's own exp(z_iy), log e_iy − z_iy
        # (shifted ones need none: their maximum is exp(0) = 1 exactly)
        fix = np.flatnonzero(raw & (e_y >= np.finfo(F32).tiny))
        if fix.size:
            nll[fix] -= np.log(e_y[fix], dtype=np.float64) - z_y[fix]
        if isinstance(w_y, np.ndarray):  # w_y = 0 counts 0, also against an infinite nll
            nll = np.where(w_y != 0, w_y * nll, 0)
        loss = (1.0 - eps) * nll if eps else nll
        if smooth_sum is not None:
            loss = loss + (eps / c) * (w_total * lse - smooth_sum)
        weighted = loss
        if isinstance(row_scale, np.ndarray):  # weight 0 counts 0, also against ℓ = ∞
            weighted = np.where(row_scale != 0, loss * row_scale, 0)
        if ok is not None:
            weighted = np.where(ok, weighted, 0)
        per_sample = _per_row(weighted, m_rows, np.float64)
        if grad is not None:
            # the target's entry in float64: p_iy·q_mass − w_y·((1 − ε) + ε/C), without
            # float32's cancellation in p_iy − 1 on confident rows
            target_coef = ((1.0 - eps) + eps / c) * w_y
            grad[rows, y] = a * (q_mass * (e_y / total) - target_coef)
    arrays: dict[str, FloatArray] = {}
    if grad is not None:
        arrays["grad"] = grad
    if probs is not None:
        arrays["probabilities"] = probs
    if log_probs is not None:
        arrays["log_probabilities"] = log_probs
    return SoftmaxCrossEntropyRows(per_sample, valid_weight, arrays)


@dataclass
class BinaryCrossEntropyRows:
    """Results of :func:`binary_cross_entropy_rows` (``per_sample`` float64, arrays float32)."""

    per_sample: npt.NDArray[np.float64]  # Σ_c v_ic·ℓ_ic per row
    arrays: dict[str, FloatArray] = field(default_factory=dict)


def _bce_exact_rows(
    z: FloatArray, y: FloatArray, pw: FloatArray | None, v: FloatArray | None
) -> npt.NDArray[np.float64]:
    """Σ_c v·[pw·y·softplus(−z) + (1 − y)·softplus(z)] per row in float64, each term 0 where
    its coefficient is 0 (so ±∞ logits give the limits, not ∞ − ∞ or 0·∞)."""
    with np.errstate(all="ignore"):
        z64 = z.astype(np.float64)
        lp = np.log1p(np.exp(-np.abs(z64)))
        pos = y * pw if pw is not None else y
        neg = 1.0 - y
        terms = np.where(pos != 0, pos * (np.maximum(-z64, 0) + lp), 0)
        terms = terms + np.where(neg != 0, neg * (np.maximum(z64, 0) + lp), 0)
        if v is not None:
            terms = np.where(v != 0, terms * v, 0)
        out: npt.NDArray[np.float64] = terms.sum(axis=1)
    return out


def binary_cross_entropy_rows(
    logits: FloatArray,
    targets: FloatArray,
    *,
    pos_weight: FloatArray | None = None,
    element_weight: FloatArray | None = None,
    label_smoothing: float = 0.0,
    grad_scale: float | None = None,
    grad_out: FloatArray | None = None,
    probabilities: bool = False,
    threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> BinaryCrossEntropyRows:
    """Sigmoid binary cross-entropy per element, summed per row, with its gradient.

    With y ← y(1 − ε) + ε/2, pw the positive weight (per class, 1 when absent), v the element
    weights (1 when absent) and softplus(x) = max(x, 0) + log1p(exp(−|x|)):

        ℓ_ic = v_ic·[pw_c·y_ic·softplus(−z_ic) + (1 − y_ic)·softplus(z_ic)]
             (= (1 − y)·z + (1 + (pw − 1)·y)·softplus(−z), without its ∞ − ∞ at z = −∞)
        ∂ℓ_ic/∂z_ic = v_ic·[(1 + (pw_c − 1)·y_ic)·σ(z_ic) − pw_c·y_ic]

    ``per_sample`` is Σ_c ℓ_ic per row (float64, :func:`_row_sums64`); ``grad`` (when
    ``grad_scale`` is given) is the elementwise derivative times ``grad_scale``; ``grad_out``
    may be ``logits`` (in place).
    ``logits`` (M, C) float32 C-contiguous; ``targets``/``element_weight`` (M, C).
    """
    if logits.dtype != F32 or logits.ndim != 2 or not logits.flags.c_contiguous:
        raise ValueError("logits must be a C-contiguous (M, C) float32 array")
    m_rows, c = logits.shape
    t = np.asarray(targets)
    if t.shape != (m_rows, c):
        raise ValueError("targets must have the logits' shape")
    v = None if element_weight is None else np.asarray(element_weight)
    if v is not None and v.shape != (m_rows, c):
        raise ValueError("element_weight must have the logits' shape")
    pw = None if pos_weight is None else np.broadcast_to(np.asarray(pos_weight, dtype=F32), (c,))
    eps = F32(label_smoothing)
    per_sample = np.empty(m_rows, dtype=np.float64)
    grad: FloatArray | None = None
    if grad_scale is not None:
        grad = np.empty((m_rows, c), dtype=F32) if grad_out is None else grad_out
        if grad.shape != (m_rows, c) or grad.dtype != F32 or not grad.flags.c_contiguous:
            raise ValueError("grad_out must be a C-contiguous (M, C) float32 array")
    probs = np.empty((m_rows, c), dtype=F32) if probabilities else None
    scale = F32(grad_scale or 0.0)

    def labels(lo: int, hi: int) -> FloatArray:
        if not eps and t.dtype == F32:
            return t[lo:hi]
        yk = _scratch.get("y", hi - lo, c)
        np.copyto(yk, t[lo:hi], casting="unsafe")
        if eps:
            np.multiply(yk, F32(1.0) - eps, out=yk)
            np.add(yk, eps / F32(2.0), out=yk)
        return yk

    def work(lo: int, hi: int) -> None:
        # ℓ = pw·y·max(−z, 0) + (1 − y)·max(z, 0) + q·log1p(exp(−|z|)), q = pw·y + 1 − y:
        # non-negative terms, no cancellation; rows whose sum is not finite (±∞ logits:
        # ∞ − ∞, 0·∞) are redone term by term (_bce_exact_rows)
        n = hi - lo
        z = logits[lo:hi]
        yk = labels(lo, hi)
        e = _scratch.get("e", n, c)  # exp(−|z|)
        np.abs(z, out=e)
        np.negative(e, out=e)
        np.exp(e, out=e)
        acc = _scratch.get("acc", n, c)
        rz = _scratch.get("rz", n, c)
        tmp = _scratch.get("tmp", n, c)
        np.maximum(z, 0, out=rz)
        np.subtract(rz, z, out=tmp)  # max(−z, 0), exactly
        q: FloatArray | None = None
        py = yk  # pw·y
        if pw is not None:
            py = _scratch.get("py", n, c)
            np.multiply(yk, pw, out=py)
        np.multiply(py, tmp, out=acc)
        np.subtract(F32(1.0), yk, out=tmp)  # 1 − y
        if pw is not None:
            q = _scratch.get("q", n, c)
            np.add(py, tmp, out=q)
        np.multiply(rz, tmp, out=rz)
        np.add(acc, rz, out=acc)
        np.log1p(e, out=tmp)
        if q is not None:
            np.multiply(tmp, q, out=tmp)
        np.add(acc, tmp, out=acc)
        if v is not None:
            np.multiply(acc, v[lo:hi], out=acc)
        rows = per_sample[lo:hi]
        _row_sums64(acc, rows, transposed=False)
        if not np.isfinite(rows).all():
            bad = np.flatnonzero(~np.isfinite(rows))
            per_sample[lo + bad] = _bce_exact_rows(
                z[bad], yk[bad], pw, None if v is None else v[lo:hi][bad]
            )
        if grad is None and probs is None:
            return
        # σ(z) = 1/(1 + e) for z ≥ 0 and e/(1 + e) for z < 0, with e = exp(−|z|)
        sig = _scratch.get("sig", n, c)
        np.add(e, F32(1.0), out=sig)
        np.divide(F32(1.0), sig, out=sig)
        np.multiply(e, sig, out=tmp)
        np.copyto(sig, tmp, where=z < 0)
        if probs is not None:
            np.copyto(probs[lo:hi], sig)
        if grad is None:
            return
        g = grad[lo:hi]  # written last: it may be the logits (in place)
        if q is None:
            np.subtract(sig, yk, out=g)
        else:
            np.multiply(q, sig, out=g)
            np.subtract(g, py, out=g)
        if v is not None:
            np.multiply(g, v[lo:hi], out=g)
        if scale != 1:
            np.multiply(g, scale, out=g)

    run_blocks(m_rows, c, work, threads=threads, chunk_bytes=chunk_bytes)
    arrays: dict[str, FloatArray] = {}
    if grad is not None:
        arrays["grad"] = grad
    if probs is not None:
        arrays["probabilities"] = probs
    return BinaryCrossEntropyRows(per_sample, arrays)


#: Per-row statistics :func:`softmax_row_stats` can return (``prediction`` always comes back).
ROW_STATS = frozenset({"confidence", "rank", "nll", "entropy", "brier"})


def softmax_row_stats(
    logits: npt.NDArray[np.floating],
    targets: npt.NDArray[np.integer],
    *,
    temperature: float = 1.0,
    want: frozenset[str] = ROW_STATS,
    threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, npt.NDArray[np.generic]]:
    """Per-row quantities behind the classification metrics, from one chunked pass.

    With m_i = max_c z_ic, s_ic = (z_ic − m_i)/T, e = exp(s), S_i = Σ_c e_ic, p = e/S and y the
    target class:

        prediction = argmax_c z_ic (first on ties)       confidence = max_c p_ic = 1/S_i
        rank = #{c : z_ic > z_iy, or z_ic = z_iy and c > y}   (y is in the top k iff rank < k;
               among ties the larger id ranks first, as in sklearn's top_k_accuracy_score)
        nll = log S_i − s_iy        entropy = log S_i − Σ_c e_ic·s_ic / S_i   (0·log 0 = 0)
        brier = Σ_c p_ic² − 2·p_iy + 1

    S_i, Σ_c e_ic·s_ic and Σ_c e_ic² are accumulated in float64 (:func:`_row_sums64`,
    :func:`_row_dots64`), so a row's statistics are the same bits in any batch. ``logits`` (M, C)
    float32/float64 (nll, entropy and brier keep that dtype, confidence is float64,
    prediction and rank int64); ``targets`` (M,) valid class ids; T > 0. Only the statistics
    in ``want`` are computed; no (M, C) array is allocated beyond a chunk's scratch.
    """
    m_rows, c = logits.shape
    dtype = logits.dtype
    y = np.asarray(targets, dtype=np.intp).reshape(m_rows)
    out: dict[str, npt.NDArray[np.generic]] = {"prediction": np.empty(m_rows, dtype=np.int64)}
    for name in want:  # confidence in float64: exact bins for uniform rows (1/C)
        kind = np.int64 if name == "rank" else np.float64 if name == "confidence" else dtype
        out[name] = np.empty(m_rows, dtype=kind)
    cols = np.arange(c)
    need_exp = bool(want - {"rank"})
    inv_t = dtype.type(1.0 / temperature)

    def work(lo: int, hi: int) -> None:
        z = logits[lo:hi]
        n = hi - lo
        r = np.arange(n)
        yy = y[lo:hi]
        pred = np.argmax(z, axis=1)
        out["prediction"][lo:hi] = pred
        z_y = z[r, yy]
        if "rank" in want:
            ahead = np.count_nonzero(z > z_y[:, None], axis=1)
            tied = np.flatnonzero(np.count_nonzero(z == z_y[:, None], axis=1) > 1)
            if tied.size:  # ties with a larger class id rank before y
                later = (z[tied] == z_y[tied, None]) & (cols[None, :] > yy[tied, None])
                ahead[tied] += np.count_nonzero(later, axis=1)
            out["rank"][lo:hi] = ahead
        if not need_exp:
            return
        m = z[r, pred]
        shifted = np.subtract(z, m[:, None], dtype=dtype, order="C")  # rows contiguous
        if inv_t != 1:
            np.multiply(shifted, inv_t, out=shifted)
        e = np.exp(shifted)
        total = np.empty(n, np.float64)
        _row_sums64(e, total, transposed=False)
        lse = np.log(total)
        s_y = (z_y - m) * inv_t
        if "confidence" in want:
            out["confidence"][lo:hi] = 1.0 / total
        if "nll" in want:
            out["nll"][lo:hi] = lse - s_y
        if "entropy" in want:
            mean_s = np.empty(n, np.float64)
            _row_dots64(e, shifted, mean_s)
            bad = np.flatnonzero(~np.isfinite(mean_s))  # −inf logits: e·s = 0·(−∞)
            if bad.size:
                terms = np.where(e[bad] > 0, e[bad].astype(np.float64) * shifted[bad], 0)
                mean_s[bad] = terms.sum(axis=1, dtype=np.float64)
            out["entropy"][lo:hi] = lse - mean_s / total
        if "brier" in want:
            sq = np.empty(n, np.float64)
            _row_dots64(e, e, sq)
            out["brier"][lo:hi] = sq / (total * total) - 2.0 * np.exp(s_y) / total + 1.0

    run_blocks(m_rows, c, work, threads=threads, chunk_bytes=chunk_bytes)
    return out
