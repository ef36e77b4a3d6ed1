"""Session rows, serial port leases and kicks: the part of the Store proxies share.

Mixed into :class:`consoled.store.Store`; every method returns a Deferred and
does one unit of work in one transaction on the store's runner.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from twisted.internet import defer

from consoled.store.tables import serial_leases as leases_table
from consoled.store.tables import sessions as sessions_table
from consoled.tokens import ConnectInfo

# The statements of every session's start and end, built once: building
# Core statements per call cost about three times executing them.
_INSERT_SESSION = sessions_table.insert()
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
_RELEASE_LEASE = leases_table.delete().where(
    leases_table.c.session_id == sa.bindparam("session_id")
)


class SessionRows:
    """Methods over ``consoled_sessions`` and ``consoled_serial_leases``."""

    engine: sa.Engine
    _runner: Any

    def _run(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError

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
        now = self._now()
        values = {
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

        def insert(connection: sa.Connection) -> int:
            result = connection.execute(_INSERT_SESSION, values)
            return int(result.inserted_primary_key[0])

        return self._run(insert)

    # -- serial port leases, kicks -------------------------------------------

    def acquire_lease(
        self, *, host: str, port: int, session_id: int, proxy: str, lease_seconds: float
    ) -> defer.Deferred[dict[str, Any] | None]:
        """Take the one-writer lease of a serial port; None, or the holder's row if held.

        Atomic on every backend without check-then-insert: a lapsed lease is
        deleted and the new one inserted in one transaction, and the primary
        key on (host, port) lets exactly one concurrent insert win.
        """
        now = self._now()
        key = (leases_table.c.host == host) & (leases_table.c.port == port)

        def acquire() -> dict[str, Any] | None:
            try:
                with self.engine.begin() as connection:
                    connection.execute(
                        leases_table.delete().where(key, leases_table.c.expires_at < now)
                    )
                    connection.execute(
                        leases_table.insert().values(
                            host=host,
                            port=port,
                            session_id=session_id,
                            proxy=proxy,
                            acquired_at=now,
                            expires_at=now + lease_seconds,
                        )
                    )
                return None
            except (sa.exc.IntegrityError, sa.exc.OperationalError) as error:
                # IntegrityError: held.  OperationalError: a deadlock or lock
                # timeout between two takers (MariaDB), which also means held.
                with self.engine.connect() as connection:
                    row = connection.execute(sa.select(leases_table).where(key)).first()
                if row is None and isinstance(error, sa.exc.OperationalError):
                    raise
                return dict(row._mapping) if row is not None else {"acquired_at": now}

        return self._runner.run(acquire)

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
        now = self._now()
        values = {
            "session_id": session_id,
            "now": now,
            "reason": reason[:255],
            "to_client": bytes_to_client,
            "to_server": bytes_to_server,
        }

        def end(connection: sa.Connection) -> None:
            connection.execute(_END_SESSION, values)
            if release_lease:
                connection.execute(_RELEASE_LEASE, values)

        return self._run(end)

    def touch(
        self, counters: list[tuple[int, int, int]], *, proxy: str, lease_seconds: float
    ) -> defer.Deferred[list[dict[str, Any]]]:
        """One period's upkeep for a proxy, in one transaction.

        Renews its live session rows (one batched statement) and its leases
        (one statement), and returns the kicks asked for its sessions.
        """
        now = self._now()
        rows = [
            {"session_id": i, "to_client": to_client, "to_server": to_server}
            for i, to_client, to_server in counters
        ]
        renew_rows = (
            sessions_table.update()
            .where(sessions_table.c.id == sa.bindparam("session_id"))
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
                leases_table.c.session_id.in_([session_id for session_id, _, _ in counters]),
            )
            .values(expires_at=now + lease_seconds)
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
            if rows:
                connection.execute(renew_leases)
            return [dict(row._mapping) for row in connection.execute(kicks)]

        return self._run(upkeep)

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

    def list_sessions(self, *, live: bool = True) -> defer.Deferred[list[dict[str, Any]]]:
        query = sa.select(sessions_table).order_by(sessions_table.c.id)
        if live:
            query = query.where(sessions_table.c.ended_at.is_(None))
        return self._run(lambda connection: [dict(r._mapping) for r in connection.execute(query)])

    def end_lost_sessions(self, silent_for: float) -> defer.Deferred[int]:
        """End rows no proxy has touched for ``silent_for`` seconds (their proxy died),
        and drop lapsed leases."""
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
            ended_sessions = sa.select(sessions_table.c.id).where(
                sessions_table.c.ended_at.is_not(None)
            )
            connection.execute(
                leases_table.delete().where(
                    (leases_table.c.expires_at < now)
                    | leases_table.c.session_id.in_(ended_sessions)
                )
            )
            return ended

        return self._run(janitor)

    def get_session(self, session_id: int) -> defer.Deferred[dict[str, Any] | None]:
        query = sa.select(sessions_table).where(sessions_table.c.id == session_id)

        def select(connection: sa.Connection) -> dict[str, Any] | None:
            row = connection.execute(query).first()
            return None if row is None else dict(row._mapping)

        return self._run(select)
