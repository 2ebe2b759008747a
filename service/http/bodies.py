"""Reading request bodies."""

from __future__ import annotations

from fastapi import Request

from service.dataplane.buffers import BodyBuffer
from service.http.protocol import BODY_INTO

#: Bodies declaring at least this many bytes are read into one preallocated NumPy buffer.
LARGE_BODY_BYTES = 4 * 1024 * 1024
_LARGE_DIGITS = len(str(LARGE_BODY_BYTES))  # a Content-Length with fewer digits is smaller


async def read_body(request: Request) -> bytes | memoryview:
    """The whole request body, read-only (413 beyond the limit: the body-limit middleware).

    A large body with one plain ``Content-Length`` goes into one :class:`BodyBuffer` (503 when
    the buffer budget is spent): received straight into it where the server offers
    ``BODY_INTO`` (:mod:`service.http.protocol`), else copied chunk by chunk, never joined
    into ``bytes``.
    """
    size = _large_length(request)
    if size is None:
        return await request.body()
    body = BodyBuffer(size, "its Content-Length", request.app.state.dataplane.buffers)
    receive_into = request.scope.get("extensions", {}).get(BODY_INTO, {}).get("receive_into")
    if receive_into is not None:
        await receive_into(body)
    else:
        async for chunk in request.stream():
            body.add(chunk)
    return body.done()


def _large_length(request: Request) -> int | None:
    """The body's length if it is at least ``LARGE_BODY_BYTES`` and the headers fix it beyond
    doubt, within the body limit; else None.

    None too for no, several or odd ``Content-Length`` headers, or any ``Transfer-Encoding``:
    such a body is read as the server frames it.
    """
    if len(request.headers.get("content-length", "")) < _LARGE_DIGITS:  # the common case
        return None
    lengths = []
    for name, value in request.scope["headers"]:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            lengths.append(value)
    if len(lengths) != 1 or not 0 < len(lengths[0]) <= 20 or not lengths[0].isdigit():
        return None  # bytes.isdigit: ASCII digits only
    size = int(lengths[0])
    if size < LARGE_BODY_BYTES or size > request.app.state.settings.max_body_bytes:
        return None
    return size
