"""Routes: a few lines each; bodies read in ``bodies``, work in ``service.dataplane.evaluate``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
from anyio import to_thread
from fastapi import APIRouter, Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response

from ce_engine.backend import available_backends
from ce_eval_client.proto import PROTOBUF_MEDIA_TYPE
from service.config import Settings
from service.dataplane.evaluate import DataPlane, parse_evaluate_request
from service.errors import MalformedBody, UnsupportedMediaType
from service.http.bodies import read_body
from service.http.protobuf import (
    ProtobufResponse,
    media_type,
    parse_protobuf_request,
    protobuf_content,
    wants_protobuf,
)
from service.http.responses import FastJSONResponse, problems
from service.schemas import EvaluateRequest, EvaluateResponse, Health, LossCatalog

PROBLEMS = problems(400, 401, 403, 413, 415, 422, 429, 503)

router = APIRouter()


def _json_body_schema(name: str, protobuf: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}
    }
    if protobuf:
        content.update(protobuf_content(name))
    return {"requestBody": {"required": True, "content": content}}


def require_json(content_type: str) -> None:
    """415 unless the media type is JSON."""
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {content_type or 'none'!r}",
            [
                {
                    "loc": ["header", "content-type"],
                    "msg": "unsupported media type",
                    "type": "media_type",
                }
            ],
        )


def loads_json(body: bytes | memoryview) -> Any:
    """Body bytes → object; 400 if empty or malformed."""
    if not body:
        raise MalformedBody("the request body is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(
            f"malformed JSON: {exc}",
            [{"loc": ["body", exc.pos], "msg": exc.msg, "type": "json_invalid"}],
        ) from None


async def read_json(request: Request, content_type: str | None = None) -> Any:
    """Body → object: 415 unless JSON, 413 (body-limit middleware), 400 if malformed; bodies
    over ``INLINE_BODY_BYTES`` are parsed in a compute thread, off the event loop.

    ``content_type``: the request's media type when the caller has it already.
    """
    require_json(media_type(request) if content_type is None else content_type)
    body = await read_body(request)
    return await _dataplane(request).parse_off_loop(len(body), partial(loads_json, body))


def _dataplane(request: Request) -> DataPlane:
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane


@router.post(
    "/v1/evaluate",
    tags=["evaluate"],
    summary="Evaluate a loss (and gradients, Hessians, metrics) on one batch",
    responses={
        200: {
            "model": EvaluateResponse,
            "content": {PROTOBUF_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
        **PROBLEMS,
    },
    openapi_extra=_json_body_schema("EvaluateRequest", protobuf=True),
)
async def evaluate(request: Request) -> Response:
    """JSON or ``application/x-protobuf`` (``ce_eval.v1.EvaluateRequest``) in, either out."""
    dataplane = _dataplane(request)
    content_type = media_type(request)
    parse: Callable[[bytes | memoryview, Settings], EvaluateRequest] = parse_protobuf_request
    if content_type != PROTOBUF_MEDIA_TYPE:
        require_json(content_type)
        parse = _parse_json_request
    body = await read_body(request)
    binary = wants_protobuf(request, content_type)
    parsed = partial(parse, body, dataplane.settings)
    result = await dataplane.parse_and_evaluate(parsed, len(body), "raw" if binary else None)
    return ProtobufResponse(result) if binary else FastJSONResponse(result)


def _parse_json_request(body: bytes | memoryview, settings: Settings) -> EvaluateRequest:
    return parse_evaluate_request(loads_json(body), settings)


@router.get("/v1/losses", tags=["catalog"], response_model=LossCatalog)
async def losses(request: Request) -> Response:
    return FastJSONResponse(request.app.state.catalog)


@router.get("/healthz", tags=["health"], response_model=Health)
async def healthz() -> Response:
    return FastJSONResponse({"status": "ok"})


@router.get("/readyz", tags=["health"], response_model=Health, responses={503: {"model": Health}})
async def readyz(request: Request) -> Response:
    admission = _dataplane(request).admission
    checks = {
        "backends": orjson.dumps(available_backends()).decode(),
        "inflight": f"{admission.inflight}/{admission.limit}",
    }
    if admission.draining:
        return FastJSONResponse({"status": "draining", "checks": checks}, status_code=503)
    store = getattr(request.app.state, "store", None)
    if store is not None:
        try:
            await to_thread.run_sync(store.ping)
        except SQLAlchemyError as exc:
            checks["store"] = f"unreachable ({type(exc).__name__})"
            return FastJSONResponse({"status": "unavailable", "checks": checks}, status_code=503)
        checks["store"] = "ok"
    return FastJSONResponse({"status": "ready", "checks": checks})
