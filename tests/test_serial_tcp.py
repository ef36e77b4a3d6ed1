"""The raw TCP serial door: prompt, tries, deadline, telnet layer, escape, endings; real peers."""

from __future__ import annotations

import os
import re
from typing import Any

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.doors.serial_tcp import BANNER, OFFER, PROMPT, SerialTCPFactory
from consoled.endings import Ending, Kind, Refusal
from consoled.gate import Gate
from consoled.sessions import Admission, Sessions
from consoled.sessions.relay import Relay
from consoled.store import Store, schema
from consoled.store.engine import make_engine
from consoled.store.runner import ThreadRunner
from consoled.store.tables import sessions as sessions_table
from consoled.tokens import ConnectInfo, hash_token
from tests import hypervisors
from tests.harness import INSTANCE
from tests.peers import require_executable, start_qemu_monitor

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
NOP, BRK, IP, AO, AYT, EC, EL = 241, 243, 244, 245, 246, 247, 248
ECHO, SGA, TTYPE, NAWS = 1, 3, 24, 31
GREETING = OFFER + BANNER + PROMPT
INFO = ConnectInfo(
    id=1,
    token_hash="ab" * 32,
    console_type="serial",
    host="127.0.0.1",
    port=4555,
    tls_port=None,
    internal_access_path=None,
    instance_uuid=INSTANCE,
    access_url_base="ws://127.0.0.1:6083/",
    expires=2_000_000_000,
)
CONNECTED = (
    f"connected to the serial console of instance {INSTANCE}; "
    "escape is Ctrl-] (then ? for help)\r\n"
).encode()


def iac(*codes: int) -> bytes:
    return bytes([IAC, *codes])


class FakeStore:
    """Knows the token "good" (by its hash, as the gate asks); ``hold`` keeps answers until
    ``release``; ``store_down`` fails every look-up."""

    def __init__(self) -> None:
        self.tokens: dict[str, ConnectInfo] = {"good": INFO}
        self.seen: list[str] = []
        self.hold = False
        self.held: list[tuple[str, defer.Deferred[ConnectInfo | None]]] = []
        self.store_down = False

    def find_token(
        self, token_hash: str, opening: Any = None
    ) -> defer.Deferred[ConnectInfo | None]:
        self.seen.append(token_hash)
        if self.hold:
            d: defer.Deferred[ConnectInfo | None] = defer.Deferred()
            self.held.append((token_hash, d))
            return d
        return self._answer(token_hash)

    def _answer(self, token_hash: str) -> defer.Deferred[ConnectInfo | None]:
        if self.store_down:
            return defer.fail(OSError("database is down"))
        by_hash = {hash_token(token): info for token, info in self.tokens.items()}
        return defer.succeed(by_hash.get(token_hash))

    def release(self) -> None:
        held, self.held = self.held, []
        for token_hash, d in held:
            self._answer(token_hash).chainDeferred(d)


def hashes(*tokens: str) -> list[str]:
    """What the store was asked for these tokens: their digests, hashed once by the gate."""
    return [hash_token(token) for token in tokens]


class FakeBackend:
    """The console's side of a relay: a StringTransport."""

    def __init__(self) -> None:
        self.transport = StringTransport()

    def attach(self, relay: Relay) -> None:
        self.relay = relay


class FakeSessions:
    """Leases every port (``busy`` refuses it), records start() and returns a real Relay."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.started: list[tuple[ConnectInfo, str, str]] = []
        self.relays: list[Relay] = []
        self.endings: list[Ending] = []
        self.released: list[str] = []
        self.busy: Refusal | None = None
        self.users = "nobody else uses this console through this proxy"

    def admit(self, info: ConnectInfo, door: str, client_address: str) -> defer.Deferred[Any]:
        if self.busy is not None:
            return defer.fail(self.busy)
        return defer.succeed(Admission(1, info, True))

    proxy = "fake"

    def can_watch(self, info: ConnectInfo) -> bool:
        return False

    def admitting(self, work: defer.Deferred[Any]) -> None:
        pass

    def open_for(self, info: ConnectInfo) -> tuple[int, int]:
        return 0, 0

    def release(self, admission: Admission, reason: str) -> None:
        self.released.append(reason)

    def who(self, info: ConnectInfo) -> str:
        return self.users

    def start(
        self, info: ConnectInfo, door: str, client_address: str, client: Any, *rest: Any
    ) -> Relay:
        self.started.append((info, door, client_address))
        relay = Relay(client, self.clock, self.endings.append)
        self.relays.append(relay)
        return relay


class DoorTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeStore()
        self.sessions = FakeSessions(self.clock)
        self.gate = Gate(
            self.store,  # type: ignore[arg-type]
            self.sessions,  # type: ignore[arg-type]
            self.clock,
            timeout=10,
        )
        self.factory = SerialTCPFactory(self.gate, self.clock, 60, "test-proxy")

    def connect(self) -> tuple[Any, StringTransport]:
        peer = IPv4Address("TCP", "192.0.2.7", 40000)
        protocol = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def admitted(self, telnet: bool = False) -> tuple[Any, StringTransport, FakeBackend]:
        """A door whose session is relaying to a FakeBackend; the transport is cleared."""
        protocol, transport = self.connect()
        if telnet:
            protocol.dataReceived(iac(DO, ECHO) + iac(DO, SGA))
        protocol.dataReceived(b"good\r\n")
        backend = FakeBackend()
        self.sessions.relays[-1].attach_backend(backend)
        self.assertEqual(protocol.state, "relaying")
        transport.clear()
        return protocol, transport, backend


class PromptTests(DoorTestCase):
    def test_greeting(self) -> None:
        """The telnet offer, the banner line and the prompt, in one write, before any input."""
        _, transport = self.connect()
        self.assertEqual(
            transport.value(),
            bytes([255, 251, 1, 255, 251, 3])
            + b"consoled serial console: type your token and press Enter\r\ntoken: ",
        )

    def test_good_token_starts_session(self) -> None:
        """A valid token starts one session at the serial-tcp door; only a newline is echoed."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"  good \r\n")
        self.assertEqual(self.sessions.started, [(INFO, "serial-tcp", "192.0.2.7")])
        self.assertEqual(self.store.seen, hashes("good"))
        self.assertEqual(transport.value(), GREETING + b"\r\n")
        self.assertEqual(protocol.state, "admitting")

    def test_line_endings(self) -> None:
        """CR, LF, CR LF and CR NUL each end the line; the LF or NUL after CR is not forwarded."""
        for ending in (b"\r", b"\n", b"\r\n", b"\r\x00"):
            for chunks in ([b"good" + ending], [b"good\r", ending[1:]]):
                self.sessions.relays.clear()
                protocol, _ = self.connect()
                for chunk in chunks:
                    protocol.dataReceived(chunk)
                backend = FakeBackend()
                self.sessions.relays[-1].attach_backend(backend)
                protocol.dataReceived(b"x")
                self.assertEqual(backend.transport.value(), b"x", (ending, chunks))

    def test_empty_line_is_not_a_try(self) -> None:
        """Enter on an empty line prompts again without asking the gate."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"\r\n \n\r")
        self.assertEqual(self.store.seen, hashes())
        self.assertEqual(transport.value(), GREETING + (b"\r\n" + PROMPT) * 3)
        self.assertEqual(protocol.state, "prompting")

    def test_three_bad_tries(self) -> None:
        """Two refusals prompt again; the third says goodbye and closes; no session."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"bad1\rbad2\n")
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"bad3\r\n")
        line = b"\r\ninvalid or expired token\r\n"
        self.assertEqual(
            transport.value(),
            GREETING + (line + PROMPT) * 2 + line + b"too many tries, goodbye\r\n",
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.store.seen, hashes("bad1", "bad2", "bad3"))
        self.assertEqual(self.sessions.started, [])

    def test_too_long(self) -> None:
        """256 characters are refused without a look-up and count as a try; 255 are looked up."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"a" * 256 + b"\r")
        self.assertEqual(
            transport.value(), GREETING + b"\r\nbad request: token too long\r\n" + PROMPT
        )
        self.assertEqual(self.store.seen, hashes())
        protocol.dataReceived(b"b" * 255 + b"\r")
        self.assertEqual(self.store.seen, hashes("b" * 255))
        protocol.dataReceived(b"c" * 1000 + b"\r")
        self.assertTrue(transport.value().endswith(b"too many tries, goodbye\r\n"))

    def test_backspace(self) -> None:
        """DEL and BS remove the last character; extra ones on an empty line do nothing."""
        protocol, _ = self.connect()
        protocol.dataReceived(b"\x7f\x08gx\x7foox\x08d\r")
        self.assertEqual(self.store.seen, hashes("good"))

    def test_ctrl_c_leaves(self) -> None:
        """Ctrl-C at the prompt says goodbye and closes (socat raw has no other way out)."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"go\x03od\r")
        self.assertTrue(transport.value().endswith(b"goodbye\r\n"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.store.seen, hashes())

    def test_deadline(self) -> None:
        """No complete line within prompt_timeout: a line, then close; typing does not reset it."""
        protocol, transport = self.connect()
        self.clock.advance(30)
        protocol.dataReceived(b"partial")
        protocol.dataReceived(b"bad\r")
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.value().endswith(b"no token within 60s, goodbye\r\n"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.state, "closed")

    def test_store_unavailable(self) -> None:
        """A store failure is one line, then close: not a try."""
        self.store.store_down = True
        protocol, transport = self.connect()
        protocol.dataReceived(b"good\r")
        self.assertEqual(transport.value(), GREETING + b"\r\ntoken store unavailable\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_wrong_console_type(self) -> None:
        """A token for another console type is refused with its text and counts as a try."""
        self.store.tokens["vnc"] = ConnectInfo(
            **{**{f: getattr(INFO, f) for f in INFO.__dataclass_fields__}, "console_type": "novnc"}
        )
        protocol, transport = self.connect()
        protocol.dataReceived(b"vnc\r")
        self.assertEqual(
            transport.value(),
            GREETING
            + b"\r\ntoken is for another console type: novnc token at the serial-tcp door\r\n"
            + PROMPT,
        )
        self.assertEqual(self.sessions.started, [])

    def test_refusals_logged_without_token(self) -> None:
        """Each refusal is one log line naming the door and reason; the token never appears."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        protocol, _ = self.connect()
        protocol.dataReceived(b"secret-token-1\r" + b"z" * 300 + b"\r")
        self.clock.advance(60)
        refusals = [e for e in events if "refused {door}" in e.get("log_format", "")]
        self.assertEqual(
            [(e["door"], e["reason"]) for e in refusals],
            [
                ("serial-tcp", "invalid or expired token"),
                ("serial-tcp", "bad request: token too long"),
                ("serial-tcp", "no token: none within 60s"),
            ],
        )
        self.assertNotIn("secret-token", repr(list(events)))

    def test_user_leaves_during_check(self) -> None:
        """A user gone before the token check answers gets no session."""
        self.store.hold = True
        protocol, _ = self.connect()
        protocol.dataReceived(b"good\r")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.store.release()
        self.assertEqual(self.sessions.started, [])

    def test_deadline_during_check(self) -> None:
        """A token check unanswered within the gate's timeout closes, whatever the prompt's
        deadline; a late answer starts nothing, takes nothing and leaves no timer."""
        self.store.hold = True
        protocol, transport = self.connect()
        protocol.dataReceived(b"good\r")
        self.clock.advance(10)
        self.assertTrue(
            transport.value().endswith(b"token store unavailable: no answer within 10s\r\n")
        )
        self.assertTrue(transport.disconnecting)
        self.store.release()
        self.assertEqual(self.sessions.started, [])
        self.assertEqual(self.sessions.released, [])  # nothing was admitted to give back
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_early_input_forwarded_after_ready(self) -> None:
        """Bytes typed during the check reach the console after the ready line, in order."""
        self.store.hold = True
        protocol, transport = self.connect()
        protocol.dataReceived(b"good\r\nls\r")
        protocol.dataReceived(b" -l\r")
        self.store.release()
        backend = FakeBackend()
        self.sessions.relays[0].attach_backend(backend)
        self.assertEqual(backend.transport.value(), b"ls\r -l\r")
        self.assertTrue(transport.value().endswith(CONNECTED))

    def test_early_input_bounded(self) -> None:
        """Past 4 KiB typed during the check, reading pauses; it resumes once relaying."""
        self.store.hold = True
        protocol, transport = self.connect()
        protocol.dataReceived(b"good\r" + b"y" * 4096)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"y")
        self.assertEqual(transport.producerState, "paused")
        self.store.release()
        backend = FakeBackend()
        self.sessions.relays[0].attach_backend(backend)
        self.assertEqual(backend.transport.value(), b"y" * 4097)
        self.assertEqual(transport.producerState, "producing")

    def test_typed_during_refused_check_is_next_try(self) -> None:
        """A line typed while a bad token is checked is the next try."""
        self.store.hold = True
        protocol, _ = self.connect()
        protocol.dataReceived(b"bad\rgood\r")
        self.assertEqual(self.store.seen, hashes("bad"))
        self.store.release()
        self.assertEqual(self.store.seen, hashes("bad", "good"))
        self.store.release()
        self.assertEqual(len(self.sessions.started), 1)


class TelnetTests(DoorTestCase):
    def test_answers_to_the_offer_are_silent(self) -> None:
        """DO ECHO and DO SGA answer our offer: no reply; the client now speaks telnet."""
        protocol, transport = self.connect()
        protocol.dataReceived(iac(DO, ECHO) + iac(DO, SGA) + b"good\r\x00")
        self.assertTrue(protocol.speaks_telnet)
        self.assertEqual(protocol.telnet.local, {ECHO, SGA})
        self.assertEqual(transport.value(), GREETING + b"\r\n")
        self.assertEqual(self.store.seen, hashes("good"))

    def test_negotiation_replies(self) -> None:
        """Unknown options refused once per request, SGA from the client accepted, no loops."""
        protocol, transport = self.connect()
        transport.clear()
        protocol.dataReceived(iac(DO, TTYPE) + iac(WILL, NAWS) + iac(WILL, SGA) + iac(WILL, SGA))
        self.assertEqual(transport.value(), iac(WONT, TTYPE) + iac(DONT, NAWS) + iac(DO, SGA))
        transport.clear()
        protocol.dataReceived(iac(DO, ECHO) + iac(DONT, ECHO) + iac(DONT, ECHO) + iac(WONT, NAWS))
        self.assertEqual(transport.value(), iac(WONT, ECHO))
        transport.clear()
        protocol.dataReceived(iac(DO, ECHO))
        self.assertEqual(transport.value(), iac(WILL, ECHO))

    def test_refused_offer_then_asked(self) -> None:
        """DONT ECHO refuses our offer silently; a later DO ECHO gets an explicit WILL."""
        protocol, transport = self.connect()
        transport.clear()
        protocol.dataReceived(iac(DONT, ECHO) + iac(DO, ECHO))
        self.assertEqual(transport.value(), iac(WILL, ECHO))

    def test_commands_at_the_prompt_consumed(self) -> None:
        """Telnet commands inside the token line are dropped, not part of the token."""
        protocol, _ = self.connect()
        protocol.dataReceived(b"go" + iac(NOP) + iac(AYT) + iac(EC) + b"o" + iac(SB, 24) + iac(SE))
        protocol.dataReceived(b"d\r\x00")
        self.assertEqual(self.store.seen, hashes("good"))

    def test_iac_escaping_both_ways(self) -> None:
        """0xFF from the console is doubled; IAC IAC from the user is one 0xFF to the console."""
        _, transport, backend = self.admitted(telnet=True)
        relay = self.sessions.relays[-1]
        relay.from_backend(b"a\xffb")
        self.assertEqual(transport.value(), b"a\xff\xffb")
        relay.client.dataReceived(b"x\xff\xffy")
        self.assertEqual(backend.transport.value(), b"x\xffy")

    def test_commands_consumed(self) -> None:
        """BRK, IP, AO, AYT, NOP, negotiation and subnegotiation never reach the console."""
        protocol, transport, backend = self.admitted(telnet=True)
        protocol.dataReceived(
            b"a"
            + iac(BRK)
            + b"b"
            + iac(IP)
            + iac(AO)
            + iac(AYT)
            + iac(NOP)
            + iac(SB, NAWS, 0, 80, 0, 24)
            + iac(SE)
            + iac(SB, TTYPE, IAC, IAC, 1)
            + iac(SE)
            + b"c"
        )
        self.assertEqual(backend.transport.value(), b"abc")
        self.assertFalse(transport.disconnecting)

    def test_iac_split_across_chunks(self) -> None:
        """An IAC sequence cut between chunks is still one command."""
        protocol, _, backend = self.admitted(telnet=True)
        for chunk in (b"a\xff", b"\xf3b\xff", b"\xfb", b"\x18c\xff", b"\xff"):
            protocol.dataReceived(chunk)
        self.assertEqual(backend.transport.value(), b"ab" + b"c\xff")

    def test_nvt_newlines(self) -> None:
        """From a telnet client CR LF and CR NUL reach the console as CR; a raw client's stay."""
        protocol, _, backend = self.admitted(telnet=True)
        protocol.dataReceived(b"ls\r\n")
        protocol.dataReceived(b"pwd\r")
        protocol.dataReceived(b"\x00date\r\r\n")
        self.assertEqual(backend.transport.value(), b"ls\rpwd\rdate\r\r")
        raw, _, raw_backend = self.admitted()
        raw.dataReceived(b"ls\r\n\r\x00")
        self.assertEqual(raw_backend.transport.value(), b"ls\r\n\r\x00")

    def test_raw_client_stays_raw(self) -> None:
        """A client that never sent IAC before its session gets and sends 0xFF as it is."""
        protocol, transport, backend = self.admitted()
        self.sessions.relays[-1].from_backend(b"\xff\xfb\x01")
        self.assertEqual(transport.value(), b"\xff\xfb\x01")
        protocol.dataReceived(b"\xff\xff\xf3")
        self.assertEqual(backend.transport.value(), b"\xff\xff\xf3")
        self.assertFalse(protocol.speaks_telnet)


class EscapeTests(DoorTestCase):
    def test_disconnect(self) -> None:
        """Ctrl-] then . or q: bytes before it are forwarded, then disconnected as client closed."""
        for letter in b".q":
            protocol, transport, backend = self.admitted()
            protocol.dataReceived(b"ab\x1d" + bytes([letter]) + b"cd")
            self.assertEqual(backend.transport.value(), b"ab")
            self.assertEqual(transport.value(), b"\r\ndisconnected\r\n")
            self.assertTrue(transport.disconnecting)
            self.assertTrue(backend.transport.disconnecting)
            self.assertEqual(self.sessions.endings[-1], Ending(Kind.CLIENT_CLOSED, "escape"))
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.sessions.endings), 2)

    def test_who_and_help(self) -> None:
        """Ctrl-] w prints who uses the console (the session layer's answer), Ctrl-] ? the help;
        nothing reaches the console."""
        protocol, transport, backend = self.admitted()
        protocol.dataReceived(b"\x1dw")
        self.assertEqual(
            transport.value(), b"\r\nnobody else uses this console through this proxy\r\n"
        )
        self.sessions.users = "alice since 10:00"
        transport.clear()
        protocol.dataReceived(b"\x1dw\x1d?")
        output = transport.value().decode()
        self.assertIn("alice since 10:00", output)
        self.assertIn("test-proxy: escape commands", output)
        self.assertIn(". or q", output)
        self.assertEqual(backend.transport.value(), b"")

    def test_double_escape_and_others(self) -> None:
        """Ctrl-] Ctrl-] sends one Ctrl-]; Ctrl-] and another byte sends both."""
        protocol, _, backend = self.admitted()
        protocol.dataReceived(b"\x1d\x1d|\x1dx|\x1d\x00")
        self.assertEqual(backend.transport.value(), b"\x1d|\x1dx|\x1d\x00")

    def test_escape_across_chunks(self) -> None:
        """A Ctrl-] ending one chunk and its letter starting the next are one escape."""
        protocol, transport, backend = self.admitted()
        for chunk in (b"a\x1d", b"\x1db\x1d", b"zc\x1d", b"."):
            protocol.dataReceived(chunk)
        self.assertEqual(backend.transport.value(), b"a\x1db\x1dzc")
        self.assertTrue(transport.disconnecting)

    def test_escape_in_early_input(self) -> None:
        """The escape typed before the console is connected still disconnects; nothing is sent."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"good\rab\x1d.")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.sessions.relays[0].ending, Ending(Kind.CLIENT_CLOSED, "escape"))
        backend = FakeBackend()
        self.sessions.relays[0].attach_backend(backend)
        self.assertTrue(backend.transport.disconnecting)
        self.assertEqual(backend.transport.value(), b"")


class EndingTests(DoorTestCase):
    def test_ready_line(self) -> None:
        """ready() names the instance and the escape; console bytes follow."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"good\r")
        transport.clear()
        relay = self.sessions.relays[0]
        relay.attach_backend(FakeBackend())
        relay.from_backend(b"login: ")
        self.assertEqual(transport.value(), CONNECTED + b"login: ")

    def test_close_before_ready(self) -> None:
        """Refused by the session layer: `console unavailable: ENDING`, then close."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"good\r")
        transport.clear()
        self.sessions.relays[0].end(Ending(Kind.BACKEND_UNREACHABLE, "connection refused"))
        self.assertEqual(
            transport.value(), b"console unavailable: console unreachable: connection refused\r\n"
        )
        self.assertTrue(transport.disconnecting)

    def test_close_after_ready(self) -> None:
        """After ready the ending is printed in brackets on its own line, then close."""
        for ending, text in [
            (Ending(Kind.KICKED, "maintenance"), b"[disconnected by an operator: maintenance]"),
            (Ending(Kind.IDLE), b"[idle timeout]"),
            (Ending(Kind.BACKEND_CLOSED), b"[console closed the connection]"),
        ]:
            _, transport, _ = self.admitted()
            self.sessions.relays[-1].end(ending)
            self.assertEqual(transport.value(), b"\r\n" + text + b"\r\n")
            self.assertTrue(transport.disconnecting)

    def test_port_busy(self) -> None:
        """A port held by another writer (no seat here) is printed as the gate's refusal."""
        self.sessions.busy = Refusal(Kind.PORT_BUSY, "held since 2030-01-01 00:00:00 UTC")
        protocol, transport = self.connect()
        protocol.dataReceived(b"good\r")
        self.assertTrue(
            transport.value().endswith(
                b"console port in use: held since 2030-01-01 00:00:00 UTC\r\n"
            )
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.sessions.started, [])

    def test_connection_lost(self) -> None:
        """The user leaving ends the relay as client closed and leaves no timer behind."""
        protocol, transport, _ = self.admitted()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.sessions.endings, [Ending(Kind.CLIENT_CLOSED, "connection lost")])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        prompting, _ = self.connect()
        prompting.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- properties -------------------------------------------------------------


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, at = [], 0
    for size in sizes:
        chunks.append(data[at : at + size])
        at += size
    chunks.append(data[at:])
    return [c for c in chunks if c]


PLAIN = st.binary(max_size=12).map(lambda b: b.replace(b"\xff", b"").replace(b"\x1d", b""))
COMMAND = st.one_of(
    st.just(iac(IAC)),
    st.integers(0, 0xF9).filter(lambda b: b != SB).map(lambda b: iac(b)),
    st.tuples(st.sampled_from([WILL, WONT, DO, DONT]), st.integers(0, 255)).map(lambda t: iac(*t)),
    st.binary(max_size=8).map(lambda b: iac(SB) + b.replace(b"\xff", b"\xff\xff") + iac(SE)),
)
TRUNCATED = st.sampled_from([b"", iac(), iac(WILL), iac(SB, 24, 1), iac(SB, 24) + iac()])
SIZES = st.lists(st.integers(1, 9), max_size=40)


def nvt_model(parts: list[bytes]) -> bytes:
    """The console's bytes: data kept, IAC IAC one 0xFF, commands gone, CR LF/CR NUL one CR."""
    data = b"".join(
        b"\xff" if p == iac(IAC) else b"" if p.startswith(b"\xff") else p for p in parts
    )
    return re.sub(b"\r[\n\x00]", b"\r", data)


def escape_model(data: bytes) -> bytes:
    """The console's bytes: Ctrl-] Ctrl-] is one, Ctrl-] x stays, a last lone Ctrl-] waits."""
    out, at = bytearray(), 0
    while at < len(data):
        if data[at] != 0x1D:
            out.append(data[at])
            at += 1
        elif at + 1 < len(data):
            out += b"\x1d" if data[at + 1] == 0x1D else data[at : at + 2]
            at += 2
        else:
            break
    return bytes(out)


class PropertyTests(DoorTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=400), SIZES)
    def test_prompt_never_raises(self, data: bytes, sizes: list[int]) -> None:
        """Any bytes in any chunks: still prompting and open, or a last line and closed."""
        self.store.tokens.clear()
        protocol, transport = self.connect()
        for chunk in chunked(data, sizes):
            protocol.dataReceived(chunk)
        if protocol.state == "prompting":
            self.assertFalse(transport.disconnecting)
        else:
            self.assertEqual(protocol.state, "closed")
            self.assertTrue(transport.disconnecting)
            self.assertTrue(transport.value().endswith(b"\r\n"))
        self.assertEqual(self.sessions.started, [])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.one_of(PLAIN, COMMAND), max_size=30), TRUNCATED, SIZES)
    def test_telnet_stream_model(self, parts: list[bytes], tail: bytes, sizes: list[int]) -> None:
        """After ready, the console gets the model of the user's telnet stream, however chunked."""
        protocol, transport, backend = self.admitted(telnet=True)
        for chunk in chunked(b"".join(parts) + tail, sizes):
            protocol.dataReceived(chunk)
        self.assertEqual(backend.transport.value(), nvt_model(parts))
        self.assertFalse(transport.disconnecting)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.sampled_from(b"\xff\xfa\xf0\xfb\xfd\xf3\x01\x41\r\n\x00"), max_size=300), SIZES
    )
    def test_iac_storm(self, data: list[int], sizes: list[int]) -> None:
        """IAC-heavy garbage never raises nor closes; commands never become console bytes."""
        protocol, transport, backend = self.admitted(telnet=True)
        for chunk in chunked(bytes(data), sizes):
            protocol.dataReceived(chunk)
        self.assertFalse(transport.disconnecting)
        # Only IAC IAC yields a 0xFF, so at most half the input's IACs reach the console.
        forwarded = backend.transport.value()
        self.assertLessEqual(forwarded.count(b"\xff"), bytes(data).count(b"\xff") // 2)
        self.assertLessEqual(len(forwarded), len(data))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from(b"ab\x1d\x00"), max_size=60), SIZES)
    def test_escape_chunking(self, data: list[int], sizes: list[int]) -> None:
        """The escape filter gives the same bytes however the input is chunked."""
        protocol, _, backend = self.admitted()
        raw = bytes(data)
        for chunk in chunked(raw, sizes):
            protocol.dataReceived(chunk)
        self.assertEqual(backend.transport.value(), escape_model(raw))


# -- integration: real sockets, a real store, QEMU's monitor, real telnet -----------


class TerminalClient(Protocol):
    """A raw TCP user: collects bytes; ``until(marker)`` fires once it has arrived."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def _check(self) -> None:
        for marker, d in list(self._waiting):
            if marker in self.received:
                self._waiting.remove((marker, d))
                d.callback(self.received)

    def until(self, marker: bytes, timeout: float = 10) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting.append((marker, d))
        self._check()
        return d.addTimeout(timeout, reactor)

    def connectionLost(self, reason: Failure) -> None:
        self.closed.callback(None)


class TelnetProcess(ProcessProtocol):
    """The real telnet program on a PTY, collecting its terminal output."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred[bytes]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for marker, d in list(self._waiting):
            if marker in self.output:
                self._waiting.remove((marker, d))
                d.callback(self.output)

    def until(self, marker: bytes, timeout: float = 10) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting.append((marker, d))
        self.outReceived(b"")
        return d.addTimeout(timeout, reactor)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)

    def stop(self) -> defer.Deferred[None]:
        if not self.ended.called:
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        return self.ended


class RealPeerTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        path = os.path.abspath(self.mktemp()) + ".sqlite"
        self.engine = make_engine(f"sqlite:///{path}")
        schema.upgrade(self.engine)
        self.addCleanup(self.engine.dispose)
        self.store = Store(self.engine, ThreadRunner(reactor, 2), reactor)
        self.store.start()
        self.addCleanup(self.store.stop)
        self.sessions = Sessions(self.store, reactor, "test-proxy")
        self.sessions.startService()
        self.addCleanup(self.sessions.stopService)
        gate = Gate(self.store, self.sessions, reactor, timeout=10)
        factory = SerialTCPFactory(gate, reactor, 10, "test-proxy")
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    def authorize(self, host: str, port: int) -> defer.Deferred[Any]:
        return self.store.authorize(
            console_type="serial",
            host=host,
            port=port,
            instance_uuid=INSTANCE,
            access_url_base="ws://127.0.0.1:6083/",
            ttl=600,
        )

    @defer.inlineCallbacks
    def user(self) -> Any:
        client = TerminalClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        return client

    def rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            query = sa.select(sessions_table).order_by(sessions_table.c.id)
            return [dict(row._mapping) for row in connection.execute(query)]

    @defer.inlineCallbacks
    def test_raw_client_reaches_qemu_monitor(self) -> Any:
        """A raw socket user types the token, reaches QEMU's monitor, asks `info status`, leaves."""
        qemu = yield start_qemu_monitor(self)
        issued = yield self.authorize(qemu.host, qemu.port)
        client = yield self.user()
        greeting = yield client.until(b"token: ")
        self.assertTrue(greeting.startswith(OFFER + BANNER))
        client.transport.write(issued.token.encode() + b"\r\n")
        yield client.until(b"(qemu) ")
        self.assertIn(CONNECTED, client.received)
        client.transport.write(b"info status\r")
        yield client.until(b"VM status: running")
        client.transport.write(b"\x1d.")
        yield client.closed
        self.assertIn(b"\r\ndisconnected\r\n", client.received)
        self.assertNotIn(issued.token.encode(), client.received)
        yield self.sessions.settled()
        (row,) = self.rows()
        self.assertEqual(row["door"], "serial-tcp")
        self.assertEqual(row["end_reason"], "client closed the connection: escape")

    @defer.inlineCallbacks
    def test_bad_tokens_then_goodbye(self) -> Any:
        """Three unknown tokens against the real store: three refusals, goodbye, no session row."""
        client = yield self.user()
        yield client.until(b"token: ")
        client.transport.write(b"nope\r\nnope\nnope\r")
        yield client.closed
        self.assertEqual(client.received.count(b"invalid or expired token\r\n"), 3)
        self.assertTrue(client.received.endswith(b"too many tries, goodbye\r\n"))
        self.assertEqual(self.rows(), [])

    @defer.inlineCallbacks
    def test_second_user_of_a_port_refused(self) -> Any:
        """While one user holds the serial port a second is told it is in use; then it is free."""
        echo = hypervisors.serve(self, hypervisors.Echo)
        first = yield self.user()
        yield first.until(b"token: ")
        first.transport.write((yield self.authorize("127.0.0.1", echo.port)).token.encode() + b"\r")
        yield first.until(CONNECTED)
        second = yield self.user()
        yield second.until(b"token: ")
        second.transport.write(
            (yield self.authorize("127.0.0.1", echo.port)).token.encode() + b"\r"
        )
        yield second.closed
        self.assertIn(b"\r\nconsole port in use: held since", second.received)
        first.transport.write(b"ping")
        yield first.until(b"ping")
        first.transport.loseConnection()
        yield first.closed
        yield self.sessions.settled()
        rows = self.rows()
        self.assertEqual(len(rows), 2)
        self.assertTrue(all(r["ended_at"] is not None for r in rows), rows)

    @defer.inlineCallbacks
    def test_real_telnet_reaches_qemu_monitor(self) -> Any:
        """The telnet program: token not echoed, `info status` answered, Ctrl-] via `send escape`."""
        telnet = require_executable(self, "telnet", "apt-get install -y telnet")
        qemu = yield start_qemu_monitor(self)
        issued = yield self.authorize(qemu.host, qemu.port)
        process = TelnetProcess()
        reactor.spawnProcess(
            process,
            telnet,
            [telnet, "127.0.0.1", str(self.port)],
            env={"TERM": "dumb", "PATH": os.environ.get("PATH", "")},
            usePTY=True,
        )
        self.addCleanup(process.stop)
        yield process.until(b"token: ")
        process.transport.write(issued.token.encode() + b"\r")
        yield process.until(b"(qemu) ")
        process.transport.write(b"info status\r")
        yield process.until(b"VM status: running")
        # telnet keeps Ctrl-] for itself; its own prompt sends one on.
        process.transport.write(b"\x1d")
        yield process.until(b"telnet>")
        process.transport.write(b"send escape\r")
        process.transport.write(b".")
        yield process.until(b"disconnected")
        yield process.ended
        self.assertNotIn(issued.token.encode(), process.output)
        yield self.sessions.settled()
        (row,) = self.rows()
        self.assertEqual(row["end_reason"], "client closed the connection: escape")
