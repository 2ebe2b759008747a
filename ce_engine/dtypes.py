"""Dtype policy: fp16/bf16/fp32 compute in float32 (sums in float64); float64 stays float64."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


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
