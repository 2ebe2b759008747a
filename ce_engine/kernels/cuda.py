"""Fused CuPy RawKernels: softmax CE forward+backward, sigmoid BCE, the metrics pass.

Importing this module needs no CuPy and no device; the CUDA source is compiled (NVRTC, through
``cupy.RawModule``) on first use and cached for the process (and on disk by CuPy).

Softmax CE, one thread block (or one warp, for C ≤ ``WARP_ROW_MAX_CLASSES``) per row:

1. one read of the logits with an online softmax: each thread keeps a running max m and a
   running sum s of exp(x − m), rescaling s by exp(m_old − m_new) when the max moves; the
   (m, s) pairs are then merged across the warp/block. A block keeps the row (as float32) in
   shared memory when it fits, so the second pass reads no device memory;
2. the gradient is written once (optionally over the logits):
   g_ij = a_i·(p_ij·[(1 − ε)w_y + εW/C] − (ε/C)·w_j − (1 − ε)·w_y·[j = y]),
   a_i = s_i·scale/T, together with Σ_c w_c·(x_ic − m_i) for the smoothing term.

Inputs may be float32, float16 or bfloat16; bfloat16 arrives as its raw 16-bit words (uint16)
and is widened in registers (x = bits << 16). Accumulation is in float32.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ce_engine.kernels.cpu import BinaryCrossEntropyRows, SoftmaxCrossEntropyRows

#: Rows of at most this many classes are handled by one warp each (several rows per block).
WARP_ROW_MAX_CLASSES = 1024
#: Threads per block for the block-per-row kernel.
ROW_BLOCK_THREADS = 1024
#: Shared memory a block may use to keep its row on chip (bytes; H100 allows up to 227 KiB,
#: the device's own opt-in limit caps it).
ROW_CACHE_MAX_BYTES = 200 * 1024

#: dtype code of the logits for the kernels: float32, float16 bits, bfloat16 bits
_KIND = {"float32": 0, "float16": 1, "uint16": 2}

SOURCE = r"""
#define NEG_INF __int_as_float(0xff800000)

template <int KIND>
__device__ __forceinline__ float load_logit(const void* base, long long i) {
    if (KIND == 0) {
        return static_cast<const float*>(base)[i];
    } else if (KIND == 1) {
        unsigned short h = static_cast<const unsigned short*>(base)[i];
        float f;
        asm("{cvt.f32.f16 %0, %1;}" : "=f"(f) : "h"(h));
        return f;
    } else {
        unsigned int bits = static_cast<const unsigned short*>(base)[i];
        return __uint_as_float(bits << 16);
    }
}

// merge two (max, sum of exp(x - max)) pairs; -inf maxima carry no mass
__device__ __forceinline__ void merge_ms(float& m, float& s, float m2, float s2) {
    if (s != s || s2 != s2) { s = __int_as_float(0x7fc00000); return; }  // NaN propagates
    float mn = fmaxf(m, m2);
    if (mn == NEG_INF) { m = mn; s = 0.f; return; }
    float a = (m == NEG_INF) ? 0.f : s * __expf(m - mn);
    float b = (m2 == NEG_INF) ? 0.f : s2 * __expf(m2 - mn);
    m = mn;
    s = a + b;
}

__device__ __forceinline__ void online_add(float& m, float& s, float x) {
    if (x > m) {
        s = (m == NEG_INF) ? 1.f : s * __expf(m - x) + 1.f;
        m = x;
    } else if (x != NEG_INF) {
        s += __expf(x - m);  // x NaN: s becomes NaN and propagates
    }
}

__device__ __forceinline__ void warp_merge_ms(float& m, float& s) {
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        float s2 = __shfl_xor_sync(0xffffffffu, s, off);
        merge_ms(m, s, m2, s2);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

struct CeArgs {
    const long long* targets;   // (M,)
    const unsigned char* valid; // (M,)
    const float* weight;        // (C,) or null
    const float* sample_weight; // (M,) or null
    float* grad;                // (M, C) or null (may alias float32 logits)
    float* probs;               // (M, C) or null
    float* log_probs;           // (M, C) or null
    float* per_sample;          // (M,)
    float* valid_weight;        // (M,)
    long long rows;
    long long classes;
    float inv_t, eps, w_total, scale;
    int need_smooth;
};

// second pass over one element; returns its w_c·(x − m) share of the smoothing sum
__device__ __forceinline__ float ce_emit(const CeArgs& a, long long off, long long j,
                                         float x, float m, float inv_s, float lse, float coef_p,
                                         float coef_s, float coef_y, long long y) {
    float sh = x - m;
    float e = (x == NEG_INF) ? 0.f : __expf(sh);
    float p = e * inv_s;
    float w = a.weight ? a.weight[j] : 1.f;
    if (a.grad) {
        float g = coef_p * p - coef_s * w;
        if (j == y) g -= coef_y;
        a.grad[off + j] = g;
    }
    if (a.probs) a.probs[off + j] = p;
    if (a.log_probs) a.log_probs[off + j] = sh - lse;
    return (a.need_smooth && w != 0.f) ? w * sh : 0.f;
}

__device__ __forceinline__ void ce_finish(const CeArgs& a, long long row, float m, float s,
                                          float smooth, float x_y, long long y, bool ok) {
    float w_y = ok ? (a.weight ? a.weight[y] : 1.f) : 0.f;
    float sw = a.sample_weight ? a.sample_weight[row] : 1.f;
    float lse = logf(s);
    float nll = (w_y != 0.f) ? w_y * (lse - (x_y - m)) : 0.f;
    float loss = (1.f - a.eps) * nll;
    if (a.need_smooth) loss += (a.eps / (float)a.classes) * (a.w_total * lse - smooth);
    a.per_sample[row] = ok ? loss * sw : 0.f;
    a.valid_weight[row] = ok ? w_y * sw : 0.f;
}

__device__ __forceinline__ void ce_coefs(const CeArgs& a, long long row, long long y, bool ok,
                                         float& coef_a, float& q_mass, float& coef_s,
                                         float& coef_y) {
    float w_y = ok ? (a.weight ? a.weight[y] : 1.f) : 0.f;
    float sw = a.sample_weight ? a.sample_weight[row] : 1.f;
    coef_a = ok ? sw * a.scale * a.inv_t : 0.f;
    q_mass = (1.f - a.eps) * w_y + (ok ? a.eps / (float)a.classes * a.w_total : 0.f);
    coef_s = coef_a * a.eps / (float)a.classes;
    coef_y = coef_a * (1.f - a.eps) * w_y;
}

#define CE_PARAMS                                                                          \
    const void* logits, const long long* targets, const unsigned char* valid,               \
    const float* weight, const float* sample_weight, float* grad, float* probs,             \
    float* log_probs, float* per_sample, float* valid_weight, long long rows,              \
    long long classes, float inv_t, float eps, float w_total, float scale, int need_smooth
#define CE_ARGS                                                                            \
    CeArgs a = {targets, valid, weight, sample_weight, grad, probs, log_probs, per_sample,  \
                valid_weight, rows, classes, inv_t, eps, w_total, scale, need_smooth}

// one warp per row (small C): the second pass re-reads the row from L1/L2
template <int KIND>
__global__ void ce_rows_warp(CE_PARAMS) {
    CE_ARGS;
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= a.rows) return;
    long long off = row * a.classes;
    bool ok = a.valid[row] != 0;
    long long y = ok ? a.targets[row] : 0;
    // read before the shuffles below, which order it before any lane's in-place write
    float x_y = load_logit<KIND>(logits, off + y) * a.inv_t;
    float m = NEG_INF, s = 0.f;
    for (long long j = lane; j < a.classes; j += 32)
        online_add(m, s, load_logit<KIND>(logits, off + j) * a.inv_t);
    warp_merge_ms(m, s);
    float coef_a, q_mass, coef_s, coef_y;
    ce_coefs(a, row, y, ok, coef_a, q_mass, coef_s, coef_y);
    float inv_s = 1.f / s;
    float lse = logf(s);
    float coef_p = coef_a * q_mass;
    float smooth = 0.f;
    for (long long j = lane; j < a.classes; j += 32) {
        float x = load_logit<KIND>(logits, off + j) * a.inv_t;
        smooth += ce_emit(a, off, j, x, m, inv_s, lse, coef_p, coef_s, coef_y, y);
    }
    smooth = warp_sum(smooth);
    if (lane == 0) ce_finish(a, row, m, s, smooth, x_y, y, ok);
}

// one block per row (large C); the row is kept in shared memory when `cache` is set
template <int KIND>
__global__ void ce_rows_block(CE_PARAMS, int cache) {
    CE_ARGS;
    extern __shared__ float row_cache[];
    __shared__ float red_m[32], red_s[32];
    __shared__ float x_y_shared;
    long long row = blockIdx.x;
    long long off = row * a.classes;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float m = NEG_INF, s = 0.f;
    #pragma unroll 4
    for (long long j = threadIdx.x; j < a.classes; j += blockDim.x) {
        float x = load_logit<KIND>(logits, off + j) * a.inv_t;
        if (cache) row_cache[j] = x;
        online_add(m, s, x);
    }
    warp_merge_ms(m, s);
    if (lane == 0) { red_m[warp] = m; red_s[warp] = s; }
    bool ok = a.valid[row] != 0;
    long long y = ok ? a.targets[row] : 0;
    if (threadIdx.x == 0) x_y_shared = load_logit<KIND>(logits, off + y) * a.inv_t;
    __syncthreads();
    if (warp == 0) {
        m = lane < warps ? red_m[lane] : NEG_INF;
        s = lane < warps ? red_s[lane] : 0.f;
        warp_merge_ms(m, s);
        if (lane == 0) { red_m[0] = m; red_s[0] = s; }
    }
    __syncthreads();
    m = red_m[0];
    s = red_s[0];
    float x_y = x_y_shared;
    __syncthreads();  // red_* are reused below
    float coef_a, q_mass, coef_s, coef_y;
    ce_coefs(a, row, y, ok, coef_a, q_mass, coef_s, coef_y);
    float inv_s = 1.f / s;
    float lse = logf(s);
    float coef_p = coef_a * q_mass;
    float smooth = 0.f;
    #pragma unroll 4
    for (long long j = threadIdx.x; j < a.classes; j += blockDim.x) {
        float x = cache ? row_cache[j] : load_logit<KIND>(logits, off + j) * a.inv_t;
        smooth += ce_emit(a, off, j, x, m, inv_s, lse, coef_p, coef_s, coef_y, y);
    }
    smooth = warp_sum(smooth);
    if (lane == 0) red_s[warp] = smooth;
    __syncthreads();
    if (warp == 0) {
        smooth = warp_sum(lane < warps ? red_s[lane] : 0.f);
        if (lane == 0) ce_finish(a, row, m, s, smooth, x_y, y, ok);
    }
}

// sigmoid BCE, one warp per row: per-element loss summed per row, gradient, probabilities
template <int KIND>
__global__ void bce_rows_warp(const void* __restrict__ logits, const float* __restrict__ targets,
                              const float* __restrict__ pos_weight,
                              const float* __restrict__ element_weight, float* grad,
                              float* probs, float* per_sample, long long rows,
                              long long classes, float eps, float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    long long off = row * classes;
    float total = 0.f;
    for (long long j = lane; j < classes; j += 32) {
        float z = load_logit<KIND>(logits, off + j);
        float y = targets[off + j] * (1.f - eps) + 0.5f * eps;
        float pw = pos_weight ? pos_weight[j] : 1.f;
        float v = element_weight ? element_weight[off + j] : 1.f;
        float pos = pw * y, neg = 1.f - y;
        float e = __expf(-fabsf(z));
        float lp = log1pf(e);
        // pw·y·softplus(−z) + (1 − y)·softplus(z); a term with no mass counts 0 (z = ±inf)
        float l = (pos != 0.f ? pos * (fmaxf(-z, 0.f) + lp) : 0.f)
                + (neg != 0.f ? neg * (fmaxf(z, 0.f) + lp) : 0.f);
        float k = pos + neg;
        total += v * l;
        float sig = (z >= 0.f) ? 1.f / (1.f + e) : e / (1.f + e);
        if (probs) probs[off + j] = sig;
        if (grad) grad[off + j] = scale * v * (k * sig - pos);
    }
    total = warp_sum(total);
    if (lane == 0) per_sample[row] = total;
}

// metrics pass, one warp per row: argmax, max-probability confidence, rank of the target
// (#classes ranked before it: higher logit, or equal logit and higher index, as sklearn's
// top_k_accuracy_score and kernels.cpu.softmax_row_stats), confidence bin
template <int KIND>
__global__ void metrics_rows_warp(const void* __restrict__ logits,
                                  const long long* __restrict__ targets, long long* pred,
                                  float* confidence, int* rank, int* bin, long long rows,
                                  long long classes, int n_bins) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    long long off = row * classes;
    long long y = targets[row];
    float z_y = load_logit<KIND>(logits, off + y);
    float m = NEG_INF, s = 0.f;
    float best = NEG_INF;
    long long best_j = classes;
    int ahead = 0;
    for (long long j = lane; j < classes; j += 32) {
        float x = load_logit<KIND>(logits, off + j);
        online_add(m, s, x);
        if (x > best || (x == best && j < best_j) || best_j == classes) { best = x; best_j = j; }
        if (x > z_y || (x == z_y && j > y)) ahead++;
    }
    warp_merge_ms(m, s);
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float b2 = __shfl_xor_sync(0xffffffffu, best, o);
        long long j2 = __shfl_xor_sync(0xffffffffu, best_j, o);
        if (b2 > best || (b2 == best && j2 < best_j)) { best = b2; best_j = j2; }
        ahead += __shfl_xor_sync(0xffffffffu, ahead, o);
    }
    if (lane == 0) {
        float conf = 1.f / s;  // max probability = exp(m - m) / s
        pred[row] = best_j;
        confidence[row] = conf;
        rank[row] = ahead;
        int b = (int)ceilf(conf * (float)n_bins) - 1;  // bins (lo, hi]
        bin[row] = b < 0 ? 0 : (b >= n_bins ? n_bins - 1 : b);
    }
}
"""

_KERNEL_NAMES = tuple(
    f"{name}<{kind}>"
    for name in ("ce_rows_warp", "ce_rows_block", "bce_rows_warp", "metrics_rows_warp")
    for kind in (0, 1, 2)
)


def is_device_array(array: Any) -> bool:
    """True for a CuPy array (checked without importing CuPy)."""
    return type(array).__module__.split(".")[0] == "cupy"


def _cupy() -> Any:
    import cupy

    return cupy


@functools.cache
def _module() -> Any:
    """The compiled module (once per process; CuPy also caches the binary on disk)."""
    cp = _cupy()
    return cp.RawModule(code=SOURCE, options=("--std=c++17",), name_expressions=_KERNEL_NAMES)


@functools.cache
def _kernel(name: str, kind: int) -> Any:
    return _module().get_function(f"{name}<{kind}>")


@functools.cache
def _row_cache_limit(device_id: int) -> int:
    """Bytes of dynamic shared memory a row cache may take on this device."""
    optin = int(_cupy().cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"])
    return min(ROW_CACHE_MAX_BYTES, optin - 2048)  # room for the kernel's static arrays


def _kind_of(logits: Any) -> int:
    name = np.dtype(logits.dtype).name
    if name not in _KIND:
        raise ValueError(
            "logits must be float32, float16 or bfloat16 given as uint16 words, got " + name
        )
    return _KIND[name]


def _ptr(array: Any | None) -> np.uint64:
    """A device pointer as a kernel argument (null for None)."""
    return np.uint64(0 if array is None else int(array.data.ptr))


def softmax_cross_entropy_rows(
    logits: Any,
    targets: Any,
    valid: Any | None = None,
    *,
    weight: Any | None = None,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    sample_weight: Any | None = None,
    grad_scale: float | None = None,
    grad_out: Any | None = None,
    probabilities: bool = False,
    log_probabilities: bool = False,
) -> SoftmaxCrossEntropyRows:
    """Fused softmax CE forward+backward on the device (same contract and formulas as
    :func:`ce_engine.kernels.cpu.softmax_cross_entropy_rows`).

    ``logits`` (M, C) CuPy array: float32, float16, or bfloat16 as uint16 words. Results are
    float32 CuPy arrays. ``grad_out`` may be ``logits`` itself when it is float32 (in place).
    """
    cp = _cupy()
    kind = _kind_of(logits)
    logits = cp.ascontiguousarray(logits)
    m_rows, c = (int(d) for d in logits.shape)
    y = cp.ascontiguousarray(cp.asarray(targets).reshape(m_rows), dtype=cp.int64)
    ok = (
        cp.ones(m_rows, dtype=cp.uint8)
        if valid is None
        else cp.ascontiguousarray(cp.asarray(valid).reshape(m_rows), dtype=cp.uint8)
    )
    w = None if weight is None else cp.ascontiguousarray(cp.asarray(weight, dtype=cp.float32))
    w_total = float(c) if w is None else float(w.sum(dtype=cp.float64))
    s = (
        None
        if sample_weight is None
        else cp.ascontiguousarray(cp.asarray(sample_weight).reshape(m_rows), dtype=cp.float32)
    )
    grad = None
    if grad_scale is not None:
        if grad_out is None:
            grad = cp.empty((m_rows, c), dtype=cp.float32)
        else:
            if grad_out.dtype != cp.float32 or tuple(grad_out.shape) != (m_rows, c):
                raise ValueError("grad_out must be (M, C) float32")
            if not grad_out.flags.c_contiguous:
                raise ValueError("grad_out must be C-contiguous")
            grad = grad_out
    probs = cp.empty((m_rows, c), dtype=cp.float32) if probabilities else None
    log_probs = cp.empty((m_rows, c), dtype=cp.float32) if log_probabilities else None
    per_sample = cp.empty(m_rows, dtype=cp.float32)
    valid_weight = cp.empty(m_rows, dtype=cp.float32)
    eps = float(label_smoothing)
    args = (
        logits,
        _ptr(y),
        _ptr(ok),
        _ptr(w),
        _ptr(s),
        _ptr(grad),
        _ptr(probs),
        _ptr(log_probs),
        _ptr(per_sample),
        _ptr(valid_weight),
        np.int64(m_rows),
        np.int64(c),
        np.float32(1.0 / temperature),
        np.float32(eps),
        np.float32(w_total),
        np.float32(grad_scale or 0.0),
        np.int32(1 if eps else 0),
    )
    if m_rows:
        if c <= WARP_ROW_MAX_CLASSES:
            warps = 8
            blocks = (m_rows + warps - 1) // warps
            _kernel("ce_rows_warp", kind)((blocks,), (32 * warps,), args)
        else:
            fn = _kernel("ce_rows_block", kind)
            cache_bytes = 4 * c
            cache = cache_bytes <= _row_cache_limit(int(cp.cuda.Device().id))
            shared = cache_bytes if cache else 0
            if shared > 32 * 1024:  # beyond the default 48 KiB with the static arrays
                fn.max_dynamic_shared_size_bytes = shared
            fn(
                (m_rows,),
                (ROW_BLOCK_THREADS,),
                (*args, np.int32(1 if cache else 0)),
                shared_mem=shared,
            )
    arrays: dict[str, Any] = {}
    if grad is not None:
        arrays["grad"] = grad
    if probs is not None:
        arrays["probabilities"] = probs
    if log_probs is not None:
        arrays["log_probabilities"] = log_probs
    return SoftmaxCrossEntropyRows(per_sample, valid_weight, arrays)


def binary_cross_entropy_rows(
    logits: Any,
    targets: Any,
    *,
    pos_weight: Any | None = None,
    element_weight: Any | None = None,
    label_smoothing: float = 0.0,
    grad_scale: float | None = None,
    grad_out: Any | None = None,
    probabilities: bool = False,
) -> BinaryCrossEntropyRows:
    """Fused sigmoid BCE on the device; formulas and contract of
    :func:`ce_engine.kernels.cpu.binary_cross_entropy_rows`."""
    cp = _cupy()
    kind = _kind_of(logits)
    logits = cp.ascontiguousarray(logits)
    m_rows, c = (int(d) for d in logits.shape)
    t = cp.ascontiguousarray(cp.asarray(targets), dtype=cp.float32)
    if tuple(t.shape) != (m_rows, c):
        raise ValueError("targets must have the logits' shape")
    pw = None if pos_weight is None else cp.ascontiguousarray(pos_weight, dtype=cp.float32)
    v = None
    if element_weight is not None:
        v = cp.ascontiguousarray(cp.asarray(element_weight), dtype=cp.float32)
        if tuple(v.shape) != (m_rows, c):
            raise ValueError("element_weight must have the logits' shape")
    grad = None
    if grad_scale is not None:
        grad = cp.empty((m_rows, c), dtype=cp.float32) if grad_out is None else grad_out
        if grad.dtype != cp.float32 or tuple(grad.shape) != (m_rows, c):
            raise ValueError("grad_out must be (M, C) float32")
    probs = cp.empty((m_rows, c), dtype=cp.float32) if probabilities else None
    per_sample = cp.empty(m_rows, dtype=cp.float32)
    if m_rows:
        warps = 8
        _kernel("bce_rows_warp", kind)(
            ((m_rows + warps - 1) // warps,),
            (32 * warps,),
            (
                logits,
                t,
                _ptr(pw),
                _ptr(v),
                _ptr(grad),
                _ptr(probs),
                per_sample,
                np.int64(m_rows),
                np.int64(c),
                np.float32(label_smoothing),
                np.float32(grad_scale or 0.0),
            ),
        )
    arrays: dict[str, Any] = {}
    if grad is not None:
        arrays["grad"] = grad
    if probs is not None:
        arrays["probabilities"] = probs
    return BinaryCrossEntropyRows(per_sample, arrays)


def classification_pass(logits: Any, targets: Any, n_bins: int = 15) -> dict[str, Any]:
    """One fused read of the logits for the classification metrics; contract and outputs of
    :func:`ce_engine.kernels.cpu.softmax_row_stats` (CuPy arrays; plus the confidence bin)."""
    cp = _cupy()
    kind = _kind_of(logits)
    logits = cp.ascontiguousarray(logits)
    m_rows, c = (int(d) for d in logits.shape)
    y = cp.ascontiguousarray(cp.asarray(targets).reshape(m_rows), dtype=cp.int64)
    pred = cp.empty(m_rows, dtype=cp.int64)
    confidence = cp.empty(m_rows, dtype=cp.float32)
    rank = cp.empty(m_rows, dtype=cp.int32)
    bins = cp.empty(m_rows, dtype=cp.int32)
    if m_rows:
        warps = 8
        _kernel("metrics_rows_warp", kind)(
            ((m_rows + warps - 1) // warps,),
            (32 * warps,),
            (
                logits,
                y,
                pred,
                confidence,
                rank,
                bins,
                np.int64(m_rows),
                np.int64(c),
                np.int32(n_bins),
            ),
        )
    return {"prediction": pred, "confidence": confidence, "rank": rank, "bin": bins}
