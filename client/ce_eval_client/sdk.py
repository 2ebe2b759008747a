"""Python SDK: NumPy arrays in, NumPy arrays out, over REST (sync/async, httpx) or gRPC.

>>> with Client("http://127.0.0.1:8000") as client:
...     result = client.evaluate("cross_entropy", logits, targets, outputs=["loss", "grad"])
...     result.value, result.outputs["grad"]

REST transports (``transport=``): ``protobuf`` (default: ``application/x-protobuf`` both ways),
``base64`` (JSON with base64 tensors), ``json`` (JSON nested lists: slow for large tensors, and
outputs come back as float64/int64 arrays since lists carry no dtype) and
``oip`` (Open Inference Protocol v2 with the binary tensor extension). :class:`GrpcClient` speaks
``ce_eval.v1.LossEvaluation``, runs included (the run dicts are those of the REST API):

>>> with GrpcClient("127.0.0.1:50051", api_key="...") as client:
...     run = client.create_run("val", "cross_entropy", metrics=["accuracy"])
...     client.add_batches(run["id"], [{"batch_id": "0", "logits": z0, "targets": y0}])
...     client.get_run(run["id"])["value"]

:class:`Client` and :class:`AsyncClient` offer the same runs calls over REST (``create_run``,
``add_batch``, ``get_run``, ``list_runs``, ``close_run``, ``delete_run``, ``run_metric``,
``run_slices``, ``compare``, and ``gate``: a run against a baseline run on non-inferiority
checks), with
run ids sent as one percent-encoded path segment:

>>> with Client("http://127.0.0.1:8000") as client:
...     run = client.create_run("val", "cross_entropy", metrics=["accuracy", "confusion_matrix"])
...     client.add_batch(run["id"], "b0", z0, y0)
...     client.run_metric(run["id"], "confusion_matrix", top=20)["top"]

Every failure the service reports raises :class:`EvaluationError`
carrying the RFC 9457 problem (``status``, ``detail``, ``errors``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import orjson
from google.rpc import status_pb2

from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.proto import (
    PROTOBUF_MEDIA_TYPE,
    batch_answer_from_proto,
    batch_chunks,
    batch_to_proto,
    batches_summary_from_proto,
    create_run_to_proto,
    dict_to_struct,
    problem_from_proto,
    request_chunks,
    response_from_proto,
    run_from_proto,
    runs_page_from_proto,
    stream_chunks,
    struct_to_dict,
)
from ce_eval_client.shm import Layout, SharedArrays, SharedRegion, plan
from ce_eval_client.wire import (
    DATATYPES,
    datatype_of,
    decode_json_tensor,
    encode_tensor,
    wire_array,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossEvaluation"].full_name
#: gRPC requests over this many bytes go as ``EvaluateStream`` pieces of ``PIECE_BYTES``:
#: grpc moves 65 MB in 1 MiB messages about 4x faster than in one message.
STREAM_BYTES = 4 * 1024 * 1024
PIECE_BYTES = 1 << 20

Transport = Literal["protobuf", "base64", "json", "oip"]
TRANSPORTS: tuple[Transport, ...] = ("protobuf", "base64", "json", "oip")


class EvaluationError(Exception):
    """The service answered an error: ``status`` (HTTP status or gRPC code name), ``problem``,
    and ``retry_after`` (seconds, from a 429/503's ``Retry-After``; None when absent)."""

    def __init__(
        self, status: int | str, problem: Mapping[str, Any], retry_after: float | None = None
    ) -> None:
        self.status = status
        self.problem = dict(problem)
        self.detail: str = str(self.problem.get("detail", ""))
        self.errors: list[dict[str, Any]] = list(self.problem.get("errors") or [])
        self.retry_after = retry_after
        super().__init__(f"[{status}] {self.detail}")


@dataclass
class Evaluation:
    """One evaluation's answer (the REST response, with NumPy ``outputs``)."""

    loss: str
    value: float | None
    sum: float
    denominator: float
    count: int
    ignored: int
    reduction: str
    normalization: str
    unit: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)
    backend: str = ""
    compute_dtype: str = ""
    elapsed_ms: float = 0.0
    #: ``{"count", "positions"}`` under nan_policy propagate / omit when some position was
    #: not finite; None otherwise.
    non_finite: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> Evaluation:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in body.items() if k in names})


@dataclass
class _Call:
    """Everything ``evaluate`` takes, transport-neutral."""

    loss: str
    logits: Any
    targets: Any
    options: Mapping[str, Any] | None = None
    outputs: Iterable[str] = ("loss",)
    metrics: Iterable[str] = ()
    sample_weight: Any = None
    vector: Any = None
    backend: str | None = None
    features: Any = None
    weight: Any = None
    bias: Any = None

    def tensors(self) -> dict[str, np.ndarray]:
        named = {
            "logits": self.logits,
            "targets": self.targets,
            "sample_weight": self.sample_weight,
            "vector": self.vector,
            "features": self.features,
            "weight": self.weight,
            "bias": self.bias,
        }
        return {k: wire_array(v) for k, v in named.items() if v is not None}


Chunks = list[bytes | memoryview]

#: Largest piece of a request body handed to httpx. httpcore's sync writer re-slices the
#: unsent rest of a buffer after every partial ``send`` (a copy each time), so a 65 MB piece
#: costs about 0.8 GB of copying; 1 MiB pieces are each sent and copied about once.
SEND_PIECE_BYTES = 1 << 20


def _encode_rest(call: _Call, transport: Transport) -> tuple[str, Chunks, dict[str, str]]:
    """→ (path, body pieces of at most ``SEND_PIECE_BYTES``, headers) for ``POST``."""
    path, chunks, headers = _rest_body(call, transport)
    return path, _pieces(chunks), headers


def _pieces(chunks: Chunks, size: int = SEND_PIECE_BYTES) -> Chunks:
    """The same bytes as views of at most ``size`` bytes each (no copy)."""
    pieces: Chunks = []
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        pieces.extend(view[start : start + size] for start in range(0, view.nbytes, size))
    return pieces


def _rest_body(call: _Call, transport: Transport) -> tuple[str, Chunks, dict[str, str]]:
    """→ (path, body chunks, headers) for ``POST``; binary bodies reference the arrays."""
    if transport == "protobuf":
        chunks = request_chunks(
            call.loss,
            call.logits,
            call.targets,
            options=call.options,
            outputs=call.outputs,
            metrics=call.metrics,
            sample_weight=call.sample_weight,
            vector=call.vector,
            backend=call.backend,
            features=call.features,
            weight=call.weight,
            bias=call.bias,
        )
        headers = {"content-type": PROTOBUF_MEDIA_TYPE, "accept": PROTOBUF_MEDIA_TYPE}
        return "/v1/evaluate", chunks, _with_length(headers, chunks)
    if transport == "oip":
        return _encode_oip(call)
    encoding = "base64" if transport == "base64" else "list"
    body: dict[str, Any] = {
        "loss": call.loss,
        "options": dict(call.options or {}),
        "outputs": list(call.outputs),
        "metrics": list(call.metrics),
        "tensor_encoding": encoding,
        **{k: encode_tensor(v, encoding) for k, v in call.tensors().items()},
    }
    if call.backend:
        body["backend"] = call.backend
    payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return "/v1/evaluate", [payload], _with_length({"content-type": "application/json"}, [payload])


def _with_length(headers: dict[str, str], chunks: Chunks) -> dict[str, str]:
    return {**headers, "content-length": str(sum(memoryview(c).nbytes for c in chunks))}


def _encode_oip(call: _Call) -> tuple[str, Chunks, dict[str, str]]:
    inputs = []
    blobs: Chunks = []
    for name, array in call.tensors().items():
        blob = array.reshape(-1).view(np.uint8).data
        inputs.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype_of(array.dtype),
                "parameters": {"binary_data_size": blob.nbytes},
            }
        )
        blobs.append(blob)
    parameters: dict[str, Any] = dict(call.options or {})
    if call.metrics:
        parameters["metrics"] = list(call.metrics)
    if call.backend:
        parameters["backend"] = call.backend
    header = orjson.dumps(
        {
            "inputs": inputs,
            "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in call.outputs],
            "parameters": parameters,
        }
    )
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
    chunks: Chunks = [header, *blobs]
    return f"/v2/models/{call.loss}/infer", chunks, _with_length(headers, chunks)


def _encode_oip_shared(
    call: _Call, region: SharedRegion, arrays: SharedArrays
) -> tuple[str, bytes, Layout]:
    """OIP infer JSON naming ``region`` for the inputs and the logits-shaped outputs (written
    there first; logits that lie in one of ``arrays`` are named where they are, not copied);
    other outputs are asked for as binary data."""
    tensors = call.tensors()
    inputs = []
    logits = tensors.get("logits")
    in_place = arrays.locate(logits)
    if in_place is not None:
        assert logits is not None
        del tensors["logits"]
        inputs.append(_shared_input("logits", logits, *in_place, logits.nbytes))
    layout = plan(tensors, list(call.outputs), logits)
    region.ensure(layout.size)
    for name, array in tensors.items():
        offset, size = layout.inputs[name]
        region.write(offset, array)
        inputs.append(_shared_input(name, array, region.name, offset, size))
    outputs = []
    for name in call.outputs:
        if name in layout.outputs:
            offset, size = layout.outputs[name]
            outputs.append(
                {"name": name, "parameters": _shared_parameters(region.name, offset, size)}
            )
        else:
            outputs.append({"name": name, "parameters": {"binary_data": True}})
    parameters: dict[str, Any] = dict(call.options or {})
    if call.metrics:
        parameters["metrics"] = list(call.metrics)
    if call.backend:
        parameters["backend"] = call.backend
    body = orjson.dumps({"inputs": inputs, "outputs": outputs, "parameters": parameters})
    return f"/v2/models/{call.loss}/infer", body, layout


def _shared_input(
    name: str, array: np.ndarray, region: str, offset: int, size: int
) -> dict[str, Any]:
    """An OIP input naming ``size`` bytes at ``offset`` of ``region``."""
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype_of(array.dtype),
        "parameters": _shared_parameters(region, offset, size),
    }


def _shared_parameters(region: str, offset: int, size: int) -> dict[str, Any]:
    return {
        "shared_memory_region": region,
        "shared_memory_offset": offset,
        "shared_memory_byte_size": size,
    }


async def _async_chunks(chunks: Chunks) -> AsyncIterator[Any]:
    """httpx's async content: the chunks as they are (it writes any buffer)."""
    for chunk in chunks:
        yield chunk


def _raise_for_problem(response: httpx.Response) -> None:
    """An error answer → :class:`EvaluationError` with its problem (or the text, when not JSON)."""
    if response.status_code < 400:
        return
    try:
        problem = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"detail": response.text[:500] or response.reason_phrase}
    try:
        retry_after: float | None = float(response.headers.get("retry-after", ""))
    except ValueError:
        retry_after = None
    raise EvaluationError(response.status_code, problem, retry_after)


def _decode_rest(response: httpx.Response, transport: Transport) -> Evaluation:
    _raise_for_problem(response)
    if transport == "protobuf":
        message = pb.EvaluateResponse.FromString(response.content)
        return Evaluation.from_dict(response_from_proto(message))
    if transport == "oip":
        return _decode_oip(response)
    body = orjson.loads(response.content)
    body["outputs"] = {
        name: decode_json_tensor(value) for name, value in body.get("outputs", {}).items()
    }
    return Evaluation.from_dict(body)


def _decode_oip(
    response: httpx.Response, shared: tuple[SharedRegion, Layout] | None = None
) -> Evaluation:
    content = response.content
    length = response.headers.get("inference-header-content-length")
    size = int(length) if length is not None else len(content)
    header = orjson.loads(content[:size])
    offset = size
    outputs: dict[str, np.ndarray] = {}
    json_outputs: dict[str, Any] = {"metrics": {}}
    for item in header["outputs"]:
        nbytes = (item.get("parameters") or {}).get("binary_data_size")
        if item["datatype"] == "BYTES":  # metrics / non_finite: one element, JSON text
            if nbytes is None:  # binary: <u4 length, then the bytes
                json_outputs[item["name"]] = orjson.loads(item["data"][0])
            else:
                json_outputs[item["name"]] = orjson.loads(content[offset + 4 : offset + nbytes])
                offset += nbytes
            continue
        dtype = DATATYPES[item["datatype"]]
        if shared is not None and item["name"] in shared[1].outputs:
            region, layout = shared
            array = region.read(layout.outputs[item["name"]][0], dtype, item["shape"])
        elif nbytes is None:
            array = np.asarray(item["data"], dtype=dtype).reshape(item["shape"])
        else:
            raw = content[offset : offset + nbytes]
            array = np.frombuffer(raw, dtype=dtype).reshape(item["shape"])
            offset += nbytes
        if item["name"] != "loss":  # the reduced value also comes as parameters.value
            outputs[item["name"]] = array
    params = dict(header.get("parameters", {}))
    params.update(json_outputs)
    return Evaluation.from_dict(
        {**params, "loss": header["model_name"], "value": params.get("value"), "outputs": outputs}
    )


def run_path(run_id: str, *rest: str) -> str:
    """``/v1/runs/<run_id>[/rest…]`` with the id as one percent-encoded segment: ``/``, ``?``,
    ``#``, ``%`` and dots are escaped, so no id can reach another path (``../../v1/evaluate``)."""
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    segment = quote(run_id, safe="").replace(".", "%2E")
    return "/".join(("/v1/runs", segment, *rest))


@dataclass(frozen=True)
class _JsonCall:
    """One runs API call: method, path, JSON body, query."""

    method: str
    path: str
    body: Any = None
    params: Mapping[str, Any] | None = None


def _create_run_call(
    name: str,
    loss: str,
    options: Mapping[str, Any] | None,
    metrics: Iterable[str],
    class_names: Iterable[str] | None,
    tags: Mapping[str, str] | None,
    decision: RunDecision | None = None,
) -> _JsonCall:
    body: dict[str, Any] = {
        "name": name,
        "loss": loss,
        "options": dict(options or {}),
        "metrics": list(metrics),
        "tags": dict(tags or {}),
    }
    if class_names is not None:
        body["class_names"] = list(class_names)
    if decision is not None:
        body.update(decision.body())
    return _JsonCall("POST", "/v1/runs", body)


@dataclass(frozen=True)
class RunDecision:
    """What a run keeps to decide with (``create_run`` keywords): ``confidence`` =
    ``{replicates, level, seed}`` for bootstrap intervals, ``slice_keys`` and
    ``max_slice_values`` for slices."""

    confidence: Mapping[str, Any] | None = None
    slice_keys: Iterable[str] = ()
    max_slice_values: int | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.confidence is not None:
            out["confidence"] = dict(self.confidence)
        if self.slice_keys:
            out["slice_keys"] = list(self.slice_keys)
        if self.max_slice_values is not None:
            out["max_slice_values"] = self.max_slice_values
        return out


def _labels(example_ids: Any, slices: Mapping[str, Iterable[str]] | None) -> dict[str, Any]:
    """A batch's ``example_ids`` (strings or integers) and ``slices`` as JSON fields."""
    out: dict[str, Any] = {}
    if example_ids is not None:
        ids = example_ids.tolist() if isinstance(example_ids, np.ndarray) else list(example_ids)
        out["example_ids"] = ids
    if slices is not None:
        out["slices"] = {k: [str(v) for v in values] for k, values in slices.items()}
    return out


def _add_batch_call(
    run_id: str,
    batch_id: str,
    logits: Any,
    targets: Any,
    sample_weight: Any,
    labels: Mapping[str, Any] | None = None,
    **linear: Any,
) -> _JsonCall:
    named = {"logits": logits, "targets": targets, "sample_weight": sample_weight, **linear}
    body: dict[str, Any] = {"batch_id": batch_id}
    body.update(
        {k: encode_tensor(wire_array(v), "base64") for k, v in named.items() if v is not None}
    )
    body.update(labels or {})
    return _JsonCall("POST", run_path(run_id, "batches"), body)


def _batch_body(
    run_id: str,
    batch_id: str,
    logits: Any,
    targets: Any,
    sample_weight: Any,
    example_ids: Any,
    slices: Mapping[str, Iterable[str]] | None,
    **linear: Any,
) -> tuple[str, Chunks, dict[str, str]]:
    """→ (path, body pieces, headers) of ``POST /v1/runs/{id}/batches`` in protobuf."""
    chunks = batch_chunks(
        run_id, batch_id, logits, targets, sample_weight,
        example_ids=example_ids, slices=slices, **linear,
    )  # fmt: skip
    headers = _with_length({"content-type": PROTOBUF_MEDIA_TYPE}, chunks)
    return run_path(run_id, "batches"), _pieces(chunks), headers


def _slices_call(run_id: str, key: str, query: Mapping[str, Any]) -> _JsonCall:
    params = {"key": key, **{k: v for k, v in query.items() if v is not None}}
    return _JsonCall("GET", run_path(run_id, "slices"), params=params)


def _compare_call(
    run_ids: Iterable[str], baseline: str | None, slice_key: str | None = None
) -> _JsonCall:
    named = {"baseline": baseline, "slice_key": slice_key}
    params = {"ids": ",".join(run_ids), **{k: v for k, v in named.items() if v}}
    return _JsonCall("GET", "/v1/runs/compare", params=params)


def _list_runs_call(
    name: str | None, tags: Iterable[str], status: str | None, limit: int, cursor: str | None
) -> _JsonCall:
    params: dict[str, Any] = {"limit": limit, "tag": list(tags)}
    params.update(
        {k: v for k, v in {"name": name, "status": status, "cursor": cursor}.items() if v}
    )
    return _JsonCall("GET", "/v1/runs", params=params)


def _gate_call(
    run_id: str, baseline: str, checks: Iterable[Mapping[str, Any]], allow_inconclusive: bool
) -> _JsonCall:
    body = {
        "baseline": baseline,
        "checks": [dict(check) for check in checks],
        "allow_inconclusive": allow_inconclusive,
    }
    return _JsonCall("POST", run_path(run_id, "gate"), body)


def _metric_query(query: Mapping[str, Any]) -> dict[str, str]:
    """``run_metric`` keywords → query strings: booleans as ``true``/``false``, sequences of
    class ids joined by commas (``classes=[3, 17]`` → ``3,17``); None is left out."""
    params: dict[str, str] = {}
    for key, value in query.items():
        if value is None:
            continue
        if isinstance(value, bool):
            params[key] = "true" if value else "false"
        elif isinstance(value, list | tuple | range | np.ndarray):
            params[key] = ",".join(str(int(v)) for v in value)
        else:
            params[key] = str(value)
    return params


def _json_answer(response: httpx.Response) -> Any:
    _raise_for_problem(response)
    return orjson.loads(response.content) if response.content else None


class Client:
    """Synchronous REST client (httpx).

    ``shared_memory=True``: for a server on this host (``CE_EVAL_SHARED_MEMORY=true``, the
    same ``/dev/shm``), ``evaluate`` goes over OIP with the tensors in a shared-memory region
    this client owns (:mod:`ce_eval_client.shm`) instead of the socket; ``close()``
    unregisters and unlinks it."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        transport: Transport = "protobuf",
        timeout: float = 120.0,
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
        http: httpx.Client | None = None,
        shared_memory: bool = False,
    ) -> None:
        self.transport = transport
        self._http = http or httpx.Client(
            base_url=url, timeout=timeout, headers=_auth_headers(headers, api_key)
        )
        self.region = SharedRegion(self._http, _raise_for_problem) if shared_memory else None
        self._arrays = SharedArrays(self._http, _raise_for_problem)

    def shared_array(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """With ``shared_memory=True``: a zero-filled array in shared memory (its own region).
        Logits written into it (``np.matmul(h, w, out=a)``, ``a[:] = model(x)``) and passed
        to :meth:`evaluate` are read by the server where they are: neither side copies them.
        Freed by :meth:`close`; each one counts against the server's regions per API key."""
        if self.region is None:
            raise ValueError("shared_array needs Client(shared_memory=True)")
        return self._arrays.new(tuple(shape), dtype)

    def evaluate(
        self,
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
    ) -> Evaluation:
        """One stateless evaluation; linear-layer losses (``linear_cross_entropy``) take
        ``features`` (N, D), ``weight`` (C, D) and ``bias`` (C,) with ``logits`` None."""
        call = _Call(
            loss, logits, targets, options, outputs, metrics, sample_weight, vector, backend,
            features, weight, bias,
        )  # fmt: skip
        if self.region is not None:
            path, body, layout = _encode_oip_shared(call, self.region, self._arrays)
            response = self._http.post(
                path, content=body, headers={"content-type": "application/json"}
            )
            _raise_for_problem(response)
            return _decode_oip(response, (self.region, layout))
        path, chunks, headers = _encode_rest(call, self.transport)
        response = self._http.post(path, content=chunks, headers=headers)  # type: ignore[arg-type]
        return _decode_rest(response, self.transport)

    # ------------------------------------------------------------------------------ runs

    def _json(self, call: _JsonCall) -> Any:
        response = self._http.request(call.method, call.path, json=call.body, params=call.params)
        return _json_answer(response)

    def create_run(
        self,
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
    ) -> dict[str, Any]:
        """``POST /v1/runs`` → the new run (``RunDecision`` for the last three)."""
        decision = RunDecision(confidence, tuple(slice_keys), max_slice_values)
        call = _create_run_call(name, loss, options, metrics, class_names, tags, decision)
        return self._json(call)

    def add_batch(
        self,
        run_id: str,
        batch_id: str,
        logits: Any,
        targets: Any,
        sample_weight: Any = None,
        *,
        features: Any = None,
        weight: Any = None,
        bias: Any = None,
        example_ids: Any = None,
        slices: Mapping[str, Iterable[str]] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/runs/{id}/batches`` (base64 tensors) → ``{run_id, batch_id, seq,
        duplicate, batch, run}``; the same ``batch_id`` again counts nothing. A
        linear_cross_entropy run takes ``features``, ``weight``, ``bias`` (``logits`` None);
        ``example_ids`` (N strings or integers) pair runs by example, ``slices`` gives each of
        the run's slice keys one value per example."""
        linear = {"features": features, "weight": weight, "bias": bias}
        if self.transport == "protobuf":
            path, pieces, headers = _batch_body(
                run_id, batch_id, logits, targets, sample_weight, example_ids, slices, **linear
            )
            response = self._http.post(path, content=pieces, headers=headers)  # type: ignore[arg-type]
            return _json_answer(response)
        call = _add_batch_call(
            run_id, batch_id, logits, targets, sample_weight, _labels(example_ids, slices),
            **linear,
        )  # fmt: skip
        return self._json(call)

    def run_slices(self, run_id: str, key: str, **query: Any) -> dict[str, Any]:
        """``GET /v1/runs/{id}/slices?key=…``: each value of slice key ``key`` with count,
        loss value, scalar metrics and intervals (``sort``, ``order``, ``limit``, ``offset``,
        ``min_slice_size``)."""
        return self._json(_slices_call(run_id, key, query))

    def get_run(self, run_id: str) -> dict[str, Any]:
        """``GET /v1/runs/{id}`` → the run with its aggregates."""
        return self._json(_JsonCall("GET", run_path(run_id)))

    def list_runs(
        self,
        *,
        name: str | None = None,
        tags: Iterable[str] = (),
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/runs`` → ``{runs, next_cursor}`` (newest first; tags as ``key:value``)."""
        return self._json(_list_runs_call(name, tags, status, limit, cursor))

    def close_run(self, run_id: str) -> dict[str, Any]:
        """``POST /v1/runs/{id}/close`` → the closed run (later batches get 409)."""
        return self._json(_JsonCall("POST", run_path(run_id, "close")))

    def delete_run(self, run_id: str) -> None:
        """``DELETE /v1/runs/{id}``: the run and its batches."""
        self._json(_JsonCall("DELETE", run_path(run_id)))

    def run_metric(self, run_id: str, name: str, **query: Any) -> dict[str, Any]:
        """``GET /v1/runs/{id}/metrics/{name}``: one statistic in full, e.g.
        ``run_metric(id, "confusion_matrix", top=20)``, ``classes=[3, 17]``,
        ``normalize=True``; ``run_metric(id, "per_class", sort="f1", order="asc", limit=10)``."""
        path = run_path(run_id, "metrics", quote(name, safe=""))
        return self._json(_JsonCall("GET", path, params=_metric_query(query)))

    def compare(
        self, run_ids: Iterable[str], baseline: str | None = None, slice_key: str | None = None
    ) -> dict[str, Any]:
        """``GET /v1/runs/compare?ids=…[&baseline=…]`` → ``{runs, table}``, and with a
        ``baseline`` ``deltas``: per other run and metric (and slice) ``{value, baseline,
        delta, ci, paired}``."""
        return self._json(_compare_call(run_ids, baseline, slice_key))

    def gate(
        self,
        run_id: str,
        baseline: str,
        checks: Iterable[Mapping[str, Any]],
        allow_inconclusive: bool = False,
    ) -> dict[str, Any]:
        """``POST /v1/runs/{id}/gate``: the run against ``baseline`` on ``checks`` such as
        ``{"metric": "accuracy", "max_decrease": 0.005}``, ``{"metric": "value", "slice":
        "lang=de", "max_increase": 0.02}``, ``{"metric": "ece", "max": 0.1}`` → ``{passed,
        paired, level, replicates, checks: [{…, ci, verdict, reason}]}`` (the server stores
        it on the run). A failed gate is an answer (``passed`` false), not an error."""
        return self._json(_gate_call(run_id, baseline, checks, allow_inconclusive))

    def close(self) -> None:
        if self.region is not None:
            self.region.release()
            self._arrays.release()
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """Asynchronous REST client (httpx); same arguments as :class:`Client`."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        transport: Transport = "protobuf",
        timeout: float = 120.0,
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.transport = transport
        self._http = http or httpx.AsyncClient(
            base_url=url, timeout=timeout, headers=_auth_headers(headers, api_key)
        )

    async def evaluate(
        self,
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
    ) -> Evaluation:
        """One stateless evaluation; linear-layer losses (``linear_cross_entropy``) take
        ``features`` (N, D), ``weight`` (C, D) and ``bias`` (C,) with ``logits`` None."""
        call = _Call(
            loss, logits, targets, options, outputs, metrics, sample_weight, vector, backend,
            features, weight, bias,
        )  # fmt: skip
        path, chunks, headers = _encode_rest(call, self.transport)
        response = await self._http.post(path, content=_async_chunks(chunks), headers=headers)
        return _decode_rest(response, self.transport)

    # ------------------------------------------------------------------------------ runs

    async def _json(self, call: _JsonCall) -> Any:
        response = await self._http.request(
            call.method, call.path, json=call.body, params=call.params
        )
        return _json_answer(response)

    async def create_run(
        self,
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
    ) -> dict[str, Any]:
        """``POST /v1/runs`` → the new run (``RunDecision`` for the last three)."""
        decision = RunDecision(confidence, tuple(slice_keys), max_slice_values)
        call = _create_run_call(name, loss, options, metrics, class_names, tags, decision)
        return await self._json(call)

    async def add_batch(
        self,
        run_id: str,
        batch_id: str,
        logits: Any,
        targets: Any,
        sample_weight: Any = None,
        *,
        features: Any = None,
        weight: Any = None,
        bias: Any = None,
        example_ids: Any = None,
        slices: Mapping[str, Iterable[str]] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/runs/{id}/batches`` → the batch's result and the run's totals (see
        :meth:`Client.add_batch`)."""
        linear = {"features": features, "weight": weight, "bias": bias}
        if self.transport == "protobuf":
            path, pieces, headers = _batch_body(
                run_id, batch_id, logits, targets, sample_weight, example_ids, slices, **linear
            )
            response = await self._http.post(path, content=_async_chunks(pieces), headers=headers)
            return _json_answer(response)
        call = _add_batch_call(
            run_id, batch_id, logits, targets, sample_weight, _labels(example_ids, slices),
            **linear,
        )  # fmt: skip
        return await self._json(call)

    async def run_slices(self, run_id: str, key: str, **query: Any) -> dict[str, Any]:
        """``GET /v1/runs/{id}/slices?key=…`` (see :meth:`Client.run_slices`)."""
        return await self._json(_slices_call(run_id, key, query))

    async def get_run(self, run_id: str) -> dict[str, Any]:
        """``GET /v1/runs/{id}`` → the run with its aggregates."""
        return await self._json(_JsonCall("GET", run_path(run_id)))

    async def list_runs(
        self,
        *,
        name: str | None = None,
        tags: Iterable[str] = (),
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/runs`` → ``{runs, next_cursor}``."""
        return await self._json(_list_runs_call(name, tags, status, limit, cursor))

    async def close_run(self, run_id: str) -> dict[str, Any]:
        """``POST /v1/runs/{id}/close`` → the closed run."""
        return await self._json(_JsonCall("POST", run_path(run_id, "close")))

    async def delete_run(self, run_id: str) -> None:
        """``DELETE /v1/runs/{id}``."""
        await self._json(_JsonCall("DELETE", run_path(run_id)))

    async def run_metric(self, run_id: str, name: str, **query: Any) -> dict[str, Any]:
        """``GET /v1/runs/{id}/metrics/{name}`` (see :meth:`Client.run_metric`)."""
        path = run_path(run_id, "metrics", quote(name, safe=""))
        return await self._json(_JsonCall("GET", path, params=_metric_query(query)))

    async def compare(
        self, run_ids: Iterable[str], baseline: str | None = None, slice_key: str | None = None
    ) -> dict[str, Any]:
        """``GET /v1/runs/compare`` (see :meth:`Client.compare`)."""
        return await self._json(_compare_call(run_ids, baseline, slice_key))

    async def gate(
        self,
        run_id: str,
        baseline: str,
        checks: Iterable[Mapping[str, Any]],
        allow_inconclusive: bool = False,
    ) -> dict[str, Any]:
        """``POST /v1/runs/{id}/gate`` (see :meth:`Client.gate`)."""
        return await self._json(_gate_call(run_id, baseline, checks, allow_inconclusive))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _auth_headers(headers: Mapping[str, str] | None, api_key: str | None) -> dict[str, str]:
    return {**(headers or {}), **({"X-API-Key": api_key} if api_key else {})}


def problem_from_rpc_error(error: grpc.RpcError) -> dict[str, Any]:
    """The ``ce_eval.v1.Problem`` in a failed call's ``grpc-status-details-bin`` (or a stub)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(pb.Problem.DESCRIPTOR):
                    problem = pb.Problem()
                    detail.Unpack(problem)
                    return problem_from_proto(problem)
    return {"detail": error.details(), "errors": []}


class GrpcClient:
    """Synchronous gRPC client of ``ce_eval.v1.LossEvaluation``.

    ``api_key`` travels as ``authorization: Bearer <key>`` metadata on every call. Run methods
    answer the dicts of the REST runs API; failures raise :class:`EvaluationError` with the gRPC
    code name as ``status``. ``evaluate`` sends requests over ``stream_bytes`` through
    ``EvaluateStream`` in pieces of ``piece_bytes`` (the same answer as ``Evaluate``).
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float = 120.0,
        max_message_bytes: int = 256 * 1024 * 1024,
        api_key: str | None = None,
        stream_bytes: int = STREAM_BYTES,
        piece_bytes: int = PIECE_BYTES,
    ) -> None:
        if piece_bytes < 1:
            raise ValueError(f"piece_bytes must be at least 1, not {piece_bytes}")
        self.timeout = timeout
        self.stream_bytes = stream_bytes
        self.piece_bytes = piece_bytes
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        # Sends pre-serialized chunks (see ``request_chunks``): one copy of the tensors, not three.
        self._evaluate = self._channel.unary_unary(
            f"/{SERVICE_NAME}/Evaluate",
            request_serializer=b"".join,
            response_deserializer=pb.EvaluateResponse.FromString,
        )
        self._evaluate_stream = self._channel.stream_unary(
            f"/{SERVICE_NAME}/EvaluateStream",
            request_serializer=None,  # stream_chunks serializes
            response_deserializer=pb.EvaluateResponse.FromString,
        )
        self._create_run = self._unary("CreateRun", pb.Run)
        self._add_batch = self._unary("AddBatch", pb.AddBatchResponse)
        self._get_run = self._unary("GetRun", pb.Run)
        self._list_runs = self._unary("ListRuns", pb.ListRunsResponse)
        self._run_metric = self._unary("GetRunMetric", pb.RunMetric)
        self._gate = self._unary("GateRun", pb.RunAnswer)
        self._slices = self._unary("GetRunSlices", pb.RunAnswer)
        self._compare = self._unary("CompareRuns", pb.RunAnswer)
        self._add_batches = self._channel.stream_unary(
            f"/{SERVICE_NAME}/AddBatches",
            request_serializer=pb.AddBatchRequest.SerializeToString,
            response_deserializer=pb.AddBatchesResponse.FromString,
        )

    def _unary(self, method: str, response: type[Any]) -> grpc.UnaryUnaryMultiCallable:
        return self._channel.unary_unary(
            f"/{SERVICE_NAME}/{method}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response.FromString,
        )

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise EvaluationError(exc.code().name, problem_from_rpc_error(exc)) from None

    def evaluate(
        self,
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
    ) -> Evaluation:
        """``Evaluate`` (see :meth:`Client.evaluate`)."""
        chunks = request_chunks(
            loss,
            logits,
            targets,
            options=options,
            outputs=outputs,
            metrics=metrics,
            sample_weight=sample_weight,
            vector=vector,
            backend=backend,
            features=features,
            weight=weight,
            bias=bias,
        )
        if sum(memoryview(c).nbytes for c in chunks) > self.stream_bytes:
            response = self._call(self._evaluate_stream, stream_chunks(chunks, self.piece_bytes))
        else:
            response = self._call(self._evaluate, chunks)
        return Evaluation.from_dict(response_from_proto(response))

    def create_run(
        self,
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
    ) -> dict[str, Any]:
        """``CreateRun`` → the new run (keywords as :meth:`Client.create_run`)."""
        request = create_run_to_proto(
            name, loss, options=options, metrics=metrics, class_names=class_names, tags=tags,
            confidence=confidence, slice_keys=slice_keys, max_slice_values=max_slice_values,
        )  # fmt: skip
        return run_from_proto(self._call(self._create_run, request))

    def add_batch(
        self,
        run_id: str,
        batch_id: str,
        logits: Any,
        targets: Any,
        sample_weight: Any = None,
        *,
        features: Any = None,
        weight: Any = None,
        bias: Any = None,
        example_ids: Any = None,
        slices: Mapping[str, Iterable[str]] | None = None,
    ) -> dict[str, Any]:
        """``AddBatch`` → ``{run_id, batch_id, seq, duplicate, batch, run}`` (linear runs:
        ``features``, ``weight``, ``bias``; ``example_ids``, ``slices`` as
        :meth:`Client.add_batch`)."""
        request = batch_to_proto(
            run_id, batch_id, logits, targets, sample_weight,
            example_ids=example_ids, slices=slices,
            features=features, weight=weight, bias=bias,
        )  # fmt: skip
        return batch_answer_from_proto(self._call(self._add_batch, request))

    def add_batches(self, run_id: str, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """``AddBatches``: each item ``{batch_id, logits, targets, sample_weight?}``, encoded as
        it is sent; → ``{run_id, batches, accepted, duplicates, run}``."""

        def messages() -> Iterator[pb.AddBatchRequest]:
            for batch in batches:
                yield batch_to_proto(
                    run_id,
                    str(batch["batch_id"]),
                    batch["logits"],
                    batch["targets"],
                    batch.get("sample_weight"),
                )

        return batches_summary_from_proto(self._call(self._add_batches, messages()))

    def get_run(self, run_id: str) -> dict[str, Any]:
        """``GetRun`` → the run with its aggregates."""
        return run_from_proto(self._call(self._get_run, pb.GetRunRequest(run_id=run_id)))

    def run_metric(
        self,
        run_id: str,
        name: str,
        *,
        normalize: bool = False,
        top: int | None = None,
        classes: Iterable[int] | None = None,
        sort: str | None = None,
        order: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> dict[str, Any]:
        """``GetRunMetric``: one statistic in full, as :meth:`Client.run_metric` answers it."""
        request = pb.GetRunMetricRequest(
            run_id=run_id,
            name=name,
            normalize=normalize,
            top=top or 0,
            classes=[int(c) for c in classes or ()],
            sort=sort or "",
            order=order or "",
            limit=limit or 0,
            offset=offset,
        )
        return struct_to_dict(self._call(self._run_metric, request).detail)

    def gate(
        self,
        run_id: str,
        baseline: str,
        checks: Iterable[Mapping[str, Any]],
        allow_inconclusive: bool = False,
    ) -> dict[str, Any]:
        """``GateRun``: the regression gate of ``run_id`` against ``baseline``, as
        :meth:`Client.gate` answers it."""
        request = pb.GateRunRequest(run_id=run_id)
        body = {
            "baseline": baseline,
            "checks": [dict(c) for c in checks],
            "allow_inconclusive": allow_inconclusive,
        }
        dict_to_struct(body, request.gate)
        return struct_to_dict(self._call(self._gate, request).answer)

    def run_slices(
        self,
        run_id: str,
        key: str,
        *,
        sort: str = "count",
        order: str = "desc",
        limit: int = 100,
        offset: int = 0,
        min_slice_size: int = 0,
    ) -> dict[str, Any]:
        """``GetRunSlices``: as :meth:`Client.run_slices` answers it."""
        request = pb.GetRunSlicesRequest(
            run_id=run_id, key=key, sort=sort, order=order, limit=limit, offset=offset,
            min_slice_size=min_slice_size,
        )  # fmt: skip
        return struct_to_dict(self._call(self._slices, request).answer)

    def compare(
        self, run_ids: Iterable[str], baseline: str | None = None, slice_key: str | None = None
    ) -> dict[str, Any]:
        """``CompareRuns``: as :meth:`Client.compare` answers it (``deltas`` with a
        ``baseline``, per slice of ``slice_key``)."""
        request = pb.CompareRunsRequest(
            ids=list(run_ids), baseline=baseline or "", slice_key=slice_key or ""
        )
        return struct_to_dict(self._call(self._compare, request).answer)

    def list_runs(
        self,
        *,
        name: str | None = None,
        tags: Iterable[str] = (),
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """``ListRuns`` → ``{runs, next_cursor}`` (newest first; tags as ``key:value``)."""
        request = pb.ListRunsRequest(
            name=name or "", tags=list(tags), status=status or "", limit=limit, cursor=cursor or ""
        )
        return runs_page_from_proto(self._call(self._list_runs, request))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
