"""Protobuf codec: zero-copy request chunks parse to the same message; tensors round-trip."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
from ce_eval_client.proto import array_to_tensor, request_chunks, request_to_proto, struct_to_dict
from service.codecs.proto import parse_request_bytes, split_request_bytes, tensor_to_array
from service.errors import MalformedBody, PayloadTooLarge, ValidationFailed

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


def _split_equals_parse(body: bytes) -> None:
    message, data = split_request_bytes(body, min_bytes=0)
    full = parse_request_bytes(body)
    for name in ("logits", "targets", "sample_weight", "vector"):
        assert message.HasField(name) == full.HasField(name)
        if full.HasField(name):
            assert bytes(data.get(name, b"")) == getattr(full, name).data
            getattr(full, name).ClearField("data")
    assert message == full


def test_split_keeps_tensor_data_in_place_and_parses_the_rest() -> None:
    logits = RNG.standard_normal((4, 9)).astype(np.float32)
    chunks = request_chunks(
        "cross_entropy", logits, np.arange(4), options={"eps": 0.25}, metrics=["nll"]
    )
    body = b"".join(chunks)
    _split_equals_parse(body)
    _split_equals_parse(request_to_proto("x", logits, np.arange(4)).SerializeToString())
    _, data = split_request_bytes(body, min_bytes=0)
    assert data["logits"].obj is body  # a view, not a copy
    np.testing.assert_array_equal(np.frombuffer(data["logits"], np.float32), logits.ravel())


@pytest.mark.parametrize(
    "body",
    [b"\x12\xff", b"\x12\x05\x1a\x10abc", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0b"],
    ids=["truncated-length", "inner-overrun", "varint", "group"],
)
def test_split_rejects_malformed_bytes(body: bytes) -> None:
    with pytest.raises(MalformedBody):
        split_request_bytes(body, min_bytes=0)


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_split_never_fails_other_than_malformed(body: bytes) -> None:
    try:
        message, data = split_request_bytes(body, min_bytes=0)
    except MalformedBody:
        return
    assert isinstance(message, pb.EvaluateRequest)
    assert all(isinstance(v, memoryview) for v in data.values())


def test_a_batch_split_keeps_its_tensors_in_place_and_equals_the_parse() -> None:
    from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
    from ce_eval_client.proto import batch_chunks, batch_to_proto
    from service.codecs.proto import batch_from_proto, split_message_bytes

    logits = RNG.standard_normal((5, 7)).astype(np.float32)
    targets, weights = np.arange(5) % 7, RNG.uniform(0.5, 2.0, 5).astype(np.float32)
    labels = {"example_ids": [10, 11, 12, 13, 14], "slices": {"k": list("aabba")}}
    body = b"".join(batch_chunks("run_x", "b1", logits, targets, weights, **labels))
    full = pb.AddBatchRequest.FromString(body)
    assert full == batch_to_proto("run_x", "b1", logits, targets, weights, **labels)
    message, data = split_message_bytes(pb.AddBatchRequest, body, min_bytes=0)
    assert set(data) == {"logits", "targets", "sample_weight"}
    assert data["logits"].obj is body  # a view, not a copy
    payload = batch_from_proto(message, 10**6, data)
    np.testing.assert_array_equal(payload["logits"], logits)
    np.testing.assert_array_equal(payload["targets"], targets)
    np.testing.assert_array_equal(payload["sample_weight"], weights)
    assert payload["example_ids"] == labels["example_ids"]
    assert payload["slices"] == labels["slices"]
    with pytest.raises(MalformedBody, match="AddBatchRequest"):
        split_message_bytes(pb.AddBatchRequest, b"\x12\xff", min_bytes=0)


def test_a_body_of_many_fields_is_left_to_the_c_parser_and_equals_the_parse() -> None:
    from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
    from ce_eval_client.proto import batch_chunks
    from service.codecs.proto import MAX_SPLIT_FIELDS, split_message_bytes

    logits = RNG.standard_normal((300, 4)).astype(np.float32)
    ids = [f"id-{i}" for i in range(300)]  # a field each
    body = b"".join(batch_chunks("run_x", "b1", logits, np.arange(300) % 4, example_ids=ids))
    message, data = split_message_bytes(pb.AddBatchRequest, body, min_bytes=0)
    assert data == {} and message == pb.AddBatchRequest.FromString(body)
    packed = b"\x18\x00" * (MAX_SPLIT_FIELDS + 1) + b"\x0a\x01x"  # unknown varints, then loss
    parsed, data = split_request_bytes(packed, min_bytes=0)
    assert data == {} and parsed == pb.EvaluateRequest.FromString(packed)
