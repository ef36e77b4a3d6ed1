"""The websocket door's first reader: upgrades to Autobahn, the rest to the Site, slow heads 408."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from consoled.doors.web import MAX_HEAD, DoorFactory, door_site
from consoled.doors.websocket import ConsoleServerFactory, ConsoleServerProtocol, Door

UPGRADE = (
    b"GET /?token=t HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


class DoorProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        door = Door("novnc", None)  # type: ignore[arg-type]
        websocket = ConsoleServerFactory(door, ping_interval=0)
        self.factory = DoorFactory(
            door_site(None, timeout=None),  # type: ignore[arg-type]
            websocket,
            self.clock,
            30,
        )

    def connect(self, *chunks: bytes) -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        for chunk in chunks:
            protocol.dataReceived(chunk)
        return protocol, transport

    def test_upgrade_byte_by_byte_goes_to_autobahn(self) -> None:
        """A websocket upgrade, however it is cut, is handed to the console protocol whole."""
        handed: list[bytes] = []
        self.patch(ConsoleServerProtocol, "dataReceived", lambda self, data: handed.append(data))
        protocol, _ = self.connect(*(UPGRADE[i : i + 1] for i in range(len(UPGRADE))))
        self.assertIsInstance(protocol._chosen, ConsoleServerProtocol)
        self.assertEqual(b"".join(handed), UPGRADE)
        protocol.dataReceived(b"\x82")
        self.assertEqual(handed[-1], b"\x82")  # later reads go straight there

    def test_everything_else_goes_to_the_site(self) -> None:
        """Plain GETs, other methods and // paths are the Site's to answer."""
        cases = [
            (b"GET /vnc.html HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
            (UPGRADE.replace(b"GET", b"POST", 1), b"405"),
            (UPGRADE.replace(b"GET /", b"GET //evil.example/", 1), b"400"),
        ]
        for request, status in cases:
            protocol, transport = self.connect(request)
            self.assertNotIsInstance(protocol._chosen, ConsoleServerProtocol)
            self.assertIn(status, transport.value().split(b"\r\n", 1)[0], request[:40])

    def test_endless_head_is_431(self) -> None:
        """A head over 16 KiB without its blank line is refused at once, and nothing more is read."""
        protocol, transport = self.connect(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value()[:80])
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"more\r\n\r\n")
        self.assertIsNone(protocol._chosen)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slow_head_is_408(self) -> None:
        """A head not complete within the handshake timeout is answered 408 and closed."""
        protocol, transport = self.connect(b"GET / HTTP/1.1\r\nHost: x\r\n")
        self.clock.advance(29)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())
        self.assertTrue(transport.disconnecting)

    def test_complete_head_cancels_the_deadline(self) -> None:
        protocol, transport = self.connect(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
