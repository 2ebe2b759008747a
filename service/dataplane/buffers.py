"""Request bodies held in memory: one NumPy buffer per large body, and a budget over all of them.

A body whose size is known before it is read (an HTTP ``Content-Length`` of 4 MiB or more, a
gRPC ``EvaluateStream``'s ``total_bytes``) is filled piece by piece into one preallocated
buffer (:class:`BodyBuffer`). Each buffer takes its size from the process's
:class:`BufferBudget` (``CE_EVAL_MAX_BUFFERED_BYTES``) before it is allocated and gives it back
when the buffer is freed, i.e. once the request and every view of its tensors are gone: with
the budget spent, the next large body is refused with 503 + ``Retry-After`` (gRPC UNAVAILABLE)
before a byte of it is read, so many clients declaring large bodies at once cannot exhaust
memory.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from service.errors import MalformedBody, Unavailable

#: Seconds a client refused for want of buffer room is asked to wait.
RETRY_AFTER_S = 1


class BufferBudget:
    """Bytes of large request bodies alive at once: at most ``limit``, but one body of any
    size is always let in when none is held (so a lone body at the body limit is served)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        """Count ``size`` bytes as held; 503 when that would pass the limit."""
        with self._lock:
            if self.held and self.held + size > self.limit:
                detail = (
                    f"{self.held} bytes of request bodies are held; {size} more would pass "
                    f"CE_EVAL_MAX_BUFFERED_BYTES ({self.limit}): retry shortly"
                )
                raise Unavailable(
                    detail,
                    [{"loc": [], "msg": detail, "type": "buffers_full"}],
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self.held += size

    def give_back(self, size: int) -> None:
        with self._lock:
            self.held -= size


class BodyBuffer:
    """A body of ``size`` declared bytes (``declared``: where the size came from, for errors),
    filled in order by :meth:`add`; :meth:`done` checks it is complete and returns it
    read-only. NumPy asks the kernel for huge pages on large allocations, so filling 65 MB
    costs about 17 ms against 35 ms for joining the pieces into ``bytes``."""

    def __init__(self, size: int, declared: str, budget: BufferBudget) -> None:
        budget.take(size)
        try:
            array = np.empty(size, np.uint8)
        except MemoryError:
            budget.give_back(size)
            raise Unavailable(
                f"no memory for a body of {size} bytes: retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        weakref.finalize(array, budget.give_back, size)  # when the last view of it is gone
        self.view = array.data
        self.declared = declared
        self.filled = 0

    def add(self, piece: bytes | bytearray | memoryview) -> None:
        end = self.filled + len(piece)
        if end > len(self.view):
            raise MalformedBody(f"the body is longer than {self.declared} ({len(self.view)} bytes)")
        self.view[self.filled : end] = piece
        self.filled = end

    def unfilled(self) -> memoryview:
        """The bytes still to fill, to receive into in place (then :meth:`advance`)."""
        return self.view[self.filled :]

    def advance(self, count: int) -> None:
        """``count`` more bytes were written into :meth:`unfilled`."""
        self.filled += count

    def done(self) -> memoryview:
        if self.filled != len(self.view):
            raise MalformedBody(
                f"the body ended after {self.filled} of the {len(self.view)} bytes of "
                f"{self.declared}"
            )
        return self.view.toreadonly()
