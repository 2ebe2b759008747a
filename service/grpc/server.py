"""gRPC server (grpc.aio): ``ce_eval.v1.LossEvaluation`` over the data plane, health, reflection.

Errors map once, from the service error classes (``ServiceError.grpc_code``): the call fails
with that status code, the detail as message, and in the trailing metadata
``grpc-status-details-bin`` (a ``google.rpc.Status`` whose details hold a
``google.rpc.BadRequest`` and the ``ce_eval.v1.Problem`` the REST API would answer) plus
``ce-eval-errors-bin`` (the JSON ``errors`` list, for clients without the protos).
"""

from __future__ import annotations

from typing import Any

import grpc
import orjson
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import ce_engine
from service.config import Settings
from service.dataplane import DataPlane, engine_error
from service.errors import ServiceError
from service.grpc.gen.ce_eval.v1 import ce_eval_pb2 as pb
from service.logs import get_logger
from service.proto_codec import (
    problem_to_proto,
    request_from_proto,
    response_to_proto,
    split_request_bytes,
)

log = get_logger("grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossEvaluation"].full_name
ERRORS_METADATA_KEY = "ce-eval-errors-bin"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def error_trailers(error: ServiceError) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying the error details (see the module docstring)."""
    code = grpc.StatusCode[error.grpc_code]
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=".".join(str(part) for part in item.get("loc", [])),
                description=str(item.get("msg", "")),
            )
            for item in error.errors
        ]
    )
    details = []
    for message in (bad_request, problem_to_proto(error)):
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=error.detail, details=details
    )
    return (
        (STATUS_DETAILS_KEY, status.SerializeToString()),
        (ERRORS_METADATA_KEY, orjson.dumps(error.errors, default=str)),
    )


class LossEvaluationServicer:
    """Translates messages ↔ the data plane; computes nothing itself.

    Registered with an identity request deserializer (:meth:`handler`): ``Evaluate`` gets the
    serialized request and parses it with :func:`split_request_bytes`, so tensor bytes are
    not copied twice more by the protobuf runtime.
    """

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Evaluate": grpc.unary_unary_rpc_method_handler(
                    self.Evaluate,
                    request_deserializer=None,
                    response_serializer=pb.EvaluateResponse.SerializeToString,
                )
            },
        )

    async def Evaluate(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EvaluateResponse:
        try:
            message, data = split_request_bytes(request)
            parsed = request_from_proto(message, self.dataplane.settings, data)
            result = await self.dataplane.evaluate_async(parsed, "raw")
            return response_to_proto(result)
        except ServiceError as exc:
            error = exc
        except ce_engine.EngineError as exc:
            error = engine_error(exc)
        await context.abort(
            grpc.StatusCode[error.grpc_code], error.detail, trailing_metadata=error_trailers(error)
        )
        raise AssertionError("context.abort returned")  # pragma: no cover


class GrpcServer:
    """A started ``grpc.aio`` server: ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self, server: grpc.aio.Server, port: int, health: health.aio.HealthServicer
    ) -> None:
        self.server = server
        self.port = port
        self.health = health

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish within ``grace`` s."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_grpc_server(
    settings: Settings,
    dataplane: DataPlane,
    host: str | None = None,
    port: int | None = None,
) -> GrpcServer:
    """Bind ``host:port`` (defaults from settings), register services, start serving."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
        ]
    )
    server.add_generic_rpc_handlers((LossEvaluationServicer(dataplane).handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host or settings.host}:{settings.grpc_port if port is None else port}"
    bound = server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("grpc started", extra={"fields": {"address": address, "port": bound}})
    return GrpcServer(server, bound, health_servicer)
