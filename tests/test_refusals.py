"""One meaning per refusal, on every door: the same cause gives the same row of ANSWERS.

Each cause is set up once per door, over real sockets, and the door's answer
is read the way its users read it: a websocket upgrade's HTTP status (and,
asked with ``explain``, the close code and reason), the XVP door's status,
the raw serial door's line.  docs/refusals.md is the table.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from consoled.endings import ANSWERS, Kind
from tests.harness import Consoled, test_settings
from tests.hypervisors import closed_port
from tests.wsclient import http_request, upgrade_request, ws_connect
from tests.xvpclient import XVPClient, java_request

#: door -> the console type its tokens are minted for
DOORS = {"novnc": "novnc", "serial": "serial", "xvp": "xvpvnc", "serial-tcp": "serial"}


class RefusalTableTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.consoled = Consoled(self, test_settings())

    @defer.inlineCallbacks
    def answers(self, door: str, token: str) -> Any:
        """What the door tells a user of ``token``: a set of (form, value) pairs."""
        port = self.consoled.port(door)
        if door in ("novnc", "serial"):
            status, headers, body = yield http_request(port, upgrade_request(f"/?token={token}"))
            told = {("http", status)}
            if status != 101:
                self.assertEqual(body, b"")  # Tempest reads any byte here as a frame
            client = yield ws_connect(port, token, explain=True)
            code, reason = yield client.closed
            return told | {("close", code), ("reason", reason.split(":")[0])}
        if door == "xvp":
            client = XVPClient(java_request(token))
            yield _connect(port, client)
            status, body = yield client.closed
            return {("http", status), ("reason", body.decode().strip().split(":")[0])}
        user = _TerminalUser(token)
        yield _connect(port, user)
        text = yield user.done
        line = text.split("\r\n")[1].removeprefix("console unavailable: ")
        return {("line", line.split(":")[0])}

    def expected(self, door: str, kind: Kind, after_upgrade: bool = False) -> set[Any]:
        answer = ANSWERS[kind]
        if door in ("novnc", "serial"):
            return {("http", 101 if after_upgrade else answer.http), ("close", answer.close)} | {
                ("reason", kind.value)
            }
        if door == "xvp":
            return {("http", answer.http), ("reason", kind.value)}
        return {("line", kind.value)}

    @defer.inlineCallbacks
    def check(self, kind: Kind, tokens: dict[str, str], after_upgrade: bool = False) -> Any:
        for door, token in tokens.items():
            told = yield self.answers(door, token)
            self.assertEqual(told, self.expected(door, kind, after_upgrade), (door, kind))

    @defer.inlineCallbacks
    def test_invalid_token(self) -> Any:
        """An unknown token: 401 / 4401 / 'invalid or expired token' on every door."""
        yield self.check(Kind.INVALID_TOKEN, {door: "0b1c-nope" for door in DOORS})

    @defer.inlineCallbacks
    def test_expired_token(self) -> Any:
        """An expired token is the same answer as an unknown one, on every door."""
        tokens = {}
        for door, console_type in DOORS.items():
            issued = yield self.consoled.authorize(console_type, "127.0.0.1", 1, ttl=-1)
            tokens[door] = issued.token
        yield self.check(Kind.INVALID_TOKEN, tokens)

    @defer.inlineCallbacks
    def test_wrong_console_type(self) -> Any:
        """A spice-html5 token: 403 / 4403 on every door it does not belong to."""
        issued = yield self.consoled.authorize("spice-html5", "127.0.0.1", 1)
        yield self.check(Kind.WRONG_CONSOLE_TYPE, {door: issued.token for door in DOORS})

    @defer.inlineCallbacks
    def test_console_unreachable(self) -> Any:
        """A console whose port is closed: 502 / 4502 (after the upgrade) / its line."""
        port = closed_port()
        tokens = {}
        for door, console_type in DOORS.items():
            issued = yield self.consoled.authorize(console_type, "127.0.0.1", port)
            tokens[door] = issued.token
        for door, token in tokens.items():
            told = yield self.answers(door, token)
            kind = Kind.BACKEND_UNREACHABLE
            self.assertEqual(told, self.expected(door, kind, after_upgrade=True), door)

    @defer.inlineCallbacks
    def test_store_unavailable(self) -> Any:
        """A token store that fails: 503 / 4503 / 'token store unavailable' on every door."""
        with self.consoled.engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE console_auth_tokens")
        yield self.check(Kind.STORE_UNAVAILABLE, {door: "0b1c-any" for door in DOORS})
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_port_busy(self) -> Any:
        """A serial port with a writer: 409 / 4409 / 'console port in use' on both serial doors."""
        from tests import hypervisors

        echo = hypervisors.serve(self, hypervisors.Echo)
        held = yield self.consoled.authorize("serial", "127.0.0.1", echo.port)
        writer = yield ws_connect(self.consoled.port("serial"), held.token)
        self.addCleanup(writer.transport.abortConnection)
        writer.send(b"x")
        yield writer.read(1)
        tokens = {}
        for door in ("serial", "serial-tcp"):
            issued = yield self.consoled.authorize("serial", "127.0.0.1", echo.port)
            tokens[door] = issued.token
        yield self.check(Kind.PORT_BUSY, tokens)


def _connect(port: int, protocol: Any) -> defer.Deferred[Any]:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), protocol)


class _TerminalUser(Protocol):
    """Types the token at the prompt; ``done`` fires with what the door said next,
    once it prompts again (a retry) or closes."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.received = b""
        self.typed_at: int | None = None
        self.done: defer.Deferred[str] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.typed_at is None and self.received.endswith(b"token: "):
            self.typed_at = len(self.received)
            self.transport.write(self.token.encode() + b"\r\n")
        elif self.typed_at is not None and self.received.endswith(b"token: "):
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.received[self.typed_at or 0 :].decode("latin-1"))
