"""gRPC adapter (grpc.aio) over the data plane; generated code lives in ``ce_eval_client.gen``."""
