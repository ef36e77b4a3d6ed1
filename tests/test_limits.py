"""Abuse limits: failed token checks per address, connections per address per door,
live sessions per token and per instance, and the life of a file connection."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled import limits
from consoled.doors.web import DoorFactory, door_site
from consoled.endings import Kind, Refusal
from consoled.gate import Facts, Gate
from consoled.limits import FailureThrottle
from tests import test_refusals
from tests.harness import INSTANCE, Consoled, test_settings
from tests.hypervisors import Echo, serve
from tests.inline import InlineCore
from tests.test_gate import Client
from tests.wsclient import ws_connect
from tests.xvpclient import xvp_connect

ATTACKER = Facts(peer="198.51.100.9")
NEIGHBOUR = Facts(peer="198.51.100.10")


class FailureThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = FailureThrottle(self.clock, limit=3, window=10, ban=60)

    def test_limit_within_window_bans(self) -> None:
        self.assertFalse(self.throttle.failed("a"))
        self.clock.advance(4)
        self.assertFalse(self.throttle.failed("a"))
        self.assertIsNone(self.throttle.banned_until("a"))
        self.clock.advance(4)
        self.assertTrue(self.throttle.failed("a"))
        self.assertEqual(self.throttle.banned_until("a"), 68)
        self.assertIsNone(self.throttle.banned_until("b"))

    def test_failures_spread_beyond_the_window_do_not(self) -> None:
        for _ in range(10):
            self.assertFalse(self.throttle.failed("a"))
            self.clock.advance(6)
        self.assertIsNone(self.throttle.banned_until("a"))

    def test_ban_ends(self) -> None:
        for _ in range(3):
            self.throttle.failed("a")
        self.clock.advance(59)
        self.assertIsNotNone(self.throttle.banned_until("a"))
        self.clock.advance(1)
        self.assertIsNone(self.throttle.banned_until("a"))

    def test_zero_is_off(self) -> None:
        throttle = FailureThrottle(self.clock, limit=0, window=10, ban=60)
        for _ in range(100):
            self.assertFalse(throttle.failed("a"))
        self.assertIsNone(throttle.banned_until("a"))

    def test_tables_are_bounded(self) -> None:
        """A flood of addresses keeps at most MAX_ADDRESSES, the least recent dropped."""
        self.patch(limits, "MAX_ADDRESSES", 5)
        for n in range(50):
            self.throttle.failed(f"192.0.2.{n}")
        self.assertEqual(len(self.throttle._failures), 5)


class CountingStore:
    """The inline store, counting look-ups."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.lookups = 0

    def find_token(self, token_hash: str, opening: Any = None) -> defer.Deferred[Any]:
        self.lookups += 1
        return self.store.find_token(token_hash, opening)


class GateLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.core = InlineCore(self, "novnc", 5900, "http://proxy.example:6080/")
        self.store = CountingStore(self.core.store)
        self.token = self.core.token.decode()

    def gate(self, **options: Any) -> Gate:
        return Gate(
            self.store,  # type: ignore[arg-type]
            self.core.sessions,
            self.core.reactor,
            timeout=10,
            **options,
        )

    def kind(self, d: defer.Deferred[Any]) -> Kind:
        return self.failureResultOf(d, Refusal).value.ending.kind

    def test_banned_address_is_answered_without_the_store(self) -> None:
        """Three bad tokens ban the address: its good token is refused, the store not asked."""
        throttle = FailureThrottle(self.core.reactor, limit=3, window=60, ban=300)
        gate = self.gate(throttle=throttle)
        for n in range(3):
            self.assertIs(self.kind(gate.admit("novnc", f"bad-{n}", ATTACKER)), Kind.INVALID_TOKEN)
        asked = self.store.lookups
        refusal = self.failureResultOf(gate.admit("novnc", self.token, ATTACKER), Refusal).value
        self.assertIs(refusal.ending.kind, Kind.TOO_MANY_FAILURES)
        self.assertIn("try again in 300s", refusal.ending.detail)
        self.assertEqual(self.store.lookups, asked)
        # Another address is not touched by the ban; the banned one may try once it ends.
        self.successResultOf(gate.admit("novnc", self.token, NEIGHBOUR))
        self.core.reactor.advance(300)
        self.successResultOf(gate.admit("novnc", self.token, ATTACKER))

    def test_only_invalid_tokens_count(self) -> None:
        """A missing token and a token for another door are not guesses."""
        throttle = FailureThrottle(self.core.reactor, limit=2, window=60, ban=300)
        gate = self.gate(throttle=throttle)
        for _ in range(5):
            self.assertIs(self.kind(gate.admit("novnc", None, ATTACKER)), Kind.NO_TOKEN)
            kind = self.kind(gate.admit("serial", self.token, ATTACKER))
            self.assertIs(kind, Kind.WRONG_CONSOLE_TYPE)
        self.successResultOf(gate.admit("novnc", self.token, ATTACKER))

    def start(self, gate: Gate) -> Any:
        admitted = self.successResultOf(gate.admit("novnc", self.token, ATTACKER))
        return admitted.start(Client())

    def test_sessions_per_token(self) -> None:
        """OSSN-0008: a token's live sessions are capped; one ending makes room."""
        gate = self.gate(max_sessions_per_token=2)
        first = self.start(gate)
        self.start(gate)
        refusal = self.failureResultOf(gate.admit("novnc", self.token, ATTACKER), Refusal).value
        self.assertIs(refusal.ending.kind, Kind.TOO_MANY_SESSIONS)
        self.assertIn("2 live sessions of this token", refusal.ending.detail)
        first.client_lost("gone")
        self.start(gate)

    def test_sessions_per_instance(self) -> None:
        """Tokens of one instance share its cap."""
        other = self.successResultOf(
            self.core.store.authorize(
                console_type="novnc",
                host="127.0.0.1",
                port=5901,
                instance_uuid=INSTANCE,
                access_url_base=None,
                ttl=600,
            )
        ).token
        gate = self.gate(max_sessions_per_instance=1)
        self.start(gate)
        refusal = self.failureResultOf(gate.admit("novnc", other, ATTACKER), Refusal).value
        self.assertIs(refusal.ending.kind, Kind.TOO_MANY_SESSIONS)
        self.assertIn("1 live sessions of instance", refusal.ending.detail)


class FileConnectionTests(SynchronousTestCase):
    def test_keep_alive_connection_is_closed_after_its_maximum(self) -> None:
        """A file connection kept busy (a request, then a byte now and then) ends at the cap."""
        clock = Clock()
        factory = DoorFactory(door_site(None, timeout=30), None, clock, 30, connection_max=60)  # type: ignore[arg-type]
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4000))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"404", transport.value())
        for _ in range(7):
            clock.advance(8)
            protocol.dataReceived(b"G")
        self.assertFalse(transport.disconnecting)
        clock.advance(4)
        self.assertTrue(transport.disconnecting or transport.disconnected)
        protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(clock.getDelayedCalls(), [])


class Hold(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(self.received)


class ConnectionLimitTests(TestCase):
    """At most N open connections per address on each door, over real sockets."""

    timeout = 30

    def setUp(self) -> None:
        self.consoled = Consoled(self, test_settings(max_connections_per_address=2))

    @defer.inlineCallbacks
    def open(self, door: str) -> Any:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.consoled.port(door))
        held = Hold()
        yield connectProtocol(endpoint, held)
        self.addCleanup(held.transport.abortConnection)
        return held

    @defer.inlineCallbacks
    def test_each_door_answers_the_one_too_many(self) -> Any:
        expected = {
            "novnc": b"HTTP/1.1 429 Too Many Requests",
            "spice": b"HTTP/1.1 429 Too Many Requests",
            "serial": b"HTTP/1.1 429 Too Many Requests",
            "xvp": b"HTTP/1.1 429 Too Many Requests",
            "serial-tcp": b"console unavailable: too many connections from this address",
        }
        for door, answer in expected.items():
            first = yield self.open(door)
            yield self.open(door)
            third = yield self.open(door)
            told = yield third.lost
            self.assertTrue(told.startswith(answer), (door, told))
            self.assertIn(b"too many connections from this address: 2 open", told)
            # One leaves: room for one more, which is served (not answered and closed).
            first.transport.loseConnection()
            yield first.lost
            fourth = yield self.open(door)
            self.assertFalse(fourth.lost.called, door)


class RefusalRowTests(TestCase):
    """The limits' kinds on every door, as the refusal table says."""

    timeout = 60
    answers = test_refusals.RefusalTableTests.answers
    expected = test_refusals.RefusalTableTests.expected
    check = test_refusals.RefusalTableTests.check

    @defer.inlineCallbacks
    def test_banned_address(self) -> Any:
        """After failed_token_limit bad tokens: 429 / 4429 / 'too many failed token checks'."""
        self.consoled = Consoled(self, test_settings(failed_token_limit=2))
        for _ in range(2):
            yield self.answers("xvp", "0b1c-guess")
        yield self.check(Kind.TOO_MANY_FAILURES, {door: "0b1c-any" for door in test_refusals.DOORS})

    @defer.inlineCallbacks
    def test_sessions_per_token(self) -> Any:
        """A token with its one session live: 429 / 4429 / 'too many sessions' on every door."""
        self.consoled = Consoled(self, test_settings(max_sessions_per_token=1))
        tokens = {}
        for door, console_type in test_refusals.DOORS.items():
            echo = serve(self, Echo)  # one console each: serial ports are leased
            issued = yield self.consoled.authorize(console_type, "127.0.0.1", echo.port)
            if door == "xvp":
                holder = yield xvp_connect(self.consoled.port("xvp"), issued.token)
            else:
                holder_door = "serial" if console_type == "serial" else "novnc"
                holder = yield ws_connect(self.consoled.port(holder_door), issued.token)
            self.addCleanup(holder.transport.abortConnection)
            holder.send(b"x")
            yield holder.read(1)
            tokens[door] = issued.token
        yield self.check(Kind.TOO_MANY_SESSIONS, tokens)
