"""Runs the atheris harness briefly (CI) when atheris is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed")

CORPUS = [
    b'{"loss": "cross_entropy", "logits": [[1.0, 2.0]], "targets": [1]}',
    b'{"dtype": "float32", "shape": [2], "data": "AAAAAAAAAAA="}',
    b"[[1, 2], [3]]",
]


@pytest.mark.slow
def test_atheris_harness_runs_without_findings(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(CORPUS):
        (corpus / f"seed{i}").write_bytes(seed)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_codecs",
            "-runs=3000",
            "-max_len=512",
            "-rss_limit_mb=4096",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 3000 runs" in result.stderr
