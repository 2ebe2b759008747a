"""bench.metrics: the run-state round trip it reports works on today's states."""

from __future__ import annotations

import numpy as np

from bench import metrics


def test_state_round_trip_reports_packed_and_list_forms():
    rows = metrics.state_round_trip(np.random.default_rng(0), repeat=1)
    assert [row["format"] for row in rows] == ["packed", "lists"]
    packed, lists = rows
    # 1000 × 1000 float64 cells as JSON lists are megabytes; packed, a mostly-zero matrix is small
    assert lists["json_bytes"] > 2_000_000 > 100 * packed["json_bytes"]
