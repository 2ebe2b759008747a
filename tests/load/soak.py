"""Load / soak driver: N concurrent async clients against a real `ce-eval serve` on localhost.

    python -m tests.load.soak --clients 64 --duration 600      # the long run (make soak)

Mixes valid evaluations of several sizes (JSON lists and base64) with bad inputs, then reports
status counts, latency percentiles and the server's RSS growth after warm-up. Loops are
bounded by ``duration`` and stop by themselves; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from tests.servers import serving as serve


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _tensor(array: np.ndarray) -> dict[str, Any]:
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": base64.b64encode(array.tobytes()).decode(),
    }


def request_mix(seed: int = 0) -> list[tuple[dict[str, Any], int]]:
    """(payload, expected status) pairs: valid small/medium batches and bad inputs."""
    rng = np.random.default_rng(seed)
    small = rng.standard_normal((16, 10))
    medium = rng.standard_normal((64, 1000)).astype(np.float32)
    return [
        (
            {
                "loss": "cross_entropy",
                "logits": small.tolist(),
                "targets": rng.integers(0, 10, 16).tolist(),
            },
            200,
        ),
        (
            {
                "loss": "cross_entropy",
                "logits": _tensor(medium),
                "targets": rng.integers(0, 1000, 64).tolist(),
                "outputs": ["grad"],
                "tensor_encoding": "base64",
                "metrics": ["accuracy", "ece"],
            },
            200,
        ),
        ({"loss": "cross_entropy", "logits": small.tolist(), "targets": [99] * 16}, 422),
        ({"loss": "cross_entropy", "logits": [[1.0, 2.0], [3.0]], "targets": [0, 1]}, 422),
        ({"loss": "nope", "logits": small.tolist(), "targets": [0] * 16}, 422),
    ]


@dataclass
class Report:
    statuses: Counter[int] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    rss_start: int = 0
    rss_end: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "requests": sum(self.statuses.values()),
            "req_per_s": round(sum(self.statuses.values()) / max(self.seconds, 1e-9), 1),
            "statuses": dict(self.statuses),
            "unexpected": dict(self.unexpected),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "rss_start_mb": round(self.rss_start / 2**20, 1),
            "rss_end_mb": round(self.rss_end / 2**20, 1),
            "rss_growth": round(self.rss_end / self.rss_start - 1, 4) if self.rss_start else None,
        }


async def drive(url: str, pid: int, clients: int, duration: float, warmup: float) -> Report:
    report = Report()
    mix = [(json.dumps(p).encode(), s) for p, s in request_mix()]
    deadline = time.monotonic() + duration
    warm_until = time.monotonic() + warmup
    started = time.monotonic()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(seed: int, client: httpx.AsyncClient) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            body, expected = rnd.choice(mix)
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    "/v1/evaluate", content=body, headers={"content-type": "application/json"}
                )
                status = r.status_code
            except httpx.TransportError as exc:
                report.unexpected[type(exc).__name__] += 1
                continue
            report.latencies_ms.append((time.perf_counter() - t0) * 1000)
            report.statuses[status] += 1
            if status != expected and status != 503:
                report.unexpected[f"{expected}->{status}"] += 1

    async def sample_rss() -> None:
        await asyncio.sleep(max(0.0, warm_until - time.monotonic()))
        report.rss_start = rss_bytes(pid)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        await asyncio.gather(sample_rss(), *(client_loop(i, client) for i in range(clients)))
    report.seconds = time.monotonic() - started
    report.rss_end = rss_bytes(pid)
    return report


def run(clients: int, duration: float, warmup: float) -> dict[str, Any]:
    with serve(env={"CE_EVAL_MAX_INFLIGHT": str(max(clients, 16))}) as server:
        report = asyncio.run(drive(server.url, server.process.pid, clients, duration, warmup))
    return report.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    summary = run(args.clients, args.duration, args.warmup)
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=2)
    failed = summary["unexpected"] or any(
        int(s) >= 500 and int(s) != 503 for s in summary["statuses"]
    )
    if failed or (summary["rss_growth"] or 0) > 0.10:
        raise SystemExit("soak failed: unexpected statuses or RSS growth over 10%")


if __name__ == "__main__":
    main()
