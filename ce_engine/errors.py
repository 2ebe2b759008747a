"""Engine error types: structured, transport-agnostic (the service maps them to HTTP/gRPC)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ErrorItem:
    """One problem with the input: where (``loc``), what (``msg``), a machine code (``type``)."""

    loc: tuple[str | int, ...]
    msg: str
    type: str = "value_error"

    def to_dict(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


def unknown_name(kind: str, name: object, valid: Iterable[str], *, owner: str = "") -> str:
    """``unknown <kind> 'name'[ for <owner>]; did you mean 'x'? valid: a, b, …`` — the one wording
    of every unknown loss, option, metric and output. The guess is the closest valid name by
    ``difflib.get_close_matches`` (ratio ≥ 0.6), left out when none is that close."""
    names = list(valid)
    guess = difflib.get_close_matches(str(name), names, n=1) if isinstance(name, str) else []
    return (
        f"unknown {kind} {name!r}"
        + (f" for {owner}" if owner else "")
        + (f"; did you mean {guess[0]!r}?" if guess else ";")
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
        return "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in self.errors)

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
