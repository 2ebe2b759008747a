"""Runs at scale: batch-push throughput vs stateless evaluation, and the size of run answers.

``python -m bench.runs`` starts real ``ce-eval serve`` subprocesses (per ``--store``: SQLite in a
temporary directory, or a throwaway PostgreSQL cluster; with ``--replicas 2`` also two servers on
one PostgreSQL database) and, for each class count C of ``--classes``, loads them from this
process with ``--clients`` concurrent keep-alive clients (threads, one ``httpx.Client`` each)
sending the same 256-row float32 batches (tensors base64 in JSON, NumPy backend), each for
``--seconds``:

- **stateless**: ``POST /v1/evaluate`` of cross-entropy with metrics accuracy + nll + ece (req/s);
- **scalar**: ``POST /v1/runs/{id}/batches`` into one run with accuracy + nll + ece (batches/s);
- **confusion**: the same into one run with accuracy + nll + ece + confusion_matrix
  (``options.max_confusion_classes = C``);
- **intervals**: the scalar run's batches with 256 string ``example_ids`` into a run with
  ``confidence = {replicates: 200}`` (bootstrap intervals; goal, issue 18: ≤ 30% more time per
  batch than the scalar run, i.e. ≥ 1/1.3 = 0.77× its rate).

A batch's logits come from a pool of 8 random (256, C) arrays; its int64 targets are drawn fresh
for every request, so that a run's confusion counts keep gaining cells (about 256 per batch) as
real data would. With 2 replicas the clients alternate between them (stateless too) and push into
one run. After a push the run's ``count`` is checked to be 256 × the batches accepted.

Ratios: push batches/s ÷ stateless req/s of the same round (goals, issue 15: confusion ≥ 0.8,
scalar ≥ 0.9). Sizes and detail latency, per store and C (not for the replicas, which share the
PostgreSQL figures): the bytes of a push answer (goal ≤ 10 KB), of ``GET /v1/runs?limit=50`` over
50 runs of that C with confusion_matrix and one batch each (goal ≤ 100 KB), of ``GET
/v1/runs/{id}`` of the confusion run, and the median time of 20 ``GET
/v1/runs/{id}/metrics/confusion_matrix?top=20`` on the confusion run (goal ≤ 100 ms at C = 4096).

CPU per request (Linux): the server processes with their children (the push writer), this
process (the client threads) and the whole machine (PostgreSQL included), from the start of each
load to its last answer, ÷ the requests done. When the CPUs are the limit, stateless machine CPU ÷
a push's is the ratio the machine allows ("ceiling"); a ratio below it is lost elsewhere.

Servers and clients share this machine's CPUs (the output says how many). Prints Markdown tables
and the JSON results, and writes ``bench/results/runs-*.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench._results import write_results

SCALAR = ["accuracy", "nll", "ece"]
CONFUSION = [*SCALAR, "confusion_matrix"]
MODES = ("stateless", "scalar", "confusion", "intervals")
POOL = 8
GOALS = {"confusion": 0.8, "scalar": 0.9, "intervals": 1 / 1.3}
REPLICATES = 200
PUSH_ANSWER_GOAL = 10_000
LIST_GOAL = 100_000
TOP_GOAL_MS = 100.0


def _tensor(array: np.ndarray) -> bytes:
    """``{"dtype", "shape", "data"}`` JSON of a little-endian C-order array."""
    return orjson.dumps(
        {
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
        }
    )


@dataclass
class Workload:
    """Pre-encoded logits of ``POOL`` batches of (rows, C) float32, and their arg-max classes."""

    classes: int
    rows: int
    logits: list[bytes]
    predicted: list[np.ndarray]

    @classmethod
    def make(cls, classes: int, rows: int, seed: int = 0) -> Workload:
        rng = np.random.default_rng(seed)
        arrays = [rng.standard_normal((rows, classes), dtype=np.float32) for _ in range(POOL)]
        return cls(classes, rows, [_tensor(a) for a in arrays], [a.argmax(1) for a in arrays])

    def fields(self, index: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
        """``"logits":…,"targets":…`` of pool batch ``index`` with fresh targets."""
        targets = rng.integers(0, self.classes, size=self.rows, dtype=np.int64)
        body = b'"logits":' + self.logits[index % POOL] + b',"targets":' + _tensor(targets)
        return body, targets


@dataclass
class Load:
    """Outcome of one closed-loop load: requests done, their rate, the last answer's bytes, and
    the CPU milliseconds spent per request done (``cpu``: see :class:`CpuClock`)."""

    done: int
    errors: int
    seconds: float
    rate: float
    answer_bytes: int
    cells: set[tuple[int, int]]
    first_error: str | None = None
    cpu: dict[str, float] | None = None


def _ticks(stat: str) -> int:
    """utime + stime of a ``/proc/<pid>/stat`` line (the fields after the command's ``)``)."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class CpuClock:
    """CPU time used so far (Linux ``/proc``; None elsewhere): by the server processes and their
    descendants (the push writer, shared-memory workers), by this process (the client
    threads), and by the whole machine (every CPU: PostgreSQL and everything else too)."""

    def __init__(self, server_pids: list[int]) -> None:
        self.server_pids = server_pids
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _server_ticks(self) -> int:
        parents: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:  # gone meanwhile
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            ticks[int(entry)] = _ticks(stat)
        total = 0
        for pid, tick in ticks.items():
            walk = pid
            while walk > 1 and walk not in self.server_pids:
                walk = parents.get(walk, 0)
            if walk in self.server_pids:
                total += tick
        return total

    def read(self) -> dict[str, float] | None:
        """Seconds of CPU: ``server``, ``client``, ``machine``."""
        if not os.path.exists("/proc/stat"):
            return None
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)  # not idle, iowait
        return {
            "server": self._server_ticks() / self.tick,
            "client": time.process_time(),
            "machine": busy / self.tick,
        }


#: A request maker: (worker, k, rng) → (body, targets, pool index).
BodyMaker = Callable[[int, int, np.random.Generator], tuple[bytes, np.ndarray, int]]


def run_load(
    urls: list[str],
    path: str,
    body: BodyMaker,
    clients: int,
    seconds: float,
    warmup: float,
    predicted: list[np.ndarray],
    clock: CpuClock | None = None,
) -> Load:
    """``clients`` threads, each with its own keep-alive connection to ``urls[i % len(urls)]``,
    one request in flight each, for ``warmup`` (not counted) then ``seconds``.

    ``body(worker, k, rng)`` gives the k-th request's body of a worker, its targets and its pool
    index into ``predicted`` (the pool's arg-max classes: to track the confusion cells a run
    gains). Rate = requests done ÷ the time from the start to the last answer. With ``clock``,
    the CPU used from the start to the last answer, in ms per request done.
    """
    window: dict[str, float] = {}
    cpu_start: dict[str, float] = {}

    def open_window() -> None:  # run by one thread as all pass the barrier
        if clock is not None:
            cpu_start.update(clock.read() or {})
        window["start"] = time.perf_counter()
        window["stop"] = window["start"] + seconds

    barrier = threading.Barrier(clients + 1, action=open_window)
    lock = threading.Lock()
    state: dict[str, Any] = {"done": 0, "errors": 0, "bytes": 0, "first_error": None, "end": 0.0}
    cells: set[tuple[int, int]] = set()

    def worker(i: int) -> None:
        rng = np.random.default_rng(1000 + i)
        k = 0
        with httpx.Client(base_url=urls[i % len(urls)], timeout=120) as client:
            warm_until = time.perf_counter() + warmup
            while time.perf_counter() < warm_until:
                data, _, _ = body(i, k, rng)
                k += 1
                client.post(path, content=data, headers={"content-type": "application/json"})
            barrier.wait()
            done = errors = size = 0
            mine: list[tuple[np.ndarray, int]] = []
            first: str | None = None
            while time.perf_counter() < window["stop"]:
                data, targets, index = body(i, k, rng)
                k += 1
                try:
                    answer = client.post(
                        path, content=data, headers={"content-type": "application/json"}
                    )
                except httpx.HTTPError as exc:
                    errors += 1
                    first = first or f"{type(exc).__name__}: {exc}"
                    continue
                if answer.status_code == 200:
                    done += 1
                    size = len(answer.content)
                    mine.append((targets, index))
                else:
                    errors += 1
                    first = first or f"{answer.status_code} {answer.text[:300]}"
            end = time.perf_counter()
        with lock:
            state["done"] += done
            state["errors"] += errors
            state["bytes"] = size or state["bytes"]
            state["first_error"] = state["first_error"] or first
            state["end"] = max(state["end"], end)
            for targets, index in mine:
                cells.update(zip(targets.tolist(), predicted[index].tolist(), strict=True))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    # the clients finish their warm-up, then all start together
    barrier.wait()
    for thread in threads:
        thread.join()
    cpu_end = clock.read() if clock is not None else None
    elapsed = state["end"] - window["start"]
    cpu = None
    if cpu_end is not None and cpu_start and state["done"]:
        cpu = {k: 1000 * (cpu_end[k] - cpu_start[k]) / state["done"] for k in cpu_end}
    return Load(
        state["done"],
        state["errors"],
        elapsed,
        state["done"] / elapsed,
        state["bytes"],
        cells,
        state["first_error"],
        cpu,
    )


@dataclass
class Setup:
    """One measured configuration: a label, the servers' base URLs and whether sizes are taken."""

    label: str
    urls: list[str]
    sizes: bool
    pids: list[int] = field(default_factory=list)


def _post(url: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(url + path, json=payload, timeout=120)
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


def create_run(url: str, name: str, metrics: list[str], classes: int, **extra: Any) -> str:
    options = {"max_confusion_classes": classes} if "confusion_matrix" in metrics else {}
    payload = {"name": name, "loss": "cross_entropy", "options": options, "metrics": metrics}
    return str(_post(url, "/v1/runs", {**payload, **extra})["id"])


def measure(
    setup: Setup, work: Workload, clients: int, seconds: float, rounds: int
) -> dict[str, Any]:
    """Stateless, scalar-run and confusion-run throughput of ``work`` on ``setup`` (``rounds``
    rounds, mode order alternating), then sizes and detail latency when ``setup.sizes``."""
    url = setup.urls[0]
    stateless_head = b'{"loss":"cross_entropy","backend":"numpy","metrics":' + orjson.dumps(SCALAR)

    def stateless(worker: int, k: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray, int]:
        index = worker + k
        fields, targets = work.fields(index, rng)
        return stateless_head + b"," + fields + b"}", targets, index % POOL

    def pusher(tag: str, ids: bool) -> BodyMaker:
        def push(worker: int, k: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray, int]:
            index = worker + k
            fields, targets = work.fields(index, rng)
            batch_id = f"{tag}-{worker}-{k}"
            head = b'{"batch_id":"' + batch_id.encode() + b'",'
            if ids:
                names = [f"{batch_id}/{i}" for i in range(work.rows)]
                head += b'"example_ids":' + orjson.dumps(names) + b","
            return head + fields + b"}", targets, index % POOL

        return push

    confidence = {"confidence": {"replicates": REPLICATES}}
    runs = {
        mode: create_run(url, f"bench {mode} C={work.classes}", metrics, work.classes, **extra)
        for mode, metrics, extra in (
            ("scalar", SCALAR, {}),
            ("confusion", CONFUSION, {}),
            ("intervals", SCALAR, confidence),
        )
    }
    loads: dict[str, list[Load]] = {mode: [] for mode in MODES}
    clock = CpuClock(setup.pids)
    warmup = min(1.0, seconds / 4)
    for round_ in range(rounds):
        order = MODES if round_ % 2 == 0 else MODES[::-1]
        for mode in order:
            if mode == "stateless":
                load = run_load(
                    setup.urls,
                    "/v1/evaluate",
                    stateless,
                    clients,
                    seconds,
                    warmup,
                    work.predicted,
                    clock,
                )
            else:
                path = f"/v1/runs/{runs[mode]}/batches"
                push = pusher(f"r{round_}", ids=mode == "intervals")
                load = run_load(
                    setup.urls, path, push, clients, seconds, warmup, work.predicted, clock
                )
            loads[mode].append(load)
            print(
                f"  {setup.label:<22} C={work.classes:<5} {mode:<9} {load.rate:8.2f}/s "
                f"({load.done} in {load.seconds:.1f} s, {load.errors} errors"
                f"{'; ' + load.first_error if load.first_error else ''})",
                flush=True,
            )
    row: dict[str, Any] = {"setup": setup.label, "classes": work.classes, "rows": work.rows}
    for mode in MODES:
        rates = [load.rate for load in loads[mode]]
        row[mode] = {
            "rate": statistics.median(rates),
            "rounds": rates,
            "done": sum(load.done for load in loads[mode]),
            "errors": sum(load.errors for load in loads[mode]),
        }
        cpus = [load.cpu for load in loads[mode] if load.cpu is not None]
        if cpus:  # ms per request, median over rounds
            row[mode]["cpu_ms"] = {k: statistics.median(c[k] for c in cpus) for k in cpus[0]}
    for mode in ("scalar", "confusion", "intervals"):
        versus = "scalar" if mode == "intervals" else "stateless"
        ratios = [
            push.rate / base.rate for push, base in zip(loads[mode], loads[versus], strict=True)
        ]
        row[mode]["ratio"] = statistics.median(ratios)
        row[mode]["goal"] = GOALS[mode]
        row[mode]["met"] = row[mode]["ratio"] >= GOALS[mode]
        row[mode]["push_answer_bytes"] = loads[mode][-1].answer_bytes
        got = httpx.get(f"{url}/v1/runs/{runs[mode]}", timeout=120).json()
        # every accepted batch counted once, whatever the replica (the warm-up's batches too)
        expected_min = work.rows * row[mode]["done"]
        row[mode]["run_batches"] = got["batches"]
        row[mode]["run_count_ok"] = (
            got["count"] == work.rows * got["batches"] and got["count"] >= expected_min
        )
    row["stateless"]["answer_bytes"] = loads["stateless"][-1].answer_bytes
    confusion_cells = set().union(*(load.cells for load in loads["confusion"]))
    row["confusion"]["cells_lower_bound"] = len(confusion_cells)
    if setup.sizes:
        row["sizes"] = sizes(url, work, runs["confusion"])
    return row


def _median_ms(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    fn()
    times, last = [], None
    for _ in range(reps):
        start = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), last


def sizes(url: str, work: Workload, confusion_run: str) -> dict[str, Any]:
    """Bytes of run answers and the latency of the confusion detail endpoint."""
    tag = f"list-{work.classes}-{time.time_ns()}"
    rng = np.random.default_rng(7)
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(50):
            run_id = create_run(
                url, f"list {i} C={work.classes}", CONFUSION, work.classes, tags={"bench": tag}
            )
            fields, _ = work.fields(i, rng)
            answer = client.post(
                f"/v1/runs/{run_id}/batches",
                content=b'{"batch_id":"b0",' + fields + b"}",
                headers={"content-type": "application/json"},
            )
            answer.raise_for_status()
        list_ms, listing = _median_ms(
            lambda: client.get("/v1/runs", params={"limit": 50, "tag": f"bench:{tag}"}), 5
        )
        assert len(listing.json()["runs"]) == 50, listing.text[:300]
        get_ms, got = _median_ms(lambda: client.get(f"/v1/runs/{confusion_run}"), 5)
        top_ms, top = _median_ms(
            lambda: client.get(
                f"/v1/runs/{confusion_run}/metrics/confusion_matrix", params={"top": 20}
            ),
            20,
        )
        top.raise_for_status()
        assert len(top.json()["top"]) == 20, top.text[:300]
    return {
        "list_50_bytes": len(listing.content),
        "list_50_ms": list_ms,
        "get_run_bytes": len(got.content),
        "get_run_ms": get_ms,
        "top20_ms": top_ms,
        "top20_bytes": len(top.content),
    }


# ----------------------------------------------------------------------------- servers


@contextlib.contextmanager
def servers(store: str, replicas: int, workdir: Path) -> Iterator[list[Any]]:
    """``replicas`` ``ce-eval serve`` processes on one fresh database of ``store``."""
    from tests.servers import ServerProcess, _postgres_bindir, running_cluster

    with contextlib.ExitStack() as stack:
        if store == "sqlite":
            database = f"sqlite:///{workdir / f'runs-{time.time_ns()}.db'}"
        else:
            if _postgres_bindir() is None:
                raise SystemExit("PostgreSQL binaries not found: apt-get install postgresql")
            cluster = stack.enter_context(running_cluster())
            database = cluster.create_database()
        started: list[ServerProcess] = []
        try:
            for i in range(replicas):  # one after the other: the first one migrates
                server = ServerProcess(database, workdir / f"{store}-{replicas}-{i}.log")
                started.append(server)
                server.start()
            yield started
        finally:
            for server in started:
                server.stop()


# ----------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = [
        "| store | C | stateless req/s | scalar push b/s (×) | confusion push b/s (×) "
        "| intervals push b/s (× scalar) "
        "| push answer B (confusion) | list 50 runs KB | GET run KB | top=20 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = []
    for row in rows:
        size = row.get("sizes")
        scalar, confusion, ci = row["scalar"], row["confusion"], row["intervals"]
        lines.append(
            f"| {row['setup']} | {row['classes']} | {row['stateless']['rate']:.1f} "
            f"| {scalar['rate']:.1f} ({scalar['ratio']:.2f}×) "
            f"| {confusion['rate']:.1f} ({confusion['ratio']:.2f}×) "
            f"| {ci['rate']:.1f} ({ci['ratio']:.2f}×) "
            f"| {confusion['push_answer_bytes']:,} "
            + (
                f"| {size['list_50_bytes'] / 1000:.1f} | {size['get_run_bytes'] / 1000:.1f} "
                f"| {size['top20_ms']:.1f} |"
                if size
                else "| — | — | — |"
            )
        )
    return head + lines


def cpu_table(rows: list[dict[str, Any]]) -> list[str]:
    """CPU ms per request (server processes / client threads / whole machine) per mode, and the
    ratio a machine whose CPUs are the limit allows: stateless machine CPU ÷ the push's."""
    if not all("cpu_ms" in row[mode] for row in rows for mode in MODES):
        return []
    head = [
        "",
        "CPU per request, ms (server processes / client threads / whole machine), and the "
        "push ÷ stateless ratio the machine's CPUs allow (stateless ÷ push machine CPU):",
        "",
        "| store | C | stateless | scalar | confusion | intervals | scalar ceiling | "
        "confusion ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = []
    for row in rows:
        cells = [
            "{server:.2f} / {client:.2f} / {machine:.2f}".format(**row[mode]["cpu_ms"])
            for mode in MODES
        ]
        base = row["stateless"]["cpu_ms"]["machine"]
        ceilings = [f"{base / row[mode]['cpu_ms']['machine']:.2f}×" for mode in MODES[1:3]]
        lines.append(
            f"| {row['setup']} | {row['classes']} | " + " | ".join(cells + ceilings) + " |"
        )
    return head + lines


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "goals:"]
    for row in rows:
        where = f"{row['setup']}, C={row['classes']}"
        for mode in ("scalar", "confusion", "intervals"):
            r = row[mode]
            versus = "the scalar push" if mode == "intervals" else "stateless"
            lines.append(
                f"  {where}: {mode} push {r['ratio']:.2f}× {versus} (goal ≥ {r['goal']:.2f}): "
                f"{'met' if r['met'] else 'MISSED'}"
                + ("" if r["run_count_ok"] else "; RUN COUNT WRONG")
            )
        answer = row["confusion"]["push_answer_bytes"]
        lines.append(
            f"  {where}: push answer {answer:,} B (goal ≤ 10 KB): "
            f"{'met' if answer <= PUSH_ANSWER_GOAL else 'MISSED'}"
        )
        size = row.get("sizes")
        if size:
            lines.append(
                f"  {where}: list of 50 runs {size['list_50_bytes']:,} B (goal ≤ 100 KB): "
                f"{'met' if size['list_50_bytes'] <= LIST_GOAL else 'MISSED'}"
            )
            if row["classes"] == 4096:
                lines.append(
                    f"  {where}: confusion top=20 {size['top20_ms']:.1f} ms (goal ≤ 100 ms): "
                    f"{'met' if size['top20_ms'] <= TOP_GOAL_MS else 'MISSED'}"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classes", default="100,1000,4096", help="comma-separated C values")
    parser.add_argument("--store", default="sqlite,postgres", help="sqlite,postgres")
    parser.add_argument(
        "--replicas", type=int, default=2, help="also N servers on one PostgreSQL (0/1: skip)"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--rows", type=int, default=256, help="rows per batch")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the three modes")
    parser.add_argument("--json", type=Path, help="results path (default bench/results/)")
    args = parser.parse_args(argv)
    classes = [int(c) for c in args.classes.split(",") if c]
    stores = [s for s in args.store.split(",") if s]
    configs = [(store, 1) for store in stores]
    if args.replicas > 1:
        configs.append(("postgres", args.replicas))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    note = (
        f"servers and {args.clients} client threads share this machine's {cpus} CPUs; "
        f"{args.rows}-row float32 batches, base64 JSON tensors, NumPy backend, "
        f"{args.seconds:g} s per measurement, {args.rounds} round(s)"
    )
    print(note, flush=True)
    workloads = {c: Workload.make(c, args.rows) for c in classes}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ce-eval-bench-runs-") as tmp:
        for store, replicas in configs:
            label = store if replicas == 1 else f"{store} ×{replicas} replicas"
            with servers(store, replicas, Path(tmp)) as processes:
                urls = [server.url for server in processes]
                pids = [server.process.pid for server in processes]
                setup = Setup(label, urls, sizes=replicas == 1, pids=pids)
                for c in classes:
                    rows.append(
                        measure(setup, workloads[c], args.clients, args.seconds, args.rounds)
                    )
    elapsed = time.perf_counter() - started
    print()
    print(f"{note}; {elapsed:.0f} s in all")
    print()
    for line in table(rows) + cpu_table(rows):
        print(line)
    for line in verdicts(rows):
        print(line)
    report = {
        "machine": {"cpus": cpus, "python": platform.python_version()},
        "note": note,
        "clients": args.clients,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "results": rows,
    }
    print()
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    write_results(report, "runs", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
