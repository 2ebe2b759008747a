"""Protobuf codec: ``ce_eval.v1`` messages ↔ NumPy arrays, request/response dicts, problems.

Shared by the gRPC servicer, ``POST /v1/evaluate`` with ``application/x-protobuf`` and the SDK.
Tensors travel as little-endian C-order bytes (``Tensor{dtype, shape, data}``) and are decoded
with :func:`service.codecs.tensors.from_bytes` (explicit dtype and shape, element limit checked
first).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from ce_engine.dtypes import wire_name
from service.codecs.tensors import from_bytes, wire_array
from service.config import Settings
from service.dataplane.evaluate import parse_evaluate_request
from service.errors import MalformedBody, ServiceError
from service.schemas import EvaluateRequest

PROTOBUF_MEDIA_TYPE = "application/x-protobuf"
_TENSOR_FIELDS = ("logits", "targets", "sample_weight", "vector")


def array_to_tensor(array: Any, out: pb.Tensor | None = None) -> pb.Tensor:
    """Array (anything ``np.asarray`` takes) → ``Tensor`` of little-endian C-order bytes."""
    contiguous = wire_array(array)
    tensor = pb.Tensor() if out is None else out
    tensor.dtype = wire_name(contiguous.dtype)
    tensor.shape[:] = contiguous.shape
    tensor.data = contiguous.tobytes()
    return tensor


def tensor_to_array(tensor: pb.Tensor, loc: Sequence[str | int], max_elements: int) -> np.ndarray:
    """``Tensor`` → read-only array viewing the message's bytes (dtype/shape/length checked)."""
    return from_bytes(tensor.data, tensor.dtype, list(tensor.shape), loc, max_elements)


def _integral(value: Any) -> Any:
    """Struct numbers are doubles: 2.0 → 2 so integer options (ignore_index, top_k) validate."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = _integral(json_format.MessageToDict(struct))
    return result


def dict_to_struct(value: Mapping[str, Any], out: struct_pb2.Struct | None = None) -> Any:
    """JSON-like mapping (NumPy scalars/arrays allowed) → ``Struct``; non-finite → null."""
    struct = struct_pb2.Struct() if out is None else out
    plain = orjson.loads(
        orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    )
    struct.update(plain)
    return struct


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field_number: int, length: int) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(length)


_TENSOR_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_REQUEST_FIELD_NUMBERS = {f.name: f.number for f in pb.EvaluateRequest.DESCRIPTOR.fields}


def _malformed(reason: str) -> MalformedBody:
    return MalformedBody(
        f"malformed protobuf EvaluateRequest: {reason}",
        [{"loc": ["body"], "msg": "not a valid EvaluateRequest message", "type": "protobuf"}],
    )


def parse_request_bytes(body: bytes | memoryview) -> pb.EvaluateRequest:
    """Serialized ``EvaluateRequest`` → message; 400 when it does not parse."""
    message = pb.EvaluateRequest()
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise _malformed(str(exc)) from None
    return message


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise _malformed("truncated or oversized varint")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(view: memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """Wire-format fields of one message level: (number, wire type, start, value start, end)."""
    pos = 0
    while pos < len(view):
        start = pos
        key, pos = _read_varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, end = _read_varint(view, pos)
        elif wire_type == 1:
            end = pos + 8
        elif wire_type == 5:
            end = pos + 4
        elif wire_type == 2:
            length, pos = _read_varint(view, pos)
            end = pos + length
        else:
            raise _malformed(f"unsupported wire type {wire_type}")
        if end > len(view) or number == 0:
            raise _malformed("truncated field")
        yield number, wire_type, start, pos, end
        pos = end


_TENSOR_NUMBERS = {_REQUEST_FIELD_NUMBERS[name]: name for name in _TENSOR_FIELDS}


def split_request_bytes(
    body: bytes | memoryview, min_bytes: int = 64 * 1024
) -> tuple[pb.EvaluateRequest, dict[str, memoryview]]:
    """Like :func:`parse_request_bytes`, but each tensor's ``data`` stays in ``body``.

    Returns the message with empty tensor ``data`` and, per tensor field, a view of its data
    bytes (the last occurrence wins, as in protobuf). Saves the two copies a protobuf parser
    makes of large tensors (parse, then ``bytes`` access); bodies under ``min_bytes`` are
    parsed whole (the split walks fields in Python, ~20 µs).
    """
    if len(body) < min_bytes:
        return parse_request_bytes(body), {}
    view = memoryview(body)
    rest = bytearray()
    data: dict[str, memoryview] = {}
    for number, wire_type, start, value_start, end in _fields(view):
        name = _TENSOR_NUMBERS.get(number)
        if name is None or wire_type != 2:
            rest += view[start:end]
            continue
        inner = bytearray()
        for inner_number, inner_type, i_start, i_value, i_end in _fields(view[value_start:end]):
            if inner_number == _TENSOR_DATA_FIELD and inner_type == 2:
                data[name] = view[value_start + i_value : value_start + i_end]
            else:
                inner += view[value_start + i_start : value_start + i_end]
        rest += _length_delimited(number, len(inner))
        rest += inner
    return parse_request_bytes(bytes(rest)), data


def request_from_proto(
    message: pb.EvaluateRequest,
    settings: Settings,
    data: Mapping[str, memoryview] | None = None,
) -> EvaluateRequest:
    """``EvaluateRequest`` message → the REST request model (tensors as NumPy arrays).

    ``data``: tensor bytes kept out of the message by :func:`split_request_bytes`.
    """
    payload: dict[str, Any] = {"loss": message.loss}
    for name in _TENSOR_FIELDS:
        if message.HasField(name):
            tensor = getattr(message, name)
            raw = data[name] if data and name in data else tensor.data
            payload[name] = from_bytes(
                raw, tensor.dtype, list(tensor.shape), (name,), settings.max_elements
            )
        elif name in ("logits", "targets"):
            payload[name] = None  # the engine answers 422 "field required" at this location
    if message.HasField("options"):
        payload["options"] = struct_to_dict(message.options)
    if message.outputs:
        payload["outputs"] = list(message.outputs)
    if message.metrics:
        payload["metrics"] = list(message.metrics)
    if message.backend:
        payload["backend"] = message.backend
    return parse_evaluate_request(payload, settings)


def request_to_proto(
    loss: str,
    logits: Any,
    targets: Any,
    *,
    options: Mapping[str, Any] | None = None,
    outputs: Iterable[str] = ("loss",),
    metrics: Iterable[str] = (),
    sample_weight: Any = None,
    vector: Any = None,
    backend: str | None = None,
) -> pb.EvaluateRequest:
    """Client side: arrays + options → ``EvaluateRequest`` message."""
    message = pb.EvaluateRequest(
        loss=loss, outputs=list(outputs), metrics=list(metrics), backend=backend or ""
    )
    array_to_tensor(logits, message.logits)
    array_to_tensor(targets, message.targets)
    if sample_weight is not None:
        array_to_tensor(sample_weight, message.sample_weight)
    if vector is not None:
        array_to_tensor(vector, message.vector)
    if options:
        dict_to_struct(options, message.options)
    return message


def request_chunks(
    loss: str,
    logits: Any,
    targets: Any,
    *,
    options: Mapping[str, Any] | None = None,
    outputs: Iterable[str] = ("loss",),
    metrics: Iterable[str] = (),
    sample_weight: Any = None,
    vector: Any = None,
    backend: str | None = None,
) -> list[bytes | memoryview]:
    """A serialized ``EvaluateRequest`` as chunks that reference the arrays' memory (no copy).

    The message is serialized with each tensor's ``dtype``/``shape`` only; each tensor's
    ``data`` follows as a second occurrence of the same field, which protobuf parsers merge
    into the first (embedded messages merge; the wire format's "last one wins" for scalars).
    ``b"".join(chunks)`` parses to the same message as :func:`request_to_proto`.
    """
    arrays = {
        name: wire_array(array)
        for name, array in (
            ("logits", logits),
            ("targets", targets),
            ("sample_weight", sample_weight),
            ("vector", vector),
        )
        if array is not None
    }
    message = pb.EvaluateRequest(
        loss=loss, outputs=list(outputs), metrics=list(metrics), backend=backend or ""
    )
    for name, array in arrays.items():
        tensor = getattr(message, name)
        tensor.dtype = wire_name(array.dtype)
        tensor.shape[:] = array.shape
    if options:
        dict_to_struct(options, message.options)
    chunks: list[bytes | memoryview] = [message.SerializeToString()]
    for name, array in arrays.items():
        data = array.reshape(-1).view(np.uint8).data
        inner = _length_delimited(_TENSOR_DATA_FIELD, data.nbytes)
        chunks.append(_length_delimited(_REQUEST_FIELD_NUMBERS[name], len(inner) + data.nbytes))
        chunks.append(inner)
        chunks.append(data)
    return chunks


def response_to_proto(result: Mapping[str, Any]) -> pb.EvaluateResponse:
    """``DataPlane.evaluate(..., encoding="raw")`` dict → ``EvaluateResponse`` message."""
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
        array_to_tensor(array, message.outputs[name])
    if result["metrics"]:
        dict_to_struct(result["metrics"], message.metrics)
    for name, extra in result.get("extras", {}).items():
        message.extras[name] = extra
    return message


def response_from_proto(message: pb.EvaluateResponse, max_elements: int) -> dict[str, Any]:
    """Client side: ``EvaluateResponse`` → the REST response dict with NumPy outputs."""
    return {
        "loss": message.loss,
        "value": message.value if message.HasField("value") else None,
        "sum": message.sum,
        "denominator": message.denominator,
        "count": message.count,
        "ignored": message.ignored,
        "reduction": message.reduction,
        "normalization": message.normalization,
        "unit": message.unit,
        "outputs": {
            name: tensor_to_array(t, ("outputs", name), max_elements)
            for name, t in message.outputs.items()
        },
        "metrics": struct_to_dict(message.metrics),
        "extras": dict(message.extras),
        "backend": message.backend,
        "compute_dtype": message.compute_dtype,
        "elapsed_ms": message.elapsed_ms,
    }


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


def problem_from_proto(problem: pb.Problem) -> dict[str, Any]:
    """``Problem`` message → the REST problem dict (integer indices restored in ``loc``)."""
    return {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "errors": [
            {"loc": _integral(list(item.loc)), "msg": item.msg, "type": item.type}
            for item in problem.errors
        ],
    }


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
        payload["options"] = struct_to_dict(message.options)
    if message.class_names:
        payload["class_names"] = list(message.class_names)
    return payload


def create_run_to_proto(
    name: str,
    loss: str,
    *,
    options: Mapping[str, Any] | None = None,
    metrics: Iterable[str] = (),
    class_names: Iterable[str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> pb.CreateRunRequest:
    """Client side: a run's configuration → ``CreateRunRequest``."""
    message = pb.CreateRunRequest(
        name=name,
        loss=loss,
        metrics=list(metrics),
        class_names=list(class_names or ()),
        tags=dict(tags or {}),
    )
    if options:
        dict_to_struct(options, message.options)
    return message


def batch_from_proto(message: pb.AddBatchRequest, max_elements: int) -> dict[str, Any]:
    """``AddBatchRequest`` → the ``POST /v1/runs/{id}/batches`` body with NumPy tensors.

    An absent ``logits``/``targets`` becomes None, which the engine answers with a 422
    "field required" at that location, as over REST.
    """
    payload: dict[str, Any] = {"batch_id": message.batch_id}
    for name in ("logits", "targets", "sample_weight"):
        if message.HasField(name):
            payload[name] = tensor_to_array(getattr(message, name), (name,), max_elements)
        else:
            payload[name] = None
    return payload


def batch_to_proto(
    run_id: str, batch_id: str, logits: Any, targets: Any, sample_weight: Any = None
) -> pb.AddBatchRequest:
    """Client side: one batch's arrays → ``AddBatchRequest``."""
    message = pb.AddBatchRequest(run_id=run_id, batch_id=batch_id)
    array_to_tensor(logits, message.logits)
    array_to_tensor(targets, message.targets)
    if sample_weight is not None:
        array_to_tensor(sample_weight, message.sample_weight)
    return message


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
    return message


def run_from_proto(message: pb.Run) -> dict[str, Any]:
    """Client side: ``Run`` → the dict ``GET /v1/runs/{id}`` answers."""
    return {
        "id": message.id,
        "name": message.name,
        "status": message.status,
        "loss": message.loss,
        "options": struct_to_dict(message.options),
        "metrics_requested": list(message.metrics_requested),
        "class_names": list(message.class_names) or None,
        "tags": dict(message.tags),
        "created_at": message.created_at or None,
        "updated_at": message.updated_at or None,
        "closed_at": message.closed_at or None,
        "batches": message.batches,
        "count": message.count,
        "ignored": message.ignored,
        "sum": message.sum,
        "denominator": message.denominator,
        "value": message.value if message.HasField("value") else None,
        "reduction": message.reduction,
        "normalization": message.normalization,
        "unit": message.unit,
        "metrics": struct_to_dict(message.metrics),
    }


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


def batch_answer_from_proto(message: pb.AddBatchResponse) -> dict[str, Any]:
    """Client side: ``AddBatchResponse`` → the dict ``POST /v1/runs/{id}/batches`` answers."""
    batch = message.batch
    return {
        "run_id": message.run_id,
        "batch_id": message.batch_id,
        "seq": message.seq,
        "duplicate": message.duplicate,
        "batch": {
            "value": batch.value if batch.HasField("value") else None,
            "sum": batch.sum,
            "denominator": batch.denominator,
            "count": batch.count,
            "ignored": batch.ignored,
            "metrics": struct_to_dict(batch.metrics),
        },
        "run": run_from_proto(message.run),
    }


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


def batches_summary_from_proto(message: pb.AddBatchesResponse) -> dict[str, Any]:
    return {
        "run_id": message.run_id,
        "batches": message.batches,
        "accepted": message.accepted,
        "duplicates": message.duplicates,
        "run": run_from_proto(message.run),
    }


def runs_page_to_proto(page: Mapping[str, Any]) -> pb.ListRunsResponse:
    """``RunsDataPlane.list_runs`` page → ``ListRunsResponse`` (empty cursor on the last page)."""
    message = pb.ListRunsResponse(next_cursor=page["next_cursor"] or "")
    for run in page["runs"]:
        run_to_proto(run, message.runs.add())
    return message


def runs_page_from_proto(message: pb.ListRunsResponse) -> dict[str, Any]:
    return {
        "runs": [run_from_proto(run) for run in message.runs],
        "next_cursor": message.next_cursor or None,
    }
