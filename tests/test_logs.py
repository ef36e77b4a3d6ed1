"""No log line ever holds a token: every event of real sessions and refusals is scanned."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests import hypervisors
from tests.harness import Consoled, test_settings
from tests.wsclient import http_request, upgrade_request, ws_connect


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
