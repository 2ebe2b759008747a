"""``python -m bench.push_writer`` runs and reports both sides of each pair (no timing is
asserted: the benchmark measures, the suite only keeps it working)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import push_writer


def test_the_push_writer_bench_reports_each_pair(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--store", "sqlite", "--rounds", "1", "--seconds", "0.3", "--threads", "2"]
    assert push_writer.main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    (pair,) = row["rounds"]
    assert row["store"] == "sqlite" and report["max_group"] == push_writer.push_writer.MAX_GROUP
    assert pair["one"]["per_transaction"] == 1.0
    assert pair["one"]["rate"] > 0 and pair["grouped"]["rate"] > 0
    assert pair["grouped"]["per_transaction"] >= 1.0
