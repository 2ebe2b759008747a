"""Binary REST: ``POST /v1/evaluate`` with ``application/x-protobuf`` bodies and answers.

The body is the ``ce_eval.v1.EvaluateRequest`` message; the answer is ``EvaluateResponse`` when
``Accept`` names ``application/x-protobuf``, or when the request was protobuf and ``Accept`` is
absent or ``*/*``. Errors stay ``application/problem+json``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import Response

from ce_eval_client.proto import PROTOBUF_MEDIA_TYPE
from service.codecs.proto import request_from_proto, response_to_proto, split_request_bytes
from service.config import Settings
from service.errors import MalformedBody
from service.schemas import EvaluateRequest


def media_type(request: Request) -> str:
    """``Content-Type`` without parameters, lower case ('' when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def protobuf_content(message: str) -> dict[str, Any]:
    """OpenAPI ``content`` entry of a ``ce_eval.v1.<message>`` request body."""
    return {
        PROTOBUF_MEDIA_TYPE: {
            "schema": {"type": "string", "format": "binary", "description": f"ce_eval.v1.{message}"}
        }
    }


def wants_protobuf(request: Request, content_type: str) -> bool:
    """Answer in protobuf? ``content_type``: the request's media type (:func:`media_type`)."""
    accept = request.headers.get("accept", "").lower()
    if PROTOBUF_MEDIA_TYPE in accept:
        return True
    return content_type == PROTOBUF_MEDIA_TYPE and accept.strip() in ("", "*/*")


def parse_protobuf_request(body: bytes | memoryview, settings: Settings) -> EvaluateRequest:
    """Body → ``EvaluateRequest`` model (tensors as NumPy views of the body's bytes)."""
    if not body:
        raise MalformedBody("the request body is empty")
    message, data = split_request_bytes(body)
    return request_from_proto(message, settings, data)


class ProtobufResponse(Response):
    media_type = PROTOBUF_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return response_to_proto(content).SerializeToString()
