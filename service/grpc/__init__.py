"""gRPC adapter (grpc.aio) over the data plane; generated code lives in ``service.grpc.gen``."""
