"""Random resets on the serial doors reach no reactor handler and leave nothing open (issue 15.4).

Many connections to the serial websocket door and the raw serial door are
opened and reset (SO_LINGER 0 then close: an RST) at a random point of
their life: while the token is being typed or the request head sent,
right after the token is sent (the gate is admitting), right after the
session starts, and in the middle of relaying.  Connections run in lanes,
one lane per console port, one connection after another, so each one is a
reconnect right after the reset of the one before it on the same port.

Afterwards: no log event is an error (``isError``, ``log_failure``), none
is critical, none says ``while handling timed call``; every session row is
ended and no serial lease is held; and no reconnect was refused because
the port was held by the session its own reset was ending.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from consoled.doors.serial_tcp import PROMPT
from consoled.store.tables import serial_leases, sessions
from tests import hypervisors
from tests.harness import Consoled, test_settings
from tests.serialclient import CONNECTED
from tests.wsclient import HOST, upgrade_request

#: Console ports (lanes) per door, and connections per lane.
LANES = 6
PER_LANE = 30
POINTS = ("prompt", "admission", "started", "relay")
MASK = b"\x11\x22\x33\x44"


def masked(payload: bytes) -> bytes:
    """A client's binary frame (short payloads only)."""
    body = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes([0x82, 0x80 | len(payload)]) + MASK + body


class Resetter(Protocol):
    """Drives one connection to ``point``, then resets it; ``lost`` fires with the outcome.

    The outcome is ``("reset", point)`` when it got there, else
    ``("closed", bytes received)``: the door ended it first (a refusal).
    """

    def __init__(self, door: str, token: str, point: str, rng: random.Random) -> None:
        self.door, self.token, self.point, self.rng = door, token, point, rng
        self.received = b""
        self.outcome: tuple[str, Any] | None = None
        self.lost: defer.Deferred[tuple[str, Any]] = defer.Deferred()
        self._sent_relay = False

    def _send(self, data: bytes) -> None:
        # Straight to the socket: an abort would discard what Twisted queued.
        self.transport.getHandle().send(data)

    def _reset(self) -> None:
        if self.outcome is None:
            self.outcome = ("reset", self.point)
            self.transport.abortConnection()  # SO_LINGER 0, then close: an RST

    def connectionMade(self) -> None:
        if self.door == "serial":
            head = upgrade_request(
                f"/?token={self.token}", extra="Sec-WebSocket-Protocol: binary\r\n"
            )
            if self.point == "prompt":
                self._send(head[: self.rng.randrange(1, len(head))])
                self._reset()
            else:
                self._send(head)
                if self.point == "admission":
                    self._reset()

    def dataReceived(self, data: bytes) -> None:
        if self.outcome is not None:
            return
        self.received += data
        if self.door == "serial-tcp":
            self._terminal()
        else:
            self._websocket()

    def _terminal(self) -> None:
        if PROMPT not in self.received:
            return
        line = self.token.encode() + b"\r\n"
        if self.point == "prompt":
            self._send(line[: self.rng.randrange(0, len(line))])
            self._reset()
        elif self.point == "admission":
            self._send(line)
            self._reset()
        elif CONNECTED in self.received:
            self._started(self.received.split(CONNECTED, 1)[1])
        elif not self._sent_relay:
            self._sent_relay = True
            self._send(line)

    def _websocket(self) -> None:
        head, sep, rest = self.received.partition(b"\r\n\r\n")
        if not sep:
            return
        if not head.startswith(b"HTTP/1.1 101"):
            return  # refused: the door closes, connectionLost says so
        self._started(rest)

    def _started(self, after: bytes) -> None:
        if self.point == "started":
            self._reset()
        elif not self._sent_relay or after == b"":
            self._sent_relay = True
            chunk = b"x" * self.rng.randrange(1, 100)
            self._send(masked(chunk) if self.door == "serial" else chunk)
        else:
            self._send(b"more" if self.door == "serial-tcp" else masked(b"more"))
            self._reset()

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(self.outcome or ("closed", self.received))


def problems(events: list[dict[str, Any]]) -> list[str]:
    """The events a reset must never cause, as text."""
    bad = []
    for event in events:
        text = formatEvent(event) or ""
        if (
            event.get("isError")
            or "log_failure" in event
            or event.get("log_level") in (LogLevel.error, LogLevel.critical)
            or "while handling timed call" in text
        ):
            failure = event.get("log_failure") or event.get("failure")
            bad.append(text + ("\n" + failure.getTraceback() if failure is not None else ""))
    return bad


class SerialChurnTests(TestCase):
    timeout = 50

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.consoled = Consoled(self, test_settings())

    @defer.inlineCallbacks
    def lane(self, door: str, rng: random.Random, outcomes: Counter[str]) -> Any:
        """PER_LANE connections to one console port, each right after the last one's end."""
        echo = hypervisors.serve(self, hypervisors.Echo)
        issued = yield self.consoled.authorize("serial", "127.0.0.1", echo.port)
        endpoint = TCP4ClientEndpoint(reactor, HOST, self.consoled.port(door), timeout=5)
        before = "-"
        for _ in range(PER_LANE):
            client = Resetter(door, issued.token, rng.choice(POINTS), rng)
            yield connectProtocol(endpoint, client)
            kind, detail = yield client.lost.addTimeout(10, reactor)
            if kind == "reset":
                outcomes[f"{door} reset {detail}"] += 1
                before = detail
            elif b"port in use" in detail or b" 409 " in detail:
                outcomes[f"{door} refused port in use after a reset {before}"] += 1
            else:
                outcomes[f"{door} closed: {detail[-80:]!r}"] += 1

    def open_rows(self) -> tuple[int, int]:
        with self.consoled.engine.connect() as connection:
            open_rows = connection.execute(
                sa.select(sa.func.count()).where(sessions.c.ended_at.is_(None))
            ).scalar()
            leases = connection.execute(sa.select(sa.func.count()).select_from(serial_leases))
            return int(open_rows or 0), int(leases.scalar() or 0)

    @defer.inlineCallbacks
    def test_random_resets(self) -> Any:
        """LANES x PER_LANE resets on each serial door: no error logged, no
        ``while handling timed call``, no row open, no lease held, no
        reconnect refused as "port in use"."""
        seed = random.randrange(1 << 32)
        outcomes: Counter[str] = Counter()
        lanes = [
            self.lane(door, random.Random(seed + n), outcomes)
            for n, door in enumerate(["serial", "serial-tcp"] * LANES)
        ]
        yield defer.gatherResults(lanes, consumeErrors=True)
        yield self.consoled.wait_doors_idle()
        yield self.consoled.wait_sessions_ended()
        # A turn of the reactor for timers due now (a reset's last callbacks).
        yield defer.Deferred.fromCoroutine(_turn())
        report = f"seed {seed}: {dict(sorted(outcomes.items()))}"
        self.assertEqual(problems(self.events), [], report)
        self.assertEqual(self.open_rows(), (0, 0), f"{report} {self.consoled.session_rows()[-3:]}")
        refused = sum(n for what, n in outcomes.items() if "refused" in what)
        self.assertEqual(refused, 0, report)
        self.assertEqual(sum(outcomes.values()), 2 * LANES * PER_LANE, report)
        resets = sum(n for what, n in outcomes.items() if " reset " in what)
        self.assertEqual(resets, 2 * LANES * PER_LANE, report)


async def _turn() -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0, lambda: None)
