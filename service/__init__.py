"""ce-eval service: HTTP and gRPC adapters over a protocol-agnostic data plane."""

__version__ = "0.1.0"
