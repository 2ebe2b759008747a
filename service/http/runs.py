"""Runs API routes (DESIGN §3): thin translations onto
:class:`service.dataplane.runs.RunsDataPlane`.

Each call passes the authenticated principal (set by ``ApiKeyMiddleware``; None with auth off),
so a run is visible only to the API key that created it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.proto import PROTOBUF_MEDIA_TYPE
from service.codecs.proto import batch_from_proto, split_message_bytes
from service.dataplane.run_details import DetailQuery
from service.dataplane.runs import AddBatchRequest, CreateRunRequest, RunsDataPlane
from service.dataplane.slices import SliceQuery
from service.errors import MalformedBody, ValidationFailed
from service.http.bodies import read_body
from service.http.protobuf import media_type, protobuf_content
from service.http.responses import FastJSONResponse, problems
from service.http.routes import loads_json, read_json, require_json

router = APIRouter(prefix="/v1/runs", tags=["runs"])


def _body(model: type[Any], protobuf: str | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": model.model_json_schema()}}
    if protobuf is not None:
        content |= protobuf_content(protobuf)
    return {"requestBody": {"required": True, "content": content}}


def _batch_from_protobuf(body: bytes | memoryview, run_id: str, max_elements: int) -> Any:
    if not body:
        raise MalformedBody("the request body is empty")
    message, data = split_message_bytes(pb.AddBatchRequest, body)
    if message.run_id and message.run_id != run_id:
        msg = f"the message names run {message.run_id!r}, the path {run_id!r}"
        raise ValidationFailed(msg, [{"loc": ["body", "run_id"], "msg": msg, "type": "run_id"}])
    return batch_from_proto(message, max_elements, data)


def _runs(request: Request) -> RunsDataPlane:
    runs: RunsDataPlane = request.app.state.runs
    return runs


def _principal(request: Request) -> str | None:
    principal: str | None = getattr(request.state, "principal", None)
    return principal


@router.post(
    "",
    status_code=201,
    summary="Create a run (loss, options and metrics fixed for all its batches)",
    responses=problems(400, 415, 422, 503),
    openapi_extra=_body(CreateRunRequest),
)
async def create_run(request: Request) -> Response:
    payload = await read_json(request)
    run = await to_thread.run_sync(
        partial(_runs(request).create_run, payload, principal=_principal(request))
    )
    return FastJSONResponse(run, status_code=201, headers={"Location": f"/v1/runs/{run['id']}"})


@router.get(
    "",
    summary="List runs, newest first (filters + cursor pagination)",
    responses=problems(422, 503),
)
async def list_runs(
    request: Request,
    name: Annotated[str | None, Query(max_length=200, description="Substring of the name")] = None,
    tag: Annotated[list[str] | None, Query(description="key:value, repeatable (all match)")] = None,
    status: Annotated[str | None, Query(description="open | closed")] = None,
    limit: Annotated[int, Query(description="Page size, 1-500")] = 50,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor")] = None,
) -> Response:
    page = await to_thread.run_sync(
        lambda: _runs(request).list_runs(
            name=name,
            tags=tag or (),
            status=status,
            limit=limit,
            cursor=cursor,
            principal=_principal(request),
        )
    )
    return FastJSONResponse(page)


@router.get(
    "/compare",
    summary="Compare runs side by side",
    responses=problems(404, 422, 503),
)
async def compare_runs(
    request: Request,
    ids: Annotated[str, Query(max_length=2000, description="Comma-separated run ids")],
    baseline: Annotated[
        str | None, Query(max_length=40, description="One of ids: adds `deltas` against it")
    ] = None,
    slice_key: Annotated[
        str | None, Query(max_length=64, description="With baseline: deltas per slice value")
    ] = None,
) -> Response:
    wanted = [part.strip() for part in ids.split(",")]
    compare = partial(
        _runs(request).compare,
        wanted,
        principal=_principal(request),
        baseline=baseline,
        slice_key=slice_key,
    )
    return FastJSONResponse(await to_thread.run_sync(compare))


@router.get(
    "/{run_id}",
    summary="A run: its summary plus small arrays (per-class up to CE_EVAL_RUN_DETAIL_MAX_CLASSES)",
    responses=problems(404, 503),
)
async def get_run(request: Request, run_id: str) -> Response:
    get = partial(_runs(request).get_run, run_id, principal=_principal(request))
    return FastJSONResponse(await to_thread.run_sync(get))


@router.post(
    "/{run_id}/gate",
    summary="Regression gate: non-inferiority checks against a baseline run",
    description=(
        "`{baseline, checks: [{metric, slice?, max_decrease | max_increase | min | max}], "
        "allow_inconclusive}` → `{passed, paired, checks: [{…, delta, ci, verdict}]}`, stored "
        "on the run as its `gate`."
    ),
    responses=problems(400, 404, 415, 422, 503),
)
async def gate_run(request: Request, run_id: str) -> Response:
    payload = await read_json(request)
    gate = partial(_runs(request).gate, run_id, payload, principal=_principal(request))
    return FastJSONResponse(await to_thread.run_sync(gate))


@router.get(
    "/{run_id}/slices",
    summary="A run's slices of one key: count, loss value, scalar metrics and intervals",
    description=(
        "`sort`: count (default), value, slice or a scalar metric (`top_k_accuracy.5`); "
        "`order`: desc (default) | asc; `limit` 1-1000 (100), `offset`; values with fewer than "
        "`min_slice_size` examples are left out and counted in `hidden`."
    ),
    responses=problems(404, 422, 503),
)
async def run_slices(
    request: Request,
    run_id: str,
    key: Annotated[str, Query(max_length=64, description="A slice key of the run")],
    sort: Annotated[str, Query(max_length=80, description="Sort field")] = "count",
    order: Annotated[str, Query(max_length=4, description="asc | desc")] = "desc",
    limit: Annotated[int, Query(description="Rows, 1-1000")] = 100,
    offset: Annotated[int, Query(description="Rows to skip")] = 0,
    min_slice_size: Annotated[int, Query(description="Hide smaller slices")] = 0,
) -> Response:
    query = SliceQuery(sort, order, limit, offset, min_slice_size)
    page = partial(_runs(request).run_slices, run_id, key, query, principal=_principal(request))
    return FastJSONResponse(await to_thread.run_sync(page))


@router.get(
    "/{run_id}/metrics/{name}",
    summary="One statistic of a run in full (confusion matrix, per-class table, curves…)",
    description=(
        "`confusion_matrix`: `normalize`, `top` (the K largest off-diagonal cells) or `classes` "
        "(a block); `per_class`: `sort`, `order`, `limit`, `offset`; `roc_curve` / `pr_curve`: "
        "`classes`; `reliability`, `auroc`, `average_precision`. The run's `details` lists "
        "the names it serves."
    ),
    responses=problems(404, 413, 422, 503),
)
async def run_metric(
    request: Request,
    run_id: str,
    name: str,
    normalize: Annotated[bool, Query(description="confusion_matrix: rows ÷ true-class total")] = (
        False
    ),
    top: Annotated[int | None, Query(description="confusion_matrix: K largest cells")] = None,
    classes: Annotated[
        str | None, Query(max_length=12_000, description="Comma-separated class ids")
    ] = None,
    sort: Annotated[str | None, Query(max_length=40, description="per_class column")] = None,
    order: Annotated[str | None, Query(max_length=4, description="asc | desc")] = None,
    limit: Annotated[int | None, Query(description="per_class rows, 1-1000 (100)")] = None,
    offset: Annotated[int, Query(description="per_class rows to skip")] = 0,
) -> Response:
    query = DetailQuery(normalize, top, _class_ids(classes), sort, order, limit, offset)
    detail = partial(_runs(request).run_metric, run_id, name, query, principal=_principal(request))
    return FastJSONResponse(await to_thread.run_sync(detail))


def _class_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValidationFailed(
            "query parameter classes: comma-separated class ids, e.g. classes=3,17",
            [{"loc": ["query", "classes"], "msg": "not integers", "type": "query"}],
        ) from None


@router.post(
    "/{run_id}/batches",
    summary="Add a batch (idempotent on batch_id)",
    responses=problems(400, 404, 409, 413, 415, 422, 503),
    openapi_extra=_body(AddBatchRequest, protobuf="AddBatchRequest"),
)
async def add_batch(request: Request, run_id: str) -> Response:
    """JSON (base64 tensors) or ``application/x-protobuf`` (``ce_eval.v1.AddBatchRequest``,
    tensors as raw bytes; its ``run_id`` empty or this run's) in; the answer is JSON."""
    dataplane = request.app.state.dataplane
    content_type = media_type(request)
    # the body is parsed in the evaluation's compute thread: one hop for both
    parse: Callable[[], Any]
    if content_type == PROTOBUF_MEDIA_TYPE:
        body = await read_body(request)
        parse = partial(_batch_from_protobuf, body, run_id, dataplane.settings.max_elements)
    else:
        require_json(content_type)
        parse = partial(loads_json, await read_body(request))
    answer = await _runs(request).add_batch_async(run_id, parse, principal=_principal(request))
    return FastJSONResponse(answer)


@router.get(
    "/{run_id}/batches",
    summary="Per-batch series of a run (for charts)",
    responses=problems(404, 422, 503),
)
async def list_batches(
    request: Request,
    run_id: str,
    limit: Annotated[int, Query(description="Page size, 1-10000")] = 1000,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor")] = None,
) -> Response:
    page = await to_thread.run_sync(
        lambda: _runs(request).list_batches(
            run_id, limit=limit, cursor=cursor, principal=_principal(request)
        )
    )
    return FastJSONResponse(page)


@router.post(
    "/{run_id}/close",
    summary="Close a run (later batches get 409)",
    responses=problems(404, 503),
)
async def close_run(request: Request, run_id: str) -> Response:
    close = partial(_runs(request).close_run, run_id, principal=_principal(request))
    return FastJSONResponse(await to_thread.run_sync(close))


@router.delete(
    "/{run_id}",
    status_code=204,
    summary="Delete a run and its batches",
    responses=problems(404, 503),
)
async def delete_run(request: Request, run_id: str) -> Response:
    delete = partial(_runs(request).delete_run, run_id, principal=_principal(request))
    await to_thread.run_sync(delete)
    return Response(status_code=204)
