"""Base64 tensor data (``{dtype, shape, data}``, decoded by ``pybase64``) decodes as the
standard library's strict decoder (``base64.b64decode(data, validate=True)``) does: the same
bytes for every string it accepts, a 422 naming ``data`` for every string it refuses. One
difference, on purpose: ``=`` past the padding of a complete string, which the standard
library ignores, is refused (RFC 4648 allows none)."""

from __future__ import annotations

import base64
import binascii
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.codecs.tensors import decode_tensor
from service.errors import ValidationFailed

LIMIT = 1 << 20


#: A complete RFC 4648 string followed by more ``=``.
EXCESS_PADDING = re.compile(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?=+$")


def _reference(data: str | bytes) -> bytes | None:
    """The standard library's strict decoding, or None where it refuses (and for excess
    padding)."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    if EXCESS_PADDING.match(text):
        return None
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def _decoded(data: str | bytes) -> bytes | None:
    """``decode_tensor`` of ``data`` as uint8 bytes, or None on its 422 for ``data``."""
    length = 3 * (len(data) // 4)  # a uint8 vector as long as the decoded bytes can be
    expected = _reference(data)
    size = len(expected) if expected is not None else length
    value = {"dtype": "uint8", "shape": [size], "data": data}
    try:
        return decode_tensor(value, ("logits",), LIMIT).tobytes()
    except ValidationFailed as exc:
        (error,) = exc.errors
        assert error["loc"] == ["logits", "data"] and error["type"] == "base64", error
        return None


@pytest.mark.parametrize(
    "data",
    [
        "",
        "YQ==",
        "YWI=",
        "YWJj",
        "YQ",  # no padding
        "YQ=",  # short padding
        "Y===",
        "====",
        "YWJj=",  # excess padding
        "YQ===",
        "YQ==YQ==",  # padding inside
        "YW Jj",  # a space
        "YWJj\n",  # a newline
        "YW-j",  # URL-safe alphabet
        "YW_j",
        "YWJjé===",  # not ASCII
        "\x00\x00\x00\x00",
        b"YWJj",
        b"YW\xffj",
    ],
)
def test_edge_strings_decode_or_fail_as_the_standard_library(data: str | bytes) -> None:
    assert _decoded(data) == _reference(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_every_encoding_decodes_to_its_bytes(raw: bytes) -> None:
    data = base64.b64encode(raw).decode()
    assert _decoded(data) == raw
    assert np.array_equal(
        decode_tensor({"dtype": "uint8", "shape": [len(raw)], "data": data}, ("x",), LIMIT),
        np.frombuffer(raw, np.uint8),
    )


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ABCab01+/=_- \n\té", max_size=24))
def test_arbitrary_strings_decode_or_fail_as_the_standard_library(data: str) -> None:
    assert _decoded(data) == _reference(data)
