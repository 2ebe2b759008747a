"""``ce-eval gate RUN --baseline BASE --check …``: the regression gate for CI pipelines.

A check is ``metric[@key=value]:THRESHOLD`` (``POST /v1/runs/{id}/gate``'s checks):

- ``accuracy:-0.005``: ``max_decrease`` 0.005 (a higher-is-better metric may drop by less);
- ``ece:+0.01``, ``value@lang=de:+0.02``: ``max_increase`` (lower is better; ``value`` is the
  loss), on the whole run or on the slice ``lang=de``;
- ``accuracy:>=0.7``, ``ece:<=0.1``: ``min`` / ``max`` on the run's own interval.

It prints one table row per check (metric, slice, value, baseline, delta, CI, margin, verdict)
and exits 0 when the gate passes, 1 when it fails, 2 on an error (a bad check, an HTTP error,
an unreachable server). ``--junit PATH`` also writes a JUnit XML report: one testsuite
``ce-eval gate``, one testcase per check, ``<failure>`` for ``fail``, and for
``inconclusive`` ``<skipped>`` with ``--allow-inconclusive`` or else ``<failure>``.
"""

from __future__ import annotations

import argparse
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ce_eval_client.cli_errors import CommandError, UsageError
from ce_eval_client.retry import Retrier
from ce_eval_client.run_cli import _table, add_connection_flags, check_url, number
from ce_eval_client.sdk import Client, run_path

#: Exit statuses: the gate passed, failed, or could not be decided (bad input, server errors).
EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
SUITE_NAME = "ce-eval gate"
CHECK_HINT = "e.g. --check accuracy:-0.005, --check 'value@lang=de:+0.02', --check 'ece:<=0.1'"
THRESHOLD_PREFIXES = (
    (">=", "min"),
    ("<=", "max"),
    ("-", "max_decrease"),
    ("+", "max_increase"),
)
KIND_PREFIX = {kind: prefix for prefix, kind in THRESHOLD_PREFIXES}


class GateError(CommandError):
    """The gate could not be decided (an HTTP error, an unreachable server): exit status 2."""

    exit_code = EXIT_ERROR


def parse_check(text: str) -> dict[str, Any]:
    """``metric[@key=value]:THRESHOLD`` → a gate check ``{metric, slice, <kind>: number}``
    (module docstring); :class:`UsageError` naming the check otherwise. The threshold follows
    the last ``:``, so a slice value may hold colons."""
    head, sep, threshold = text.rpartition(":")
    if not sep or not head:
        raise UsageError(f"--check {text!r} must be METRIC[@KEY=VALUE]:THRESHOLD", CHECK_HINT)
    metric, at, slice_text = head.partition("@")
    if not metric:
        raise UsageError(f"--check {text!r}: no metric before {head[0]!r}", CHECK_HINT)
    if at and (not slice_text.partition("=")[1] or slice_text.startswith("=")):
        raise UsageError(f"--check {text!r}: the slice must be KEY=VALUE", CHECK_HINT)
    for prefix, kind in THRESHOLD_PREFIXES:
        if threshold.startswith(prefix):
            raw = threshold[len(prefix) :]
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            signed = kind in ("max_decrease", "max_increase") and raw[:1] in ("+", "-")
            if not math.isfinite(value) or signed:
                raise UsageError(f"--check {text!r}: {raw!r} is not a finite number", CHECK_HINT)
            return {"metric": metric, "slice": slice_text if at else None, kind: value}
    raise UsageError(f"--check {text!r}: the threshold must start with -, +, >= or <=", CHECK_HINT)


def _fmt(x: Any) -> str:
    return format(x, "g") if isinstance(x, int | float) else str(x)


def check_label(check: Mapping[str, Any]) -> str:
    """A checked answer written back as its ``--check``: ``value@lang=de:+0.02``."""
    kind = str(check.get("kind"))
    threshold = (
        check.get("margin") if kind in ("max_decrease", "max_increase") else check.get("bound")
    )
    where = f"@{check['slice']}" if check.get("slice") else ""
    return f"{check.get('metric')}{where}:{KIND_PREFIX.get(kind, '?')}{_fmt(threshold)}"


def _interval(ci: Any) -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return "-"
    return f"[{number(ci[0])}, {number(ci[1])}]"


def gate_lines(answer: Mapping[str, Any]) -> list[str]:
    """The table of a gate answer, its reasons and a summary line."""
    checks: Sequence[Mapping[str, Any]] = answer.get("checks") or []
    header = ["metric", "slice", "value", "baseline", "delta", "CI", "margin", "verdict"]
    rows = [
        [
            str(c.get("metric")),
            str(c.get("slice") or "-"),
            number(c.get("value")),
            number(c.get("baseline")),
            number(c.get("delta")),
            _interval(c.get("ci")),
            check_label(c).rpartition(":")[2],
            str(c.get("verdict")),
        ]
        for c in checks
    ]
    lines = _table(header, rows) if rows else ["(no checks)"]
    lines += [f"  {check_label(c)}: {c['reason']}" for c in checks if c.get("reason")]
    tally = {
        v: sum(c.get("verdict") == v for c in checks) for v in ("pass", "fail", "inconclusive")
    }
    level = answer.get("level")
    how = "paired" if answer.get("paired") else "unpaired"
    ci = f"{100 * level:g}% CI" if isinstance(level, int | float) else "CI"
    state = "PASSED" if answer.get("passed") else "FAILED"
    lines.append(
        f"gate {state}: {answer.get('run_id')} vs baseline {answer.get('baseline')}: "
        f"{tally['pass']} pass, {tally['fail']} fail, {tally['inconclusive']} inconclusive"
        + (" (allowed)" if answer.get("allow_inconclusive") and tally["inconclusive"] else "")
        + f" ({how}, {ci}, {answer.get('replicates')} replicates)"
    )
    return lines


def junit_tree(answer: Mapping[str, Any]) -> ET.ElementTree:
    """The JUnit XML report of a gate answer (module docstring)."""
    checks: Sequence[Mapping[str, Any]] = answer.get("checks") or []
    allow = bool(answer.get("allow_inconclusive"))
    failures = sum(
        c.get("verdict") == "fail" or (c.get("verdict") == "inconclusive" and not allow)
        for c in checks
    )
    skipped = sum(c.get("verdict") == "inconclusive" for c in checks) if allow else 0
    root = ET.Element("testsuites", name=SUITE_NAME)
    suite = ET.SubElement(
        root,
        "testsuite",
        name=SUITE_NAME,
        tests=str(len(checks)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
    )
    properties = ET.SubElement(suite, "properties")
    for key in ("run_id", "baseline", "passed", "paired", "level", "replicates"):
        value = answer.get(key)
        text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
        ET.SubElement(properties, "property", name=key, value=text)
    for check in checks:
        case = ET.SubElement(suite, "testcase", classname=SUITE_NAME, name=check_label(check))
        verdict = check.get("verdict")
        detail = (
            f"value {number(check.get('value'))}, baseline {number(check.get('baseline'))}, "
            f"delta {number(check.get('delta'))}, CI {_interval(check.get('ci'))}"
        )
        message = f"{verdict}: {detail}" + (f"; {check['reason']}" if check.get("reason") else "")
        if verdict == "fail" or (verdict == "inconclusive" and not allow):
            failure = ET.SubElement(case, "failure", message=message, type=str(verdict))
            failure.text = message
        elif verdict == "inconclusive":
            ET.SubElement(case, "skipped", message=message)
        else:
            ET.SubElement(case, "system-out").text = message
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(answer: Mapping[str, Any], path: str) -> None:
    try:
        junit_tree(answer).write(Path(path), encoding="utf-8", xml_declaration=True)
    except OSError as exc:
        raise GateError(f"--junit {path}: cannot write ({exc.strerror})") from None


def make_client(args: argparse.Namespace) -> Client:
    """The REST client of one ``gate`` command (tests replace it with one on a mock)."""
    return Client(check_url(args.url), api_key=args.api_key, timeout=args.timeout)


def cmd_gate(args: argparse.Namespace) -> int:
    checks = [parse_check(text) for text in args.check]
    if not checks:
        raise UsageError("ce-eval gate needs at least one --check", CHECK_HINT)
    url = check_url(args.url)
    with make_client(args) as client:
        path = run_path(args.run_id, "gate")
        try:
            answer = Retrier(url, args.retries).call(
                f"POST {url}{path}",
                lambda: client.gate(args.run_id, args.baseline, checks, args.allow_inconclusive),
            )
        except CommandError as exc:
            raise GateError(exc.message, exc.hint) from None
    if not isinstance(answer, Mapping) or not isinstance(answer.get("checks"), list):
        raise GateError(f"POST {url}{path}: the answer is not a gate result")
    if args.junit:
        write_junit(answer, args.junit)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print("\n".join(gate_lines(answer)))
    return EXIT_PASS if answer.get("passed") is True else EXIT_FAIL


def add_command(sub: Any) -> None:
    """Add ``gate`` to the ``ce-eval`` sub-command parser."""
    gate = sub.add_parser(
        "gate",
        help="regression gate: a run against a baseline run (exit 0 pass, 1 fail, 2 error)",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_flags(gate)
    gate.add_argument("run_id", metavar="RUN", help="the candidate run")
    gate.add_argument("--baseline", required=True, metavar="BASE", help="the baseline run")
    gate.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="METRIC[@KEY=VALUE]:THRESHOLD",
        help="-m max decrease, +m max increase, >=x min, <=x max (repeatable)",
    )
    gate.add_argument(
        "--allow-inconclusive",
        action="store_true",
        help="an inconclusive check (interval straddling the margin) does not fail the gate",
    )
    gate.add_argument("--junit", metavar="PATH", help="also write a JUnit XML report")
    gate.add_argument("--json", action="store_true", help="print the JSON answer")
    gate.set_defaults(func=cmd_gate)
