"""``ce-eval gate`` and ``Client.gate`` / ``AsyncClient.gate``: the check syntax, the request
put on the wire, the table, exit statuses 0 / 1 / 2 and the JUnit XML report.

The server side is an ``httpx.MockTransport`` whose handler answers as the gate route does:
it parses the body with :func:`service.dataplane.gate.parse_gate_request` and answers
:func:`service.dataplane.gate.run_gate` on runs built from plain arrays (``tests.test_gate``),
or the RFC 9457 problem of the error raised. An unreachable server is a closed local port."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from ce_eval_client import gate_cli
from ce_eval_client.cli import main
from ce_eval_client.cli_errors import UsageError
from ce_eval_client.gate_cli import check_label, parse_check
from ce_eval_client.sdk import AsyncClient, Client, EvaluationError
from service.dataplane.gate import RunReplicates, parse_gate_request, run_gate
from service.errors import ServiceError
from tests.servers import free_port
from tests.test_gate import make_run, percentile, replicate_means, two_models, weights

URL = "http://gate.test"
Handler = Callable[[httpx.Request], httpx.Response]


# ---------------------------------------------------------------- check syntax


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("accuracy:-0.005", {"metric": "accuracy", "slice": None, "max_decrease": 0.005}),
        ("ece:+0.01", {"metric": "ece", "slice": None, "max_increase": 0.01}),
        ("value@lang=de:+0.02", {"metric": "value", "slice": "lang=de", "max_increase": 0.02}),
        ("accuracy:>=0.7", {"metric": "accuracy", "slice": None, "min": 0.7}),
        ("ece:<=0.1", {"metric": "ece", "slice": None, "max": 0.1}),
        ("value:>=-1.5", {"metric": "value", "slice": None, "min": -1.5}),
        ("accuracy:-0", {"metric": "accuracy", "slice": None, "max_decrease": 0.0}),
        ("top_k_accuracy.5:-1e-3", {"metric": "top_k_accuracy.5", "slice": None,
                                    "max_decrease": 0.001}),
        ("value@url=http://x:+0.1", {"metric": "value", "slice": "url=http://x",
                                     "max_increase": 0.1}),
        ("value@lang=:+0.1", {"metric": "value", "slice": "lang=", "max_increase": 0.1}),
    ],
)  # fmt: skip
def test_check_syntax(text: str, check: dict[str, Any]) -> None:
    assert parse_check(text) == check


@pytest.mark.parametrize(
    "text",
    [
        "accuracy",
        "accuracy:",
        ":-0.1",
        "accuracy:0.1",
        "accuracy:=0.1",
        "accuracy:-x",
        "accuracy:--0.1",
        "accuracy:+-0.1",
        "accuracy:-nan",
        "accuracy:>=inf",
        "@lang=de:-0.1",
        "value@lang:+0.1",
        "value@=de:+0.1",
    ],
)
def test_bad_check_syntax_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_check(text)
    assert repr(text) in caught.value.message and caught.value.exit_code == 2


def test_check_label_writes_the_check_back() -> None:
    for text in ["accuracy:-0.005", "value@lang=de:+0.02", "accuracy:>=0.7", "ece:<=0.1"]:
        check = parse_check(text)
        kind = next(k for k in gate_cli.KIND_PREFIX if k in check)
        delta = kind in ("max_decrease", "max_increase")
        answer = {**check, "kind": kind, "margin" if delta else "bound": check[kind]}
        assert check_label(answer) == text


# ---------------------------------------------------------------- a mocked server


def runs() -> dict[str, RunReplicates]:
    bc, cc, bl, cl, lang = two_models()
    w = weights(21)
    worse = bc * (np.arange(bc.size) % 5 != 0)
    return {
        "run_base": make_run("run_base", bc, bl, w, lang=lang),
        "run_cand": make_run("run_cand", cc, cl, w, lang=lang),
        "run_worse": make_run("run_worse", worse, bl + 0.2, w, lang=lang),
        "run_plain": make_run("run_plain", cc, cl, None, lang=lang),
    }


class GateDouble:
    """The gate route over :mod:`service.dataplane.gate`, recording the requests."""

    def __init__(self, status: int | None = None) -> None:
        self.runs = runs()
        self.requests: list[httpx.Request] = []
        self.status = status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.status is not None:
            return httpx.Response(self.status, json={"detail": "boom", "status": self.status})
        parts = request.url.path.split("/")
        try:
            assert parts[:3] == ["", "v1", "runs"] and parts[4] == "gate", request.url.path
            body = parse_gate_request(orjson.loads(request.content))
            if parts[3] not in self.runs or body.baseline not in self.runs:
                return httpx.Response(404, json={"detail": "run not found", "status": 404})
            answer = run_gate(
                self.runs[parts[3]], self.runs[body.baseline], body.checks, body.allow_inconclusive
            )
        except ServiceError as exc:
            return httpx.Response(exc.status_code, json=exc.problem(request.url.path))
        return httpx.Response(200, content=orjson.dumps(answer))


@pytest.fixture
def double(monkeypatch: pytest.MonkeyPatch) -> Iterator[GateDouble]:
    server = GateDouble()

    def client(args: argparse.Namespace) -> Client:
        return Client(http=httpx.Client(base_url=args.url, transport=httpx.MockTransport(server)))

    monkeypatch.setattr(gate_cli, "make_client", client)
    yield server


def gate(*args: str) -> list[str]:
    return ["gate", "--url", URL, "--retries", "0", *args]


CHECKS = ["--check", "accuracy:-0.1", "--check", "value:+0.1", "--check", "value@lang=de:+0.2"]


def test_a_passing_gate_exits_0_and_prints_the_table(
    double: GateDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(gate("run_cand", "--baseline", "run_base", *CHECKS, "--check", "ece:<=1"))
    out = capsys.readouterr()
    assert code == 2 and "has no metric 'ece'" in out.err  # the run has no ece: a 422
    code = main(gate("run_cand", "--baseline", "run_base", *CHECKS, "--check", "accuracy:>=0.5"))
    out = capsys.readouterr()
    assert code == 0, out
    lines = out.out.splitlines()
    assert lines[0].split() == [
        "metric", "slice", "value", "baseline", "delta", "CI", "margin", "verdict",
    ]  # fmt: skip
    assert [line.split()[-1] for line in lines[1:5]] == ["pass"] * 4
    assert lines[3].split()[:2] == ["value", "lang=de"] and "+0.2" in lines[3]
    assert lines[-1].startswith("gate PASSED: run_cand vs baseline run_base: 4 pass")
    assert "(paired, 95% CI, 200 replicates)" in lines[-1]
    body = json.loads(double.requests[-1].content)
    assert double.requests[-1].url.path == "/v1/runs/run_cand/gate"
    assert body == {
        "baseline": "run_base",
        "allow_inconclusive": False,
        "checks": [
            {"metric": "accuracy", "slice": None, "max_decrease": 0.1},
            {"metric": "value", "slice": None, "max_increase": 0.1},
            {"metric": "value", "slice": "lang=de", "max_increase": 0.2},
            {"metric": "accuracy", "slice": None, "min": 0.5},
        ],
    }


def test_the_table_shows_the_interval_of_the_delta(
    double: GateDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(gate("run_cand", "--baseline", "run_base", "--check", "accuracy:-0.1")) == 0
    row = capsys.readouterr().out.splitlines()[1]
    bc, cc, *_ = two_models()
    lo, hi = percentile(replicate_means(cc - bc, weights(21)))
    assert f"[{lo:.6g}, {hi:.6g}]" in row


def test_a_failing_gate_exits_1(double: GateDouble, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(gate("run_worse", "--baseline", "run_base", *CHECKS))
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[-1].startswith("gate FAILED: run_worse vs baseline run_base")


def test_inconclusive_fails_unless_allowed(
    double: GateDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    args = gate("run_plain", "--baseline", "run_base", "--check", "accuracy:-0.1")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "inconclusive" in out.splitlines()[1] and "no confidence intervals" in out
    assert main([*args, "--allow-inconclusive"]) == 0
    assert "(allowed)" in capsys.readouterr().out
    assert json.loads(double.requests[-1].content)["allow_inconclusive"] is True


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["run_cand", "--baseline", "run_base", "--check", "accuracy"], "--check 'accuracy'"),
        (["run_cand", "--baseline", "run_base", "--check", "ece:-0.1"], "better when lower"),
        (["run_cand", "--baseline", "run_base", "--check", "acc:-0.1"], "no metric 'acc'"),
        (["run_cand", "--baseline", "run_base", "--check", "value@lang=fr:+1"], "no slice"),
        (["run_nope", "--baseline", "run_base", "--check", "value:+1"], "404"),
        (["run_cand", "--baseline", "run_base"], "at least one --check"),
        (["run_cand", "--check", "value:+1"], "--baseline"),
    ],
)
def test_errors_exit_2_with_one_line(
    double: GateDouble, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    assert main(gate(*args)) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_server_errors_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = GateDouble(status=500)
    monkeypatch.setattr(
        gate_cli,
        "make_client",
        lambda a: Client(http=httpx.Client(base_url=a.url, transport=httpx.MockTransport(server))),
    )
    assert main(gate("run_cand", "--baseline", "run_base", "--check", "value:+1")) == 2
    assert "500" in capsys.readouterr().err and len(server.requests) == 1


def test_unreachable_server_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    args = ["gate", "--url", url, "--retries", "0", "--timeout", "5", "run_a", "--baseline", "b"]
    assert main([*args, "--check", "value:+1"]) == 2
    assert f"cannot reach {url}" in capsys.readouterr().err


def test_json_prints_the_answer(double: GateDouble, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(gate("run_cand", "--baseline", "run_base", "--check", "value:+1", "--json")) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["passed"] is True and answer["checks"][0]["metric"] == "value"


# ---------------------------------------------------------------- JUnit


def _suite(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "ce-eval gate"
    return suite


def test_junit_report_has_one_testcase_per_check(double: GateDouble, tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    code = main(
        gate(
            "run_worse", "--baseline", "run_base", "--junit", str(report),
            "--check", "accuracy:-0.01", "--check", "value@lang=en:+1",
            "--check", "accuracy:>=0.95",
        )
    )  # fmt: skip
    assert code == 1
    assert report.read_bytes().startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    suite = _suite(report)
    assert suite.get("tests") == "3" and suite.get("failures") == "2"
    assert suite.get("errors") == "0" and suite.get("skipped") == "0"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "accuracy:-0.01", "value@lang=en:+1", "accuracy:>=0.95",
    ]  # fmt: skip
    assert all(c.get("classname") == "ce-eval gate" for c in cases)
    failure = cases[0].find("failure")
    assert failure is not None and failure.get("type") == "fail"
    assert "CI [" in (failure.get("message") or "")
    assert cases[1].find("failure") is None and cases[1].find("skipped") is None
    assert cases[2].find("failure") is not None
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["run_id"] == "run_worse" and props["baseline"] == "run_base"
    assert props["passed"] == "false" and props["paired"] == "true"


@pytest.mark.parametrize(("allow", "code"), [(False, 1), (True, 0)])
def test_junit_inconclusive_is_skipped_only_when_allowed(
    double: GateDouble, tmp_path: Path, allow: bool, code: int
) -> None:
    report = tmp_path / "report.xml"
    args = gate(
        "run_plain", "--baseline", "run_base", "--check", "value:+1", "--junit", str(report)
    )
    assert main([*args, *(["--allow-inconclusive"] if allow else [])]) == code
    suite = _suite(report)
    (case,) = suite.findall("testcase")
    if allow:
        skipped = case.find("skipped")
        assert skipped is not None and "no confidence intervals" in (skipped.get("message") or "")
        assert suite.get("skipped") == "1" and suite.get("failures") == "0"
    else:
        failure = case.find("failure")
        assert failure is not None and failure.get("type") == "inconclusive"
        assert suite.get("skipped") == "0" and suite.get("failures") == "1"


def test_junit_to_an_unwritable_path_exits_2(
    double: GateDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "missing" / "report.xml"
    args = gate("run_cand", "--baseline", "run_base", "--check", "value:+1", "--junit", str(report))
    assert main(args) == 2
    assert "--junit" in capsys.readouterr().err


# ---------------------------------------------------------------- SDK


def _mock(handler: Handler) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def test_client_gate_posts_the_checks_and_returns_the_answer() -> None:
    server = GateDouble()
    checks = [{"metric": "accuracy", "max_decrease": 0.1}, {"metric": "value", "max": 10}]
    with Client(http=httpx.Client(base_url=URL, transport=_mock(server))) as client:
        answer = client.gate("run_cand", "run_base", checks)
        assert answer["passed"] is True and [c["verdict"] for c in answer["checks"]] == ["pass"] * 2
        with pytest.raises(EvaluationError) as caught:
            client.gate("run_cand", "run_base", [{"metric": "ece", "max_decrease": 0.1}])
    assert caught.value.status == 422
    assert caught.value.problem["errors"][0]["loc"] == ["body", "checks", 0, "max_decrease"]
    request = server.requests[0]
    assert request.method == "POST" and request.url.path == "/v1/runs/run_cand/gate"
    assert orjson.loads(request.content) == {
        "baseline": "run_base", "checks": checks, "allow_inconclusive": False,
    }  # fmt: skip


async def test_async_client_gate() -> None:
    server = GateDouble()
    http = httpx.AsyncClient(base_url=URL, transport=_mock(server))
    async with AsyncClient(http=http) as client:
        answer = await client.gate(
            "run_plain", "run_base", [{"metric": "value", "max_increase": 1}], True
        )
    assert answer["passed"] is True and answer["checks"][0]["verdict"] == "inconclusive"
    assert orjson.loads(server.requests[0].content)["allow_inconclusive"] is True


def _recorder() -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"runs": [], "table": {}})

    return httpx.MockTransport(answer), seen


def test_compare_sends_ids_and_baseline() -> None:
    transport, seen = _recorder()
    with Client(http=httpx.Client(base_url=URL, transport=transport)) as client:
        assert client.compare(["run_a", "run_b"], baseline="run_a") == {"runs": [], "table": {}}
        client.compare(["run_a", "run_b"])
    assert seen[0].method == "GET" and seen[0].url.path == "/v1/runs/compare"
    assert dict(seen[0].url.params) == {"ids": "run_a,run_b", "baseline": "run_a"}
    assert dict(seen[1].url.params) == {"ids": "run_a,run_b"}


async def test_async_compare() -> None:
    transport, seen = _recorder()
    async with AsyncClient(http=httpx.AsyncClient(base_url=URL, transport=transport)) as client:
        await client.compare(["run_a", "run_b"], baseline="run_b")
    assert dict(seen[0].url.params) == {"ids": "run_a,run_b", "baseline": "run_b"}
