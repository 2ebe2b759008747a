"""Core statements of the push hot path, compiled once per dialect and run on the DBAPI cursor.

``Connection.execute`` of a cached Core statement still costs about 0.1 ms of Python per call
(an execution context, events, a result object); a push runs four or five of them. A
:class:`Prepared` statement holds what that call would compute the same way every time: the
SQL string the dialect compiles, the parameter order, each parameter's bind processor and each
selected column's result processor (the column types' own, so JSON goes through the engine's
serializer and timestamps through ``UTCDateTime``). :meth:`Prepared.execute` is then the DBAPI
call plus those processors. Errors are raised as ``Connection.execute`` raises them
(``sqlalchemy.exc.DBAPIError.instance``: ``IntegrityError``, ``OperationalError``…), and a
disconnect invalidates the connection, as SQLAlchemy does; the pool's other connections are
not invalidated with it (the engines ping them before use: ``pool_pre_ping``). These
statements run no SQLAlchemy cursor events (``before_cursor_execute``…).

``tests/test_store_prepared.py`` checks that each statement writes and reads what its Core
form does, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Column, Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

#: The key of a connection's compiled statements in its ``Connection.info`` (kept with the
#: pooled DBAPI connection, closed with it: a disposed engine's go with its connections).
INFO_KEY = "ce_eval.prepared"


class Prepared:
    """``statement`` compiled for ``dialect``; ``columns``: the columns a SELECT returns, in
    order (their result processors are applied to each row)."""

    def __init__(
        self, statement: ClauseElement, dialect: Dialect, columns: Sequence[Column[Any]] = ()
    ) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        if compiled.escaped_bind_names:  # names the DBAPI would not see as given
            raise ValueError(f"bind names need escaping: {compiled.escaped_bind_names}")
        self.statement = statement  # alive while cached under its id
        self.sql = compiled.string
        self.positional = compiled.positional
        #: parameter names in the order of the SQL's placeholders (positional paramstyles)
        self.order = list(compiled.positiontup or ())
        self.binds = {
            name: bind.type.dialect_impl(dialect).bind_processor(dialect)
            for name, bind in compiled.binds.items()
        }
        self.columns = list(columns)
        #: each column's result processor, made on the first fetch (some need the DBAPI's type
        #: code, from the cursor's description)
        self.results: list[tuple[str, Any]] | None = None

    @classmethod
    def of(
        cls, statement: ClauseElement, connection: Connection, columns: Sequence[Column[Any]] = ()
    ) -> Prepared:
        """The compiled form of ``statement`` for ``connection``'s dialect, compiled on its
        first use on that pooled connection (keyed by the statement's identity: for statements
        built once, such as module constants)."""
        cache: dict[int, Prepared] = connection.info.setdefault(INFO_KEY, {})
        prepared = cache.get(id(statement))
        if prepared is None:
            prepared = cache[id(statement)] = cls(statement, connection.dialect, columns)
        return prepared

    def parameters(self, values: Mapping[str, Any]) -> dict[str, Any] | list[Any]:
        """``values`` through their bind processors, in the DBAPI's paramstyle."""
        bound = {
            name: value if (process := self.binds[name]) is None else process(value)
            for name, value in ((name, values[name]) for name in self.binds)
        }
        return [bound[name] for name in self.order] if self.positional else bound

    def execute(self, connection: Connection, values: Mapping[str, Any]) -> None:
        """Run the statement with ``values`` (one per bind name)."""
        self._run(connection, values, fetch=False)

    def one_or_none(
        self, connection: Connection, values: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The first row, column name → value, or None when there is none."""
        row = self._run(connection, values, fetch=True)
        if row is None:
            return None
        assert self.results is not None
        return {
            name: value if process is None else process(value)
            for (name, process), value in zip(self.results, row, strict=True)
        }

    def scalars(self, connection: Connection, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The first row's values as the DBAPI gives them (a text statement's)."""
        row = self._run(connection, values, fetch=True)
        if row is None:
            raise ValueError("the statement returned no row")
        return tuple(row)

    def _result_processors(
        self, dialect: Dialect, description: Sequence[Any]
    ) -> list[tuple[str, Any]]:
        """(name, processor) of each selected column, given its DBAPI type code."""
        return [
            (column.name, column.type.dialect_impl(dialect).result_processor(dialect, d[1]))
            for column, d in zip(self.columns, description, strict=bool(self.columns))
        ]

    def _run(self, connection: Connection, values: Mapping[str, Any], *, fetch: bool) -> Any:
        dialect = connection.dialect
        error = dialect.loaded_dbapi.Error
        parameters = self.parameters(values)
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        cursor = None
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute(self.sql, parameters)
            if not fetch:
                return None
            if self.results is None:
                self.results = self._result_processors(dialect, cursor.description)
            return cursor.fetchone()
        except error as exc:
            disconnect = dialect.is_disconnect(exc, dbapi_connection, cursor)
            if disconnect:
                connection.invalidate(exc)
            raise DBAPIError.instance(
                self.sql, parameters, exc, error, connection_invalidated=disconnect, dialect=dialect
            ) from exc
        finally:
            if cursor is not None:
                with contextlib.suppress(error):  # an invalidated connection's
                    cursor.close()
