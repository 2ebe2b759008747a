"""Peak extra memory and speed of ``linear_cross_entropy`` vs materialising the logits.

    python -m bench.linear_memory [--n 4096 --d 1024 --c 32000 --repeat 1 --json PATH]

Both paths compute the mean cross-entropy of z = X Wᵀ + b and dX, dW, db in float32. Memory is
the tracemalloc peak (NumPy reports its allocations to it) above what is held before the call
(the inputs); outputs dX, dW, db count, as both paths return them. Speed is the best wall time
of ``--repeat`` rounds without tracing, the paths taking turns within a round. Target: chunked
peak ≤ 25% of the naive peak. The chunked path runs twice: without metrics and with
``METRICS`` (reduced inside the row chunks, so they should add at most O(N + C) to the peak).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import ce_engine
from bench._results import write_results

OUTPUTS = ("grad_features", "grad_weight", "grad_bias")
METRICS = ("accuracy", "top_k_accuracy", "nll", "perplexity", "entropy", "ece", "brier")


def naive(x: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The plain NumPy path: full (N, C) logits, softmax, G = (P − Y)/N, then the matmuls."""
    n = x.shape[0]
    z = x @ w.T + b
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    log_p = z - lse
    loss = -float(log_p[np.arange(n), y].sum(dtype=np.float64)) / n
    g = np.exp(log_p)
    g[np.arange(n), y] -= 1.0
    g /= n
    return {"loss": loss, "grad_features": g @ w, "grad_weight": g.T @ x, "grad_bias": g.sum(0)}


def chunked(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    y: np.ndarray,
    chunk_elements: int,
    metrics: tuple[str, ...] = (),
) -> dict[str, Any]:
    res = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        y,
        features=x,
        weight=w,
        bias=b,
        options={"chunk_elements": chunk_elements},
        outputs=OUTPUTS,
        metrics=metrics,
        backend="numpy",
    )
    return {"loss": res.value, **res.outputs, "metrics": res.metrics}


def peak_extra_bytes(fn: Callable[[], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, out


def best_seconds(fns: list[Callable[[], object]], repeat: int) -> list[float]:
    """Best wall time of each of ``fns`` over ``repeat`` rounds, run in turn within a round so
    that they share the machine's load of the moment."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--c", type=int, default=32000)
    parser.add_argument("--chunk-elements", type=int, default=1 << 23)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.d), dtype=np.float32)
    w = rng.standard_normal((args.c, args.d), dtype=np.float32) / np.float32(args.d**0.5)
    b = rng.standard_normal(args.c, dtype=np.float32)
    y = rng.integers(0, args.c, size=args.n)

    naive_peak, ref = peak_extra_bytes(lambda: naive(x, w, b, y))
    del ref["grad_weight"], ref["grad_features"]
    chunk_peak, out = peak_extra_bytes(lambda: chunked(x, w, b, y, args.chunk_elements))
    loss_diff = abs(out["loss"] - ref["loss"])
    del out
    metrics_peak, out = peak_extra_bytes(lambda: chunked(x, w, b, y, args.chunk_elements, METRICS))
    metrics = out["metrics"]
    del out
    naive_s, chunk_s, metrics_s = best_seconds(
        [
            lambda: naive(x, w, b, y),
            lambda: chunked(x, w, b, y, args.chunk_elements),
            lambda: chunked(x, w, b, y, args.chunk_elements, METRICS),
        ],
        args.repeat,
    )

    mib = 1 << 20
    result = {
        "n": args.n,
        "d": args.d,
        "c": args.c,
        "dtype": "float32",
        "chunk_elements": args.chunk_elements,
        "rows_per_chunk": max(1, args.chunk_elements // args.c),
        "logits_mib": args.n * args.c * 4 / mib,
        "outputs_mib": (args.n * args.d + args.c * args.d + args.c) * 4 / mib,
        "naive_peak_extra_mib": naive_peak / mib,
        "chunked_peak_extra_mib": chunk_peak / mib,
        "chunked_metrics_peak_extra_mib": metrics_peak / mib,
        "metrics_extra_mib": (metrics_peak - chunk_peak) / mib,
        "metrics": list(METRICS),
        "metric_values": metrics,
        "peak_ratio": chunk_peak / naive_peak,
        "target_ratio": 0.25,
        "naive_seconds": naive_s,
        "chunked_seconds": chunk_s,
        "chunked_metrics_seconds": metrics_s,
        "speedup": naive_s / chunk_s,
        "loss_abs_diff": loss_diff,
        "repeat": args.repeat,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "numpy": np.__version__,
    }
    rows = [
        ("path", "peak extra MiB", "seconds"),
        ("naive (full logits)", f"{result['naive_peak_extra_mib']:.1f}", f"{naive_s:.2f}"),
        ("linear_cross_entropy", f"{result['chunked_peak_extra_mib']:.1f}", f"{chunk_s:.2f}"),
        ("  + metrics", f"{result['chunked_metrics_peak_extra_mib']:.1f}", f"{metrics_s:.2f}"),
    ]
    print(f"N={args.n} D={args.d} C={args.c} float32, logits {result['logits_mib']:.0f} MiB")
    print(f"metrics: {', '.join(METRICS)}")
    for row in rows:
        print(f"{row[0]:<22} {row[1]:>15} {row[2]:>9}")
    print(
        f"peak ratio {result['peak_ratio']:.3f} (target <= 0.25), "
        f"speed {result['speedup']:.2f}x naive, |Δloss| {loss_diff:.2e}"
    )
    write_results(result, "linear_memory", args.json)
    return result


if __name__ == "__main__":
    main()
