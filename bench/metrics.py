"""Metrics benchmark: ``evaluate`` with metrics, fused row statistics vs the generic NumPy path.

    python -m bench.metrics [--repeat R] [--json PATH]

Cross-entropy on float32 logits with class-id targets, 2 threads (the kernels' default), for
loss only and for three metric sets. "fused" is the default path (per-row softmax statistics
from one chunked pass, ``ce_engine.kernels.cpu.softmax_row_stats``); "generic" is the
xp-generic metric code (full log-softmax and probability arrays), the path CuPy and
probability inputs take. Both are timed interleaved, repetition by repetition, in one process.

Then the per-batch cost of a run's stored metric state for a 1000-class confusion matrix
(``MetricState.to_dict`` → JSON → ``from_dict``, what the run store does on every batch):
packed (the default: zlib + base64 float64) vs the statistics as JSON lists.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import ce_engine
from bench._results import write_results
from ce_engine.metrics import MetricState
from ce_engine.metrics import softmax as metrics_module
from ce_engine.metrics.cells import Cells

SHAPES = [(4096, 1000), (1024, 32000)]
METRIC_SETS = {
    "loss only": [],
    "accuracy + nll + ece": ["accuracy", "nll", "ece"],
    "top-5 accuracy": ["top_k_accuracy"],
    "all per-row metrics": ["accuracy", "top_k_accuracy", "nll", "ece", "brier", "entropy"],
}


@contextlib.contextmanager
def generic_metrics() -> Iterator[None]:
    """Route ``metric_state`` through the xp-generic code for the duration of the block."""
    original = metrics_module._fused_row_stats
    metrics_module._fused_row_stats = lambda *args: False
    try:
        yield
    finally:
        metrics_module._fused_row_stats = original


def timed(z: np.ndarray, y: np.ndarray, names: list[str], generic: bool) -> float:
    with generic_metrics() if generic else contextlib.nullcontext():
        start = time.perf_counter()
        ce_engine.evaluate("cross_entropy", z, y, metrics=names, backend="numpy")
        return time.perf_counter() - start


def state_round_trip(rng: np.random.Generator, repeat: int) -> list[dict[str, Any]]:
    c = 1000
    z = rng.standard_normal((4096, c), dtype=np.float32)
    y = rng.integers(0, c, size=4096)
    state = ce_engine.evaluate(
        "cross_entropy", z, y, metrics=["confusion_matrix", "accuracy"], backend="numpy"
    ).metric_state
    assert state is not None

    def as_lists() -> dict[str, Any]:
        data = state.to_dict()
        dense = {k: v.dense() if isinstance(v, Cells) else v for k, v in state.stats.items()}
        data["stats"] = {
            k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in dense.items()
        }
        return data

    rows = []
    print(f"\nrun state of a {c}-class confusion matrix: to_dict + JSON + from_dict")
    for label, encode in (("packed", state.to_dict), ("lists", as_lists)):
        times, size = [], 0
        for _ in range(repeat + 1):
            start = time.perf_counter()
            text = json.dumps(encode())
            MetricState.from_dict(json.loads(text))
            times.append(time.perf_counter() - start)
            size = len(text)
        ms = statistics.median(times[1:]) * 1e3
        rows.append({"format": label, "json_bytes": size, "ms": ms})
        print(f"  {label:<7} {size / 1e6:8.2f} MB {ms:8.1f} ms")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    print(f"{'N x C':>14} {'metrics':<22} {'fused ms':>9} {'generic ms':>10} {'generic/fused':>13}")
    for m, c in SHAPES:
        z = rng.standard_normal((m, c), dtype=np.float32)
        y = rng.integers(0, c, size=m)
        for label, names in METRIC_SETS.items():
            samples: dict[bool, list[float]] = {False: [], True: []}
            for generic in (False, True):  # warm-up
                timed(z, y, names, generic)
            for _ in range(args.repeat):
                for generic in (False, True):
                    samples[generic].append(timed(z, y, names, generic))
            fused_ms = statistics.median(samples[False]) * 1e3
            generic_ms = statistics.median(samples[True]) * 1e3
            rows.append(
                {
                    "shape": [m, c],
                    "metrics": names,
                    "fused_ms": fused_ms,
                    "generic_ms": generic_ms,
                    "speedup": generic_ms / fused_ms,
                }
            )
            print(
                f"{m:>6} x {c:<6} {label:<22} {fused_ms:9.1f} {generic_ms:10.1f} "
                f"{generic_ms / fused_ms:12.1f}x",
                flush=True,
            )
    state_rows = state_round_trip(rng, args.repeat)
    write_results(
        {
            "benchmark": "metrics_fused_vs_generic_cpu",
            "state_round_trip": state_rows,
            "repeat": args.repeat,
            "machine": {"processor": platform.processor(), "python": platform.python_version()},
            "numpy": np.__version__,
            "rows": rows,
        },
        "metrics",
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
