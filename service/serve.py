"""``ce-eval serve``: uvicorn (HTTP) and grpc.aio (gRPC) in one process and one event loop.

SIGTERM/SIGINT (caught by uvicorn) start a graceful stop of both servers at once: gRPC health
turns NOT_SERVING, new calls are refused, running requests finish within ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI

from service.config import Settings
from service.grpc.server import GrpcServer, start_grpc_server

GRACE_SECONDS = 30.0


class _Server(uvicorn.Server):
    """uvicorn server that starts gRPC with its own start-up and stops it with its shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, settings: Settings) -> None:
        super().__init__(config)
        self.app = app
        self.settings = settings
        self.grpc: GrpcServer | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.settings.grpc_port:
            self.grpc = await start_grpc_server(
                self.settings, self.app.state.dataplane, self.app.state.compute_limiter
            )
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc is None:
            await super().shutdown(sockets)
            return
        await asyncio.gather(super().shutdown(sockets), self.grpc.stop(GRACE_SECONDS))
        self.grpc = None


async def serve(app: FastAPI, settings: Settings) -> None:
    """Serve HTTP on ``settings.port`` and gRPC on ``settings.grpc_port`` (0 = no gRPC)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(GRACE_SECONDS),
    )
    server = _Server(config, app, settings)
    try:
        await server.serve()
    finally:
        if server.grpc is not None:  # start-up failed after gRPC started
            await server.grpc.stop(0)
