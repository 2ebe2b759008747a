"""Unknown names (options, losses, metrics, outputs) say which name was meant and list the valid
ones, with one wording from the engine to every transport (REST JSON and protobuf, gRPC, OIP)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from ce_engine.options import BinaryCrossEntropyOptions, CrossEntropyOptions
from ce_eval_client.sdk import Client, EvaluationError, GrpcClient
from tests.servers import ServerProcess, start_serve

Z = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
Y = np.array([0, 2])

TYPO = "unknown option 'label_smothing' for cross_entropy; did you mean 'label_smoothing'? valid: "


def _only_error(exc: InputValidationError) -> tuple[tuple[str | int, ...], str, str]:
    (item,) = exc.errors
    return item.loc, item.msg, item.type


def _listed(msg: str) -> list[str]:
    return msg.split("valid: ", 1)[1].split(", ")


def test_option_typo_names_the_meant_option_and_the_valid_ones() -> None:
    with pytest.raises(InputValidationError) as caught:
        ce_engine.evaluate("cross_entropy", Z, Y, options={"label_smothing": 0.1})
    loc, msg, kind = _only_error(caught.value)
    assert loc == ("options", "label_smothing")
    assert kind == "unknown_option"
    assert msg.startswith(TYPO)
    assert sorted(_listed(msg)) == sorted(CrossEntropyOptions.model_fields)


def test_option_of_another_loss_lists_this_loss_options_without_a_guess() -> None:
    with pytest.raises(InputValidationError) as caught:
        ce_engine.evaluate("cross_entropy", Z, Y, options={"zzz_unrelated": 1})
    _, msg, _ = _only_error(caught.value)
    assert msg.startswith("unknown option 'zzz_unrelated' for cross_entropy; valid: ")
    labels = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    with pytest.raises(InputValidationError) as caught:
        ce_engine.evaluate("binary_cross_entropy", Z, labels, options={"ignore_indx": 3})
    _, msg, _ = _only_error(caught.value)
    assert "for binary_cross_entropy" in msg and "did you mean" not in msg
    assert sorted(_listed(msg)) == sorted(BinaryCrossEntropyOptions.model_fields)


def test_other_option_errors_keep_their_messages() -> None:
    with pytest.raises(InputValidationError) as caught:
        ce_engine.evaluate("cross_entropy", Z, Y, options={"label_smoothing": 2.0})
    loc, msg, kind = _only_error(caught.value)
    assert loc == ("options", "label_smoothing") and kind == "less_than_equal"
    assert "less than or equal to 1" in msg


@pytest.mark.parametrize(
    ("kwargs", "loc", "start"),
    [
        (
            {"loss": "cross_entropi"},
            ("loss",),
            "unknown loss 'cross_entropi'; did you mean 'cross_entropy'? valid: ",
        ),
        (
            {"metrics": ["acuracy"]},
            ("metrics", 0),
            "unknown metric 'acuracy'; did you mean 'accuracy'? valid: ",
        ),
        (
            {"outputs": ["gard"]},
            ("outputs", 0),
            "unknown output 'gard' for cross_entropy; did you mean 'grad'? valid: ",
        ),
    ],
)
def test_losses_metrics_and_outputs_use_the_same_wording(
    kwargs: dict[str, object], loc: tuple[str | int, ...], start: str
) -> None:
    call: dict[str, object] = {"loss": "cross_entropy", **kwargs}
    with pytest.raises(InputValidationError) as caught:
        ce_engine.evaluate(call.pop("loss"), Z, Y, **call)  # type: ignore[arg-type]
    got_loc, msg, _ = _only_error(caught.value)
    assert got_loc == loc
    assert msg.startswith(start)


def test_an_output_the_loss_lacks_still_says_not_supported() -> None:
    with pytest.raises(InputValidationError) as caught:
        ce_engine.evaluate("multiclass_hinge", Z, Y, outputs=["hessian"])
    _, msg, kind = _only_error(caught.value)
    assert kind == "unsupported_output"
    assert msg.startswith("output 'hessian' is not supported for multiclass_hinge")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = start_serve()
    yield process
    process.stop()


@pytest.mark.parametrize("transport", ["base64", "protobuf", "oip", "grpc"])
def test_every_transport_answers_the_same_suggestion(server: ServerProcess, transport: str) -> None:
    client: Client | GrpcClient = (
        GrpcClient(server.grpc_target)
        if transport == "grpc"
        else Client(server.url, transport=transport)  # type: ignore[arg-type]
    )
    with client, pytest.raises(EvaluationError) as caught:
        client.evaluate("cross_entropy", Z.astype(np.float32), Y, options={"label_smothing": 0.1})
    assert caught.value.status in (422, "INVALID_ARGUMENT")
    assert TYPO in caught.value.detail
    (item,) = caught.value.errors
    assert item["msg"].startswith(TYPO)
    assert item["loc"][-1] == "label_smothing"


def test_run_creation_answers_the_suggestion(server: ServerProcess) -> None:
    with Client(server.url) as client, pytest.raises(EvaluationError) as caught:
        client.create_run("typo", "cross_entropy", options={"label_smothing": 0.1})
    assert caught.value.status == 422
    assert TYPO in caught.value.detail
