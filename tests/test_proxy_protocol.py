"""The PROXY protocol header in front of a door (consoled/proxy_protocol.py), in memory.

The real HAProxy in front of two real proxies is tests/test_haproxy.py.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from consoled.config import ConfigError, load_settings
from consoled.limits import PeerLimit
from consoled.listeners import line_answer
from consoled.option_types import networks
from consoled.proxy_protocol import HEADER_TIMEOUT, ProxyHeaderFactory

HAPROXY = IPv4Address("TCP", "10.0.0.10", 40000)
CLIENT = ("203.0.113.7", 51234)
DOOR = ("10.0.0.20", 6080)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(client: tuple[str, int] = CLIENT, door: tuple[str, int] = DOOR) -> bytes:
    """A v2 PROXY header for a TCP over IPv4 connection, as HAProxy's send-proxy-v2 writes it."""
    addresses = socket.inet_aton(client[0]) + socket.inet_aton(door[0])
    addresses += struct.pack("!HH", client[1], door[1])
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


def v1_header(client: tuple[str, int] = CLIENT, door: tuple[str, int] = DOOR) -> bytes:
    return f"PROXY TCP4 {client[0]} {door[0]} {client[1]} {door[1]}\r\n".encode()


#: What HAProxy sends on a health check: v2, LOCAL, no addresses.
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


class Door(Protocol):
    """Stands for a door's protocol: records the peer it sees and what it reads."""

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class DoorFactory(Factory):
    protocol = Door

    def __init__(self) -> None:
        self.built: list[tuple[Any, Door]] = []

    def buildProtocol(self, addr: Any) -> Door:
        door = super().buildProtocol(addr)
        self.built.append((addr, door))
        return door


class ProxyHeaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.doors = DoorFactory()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def connect(self, factory: Any = None, peer: IPv4Address = HAPROXY) -> tuple[Any, Any]:
        factory = factory or ProxyHeaderFactory("novnc", self.doors, self.clock)
        reader = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        reader.makeConnection(transport)
        return reader, transport

    def refusals(self) -> list[str]:
        return [
            f"{e['peer']}: {e['why']}"
            for e in self.logged
            if e.get("log_format", "").startswith("refused {door}")
        ]

    def test_v2_header_in_pieces(self) -> None:
        """A v2 header that arrives a byte at a time builds the door with the client's address.

        The door is built only once the header is whole (so a door reading
        its peer as it connects sees the client), with that address, and
        reads the bytes after the header as the start of its stream.
        """
        reader, transport = self.connect()
        for byte in v2_header():
            self.assertEqual(self.doors.built, [])
            reader.dataReceived(bytes([byte]))
        reader.dataReceived(b"GET / HTTP/1.1\r\n")
        ((addr, door),) = self.doors.built
        self.assertEqual((addr.host, addr.port), CLIENT)
        self.assertEqual((door.peer.host, door.peer.port), CLIENT)
        self.assertEqual((reader.getHost().host, reader.getHost().port), DOOR)
        self.assertEqual(door.received, b"GET / HTTP/1.1\r\n")
        self.assertFalse(transport.disconnecting)
        door.transport.write(b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\n")

    def test_v1_header_with_data_in_one_read(self) -> None:
        """A v1 header and the client's first bytes in one read: the door gets exactly those bytes."""
        reader, _ = self.connect()
        reader.dataReceived(v1_header() + b"\x16\x03\x01")
        ((addr, door),) = self.doors.built
        self.assertEqual((addr.host, door.peer.host), (CLIENT[0], CLIENT[0]))
        self.assertEqual(door.received, b"\x16\x03\x01")

    def test_local_header_keeps_the_connection_peer(self) -> None:
        """A v2 LOCAL header (HAProxy's health check) names no client: the connection's peer stands."""
        reader, _ = self.connect()
        reader.dataReceived(V2_LOCAL)
        ((addr, door),) = self.doors.built
        self.assertEqual(addr, HAPROXY)
        self.assertEqual(door.peer, HAPROXY)

    def test_no_header_is_refused(self) -> None:
        """A client speaking the door's own protocol at once is closed, no door built, one log line."""
        for first in (b"GET /?token=x HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"PROXX"):
            reader, transport = self.connect()
            reader.dataReceived(first)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(transport.value(), b"")
        self.assertEqual(self.doors.built, [])
        self.assertEqual(self.refusals(), ["10.0.0.10: no PROXY protocol header"] * 3)

    def test_malformed_headers_are_refused(self) -> None:
        """A v1 line that is too long or wrong, or a v2 header of another version, is refused."""
        for bad in (
            b"PROXY " + b"x" * 120,
            b"PROXY TCP4 not-an-address\r\n",
            V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,
        ):
            reader, transport = self.connect()
            reader.dataReceived(bad)
            self.assertTrue(transport.disconnecting, bad)
        self.assertEqual(self.doors.built, [])
        self.assertEqual(len(self.refusals()), 3)

    def test_silence_is_refused_after_the_timeout(self) -> None:
        """A connection that sends nothing (or half a header) is closed after HEADER_TIMEOUT."""
        for sent in (b"", v2_header()[:20]):
            reader, transport = self.connect()
            reader.dataReceived(sent)
            self.clock.advance(HEADER_TIMEOUT - 0.1)
            self.assertFalse(transport.disconnecting)
            self.clock.advance(0.1)
            self.assertTrue(transport.disconnecting)
        self.assertEqual(self.doors.built, [])
        self.assertEqual(
            self.refusals(), [f"10.0.0.10: no PROXY protocol header within {HEADER_TIMEOUT:g}s"] * 2
        )

    def test_header_in_time_cancels_the_timeout(self) -> None:
        """A whole header stops the header clock: the door's own timeouts take over."""
        reader, transport = self.connect()
        reader.dataReceived(v2_header())
        self.clock.advance(HEADER_TIMEOUT * 2)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_only_trusted_senders(self) -> None:
        """With trusted_proxies set, a header from any other address is refused before it is read."""
        factory = ProxyHeaderFactory(
            "serial-tcp", self.doors, self.clock, trusted=networks("10.0.0.0/24")
        )
        reader, transport = self.connect(factory)
        reader.dataReceived(v2_header())
        self.assertEqual(len(self.doors.built), 1)
        stranger = IPv4Address("TCP", "192.0.2.1", 40000)
        reader, transport = self.connect(factory, peer=stranger)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.doors.built), 1)
        self.assertEqual(self.refusals(), ["192.0.2.1: not from [consoled] trusted_proxies"])

    def test_connection_lost_reaches_the_door(self) -> None:
        """The end of the connection reaches the door behind the header."""
        reader, _ = self.connect()
        reader.dataReceived(v2_header())
        ((_, door),) = self.doors.built
        reader.connectionLost(None)
        self.assertTrue(door.lost)

    def test_peer_limit_counts_the_client_not_haproxy(self) -> None:
        """PeerLimit behind the header counts each client, not the one address HAProxy connects from.

        With a limit of one, two clients through the same HAProxy are both
        served; a second connection of one client is refused on the door's wire.
        """
        limit = PeerLimit("serial-tcp", self.doors, 1, line_answer)
        factory = ProxyHeaderFactory("serial-tcp", limit, self.clock)
        first, _ = self.connect(factory)
        first.dataReceived(v2_header(client=("203.0.113.7", 1)))
        second, _ = self.connect(factory)
        second.dataReceived(v2_header(client=("203.0.113.8", 1)))
        self.assertEqual([a.host for a, _ in self.doors.built], ["203.0.113.7", "203.0.113.8"])
        again, transport = self.connect(factory)
        again.dataReceived(v2_header(client=("203.0.113.7", 2)))
        self.assertEqual(len(self.doors.built), 2)
        self.assertTrue(transport.value().startswith(b"console unavailable: too many connections"))
        self.assertEqual(limit.open, {"203.0.113.7": 1, "203.0.113.8": 1})
        first.connectionLost(None)
        self.assertEqual(limit.open, {"203.0.113.8": 1})


class OptionTests(SynchronousTestCase):
    def read(self, value: str) -> Any:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"[consoled]\nproxy_protocol = {value}\n")
        return load_settings([path]).consoled.proxy_protocol

    def test_door_names(self) -> None:
        """proxy_protocol is a list of door names; an unknown name stops start-up naming the option."""
        self.assertEqual(self.read("novnc, serial-tcp"), ("novnc", "serial-tcp"))
        self.assertEqual(self.read(""), ())
        error = self.assertRaises(ConfigError, self.read, "novnc, vnc")
        self.assertIn("proxy_protocol", str(error))


class DocumentedConfigurationTests(SynchronousTestCase):
    def test_deployment_shows_the_haproxy_configuration_the_test_runs(self) -> None:
        """docs/deployment.md holds etc/haproxy-consoled.cfg as it is (tests/test_haproxy.py runs it)."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "etc", "haproxy-consoled.cfg")) as f:
            config = f.read()
        with open(os.path.join(root, "docs", "deployment.md")) as f:
            self.assertIn(f"```\n{config}```\n", f.read())
