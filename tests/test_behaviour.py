"""One behavioural suite for the relay, run across doors and console types.

``RelayBehaviourMixin`` holds the tests; a door mixin says how a user
connects through that door and how the door tells them why a session ended;
each concrete class names a door and a console type.  The XVP and serial
TCP doors reuse the same body.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from consoled.endings import ANSWERS, Kind
from tests import hypervisors
from tests.harness import Consoled, test_settings
from tests.serialclient import terminal_connect
from tests.wsclient import ws_connect
from tests.xvpclient import xvp_connect


class RelayBehaviourMixin:
    """The relay's promises, whatever the door."""

    door: str
    console_type: str
    timeout = 20

    # -- hooks a door mixin provides ---------------------------------------

    def connect(self, port: int, token: str) -> defer.Deferred[Any]:
        raise NotImplementedError

    def assert_told(self, closed: Any, kind: Kind) -> None:
        """The user was told ``kind`` in the door's own way."""
        raise NotImplementedError

    # -- setup -------------------------------------------------------------

    def start(self: Any, **consoled: Any) -> Consoled:
        self.clock = Clock()
        self.clock.advance(reactor.seconds())
        self.consoled = Consoled(self, test_settings(**consoled), clock=self.clock)
        return self.consoled

    @defer.inlineCallbacks
    def open_session(self: Any, hypervisor_port: int, **token: Any) -> Any:
        issued = yield self.consoled.authorize(
            self.console_type, "127.0.0.1", hypervisor_port, **token
        )
        client = yield self.connect(self.consoled.port(self.door), issued.token)
        return client

    @defer.inlineCallbacks
    def ended_row(self: Any) -> Any:
        yield self.consoled.wait_sessions_ended()
        rows = self.consoled.session_rows()
        self.assertEqual(len(rows), 1, rows)
        self.assertIsNotNone(rows[0]["ended_at"])
        return rows[0]

    # -- the tests ---------------------------------------------------------

    @defer.inlineCallbacks
    def test_data_both_ways(self: Any) -> Any:
        """Bytes go both ways unchanged and the row counts them when the user leaves."""
        self.start()
        echo = hypervisors.serve(self, hypervisors.Echo)
        client = yield self.open_session(echo.port)
        payload = bytes(range(256)) * 400
        for at in range(0, len(payload), 8192):
            client.send(payload[at : at + 8192])
        self.assertEqual((yield client.read(len(payload))), payload)
        client.close()
        row = yield self.ended_row()
        self.assertTrue(row["end_reason"].startswith(Kind.CLIENT_CLOSED.value), row)
        self.assertEqual((row["bytes_to_client"], row["bytes_to_server"]), (len(payload),) * 2)
        yield echo.connected[0].lost  # the hypervisor side was closed too

    @defer.inlineCallbacks
    def test_hypervisor_hangs_up(self: Any) -> Any:
        """The console closing ends the session: the user is told and the row says so."""
        self.start()
        server = hypervisors.serve(self, hypervisors.SayAndHangUp)
        client = yield self.open_session(server.port)
        self.assertEqual((yield client.read(5)), b"bye\r\n")
        self.assert_told((yield client.closed), Kind.BACKEND_CLOSED)
        row = yield self.ended_row()
        self.assertTrue(row["end_reason"].startswith(Kind.BACKEND_CLOSED.value), row)

    @defer.inlineCallbacks
    def test_hypervisor_unreachable(self: Any) -> Any:
        """A console nobody listens on: the user is told and the row records why."""
        self.start()
        client = yield self.open_session(hypervisors.closed_port())
        self.assert_told((yield client.closed), Kind.BACKEND_UNREACHABLE)
        row = yield self.ended_row()
        self.assertTrue(row["end_reason"].startswith(Kind.BACKEND_UNREACHABLE.value), row)

    @defer.inlineCallbacks
    def test_idle_timeout(self: Any) -> Any:
        """No traffic either way for idle_timeout closes the session; traffic resets it."""
        self.start(idle_timeout=30.0)
        echo = hypervisors.serve(self, hypervisors.Echo)
        client = yield self.open_session(echo.port)
        yield echo.first
        self.clock.advance(20)
        client.send(b"ping")
        yield client.read(4)
        self.clock.advance(20)  # 20 s since the last traffic: still open
        self.assertFalse(client.closed.called)
        self.clock.advance(11)
        self.assert_told((yield client.closed), Kind.IDLE)
        row = yield self.ended_row()
        self.assertTrue(row["end_reason"].startswith(Kind.IDLE.value), row)

    @defer.inlineCallbacks
    def test_session_timeout(self: Any) -> Any:
        """With enforce_session_timeout the session ends when its token expires."""
        import dataclasses

        settings = test_settings()
        settings = dataclasses.replace(
            settings,
            consoleauth=dataclasses.replace(settings.consoleauth, enforce_session_timeout=True),
        )
        self.clock = Clock()
        self.clock.advance(reactor.seconds())
        self.consoled = Consoled(self, settings, clock=self.clock)
        echo = hypervisors.serve(self, hypervisors.Echo)
        client = yield self.open_session(echo.port, ttl=60)
        yield echo.first
        self.clock.advance(59)
        self.assertFalse(client.closed.called)
        self.clock.advance(2)
        self.assert_told((yield client.closed), Kind.TOKEN_EXPIRED)
        row = yield self.ended_row()
        self.assertTrue(row["end_reason"].startswith(Kind.TOKEN_EXPIRED.value), row)

    @defer.inlineCallbacks
    def test_slow_reader_pauses_hypervisor(self: Any) -> Any:
        """A user who stops reading makes consoled stop reading the console (bounded buffers)."""
        self.start()
        flood = hypervisors.serve(self, hypervisors.Flood)
        client = yield self.open_session(flood.port)
        client.transport.pauseProducing()
        source = yield flood.first
        yield source.paused
        self.assertLess(source.sent, 64 * 1024 * 1024)
        client.transport.resumeProducing()
        client.close()
        yield self.ended_row()

    @defer.inlineCallbacks
    def test_shutdown_ends_sessions(self: Any) -> Any:
        """Stopping consoled tells live users and ends their rows before the store stops."""
        self.start()
        echo = hypervisors.serve(self, hypervisors.Echo)
        client = yield self.open_session(echo.port)
        yield echo.first
        yield self.consoled.top.stopService()
        self.assert_told((yield client.closed), Kind.SHUTDOWN)
        rows = self.consoled.session_rows()
        self.assertEqual(rows[0]["end_reason"], Kind.SHUTDOWN.value)

    @defer.inlineCallbacks
    def test_internal_access_path(self: Any) -> Any:
        """An internal_access_path is CONNECTed first; bytes after the 200 reach the user."""
        self.start()
        gate = hypervisors.serve(self, hypervisors.ConnectGate, status=200)
        client = yield self.open_session(gate.port, internal_access_path="/console?ref=OpaqueRef:1")
        self.assertEqual((yield client.read(7)), b"hello\r\n")
        client.send(b"abc")
        self.assertEqual((yield client.read(3)), b"abc")
        self.assertEqual(
            gate.connected[0].request_line, b"CONNECT /console?ref=OpaqueRef:1 HTTP/1.1"
        )
        client.close()
        yield self.ended_row()

    @defer.inlineCallbacks
    def test_internal_access_path_refused(self: Any) -> Any:
        """A non-200 answer to the hypervisor-side CONNECT refuses the session."""
        self.start()
        gate = hypervisors.serve(self, hypervisors.ConnectGate, status=403)
        client = yield self.open_session(gate.port, internal_access_path="/console?ref=x")
        self.assert_told((yield client.closed), Kind.BACKEND_REFUSED)
        row = yield self.ended_row()
        self.assertIn("403", row["end_reason"])


class WebSocketDoor:
    """How a user reaches a console through a websocket door."""

    def connect(self, port: int, token: str) -> defer.Deferred[Any]:
        return ws_connect(port, token).addCallback(_with_close)

    def assert_told(self: Any, closed: Any, kind: Kind) -> None:
        code, reason = closed
        self.assertEqual(code, ANSWERS[kind].close, reason)
        self.assertTrue((reason or "").startswith(kind.value), reason)


def _with_close(client: Any) -> Any:
    client.close = lambda: client.sendClose(1000)
    return client


class NoVNCBehaviour(WebSocketDoor, RelayBehaviourMixin, TestCase):
    door, console_type = "novnc", "novnc"


class SpiceBehaviour(WebSocketDoor, RelayBehaviourMixin, TestCase):
    door, console_type = "spice", "spice-html5"


class SerialBehaviour(WebSocketDoor, RelayBehaviourMixin, TestCase):
    door, console_type = "serial", "serial"


class XVPDoor:
    """How a Java viewer reaches a console through the XVP door."""

    def connect(self, port: int, token: str) -> defer.Deferred[Any]:
        return xvp_connect(port, token)

    def assert_told(self: Any, closed: Any, kind: Kind) -> None:
        status, body = closed
        if kind in (Kind.BACKEND_UNREACHABLE, Kind.BACKEND_REFUSED, Kind.BACKEND_TIMEOUT):
            # Decided before the answer: a status line says why.
            self.assertEqual(status, ANSWERS[kind].http, body)
            self.assertIn(kind.value.encode(), body)
        else:
            # After the 200 the stream is raw RFB: the connection just closes.
            self.assertEqual(status, 200)


class XVPBehaviour(XVPDoor, RelayBehaviourMixin, TestCase):
    door, console_type = "xvp", "xvpvnc"


class XVPWithNoVNCTokenBehaviour(XVPDoor, RelayBehaviourMixin, TestCase):
    door, console_type = "xvp", "novnc"


class SerialTCPDoor:
    """How a terminal user (nc, socat) reaches a serial console through the raw TCP door."""

    def connect(self, port: int, token: str) -> defer.Deferred[Any]:
        return terminal_connect(port, token)

    def assert_told(self: Any, closed: Any, kind: Kind) -> None:
        _, text = closed
        if kind in (Kind.BACKEND_UNREACHABLE, Kind.BACKEND_REFUSED, Kind.BACKEND_TIMEOUT):
            self.assertIn(b"console unavailable: " + kind.value.encode(), text)
        else:
            self.assertIn(b"[" + kind.value.encode(), text)


class SerialTCPBehaviour(SerialTCPDoor, RelayBehaviourMixin, TestCase):
    door, console_type = "serial-tcp", "serial"
