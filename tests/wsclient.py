"""Test clients for the doors: a websocket byte-stream client (Autobahn) and raw HTTP."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

from tests.peers import ExchangeFailed, tcp_exchange

HOST = "127.0.0.1"


class ByteReader:
    """Reads a relayed console as one byte stream: ``read(n)``, ``read_until(marker)``."""

    buffer: bytearray
    _waiter: tuple[Any, defer.Deferred[bytes]] | None

    def _received(self, data: bytes) -> None:
        self.buffer += data
        self._check()

    def _fail_waiter(self, why: str) -> None:
        if self._waiter is not None:
            _, d = self._waiter
            self._waiter = None
            d.errback(ExchangeFailed(why, bytes(self.buffer)))

    def _check(self) -> None:
        if self._waiter is None:
            return
        take, d = self._waiter
        n = take(self.buffer)
        if n is not None:
            self._waiter = None
            data = bytes(self.buffer[:n])
            del self.buffer[:n]
            d.callback(data)

    def _wait(self, take: Any, timeout: float) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiter = (take, d)
        self._check()
        return d.addTimeout(timeout, reactor)

    def read(self, n: int, timeout: float = 10) -> defer.Deferred[bytes]:
        """Exactly the next ``n`` bytes."""
        return self._wait(lambda b: n if len(b) >= n else None, timeout)

    def read_until(self, marker: bytes, timeout: float = 10) -> defer.Deferred[bytes]:
        """Everything up to and including ``marker``."""

        def take(buffer: bytearray) -> int | None:
            at = buffer.find(marker)
            return None if at < 0 else at + len(marker)

        return self._wait(take, timeout)


class StreamClient(ByteReader, WebSocketClientProtocol):
    """A websocket client that reads the relayed console as one byte stream."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self._waiter = None
        self.opened: defer.Deferred[StreamClient] = defer.Deferred()
        self.closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {reason}"))
        self._fail_waiter(f"closed ({code}, {reason})")
        self.closed.callback((code, reason))

    def send(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)


def ws_connect(
    port: int,
    token: str | None = None,
    *,
    path: str = "/",
    origin: str | None = None,
    protocols: tuple[str, ...] = ("binary",),
    headers: dict[str, str] | None = None,
    tls: Any = None,
    explain: bool = False,
) -> defer.Deferred[StreamClient]:
    """Open a websocket to a door (wss with ``tls`` client options); fires once open.

    ``explain`` asks for a refusal as a close code and reason after the
    upgrade, as consoled's serial page does.
    """
    scheme = "wss" if tls is not None else "ws"
    url = f"{scheme}://{HOST}:{port}{path}" + (f"?token={token}" if token else "")
    if explain:
        url += "&explain=1" if token else "?explain=1"
    factory = WebSocketClientFactory(
        url, origin=origin, protocols=list(protocols) or None, headers=headers
    )
    factory.protocol = StreamClient
    endpoint: Any = TCP4ClientEndpoint(reactor, HOST, port, timeout=5)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    return endpoint.connect(factory).addCallback(lambda client: client.opened)


def _response_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    if head.split(b" ", 2)[1:2] == [b"101"]:
        return True  # switching protocols: no body follows
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


async def _http(port: int, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    try:
        data = await tcp_exchange(HOST, port, request, _response_complete, timeout=10)
    except ExchangeFailed as failed:
        data = failed.received  # the server closed after answering
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def http_request(
    port: int, request: bytes
) -> defer.Deferred[tuple[int, dict[bytes, bytes], bytes]]:
    """Send raw request bytes; fire with (status, headers, body)."""
    return defer.Deferred.fromCoroutine(_http(port, request))


def upgrade_request(
    target: str, *, host: str = "127.0.0.1", extra: str = "", key: bool = True
) -> bytes:
    """A websocket upgrade request, written out as a browser sends it."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
    ]
    if key:
        lines.append("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    text = "\r\n".join(lines) + "\r\n" + extra + "\r\n"
    return text.encode("latin-1")
