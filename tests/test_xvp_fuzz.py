"""Hypothesis against the XVP door: random, mutated and dripped requests.

Every case must end in one of the door's answers or a clean close; nothing
raises, nothing is logged as an unexpected failure, and no session row is
left open once the viewer has gone.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from consoled.doors.xvp import XVPFactory
from tests.inline import InlineCore

STATUSES = {200, 400, 401, 403, 405, 408, 431, 502, 503, 504}
TOKEN = "TOKEN"  # replaced by a real, valid token in each example


def requests() -> st.SearchStrategy[bytes]:
    """Request heads: well formed, mutated, or garbage, with optional early bytes."""
    method = st.sampled_from(["CONNECT", "GET", "connect", "", "CONNECT CONNECT", "POST"])
    target = st.one_of(
        st.just(f"/console?token={TOKEN}"),
        st.sampled_from(["/console", "/console?token=", "10.0.0.1:5900", "/?token=bad", "*"]),
        st.text(max_size=40).map(lambda t: "/console?token=" + t),
    )
    version = st.sampled_from(["HTTP/1.0", "HTTP/1.1", "HTTP/2", "", "http/1.0"])
    header = st.one_of(
        st.sampled_from(["Host: x", "X-A: b", "no colon", " Leading: space", ":empty"]),
        st.text(max_size=30),
    )
    head = st.builds(
        lambda m, t, v, hs, end: (
            (f"{m} {t} {v}\r\n" + "".join(h + "\r\n" for h in hs)).encode("utf-8", "surrogatepass")
            + end
        ),
        method,
        target,
        version,
        st.lists(header, max_size=4),
        st.sampled_from([b"\r\n", b"", b"\n", b"\r\n" + b"RFB 003.008\n"]),
    )
    return st.one_of(
        head,
        st.binary(max_size=300),
        st.builds(
            lambda h, big: h + b"X-Big: " + b"a" * big + b"\r\n\r\n", head, st.integers(7000, 9500)
        ),
        st.builds(lambda a, b: a + b, head, st.binary(max_size=50)),
    )


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, at = [], 0
    for size in sizes:
        if at >= len(data):
            break
        chunks.append(data[at : at + size])
        at += size
    if at < len(data):
        chunks.append(data[at:])
    return chunks


class XVPPropertyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.core = InlineCore(self, "xvpvnc", 5900, "http://x/console")
        self.reactor, self.sessions, self.token = (
            self.core.reactor,
            self.core.sessions,
            self.core.token,
        )
        self.factory = XVPFactory(self.core.gate, self.reactor, 15)

    def open_rows(self) -> int:
        return self.core.left_behind()[0]

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(requests(), st.lists(st.integers(1, 64), max_size=40), st.booleans())
    def test_any_request_ends_cleanly(self, request: bytes, sizes: list[int], wait: bool) -> None:
        """Random, mutated and dripped requests end in an answer or a clean close."""
        request = request.replace(TOKEN.encode(), self.token)
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 40000))
        protocol.makeConnection(transport)
        for chunk in chunked(request, sizes):
            if transport.disconnecting:
                break
            protocol.dataReceived(chunk)
        if wait:
            self.reactor.advance(20)  # request and connect timeouts
        output = transport.value()
        if output:
            self.assertTrue(output.startswith(b"HTTP/1.1 "), output[:80])
            status = int(output[9:12])
            self.assertIn(status, STATUSES, output[:80])
            if status != 200:
                self.assertTrue(transport.disconnecting, output[:80])
                self.assertTrue(output.endswith(b"\n"))
        # The viewer goes away, whatever state the door was in.
        protocol.connectionLost(Failure(ConnectionError("viewer left")))
        self.assertEqual(self.sessions.live, set())
        self.assertEqual(self.open_rows(), 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_valid_request_dripped_byte_by_byte(self) -> None:
        """The Java viewer's request one byte at a time reaches the hypervisor connect."""
        request = b"CONNECT /console?token=" + self.token + b" HTTP/1.0\r\n\r\n"
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        for byte in request:
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("127.0.0.1", 5900))
        self.reactor.advance(6)  # connect timeout: 504 before any 200
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 504 "), transport.value())
        protocol.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(self.open_rows(), 0)
