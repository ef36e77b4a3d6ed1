"""The statements of every session, run on the driver's cursor: compiled once per dialect.

A session's token look-up, its row's insert and its row's end run once per
connection, on a database thread whose Python work holds the GIL the
reactor needs.  Through SQLAlchemy's ``Connection.execute`` each costs an
execution context, a result object and its row processing around the
driver's call, even with the statement's compiled form cached: on SQLite a
look-up took 43 µs, and 8 µs on the driver's cursor; an insert 97 µs and
64 µs (this VM, 2026-12-03, ``timeit`` of 20,000).  callgrind counted
812,566 instructions a session on the database thread before
(``benchmarks/instructions.py --setups``).

What SQLAlchemy's execution gives that matters here is kept: the SQL is its
compilation for the connection's dialect (paramstyle, quoting, RETURNING),
the statement runs on the same driver connection (inside the unit's
transaction when there is one, in autocommit on a kept connection), and a
driver error comes out as SQLAlchemy's exception for it, with the
connection invalidated when the driver says it was lost, so the breaker
(`consoled.store.breaker.is_outage`) and the kept connection's replacement
see what they saw before.  Only statements whose columns need no type
processing on the way in or out are run this way (integers, floats and
strings; SQLite's float columns keep their bind processor): `Direct`
refuses a statement whose result columns need processing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa


@dataclass(frozen=True)
class _Compiled:
    """A statement compiled for one dialect."""

    text: str
    #: the parameters' names in the order the SQL takes them; None: by name
    order: tuple[str, ...] | None
    #: SQLAlchemy's conversions of parameters on the way in, by name
    processors: dict[str, Callable[[Any], Any]]
    #: whether the INSERT reads its generated key from RETURNING
    returning: bool
    #: an INSERT of the columns its parameters name: their names, in order
    columns: tuple[str, ...] | None


class Direct:
    """One Core statement, compiled once per dialect, executed on the driver's cursor."""

    def __init__(self, statement: sa.Executable, id_column: sa.Column[Any] | None = None) -> None:
        """``id_column``: for an INSERT, the generated key ``insert_id`` reads
        (RETURNING where the dialect has it, else the cursor's ``lastrowid``).
        An INSERT given no values inserts the columns its parameters name, as
        ``Connection.execute`` would: those of the first call, every call."""
        self._statement = statement
        self._id_column = id_column
        self._by_parameters = isinstance(statement, sa.Insert) and not statement._values
        #: by dialect name: what `_Compiled` says
        self._compiled: dict[str, _Compiled] = {}

    def _compile(self, dialect: sa.Dialect, params: Mapping[str, Any]) -> _Compiled:
        compiled = self._compiled.get(dialect.name)
        if compiled is not None:
            if compiled.columns is not None and tuple(params) != compiled.columns:
                raise ValueError(f"{self._statement}: compiled for {compiled.columns}")
            return compiled
        statement, returning = self._statement, False
        if self._id_column is not None and dialect.insert_returning:
            statement, returning = statement.returning(self._id_column), True  # type: ignore[attr-defined]
        columns = tuple(params) if self._by_parameters else None
        sql = statement.compile(dialect=dialect, column_keys=list(columns or ()) or None)
        if _result_processed(sql):
            raise TypeError(
                f"{self._statement}: its rows need processing; run it through SQLAlchemy"
            )
        order = tuple(sql.positiontup) if sql.positional and sql.positiontup else None
        processors = dict(sql._bind_processors)
        compiled = _Compiled(str(sql), order, processors, returning, columns)
        self._compiled[dialect.name] = compiled
        return compiled

    def execute(self, connection: sa.Connection, params: Mapping[str, Any]) -> Any:
        """Run the statement on ``connection``'s driver cursor; the cursor, to read from."""
        dialect = connection.dialect
        compiled = self._compile(dialect, params)
        text, order, processors = compiled.text, compiled.order, compiled.processors
        if processors:
            params = {
                name: processors[name](value) if name in processors else value
                for name, value in params.items()
            }
        args: Any = tuple(params[name] for name in order) if order is not None else params
        raw = connection.connection.driver_connection
        cursor = raw.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(text, args)
        except dialect.loaded_dbapi.Error as error:
            cursor.close()
            lost = dialect.is_disconnect(error, raw, cursor)  # type: ignore[arg-type]
            if lost:
                connection.invalidate(error)
            raise sa.exc.DBAPIError.instance(
                text,
                args,
                error,
                dialect.loaded_dbapi.Error,
                # a failed statement's parameters (token digests) are not shown
                hide_parameters=connection.engine.hide_parameters,
                connection_invalidated=lost,
                dialect=dialect,
            ) from error
        return cursor

    def first(self, connection: sa.Connection, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The first row a query gives, as a tuple; None when it gives none."""
        cursor = self.execute(connection, params)
        try:
            row = cursor.fetchone()
        finally:
            cursor.close()
        return None if row is None else tuple(row)

    def insert_id(self, connection: sa.Connection, params: Mapping[str, Any]) -> int:
        """Run an INSERT; the key it generated."""
        cursor = self.execute(connection, params)
        try:
            if self._compiled[connection.dialect.name].returning:
                return int(cursor.fetchone()[0])
            return int(cursor.lastrowid)
        finally:
            cursor.close()

    def rowcount(self, connection: sa.Connection, params: Mapping[str, Any]) -> int:
        """Run an UPDATE or DELETE; how many rows it matched."""
        cursor = self.execute(connection, params)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()


def _result_processed(compiled: Any) -> bool:
    """Whether a result column of ``compiled`` has a type SQLAlchemy may convert
    on some dialect: anything but integers, strings and floats."""
    return not all(
        isinstance(entry[3], (sa.Integer, sa.String))
        or (isinstance(entry[3], sa.Float) and not entry[3].asdecimal)
        for entry in compiled._result_columns
    )
