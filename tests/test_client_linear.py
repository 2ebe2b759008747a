"""The SDK's ``evaluate`` sends linear-layer inputs (``features``, ``weight``, ``bias``) on every
REST transport; answers equal a float64 reference written here."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from ce_eval_client import AsyncClient
from service.config import Settings
from service.http.app import create_app


@pytest.mark.parametrize("transport", ["json", "base64", "protobuf", "oip"])
async def test_async_client_evaluates_linear_cross_entropy(tmp_path: Path, transport: str) -> None:
    rng = np.random.default_rng(5)
    n, d, c = 12, 6, 9
    x, w, b = rng.standard_normal((n, d)), rng.standard_normal((c, d)), rng.standard_normal(c)
    y = rng.integers(0, c, size=n)
    z = x @ w.T + b
    top = z.max(axis=1)
    nll = top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - z[np.arange(n), y]
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'r.db'}", log_level="warning")
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        client = AsyncClient("http://t", transport=transport, http=http)  # type: ignore[arg-type]
        got = await client.evaluate(
            "linear_cross_entropy", None, y, features=x, weight=w, bias=b, metrics=["accuracy"]
        )
    assert got.value == pytest.approx(nll.mean(), rel=1e-12)
    assert got.metrics["accuracy"] == pytest.approx(np.mean(z.argmax(axis=1) == y), rel=1e-12)
