"""``bench.serving``'s wrk driver and verdicts (the benchmark itself is not a test): wrk's report is
parsed with its error lines, a binary body reaches the server byte for byte through the Lua
script, and each 512×32000 row is judged against its own floor."""

from __future__ import annotations

import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bench.serving import _row, _verdicts, copy_floor, parse_wrk, wrk_load

REPORT = """Running 4s test @ http://127.0.0.1:8000/v1/evaluate
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.10ms    3.02ms  40.11ms   80.00%
    Req/Sec     2.65k   120.00     2.90k    70.00%
  10571 requests in 4.00s, 5.12MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:   2642.75
Transfer/sec:      1.28MB
"""


def test_parse_wrk_reads_counts_rate_and_every_error_line() -> None:
    assert parse_wrk(REPORT) == {
        "requests": 10571,
        "errors": 13,
        "seconds": 4.0,
        "req_per_s": 2642.75,
    }


def test_parse_wrk_refuses_what_is_not_a_report() -> None:
    with pytest.raises(ValueError, match="not a wrk report"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (make test-deps)")
def test_wrk_load_posts_a_binary_body_byte_for_byte() -> None:
    body = bytes(range(256)) + b'"\\\n\r\x00end'
    seen: list[tuple[str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.headers["Content-Type"], data))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        report = wrk_load(server.server_address[1], "/x", body, "application/x-test", 2, 1.0)
    finally:
        server.shutdown()
        server.server_close()
    assert report["errors"] == 0
    assert report["requests"] > 0 and seen
    assert {content_type for content_type, _ in seen} == {"application/x-test"}
    assert all(data == body for _, data in seen)


def test_the_sdk_shared_memory_row_is_judged_against_engine_plus_its_copy() -> None:
    """The SDK copies the logits into its region on every call: that row's goal is a share of
    engine + that copy alone, the in-place row's a share of engine-only, the sockets' a share of
    engine + bare TCP."""
    engine, tcp, copy = 0.008, 0.020, 0.003
    rows = [
        _row(512, 32000, "OIP shared memory", 0.0150, 30, 65.5, engine, copy, "copy"),
        _row(512, 32000, "OIP shm in place", 0.0125, 30, 65.5, engine),
        _row(512, 32000, "OIP v2 binary", 0.0400, 30, 65.5, engine, tcp, "TCP"),
    ]
    targets = _verdicts(rows, [])["targets"]
    assert targets["512x32000 OIP shared memory"] == {
        "ratio": pytest.approx((0.008 + 0.003) / 0.015),  # 73%: met, at 53% of engine-only
        "of": "engine + copy",
        "met": True,
    }
    assert targets["512x32000 OIP shm in place"]["ratio"] == pytest.approx(0.008 / 0.0125)
    assert targets["512x32000 OIP shm in place"]["met"] is False  # 64%
    assert targets["512x32000 OIP v2 binary"]["ratio"] == pytest.approx(0.028 / 0.04)


def test_copy_floor_times_a_copy_and_leaves_no_object_behind() -> None:
    before = set(os.listdir("/dev/shm"))
    times = copy_floor(np.ones((64, 1024), np.float32), budget_s=0.05)
    assert len(times) >= 2 and all(t > 0 for t in times)
    assert set(os.listdir("/dev/shm")) <= before
