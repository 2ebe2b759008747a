"""Prometheus `/metrics`: names, labels (route templates), counts, multi-process mode."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2_grpc as pb_grpc
from ce_eval_client.proto import request_to_proto
from service.config import Settings
from tests.servers import ServerProcess, in_process_stack


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client: httpx.AsyncClient) -> dict:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_metrics_count_requests_by_route_template_and_rejections(client):
    before = await scrape(client)
    run = (await client.post("/v1/runs", json={"name": "m", "loss": "cross_entropy"})).json()
    body = {"batch_id": "a", "logits": [[0.0, 1.0], [2.0, 0.5]], "targets": [1, 0]}
    assert (await client.post(f"/v1/runs/{run['id']}/batches", json=body)).status_code == 200
    assert (await client.post(f"/v1/runs/{run['id']}/batches", json=body)).status_code == 200
    assert (await client.get("/v1/runs/run_missing")).status_code == 404
    assert (await client.post("/v1/runs", json={"loss": "cross_entropy"})).status_code == 422
    assert (await client.get("/no/such/path")).status_code == 404
    evaluate = {"loss": "cross_entropy", "logits": [[0.0, 1.0]], "targets": [1]}
    assert (await client.post("/v1/evaluate", json=evaluate)).status_code == 200
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert {name for name, _ in after} >= {
        "ce_eval_requests_total",
        "ce_eval_request_duration_seconds_bucket",
        "ce_eval_evaluate_duration_seconds_count",
        "ce_eval_rejected_total",
        "ce_eval_inflight",
        "ce_eval_batches_total",
        "ce_eval_build_info",
    }
    batch_route = "/v1/runs/{run_id}/batches"
    assert (
        delta(
            "ce_eval_requests_total",
            transport="http",
            route=batch_route,
            method="POST",
            status="200",
        )
        == 2
    )
    assert (
        delta(
            "ce_eval_requests_total",
            transport="http",
            route="/v1/runs/{run_id}",
            method="GET",
            status="404",
        )
        == 1
    )
    assert (
        delta(
            "ce_eval_requests_total",
            transport="http",
            route="<unmatched>",
            method="GET",
            status="404",
        )
        == 1
    )
    assert not any(run["id"] in str(labels) for _, labels in after)
    assert delta("ce_eval_rejected_total", reason="not_found") == 2
    assert delta("ce_eval_rejected_total", reason="validation") == 1
    assert delta("ce_eval_batches_total", outcome="accepted") == 1
    assert delta("ce_eval_batches_total", outcome="duplicate") == 1
    # the first push and the evaluate; the retry of a run whose configuration the replica
    # keeps is evaluated again before its batch id is found under the run's lock
    assert (
        delta("ce_eval_evaluate_duration_seconds_count", loss="cross_entropy", backend="numpy") == 3
    )
    assert delta("ce_eval_request_duration_seconds_count", route=batch_route, method="POST") == 2
    assert value(after, "ce_eval_inflight") == 1  # the scrape itself
    build = [labels for name, labels in after if name == "ce_eval_build_info"]
    assert build and dict(build[0])["version"]


def test_metrics_in_multiprocess_mode(tmp_path, serve):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    server: ServerProcess = serve(
        f"sqlite:///{tmp_path / 'runs.db'}", PROMETHEUS_MULTIPROC_DIR=str(directory)
    ).start()
    for _ in range(3):
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    scraped = samples(httpx.get(f"{server.url}/metrics").text)
    assert (
        value(
            scraped,
            "ce_eval_requests_total",
            transport="http",
            route="/healthz",
            method="GET",
            status="200",
        )
        == 3
    )
    assert any(name == "ce_eval_build_info" for name, _ in scraped)
    assert list(directory.glob("*.db"))  # samples live in the shared directory


async def test_grpc_calls_are_counted_with_transport_grpc(settings: Settings) -> None:
    evaluate = "/ce_eval.v1.LossEvaluation/Evaluate"
    async with in_process_stack(settings) as (_, rest, channel, _server):
        stub = pb_grpc.LossEvaluationStub(channel)
        before = await scrape(rest)
        good = request_to_proto("cross_entropy", np.zeros((2, 3), np.float32), [0, 2])
        for _ in range(2):
            await stub.Evaluate(good)
        bad = request_to_proto("cross_entropy", np.zeros((2, 3), np.float32), [0, 7])
        try:
            await stub.Evaluate(bad)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("target 7 of 3 classes was accepted")
        after = await scrape(rest)

    def delta(**labels: str) -> float:
        name = "ce_eval_requests_total"
        return value(after, name, **labels) - value(before, name, **labels)

    grpc_call = {"transport": "grpc", "route": evaluate, "method": "POST"}
    assert delta(**grpc_call, status="OK") == 2
    assert delta(**grpc_call, status="INVALID_ARGUMENT") == 1
    assert delta(transport="http", route="/metrics", method="GET", status="200") == 1
