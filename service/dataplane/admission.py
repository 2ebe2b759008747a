"""Backpressure: a bounded number of evaluations admitted at once; beyond → 503 + Retry-After.

Shared by every adapter (REST, gRPC, OIP) through :class:`service.dataplane.evaluate.DataPlane`.
"""

from __future__ import annotations

import contextvars
import threading

from service.errors import Unavailable

#: The API key id of the request being served (None with auth off), set by the adapters once
#: they authenticate; per-key compute shares read it.
current_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_principal", default=None
)

#: True for a request that arrived (its headers, or its RPC) before SIGTERM: it is still admitted
#: while draining, even if its body was still uploading when the signal came.
arrived_before_drain: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "arrived_before_drain", default=False
)


class Admission:
    """At most ``limit`` evaluations admitted (running or waiting for a compute thread)."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.draining = False
        self._inflight = 0
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        return self._inflight

    def mark_arrival(self) -> contextvars.Token[bool]:
        """Call when a request arrives: it is admitted while draining iff it arrived before."""
        return arrived_before_drain.set(not self.draining)

    def admit(self) -> Admission:
        """``with admission.admit():`` counts one evaluation in flight; 503 when full or draining.

        A plain context manager (no generator): it wraps every request.
        """
        return self

    def __enter__(self) -> None:
        with self._lock:
            if self.draining and not arrived_before_drain.get():
                raise self._refuse("the server is shutting down", "draining")
            if self._inflight >= self.limit:
                raise self._refuse(
                    f"evaluation queue is full ({self.limit} in flight)", "queue_full"
                )
            self._inflight += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._inflight -= 1

    def _refuse(self, detail: str, reason: str) -> Unavailable:
        return Unavailable(
            detail,
            [{"loc": [], "msg": detail, "type": reason}],
            headers={"Retry-After": str(self.retry_after_s)},
        )
