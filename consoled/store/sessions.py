"""Session rows, serial port leases and kicks: the part of the Store proxies share.

Mixed into :class:`consoled.store.Store`; every method returns a Deferred and
does one unit of work on the store's runner, in one transaction (``open_writer``:
two, back to back, in one trip).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer

from consoled.store.direct import Direct
from consoled.store.runner import StorePart
from consoled.store.tables import serial_leases as leases_table
from consoled.store.tables import sessions as sessions_table
from consoled.tokens import ConnectInfo

# The statements of every session's start and end, built once: building
# Core statements per call cost about three times executing them.  They run
# on the driver's cursor (consoled/store/direct.py).
_INSERT_SESSION = Direct(sessions_table.insert(), id_column=sessions_table.c.id)
_END_SESSION = (
    sessions_table.update()
    .where(sessions_table.c.id == sa.bindparam("session_id"), sessions_table.c.ended_at.is_(None))
    .values(
        ended_at=sa.bindparam("now"),
        touched_at=sa.bindparam("now"),
        end_reason=sa.bindparam("reason"),
        bytes_to_client=sa.bindparam("to_client"),
        bytes_to_server=sa.bindparam("to_server"),
    )
)
_END_SESSION_DIRECT = Direct(_END_SESSION)
_RELEASE_LEASE = leases_table.delete().where(
    leases_table.c.session_id == sa.bindparam("session_id")
)


_HELD_PORT = (leases_table.c.host == sa.bindparam("host")) & (
    leases_table.c.port == sa.bindparam("port")
)
_DROP_LAPSED_LEASE = leases_table.delete().where(
    _HELD_PORT, leases_table.c.expires_at < sa.bindparam("acquired_at")
)
_TAKE_LEASE = leases_table.insert()
_LEASE_HOLDER = sa.select(leases_table).where(_HELD_PORT)


def _session_values(
    info: ConnectInfo, door: str, client_address: str, proxy: str, mode: str, now: float
) -> dict[str, Any]:
    return {
        "instance_uuid": info.instance_uuid,
        "console_type": info.console_type,
        "host": info.host,
        "port": info.port,
        "token_hash_prefix": info.hash_prefix,
        "door": door,
        "client_address": client_address[:255],
        "mode": mode,
        "proxy": proxy,
        "started_at": now,
        "touched_at": now,
    }


def _insert_session(connection: sa.Connection, values: dict[str, Any]) -> int:
    return _INSERT_SESSION.insert_id(connection, values)


@dataclass(slots=True)
class Opening:
    """A session's row for a token's look-up to write in the same trip to the database.

    The gate asks for it (:meth:`consoled.store.tokens.TokenRows.find_token`):
    once the token's row is found, ``wanted(info)`` runs on the database
    thread and says whether the session gets its row now; its id is in
    ``session_id`` when the look-up's Deferred fires.
    """

    door: str
    client_address: str
    proxy: str
    #: run on the database thread, with the token's row: whether to write the session's row
    wanted: Callable[[ConnectInfo], bool]
    #: the written row's id (None: none was written)
    session_id: int | None = None

    def open(self, connection: sa.Connection, info: ConnectInfo, now: float) -> None:
        """Write the row when it is wanted (on the database thread)."""
        if self.wanted(info):
            values = _session_values(
                info, self.door, self.client_address, self.proxy, "writer", now
            )
            self.session_id = _insert_session(connection, values)


def _lease_values(
    host: str, port: int, session_id: int, proxy: str, now: float, lease_seconds: float
) -> dict[str, Any]:
    return {
        "host": host,
        "port": port,
        "session_id": session_id,
        "proxy": proxy,
        "acquired_at": now,
        "expires_at": now + lease_seconds,
    }


#: How many times a taker tries a port whose holder is gone before it could be named.
_TAKE_ATTEMPTS = 3


def _take_lease(engine: sa.Engine, lease: dict[str, Any]) -> dict[str, Any] | None:
    """Take a serial port's lease (on a database thread); None, or the holder's row.

    Atomic on every backend without check-then-insert: a lapsed lease is
    deleted and the new one inserted in one transaction, and the primary key
    on (host, port) lets exactly one concurrent insert win.
    """
    for _ in range(_TAKE_ATTEMPTS):
        try:
            with engine.begin() as connection:
                connection.execute(_DROP_LAPSED_LEASE, lease)
                connection.execute(_TAKE_LEASE, lease)
            return None
        except (sa.exc.IntegrityError, sa.exc.OperationalError) as error:
            # IntegrityError: held.  OperationalError: a deadlock or lock
            # timeout between two takers (MariaDB), which also means held.
            with engine.connect() as connection:
                row = connection.execute(_LEASE_HOLDER, lease).first()
            if row is not None:
                return dict(row._mapping)
            if isinstance(error, sa.exc.OperationalError):
                raise
            # Held when the insert ran, released before the holder could be
            # read (its session ended on another thread or proxy): the port
            # is free now.  A user who reconnects right after a reset meets
            # this when their earlier session's release lands in between;
            # answering "held" by nobody refused them (test_churn, issue 16).
    return {"acquired_at": lease["acquired_at"]}


def _upkeep(rows: list[dict[str, Any]], proxy: str, now: float, expires_at: float) -> Any:
    """A touch's unit of work, built at ``now``: when it runs, not when it was asked for."""
    # Never an ended row: its end wrote the final counters, and a touch that
    # was under way when the database went away may land after the end's
    # kept write does (test_outage's blackhole saw it with 7 bytes for 1,007).
    renew_rows = (
        sessions_table.update()
        .where(
            sessions_table.c.id == sa.bindparam("session_id"),
            sessions_table.c.ended_at.is_(None),
        )
        .values(
            touched_at=now,
            bytes_to_client=sa.bindparam("to_client"),
            bytes_to_server=sa.bindparam("to_server"),
        )
    )
    # Only the leases of sessions live here now: a proxy restarted under
    # the same name must not keep a dead session's port.
    renew_leases = (
        leases_table.update()
        .where(
            leases_table.c.proxy == proxy,
            leases_table.c.session_id.in_([row["session_id"] for row in rows]),
        )
        .values(expires_at=expires_at)
    )
    kicks = sa.select(
        sessions_table.c.id, sessions_table.c.kick_reason, sessions_table.c.kick_takeover
    ).where(
        sessions_table.c.proxy == proxy,
        sessions_table.c.ended_at.is_(None),
        sessions_table.c.kick_requested.is_(True),
    )

    def upkeep(connection: sa.Connection) -> list[dict[str, Any]]:
        if rows:
            connection.execute(renew_rows, rows)
            connection.execute(renew_leases)
        return [dict(row._mapping) for row in connection.execute(kicks)]

    return upkeep


class SessionRows(StorePart):
    """Methods over ``consoled_sessions`` and ``consoled_serial_leases``."""

    # -- sessions -----------------------------------------------------------

    def open_session(
        self,
        *,
        info: ConnectInfo,
        door: str,
        client_address: str,
        proxy: str,
        mode: str = "writer",
    ) -> defer.Deferred[int]:
        """Record a session that is starting; its row id names it from then on."""
        values = _session_values(info, door, client_address, proxy, mode, self._now())

        def insert(connection: sa.Connection) -> int:
            return _insert_session(connection, values)

        return self._run(insert, single=True)

    def open_writer(
        self,
        *,
        info: ConnectInfo,
        door: str,
        client_address: str,
        proxy: str,
        lease_seconds: float,
    ) -> defer.Deferred[tuple[int, dict[str, Any] | None]]:
        """Record a serial writer's session and take its port's lease, in one trip.

        The row and the lease are two transactions (the row, as
        :meth:`open_session` makes it, then the lease), run back to back on one
        database thread: a writer's set-up waits for the database once, not
        twice.  Gives the row id and the lease holder's row (None: taken).
        """
        now = self._now()
        values = _session_values(info, door, client_address, proxy, "writer", now)

        def open_and_lease() -> tuple[int, dict[str, Any] | None]:
            with self.engine.begin() as connection:
                session_id = _insert_session(connection, values)
            lease = _lease_values(info.host, info.port, session_id, proxy, now, lease_seconds)
            return session_id, _take_lease(self.engine, lease)

        return self._runner.run(open_and_lease)

    def take_lease(
        self, *, session_id: int, info: ConnectInfo, proxy: str, lease_seconds: float
    ) -> defer.Deferred[dict[str, Any] | None]:
        """Try a written writer's lease again: None (taken), or the holder's row."""
        lease = _lease_values(info.host, info.port, session_id, proxy, self._now(), lease_seconds)
        return self._runner.run(_take_lease, self.engine, lease)

    # -- serial port leases, kicks -------------------------------------------

    def end_session(
        self,
        session_id: int,
        *,
        reason: str,
        bytes_to_client: int,
        bytes_to_server: int,
        release_lease: bool = True,
    ) -> defer.Deferred[None]:
        """End a session's row (when, why, bytes each way) and drop the lease it holds."""
        values = self.ending(
            session_id,
            reason=reason,
            bytes_to_client=bytes_to_client,
            bytes_to_server=bytes_to_server,
        )

        def end(connection: sa.Connection) -> None:
            _END_SESSION_DIRECT.rowcount(connection, values)
            if release_lease:
                connection.execute(_RELEASE_LEASE, values)

        # Kept while the database is down: the end keeps its own time and bytes.
        return self._keep(("end", session_id), lambda: end, single=not release_lease)

    def ending(
        self, session_id: int, *, reason: str, bytes_to_client: int, bytes_to_server: int
    ) -> dict[str, Any]:
        """A session's end as :meth:`end_sessions` writes it, stamped now."""
        return {
            "session_id": session_id,
            "now": self._now(),
            "reason": reason[:255],
            "to_client": bytes_to_client,
            "to_server": bytes_to_server,
        }

    def end_sessions(self, endings: list[dict[str, Any]]) -> defer.Deferred[None]:
        """End the rows of sessions that hold no lease (each :meth:`ending`), in
        one unit of work: one transaction for several, kept as one while the
        database is down."""

        def end_all(connection: sa.Connection) -> None:
            for values in endings:
                _END_SESSION_DIRECT.rowcount(connection, values)

        key = ("ends", endings[0]["session_id"])
        return self._keep(key, lambda: end_all, single=len(endings) == 1)

    def touch(
        self, counters: list[tuple[int, int, int]], *, proxy: str, lease_seconds: float
    ) -> defer.Deferred[list[dict[str, Any]]]:
        """One period's upkeep for a proxy, in one transaction.

        Renews its live session rows (one batched statement) and its leases
        (one statement), and returns the kicks asked for its sessions.  While
        the database is down the last touch is kept (it names every live
        session; an ended one has its end kept) and written when it is back,
        renewing from then; the kicks wait for the next period.
        """
        rows = [
            {"session_id": i, "to_client": to_client, "to_server": to_server}
            for i, to_client, to_server in counters
        ]

        def make() -> Any:
            now = self._now()
            return _upkeep(rows, proxy, now, now + lease_seconds)

        kept = self._keep(("touch", proxy), make)
        return kept.addCallback(lambda kicks: kicks or [])

    def request_kick(
        self,
        *,
        session_id: int | None = None,
        instance_uuid: str | None = None,
        reason: str = "",
        takeover: bool = False,
    ) -> defer.Deferred[int]:
        """Mark live sessions to be closed by whichever proxy holds them."""
        statement = (
            sessions_table.update()
            .where(sessions_table.c.ended_at.is_(None))
            .values(kick_requested=True, kick_reason=reason[:255] or None, kick_takeover=takeover)
        )
        if session_id is not None:
            statement = statement.where(sessions_table.c.id == session_id)
        if instance_uuid is not None:
            statement = statement.where(sessions_table.c.instance_uuid == instance_uuid)
        return self._run(lambda connection: connection.execute(statement).rowcount)

    def reassign_session(
        self, session_id: int, *, client_address: str, door: str
    ) -> defer.Deferred[None]:
        """A takeover: the writer's row now names its new user; the kick is done."""
        statement = (
            sessions_table.update()
            .where(sessions_table.c.id == session_id)
            .values(
                client_address=client_address[:255],
                door=door,
                kick_requested=False,
                kick_takeover=False,
                kick_reason=None,
            )
        )
        return self._run(lambda connection: connection.execute(statement) and None)

    def list_sessions(
        self,
        *,
        live: bool = True,
        instance_uuid: str | None = None,
        host: str | None = None,
        console_type: str | None = None,
        session_id: int | None = None,
    ) -> defer.Deferred[list[dict[str, Any]]]:
        query = sa.select(sessions_table).order_by(sessions_table.c.id)
        if live:
            query = query.where(sessions_table.c.ended_at.is_(None))
        for column, value in (
            (sessions_table.c.instance_uuid, instance_uuid),
            (sessions_table.c.host, host),
            (sessions_table.c.console_type, console_type),
            (sessions_table.c.id, session_id),
        ):
            if value is not None:
                query = query.where(column == value)
        return self._run(lambda connection: [dict(r._mapping) for r in connection.execute(query)])

    def reclaim(self, proxy: str) -> defer.Deferred[tuple[int, int]]:
        """A proxy starting under ``proxy``'s name holds no session yet: end the
        rows and drop the leases its previous life left (killed, not stopped).

        Returns (rows ended, leases dropped).
        """
        now = self._now()

        def reclaim(connection: sa.Connection) -> tuple[int, int]:
            dropped = connection.execute(
                leases_table.delete().where(leases_table.c.proxy == proxy)
            ).rowcount
            ended = connection.execute(
                sessions_table.update()
                .where(sessions_table.c.proxy == proxy, sessions_table.c.ended_at.is_(None))
                .values(ended_at=now, end_reason="proxy restarted: session lost")
            ).rowcount
            return ended, dropped

        return self._run(reclaim)

    def end_lost_sessions(self, silent_for: float) -> defer.Deferred[int]:
        """End rows no proxy has touched for ``silent_for`` seconds (their proxy died),
        and drop lapsed leases (a lease outlives its row until it lapses)."""
        now = self._now()

        def janitor(connection: sa.Connection) -> int:
            ended = connection.execute(
                sessions_table.update()
                .where(
                    sessions_table.c.ended_at.is_(None),
                    sessions_table.c.touched_at < now - silent_for,
                )
                .values(ended_at=now, end_reason="proxy lost: no touch")
            ).rowcount
            # Only lapsed leases: a row may be silent because its proxy's touch
            # is late, not because it died; its lease, renewed on its own,
            # keeps the port's one writer until it lapses.
            connection.execute(leases_table.delete().where(leases_table.c.expires_at < now))
            return ended

        return self._run(janitor)
