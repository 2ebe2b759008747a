"""A real ``ce-eval serve`` subprocess on free localhost ports (HTTP + gRPC), for the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, timeout: float = 20.0) -> tuple[int, str]:
        """SIGTERM, wait; returns (exit code, stderr)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
            raise
        return self.process.returncode, err.decode(errors="replace")


def start_serve(
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    module: list[str] | None = None,
) -> ServeProcess:
    """Start ``ce-eval serve`` (or ``python -m <module...>`` taking the same flags) and wait
    until HTTP and gRPC health both answer."""
    http_port, grpc_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            *(module or ["service.cli", "serve"]),
            "--port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--backend",
            "numpy",
            "--log-level",
            "warning",
        ],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = ServeProcess(process, http_port, grpc_port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ce-eval serve exited: {process.stderr.read().decode()}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                with grpc.insecure_channel(server.grpc_target) as channel:
                    health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                return server
        except (httpx.HTTPError, grpc.RpcError):
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError("ce-eval serve did not become healthy")
