"""The REST SDK's runs calls (``Client`` and ``AsyncClient``) against a real ``ce-eval serve``.

Expected aggregates come from ``tests.reference`` over all rows concatenated, never from the
run store. Request shapes the server cannot show (the exact path and query sent) are checked on
``httpx.MockTransport``, which records what the SDK puts on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from ce_eval_client.sdk import AsyncClient, Client, EvaluationError, run_path
from tests.reference import softmax_ce
from tests.servers import ServerProcess, start_serve

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = start_serve()
    yield process
    process.stop()


def _batches(seed: int, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((n, NUM_CLASSES)).astype(np.float32),
            rng.integers(0, NUM_CLASSES, size=n),
            rng.uniform(0.5, 2.0, size=n).astype(np.float32),
        )
        for n in sizes
    ]


def _reference(batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(sum, denominator) of the weighted mean cross-entropy over all rows, float64."""
    z = np.concatenate([b[0] for b in batches]).astype(np.float64)
    y = np.concatenate([b[1] for b in batches])
    w = np.concatenate([b[2] for b in batches])
    per, den, _ = softmax_ce(z, y, fmt="index", sample_weight=w)
    return float(per.sum()), float(den.sum())


def _accuracy(batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    weights = np.concatenate([b[2] for b in batches]).astype(np.float64)
    hits = np.concatenate([b[0].argmax(axis=1) == b[1] for b in batches])
    return float((hits * weights).sum() / weights.sum())


def test_sync_client_runs_round_trip(server: ServerProcess) -> None:
    batches = _batches(3, [7, 5, 9])
    with Client(server.url) as client:
        run = client.create_run(
            "sdk-rest", "cross_entropy", metrics=["accuracy"], tags={"team": "a"}
        )
        assert run["status"] == "open" and run["tags"] == {"team": "a"}
        answers = [
            client.add_batch(run["id"], f"b{i}", z, y, sample_weight=w)
            for i, (z, y, w) in enumerate(batches)
        ]
        assert [a["duplicate"] for a in answers] == [False, False, False]
        again = client.add_batch(run["id"], "b0", *batches[0])
        assert again["duplicate"] is True
        got = client.get_run(run["id"])
        total, denominator = _reference(batches)
        assert got["batches"] == 3 and got["count"] == 21
        assert got["sum"] == pytest.approx(total, rel=1e-6)
        assert got["denominator"] == pytest.approx(denominator, rel=1e-12)
        assert got["metrics"]["accuracy"] == pytest.approx(_accuracy(batches), rel=1e-12)
        listed = client.list_runs(tags=["team:a"], status="open")
        assert [r["id"] for r in listed["runs"]] == [run["id"]]
        closed = client.close_run(run["id"])
        assert closed["status"] == "closed"
        with pytest.raises(EvaluationError) as late:
            client.add_batch(run["id"], "b9", *batches[1])
        assert late.value.status == 409
        client.delete_run(run["id"])
        with pytest.raises(EvaluationError) as gone:
            client.get_run(run["id"])
        assert gone.value.status == 404


async def test_async_client_runs_round_trip(server: ServerProcess) -> None:
    batches = _batches(4, [6, 3])
    async with AsyncClient(server.url) as client:
        run = await client.create_run("sdk-async", "cross_entropy", metrics=["accuracy"])
        for i, (z, y, w) in enumerate(batches):
            await client.add_batch(run["id"], f"b{i}", z, y, sample_weight=w)
        got = await client.get_run(run["id"])
        total, denominator = _reference(batches)
        assert got["sum"] == pytest.approx(total, rel=1e-6)
        assert got["denominator"] == pytest.approx(denominator, rel=1e-12)
        page = await client.list_runs(name="sdk-async")
        assert [r["id"] for r in page["runs"]] == [run["id"]]
        assert (await client.close_run(run["id"]))["status"] == "closed"
        await client.delete_run(run["id"])
        with pytest.raises(EvaluationError) as gone:
            await client.get_run(run["id"])
        assert gone.value.status == 404


def test_unknown_run_is_a_404_error(server: ServerProcess) -> None:
    with Client(server.url) as client, pytest.raises(EvaluationError) as caught:
        client.get_run("run_does_not_exist")
    assert caught.value.status == 404 and caught.value.detail


def _recording_client() -> tuple[Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"name": "x"})

    http = httpx.Client(base_url="http://runs.test", transport=httpx.MockTransport(answer))
    return Client(http=http), seen


@pytest.mark.parametrize(
    ("run_id", "raw_path"),
    [
        ("run_abc", b"/v1/runs/run_abc/batches"),
        ("../../v1/evaluate?x=", b"/v1/runs/%2E%2E%2F%2E%2E%2Fv1%2Fevaluate%3Fx%3D/batches"),
        ("..", b"/v1/runs/%2E%2E/batches"),
        ("a#b c%", b"/v1/runs/a%23b%20c%25/batches"),
    ],
)
def test_run_ids_travel_as_one_encoded_path_segment(run_id: str, raw_path: bytes) -> None:
    client, seen = _recording_client()
    with client:
        client.add_batch(run_id, "b0", np.zeros((1, 2), np.float32), np.array([0]))
    (request,) = seen
    assert request.url.raw_path == raw_path
    assert request.url.query == b""


def test_an_empty_run_id_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="run_id"):
        run_path("")


def test_run_metric_query_follows_the_contract() -> None:
    """``GET /v1/runs/{id}/metrics/{name}`` as the runs contract spells its query."""
    client, seen = _recording_client()
    with client:
        client.run_metric("run_1", "confusion_matrix", top=20, normalize=True)
        client.run_metric("run_1", "confusion_matrix", classes=[3, 17, 40], normalize=False)
        client.run_metric("run_1", "per_class", sort="f1", order="asc", limit=10, offset=None)
    paths = [(r.url.path, dict(r.url.params)) for r in seen]
    assert paths == [
        ("/v1/runs/run_1/metrics/confusion_matrix", {"top": "20", "normalize": "true"}),
        (
            "/v1/runs/run_1/metrics/confusion_matrix",
            {"classes": "3,17,40", "normalize": "false"},
        ),
        ("/v1/runs/run_1/metrics/per_class", {"sort": "f1", "order": "asc", "limit": "10"}),
    ]


def detail_endpoint_served(url: str) -> bool:
    """Whether the server's OpenAPI lists ``GET /v1/runs/{id}/metrics/{name}``."""
    paths = httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    return any(p.startswith("/v1/runs/{") and "/metrics/" in p for p in paths)


def test_run_metric_against_the_server(server: ServerProcess) -> None:
    """Needs the server's ``GET /v1/runs/{id}/metrics/{name}`` (the runs contract); skipped,
    saying so, on a build without it."""
    rng = np.random.default_rng(8)
    z = rng.standard_normal((40, NUM_CLASSES))
    y = rng.integers(0, NUM_CLASSES, size=40)
    with Client(server.url) as client:
        run = client.create_run("detail", "cross_entropy", metrics=["confusion_matrix"])
        client.add_batch(run["id"], "b0", z, y)
        if not detail_endpoint_served(server.url):
            pytest.skip("GET /v1/runs/{id}/metrics/{name} is not served by this build yet")
        expected = np.zeros((NUM_CLASSES, NUM_CLASSES))
        np.add.at(expected, (y, z.argmax(axis=1)), 1.0)
        full: dict[str, Any] = client.run_metric(run["id"], "confusion_matrix")
        np.testing.assert_array_equal(np.asarray(full["matrix"]), expected)
        top = client.run_metric(run["id"], "confusion_matrix", top=3)["top"]
        off = [(expected[i, j], -i, -j) for i in range(NUM_CLASSES) for j in range(NUM_CLASSES)]
        want = sorted((c, i, j) for c, i, j in off if i != j)[::-1][:3]
        assert [(t["count"], -t["true"], -t["pred"]) for t in top] == want
        with pytest.raises(EvaluationError) as missing:
            client.run_metric(run["id"], "reliability")
        assert missing.value.status == 404


def test_add_batch_goes_as_protobuf_with_raw_tensor_bytes() -> None:
    """The default transport pushes ``ce_eval.v1.AddBatchRequest`` (no base64): the body
    parses to the batch's own arrays, ids and slices."""
    from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb

    client, seen = _recording_client()
    z = np.arange(6, dtype=np.float32).reshape(2, 3)
    with client:
        client.add_batch(
            "run_a", "b7", z, np.array([2, 0]), np.array([1.0, 0.5], np.float32),
            example_ids=["x", "y"], slices={"lang": ["de", "en"]},
        )  # fmt: skip
    (request,) = seen
    assert request.headers["content-type"] == "application/x-protobuf"
    message = pb.AddBatchRequest.FromString(request.content)
    assert (message.run_id, message.batch_id) == ("run_a", "b7")
    assert (message.logits.dtype, list(message.logits.shape)) == ("float32", [2, 3])
    assert message.logits.data == z.tobytes()
    assert message.targets.data == np.array([2, 0], "<i8").tobytes()
    assert list(message.example_ids) == ["x", "y"]
    assert list(message.slices["lang"].values) == ["de", "en"]


def test_protobuf_and_json_pushes_are_one_batch(server: ServerProcess) -> None:
    """A batch sent in protobuf and retried in JSON (base64) is the same batch (one count);
    other content under its id is a 409 in either encoding."""
    (z, y, w), (z2, y2, w2) = _batches(11, [6, 6])
    with Client(server.url) as binary, Client(server.url, transport="base64") as text:
        run = binary.create_run("mixed", "cross_entropy")
        first = binary.add_batch(run["id"], "b0", z, y, w)
        again = text.add_batch(run["id"], "b0", z, y, w)
        assert (first["duplicate"], again["duplicate"]) == (False, True)
        assert again["run"]["count"] == first["run"]["count"] == 6
        total, denominator = _reference([(z, y, w)])
        assert first["run"]["sum"] == pytest.approx(total, rel=1e-6)
        assert first["run"]["denominator"] == pytest.approx(denominator, rel=1e-6)
        for client in (binary, text):
            with pytest.raises(EvaluationError) as conflict:
                client.add_batch(run["id"], "b0", z2, y2, w2)
            assert conflict.value.status == 409


def test_bad_protobuf_batches_are_structured_errors(server: ServerProcess) -> None:
    from ce_eval_client.proto import batch_to_proto

    with Client(server.url) as client:
        run_id = client.create_run("bad", "cross_entropy")["id"]
    url = f"{server.url}{run_path(run_id, 'batches')}"
    headers = {"content-type": "application/x-protobuf"}
    z, y = np.zeros((2, 3), np.float32), np.array([0, 1])

    def post(body: bytes) -> httpx.Response:
        return httpx.post(url, content=body, headers=headers, timeout=30)

    garbage = post(b"\xff\xff\xff")
    assert garbage.status_code == 400
    assert "AddBatchRequest" in garbage.json()["detail"]
    assert garbage.json()["errors"][0]["loc"] == ["body"]
    assert post(b"").status_code == 400
    other = post(batch_to_proto("run_other", "b0", z, y).SerializeToString())
    assert other.status_code == 422
    assert other.json()["errors"][0]["loc"] == ["body", "run_id"]
    short = batch_to_proto("", "b0", z, y)
    short.logits.data = b"\x00" * 5  # 2 × 3 float32 need 24 bytes
    answer = post(short.SerializeToString())
    assert answer.status_code == 422 and answer.json()["errors"][0]["loc"][:2] == ["logits", "data"]
    missing = post(batch_to_proto("", "", z, y).SerializeToString())
    assert missing.status_code == 422
    wrong_type = httpx.post(url, content=b"x", headers={"content-type": "text/plain"}, timeout=30)
    assert wrong_type.status_code == 415
    with Client(server.url) as client:
        assert client.get_run(run_id)["batches"] == 0
