"""Protobuf codec: zero-copy request chunks parse to the same message; tensors round-trip."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from service.errors import PayloadTooLarge, ValidationFailed
from service.grpc.gen.ce_eval.v1 import ce_eval_pb2 as pb
from service.proto_codec import (
    array_to_tensor,
    request_chunks,
    request_to_proto,
    struct_to_dict,
    tensor_to_array,
)

RNG = np.random.default_rng(3)


@pytest.mark.parametrize(
    "dtype", [np.float16, ml_dtypes.bfloat16, np.float32, ">f8", np.int64, np.bool_]
)
def test_request_chunks_parse_to_the_same_message(dtype: object) -> None:
    logits = (RNG.standard_normal((5, 300)) * 3).astype(dtype)
    kwargs = {
        "options": {"ignore_index": 2, "weight": [0.5, 1.0]},
        "outputs": ["grad"],
        "sample_weight": np.arange(5, dtype=np.float32),
    }
    joined = b"".join(request_chunks("cross_entropy", logits, np.arange(5), **kwargs))
    expected = request_to_proto("cross_entropy", logits, np.arange(5), **kwargs)
    message = pb.EvaluateRequest.FromString(joined)
    assert message == expected
    back = tensor_to_array(message.logits, ("logits",), 10**6)
    assert back.dtype.byteorder in "<=|" and back.shape == (5, 300)
    np.testing.assert_array_equal(back, logits)


def test_struct_numbers_become_integers_when_integral() -> None:
    message = request_to_proto(
        "cross_entropy", np.zeros((1, 2)), np.zeros(1), options={"top_k": [1, 5], "eps": 0.5}
    )
    assert struct_to_dict(message.options) == {"top_k": [1, 5], "eps": 0.5}
    assert isinstance(struct_to_dict(message.options)["top_k"][0], int)


def test_tensor_checks() -> None:
    tensor = array_to_tensor(np.zeros((2, 3), np.float32))
    with pytest.raises(PayloadTooLarge):
        tensor_to_array(tensor, ("logits",), 5)
    tensor.data = tensor.data[:-1]
    with pytest.raises(ValidationFailed) as info:
        tensor_to_array(tensor, ("logits",), 100)
    assert info.value.errors[0]["loc"] == ["logits", "data"]
