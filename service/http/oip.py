"""Open Inference Protocol v2 routes (KServe / Triton / MLServer), so stock clients work.

Each loss is a "model". Parsing and encoding live in :mod:`service.codecs.oip`; evaluation in the
data plane. Errors are problem+json with the OIP ``error`` member added (what OIP clients read),
for every path under ``/v2`` (:func:`service.http.responses.problem_body`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from fastapi import APIRouter, Request
from starlette.responses import Response

import ce_engine
from service import __version__
from service.codecs.oip import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
)
from service.dataplane.evaluate import INLINE_BODY_BYTES, DataPlane
from service.errors import NotFound
from service.http.bodies import read_body
from service.http.responses import FastJSONResponse, problems
from service.shared_memory import RegionAccess

SHARED_MARK = b"shared_memory_region"

router = APIRouter(
    prefix="/v2",
    tags=["open inference protocol v2"],
    responses=problems(400, 401, 403, 404, 413, 415, 422, 429, 503),
)


def _spec(loss: str, version: str | None = None) -> ce_engine.LossSpec:
    spec = ce_engine.all_losses().get(loss)
    if spec is None or version not in (None, "1"):
        what = f"model {loss!r}" + (f" version {version!r}" if version is not None else "")
        raise NotFound(
            f"{what} not found; models are the losses: {', '.join(sorted(ce_engine.all_losses()))}",
            [{"loc": ["path", "model_name"], "msg": "unknown model", "type": "not_found"}],
        )
    return spec


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    extensions = ["binary_tensor_data"]
    if dataplane.shared_memory.enabled:
        extensions.append("system_shared_memory")
    return FastJSONResponse({"name": "ce-eval", "version": __version__, "extensions": extensions})


@router.get("/health/live", summary="Server liveness")
async def live() -> Response:
    return FastJSONResponse({"live": True})


@router.get("/health/ready", summary="Server readiness (503 while draining)")
async def ready(request: Request) -> Response:
    draining = request.app.state.dataplane.admission.draining
    return FastJSONResponse({"ready": not draining}, status_code=503 if draining else 200)


@router.get("/models/{loss}", summary="Model (loss) metadata")
@router.get("/models/{loss}/versions/{version}", summary="Model (loss) metadata")
async def metadata(request: Request, loss: str, version: str | None = None) -> Response:
    return FastJSONResponse(model_metadata(loss, _spec(loss, version).outputs))


@router.get("/models/{loss}/ready", summary="Model (loss) readiness")
@router.get("/models/{loss}/versions/{version}/ready", summary="Model (loss) readiness")
async def model_ready(request: Request, loss: str, version: str | None = None) -> Response:
    _spec(loss, version)
    return FastJSONResponse({"name": loss, "ready": True})


def _infer_shared(
    dataplane: DataPlane, loss: str, parse: Callable[[], InferRequest]
) -> tuple[bytes, int | None]:
    """A request naming shared-memory regions, parsed, evaluated and encoded (a thread's)."""
    infer_request = parse()
    result = dataplane.evaluate(infer_request.request, "raw")
    return encode_infer_response(loss, infer_request, result)


@router.post("/models/{loss}/infer", summary="Evaluate the loss (JSON or binary tensors)")
@router.post("/models/{loss}/versions/{version}/infer", summary="Evaluate the loss")
async def infer(request: Request, loss: str, version: str | None = None) -> Response:
    _spec(loss, version)
    dataplane: DataPlane = request.app.state.dataplane
    body = await read_body(request)
    regions = RegionAccess(dataplane.shared_memory, getattr(request.state, "principal", None))
    parse = partial(
        parse_infer_request,
        loss,
        body,
        request.headers.get(HEADER_LENGTH),
        dataplane.settings,
        regions,
    )
    if len(body) <= INLINE_BODY_BYTES and SHARED_MARK in bytes(body):
        # Tensors in shared memory cost what their bytes cost, however small the body: the
        # parse, the evaluation and the encoding take one compute-thread hop together.
        body, header_length = await dataplane.run_admitted(_infer_shared, dataplane, loss, parse)
    else:
        infer_request = await dataplane.parse_off_loop(len(body), parse)
        result = await dataplane.evaluate_async(infer_request.request, "raw", len(body))
        encode = partial(encode_infer_response, loss, infer_request, result)
        if infer_request.shared_outputs:  # a large body naming an output region
            body, header_length = await dataplane.in_thread(encode)
        else:
            body, header_length = encode()
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(
        body,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )
