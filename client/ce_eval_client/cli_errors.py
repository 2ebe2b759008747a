"""Errors the ``ce-eval`` command line reports as one line on stderr, without a traceback.

``ce-eval: <what>: <why> (hint: <what to do>)``. Exit status 2 for usage errors (arguments,
files, array names: :class:`UsageError`), 1 for the server's answers and an unreachable server
(:class:`ServerError`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

#: What a hint says for an error status the server answered.
STATUS_HINTS: Mapping[int | str, str] = {
    401: "pass --api-key or set CE_EVAL_API_KEY",
    403: "this API key is not accepted: check --api-key / CE_EVAL_API_KEY",
    404: "`ce-eval run list` shows the runs this key can see",
    413: "send less per request (a smaller --batch-size)",
    429: "the server limits this key's rate: retry later or raise --retries",
    "UNAUTHENTICATED": "pass --api-key or set CE_EVAL_API_KEY",
}


class CommandError(Exception):
    """A failure to report as one line on stderr (exit status ``exit_code``, no traceback)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        """``ce-eval: message (hint: …)`` on one line."""
        text = " ".join(self.message.split())
        return f"ce-eval: {text}" + (f" (hint: {self.hint})" if self.hint else "")


class UsageError(CommandError):
    """Bad arguments, an unreadable file, an unknown array name: exit status 2."""

    exit_code = 2


class ServerError(CommandError):
    """The server answered an error, or could not be reached: exit status 1."""

    exit_code = 1


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> str:
    """``unknown <kind> 'name'; did you mean 'x'? accepted: a, b`` (closest by difflib)."""
    names = list(valid)
    guess = difflib.get_close_matches(name, names, n=1)
    meant = f" did you mean {guess[0]!r}?" if guess else ""
    return f"unknown {kind} {name!r};{meant} accepted: {', '.join(names)}"


def problem_text(status: int | str, problem: Mapping[str, Any]) -> str:
    """``<status> loc: msg; loc: msg`` from an RFC 9457 problem (its ``detail`` without items)."""
    items = [e for e in problem.get("errors") or [] if isinstance(e, Mapping)]
    if not items:
        return f"{status} {problem.get('detail') or problem.get('title') or ''}".strip()
    parts = []
    for item in items[:3]:
        loc = [str(p) for p in item.get("loc") or [] if p not in ("body", "path", "query")]
        parts.append(f"{'.'.join(loc)}: {item.get('msg')}" if loc else str(item.get("msg")))
    more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
    return f"{status} {'; '.join(parts)}{more}"
