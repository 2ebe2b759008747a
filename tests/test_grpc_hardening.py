"""gRPC against a real ``ce-eval serve`` with API keys: the SDK's run methods, draining, and
hypothesis-generated requests that may only ever get documented status codes (DESIGN §4)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ce_engine
from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2_grpc as pb_grpc
from ce_eval_client.proto import array_to_tensor, batch_to_proto
from ce_eval_client.sdk import EvaluationError, GrpcClient
from tests.servers import ServeProcess, start_serve
from tests.test_runs import make_batches

KEY = "fuzz-key-0123456789"
OTHER_KEY = "other-key-9876543210"
MAX_ELEMENTS = 4096
ENV = {
    "CE_EVAL_API_KEYS": f"{KEY},{OTHER_KEY}",
    "CE_EVAL_MAX_ELEMENTS": str(MAX_ELEMENTS),
    "CE_EVAL_MAX_BODY_BYTES": str(256 * 1024),
    # the generated requests send wrong keys; the address would be throttled (429) for the
    # tests after them (throttling has tests of its own)
    "CE_EVAL_AUTH_FAILURES_PER_MINUTE": "0",
}
AUTH = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    process = start_serve(ENV)
    yield process
    process.stop()


def test_sdk_runs_over_grpc_match_rest(server: ServeProcess) -> None:
    batches = make_batches(21, [6, 3, 8])
    with GrpcClient(server.grpc_target, api_key=KEY) as client:
        run = client.create_run(
            "sdk",
            "cross_entropy",
            options={"ignore_index": -100},
            metrics=["accuracy"],
            tags={"via": "sdk"},
        )
        first = client.add_batch(run["id"], "0", **batches[0])
        assert (first["seq"], first["duplicate"]) == (1, False)
        summary = client.add_batches(
            run["id"],
            [{"batch_id": str(i), **b} for i, b in enumerate(batches)],  # "0" again: duplicate
        )
        assert (summary["accepted"], summary["duplicates"]) == (2, 1)
        run = client.get_run(run["id"])
        assert run["batches"] == 3 and run == summary["run"]
        assert [r["id"] for r in client.list_runs(tags=["via:sdk"])["runs"]] == [run["id"]]
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as rest:
        assert rest.get(f"/v1/runs/{run['id']}").json() == run
    with GrpcClient(server.grpc_target, api_key=OTHER_KEY) as other:
        with pytest.raises(EvaluationError) as info:
            other.get_run(run["id"])
        assert info.value.status == "NOT_FOUND" and info.value.problem["status"] == 404
    with GrpcClient(server.grpc_target) as anonymous:
        with pytest.raises(EvaluationError) as info:
            anonymous.list_runs()
        assert info.value.status == "UNAUTHENTICATED" and info.value.problem["status"] == 401


# ---- fuzzing: any message → OK or a documented code with the REST problem in its details ----

HTTP_STATUS_OF = {
    "INVALID_ARGUMENT": {400, 415, 422},
    "NOT_FOUND": {404},
    "ALREADY_EXISTS": {409},
    "FAILED_PRECONDITION": {409, 422},
    "RESOURCE_EXHAUSTED": {413, 429},
    "UNAVAILABLE": {503},
    "UNAUTHENTICATED": {401},
    "PERMISSION_DENIED": {403},
}
LOSSES = sorted(ce_engine.all_losses())
OPTION_NAMES = sorted(
    {name for spec in ce_engine.all_losses().values() for name in spec.options_model.model_fields}
)
DTYPES = [
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
    "object",
    "float8",
    "<f4",
    "",
]
ITEMSIZE = {
    name: 2 if name == "bfloat16" else np.dtype(name).itemsize
    for name in DTYPES[:13]  # the wire dtypes
}


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    small = st.lists(st.integers(0, 6), min_size=0, max_size=3)
    hostile = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)
    shape = draw(small | hostile)
    size = int(np.prod(shape, dtype=object)) if shape else 1
    if dtype in ITEMSIZE and 0 <= size * ITEMSIZE[dtype] <= 2048 and draw(st.booleans()):
        data = draw(st.binary(min_size=size * ITEMSIZE[dtype], max_size=size * ITEMSIZE[dtype]))
    else:
        data = draw(st.binary(max_size=96))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def plausible(draw: st.DrawFn) -> dict[str, pb.Tensor]:
    """Logits, targets (and maybe weights) of consistent shapes and byte lengths, arbitrary
    bytes (NaN, ±inf, subnormals) and labels in or out of range: requests the engine runs."""
    n, c = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    positions = draw(st.sampled_from([(), (2,)]))
    dtype = draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"]))
    size = n * c * (2 if positions else 1) * ITEMSIZE[dtype]
    logits = pb.Tensor(
        dtype=dtype,
        shape=[n, *positions, c],
        data=draw(
            st.binary(min_size=size, max_size=size)
            | st.builds(
                lambda v: (
                    np.full(size // ITEMSIZE[dtype], v, dtype).tobytes()
                    if dtype != "bfloat16"
                    else b"\0" * size
                ),
                st.floats(-1e4, 1e4, width=16),
            )
        ),
    )
    label_dtype = draw(st.sampled_from(["int64", "int32", "uint8", "int8"]))
    count = n * (2 if positions else 1)
    labels = np.array(
        draw(st.lists(st.integers(0, c - 1), min_size=count, max_size=count)), dtype=np.int64
    )
    if draw(st.booleans()):  # one label ignored or out of range
        labels[draw(st.integers(0, count - 1))] = draw(st.sampled_from([-100, -1, c, 2**31]))
    targets = pb.Tensor(
        dtype=label_dtype,
        shape=[n, *positions],
        data=labels.astype(label_dtype, casting="unsafe").tobytes(),
    )
    result = {"logits": logits, "targets": targets}
    if draw(st.booleans()):
        weights = draw(st.lists(st.floats(-1, 4, width=32), min_size=n, max_size=n))
        result["sample_weight"] = pb.Tensor(
            dtype="float32", shape=[n], data=np.array(weights, np.float32).tobytes()
        )
    return result


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | st.integers(-(2**53), 2**53)
    | st.sampled_from(["mean", "sum", "none", "batchmean", "index", "probs", "2", "e"])
    | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=8,
)
options = st.dictionaries(st.sampled_from([*OPTION_NAMES, "bogus"]), json_values, max_size=3)
losses = st.just("cross_entropy") | st.sampled_from([*LOSSES, "nope", ""])
metrics = st.lists(
    st.sampled_from(["accuracy", "top_k_accuracy", "ece", "confusion_matrix", "f1", "nope"]),
    max_size=3,
)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


@st.composite
def evaluate_calls(draw: st.DrawFn) -> tuple[str, bytes]:
    message = pb.EvaluateRequest(
        loss=draw(losses),
        outputs=draw(
            st.lists(
                st.sampled_from(
                    [
                        "loss",
                        "grad",
                        "per_sample",
                        "hessian",
                        "hessian_diag",
                        "hvp",
                        "probabilities",
                        "log_probabilities",
                    ]
                )
                | st.just("bogus"),
                max_size=3,
            )
        ),
        metrics=draw(metrics),
        backend=draw(st.sampled_from(["", "auto", "numpy"]) | st.sampled_from(["cupy", "tpu"])),
    )
    _fill(draw, message, ("logits", "targets", "sample_weight", "vector"))
    opts = draw(maybe(options))
    if opts is not None:
        message.options.CopyFrom(struct(opts))
    return "Evaluate", message.SerializeToString()


def _fill(draw: st.DrawFn, message: Any, names: tuple[str, ...]) -> None:
    """Half the time a plausible batch, else each tensor field absent or arbitrary."""
    chosen = draw(plausible()) if draw(st.booleans()) else {}
    for name in names:
        tensor = chosen.get(name) if chosen else draw(maybe(tensors()))
        if tensor is not None:
            getattr(message, name).CopyFrom(tensor)


valid_options = st.fixed_dictionaries(
    {},
    optional={
        "label_smoothing": st.floats(0, 1),
        "ignore_index": st.just(-100),
        "reduction": st.sampled_from(["mean", "sum", "none"]),
        "temperature": st.floats(0.01, 100),
        "log_base": st.sampled_from(["e", "2"]),
        "top_k": st.lists(st.integers(1, 6), min_size=1, max_size=2),
    },
)


@st.composite
def plausible_evaluate_calls(draw: st.DrawFn) -> tuple[str, bytes]:
    """Mostly valid requests with arbitrary tensor bytes, dtypes and shapes (the engine runs)."""
    message = pb.EvaluateRequest(
        loss="cross_entropy",
        outputs=draw(
            st.lists(
                st.sampled_from(["loss", "grad", "per_sample", "hessian_diag", "probabilities"]),
                max_size=3,
            )
        ),
        metrics=draw(
            st.lists(st.sampled_from(["accuracy", "ece", "confusion_matrix", "nll"]), max_size=2)
        ),
    )
    for name, tensor in draw(plausible()).items():
        getattr(message, name).CopyFrom(tensor)
    message.options.CopyFrom(struct(draw(valid_options)))
    return "Evaluate", message.SerializeToString()


@st.composite
def plausible_batches(draw: st.DrawFn) -> pb.AddBatchRequest:
    message = pb.AddBatchRequest(
        run_id=RUN_IDS.get("open", ""), batch_id=draw(st.sampled_from("abcdefgh"))
    )
    for name, tensor in draw(plausible()).items():
        getattr(message, name).CopyFrom(tensor)
    return message


RUN_IDS: dict[str, str] = {}  # filled by the test: an open and a closed run of the key


@st.composite
def batch_messages(draw: st.DrawFn) -> pb.AddBatchRequest:
    message = pb.AddBatchRequest(
        run_id=draw(st.sampled_from(["open", "closed", "run_missing", ""])),
        batch_id=draw(st.sampled_from(["a", "b", "c", "d", ""]) | st.text(max_size=8)),
    )
    message.run_id = RUN_IDS.get(message.run_id, message.run_id)
    _fill(draw, message, ("logits", "targets", "sample_weight"))
    return message


@st.composite
def create_run_calls(draw: st.DrawFn) -> tuple[str, bytes]:
    message = pb.CreateRunRequest(
        name=draw(st.text(max_size=8)),
        loss=draw(losses),
        metrics=draw(metrics),
        class_names=draw(st.lists(st.text(max_size=3), max_size=3)),
        tags=draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3)),
    )
    opts = draw(maybe(options))
    if opts is not None:
        message.options.CopyFrom(struct(opts))
    return "CreateRun", message.SerializeToString()


list_calls = st.builds(
    lambda **fields: ("ListRuns", pb.ListRunsRequest(**fields).SerializeToString()),
    name=st.text(max_size=6),
    tags=st.lists(st.text(max_size=6), max_size=3),
    status=st.sampled_from(["", "open", "closed", "done"]),
    limit=st.integers(-(2**31), 2**31 - 1),
    cursor=st.text(max_size=8),
)
get_calls = st.builds(
    lambda run_id: (
        "GetRun",
        pb.GetRunRequest(run_id=RUN_IDS.get(run_id, run_id)).SerializeToString(),
    ),
    st.sampled_from(["open", "closed", "run_missing", ""]) | st.text(max_size=8),
)
add_calls = batch_messages().map(lambda m: ("AddBatch", m.SerializeToString()))
stream_calls = st.lists(batch_messages(), max_size=3).map(
    lambda ms: ("AddBatches", [m.SerializeToString() for m in ms])
)
raw_calls = st.tuples(
    st.sampled_from(["Evaluate", "CreateRun", "AddBatch", "GetRun", "ListRuns"]),
    st.binary(max_size=64),
)
calls = (
    evaluate_calls()
    | plausible_evaluate_calls()
    | create_run_calls()
    | add_calls
    | stream_calls
    | plausible_batches().map(lambda m: ("AddBatch", m.SerializeToString()))
    | list_calls
    | get_calls
    | raw_calls
)
metadata = st.just(AUTH) | st.sampled_from(
    [AUTH, (("x-api-key", OTHER_KEY),), (), (("x-api-key", "wrong"),)]
)


def _invoke(channel: grpc.Channel, method: str, body: Any, meta: Any) -> grpc.RpcError | None:
    path = f"/ce_eval.v1.LossEvaluation/{method}"
    try:
        if method == "AddBatches":
            channel.stream_unary(path)(iter(body), timeout=30, metadata=meta)
        else:
            channel.unary_unary(path)(body, timeout=30, metadata=meta)
    except grpc.RpcError as exc:
        return exc
    return None


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(call=calls, meta=metadata)
def test_generated_requests_get_only_documented_codes(
    channel: grpc.Channel, server: ServeProcess, call: tuple[str, Any], meta: Any
) -> None:
    if not RUN_IDS:
        with GrpcClient(server.grpc_target, api_key=KEY) as client:
            RUN_IDS["open"] = client.create_run("open", "cross_entropy", metrics=["accuracy"])["id"]
            RUN_IDS["closed"] = client.create_run("closed", "cross_entropy")["id"]
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as rest:
            assert rest.post(f"/v1/runs/{RUN_IDS['closed']}/close").is_success
    method, body = call
    error = _invoke(channel, method, body, meta)
    code = "OK" if error is None else error.code().name  # type: ignore[attr-defined]
    event(f"{method}: {code}")
    if error is None:
        return
    assert code in HTTP_STATUS_OF, (code, error.details())  # type: ignore[attr-defined]
    trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    problem = pb.Problem()
    assert status.details[1].Unpack(problem)
    assert problem.status in HTTP_STATUS_OF[code], (code, problem)
    assert orjson.loads(trailers["ce-eval-errors-bin"]) is not None


# ---- draining: after SIGTERM the run RPCs that evaluate answer UNAVAILABLE --------------------


def test_sigterm_draining_refuses_batches_with_unavailable() -> None:
    process = start_serve({**ENV, "CE_EVAL_DRAIN_DELAY_S": "20"})
    batch = make_batches(2, [4])[0]
    try:
        with grpc.insecure_channel(process.grpc_target) as ch:
            stub = pb_grpc.LossEvaluationStub(ch)
            run_id = stub.CreateRun(
                pb.CreateRunRequest(name="d", loss="cross_entropy"), metadata=AUTH
            ).id
            process.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            while httpx.get(f"{process.url}/readyz").status_code != 503:
                assert time.monotonic() < deadline, "never started draining"
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as info:
                stub.AddBatch(batch_to_proto(run_id, "x", **batch), metadata=AUTH, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            trailers = dict(info.value.trailing_metadata())  # type: ignore[attr-defined]
            assert orjson.loads(trailers["ce-eval-errors-bin"])[0]["type"] == "draining"
            assert trailers["retry-after"] == "1"
            # Reads still work while draining.
            run = stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=AUTH, timeout=10)
            assert run.batches == 0
    finally:
        code, stderr = process.stop(timeout=30)  # a second SIGTERM skips the delay
    assert code == 0 and "Traceback" not in stderr, stderr


# ---- connections: an idle client does not hold its connection forever -------------------------


def test_an_idle_grpc_connection_is_closed_by_the_server() -> None:
    """``CE_EVAL_GRPC_MAX_CONNECTION_IDLE_S``: the server sends GOAWAY, the client's channel goes
    from READY back to IDLE (its own idle timeout is 30 minutes)."""
    process = start_serve({"CE_EVAL_GRPC_MAX_CONNECTION_IDLE_S": "0.5"})
    states: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(process.grpc_target) as ch:
            ch.subscribe(states.append, try_to_connect=False)
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            deadline = time.monotonic() + 10
            while not (
                grpc.ChannelConnectivity.READY in states
                and states[-1] == grpc.ChannelConnectivity.IDLE
            ):
                assert time.monotonic() < deadline, states
                time.sleep(0.05)
    finally:
        process.stop()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_struct_option_is_invalid_argument(
    channel: grpc.Channel, value: float
) -> None:
    request = pb.EvaluateRequest(loss="cross_entropy")
    request.logits.CopyFrom(array_to_tensor(np.zeros((1, 2), np.float32)))
    request.targets.CopyFrom(array_to_tensor(np.zeros(1, np.int64)))
    request.options["temperature"] = value
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossEvaluationStub(channel).Evaluate(request, metadata=AUTH, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "options.temperature" in info.value.details()  # type: ignore[attr-defined]
