"""Real servers for tests: a throwaway PostgreSQL cluster and `ce-eval serve` subprocesses.

Loaded as a pytest plugin from ``conftest.py``. PostgreSQL tests skip (with the reason) only where
the server binaries are absent; CI installs them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import Settings
from service.grpc.server import GrpcServer, start_grpc_server
from service.http.app import create_app

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@dataclass
class PostgresCluster:
    bindir: Path
    datadir: Path
    port: int
    as_user: list[str] = field(default_factory=list)
    options: str = ""
    _databases: Iterator[int] = field(default_factory=itertools.count)

    def run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=60)

    def pg_ctl(self, *args: str) -> None:
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args)

    def start(self) -> None:
        log = str(self.datadir.parent / "postgres.log")
        self.pg_ctl("-o", self.options, "-l", log, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: disconnect every client and shut down cleanly; ``immediate``: crash."""
        self.pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = f"ce_eval_test_{next(self._databases)}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster on a free localhost port (trust auth, fsync off)."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
        )
    root = Path(tempfile.mkdtemp(prefix="ce-eval-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    root.chmod(0o755)
    port = free_port()
    options = (
        f"-k {root} -p {port} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=300"
    )
    cluster = PostgresCluster(bindir, root / "data", port, as_user, options)
    cluster.run(
        str(bindir / "initdb"), "-D", str(cluster.datadir), "-U", "postgres", "-A", "trust", "-E",
        "UTF8", "--no-sync",
    )  # fmt: skip
    cluster.start()
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            cluster.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL cluster (tests take a fresh database with create_database())."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def own_postgres_cluster() -> Iterator[PostgresCluster]:
    """A cluster for one test alone, which may stop and restart it."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh, empty database on the session's cluster."""
    return postgres_cluster.create_database()


@dataclass
class ServerProcess:
    """`ce-eval serve` in a subprocess on free localhost ports, for end-to-end tests.

    gRPC is off unless ``grpc`` is set (then on its own free port, and start-up waits for its
    health service too). Output goes to ``log_path``.
    """

    database_url: str
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    grpc: bool = False
    grpc_port: int = 0
    module: list[str] = field(default_factory=lambda: ["ce_eval_client.cli", "serve"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http_port(self) -> int:
        return self.port

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60.0) -> ServerProcess:
        if self.grpc and not self.grpc_port:
            self.grpc_port = free_port()
        env = {
            **os.environ,
            "CE_EVAL_DATABASE_URL": self.database_url,
            "CE_EVAL_GRPC_PORT": str(self.grpc_port if self.grpc else 0),
            "CE_EVAL_LOG_LEVEL": "warning",
            "CE_EVAL_BACKEND": "numpy",
            **self.extra_env,
        }
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                *self.module,
                "--port",
                str(self.port),
                "--grpc-port",
                str(self.grpc_port if self.grpc else 0),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    if self.grpc:
                        with grpc.insecure_channel(self.grpc_target) as channel:
                            health_pb2_grpc.HealthStub(channel).Check(
                                health_pb2.HealthCheckRequest(), timeout=1
                            )
                    return self
            except (httpx.TransportError, grpc.RpcError):
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not become ready: {self.log()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flushing (a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns (exit code, log)."""
        if self.process is None:
            return 0, self.log()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.process.returncode, self.log()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory of server subprocesses, all stopped at the end of the test."""
    started: list[ServerProcess] = []

    def make(database_url: str, **extra_env: str) -> ServerProcess:
        server = ServerProcess(
            database_url, tmp_path / f"server-{len(started)}.log", extra_env=extra_env
        )
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()


#: Kept for the transport tests' name: one server class serves both uses.
ServeProcess = ServerProcess


def start_serve(
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    module: list[str] | None = None,
) -> ServerProcess:
    """``ce-eval serve`` (or ``python -m <module...>`` taking the same flags) with HTTP and gRPC
    on free ports and its own SQLite file; returns once both health checks answer."""
    workdir = Path(tempfile.mkdtemp(prefix="ce-eval-"))
    server = ServerProcess(
        f"sqlite:///{workdir / 'ce-eval.db'}",
        workdir / "server.log",
        extra_env=dict(env or {}),
        grpc=True,
        module=module or ["ce_eval_client.cli", "serve"],
    )
    return server.start(timeout)


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    """A gRPC channel to the ``server`` fixture of the module that asks for it (each module
    starts its own ``ce-eval serve``, with its own settings)."""
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@contextlib.contextmanager
def serving(env: dict[str, str] | None = None, timeout: float = 30.0) -> Iterator[ServerProcess]:
    """``ce-eval serve`` (HTTP + gRPC on free ports) for the duration of a ``with`` block."""
    server = start_serve(env=env, timeout=timeout)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


@contextlib.asynccontextmanager
async def in_process_stack(
    settings: Settings,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, grpc.aio.Channel, GrpcServer]]:
    """The app (lifespan run) over ``httpx.ASGITransport`` and its gRPC server on a free local
    port, sharing one data plane, run store and authenticator, as ``ce-eval serve`` does."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        server = await start_grpc_server(
            settings,
            app.state.dataplane,
            host="127.0.0.1",
            port=0,
            runs=app.state.runs,
            authenticator=app.state.authenticator,
        )
        try:
            async with (
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://test"
                ) as rest,
                grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
            ):
                yield app, rest, channel, server
        finally:
            await server.stop(0)
