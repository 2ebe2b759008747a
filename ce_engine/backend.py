"""Array-namespace selection: ``auto`` | ``numpy`` | ``cupy``.

Engine code is written against an ``xp`` namespace (NumPy's API); CuPy drops in unchanged.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Literal

import numpy as np

from ce_engine.errors import BackendUnavailableError

BackendName = Literal["auto", "numpy", "cupy"]


@functools.cache
def cupy_status() -> tuple[ModuleType | None, str]:
    """Return ``(cupy module or None, reason)``; cached, the probe costs a CUDA init."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or CUDA libraries missing at import time
        return None, f"cupy is not importable: {exc}"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return None, f"no usable CUDA device: {exc}"
    if count < 1:
        return None, "no CUDA device present"
    return cupy, f"{count} CUDA device(s)"


def get_namespace(name: str = "auto") -> tuple[ModuleType, str]:
    """Resolve a backend name to ``(xp, resolved_name)``.

    ``auto`` → CuPy when it imports and a device is present, else NumPy.
    """
    if name == "numpy":
        return np, "numpy"
    if name in ("cupy", "auto"):
        cp, reason = cupy_status()
        if cp is not None:
            return cp, "cupy"
        if name == "cupy":
            raise BackendUnavailableError(f"backend 'cupy' is unavailable: {reason}")
        return np, "numpy"
    raise BackendUnavailableError(f"unknown backend {name!r}; expected auto, numpy or cupy")


def namespace_of(array: Any) -> ModuleType:
    """The namespace an array belongs to (NumPy for anything that is not a CuPy array)."""
    cp, _ = cupy_status() if type(array).__module__.startswith("cupy") else (None, "")
    return cp if cp is not None else np


def to_numpy(array: Any) -> np.ndarray:
    """Bring an array to host memory as NumPy (no copy for NumPy input)."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)
    if callable(get):
        return np.asarray(get())
    return np.asarray(array)


def available_backends() -> dict[str, str]:
    """Backend name → human-readable status, for /readyz and the catalog."""
    return {"numpy": f"numpy {np.__version__}", "cupy": cupy_status()[1]}
