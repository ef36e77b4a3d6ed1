"""The websocket door, end to end: real sockets, QEMU's servers as the hypervisor."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.harness import Consoled, test_settings
from tests.peers import (
    spice_link_message,
    spice_link_reply_complete,
    start_qemu_monitor,
    start_qemu_spice,
    start_qemu_vnc,
)
from tests.rfb import rfb_handshake
from tests.wsclient import http_request, upgrade_request, ws_connect


class ConsoleTests(TestCase):
    """Each console type through its door to QEMU's own server."""

    timeout = 30

    def setUp(self) -> None:
        self.consoled = Consoled(self, test_settings())

    @defer.inlineCallbacks
    def test_novnc_rfb_to_qemu(self) -> Any:
        """A noVNC token opens QEMU's VNC: RFB 3.8 handshake and a FramebufferUpdate."""
        vnc = yield start_qemu_vnc(self)
        issued = yield self.consoled.authorize("novnc", vnc.host, vnc.port)
        client = yield ws_connect(self.consoled.port("novnc"), issued.token)
        self.assertEqual(client.websocket_protocol_in_use, "binary")
        width, height = yield defer.Deferred.fromCoroutine(rfb_handshake(client))
        self.assertGreater(width * height, 0)
        client.sendClose(1000)
        yield client.closed
        yield self.consoled.wait_sessions_ended()
        (row,) = self.consoled.session_rows()
        self.assertEqual(row["end_reason"], "client closed the connection: close code 1000")
        self.assertGreater(row["bytes_to_client"], 12)
        self.assertGreater(row["bytes_to_server"], 12)
        self.assertEqual(row["door"], "websocket/novnc")
        self.assertIsNotNone(row["ended_at"])

    @defer.inlineCallbacks
    def test_spice_link(self) -> Any:
        """A spice-html5 token opens QEMU's SPICE server: a REDQ link reply comes back."""
        spice = yield start_qemu_spice(self)
        issued = yield self.consoled.authorize("spice-html5", spice.host, spice.port)
        client = yield ws_connect(self.consoled.port("spice"), issued.token)
        client.send(spice_link_message())
        reply = yield client._wait(
            lambda b: len(b) if spice_link_reply_complete(bytes(b)) else None, 10
        )
        self.assertEqual(reply[:4], b"REDQ")
        self.assertEqual(struct.unpack("<I", reply[4:8])[0], 2)
        client.sendClose(1000)
        yield client.closed

    @defer.inlineCallbacks
    def test_serial_both_ways(self) -> Any:
        """A serial token reaches a QEMU chardev: its banner arrives, a command is answered."""
        monitor = yield start_qemu_monitor(self)
        issued = yield self.consoled.authorize("serial", monitor.host, monitor.port)
        client = yield ws_connect(self.consoled.port("serial"), issued.token)
        yield client.read_until(b"(qemu) ")
        client.send(b"info status\r")
        answer = yield client.read_until(b"VM status: running")
        self.assertIn(b"VM status", answer)
        client.sendClose(1000)
        yield client.closed

    @defer.inlineCallbacks
    def test_no_subprotocol(self) -> Any:
        """A client that offers no subprotocol is served too."""
        vnc = yield start_qemu_vnc(self)
        issued = yield self.consoled.authorize("novnc", vnc.host, vnc.port)
        client = yield ws_connect(self.consoled.port("novnc"), issued.token, protocols=())
        self.assertIsNone(client.websocket_protocol_in_use)
        self.assertEqual((yield client.read(12)), b"RFB 003.008\n")
        client.sendClose(1000)
        yield client.closed


class TLSTests(TestCase):
    """TLS terminated in the door: wss and plain ws share the port unless ssl_only."""

    timeout = 30

    def start(self, ssl_only: bool) -> Consoled:
        import dataclasses

        from tests.test_tls import SERVER_A, write_pair

        cert, key = write_pair(self, SERVER_A)
        settings = test_settings()
        settings = dataclasses.replace(
            settings,
            default=dataclasses.replace(settings.default, cert=cert, key=key, ssl_only=ssl_only),
        )
        return Consoled(self, settings)

    @defer.inlineCallbacks
    def test_wss_and_ws_on_one_port(self) -> Any:
        """Without ssl_only a wss client and a plain ws client both reach QEMU's VNC."""
        from tests.test_tls import trusting_ca

        consoled = self.start(ssl_only=False)
        vnc = yield start_qemu_vnc(self)
        for tls in (trusting_ca(), None):
            issued = yield consoled.authorize("novnc", vnc.host, vnc.port)
            client = yield ws_connect(consoled.port("novnc"), issued.token, tls=tls)
            self.assertEqual((yield client.read(12)), b"RFB 003.008\n")
            client.sendClose(1000)
            yield client.closed

    @defer.inlineCallbacks
    def test_ssl_only_refuses_plain(self) -> Any:
        """With ssl_only a plain client never gets a websocket."""
        from tests.test_tls import trusting_ca

        consoled = self.start(ssl_only=True)
        vnc = yield start_qemu_vnc(self)
        issued = yield consoled.authorize("novnc", vnc.host, vnc.port)
        yield self.assertFailure(ws_connect(consoled.port("novnc"), issued.token), ConnectionError)
        client = yield ws_connect(consoled.port("novnc"), issued.token, tls=trusting_ca())
        self.assertEqual((yield client.read(12)), b"RFB 003.008\n")
        client.sendClose(1000)
        yield client.closed


class RefusalTests(TestCase):
    """Everything is decided before the 101 answer: status line, plain text, one log line."""

    timeout = 20

    def setUp(self) -> None:
        self.consoled = Consoled(self, test_settings())
        self.port = self.consoled.port("novnc")

    @defer.inlineCallbacks
    def status_of(self, target: str, **kwargs: Any) -> Any:
        status, headers, body = yield http_request(self.port, upgrade_request(target, **kwargs))
        return status, body

    @defer.inlineCallbacks
    def test_missing_unknown_expired(self) -> Any:
        """No token, an unknown token and an expired one are all 401, with an empty body."""
        issued = yield self.consoled.authorize("novnc", "127.0.0.1", 1, ttl=-1)
        for target in ("/", "/?token=0b1c", f"/?token={issued.token}"):
            status, headers, body = yield http_request(self.port, upgrade_request(target))
            self.assertEqual(status, 401, target)
            self.assertEqual((headers[b"content-length"], body), (b"0", b""))

    @defer.inlineCallbacks
    def test_one_line_per_refusal(self) -> Any:
        """A refused upgrade, the gate's or Autobahn's, is one info line: no warning beside it."""
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import LogLevel, globalLogPublisher

        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        yield http_request(self.port, upgrade_request("/?token=0b1c"))
        yield http_request(self.port, upgrade_request("/?token=0b1c", key=False))
        refused = [e for e in events if "refused" in e.get("log_format", "")]
        self.assertEqual(len(refused), 2, refused)
        loud = [e for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(loud, [])

    @defer.inlineCallbacks
    def test_explained_refusal(self) -> Any:
        """Asked with ``explain``, a refusal is the upgrade and then its close code and reason."""
        issued = yield self.consoled.authorize("spice-html5", "127.0.0.1", 1)
        for token, code, reason in (
            ("0b1c", 4401, "invalid or expired token"),
            (issued.token, 4403, "token is for another console type"),
        ):
            client = yield ws_connect(self.port, token, explain=True)
            closed_code, closed_reason = yield client.closed
            self.assertEqual(closed_code, code)
            self.assertIn(reason, closed_reason)

    @defer.inlineCallbacks
    def test_wrong_console_type(self) -> Any:
        """A spice token at the noVNC door is 403."""
        issued = yield self.consoled.authorize("spice-html5", "127.0.0.1", 1)
        status, body = yield self.status_of(f"/?token={issued.token}")
        self.assertEqual((status, body), (403, b""))

    @defer.inlineCallbacks
    def test_origin(self) -> Any:
        """Origin must match Host (or allowed_origins) and the base URL's scheme family."""
        issued = yield self.consoled.authorize("novnc", "127.0.0.1", 1)
        target = f"/?token={issued.token}"
        status, _ = yield self.status_of(target, extra="Origin: http://evil.example\r\n")
        self.assertEqual(status, 403)
        status, _ = yield self.status_of(target, extra="Origin: https://127.0.0.1\r\n")
        self.assertEqual(status, 403)
        # From an untrusted peer X-Forwarded-Proto is ignored: http stays http, so it passes
        # the origin check and fails later only because port 1 is closed (after the 101).
        status, _ = yield self.status_of(
            target, extra="Origin: http://127.0.0.1\r\nX-Forwarded-Proto: https\r\n"
        )
        self.assertEqual(status, 101)

    @defer.inlineCallbacks
    def test_cookie_token_and_malformed_cookie(self) -> Any:
        """The token may come in a cookie; a malformed cookie part is skipped."""
        issued = yield self.consoled.authorize("novnc", "127.0.0.1", 1)
        status, _ = yield self.status_of(
            "/websockify", extra=f"Cookie: junk; =x; token={issued.token}\r\n"
        )
        self.assertEqual(status, 101)

    @defer.inlineCallbacks
    def test_invalid_handshake_is_400(self) -> Any:
        """An upgrade request without Sec-WebSocket-Key is 400, and the token is not logged."""
        issued = yield self.consoled.authorize("novnc", "127.0.0.1", 1)
        status, _ = yield self.status_of(f"/?token={issued.token}", key=False)
        self.assertEqual(status, 400)


class StaticTests(TestCase):
    """The web directory: GET/HEAD files, no listings, no // redirect."""

    timeout = 20

    def setUp(self) -> None:
        self.consoled = Consoled(self, test_settings())
        self.port = self.consoled.port("serial")

    @defer.inlineCallbacks
    def get(self, line: str) -> Any:
        return (yield http_request(self.port, f"{line}\r\nHost: x\r\n\r\n".encode()))

    @defer.inlineCallbacks
    def test_rules(self) -> Any:
        """serial.html is served; POST is 405; a directory is 404; // is 400."""
        status, headers, body = yield self.get("GET /serial.html HTTP/1.1")
        self.assertEqual(status, 200)
        self.assertIn(b"xterm", body)
        status, headers, _ = yield self.get("POST /serial.html HTTP/1.1")
        self.assertEqual((status, headers.get(b"allow")), (405, b"GET, HEAD"))
        status, _, _ = yield self.get("GET / HTTP/1.1")
        self.assertEqual(status, 404)
        status, _, _ = yield self.get("GET //evil.example/%2e%2e HTTP/1.1")
        self.assertEqual(status, 400)
