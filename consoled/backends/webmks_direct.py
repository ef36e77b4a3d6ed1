"""WebMKS, the direct form: a secure websocket to the ESXi host, relayed frame to frame.

A ``webmks`` row whose internal_access_path is
``{"ticket": T, "thumbprint": P, "direct": true}`` names the ESXi host itself
(``host``, ``port``: 443), as vSphere's ``AcquireTicket("webmks")`` does::

    consoled TLS to host:port; the certificate must hash to P (SHA-1, or SHA-256
             for 64 hex digits) before anything is sent (else 4508: the ticket
             is never shown to an unpinned peer)
    consoled GET /ticket/T, Upgrade: websocket, Sec-WebSocket-Protocol: binary
    ESXi     101 (else 4506: the ticket refused)
    then     each message from ESXi is one frame to the user, and each of the
             user's frames one binary message to ESXi

ESXi's WebMKS requires the ``binary`` subprotocol (the WebMKS SDK asks for it
too, and the door grants it).  Messages are read whole, to at most
:data:`MAX_MESSAGE` bytes.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from zope.interface import implementer

from consoled.backends.tcp import _endpoint, explain_failure, ssl_reason
from consoled.backends.webmks import MksTicket, check_pin, peer_der, pinned_options
from consoled.endings import Kind, Refusal
from consoled.tokens import ConnectInfo

#: The largest message read from ESXi (a whole 4K framebuffer update is ~33 MB).
MAX_MESSAGE = 64 * 1024 * 1024


class Messages:
    """The relay's view of the ESXi websocket: a write is one binary message.

    Pausing and producer registration go to the TLS transport beneath, so a
    slow user pauses reading from ESXi and a slow ESXi pauses the user.
    """

    def __init__(self, client: EsxiClient) -> None:
        self._client = client

    def write(self, data: bytes) -> None:
        self._client.sendMessage(data, isBinary=True)

    def writeSequence(self, chunks: Any) -> None:
        for chunk in chunks:  # frames held before the relay began: one message each
            self.write(chunk)

    def loseConnection(self) -> None:
        self._client.sendClose(1000)

    def abortConnection(self) -> None:
        self._client.transport.abortConnection()

    def __getattr__(self, name: str) -> Any:
        # registerProducer, pauseProducing, resumeProducing, setTcpNoDelay, getPeer…
        return getattr(self._client.transport, name)


class EsxiBackend:
    """The backend a relay sees: :class:`Messages` as its transport."""

    def __init__(self, client: EsxiClient) -> None:
        self.client = client
        self.transport = Messages(client)

    def attach(self, relay: Any) -> None:
        self.client.relay_to(relay)


@implementer(IHandshakeListener)
class EsxiClient(WebSocketClientProtocol):
    """consoled's websocket to ESXi; the upgrade waits for the pinned certificate."""

    def __init__(self, ticket: MksTicket) -> None:
        super().__init__()
        self._ticket = ticket
        self.backend = EsxiBackend(self)
        self.ready: defer.Deferred[EsxiBackend] = defer.Deferred(
            lambda _: self.transport.abortConnection()
        )
        self._relay: Any = None
        self._held: list[bytes] = []
        self._lost: str | None = None

    #: Autobahn's connectionMade ran (the certificate was pinned)
    _started = False

    def connectionMade(self) -> None:
        pass  # the upgrade carries the ticket: it is sent once the certificate is pinned

    def handshakeCompleted(self) -> None:
        try:
            check_pin(peer_der(self.transport), self._ticket.thumbprint, "ESXi's certificate")
        except Refusal as refusal:
            self.ready.errback(refusal)
            self.transport.abortConnection()
            return
        self._started = True
        super().connectionMade()

    def onOpen(self) -> None:
        self.ready.callback(self.backend)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._relay is not None:
            self._relay.from_backend(payload)
            return
        self._held.append(payload)  # ready, not yet relaying: stop reading until then
        self.transport.pauseProducing()

    def relay_to(self, relay: Any) -> None:
        self._relay = relay
        held, self._held = self._held, []
        for message in held:
            relay.from_backend(message)
        if self._lost is not None:
            relay.backend_lost(self._lost)
            return
        self.transport.resumeProducing()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if not self.ready.called and reason.check(SSL.Error):
            self.ready.errback(Refusal(Kind.BACKEND_TLS, ssl_reason(reason.value)))
        if self._started:
            super().connectionLost(reason)
        elif not self.ready.called:  # closed before TLS was up
            self.ready.errback(
                Refusal(Kind.BACKEND_REFUSED, "ESXi closed the connection before TLS was up")
            )

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        text = (reason or "").replace(self._ticket.ticket, "<ticket>")[:120]
        if not self.ready.called:
            self.ready.errback(
                Refusal(Kind.BACKEND_REFUSED, f"ESXi did not open the WebMKS websocket: {text}")
            )
        elif self._relay is not None:
            self._relay.backend_lost(f"close code {code}" if code else "connection lost")
        else:
            self._lost = f"close code {code}" if code else "connection lost"


def connect_direct(
    reactor: Any, info: ConnectInfo, ticket: MksTicket, *, timeout: float
) -> defer.Deferred[EsxiBackend]:
    """Open the pinned websocket; fires with the backend once ESXi answered 101."""
    url = f"wss://{info.host}:{info.port}/ticket/{quote(ticket.ticket, safe='')}"
    factory = WebSocketClientFactory(url, protocols=["binary"])
    factory.protocol = lambda: EsxiClient(ticket)  # type: ignore[assignment]
    factory.setProtocolOptions(
        openHandshakeTimeout=0,  # the connect timeout covers TLS and the upgrade
        closeHandshakeTimeout=5,
        maxMessagePayloadSize=MAX_MESSAGE,
        maxFramePayloadSize=MAX_MESSAGE,
    )
    factory.noisy = False
    endpoint = wrapClientTLS(pinned_options(), _endpoint(reactor, info.host, info.port, timeout))

    d = endpoint.connect(factory).addCallback(lambda client: client.ready)
    d.addTimeout(timeout, reactor)
    return d.addErrback(explain_failure, info.host, info.port, timeout)
