"""Logits held in shared memory, evaluated from a mapping in sacrificial worker processes.

The server itself never maps a client's object (:mod:`service.shared_memory`): an object
truncated after it was mapped raises SIGBUS on the next access to the lost pages, and SIGBUS
kills the process. Copying the logits out with ``pread`` is safe, but tmpfs pages copy at about
2 GB/s a thread, as slow as the evaluation itself at 512×32000. So logits of at least
``MAPPED_MIN_BYTES`` go to a worker process instead:

- the worker receives a duplicate of the region's descriptor (``SCM_RIGHTS``), maps the region
  read-only and runs :func:`ce_engine.evaluate` on a NumPy view of the logits' bytes: no copy;
- it keeps the mapping for the region's next requests (mapping 65 MB costs about 5 ms of page
  faults) until the region is unregistered, which unmaps it in every worker as soon as that
  worker is idle (:meth:`MappedEvaluator.forget`);
- a worker maps only the bytes the object still holds, and answers 409
  (:class:`~service.shared_memory.RegionTruncated`) when those end before the logits; a
  truncation during the evaluation kills only the worker touching the lost pages (SIGBUS):
  its request answers 409 too, the next request starts a fresh worker, and the server and
  every other request carry on;
- only small answers come back from a worker (``MAPPED_MAX_ANSWER_BYTES``): a request asking
  for a logits-sized output (a gradient, probabilities) copies its logits into the server and
  is evaluated there, as without workers;
- workers are fresh interpreters (:mod:`service.dataplane.workers`, about 0.5 s to
  start: nothing of the server's main module or threads), at most
  ``CE_EVAL_SHARED_MEMORY_WORKERS`` of them, started on first use and after a death;
  :meth:`MappedEvaluator.close` stops them at shutdown.

The seam is :class:`~service.shared_memory.MappedTensor`: the codecs hand one out instead of
an array for shared logits, and :meth:`service.dataplane.evaluate.DataPlane.evaluate` gives it
to :meth:`MappedEvaluator.evaluate` instead of calling the engine itself.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

import ce_engine
from ce_engine.backend import to_numpy
from ce_engine.errors import ECHO_MAX_CHARS, set_echo_max_chars
from ce_engine.kernels.cpu import get_threads, set_threads
from service.dataplane import workers
from service.errors import ServiceError, Unavailable
from service.logs import get_logger
from service.shared_memory import Held, MappedTensor, RegionTruncated

log = get_logger("shared_memory")
#: Mappings one worker keeps (its most recently used regions).
KEPT_MAPPINGS = 4
#: Requests whose answer (outputs and metrics, as estimated before the work) may hold more
#: than this copy their logits and run in the server instead: a 65 MB gradient takes about
#: 250 ms back through the worker's socket, the copy in about 20.
MAPPED_MAX_ANSWER_BYTES = 1 << 20
#: How long shutdown waits for a worker's evaluation before killing the worker.
CLOSE_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class _Job:
    """A worker's request besides the descriptor: the region (``serial``: its registration; its
    ``first``..``end`` bytes of the object are mapped), where the logits lie in the object, the
    engine's arguments and its kernel threads."""

    serial: int
    first: int
    end: int
    start: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    loss: str
    arguments: dict[str, Any]
    threads: int


class WorkerDied(Unavailable):
    type = "evaluation-worker-died"


class _Short(Exception):
    """The object (``args[0]`` bytes) no longer holds the logits: nothing to map."""


class _Mappings:
    """A worker's kept mappings: region serial → (first byte mapped, mapping), most recent last.

    A mapping spans the region's bytes that the object still holds (``min(end, size)``), so an
    object shrunk below its region's end still serves the tensors it holds, as a read does."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[int, mmap.mmap]] = {}

    def view(self, fd: int, job: _Job) -> np.ndarray:
        """The logits' view; raises :class:`_Short` when the object (``fstat``, before every
        job: a kept mapping too) ends before them."""
        count = int(np.prod(job.shape, dtype=np.int64))
        needed = job.start + count * job.dtype.itemsize
        size = os.fstat(fd).st_size
        if size < needed:
            raise _Short(size)
        kept = self._kept.pop(job.serial, None)
        if kept is not None and kept[0] + len(kept[1]) < needed:  # mapped while shorter
            self._close(kept[1])
            kept = None
        if kept is None:
            kept = self._map(fd, job, size, needed)
            while len(self._kept) >= KEPT_MAPPINGS:
                self.forget([next(iter(self._kept))])
        self._kept[job.serial] = kept
        first, mapping = kept
        return np.frombuffer(mapping, job.dtype, count, job.start - first).reshape(job.shape)

    @staticmethod
    def _map(fd: int, job: _Job, size: int, needed: int) -> tuple[int, mmap.mmap]:
        """Map ``job.first``..``min(job.end, size)`` read-only (the start page-aligned); a
        truncation to below ``needed`` meanwhile raises :class:`_Short`, any other failure
        (ENOMEM, say) its own error."""
        first = job.first - job.first % mmap.ALLOCATIONGRANULARITY
        try:
            return first, mmap.mmap(
                fd, min(job.end, size) - first, prot=mmap.PROT_READ, offset=first
            )
        except (ValueError, OSError):
            if (now := os.fstat(fd).st_size) < needed:
                raise _Short(now) from None
            raise

    def forget(self, serials: list[int]) -> None:
        for serial in serials:
            kept = self._kept.pop(serial, None)
            if kept is not None:
                self._close(kept[1])

    @staticmethod
    def _close(mapping: mmap.mmap) -> None:
        with contextlib.suppress(BufferError):  # a view still alive: it unmaps with it
            mapping.close()


def _evaluate(mappings: _Mappings, fd: int, job: _Job) -> ce_engine.EvaluationResult:
    """Evaluate the logits in place, from the region's mapping (the worker side)."""
    set_threads(job.threads)
    result = ce_engine.evaluate(job.loss, mappings.view(fd, job), **job.arguments)
    result.outputs = {name: to_numpy(value) for name, value in result.outputs.items()}
    return result


def _serve(conn: Connection) -> None:
    """A worker's loop. In: ``("job", job)`` then a descriptor, answered ``("ok", result)``,
    ``("short", size)`` (the object no longer holds the logits), or an error or crash
    (:func:`~service.dataplane.workers.error_reply`, ``crash_reply``); ``("forget", serials)``
    (unmap those regions, no answer); ``None`` or the end of the socket: exit."""
    mappings = _Mappings()
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        if message[0] == "forget":
            mappings.forget(message[1])
            continue
        fd = reduction.recv_handle(conn)
        try:
            reply: tuple[Any, ...] = ("ok", _evaluate(mappings, fd, message[1]))
        except _Short as exc:
            reply = ("short", exc.args[0])
        except ce_engine.EngineError as exc:
            from service.dataplane.evaluate import engine_error

            reply = workers.error_reply(engine_error(exc))
        except OSError as exc:  # mmap: out of memory or mappings
            detail = f"the worker could not map the shared-memory region: {exc}"
            errors = [{"loc": ["logits"], "msg": str(exc), "type": "unmappable"}]
            reply = workers.error_reply(Unavailable(detail, errors))
        except Exception as exc:  # a bug: the server answers 500, as in its own threads
            reply = workers.crash_reply(exc)
        finally:
            os.close(fd)
        conn.send(reply)
        del reply


class _Worker:
    """One worker process and the server's end of its socket pair; ``lock`` held while the
    socket is in use (closing it included); the region serials to send it a ``forget`` for
    wait in ``_unmap``."""

    def __init__(self, echo_max_chars: int) -> None:
        self.process, self.conn = workers.spawn(__name__, [str(echo_max_chars)])
        self.lock = threading.Lock()
        self._unmap: set[int] = set()
        self._unmap_lock = threading.Lock()
        log.info("shared-memory worker started", extra={"fields": {"pid": self.process.pid}})

    def add_unmap(self, serials: list[int]) -> None:
        with self._unmap_lock:
            self._unmap.update(serials)

    def has_unmap(self) -> bool:
        with self._unmap_lock:
            return bool(self._unmap)

    def call(self, fd: int, job: _Job) -> tuple[Any, ...]:
        self.conn.send(("job", job))
        reduction.send_handle(self.conn, fd, self.process.pid)
        reply: tuple[Any, ...] = self.conn.recv()
        return reply

    def send_unmap(self) -> None:
        """Send the pending ``forget`` (the caller holds ``lock``)."""
        with self._unmap_lock:
            serials, self._unmap = list(self._unmap), set()
        if serials and not self.conn.closed:
            with contextlib.suppress(OSError):  # a dead worker unmaps everything
                self.conn.send(("forget", serials))

    def exit_code(self) -> int | None:
        """Reap the (dead) worker: its exit code, ``-signum`` when a signal killed it (the
        caller holds ``lock``)."""
        return self._reap(5.0)

    def stop(self) -> None:
        """Ask the worker to exit, and reap it (the caller holds ``lock``)."""
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self._reap(2.0)

    def _reap(self, timeout: float) -> int | None:
        return workers.reap(self.process, self.conn, timeout)


class MappedEvaluator:
    """At most ``workers`` worker processes, each running one evaluation at a time, with errors
    echoing ``echo_max_chars`` characters of input; ``observe`` is called with each
    evaluation's outcome (ok, error, truncated, died).

    The ``cpu_threads`` kernel threads (default: the server's, ``CE_EVAL_CPU_THREADS`` or the
    cores) are shared out: a job gets ``max(1, cpu_threads // busy)``, ``busy`` the workers
    evaluating once it starts, so a lone request runs on every core and a full house on one
    each, not ``workers`` × ``cpu_threads`` threads."""

    def __init__(
        self,
        workers: int,
        cpu_threads: int | None = None,
        echo_max_chars: int = ECHO_MAX_CHARS,
        observe: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.workers = workers
        self.cpu_threads = get_threads() if cpu_threads is None else cpu_threads
        self._busy = 0
        self.echo_max_chars = echo_max_chars
        self.observe = observe
        #: a slot per worker: held from taking a worker to releasing it (or its death)
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # the last one released first: its mappings are warm
        self._running: list[_Worker] = []
        self._closed = False

    def _take(self) -> tuple[_Worker, int]:
        """One of the ``workers`` slots (waiting for one while all are in use), then the idle
        worker released last or, with none idle, a new one, and its share of the kernel
        threads. Idle workers that died meanwhile are reaped."""
        self._slots.acquire()
        try:
            with self._lock:
                if self._closed:
                    raise Unavailable("the server is shutting down")
                self._busy += 1
                threads = max(1, self.cpu_threads // self._busy)
                dead = [w for w in self._idle if w.process.poll() is not None]
                for worker in dead:
                    self._idle.remove(worker)
                    self._running.remove(worker)
                if self._idle:
                    worker = self._idle.pop()
                else:
                    worker = _Worker(self.echo_max_chars)
                    self._running.append(worker)
            for gone in dead:
                with gone.lock:
                    gone.exit_code()
            return worker, threads
        except BaseException:
            self._free()
            raise

    def _free(self) -> None:
        with self._lock:
            self._busy -= 1
        self._slots.release()

    def _drop(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._running:
                self._running.remove(worker)

    def _release(self, worker: _Worker | None) -> None:
        """``worker`` back to idle and its pending ``forget`` sent (None: it is gone), and its
        slot free."""
        if worker is not None:
            with self._lock:
                self._idle.append(worker)
            self._flush(worker)
        self._free()

    @staticmethod
    def _flush(worker: _Worker) -> None:
        """Send ``worker`` its pending ``forget`` unless its socket is in use (then whoever
        uses it sends it when done)."""
        while worker.has_unmap() and worker.lock.acquire(blocking=False):
            try:
                worker.send_unmap()
            finally:
                worker.lock.release()

    def forget(self, serials: list[int]) -> None:
        """Regions unregistered: every worker unmaps them, now or when its evaluation ends."""
        with self._lock:
            running = list(self._running)
        for worker in running:
            worker.add_unmap(serials)
            self._flush(worker)

    def evaluate(
        self, tensor: MappedTensor, loss: str, arguments: dict[str, Any]
    ) -> ce_engine.EvaluationResult:
        """``ce_engine.evaluate(loss, <tensor's view>, **arguments)`` in a worker.

        The tensor's region is looked up and its object's size checked first (404, 409), as for
        a read. Raises the engine's errors as the service's, as the server's own threads do; a
        worker finding the object too short, or dying, as 409 when the object no longer holds
        the logits (it was truncated), a worker's death otherwise as :class:`WorkerDied`
        (503)."""
        with tensor.access.hold(tensor.ref) as held:
            region = held.region
            worker, threads = self._take()
            job = _Job(
                region.serial,
                region.offset,
                region.offset + region.byte_size,
                held.start,
                tensor.shape,
                tensor.dtype,
                loss,
                arguments,
                threads,
            )
            alive = False
            try:
                with worker.lock:
                    try:
                        worker.send_unmap()  # a forget that came as it was released
                        reply = worker.call(held.fd, job)
                    except (EOFError, OSError):
                        died = self._died(worker, held)
                        self.observe("died" if isinstance(died, WorkerDied) else "truncated")
                        raise died from None
                    except BaseException:  # e.g. an argument that does not pickle: start afresh
                        worker.stop()
                        raise
                    alive = True
                    if not tensor.access.registered(region):  # unregistered while it ran
                        worker.add_unmap([region.serial])
                    worker.send_unmap()
            finally:
                if not alive:
                    self._drop(worker)
                self._release(worker if alive else None)
            if reply[0] == "short":
                self.observe("truncated")
                raise held.truncated() or held.short(reply[1])
        self.observe("ok" if reply[0] == "ok" else "error")
        if reply[0] == "ok":
            result: ce_engine.EvaluationResult = reply[1]
            return result
        workers.raise_reply(reply, "shared-memory evaluation worker")

    @staticmethod
    def _died(worker: _Worker, held: Held) -> ServiceError:
        """The error for a request whose worker died (the caller holds ``worker.lock``): 409
        when the object was truncated (SIGBUS), else :class:`WorkerDied`."""
        code = worker.exit_code()
        truncated = held.truncated()
        if truncated is None and code == -signal.SIGBUS:  # truncated, then grown again
            truncated = RegionTruncated(
                f"shared memory object {held.region.key!r} of region {held.region.name!r} was "
                "truncated during the evaluation; register it again",
                [{"loc": [*held.ref.loc, "shared_memory_region"], "msg": "truncated during the "
                  "evaluation", "type": "truncated"}],
            )  # fmt: skip
        died = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        fields = {"pid": worker.process.pid, "died": died, "truncated": bool(truncated)}
        log.warning("shared-memory worker died", extra={"fields": fields})
        return truncated or WorkerDied(
            f"the worker evaluating the shared-memory logits died ({died})",
            [{"loc": ["logits"], "msg": died, "type": "worker_died"}],
        )

    def close(self, wait: float = CLOSE_WAIT_SECONDS) -> None:
        """Stop every worker (shutdown); an evaluation still running after ``wait`` seconds has
        its worker killed (it answers 503). Later evaluations answer 503."""
        with self._lock:
            self._closed = True
            running, self._running, self._idle = self._running, [], []
        deadline = time.monotonic() + wait
        for worker in running:
            if worker.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    worker.stop()
                finally:
                    worker.lock.release()
            else:  # its evaluation answers 503 and closes its socket
                worker.process.kill()
                worker.process.wait()


def worker_main(conn: Connection, argv: list[str]) -> None:
    """A worker (:func:`service.dataplane.workers.spawn`): ``ECHO_MAX_CHARS``."""
    set_echo_max_chars(int(argv[0]))
    _serve(conn)
