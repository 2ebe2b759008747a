"""FastAPI app factory + lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

import ce_engine
from ce_engine.kernels.cpu import set_threads
from service import __version__
from service.auth import Authenticator
from service.config import Settings
from service.dataplane.evaluate import DataPlane
from service.dataplane.push_writer import PushWriter
from service.dataplane.runs import RunsDataPlane
from service.http.auth import ApiKeyMiddleware
from service.http.errors import install_error_handlers
from service.http.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.http.monitoring import router as monitoring_router
from service.http.monitoring import static_files
from service.http.oip import router as oip_router
from service.http.routes import router
from service.http.runs import router as runs_router
from service.http.shared_memory import router as shared_memory_router
from service.logs import get_logger
from service.schemas import EvaluateRequest
from service.store import Store
from service.telemetry import PrometheusMiddleware, count_batch, observe_evaluate, observe_run

log = get_logger("app")

DESCRIPTION = (
    "Loss evaluation: cross-entropy family losses, gradients, Hessians and metrics on NumPy or "
    "CuPy. Errors are RFC 9457 `application/problem+json`."
)


def _install_openapi(app: FastAPI) -> None:
    """Add request models and every loss's options model (from the registry) to the schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=DESCRIPTION, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        specs = ce_engine.all_losses().values()
        models: list[type[BaseModel]] = [EvaluateRequest, *(s.options_model for s in specs)]
        for model in models:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        request = components["EvaluateRequest"]
        request["properties"]["loss"]["enum"] = sorted(s.name for s in specs)
        request["properties"]["options"] = {
            "description": "Options of the chosen loss.",
            "anyOf": [{"$ref": f"#/components/schemas/{s.options_model.__name__}"} for s in specs],
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.cpu_threads is not None:  # unset: the engine's own default (all cores)
        set_threads(settings.cpu_threads)

    dataplane = DataPlane(settings)
    store = Store(
        settings.database_url,
        connect_timeout=settings.database_connect_timeout_s,
        statement_timeout=settings.database_statement_timeout_s,
    )
    writer = PushWriter(settings) if settings.push_writer and store.shared else None

    def close_workers() -> None:
        """Stop the worker processes (shared-memory evaluations, the push writer): once no
        request can need them. ``ce-eval serve`` calls it after gRPC's grace period too
        (``serve_closes_workers``), the lifespan's shutdown otherwise."""
        dataplane.close()
        if writer is not None:
            writer.close()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dataplane.admission.draining = False
        await anyio.to_thread.run_sync(store.upgrade)
        log.info(
            "started",
            extra={"fields": {"backend": settings.backend, "store": store.url.get_backend_name()}},
        )
        yield
        dataplane.admission.draining = True
        if not app.state.serve_closes_workers:
            await anyio.to_thread.run_sync(close_workers)
        store.dispose()
        log.info("stopped")

    app = FastAPIOffline(
        title="ce-eval", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.settings = settings
    app.state.close_workers = close_workers
    app.state.serve_closes_workers = False
    app.state.dataplane = dataplane
    app.state.catalog = DataPlane.catalog().model_dump()
    app.state.store = store
    app.state.runs = RunsDataPlane(
        settings,
        store,
        dataplane,
        on_evaluate=observe_evaluate,
        on_batch=count_batch,
        on_run=observe_run,
        writer=writer,
    )
    app.include_router(router)
    app.include_router(runs_router)
    app.include_router(monitoring_router)
    app.mount("/static", static_files(), name="static")
    app.include_router(oip_router)
    app.include_router(shared_memory_router)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # One authenticator for HTTP and gRPC (`ce-eval serve`): a key's rate limit spans both.
    app.state.authenticator = Authenticator(
        settings.api_key_list(),
        settings.rate_limit_per_s,
        settings.rate_limit_burst,
        settings.auth_failures_per_minute,
    )
    app.add_middleware(
        ApiKeyMiddleware, authenticator=app.state.authenticator, public=settings.public_path_list()
    )
    app.add_middleware(RequestContextMiddleware, admission=dataplane.admission)
    app.add_middleware(PrometheusMiddleware)
    _install_openapi(app)
    return app
