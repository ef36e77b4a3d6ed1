"""The relay: producer pairing, early bytes, counters, idle and deadline timers, one ending."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from consoled.endings import Ending, Kind
from consoled.sessions.relay import Relay


class FakeClient:
    """The user's side: one StringTransport is both consumer and producer; events in order."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.consumer = self.transport
        self.producer = self.transport
        self.sent: list[bytes] = []
        self.closed: list[Ending] = []
        self.events: list[str] = []

    def ready(self) -> None:
        self.events.append("ready")

    def send(self, data: bytes) -> None:
        self.events.append("send")
        self.sent.append(data)

    def close(self, ending: Ending) -> None:
        self.closed.append(ending)


class FakeBackend:
    """The hypervisor's side: a StringTransport and a record of attach calls."""

    def __init__(self, held: bytes = b"") -> None:
        self.transport = StringTransport()
        self.attached: list[Relay] = []
        self.held = held

    def attach(self, relay: Relay) -> None:
        self.attached.append(relay)
        if self.held:
            relay.from_backend(self.held)


class RelayTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = FakeClient()
        self.backend = FakeBackend()
        self.endings: list[Ending] = []

    def relay(self, idle_timeout: float = 0, deadline: float | None = None) -> Relay:
        return Relay(
            self.client,
            self.clock,
            self.endings.append,
            idle_timeout=idle_timeout,
            deadline=deadline,
        )


class WiringTests(RelayTestCase):
    def test_attach_pairs_producers(self) -> None:
        """Attaching registers each side as the other's streaming producer, as portforward does."""
        relay = self.relay()
        relay.attach_backend(self.backend)
        self.assertEqual(self.backend.attached, [relay])
        self.assertIs(self.client.transport.producer, self.backend.transport)
        self.assertTrue(self.client.transport.streaming)
        self.assertIs(self.backend.transport.producer, self.client.producer)
        self.assertTrue(self.backend.transport.streaming)

    def test_client_ready_before_console_bytes(self) -> None:
        """The door hears ready once, before the console's first bytes are sent to the user."""
        relay = self.relay()
        relay.attach_backend(FakeBackend(held=b"RFB 003.008\n"))
        self.assertEqual(self.client.events, ["ready", "send"])
        self.assertEqual(self.client.sent, [b"RFB 003.008\n"])

    def test_early_bytes_held_then_delivered_in_order(self) -> None:
        """Bytes sent before the backend exists pause the user, then go out in order on attach."""
        relay = self.relay()
        relay.from_client(b"one ")
        relay.from_client(b"two ")
        self.assertEqual(self.client.transport.producerState, "paused")
        relay.from_client(b"three")
        relay.attach_backend(self.backend)
        self.assertEqual(self.backend.transport.value(), b"one two three")
        self.assertEqual(self.client.transport.producerState, "producing")
        relay.from_client(b"!")
        self.assertEqual(self.backend.transport.value(), b"one two three!")

    def test_attach_without_early_bytes_leaves_user_alone(self) -> None:
        """With nothing held, attaching writes nothing and the user was never paused."""
        self.relay().attach_backend(self.backend)
        self.assertEqual(self.backend.transport.value(), b"")
        self.assertEqual(self.client.transport.producerState, "producing")

    def test_counters(self) -> None:
        """Each direction counts its own bytes, held ones included."""
        relay = self.relay()
        relay.from_client(b"abc")
        relay.attach_backend(self.backend)
        relay.from_client(b"de")
        relay.from_backend(b"RFB 003.008\n")
        relay.from_backend(b"x")
        self.assertEqual(relay.bytes_to_server, 5)
        self.assertEqual(relay.bytes_to_client, 13)
        self.assertEqual(self.client.sent, [b"RFB 003.008\n", b"x"])

    def test_attach_after_end_closes_backend(self) -> None:
        """A backend that arrives after the session ended is closed at once and never wired."""
        relay = self.relay()
        relay.end(Ending(Kind.KICKED))
        relay.attach_backend(self.backend)
        self.assertTrue(self.backend.transport.disconnecting)
        self.assertEqual(self.backend.attached, [])
        self.assertIsNone(self.client.transport.producer)
        self.assertIsNone(relay.backend)
        self.assertEqual(self.client.events, [])


class TimerTests(RelayTestCase):
    def test_idle_reset_by_traffic(self) -> None:
        """Traffic either way postpones the idle ending; silence for the full period ends it."""
        relay = self.relay(idle_timeout=10)
        relay.attach_backend(self.backend)
        self.clock.advance(6)
        relay.from_client(b"k")
        self.clock.advance(6)
        self.assertEqual(self.endings, [])
        relay.from_backend(b"frame")
        self.clock.advance(9)
        self.assertEqual(self.endings, [])
        self.clock.advance(1)
        self.assertEqual([e.kind for e in self.endings], [Kind.IDLE])
        self.assertEqual(self.client.closed, self.endings)
        self.assertTrue(self.backend.transport.disconnecting)

    def test_idle_zero_schedules_nothing(self) -> None:
        """idle_timeout=0 means no idle timer at all."""
        self.relay(idle_timeout=0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline(self) -> None:
        """The session ends with TOKEN_EXPIRED exactly at the deadline, not before."""
        self.clock.advance(1000)
        self.relay(deadline=1030)
        self.clock.advance(29.9)
        self.assertEqual(self.endings, [])
        self.clock.advance(0.1)
        self.assertEqual([e.kind for e in self.endings], [Kind.TOKEN_EXPIRED])

    def test_deadline_in_the_past(self) -> None:
        """A deadline already past ends the session on the next turn, not inside the constructor."""
        self.clock.advance(1000)
        relay = self.relay(deadline=10)
        self.assertIsNone(relay.ending)
        self.clock.advance(0)
        self.assertEqual([e.kind for e in self.endings], [Kind.TOKEN_EXPIRED])

    def test_deadline_beats_traffic(self) -> None:
        """Traffic does not postpone the deadline, and ending it cancels the idle timer too."""
        relay = self.relay(idle_timeout=5, deadline=12)
        relay.attach_backend(self.backend)
        for _ in range(4):
            self.clock.advance(3)
            relay.from_client(b".")
        self.assertEqual([e.kind for e in self.endings], [Kind.TOKEN_EXPIRED])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EndingTests(RelayTestCase):
    def test_end_once(self) -> None:
        """Ending twice reports once, keeps the first ending, and leaves no timer behind."""
        relay = self.relay(idle_timeout=30, deadline=60)
        relay.attach_backend(self.backend)
        relay.end(Ending(Kind.KICKED, "by admin"))
        relay.end(Ending(Kind.SHUTDOWN))
        relay.backend_lost()
        self.assertEqual(self.endings, [Ending(Kind.KICKED, "by admin")])
        self.assertEqual(relay.ending, Ending(Kind.KICKED, "by admin"))
        self.assertEqual(self.client.closed, [Ending(Kind.KICKED, "by admin")])
        self.assertTrue(self.backend.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_closed(self) -> None:
        """When the user leaves, the backend is closed but the user is not closed again."""
        relay = self.relay()
        relay.attach_backend(self.backend)
        relay.client_lost("close code 1000")
        self.assertEqual(self.endings, [Ending(Kind.CLIENT_CLOSED, "close code 1000")])
        self.assertEqual(self.client.closed, [])
        self.assertTrue(self.backend.transport.disconnecting)

    def test_backend_closed(self) -> None:
        """When the console leaves, the user is told and the backend is not closed again."""
        relay = self.relay()
        relay.attach_backend(self.backend)
        relay.backend_lost("connection done")
        self.assertEqual(self.client.closed, [Ending(Kind.BACKEND_CLOSED, "connection done")])
        self.assertFalse(self.backend.transport.disconnecting)
        self.assertEqual(self.endings, self.client.closed)

    def test_end_before_attach_drops_held_bytes(self) -> None:
        """Bytes held for a backend that never came are dropped with the session."""
        relay = self.relay()
        relay.from_client(b"early")
        relay.end(Ending(Kind.BACKEND_UNREACHABLE, "h:5900"))
        relay.attach_backend(self.backend)
        self.assertEqual(self.backend.transport.value(), b"")
        self.assertEqual(self.client.closed, [Ending(Kind.BACKEND_UNREACHABLE, "h:5900")])
