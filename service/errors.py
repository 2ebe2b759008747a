"""The service's error hierarchy: each class carries its HTTP status, gRPC code and problem type.

Adapters map exceptions once (RFC 9457 problem+json over HTTP, status + details over gRPC).
"""

from __future__ import annotations

from typing import Any, ClassVar

from ce_engine.errors import clip

PROBLEM_BASE = "urn:ce-eval:problem:"
MAX_ERROR_ITEMS = 20
"""Items an error's ``errors`` list keeps; ``errors_total`` gives the full count."""


class ServiceError(Exception):
    """Base: ``status_code`` (HTTP), ``grpc_code`` (grpc.StatusCode name), ``type`` (problem)."""

    status_code: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"
    type: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal Server Error"

    def __init__(
        self,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        items = errors or []
        self.errors_total = len(items)
        self.errors = [_clipped(item) for item in items[:MAX_ERROR_ITEMS]]
        self.headers = headers or {}

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        """RFC 9457 body; ``instance`` (the request path, client input) is clipped."""
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.type,
            "title": self.title,
            "status": self.status_code,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = self.errors
        if self.errors_total > len(self.errors):
            body["errors_total"] = self.errors_total
        if instance:
            body["instance"] = clip(instance)
        return body


def _clipped(item: dict[str, Any]) -> dict[str, Any]:
    """``item`` with the string parts of its ``loc`` (client-supplied keys) clipped."""
    loc = item.get("loc")
    if not isinstance(loc, (list, tuple)):
        return item
    return {**item, "loc": [clip(p) if isinstance(p, str) else p for p in loc]}


class MalformedBody(ServiceError):
    status_code, grpc_code, type, title = 400, "INVALID_ARGUMENT", "malformed-body", "Bad Request"


class Unauthenticated(ServiceError):
    status_code, grpc_code, type, title = 401, "UNAUTHENTICATED", "unauthenticated", "Unauthorized"


class Forbidden(ServiceError):
    status_code, grpc_code, type, title = 403, "PERMISSION_DENIED", "forbidden", "Forbidden"


class NotFound(ServiceError):
    status_code, grpc_code, type, title = 404, "NOT_FOUND", "not-found", "Not Found"


class MethodNotAllowed(ServiceError):
    status_code, grpc_code, type, title = (
        405,
        "UNIMPLEMENTED",
        "method-not-allowed",
        "Method Not Allowed",
    )


class Conflict(ServiceError):
    status_code, grpc_code, type, title = 409, "ALREADY_EXISTS", "conflict", "Conflict"


class RequestTimeout(ServiceError):
    status_code, grpc_code, type, title = (
        408,
        "DEADLINE_EXCEEDED",
        "request-timeout",
        "Request Timeout",
    )


class PayloadTooLarge(ServiceError):
    status_code, grpc_code, type, title = (
        413,
        "RESOURCE_EXHAUSTED",
        "payload-too-large",
        "Content Too Large",
    )


class UnsupportedMediaType(ServiceError):
    status_code, grpc_code, type, title = (
        415,
        "INVALID_ARGUMENT",
        "unsupported-media-type",
        "Unsupported Media Type",
    )


class ValidationFailed(ServiceError):
    status_code, grpc_code, type, title = (
        422,
        "INVALID_ARGUMENT",
        "validation-error",
        "Unprocessable Content",
    )


class NonFiniteResult(ValidationFailed):
    """Valid input whose answer is not finite (``nan_policy: raise``): never a null in a 200."""

    type = "non-finite-result"


class PreconditionFailed(ValidationFailed):
    """Valid request the server cannot honour here (e.g. backend cupy without a GPU)."""

    grpc_code, type = "FAILED_PRECONDITION", "precondition-failed"


class RateLimited(ServiceError):
    status_code, grpc_code, type, title = (
        429,
        "RESOURCE_EXHAUSTED",
        "rate-limited",
        "Too Many Requests",
    )


class Unavailable(ServiceError):
    status_code, grpc_code, type, title = 503, "UNAVAILABLE", "unavailable", "Service Unavailable"


def truncate(value: Any, limit: int | None = None) -> Any:
    """Echo of client input, cut by :func:`ce_engine.errors.clip` to ``limit`` characters
    (default ``CE_EVAL_ECHO_MAX_CHARS``; never the whole tensor)."""
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return clip(value if isinstance(value, str) else repr(value), limit)
