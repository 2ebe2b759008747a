"""Pure ASGI middleware: request ids + access log, and the request-body limit (413)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.dataplane.admission import Admission
from service.errors import PayloadTooLarge, ServiceError, Unavailable
from service.http.responses import problem_body
from service.logs import get_logger, request_id_var

access_log = get_logger("access")
error_log = get_logger("errors")


def safe_request_id(incoming: str) -> str:
    """The client's id, at most 128 characters, with every character outside printable ASCII
    (0x21–0x7E) written as ``\\xNN`` so that it can neither split a header nor a log line."""
    return "".join(c if "!" <= c <= "~" else f"\\x{ord(c):02x}" for c in incoming[:128])


class RequestContextMiddleware:
    """Echo/assign ``X-Request-ID`` and write one structured access-log line per request."""

    def __init__(self, app: ASGIApp, admission: Admission | None = None) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = safe_request_id(incoming) or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        if self.admission is not None:  # in this request's own context
            self.admission.mark_arrival()
        started = time.perf_counter()
        status = 500
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                nonlocal started_response
                started_response = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            pass  # the client left (or was cut off by a read timeout): nobody to answer
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when CE_EVAL_SHUTDOWN_GRACE_S runs out:
            # answer 503 + Retry-After (another replica can take it), not uvicorn's 500.
            if started_response:
                raise
            await _unavailable(scope, send_with_id)
        except Exception:
            # Inside the request's context: the 500 carries X-Request-ID and so does its log line.
            error_log.exception("unhandled error", extra={"fields": {"path": scope["path"]}})
            if started_response:
                raise
            await _internal_error(scope, send_with_id)
        finally:
            access_log.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "ms": round((time.perf_counter() - started) * 1000, 3),
                    }
                },
            )
            request_id_var.reset(token)


async def _internal_error(scope: Scope, send: Send) -> None:
    await _send_problem(scope, send, ServiceError("internal error; see the server log"))


async def _unavailable(scope: Scope, send: Send) -> None:
    detail = "the server shut down before this request finished; retry it"
    error = Unavailable(
        detail, [{"loc": [], "msg": detail, "type": "shutdown"}], headers={"Retry-After": "1"}
    )
    await _send_problem(scope, send, error)


async def _send_problem(scope: Scope, send: Send, error: ServiceError) -> None:
    body = orjson.dumps(problem_body(error, scope.get("path")))
    headers: list[Any] = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 when Content-Length exceeds ``max_bytes`` (before reading), or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                await self._reject(scope, send, f"Content-Length {declared}")
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(
                        f"request body exceeds the limit of {self.max_bytes} bytes",
                        [{"loc": ["body"], "msg": "body too large", "type": "body_too_large"}],
                    )
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, scope: Scope, send: Send, what: str) -> None:
        error = PayloadTooLarge(
            f"{what} exceeds the limit of {self.max_bytes} bytes",
            [{"loc": ["body"], "msg": "body too large", "type": "body_too_large"}],
            headers={"Connection": "close"},
        )
        await _send_problem(scope, send, error)
