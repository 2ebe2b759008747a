"""Fault tests on real processes (localhost only, bounded in time).

- A replica SIGKILLed during concurrent ingestion by several clients into one PostgreSQL, then
  restarted: clients retry transport errors and 503 with the same batch ids, and the run ends
  with every batch counted exactly once and aggregates equal to one stateless evaluation.
- PostgreSQL stopped (``pg_ctl stop -m fast``) mid-run and started again: meanwhile every answer
  is a prompt 503 with ``Retry-After`` (never a 500 or a hang) and ``/readyz`` is 503; afterwards
  the same server process serves again and the run's totals are exact.
- A database that accepts connections but never answers: the bounded connect timeout gives 503.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from service.config import Settings
from service.dataplane.runs import RunsDataPlane
from service.errors import Unavailable
from service.store import Store
from tests.servers import PostgresCluster, ServerProcess
from tests.test_runs import as_base64
from tests.test_runs_e2e import METRICS, assert_run_equals, expected_run

CLASSES = 6
DEADLINE_S = 90.0  # a bound on each test's ingestion, never a performance expectation


def make_batches(seed: int, count: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = {}
    for i in range(count):
        n = int(rng.integers(4, 24))
        targets = rng.integers(0, CLASSES, size=n)
        logits = rng.standard_normal((n, CLASSES)) + 1.5 * np.eye(CLASSES)[targets]
        batches[f"b{i:04d}"] = (logits, targets, rng.uniform(0.5, 2.0, size=n))
    return batches


def body(batch_id: str, batch: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, Any]:
    logits, targets, weights = batch
    return {"batch_id": batch_id, "logits": as_base64(logits), "targets": as_base64(targets),
            "sample_weight": as_base64(weights)}  # fmt: skip


def expected(batches: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Any:
    ordered = [batches[k] for k in sorted(batches)]
    return expected_run(*(np.concatenate([b[k] for b in ordered]) for k in range(3)))


@dataclass
class Ledger:
    """What the clients saw, shared between their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)  # batch id → non-duplicate answers
    answered: set[str] = field(default_factory=set)
    served_by: Counter[str] = field(default_factory=Counter)  # replica url → 200 answers
    retry_after_missing: int = 0

    def record(self, url: str, batch_id: str, response: httpx.Response) -> None:
        with self.lock:
            self.statuses[response.status_code] += 1
            if response.status_code == 503 and "retry-after" not in response.headers:
                self.retry_after_missing += 1
            if response.status_code == 200:
                self.answered.add(batch_id)
                self.served_by[url] += 1
                if not response.json()["duplicate"]:
                    self.accepted[batch_id] += 1


def push_until_answered(
    client: httpx.Client,
    urls: Callable[[], list[str]],
    run_id: str,
    batch_id: str,
    payload: dict[str, Any],
    ledger: Ledger,
    deadline: float,
) -> None:
    """Send one batch until a 200, retrying transport errors and 503 with the same batch id
    (trying the next replica each time); any other answer fails the test."""
    attempt = 0
    while True:
        assert time.monotonic() < deadline, f"{batch_id}: no answer before the deadline"
        candidates = urls()
        url = candidates[attempt % len(candidates)]
        attempt += 1
        try:
            response = client.post(f"{url}/v1/runs/{run_id}/batches", json=payload)
        except httpx.TransportError as exc:
            with ledger.lock:
                ledger.transport_errors[type(exc).__name__] += 1
            time.sleep(0.05)
            continue
        ledger.record(url, batch_id, response)
        if response.status_code == 200:
            return
        assert response.status_code == 503, response.text
        time.sleep(min(0.2, float(response.headers.get("retry-after", "1"))))


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_exact(run_url: str, batches: dict[str, Any], ledger: Ledger) -> None:
    """Every batch answered, accepted exactly once, stored once; aggregates exact."""
    assert ledger.answered == set(batches)
    assert all(ledger.accepted[b] <= 1 for b in batches), ledger.accepted.most_common(3)
    run = httpx.get(run_url, timeout=30).json()
    assert run["batches"] == len(batches)
    series = httpx.get(f"{run_url}/batches", timeout=30).json()["batches"]
    assert sorted(b["batch_id"] for b in series) == sorted(batches)
    assert [b["seq"] for b in series] == list(range(1, len(batches) + 1))
    assert_run_equals(run, expected(batches))


# ------------------------------------------------------------------------ replica SIGKILL


@pytest.mark.slow
@pytest.mark.postgres
def test_sigkill_a_replica_during_concurrent_ingestion_then_restart_gives_exact_totals(
    serve: Callable[..., ServerProcess], postgres_cluster: PostgresCluster
) -> None:
    database = postgres_cluster.create_database()
    replicas = [serve(database), serve(database)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: s.start(), replicas))
    run = httpx.post(
        f"{replicas[0].url}/v1/runs",
        json={"name": "sigkill", "loss": "cross_entropy", "metrics": METRICS},
    ).json()
    clients, per_client, before_restart = 6, 30, 20
    batches = make_batches(11, clients * per_client)
    ids = sorted(batches)
    ledger = Ledger()
    restarted = threading.Event()
    deadline = time.monotonic() + DEADLINE_S

    def urls() -> list[str]:  # both, in random order: the killed one too, as a real client would
        return random.sample([r.url for r in replicas], len(replicas))

    def client(index: int) -> None:
        mine = ids[index * per_client : (index + 1) * per_client]
        with httpx.Client(timeout=30) as http:
            for k, batch_id in enumerate(mine):
                if k == before_restart:  # the rest goes to both replicas again
                    assert restarted.wait(DEADLINE_S), "the replica was not restarted"
                payload = body(batch_id, batches[batch_id])
                push_until_answered(http, urls, run["id"], batch_id, payload, ledger, deadline)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        wait_for(lambda: len(ledger.answered) >= 40, 60, "40 answered batches")
        replicas[1].kill()  # mid-stream: clients have requests in flight on it
        killed_at = len(ledger.answered)
        progress = min(killed_at + 10, clients * before_restart)
        wait_for(lambda: len(ledger.answered) >= progress, 60, "progress on one replica")
        replicas[1].start()
        served_before = ledger.served_by[replicas[1].url]
        restarted.set()
        for future in futures:
            future.result(timeout=DEADLINE_S)

    print(f"sigkill: {len(batches)} batches, killed after {killed_at} answered, statuses "
          f"{dict(ledger.statuses)}, transport errors {dict(ledger.transport_errors)}, "
          f"served by {dict(ledger.served_by)}")  # fmt: skip
    assert killed_at < clients * before_restart  # the kill happened during ingestion
    assert sum(ledger.transport_errors.values()) > 0, "the kill was not noticed by any client"
    assert ledger.served_by[replicas[1].url] > served_before, "the restarted replica idled"
    assert set(ledger.statuses) <= {200, 503}, ledger.statuses
    assert ledger.retry_after_missing == 0
    assert_exact(f"{replicas[0].url}/v1/runs/{run['id']}", batches, ledger)
    assert_exact(f"{replicas[1].url}/v1/runs/{run['id']}", batches, ledger)


# ----------------------------------------------------------------------- PostgreSQL restart


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restart_mid_run_gives_503_then_recovers_without_a_service_restart(
    serve: Callable[..., ServerProcess], own_postgres_cluster: PostgresCluster
) -> None:
    cluster = own_postgres_cluster
    server = serve(cluster.create_database(), CE_EVAL_DATABASE_CONNECT_TIMEOUT_S="2").start()
    pid = server.process.pid if server.process else None
    run = httpx.post(
        f"{server.url}/v1/runs",
        json={"name": "pg-restart", "loss": "cross_entropy", "metrics": METRICS},
    ).json()
    run_url = f"{server.url}/v1/runs/{run['id']}"
    clients, per_client = 3, 40
    batches = make_batches(12, clients * per_client)
    ids = sorted(batches)
    ledger = Ledger()
    deadline = time.monotonic() + DEADLINE_S

    def client(index: int) -> None:
        with httpx.Client(timeout=30) as http:
            for batch_id in ids[index::clients]:
                payload = body(batch_id, batches[batch_id])
                push_until_answered(
                    http, lambda: [server.url], run["id"], batch_id, payload, ledger, deadline
                )

    outage: list[httpx.Response] = []
    with ThreadPoolExecutor(clients) as pool, httpx.Client(timeout=30) as probe:
        futures = [pool.submit(client, i) for i in range(clients)]
        wait_for(lambda: len(ledger.answered) >= 15, 60, "15 answered batches")
        cluster.stop("fast")  # clients are mid-run: their connections are cut
        assert len(ledger.answered) < len(batches)
        for _ in range(3):  # every kind of request, each answered (a hang is a ReadTimeout)
            outage += [
                probe.get(f"{server.url}/readyz"),
                probe.get(run_url),
                probe.get(f"{server.url}/v1/runs"),
                probe.get(f"{run_url}/batches"),
                probe.post(f"{run_url}/batches", json=body("probe", batches[ids[0]])),
                probe.post(f"{server.url}/v1/runs", json={"name": "x", "loss": "cross_entropy"}),
            ]
        assert probe.get(f"{server.url}/healthz").status_code == 200  # alive, just not ready
        cluster.start()
        wait_for(lambda: probe.get(f"{server.url}/readyz").status_code == 200, 30, "ready")
        for future in futures:
            future.result(timeout=DEADLINE_S)

    print(f"postgres restart: {len(batches)} batches, client statuses {dict(ledger.statuses)}, "
          f"transport errors {dict(ledger.transport_errors)}")  # fmt: skip
    assert [r.status_code for r in outage] == [503] * len(outage), [r.text for r in outage]
    for response in outage:
        assert response.headers["content-type"] in ("application/problem+json", "application/json")
        assert response.headers.get("retry-after") or response.url.path == "/readyz"
    assert outage[0].json()["checks"]["store"].startswith("unreachable")
    assert ledger.statuses[503] > 0, "no client request met the outage"
    assert set(ledger.statuses) <= {200, 503}, ledger.statuses
    assert ledger.retry_after_missing == 0
    assert server.process is not None and server.process.pid == pid  # never restarted
    assert server.process.poll() is None
    assert_exact(run_url, batches, ledger)
    assert "probe" not in {b["batch_id"] for b in httpx.get(f"{run_url}/batches").json()["batches"]}


# ------------------------------------------------------------------ unresponsive database


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener completes TCP handshakes (backlog) but never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def test_database_that_never_answers_gives_503_within_the_connect_timeout(
    silent_port: int,
) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{silent_port}/none"
    settings = Settings(database_url=url, database_connect_timeout_s=2)
    store = Store(url, connect_timeout=settings.database_connect_timeout_s)
    runs = RunsDataPlane(settings, store)
    outcome: list[BaseException] = []

    def get() -> None:
        try:
            runs.get_run("run_x")
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=get, daemon=True)
    worker.start()
    worker.join(timeout=30)  # without a connect timeout this waits for ever
    assert not worker.is_alive(), "the request hung on an unresponsive database"
    assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome
    assert outcome[0].headers["Retry-After"] == "1"
    store.dispose()


class _Stop(Exception):
    pass


def test_connect_timeout_in_the_url_wins() -> None:
    from sqlalchemy import event

    from service.store import make_engine

    def connect_params(url: str) -> dict[str, Any]:
        engine = make_engine(url, connect_timeout=7.5)
        seen: dict[str, Any] = {}

        @event.listens_for(engine, "do_connect")
        def grab(_dialect: Any, _record: Any, _args: Any, params: dict[str, Any]) -> None:
            seen.update(params)
            raise _Stop  # no connection needed

        with pytest.raises(_Stop):
            engine.connect()
        assert engine.pool.timeout() == 7.5  # type: ignore[attr-defined]
        engine.dispose()
        return seen

    assert connect_params("postgresql://u@127.0.0.1/db")["connect_timeout"] == 8
    assert (
        connect_params("postgresql://u@127.0.0.1/db?connect_timeout=30")["connect_timeout"] == "30"
    )


@pytest.mark.postgres
def test_exhausted_connection_pool_gives_503(postgres_cluster: PostgresCluster) -> None:
    """Every pooled connection busy past the wait: 503 + Retry-After (sqlalchemy's pool
    TimeoutError is no OperationalError)."""
    url = postgres_cluster.create_database()
    store = Store(url, connect_timeout=1)
    store.upgrade()
    runs = RunsDataPlane(Settings(database_url=url), store)
    run = runs.create_run({"name": "busy", "loss": "cross_entropy"})
    held = [store.engine.connect() for _ in range(30)]  # pool_size + max_overflow
    try:
        with pytest.raises(Unavailable) as caught:
            runs.get_run(run["id"])
        assert caught.value.headers["Retry-After"] == "1"
        assert "TimeoutError" in caught.value.detail
    finally:
        for connection in held:
            connection.close()
    assert runs.get_run(run["id"])["id"] == run["id"]  # and back once connections are free
    store.dispose()


@pytest.mark.postgres
def test_run_locked_by_a_frozen_writer_gives_503_not_a_hang(
    postgres_cluster: PostgresCluster,
) -> None:
    """Another process holds the run's row lock and never finishes (a replica stopped with
    SIGSTOP mid-transaction): writes give up after the lock timeout with 503."""
    import psycopg

    url = postgres_cluster.create_database()
    store = Store(url, connect_timeout=2, statement_timeout=1)
    store.upgrade()
    runs = RunsDataPlane(Settings(database_url=url), store)
    run = runs.create_run({"name": "locked", "loss": "cross_entropy"})
    outcome: list[BaseException] = []

    def close() -> None:
        try:
            runs.close_run(run["id"])
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    dsn = (
        f"host=127.0.0.1 port={postgres_cluster.port} user=postgres dbname={url.rsplit('/', 1)[1]}"
    )
    with psycopg.connect(dsn) as frozen:
        frozen.execute("SELECT pk FROM runs WHERE id = %s FOR UPDATE", (run["id"],))
        worker = threading.Thread(target=close, daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "the write waited for the lock without bound"
        assert runs.get_run(run["id"])["status"] == "open"  # readers are not blocked
        frozen.rollback()
    assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome
    assert runs.close_run(run["id"])["status"] == "closed"  # and fine once the lock is gone
    with store.engine.connect() as connection:
        settings = {
            name: connection.exec_driver_sql(f"SHOW {name}").scalar()
            for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
        }
    assert settings == dict.fromkeys(settings, "1s")
    store.dispose()
