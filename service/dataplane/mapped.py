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
- a truncation kills only the worker touching the lost pages (SIGBUS). Its request answers 409
  (:class:`~service.shared_memory.RegionTruncated`), the next request starts a fresh worker,
  and the server and every other request carry on;
- only small answers come back from a worker (``MAPPED_MAX_ANSWER_BYTES``): a request asking
  for a logits-sized output (a gradient, probabilities) copies its logits into the server and
  is evaluated there, as without workers;
- workers are fresh interpreters (``python -m service.dataplane.mapped``, about 0.5 s to
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
import queue
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

import ce_engine
from ce_engine.backend import to_numpy
from service.errors import ServiceError, Unavailable
from service.logs import get_logger
from service.shared_memory import MappedTensor

log = get_logger("shared_memory")
#: Mappings one worker keeps (its most recently used regions).
KEPT_MAPPINGS = 4
#: Requests whose answer (outputs and metrics, as estimated before the work) may hold more
#: than this copy their logits and run in the server instead: a 65 MB gradient takes about
#: 250 ms back through the worker's socket, the copy in about 20.
MAPPED_MAX_ANSWER_BYTES = 1 << 20


@dataclass(frozen=True)
class _Job:
    """A worker's request besides the descriptor: the region (``serial``: its registration; its
    ``first``..``end`` bytes of the object are mapped), where the logits lie in the object, and
    the engine's arguments."""

    serial: int
    first: int
    end: int
    start: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    loss: str
    arguments: dict[str, Any]


class WorkerDied(Unavailable):
    type = "evaluation-worker-died"


class _Mappings:
    """A worker's kept mappings: region serial → (first byte mapped, mapping), most recent last."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[int, mmap.mmap]] = {}

    def view(self, fd: int, job: _Job) -> np.ndarray:
        kept = self._kept.pop(job.serial, None)
        if kept is None:
            first = job.first - job.first % mmap.ALLOCATIONGRANULARITY
            kept = first, mmap.mmap(fd, job.end - first, prot=mmap.PROT_READ, offset=first)
            while len(self._kept) >= KEPT_MAPPINGS:
                self.forget([next(iter(self._kept))])
        self._kept[job.serial] = kept
        first, mapping = kept
        count = int(np.prod(job.shape, dtype=np.int64))
        return np.frombuffer(mapping, job.dtype, count, job.start - first).reshape(job.shape)

    def forget(self, serials: list[int]) -> None:
        for serial in serials:
            kept = self._kept.pop(serial, None)
            if kept is not None:
                with contextlib.suppress(BufferError):  # a view still alive: it unmaps with it
                    kept[1].close()


def _evaluate(mappings: _Mappings, fd: int, job: _Job) -> ce_engine.EvaluationResult:
    """Evaluate the logits in place, from the region's mapping (the worker side)."""
    result = ce_engine.evaluate(job.loss, mappings.view(fd, job), **job.arguments)
    result.outputs = {name: to_numpy(value) for name, value in result.outputs.items()}
    return result


def _serve(conn: Connection) -> None:
    """A worker's loop. In: ``("job", job)`` then a descriptor, answered ``("ok", result)``,
    ``("error", kind, detail, errors)`` or ``("crash", text)``; ``("forget", serials)``
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
        except ce_engine.EngineError as exc:
            from service.dataplane.evaluate import engine_error

            error = engine_error(exc)
            reply = ("error", type(error), error.detail, error.errors)
        except Exception as exc:  # a bug: the server answers 500, as in its own threads
            reply = ("crash", f"{type(exc).__name__}: {exc}")
        finally:
            os.close(fd)
        conn.send(reply)
        del reply


class _Worker:
    """One worker process and the server's end of its socket pair; ``lock`` held while the
    socket is in use; the region serials to send it a ``forget`` for wait in ``_unmap``."""

    def __init__(self, cpu_threads: int | None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [sys.executable, "-m", __name__, str(theirs.fileno())]
        if cpu_threads is not None:
            command.append(str(cpu_threads))
        try:
            self.process = subprocess.Popen(
                command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
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
        if serials:
            with contextlib.suppress(OSError):  # a dead worker unmaps everything
                self.conn.send(("forget", serials))

    def exit_code(self) -> int | None:
        """Reap the (dead) worker: its exit code, ``-signum`` when a signal killed it."""
        return self._reap(5.0)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self._reap(2.0)

    def _reap(self, timeout: float) -> int | None:
        """Close our end, wait ``timeout`` s for the process to end (then kill it): its code."""
        self.conn.close()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class MappedEvaluator:
    """At most ``workers`` worker processes, each running one evaluation at a time."""

    def __init__(self, workers: int, cpu_threads: int | None = None) -> None:
        self.workers = workers
        self.cpu_threads = cpu_threads
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        #: a slot per worker: held from taking a worker to releasing it (or its death)
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._running: list[_Worker] = []
        self._closed = False

    def _take(self) -> _Worker:
        """One of the ``workers`` slots (waiting for one while all are in use), then an idle
        worker (one that died meanwhile is dropped) or, with none idle, a new one."""
        self._slots.acquire()
        try:
            while not self._closed:
                try:
                    worker = self._idle.get_nowait()
                except queue.Empty:
                    break
                if worker.process.poll() is None:
                    return worker
                self._drop(worker)
            with self._lock:
                if self._closed:
                    raise Unavailable("the server is shutting down")
                worker = _Worker(self.cpu_threads)
                self._running.append(worker)
                return worker
        except BaseException:
            self._slots.release()
            raise

    def _drop(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._running:
                self._running.remove(worker)

    def _release(self, worker: _Worker | None) -> None:
        """``worker`` back to idle, once any ``forget`` that came meanwhile is sent (None: it
        died), and its slot free."""
        if worker is not None:
            with worker.lock:
                worker.send_unmap()
            self._idle.put(worker)
            self._flush(worker)
        self._slots.release()

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
        worker's death as 409 when the object no longer holds the logits (it was truncated),
        else as :class:`WorkerDied` (503)."""
        with tensor.access.hold(tensor.ref) as held:
            region = held.region
            job = _Job(
                region.serial,
                region.offset,
                region.offset + region.byte_size,
                held.start,
                tensor.shape,
                tensor.dtype,
                loss,
                arguments,
            )
            worker = self._take()
            alive = True
            try:
                with worker.lock:
                    reply = worker.call(held.fd, job)
            except (EOFError, OSError):
                alive = False
                code = worker.exit_code()
                self._drop(worker)
                truncated = held.truncated()
                died = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                fields = {"pid": worker.process.pid, "died": died, "truncated": bool(truncated)}
                log.warning("shared-memory worker died", extra={"fields": fields})
                if truncated is not None:
                    raise truncated from None
                raise WorkerDied(
                    f"the worker evaluating the shared-memory logits died ({died})",
                    [{"loc": ["logits"], "msg": died, "type": "worker_died"}],
                ) from None
            except BaseException:  # e.g. an argument that does not pickle: start afresh
                alive = False
                worker.stop()
                self._drop(worker)
                raise
            finally:
                self._release(worker if alive else None)
        if reply[0] == "ok":
            result: ce_engine.EvaluationResult = reply[1]
            return result
        if reply[0] == "error":
            kind: type[ServiceError] = reply[1]
            raise kind(reply[2], reply[3])
        raise RuntimeError(f"shared-memory evaluation worker: {reply[1]}")

    def close(self) -> None:
        """Stop every worker (shutdown); later evaluations answer 503."""
        with self._lock:
            self._closed = True
            running, self._running = self._running, []
        for worker in running:
            with worker.lock:  # an evaluation in flight ends first
                worker.stop()


if __name__ == "__main__":  # a worker: python -m service.dataplane.mapped FD [CPU_THREADS]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it stops workers
    if len(sys.argv) > 2:
        from ce_engine.kernels.cpu import set_threads

        set_threads(int(sys.argv[2]))
    _serve(Connection(int(sys.argv[1])))
