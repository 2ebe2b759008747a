"""API-key middleware (pure ASGI): 401 missing, 403 invalid, 429 over the per-key rate."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import Authenticator, presented_key
from service.dataplane.admission import current_principal
from service.errors import ServiceError
from service.http.responses import problem_body


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, authenticator: Authenticator, public: list[str]) -> None:
        self.app = app
        self.authenticator = authenticator
        self.public = tuple(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.authenticator.enabled:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith(self.public):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            address = scope.get("client")
            principal = self.authenticator.authenticate(
                presented_key(
                    headers.get(b"authorization", b"").decode("latin-1") or None,
                    headers.get(b"x-api-key", b"").decode("latin-1") or None,
                ),
                address[0] if address else None,
            )
        except ServiceError as error:
            body = orjson.dumps(problem_body(error, path))
            response_headers = [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
            ]
            await send(
                {
                    "type": "http.response.start",
                    "status": error.status_code,
                    "headers": response_headers,
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["principal"] = principal
        token = current_principal.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            current_principal.reset(token)
