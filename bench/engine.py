"""CPU benchmark: softmax CE forward+backward, ours vs PyTorch CPU at the same thread count.

    python -m bench.engine [--loss cross_entropy|binary_cross_entropy] [--threads N]
                           [--repeat R] [--json PATH] [--no-memory]

Each shape is timed side by side in one process, the implementations interleaved repetition
by repetition (so load from other processes hits them alike); medians are reported with the
ratio torch / ours. "ours kernel" is ``ce_engine.kernels.cpu.softmax_cross_entropy_rows``
(mean loss + gradient); "ours evaluate" is the whole ``ce_engine.evaluate`` call (validation,
nan screening, reduction included). ``--loss binary_cross_entropy`` times sigmoid BCE with
multi-hot float32 labels instead (``binary_cross_entropy_rows`` vs
``F.binary_cross_entropy_with_logits``). Peak extra memory is measured in a fresh subprocess per
(implementation, shape) as the rise of the peak resident set over the inputs.
PyTorch missing → its columns are skipped with a message.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import ce_engine
from bench._results import write_results
from ce_engine.kernels import cpu

SHAPES = [(4096, 1000), (1024, 32000), (256, 128256), (65536, 10)]


def load_torch(threads: int) -> Any | None:
    try:
        import torch
    except ImportError:
        print("torch is not installed: its columns are skipped (pip install torch==2.13.0)")
        return None
    torch.set_num_threads(threads)
    return torch


LOSSES = ("cross_entropy", "binary_cross_entropy")


def make_inputs(
    m: int, c: int, seed: int = 0, loss: str = "cross_entropy"
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((m, c), dtype=np.float32)
    z *= 2  # in place: no full-size temporary raises the memory baseline
    if loss == "binary_cross_entropy":  # multi-hot labels, ~5 positives per row
        return z, (rng.random((m, c), dtype=np.float32) < 5 / c).astype(np.float32)
    return z, rng.integers(0, c, size=m)


def runners(
    z: np.ndarray, y: np.ndarray, threads: int, torch: Any | None, loss: str = "cross_entropy"
) -> dict[str, Callable[[], Any]]:
    m = z.shape[0]
    bce = loss == "binary_cross_entropy"

    def kernel() -> Any:
        if bce:
            return cpu.binary_cross_entropy_rows(z, y, grad_scale=1.0 / z.size, threads=threads)
        return cpu.softmax_cross_entropy_rows(z, y, grad_scale=1.0 / m, threads=threads)

    def evaluate() -> Any:
        return ce_engine.evaluate(loss, z, y, outputs=["grad"], backend="numpy")

    out: dict[str, Callable[[], Any]] = {"ours kernel": kernel, "ours evaluate": evaluate}
    if torch is not None:
        zt, yt = torch.from_numpy(z), torch.from_numpy(y)
        functional = torch.nn.functional
        reference = functional.binary_cross_entropy_with_logits if bce else functional.cross_entropy

        def torch_fwd_bwd() -> Any:
            x = zt.detach().requires_grad_(True)
            reference(x, yt).backward()
            return x.grad

        out["torch"] = torch_fwd_bwd
    return out


def time_side_by_side(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up: thread pools, allocator, first-touch
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def peak_extra_bytes(impl: str, m: int, c: int, threads: int, loss: str) -> int | None:
    """Run one call of ``impl`` in a fresh interpreter; the rise of its peak RSS, in bytes."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.engine",
            "--memory-probe",
            impl,
            str(m),
            str(c),
            str(threads),
            loss,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return int(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"memory probe {impl} {m}x{c} failed: {proc.stderr.strip()[-300:]}")
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited via fork)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_probe(impl: str, m: int, c: int, threads: int, loss: str) -> None:
    torch = load_torch(threads) if impl == "torch" else None
    small_z, small_y = make_inputs(64, 8, seed=1, loss=loss)
    for fn in runners(small_z, small_y, threads, torch, loss).values():
        fn()  # pools and lazy imports before the baseline
    z, y = make_inputs(m, c, loss=loss)
    fn = runners(z, y, threads, torch, loss)[impl]
    before = peak_rss_bytes()
    fn()
    print(peak_rss_bytes() - before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=LOSSES, default="cross_entropy")
    parser.add_argument("--threads", type=int, default=cpu.available_cores())
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-probe", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        impl, m, c, threads, loss = args.memory_probe
        memory_probe(impl, int(m), int(c), int(threads), loss)
        return 0

    cpu.set_threads(args.threads)
    torch = load_torch(args.threads)
    rows = []
    for m, c in SHAPES:
        z, y = make_inputs(m, c, loss=args.loss)
        ms = time_side_by_side(runners(z, y, args.threads, torch, args.loss), args.repeat)
        row: dict[str, Any] = {"shape": [m, c], "dtype": "float32", "ms": ms}
        if "torch" in ms:
            row["speedup_kernel"] = ms["torch"] / ms["ours kernel"]
            row["speedup_evaluate"] = ms["torch"] / ms["ours evaluate"]
        if not args.no_memory:
            names = ["ours kernel", "ours evaluate"] + (["torch"] if torch else [])
            row["peak_extra_mib"] = {
                name: (
                    b / 2**20
                    if (b := peak_extra_bytes(name, m, c, args.threads, args.loss)) is not None
                    else None
                )
                for name in names
            }
            row["grad_mib"] = m * c * 4 / 2**20
        rows.append(row)
        del z, y

    print(
        f"\n{args.loss} fwd+bwd, float32, {args.threads} thread(s), median of {args.repeat}, "
        f"{platform.processor() or platform.machine()}"
    )
    header = f"{'N x C':>14} {'torch ms':>9} {'kernel ms':>9} {'eval ms':>9} {'x kernel':>8} "
    header += f"{'x eval':>7}"
    if not args.no_memory:
        header += f" {'grad MiB':>8} {'mem torch':>9} {'mem kern':>8} {'mem eval':>8}"
    print(header)
    for row in rows:
        ms = row["ms"]
        line = f"{row['shape'][0]:>6} x {row['shape'][1]:<6} {ms.get('torch', float('nan')):9.2f} "
        line += f"{ms['ours kernel']:9.2f} {ms['ours evaluate']:9.2f} "
        line += f"{row.get('speedup_kernel', float('nan')):8.2f} "
        line += f"{row.get('speedup_evaluate', float('nan')):7.2f}"
        if "peak_extra_mib" in row:
            mem = row["peak_extra_mib"]

            def fmt(v: float | None) -> str:
                return f"{v:.0f}" if v is not None else "-"

            line += f" {row['grad_mib']:8.0f} {fmt(mem.get('torch')):>9} "
            line += f"{fmt(mem['ours kernel']):>8} {fmt(mem['ours evaluate']):>8}"
        print(line)
    report = {
        "benchmark": f"{args.loss}_fwd_bwd_cpu",
        "threads": args.threads,
        "repeat": args.repeat,
        "machine": {"processor": platform.processor(), "cores": cpu.available_cores()},
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    write_results(report, "engine", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
