"""Engine error types: structured, transport-agnostic (the service maps them to HTTP/gRPC)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ECHO_MAX_CHARS = 64
"""Longest echo of a client-supplied name in an error (the service sets it from
``CE_EVAL_ECHO_MAX_CHARS`` through :func:`set_echo_max_chars`)."""

MAX_DETAIL_ITEMS = 5
"""Items an error's one-line ``detail`` spells out; the rest are counted."""

_GUESS_MAX_CHARS = 256  # longer names get no "did you mean" (difflib is O(len) per candidate)

MAX_GUESSES = 20
"""Unknown names per list (options, metrics, outputs) that get a "did you mean"; the rest are
reported without one, so 200k unknown keys cost 20 difflib searches, not 200k."""


def set_echo_max_chars(limit: int) -> None:
    """Set :data:`ECHO_MAX_CHARS` (``limit`` ≥ 0) for every later error."""
    global ECHO_MAX_CHARS
    if limit < 0:
        raise ValueError(f"echo limit must be ≥ 0, got {limit}")
    ECHO_MAX_CHARS = limit


def clip(text: str, limit: int | None = None) -> str:
    """``text`` if ``len(text) ≤ L`` else ``text[:L] + '…'``, with ``L = limit`` or
    :data:`ECHO_MAX_CHARS`: the one truncation of every echo of client input."""
    limit = ECHO_MAX_CHARS if limit is None else limit
    return text if len(text) <= limit else text[:limit] + "…"


def quoted(name: object, limit: int | None = None) -> str:
    """``repr`` of a client-supplied name, clipped by :func:`clip`; a clipped string also
    gives its length: ``'xxxx…' (1048576 characters)``."""
    if not isinstance(name, str):
        return clip(repr(name), limit)
    short = clip(name, limit)
    return repr(short) if short == name else f"{short!r} ({len(name)} characters)"


def _clip_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    return tuple(clip(part) if isinstance(part, str) else part for part in loc)


@dataclass(frozen=True)
class ErrorItem:
    """One problem with the input: where (``loc``), what (``msg``), a machine code (``type``).
    String parts of ``loc`` (option keys, tag keys: client input) are clipped by :func:`clip`."""

    loc: tuple[str | int, ...]
    msg: str
    type: str = "value_error"

    def __post_init__(self) -> None:
        object.__setattr__(self, "loc", _clip_loc(tuple(self.loc)))

    def to_dict(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


def unknown_name(
    kind: str, name: object, valid: Iterable[str], *, owner: str = "", guess: bool = True
) -> str:
    """``unknown <kind> 'name'[ for <owner>]; did you mean 'x'? valid: a, b, …`` — the one wording
    of every unknown loss, option, metric and output. The guess is the closest valid name by
    ``difflib.get_close_matches`` (ratio ≥ 0.6), left out when none is that close, the name
    is longer than 256 characters or ``guess`` is false (callers pass
    ``errors so far < MAX_GUESSES``); ``name`` is echoed by :func:`quoted`."""
    names = list(valid)
    close = (
        difflib.get_close_matches(name, names, n=1)
        if guess and isinstance(name, str) and len(name) <= _GUESS_MAX_CHARS
        else []
    )
    return (
        f"unknown {kind} {quoted(name)}"
        + (f" for {owner}" if owner else "")
        + (f"; did you mean {close[0]!r}?" if close else ";")
        + f" valid: {', '.join(names)}"
    )


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


@dataclass
class InputValidationError(EngineError):
    """The inputs are not valid for the requested loss/options (HTTP 422, gRPC INVALID_ARGUMENT)."""

    errors: list[ErrorItem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.detail)

    @property
    def detail(self) -> str:
        """The first :data:`MAX_DETAIL_ITEMS` items as ``loc: msg``, joined by ``; ``, then
        ``; … (n errors in all)`` when there are more."""
        text = "; ".join(
            f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in self.errors[:MAX_DETAIL_ITEMS]
        )
        more = len(self.errors) - MAX_DETAIL_ITEMS
        return text + (f"; … ({len(self.errors)} errors in all)" if more > 0 else "")

    @classmethod
    def single(
        cls, loc: tuple[str | int, ...], msg: str, type: str = "value_error"
    ) -> InputValidationError:
        return cls([ErrorItem(loc, msg, type)])


class NonFiniteResultError(InputValidationError):
    """Valid inputs whose answer is not finite in float64 (e.g. target mass on a −inf logit),
    under ``nan_policy: raise``; ``errors`` name the first position and the reason (HTTP 422,
    gRPC INVALID_ARGUMENT, problem type ``non-finite-result``)."""


class BackendUnavailableError(EngineError):
    """The requested array backend cannot be used here (HTTP 422, gRPC FAILED_PRECONDITION)."""
