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


def test_readme_runs_example_runs_as_written_in_a_fresh_shell(tmp_path: Path) -> None:
    """The runs example, verbatim, in ``bash`` with a bare PATH at a root holding the ``.venv``
    that ``make run`` / ``make test`` create; ``CE_EVAL_URL`` names this test's server."""
    commands = readme_block("readme-example:runs")
    root = tmp_path / "checkout"
    root.mkdir()
    venv = Path(sys.prefix)
    assert (venv / "bin" / "ce-eval").exists(), f"no ce-eval in {venv}: run under make test"
    (root / ".venv").symlink_to(venv)
    rng = np.random.default_rng(11)
    parts = []
    (root / "shards").mkdir()
    for i in range(3):
        logits = rng.standard_normal((50, 10)).astype(np.float32)
        targets = rng.integers(0, 10, size=50)
        np.savez(root / "shards" / f"shard-{i:04d}.npz", logits=logits, targets=targets)
        parts.append((logits, targets))
    with serve() as server:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CE_EVAL_URL": server.url}
        bare = subprocess.run(["bash", "-c", "command -v ce-eval"], env=env, cwd=root)
        assert bare.returncode != 0, "ce-eval is on the bare PATH: the test proves nothing"
        done = subprocess.run(
            ["bash", "-e", "-c", commands + '\necho "RUN=$RUN"'],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        found = re.search(r"^RUN=(\S+)$", done.stdout, re.M)
        assert found, done.stdout
        run = httpx.get(f"{server.url}/v1/runs/{found[1]}", timeout=30).json()
    z = np.concatenate([p[0] for p in parts]).astype(np.float64)
    y = np.concatenate([p[1] for p in parts])
    per, den, _ = softmax_ce(z, y, fmt="index")
    assert run["count"] == 150 and run["batches"] == 3
    assert run["value"] == pytest.approx(per.sum() / den.sum(), rel=1e-6)
    assert run["metrics"]["accuracy"] == pytest.approx(float((z.argmax(1) == y).mean()))
    assert {"ece", "reliability"} <= set(run["metrics"])  # the dashboard's diagram has its bins
    lines = done.stdout.splitlines()  # the push's JSON summary, then the show table
    heads = [i for i, line in enumerate(lines) if line.startswith(f"{found[1]}  ")]
    assert heads, done.stdout
    shown = lines[heads[0] :]
    assert shown[0] == f"{found[1]}  resnet50-val  open  cross_entropy"
    assert any(line.split()[:1] == ["ece"] for line in shown)
    assert any(line.startswith("details: ") and "reliability" in line for line in shown)
    assert "150/150 rows" in done.stderr
