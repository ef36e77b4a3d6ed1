"""Hypothesis against the raw serial door with a real store: nothing is left behind.

Long lines, binary garbage, IAC storms, dripped bytes, silence at the prompt,
a valid token among them: whatever happens, once the user has gone there is
no open session row and no serial lease.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from consoled.doors.serial_tcp import SerialTCPFactory
from tests.inline import InlineCore

TOKEN = b"<TOKEN>"


def inputs() -> st.SearchStrategy[bytes]:
    pieces = st.one_of(
        st.just(TOKEN + b"\r\n"),
        st.just(TOKEN + b"\r\x00"),
        st.binary(max_size=40),
        st.sampled_from([b"\xff", b"\xff\xfd\x01", b"\xff\xf3", b"\xff\xff", b"\xff\xfa\x18"]),
        st.integers(250, 400).map(lambda n: b"a" * n + b"\r\n"),
        st.sampled_from([b"\r\n", b"\x7f", b"\x1d.", b"\x1d", b"\x03"]),
    )
    return st.lists(pieces, max_size=12).map(b"".join)


class SerialDoorPropertyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.core = InlineCore(self, "serial", 10000, "ws://x/")
        self.reactor, self.sessions, self.token = (
            self.core.reactor,
            self.core.sessions,
            self.core.token,
        )
        self.factory = SerialTCPFactory(self.core.gate, self.reactor, 60, "fuzz")

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(inputs(), st.lists(st.integers(1, 16), max_size=60), st.booleans())
    def test_nothing_left_behind(self, data: bytes, sizes: list[int], wait: bool) -> None:
        """Any input, in any chunks, with or without timeouts: no open row or lease after."""
        data = data.replace(TOKEN, self.token)
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 40000))
        protocol.makeConnection(transport)
        at = 0
        for size in sizes + [len(data)]:
            if at >= len(data) or transport.disconnecting:
                break
            protocol.dataReceived(data[at : at + size])
            at += size
        if wait:
            self.reactor.advance(61)  # the prompt deadline and the connect timeout
        output = transport.value()
        self.assertTrue(output.startswith(b"\xff\xfb\x01\xff\xfb\x03consoled serial console"))
        if transport.disconnecting:
            last = output.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
            self.assertTrue(last.strip(), output[-120:])  # a clear last line before the close
        protocol.connectionLost(Failure(ConnectionError("user left")))
        self.assertEqual(self.core.left_behind(), (0, 0))
        self.assertEqual(self.sessions.live, set())
        self.assertEqual(self.flushLoggedErrors(), [])
