"""Triton's system shared-memory extension over HTTP: register, status, unregister.

``GET /v2/systemsharedmemory[/region/{name}]/status`` → ``[{name, key, offset, byte_size}]``;
``POST /v2/systemsharedmemory/region/{name}/register`` with ``{key, offset?, byte_size}`` → 200
and an empty body; ``POST /v2/systemsharedmemory[/region/{name}]/unregister`` → 200 (an unknown
name is no error). Every call sees only the regions of its own API key. The registry (and the
safety rules) is :mod:`service.shared_memory`; gRPC ``Evaluate`` uses the same regions.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.dataplane.evaluate import DataPlane
from service.errors import MalformedBody
from service.http.bodies import read_body
from service.http.responses import FastJSONResponse, problems
from service.shared_memory import SharedMemoryRegistry

router = APIRouter(
    prefix="/v2/systemsharedmemory",
    tags=["open inference protocol v2: system shared memory"],
    responses=problems(400, 401, 403, 404, 409, 413, 422, 429),
)

_REGISTER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["key", "byte_size"],
                    "properties": {
                        "key": {
                            "type": "string",
                            "pattern": "^/?[A-Za-z0-9_.-]{1,64}$",
                            "description": "The /dev/shm object (shm_open name).",
                        },
                        "offset": {"type": "integer", "minimum": 0, "default": 0},
                        "byte_size": {"type": "integer", "minimum": 1},
                    },
                }
            }
        },
    }
}


def _registry(request: Request) -> SharedMemoryRegistry:
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane.shared_memory


def _principal(request: Request) -> str | None:
    principal: str | None = getattr(request.state, "principal", None)
    return principal


def _empty() -> Response:
    return Response(b"", media_type="application/json")


@router.get("/status", summary="Status of every system shared-memory region of this key")
async def status_all(request: Request) -> Response:
    return FastJSONResponse(_registry(request).status(_principal(request)))


@router.get("/region/{region_name}/status", summary="Status of one region")
async def status(request: Request, region_name: str) -> Response:
    return FastJSONResponse(_registry(request).status(_principal(request), region_name))


@router.post(
    "/region/{region_name}/register",
    summary="Register a region of a /dev/shm object",
    openapi_extra=_REGISTER_BODY,
)
async def register(request: Request, region_name: str) -> Response:
    registry = _registry(request)
    registry.check_enabled()  # 403 before reading a body
    body = await read_body(request)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(
            f"malformed JSON: {exc}",
            [{"loc": ["body", exc.pos], "msg": exc.msg, "type": "json_invalid"}],
        ) from None
    if not isinstance(payload, dict):
        raise MalformedBody("the register request must be a JSON object {key, offset, byte_size}")
    registry.register(
        _principal(request),
        region_name,
        payload.get("key"),
        payload.get("offset"),
        payload.get("byte_size"),
    )
    return _empty()


@router.post("/unregister", summary="Unregister every region of this key")
async def unregister_all(request: Request) -> Response:
    _registry(request).unregister(_principal(request))
    return _empty()


@router.post("/region/{region_name}/unregister", summary="Unregister one region")
async def unregister(request: Request, region_name: str) -> Response:
    _registry(request).unregister(_principal(request), region_name)
    return _empty()
