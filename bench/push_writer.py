"""The push writer's ceiling, with and without group commit.

``python -m bench.push_writer`` prepares one 24-row batch of a run with accuracy + nll + ece
+ confusion_matrix (C = 12), then sends copies of it (new ``batch_id`` each) straight to a
:class:`~service.dataplane.push_writer.PushWriter` from ``--threads`` threads for
``--seconds``, no evaluation and no HTTP: pushes/s the writer's transactions sustain. It
alternates ``MAX_GROUP = 1`` (one transaction per push, as without group commit) and the
default, ``--rounds`` times, per ``--store`` (SQLite in a temporary directory, or a throwaway
PostgreSQL cluster, on this machine), and prints the pushes/s, the batches per transaction
and the ratio of each pair. Writes ``bench/results/push_writer-*.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench._results import write_results
from service.config import Settings
from service.dataplane import push_writer
from service.dataplane.push_writer import PushWriter
from service.dataplane.runs import PreparedBatch, RunsDataPlane
from service.store import Store
from tests.test_push_groups import capture_prepared
from tests.test_runs_details import batches

C = 12
RUN = {
    "name": "writer bench",
    "loss": "cross_entropy",
    "options": {"max_confusion_classes": C},
    "metrics": ["accuracy", "nll", "ece", "confusion_matrix"],
}


def prepared(url: str) -> tuple[Store, PreparedBatch]:
    """A migrated store and one prepared batch of a run in it (its first push, written)."""
    store = Store(url)
    store.upgrade()
    settings = Settings(database_url=url, backend="numpy", log_level="warning")
    plane = RunsDataPlane(settings, store)
    made = capture_prepared(plane)
    run_id = plane.create_run(RUN)["id"]
    plane.add_batch(run_id, {"batch_id": "first", **batches(1, C, 1, rows=24)[0]})
    return store, made[0]


def measure(url: str, group: int, threads: int, seconds: float) -> dict[str, float]:
    """Pushes/s through one writer with ``MAX_GROUP = group``."""
    store, batch = prepared(url)
    default, push_writer.MAX_GROUP = push_writer.MAX_GROUP, group
    writer = PushWriter(Settings(database_url=url, log_level="warning"))
    try:
        writer.write_batch(replace(batch, batch_id="warm"))
        before = writer.batches, writer.transactions
        stop = time.monotonic() + seconds

        def loop(t: int) -> None:
            i = 0
            while time.monotonic() < stop:
                writer.write_batch(replace(batch, batch_id=f"t{t}-{i}"))
                i += 1

        began = time.monotonic()
        workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.monotonic() - began
        done, transactions = writer.batches - before[0], writer.transactions - before[1]
        return {"rate": done / elapsed, "per_transaction": done / transactions}
    finally:
        push_writer.MAX_GROUP = default
        writer.close()
        store.dispose()


@contextlib.contextmanager
def databases(store: str, workdir: Path) -> Iterator[Iterator[str]]:
    """Fresh database URLs of ``store``, one per call of ``next``."""
    if store == "sqlite":
        yield (f"sqlite:///{workdir / f'writer-{i}.db'}" for i in range(10**6))
        return
    from tests.servers import running_cluster

    with running_cluster() as cluster:
        yield (cluster.create_database() for _ in range(10**6))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite,postgres", help="sqlite,postgres")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    default = push_writer.MAX_GROUP
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report: dict[str, Any] = {
        "note": f"{args.threads} threads, the writer and the database share this machine's "
        f"{cpus} CPUs; {args.seconds} s per measurement",
        "max_group": default,
        "results": [],
    }
    print(report["note"])
    with tempfile.TemporaryDirectory() as tmp:
        for store in args.store.split(","):
            pairs = []
            with databases(store, Path(tmp)) as urls:
                for _ in range(args.rounds):
                    one = measure(next(urls), 1, args.threads, args.seconds)
                    grouped = measure(next(urls), default, args.threads, args.seconds)
                    pairs.append({"one": one, "grouped": grouped})
                    print(
                        f"  {store:<8} one per transaction {one['rate']:7.0f}/s   grouped "
                        f"{grouped['rate']:7.0f}/s ({grouped['per_transaction']:.1f} a "
                        f"transaction): ×{grouped['rate'] / one['rate']:.2f}",
                        flush=True,
                    )
            ratio = statistics.median(p["grouped"]["rate"] / p["one"]["rate"] for p in pairs)
            report["results"].append({"store": store, "rounds": pairs, "ratio": ratio})
            print(f"{store}: group commit ×{ratio:.2f} the writer's pushes/s (median of pairs)")
    write_results(report, "push_writer", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
