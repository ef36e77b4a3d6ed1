"""One writer per serial port: a second user is refused, a kick frees the port."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from tests import hypervisors
from tests.harness import Consoled, test_settings
from tests.serialclient import TerminalClient
from tests.test_store import take_lease
from tests.wsclient import http_request, upgrade_request, ws_connect


class SerialLockTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.consoled = Consoled(self, test_settings())
        self.port = self.consoled.port("serial")
        self.echo = hypervisors.serve(self, hypervisors.Echo)

    @defer.inlineCallbacks
    def token(self) -> Any:
        issued = yield self.consoled.authorize("serial", "127.0.0.1", self.echo.port)
        return issued.token

    @defer.inlineCallbacks
    def test_second_user_refused_until_first_leaves(self) -> Any:
        """While one user holds the port another gets 409 (explained: since when); then it is free."""
        first = yield ws_connect(self.port, (yield self.token()))
        first.send(b"a")
        yield first.read(1)
        status, _, body = yield http_request(
            self.port, upgrade_request(f"/?token={(yield self.token())}")
        )
        self.assertEqual((status, body), (409, b""))
        explained = yield ws_connect(self.port, (yield self.token()), explain=True)
        code, reason = yield explained.closed
        self.assertEqual(code, 4409)
        self.assertIn("console port in use: held since", reason)
        first.sendClose(1000)
        yield first.closed
        yield self.consoled.wait_sessions_ended()
        second = yield ws_connect(self.port, (yield self.token()))
        second.send(b"b")
        self.assertEqual((yield second.read(1)), b"b")
        second.sendClose(1000)
        yield second.closed
        rows = self.consoled.session_rows()
        self.assertEqual(len(rows), 4)  # first, refused, refused and explained, second
        self.assertTrue(rows[1]["end_reason"].startswith("console port in use"), rows[1])

    @defer.inlineCallbacks
    def test_reconnect_waits_for_own_release(self) -> Any:
        """A user back at once is not refused by their own session's release still in flight."""
        store = self.consoled.store
        release_gate: defer.Deferred[None] = defer.Deferred()
        ending: defer.Deferred[None] = defer.Deferred()
        real_end, real_open, real_find = store.end_session, store.open_writer, store.find_token
        order: list[str] = []

        def held_end(*args: Any, **kwargs: Any) -> Any:
            # The first session's row end and lease release wait at the gate.
            if ending.called:
                return real_end(*args, **kwargs)
            ending.callback(None)
            return release_gate.addCallback(lambda _: real_end(*args, **kwargs))

        def find_token(token_hash: str, opening: Any = None) -> Any:
            # The gate opens on the turn after the second user's token checks
            # out; the admission runs in that same turn, gate still shut.
            def checked(info: Any) -> Any:
                reactor.callLater(0, release_gate.callback, None)
                return info

            return real_find(token_hash, opening).addCallback(checked)

        def open_writer(**kwargs: Any) -> Any:
            order.append("open" if release_gate.called else "open while the lease is held")
            return real_open(**kwargs)

        first = yield ws_connect(self.port, (yield self.token()))
        first.send(b"a")
        yield first.read(1)
        self.patch(store, "end_session", held_end)
        first.sendClose(1000)
        yield ending  # the first session is ending; its lease is still in the table
        self.patch(store, "find_token", find_token)
        self.patch(store, "open_writer", open_writer)
        second = yield ws_connect(self.port, (yield self.token()))
        second.send(b"b")
        self.assertEqual((yield second.read(1)), b"b")
        self.assertEqual(order, ["open"])
        second.sendClose(1000)
        yield second.closed
        yield self.consoled.wait_sessions_ended()

    @defer.inlineCallbacks
    def test_kick_closes_and_frees_the_port(self) -> Any:
        """A kick marked in the database closes the session at the next touch, with the reason."""
        first = yield ws_connect(self.port, (yield self.token()))
        first.send(b"a")
        yield first.read(1)
        (row,) = self.consoled.session_rows()
        count = yield self.consoled.store.request_kick(session_id=row["id"], reason="maintenance")
        self.assertEqual(count, 1)
        yield self.consoled.sessions.touch()
        code, reason = yield first.closed
        self.assertEqual((code, reason), (4409, "disconnected by an operator: maintenance"))
        yield self.consoled.wait_sessions_ended()
        second = yield ws_connect(self.port, (yield self.token()))
        second.sendClose(1000)
        yield second.closed
        rows = self.consoled.session_rows()
        self.assertEqual(rows[0]["end_reason"], "disconnected by an operator: maintenance")

    @defer.inlineCallbacks
    def test_lapsed_lease_of_a_dead_proxy(self) -> Any:
        """A lease its proxy stopped renewing does not block the port."""
        yield take_lease(self.consoled.store, "127.0.0.1", self.echo.port, "dead", -1)
        client = yield ws_connect(self.port, (yield self.token()))
        client.send(b"z")
        self.assertEqual((yield client.read(1)), b"z")
        client.sendClose(1000)
        yield client.closed


class SpectatorTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_second_user_watches_read_only(self) -> Any:
        """With spectators on, a second user of a held port sees the output, types nothing."""
        consoled = Consoled(self, test_settings(serial_spectators=True))
        echo = hypervisors.serve(self, hypervisors.Echo)
        port = consoled.port("serial")
        writer_token = yield consoled.authorize("serial", "127.0.0.1", echo.port)
        writer = yield ws_connect(port, writer_token.token)
        writer.send(b"one")
        yield writer.read(3)
        watcher_token = yield consoled.authorize("serial", "127.0.0.1", echo.port)
        watcher = yield ws_connect(port, watcher_token.token)
        notice = yield watcher.read_until(b"dropped]\r\n")
        self.assertIn(b"read-only", notice)
        watcher.send(b"ignored")  # dropped: never reaches the console
        writer.send(b"two")
        self.assertEqual((yield writer.read(3)), b"two")
        self.assertEqual((yield watcher.read_until(b"two")).lstrip(b"\r\n[read-only")[-3:], b"two")
        self.assertNotIn(b"ignored", bytes(writer.buffer))
        writer.sendClose(1000)
        yield writer.closed
        code, reason = yield watcher.closed
        self.assertEqual(code, 1000)
        self.assertIn("writer's session ended", reason)
        yield consoled.wait_sessions_ended()
        rows = consoled.session_rows()
        # The writer; the second user's refused write attempt; its spectator session.
        self.assertEqual([row["mode"] for row in rows], ["writer", "writer", "spectator"])
        self.assertTrue(rows[1]["end_reason"].startswith("console port in use"))
        self.assertTrue(all(row["ended_at"] for row in consoled.session_rows()))


class TakeoverTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_takeover_hands_the_port_to_the_spectator(self) -> Any:
        """kick --takeover: the spectator types to the console, the old writer only watches."""
        consoled = Consoled(self, test_settings(serial_spectators=True))
        echo = hypervisors.serve(self, hypervisors.Echo)
        writer = yield ws_connect(
            consoled.port("serial"),
            (yield consoled.authorize("serial", "127.0.0.1", echo.port)).token,
        )
        writer.send(b"w1")
        yield writer.read(2)
        # The waiting user comes through the raw TCP door and becomes a spectator.
        waiting = TerminalClient((yield consoled.authorize("serial", "127.0.0.1", echo.port)).token)
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", consoled.port("serial-tcp")), waiting
        )
        yield waiting.read_until(b"read-only")
        writer_row = consoled.session_rows()[0]
        yield consoled.store.request_kick(
            session_id=writer_row["id"], reason="hand over", takeover=True
        )
        yield consoled.sessions.touch()
        yield writer.read_until(b"you are read-only now]\r\n")
        yield waiting.read_until(b"you can type now]")
        waiting.transport.write(b"from-new")
        self.assertEqual((yield writer.read_until(b"from-new"))[-8:], b"from-new")  # watches
        writer.send(b"ignored")  # dropped, and the old writer is told
        yield writer.read_until(b"keys are dropped]\r\n")
        waiting.transport.write(b"+more")
        yield writer.read_until(b"+more")
        self.assertEqual(len(echo.connected), 1)  # one console connection all along

        def writer_now() -> dict[str, Any]:
            return [r for r in consoled.session_rows() if r["id"] == writer_row["id"]][0]

        for _ in range(500):  # the row is rewritten on the store's thread
            if not writer_now()["kick_requested"]:
                break
            yield _tick()
        row = writer_now()
        self.assertEqual(
            (row["door"], row["ended_at"], row["kick_requested"]), ("serial-tcp", None, False)
        )
        yield consoled.sessions.touch()  # the kick is done: no second takeover or close
        writer.send(b"still-here")  # still read-only: never echoed by the console
        waiting.transport.write(b"+last")
        seen = yield writer.read_until(b"+last")
        self.assertNotIn(b"still-here", seen)
        waiting.transport.loseConnection()
        code, reason = yield writer.closed
        self.assertIn("the writer's session ended", reason)
        yield consoled.wait_sessions_ended()


def _tick() -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.01, lambda: None)
