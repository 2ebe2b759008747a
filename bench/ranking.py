"""Ranking-metric benchmark: exact (stateless) vs binned (run state) AUROC / AP, binary metrics.

    python -m bench.ranking [--repeat R] [--json PATH]

Sigmoid binary cross-entropy on float32 logits (N, L) with 0/1 labels, NumPy: ``evaluate`` with
the loss only, with the threshold metrics, and with ``auroc`` + ``average_precision``
(the exact values by a sort of each label's scores, plus the binned histograms a run keeps);
"binned only" is ``ce_engine.metrics.metric_state`` alone (what a run's state needs). Then the
run's per-batch state cost for the histograms (``to_dict`` → JSON → ``from_dict``), and
|binned − exact| macro AUROC for the default 1000 bins. Medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import ce_engine
from bench._results import write_results
from ce_engine.layout import Layout
from ce_engine.metrics import MetricState, metric_state
from ce_engine.registry import get_loss

SHAPES = [(100_000, 10), (10_000, 100), (2_000, 1000)]
THRESHOLD_METRICS = ["accuracy", "subset_accuracy", "f1", "macro_f1", "samples_f1", "nll", "ece"]
RANKING = ["auroc", "average_precision"]


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    options = get_loss("binary_cross_entropy").parse_options({})
    rows: list[dict[str, Any]] = []
    header = ("N x L", "loss", "threshold", "exact+binned", "binned only", "state", "|Δ AUROC|")
    print("{:>14} {:>8} {:>10} {:>13} {:>12} {:>16} {:>10}".format(*header))
    for n, labels in SHAPES:
        z = (rng.standard_normal((n, labels)) * 2).astype(np.float32)
        y = (rng.random((n, labels)) < 1 / (1 + np.exp(-z))).astype(np.float32)
        layout = Layout.of(z.shape, -1)

        def run(names: list[str], z: np.ndarray = z, y: np.ndarray = y) -> Any:
            return ce_engine.evaluate("binary_cross_entropy", z, y, metrics=names, backend="numpy")

        def binned(z: np.ndarray = z, y: np.ndarray = y, layout: Layout = layout) -> Any:
            return metric_state(
                RANKING, np, z, y, layout, options, None, None, "binary_cross_entropy"
            )

        loss_ms = median_ms(lambda: run([]), args.repeat)
        threshold_ms = median_ms(lambda: run(THRESHOLD_METRICS), args.repeat)
        exact_ms = median_ms(lambda: run(RANKING), args.repeat)
        binned_ms = median_ms(binned, args.repeat)
        result = run(RANKING)
        state = result.metric_state
        text = json.dumps(state.to_dict())
        state_ms = median_ms(
            lambda text=text: MetricState.from_dict(json.loads(text)).to_dict(), args.repeat
        )
        gap = abs(state.compute()["auroc"]["macro"] - result.metrics["auroc"]["macro"])
        row = {
            "shape": [n, labels],
            "loss_ms": loss_ms,
            "threshold_metrics_ms": threshold_ms,
            "ranking_exact_and_binned_ms": exact_ms,
            "ranking_binned_only_ms": binned_ms,
            "state_json_bytes": len(text),
            "state_round_trip_ms": state_ms,
            "macro_auroc_binned_minus_exact": gap,
        }
        rows.append(row)
        print(
            f"{n:>7} x {labels:<4} {loss_ms:8.1f} {threshold_ms:10.1f} {exact_ms:13.1f} "
            f"{binned_ms:12.1f} {len(text) / 1e3:7.0f} kB {state_ms:5.1f} ms {gap:10.1e}",
            flush=True,
        )
    write_results(
        {
            "benchmark": "ranking_metrics_cpu",
            "threshold_metrics": THRESHOLD_METRICS,
            "ranking_metrics": RANKING,
            "repeat": args.repeat,
            "machine": {"processor": platform.processor(), "python": platform.python_version()},
            "numpy": np.__version__,
            "rows": rows,
        },
        "ranking",
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
