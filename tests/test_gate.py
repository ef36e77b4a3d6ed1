"""The gate without a transport: every refusal kind, seats, the deadline and cancellation.

A real SQLite store run inline and real Sessions, on a Clock: what the gate
decides, what it logs, and what the database keeps afterwards.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from consoled.endings import ANSWERS, Ending, Kind, Refusal
from consoled.gate import MAX_TOKEN_LENGTH, Facts, Gate, Pass
from consoled.sessions import LOCAL_HOLDER_GRACE
from consoled.sessions.relay import Relay
from consoled.sessions.spectators import Spectator
from consoled.store.tables import sessions
from tests.inline import InlineCore

BROWSER = Facts(peer="192.0.2.7", origin="http://proxy.example", host="proxy.example:6080")


class Client:
    """A door's ClientSide over a StringTransport."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.consumer = self.producer = self.transport
        self.endings: list[Ending] = []
        self.readied = 0

    def ready(self) -> None:
        self.readied += 1

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self, ending: Ending) -> None:
        self.endings.append(ending)

    def rebind(self, endpoint: Any) -> None:
        pass


class GateTests(SynchronousTestCase):
    console_type = "novnc"

    def setUp(self) -> None:
        self.core = InlineCore(self, self.console_type, 5900, "http://proxy.example:6080/")
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)
        self.gate = self.make_gate()

    def make_gate(self, store: Any = None, **options: Any) -> Gate:
        return Gate(
            store or self.core.store,
            self.core.sessions,
            self.core.reactor,
            timeout=10,
            **options,
        )

    def refusal(self, d: defer.Deferred[Pass]) -> Refusal:
        failure = self.failureResultOf(d, Refusal)
        return failure.value

    def assert_logged_once(self, kind: Kind) -> None:
        """One refusal line, naming the kind, never the token."""
        lines = [formatEvent(e) for e in self.events if "refused" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(kind.value, lines[0])
        self.assertNotIn(self.core.token.decode(), "".join(map(str, self.events)))

    def test_admits(self) -> None:
        """A good token at its door, Origin matching Host: a pass to the token's console."""
        admitted = self.successResultOf(self.gate.admit("novnc", self.core.token.decode(), BROWSER))
        self.assertEqual((admitted.info.host, admitted.info.port), ("127.0.0.1", 5900))
        self.assertEqual((admitted.client_address, admitted.seat), ("192.0.2.7", False))

    def test_no_token(self) -> None:
        """No token at all: NO_TOKEN, decided before the store is asked."""
        for token in (None, ""):
            self.assertIs(
                self.refusal(self.gate.admit("xvp", token, BROWSER)).ending.kind, Kind.NO_TOKEN
            )

    def test_unknown_expired_and_malformed(self) -> None:
        """Unknown, expired and malformed tokens are one answer: INVALID_TOKEN."""
        expired = self.successResultOf(
            self.core.store.authorize(
                console_type="novnc",
                host="h",
                port=1,
                instance_uuid="i",
                access_url_base=None,
                ttl=-1,
            )
        ).token
        for token in ("0b1c", expired, "x" * (MAX_TOKEN_LENGTH + 1), "tab\there"):
            refusal = self.refusal(self.gate.admit("novnc", token, BROWSER))
            self.assertIs(refusal.ending.kind, Kind.INVALID_TOKEN, token)
            self.assertEqual(len(refusal.hash_prefix or ""), 8)

    def test_wrong_console_type(self) -> None:
        """A novnc token at the spice or serial doors: WRONG_CONSOLE_TYPE; at XVP it is welcome."""
        token = self.core.token.decode()
        for door in ("spice", "serial", "serial-tcp"):
            refusal = self.refusal(self.gate.admit(door, token, BROWSER))
            self.assertIs(refusal.ending.kind, Kind.WRONG_CONSOLE_TYPE, door)
        self.successResultOf(self.gate.admit("xvp", token, Facts(peer="192.0.2.7")))

    def test_origin(self) -> None:
        """An Origin that is neither this host nor allowed: ORIGIN_REFUSED; allowed_origins lets it."""
        facts = Facts(peer="192.0.2.7", origin="http://evil.example", host="proxy.example")
        refusal = self.refusal(self.gate.admit("novnc", self.core.token.decode(), facts))
        self.assertIs(refusal.ending.kind, Kind.ORIGIN_REFUSED)
        self.assert_logged_once(Kind.ORIGIN_REFUSED)
        allowing = self.make_gate(allowed_origins=["evil.example"])
        self.successResultOf(allowing.admit("novnc", self.core.token.decode(), facts))

    def test_store_fails(self) -> None:
        """A store that fails: STORE_UNAVAILABLE, and the failure logged for the operator."""

        class Broken:
            def find_token(self, token_hash: str, opening: Any = None) -> defer.Deferred[Any]:
                return defer.fail(OSError("database is down"))

        refusal = self.refusal(self.make_gate(Broken()).admit("novnc", "t", BROWSER))
        self.assertIs(refusal.ending.kind, Kind.STORE_UNAVAILABLE)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_internal(self) -> None:
        """A bug behind the gate (a row it cannot read) is INTERNAL, logged, not a hang."""

        class Garbled:
            def find_token(self, token_hash: str, opening: Any = None) -> defer.Deferred[Any]:
                return defer.succeed(object())

        refusal = self.refusal(self.make_gate(Garbled()).admit("novnc", "t", BROWSER))
        self.assertIs(refusal.ending.kind, Kind.INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_store_too_slow(self) -> None:
        """No answer within the timeout: STORE_UNAVAILABLE then; a late row is ignored."""
        slow = _Slow()
        d = self.make_gate(slow).admit("novnc", "t", BROWSER)
        self.assertNoResult(d)
        self.core.reactor.advance(10)
        refusal = self.refusal(d)
        self.assertEqual(str(refusal.ending), "token store unavailable: no answer within 10s")
        slow.late.callback(None)
        self.assertEqual(self.core.reactor.getDelayedCalls(), [])

    def test_cancel_leaves_no_timer(self) -> None:
        """A client leaving mid-admission cancels it: CancelledError, and the deadline is gone."""
        slow = _Slow()
        d = self.make_gate(slow).admit("novnc", "t", BROWSER)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.core.reactor.getDelayedCalls(), [])
        slow.late.callback(None)  # the look-up ends later: nothing more happens

    def test_forwarded_for_only_from_trusted(self) -> None:
        """X-Forwarded-For names the client only when the peer is a trusted proxy."""
        import ipaddress

        facts = Facts(peer="10.1.2.3", forwarded_for="198.51.100.1, 203.0.113.9")
        self.assertEqual(self.gate.client_address(facts), "10.1.2.3")
        trusting = self.make_gate(trusted_proxies=[ipaddress.ip_network("10.1.0.0/16")])
        self.assertEqual(trusting.client_address(facts), "203.0.113.9")

    def test_every_refusal_kind_has_an_answer(self) -> None:
        """Each kind has its row: an HTTP status and a close code a browser may be sent."""
        for kind in Kind:
            answer = ANSWERS[kind]
            self.assertTrue(400 <= answer.http < 600, kind)
            self.assertTrue(answer.close in (1000, 1011, 1012) or 4000 <= answer.close < 5000)


class SerialGateTests(GateTests):
    """The serial console's lease and seats, through the gate."""

    console_type = "serial"

    def admit(self, door: str = "serial-tcp") -> defer.Deferred[Pass]:
        return self.gate.admit(door, self.core.token.decode(), Facts(peer="192.0.2.7"))

    def test_admits(self) -> None:
        """A serial token takes the port's lease at the gate: the pass carries it."""
        admitted = self.successResultOf(self.admit())
        self.assertTrue(admitted.admission is not None and admitted.admission.holds_lease)
        self.assertEqual(self.core.left_behind(), (1, 1))

    def test_wrong_console_type(self) -> None:
        """A serial token at the noVNC and XVP doors: WRONG_CONSOLE_TYPE, no lease taken."""
        for door in ("novnc", "spice", "xvp"):
            self.assertIs(self.refusal(self.admit(door)).ending.kind, Kind.WRONG_CONSOLE_TYPE)
        self.assertEqual(self.core.left_behind(), (0, 0))

    def test_origin(self) -> None:
        """(Origin rules are the novnc case's; nothing serial-specific.)"""

    def writer(self) -> tuple[Pass, Relay, Client]:
        admitted = self.successResultOf(self.admit())
        client = Client()
        relay = admitted.start(client)
        assert isinstance(relay, Relay)
        return admitted, relay, client

    def busy(self) -> defer.Deferred[Pass]:
        """A second admission of the held port: it waits up to the grace for this proxy's writer."""
        d = self.admit()
        self.assertNoResult(d)
        self.core.reactor.advance(LOCAL_HOLDER_GRACE)
        return d

    def test_port_busy(self) -> None:
        """A second writer is refused PORT_BUSY naming since when; its row ends as refused."""
        self.writer()
        refusal = self.refusal(self.busy())
        self.assertIs(refusal.ending.kind, Kind.PORT_BUSY)
        self.assertIn("held since", refusal.ending.detail)
        self.assertEqual(self.core.left_behind(), (1, 1))

    def test_reconnect_while_own_session_ends(self) -> None:
        """A user reconnecting before this proxy read the reset of their first connection:
        the new admission waits for that session to end, then takes the port."""
        _, relay, _ = self.writer()
        d = self.admit()
        self.assertNoResult(d)
        relay.client_lost("connection reset")
        admitted = self.successResultOf(d)
        self.assertTrue(admitted.admission is not None and admitted.admission.holds_lease)
        self.assertEqual(self.core.left_behind(), (1, 1))
        self.assertEqual(self.core.reactor.getDelayedCalls(), [])

    def test_seat_beside_writer(self) -> None:
        """With spectators on, a second user gets a seat: told read-only once, keys dropped."""
        self.core.sessions.spectators = True
        _, relay, _ = self.writer()
        relay.attach_backend(_Backend())
        seat = self.successResultOf(self.busy())
        self.assertTrue(seat.seat)
        spectator_client = Client()
        spectator = seat.start(spectator_client)
        self.assertIsInstance(spectator, Spectator)
        self.assertEqual(spectator_client.readied, 1)
        spectator.from_client(b"typed")
        spectator.from_client(b"again")
        self.assertEqual(spectator_client.transport.value().count(b"read-only"), 1)
        self.assertIn("watching: 192.0.2.7", seat.who())

    def test_start_while_shutting_down(self) -> None:
        """A pass started after shut-down began: told so, lease given back, nothing to wait for."""
        admitted = self.successResultOf(self.admit())
        self.successResultOf(self.core.sessions.stopService())
        client = Client()
        admitted.start(client)
        self.assertEqual([e.kind for e in client.endings], [Kind.SHUTDOWN])
        self.successResultOf(self.core.sessions.settled())
        self.assertEqual(self.core.left_behind(), (0, 0))

    def test_cancel_gives_the_lease_back(self) -> None:
        """A client gone before its admission settles: the row and lease taken are given back."""
        answers: list[tuple[defer.Deferred[Any], Any]] = []
        real = self.core.store.find_token

        def held(token_hash: str, opening: Any = None) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            real(token_hash, opening).addCallback(lambda info: answers.append((d, info)))
            return d

        self.patch(self.core.store, "find_token", held)
        d = self.admit()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        for waiting, info in answers:
            waiting.callback(info)  # the look-up ends after the client left
        self.assertEqual(self.core.left_behind(), (0, 0))
        self.assertEqual(self.core.reactor.getDelayedCalls(), [])


class _Backend:
    def __init__(self) -> None:
        self.transport = StringTransport()

    def attach(self, relay: Relay) -> None:
        pass


class LookUpRowTests(SynchronousTestCase):
    """The session's row, written in the token's look-up (issue 16)."""

    def setUp(self) -> None:
        self.core = InlineCore(self, "novnc", 5900, "http://proxy.example:6080/")

    def make_gate(self, **options: Any) -> Gate:
        return Gate(self.core.store, self.core.sessions, self.core.reactor, timeout=10, **options)

    def refusal(self, d: defer.Deferred[Pass]) -> Refusal:
        return self.failureResultOf(d, Refusal).value

    def session_rows(self) -> list[Any]:
        with self.core.engine.connect() as connection:
            return list(connection.execute(sa.select(sessions).order_by(sessions.c.id)))

    def test_one_trip_for_the_token_and_the_row(self) -> None:
        """An admitted session's row is written with its token's look-up, in one
        unit of database work; starting the pass writes no other (issue 16)."""
        units: list[Any] = []
        runner = self.core.store._runner
        run = runner.run
        self.patch(runner, "run", lambda f, *a, **k: (units.append(f), run(f, *a, **k))[1])
        admitted = self.successResultOf(
            self.core.gate.admit("novnc", self.core.token.decode(), BROWSER)
        )
        self.assertEqual(len(units), 1)
        assert admitted.admission is not None
        [row] = self.session_rows()
        self.assertEqual(
            (row.id, row.door, row.client_address, row.ended_at),
            (admitted.admission.session_id, "websocket/novnc", "192.0.2.7", None),
        )
        admitted.start(Client())
        self.assertEqual((len(units), len(self.session_rows())), (1, 1))

    def test_a_refused_connection_gets_no_row(self) -> None:
        """Steps 3-5 run with the look-up: a connection they refuse writes no row."""
        token = self.core.token.decode()
        stranger = Facts(peer="192.0.2.7", origin="http://evil.example", host="proxy.example:6080")
        self.refusal(self.core.gate.admit("spice", token, BROWSER))
        self.refusal(self.core.gate.admit("novnc", token, stranger))
        self.assertEqual(self.session_rows(), [])

    def test_a_row_refused_on_the_reactor_is_ended(self) -> None:
        """A session of the token that started between the look-up's checks and
        the reactor's: the reactor refuses, and the row written is ended as refused."""
        gate = self.make_gate(max_sessions_per_token=1)
        counts = iter([(0, 0), (1, 1)])  # the look-up's view, then the reactor's
        self.patch(self.core.sessions, "open_for", lambda info: next(counts))
        refusal = self.refusal(gate.admit("novnc", self.core.token.decode(), BROWSER))
        self.assertIs(refusal.ending.kind, Kind.TOO_MANY_SESSIONS)
        [row] = self.session_rows()
        self.assertEqual(row.end_reason, str(refusal.ending))
        self.assertEqual(self.core.left_behind(), (0, 0))


class _Slow:
    """A store whose one look-up answers only when the test fires ``late``."""

    def __init__(self) -> None:
        self.late: defer.Deferred[Any] = defer.Deferred()

    def find_token(self, token_hash: str, opening: Any = None) -> defer.Deferred[Any]:
        return self.late
