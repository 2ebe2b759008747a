"""A real ``ce-eval serve`` (HTTP + gRPC in one process): every transport, gRPC errors,
tritonclient, the CLI, and a graceful stop on SIGTERM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import orjson
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ce_eval_client.cli import main as cli_main
from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2_grpc as pb_grpc
from ce_eval_client.proto import request_to_proto
from ce_eval_client.sdk import TRANSPORTS, Client, EvaluationError, GrpcClient
from tests.reference import log_softmax_row, softmax_ce
from tests.servers import ServeProcess, start_serve

MAX_ELEMENTS = 200_000
MAX_BODY = 1024 * 1024
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    process = start_serve(
        {"CE_EVAL_MAX_ELEMENTS": str(MAX_ELEMENTS), "CE_EVAL_MAX_BODY_BYTES": str(MAX_BODY)}
    )
    yield process
    process.stop()


def reference(
    logits: np.ndarray, targets: np.ndarray, smoothing: float
) -> tuple[float, np.ndarray]:
    """Mean CE and its gradient in float64: ∂ℓ/∂z = (softmax(z) − q) / N, q smoothed one-hot."""
    z = logits.astype(np.float64)
    n, c = z.shape
    per, den, _ = softmax_ce(z, targets, fmt="index", label_smoothing=smoothing)
    grad = np.zeros_like(z)
    for i in range(n):
        q = np.full(c, smoothing / c)
        q[targets[i]] += 1.0 - smoothing
        grad[i] = (np.exp(log_softmax_row(z[i])) - q) / n
    return float(per.sum() / den.sum()), grad


def evaluate_over(transport: str, server: ServeProcess, logits: np.ndarray, targets: np.ndarray):
    kwargs = {"options": {"label_smoothing": 0.1}, "outputs": ["loss", "grad", "per_sample"]}
    if transport == "grpc":
        with GrpcClient(server.grpc_target) as grpc_client:
            return grpc_client.evaluate("cross_entropy", logits, targets, **kwargs)
    with Client(server.url, transport=transport) as client:  # type: ignore[arg-type]
        return client.evaluate("cross_entropy", logits, targets, **kwargs)


ALL_TRANSPORTS = [*TRANSPORTS, "grpc"]
BINARY = [t for t in ALL_TRANSPORTS if t != "json"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(12, 7), (12, 1500)], ids=["small", "over-64KiB"])
def test_every_transport_gives_the_same_numbers(
    server: ServeProcess, dtype: type, shape: tuple[int, int]
) -> None:
    # over 64 KiB, protobuf bodies are split with the tensor bytes left in place (server side)
    logits = (RNG.standard_normal(shape) * 4).astype(dtype)
    targets = RNG.integers(0, shape[1], size=12)
    results = {t: evaluate_over(t, server, logits, targets) for t in ALL_TRANSPORTS}
    expected_value, expected_grad = reference(logits, targets, 0.1)
    tol = 1e-5 if dtype is np.float32 else 1e-12
    first = results[BINARY[0]]
    for transport, result in results.items():
        assert result.value == pytest.approx(expected_value, rel=tol), transport
        np.testing.assert_allclose(result.outputs["grad"], expected_grad, rtol=tol, atol=tol)
        assert (result.count, result.denominator, result.reduction) == (12, 12.0, "mean")
        if transport in BINARY:  # same bytes in → bit-identical answers, dtype kept
            assert result.value == first.value and result.sum == first.sum, transport
            assert result.outputs["grad"].dtype == np.dtype(dtype)
            np.testing.assert_array_equal(result.outputs["grad"], first.outputs["grad"])
            np.testing.assert_array_equal(result.outputs["per_sample"], first.outputs["per_sample"])


def test_float64_json_lists_match_binary_exactly(server: ServeProcess) -> None:
    logits = RNG.standard_normal((5, 3))
    targets = RNG.integers(0, 3, size=5)
    listed = evaluate_over("json", server, logits, targets)
    binary = evaluate_over("protobuf", server, logits, targets)
    assert listed.value == binary.value
    np.testing.assert_array_equal(listed.outputs["grad"], binary.outputs["grad"])


def _grpc_error(channel: grpc.Channel, message: pb.EvaluateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossEvaluationStub(channel).Evaluate(message, timeout=30)
    return info.value


def _valid_request(**changes: object) -> pb.EvaluateRequest:
    message = request_to_proto(
        "cross_entropy", RNG.standard_normal((4, 5)).astype(np.float32), np.array([0, 1, 2, 3])
    )
    for name, value in changes.items():
        if name.startswith("logits."):
            setattr(message.logits, name.split(".", 1)[1], value)
        else:
            setattr(message, name, value)
    return message


def _bad(case: str) -> pb.EvaluateRequest:
    if case == "label":
        return request_to_proto(
            "cross_entropy", np.zeros((4, 5), np.float32), np.array([0, 1, 2, 9])
        )
    if case == "option":
        return request_to_proto(
            "cross_entropy",
            np.zeros((4, 5), np.float32),
            np.array([0, 1, 2, 3]),
            options={"label_smoothing": 3},
        )
    if case == "dtype":
        return _valid_request(**{"logits.dtype": "float8"})
    if case == "bytes":
        return _valid_request(**{"logits.data": b"\x00" * 7})
    if case == "loss":
        return _valid_request(loss="nope")
    if case == "missing":
        message = _valid_request()
        message.ClearField("logits")
        return message
    if case == "output":
        message = _valid_request()
        message.outputs[:] = ["loss", "hessian_of_nothing"]
        return message
    assert case == "elements"
    return request_to_proto("cross_entropy", np.zeros((MAX_ELEMENTS + 1,), np.uint8), np.array([0]))


GRPC_CASES = [
    ("label", "INVALID_ARGUMENT", ["targets", 3]),
    ("option", "INVALID_ARGUMENT", ["options", "label_smoothing"]),
    ("dtype", "INVALID_ARGUMENT", ["logits", "dtype"]),
    ("bytes", "INVALID_ARGUMENT", ["logits", "data"]),
    ("loss", "INVALID_ARGUMENT", ["loss"]),
    ("missing", "INVALID_ARGUMENT", ["logits"]),
    ("output", "INVALID_ARGUMENT", ["outputs", 1]),
    ("elements", "RESOURCE_EXHAUSTED", ["logits"]),
]


@pytest.mark.parametrize(("case", "code", "loc"), GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_bad_input_maps_to_status_with_field_details(
    channel: grpc.Channel, case: str, code: str, loc: list[object]
) -> None:
    error = _grpc_error(channel, _bad(case))
    assert error.code().name == code
    trailers = dict(error.trailing_metadata())
    errors = orjson.loads(trailers["ce-eval-errors-bin"])
    assert errors[0]["loc"] == loc
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == error.code().value[0]
    bad_request = error_details_pb2.BadRequest()
    problem = pb.Problem()
    assert status.details[0].Unpack(bad_request) and status.details[1].Unpack(problem)
    assert bad_request.field_violations[0].field == ".".join(map(str, loc))
    assert problem.status in (413, 422) and problem.errors[0].msg == errors[0]["msg"]


def test_grpc_message_over_the_body_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    big = request_to_proto(
        "cross_entropy", np.zeros((MAX_BODY // 4 + 16,), np.float32), np.array([0])
    )
    assert big.ByteSize() > MAX_BODY
    assert _grpc_error(channel, big).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_client_raises_the_problem(server: ServeProcess) -> None:
    with GrpcClient(server.grpc_target) as client, pytest.raises(EvaluationError) as info:
        client.evaluate("cross_entropy", np.zeros((2, 3), np.float32), np.array([0, 5]))
    assert info.value.status == "INVALID_ARGUMENT"
    assert info.value.errors[0]["loc"] == ["targets", 1]


def test_grpc_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "ce_eval.v1.LossEvaluation"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in answer.list_services_response.service}
    assert {"ce_eval.v1.LossEvaluation", "grpc.health.v1.Health"} <= names


def test_tritonclient_round_trip(server: ServeProcess) -> None:
    tritonclient_http = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    logits = RNG.standard_normal((6, 5)).astype(np.float32)
    targets = RNG.integers(0, 5, size=6)
    client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cross_entropy")
    metadata = client.get_model_metadata("cross_entropy")
    assert [i["name"] for i in metadata["inputs"]][:2] == ["logits", "targets"]
    expected_value, expected_grad = reference(logits, targets, 0.1)
    for binary_input in (True, False):
        z = tritonclient_http.InferInput("logits", list(logits.shape), "FP32")
        z.set_data_from_numpy(logits, binary_data=binary_input)
        y = tritonclient_http.InferInput("targets", list(targets.shape), "INT64")
        y.set_data_from_numpy(targets, binary_data=binary_input)
        result = client.infer(
            "cross_entropy",
            [z, y],
            outputs=[
                tritonclient_http.InferRequestedOutput("loss", binary_data=False),
                tritonclient_http.InferRequestedOutput("grad", binary_data=True),
            ],
            parameters={"label_smoothing": 0.1},
        )
        assert result.as_numpy("loss")[0] == pytest.approx(expected_value, rel=1e-5)
        np.testing.assert_allclose(result.as_numpy("grad"), expected_grad, rtol=1e-5, atol=1e-6)
        assert result.get_response()["parameters"]["denominator"] == 6.0
    with pytest.raises(InferenceServerException, match="label_smoothing"):
        client.infer("cross_entropy", [z, y], parameters={"label_smoothing": 3})
    with pytest.raises(InferenceServerException, match="not found"):
        client.get_model_metadata("no_such_loss")
    client.close()


def test_tritonclient_reads_metrics_and_errors(server: ServeProcess) -> None:
    """Stock tritonclient: the ``metrics`` BYTES output decodes; errors decode to our text."""
    tritonclient_http = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 0.0, 0.0]], np.float32)
    targets = np.array([0, 1, 0], np.int64)
    expected_accuracy = float(np.mean(logits.astype(np.float64).argmax(1) == targets))
    client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    for binary in (False, True):
        z = tritonclient_http.InferInput("logits", list(logits.shape), "FP32")
        z.set_data_from_numpy(logits, binary_data=binary)
        y = tritonclient_http.InferInput("targets", list(targets.shape), "INT64")
        y.set_data_from_numpy(targets, binary_data=binary)
        result = client.infer(
            "cross_entropy",
            [z, y],
            outputs=[
                tritonclient_http.InferRequestedOutput("loss", binary_data=binary),
                tritonclient_http.InferRequestedOutput("metrics", binary_data=binary),
            ],
            parameters={"metrics": "accuracy"},
        )
        (text,) = result.as_numpy("metrics")
        assert orjson.loads(text)["accuracy"] == pytest.approx(expected_accuracy, rel=1e-12)
    bad = tritonclient_http.InferInput("targets", [3], "INT64")
    bad.set_data_from_numpy(np.array([0, 1, 7], np.int64))
    with pytest.raises(InferenceServerException, match=r"targets.*7"):
        client.infer("cross_entropy", [z, bad])
    with pytest.raises(InferenceServerException, match="unknown input 'nope'"):
        client.infer("cross_entropy", [tritonclient_http.InferInput("nope", [1], "FP32"), y])
    client.close()


def test_cli_evaluate_saves_outputs(server: ServeProcess, tmp_path: Path, capsys) -> None:
    logits = RNG.standard_normal((8, 4)).astype(np.float32)
    targets = RNG.integers(0, 4, size=8)
    np.save(tmp_path / "z.npy", logits)
    np.savez(tmp_path / "y.npz", labels=targets)
    grad_file = tmp_path / "grad.npy"
    common = ["--logits", str(tmp_path / "z.npy"), "--targets", f"{tmp_path / 'y.npz'}:labels"]
    code = cli_main(
        [
            "evaluate",
            "--url",
            server.url,
            *common,
            "--option",
            "label_smoothing=0.1",
            "--output",
            f"grad={grad_file}",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    expected_value, expected_grad = reference(logits, targets, 0.1)
    assert summary["value"] == pytest.approx(expected_value, rel=1e-5)
    np.testing.assert_allclose(np.load(grad_file), expected_grad, rtol=1e-5, atol=1e-6)
    code = cli_main(
        ["evaluate", "--transport", "grpc", "--grpc-target", server.grpc_target, *common]
    )
    assert code == 0
    assert "cross_entropy:" in capsys.readouterr().out
    code = cli_main(["evaluate", "--url", server.url, *common, "--option", "ignore_index=x"])
    assert code == 1
    assert "options.ignore_index" in capsys.readouterr().err


def test_sigterm_stops_both_servers_gracefully() -> None:
    process = start_serve()
    code, stderr = process.stop(timeout=20)
    assert code == 0, stderr  # a clean drain exits 0, not 143 / -15
    assert "Traceback" not in stderr
    with grpc.insecure_channel(process.grpc_target) as ch, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
