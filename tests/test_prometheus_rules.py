"""The alert rules of ``deploy/prometheus/alerts.yml`` and the run gauges they read.

- every series an expression names is one ``service.telemetry`` exports, with the labels the
  expression matches on, and every recording rule it uses is defined;
- the run gauges set, drop and forget series as documented;
- with promtool (Debian package ``prometheus``): ``check rules``, ``check config`` and
  ``test rules alerts.test.yml``, whose made-up series fire exactly the expected alerts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service import telemetry

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
ALERTS = DEPLOY / "alerts.yml"
ALERTS_TEST = DEPLOY / "alerts.test.yml"
SERIES = re.compile(r"\b(ce_eval_[a-z_]+)(?:\{([^}]*)\})?")
RECORDED = re.compile(r"\b(ce_eval:[a-z_]+)")
LABEL_LISTS = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")


def rules() -> list[dict[str, Any]]:
    config = yaml.safe_load(ALERTS.read_text())
    (group,) = config["groups"]
    assert group["name"] == "ce-eval-runs"
    return list(group["rules"])


def exported(run_id: str = "run_t") -> dict[str, set[str]]:
    """Metric name → label names, from the exposition after one export of each kind."""
    telemetry.export_run(run_id, {"value": 0.5, "ece": 0.03}, {"value": [0.4, 0.6]})
    telemetry.export_run_state(run_id, True, "run_base")
    try:
        text = generate_latest(REGISTRY).decode()
    finally:
        telemetry.forget_run(run_id)
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture
def run_series() -> Iterator[str]:
    yield "run_x"
    telemetry.forget_run("run_x")


def test_alerts_are_complete() -> None:
    alerts = [r for r in rules() if "alert" in r]
    assert {a["alert"] for a in alerts} == {"CeEvalRunAboveBaselineCI", "CeEvalRunBelowBaselineCI"}
    for alert in alerts:
        assert alert["for"] == "15m"
        assert alert["labels"]["severity"] in {"warning", "info"}
        assert {"summary", "description"} <= set(alert["annotations"])


def test_expressions_name_exported_series_and_their_labels() -> None:
    names = exported()
    recorded = {r["record"] for r in rules() if "record" in r}
    used_series: set[str] = set()
    for rule in rules():
        expr = rule["expr"]
        for name, matchers in SERIES.findall(expr):
            used_series.add(name)
            assert name in names, f"{name} is not exported by service.telemetry"
            for label in re.findall(r"([a-z_]+)\s*[!=]~?", matchers):
                assert label in names[name], f"{name} has no label {label}"
        for name in RECORDED.findall(expr):
            assert name in recorded, f"{name} is used but not recorded"
        for labels in LABEL_LISTS.findall(expr):
            for label in filter(None, (x.strip() for x in labels.split(","))):
                assert label in {"run_id", "metric", "baseline"}, label
    assert used_series == {
        "ce_eval_run_value", "ce_eval_run_ci_low", "ce_eval_run_ci_high", "ce_eval_run_open",
    }  # fmt: skip
    assert names["ce_eval_run_open"] >= {"run_id", "baseline"}
    assert names["ce_eval_run_value"] >= {"run_id", "metric"}


def _samples(name: str, run_id: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = generate_latest(REGISTRY).decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels.get("run_id") == run_id
    }


def test_run_gauges_set_drop_and_forget(run_series: str) -> None:
    telemetry.export_run(run_series, {"value": 0.5, "accuracy": 0.8}, {"value": [0.4, 0.6]})
    values = _samples("ce_eval_run_value", run_series)
    assert values == {
        (("metric", "accuracy"), ("run_id", run_series)): 0.8,
        (("metric", "value"), ("run_id", run_series)): 0.5,
    }
    assert list(_samples("ce_eval_run_ci_low", run_series).values()) == [0.4]
    assert list(_samples("ce_eval_run_ci_high", run_series).values()) == [0.6]
    telemetry.export_run(run_series, {"accuracy": None}, {"value": None})  # undefined: dropped
    assert list(_samples("ce_eval_run_value", run_series).values()) == [0.5]
    assert _samples("ce_eval_run_ci_low", run_series) == {}
    telemetry.export_run(run_series, {"value": float("nan")})
    assert _samples("ce_eval_run_value", run_series) == {}
    telemetry.export_run_state(run_series, True, "run_a")
    telemetry.export_run_state(run_series, True, "run_b")  # the baseline tag changed
    assert _samples("ce_eval_run_open", run_series) == {
        (("baseline", "run_b"), ("run_id", run_series)): 1.0
    }
    telemetry.export_run_state(run_series, False, "run_b")
    assert list(_samples("ce_eval_run_open", run_series).values()) == [0.0]
    telemetry.export_run(run_series, {"value": 0.7})
    telemetry.forget_run(run_series)
    assert _samples("ce_eval_run_open", run_series) == {}
    assert _samples("ce_eval_run_value", run_series) == {}
    telemetry.forget_run(run_series)  # twice: nothing left, no error


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    return promtool


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "alerts.yml"),
        ("check", "config", "prometheus.yml"),
        ("test", "rules", "alerts.test.yml"),
    ],
)
def test_promtool(args: tuple[str, ...]) -> None:
    result = subprocess.run(
        [_promtool(), *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
