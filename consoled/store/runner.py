"""Where blocking database work runs: the store's own thread pool, or inline in tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Runner(Protocol):
    def start(self) -> None: ...
    def stop(self) -> defer.Deferred[None]: ...
    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]: ...


class ThreadRunner:
    """Runs each unit of database work in a thread of a pool owned by the store.

    ``stop`` waits for the calls already in flight before stopping the pool,
    so a shutdown never cuts a transaction (ending session rows, releasing
    leases) in half; joining idle threads afterwards is immediate.
    """

    def __init__(self, reactor: IReactorFromThreads, size: int, name: str = "consoled-db") -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        self._in_flight: set[defer.Deferred[Any]] = set()

    def start(self) -> None:
        self._pool.start()

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        d = deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)
        self._in_flight.add(d)

        def forget(result: Any) -> Any:
            self._in_flight.discard(d)
            return result

        return d.addBoth(forget)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        while self._in_flight:
            waiting = [observe(d) for d in list(self._in_flight)]
            yield defer.DeferredList(waiting, consumeErrors=True)
        if self._pool.started:
            self._pool.stop()


class InlineRunner:
    """Runs database work synchronously on the caller's thread (unit tests, the CLI)."""

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        return defer.maybeDeferred(f, *args, **kwargs)


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

    def __init__(self, engine: sa.Engine, runner: Runner, clock: IReactorTime) -> None:
        self.engine = engine
        self._runner = runner
        self.clock = clock

    def _run(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run ``f(connection, *args)`` in one transaction on the runner."""

        def unit() -> T:
            with self.engine.begin() as connection:
                return f(connection, *args)

        return self._runner.run(unit)

    def _read(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Like :meth:`_run`, for a read whose answer may be dropped when the
        store goes down meanwhile (the breaker fails it at once)."""

        def unit() -> T:
            with self.engine.begin() as connection:
                return f(connection, *args)

        read = getattr(self._runner, "read", None)
        return read(unit) if read is not None else self._runner.run(unit)

    def _keep(
        self, key: Any, make: Callable[[], Callable[[sa.Connection], Any]]
    ) -> defer.Deferred[None]:
        """A write that must not be lost: ``make()`` gives ``f(connection)``,
        built when it runs; while the store is down (the breaker) it is kept,
        replacing a kept write with the same ``key``, and written when the
        database is back."""

        def unit_of() -> Callable[[], Any]:
            f = make()

            def unit() -> Any:
                with self.engine.begin() as connection:
                    return f(connection)

            return unit

        keep = getattr(self._runner, "keep", None)
        return keep(key, unit_of) if keep is not None else self._runner.run(unit_of())

    def _now(self) -> float:
        return self.clock.seconds()
