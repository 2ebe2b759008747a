"""The client package (SDK + CLI) imports and works without the server's dependencies."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from tests.servers import REPO, serving

#: Top-level modules only the server needs: none may be imported by the client package.
SERVER_MODULES = (
    "service",
    "ce_engine",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "sqlalchemy",
    "alembic",
    "prometheus_client",
)

#: Imports every client module and its CLI parser, then lists the server modules it loaded.
PROBE = textwrap.dedent(
    """
    import sys
    import ce_eval_client, ce_eval_client.cli, ce_eval_client.run_cli, ce_eval_client.sdk
    ce_eval_client.cli.build_parser()
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[1:]))
    print(",".join(loaded))
    """
)

#: Blocks the server modules, so an import of one fails loudly instead of succeeding.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in sys.argv[1:]:
                raise ImportError(f"server module imported by the client: {name}")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def test_client_modules_import_no_server_module() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER + PROBE, *SERVER_MODULES],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_service_client_stays_a_re_export() -> None:
    import ce_eval_client.sdk
    import service.client

    assert service.client.Client is ce_eval_client.sdk.Client
    assert service.client.GrpcClient is ce_eval_client.sdk.GrpcClient


@pytest.mark.slow
def test_pip_install_client_alone_evaluates_against_a_server(tmp_path: Path) -> None:
    """``pip install ./client`` in a bare venv: no server dependency, and the SDK works."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    source = shutil.copytree(REPO / "client", tmp_path / "client")  # builds leave no trace
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run(
        [str(python), "-c", PROBE, *SERVER_MODULES],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the repository, whose packages ``python -c`` would find
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == ""
    for module in SERVER_MODULES:  # not even installed
        found = subprocess.run(
            [str(python), "-c", f"import {module}"], capture_output=True, timeout=60, cwd=tmp_path
        )
        assert found.returncode != 0, module
    script = textwrap.dedent(
        """
        import math, sys
        import numpy as np
        from ce_eval_client import Client, GrpcClient
        z = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
        y = np.array([0, 2])
        expected = -np.mean([z[0, 0] - np.log(np.exp(z[0]).sum()),
                             z[1, 2] - np.log(np.exp(z[1]).sum())])
        for transport in ("protobuf", "base64", "json", "oip"):
            with Client(sys.argv[1], transport=transport) as client:
                got = client.evaluate("cross_entropy", z, y, outputs=["loss", "grad"])
                assert math.isclose(got.value, expected, rel_tol=1e-6), (transport, got.value)
                assert got.outputs["grad"].shape == (2, 3), transport
        with GrpcClient(sys.argv[2]) as client:
            assert math.isclose(client.evaluate("cross_entropy", z, y).value, expected,
                                rel_tol=1e-6)
        print("ok")
        """
    )
    with serving() as server:
        run = subprocess.run(
            [str(python), "-c", script, server.url, server.grpc_target],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
    cli = subprocess.run(
        [str(env_dir / "bin" / "ce-eval"), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert cli.returncode != 0
    assert "needs the ce-eval server" in cli.stderr
    assert "Traceback" not in cli.stderr
