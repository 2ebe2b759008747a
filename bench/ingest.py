"""File ingestion: ``ce-eval run push`` of an evaluation set vs the same metrics computed locally.

``python -m bench.ingest`` writes an N × C float32 evaluation set (default 50,000 × 1000, 200 MB
of logits: ImageNet-val sized) with int64 targets, then, side by side on this machine:

- **local**: ``ce_engine.evaluate`` of cross-entropy with accuracy, top-5 (``top_k_accuracy``),
  nll, ece and confusion_matrix on the arrays, timed alone ("compute") and with reading the
  files first ("load + compute");
- **push**: a real ``ce-eval serve`` (SQLite run store in a temporary directory, same machine),
  ``ce-eval run create`` with the same metrics, and ``ce-eval run push`` of the files as a
  subprocess (the whole command: start-up, reading, encoding, sending, the server's work), for
  each ``--transport`` (REST JSON with base64 tensors, gRPC raw bytes) × ``--batch-size`` ×
  ``--concurrency``; then the run's count, loss and accuracy are
  checked against the local result.

- **local command**: the same as a whole ``python -c`` command (start-up, imports, reading the
  files, compute), since the push is timed as a whole command too.

Goal (issue 15, item 4): push ≤ 2× the local time; the verdict is printed against both the
in-process "load + compute" and the local command. Prints a table and writes
``bench/results/ingest-*.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench._results import write_results

METRICS = ["accuracy", "top_k_accuracy", "nll", "ece", "confusion_matrix"]
OPTIONS = {"top_k": [1, 5]}
FORMATS = ("npy", "npz", "parquet", "safetensors")


def make_set(rows: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a ~75%-accurate classifier (the target's logit raised) and int64 targets."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, size=rows)
    logits = rng.standard_normal((rows, classes), dtype=np.float32)
    logits[np.arange(rows), targets] += 3.5
    return logits, targets


def write_set(root: Path, fmt: str, logits: np.ndarray, targets: np.ndarray) -> Path:
    """The set as one source of ``fmt``; returns the path to push."""
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(root / "logits.npy", logits)
        np.save(root / "targets.npy", targets)
        return root
    if fmt == "npz":
        np.savez(root / "val.npz", logits=logits, targets=targets)
        return root / "val.npz"
    if fmt == "safetensors":
        import safetensors.numpy

        safetensors.numpy.save_file({"logits": logits, "targets": targets}, str(root / "val.st"))
        (root / "val.st").rename(root / "val.safetensors")
        return root / "val.safetensors"
    import pyarrow as pa
    import pyarrow.parquet

    column = pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), logits.shape[1])
    pa.parquet.write_table(
        pa.table({"logits": column, "targets": targets}), root / "val.parquet", compression="none"
    )
    return root / "val.parquet"


#: The local side as a whole command, like the push: start Python, import, read, compute
#: (NumPy reads ``.npy`` / ``.npz`` itself; other formats go through the CLI's readers).
LOCAL_COMMAND = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "import numpy as np\n"
    "import ce_engine\n"
    "path = Path(sys.argv[1])\n"
    "if path.is_dir():\n"
    "    arrays = {n: np.load(path / f'{n}.npy') for n in ('logits', 'targets')}\n"
    "elif path.suffix == '.npz':\n"
    "    arrays = dict(np.load(path))\n"
    "else:\n"
    "    from ce_eval_client.sources import find_sources\n"
    "    (source,) = find_sources([str(path)])\n"
    "    arrays = source.arrays()\n"
    "ce_engine.evaluate('cross_entropy', np.ascontiguousarray(arrays['logits']),\n"
    "    np.asarray(arrays['targets']), options=json.loads(sys.argv[2]),\n"
    "    metrics=sys.argv[3].split(','), backend='numpy')\n"
)


def local_command(path: Path, metrics: list[str]) -> float:
    """Seconds of ``python -c LOCAL_COMMAND`` (best of 2)."""
    argv = [sys.executable, "-c", LOCAL_COMMAND, str(path), json.dumps(OPTIONS), ",".join(metrics)]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run(argv, check=True, timeout=600)
        times.append(time.perf_counter() - start)
    return min(times)


def local(
    path: Path, logits: np.ndarray, targets: np.ndarray, metrics: list[str]
) -> dict[str, Any]:
    """Seconds of ``ce_engine.evaluate`` alone and with reading ``path`` first (best of 2)."""
    import ce_engine
    from ce_eval_client.sources import find_sources

    def compute(z: np.ndarray, y: np.ndarray) -> Any:
        return ce_engine.evaluate(
            "cross_entropy", z, y, options=OPTIONS, metrics=metrics, backend="numpy"
        )

    compute_s, load_s = [], []
    result = None
    for _ in range(2):
        start = time.perf_counter()
        result = compute(logits, targets)
        compute_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        (source,) = find_sources([str(path)])
        arrays = source.arrays()
        compute(np.ascontiguousarray(arrays["logits"]), np.asarray(arrays["targets"]))
        load_s.append(time.perf_counter() - start)
    assert result is not None
    return {
        "compute_s": min(compute_s),
        "load_compute_s": min(load_s),
        "count": result.count,
        "value": result.value,
        "accuracy": result.metrics.get("accuracy"),
    }


def cli(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ce_eval_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def push(
    server: Any, path: Path, metrics: list[str], transport: str, batch_size: int, concurrency: int
) -> dict[str, Any]:
    """One ``run create`` + ``run push`` (timed: the push command); the run's aggregates."""
    url = server.url
    flags = [a for m in metrics for a in ("--metric", m)]
    created = cli("run", "create", "--url", url, "--name", f"ingest-{transport}-{batch_size}",
                  "--options", '{"top_k": [1, 5]}', *flags, "--id-only")  # fmt: skip
    if created.returncode:
        raise SystemExit(created.stderr)
    run_id = created.stdout.strip()
    start = time.perf_counter()
    pushed = cli("run", "push", "--url", url, "--grpc-target", server.grpc_target,
                 "--transport", transport, run_id, str(path), "--batch-size", str(batch_size),
                 "--concurrency", str(concurrency), "--quiet")  # fmt: skip
    seconds = time.perf_counter() - start
    if pushed.returncode:
        return {"seconds": seconds, "error": pushed.stderr.strip().splitlines()[-1]}
    run = httpx.get(f"{url}/v1/runs/{run_id}", timeout=600).json()
    return {"seconds": seconds, "run": run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--format", choices=FORMATS, default="npy")
    parser.add_argument("--metrics", nargs="+", default=METRICS, help="default: the goal's five")
    parser.add_argument(
        "--transport", choices=["rest", "grpc"], nargs="+", default=["rest", "grpc"]
    )
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4])
    parser.add_argument("--json", type=Path, help="report path (default bench/results/)")
    args = parser.parse_args(argv)

    from tests.servers import start_serve

    logits, targets = make_set(args.rows, args.classes)
    megabytes = logits.nbytes / 1e6
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ce-eval-ingest-") as tmp:
        path = write_set(Path(tmp) / "set", args.format, logits, targets)
        here = local(path, logits, targets, args.metrics)
        here["command_s"] = local_command(path, args.metrics)
        print(
            f"{args.rows} × {args.classes} float32 ({megabytes:.0f} MB, {args.format}), metrics "
            f"{', '.join(args.metrics)} (top_k [1, 5]); {os.cpu_count()} CPUs\n"
            f"local ce_engine: compute {here['compute_s']:.2f} s, "
            f"load + compute {here['load_compute_s']:.2f} s, "
            f"as a command (start-up, imports, read, compute) {here['command_s']:.2f} s",
            flush=True,
        )
        server = start_serve({"CE_EVAL_LOG_LEVEL": "warning"}, timeout=120)
        try:
            for transport, batch_size, concurrency in itertools.product(
                args.transport, args.batch_size, args.concurrency
            ):
                got = push(server, path, args.metrics, transport, batch_size, concurrency)
                if "error" in got:
                    print(f"push --transport {transport} --batch-size {batch_size}: {got['error']}")
                    continue
                run = got["run"]
                assert run["count"] == here["count"], (run["count"], here["count"])
                assert abs(run["value"] - here["value"]) <= 1e-6 * abs(here["value"])
                if "accuracy" in args.metrics:
                    assert abs(run["metrics"]["accuracy"] - here["accuracy"]) <= 1e-12
                row = {
                    "transport": transport,
                    "batch_size": batch_size,
                    "concurrency": concurrency,
                    "push_s": got["seconds"],
                    "rows_per_s": args.rows / got["seconds"],
                    "mb_per_s": megabytes / got["seconds"],
                    "vs_compute": got["seconds"] / here["compute_s"],
                    "vs_load_compute": got["seconds"] / here["load_compute_s"],
                    "vs_command": got["seconds"] / here["command_s"],
                }
                rows.append(row)
                print(
                    f"push --transport {transport} --batch-size {batch_size} "
                    f"--concurrency {concurrency}: {row['push_s']:.2f} s "
                    f"({row['rows_per_s']:.0f} rows/s, {row['mb_per_s']:.0f} MB/s) = "
                    f"{row['vs_compute']:.1f}× compute, "
                    f"{row['vs_load_compute']:.1f}× load + compute, "
                    f"{row['vs_command']:.1f}× the local command",
                    flush=True,
                )
        finally:
            server.stop()
    for what, key in (("load + compute in process", "vs_load_compute"), ("command", "vs_command")):
        best = min((r[key] for r in rows), default=float("inf"))
        verdict = "met" if best <= 2 else "not met"
        print(f"goal push ≤ 2× local ({what}): best {best:.1f}× → {verdict}")
    report = {
        "benchmark": "ingest",
        "rows": args.rows,
        "classes": args.classes,
        "format": args.format,
        "metrics": args.metrics,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "local": here,
        "push": rows,
    }
    write_results(report, "ingest", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
