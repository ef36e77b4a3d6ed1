"""No log line ever holds a token: every event of real sessions and refusals is scanned."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from consoled.doors import web, xvp
from tests import hypervisors
from tests.harness import Consoled, test_settings
from tests.wsclient import HOST, http_request, upgrade_request, ws_connect


class TokenNeverLoggedTests(TestCase):
    timeout = 30

    def capture(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def assertNotLogged(self, events: list[dict[str, Any]], *secrets: str) -> None:
        for event in events:
            text = (formatEvent(event) or "") + repr(event)
            for secret in secrets:
                self.assertNotIn(secret, text, f"token in a log event: {text[:300]}")

    @defer.inlineCallbacks
    def test_sessions_refusals_and_static_requests(self) -> Any:
        """A session, five kinds of refusal and a page request log the hash prefix only."""
        events = self.capture()
        consoled = Consoled(self, test_settings())
        port = consoled.port("novnc")
        echo = hypervisors.serve(self, hypervisors.Echo)
        live = yield consoled.authorize("novnc", "127.0.0.1", echo.port)
        expired = yield consoled.authorize("novnc", "127.0.0.1", echo.port, ttl=-5)
        spice = yield consoled.authorize("spice-html5", "127.0.0.1", echo.port)
        unknown = "5f1c7d52-64a9-4d0b-9a83-0c3d1b2e4f60"

        client = yield ws_connect(port, live.token)
        client.send(b"hello")
        yield client.read(5)
        client.sendClose(1000)
        yield client.closed
        for token in (expired.token, spice.token, unknown):
            status, _, _ = yield http_request(port, upgrade_request(f"/?token={token}"))
            self.assertIn(status, (401, 403))
        # Autobahn's own validation (no key) and a foreign Origin, token in the URL.
        yield http_request(port, upgrade_request(f"/websockify?token={live.token}", key=False))
        yield http_request(port, upgrade_request(f"http://[::1/?token={live.token}"))
        yield http_request(
            port, upgrade_request(f"/?token={live.token}", extra="Origin: http://evil.example\r\n")
        )
        # The noVNC page itself is fetched with the token in its query string.
        yield http_request(
            port,
            f"GET /vnc_lite.html?path=%3Ftoken%3D{live.token} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        )
        yield consoled.wait_sessions_ended()
        yield consoled.top.stopService()

        self.assertNotLogged(events, live.token, expired.token, spice.token, unknown)
        texts = [formatEvent(e) or "" for e in events]
        prefix = live.connect_info.hash_prefix
        self.assertTrue(any(f"token {prefix}" in t and "started" in t for t in texts), texts)
        self.assertTrue(any(f"token {prefix}" in t and "ended" in t for t in texts), texts)
        refused = [t for t in texts if t.startswith("refused novnc connection")]
        self.assertEqual(len(refused), 4, refused)


class StoreFailureTests(TestCase):
    def test_failed_statement_hides_parameters(self) -> None:
        """A failing look-up's error text, which gets logged, carries no token hash."""
        import sqlalchemy as sa

        from consoled.store.engine import make_engine
        from consoled.tokens import hash_token

        engine = make_engine("sqlite:///" + self.mktemp() + ".sqlite")
        self.addCleanup(engine.dispose)
        token = "5f1c7d52-64a9-4d0b-9a83-0c3d1b2e4f60"
        with engine.connect() as connection:
            error = self.assertRaises(
                sa.exc.OperationalError,
                connection.execute,
                sa.text("SELECT * FROM console_auth_tokens WHERE token_hash = :h"),
                {"h": hash_token(token)},
            )
        self.assertNotIn(hash_token(token), str(error))
        self.assertNotIn(hash_token(token)[:8], str(error))


class _Exchange(Protocol):
    """Writes a request in one write and keeps every byte until the door closes."""

    def __init__(self, request: bytes, after: bytes) -> None:
        self.request = request
        self.after = after
        self.received = b""
        self.lost: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self._write_when_due()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._write_when_due()

    def _write_when_due(self) -> None:
        if self.request and self.after in self.received:
            request, self.request = self.request, b""
            self.transport.write(request)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(self.received)


@defer.inlineCallbacks
def exchange(port: int, request: bytes, after: bytes = b"") -> Any:
    """Send ``request`` in one write (once ``after`` has arrived); fire with what the
    door sent, once the door has closed the connection.

    Every request here is one the door answers and closes, so the door's own
    connectionLost (and anything it logs there) has run when this fires.
    """
    client = _Exchange(request, after)
    yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, port, timeout=5), client)
    received = yield client.lost.addTimeout(10, reactor)
    return received


def pad(request: bytes, size: int) -> bytes:
    """``request`` with a header line added so that its head is exactly ``size`` bytes."""
    head = request[: request.index(b"\r\n\r\n") + 2]
    filler = size - len(head) - len(b"X-Pad: \r\n\r\n")
    return head + b"X-Pad: " + b"a" * filler + b"\r\n\r\n"


def get(target: str, headers: str = "", method: str = "GET") -> bytes:
    """A plain request the Site answers and then closes."""
    return f"{method} {target} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode()


class TokenInRequestTests(TestCase):
    """Each way a request can carry the token, sent to a real door, leaves it out of every event.

    Every event is rendered (formatEvent) and each of its field values turned
    into text, as any observer (a JSON log file, syslog) might; none may hold
    the token.  ``{T}`` in a request stands for a live token.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        pages = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(pages, "sub"))
        with open(os.path.join(pages, "vnc.html"), "w") as page:
            page.write("<html></html>\n")
        settings = test_settings()
        settings = dataclasses.replace(
            settings, default=dataclasses.replace(settings.default, web=pages)
        )
        self.consoled = Consoled(self, settings)
        # No request here gets as far as a hypervisor.
        novnc = yield self.consoled.authorize("novnc", "127.0.0.1", 9)
        serial = yield self.consoled.authorize("serial", "127.0.0.1", 9)
        self.token, self.serial_token = novnc.token, serial.token

    def leaks(self, secret: str, since: int = 0) -> list[str]:
        """What of each event from ``since`` on holds ``secret``: its text, or a field's."""
        found = []
        for event in self.events[since:]:
            texts = [formatEvent(event) or ""]
            for name, value in event.items():
                try:
                    texts.append(f"{name}={value}")
                except Exception:  # a value whose str() fails shows nothing
                    continue
            found += [f"[{event.get('log_namespace')}] {t[:300]}" for t in texts if secret in t]
        return found

    @defer.inlineCallbacks
    def check_forms(self, door: str, forms: list[tuple[str, bytes, int]]) -> Any:
        """Send each (name, request, expected status) to ``door``; fail naming each form
        that was not answered as expected or that left the token in a log event."""
        port = self.consoled.port(door)
        failures = []
        for name, request, expected in forms:
            since = len(self.events)
            answer = yield exchange(port, request.replace(b"{T}", self.token.encode()))
            if not answer.startswith(b"HTTP/1.1 %d " % expected):
                failures.append(f"{name}: expected {expected}, got {answer[:60]!r}")
            failures += [f"{name}: token logged: {leak}" for leak in self.leaks(self.token, since)]
        self.assertEqual(failures, [], "\n".join(failures))

    def test_head_requests(self) -> Any:
        """HEAD answered 404, 302 or 400 (twisted.web warns that it ate a body) keeps the
        token out of that warning and of the access log."""
        return self.check_forms(
            "novnc",
            [
                ("HEAD of a missing file", get("/missing?token={T}", method="HEAD"), 404),
                ("HEAD of a directory listing", get("/?token={T}", method="HEAD"), 404),
                ("HEAD of a directory without /", get("/sub?token={T}", method="HEAD"), 302),
                ("HEAD of //", get("//x?token={T}", method="HEAD"), 400),
                ("HEAD with a fragment", get("/missing#token={T}", method="HEAD"), 404),
                ("HEAD of a page", get("/vnc.html?token={T}", method="HEAD"), 200),
            ],
        )

    def test_request_targets(self) -> Any:
        """A token in a fragment, a ``;`` parameter, URL-encoded, bare in the path or in
        the method is not in the access log."""
        return self.check_forms(
            "novnc",
            [
                ("fragment", get("/vnc.html#token={T}"), 404),
                ("bare fragment", get("/vnc.html#{T}"), 404),
                ("query and fragment", get("/vnc.html?a=1#token={T}"), 200),
                ("; parameter", get("/vnc.html;token={T}"), 404),
                ("; parameter, then a query", get("/x;token={T}?a=1"), 404),
                ("URL-encoded", get("/x%3Ftoken%3D{T}"), 404),
                ("bare in the path", get("/{T}"), 404),
                ("as the method", get("/vnc.html", method="{T}"), 405),
            ],
        )

    def test_request_headers(self) -> Any:
        """A token in a Referer (fragment, ``;``, query), User-Agent, Cookie or Origin of a
        page request is not in the access log."""
        return self.check_forms(
            "novnc",
            [
                (
                    "Referer fragment",
                    get("/vnc.html", "Referer: http://p/v.html#token={T}\r\n"),
                    200,
                ),
                (
                    "Referer bare fragment",
                    get("/vnc.html", "Referer: http://p/v.html#{T}\r\n"),
                    200,
                ),
                (
                    "Referer ; parameter",
                    get("/vnc.html", "Referer: http://p/v.html;token={T}\r\n"),
                    200,
                ),
                ("Referer query", get("/vnc.html", "Referer: http://p/v.html?token={T}\r\n"), 200),
                ("Referer path", get("/vnc.html", "Referer: http://p/{T}/\r\n"), 200),
                ("User-Agent", get("/vnc.html", "User-Agent: x/1 token={T}\r\n"), 200),
                ("bare User-Agent", get("/vnc.html", "User-Agent: {T}\r\n"), 200),
                ("Cookie", get("/vnc.html", "Cookie: a=b; token={T}\r\n"), 200),
                ("Origin", get("/vnc.html", "Origin: http://{T}\r\n"), 200),
            ],
        )

    def test_upgrades_refused(self) -> Any:
        """Autobahn's own refusals and consoled's Origin refusal of an upgrade carrying the
        token (fragment, quoted headers, Origin) do not quote it."""
        return self.check_forms(
            "novnc",
            [
                ("fragment", upgrade_request("/?token={T}#{T}"), 400),
                ("bare fragment", upgrade_request("/#{T}"), 400),
                (
                    "Origin hostname",
                    upgrade_request("/?token={T}", extra="Origin: http://{T}\r\n"),
                    403,
                ),
                (
                    "Origin subdomain",
                    upgrade_request("/?token={T}", extra="Origin: http://{T}.evil.example\r\n"),
                    403,
                ),
                (
                    "Origin query",
                    upgrade_request(
                        "/?token={T}", extra="Origin: http://evil.example/?token={T}\r\n"
                    ),
                    403,
                ),
                ("Origin not a URL", upgrade_request("/?token={T}", extra="Origin: {T}\r\n"), 400),
                ("Host port", upgrade_request("/?token={T}", host="127.0.0.1:{T}"), 400),
                (
                    "Sec-WebSocket-Version",
                    upgrade_request("/").replace(b"Version: 13", b"Version: {T}"),
                    400,
                ),
                (
                    "cookie, no key",
                    upgrade_request("/", extra="Cookie: token={T}\r\n", key=False),
                    400,
                ),
                ("HEAD upgrade", get("/?token={T}", "Upgrade: websocket\r\n", method="HEAD"), 404),
                ("oversized head", pad(upgrade_request("/?token={T}"), web.MAX_HEAD + 1), 431),
            ],
        )

    @defer.inlineCallbacks
    def test_xvp_request_lines(self) -> Any:
        """The XVP door's refusals of a request carrying the token do not log it."""
        port = self.consoled.port("xvp")
        failures = []
        for name, request, expected in [
            ("HTTP/2", "CONNECT /console?token={T} HTTP/2.0\r\n\r\n", 400),
            ("four words", "CONNECT /console?token={T} HTTP/1.0 x\r\n\r\n", 400),
            ("GET", "GET /console?token={T} HTTP/1.0\r\n\r\n", 405),
            ("bad header", "CONNECT /console?token={T} HTTP/1.0\r\n{T}\r\n\r\n", 400),
            ("fragment", "CONNECT /console?token={T}x#token={T} HTTP/1.0\r\n\r\n", 401),
            ("no such token", "CONNECT /console?token={T}x HTTP/1.0\r\n\r\n", 401),
        ]:
            since = len(self.events)
            answer = yield exchange(port, request.replace("{T}", self.token).encode())
            if not answer.startswith(b"HTTP/1.1 %d " % expected):
                failures.append(f"{name}: expected {expected}, got {answer[:60]!r}")
            failures += [f"{name}: token logged: {leak}" for leak in self.leaks(self.token, since)]
        self.assertEqual(failures, [], "\n".join(failures))

    @defer.inlineCallbacks
    def test_serial_tcp_prompt(self) -> Any:
        """A token typed at the serial-tcp prompt, then Ctrl-C, is not logged."""
        port = self.consoled.port("serial-tcp")
        answer = yield exchange(port, self.serial_token.encode() + b"\x03", after=b"token: ")
        self.assertIn(b"goodbye", answer)
        self.assertEqual(self.leaks(self.serial_token), [])


class HeadLimitTests(TestCase):
    """A request head over a door's limit is refused however its bytes arrive."""

    timeout = 30

    @defer.inlineCallbacks
    def test_websocket_head_over_limit_in_one_write(self) -> Any:
        """A websocket upgrade head over 16 KiB sent in one write is answered 431 and
        reaches neither Autobahn nor the Site; one of exactly 16 KiB is still read."""
        consoled = Consoled(self, test_settings())
        port = consoled.port("novnc")
        echo = hypervisors.serve(self, hypervisors.Echo)
        live = yield consoled.authorize("novnc", "127.0.0.1", echo.port)
        upgrade = upgrade_request(f"/?token={live.token}")
        answer = yield exchange(port, pad(upgrade, 60 * 1024))
        self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer[:80])
        answer = yield exchange(port, pad(upgrade, web.MAX_HEAD + 1))
        self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer[:80])
        page = get("/vnc.html", "X-Pad: " + "a" * 60 * 1024 + "\r\n")
        answer = yield exchange(port, page)
        self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer[:80])
        self.assertEqual(consoled.session_rows(), [])
        # At the limit itself the head goes on to Autobahn (an unknown token: 401).
        unknown = upgrade_request("/?token=5f1c7d52-64a9-4d0b-9a83-0c3d1b2e4f60")
        answer = yield exchange(port, pad(unknown, web.MAX_HEAD))
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:80])

    @defer.inlineCallbacks
    def test_xvp_head_over_limit_in_one_write(self) -> Any:
        """An XVP CONNECT head over 8 KiB sent in one write is answered 431 and starts
        no session; one of exactly 8 KiB is still read (an unknown token: 401)."""
        consoled = Consoled(self, test_settings())
        port = consoled.port("xvp")
        echo = hypervisors.serve(self, hypervisors.Echo)
        live = yield consoled.authorize("novnc", "127.0.0.1", echo.port)
        connect = f"CONNECT /console?token={live.token} HTTP/1.0\r\n\r\n".encode()
        for size in (60 * 1024, xvp.MAX_HEAD + 1):
            answer = yield exchange(port, pad(connect, size))
            self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), (size, answer[:80]))
        self.assertEqual(consoled.session_rows(), [])
        unknown = b"CONNECT /console?token=5f1c7d52-64a9-4d0b-9a83-0c3d1b2e4f60 HTTP/1.0\r\n\r\n"
        answer = yield exchange(port, pad(unknown, xvp.MAX_HEAD))
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:80])
