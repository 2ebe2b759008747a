"""Serving benchmark: transports end to end vs engine-only, and tiny-batch req/s vs a no-op.

``python -m bench.serving`` starts ``ce-eval serve`` (as ``python -m bench.serving --serve``:
the service's app plus a no-op ``POST /noop`` endpoint, same middleware, same process setup),
then measures from this process:

1. throughput (MB/s of fp32 logits and req/s, sequential requests, median latency) for JSON
   lists, JSON base64, protobuf REST, gRPC, OIP binary and OIP with the tensors in shared
   memory (``Client(shared_memory=True)``: the SDK copies the logits into its region on every
   call, the server reads them from it), and in shared memory in place (the logits already lie
   in a ``Client.shared_array``, where a co-located producer writes its output; nothing copies
   them) at 8×32000 and 512×32000, next to
   ``ce_engine.evaluate`` alone on the same arrays (called in turn with each transport's
   requests, so a ratio compares the two under the same machine load) and to the bare
   localhost TCP transfer of the logits' bytes (a socket into a preallocated buffer: no HTTP,
   no parsing), whose sum with the engine time is the best any transport could reach on the
   machine;
2. req/s with 32 concurrent keep-alive connections for a 16×10 ``/v1/evaluate`` (JSON lists,
   then protobuf) vs ``POST /noop`` with the same body, in paired rounds (a minimal raw-socket
   load generator, or with ``--load wrk`` wrk itself: 1 thread, 3 rounds by default); the
   verdict is the median of the per-round ratios.

Targets (issue 19, ``GOALS_512``): at 512×32000, shared memory in place ≥ 70% of engine-only
throughput; REST protobuf and OIP binary ≥ 70% of engine + bare TCP, gRPC ≥ 50% of it; the SDK's
shared memory, which copies the logits into its region on every call, ≥ 70% of engine + that copy
alone (the ``shm copy only`` row: a ``memcpy`` into mapped pages, bound by memory bandwidth, as
the bare-TCP row bounds the sockets); tiny-batch evaluate ≥ 70% of the no-op's req/s. Prints a
table and writes ``bench/results/serving-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from starlette.responses import Response

from bench._results import write_results

SIZES = ((8, 32000), (512, 32000))
TRANSPORTS = ("json", "base64", "protobuf", "grpc", "oip", "shm", "shm_inplace")
LABELS = {
    "json": "REST JSON lists",
    "base64": "REST JSON base64",
    "protobuf": "REST protobuf",
    "grpc": "gRPC",
    "oip": "OIP v2 binary",
    "shm": "OIP shared memory",
    "shm_inplace": "OIP shm in place",
}
#: transport → (the row's ratio, its goal, what it is a share of) at 512×32000
GOALS_512 = {
    "shm": ("vs_floor", 0.7, "engine + copy"),
    "shm_inplace": ("vs_engine", 0.7, "engine-only"),
    "protobuf": ("vs_floor", 0.7, "engine + bare TCP"),
    "oip": ("vs_floor", 0.7, "engine + bare TCP"),
    "grpc": ("vs_floor", 0.5, "engine + bare TCP"),
}
BIG_LIMITS = {
    "CE_EVAL_MAX_BODY_BYTES": str(2**30),
    "CE_EVAL_MAX_ELEMENTS": str(2**31),
    "CE_EVAL_LOG_LEVEL": "warning",
    "CE_EVAL_SHARED_MEMORY": "true",
    "CE_EVAL_SHARED_MEMORY_MAX_BYTES": str(2**31),
}


def _serve(args: argparse.Namespace) -> None:
    """The server side: the real app plus ``POST /noop`` (reads the body, answers ``{}``)."""
    from service.config import Settings
    from service.http.app import create_app
    from service.http.responses import FastJSONResponse
    from service.logs import configure_logging
    from service.serve import serve

    settings = Settings(port=args.port, grpc_port=args.grpc_port)  # the rest from CE_EVAL_*
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)

    @app.post("/noop")
    async def noop(request: Request) -> Response:
        await request.body()
        return FastJSONResponse({})

    asyncio.run(serve(app, settings))


def _timed(fn: Callable[[], Any], budget_s: float, max_reps: int) -> list[float]:
    fn()  # warm-up (connections, caches)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < 2 or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _paired(
    fn: Callable[[], Any], reference: Callable[[], Any], budget_s: float, max_reps: int
) -> tuple[list[float], list[float]]:
    """Times of ``fn`` and of ``reference``, called in turn (``reference`` first), so that the
    two medians see the same moments of the machine's load."""
    fn()
    reference()
    times: list[float] = []
    reference_times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < 2 or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        reference()
        t1 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t1)
        reference_times.append(t1 - t0)
    return times, reference_times


def copy_floor(logits: np.ndarray, budget_s: float) -> list[float]:
    """Times to copy ``logits`` into a preallocated shared-memory object whose pages are already
    mapped, as ``Client(shared_memory=True)`` does on every call: what a transport that copies
    the tensor into shared memory pays at least here (a memory-bandwidth-bound ``memcpy``)."""
    from multiprocessing import shared_memory

    region = shared_memory.SharedMemory(create=True, size=logits.nbytes)
    target = [np.ndarray(logits.shape, logits.dtype, buffer=region.buf)]  # dropped before close

    def copy() -> None:
        target[0][...] = logits

    try:
        return _timed(copy, budget_s, 30)
    finally:
        target.clear()
        region.close()
        region.unlink()


def tcp_floor(payload: bytes, budget_s: float) -> list[float]:
    """Times to push ``payload`` through a localhost TCP socket to a thread that receives it
    into a preallocated buffer and answers one byte: what any transport pays at least here."""
    listener = socket.create_server(("127.0.0.1", 0))
    size = len(payload)

    def receive() -> None:
        buf = bytearray(size)
        view = memoryview(buf)
        while True:
            conn, _ = listener.accept()
            with conn:
                got = 0
                while got < size:
                    n = conn.recv_into(view[got : got + (1 << 20)])
                    if not n:
                        return  # the closing connection
                    got += n
                conn.sendall(b"k")

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    port = listener.getsockname()[1]

    def push() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(payload)
            sock.recv(1)

    try:
        return _timed(push, budget_s, 30)
    finally:
        socket.create_connection(("127.0.0.1", port)).close()
        thread.join(timeout=5)
        listener.close()


def throughput(url: str, grpc_target: str, budget_s: float, json_big: bool) -> list[dict[str, Any]]:
    import ce_engine
    from ce_eval_client.sdk import Client, GrpcClient

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for n, c in SIZES:
        logits = rng.standard_normal((n, c), dtype=np.float32)
        targets = rng.integers(0, c, size=n)
        megabytes = logits.nbytes / 1e6

        def engine(logits: np.ndarray = logits, targets: np.ndarray = targets) -> Any:
            return ce_engine.evaluate("cross_entropy", logits, targets, backend="numpy")

        engine_times = _timed(engine, budget_s, 30)
        engine_s = statistics.median(engine_times)
        rows.append(_row(n, c, "engine only", engine_s, len(engine_times), megabytes, engine_s))
        floor_times = tcp_floor(logits.tobytes(), budget_s)
        floor_s = statistics.median(floor_times)
        rows.append(_row(n, c, "TCP bytes only", floor_s, len(floor_times), megabytes, engine_s))
        print(_format(rows[-1]), flush=True)
        copy_times = copy_floor(logits, budget_s)
        copy_s = statistics.median(copy_times)
        rows.append(_row(n, c, "shm copy only", copy_s, len(copy_times), megabytes, engine_s))
        print(_format(rows[-1]), flush=True)
        floors = {"shm": (copy_s, "copy"), "shm_inplace": (None, None)}
        expected = engine().value
        for transport in TRANSPORTS:
            if transport == "json" and n > 8 and not json_big:
                continue
            client: Any
            if transport == "grpc":
                client = GrpcClient(grpc_target)
            elif transport.startswith("shm"):  # the SDK's own region: inputs copied in
                client = Client(url, transport="oip", shared_memory=True)
            else:
                client = Client(url, transport=transport)  # type: ignore[arg-type]
            with client:
                sent = logits
                if transport == "shm_inplace":  # logits produced into Client.shared_array
                    sent = client.shared_array(logits.shape, logits.dtype)
                    sent[:] = logits

                def call(
                    client: Any = client, logits: np.ndarray = sent, targets: np.ndarray = targets
                ) -> Any:
                    return client.evaluate("cross_entropy", logits, targets, backend="numpy")

                value = call().value
                assert value is not None and abs(value - expected) <= 1e-4 * abs(expected)
                reps = 3 if transport == "json" else 30
                # engine-only called in turn with the transport: the ratio compares the two
                # under the same machine load
                times, engine_times = _paired(call, engine, budget_s, reps)
            median = statistics.median(times)
            adjacent = statistics.median(engine_times)
            # what the row is measured against besides engine-only: the bytes through a bare
            # socket, or copied into shared memory; nothing for the logits already there
            floor, floor_name = floors.get(transport, (floor_s, "TCP"))
            rows.append(
                _row(n, c, LABELS[transport], median, len(times), megabytes, adjacent, floor,
                     floor_name)
            )  # fmt: skip
            print(_format(rows[-1]), flush=True)
    return rows


def _row(
    n: int,
    c: int,
    name: str,
    seconds: float,
    reps: int,
    megabytes: float,
    engine_s: float,
    floor_s: float | None = None,
    floor_name: str | None = None,
) -> dict[str, Any]:
    return {
        "shape": [n, c],
        "transport": name,
        "median_ms": seconds * 1000,
        "req_per_s": 1 / seconds,
        "mb_per_s": megabytes / seconds,
        "vs_engine": engine_s / seconds,
        "engine_ms": engine_s * 1000,
        "reps": reps,
        # engine + the floor (bare TCP of the logits' bytes, or their copy into shared memory):
        # the best a transport could do here
        "vs_floor": (engine_s + floor_s) / seconds if floor_s is not None else None,
        "floor": floor_name,
    }


def _format(row: dict[str, Any]) -> str:
    n, c = row["shape"]
    floor = (
        ""
        if row["vs_floor"] is None
        else f"; {100 * row['vs_floor']:.0f}% of engine+{row['floor']}"
    )
    return (
        f"{n:>4}×{c:<6} {row['transport']:<18} {row['median_ms']:>10.2f} ms "
        f"{row['mb_per_s']:>9.1f} MB/s {row['req_per_s']:>8.2f} req/s "
        f"{100 * row['vs_engine']:>6.1f}% of engine ({row['engine_ms']:.1f} ms; n={row['reps']}"
        f"{floor})"
    )


async def _load(port: int, request: bytes, connections: int, seconds: float) -> dict[str, Any]:
    """Closed-loop load: ``connections`` keep-alive sockets, one request in flight on each."""
    done = 0
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop_at:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                if status == 200:
                    done += 1
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {"requests": done, "errors": errors, "seconds": elapsed, "req_per_s": done / elapsed}


def _http_request(path: str, body: bytes, content_type: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def _lua_string(data: bytes) -> str:
    """``data`` as a Lua string literal (every byte a decimal escape: binary-safe)."""
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def parse_wrk(output: str) -> dict[str, Any]:
    """wrk's report → {requests, errors (non-2xx/3xx + socket errors), seconds, req_per_s}."""
    requests = errors = 0
    seconds = req_per_s = None
    for line in output.splitlines():
        words = line.split()
        if "requests in" in line:  # "  12345 requests in 4.00s, 1.23MB read"
            requests, seconds = int(words[0]), float(words[3].rstrip("s,"))
        elif line.startswith("Requests/sec:"):
            req_per_s = float(words[1])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            errors += int(words[-1])
        elif line.strip().startswith("Socket errors:"):  # connect 0, read 0, write 0, timeout 0
            errors += sum(int(w.rstrip(",")) for w in words[3::2])
    if seconds is None or req_per_s is None:
        raise ValueError(f"not a wrk report: {output[:200]!r}")
    return {"requests": requests, "errors": errors, "seconds": seconds, "req_per_s": req_per_s}


def wrk_load(
    port: int, path: str, body: bytes, content_type: str, connections: int, seconds: float
) -> dict[str, Any]:
    """``wrk -t1 -c{connections}`` POSTing ``body`` to ``path`` for ``seconds``."""
    import shutil
    import subprocess
    import tempfile

    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found: apt-get install wrk (or make test-deps)")
    script = (
        f'wrk.method = "POST"\nwrk.body = {_lua_string(body)}\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", lua.name,
                f"http://127.0.0.1:{port}{path}"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode:
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return parse_wrk(done.stdout)


def tiny_batch(
    port: int, seconds: float, connections: int = 32, rounds: int = 7, load: str = "python"
) -> list[dict[str, Any]]:
    """req/s of ``/v1/evaluate`` and of the no-op, per body kind, in paired rounds.

    Each round loads the no-op and ``/v1/evaluate`` with the same body back to back (which goes
    first alternates) and keeps their ratio: a pair shares the machine's load of the moment, so
    the median of the per-round ratios moves much less than the ratio of two medians on a
    shared host. ``load``: ``python`` (this process's raw-socket client) or ``wrk`` (1 thread).
    """
    from ce_eval_client.proto import PROTOBUF_MEDIA_TYPE, request_to_proto

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((16, 10)).astype(np.float32)
    targets = rng.integers(0, 10, size=16)
    json_body = orjson.dumps(
        {"loss": "cross_entropy", "logits": logits, "targets": targets, "backend": "numpy"},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    proto_body = request_to_proto(
        "cross_entropy", logits, targets, backend="numpy"
    ).SerializeToString()
    kinds = [
        ("JSON lists", "JSON body", json_body, "application/json"),
        ("protobuf", "protobuf body", proto_body, PROTOBUF_MEDIA_TYPE),
    ]
    rows = []
    for kind, noop_kind, body, content_type in kinds:

        def run(path: str, secs: float, body: bytes = body, ctype: str = content_type) -> Any:
            if load == "wrk":
                return wrk_load(port, path, body, ctype, connections, secs)
            return asyncio.run(_load(port, _http_request(path, body, ctype), connections, secs))

        pair = {"noop": "/noop", "evaluate": "/v1/evaluate"}
        for path in pair.values():
            run(path, 1.0)  # warm-up
        runs: dict[str, list[dict[str, Any]]] = {"noop": [], "evaluate": []}
        for round_ in range(rounds):
            order = list(pair.items())
            for name, path in order if round_ % 2 == 0 else order[::-1]:  # no first-run bias
                runs[name].append(run(path, seconds))
        ratios = [
            e["req_per_s"] / n["req_per_s"]
            for n, e in zip(runs["noop"], runs["evaluate"], strict=True)
        ]
        rows.append(_tiny_row(f"no-op endpoint ({noop_kind})", runs["noop"], connections))
        rows.append(_tiny_row(f"/v1/evaluate {kind}", runs["evaluate"], connections))
        rows[-1]["vs_noop"] = statistics.median(ratios)
        rows[-1]["vs_noop_rounds"] = ratios
    return rows


def _tiny_row(case: str, runs: list[dict[str, Any]], connections: int) -> dict[str, Any]:
    rates = [r["req_per_s"] for r in runs]
    row = {
        "case": case,
        "connections": connections,
        "req_per_s": statistics.median(rates),
        "rounds": rates,
        "errors": sum(r["errors"] for r in runs),
    }
    print(
        f"16×10  {case:<32} {row['req_per_s']:>9.0f} req/s  (median of "
        f"{', '.join(f'{r:.0f}' for r in rates)}; {row['errors']} errors)",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--port", "--grpc-port"):
        parser.add_argument(flag, type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument(
        "--load-seconds", type=float, default=None, help="seconds per load run (3; wrk: 4)"
    )
    parser.add_argument(
        "--no-json-big", action="store_true", help="skip JSON lists at 512×32000 (~10 s a call)"
    )
    parser.add_argument("--only", choices=["throughput", "tiny"], help="run one of the two parts")
    parser.add_argument(
        "--load",
        choices=["python", "wrk"],
        default="python",
        help="tiny-batch load generator: this process's raw-socket client (default) or wrk "
        "(-t1 -c32; apt-get install wrk)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="tiny-batch rounds (7; wrk: 3)")
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args)
        return 0

    from tests.servers import start_serve

    server = start_serve(BIG_LIMITS, module=["bench.serving", "--serve"])
    try:
        print("shape        transport            median         MB/s     req/s   vs engine")
        rows: list[dict[str, Any]] = []
        tiny: list[dict[str, Any]] = []
        if args.only != "tiny":
            rows = throughput(server.url, server.grpc_target, args.budget, not args.no_json_big)
            print()
        if args.only != "throughput":
            wrk = args.load == "wrk"  # issue 19's protocol: 3 alternating rounds of 4 s
            rounds = args.rounds or (3 if wrk else 7)
            seconds = args.load_seconds or (4.0 if wrk else 3.0)
            tiny = tiny_batch(server.http_port, seconds, rounds=rounds, load=args.load)
    finally:
        server.stop()
    verdicts = _verdicts(rows, tiny)
    for line in verdicts["lines"]:
        print(line)
    print()
    write_results(
        {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "throughput": rows,
            "tiny_batch": tiny,
            "targets": verdicts["targets"],
        },
        "serving",
    )
    return 0


def _verdicts(rows: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    lines = ["", "targets:"]
    targets: dict[str, Any] = {}
    goals = {LABELS[kind]: goal for kind, goal in GOALS_512.items()}
    for row in rows:
        goal = goals.get(row["transport"])
        if row["shape"] != [512, 32000] or goal is None:
            continue
        column, target, name = goal
        ratio = row[column]
        if ratio is None:  # no bare-TCP row to compare with
            continue
        ok = ratio >= target
        targets[f"512x32000 {row['transport']}"] = {"ratio": ratio, "of": name, "met": ok}
        floor = (
            ""
            if row["vs_floor"] is None
            else f", {100 * row['vs_floor']:.0f}% of engine + {row['floor']}"
        )
        lines.append(
            f"  512×32000 {row['transport']:<18} {100 * ratio:5.1f}% of {name} "
            f"(target ≥ {100 * target:.0f}%): {'met' if ok else 'MISSED'}; "
            f"{100 * row['vs_engine']:.0f}% of engine-only{floor}"
        )
    for row in tiny:
        if "vs_noop" not in row:
            continue
        kind = row["case"].removeprefix("/v1/evaluate ")
        ratio, spread = row["vs_noop"], row["vs_noop_rounds"]
        ok = ratio >= 0.7
        targets[f"16x10 {kind}"] = {"ratio": ratio, "met": ok, "rounds": spread}
        lines.append(
            f"  16×10 evaluate {kind:<12} {100 * ratio:5.1f}% of the no-op's req/s "
            f"(median of {len(spread)} paired rounds, {100 * min(spread):.0f}–"
            f"{100 * max(spread):.0f}%; target ≥ 70%): {'met' if ok else 'MISSED'}"
        )
    return {"lines": lines, "targets": targets}


if __name__ == "__main__":
    raise SystemExit(main())
