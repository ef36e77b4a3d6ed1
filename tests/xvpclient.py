"""A Java XVP viewer's side of the CONNECT exchange, byte for byte, for tests."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from tests.wsclient import HOST, ByteReader


def java_request(token: str) -> bytes:
    """Exactly what the TightVNC-derived HTTPConnectSocket sends."""
    return f"CONNECT /console?token={token} HTTP/1.0\r\n\r\n".encode("ascii")


class XVPClient(ByteReader, Protocol):
    """Sends the request, reads the answer head, then reads the console's bytes.

    ``answered`` fires with the status code; ``closed`` fires with
    ``(status, body)`` when the connection ends.
    """

    def __init__(self, request: bytes) -> None:
        self.buffer = bytearray()
        self._waiter = None
        self._request = request
        self._head = b""
        self.status: int | None = None
        self.answered: defer.Deferred[int] = defer.Deferred()
        self.closed: defer.Deferred[tuple[int | None, bytes]] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.status is not None:
            self._received(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        line = head.split(b"\r\n", 1)[0]
        # The Java viewer only checks that the answer starts with this.
        self.status = 200 if line.startswith(b"HTTP/1.1 200 ") else int(line.split()[1])
        self.answered.callback(self.status)
        self._received(rest)

    def connectionLost(self, reason: Failure) -> None:
        if not self.answered.called:
            self.answered.errback(ConnectionError(f"closed before answering: {self._head!r}"))
        self._fail_waiter("connection closed")
        self.closed.callback((self.status, bytes(self.buffer)))

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()


@defer.inlineCallbacks
def xvp_connect(port: int, token: str, request: bytes | None = None) -> Any:
    """Connect and send the Java viewer's request; fires once the answer head is read."""
    client = XVPClient(request if request is not None else java_request(token))
    yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, port, timeout=5), client)
    yield client.answered
    return client
