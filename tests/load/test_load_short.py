"""Short load run for CI: 64 concurrent clients for a few seconds, no 5xx, bounded memory."""

from __future__ import annotations

import pytest

from tests.load.soak import run


@pytest.mark.slow
def test_short_load_no_server_errors() -> None:
    summary = run(clients=64, duration=8.0, warmup=3.0)
    print(summary)
    assert summary["requests"] > 100
    assert not summary["unexpected"], summary
    assert all(int(code) < 500 for code in summary["statuses"]), summary
    assert summary["rss_growth"] is not None and summary["rss_growth"] < 0.5, summary
