"""Periodic duties, each run by its own TimerService.

A duty returns a Deferred that never fails: an error is logged and the next
period tries again, because a LoopingCall whose function fails stops for good.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from consoled.store import Store
from consoled.store.breaker import is_outage

log = Logger()


def clean_expired_tokens(store: Store, batch: int) -> defer.Deferred[None]:
    """Delete expired tokens in bounded batches; log what was done or what failed."""

    def report(count: int) -> None:
        if count:
            log.info("deleted {count} expired console tokens", count=count)

    def failed(failure: Any) -> None:
        if is_outage(failure):  # the breaker logs the outage, once
            return
        log.failure("cleaning expired console tokens failed; next period tries again", failure)

    return store.clean_expired(batch).addCallbacks(report, failed)


def end_lost_sessions(store: Store, silent_for: float) -> defer.Deferred[None]:
    """End the rows of sessions whose proxy stopped touching them (it died).

    Not until this store has been up for ``silent_for``: after an outage every
    proxy's kept touches are still being written, and rows silent only
    because of the outage are not a dead proxy's.
    """
    if store.up_for() < silent_for:
        return defer.succeed(None)

    def report(count: int) -> None:
        if count:
            log.info("ended {count} session row(s) of a lost proxy", count=count)

    def failed(failure: Any) -> None:
        if is_outage(failure):  # the breaker logs the outage, once
            return
        log.failure("ending lost sessions failed; next period tries again", failure)

    return store.end_lost_sessions(silent_for).addCallbacks(report, failed)


def duty(
    name: str, interval: float, f: Any, *args: Any, clock: IReactorTime | None = None
) -> TimerService:
    """A named TimerService for a duty; ``clock`` replaces the reactor in tests."""
    service = TimerService(interval, f, *args)
    service.setName(name)
    if clock is not None:
        service.clock = clock
    return service
