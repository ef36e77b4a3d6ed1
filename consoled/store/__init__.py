"""The token and session store: SQLAlchemy Core behind a Deferred API.

Every public method returns a Deferred and does its whole unit of work in
one transaction on the runner (the store's own thread pool in the daemon),
returning plain data.  Time comes from the injected clock, never from
``time.time()``.  Nothing here knows about protocols or doors.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from consoled.store import schema
from consoled.store.serial_ports import SerialPortRows
from consoled.store.sessions import SessionRows
from consoled.store.tokens import TokenRows


class Store(TokenRows, SessionRows, SerialPortRows):
    """consoled's database, spoken to through Deferreds: the token part
    (store/tokens.py), the session and lease part (store/sessions.py) and
    the serial port allocations (store/serial_ports.py) on one engine and
    one runner."""

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        self._runner.start()

    def stop(self) -> defer.Deferred[None]:
        """Wait for calls in flight, close a kept connection on its own thread,
        stop the pool, close pooled connections."""
        if self._kept is not None:
            d = self._runner.run(self._close_kept)
            d.addErrback(lambda _: None)  # the breaker is open: the process is ending anyway
            d.addCallback(lambda _: self._runner.stop())
            d.addCallback(lambda _: self._close_kept_rest())
        else:
            d = self._runner.stop()
        d.addCallback(lambda _: self.engine.dispose())
        return d

    # -- schema -------------------------------------------------------------

    def check_schema(self) -> defer.Deferred[None]:
        """Fail with :class:`schema.SchemaBehind` unless the database is at head."""
        return self._runner.run(schema.check, self.engine)

    def upgrade_schema(self) -> defer.Deferred[None]:
        return self._runner.run(schema.upgrade, self.engine)

    def up_for(self) -> float:
        """Seconds since the store was last found up (its breaker's; for ever without one)."""
        since = getattr(self._runner, "up_since", None)
        return float("inf") if since is None else self.clock.seconds() - since

    def ping(self) -> defer.Deferred[None]:
        """A round trip to the database (health checks)."""

        def select_one(engine: Any) -> None:
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")

        return self._runner.run(select_one, self.engine)

    def schema_revision(self) -> defer.Deferred[str | None]:
        return self._runner.run(schema.current_revision, self.engine)


def open_store(
    connection: str | None,
    reactor: Any,
    *,
    threads: int = 4,
    state_path: str | None = None,
    recycle: int = 3600,
    breaker: bool = True,
) -> tuple[Store, bool]:
    """Build a Store on its own thread pool from ``[database] connection``.

    Returns the store and whether it is the embedded default (no connection
    configured), the only database consoled may create or upgrade by itself.
    ``breaker``: the daemon's; a one-shot tool (consoled-manage) goes without
    and reports a database that is down in its own one line.
    """
    from consoled.store.breaker import Breaker
    from consoled.store.engine import default_url, make_engine, normalise_url, ping
    from consoled.store.runner import ThreadRunner

    embedded = connection is None
    url = default_url(state_path) if embedded else connection
    sqlite = normalise_url(url).get_backend_name() == "sqlite"
    if sqlite:
        # SQLite has one writer at a time: a second thread only waits in
        # SQLite's busy handler (sleeps of up to 100 ms) while the first,
        # holding the write lock, waits for the GIL behind a busy reactor.
        # Under a reconnect storm such waits passed the breaker's 0.8 s and
        # refused users with 503 (issue 16); one thread never waits on itself.
        threads = 1
    # Each database thread keeps a connection (StorePart._begin); the pool
    # holds as many again for the units that take their own (leases, the
    # breaker's probe, health checks).
    engine = make_engine(url, pool_size=2 * threads, recycle=recycle)
    # The breaker: fail fast while the database is down, keep session writes.
    runner: Any = ThreadRunner(reactor, threads)
    if breaker:
        runner = Breaker(runner, reactor, lambda: ping(engine))
    return Store(engine, runner, reactor, keep_connection=True), embedded
