"""The write transactions of batch pushes, run in a worker process of their own.

A push evaluates its batch in the server, then locks the run, inserts the batch row and
updates the run's totals in one transaction (:meth:`RunsDataPlane.write_batches`). That
transaction is about 1.5 ms of Python (SQLAlchemy statements, state merges, the answer),
and on PostgreSQL as many round trips and a commit. Sent to a worker process
(:mod:`service.dataplane.workers`) it runs beside the server's own work instead of in turn
with it, holding no GIL of the server's: the server only pickles the
:class:`~service.dataplane.runs.PreparedBatch` (plain values, small: no tensors) and waits.

The worker holds its own :class:`~service.store.Store` on the same database and a
:class:`~service.dataplane.runs.RunsDataPlane` that only runs ``write_batches``, one
transaction at a time (SQLite has one writer anyway; PostgreSQL pushes of one replica queue
here). Pushes that queue while a transaction runs are written by the next one together (group
commit): each run locked and its totals written once, one commit, each batch in a savepoint
of its own, so that each gets exactly the outcome it would get alone. Exactly-once is
unchanged: a worker that dies before its answer leaves pushes that committed or did not, as a
lost connection does; the client's retry is answered from the store (503 here, the next push
starts a new worker). ``CE_EVAL_PUSH_WRITER=false`` runs the transactions in the server's
threads instead, one push each.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from service.dataplane import workers
from service.errors import ServiceError, Unavailable
from service.logs import get_logger

if TYPE_CHECKING:
    from service.config import Settings
    from service.dataplane.runs import BatchOutcome, PreparedBatch, RunsDataPlane, _Unwritten

log = get_logger("runs")
#: The most pushes one transaction writes (at most 64: on PostgreSQL each batch's savepoint
#: takes a subtransaction id, and a backend caches 64 of them).
MAX_GROUP = 16
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


@dataclass(eq=False)  # compared by identity (in the queue)
class _Slot:
    """One push waiting for its group's transaction: its reply once answered."""

    batch: PreparedBatch
    reply: tuple[Any, ...] | None = None


class PushWriter:
    """One worker process running the server's push transactions, started on first use and
    again after a death.

    Pushes that arrive while a transaction runs queue; the next transaction writes them
    together, up to ``MAX_GROUP`` (:meth:`RunsDataPlane.write_batches`: one commit, each run
    locked and its totals written once, each batch's outcome its own). The push that finds no
    transaction running sends the queue's head and hands out the answers (no thread of its
    own). A lone push's transaction may take ``timeout`` seconds
    (``database_statement_timeout_s`` or ``DATABASE_WAIT_SECONDS``, × 4 for a batch's
    statements, + 10 s), a group's twice that; past that its worker is killed, its pushes
    answer 503 and the next one starts a new worker. A push waits at most ``timeout`` in the
    queue (and while it sends other pushes' group, that group's bound)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        wait = settings.database_statement_timeout_s or DATABASE_WAIT_SECONDS
        self.timeout = 4 * wait + 10.0
        self._lock = threading.Lock()  # held for a transaction's round trip
        self._queue: list[_Slot] = []
        self._answered = threading.Condition()  # guards _queue, _sending; a group answered
        self._sending = False
        self._worker: tuple[Any, Connection] | None = None
        self._closed = False
        #: transactions written, and the batches they held (``batches / transactions``: the
        #: mean group)
        self.transactions = 0
        self.batches = 0

    def write_batch(self, batch: PreparedBatch) -> dict[str, Any] | _Unwritten:
        """:meth:`RunsDataPlane.write_batch` in the worker, with the pushes queued beside it:
        its answer, or its error raised here; 503 when the worker dies or the server is
        shutting down; :class:`WriterUnstartable` when no worker could start."""
        slot = _Slot(batch)
        deadline = time.monotonic() + self.timeout
        with self._answered:
            self._queue.append(slot)
            while slot.reply is None:
                if not self._sending:
                    try:
                        self._send_group()
                    except BaseException:  # its own push may be beyond the group: not sent
                        if slot in self._queue:
                            self._queue.remove(slot)
                        raise
                    continue
                left = deadline - time.monotonic()
                if slot in self._queue:
                    if left <= 0:
                        self._queue.remove(slot)
                        raise self._unavailable("the pushes ahead of this one took too long")
                    self._answered.wait(left)
                else:  # in the transaction running: answered within its own bound
                    self._answered.wait()
        reply = slot.reply
        if reply[0] == "ok":
            answer: dict[str, Any] | _Unwritten = reply[1]
            return answer
        if reply[0] == "unstartable":
            raise WriterUnstartable(reply[1])
        workers.raise_reply(reply, "push writer")

    def _send_group(self) -> None:
        """Write the queue's first ``MAX_GROUP`` pushes and give each its reply (the caller
        holds ``_answered``; released meanwhile)."""
        self._sending = True
        group = self._queue[:MAX_GROUP]
        del self._queue[:MAX_GROUP]
        replies: list[tuple[Any, ...]] = []
        self._answered.release()
        try:
            replies = self._round_trip([slot.batch for slot in group])
        finally:
            self._answered.acquire()
            try:
                for i, slot in enumerate(group):
                    slot.reply = (
                        replies[i]
                        if i < len(replies)
                        else workers.error_reply(self._unavailable("the push writer failed"))
                    )
            finally:
                self._sending = False
                self._answered.notify_all()

    def _round_trip(self, batches: list[PreparedBatch]) -> list[tuple[Any, ...]]:
        """The worker's replies to ``batches``, one each; one failure's reply for all when the
        worker could not be reached or died."""
        with self._lock:
            try:
                if self._worker is None or self._worker[0].poll() is not None:
                    if self._closed:
                        shutting = Unavailable(
                            "the server is shutting down", headers={"Retry-After": "1"}
                        )
                        return [workers.error_reply(shutting)] * len(batches)
                    self._start()
            except WriterUnstartable as exc:
                return [("unstartable", str(exc))] * len(batches)
            assert self._worker is not None
            process, conn = self._worker
            try:
                conn.send(batches)
                if not conn.poll(self.timeout * min(len(batches), 2)):
                    process.kill()
                    raise EOFError
                replies: list[tuple[Any, ...]] = conn.recv()
            except BaseException as exc:  # no reply read: this worker is out of step, or dead
                dead = isinstance(exc, EOFError | OSError)
                if not dead:
                    process.kill()
                code = workers.reap(process, conn, 5.0)
                self._worker = None
                if not dead:
                    raise
                fields = {"pid": process.pid, "code": code}
                log.warning("push writer died", extra={"fields": fields})
                died = self._unavailable(f"the push writer died (exit code {code})")
                return [workers.error_reply(died)] * len(batches)
            self.transactions += 1
            self.batches += len(batches)
            return replies

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
    """The worker: settings first (answered ``"ready"``), then lists of ``PreparedBatch`` (one
    transaction each) → a reply each: ``("ok", answer)``, an error or a crash
    (:func:`~service.dataplane.workers.error_reply`, ``crash_reply``); ``None`` or the end of
    the socket: exit."""
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
                batches = conn.recv()
            except EOFError:
                return
            if batches is None:
                return
            conn.send(_write(runs, batches))
    finally:
        store.dispose()


def _write(runs: RunsDataPlane, batches: list[PreparedBatch]) -> list[tuple[Any, ...]]:
    """The replies to one transaction of ``batches``. A group that fails as a whole (the
    store, a bug: nothing of it committed) is written again one push at a time, so that one
    push's failure stays its own."""
    try:
        return [_reply(outcome) for outcome in runs.write_batches(batches)]
    except Exception as exc:
        if len(batches) > 1:
            log.warning("a group of pushes failed: writing them one by one", exc_info=True)
            return [reply for batch in batches for reply in _write(runs, [batch])]
        if isinstance(exc, ServiceError):  # the store's (503)
            return [workers.error_reply(exc)]
        log.exception("push writer transaction failed")  # a bug: 500, as in the server's threads
        return [workers.crash_reply(exc)]


def _reply(outcome: BatchOutcome) -> tuple[Any, ...]:
    if isinstance(outcome, ServiceError):
        return workers.error_reply(outcome)
    return ("ok", outcome)
