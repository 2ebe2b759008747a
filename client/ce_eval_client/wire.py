"""The tensor wire format shared by the client and the server (DESIGN §3).

Every tensor on the wire is C-order, little-endian bytes with an explicit dtype name and shape
(never pickled): in JSON as ``{dtype, shape, data: base64}``, in protobuf as
``Tensor{dtype, shape, data}``, in the Open Inference Protocol as ``{datatype, shape}`` plus
binary data. This module holds the names and the byte layout; validation of untrusted input
(element limits, located errors) is the server's.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

#: Wire names → NumPy dtypes (little-endian), the set DESIGN §3 allows on the wire.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "bfloat16": BFLOAT16,
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
}

#: Open Inference Protocol datatype names → NumPy dtypes. BYTES (strings) has no meaning here.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": BFLOAT16,
}


def wire_name(dtype: Any) -> str:
    """NumPy dtype → wire name (inverse of :data:`WIRE_DTYPES`)."""
    dt = np.dtype(dtype)
    if dt == BFLOAT16:
        return "bfloat16"
    return "bool" if dt.kind == "b" else dt.name


def datatype_of(dtype: Any) -> str:
    """NumPy dtype → OIP datatype name (inverse of :data:`DATATYPES`)."""
    dt = np.dtype(dtype)
    if dt == BFLOAT16:
        return "BF16"
    for name, candidate in DATATYPES.items():
        if candidate == dt:
            return name
    raise ValueError(f"no OIP datatype for {dt}")


def wire_array(array: Any) -> np.ndarray:
    """C-contiguous and little-endian: the byte layout of every tensor on the wire."""
    contiguous = np.ascontiguousarray(array)
    if contiguous.dtype.byteorder == ">":
        return contiguous.astype(contiguous.dtype.newbyteorder("<"))
    return contiguous


def array_from_wire(raw: bytes | memoryview, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """Trusted wire bytes + dtype name + shape → array (a zero-copy view; ValueError if wrong)."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}")
    return np.frombuffer(raw, dtype=WIRE_DTYPES[dtype]).reshape(tuple(shape))


def encode_tensor(array: np.ndarray, encoding: str) -> Any:
    """Array → ``list`` (nested lists; non-finite become null), ``base64`` mapping, or ``raw``."""
    if encoding == "raw":
        return array
    if encoding == "base64":
        contiguous = wire_array(array)
        return {
            "dtype": wire_name(contiguous.dtype),
            "shape": list(contiguous.shape),
            "data": base64.b64encode(contiguous.tobytes()).decode("ascii"),
        }
    return array.tolist()


def decode_json_tensor(value: Any) -> np.ndarray:
    """A trusted JSON tensor (nested list or ``{dtype, shape, data}``) → array."""
    if isinstance(value, dict):
        return array_from_wire(base64.b64decode(value["data"]), value["dtype"], value["shape"])
    return np.asarray(value)
