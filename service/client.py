"""Compatibility re-export: the SDK lives in :mod:`ce_eval_client` (``pip install ./client``)."""

from ce_eval_client.sdk import (
    TRANSPORTS,
    AsyncClient,
    Client,
    Evaluation,
    EvaluationError,
    GrpcClient,
    problem_from_rpc_error,
)

__all__ = [
    "TRANSPORTS",
    "AsyncClient",
    "Client",
    "Evaluation",
    "EvaluationError",
    "GrpcClient",
    "problem_from_rpc_error",
]
