"""TLS sessions one after another on one TCP connection, under a backend.

VMware's authd starts a second TLS session on the raw connection once the
first has done its work, abandoning the first without a close alert.
Twisted's ``startTLS`` starts TLS once per connection, so :class:`TlsSessions`
sits between the TCP transport and the :class:`~consoled.backends.tcp.BackendProtocol`:
bytes go in the clear until :meth:`TlsSessions.start_tls`, then through the
latest session (a ``TLSMemoryBIOProtocol`` over the raw transport), which
also becomes the backend's ``transport``, so the relay writes, pauses and
registers producers through it.  An abandoned session is cut off the socket:
nothing it might still write reaches the peer, nothing it reads reaches the
backend.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from consoled.backends.tcp import BackendProtocol


class _Tap:
    """A TLS session's view of the TCP transport; cut once the session is abandoned."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.cut = False

    def write(self, data: bytes) -> None:
        if not self.cut:
            self._transport.write(data)

    def writeSequence(self, data: Any) -> None:
        if not self.cut:
            self._transport.writeSequence(data)

    def loseConnection(self) -> None:
        if not self.cut:
            self._transport.loseConnection()

    def abortConnection(self) -> None:
        if not self.cut:
            self._transport.abortConnection()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@implementer(IHandshakeListener)
class _Session(Protocol):
    """What one TLS session hands up: to the backend, while it is the latest."""

    def __init__(self, backend: BackendProtocol) -> None:
        self.backend = backend
        self.current = True

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.backend.transport = transport  # the backend writes through this session now

    def dataReceived(self, data: bytes) -> None:
        if self.current:
            self.backend.dataReceived(data)

    def handshakeCompleted(self) -> None:
        if self.current:
            self.backend.handshakeCompleted()

    def connectionLost(self, reason: Failure) -> None:
        if self.current:
            self.backend.connectionLost(reason)


class TlsSessions(Protocol):
    """The TCP connection under a backend: in the clear, then through its latest TLS session.

    :meth:`start_tls` starts a TLS session (client side) on the raw
    connection; a second call abandons the first without shutting it down
    (nothing it might still write reaches the socket) and starts another.
    The backend's ``transport`` is always the latest session.
    """

    def __init__(self, backend: BackendProtocol) -> None:
        self.backend = backend
        self._session: TLSMemoryBIOProtocol | None = None
        self._tap: _Tap | None = None

    @property
    def ready(self) -> Any:
        return self.backend.ready

    def connectionMade(self) -> None:
        self.backend.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        (self._session or self.backend).dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        (self._session or self.backend).connectionLost(reason)

    def start_tls(self, options: Any) -> None:
        if self._session is not None:
            assert self._tap is not None
            self._tap.cut = True
            self._session.wrappedProtocol.current = False
        self._tap = _Tap(self.transport)
        factory = TLSMemoryBIOFactory(options, True, Factory())
        self._session = TLSMemoryBIOProtocol(factory, _Session(self.backend))
        self._session.makeConnection(self._tap)
