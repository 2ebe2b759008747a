"""``bench.runs``' CPU accounting (the benchmark itself is not a test): ``/proc`` stat lines are
read past a command name holding spaces and parentheses, a process's descendants count as its
own, and the CPU table's ceiling is stateless ÷ push machine CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.runs import MODES, CpuClock, _ticks, cpu_table

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc")


def test_ticks_reads_utime_and_stime_past_an_odd_command_name() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 1 0 99 0 0"
    assert _ticks(line) == 42


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_clock_counts_a_server_with_its_children_and_this_process() -> None:
    clock = CpuClock([os.getpid()])  # this process as the "server": the child is its own
    before = clock.read()
    assert before is not None
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nend = time.process_time() + 0.3\n"
         "while time.process_time() < end: pass\nprint('spun', flush=True)\ntime.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == "spun\n"
        _spin(0.2)
        after = clock.read()  # the child still alive: its 0.3 s count as the server's
    finally:
        child.kill()
        child.wait(timeout=30)
    assert after is not None
    assert 0.19 <= after["client"] - before["client"] < 0.45  # this process alone
    assert after["server"] - before["server"] >= 0.19 + 0.29
    assert after["machine"] - before["machine"] >= 0.19 + 0.29


def test_cpu_table_ceiling_is_stateless_over_push_machine_cpu() -> None:
    cpu = {"stateless": 4.0, "scalar": 5.0, "confusion": 8.0, "intervals": 9.0}
    row = {
        "setup": "sqlite",
        "classes": 1000,
        **{
            mode: {"cpu_ms": {"server": 1.0, "client": 2.0, "machine": cpu[mode]}} for mode in MODES
        },
    }
    lines = cpu_table([row])
    assert lines[-1].endswith("| 0.80× | 0.50× |"), lines[-1]
    assert cpu_table([{**row, "scalar": {}}]) == []  # no CPU figures: no table
