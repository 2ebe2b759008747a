"""A few, stated retries of one CLI request, with a line on stderr before each.

Retried: transport failures (refused or reset connections, timeouts), HTTP 429 and 5xx, gRPC
UNAVAILABLE. Waits 0.5 s, 1 s, 2 s, … (± 25 %, at most 8 s), or the answer's ``Retry-After``
(at most 30 s). Everything else fails at once as a :class:`ServerError`.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

from ce_eval_client.cli_errors import STATUS_HINTS, ServerError, problem_text
from ce_eval_client.sdk import EvaluationError

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, "UNAVAILABLE"})
DEFAULT_RETRIES = 3
UNREACHABLE_HINT = (
    "is the server running? `ce-eval serve` starts one; --url or CE_EVAL_URL point elsewhere"
)


def backoff(attempt: int) -> float:
    """Seconds before retry ``attempt + 1``: 0.5 · 2^attempt (at most 8), ± 25 %."""
    return float(min(8.0, 0.5 * 2**attempt) * (0.75 + random.random() / 2))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Retrier:
    """Runs one request with up to ``retries`` retries; ``target`` names the server in messages."""

    def __init__(
        self,
        target: str,
        retries: int = DEFAULT_RETRIES,
        say: Callable[[str], None] = _stderr,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.target = target
        self.retries = max(0, retries)
        self.say = say
        self.sleep = sleep

    def call(self, what: str, request: Callable[[], T]) -> T:
        """``request()``, retried as the module says; ``what`` is e.g. ``GET /v1/runs/x``."""
        attempt = 0
        while True:
            try:
                return request()
            except (httpx.TransportError, EvaluationError) as exc:
                reason, wait, unreachable = self._judge(what, exc)
            if attempt >= self.retries:
                tries = f"after {attempt} {'retry' if attempt == 1 else 'retries'}"
                if unreachable:
                    raise ServerError(
                        f"cannot reach {self.target} ({reason}) {tries}", UNREACHABLE_HINT
                    ) from None
                raise ServerError(f"{what}: {reason} {tries}", _hint(reason)) from None
            delay = backoff(attempt) if wait is None else wait
            attempt += 1
            self.say(f"ce-eval: {what}: {reason}; retry {attempt}/{self.retries} in {delay:.1f} s")
            self.sleep(delay)

    def _judge(self, what: str, exc: Exception) -> tuple[str, float | None, bool]:
        """(reason, seconds to wait or None for the backoff, unreachable) of a retryable
        failure; raises the others."""
        if isinstance(exc, httpx.TransportError):
            return f"{type(exc).__name__}: {exc}".rstrip(": "), None, True
        assert isinstance(exc, EvaluationError)
        if exc.status not in RETRY_STATUSES:
            raise ServerError(
                f"{what}: {problem_text(exc.status, exc.problem)}", STATUS_HINTS.get(exc.status)
            ) from None
        wait = exc.retry_after
        delay = min(30.0, wait) if wait is not None and wait >= 0 else None
        unreachable = exc.status == "UNAVAILABLE" and "connect" in exc.detail.lower()
        return problem_text(exc.status, exc.problem), delay, unreachable


def _hint(reason: str) -> str | None:
    status = reason.split(" ", 1)[0]
    return STATUS_HINTS.get(int(status)) if status.isdigit() else None
