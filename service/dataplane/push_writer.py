"""The write transactions of batch pushes, run in a worker process of their own.

A push evaluates its batch in the server, then locks the run, inserts the batch row and
updates the run's totals in one transaction (:meth:`RunsDataPlane.write_batch`). That
transaction is about 1.5 ms of Python (SQLAlchemy statements, state merges, the answer)
holding the server's GIL, the same order as everything else a 256 × 1000 push costs the
server beyond a stateless evaluation. Sent to a worker process (:mod:`service.dataplane.workers`)
it runs beside the server's own work instead of in turn with it: the server only pickles the
:class:`~service.dataplane.runs.PreparedBatch` (plain values, small: no tensors) and waits,
GIL released, for the answer.

The worker holds its own :class:`~service.store.Store` on the same database and a
:class:`~service.dataplane.runs.RunsDataPlane` that only runs ``write_batch``, one transaction
at a time (SQLite has one writer anyway; PostgreSQL pushes of one replica queue here). Nothing
changes for exactly-once: the transaction is the same, and a worker that dies before its
answer leaves a push that committed or did not, as a lost connection does; the client's
retry is answered from the store (503 here, the next push starts a new worker).
``CE_EVAL_PUSH_WRITER=false`` runs the transactions in the server's threads instead.
"""

from __future__ import annotations

import contextlib
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from service.dataplane import workers
from service.errors import ServiceError, Unavailable
from service.logs import get_logger

if TYPE_CHECKING:
    from service.config import Settings
    from service.dataplane.runs import PreparedBatch, _Unwritten

log = get_logger("runs")
#: How long shutdown waits for a transaction in flight before killing the worker.
CLOSE_WAIT_SECONDS = 10.0
#: How long a new worker may take to be ready (imports, the store) before it counts as one
#: that cannot start.
START_SECONDS = 60.0
#: A transaction's longest wait for the database, with no ``database_statement_timeout_s``
#: (SQLite waits for its writer lock this long: ``busy_timeout``).
DATABASE_WAIT_SECONDS = 30.0


class WriterUnstartable(Exception):
    """The worker died or hung before it was ready: the caller writes in its own threads."""


class PushWriter:
    """One worker process running ``write_batch`` for the server's pushes, started on first
    use and again after a death.

    A push waits at most ``timeout`` seconds for its answer (``database_statement_timeout_s``
    or ``DATABASE_WAIT_SECONDS``, × 4 for the transaction's statements, + 10 s), and as long
    again for the pushes ahead of it; past that its worker is killed, the push answers 503 and
    the next one starts a new worker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        wait = settings.database_statement_timeout_s or DATABASE_WAIT_SECONDS
        self.timeout = 4 * wait + 10.0
        self._lock = threading.Lock()  # held for a transaction's round trip
        self._worker: tuple[Any, Connection] | None = None
        self._closed = False

    def write_batch(self, batch: PreparedBatch) -> dict[str, Any] | _Unwritten:
        """:meth:`RunsDataPlane.write_batch` in the worker: its answer, or its error raised
        here; 503 when the worker dies or the server is shutting down."""
        if not self._lock.acquire(timeout=self.timeout):
            raise self._unavailable("the pushes ahead of this one took too long")
        try:
            if self._worker is None or self._worker[0].poll() is not None:
                if self._closed:
                    raise Unavailable("the server is shutting down", headers={"Retry-After": "1"})
                self._start()
            assert self._worker is not None
            process, conn = self._worker
            try:
                conn.send(batch)
                if not conn.poll(self.timeout):
                    process.kill()
                    raise EOFError
                reply: tuple[Any, ...] = conn.recv()
            except (EOFError, OSError):
                code = workers.reap(process, conn, 5.0)
                self._worker = None
                fields = {"pid": process.pid, "code": code}
                log.warning("push writer died", extra={"fields": fields})
                raise self._unavailable(f"the push writer died (exit code {code})") from None
        finally:
            self._lock.release()
        if reply[0] == "ok":
            answer: dict[str, Any] | _Unwritten = reply[1]
            return answer
        workers.raise_reply(reply, "push writer")

    @staticmethod
    def _unavailable(why: str) -> Unavailable:
        return Unavailable(
            f"{why}; the batch may or may not be stored: retry it (a stored batch is answered "
            "again)",
            headers={"Retry-After": "1"},
        )

    def _start(self) -> None:
        """A new worker (the caller holds ``_lock``), sent the server's settings; raises
        :class:`WriterUnstartable` unless it is ready within ``START_SECONDS``."""
        process, conn = workers.spawn(__name__, [])
        try:
            conn.send(self.settings)
            ready = conn.poll(START_SECONDS) and conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            code = workers.reap(process, conn, 5.0)
            log.error(
                "push writer could not start: pushes write in the server's threads",
                extra={"fields": {"pid": process.pid, "code": code}},
            )
            raise WriterUnstartable(f"exit code {code}")
        self._worker = process, conn
        log.info("push writer started", extra={"fields": {"pid": process.pid}})

    def close(self, wait: float = CLOSE_WAIT_SECONDS) -> None:
        """Stop the worker (shutdown); one still in a transaction after ``wait`` s is killed
        (its push answers 503). Later pushes answer 503."""
        self._closed = True  # first: a push from now on starts no worker
        locked = self._lock.acquire(timeout=wait)
        try:
            worker = self._worker
            if worker is None:
                return
            process, conn = worker
            if not locked:  # the push in flight answers 503 and reaps it
                process.kill()
                return
            self._worker = None
            with contextlib.suppress(OSError):
                conn.send(None)
            workers.reap(process, conn, 5.0)
        finally:
            if locked:
                self._lock.release()


def worker_main(conn: Connection, argv: list[str]) -> None:
    """The worker: settings first (answered ``"ready"``), then ``PreparedBatch`` →
    ``("ok", answer)``, an error or a crash (:func:`~service.dataplane.workers.error_reply`,
    ``crash_reply``); ``None`` or the end of the socket: exit."""
    from service.dataplane.runs import RunsDataPlane
    from service.logs import configure_logging
    from service.store import Store

    settings: Settings = conn.recv()
    configure_logging(settings.log_level, settings.log_format)
    store = Store(
        settings.database_url,
        connect_timeout=settings.database_connect_timeout_s,
        statement_timeout=settings.database_statement_timeout_s,
    )
    runs = RunsDataPlane(settings, store)
    conn.send("ready")
    try:
        while True:
            try:
                batch = conn.recv()
            except EOFError:
                return
            if batch is None:
                return
            try:
                reply: tuple[Any, ...] = ("ok", runs.write_batch(batch))
            except ServiceError as exc:
                reply = workers.error_reply(exc)
            except Exception as exc:  # a bug: the server answers 500, as in its own threads
                log.exception("push writer transaction failed")
                reply = workers.crash_reply(exc)
            conn.send(reply)
    finally:
        store.dispose()
