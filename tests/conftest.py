"""Shared fixtures: the real app over httpx.ASGITransport (no mocks), reference helpers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from service.http.app import create_app

pytest_plugins = ["tests.servers"]

# Pushes write in the server's threads here: a push writer per app would start a process for
# most tests. tests/test_push_writer.py runs them through the writer (CE_EVAL_PUSH_WRITER=true
# runs the whole suite so).
os.environ.setdefault("CE_EVAL_PUSH_WRITER", "false")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        max_body_bytes=64 * 1024,
        max_elements=100_000,
        log_level="warning",
        database_url=f"sqlite:///{tmp_path / 'ce-eval.db'}",
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as c,
    ):
        yield c
