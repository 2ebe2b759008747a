"""Open Inference Protocol v2 (KServe / Triton) codec: infer requests ↔ the data plane.

Request: ``{"inputs": [{name, shape, datatype, data | parameters.binary_data_size}],
"outputs"?: [{name, parameters?: {binary_data}}], "parameters"?: {...}}``, optionally followed by
the binary tensor data extension (the JSON header is the first
``Inference-Header-Content-Length`` bytes, then each binary input's bytes, in input order).

Inputs are named as the REST fields: ``logits``, ``targets``, optional ``sample_weight`` and
``vector`` (linear-layer losses: ``features``, ``weight``, ``bias`` instead of ``logits``).
Request ``parameters`` are the loss options, except ``backend``, ``metrics`` (a list or a
comma-separated string), ``binary_data_output``, and Triton's reserved scheduling keys
(ignored). Outputs: ``loss`` (FP64 [1], the reduced value; NaN for reduction ``none``) and the
loss's array outputs (``per_sample``, ``grad``, …); ``["loss"]`` when none are named. Response
``parameters`` carry ``value``, ``sum``, ``denominator``, ``count``, ``ignored``, ``reduction``,
``normalization``, ``unit``, ``backend``, ``compute_dtype`` and ``elapsed_ms``. Requested metrics
come back as the output ``metrics``: BYTES, shape [1], its one element the metrics' JSON text
(binary: Triton's BYTES layout, a 4-byte little-endian length then the bytes). Under
``nan_policy`` propagate / omit, ``non_finite`` (same form) lists the non-finite positions, as
REST's ``non_finite``. Naming either in ``outputs`` only sets its ``binary_data`` flag.

System shared memory (Triton's extension; regions registered under ``/v2/systemsharedmemory``,
:mod:`service.shared_memory`): an input whose ``parameters`` hold ``shared_memory_region``,
``shared_memory_byte_size`` (exactly its shape's bytes) and optionally ``shared_memory_offset``
is read from that region instead of ``data``; an output with them is written there, and the
answer lists it by name, datatype and shape only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ce_engine.errors import clip, quoted
from ce_engine.metrics import supported_metrics
from ce_eval_client.wire import DATATYPES, datatype_of
from service.codecs.tensors import check_shape, from_bytes, shared_array
from service.config import Settings
from service.dataplane.evaluate import parse_evaluate_request
from service.errors import MalformedBody, ValidationFailed
from service.schemas import EvaluateRequest
from service.shared_memory import (
    MappedTensor,
    RegionAccess,
    TensorRef,
    check_region_name,
    non_negative_int,
)

HEADER_LENGTH = "inference-header-content-length"
#: The BYTES outputs holding JSON text: the metrics, and (nan_policy propagate / omit) which
#: positions were not finite.
METRICS_OUTPUT = "metrics"
NON_FINITE_OUTPUT = "non_finite"
JSON_OUTPUTS = (METRICS_OUTPUT, NON_FINITE_OUTPUT)

_WIRE_NAMES = {
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
    "BOOL": "bool",
}
INPUT_NAMES = ("logits", "targets", "sample_weight", "vector", "features", "weight", "bias")
#: Request parameters that are not loss options.
RESERVED_PARAMETERS = frozenset({"backend", "metrics", "binary_data_output"})
#: Triton scheduling parameters: meaningless for a stateless loss, accepted and ignored.
IGNORED_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"}
)


def _invalid(loc: Sequence[str | int], msg: str, type_: str = "value_error") -> ValidationFailed:
    return ValidationFailed(
        f"{'.'.join(map(str, loc))}: {msg}", [{"loc": list(loc), "msg": msg, "type": type_}]
    )


@dataclass
class InferRequest:
    """A decoded infer request: the data-plane request plus how to answer it."""

    request: EvaluateRequest
    request_id: str | None
    outputs: list[str]
    binary_outputs: set[str] = field(default_factory=set)
    #: Outputs to write into shared memory (Triton's ``shared_memory_region`` parameters).
    shared_outputs: dict[str, TensorRef] = field(default_factory=dict)
    regions: RegionAccess | None = None


def split_body(body: bytes | memoryview, header_length: str | None) -> tuple[Any, memoryview]:
    """Body → (JSON header object, binary tail); 400 when either part is malformed."""
    if header_length is None:
        size = len(body)
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise MalformedBody(
                f"Inference-Header-Content-Length {header_length!r} is not a length within "
                f"the {len(body)}-byte body",
                [{"loc": ["header", HEADER_LENGTH], "msg": "bad length", "type": "header"}],
            )
    view = memoryview(body)
    try:
        header = orjson.loads(view[:size])
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(
            f"malformed JSON: {exc}",
            [{"loc": ["body", exc.pos], "msg": exc.msg, "type": "json_invalid"}],
        ) from None
    if not isinstance(header, dict):
        raise MalformedBody("the inference request must be a JSON object")
    return header, view[size:]


SHM_REGION = "shared_memory_region"


def shared_memory_ref(parameters: Any, loc: tuple[str | int, ...]) -> TensorRef | None:
    """Triton's ``{shared_memory_region, shared_memory_byte_size, shared_memory_offset?}``
    tensor parameters → :class:`TensorRef` (None without a region; 422 naming the bad one)."""
    if not isinstance(parameters, dict) or SHM_REGION not in parameters:
        return None
    region = check_region_name(parameters[SHM_REGION], (*loc, SHM_REGION))
    size_loc = (*loc, "shared_memory_byte_size")
    if "shared_memory_byte_size" not in parameters:
        raise _invalid(size_loc, "required with shared_memory_region", "missing")
    byte_size = non_negative_int(parameters["shared_memory_byte_size"], size_loc)
    offset_loc = (*loc, "shared_memory_offset")
    offset = non_negative_int(parameters.get("shared_memory_offset", 0), offset_loc)
    return TensorRef(region, offset, byte_size, loc)


def _decode_shared_input(
    item: dict[str, Any],
    ref: TensorRef,
    loc: tuple[str | int, ...],
    regions: RegionAccess | None,
    max_elements: int,
    mappable: bool,
) -> np.ndarray | MappedTensor:
    """An input held in shared memory: its declared byte size must be its shape's, exactly
    (``mappable``: see :func:`~service.codecs.tensors.shared_array`)."""
    also = "data" if "data" in item else "binary_data_size"
    if also in item or also in item["parameters"]:
        raise _invalid(
            (*loc, also),
            f"an input sets one of 'data', 'binary_data_size', '{SHM_REGION}'; this one also "
            f"sets {also!r}",
            "conflict",
        )
    if regions is None:
        raise _invalid(ref.loc, "shared memory tensors are not served on this endpoint")
    wire = _WIRE_NAMES.get(item["datatype"], item["datatype"].lower())
    return shared_array(regions, ref, wire, item["shape"], loc, max_elements, mappable)


def _decode_input(
    item: Any,
    index: int,
    binary: memoryview,
    offset: int,
    max_elements: int,
    regions: RegionAccess | None = None,
) -> tuple[str, np.ndarray | MappedTensor, int]:
    loc: tuple[str | int, ...] = ("inputs", index)
    if not isinstance(item, dict):
        raise _invalid(loc, "an input must be an object {name, shape, datatype, data}")
    name = item.get("name")
    if not isinstance(name, str) or name not in INPUT_NAMES:
        raise _invalid(
            (*loc, "name"), f"unknown input {quoted(name)}; expected {INPUT_NAMES}", "name"
        )
    datatype = item.get("datatype")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None or not isinstance(datatype, str):
        raise _invalid(
            (*loc, "datatype"),
            f"unsupported datatype {quoted(datatype)}; expected one of {', '.join(DATATYPES)}",
            "dtype",
        )
    shape = item.get("shape")
    if not isinstance(shape, list):
        raise _invalid((*loc, "shape"), "shape must be a list of dimensions")
    parameters = item.get("parameters") or {}
    ref = shared_memory_ref(parameters, (*loc, "parameters"))
    if ref is not None:
        array = _decode_shared_input(item, ref, loc, regions, max_elements, name == "logits")
        return name, array, offset
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _invalid((*loc, "parameters", "binary_data_size"), "must be an integer >= 0")
        if offset + size > len(binary):
            raise _invalid(
                (*loc, "parameters", "binary_data_size"),
                f"{size} bytes declared but only {len(binary) - offset} remain in the body",
                "byte_length",
            )
        wire = _WIRE_NAMES.get(datatype, datatype.lower())
        array = from_bytes(binary[offset : offset + size], wire, shape, loc, max_elements)
        return name, array, offset + size
    count = check_shape(shape, loc, max_elements)
    data = item.get("data")
    if not isinstance(data, list):
        raise _invalid((*loc, "data"), "data must be a list (or use binary_data_size)")
    array = json_data_array(data, datatype, dtype, (*loc, "data")).reshape(-1)
    if array.size != count:
        raise _invalid(
            (*loc, "data"), f"{array.size} values do not match shape {shape}", "shape_mismatch"
        )
    return name, array.reshape(shape), offset


def _first_bad(flat: Sequence[Any], integer: bool, lo: int, hi: int) -> tuple[int, str]:
    """(index, why) of the first element that is not a number of the datatype (error path)."""
    for k, v in enumerate(flat):
        if isinstance(v, bool) or not isinstance(v, int | float):
            return k, f"{clip(repr(v), 40)} is not a number"
        if integer and isinstance(v, float) and v.is_integer() and not lo <= v <= hi:
            return k, f"{v:.17g} is out of range [{lo}, {hi}]"  # JSON ints past 64 bits
        if integer and not isinstance(v, int):
            return k, f"{v!r} is not an integer"
        if integer and not lo <= v <= hi:
            return k, f"{v} is out of range [{lo}, {hi}]"
    return 0, "mixed values do not fit one array"


def _leaves(data: Any) -> Iterator[Any]:
    """The scalars of nested lists, in order (iterative: no recursion limit)."""
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def json_data_array(
    data: list[Any], datatype: str, dtype: np.dtype[Any], loc: Sequence[str | int]
) -> np.ndarray:
    """OIP JSON ``data`` (nested lists) → array of ``dtype``; 422 naming ``loc`` for values that
    are not of the datatype: non-numbers, floats for integer types, integers outside
    [iinfo.min, iinfo.max], numbers that overflow a float type, non-booleans for BOOL."""
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        msg = " ".join(str(exc).splitlines())[:200]
        raise _invalid(loc, f"not an array of {datatype}: {msg}", "dtype") from None
    if raw.size == 0:
        return raw.astype(dtype)
    kind, target = raw.dtype.kind, np.dtype(dtype).kind
    if target == "b":
        if kind != "b":
            raise _invalid(loc, f"{datatype} values must be true or false", "dtype")
        return raw
    integer = target in "iu"
    lo, hi = (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)) if integer else (0, 0)
    if kind not in "iuf" or (integer and kind == "f"):
        index, why = _first_bad(list(_leaves(data)), integer, lo, hi)
        raise _invalid(loc, f"element {index}: {why} ({datatype})", "dtype")
    if integer:
        low, high = int(raw.min()), int(raw.max())
        if low < lo or high > hi:
            bad = low if low < lo else high
            raise _invalid(loc, f"{bad} is out of range [{lo}, {hi}] ({datatype})", "dtype")
        return raw.astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        array = raw.astype(dtype)
    finite = np.isfinite(array)
    if not finite.all():
        index = int(np.argmin(finite.ravel()))
        value = raw.ravel()[index]
        raise _invalid(loc, f"element {index}: {value} is out of range for {datatype}", "dtype")
    return array


def parse_infer_request(
    loss: str,
    body: bytes | memoryview,
    header_length: str | None,
    settings: Settings,
    regions: RegionAccess | None = None,
) -> InferRequest:
    """Infer request bytes → :class:`InferRequest` (400 malformed, 413 too large, 422 invalid).

    Inputs with ``shared_memory_region`` parameters are read from ``regions`` (the caller's
    registered regions); outputs with them are checked to name a region now and written there
    by :func:`encode_infer_response`."""
    header, binary = split_body(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise _invalid(("inputs",), "inputs must be a list of tensors", "missing")
    payload: dict[str, Any] = {"loss": loss, "logits": None, "targets": None}
    offset = 0
    for index, item in enumerate(inputs):
        name, array, offset = _decode_input(
            item, index, binary, offset, settings.max_elements, regions
        )
        payload[name] = array
    if offset != len(binary):
        raise _invalid(
            ("body",),
            f"{len(binary) - offset} bytes of binary data are not claimed by any input",
            "byte_length",
        )
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _invalid(("parameters",), "parameters must be an object")
    payload["options"] = {
        k: v
        for k, v in parameters.items()
        if k not in RESERVED_PARAMETERS and k not in IGNORED_PARAMETERS
    }
    metrics = parameters.get("metrics")
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if metrics is not None:
        payload["metrics"] = metrics
    if "backend" in parameters:
        payload["backend"] = parameters["backend"]
    all_binary = parameters.get("binary_data_output") is True
    outputs: list[str] = []
    binary_outputs: set[str] = set()
    shared_outputs: dict[str, TensorRef] = {}
    requested = header.get("outputs") or []
    if not isinstance(requested, list):
        raise _invalid(("outputs",), "outputs must be a list of {name, parameters?}")
    for index, item in enumerate(requested):
        out_name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(out_name, str):
            raise _invalid(("outputs", index, "name"), "an output needs a name")
        out_params = item.get("parameters") or {}
        binary_flag = out_params.get("binary_data") if isinstance(out_params, dict) else None
        ref = shared_memory_ref(out_params, ("outputs", index, "parameters"))
        if ref is not None:
            if binary_flag is True:
                raise _invalid(
                    ("outputs", index, "parameters", "binary_data"),
                    f"an output sets '{SHM_REGION}' or 'binary_data', not both",
                    "conflict",
                )
            if regions is None:
                raise _invalid(ref.loc, "shared memory tensors are not served on this endpoint")
            regions.locate(ref)  # 404 / 422 now, before the evaluation
            shared_outputs[out_name] = ref
        elif binary_flag is True or (binary_flag is None and all_binary):
            binary_outputs.add(out_name)
        if out_name not in JSON_OUTPUTS:
            outputs.append(out_name)
    if not requested and all_binary:
        binary_outputs.update(JSON_OUTPUTS)
    if not outputs:
        outputs = ["loss"]
        if all_binary:
            binary_outputs.add("loss")
    payload["outputs"] = outputs
    request_id = header.get("id")
    return InferRequest(
        request=parse_evaluate_request(payload, settings),
        request_id=str(request_id) if request_id is not None else None,
        outputs=outputs,
        binary_outputs=binary_outputs,
        shared_outputs=shared_outputs,
        regions=regions,
    )


def bytes_tensor_blob(elements: Sequence[bytes]) -> bytes:
    """BYTES elements → Triton's binary layout: per element ``<u4`` length, then its bytes."""
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def _output_arrays(result: Mapping[str, Any], names: list[str]) -> list[tuple[str, np.ndarray]]:
    arrays = []
    for name in names:
        if name == "loss":
            value = result["value"]
            arrays.append((name, np.array([math.nan if value is None else value], np.float64)))
        else:
            arrays.append((name, np.ascontiguousarray(result["outputs"][name])))
    return arrays


def _write_shared(infer: InferRequest, name: str, data: memoryview) -> None:
    """An output's bytes into its region, as Triton: nothing of it in the answer but its
    name, datatype and shape."""
    assert infer.regions is not None  # set whenever shared_outputs is
    infer.regions.write(infer.shared_outputs[name], data)


def encode_infer_response(
    loss: str, infer: InferRequest, result: Mapping[str, Any]
) -> tuple[bytes, int | None]:
    """Data-plane result → (body, JSON header length or None when the body is all JSON)."""
    parameters: dict[str, Any] = {
        key: result[key]
        for key in (
            "sum",
            "denominator",
            "count",
            "ignored",
            "reduction",
            "normalization",
            "unit",
            "backend",
            "compute_dtype",
            "elapsed_ms",
        )
    }
    if result["value"] is not None:
        parameters["value"] = result["value"]
    response: dict[str, Any] = {"model_name": loss, "model_version": "1"}
    if infer.request_id is not None:
        response["id"] = infer.request_id
    response["parameters"] = parameters
    outputs = []
    blobs: list[bytes] = []
    for name, array in _output_arrays(result, infer.outputs):
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if name in infer.shared_outputs:
            _write_shared(infer, name, array.reshape(-1).view(np.uint8).data)
        elif name in infer.binary_outputs:
            blob = array.tobytes()  # C order, native = little-endian on supported hosts
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1)
        outputs.append(entry)
    for name in JSON_OUTPUTS:
        if not result.get(name):
            continue
        text = orjson.dumps(result[name], option=orjson.OPT_SERIALIZE_NUMPY)
        entry = {"name": name, "datatype": "BYTES", "shape": [1]}
        if name in infer.shared_outputs:
            _write_shared(infer, name, memoryview(bytes_tensor_blob([text])))
        elif name in infer.binary_outputs:
            blob = bytes_tensor_blob([text])
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [text.decode()]
        outputs.append(entry)
    response["outputs"] = outputs
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


#: Output shapes for 2-D logits (N, C); outputs not listed have the logits' shape.
_OUTPUT_SHAPES = {"per_sample": [-1], "hessian": [-1, -1, -1]}


def model_metadata(loss: str, outputs: Iterable[str]) -> dict[str, Any]:
    """``GET /v2/models/{loss}``: inputs as the REST fields (``features``, ``weight``, ``bias``
    for linear-layer losses), the outputs the loss supports, then the JSON BYTES outputs
    ``metrics`` and ``non_finite``; ``parameters.metrics`` names the metrics it offers."""
    linear = loss == "linear_cross_entropy"
    inputs: list[dict[str, Any]] = (
        [
            {"name": "features", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "targets", "datatype": "INT64", "shape": [-1]},
            {"name": "weight", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "bias", "datatype": "FP32", "shape": [-1], "optional": True},
        ]
        if linear
        else [
            {"name": "logits", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "targets", "datatype": "INT64", "shape": [-1]},
        ]
    )
    inputs.append({"name": "sample_weight", "datatype": "FP32", "shape": [-1], "optional": True})
    if not linear:
        inputs.append({"name": "vector", "datatype": "FP32", "shape": [-1, -1], "optional": True})
    return {
        "name": loss,
        "versions": ["1"],
        "platform": "ce-eval",
        "inputs": inputs,
        "outputs": [{"name": "loss", "datatype": "FP64", "shape": [1]}]
        + [
            {"name": name, "datatype": "FP32", "shape": _OUTPUT_SHAPES.get(name, [-1, -1])}
            for name in sorted(outputs)
            if name != "loss"
        ]
        + [{"name": name, "datatype": "BYTES", "shape": [1]} for name in JSON_OUTPUTS],
        "parameters": {"metrics": list(supported_metrics(loss))},
    }
