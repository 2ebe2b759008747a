"""System shared-memory regions (Triton's ``systemsharedmemory`` extension), data-plane level.

A co-located client creates a POSIX shared-memory object (``/dev/shm/<key>``), registers a
region of it (``name`` → ``key``, ``offset``, ``byte_size``), then names tensors by
(region, offset, byte_size) instead of sending their bytes: inputs are read from the region and
outputs written into it. The HTTP routes (:mod:`service.http.shared_memory`), the OIP codec and
the gRPC servicer all go through one :class:`SharedMemoryRegistry`.

Safety, because the server opens files a client names:

- off unless ``CE_EVAL_SHARED_MEMORY=true``; every operation but status answers 403 otherwise;
- a key is a ``/dev/shm`` name matching ``[A-Za-z0-9_.-]{1,64}`` (one leading ``/`` as
  ``shm_open`` names carry is dropped), never ``.``/``..``, never a named semaphore
  (``sem.*``); it is opened ``O_NOFOLLOW`` and must be a regular file;
- regions belong to the principal (API key) that registered them: another key neither sees nor
  uses them, and cannot register an object another key has registered;
- per key at most ``shared_memory_max_regions`` regions of ``shared_memory_max_bytes`` in all;
- the server never maps a region. It keeps the object's descriptor and reads and writes it with
  ``pread``/``pwrite``, after an ``fstat`` that the object still holds the bytes asked for: a
  client that truncates its object after registering gets a 409, and a truncation racing a
  read only shortens the read (the same 409), where a mapping would raise SIGBUS in the server.
  Logits of ``MAPPED_MIN_BYTES`` or more are not copied but left in place
  (:class:`MappedTensor`) for a worker process that maps them (:mod:`service.dataplane.mapped`):
  a truncation racing it kills that worker only, and its request gets the same 409;
- reads and writes stay within the region (offset + byte_size ≤ the region's byte_size);
- descriptors are closed on unregister and at shutdown (:meth:`SharedMemoryRegistry.close`);
  a read or write in flight holds its own duplicate, so unregistering never pulls the
  descriptor from under it.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import (
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ValidationFailed,
    truncate,
)

#: Where POSIX shared-memory objects live on Linux (``shm_open(name)`` is ``/dev/shm/name``).
SHM_DIRECTORY = "/dev/shm"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Region names share the key alphabet (they travel in URL paths and error texts).
REGION_NAME_PATTERN = NAME_PATTERN
DISABLED_DETAIL = (
    "system shared memory is disabled on this server; start it with CE_EVAL_SHARED_MEMORY=true"
)
#: Bytes per read/write syscall: 4 MiB pieces read tmpfs about 10% faster than one 64 MiB call.
_IO_PIECE = 1 << 22
#: Copies of at least this many bytes are split into ``_IO_THREADS`` spans copied at once: the
#: kernel copies tmpfs pages at about 1.8 GB/s a thread (65 MB: 36 ms on one, 19 ms on two).
_PARALLEL_BYTES = 8 << 20
_IO_THREADS = max(1, min(4, os.cpu_count() or 1))
#: Shared logits of at least this many bytes are evaluated from a mapping by a worker process
#: (:mod:`service.dataplane.mapped`) when the registry ``maps_logits``; smaller ones cost less
#: to copy than the hand-over.
MAPPED_MIN_BYTES = 8 << 20
_io_pool: ThreadPoolExecutor | None = None
_serials = itertools.count()
_io_pool_lock = threading.Lock()


class SharedMemoryDisabled(Forbidden):
    type = "shared-memory-disabled"


class RegionTruncated(Conflict):
    """The object behind a region no longer holds the bytes a tensor needs."""

    grpc_code, type = "FAILED_PRECONDITION", "shared-memory-truncated"


@dataclass(frozen=True)
class Region:
    """A registered region: ``byte_size`` bytes at ``offset`` of the object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    identity: tuple[int, int]  # (st_dev, st_ino) of the object
    #: this registration's number, unique in the process (what mapping workers key on)
    serial: int = field(default_factory=lambda: next(_serials))

    def status(self) -> dict[str, Any]:
        """Triton's status entry: ``{name, key, offset, byte_size}``."""
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }


@dataclass(frozen=True)
class TensorRef:
    """A tensor named by region: ``byte_size`` bytes at ``offset`` of region ``region``."""

    region: str
    offset: int
    byte_size: int
    loc: tuple[str | int, ...]


def _invalid(loc: Sequence[str | int], msg: str, type_: str = "value_error") -> ValidationFailed:
    return ValidationFailed(
        f"{'.'.join(map(str, loc))}: {msg}", [{"loc": list(loc), "msg": msg, "type": type_}]
    )


def check_region_name(name: Any, loc: Sequence[str | int]) -> str:
    """A region name: ``[A-Za-z0-9_.-]{1,64}`` (422 naming ``loc`` otherwise)."""
    if not isinstance(name, str) or REGION_NAME_PATTERN.fullmatch(name) is None:
        raise _invalid(
            loc, f"region name {truncate(name)!r} must match [A-Za-z0-9_.-]{{1,64}}", "name"
        )
    return name


def object_name(key: Any, loc: Sequence[str | int] = ("body", "key")) -> str:
    """A client's key → the ``/dev/shm`` entry it names (422 naming ``loc`` when not allowed).

    Allowed: an optional leading ``/`` then ``[A-Za-z0-9_.-]{1,64}``, except ``.``, ``..``
    and ``sem.*`` (POSIX named semaphores, never a tensor region).
    """
    base = key[1:] if isinstance(key, str) and key.startswith("/") else key
    if (
        not isinstance(base, str)
        or NAME_PATTERN.fullmatch(base) is None
        or base in (".", "..")
        or base.startswith("sem.")
    ):
        raise _invalid(
            loc,
            f"key {truncate(key)!r} must name a /dev/shm object: an optional leading '/' then "
            "[A-Za-z0-9_.-]{1,64}, no other separator, not '.', '..' or 'sem.*'",
            "shared_memory_key",
        )
    return base


def non_negative_int(value: Any, loc: Sequence[str | int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(loc, f"must be an integer >= 0, got {truncate(value)!r}", "int")
    return value


def _inside(region: Region, ref: TensorRef) -> Region:
    """``region`` when ``ref``'s bytes lie inside it, else 422 naming the byte size."""
    if ref.offset + ref.byte_size > region.byte_size:
        raise _invalid(
            (*ref.loc, "shared_memory_byte_size"),
            f"offset {ref.offset} + byte_size {ref.byte_size} exceed the "
            f"{region.byte_size} bytes of region {region.name!r}",
            "out_of_bounds",
        )
    return region


def _spans(size: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans covering ``size`` bytes: one, or ``_IO_THREADS`` from
    ``_PARALLEL_BYTES`` on (4 KiB-aligned, the pages the kernel copies)."""
    if size < _PARALLEL_BYTES or _IO_THREADS == 1:
        return [(0, size)]
    step = -(-size // _IO_THREADS // 4096) * 4096
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def _in_spans(copy: Callable[[int, int], int], size: int) -> int:
    """Σ ``copy(start, end)`` over :func:`_spans`, the spans on the I/O threads at once. Returns
    (or raises the first error) only once every span has ended: the caller's descriptor stays
    open for all of them."""
    spans = _spans(size)
    if len(spans) == 1:
        return copy(*spans[0])
    global _io_pool
    with _io_pool_lock:
        if _io_pool is None:
            _io_pool = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="ce-shm")
    futures = [_io_pool.submit(copy, start, end) for start, end in spans]
    wait(futures)
    return sum(future.result() for future in futures)


def _move(move: Callable[..., int], fd: int, buffer: memoryview, offset: int) -> int:
    """``os.preadv`` / ``os.pwritev`` of ``buffer`` at ``offset`` in ``_IO_PIECE`` calls, the
    spans at once (:func:`_in_spans`); returns the bytes moved (fewer when a call moves none:
    the file ends, or ended meanwhile, before ``offset + len(buffer)``)."""

    def span(start: int, end: int) -> int:
        done = start
        while done < end:
            count = move(fd, [buffer[done : min(done + _IO_PIECE, end)]], offset + done)
            if count == 0:
                break
            done += count
        return done - start

    return _in_spans(span, len(buffer))


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill ``buffer`` from ``fd`` at ``offset``; returns the bytes read (fewer when the file
    ends, or ended while it was read, before ``offset + len(buffer)``)."""
    return _move(os.preadv, fd, buffer, offset)


def _pwrite_from(fd: int, data: memoryview, offset: int) -> None:
    _move(os.pwritev, fd, data, offset)


class SharedMemoryRegistry:
    """Registered regions per principal (``None`` when API keys are off), thread-safe."""

    def __init__(
        self,
        enabled: bool,
        max_regions: int,
        max_bytes: int,
        directory: str = SHM_DIRECTORY,
        maps_logits: bool = False,
    ) -> None:
        self.enabled = enabled
        self.maps_logits = maps_logits
        #: called with the serials of the regions unregistered (workers unmap them)
        self.on_drop: Callable[[list[int]], None] | None = None
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.directory = directory
        self._lock = threading.Lock()
        self._regions: dict[str | None, dict[str, Region]] = {}

    # ----------------------------------------------------------- registry

    def check_enabled(self) -> None:
        if not self.enabled:
            raise SharedMemoryDisabled(
                DISABLED_DETAIL,
                [{"loc": ["path"], "msg": "shared memory is disabled", "type": "disabled"}],
            )

    def register(
        self, principal: str | None, name: str, key: Any, offset: Any, byte_size: Any
    ) -> Region:
        """Open ``/dev/shm/<key>`` and register ``byte_size`` bytes of it at ``offset`` as
        ``name``. 403 disabled, 422 bad fields, 404 no such object, 409 name taken (or the
        object is another key's), 413 over the per-key caps."""
        self.check_enabled()
        check_region_name(name, ("path", "region_name"))
        base = object_name(key)
        offset = non_negative_int(0 if offset is None else offset, ("body", "offset"))
        byte_size = non_negative_int(byte_size, ("body", "byte_size"))
        if byte_size == 0:
            raise _invalid(("body", "byte_size"), "must be at least 1", "int")
        fd = self._open(base, key)
        try:
            info = os.fstat(fd)
            if offset + byte_size > info.st_size:
                msg = (
                    f"failed to register shared memory region {name!r}: offset {offset} + "
                    f"byte_size {byte_size} exceed the {info.st_size} bytes of {key!r}"
                )
                raise ValidationFailed(
                    msg, [{"loc": ["body", "byte_size"], "msg": msg, "type": "out_of_bounds"}]
                )
            region = Region(name, key, offset, byte_size, fd, (info.st_dev, info.st_ino))
            with self._lock:
                self._admit(principal, region)
        except BaseException:
            os.close(fd)
            raise
        return region

    def _open(self, base: str, key: str) -> int:
        path = os.path.join(self.directory, base)
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            reason = "no such object" if exc.errno == errno.ENOENT else os.strerror(exc.errno or 0)
            raise NotFound(
                f"unable to open shared memory object {key!r}: {reason}",
                [{"loc": ["body", "key"], "msg": reason, "type": "shared_memory_key"}],
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _invalid(("body", "key"), f"{key!r} is not a regular shared-memory object")
        return fd

    def _admit(self, principal: str | None, region: Region) -> None:
        """Add ``region`` under the lock: name free, object not another key's, caps kept."""
        mine = self._regions.get(principal, {})
        if region.name in mine:
            raise Conflict(
                f"shared memory region {region.name!r} is already registered",
                [{"loc": ["path", "region_name"], "msg": "already registered", "type": "exists"}],
            )
        for owner, regions in self._regions.items():
            if owner != principal and any(r.identity == region.identity for r in regions.values()):
                raise Conflict(
                    f"shared memory object {region.key!r} is registered by another API key",
                    [{"loc": ["body", "key"], "msg": "in use", "type": "exists"}],
                )
        if len(mine) >= self.max_regions:
            raise PayloadTooLarge(
                f"at most {self.max_regions} shared memory regions per API key "
                "(CE_EVAL_SHARED_MEMORY_MAX_REGIONS); unregister one first",
                [{"loc": ["path", "region_name"], "msg": "too many regions", "type": "quota"}],
            )
        total = sum(r.byte_size for r in mine.values()) + region.byte_size
        if total > self.max_bytes:
            raise PayloadTooLarge(
                f"registered regions would hold {total} bytes, over the {self.max_bytes} bytes "
                "allowed per API key (CE_EVAL_SHARED_MEMORY_MAX_BYTES)",
                [{"loc": ["body", "byte_size"], "msg": "over the byte quota", "type": "quota"}],
            )
        self._regions.setdefault(principal, {})[region.name] = region

    def unregister(self, principal: str | None, name: str | None = None) -> None:
        """Drop one region (a name not registered is no error, as Triton) or, with ``name``
        None, all of ``principal``'s; closes their descriptors."""
        self.check_enabled()
        with self._lock:
            regions = self._regions.get(principal, {})
            if name is None:
                dropped = list(regions.values())
                regions.clear()
            else:
                dropped = [r] if (r := regions.pop(name, None)) is not None else []
            if not regions:
                self._regions.pop(principal, None)
        self._dropped(dropped)

    def _dropped(self, regions: list[Region]) -> None:
        for region in regions:
            os.close(region.fd)
        if regions and self.on_drop is not None:
            self.on_drop([region.serial for region in regions])

    def status(self, principal: str | None, name: str | None = None) -> list[dict[str, Any]]:
        """Triton's status list: every region of ``principal``, or the one named (404)."""
        with self._lock:
            regions = dict(self._regions.get(principal, {}))
        if name is None:
            return [r.status() for r in regions.values()]
        return [self._lookup(regions, name, ("path", "region_name")).status()]

    def close(self) -> None:
        """Unregister every region of every principal (shutdown)."""
        with self._lock:
            dropped = [r for regions in self._regions.values() for r in regions.values()]
            self._regions.clear()
        self._dropped(dropped)

    def registered(self, principal: str | None, region: Region) -> bool:
        """Whether ``region`` is still registered (not unregistered since it was looked up)."""
        with self._lock:
            return self._regions.get(principal, {}).get(region.name) is region

    def count(self) -> int:
        """Regions registered, all principals together."""
        with self._lock:
            return sum(len(regions) for regions in self._regions.values())

    def count_of(self, principal: str | None) -> int:
        with self._lock:
            return len(self._regions.get(principal, {}))

    # ----------------------------------------------------------- tensors

    @staticmethod
    def _lookup(regions: dict[str, Region], name: str, loc: Sequence[str | int]) -> Region:
        region = regions.get(name)
        if region is None:
            raise NotFound(
                f"unable to find system shared memory region: {truncate(name)!r}",
                [{"loc": list(loc), "msg": "unknown region", "type": "not_found"}],
            )
        return region

    def locate(self, principal: str | None, ref: TensorRef) -> Region:
        """The region ``ref`` names, once ``ref`` lies inside it (404 unknown, 422 outside):
        checked before any work, so a bad output reference fails before the evaluation."""
        self.check_enabled()
        with self._lock:
            region = self._lookup(
                self._regions.get(principal, {}), ref.region, (*ref.loc, "shared_memory_region")
            )
        return _inside(region, ref)

    @contextmanager
    def _checked(self, principal: str | None, ref: TensorRef) -> Iterator[tuple[int, int, Region]]:
        """(duplicate descriptor, object offset, region) for ``ref`` after the bounds and
        ``fstat`` checks; the duplicate is closed on exit."""
        self.check_enabled()
        with self._lock:
            region = self._lookup(
                self._regions.get(principal, {}), ref.region, (*ref.loc, "shared_memory_region")
            )
            fd = os.dup(region.fd)
        try:
            _inside(region, ref)
            start = region.offset + ref.offset
            size = os.fstat(fd).st_size
            if start + ref.byte_size > size:
                raise self._truncated(region, size, start + ref.byte_size, ref.loc)
            yield fd, start, region
        finally:
            os.close(fd)

    @staticmethod
    def _truncated(
        region: Region, size: int, needed: int, loc: Sequence[str | int]
    ) -> ServiceError:
        msg = (
            f"shared memory object {region.key!r} of region {region.name!r} now holds {size} "
            f"bytes, {needed} needed: it was truncated after registering; register it again"
        )
        return RegionTruncated(
            msg, [{"loc": [*loc, "shared_memory_region"], "msg": msg, "type": "truncated"}]
        )

    def read(self, principal: str | None, ref: TensorRef) -> np.ndarray:
        """The ``ref.byte_size`` bytes of ``ref`` copied out (a fresh uint8 array)."""
        out = np.empty(ref.byte_size, np.uint8)
        with self._checked(principal, ref) as (fd, start, region):
            if _pread_into(fd, out.data, start) < ref.byte_size:  # truncated meanwhile
                raise self._truncated(region, os.fstat(fd).st_size, start + ref.byte_size, ref.loc)
        return out

    def write(self, principal: str | None, ref: TensorRef, data: bytes | memoryview) -> None:
        """Write ``data`` at ``ref`` (``len(data)`` ≤ ``ref.byte_size``, else 422)."""
        if len(data) > ref.byte_size:
            raise _invalid(
                (*ref.loc, "shared_memory_byte_size"),
                f"{ref.byte_size} bytes cannot hold the output's {len(data)} bytes",
                "too_small",
            )
        sized = TensorRef(ref.region, ref.offset, len(data), ref.loc)
        with self._checked(principal, sized) as (fd, start, _):
            _pwrite_from(fd, memoryview(data).cast("B"), start)


@dataclass(frozen=True)
class Held:
    """A checked duplicate descriptor of a tensor's object, whose bytes start at ``start``."""

    fd: int
    start: int
    region: Region
    ref: TensorRef

    def truncated(self) -> ServiceError | None:
        """The 409 to answer when the object no longer holds the tensor's bytes, else None."""
        size = os.fstat(self.fd).st_size
        return None if size >= self.start + self.ref.byte_size else self.short(size)

    def short(self, size: int) -> ServiceError:
        """The 409 of an object found holding only ``size`` bytes."""
        needed = self.start + self.ref.byte_size
        return SharedMemoryRegistry._truncated(self.region, size, needed, self.ref.loc)


@dataclass(frozen=True)
class RegionAccess:
    """The registry as one principal sees it (what codecs hold for one request)."""

    registry: SharedMemoryRegistry
    principal: str | None

    def read(self, ref: TensorRef) -> np.ndarray:
        return self.registry.read(self.principal, ref)

    def write(self, ref: TensorRef, data: bytes | memoryview) -> None:
        self.registry.write(self.principal, ref, data)

    def locate(self, ref: TensorRef) -> Region:
        return self.registry.locate(self.principal, ref)

    @contextmanager
    def hold(self, ref: TensorRef) -> Iterator[Held]:
        """``ref``'s object, checked as for a read (404, 422, 409), held open meanwhile."""
        with self.registry._checked(self.principal, ref) as (fd, start, region):
            yield Held(fd, start, region, ref)

    def registered(self, region: Region) -> bool:
        return self.registry.registered(self.principal, region)

    def any(self) -> bool:
        """Whether this principal has a region (its requests may name one)."""
        return self.registry.enabled and self.registry.count_of(self.principal) > 0


@dataclass(frozen=True)
class MappedTensor:
    """Logits left in shared memory: ``shape`` × ``dtype`` (little-endian, C order) at ``ref``.

    What the codecs hand out instead of a copy for logits of at least ``MAPPED_MIN_BYTES``
    when the registry ``maps_logits``; :class:`service.dataplane.mapped.MappedEvaluator`
    evaluates them from a mapping in a worker process."""

    access: RegionAccess
    ref: TensorRef
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def copy(self) -> np.ndarray:
        """The logits copied out of the region (:meth:`RegionAccess.read`)."""
        return self.access.read(self.ref).view(self.dtype).reshape(self.shape)
