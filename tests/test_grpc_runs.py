"""gRPC runs API (CreateRun, AddBatch, AddBatches, GetRun, ListRuns) on the REST runs data plane.

One real app (a SQLite file, or a real PostgreSQL database where marked) serves REST in process
and gRPC on a free localhost port, both over the same run store. Expected aggregates come from
REST and from one stateless evaluation of all the batches concatenated, never from the store's
own arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
from google.rpc import error_details_pb2, status_pb2

from ce_engine.metrics import scalar_metrics
from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2_grpc as pb_grpc
from ce_eval_client.proto import (
    batch_answer_from_proto,
    batch_to_proto,
    batches_summary_from_proto,
    create_run_to_proto,
    dict_to_struct,
    response_from_proto,
    run_from_proto,
    runs_page_from_proto,
    struct_to_dict,
)
from service.config import Settings
from service.grpc.server import GrpcServer
from tests.servers import PostgresCluster, in_process_stack
from tests.test_runs import (
    ALL_METRICS,
    OPTIONS,
    as_base64,
    as_json,
    assert_close,
    concatenated,
    make_batches,
)

Metadata = tuple[tuple[str, str], ...]


@dataclass
class Stack:
    """The app (REST in process) and its gRPC server, sharing data planes and store."""

    app: Any
    rest: httpx.AsyncClient
    channel: grpc.aio.Channel
    stub: pb_grpc.LossEvaluationStub
    grpc_server: GrpcServer


async def _stack(tmp_path: Path, database_url: str = "", **overrides: Any) -> AsyncIterator[Stack]:
    settings = Settings(
        database_url=database_url or f"sqlite:///{tmp_path / 'runs.db'}",
        max_elements=20_000,
        log_level="warning",
        backend="numpy",
        **overrides,
    )
    async with in_process_stack(settings) as (app, rest, channel, server):
        yield Stack(app, rest, channel, pb_grpc.LossEvaluationStub(channel), server)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    url = ""
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        url = cluster.create_database()
    async for value in _stack(tmp_path, url):
        yield value


def grpc_batch(run_id: str, batch_id: str, batch: dict[str, np.ndarray]) -> pb.AddBatchRequest:
    return batch_to_proto(
        run_id, batch_id, batch["logits"], batch["targets"], batch.get("sample_weight")
    )


async def grpc_run(stub: pb_grpc.LossEvaluationStub, metadata: Metadata = ()) -> dict[str, Any]:
    message = create_run_to_proto(
        "grpc-run",
        "cross_entropy",
        options=OPTIONS,
        metrics=ALL_METRICS,
        class_names=[f"c{i}" for i in range(5)],
        tags={"split": "val", "via": "grpc"},
    )
    return run_from_proto(await stub.CreateRun(message, metadata=metadata))


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def details(error: grpc.aio.AioRpcError) -> tuple[list[dict[str, Any]], pb.Problem, dict[str, Any]]:
    """(errors list, Problem, all trailing metadata) of a failed call; checks they agree."""
    trailers = dict(error.trailing_metadata() or ())
    errors = orjson.loads(trailers["ce-eval-errors-bin"])
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == error.code().value[0]
    problem = pb.Problem()
    assert status.details[1].Unpack(problem)
    assert [e.msg for e in problem.errors] == [e["msg"] for e in errors]
    return errors, problem, trailers


def comparable(run: dict[str, Any]) -> dict[str, Any]:
    """The aggregate part of a run (ids, names, tags and times differ between two runs)."""
    keys = ("batches", "count", "ignored", "sum", "denominator", "value", "metrics")
    return {k: run[k] for k in keys}


async def stream(items: Iterable[pb.AddBatchRequest]) -> AsyncIterator[pb.AddBatchRequest]:
    for item in items:
        yield item


# ------------------------------------------------------------------ data plane parity


async def test_grpc_run_equals_rest_run_and_one_evaluation(stack: Stack) -> None:
    batches = make_batches(11, [7, 1, 12, 5, 9])
    run = await grpc_run(stack.stub)
    assert (run["status"], run["batches"], run["value"]) == ("open", 0, None)
    assert run["options"] == OPTIONS and run["class_names"] == [f"c{i}" for i in range(5)]

    first = batch_answer_from_proto(
        await stack.stub.AddBatch(grpc_batch(run["id"], "b0", batches[0]))
    )
    assert (first["seq"], first["duplicate"], first["run"]["batches"]) == (1, False, 1)
    summary = batches_summary_from_proto(
        await stack.stub.AddBatches(
            stream(
                [
                    grpc_batch(run["id"], "b1", batches[1]),
                    grpc_batch("", "b2", batches[2]),  # run_id may be left out after the first
                    grpc_batch(run["id"], "b0", batches[0]),  # a retry: counted once
                    grpc_batch("", "b3", batches[3]),
                    grpc_batch(run["id"], "b4", batches[4]),
                ]
            )
        )
    )
    assert (summary["batches"], summary["accepted"], summary["duplicates"]) == (5, 4, 1)

    # The same batches through REST into a REST run (JSON lists and base64).
    created = await stack.rest.post(
        "/v1/runs",
        json={"name": "rest-run", "loss": "cross_entropy", "options": OPTIONS,
              "metrics": ALL_METRICS},
    )  # fmt: skip
    rest_id = created.json()["id"]
    for i, batch in enumerate(batches):
        body = {"batch_id": f"b{i}", **(as_json(batch) if i % 2 else _base64(batch))}
        assert (await stack.rest.post(f"/v1/runs/{rest_id}/batches", json=body)).is_success
    rest_run = (await stack.rest.get(f"/v1/runs/{rest_id}")).json()
    grpc_view = run_from_proto(await stack.stub.GetRun(pb.GetRunRequest(run_id=run["id"])))
    # GetRun = the summary plus small arrays; the stream's answer is the summary
    assert {k: v for k, v in grpc_view.items() if k != "metrics"} == {
        k: v for k, v in summary["run"].items() if k != "metrics"
    }
    assert summary["run"]["metrics"] == scalar_metrics(grpc_view["metrics"])
    assert_close(comparable(grpc_view), comparable(rest_run))
    for key in ("reduction", "normalization", "unit", "metrics_requested"):
        assert grpc_view[key] == rest_run[key]
    # REST reads the gRPC run from the same store, field for field.
    assert (await stack.rest.get(f"/v1/runs/{run['id']}")).json() == grpc_view

    # One stateless evaluation of everything concatenated (over gRPC Evaluate).
    whole = concatenated(batches)
    evaluation = response_from_proto(
        await stack.stub.Evaluate(_evaluate_request(whole, options=OPTIONS, metrics=ALL_METRICS))
    )
    assert grpc_view["count"] == evaluation["count"]
    assert grpc_view["count"] + grpc_view["ignored"] == 34
    assert math.isclose(grpc_view["value"], evaluation["value"], rel_tol=1e-9)
    assert math.isclose(grpc_view["denominator"], evaluation["denominator"], rel_tol=1e-12)
    assert_close(grpc_view["metrics"], evaluation["metrics"])


async def test_get_run_metric_equals_the_rest_detail(stack: Stack) -> None:
    run = await grpc_run(stack.stub)
    for i, batch in enumerate(make_batches(12, [9, 14])):
        await stack.stub.AddBatch(grpc_batch(run["id"], f"b{i}", batch))
    path = f"/v1/runs/{run['id']}/metrics"
    for name, request, params in [
        ("confusion_matrix", {"top": 3, "normalize": True}, {"top": 3, "normalize": "true"}),
        ("confusion_matrix", {"classes": [4, 0]}, {"classes": "4,0"}),
        ("per_class", {"sort": "f1", "order": "asc", "limit": 2}, {"sort": "f1", "order": "asc",
                                                                   "limit": 2}),
        ("reliability", {}, {}),
    ]:  # fmt: skip
        message = pb.GetRunMetricRequest(run_id=run["id"], name=name, **request)
        got = struct_to_dict((await stack.stub.GetRunMetric(message)).detail)
        want = (await stack.rest.get(f"{path}/{name}", params=params)).json()
        assert got == want  # Struct numbers are doubles: exact, and 3.0 == 3
    missing = await rpc_error(
        stack.stub.GetRunMetric(pb.GetRunMetricRequest(run_id=run["id"], name="roc_curve"))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    bad = await rpc_error(
        stack.stub.GetRunMetric(
            pb.GetRunMetricRequest(run_id=run["id"], name="confusion_matrix", top=5000)
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(bad)[0][0]["loc"] == ["query", "top"]


def _base64(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: as_base64(v) for k, v in batch.items()}


def _evaluate_request(
    data: dict[str, Any], *, options: dict[str, Any], metrics: list[str]
) -> pb.EvaluateRequest:
    from ce_eval_client.proto import request_to_proto

    return request_to_proto(
        "cross_entropy",
        np.asarray(data["logits"]),
        np.asarray(data["targets"]),
        sample_weight=np.asarray(data["sample_weight"]),
        options=options,
        metrics=metrics,
    )


async def test_idempotency_conflicts_and_closed_runs(stack: Stack) -> None:
    batch, other = make_batches(3, [6, 6])
    run = await grpc_run(stack.stub)
    first = await stack.stub.AddBatch(grpc_batch(run["id"], "same", batch))

    # A REST retry of a batch sent over gRPC is the same batch (content hash of the tensors).
    replay = await stack.rest.post(
        f"/v1/runs/{run['id']}/batches", json={"batch_id": "same", **_base64(batch)}
    )
    assert replay.json()["duplicate"] is True and replay.json()["seq"] == 1
    again = await stack.stub.AddBatch(grpc_batch(run["id"], "same", batch))
    assert again.duplicate and again.batch == first.batch and again.run.batches == 1

    error = await rpc_error(stack.stub.AddBatch(grpc_batch(run["id"], "same", other)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    errors, problem, _ = details(error)
    assert errors[0]["type"] == "batch_conflict" and problem.status == 409

    missing = await rpc_error(stack.stub.GetRun(pb.GetRunRequest(run_id="run_missing")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert details(missing)[0][0]["loc"] == ["path", "run_id"]
    no_id = await rpc_error(stack.stub.AddBatch(grpc_batch("", "x", batch)))
    assert no_id.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(no_id)[0][0]["loc"] == ["run_id"]

    assert (await stack.rest.post(f"/v1/runs/{run['id']}/close")).is_success
    closed = await rpc_error(stack.stub.AddBatch(grpc_batch(run["id"], "new", other)))
    assert closed.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(closed)[0][0]["type"] == "run_closed"
    # A retry of an accepted batch still answers its result after the close.
    assert (await stack.stub.AddBatch(grpc_batch(run["id"], "same", batch))).duplicate
    final = await stack.stub.GetRun(pb.GetRunRequest(run_id=run["id"]))
    assert (final.status, final.batches) == ("closed", 1)


async def test_add_batches_stops_at_the_first_failing_batch(stack: Stack) -> None:
    good = make_batches(5, [4, 4, 4])
    run = await grpc_run(stack.stub)
    bad = grpc_batch(run["id"], "bad", good[0])
    bad.targets.data = b"\x00" * 3  # not a whole number of int64 values
    error = await rpc_error(
        stack.stub.AddBatches(
            stream(
                [
                    grpc_batch(run["id"], "g0", good[0]),
                    grpc_batch(run["id"], "g1", good[1]),
                    bad,
                    grpc_batch(run["id"], "g2", good[2]),
                ]
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error)[0][0]["loc"][0] == "targets"
    kept = await stack.stub.GetRun(pb.GetRunRequest(run_id=run["id"]))
    assert kept.batches == 2  # the batches before the bad one stay; none after it

    other = await rpc_error(
        stack.stub.AddBatches(
            stream([grpc_batch(run["id"], "g2", good[2]), grpc_batch("run_other", "g3", good[0])])
        )
    )
    assert other.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(other)[0][0]["loc"] == [1, "run_id"]
    empty = await rpc_error(stack.stub.AddBatches(stream([])))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(empty)[0][0]["type"] == "empty_stream"
    assert (await stack.stub.GetRun(pb.GetRunRequest(run_id=run["id"]))).batches == 3


async def test_create_run_validation_and_list_runs_match_rest(stack: Stack) -> None:
    bad = create_run_to_proto("x", "cross_entropy", metrics=["accuracy", "not_a_metric"])
    error = await rpc_error(stack.stub.CreateRun(bad))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error)[0][0]["loc"] == ["body", "metrics", 1]
    unknown = await rpc_error(stack.stub.CreateRun(create_run_to_proto("x", "nope")))
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT

    ids = []
    for i in range(5):
        tags = {"split": "val" if i % 2 else "train", "i": str(i)}
        created = create_run_to_proto(f"list-{i}", "cross_entropy", tags=tags)
        ids.append((await stack.stub.CreateRun(created)).id)
    await stack.rest.post(f"/v1/runs/{ids[3]}/close")

    queries: list[dict[str, Any]] = [
        {},
        {"tags": ["split:val"]},
        {"status": "closed"},
        {"name": "list-", "limit": 2},
        {"tags": ["split:train", "i:4"]},
    ]
    for query in queries:
        rest_params = {**query, "tag": query.get("tags", [])}
        rest_params.pop("tags", None)
        rest_page = (await stack.rest.get("/v1/runs", params=rest_params)).json()
        page = runs_page_from_proto(await stack.stub.ListRuns(pb.ListRunsRequest(**query)))
        assert page == rest_page, query
    # Cursor pagination walks every run once, newest first.
    seen: list[str] = []
    cursor = ""
    while True:
        page = await stack.stub.ListRuns(pb.ListRunsRequest(limit=2, cursor=cursor))
        seen += [r.id for r in page.runs]
        cursor = page.next_cursor
        if not cursor:
            break
    assert seen == ids[::-1]

    for query, loc in [
        ({"status": "done"}, ["query", "status"]),
        ({"limit": 501}, ["query", "limit"]),
        ({"cursor": "nope"}, ["query", "cursor"]),
        ({"tags": ["no-colon"]}, ["query", "tag", 0]),
    ]:
        failed = await rpc_error(stack.stub.ListRuns(pb.ListRunsRequest(**query)))
        assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT, query
        assert details(failed)[0][0]["loc"] == loc


async def test_undecodable_messages_are_invalid_argument(stack: Stack) -> None:
    channel = stack.channel
    for method in ("CreateRun", "AddBatch", "GetRun", "ListRuns"):
        call = channel.unary_unary(f"/ce_eval.v1.LossEvaluation/{method}")
        error = await rpc_error(call(b"\xff\xff\xff"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert details(error)[0][0]["type"] == "protobuf"
    batches = channel.stream_unary("/ce_eval.v1.LossEvaluation/AddBatches")
    error = await rpc_error(batches(stream([b"\x0a\x05ab"])))  # truncated field
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------- backpressure


@pytest.fixture
async def one_slot(tmp_path: Path) -> AsyncIterator[Stack]:
    async for value in _stack(tmp_path, max_inflight=1):
        yield value


async def test_queue_full_and_draining_are_unavailable_with_retry_info(one_slot: Stack) -> None:
    stack = one_slot
    batch = make_batches(9, [4])[0]
    run = await grpc_run(stack.stub)
    admission = stack.app.state.dataplane.admission
    with admission.admit():  # one evaluation in flight fills the queue
        calls = {
            "AddBatch": stack.stub.AddBatch(grpc_batch(run["id"], "b", batch)),
            "AddBatches": stack.stub.AddBatches(stream([grpc_batch(run["id"], "b", batch)])),
            "Evaluate": stack.stub.Evaluate(
                _evaluate_request(as_json(batch), options={}, metrics=[])
            ),
        }
        for name, call in calls.items():
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, name
            errors, problem, trailers = details(error)
            assert errors[0]["type"] == "queue_full" and problem.status == 503
            assert trailers["retry-after"] == "1"
            status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
            retry = error_details_pb2.RetryInfo()
            assert status.details[2].Unpack(retry) and retry.retry_delay.seconds == 1
        # Reads are not evaluations: they are admitted as over REST.
        assert (await stack.stub.GetRun(pb.GetRunRequest(run_id=run["id"]))).batches == 0
    assert admission.inflight == 0
    assert (await stack.stub.AddBatch(grpc_batch(run["id"], "b", batch))).run.batches == 1

    admission.draining = True
    error = await rpc_error(stack.stub.AddBatch(grpc_batch(run["id"], "c", batch)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert details(error)[0][0]["type"] == "draining"
    admission.draining = False
    assert (await stack.stub.GetRun(pb.GetRunRequest(run_id=run["id"]))).batches == 1


# ------------------------------------------------------------------------------ auth

KEY_A = "grpc-key-a-0123456789"
KEY_B = "grpc-key-b-9876543210"


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[Stack]:
    async for value in _stack(tmp_path, api_keys=f"{KEY_A},{KEY_B}"):
        yield value


def as_a() -> Metadata:
    return (("x-api-key", KEY_A),)


def as_b() -> Metadata:
    return (("authorization", f"Bearer {KEY_B}"),)


async def test_api_keys_from_metadata(keyed: Stack) -> None:
    stub = keyed.stub
    request = create_run_to_proto("r", "cross_entropy")
    for metadata, code, kind in [
        ((), grpc.StatusCode.UNAUTHENTICATED, "missing_api_key"),
        ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED, "missing_api_key"),
        ((("x-api-key", "nope"),), grpc.StatusCode.PERMISSION_DENIED, "invalid_api_key"),
        ((("authorization", "Bearer nope"),), grpc.StatusCode.PERMISSION_DENIED, "invalid_api_key"),
    ]:
        for call in (
            stub.CreateRun(request, metadata=metadata),
            stub.ListRuns(pb.ListRunsRequest(), metadata=metadata),
            stub.Evaluate(
                _evaluate_request(as_json(make_batches(1, [2])[0]), options={}, metrics=[]),
                metadata=metadata,
            ),
            stub.AddBatches(stream([]), metadata=metadata),
        ):
            error = await rpc_error(call)
            assert error.code() == code, metadata
            errors, problem, trailers = details(error)
            assert errors[0]["type"] == kind
            assert problem.status == (401 if code == grpc.StatusCode.UNAUTHENTICATED else 403)
            if problem.status == 401:
                assert trailers["www-authenticate"] == "Bearer"
    assert (await stub.CreateRun(request, metadata=as_a())).name == "r"
    assert (await stub.CreateRun(request, metadata=as_b())).name == "r"

    # Health and reflection need no key.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(keyed.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service="ce_eval.v1.LossEvaluation"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_runs_are_scoped_to_the_key(keyed: Stack) -> None:
    stub = keyed.stub
    batches = make_batches(4, [5, 5])
    mine = await grpc_run(stub, as_a())
    await stub.AddBatch(grpc_batch(mine["id"], "0", batches[0]), metadata=as_a())
    theirs = await grpc_run(stub, as_b())

    # Every run RPC by the other key answers exactly as for a run that does not exist.
    for make in (
        lambda run_id: stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=as_b()),
        lambda run_id: stub.AddBatch(grpc_batch(run_id, "1", batches[1]), metadata=as_b()),
        lambda run_id: stub.AddBatch(grpc_batch(run_id, "0", batches[0]), metadata=as_b()),
        lambda run_id: stub.AddBatches(
            stream([grpc_batch(run_id, "1", batches[1])]), metadata=as_b()
        ),
    ):
        error = await rpc_error(make(mine["id"]))
        missing = await rpc_error(make("run_missing"))
        assert error.code() == missing.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == missing.details().replace("run_missing", mine["id"])
        assert details(error)[0] == details(missing)[0]

    listed_b = await stub.ListRuns(pb.ListRunsRequest(), metadata=as_b())
    assert [r.id for r in listed_b.runs] == [theirs["id"]]
    listed_a = await stub.ListRuns(pb.ListRunsRequest(), metadata=as_a())
    assert [r.id for r in listed_a.runs] == [mine["id"]]
    # The same key over REST sees the gRPC run, unchanged by the other key.
    rest = await keyed.rest.get(f"/v1/runs/{mine['id']}", headers={"X-API-Key": KEY_A})
    assert rest.json()["batches"] == 1
    other = await keyed.rest.get(f"/v1/runs/{mine['id']}", headers={"X-API-Key": KEY_B})
    assert other.status_code == 404


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[Stack]:
    # 0.001 tokens/s: no token comes back during the test, whatever the machine's speed.
    async for value in _stack(tmp_path, api_keys="a,b", rate_limit_per_s=0.001, rate_limit_burst=3):
        yield value


async def test_rate_limit_is_resource_exhausted_and_shared_with_http(limited: Stack) -> None:
    stub = limited.stub
    a: Metadata = (("x-api-key", "a"),)
    assert (await limited.rest.get("/v1/runs", headers={"X-API-Key": "a"})).status_code == 200
    await stub.ListRuns(pb.ListRunsRequest(), metadata=a)
    await stub.ListRuns(pb.ListRunsRequest(), metadata=a)
    error = await rpc_error(stub.ListRuns(pb.ListRunsRequest(), metadata=a))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    errors, problem, trailers = details(error)
    assert errors[0]["type"] == "rate_limited" and problem.status == 429
    assert int(trailers["retry-after"]) >= 1
    # The bucket is the key's, over both transports.
    assert (await limited.rest.get("/v1/runs", headers={"X-API-Key": "a"})).status_code == 429
    assert (await stub.ListRuns(pb.ListRunsRequest(), metadata=(("x-api-key", "b"),))).runs == []


async def test_a_linear_cross_entropy_run_takes_features_over_rest_and_grpc(stack: Stack) -> None:
    """Batches of (X, W, b) pushed over REST and gRPC equal a float64 reference over all rows."""
    rng = np.random.default_rng(21)
    n, d, c = 30, 8, 7
    x = rng.standard_normal((n, d))
    w = rng.standard_normal((c, d))
    b = rng.standard_normal(c)
    y = rng.integers(0, c, size=n)
    created = await stack.rest.post(
        "/v1/runs",
        json={"name": "head", "loss": "linear_cross_entropy", "metrics": ["accuracy", "nll"]},
    )
    run_id = created.json()["id"]
    first = {"batch_id": "a", "targets": as_base64(y[:12]), "features": as_base64(x[:12]),
             "weight": as_base64(w), "bias": as_base64(b)}  # fmt: skip
    assert (await stack.rest.post(f"/v1/runs/{run_id}/batches", json=first)).is_success
    message = batch_to_proto(run_id, "b", None, y[12:], features=x[12:], weight=w, bias=b)
    await stack.stub.AddBatch(message)
    run = (await stack.rest.get(f"/v1/runs/{run_id}")).json()
    z = x @ w.T + b
    top = z.max(axis=1)
    nll = top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - z[np.arange(n), y]
    assert run["count"] == n and run["num_classes"] == c
    assert run["value"] == pytest.approx(nll.mean(), rel=1e-12)
    assert run["metrics"]["nll"] == pytest.approx(nll.mean(), rel=1e-12)
    assert run["metrics"]["accuracy"] == pytest.approx(np.mean(z.argmax(axis=1) == y), rel=1e-12)
    both = {**first, "batch_id": "c", "logits": as_base64(z[:2])}
    refused = await stack.rest.post(f"/v1/runs/{run_id}/batches", json=both)
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == ["body", "logits"]


async def test_intervals_and_slices_over_grpc_equal_rest(stack: Stack) -> None:
    """A run with confidence and a slice key fed over gRPC (string ids, then integer ids)
    answers what a REST-fed twin answers: same intervals, fingerprints differ only by ids."""
    rng = np.random.default_rng(21)
    config = {
        "metrics": ["accuracy", "nll"],
        "confidence": {"replicates": 32, "level": 0.9, "seed": 3},
        "slice_keys": ["lang"],
    }
    via_grpc = run_from_proto(
        await stack.stub.CreateRun(create_run_to_proto("g", "cross_entropy", **config))
    )
    rest_body = {"name": "r", "loss": "cross_entropy", **config}
    via_rest = (await stack.rest.post("/v1/runs", json=rest_body)).json()
    assert via_grpc["confidence"] == via_rest["confidence"] == config["confidence"]
    assert via_grpc["slice_keys"] == ["lang"]
    for i, ids in enumerate(([f"s{j}" for j in range(12)], list(range(100, 112)))):
        logits, targets = rng.standard_normal((12, 3)), rng.integers(0, 3, 12)
        lang = [["en", "de"][j % 2] for j in range(12)]
        message = batch_to_proto(
            via_grpc["id"], f"b{i}", logits, targets, example_ids=ids, slices={"lang": lang}
        )
        answer = await stack.stub.AddBatch(message)
        body = {
            "batch_id": f"b{i}",
            "logits": logits.tolist(),
            "targets": targets.tolist(),
            "example_ids": ids,
            "slices": {"lang": lang},
        }
        assert (await stack.rest.post(f"/v1/runs/{via_rest['id']}/batches", json=body)).is_success
    got = run_from_proto(answer.run)
    rest = (await stack.rest.get(f"/v1/runs/{via_rest['id']}")).json()
    assert got["paired_ids"] is True and got["fingerprint"] == rest["fingerprint"]
    for name in ("value", "accuracy", "nll"):
        assert_close(got["intervals"][name]["ci"], rest["intervals"][name]["ci"], name)
    slices = (await stack.rest.get(f"/v1/runs/{via_grpc['id']}/slices?key=lang")).json()
    assert sorted(r["slice"] for r in slices["slices"]) == ["de", "en"]
    both = batch_to_proto(via_grpc["id"], "x", logits, targets, slices={"lang": lang})
    both.example_ids[:] = ["a"] * 12
    both.example_int_ids[:] = list(range(12))
    error = await rpc_error(stack.stub.AddBatch(both))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_gate_and_slices_over_grpc_answer_what_rest_answers(stack: Stack) -> None:
    rng = np.random.default_rng(22)
    config = {
        "metrics": ["accuracy"],
        "confidence": {"replicates": 16, "seed": 1},
        "slice_keys": ["lang"],
    }
    ids = [f"e{j}" for j in range(30)]
    lang = [["en", "de"][j % 2] for j in range(30)]
    logits, targets = rng.standard_normal((30, 3)), rng.integers(0, 3, 30)
    runs = []
    for name, noise in (("base", 0.0), ("cand", 0.5)):
        run = run_from_proto(
            await stack.stub.CreateRun(create_run_to_proto(name, "cross_entropy", **config))
        )
        z = logits + noise * rng.standard_normal(logits.shape)
        batch = batch_to_proto(run["id"], "b0", z, targets, example_ids=ids, slices={"lang": lang})
        await stack.stub.AddBatch(batch)
        runs.append(run["id"])
    body = {
        "baseline": runs[0],
        "checks": [{"metric": "accuracy", "slice": "lang=de", "max_decrease": 0.5}],
    }
    message = pb.GateRunRequest(run_id=runs[1])
    dict_to_struct(body, message.gate)
    answer = struct_to_dict((await stack.stub.GateRun(message)).answer)
    rest = (await stack.rest.post(f"/v1/runs/{runs[1]}/gate", json=body)).json()
    assert answer["checks"] == rest["checks"] and answer["paired"] is True
    page = await stack.stub.GetRunSlices(pb.GetRunSlicesRequest(run_id=runs[1], key="lang"))
    rest_page = (await stack.rest.get(f"/v1/runs/{runs[1]}/slices?key=lang")).json()
    assert struct_to_dict(page.answer) == rest_page
    bad = pb.GateRunRequest(run_id=runs[1])
    dict_to_struct({"baseline": runs[0], "checks": [{"metric": "nope", "min": 0.1}]}, bad.gate)
    error = await rpc_error(stack.stub.GateRun(bad))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await rpc_error(
        stack.stub.GetRunSlices(pb.GetRunSlicesRequest(run_id=runs[1], key="x"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    wanted = pb.CompareRunsRequest(ids=runs, baseline=runs[0], slice_key="lang")
    compared = struct_to_dict((await stack.stub.CompareRuns(wanted)).answer)
    params = {"ids": ",".join(runs), "baseline": runs[0], "slice_key": "lang"}
    rest_compare = (await stack.rest.get("/v1/runs/compare", params=params)).json()
    assert compared["deltas"] == rest_compare["deltas"]
    no_baseline = pb.CompareRunsRequest(ids=runs, slice_key="lang")
    error = await rpc_error(stack.stub.CompareRuns(no_baseline))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
