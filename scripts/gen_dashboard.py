"""Generate the provisioned Grafana dashboard ``deploy/grafana/dashboards/ce-eval.json``.

``python -m scripts.gen_dashboard``           write it
``python -m scripts.gen_dashboard --check``   exit 1 when the committed file differs

Service health comes from Prometheus (only the metric names of the /metrics contract); runs come
from the run store in PostgreSQL (tables ``runs`` and ``batches`` of ``service/store/models.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards" / "ce-eval.json"
PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}
POSTGRES = {"type": "grafana-postgresql-datasource", "uid": "ce-eval-postgres"}


def quantile(q: float, histogram: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({histogram}_bucket[5m])))"


def prometheus_target(ref: str, expr: str, legend: str) -> dict[str, Any]:
    return {"datasource": PROMETHEUS, "refId": ref, "expr": expr, "legendFormat": legend}


def sql_target(ref: str, sql: str) -> dict[str, Any]:
    return {
        "datasource": POSTGRES,
        "refId": ref,
        "rawSql": sql,
        "rawQuery": True,
        "editorMode": "code",
        "format": "time_series",
    }


def panel(
    title: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    unit: str = "short",
    kind: str = "timeseries",
) -> dict[str, Any]:
    x, y, w, h = grid
    return {
        "type": kind,
        "title": title,
        "datasource": targets[0]["datasource"],
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": targets,
    }


# Per-batch loss = sum / denominator; the run's loss so far = Σ sum / Σ denominator over the
# batches up to this one (exact, never a mean of means).
RUN_BATCHES = "FROM batches b JOIN runs r ON r.pk = b.run_pk WHERE r.id = '${run}'"
RUN_LOSS_SQL = (
    'SELECT b.created_at AS "time", b.sum / NULLIF(b.denominator, 0) AS batch_loss, '
    "SUM(b.sum) OVER w / NULLIF(SUM(b.denominator) OVER w, 0) AS run_loss "
    f"{RUN_BATCHES} WINDOW w AS (ORDER BY b.seq) ORDER BY b.seq"
)
RUN_ACCURACY_SQL = (
    'SELECT b.created_at AS "time", '
    "(b.result -> 'metrics' ->> 'accuracy')::float8 AS accuracy "
    f"{RUN_BATCHES} ORDER BY b.seq"
)
RUNS_VARIABLE_SQL = "SELECT id AS __value, name AS __text FROM runs ORDER BY created_at DESC"


def dashboard() -> dict[str, Any]:
    panels = [
        panel(
            "Requests per second",
            [
                prometheus_target(
                    "A",
                    "sum by (transport, route, status) (rate(ce_eval_requests_total[1m]))",
                    "{{transport}} {{route}} {{status}}",
                )
            ],
            (0, 0, 12, 8),
            unit="reqps",
        ),
        panel(
            "Request latency p50 / p99",
            [
                prometheus_target("A", quantile(0.5, "ce_eval_request_duration_seconds"), "p50"),
                prometheus_target("B", quantile(0.99, "ce_eval_request_duration_seconds"), "p99"),
            ],
            (12, 0, 12, 8),
            unit="s",
        ),
        panel(
            "Evaluate p99 by loss and backend",
            [
                prometheus_target(
                    "A",
                    quantile(0.99, "ce_eval_evaluate_duration_seconds", by="le, loss, backend"),
                    "{{loss}} {{backend}}",
                )
            ],
            (0, 8, 12, 8),
            unit="s",
        ),
        panel(
            "Rejections per second",
            [
                prometheus_target(
                    "A", "sum by (reason) (rate(ce_eval_rejected_total[5m]))", "{{reason}}"
                )
            ],
            (12, 8, 12, 8),
            unit="reqps",
        ),
        panel(
            "In-flight requests",
            [prometheus_target("A", "sum by (instance) (ce_eval_inflight)", "{{instance}}")],
            (0, 16, 8, 8),
        ),
        panel(
            "Run batches per second",
            [
                prometheus_target(
                    "A", "sum by (outcome) (rate(ce_eval_batches_total[5m]))", "{{outcome}}"
                )
            ],
            (8, 16, 8, 8),
        ),
        panel(
            "Build info",
            [{**prometheus_target("A", "ce_eval_build_info", ""), "instant": True}],
            (16, 16, 8, 8),
            kind="table",
        ),
        panel("Run loss over batches", [sql_target("A", RUN_LOSS_SQL)], (0, 24, 12, 9)),
        panel(
            "Run accuracy over batches",
            [sql_target("A", RUN_ACCURACY_SQL)],
            (12, 24, 12, 9),
            unit="percentunit",
        ),
    ]
    for number, item in enumerate(panels, start=1):
        item["id"] = number
    return {
        "uid": "ce-eval",
        "title": "ce-eval",
        "tags": ["ce-eval"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "run",
                    "label": "Run",
                    "type": "query",
                    "datasource": POSTGRES,
                    "query": RUNS_VARIABLE_SQL,
                    "refresh": 2,
                    "includeAll": False,
                    "multi": False,
                }
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the file is stale")
    args = parser.parse_args(argv)
    if args.check:
        if OUT.read_text(encoding="utf-8") != render():
            print(f"{OUT} is stale: run python -m scripts.gen_dashboard")
            return 1
        return 0
    OUT.write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
