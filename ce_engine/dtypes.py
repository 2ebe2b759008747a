"""Dtype policy: fp16/bf16/fp32 compute in float32 (sums in float64); float64 stays float64."""

from __future__ import annotations

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


def wire_name(dtype: Any) -> str:
    """NumPy dtype → wire name (inverse of :data:`WIRE_DTYPES`)."""
    dt = np.dtype(dtype)
    if dt == BFLOAT16:
        return "bfloat16"
    return "bool" if dt.kind == "b" else dt.name


def is_floating(dtype: Any) -> bool:
    dt = np.dtype(dtype)
    return dt.kind == "f" or dt == BFLOAT16


def compute_dtype(dtype: Any) -> np.dtype[Any]:
    """Compute dtype: float64 and integer inputs → float64; float16/bfloat16/float32 → float32."""
    dt = np.dtype(dtype)
    if dt.type is np.float64:  # either byte order ('>f8' != np.float64)
        return np.dtype(np.float64)
    if is_floating(dt):
        return np.dtype(np.float32)
    return np.dtype(np.float64)
