"""``ce-eval serve``: uvicorn (HTTP) and grpc.aio (gRPC) in one process and one event loop.

SIGTERM/SIGINT: new evaluations are refused at once (503 / UNAVAILABLE) and ``/readyz`` answers
503; the listeners stay open ``drain_delay_s`` seconds so load balancers notice, then both servers
stop together (gRPC health NOT_SERVING) and running requests get ``shutdown_grace_s`` seconds to
finish. A second signal skips the delay. After a clean drain the process exits 0 (uvicorn would
re-raise the captured signal, an exit of 143 / -15).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import anyio
import uvicorn
from fastapi import FastAPI

from service.config import Settings
from service.grpc.server import GrpcServer, start_grpc_server
from service.http.protocol import bounded_protocol


class _Server(uvicorn.Server):
    """uvicorn server that starts gRPC with its own start-up and stops it with its shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, settings: Settings) -> None:
        super().__init__(config)
        self.app = app
        self.settings = settings
        self.grpc: GrpcServer | None = None
        self.admission = app.state.dataplane.admission

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        delay = self.settings.drain_delay_s
        if self.admission.draining or delay <= 0:
            self.admission.draining = True
            super().handle_exit(sig, frame)
            return
        self.admission.draining = True
        timer = threading.Timer(delay, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's handlers, without re-raising SIGTERM/SIGINT once the drain is done."""
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # After the app's lifespan (run-store migrations): gRPC reports SERVING only once the
        # run RPCs can reach their tables.
        await super().startup(sockets)
        if self.settings.grpc_port and not self.should_exit:
            state = self.app.state
            state.serve_closes_workers = True  # after gRPC's grace period, not before
            self.grpc = await start_grpc_server(
                self.settings,
                state.dataplane,
                runs=state.runs,
                authenticator=state.authenticator,
            )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc is None:
            await super().shutdown(sockets)
            return
        await asyncio.gather(
            super().shutdown(sockets), self.grpc.stop(self.settings.shutdown_grace_s)
        )
        self.grpc = None
        await anyio.to_thread.run_sync(self.app.state.close_workers)


def _fit_descriptor_limit(connections: int) -> None:
    """Soft RLIMIT_NOFILE ≥ connections + 256 (files, gRPC, the run store), up to the hard limit,
    so that the connection cap is reached before accept() fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


async def serve(app: FastAPI, settings: Settings) -> None:
    """Serve HTTP on ``settings.port`` and gRPC on ``settings.grpc_port`` (0 = no gRPC)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        http=bounded_protocol(
            settings.header_timeout_s, settings.body_timeout_s, settings.max_connections
        ),
    )
    _fit_descriptor_limit(settings.max_connections)
    server = _Server(config, app, settings)
    try:
        await server.serve()
    finally:
        if server.grpc is not None:  # start-up failed after gRPC started
            await server.grpc.stop(0)
