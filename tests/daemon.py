"""Real ``twistd -n consoled`` processes for integration tests.

`start_consoled` spawns the daemon from this checkout with the test's reactor,
fires once it logs ``consoled ready`` (`spawn_consoled` does not wait, for a
start-up that must fail) and registers a cleanup that stops it
with SIGTERM and waits until it is reaped (SIGKILL if it has not ended after
a grace period), so trial's dirty-reactor check stays quiet.  A process the
test already killed is fine.  Nothing sleeps: log lines and the exit are
Deferreds with timeouts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.peers import free_port

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = "from twisted.scripts.twistd import run; run()"
ENV = {**os.environ, "PYTHONPATH": CHECKOUT}

READY = b"consoled ready"
#: What consoled says when a door's port is taken (consoled.listeners.DoorService).
PORT_TAKEN = b"address already in use"
START_TIMEOUT = 20.0
STOP_GRACE = 10.0
PORT_ATTEMPTS = 5


def write_config(testcase: SynchronousTestCase, text: str) -> str:
    """Write an INI file in the test's temporary directory; return its absolute path."""
    path = os.path.abspath(testcase.mktemp())
    with open(path, "w") as f:
        f.write(text)
    return path


class Twistd(protocol.ProcessProtocol):
    """One daemon: everything it printed (stdout and stderr), its log lines as events, its end."""

    def __init__(self) -> None:
        self.output = b""
        self.reason: BaseException | None = None
        self._waiting: list[tuple[bytes, defer.Deferred[None]]] = []
        self._ended: list[defer.Deferred[BaseException]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        waiting, self._waiting = self._waiting, []
        for marker, d in waiting:
            if d.called:  # timed out
                continue
            if marker in self.output:
                d.callback(None)
            else:
                self._waiting.append((marker, d))

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason.value
        waiting, self._waiting = self._waiting, []
        for marker, d in waiting:
            if not d.called:
                d.errback(RuntimeError(f"ended before {marker!r}: {self.text()}"))
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(reason.value)

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def when_logged(self, marker: bytes, timeout: float = 10) -> defer.Deferred[None]:
        """Fire once the output holds ``marker``; fail if the process ends first."""
        if marker in self.output:
            return defer.succeed(None)
        if self.reason is not None:
            return defer.fail(RuntimeError(f"ended before {marker!r}: {self.text()}"))
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((marker, d))
        return d.addTimeout(timeout, reactor)

    def when_ended(self) -> defer.Deferred[BaseException]:
        """Fire with the exit reason once the process has been reaped."""
        if self.reason is not None:
            return defer.succeed(self.reason)
        d: defer.Deferred[BaseException] = defer.Deferred()
        self._ended.append(d)
        return d

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def kill(self) -> defer.Deferred[BaseException]:
        """SIGKILL: no shut-down at all, as when the host loses the process."""
        self.signal("KILL")
        return self.when_ended()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """SIGTERM and wait for the end; SIGKILL after STOP_GRACE seconds."""
        if self.reason is not None:
            return self.reason
        self.signal("TERM")
        try:
            return (yield self.when_ended().addTimeout(STOP_GRACE, reactor))
        except defer.TimeoutError:
            return (yield self.kill())


def spawn_consoled(testcase: SynchronousTestCase, *config_files: str) -> Twistd:
    """Spawn ``twistd -n --pidfile= consoled --config-file F ...`` and return its `Twistd` at once."""
    twistd = Twistd()
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "consoled"]
    for path in config_files:
        argv += ["--config-file", path]
    reactor.spawnProcess(twistd, sys.executable, argv, env=ENV, path=CHECKOUT)
    testcase.addCleanup(twistd.stop)
    return twistd


@defer.inlineCallbacks
def start_consoled(testcase: SynchronousTestCase, *config_files: str) -> Any:
    """Spawn consoled (`spawn_consoled`); fire with its `Twistd` once it logs that it is ready."""
    twistd = spawn_consoled(testcase, *config_files)
    yield twistd.when_logged(READY, START_TIMEOUT)
    return twistd


@defer.inlineCallbacks
def start_consoled_on_free_ports(
    testcase: SynchronousTestCase, count: int, config_text: Callable[[list[int]], str]
) -> Any:
    """Start consoled on ``count`` fresh ports; fire with (`Twistd`, config path, ports).

    ``config_text(ports)`` is the INI text for those ports.  consoled's
    options take no port 0, so the numbers come from `free_port` (never one
    twice in this process); when another process took one meanwhile, the
    daemon refuses with "address already in use" and this tries new ports.
    """
    tried: list[list[int]] = []
    for _attempt in range(PORT_ATTEMPTS):
        ports = [free_port() for _ in range(count)]
        tried.append(ports)
        path = write_config(testcase, config_text(ports))
        twistd = spawn_consoled(testcase, path)
        try:
            yield twistd.when_logged(READY, START_TIMEOUT)
        except RuntimeError:
            if PORT_TAKEN in twistd.output:
                continue
            raise
        return twistd, path, ports
    raise RuntimeError(f"consoled found a port taken on every attempt: {tried}")
