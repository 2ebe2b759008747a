"""Protobuf codec, server side: ``ce_eval.v1`` request messages → validated requests, results
→ response messages, errors → ``Problem`` (REST protobuf and the gRPC servicer).

The client's half and the shared helpers are :mod:`ce_eval_client.proto`. Tensor bytes are
decoded with :func:`service.codecs.tensors.from_bytes` (explicit dtype and shape, element limit
checked first).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError, Message

from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.proto import (
    TENSOR_DATA_FIELD,
    TENSOR_FIELDS,
    array_to_tensor,
    dict_to_struct,
    length_delimited,
    struct_to_dict,
)
from ce_eval_client.wire import wire_array, wire_name
from service.codecs.tensors import from_bytes, shared_array
from service.config import Settings
from service.dataplane.evaluate import parse_evaluate_request
from service.errors import MalformedBody, ServiceError, ValidationFailed
from service.schemas import BATCH_TENSORS, EvaluateRequest
from service.shared_memory import MappedTensor, RegionAccess, TensorRef, check_region_name

M = TypeVar("M", bound=Message)


def options_from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """``Struct`` options → a dict; a NaN or ±inf number (JSON has none) is a 422 naming it."""
    pending: list[tuple[tuple[str | int, ...], struct_pb2.Value]] = [
        (("options", key), value) for key, value in struct.fields.items()
    ]
    while pending:
        loc, value = pending.pop()
        kind = value.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(value.number_value):
            msg = f"{value.number_value} is not a finite number"
            raise ValidationFailed(
                f"{'.'.join(map(str, loc))}: {msg}",
                [{"loc": list(loc), "msg": msg, "type": "finite_number"}],
            )
        if kind == "struct_value":
            pending += [((*loc, k), v) for k, v in value.struct_value.fields.items()]
        elif kind == "list_value":
            pending += [((*loc, n), v) for n, v in enumerate(value.list_value.values)]
    return struct_to_dict(struct)


def tensor_to_array(tensor: pb.Tensor, loc: Sequence[str | int], max_elements: int) -> np.ndarray:
    """``Tensor`` → read-only array viewing the message's bytes (dtype/shape/length checked)."""
    return from_bytes(tensor.data, tensor.dtype, list(tensor.shape), loc, max_elements)


def _malformed(reason: str, name: str = "EvaluateRequest") -> MalformedBody:
    return MalformedBody(
        f"malformed protobuf {name}: {reason}",
        [{"loc": ["body"], "msg": f"not a valid {name} message", "type": "protobuf"}],
    )


def parse_message(message_type: type[M], body: bytes | memoryview) -> M:
    """Serialized message → message; 400 / INVALID_ARGUMENT when it does not parse."""
    message = message_type()
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise _malformed(str(exc), message_type.DESCRIPTOR.name) from None
    return message


def parse_request_bytes(body: bytes | memoryview) -> pb.EvaluateRequest:
    """Serialized ``EvaluateRequest`` → message; 400 when it does not parse."""
    return parse_message(pb.EvaluateRequest, body)


def _read_varint(view: memoryview, pos: int, name: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise _malformed("truncated or oversized varint", name)
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(view: memoryview, name: str) -> Iterator[tuple[int, int, int, int, int]]:
    """Wire-format fields of one message level: (number, wire type, start, value start, end)
    (``name``: the message's, for errors)."""
    pos = 0
    while pos < len(view):
        start = pos
        key, pos = _read_varint(view, pos, name)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, end = _read_varint(view, pos, name)
        elif wire_type == 1:
            end = pos + 8
        elif wire_type == 5:
            end = pos + 4
        elif wire_type == 2:
            length, pos = _read_varint(view, pos, name)
            end = pos + length
        else:
            raise _malformed(f"unsupported wire type {wire_type}", name)
        if end > len(view) or number == 0:
            raise _malformed("truncated field", name)
        yield number, wire_type, start, pos, end
        pos = end


def chunk_parts(raw: bytes | memoryview) -> tuple[bytes, int | None]:
    """Serialized ``EvaluateChunk`` → (its ``data``, its ``total_bytes`` or None); 400 /
    INVALID_ARGUMENT when it does not parse. The C parser's copy of ``data`` costs
    microseconds per MiB, and its time does not grow with the fields a client packs in."""
    message = parse_message(pb.EvaluateChunk, raw)
    return message.data, message.total_bytes if message.HasField("total_bytes") else None


def _tensor_numbers(message_type: type[Message], names: Sequence[str]) -> dict[int, str]:
    fields = message_type.DESCRIPTOR.fields_by_name
    return {fields[name].number: name for name in names}


_TENSOR_NUMBERS = {
    pb.EvaluateRequest: _tensor_numbers(pb.EvaluateRequest, TENSOR_FIELDS),
    pb.AddBatchRequest: _tensor_numbers(pb.AddBatchRequest, BATCH_TENSORS),
}


#: Fields (top-level and in tensors) :func:`split_message_bytes` walks before it leaves a body
#: to the C parser.
MAX_SPLIT_FIELDS = 64


def split_message_bytes(
    message_type: type[M], body: bytes | memoryview, min_bytes: int = 64 * 1024
) -> tuple[M, dict[str, memoryview]]:
    """Like :func:`parse_message` (``EvaluateRequest`` or ``AddBatchRequest``), but each
    tensor's ``data`` stays in ``body``.

    Returns the message with empty tensor ``data`` and, per tensor field, a view of its data
    bytes (the last occurrence wins, as in protobuf). Saves the two copies a protobuf parser
    makes of large tensors (parse, then ``bytes`` access); bodies under ``min_bytes``, and
    bodies of more than ``MAX_SPLIT_FIELDS`` fields (the walk is Python, ~1 µs a field;
    ``example_ids`` are a field each), are parsed whole.
    """
    if len(body) < min_bytes:
        return parse_message(message_type, body), {}
    numbers = _TENSOR_NUMBERS[message_type]
    name_of_type = message_type.DESCRIPTOR.name
    view = memoryview(body)
    rest = bytearray()
    data: dict[str, memoryview] = {}
    walked = 0
    for number, wire_type, start, value_start, end in _fields(view, name_of_type):
        walked += 1
        if walked > MAX_SPLIT_FIELDS:  # many ids, or a body packed with fields: the C parser
            return parse_message(message_type, body), {}
        name = numbers.get(number)
        if name is None or wire_type != 2:
            rest += view[start:end]
            continue
        inner = bytearray()
        tensor = view[value_start:end]
        for inner_number, inner_type, i_start, i_value, i_end in _fields(tensor, name_of_type):
            walked += 1
            if walked > MAX_SPLIT_FIELDS:
                return parse_message(message_type, body), {}
            if inner_number == TENSOR_DATA_FIELD and inner_type == 2:
                data[name] = view[value_start + i_value : value_start + i_end]
            else:
                inner += view[value_start + i_start : value_start + i_end]
        rest += length_delimited(number, len(inner))
        rest += inner
    return parse_message(message_type, bytes(rest)), data


def split_request_bytes(
    body: bytes | memoryview, min_bytes: int = 64 * 1024
) -> tuple[pb.EvaluateRequest, dict[str, memoryview]]:
    """:func:`split_message_bytes` of an ``EvaluateRequest``."""
    return split_message_bytes(pb.EvaluateRequest, body, min_bytes)


def _no_shared_memory(loc: Sequence[str | int]) -> ValidationFailed:
    msg = "shared-memory tensors are served by gRPC Evaluate and OIP infer only"
    return ValidationFailed(
        f"{'.'.join(map(str, loc))}: {msg}",
        [{"loc": list(loc), "msg": msg, "type": "shared_memory"}],
    )


def shared_ref(shared: pb.SharedTensor, loc: tuple[str | int, ...]) -> TensorRef:
    """``SharedTensor`` → :class:`TensorRef` (422 naming a bad region name)."""
    region = check_region_name(shared.region, (*loc, "region"))
    return TensorRef(region, shared.offset, shared.byte_size, loc)


def has_shared_tensors(message: pb.EvaluateRequest) -> bool:
    """Whether a request names shared memory (its tensors then cost their bytes to read)."""
    return bool(message.output_shared_memory) or any(
        message.HasField(name) and getattr(message, name).HasField("shared_memory")
        for name in TENSOR_FIELDS
    )


def _tensor_array(
    tensor: pb.Tensor,
    name: str,
    raw: bytes | memoryview,
    regions: RegionAccess | None,
    max_elements: int,
) -> np.ndarray | MappedTensor:
    if not tensor.HasField("shared_memory"):
        return from_bytes(raw, tensor.dtype, list(tensor.shape), (name,), max_elements)
    loc = (name, "shared_memory")
    if regions is None:
        raise _no_shared_memory(loc)
    if len(raw):
        msg = "a tensor holds data or shared_memory, not both"
        raise ValidationFailed(msg, [{"loc": [name, "data"], "msg": msg, "type": "conflict"}])
    ref = shared_ref(tensor.shared_memory, loc)
    shape = list(tensor.shape)
    return shared_array(
        regions, ref, tensor.dtype, shape, (name,), max_elements, mappable=name == "logits"
    )


def shared_outputs_from_proto(
    message: pb.EvaluateRequest, regions: RegionAccess | None
) -> dict[str, TensorRef]:
    """``output_shared_memory`` → output name → :class:`TensorRef`; each must be a requested
    array output and lie inside a region of the caller's (checked now, before any work)."""
    shared: dict[str, TensorRef] = {}
    for name, target in message.output_shared_memory.items():
        loc: tuple[str | int, ...] = ("output_shared_memory", name)
        if regions is None:
            raise _no_shared_memory(loc)
        if name == "loss" or name not in message.outputs:
            msg = f"{name!r} is not among the requested array outputs {list(message.outputs)}"
            raise ValidationFailed(msg, [{"loc": list(loc), "msg": msg, "type": "output"}])
        shared[name] = ref = shared_ref(target, loc)
        regions.locate(ref)
    return shared


def request_from_proto(
    message: pb.EvaluateRequest,
    settings: Settings,
    data: Mapping[str, memoryview] | None = None,
    regions: RegionAccess | None = None,
) -> EvaluateRequest:
    """``EvaluateRequest`` message → the REST request model (tensors as NumPy arrays).

    ``data``: tensor bytes kept out of the message by :func:`split_request_bytes`.
    ``regions``: the caller's shared-memory regions, for tensors with ``shared_memory``
    (None: such tensors are a 422, as on REST protobuf).
    """
    payload: dict[str, Any] = {"loss": message.loss}
    if regions is None and message.output_shared_memory:
        raise _no_shared_memory(("output_shared_memory",))
    for name in TENSOR_FIELDS:
        if message.HasField(name):
            tensor = getattr(message, name)
            raw = data[name] if data and name in data else tensor.data
            payload[name] = _tensor_array(tensor, name, raw, regions, settings.max_elements)
        elif name in ("logits", "targets"):
            payload[name] = None  # the engine answers 422 "field required" at this location
    if message.HasField("options"):
        payload["options"] = options_from_struct(message.options)
    if message.outputs:
        payload["outputs"] = list(message.outputs)
    if message.metrics:
        payload["metrics"] = list(message.metrics)
    if message.backend:
        payload["backend"] = message.backend
    return parse_evaluate_request(payload, settings)


def response_to_proto(
    result: Mapping[str, Any],
    shared: Mapping[str, TensorRef] | None = None,
    regions: RegionAccess | None = None,
) -> pb.EvaluateResponse:
    """``DataPlane.evaluate(..., encoding="raw")`` dict → ``EvaluateResponse`` message; the
    outputs in ``shared`` are written into their regions and answered by dtype, shape and
    where (``shared_memory``, ``byte_size`` = the bytes written) instead of data."""
    message = pb.EvaluateResponse(
        loss=result["loss"],
        sum=result["sum"],
        denominator=result["denominator"],
        count=result["count"],
        ignored=result["ignored"],
        reduction=result["reduction"],
        normalization=result["normalization"],
        unit=result["unit"],
        backend=result["backend"],
        compute_dtype=result["compute_dtype"],
        elapsed_ms=result["elapsed_ms"],
    )
    if result["value"] is not None:
        message.value = result["value"]
    for name, array in result["outputs"].items():
        if shared and name in shared:
            assert regions is not None  # shared outputs are parsed with the caller's regions
            _write_output(regions, shared[name], array, message.outputs[name])
        else:
            array_to_tensor(array, message.outputs[name])
    if result["metrics"]:
        dict_to_struct(result["metrics"], message.metrics)
    for name, extra in result.get("extras", {}).items():
        message.extras[name] = extra
    non_finite = result.get("non_finite")
    if non_finite:
        message.non_finite.count = non_finite["count"]
        for position in non_finite["positions"]:
            message.non_finite.positions.add(index=position)
    return message


def _write_output(
    regions: RegionAccess, ref: TensorRef, array: np.ndarray, tensor: pb.Tensor
) -> None:
    contiguous = wire_array(array)
    data = contiguous.reshape(-1).view(np.uint8).data
    regions.write(ref, data)
    tensor.dtype = wire_name(contiguous.dtype)
    tensor.shape[:] = contiguous.shape
    tensor.shared_memory.region = ref.region
    tensor.shared_memory.offset = ref.offset
    tensor.shared_memory.byte_size = len(data)


def problem_to_proto(error: ServiceError) -> pb.Problem:
    """The RFC 9457 problem of ``error`` as a ``Problem`` message (gRPC error details)."""
    body = error.problem()
    problem = pb.Problem(
        type=body["type"], title=body["title"], status=body["status"], detail=body["detail"]
    )
    for item in error.errors:
        entry = problem.errors.add(msg=str(item.get("msg", "")), type=str(item.get("type", "")))
        entry.loc.extend(list(item.get("loc", [])))
    return problem


# ---- runs (DESIGN §3): messages ↔ the dicts of RunsDataPlane and the REST API ----


def create_run_from_proto(message: pb.CreateRunRequest) -> dict[str, Any]:
    """``CreateRunRequest`` → the ``POST /v1/runs`` body (empty ``class_names`` = none)."""
    payload: dict[str, Any] = {
        "name": message.name,
        "loss": message.loss,
        "metrics": list(message.metrics),
        "tags": dict(message.tags),
    }
    if message.HasField("options"):
        payload["options"] = options_from_struct(message.options)
    if message.class_names:
        payload["class_names"] = list(message.class_names)
    if message.HasField("confidence"):
        payload["confidence"] = struct_to_dict(message.confidence)
    if message.slice_keys:
        payload["slice_keys"] = list(message.slice_keys)
    if message.HasField("max_slice_values"):
        payload["max_slice_values"] = message.max_slice_values
    return payload


def batch_from_proto(
    message: pb.AddBatchRequest, max_elements: int, data: Mapping[str, memoryview] | None = None
) -> dict[str, Any]:
    """``AddBatchRequest`` → the ``POST /v1/runs/{id}/batches`` body with NumPy tensors
    (``data``: tensor bytes kept out of the message by :func:`split_message_bytes`).

    An absent ``logits``/``targets`` becomes None, which the engine answers with a 422
    "field required" at that location, as over REST.
    """
    payload: dict[str, Any] = {"batch_id": message.batch_id}
    for name in BATCH_TENSORS:
        if message.HasField(name):
            tensor = getattr(message, name)
            raw = data[name] if data and name in data else tensor.data
            payload[name] = from_bytes(raw, tensor.dtype, list(tensor.shape), (name,), max_elements)
        elif name in ("logits", "targets", "sample_weight"):
            payload[name] = None
    if message.example_ids and message.example_int_ids:
        raise ValidationFailed(
            "send example_ids or example_int_ids, not both",
            [{"loc": ["body", "example_ids"], "msg": "both id kinds given", "type": "extra"}],
        )
    if message.example_ids or message.example_int_ids:
        payload["example_ids"] = list(message.example_ids or message.example_int_ids)
    if message.slices:
        payload["slices"] = {key: list(v.values) for key, v in message.slices.items()}
    return payload


def run_to_proto(run: Mapping[str, Any], out: pb.Run | None = None) -> pb.Run:
    """A run dict (``RunsDataPlane``) → ``Run``; absent times become empty strings."""
    message = pb.Run() if out is None else out
    message.id = run["id"]
    message.name = run["name"]
    message.status = run["status"]
    message.loss = run["loss"]
    message.metrics_requested[:] = run["metrics_requested"]
    message.class_names[:] = run["class_names"] or []
    message.tags.update(run["tags"])
    if run["num_classes"] is not None:
        message.num_classes = run["num_classes"]
    message.details[:] = run["details"]
    message.created_at = run["created_at"] or ""
    message.updated_at = run["updated_at"] or ""
    message.closed_at = run["closed_at"] or ""
    message.batches = run["batches"]
    message.count = run["count"]
    message.ignored = run["ignored"]
    message.sum = run["sum"]
    message.denominator = run["denominator"]
    if run["value"] is not None:
        message.value = run["value"]
    message.reduction = run["reduction"]
    message.normalization = run["normalization"]
    message.unit = run["unit"]
    dict_to_struct(run["options"], message.options)
    dict_to_struct(run["metrics"], message.metrics)
    for name in ("confidence", "intervals", "fingerprint", "gate"):
        if run[name] is not None:
            dict_to_struct(run[name], getattr(message, name))
    message.no_interval[:] = run["no_interval"]
    if run["paired_ids"] is not None:
        message.paired_ids = run["paired_ids"]
    message.slice_keys[:] = run["slice_keys"]
    return message


def batch_answer_to_proto(answer: Mapping[str, Any]) -> pb.AddBatchResponse:
    """``RunsDataPlane.add_batch`` answer → ``AddBatchResponse``."""
    batch = answer["batch"]
    message = pb.AddBatchResponse(
        run_id=answer["run_id"],
        batch_id=answer["batch_id"],
        seq=answer["seq"],
        duplicate=answer["duplicate"],
    )
    message.batch.sum = batch["sum"]
    message.batch.denominator = batch["denominator"]
    message.batch.count = batch["count"]
    message.batch.ignored = batch["ignored"]
    if batch["value"] is not None:
        message.batch.value = batch["value"]
    dict_to_struct(batch["metrics"], message.batch.metrics)
    run_to_proto(answer["run"], message.run)
    return message


def batches_summary_to_proto(summary: Mapping[str, Any]) -> pb.AddBatchesResponse:
    """``RunsDataPlane.add_batches`` summary → ``AddBatchesResponse``."""
    message = pb.AddBatchesResponse(
        run_id=summary["run_id"],
        batches=summary["batches"],
        accepted=summary["accepted"],
        duplicates=summary["duplicates"],
    )
    run_to_proto(summary["run"], message.run)
    return message


def runs_page_to_proto(page: Mapping[str, Any]) -> pb.ListRunsResponse:
    """``RunsDataPlane.list_runs`` page → ``ListRunsResponse`` (empty cursor on the last page)."""
    message = pb.ListRunsResponse(next_cursor=page["next_cursor"] or "")
    for run in page["runs"]:
        run_to_proto(run, message.runs.add())
    return message
