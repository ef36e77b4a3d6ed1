"""The XVP door with real peers: QEMU's VNC behind it, the Java viewer's bytes, vncdotool."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import defer, reactor, utils
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests import hypervisors
from tests.harness import Consoled, test_settings
from tests.peers import require_executable, start_qemu_vnc
from tests.rfb import rfb_handshake
from tests.xvpclient import XVPClient, java_request, xvp_connect


class JavaViewerTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.consoled = Consoled(self, test_settings())
        self.port = self.consoled.port("xvp")

    @defer.inlineCallbacks
    def test_java_viewer_reaches_qemu(self) -> Any:
        """The Java viewer's exact request, then an RFB 3.8 handshake and a FramebufferUpdate."""
        vnc = yield start_qemu_vnc(self)
        issued = yield self.consoled.authorize("xvpvnc", vnc.host, vnc.port)
        client = yield xvp_connect(self.port, issued.token)
        self.assertEqual(client.status, 200)
        width, height = yield defer.Deferred.fromCoroutine(rfb_handshake(client))
        self.assertGreater(width * height, 0)
        client.close()
        yield client.closed

    @defer.inlineCallbacks
    def test_answer_is_exactly_200_ok(self) -> Any:
        """The answer is exactly `HTTP/1.1 200 OK\\r\\n\\r\\n`, then the console's bytes."""
        vnc = yield start_qemu_vnc(self)
        issued = yield self.consoled.authorize("xvpvnc", vnc.host, vnc.port)
        raw = yield _raw_exchange(self.port, java_request(issued.token), 19 + 12)
        self.assertEqual(raw, b"HTTP/1.1 200 OK\r\n\r\nRFB 003.008\n")

    @defer.inlineCallbacks
    def test_bytes_sent_early_are_kept_in_order(self) -> Any:
        """Bytes after the blank line, sent before the answer, reach the console first."""
        echo = hypervisors.serve(self, hypervisors.Echo)
        issued = yield self.consoled.authorize("xvpvnc", "127.0.0.1", echo.port)
        request = (
            f"CONNECT /console?token={issued.token} HTTP/1.1\r\nHost: x\r\n\r\nearly-bytes"
        ).encode()
        client = yield xvp_connect(self.port, issued.token, request)
        client.send(b"+late")
        self.assertEqual((yield client.read(16)), b"early-bytes+late")
        client.close()
        yield client.closed

    @defer.inlineCallbacks
    def test_vncdotool_screenshot(self) -> Any:
        """vncdotool, a real RFB client, captures QEMU's screen through the XVP door."""
        beside = os.path.join(os.path.dirname(sys.executable), "vncdo")
        vncdo = (
            beside
            if os.path.exists(beside)
            else require_executable(self, "vncdo", "pip install vncdotool")
        )
        vnc = yield start_qemu_vnc(self)
        issued = yield self.consoled.authorize("xvpvnc", vnc.host, vnc.port)
        # vncdotool speaks RFB but not CONNECT: a one-connection shim does the
        # Java viewer's exchange and then splices, as the viewer's socket does.
        shim = reactor.listenTCP(
            0,
            Factory.forProtocol(lambda: _ConnectShim(self.port, issued.token)),
            interface="127.0.0.1",
        )
        self.addCleanup(shim.stopListening)
        picture = os.path.abspath(self.mktemp()) + ".png"
        out, err, code = yield utils.getProcessOutputAndValue(
            vncdo,
            ["-s", f"127.0.0.1::{shim.getHost().port}", "--nocursor", "capture", picture],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        from PIL import Image

        with Image.open(picture) as image:
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        self.assertGreater(len(colours or []), 1, "the captured screen is one flat colour")
        yield self.consoled.wait_sessions_ended()
        (row,) = self.consoled.session_rows()
        self.assertEqual(row["door"], "xvp")


class _ConnectShim(Protocol):
    """Accepts vncdotool, does the XVP exchange, then relays both ways."""

    def __init__(self, xvp_port: int, token: str) -> None:
        self._xvp_port, self._token = xvp_port, token
        self._peer: XVPClient | None = None
        self._early: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        peer = XVPClient(java_request(self._token))
        peer._received = self.transport.write  # console bytes go straight to vncdotool
        self._peer = peer
        connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self._xvp_port), peer)
        peer.answered.addCallback(lambda _: self.transport.resumeProducing())
        peer.closed.addBoth(lambda _: self.transport.loseConnection())

    def dataReceived(self, data: bytes) -> None:
        assert self._peer is not None
        self._peer.send(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._peer is not None and self._peer.transport is not None:
            self._peer.close()


class _Raw(Protocol):
    def __init__(self, request: bytes, size: int) -> None:
        self.request, self.size, self.data = request, size, b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.size and not self.done.called:
            self.done.callback(self.data)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(self.data)


@defer.inlineCallbacks
def _raw_exchange(port: int, request: bytes, size: int) -> Any:
    raw = _Raw(request, size)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), raw)
    data = yield raw.done
    return data


class RefusalTests(TestCase):
    """Every refusal is a status line and a short plain-text body, then close."""

    timeout = 30

    def setUp(self) -> None:
        self.consoled = Consoled(self, test_settings(xvp_request_timeout=0.3))
        self.port = self.consoled.port("xvp")

    @defer.inlineCallbacks
    def answer(self, request: bytes) -> Any:
        client = XVPClient(request)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        status, body = yield client.closed
        return status, body

    @defer.inlineCallbacks
    def test_status_codes(self) -> Any:
        """400, 405, 401, 403 and 431 each for its own bad request."""
        expired = yield self.consoled.authorize("xvpvnc", "127.0.0.1", 1, ttl=-1)
        spice = yield self.consoled.authorize("spice-html5", "127.0.0.1", 1)
        cases = [
            (b"CONNECT\r\n\r\n", 400),
            (b"CONNECT /console HTTP/1.0\r\n\r\n", 401),
            (b"CONNECT 10.0.0.1:5900 HTTP/1.1\r\nHost: 10.0.0.1:5900\r\n\r\n", 401),
            (b"CONNECT /console?token=x HTTP/2.0\r\n\r\n", 400),
            (b"CONNECT /console?token=x HTTP/1.0\r\nno colon here\r\n\r\n", 400),
            (b"GET /console?token=x HTTP/1.1\r\n\r\n", 405),
            (b"CONNECT /console?token=nope HTTP/1.0\r\n\r\n", 401),
            (java_request(expired.token), 401),
            (java_request(spice.token), 403),
            (b"CONNECT /console?token=x HTTP/1.0\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
            (b"CONNECT /console?token=x HTTP/1.0\r\nX: " + b"a" * 9000, 431),
        ]
        for request, expected in cases:
            status, body = yield self.answer(request)
            self.assertEqual(status, expected, (request[:60], body))
            self.assertTrue(body.endswith(b"\n") and 1 < len(body) < 200, body)

    @defer.inlineCallbacks
    def test_request_timeout(self) -> Any:
        """A request not complete within xvp_request_timeout is answered 408."""
        status, _ = yield self.answer(b"CONNECT /console?tok")
        self.assertEqual(status, 408)

    @defer.inlineCallbacks
    def test_store_unreachable(self) -> Any:
        """A token store that fails is 503, not a traceback."""
        with self.consoled.engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE console_auth_tokens")
        status, body = yield self.answer(java_request("0b1c2d3e-4f50-4617-8a9b-0c1d2e3f4a5b"))
        self.assertEqual(status, 503, body)
        self.flushLoggedErrors()
