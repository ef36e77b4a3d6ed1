"""consoled's reactor: Twisted's epoll reactor, dispatching without a log context.

Twisted's ``EPollReactor`` hands every ready socket to ``log.callWithLogger``,
which asks the connection for its log prefix, copies the logging context,
pushes and pops it, so that a legacy ``twisted.python.log.msg`` made while
the socket is served is tagged with that prefix.  Add ``min()`` and ``max()``
in ``timeout`` (builtins that parse keyword arguments on every call) and an
error handler entered and left on every turn of the loop, and Twisted's own
loop was most of what a keystroke cost consoled: 100,600 instructions per
one-byte round trip through the noVNC door under ``EPollReactor``, 56,300
under this one; the bare Python epoll relay takes 13,800
(``benchmarks/instructions.py``, callgrind).

consoled logs through ``twisted.logger``, whose events never read that
context, so this reactor serves ready sockets directly.  What
``callWithLogger`` also gave is kept: an exception that escapes a socket's
handling is logged (with the connection's prefix, computed only then) and the
loop goes on.  A socket that is only readable, the common event, goes
through the same steps as in ``_doReadOrWrite`` without its other branches.
Everything else (timed calls, threads, signals, processes, what a socket's
``doRead``/``doWrite`` may return) is the epoll reactor's own, and Twisted's
reactor conformance suites run against this class (tests/test_reactor.py).

``twistd consoled`` installs it when no other reactor was chosen
(``twistd --reactor=...`` still picks another one); see ``install``.
"""

from __future__ import annotations

import errno
import sys
from select import EPOLLIN
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import _NO_FILEDESC
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
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed while an earlier event of this batch was served
            try:
                if event == EPOLLIN:
                    self._read(selectable)
                else:
                    self._doReadOrWrite(selectable, fd, event)
            except Exception:
                # _doReadOrWrite already turns a doRead/doWrite error into a
                # lost connection; this is what escapes even that.
                log.failure("unhandled error serving {selectable}", selectable=_prefix(selectable))

    doIteration = doPoll

    def _read(self, selectable: Any) -> None:
        """_doReadOrWrite for an event that is only "readable", the common one.

        The same steps in the same order (the closed-descriptor check, doRead,
        an error logged and turned into the lost connection's reason), less the
        branches that cannot apply.
        """
        try:
            why = _NO_FILEDESC if selectable.fileno() == -1 else selectable.doRead()
        except BaseException as error:
            why = error
            log.failure("error reading from {selectable}", selectable=_prefix(selectable))
        if why:
            self._disconnectSelectable(selectable, why, True)


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
