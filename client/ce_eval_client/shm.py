"""Client side of system shared memory: one POSIX shared-memory object per client, registered
with the server as one region (Triton's ``systemsharedmemory`` extension over HTTP).

``Client(shared_memory=True)`` (:mod:`ce_eval_client.sdk`) evaluates over OIP with its inputs
and its logits-shaped outputs (``grad``, ``probabilities``, ``log_probabilities``,
``hessian_diag``, ``hvp``) in the region; the other outputs come back in the answer. The region
grows (a new object, registered again) when a call needs more room, and is unregistered and
unlinked by ``close()``. The server must run on the same host with ``CE_EVAL_SHARED_MEMORY=true``
and see the same ``/dev/shm``.

``Client.shared_array(shape, dtype)`` (:class:`SharedArrays`) hands out an array in a region
of its own: logits written there are named where they lie, so neither the client nor the
server copies them (the server evaluates logits of 8 MiB or more from a mapping).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import httpx
import numpy as np

#: Outputs with the logits' shape, written into the region (others come back in the answer).
LOGITS_SHAPED_OUTPUTS = frozenset(
    {"grad", "probabilities", "log_probabilities", "hessian_diag", "hvp"}
)
ALIGNMENT = 64
_MIN_BYTES = 1 << 16


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class Layout:
    """Where one call's tensors lie in the region: name → (offset, bytes)."""

    inputs: dict[str, tuple[int, int]]
    outputs: dict[str, tuple[int, int]]
    size: int


def plan(
    tensors: Mapping[str, np.ndarray], outputs: list[str], logits: np.ndarray | None = None
) -> Layout:
    """Inputs one after the other (64-byte aligned), then room for each logits-shaped output:
    the logits' elements at the compute dtype's size (float64 logits: 8 bytes, else 4).
    ``logits``: when they are not among ``tensors`` (they lie in a :class:`SharedArrays`)."""
    offset = 0
    inputs: dict[str, tuple[int, int]] = {}
    for name, array in tensors.items():
        inputs[name] = (offset, array.nbytes)
        offset = _aligned(offset + array.nbytes)
    room: dict[str, tuple[int, int]] = {}
    logits = tensors.get("logits", logits)
    if logits is not None:
        per_element = 8 if logits.dtype == np.float64 else 4
        for name in outputs:
            if name in LOGITS_SHAPED_OUTPUTS:
                room[name] = (offset, max(1, logits.size * per_element))
                offset = _aligned(offset + room[name][1])
    return Layout(inputs, room, max(offset, 1))


class SharedRegion:
    """One shared-memory object of this process, registered as region ``name`` through
    ``http`` (an ``httpx.Client`` on the server, with its API key); ``check`` raises for an
    error answer."""

    def __init__(
        self, http: httpx.Client, check: Callable[[httpx.Response], None], slack: bool = True
    ) -> None:
        self.http = http
        self.check = check
        self.slack = slack
        self.name = f"ce_eval_sdk_{os.getpid()}_{secrets.token_hex(6)}"
        self._shm: shared_memory.SharedMemory | None = None

    @property
    def size(self) -> int:
        return 0 if self._shm is None else self._shm.size

    def _buffer(self) -> memoryview:
        assert self._shm is not None and self._shm.buf is not None
        return self._shm.buf

    def ensure(self, size: int) -> None:
        """Hold at least ``size`` bytes: a new, larger object (1.5× the need, ≥ 64 KiB) when
        the current one is smaller, registered under the same region name."""
        if self._shm is not None and self._shm.size >= size:
            return
        self.release()
        room = max(_MIN_BYTES, size + size // 2) if self.slack else max(1, size)
        self._shm = shared_memory.SharedMemory(self.name, create=True, size=room)
        body = {"key": "/" + self.name, "offset": 0, "byte_size": self._shm.size}
        response = self.http.post(f"/v2/systemsharedmemory/region/{self.name}/register", json=body)
        if response.status_code >= 400:
            self.release(registered=False)
            self.check(response)

    def write(self, offset: int, array: np.ndarray) -> None:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._buffer()[offset : offset + flat.size] = flat.data

    def read(self, offset: int, dtype: Any, shape: list[int]) -> np.ndarray:
        """A copy of the array at ``offset`` (the next call reuses the region)."""
        count = int(np.prod(shape, dtype=np.int64))
        view = np.frombuffer(self._buffer(), dtype=dtype, count=count, offset=offset)
        return view.reshape(shape).copy()

    def release(self, registered: bool = True) -> None:
        """Unregister the region (best effort: the server may be gone) and unlink the object."""
        if self._shm is None:
            return
        if registered:
            with contextlib.suppress(httpx.HTTPError):
                self.http.post(f"/v2/systemsharedmemory/region/{self.name}/unregister")
        self._shm.close()
        self._shm.unlink()
        self._shm = None


class SharedArrays:
    """Arrays that live in shared memory, each in its own registered region
    (``Client.shared_array``): logits written into one are evaluated in place, with no copy
    by the client or the server."""

    def __init__(self, http: httpx.Client, check: Callable[[httpx.Response], None]) -> None:
        self.http = http
        self.check = check
        self._regions: list[tuple[SharedRegion, int]] = []  # (region, address of its byte 0)

    def new(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A zero-filled C-order array of ``shape`` × ``dtype`` in a new registered region."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        region = SharedRegion(self.http, self.check, slack=False)
        region.ensure(count * dtype.itemsize)
        # The array holds a mapping of its own: it outlives close() harmlessly (the object is
        # unlinked, its pages freed with the array), where the region's would refuse to close.
        fd = os.open(os.path.join("/dev/shm", region.name), os.O_RDWR)
        try:
            raw = np.frombuffer(mmap.mmap(fd, region.size), np.uint8)
        finally:
            os.close(fd)
        self._regions.append((region, raw.ctypes.data))
        return np.frombuffer(raw, dtype, count).reshape(shape)

    def locate(self, array: Any) -> tuple[str, int] | None:
        """(region name, offset) of a C-contiguous ``array`` lying in one of these arrays'
        regions, else None."""
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
            return None
        address = array.ctypes.data
        for region, start in self._regions:
            if start <= address and address + array.nbytes <= start + region.size:
                return region.name, address - start
        return None

    def release(self) -> None:
        for region, _ in self._regions:
            region.release()
        self._regions.clear()
