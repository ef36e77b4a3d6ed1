"""Small hypervisor-side servers on real sockets, for behaviour the QEMU peers cannot show.

Each listens on 127.0.0.1 port 0 in the test's reactor and is stopped by a
cleanup.  They stand in for a console server where a test needs to control it:
echo, close on cue, flood, or answer the XenServer-style CONNECT.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase


class Hypervisor(Protocol):
    """Base: records connections and their end."""

    def connectionMade(self) -> None:
        self.factory.connected.append(self)
        self.lost: defer.Deferred[None] = defer.Deferred()
        if not self.factory.first.called:
            self.factory.first.callback(self)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


class Echo(Hypervisor):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class SayAndHangUp(Hypervisor):
    """Sends a greeting, then closes: the console went away."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(b"bye\r\n")
        self.transport.loseConnection()


class Flood(Hypervisor):
    """Writes as fast as its transport lets it; ``paused`` fires when it pushes back."""

    def connectionMade(self) -> None:
        self.sent = 0
        self.paused: defer.Deferred[None] = defer.Deferred()
        self._running = False
        super().connectionMade()
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self._running = True
        while self._running and self.transport.connected:
            self.transport.write(b"x" * 65536)
            self.sent += 65536

    def pauseProducing(self) -> None:
        self._running = False
        if not self.paused.called:
            self.paused.callback(None)

    def stopProducing(self) -> None:
        self._running = False


class ConnectGate(Hypervisor):
    """XenServer style: expects ``CONNECT <path> HTTP/1.1``, answers ``status``, then echoes."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.head = b""
        self.open = False

    def dataReceived(self, data: bytes) -> None:
        if self.open:
            self.transport.write(data)
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        self.request_line = self.head.split(b"\r\n", 1)[0]
        status = self.factory.status
        if status == 200:
            self.open = True
            self.transport.write(b"HTTP/1.1 200 OK\r\nX-Console: yes\r\n\r\nhello\r\n")
        else:
            self.transport.write(b"HTTP/1.1 %d Forbidden\r\n\r\n" % status)
            self.transport.loseConnection()


def serve(testcase: TestCase, protocol: type[Hypervisor], **attributes: Any) -> Any:
    """Listen with ``protocol``; returns the factory (``port``, ``first``, ``connected``)."""
    factory = Factory.forProtocol(protocol)
    factory.connected = []
    factory.first = defer.Deferred()
    for name, value in attributes.items():
        setattr(factory, name, value)
    listen(testcase, factory, factory.connected)
    return factory


def listen(testcase: TestCase, factory: Any, connections: list[Any]) -> None:
    """Listen on 127.0.0.1, a free port (``factory.port``); at cleanup, stop
    listening and abort ``connections`` (protocols with a ``lost`` Deferred)."""
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = port.getHost().port

    def stop() -> defer.Deferred[Any]:
        for each in connections:
            each.transport.abortConnection()
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening)] + [c.lost for c in connections]
        )

    testcase.addCleanup(stop)


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, read, released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
