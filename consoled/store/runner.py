"""Where blocking database work runs: the store's own thread pool, or inline in tests."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")

log = Logger()

#: one unit of work for a database thread: f, its arguments, and where its result goes
_Unit = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], defer.Deferred[Any]]


class Runner(Protocol):
    def start(self) -> None: ...
    def stop(self) -> defer.Deferred[None]: ...
    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]: ...


class ThreadRunner:
    """Runs each unit of database work on one of the store's own threads.

    At most ``size`` threads, started as work arrives, take units from one
    queue; results come back to the reactor in batches: the first result
    finished while none is waiting wakes the reactor (one
    ``callFromThread``), and every result finished before it runs goes with
    it.  Under a reconnect storm that is one reactor wake-up for many look-ups
    and session rows instead of one each, and a hand-off is a C queue's
    ``put`` instead of Twisted's thread pool (its team, worker and context
    bookkeeping).  With 100 set-ups in flight (the benchmark's greeter, 5,000
    sessions) the proxy's CPU per session went from 1,229 to 1,042 µs and
    the rate from 811 to 952 sessions/s (issue 16).

    ``stop`` waits for the calls already in flight before stopping the
    threads, so a shutdown never cuts a transaction (ending session rows,
    releasing leases) in half.
    """

    def __init__(self, reactor: IReactorFromThreads, size: int, name: str = "consoled-db") -> None:
        self._reactor = reactor
        self._size = size
        self._name = name
        self._work: queue.SimpleQueue[_Unit | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: threads waiting for work (guarded by _lock)
        self._idle = 0
        #: finished units not yet delivered, and whether a delivery is on its way
        self._finished: list[tuple[defer.Deferred[Any], bool, Any]] = []
        self._delivering = False
        self._in_flight: set[defer.Deferred[Any]] = set()

    def start(self) -> None:
        pass  # threads start with the first work that finds none idle

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        d: defer.Deferred[T] = defer.Deferred()
        self._in_flight.add(d)
        with self._lock:
            spawn = self._idle == 0 and len(self._threads) < self._size
        if spawn:
            thread = threading.Thread(
                target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        self._work.put((f, args, kwargs, d))

        def forget(result: Any) -> Any:
            self._in_flight.discard(d)
            return result

        return d.addBoth(forget)

    def _serve(self) -> None:
        """A database thread: run units until told to stop (None)."""
        while True:
            with self._lock:
                self._idle += 1
            unit = self._work.get()
            with self._lock:
                self._idle -= 1
            if unit is None:
                return
            f, args, kwargs, d = unit
            try:
                finished = (d, True, f(*args, **kwargs))
            except BaseException:
                finished = (d, False, Failure())
            with self._lock:
                self._finished.append(finished)
                wake, self._delivering = not self._delivering, True
            if wake:
                self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
            self._delivering = False
        for d, ok, result in finished:
            if ok:
                d.callback(result)
            else:
                d.errback(result)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        while self._in_flight:
            waiting = [observe(d) for d in list(self._in_flight)]
            yield defer.DeferredList(waiting, consumeErrors=True)
        threads, self._threads = self._threads, []
        for _ in threads:
            self._work.put(None)
        for thread in threads:
            thread.join()  # idle by now: each takes its None at once


class InlineRunner:
    """Runs database work synchronously on the caller's thread (unit tests, the CLI)."""

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        return defer.maybeDeferred(f, *args, **kwargs)


#: A kept database connection idle this long is pinged before its next use.
KEPT_IDLE_PING = 1.0


@contextmanager
def _transaction(connection: sa.Connection) -> Iterator[sa.Connection]:
    with connection.begin():
        yield connection


def _alive(connection: sa.Connection) -> bool:
    """Whether a kept connection still reaches its server (the pool's pre-ping, by hand)."""
    try:
        with connection.begin():
            connection.exec_driver_sql("SELECT 1")
    except sa.exc.DBAPIError as error:
        if error.connection_invalidated:  # the server dropped it: take another
            return False
        raise
    return True


def observe(d: defer.Deferred[Any]) -> defer.Deferred[None]:
    """A Deferred that fires when ``d`` does, without touching ``d``'s result."""
    observer: defer.Deferred[None] = defer.Deferred()

    def fire(result: Any) -> Any:
        observer.callback(None)
        return result

    d.addBoth(fire)
    return observer


class StorePart:
    """What every part of the Store works through: one engine, one runner, one clock."""

    def __init__(
        self,
        engine: sa.Engine,
        runner: Runner,
        clock: IReactorTime,
        *,
        keep_connection: bool = False,
    ) -> None:
        self.engine = engine
        self._runner = runner
        self.clock = clock
        #: each database thread's own connection, when kept (see _begin)
        self._kept: threading.local | None = threading.local() if keep_connection else None
        self._kept_all: set[sa.Connection] = set()
        self._kept_lock = threading.Lock()

    def _begin(self, single: bool = False) -> AbstractContextManager[sa.Connection]:
        """A transaction for a unit; a ``single`` statement's runs on the
        database thread's kept connection, in autocommit, when one is kept.

        The daemon's store keeps each database thread a connection in
        autocommit (``keep_connection``) for the units that are one
        statement: a session's token look-up, its row's insert and its row's
        end.  Through the pool each cost a checkout and a check-in (on SQLite
        ~25 of the ~45 µs of a look-up) and, on a server, the pool's pre-ping
        and a BEGIN and a COMMIT: three round trips besides the statement, of
        ~60 µs of this process's CPU each with psycopg (a look-up: 207 µs of
        CPU in a transaction, 59 µs in autocommit; issue 16).  One statement
        is atomic alone.  What the pre-ping was for is kept: a kept
        connection idle for `KEPT_IDLE_PING` seconds is pinged before use,
        and one the server dropped (invalidated by SQLAlchemy on the error)
        is replaced.  Units of several statements keep the pool and their
        transaction.
        """
        if self._kept is None or not single:
            return self.engine.begin()
        kept = self._kept
        connection: sa.Connection | None = getattr(kept, "connection", None)
        now = time.monotonic()
        if connection is not None and not (connection.closed or connection.invalidated):
            if now - kept.used < KEPT_IDLE_PING or _alive(connection):
                kept.used = now
                return _transaction(connection)
            connection.close()
        kept.connection = None
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        kept.connection = connection
        kept.used = now
        with self._kept_lock:
            self._kept_all.add(connection)
        return _transaction(connection)

    def _close_kept(self) -> None:
        """Close this thread's kept connection (run on a database thread, at stop)."""
        connection = getattr(self._kept, "connection", None)
        if connection is not None:
            self._kept.connection = None  # type: ignore[union-attr]
            with self._kept_lock:
                self._kept_all.discard(connection)
            connection.close()

    def _close_kept_rest(self) -> None:
        """Close the kept connections of threads that have stopped (servers only:
        SQLite's one thread closed its own in `_close_kept`)."""
        with self._kept_lock:
            rest, self._kept_all = self._kept_all, set()
        for connection in rest:
            try:
                connection.close()
            except Exception as error:  # the server is gone: nothing to give back
                log.debug("closing a kept database connection: {error}", error=error)

    def _run(self, f: Callable[..., T], *args: Any, single: bool = False) -> defer.Deferred[T]:
        """Run ``f(connection, *args)`` in one transaction on the runner
        (``single``: f runs one statement, see `_begin`)."""

        def unit() -> T:
            with self._begin(single) as connection:
                return f(connection, *args)

        return self._runner.run(unit)

    def _read(self, f: Callable[..., T], *args: Any, single: bool = False) -> defer.Deferred[T]:
        """Like :meth:`_run`, for a read whose answer may be dropped when the
        store goes down meanwhile (the breaker fails it at once)."""

        def unit() -> T:
            with self._begin(single) as connection:
                return f(connection, *args)

        read = getattr(self._runner, "read", None)
        return read(unit) if read is not None else self._runner.run(unit)

    def _keep(
        self, key: Any, make: Callable[[], Callable[[sa.Connection], Any]], single: bool = False
    ) -> defer.Deferred[None]:
        """A write that must not be lost: ``make()`` gives ``f(connection)``,
        built when it runs; while the store is down (the breaker) it is kept,
        replacing a kept write with the same ``key``, and written when the
        database is back."""

        def unit_of() -> Callable[[], Any]:
            f = make()

            def unit() -> Any:
                with self._begin(single) as connection:
                    return f(connection)

            return unit

        keep = getattr(self._runner, "keep", None)
        return keep(key, unit_of) if keep is not None else self._runner.run(unit_of())

    def _now(self) -> float:
        return self.clock.seconds()
