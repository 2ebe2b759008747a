"""ce-eval client: the Python SDK (REST sync/async, gRPC) and the ``ce-eval`` command line.

>>> from ce_eval_client import Client
>>> with Client("http://127.0.0.1:8000") as client:
...     result = client.evaluate("cross_entropy", logits, targets, outputs=["loss", "grad"])

Installs without the server: ``pip install ./client`` (httpx, NumPy, protobuf, grpcio and the
small libraries listed in ``client/pyproject.toml``).
"""

__version__ = "0.1.0"

from ce_eval_client.sdk import (
    AsyncClient,
    Client,
    Evaluation,
    EvaluationError,
    GrpcClient,
)

__all__ = ["AsyncClient", "Client", "Evaluation", "EvaluationError", "GrpcClient", "__version__"]
