"""gRPC server (grpc.aio): ``ce_eval.v1.LossEvaluation`` over the data planes, health, reflection.

``Evaluate`` and ``EvaluateStream`` (the same request in ``EvaluateChunk`` pieces, joined by
:func:`read_chunks`) run on :class:`service.dataplane.evaluate.DataPlane`; ``CreateRun``,
``AddBatch``, ``AddBatches``, ``GetRun``, ``ListRuns``, ``GetRunMetric``, ``GateRun``,
``GetRunSlices`` and ``CompareRuns`` on :class:`service.dataplane.runs.RunsDataPlane`, the same
one the REST runs API uses. Batches are admitted one by one (``AddBatches`` too), so a full
queue or a draining server answers UNAVAILABLE as HTTP answers 503.

API keys (when configured) come from the call metadata, ``authorization: Bearer <key>`` or
``x-api-key``, through the same :class:`service.auth.Authenticator` as HTTP: UNAUTHENTICATED,
PERMISSION_DENIED, RESOURCE_EXHAUSTED (rate limit), and runs scoped to the key. Health and
reflection are separate services and stay public.

Errors map once, from the service error classes (``ServiceError.grpc_code``): the call fails
with that status code, the detail as message, and in the trailing metadata
``grpc-status-details-bin`` (a ``google.rpc.Status`` whose details hold a
``google.rpc.BadRequest`` and the ``ce_eval.v1.Problem`` the REST API would answer) plus
``ce-eval-errors-bin`` (the JSON ``errors`` list, for clients without the protos; at most the
first 20 items) and ``ce-eval-errors-total`` (how many there were). An error
with ``Retry-After`` (503, 429) also carries a ``google.rpc.RetryInfo`` detail and
``retry-after`` metadata; every HTTP header of the error travels as lower-case metadata.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import anyio
import grpc
import orjson
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import ce_engine
from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.proto import dict_to_struct, struct_to_dict
from service.auth import Authenticator, presented_key
from service.codecs.proto import (
    batch_answer_to_proto,
    batch_from_proto,
    batches_summary_to_proto,
    chunk_parts,
    create_run_from_proto,
    parse_message,
    problem_to_proto,
    request_from_proto,
    response_to_proto,
    run_to_proto,
    runs_page_to_proto,
    shared_outputs_from_proto,
    split_message_bytes,
    split_request_bytes,
)
from service.config import Settings
from service.dataplane.admission import current_principal
from service.dataplane.buffers import BodyBuffer, BufferBudget
from service.dataplane.evaluate import INLINE_BODY_BYTES, DataPlane, engine_error
from service.dataplane.run_details import DetailQuery
from service.dataplane.runs import BatchesSummary, RunsDataPlane
from service.dataplane.slices import SliceQuery
from service.errors import (
    MalformedBody,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    ValidationFailed,
)
from service.logs import get_logger
from service.schemas import EvaluateRequest
from service.shared_memory import RegionAccess, TensorRef
from service.telemetry import count_request

log = get_logger("grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossEvaluation"].full_name
ERRORS_METADATA_KEY = "ce-eval-errors-bin"
ERRORS_TOTAL_METADATA_KEY = "ce-eval-errors-total"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
DEFAULT_LIST_LIMIT = 50

T = TypeVar("T")


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
    messages: list[Message] = [bad_request, problem_to_proto(error)]
    retry_after = error.headers.get("Retry-After", "")
    if retry_after.isdigit():
        delay = duration_pb2.Duration(seconds=int(retry_after))
        messages.append(error_details_pb2.RetryInfo(retry_delay=delay))
    details = []
    for message in messages:
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=error.detail, details=details
    )
    return (
        (STATUS_DETAILS_KEY, status.SerializeToString()),
        (ERRORS_METADATA_KEY, orjson.dumps(error.errors, default=str)),
        (ERRORS_TOTAL_METADATA_KEY, str(error.errors_total)),
        *((name.lower(), value) for name, value in error.headers.items()),
    )


async def _run_answer(call: Callable[[], dict[str, Any]]) -> pb.RunAnswer:
    """``call()`` in a worker thread, its dict as a ``RunAnswer``'s Struct."""
    answer = pb.RunAnswer()
    dict_to_struct(await anyio.to_thread.run_sync(call), answer.answer)
    return answer


def _required_run_id(run_id: str) -> str:
    if not run_id:
        raise ValidationFailed(
            "run_id is required",
            [{"loc": ["run_id"], "msg": "Field required", "type": "missing"}],
        )
    return run_id


class LossEvaluationServicer:
    """Translates messages ↔ the data planes; computes nothing itself.

    Every method is registered with an identity request deserializer (:meth:`handler`) and
    parses its request itself, so a message that does not parse is INVALID_ARGUMENT rather than
    the INTERNAL grpc answers for a failing deserializer; ``Evaluate`` parses with
    :func:`split_request_bytes`, so tensor bytes are not copied twice more by the protobuf
    runtime. Without ``runs`` only ``Evaluate`` is served.
    """

    def __init__(
        self,
        dataplane: DataPlane,
        runs: RunsDataPlane | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.runs = runs
        self.authenticator = authenticator or Authenticator([])

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Evaluate": grpc.unary_unary_rpc_method_handler(
                self.Evaluate,
                request_deserializer=None,
                response_serializer=pb.EvaluateResponse.SerializeToString,
            ),
            "EvaluateStream": grpc.stream_unary_rpc_method_handler(
                self.EvaluateStream,
                request_deserializer=None,
                response_serializer=pb.EvaluateResponse.SerializeToString,
            ),
        }
        if self.runs is not None:
            unary: dict[str, tuple[Callable[..., Awaitable[Message]], type[Message]]] = {
                "CreateRun": (self.CreateRun, pb.Run),
                "AddBatch": (self.AddBatch, pb.AddBatchResponse),
                "GetRun": (self.GetRun, pb.Run),
                "ListRuns": (self.ListRuns, pb.ListRunsResponse),
                "GetRunMetric": (self.GetRunMetric, pb.RunMetric),
                "GateRun": (self.GateRun, pb.RunAnswer),
                "GetRunSlices": (self.GetRunSlices, pb.RunAnswer),
                "CompareRuns": (self.CompareRuns, pb.RunAnswer),
            }
            for name, (method, response) in unary.items():
                methods[name] = grpc.unary_unary_rpc_method_handler(
                    method,
                    request_deserializer=None,
                    response_serializer=response.SerializeToString,
                )
            methods["AddBatches"] = grpc.stream_unary_rpc_method_handler(
                self.AddBatches,
                request_deserializer=None,
                response_serializer=pb.AddBatchesResponse.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

    # ------------------------------------------------------------ plumbing

    def _principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        """The API key id from the call metadata (None with auth off); raises 401/403/429."""
        if not self.authenticator.enabled:
            return None
        metadata = {
            key.lower(): value
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        }
        peer = context.peer() or ""  # "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"
        return self.authenticator.authenticate(
            presented_key(metadata.get("authorization"), metadata.get("x-api-key")),
            peer.rpartition(":")[0] or None,
        )

    async def _answer(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        work: Callable[[str | None], Awaitable[T]],
    ) -> T:
        """Authenticate, run ``work(principal)``, map a failure to its status (one place)."""
        try:
            principal = self._principal(context)
            current_principal.set(principal)  # this call's own task: nothing to reset
            self.dataplane.admission.mark_arrival()
            return await work(principal)
        except ServiceError as exc:
            error = exc
        except ce_engine.EngineError as exc:
            error = engine_error(exc)
        # Without its traceback the error holds no frame of the work (this frame's ``error``
        # would close a cycle through it): request buffers are freed as the call ends, not at
        # the next garbage collection.
        error = error.with_traceback(None)
        await context.abort(
            grpc.StatusCode[error.grpc_code], error.detail, trailing_metadata=error_trailers(error)
        )
        raise AssertionError("context.abort returned")  # pragma: no cover

    def _runs(self) -> RunsDataPlane:
        assert self.runs is not None  # the run methods are registered only with a runs plane
        return self.runs

    async def _add_batch(
        self,
        run_id: str,
        message: pb.AddBatchRequest,
        principal: str | None,
        data: Mapping[str, memoryview] | None = None,
    ) -> dict[str, Any]:
        """One batch through the admission bound (UNAVAILABLE when full or draining)."""
        payload = batch_from_proto(message, self.dataplane.settings.max_elements, data)
        return await self._runs().add_batch_async(run_id, payload, principal=principal)

    # ------------------------------------------------------------- methods

    async def _evaluate(
        self, request: bytes | memoryview, principal: str | None
    ) -> pb.EvaluateResponse:
        dataplane = self.dataplane
        regions = RegionAccess(dataplane.shared_memory, principal)
        # A small request naming shared memory costs what its tensors' bytes cost.
        size = len(request) if not regions.any() else max(len(request), INLINE_BODY_BYTES + 1)
        parsed, shared = await dataplane.parse_off_loop(
            size, partial(_parse_evaluate, request, dataplane.settings, regions)
        )
        answer = await dataplane.evaluate_async(parsed, "raw", len(request))
        if shared:
            return await dataplane.in_thread(response_to_proto, answer, shared, regions)
        return response_to_proto(answer)

    async def Evaluate(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EvaluateResponse:
        return await self._answer(context, partial(self._evaluate, request))

    async def EvaluateStream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EvaluateResponse:
        async def work(principal: str | None) -> pb.EvaluateResponse:
            settings = self.dataplane.settings
            body = await read_chunks(
                requests, settings.max_body_bytes, settings.body_timeout_s, self.dataplane.buffers
            )
            return await self._evaluate(body, principal)

        return await self._answer(context, work)

    async def CreateRun(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Run:
        async def work(principal: str | None) -> pb.Run:
            payload = create_run_from_proto(parse_message(pb.CreateRunRequest, request))
            create = partial(self._runs().create_run, payload, principal=principal)
            return run_to_proto(await anyio.to_thread.run_sync(create))

        return await self._answer(context, work)

    async def AddBatch(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AddBatchResponse:
        async def work(principal: str | None) -> pb.AddBatchResponse:
            message, data = await self.dataplane.parse_off_loop(
                len(request), partial(split_message_bytes, pb.AddBatchRequest, request)
            )
            run_id = _required_run_id(message.run_id)
            return batch_answer_to_proto(await self._add_batch(run_id, message, principal, data))

        return await self._answer(context, work)

    async def AddBatches(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AddBatchesResponse:
        async def work(principal: str | None) -> pb.AddBatchesResponse:
            summary: BatchesSummary | None = None
            index = 0
            async for request in requests:
                message, data = await self.dataplane.parse_off_loop(
                    len(request), partial(split_message_bytes, pb.AddBatchRequest, request)
                )
                if summary is None:
                    summary = BatchesSummary(_required_run_id(message.run_id))
                elif message.run_id and message.run_id != summary.run_id:
                    raise ValidationFailed(
                        f"message {index} names run {message.run_id!r}; this stream adds to "
                        f"{summary.run_id!r}",
                        [{"loc": [index, "run_id"], "msg": "another run", "type": "run_id"}],
                    )
                summary.add(await self._add_batch(summary.run_id, message, principal, data))
                index += 1
            if summary is None:
                raise ValidationFailed(
                    "the stream holds no batch",
                    [{"loc": [], "msg": "at least one AddBatchRequest", "type": "empty_stream"}],
                )
            return batches_summary_to_proto(summary.to_dict())

        return await self._answer(context, work)

    async def GetRun(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> pb.Run:
        async def work(principal: str | None) -> pb.Run:
            run_id = _required_run_id(parse_message(pb.GetRunRequest, request).run_id)
            get = partial(self._runs().get_run, run_id, principal=principal)
            return run_to_proto(await anyio.to_thread.run_sync(get))

        return await self._answer(context, work)

    async def ListRuns(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListRunsResponse:
        async def work(principal: str | None) -> pb.ListRunsResponse:
            message = parse_message(pb.ListRunsRequest, request)
            page = partial(
                self._runs().list_runs,
                name=message.name or None,
                tags=list(message.tags),
                status=message.status or None,
                limit=message.limit or DEFAULT_LIST_LIMIT,
                cursor=message.cursor or None,
                principal=principal,
            )
            return runs_page_to_proto(await anyio.to_thread.run_sync(page))

        return await self._answer(context, work)

    async def GetRunMetric(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RunMetric:
        async def work(principal: str | None) -> pb.RunMetric:
            message = parse_message(pb.GetRunMetricRequest, request)
            query = DetailQuery(
                normalize=message.normalize,
                top=message.top or None,
                classes=list(message.classes) or None,
                sort=message.sort or None,
                order=message.order or None,
                limit=message.limit or None,
                offset=message.offset,
            )
            run_id = _required_run_id(message.run_id)
            detail = partial(
                self._runs().run_metric, run_id, message.name, query, principal=principal
            )
            answer = pb.RunMetric()
            dict_to_struct(await anyio.to_thread.run_sync(detail), answer.detail)
            return answer

        return await self._answer(context, work)

    async def GateRun(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RunAnswer:
        async def work(principal: str | None) -> pb.RunAnswer:
            message = parse_message(pb.GateRunRequest, request)
            run_id = _required_run_id(message.run_id)
            body = struct_to_dict(message.gate)
            gate = partial(self._runs().gate, run_id, body, principal=principal)
            return await _run_answer(gate)

        return await self._answer(context, work)

    async def GetRunSlices(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RunAnswer:
        async def work(principal: str | None) -> pb.RunAnswer:
            message = parse_message(pb.GetRunSlicesRequest, request)
            run_id = _required_run_id(message.run_id)
            query = SliceQuery(
                sort=message.sort or "count",
                order=message.order or "desc",
                limit=message.limit or 100,
                offset=message.offset,
                min_slice_size=message.min_slice_size,
            )
            page = partial(self._runs().run_slices, run_id, message.key, query, principal=principal)
            return await _run_answer(page)

        return await self._answer(context, work)

    async def CompareRuns(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RunAnswer:
        async def work(principal: str | None) -> pb.RunAnswer:
            message = parse_message(pb.CompareRunsRequest, request)
            compare = partial(
                self._runs().compare,
                list(message.ids),
                principal=principal,
                baseline=message.baseline or None,
                slice_key=message.slice_key or None,
            )
            return await _run_answer(compare)

        return await self._answer(context, work)


class CountingInterceptor(grpc.aio.ServerInterceptor):
    """Counts every unary-response call (unary and client-streaming) in
    ``ce_eval_requests_total{transport="grpc", route=<full RPC name>, method="POST",
    status=<gRPC code name>}``; streaming-response RPCs (health Watch, reflection) are not
    counted."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.response_streaming:
            return handler
        rpc = handler_call_details.method
        if handler.request_streaming:
            return handler._replace(stream_unary=_counted(handler.stream_unary, rpc))
        return handler._replace(unary_unary=_counted(handler.unary_unary, rpc))


def _counted(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]], rpc: str
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        status = "UNKNOWN"  # an exception the servicer did not map to a status
        try:
            answer = await behavior(request, context)
            status = "OK"
            return answer
        except BaseException:
            status = _code_name(context.code())
            raise
        finally:
            count_request("grpc", rpc, "POST", status)

    return counted


def _code_name(code: Any) -> str:
    """A status code (``grpc.StatusCode`` or its integer) → its name; UNKNOWN if unset."""
    for member in grpc.StatusCode:
        if code is member or code == member.value[0]:
            return member.name
    return "UNKNOWN"


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


async def read_chunks(
    messages: AsyncIterator[bytes], max_bytes: int, idle_s: float, budget: BufferBudget
) -> memoryview:
    """An ``EvaluateStream``'s request: its chunks' ``data`` in one :class:`BodyBuffer` of the
    first chunk's ``total_bytes`` (refused over ``max_bytes``, or when ``budget`` is spent,
    before reading on). Each chunk must arrive within ``idle_s`` (else DEADLINE_EXCEEDED) and
    hold data; a stream that does not add up to ``total_bytes`` is INVALID_ARGUMENT."""
    iterator = aiter(messages)
    body: BodyBuffer | None = None
    index = 0
    while True:
        try:
            with anyio.fail_after(idle_s):
                raw = await anext(iterator)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise RequestTimeout(
                f"no chunk arrived for {idle_s:g} s (CE_EVAL_BODY_TIMEOUT_S) after {index} chunks"
            ) from None
        data, total = chunk_parts(raw)
        if not data:  # every chunk moves the request on, so the idle timeout means progress
            raise _stream_error(f"chunk {index} holds no data", [index, "data"])
        if body is None:
            body = BodyBuffer(_declared_size(total, max_bytes), "total_bytes", budget)
        elif total is not None and total != len(body.view):
            raise _stream_error(
                f"chunk {index} declares total_bytes {total}, the first {len(body.view)}",
                [index, "total_bytes"],
            )
        body.add(data)
        index += 1
    if body is None:
        raise _stream_error("the stream holds no chunk", [])
    return body.done()


def _declared_size(total: int | None, max_bytes: int) -> int:
    """The first chunk's ``total_bytes``, within the body limit."""
    if total is None:
        raise _stream_error("the first chunk must carry total_bytes", [0, "total_bytes"])
    if total > max_bytes:
        raise PayloadTooLarge(
            f"total_bytes {total} is over the body limit of {max_bytes} bytes "
            "(CE_EVAL_MAX_BODY_BYTES)",
            [{"loc": [0, "total_bytes"], "msg": "over the body limit", "type": "too_large"}],
        )
    return total


def _stream_error(detail: str, loc: list[str | int]) -> MalformedBody:
    return MalformedBody(detail, [{"loc": loc, "msg": detail, "type": "stream"}])


def _parse_evaluate(
    request: bytes | memoryview, settings: Settings, regions: RegionAccess
) -> tuple[EvaluateRequest, dict[str, TensorRef]]:
    """Request bytes → (the request, its outputs bound for shared memory)."""
    message, data = split_request_bytes(request)
    shared = shared_outputs_from_proto(message, regions) if message.output_shared_memory else {}
    return request_from_proto(message, settings, data, regions), shared


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments: message size, keepalive, and idle / age limits on connections, so that
    an idle or endless client cannot hold a connection forever."""

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    return [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.keepalive_time_ms", ms(settings.grpc_keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(settings.grpc_keepalive_timeout_s)),
        ("grpc.max_connection_idle_ms", ms(settings.grpc_max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(settings.grpc_max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(settings.grpc_max_connection_age_grace_s)),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.http2.max_pings_without_data", 0),
    ]


async def start_grpc_server(
    settings: Settings,
    dataplane: DataPlane,
    host: str | None = None,
    port: int | None = None,
    *,
    runs: RunsDataPlane | None = None,
    authenticator: Authenticator | None = None,
) -> GrpcServer:
    """Bind ``host:port`` (defaults from settings), register services, start serving.

    ``runs``: serve the run RPCs on this runs data plane (else only ``Evaluate``).
    ``authenticator``: share HTTP's (one rate-limit bucket per key across transports); by
    default one is built from the settings' API keys and rate limit.
    """
    if authenticator is None:
        authenticator = Authenticator(
            settings.api_key_list(),
            settings.rate_limit_per_s,
            settings.rate_limit_burst,
            settings.auth_failures_per_minute,
        )
    server = grpc.aio.server(interceptors=[CountingInterceptor()], options=server_options(settings))
    servicer = LossEvaluationServicer(dataplane, runs, authenticator)
    server.add_generic_rpc_handlers((servicer.handler(),))
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
