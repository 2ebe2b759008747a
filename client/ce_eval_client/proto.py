"""Protobuf codec, client side: arrays and dicts → ``ce_eval.v1`` request messages, and
response messages → the dicts the REST API answers (DESIGN §3, §4).

The server's half (untrusted bytes → validated requests, results → responses) is
``service.codecs.proto``; both share the helpers here. Tensors travel as little-endian C-order
bytes (``Tensor{dtype, shape, data}``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format, struct_pb2

from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.wire import array_from_wire, wire_array, wire_name

PROTOBUF_MEDIA_TYPE = "application/x-protobuf"
TENSOR_FIELDS = ("logits", "targets", "sample_weight", "vector", "features", "weight", "bias")
TENSOR_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
REQUEST_FIELD_NUMBERS = {f.name: f.number for f in pb.EvaluateRequest.DESCRIPTOR.fields}
BATCH_FIELD_NUMBERS = {f.name: f.number for f in pb.AddBatchRequest.DESCRIPTOR.fields}


def array_from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """A trusted ``Tensor`` (a server's answer) → array viewing the message's bytes."""
    return array_from_wire(tensor.data, tensor.dtype, list(tensor.shape))


def array_to_tensor(array: Any, out: pb.Tensor | None = None) -> pb.Tensor:
    """Array (anything ``np.asarray`` takes) → ``Tensor`` of little-endian C-order bytes."""
    contiguous = wire_array(array)
    tensor = pb.Tensor() if out is None else out
    tensor.dtype = wire_name(contiguous.dtype)
    tensor.shape[:] = contiguous.shape
    tensor.data = contiguous.tobytes()
    return tensor


def integral(value: Any) -> Any:
    """Struct numbers are doubles: 2.0 → 2 so integer options (ignore_index, top_k) validate."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral(v) for v in value]
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    return value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = integral(json_format.MessageToDict(struct))
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


def length_delimited(field_number: int, length: int) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(length)


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
    features: Any = None,
    weight: Any = None,
    bias: Any = None,
) -> pb.EvaluateRequest:
    """Client side: arrays + options → ``EvaluateRequest`` message (``logits`` None for
    linear-layer losses, which take ``features``, ``weight`` and ``bias``)."""
    message = pb.EvaluateRequest(
        loss=loss, outputs=list(outputs), metrics=list(metrics), backend=backend or ""
    )
    tensors = {
        "logits": logits,
        "targets": targets,
        "sample_weight": sample_weight,
        "vector": vector,
        "features": features,
        "weight": weight,
        "bias": bias,
    }
    for name, array in tensors.items():
        if array is not None:
            array_to_tensor(array, getattr(message, name))
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
    features: Any = None,
    weight: Any = None,
    bias: Any = None,
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
            ("features", features),
            ("weight", weight),
            ("bias", bias),
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
    return [message.SerializeToString(), *_data_chunks(arrays, REQUEST_FIELD_NUMBERS)]


def stream_chunks(
    chunks: Iterable[bytes | memoryview], piece_bytes: int = 1 << 20
) -> Iterator[bytes]:
    """Serialized ``EvaluateChunk`` messages carrying ``b"".join(chunks)`` in pieces of
    ``piece_bytes`` (the last one shorter; ``EvaluateStream``); the first also carries
    ``total_bytes``. Each byte is copied once, into its message."""
    views = [memoryview(c).cast("B") for c in chunks]
    header = _varint(2 << 3) + _varint(sum(v.nbytes for v in views))  # total_bytes
    pending: list[memoryview] = []
    size = 0
    for view in views:
        while view.nbytes:
            piece, view = view[: piece_bytes - size], view[piece_bytes - size :]
            pending.append(piece)
            size += piece.nbytes
            if size == piece_bytes:
                yield b"".join((header, length_delimited(1, size), *pending))
                header, pending, size = b"", [], 0
    if pending or header:  # the rest, or an empty request's total
        yield b"".join((header, length_delimited(1, size), *pending))


def _data_chunks(
    arrays: Mapping[str, np.ndarray], numbers: Mapping[str, int]
) -> list[bytes | memoryview]:
    """Each array's bytes as a second occurrence of its ``Tensor`` field (field ``numbers``)
    holding only ``data``, which parsers merge into the first (views of the arrays, no copy)."""
    chunks: list[bytes | memoryview] = []
    for name, array in arrays.items():
        data = array.reshape(-1).view(np.uint8).data
        inner = length_delimited(TENSOR_DATA_FIELD, data.nbytes)
        chunks.append(length_delimited(numbers[name], len(inner) + data.nbytes))
        chunks.append(inner)
        chunks.append(data)
    return chunks


def response_from_proto(message: pb.EvaluateResponse) -> dict[str, Any]:
    """Client side: ``EvaluateResponse`` → the REST response dict with NumPy outputs."""
    answer: dict[str, Any] = {
        "loss": message.loss,
        "value": message.value if message.HasField("value") else None,
        "sum": message.sum,
        "denominator": message.denominator,
        "count": message.count,
        "ignored": message.ignored,
        "reduction": message.reduction,
        "normalization": message.normalization,
        "unit": message.unit,
        "outputs": {name: array_from_tensor(t) for name, t in message.outputs.items()},
        "metrics": struct_to_dict(message.metrics),
        "extras": dict(message.extras),
        "backend": message.backend,
        "compute_dtype": message.compute_dtype,
        "elapsed_ms": message.elapsed_ms,
    }
    if message.HasField("non_finite"):  # as REST: present only when some position was
        answer["non_finite"] = {
            "count": message.non_finite.count,
            "positions": [list(p.index) for p in message.non_finite.positions],
        }
    return answer


def problem_from_proto(problem: pb.Problem) -> dict[str, Any]:
    """``Problem`` message → the REST problem dict (integer indices restored in ``loc``)."""
    return {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "errors": [
            {"loc": integral(list(item.loc)), "msg": item.msg, "type": item.type}
            for item in problem.errors
        ],
    }


def create_run_to_proto(
    name: str,
    loss: str,
    *,
    options: Mapping[str, Any] | None = None,
    metrics: Iterable[str] = (),
    class_names: Iterable[str] | None = None,
    tags: Mapping[str, str] | None = None,
    confidence: Mapping[str, Any] | None = None,
    slice_keys: Iterable[str] = (),
    max_slice_values: int | None = None,
) -> pb.CreateRunRequest:
    """Client side: a run's configuration → ``CreateRunRequest``."""
    message = pb.CreateRunRequest(
        name=name,
        loss=loss,
        metrics=list(metrics),
        class_names=list(class_names or ()),
        tags=dict(tags or {}),
        slice_keys=list(slice_keys),
    )
    if options:
        dict_to_struct(options, message.options)
    if confidence is not None:
        dict_to_struct(confidence, message.confidence)
    if max_slice_values is not None:
        message.max_slice_values = max_slice_values
    return message


def batch_chunks(
    run_id: str,
    batch_id: str,
    logits: Any,
    targets: Any,
    sample_weight: Any = None,
    *,
    example_ids: Any = None,
    slices: Mapping[str, Iterable[str]] | None = None,
    **linear: Any,
) -> list[bytes | memoryview]:
    """A serialized ``AddBatchRequest`` as chunks that reference the arrays' memory (no copy),
    as :func:`request_chunks` does; ``b"".join(chunks)`` parses to :func:`batch_to_proto`'s."""
    named = {"logits": logits, "targets": targets, "sample_weight": sample_weight, **linear}
    arrays = {name: wire_array(v) for name, v in named.items() if v is not None}
    message = batch_to_proto(run_id, batch_id, None, None, example_ids=example_ids, slices=slices)
    for name, array in arrays.items():
        tensor = getattr(message, name)
        tensor.dtype = wire_name(array.dtype)
        tensor.shape[:] = array.shape
    return [message.SerializeToString(), *_data_chunks(arrays, BATCH_FIELD_NUMBERS)]


def batch_to_proto(
    run_id: str,
    batch_id: str,
    logits: Any,
    targets: Any,
    sample_weight: Any = None,
    *,
    example_ids: Any = None,
    slices: Mapping[str, Iterable[str]] | None = None,
    **linear: Any,
) -> pb.AddBatchRequest:
    """Client side: one batch's arrays → ``AddBatchRequest``; ``linear``: ``features``,
    ``weight``, ``bias`` of a linear_cross_entropy run (``logits`` None); ``example_ids``
    all strings or all integers."""
    message = pb.AddBatchRequest(run_id=run_id, batch_id=batch_id)
    named = {"logits": logits, "targets": targets, "sample_weight": sample_weight, **linear}
    for name, value in named.items():
        if value is not None:
            array_to_tensor(value, getattr(message, name))
    if example_ids is not None:
        ids = example_ids.tolist() if hasattr(example_ids, "tolist") else list(example_ids)
        if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            message.example_int_ids[:] = ids
        else:
            message.example_ids[:] = [str(i) for i in ids]
    for key, values in (slices or {}).items():
        message.slices[key].values[:] = [str(v) for v in values]
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
        "num_classes": message.num_classes if message.HasField("num_classes") else None,
        "metrics": struct_to_dict(message.metrics),
        "details": list(message.details),
        **{
            name: struct_to_dict(getattr(message, name)) if message.HasField(name) else None
            for name in ("confidence", "intervals")
        },
        "no_interval": list(message.no_interval),
        "paired_ids": message.paired_ids if message.HasField("paired_ids") else None,
        **{
            name: struct_to_dict(getattr(message, name)) if message.HasField(name) else None
            for name in ("fingerprint", "gate")
        },
        "slice_keys": list(message.slice_keys),
    }


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


def batches_summary_from_proto(message: pb.AddBatchesResponse) -> dict[str, Any]:
    return {
        "run_id": message.run_id,
        "batches": message.batches,
        "accepted": message.accepted,
        "duplicates": message.duplicates,
        "run": run_from_proto(message.run),
    }


def runs_page_from_proto(message: pb.ListRunsResponse) -> dict[str, Any]:
    return {
        "runs": [run_from_proto(run) for run in message.runs],
        "next_cursor": message.next_cursor or None,
    }
