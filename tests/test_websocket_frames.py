"""The websocket door's own frame reader, against Autobahn's as the reference.

``ConsoleServerProtocol`` relays whole unfragmented binary frames itself and
hands everything else to Autobahn.  These tests drive the real protocol and
factory over a ``StringTransport`` (handshake included) and check that every
mix of frames and every way of cutting the byte stream gives the relay the
same messages, in order, and the user the same pongs and close codes.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from consoled.doors.frames import MAX_MESSAGE
from consoled.doors.frames import unmask as _unmask
from consoled.doors.websocket import ConsoleServerFactory, Door
from tests.test_policy import INFO as POLICY_INFO

INFO = POLICY_INFO  # a novnc token's row

UPGRADE = (
    b"GET /?token=t HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
)


class _Relay:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.lost: list[str] = []

    def from_client(self, data: bytes) -> None:
        self.messages.append(data)

    def client_lost(self, detail: str = "") -> None:
        self.lost.append(detail)


class _Gate:
    """Admits every token to INFO; its one pass starts the one relay."""

    def __init__(self) -> None:
        self.relay = _Relay()

    def client_address(self, facts: Any) -> str:
        return str(facts.peer)

    def admit(self, door: str, token: str | None, facts: Any) -> defer.Deferred[Any]:
        return defer.succeed(self)

    def start(self, client: Any) -> _Relay:
        return self.relay


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """A client frame, masked as the RFC requires unless ``mask`` is ``b""``."""
    mask = os.urandom(4) if mask is None else mask
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if mask else 0
    size = len(payload)
    if size < 126:
        head = bytes((first, bit | size))
    elif size < 65536:
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, bit | 127, size)
    return head + mask + (_unmask(payload, mask) if mask else payload)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of every frame consoled wrote after its 101 answer."""
    data = data.split(b"\r\n\r\n", 1)[1]
    frames = []
    while data:
        opcode, size = data[0] & 0x0F, data[1] & 0x7F
        at = 2
        if size == 126:
            size, at = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            size, at = struct.unpack("!Q", data[2:10])[0], 10
        frames.append((opcode, data[at : at + size]))
        data = data[at + size :]
    return frames


def open_session() -> tuple[Any, StringTransport, _Relay]:
    gate = _Gate()
    door = Door("novnc", gate)  # type: ignore[arg-type]
    factory = ConsoleServerFactory(door, ping_interval=0)
    factory.setProtocolOptions(closeHandshakeTimeout=0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(UPGRADE)
    assert transport.value().startswith(b"HTTP/1.1 101"), transport.value()
    transport.registerProducer(object(), True)  # the relay's, in a real session
    return protocol, transport, gate.relay


def feed(protocol: Any, stream: bytes, cuts: list[int]) -> None:
    """Hand ``stream`` to the protocol in pieces, cut at the given offsets."""
    at = 0
    for cut in sorted({c for c in cuts if 0 < c < len(stream)}) + [len(stream)]:
        protocol.dataReceived(stream[at:cut])
        at = cut


class FastPathTests(SynchronousTestCase):
    def test_unmask(self) -> None:
        """Both unmasking paths undo the client's XOR, whatever the length."""
        mask = b"\x01\x82\xff\x37"
        for size in (0, 1, 3, 4, 5, 1023, 1024, 1025, 70000):
            payload = os.urandom(size)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            self.assertEqual(_unmask(masked, mask), payload)

    def test_frames_in_one_read(self) -> None:
        """Several frames of every length encoding in one read arrive as they were sent."""
        protocol, transport, relay = open_session()
        payloads = [b"k", b"", os.urandom(125), os.urandom(126), os.urandom(70000)]
        protocol.dataReceived(b"".join(frame(2, p) for p in payloads))
        self.assertEqual(relay.messages, payloads)

    def test_ping_between_frames(self) -> None:
        """A ping in the middle is answered by Autobahn and the frames around it still arrive."""
        protocol, transport, relay = open_session()
        protocol.dataReceived(frame(2, b"a") + frame(9, b"hello") + frame(2, b"b"))
        self.assertEqual(relay.messages, [b"a", b"b"])
        self.assertEqual(server_frames(transport.value()), [(10, b"hello")])

    def test_split_and_fragmented(self) -> None:
        """A frame cut across reads and a fragmented message each arrive whole."""
        protocol, transport, relay = open_session()
        stream = frame(2, b"x" * 300) + frame(2, b"frag", fin=False) + frame(0, b"ment")
        stream += frame(2, b"after")
        feed(protocol, stream, [150])
        self.assertEqual(relay.messages, [b"x" * 300, b"fragment", b"after"])

    def test_protocol_errors(self) -> None:
        """Unmasked, reserved-bit, over-long and oversized frames close with 1002 or 1009.

        What came before the bad frame is relayed; nothing after it is.
        """
        cases = [
            (frame(2, b"plain", mask=b""), 1002),
            (bytes([0x82 | 0x40, 0x81]) + b"\0\0\0\0x", 1002),
            (bytes([0x82, 0xFF]) + struct.pack("!Q", MAX_MESSAGE + 1) + b"mask", 1009),
            (bytes([0x82, 0xFE]) + struct.pack("!H", 5) + b"\0\0\0\0hello", 1002),
        ]
        for bad, code in cases:
            protocol, transport, relay = open_session()
            protocol.dataReceived(frame(2, b"first") + bad + frame(2, b"never"))
            self.assertEqual(relay.messages, [b"first"])
            closes = [p for op, p in server_frames(transport.value()) if op == 8]
            self.assertEqual(struct.unpack("!H", closes[0][:2])[0], code, closes)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("binary"), st.binary(max_size=2000)),
                st.tuples(st.just("text"), st.text(max_size=50)),
                st.tuples(st.just("ping"), st.binary(max_size=125)),
                st.tuples(st.just("fragments"), st.lists(st.binary(max_size=300), min_size=2)),
            ),
            max_size=12,
        ),
        st.lists(st.integers(min_value=0, max_value=40000), max_size=8),
    )
    def test_any_mix_any_cut(self, items: list[tuple[str, Any]], cuts: list[int]) -> None:
        """Whatever the mix and however the stream is cut: same messages, same pongs."""
        protocol, transport, relay = open_session()
        stream, messages, pongs = b"", [], []
        for kind, value in items:
            if kind == "binary":
                stream += frame(2, value)
                messages.append(value)
            elif kind == "text":
                stream += frame(1, value.encode("utf-8"))
                messages.append(value.encode("utf-8"))
            elif kind == "ping":
                stream += frame(9, value)
                pongs.append(value)
            else:
                stream += frame(2, value[0], fin=False)
                stream += b"".join(frame(0, part, fin=False) for part in value[1:-1])
                stream += frame(0, value[-1])
                messages.append(b"".join(value))
        feed(protocol, stream, cuts)
        self.assertEqual(relay.messages, messages)
        self.assertEqual(server_frames(transport.value()), [(10, p) for p in pongs])
        self.assertEqual(relay.lost, [])


class AutobahnUntouchedTests(SynchronousTestCase):
    def test_pformat_not_patched(self) -> None:
        """The door leaves Autobahn's module alone (its pformat was once patched process-wide)
        and still spares the per-connection option dump: its protocols copy the options."""
        import pprint

        from autobahn.websocket import protocol as autobahn_protocol

        self.assertIs(autobahn_protocol.pformat, pprint.pformat)
        protocol, _, _ = open_session()
        self.assertEqual(protocol.CONFIG_ATTRS, ())
        self.assertEqual(protocol.maxMessagePayloadSize, MAX_MESSAGE)
