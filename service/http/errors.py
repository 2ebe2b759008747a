"""Exception → RFC 9457 problem+json, mapped once for the whole HTTP app."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

import ce_engine
from service.dataplane.evaluate import engine_error
from service.errors import ServiceError, ValidationFailed, truncate
from service.http.responses import problem_response
from service.logs import get_logger

log = get_logger("http")

_STATUS_TITLES = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return problem_response(exc, request.url.path)

    @app.exception_handler(ce_engine.EngineError)
    async def engine_failure(request: Request, exc: ce_engine.EngineError) -> Response:
        return problem_response(engine_error(exc), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError) -> Response:
        items = [
            {
                "loc": list(e.get("loc", ())),
                "msg": e.get("msg", ""),
                "type": e.get("type", ""),
                **({"input": truncate(e["input"])} if "input" in e else {}),
            }
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(map(str, i['loc']))}: {i['msg']}" for i in items[:5])
        return problem_response(ValidationFailed(detail, items), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = ServiceError(str(exc.detail), headers=dict(exc.headers or {}))
        error.status_code = exc.status_code  # type: ignore[misc]
        error.title = _STATUS_TITLES.get(exc.status_code, "Error")  # type: ignore[misc]
        error.type = {404: "not-found", 405: "method-not-allowed"}.get(  # type: ignore[misc]
            exc.status_code, "http-error"
        )
        return problem_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem_response(ServiceError("internal error"), request.url.path)
