"""The token and session store: SQLAlchemy Core behind a Deferred API.

Every public method returns a Deferred and does its whole unit of work in
one transaction on the runner (the store's own thread pool in the daemon),
returning plain data.  Time comes from the injected clock, never from
``time.time()``.  Nothing here knows about protocols or doors.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from consoled.store import schema
from consoled.store.runner import Runner
from consoled.store.tables import console_auth_tokens as tokens_table
from consoled.store.tables import serial_leases as leases_table
from consoled.store.tables import sessions as sessions_table
from consoled.tokens import ConnectInfo, IssuedToken, hash_token, new_token

T = TypeVar("T")

_TOKEN_COLUMNS = (
    tokens_table.c.id,
    tokens_table.c.token_hash,
    tokens_table.c.console_type,
    tokens_table.c.host,
    tokens_table.c.port,
    tokens_table.c.tls_port,
    tokens_table.c.internal_access_path,
    tokens_table.c.instance_uuid,
    tokens_table.c.access_url_base,
    tokens_table.c.expires,
)


def _connect_info(row: sa.Row[Any]) -> ConnectInfo:
    return ConnectInfo(**row._asdict())


class Store:
    """consoled's database, spoken to through Deferreds."""

    def __init__(self, engine: sa.Engine, runner: Runner, clock: IReactorTime) -> None:
        self.engine = engine
        self._runner = runner
        self.clock = clock

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        self._runner.start()

    def stop(self) -> defer.Deferred[None]:
        """Wait for calls in flight, stop the pool, close pooled connections."""
        d = self._runner.stop()
        d.addCallback(lambda _: self.engine.dispose())
        return d

    def _run(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run ``f(connection, *args)`` in one transaction on the runner."""

        def unit() -> T:
            with self.engine.begin() as connection:
                return f(connection, *args)

        return self._runner.run(unit)

    def _execute(
        self, statement: Any, rows: list[dict[str, Any]] | None = None
    ) -> defer.Deferred[None]:
        """Run one statement (executemany when ``rows`` are given) in a transaction."""

        def execute(connection: sa.Connection) -> None:
            connection.execute(statement, rows) if rows else connection.execute(statement)

        return self._run(execute)

    def _now(self) -> float:
        return self.clock.seconds()

    # -- schema -------------------------------------------------------------

    def check_schema(self) -> defer.Deferred[None]:
        """Fail with :class:`schema.SchemaBehind` unless the database is at head."""
        return self._runner.run(schema.check, self.engine)

    def upgrade_schema(self) -> defer.Deferred[None]:
        return self._runner.run(schema.upgrade, self.engine)

    def schema_revision(self) -> defer.Deferred[str | None]:
        return self._runner.run(schema.current_revision, self.engine)

    # -- tokens -------------------------------------------------------------

    def authorize(
        self,
        *,
        console_type: str,
        host: str,
        port: int,
        instance_uuid: str,
        access_url_base: str | None,
        ttl: int,
        internal_access_path: str | None = None,
        tls_port: int | None = None,
    ) -> defer.Deferred[IssuedToken]:
        """Store a new token for a console and hand it back, once."""
        token = new_token()
        now = self._now()
        values = {
            "token_hash": hash_token(token),
            "console_type": console_type,
            "host": host,
            "port": port,
            "tls_port": tls_port,
            "internal_access_path": internal_access_path,
            "instance_uuid": instance_uuid,
            "access_url_base": access_url_base,
            "expires": int(now) + ttl,
            "created_at": _utc(now),
        }

        def insert(connection: sa.Connection) -> IssuedToken:
            result = connection.execute(tokens_table.insert().values(**values))
            (row_id,) = result.inserted_primary_key
            fields = {k: v for k, v in values.items() if k != "created_at"}
            return IssuedToken(token, ConnectInfo(id=row_id, **fields))

        return self._run(insert)

    def validate(self, token: str) -> defer.Deferred[ConnectInfo | None]:
        """Where ``token`` leads, or None: unknown and expired are one answer."""
        return self._run(_select_valid, hash_token(token), int(self._now()))

    def lookup(self, token: str) -> defer.Deferred[ConnectInfo | None]:
        """The token's row whether or not it has expired (``token show``)."""
        query = sa.select(*_TOKEN_COLUMNS).where(tokens_table.c.token_hash == hash_token(token))
        return self._run(_first_connect_info, query)

    def list_tokens(
        self, instance_uuid: str | None = None, host: str | None = None
    ) -> defer.Deferred[list[ConnectInfo]]:
        query = sa.select(*_TOKEN_COLUMNS).order_by(tokens_table.c.expires, tokens_table.c.id)
        if instance_uuid is not None:
            query = query.where(tokens_table.c.instance_uuid == instance_uuid)
        if host is not None:
            query = query.where(tokens_table.c.host == host)

        def select(connection: sa.Connection) -> list[ConnectInfo]:
            return [_connect_info(row) for row in connection.execute(query)]

        return self._run(select)

    def revoke_instance(self, instance_uuid: str) -> defer.Deferred[int]:
        """Delete every token of an instance (nova's clean_console_auths_for_instance)."""
        statement = tokens_table.delete().where(tokens_table.c.instance_uuid == instance_uuid)
        return self._run(lambda connection: connection.execute(statement).rowcount)

    def clean_expired(self, batch: int = 500) -> defer.Deferred[int]:
        """Delete expired tokens, ``batch`` rows per transaction, so no lock is held long."""
        now = int(self._now())

        def clean() -> int:
            total = 0
            while True:
                with self.engine.begin() as connection:
                    ids = (
                        connection.execute(
                            sa.select(tokens_table.c.id)
                            .where(tokens_table.c.expires <= now)
                            .limit(batch)
                        )
                        .scalars()
                        .all()
                    )
                    if ids:
                        connection.execute(tokens_table.delete().where(tokens_table.c.id.in_(ids)))
                total += len(ids)
                if len(ids) < batch:
                    return total

        return self._runner.run(clean)

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
            result = connection.execute(sessions_table.insert().values(**values))
            return int(result.inserted_primary_key[0])

        return self._run(insert)

    def end_session(
        self, session_id: int, *, reason: str, bytes_to_client: int, bytes_to_server: int
    ) -> defer.Deferred[None]:
        """Close a session's row: when, why, and how many bytes went each way."""
        now = self._now()
        statement = (
            sessions_table.update()
            .where(sessions_table.c.id == session_id, sessions_table.c.ended_at.is_(None))
            .values(
                ended_at=now,
                touched_at=now,
                end_reason=reason[:255],
                bytes_to_client=bytes_to_client,
                bytes_to_server=bytes_to_server,
            )
        )
        return self._execute(statement)

    def touch_sessions(self, counters: list[tuple[int, int, int]]) -> defer.Deferred[None]:
        """Renew live sessions' rows in one batched statement: (id, to client, to server)."""
        if not counters:
            return defer.succeed(None)
        now = self._now()
        statement = (
            sessions_table.update()
            .where(sessions_table.c.id == sa.bindparam("session_id"))
            .values(
                touched_at=now,
                bytes_to_client=sa.bindparam("to_client"),
                bytes_to_server=sa.bindparam("to_server"),
            )
        )
        rows = [
            {"session_id": i, "to_client": to_client, "to_server": to_server}
            for i, to_client, to_server in counters
        ]
        return self._execute(statement, rows)

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

    def end_session_and_release(
        self,
        session_id: int,
        *,
        reason: str,
        bytes_to_client: int,
        bytes_to_server: int,
    ) -> defer.Deferred[None]:
        """End a session's row and drop any lease it holds, in one transaction."""
        now = self._now()

        def end(connection: sa.Connection) -> None:
            connection.execute(
                sessions_table.update()
                .where(sessions_table.c.id == session_id, sessions_table.c.ended_at.is_(None))
                .values(
                    ended_at=now,
                    touched_at=now,
                    end_reason=reason[:255],
                    bytes_to_client=bytes_to_client,
                    bytes_to_server=bytes_to_server,
                )
            )
            connection.execute(leases_table.delete().where(leases_table.c.session_id == session_id))

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
        renew_leases = (
            leases_table.update()
            .where(leases_table.c.proxy == proxy)
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
            connection.execute(leases_table.delete().where(leases_table.c.expires_at < now))
            return ended

        return self._run(janitor)

    def get_session(self, session_id: int) -> defer.Deferred[dict[str, Any] | None]:
        query = sa.select(sessions_table).where(sessions_table.c.id == session_id)

        def select(connection: sa.Connection) -> dict[str, Any] | None:
            row = connection.execute(query).first()
            return None if row is None else dict(row._mapping)

        return self._run(select)


def _select_valid(connection: sa.Connection, token_hash: str, now: int) -> ConnectInfo | None:
    query = sa.select(*_TOKEN_COLUMNS).where(
        tokens_table.c.token_hash == token_hash, tokens_table.c.expires > now
    )
    return _first_connect_info(connection, query)


def _first_connect_info(connection: sa.Connection, query: sa.Select[Any]) -> ConnectInfo | None:
    row = connection.execute(query).first()
    return None if row is None else _connect_info(row)


def _utc(seconds: float) -> datetime.datetime:
    """nova's created_at: naive UTC (oslo's timeutils.utcnow)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).replace(tzinfo=None)


def open_store(
    connection: str | None,
    reactor: Any,
    *,
    threads: int = 4,
    state_path: str | None = None,
    recycle: int = 3600,
) -> tuple[Store, bool]:
    """Build a Store on its own thread pool from ``[database] connection``.

    Returns the store and whether it is the embedded default (no connection
    configured), the only database consoled may create or upgrade by itself.
    """
    from consoled.store.engine import default_url, make_engine
    from consoled.store.runner import ThreadRunner

    embedded = connection is None
    url = default_url(state_path) if embedded else connection
    engine = make_engine(url, pool_size=threads, recycle=recycle)
    return Store(engine, ThreadRunner(reactor, threads), reactor), embedded
