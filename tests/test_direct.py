"""A session's statements on the driver's cursor (consoled/store/direct.py), on every backend.

They must answer what SQLAlchemy's execution answered: the row, the
generated key, the matched count; a driver error as SQLAlchemy's exception
without its parameters; a lost connection invalidated and said to be lost,
which is what the store's breaker counts as an outage.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from consoled.store.breaker import is_outage
from consoled.store.direct import Direct
from consoled.store.tables import serial_leases, sessions
from tests.databases import fresh_database, upgraded_engine

VALUES = {
    "instance_uuid": "9b2c4f0e-3d1a-4c5b-8e7f-0a1b2c3d4e5f",
    "console_type": "serial",
    "host": "compute-1",
    "port": 10000,
    "token_hash_prefix": "c1c6edbc",
    "door": "serial",
    "client_address": "192.0.2.1",
    "mode": "writer",
    "proxy": "a",
    "started_at": 1_700_000_000.25,
    "touched_at": 1_700_000_000.25,
}
INSERT = Direct(sessions.insert(), id_column=sessions.c.id)
SELECT = Direct(
    sa.select(sessions.c.id, sessions.c.host, sessions.c.started_at).where(
        sessions.c.id == sa.bindparam("session_id")
    )
)
END = Direct(
    sessions.update()
    .where(sessions.c.id == sa.bindparam("session_id"), sessions.c.ended_at.is_(None))
    .values(ended_at=sa.bindparam("now"), end_reason=sa.bindparam("reason"))
)
LEASE = Direct(serial_leases.insert())
SECRET = "c1c6edbcf7abfccc9a62affc73b1e3e3debf2270af1ac69246f42ca548b1caba"


class DirectTestsMixin:
    backend: str

    def setUp(self: Any) -> None:
        self.engine = upgraded_engine(self, fresh_database(self, self.backend))
        self.connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self.addCleanup(self.connection.close)

    def test_insert_select_end(self: Any) -> None:
        """The generated keys, the row and the matched counts SQLAlchemy reads too."""
        first = INSERT.insert_id(self.connection, VALUES)
        second = INSERT.insert_id(self.connection, {**VALUES, "host": "compute-2"})
        self.assertEqual(second, first + 1)
        self.assertEqual(
            SELECT.first(self.connection, {"session_id": second}),
            (second, "compute-2", 1_700_000_000.25),
        )
        self.assertIsNone(SELECT.first(self.connection, {"session_id": second + 1}))
        end = {"session_id": first, "now": 1_700_000_001.5, "reason": "client left"}
        self.assertEqual(END.rowcount(self.connection, end), 1)
        self.assertEqual(END.rowcount(self.connection, end), 0)  # ended already
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(sessions.c.id, sessions.c.ended_at, sessions.c.end_reason)
            ).all()
        self.assertEqual(
            sorted(rows), [(first, 1_700_000_001.5, "client left"), (second, None, None)]
        )

    def test_insert_of_other_columns_is_refused(self: Any) -> None:
        """An INSERT without values inserts its first call's columns; a call
        naming others is refused, not run with the wrong SQL."""
        INSERT.insert_id(self.connection, VALUES)
        fewer = {k: v for k, v in VALUES.items() if k != "mode"}
        self.assertRaises(ValueError, INSERT.insert_id, self.connection, fewer)

    def test_inside_a_transaction(self: Any) -> None:
        """On a connection in a transaction the statement is part of it: rolled back with it."""
        with self.engine.connect() as connection:
            transaction = connection.begin()
            INSERT.insert_id(connection, VALUES)
            transaction.rollback()
        with self.engine.connect() as connection:
            count = connection.execute(sa.select(sa.func.count()).select_from(sessions)).scalar()
        self.assertEqual(count, 0)

    def test_driver_error_is_sqlalchemys(self: Any) -> None:
        """A driver's error comes out as SQLAlchemy's, its parameters not shown."""
        lease = {
            "host": "compute-1",
            "port": 10000,
            "session_id": 1,
            "proxy": SECRET,
            "acquired_at": 1.0,
            "expires_at": 31.0,
        }
        LEASE.rowcount(self.connection, lease)
        with self.assertRaises(sa.exc.IntegrityError) as raised:
            LEASE.rowcount(self.connection, lease)
        self.assertNotIn(SECRET, str(raised.exception))
        self.assertFalse(raised.exception.connection_invalidated)
        self.assertFalse(self.connection.invalidated)
        self.assertFalse(is_outage(Failure(raised.exception)))
        # The connection goes on serving.
        self.assertIsNone(SELECT.first(self.connection, {"session_id": 1}))

    def test_rows_that_need_processing_are_refused(self: Any) -> None:
        """A result column whose type SQLAlchemy may convert (a Boolean: an
        integer on SQLite and MariaDB) is not read raw, on any dialect."""
        kicked = Direct(sa.select(sessions.c.kick_requested))
        self.assertRaises(TypeError, kicked.first, self.connection, {})


#: how a test asks each server to drop a connection: its id, then the kill
KILLS = {
    "postgresql": ("SELECT pg_backend_pid()", "SELECT pg_terminate_backend({})"),
    "mariadb": ("SELECT CONNECTION_ID()", "KILL CONNECTION {}"),
}


class LostConnectionMixin:
    """A server that drops the connection: the error says so and the connection is invalidated."""

    def test_lost_connection_is_an_outage(self: Any) -> None:
        which, kill = KILLS[self.backend]
        pid = int(self.connection.exec_driver_sql(which).scalar())
        with self.engine.connect() as other:
            other.exec_driver_sql(kill.format(pid))
        with self.assertRaises(sa.exc.DBAPIError) as raised:
            SELECT.first(self.connection, {"session_id": 1})
        self.assertTrue(raised.exception.connection_invalidated)
        self.assertTrue(self.connection.invalidated)
        self.assertTrue(is_outage(Failure(raised.exception)))


class SQLiteDirectTests(DirectTestsMixin, SynchronousTestCase):
    backend = "sqlite"


class PostgreSQLDirectTests(LostConnectionMixin, DirectTestsMixin, SynchronousTestCase):
    backend = "postgresql"


class MariaDBDirectTests(LostConnectionMixin, DirectTestsMixin, SynchronousTestCase):
    backend = "mariadb"
