"""End to end: a real `ce-eval serve` process, and the README's curl example against it."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.reference import softmax_ce
from tests.servers import serving as serve

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"README has no block after <!-- {marker} -->"
    return match.group(1)


def test_cli_serve_answers_and_readme_example_matches() -> None:
    command = readme_block("readme-example:request").strip()
    documented = json.loads(readme_block("readme-example:response"))
    with serve() as server:
        command = command.replace("http://127.0.0.1:8000", server.url)
        argv = shlex.split(command)
        if shutil.which("curl"):
            out = subprocess.run(argv, capture_output=True, check=True, timeout=30).stdout
            answer = json.loads(out)
        else:  # same request without curl: the -d payload and the URL from the README
            payload = json.loads(argv[argv.index("-d") + 1])
            answer = httpx.post(argv[2], json=payload, timeout=30).json()
        ready = httpx.get(f"{server.url}/readyz", timeout=5)
        assert ready.status_code == 200
        echoed = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "r-1"}, timeout=5)
        assert echoed.headers["x-request-id"] == "r-1"
    for key in ("elapsed_ms",):
        documented.pop(key)
        answer.pop(key)
    assert answer == documented
    # and the documented answer is right: independent reference (label smoothing 0.1)
    per, den, _ = softmax_ce(
        np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]),
        np.array([0, 2]),
        fmt="index",
        label_smoothing=0.1,
    )
    assert documented["value"] == pytest.approx(per.sum() / den.sum(), rel=1e-12)
    np.testing.assert_allclose(documented["outputs"]["per_sample"], per, rtol=1e-12)


def test_serve_help_lists_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ce_eval_client.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--host", "--port", "--backend", "--log-level"):
        assert flag in out
