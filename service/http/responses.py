"""orjson-backed responses (NumPy arrays serialised natively; non-finite floats become null)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

from service.errors import ServiceError
from service.schemas import Problem


class FastJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ProblemResponse(FastJSONResponse):
    media_type = "application/problem+json"


#: Path prefix of the Open Inference Protocol routes, whose clients read ``error``.
OIP_PREFIX = "/v2"


def is_oip_path(path: str | None) -> bool:
    return path is not None and (path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/"))


def problem_body(error: ServiceError, instance: str | None = None) -> dict[str, Any]:
    """RFC 9457 body; under ``/v2`` also ``error`` = ``detail`` on one line (what OIP clients
    such as tritonclient decode)."""
    body = error.problem(instance)
    if is_oip_path(instance):
        body["error"] = " ".join(str(error.detail).splitlines()) or error.title
    return body


def problem_response(error: ServiceError, instance: str | None = None) -> ProblemResponse:
    return ProblemResponse(
        problem_body(error, instance), status_code=error.status_code, headers=error.headers or None
    )


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers for ``codes``."""
    return {code: {"model": Problem, "content": {"application/problem+json": {}}} for code in codes}
