"""ce_engine: cross-entropy family losses, gradients, Hessians and metrics on NumPy or CuPy.

Pure compute: no web code. Entry point :func:`evaluate` (DESIGN §2).
"""

from ce_engine.api import EvaluationResult, evaluate
from ce_engine.errors import (
    BackendUnavailableError,
    EngineError,
    ErrorItem,
    InputValidationError,
    NonFiniteResultError,
)
from ce_engine.registry import REGISTRY, LossSpec, all_losses, get_loss

__all__ = [
    "REGISTRY",
    "BackendUnavailableError",
    "EngineError",
    "ErrorItem",
    "EvaluationResult",
    "InputValidationError",
    "LossSpec",
    "NonFiniteResultError",
    "all_losses",
    "evaluate",
    "get_loss",
]
