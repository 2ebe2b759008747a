"""The run store: SQLAlchemy 2 engine set-up and Alembic migrations.

SQLite (the default, one file in WAL mode) serves one process; PostgreSQL
(``postgresql+psycopg://…``) serves several replicas. Writers serialise per run: a row lock
(``SELECT … FOR UPDATE``) on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from service.store.models import Base, Batch, ConfusionBlock, Run, RunSlice, RunTag

__all__ = ["Base", "Batch", "ConfusionBlock", "Run", "RunSlice", "RunTag", "Store", "normalize_url"]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: Key of the PostgreSQL advisory lock held while migrating (replicas start at once).
MIGRATION_LOCK_KEY = 0x63E_E7A1


def normalize_url(url: str | URL) -> URL:
    """``postgres://`` / ``postgresql://`` → the psycopg 3 driver; anything else unchanged."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _json_dumps(value: Any) -> str:
    """JSON columns (run states of thousands of numbers) through orjson: several times faster
    than the standard library, same text for the finite numbers and strings stored."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(
    url: str | URL, connect_timeout: float = 5.0, statement_timeout: float = 30.0
) -> Engine:
    """An engine for ``url``; creates the parent directory of a SQLite file, enables WAL.

    Server databases never make a request hang: a new connection gives up after
    ``connect_timeout`` seconds (libpq counts whole seconds, at least 2; a ``connect_timeout`` in
    the URL's query wins), waiting for a pooled one likewise, and pooled connections are pinged
    before use, so after a database restart the dead ones are replaced instead of failing a
    request. On PostgreSQL each session also bounds statements, lock waits (a frozen replica
    holding a run's row lock) and idle transactions by ``statement_timeout`` seconds (0 = none).
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        connect_args: dict[str, Any] = {}
        postgres = parsed.get_backend_name() == "postgresql"
        if postgres and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = max(2, math.ceil(connect_timeout))
        engine = create_engine(
            parsed,
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=20,
            pool_timeout=connect_timeout,
            connect_args=connect_args,
        )
        if postgres and statement_timeout > 0:
            milliseconds = max(1, round(statement_timeout * 1000))

            @event.listens_for(engine, "connect")
            def _session_timeouts(dbapi_connection: Any, _record: Any) -> None:
                # Session settings (not startup options, which poolers such as PgBouncer
                # refuse), committed at once so the pool's reset-on-return keeps them.
                autocommit = dbapi_connection.autocommit
                dbapi_connection.autocommit = True
                with dbapi_connection.cursor() as cursor:
                    for name in (
                        "statement_timeout",
                        "lock_timeout",
                        "idle_in_transaction_session_timeout",
                    ):
                        cursor.execute(f"SET {name} = {milliseconds}")
                dbapi_connection.autocommit = autocommit

        return engine
    path = _sqlite_file(parsed)
    engine = create_engine(
        parsed,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
        connect_args={"check_same_thread": False, "timeout": 30.0},
    )

    @event.listens_for(engine, "do_connect")
    def _make_directory(*_args: Any) -> None:
        # On first use, not at construction: building an app has no side effects on disk.
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module, so BEGIN is ours (see below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if path is not None:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # Writers take the database write lock up front: a deferred transaction that reads and
        # then writes can fail with SQLITE_BUSY instead of waiting for the other writer.
        immediate = connection.get_execution_options().get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


class Store:
    """Engine + sessions. ``read()`` for queries, ``write()`` for one serialised transaction."""

    def __init__(
        self, url: str | URL, *, connect_timeout: float = 5.0, statement_timeout: float = 30.0
    ) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, connect_timeout, statement_timeout)
        self.dialect = self.engine.dialect.name
        #: whether another process opening ``url`` sees the same database (not so for SQLite
        #: in memory)
        self.shared = self.dialect != "sqlite" or _sqlite_file(self.url) is not None
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._writes = self.engine.execution_options(sqlite_immediate=True)
        self._write = sessionmaker(self._writes, expire_on_commit=False)
        # SQLite has one writer at a time: this process's writers queue here, woken as soon as
        # the last commits, instead of polling the file lock (``busy_timeout`` sleeps).
        self._writer: AbstractContextManager[Any] = (
            threading.Lock() if self.dialect == "sqlite" else nullcontext()
        )

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction; committed on success, rolled back on any exception."""
        with self._writer, self._write() as session, session.begin():
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction on a Core connection, no ``Session`` (the push hot path: half
        the cost of :meth:`write`'s); committed on success, rolled back on any exception."""
        with self._writer, self._writes.begin() as connection:
            yield connection

    def upgrade(self, revision: str = "head") -> None:
        """Apply migrations up to ``revision``; safe when several replicas start at once."""
        from alembic import command

        with self.engine.execution_options(sqlite_immediate=True).begin() as connection:
            if self.dialect == "postgresql":
                # Migrations may take long, and replicas wait here for the first one's.
                connection.execute(text("SET LOCAL statement_timeout = 0"))
                connection.execute(text("SET LOCAL lock_timeout = 0"))
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            command.upgrade(alembic_config(connection), revision)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            revision: str | None = MigrationContext.configure(connection).get_current_revision()
            return revision

    def ping(self) -> None:
        """Raises when the database cannot be reached."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
