"""Operations routes: Prometheus ``/metrics``, the built-in ``/dashboard`` and its static files."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

from service.telemetry import exposition

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


def static_files() -> StaticFiles:
    """The service's own assets (dashboard page, vendored Chart.js): no network needed."""
    return StaticFiles(directory=STATIC_DIR)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics (text exposition format)")
async def metrics() -> Response:
    body, content_type = exposition()
    return Response(body, media_type=content_type)


@router.get("/dashboard", tags=["dashboard"], summary="Built-in dashboard (HTML page)")
async def dashboard() -> Response:
    return FileResponse(STATIC_DIR / "dashboard" / "index.html", media_type="text/html")
