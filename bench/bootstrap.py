"""Bootstrap benchmark: a batch's evaluation with and without B replicates of its statistics.

    python -m bench.bootstrap [--rows 256] [--classes 1000] [--replicates 200] [--repeat R]
                              [--json PATH]

Cross-entropy on float32 logits with class-id targets and the run metrics that have intervals
(accuracy, top-k, nll, brier, ece). "plain" is ``ce_engine.evaluate`` as a run calls it;
"bootstrap" adds what a run with ``confidence`` does per batch: hash the batch's string
example ids, draw the (N, B) Poisson weights and ``evaluate(..., replicate_weights=W)``
(the replicate state by one matrix product). Both are timed interleaved, repetition by
repetition, in one process; the report gives the median and the minimum of each (the minimum
is the least disturbed by other work on a shared host), their ratios, and the minimum time of
each part of the extra work: hashing the ids, drawing the weights, the replicate state inside
``evaluate``, and the percentile intervals of that state that a run's answer carries
(``replicate_intervals``). A run's ingestion adds decoding and the store's transaction to both
sides.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

import ce_engine
from bench._results import write_results
from ce_engine.metrics.bootstrap import example_id_hashes, poisson_weights
from ce_engine.metrics.intervals import replicate_intervals

METRICS = ["accuracy", "top_k_accuracy", "nll", "brier", "ece"]


def _plain(z: np.ndarray, y: np.ndarray) -> float:
    start = time.perf_counter()
    ce_engine.evaluate("cross_entropy", z, y, metrics=METRICS, backend="numpy")
    return time.perf_counter() - start


def _bootstrap(z: np.ndarray, y: np.ndarray, ids: list[str], replicates: int) -> float:
    start = time.perf_counter()
    h1, _ = example_id_hashes(ids)
    weights = poisson_weights(h1, replicates, seed=0)
    ce_engine.evaluate(
        "cross_entropy", z, y, metrics=METRICS, backend="numpy", replicate_weights=weights
    )
    return time.perf_counter() - start


def _min_ms(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def bench(rows: int, classes: int, replicates: int, repeat: int) -> dict[str, Any]:
    """Median and minimum milliseconds of each variant over ``repeat`` interleaved
    repetitions (after a warm-up), then the minimum of each part of the extra time."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(rows, classes)).astype(np.float32)
    y = rng.integers(0, classes, rows)
    ids = [f"example-{i:08d}" for i in range(rows)]
    _plain(z, y), _bootstrap(z, y, ids, replicates)
    plain, boot = [], []
    for _ in range(repeat):
        plain.append(_plain(z, y))
        boot.append(_bootstrap(z, y, ids, replicates))
    p, b = statistics.median(plain) * 1e3, statistics.median(boot) * 1e3
    p_min, b_min = min(plain) * 1e3, min(boot) * 1e3
    h1, _ = example_id_hashes(ids)
    weights = poisson_weights(h1, replicates, seed=0)
    with_weights = _min_ms(
        lambda: ce_engine.evaluate(
            "cross_entropy", z, y, metrics=METRICS, backend="numpy", replicate_weights=weights
        ),
        repeat,
    )
    state = ce_engine.evaluate(
        "cross_entropy", z, y, metrics=METRICS, backend="numpy", replicate_weights=weights
    ).replicate_state
    assert state is not None
    replicated = state.compute()
    return {
        "rows": rows,
        "classes": classes,
        "replicates": replicates,
        "metrics": METRICS,
        "plain_ms": p,
        "bootstrap_ms": b,
        "ratio": b / p,
        "plain_min_ms": p_min,
        "bootstrap_min_ms": b_min,
        "ratio_min": b_min / p_min,
        "parts_min_ms": {
            "hash_ids": _min_ms(lambda: example_id_hashes(ids), repeat),
            "weights": _min_ms(lambda: poisson_weights(h1, replicates, seed=0), repeat),
            "replicate_state": with_weights - p_min,
            "intervals": _min_ms(lambda: replicate_intervals(replicated, 0.95), repeat),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = bench(args.rows, args.classes, args.replicates, args.repeat)
    print(
        f"{result['rows']}×{result['classes']}, {result['replicates']} replicates, medians: "
        f"plain {result['plain_ms']:.2f} ms, with replicates {result['bootstrap_ms']:.2f} ms, "
        f"ratio {result['ratio']:.2f} (minima {result['plain_min_ms']:.2f} / "
        f"{result['bootstrap_min_ms']:.2f} ms, ratio {result['ratio_min']:.2f}); extra (min): "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in result["parts_min_ms"].items())
    )
    report = {"machine": platform.machine(), "python": platform.python_version(), **result}
    write_results(report, "bootstrap", args.json)


if __name__ == "__main__":
    main()
