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


def problem_response(error: ServiceError, instance: str | None = None) -> ProblemResponse:
    return ProblemResponse(
        error.problem(instance), status_code=error.status_code, headers=error.headers or None
    )


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers for ``codes``."""
    return {code: {"model": Problem, "content": {"application/problem+json": {}}} for code in codes}
