"""The hypervisor side: the CONNECT exchange, held bytes, and why a connection fails."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.backends.tcp import MAX_CONNECT_ANSWER, BackendProtocol, connect_backend
from consoled.endings import Kind, Refusal

CONNECT = b"CONNECT /console?ref=1 HTTP/1.1\r\n\r\n"


class FakeRelay:
    """Records what the backend hands the relay."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list[str] = []
        self.got = defer.Deferred[bytes]()
        self.want = 0

    def from_backend(self, data: bytes) -> None:
        self.received.append(data)
        if self.want and len(b"".join(self.received)) >= self.want and not self.got.called:
            self.got.callback(b"".join(self.received))

    def backend_lost(self, detail: str = "") -> None:
        self.lost.append(detail)


class ProtocolTests(SynchronousTestCase):
    def connect(self, path: str | None) -> tuple[BackendProtocol, StringTransport, list[Any]]:
        protocol = BackendProtocol(path)
        results: list[Any] = []
        protocol.ready.addBoth(results.append)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport, results

    def refusal(self, results: list[Any]) -> Refusal:
        self.assertEqual(len(results), 1)
        self.assertIsInstance(results[0], Failure)
        refusal: Refusal = results[0].value
        self.assertIsInstance(refusal, Refusal)
        return refusal

    def test_no_path_ready_on_connect(self) -> None:
        """Without an internal_access_path the backend is ready as soon as it connects."""
        protocol, transport, results = self.connect(None)
        self.assertEqual(results, [protocol])
        self.assertEqual(transport.value(), b"")

    def test_connect_exchange_byte_by_byte(self) -> None:
        """A 200 answer split anywhere readies once; bytes after the head reach the relay first."""
        protocol, transport, results = self.connect("/console?ref=1")
        self.assertEqual(transport.value(), CONNECT)
        self.assertEqual(results, [])
        head = b"HTTP/1.1 200 OK\r\nX: y\r\n\r\n"
        for byte in head + b"RFB 003.008\n":
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(results, [protocol])
        self.assertEqual(transport.producerState, "paused")
        relay = FakeRelay()
        protocol.attach(relay)
        self.assertEqual(b"".join(relay.received), b"RFB 003.008\n")
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"more")
        self.assertEqual(relay.received[-1], b"more")
        self.assertEqual(transport.value(), CONNECT)

    def test_forbidden(self) -> None:
        """A 403 answer refuses the session, names the status, and closes the connection."""
        protocol, transport, results = self.connect("/console?ref=1")
        protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        refusal = self.refusal(results)
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_REFUSED)
        self.assertIn("403 Forbidden", refusal.ending.detail)
        self.assertTrue(transport.disconnecting)

    def test_not_http(self) -> None:
        """An answer that is not an HTTP status line is refused, even one that mentions 200."""
        protocol, transport, results = self.connect("/x")
        protocol.dataReceived(b"RFB 200 hello\r\n\r\n")
        self.assertEqual(self.refusal(results).ending.kind, Kind.BACKEND_REFUSED)

    def test_answer_too_long(self) -> None:
        """A head longer than MAX_CONNECT_ANSWER with no blank line is refused, not buffered on."""
        protocol, transport, results = self.connect("/x")
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        chunk = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        while not results and len(protocol._head) <= MAX_CONNECT_ANSWER:
            protocol.dataReceived(chunk)
        refusal = self.refusal(results)
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_REFUSED)
        self.assertIn("too long", refusal.ending.detail)
        self.assertTrue(transport.disconnecting)

    def test_lost_before_answer(self) -> None:
        """A console that hangs up during the CONNECT exchange refuses the session."""
        protocol, transport, results = self.connect("/x")
        protocol.dataReceived(b"HTTP/1.1 2")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.refusal(results).ending.kind, Kind.BACKEND_REFUSED)

    def test_lost_after_attach(self) -> None:
        """Once attached, the connection's loss is reported to the relay."""
        protocol, transport, results = self.connect(None)
        relay = FakeRelay()
        protocol.attach(relay)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(relay.lost), 1)

    def test_lost_between_ready_and_attach(self) -> None:
        """A console that hangs up after ready but before attach still ends the relay."""
        protocol, transport, results = self.connect(None)
        protocol.dataReceived(b"bye")
        protocol.connectionLost(Failure(ConnectionDone()))
        relay = FakeRelay()
        protocol.attach(relay)
        self.assertEqual(relay.received, [b"bye"])
        self.assertEqual(len(relay.lost), 1)

    def test_connect_timeout_is_timeout(self) -> None:
        """A TCP connect that never completes within timeout is BACKEND_TIMEOUT."""
        clock = MemoryReactorClock()
        results: list[Any] = []
        connect_backend(clock, "192.0.2.1", 5900, timeout=5).addBoth(results.append)
        clock.advance(5)
        self.assertEqual(self.refusal(results).ending.kind, Kind.BACKEND_TIMEOUT)


class Hypervisor(Protocol):
    """A console server: answers a CONNECT with ``answer`` and then ``data``, or stays silent."""

    def __init__(self, answer: bytes | None, data: bytes, closed: defer.Deferred[None]) -> None:
        self.answer, self.data, self.closed, self.buffer = answer, data, closed, b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.answer is not None and b"\r\n\r\n" in self.buffer:
            self.transport.write(self.answer + self.data)
            if not self.answer.startswith(b"HTTP/1.1 200"):
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.closed.callback(None)


class ConnectBackendTests(TestCase):
    timeout = 10

    def listen(self, answer: bytes | None, data: bytes = b"") -> tuple[int, defer.Deferred[None]]:
        closed = defer.Deferred[None]()
        factory = Factory.forProtocol(lambda: Hypervisor(answer, data, closed))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, closed

    async def test_connect_then_relay(self) -> None:
        """Through a 200 CONNECT answer, the hypervisor's first bytes reach the relay."""
        port, closed = self.listen(b"HTTP/1.1 200 OK\r\n\r\n", b"RFB 003.008\n")
        protocol = await connect_backend(
            reactor, "127.0.0.1", port, timeout=5, connect_path="/console?ref=1"
        )
        self.assertIsInstance(protocol, BackendProtocol)
        relay = FakeRelay()
        relay.want = 12
        protocol.attach(relay)
        self.assertEqual(await relay.got, b"RFB 003.008\n")
        protocol.transport.loseConnection()
        await closed

    async def test_forbidden(self) -> None:
        """A hypervisor answering 403 refuses the session."""
        port, closed = self.listen(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        d = connect_backend(reactor, "127.0.0.1", port, timeout=5, connect_path="/c")
        refusal = await self.assertFailure(d, Refusal)
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_REFUSED)
        await closed

    async def test_unreachable(self) -> None:
        """A closed port is BACKEND_UNREACHABLE and the detail names host:port."""
        listening = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        port = listening.getHost().port
        await listening.stopListening()
        d = connect_backend(reactor, "127.0.0.1", port, timeout=5)
        refusal = await self.assertFailure(d, Refusal)
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_UNREACHABLE)
        self.assertIn(f"127.0.0.1:{port}", refusal.ending.detail)

    async def test_silent_hypervisor_times_out(self) -> None:
        """A server that never answers the CONNECT times out and its connection is closed."""
        port, closed = self.listen(None)
        d = connect_backend(reactor, "127.0.0.1", port, timeout=0.2, connect_path="/c")
        refusal = await self.assertFailure(d, Refusal)
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_TIMEOUT)
        self.assertIn("0.2s", refusal.ending.detail)
        await closed
