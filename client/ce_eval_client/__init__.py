"""ce-eval client: the Python SDK (REST sync/async, gRPC) and the ``ce-eval`` command line."""

__version__ = "0.1.0"
