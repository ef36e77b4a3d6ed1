"""The store's circuit breaker: a database that fails or hangs is "down" at once.

::

    up ──(a call fails with a connection error, or runs longer than ``slow``)──► down
    down: calls fail at once with StoreDown (the gate answers 503 in well under 1 s);
          reads in flight fail too (their late answers are dropped);
          writes that must not be lost (session ends, touches, lease renewals)
          are kept in a bounded queue, coalesced by key (the last touch wins,
          every end is kept);
          one probe at a time (``SELECT 1``) every ``probe_every`` seconds
    down ──(a probe answers; the kept writes are written, in order)──► up

Why here and not a shorter timeout per statement: a blackholed database
(packets dropped) hangs a database thread until the TCP stack gives up, and
nothing on the reactor can cut a thread short.  The breaker stops sending
work to the pool instead, so at most the calls in flight when the outage
began (the pool's size) and one probe wait on it; the driver's own timeouts
(``connect_timeout``, ``tcp_user_timeout``, consoled/store/engine.py) free
those threads.  The outage is logged once with its traceback, its end once
with what it cost; each refused connection logs one line (the gate's).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import sqlalchemy as sa
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.store.runner import Runner

T = TypeVar("T")
log = Logger()

#: A call that runs longer than this on its database thread marks the store down
#: (a blackholed database never answers); time waiting for a free thread does not count.
SLOW_SECONDS = 0.8
#: How often a down store asks the database whether it is back.
PROBE_SECONDS = 0.5
#: Kept writes beyond this are dropped (and counted in the log): about one per session.
MAX_KEPT = 100_000

#: Errors that mean "the database cannot be reached", not "this statement is wrong".
_OUTAGE_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


class StoreDown(Exception):
    """The store is down: the call was not tried.  ``cause`` is one line for operators."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def is_outage(failure: Failure) -> bool:
    """Whether ``failure`` says the database is unreachable (rather than a bad statement)."""
    if failure.check(StoreDown, *_OUTAGE_ERRORS):
        return True
    value = failure.value
    return isinstance(value, sa.exc.DBAPIError) and bool(value.connection_invalidated)


def brief_error(error: BaseException) -> str:
    """The database error in a few words: its driver's type and first line, no URL."""
    if isinstance(error, StoreDown):
        return error.cause
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) and error.orig else error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0].strip()[:160]}" if lines else type(cause).__name__


class _Call:
    """One call on the pool: when its thread started it (None while it waits)."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started: float | None = None


class Breaker:
    """A :class:`Runner` in front of the store's runner that fails fast while the database is down."""

    def __init__(
        self,
        runner: Runner,
        clock: IReactorTime,
        probe: Callable[[], Any],
        *,
        slow: float = SLOW_SECONDS,
        probe_every: float = PROBE_SECONDS,
        max_kept: int = MAX_KEPT,
    ) -> None:
        self._runner = runner
        self._clock = clock
        self._probe_unit = probe
        self.slow = slow
        self.probe_every = probe_every
        self.max_kept = max_kept
        #: calls on the pool now, each stamped by its thread when it starts
        self._in_flight: set[_Call] = set()
        self._watchdog: IDelayedCall | None = None
        self.up = True
        #: when the store was last found up (start, or the end of an outage)
        self.up_since = clock.seconds()
        #: why the store is down, one line (refusals name it)
        self.cause = ""
        self._down_since = 0.0
        self._refused = 0
        self._dropped = 0
        self._reads: set[defer.Deferred[Any]] = set()
        self._writes: dict[defer.Deferred[Any], tuple[Hashable, Callable[[], Any]]] = {}
        self._kept: dict[Hashable, Callable[[], Callable[[], Any]]] = {}
        self._probe_call: IDelayedCall | None = None
        self._probing = False
        self._stopping = False

    # -- Runner --------------------------------------------------------------

    def start(self) -> None:
        self._runner.start()

    def stop(self) -> defer.Deferred[None]:
        self._stopping = True
        for timer in (self._probe_call, self._watchdog):
            if timer is not None and timer.active():
                timer.cancel()
        if self._kept:
            log.warn(
                "stopping with the database down ({cause}): {count} kept write(s) not written",
                cause=self.cause,
                count=len(self._kept),
            )
        return self._runner.stop()

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Run ``f`` on the pool, or fail at once with :class:`StoreDown` while down."""
        if not self.up:
            self._refused += 1
            return defer.fail(StoreDown(self.cause))
        return self._watched(f, *args, **kwargs)

    # -- what the store adds ---------------------------------------------------

    def read(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Like :meth:`run`, for a call whose answer may be dropped: it fails
        with StoreDown as soon as the store goes down, even while in flight."""
        if not self.up:
            self._refused += 1
            return defer.fail(StoreDown(self.cause))
        outer: defer.Deferred[T] = defer.Deferred()
        self._reads.add(outer)

        def settle(result: Any) -> None:
            self._reads.discard(outer)
            if not outer.called:
                outer.callback(result) if not isinstance(result, Failure) else outer.errback(result)

        self._watched(f, *args).addBoth(settle)
        return outer

    def keep(self, key: Hashable, make: Callable[[], Callable[[], Any]]) -> defer.Deferred[None]:
        """Write ``make()`` (a unit of work, built when it runs) now, or keep it
        until the database is back.  A later write with the same ``key``
        replaces a kept one.  Fires once written or kept (also when the store
        goes down while it is in flight); never fails for an outage."""
        if not self.up:
            self._keep(key, make)
            return defer.succeed(None)
        outer: defer.Deferred[Any] = defer.Deferred()
        self._writes[outer] = (key, make)

        def settle(result: Any) -> None:
            self._writes.pop(outer, None)
            if outer.called:  # kept when the store went down; written again when back
                return
            if isinstance(result, Failure) and is_outage(result):
                self._keep(key, make)
                outer.callback(None)
            elif isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

        self._watched(make()).addBoth(settle)
        return outer

    def _keep(self, key: Hashable, make: Callable[[], Callable[[], Any]]) -> None:
        if key not in self._kept and len(self._kept) >= self.max_kept:
            self._dropped += 1
            return
        self._kept.pop(key, None)
        self._kept[key] = make

    # -- up and down -------------------------------------------------------

    def _watched(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Run ``f`` on the pool; too slow once it *runs* (not while it waits
        for a thread: a busy pool is not an outage) trips the breaker.

        The database thread stamps when the call starts (reading the clock
        is thread-safe); one watchdog on the reactor looks at the stamps of
        the calls in flight, so a call costs no extra hop to the reactor.
        """
        call = _Call()

        def started(*a: Any, **kw: Any) -> T:
            call.started = self._clock.seconds()
            return f(*a, **kw)

        self._in_flight.add(call)
        self._watch()

        def done(result: Any) -> Any:
            self._in_flight.discard(call)
            if not self._in_flight and self._watchdog is not None and self._watchdog.active():
                self._watchdog.cancel()  # nothing left to watch: no timer left behind
            if isinstance(result, Failure) and is_outage(result):
                self._trip(result)
            return result

        return self._runner.run(started, *args, **kwargs).addBoth(done)

    def _watch(self) -> None:
        if self._watchdog is None or not self._watchdog.active():
            self._watchdog = self._clock.callLater(self.slow / 4, self._look)

    def _look(self) -> None:
        """The watchdog: trip on a call running longer than ``slow``; again while any is in flight."""
        self._watchdog = None
        now = self._clock.seconds()
        if any(c.started is not None and now - c.started >= self.slow for c in self._in_flight):
            self._trip(None)
        if self._in_flight and self.up:
            self._watch()

    def _trip(self, failure: Failure | None) -> None:
        if not self.up:
            return
        self.up = False
        self._down_since = self._clock.seconds()
        self._refused = self._dropped = 0
        if failure is None:
            self.cause = f"no answer within {self.slow:g}s"
            log.warn(
                "the database is down ({cause}): refusing new connections at once,"
                " keeping session writes until it answers",
                cause=self.cause,
            )
        else:
            self.cause = brief_error(failure.value)
            # The one traceback of this outage.
            log.failure(
                "the database is down ({cause}): refusing new connections at once,"
                " keeping session writes until it answers",
                failure,
                cause=self.cause,
            )
        reads, self._reads = self._reads, set()
        for d in reads:
            d.errback(StoreDown(self.cause))
        # Writes hanging on a dead connection are kept now (their callers, such
        # as the touch timer, go on); each is idempotent, so a late one is harmless.
        writes, self._writes = self._writes, {}
        for d, (key, make) in writes.items():
            self._keep(key, make)
            d.callback(None)
        self._probe_soon()

    def _probe_soon(self) -> None:
        if self._stopping or self._probing:
            return
        if self._probe_call is None or not self._probe_call.active():
            self._probe_call = self._clock.callLater(self.probe_every, self._probe)

    def _probe(self) -> None:
        self._probing = True
        d = self._runner.run(self._probe_unit)
        d.addCallbacks(lambda _: self._flush(), self._still_down)

    def _still_down(self, failure: Failure) -> None:
        self._probing = False
        if not is_outage(failure):
            log.failure("probing the database failed", failure)
        else:
            self.cause = brief_error(failure.value)
        self._probe_soon()

    @defer.inlineCallbacks
    def _flush(self) -> Any:
        """The database answers: write the kept writes in order, then be up."""
        written = 0
        while self._kept:
            key = next(iter(self._kept))
            make = self._kept.pop(key)
            try:
                yield self._runner.run(make())
            except Exception:
                failure = Failure()
                if is_outage(failure):
                    if key not in self._kept:  # back to the front, unless replaced meanwhile
                        self._kept = {key: make, **self._kept}
                    self._still_down(failure)
                    return
                log.failure("a kept database write failed; dropped", failure)
                continue
            written += 1
        self._probing = False
        self.up = True
        self.up_since = self._clock.seconds()
        log.info(
            "the database is back after {seconds:.1f}s: {refused} call(s) refused,"
            " {written} kept write(s) written, {dropped} dropped",
            seconds=self._clock.seconds() - self._down_since,
            refused=self._refused,
            written=written,
            dropped=self._dropped,
        )
