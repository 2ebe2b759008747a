"""GPU benchmark (device machine): softmax CE forward+backward w.r.t. the logits.

    python -m bench.gpu [--repeat R] [--json PATH]

Ours (``ce_engine.kernels.cuda.softmax_cross_entropy_rows``: mean loss + gradient, bf16 given
as its raw 16-bit words) vs torch eager ``F.cross_entropy`` forward+backward and Liger Kernel's
fused CE where ``liger_kernel`` imports. Times are medians of CUDA-event timings after a
warm-up. The HBM floor is (bytes read + bytes written) / the measured device-to-device copy
bandwidth (read + write counted), with the gradient in the logits' dtype as torch writes it;
ours writes a float32 gradient, so its own floor (``floor_ours``) is also given.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench._results import write_results
from ce_engine.kernels import cuda

CASES = [
    (8192, 128256, "float32"),
    (8192, 128256, "bfloat16"),
    (4096, 32000, "float32"),
    (65536, 1000, "float32"),
    (1024, 10, "float32"),
]


def event_median_ms(cp: Any, fn: Callable[[], Any], repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def copy_bandwidth(cp: Any, repeat: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = 1 << 28  # 1 GiB of float32
    src = cp.random.random(n, dtype=cp.float32)
    dst = cp.empty_like(src)
    ms = event_median_ms(cp, lambda: cp.copyto(dst, src), repeat)
    return 2 * n * 4 / (ms / 1e3)


def load_torch() -> Any | None:
    try:
        import torch
    except ImportError:
        print("torch is not installed: its column is skipped")
        return None
    if not torch.cuda.is_available():
        print("torch has no CUDA device: its column is skipped")
        return None
    return torch


def load_liger() -> Any | None:
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception as exc:  # not installed, or no build for this platform
        print(f"liger-kernel unavailable ({exc.__class__.__name__}: {exc}): its column is skipped")
        return None
    return liger_cross_entropy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        print(f"bench.gpu needs CuPy and a CUDA device: {exc}")
        return 2
    torch = load_torch()
    liger = load_liger()
    props = cp.cuda.runtime.getDeviceProperties(0)
    device_name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    bandwidth = copy_bandwidth(cp, args.repeat)
    rows = []
    for m, c, dtype in CASES:
        rng = cp.random.default_rng(0)
        z32 = rng.standard_normal((m, c), dtype=cp.float32)
        z32 *= 2
        y = rng.integers(0, c, size=m, dtype=cp.int64)
        if dtype == "bfloat16":
            # round-to-nearest-even to bf16 words, kept as uint16 for our kernel
            bits = z32.view(cp.uint32)
            z_ours = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
            elt = 2
        else:
            z_ours = z32
            elt = 4
        ms: dict[str, float] = {}

        def ours(z_ours: Any = z_ours, y: Any = y, m: int = m) -> Any:
            return cuda.softmax_cross_entropy_rows(z_ours, y, grad_scale=1.0 / m)

        ms["ours"] = event_median_ms(cp, ours, args.repeat)
        out = ours()
        assert bool(cp.isfinite(out.arrays["grad"]).all()), "non-finite gradient"
        del out
        if torch is not None:
            zt = torch.as_tensor(z32, device="cuda")
            if dtype == "bfloat16":
                zt = zt.to(torch.bfloat16)
            yt = torch.as_tensor(y, device="cuda")

            def torch_eager(zt: Any = zt, yt: Any = yt) -> Any:
                x = zt.detach().requires_grad_(True)
                torch.nn.functional.cross_entropy(x, yt).backward()
                return x.grad

            ms["torch"] = event_median_ms(cp, torch_eager, args.repeat)
            if liger is not None:

                def liger_fused(zt: Any = zt, yt: Any = yt) -> Any:
                    x = zt.detach().requires_grad_(True)
                    liger(x, yt).backward()
                    return x.grad

                try:
                    ms["liger"] = event_median_ms(cp, liger_fused, args.repeat)
                except Exception as exc:
                    print(f"liger failed at {m}x{c} {dtype}: {exc}")
            del zt, yt
        floor_ms = (m * c * elt * 2) / bandwidth * 1e3
        floor_ours_ms = (m * c * (elt + 4)) / bandwidth * 1e3
        rows.append(
            {
                "shape": [m, c],
                "dtype": dtype,
                "ms": ms,
                "floor_ms": floor_ms,
                "floor_ours_ms": floor_ours_ms,
                "ours_over_floor": ms["ours"] / floor_ms,
                "ours_over_own_floor": ms["ours"] / floor_ours_ms,
            }
        )
        del z32, z_ours, y
        cp.get_default_memory_pool().free_all_blocks()

    print(f"\nsoftmax CE fwd+bwd on {device_name}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(
        f"{'N x C':>15} {'dtype':>8} {'floor':>7} {'ours':>7} {'torch':>7} {'liger':>7} "
        f"{'ours/floor':>10} {'torch/ours':>10} {'liger/ours':>10}"
    )
    nan = float("nan")
    for row in rows:
        ms = row["ms"]
        print(
            f"{row['shape'][0]:>6} x {row['shape'][1]:<6} {row['dtype']:>8} "
            f"{row['floor_ms']:7.2f} {ms['ours']:7.2f} {ms.get('torch', nan):7.2f} "
            f"{ms.get('liger', nan):7.2f} {row['ours_over_floor']:10.2f} "
            f"{ms.get('torch', nan) / ms['ours']:10.2f} {ms.get('liger', nan) / ms['ours']:10.2f}"
        )
    report = {
        "benchmark": "softmax_cross_entropy_fwd_bwd_gpu",
        "device": device_name,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "repeat": args.repeat,
        "torch": getattr(torch, "__version__", None),
        "numpy": np.__version__,
        "cupy": cp.__version__,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    write_results(report, "gpu", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
