"""Benchmark reports: JSON under ``bench/results/`` (not versioned) unless a path is given."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(report: dict[str, Any], name: str, path: Path | None = None) -> Path:
    """Write ``report`` as JSON to ``path`` or ``results/<name>-<UTC timestamp>.json``."""
    out = path or RESULTS / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out
