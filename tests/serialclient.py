"""A terminal user of the raw TCP serial door: answers the token prompt, then reads the console."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from tests.wsclient import ByteReader

CONNECTED = b"(then ? for help)\r\n"


class TerminalClient(ByteReader, Protocol):
    """Like ``nc``: raw bytes, types the token at the prompt.

    ``answered`` fires once the door says the console is connected (or the
    connection ends first); ``closed`` fires with ``(None, unread bytes)``.
    """

    def __init__(self, token: str) -> None:
        self.buffer = bytearray()
        self._waiter = None
        self._token = token
        self._head = b""
        self.attached = False
        self._typed = False
        self.answered: defer.Deferred[bool] = defer.Deferred()
        self.closed: defer.Deferred[tuple[None, bytes]] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.attached:
            self._received(data)
            return
        self._head += data
        if not self._typed and b"token: " in self._head:
            self._typed = True
            self.transport.write(self._token.encode() + b"\r\n")
        at = self._head.find(CONNECTED)
        if at >= 0:
            self.attached = True
            rest, self._head = self._head[at + len(CONNECTED) :], b""
            self.answered.callback(True)
            self._received(rest)

    def connectionLost(self, reason: Failure) -> None:
        if not self.answered.called:
            self.answered.callback(False)
        self._fail_waiter("connection closed")
        self.closed.callback((None, bytes(self.buffer) or self._head))

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()


@defer.inlineCallbacks
def terminal_connect(port: int, token: str) -> Any:
    """Connect, answer the prompt; fires with the client once the door has answered."""
    client = TerminalClient(token)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    yield client.answered
    return client
