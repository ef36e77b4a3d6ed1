"""consoled's reactor: Twisted's epoll reactor, dispatching without a log context.

Twisted's ``EPollReactor`` hands every ready socket to ``log.callWithLogger``,
which asks the connection for its log prefix, copies the logging context,
pushes and pops it, so that a legacy ``twisted.python.log.msg`` made while
the socket is served is tagged with that prefix.  On a keystroke's round
trip through consoled (two ready sockets) that is about a third of all the
instructions the process runs: 110,600 per round trip with it, 76,600
without it (callgrind over 2,000 one-byte round trips through the noVNC
door; ``benchmarks/README.md``, "Instructions per round trip").

consoled logs through ``twisted.logger``, whose events never read that
context, so this reactor serves ready sockets directly.  What
``callWithLogger`` also gave is kept: an exception that escapes a socket's
handling is logged (with the connection's prefix, computed only then) and the
loop goes on.  Everything else (timed calls, threads, signals, processes,
what a socket's ``doRead``/``doWrite`` may return) is the epoll reactor's own.

``twistd consoled`` installs it when no other reactor was chosen
(``twistd --reactor=...`` still picks another one); see ``install``.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger, LogLevel

log = Logger()

_LONGEST = 2147483


class ConsoledReactor(EPollReactor):
    """The epoll reactor without the per-event logging context."""

    def mainLoop(self) -> None:
        # ReactorBase.mainLoop enters and leaves its error handler on every
        # turn; here one try spans the turns until an error, then the loop
        # goes on as there.
        while self._started:
            try:
                while self._started:
                    self.runUntilCurrent()
                    self.doIteration(self.running and self.timeout())
            except BaseException:
                log.failure("Unexpected error in main loop", level=LogLevel.critical)
        log.info("Main loop terminated.")

    def timeout(self) -> float | None:
        # As ReactorBase.timeout, with comparisons where it calls min() and
        # max(): those builtins parse keyword arguments on every call, about
        # 1,800 instructions a turn, and consoled always has timers pending.
        self._insertNewDelayedCalls()
        if not self._pendingTimedCalls:
            return None
        delay = self._pendingTimedCalls[0].time - self.seconds()
        if delay <= 0:
            return 0
        # epoll_wait takes milliseconds in a C int: at most 2**31 / 1000 seconds.
        return delay if delay < _LONGEST else _LONGEST

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait until something is ready
        try:
            # As the epoll reactor does: at most as many events as sockets watched.
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        serve = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed while an earlier event of this batch was served
            try:
                serve(selectable, fd, event)
            except Exception:
                # _doReadOrWrite already turns a doRead/doWrite error into a
                # lost connection; this is what escapes even that.
                log.failure("unhandled error serving {selectable}", selectable=_prefix(selectable))

    doIteration = doPoll


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return repr(selectable)


def install() -> bool:
    """Install :class:`ConsoledReactor` as the global reactor unless one already is.

    Returns whether it was installed: not when a reactor was installed (or
    imported) before, such as one chosen with ``twistd --reactor``.
    """
    if "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor

    installReactor(ConsoledReactor())
    return True
