"""No session outlives its client: upgrades dropped during admission leave nothing (issue 12, 8).

A websocket upgrade with a valid token whose client hangs up before the
token look-up has returned used to leave a live protocol behind (about
10 kB each, for good), and Autobahn's auto-ping fired on those dead
connections later (ping timeouts, critical ``call_later bucket`` lines, an
AlreadyCalledError for each whose client had sent bytes after the head).
Here thousands of such upgrades are opened and dropped, every other one
with a frame after its head, every other pair hung up with a reset (an
abort) rather than a FIN:

- in process: 1,000 whose look-ups are held until the door has seen every
  one of them go, so that all of those leave during admission; then 3,000
  hung up at once, so that some are read as gone while their look-up is
  out and some only after their session started.  Once every admission
  has settled and a good session has been pinged: no protocol of theirs is
  alive, no session row is open, no lease is held, no reactor timer or
  Autobahn timer bucket of theirs is left, nothing logged holds the token
  or is critical;
- against a real ``twistd consoled``: after 3,000 drops as fast as they go
  to warm up, 3,000 more, paced by a good session after each batch, leave
  its resident memory within 2 MiB of where it was, and its log shows no
  ping timeout, AlreadyCalledError, critical line or traceback once a good
  session has been pinged for longer than a ping timeout.

Nothing sleeps: batches wait on their connections' ends, admissions on the
look-ups they made, and time passing on the pings of a good session
(``ping_interval = 1``).
"""

from __future__ import annotations

import gc
import math
import os
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from consoled.doors.web import DoorProtocol
from consoled.doors.websocket import ConsoleServerFactory, ConsoleServerProtocol
from consoled.store import Store
from consoled.store.runner import InlineRunner, observe
from consoled.store.tables import serial_leases
from tests import hypervisors
from tests.daemon import start_consoled_on_free_ports
from tests.databases import upgraded_engine
from tests.harness import INSTANCE, Consoled, test_settings
from tests.wsclient import HOST, StreamClient, upgrade_request

log = Logger()

#: Upgrades dropped at once (in process and against the daemon), upgrades
#: dropped with their look-ups held (in process), and how many at a time.
DROPS = 3000
HELD_DROPS = 1000
IN_FLIGHT = 100
#: Drops before the daemon's memory is first read, unpaced: its allocator
#: grows to the peak of a flood (see the daemon test), above what paced drops need.
WARM_UP = 3000
#: How far the daemon's resident memory may be from where it was.
RSS_SLACK = 2 * 1024 * 1024
#: Seconds between Autobahn's pings, and how long it waits for the pong (the
#: door's autoPingTimeout: the interval, at least 10 s).
PING_INTERVAL = 1
PING_TIMEOUT = max(PING_INTERVAL, 10)
_MASK = b"\x01\x02\x03\x04"
#: A masked binary frame ("hello"): the bytes some clients send after the head.
FRAME_AFTER_HEAD = b"\x82\x85" + _MASK + bytes(b ^ _MASK[i % 4] for i, b in enumerate(b"hello"))
#: What a connection left behind would make Autobahn or Twisted log (lower case).
BAD_SIGNS = (
    "ping timeout",
    "ping/pong",
    "dropping connection",
    "alreadycallederror",
    "call_later bucket",
    "traceback",
    "unhandled",
)


class _Drop(Protocol):
    """Sends an upgrade head (maybe a frame after it), then hangs up: FIN or reset.

    It hangs up at once, or when ``hang_up`` fires.
    """

    def __init__(self, data: bytes, reset: bool, hang_up: defer.Deferred[None] | None) -> None:
        self.data = data
        self.reset = reset
        self.hang_up = hang_up
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        # Straight into the socket: Twisted's write would wait for the next
        # turn, and an abort would discard it unsent.
        sent = self.transport.getHandle().send(self.data)
        assert sent == len(self.data), (sent, len(self.data))
        if self.hang_up is None:
            self._hang_up()
        else:
            self.hang_up.addCallback(lambda result: self._hang_up())

    def _hang_up(self) -> None:
        if self.reset:
            self.transport.abortConnection()  # Twisted sets SO_LINGER 0: RST
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


def _batches(port: int, token: str, count: int) -> Any:
    """Each batch of up to IN_FLIGHT drops as (endpoint, [(data, reset)]): every other
    one with a frame after its head, every other pair reset instead of closed."""
    head = upgrade_request(f"/?token={token}", extra="Sec-WebSocket-Protocol: binary\r\n")
    endpoint = TCP4ClientEndpoint(reactor, HOST, port, timeout=5)
    for start in range(0, count, IN_FLIGHT):
        numbers = range(start, min(count, start + IN_FLIGHT))
        yield (
            endpoint,
            [(head + (FRAME_AFTER_HEAD if n % 2 else b""), bool(n // 2 % 2)) for n in numbers],
        )


@defer.inlineCallbacks
def drop_upgrades(
    port: int, token: str, count: int, between: Callable[[], defer.Deferred[Any]] | None = None
) -> Any:
    """Open ``count`` upgrades with ``token``, each hung up as soon as it is sent;
    ``between`` batches, wait for what it returns."""
    for endpoint, shapes in _batches(port, token, count):
        drops = [_Drop(data, reset, None) for data, reset in shapes]
        yield defer.gatherResults([connectProtocol(endpoint, drop) for drop in drops])
        yield defer.gatherResults([drop.lost for drop in drops]).addTimeout(10, reactor)
        if between is not None:
            yield between()


class Lookups:
    """The gate's token look-ups through one store: each one kept; while holding, each waits.

    The gate calls ``store.find_token``; this takes its place on that one
    store object.
    """

    def __init__(self, store: Store) -> None:
        self._find = store.find_token
        self.made: list[defer.Deferred[Any]] = []
        self._held: list[tuple[str, defer.Deferred[Any]]] = []
        self._holding: tuple[int, defer.Deferred[None]] | None = None
        store.find_token = self.find  # type: ignore[method-assign]

    def find(self, token_hash: str, opening: Any = None) -> defer.Deferred[Any]:
        if self._holding is None:
            d = self._find(token_hash, opening)
        else:
            d = defer.Deferred()
            self._held.append((token_hash, d))
            count, all_held = self._holding
            if len(self._held) == count:
                all_held.callback(None)
        self.made.append(d)
        return d

    def hold(self, count: int) -> defer.Deferred[None]:
        """Hold look-ups from now on; fires once ``count`` are waiting."""
        all_held: defer.Deferred[None] = defer.Deferred()
        self._holding = (count, all_held)
        return all_held.addTimeout(10, reactor)

    def release(self) -> None:
        """Let the held look-ups go to the store, and the ones after them."""
        self._holding = None
        held, self._held = self._held, []
        for token_hash, d in held:
            self._find(token_hash).chainDeferred(d)

    def settled(self) -> defer.Deferred[Any]:
        """Fires once every look-up so far has returned and the gate has acted on it
        (``observe`` is added behind the gate's own callbacks)."""
        return defer.gatherResults([observe(d) for d in self.made]).addTimeout(20, reactor)


@defer.inlineCallbacks
def until(condition: Callable[[], bool], timeout: float = 10) -> Any:
    """Fire once ``condition()`` holds, checked on every turn of the reactor."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise defer.TimeoutError(f"{condition} still false after {timeout}s")
        yield deferLater(reactor, 0, lambda: None)


@defer.inlineCallbacks
def drop_upgrades_held(
    port: int, token: str, count: int, lookups: Lookups, websocket: ConsoleServerFactory
) -> Any:
    """Open ``count`` upgrades whose look-ups wait until the door has seen their client go.

    Per batch: every look-up is held; the clients hang up; once Autobahn
    counts no connection left (each protocol has run onClose), the look-ups
    go on, and each arrives at a gate whose client has left.  No other
    websocket may be open meanwhile.
    """
    for endpoint, shapes in _batches(port, token, count):
        hang_up: defer.Deferred[None] = defer.Deferred()
        drops = [_Drop(data, reset, hang_up) for data, reset in shapes]
        all_held = lookups.hold(len(drops))
        yield defer.gatherResults([connectProtocol(endpoint, drop) for drop in drops])
        yield all_held
        hang_up.callback(None)
        yield defer.gatherResults([drop.lost for drop in drops]).addTimeout(10, reactor)
        yield until(lambda: websocket.countConnections == 0)
        lookups.release()


class PingedClient(StreamClient):
    """A byte-stream websocket client that counts the server's pings (and answers them)."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def onPing(self, payload: bytes) -> None:
        super().onPing(payload)
        self.pings += 1
        due = [w for w in self._waiting if w[0] <= self.pings]
        self._waiting = [w for w in self._waiting if w[0] > self.pings]
        for _, d in due:
            d.callback(None)

    def pinged(self, count: int) -> defer.Deferred[None]:
        """Fire once ``count`` pings in all have arrived."""
        if self.pings >= count:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((count, d))
        return d.addTimeout(count * PING_INTERVAL + 10, reactor)


def connect_pinged(port: int, token: str) -> defer.Deferred[PingedClient]:
    """A PingedClient through the websocket door at ``port``; fires once open.

    Its connection is accepted after every drop made before it, and its
    admission returns from a store thread a turn after their heads were read:
    once it is open, every look-up of theirs has been asked for.
    """
    factory = WebSocketClientFactory(f"ws://{HOST}:{port}/?token={token}", protocols=["binary"])
    factory.protocol = PingedClient
    # Its admission waits behind thousands of look-ups on one store thread:
    # on a loaded machine that takes longer than Autobahn's default 5 s.
    factory.setProtocolOptions(openHandshakeTimeout=30)
    endpoint = TCP4ClientEndpoint(reactor, HOST, port, timeout=5)
    return endpoint.connect(factory).addCallback(lambda client: client.opened)


@defer.inlineCallbacks
def open_and_close(port: int, token: str) -> Any:
    """A good session, closed as soon as it is open: its admission waited behind
    every look-up asked for before it (see `connect_pinged`)."""
    client = yield connect_pinged(port, token)
    client.sendClose(1000)
    yield client.closed


@defer.inlineCallbacks
def close_after_pings(client: PingedClient, pings: int) -> Any:
    """Once ``client`` has seen ``pings`` pings: check it still relays, then close it."""
    yield client.pinged(pings)
    client.send(b"still here")
    echoed = yield client.read(len(b"still here"))
    client.sendClose(1000)
    yield client.closed
    return echoed


def capture_log(testcase: TestCase) -> list[tuple[LogLevel, str]]:
    """Every event from now on as (level, its text and fields), holding no object of its."""
    seen: list[tuple[LogLevel, str]] = []

    def keep(event: dict[str, Any]) -> None:
        # Text only: an event may carry the protocol it came from, which
        # would otherwise stay alive in this list and be counted as a leak.
        text = formatEvent(event) or ""
        fields = " ".join(f"{name}={value!r}" for name, value in event.items())
        seen.append((event.get("log_level", LogLevel.info), f"{text} | {fields}"))

    globalLogPublisher.addObserver(keep)
    testcase.addCleanup(globalLogPublisher.removeObserver, keep)
    return seen


def alive(*kinds: type) -> list[Any]:
    """Every object of ``kinds`` still alive after a full collection."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, kinds)]


def owner(call: Any) -> Any:
    """The object a DelayedCall's function is a method of (or the function itself)."""
    return getattr(call.func, "__self__", call.func)


def name_of(f: Any) -> str:
    """A callable's qualified name; for a closure (txaio's wrapper), the callable inside."""
    for cell in getattr(f, "__closure__", None) or ():
        inside = cell.cell_contents
        if callable(inside) and hasattr(inside, "__qualname__"):
            return name_of(inside)
    return getattr(f, "__qualname__", repr(f))


def shown(protocol: Any) -> str:
    """What a protocol left alive was doing: its class and, for the door's, its state."""
    if not isinstance(protocol, ConsoleServerProtocol):
        return type(protocol).__name__
    return (
        f"ConsoleServerProtocol(state={protocol.state}, gone={protocol._gone}, "
        f"admitted={protocol._pass is not None}, relay={protocol.relay is not None})"
    )


def with_bad_signs(texts: Any) -> list[str]:
    """The texts (log lines) that show one of BAD_SIGNS."""
    return [text for text in texts if any(sign in text.lower() for sign in BAD_SIGNS)]


def tally(things: Any) -> list[str]:
    """``n x thing`` for each distinct thing, the most common first (empty: none)."""
    return [f"{count} x {thing}" for thing, count in Counter(things).most_common()]


class DroppedUpgradesInProcessTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_dropped_upgrades_leave_nothing_behind(self) -> Any:
        """4,000 upgrades with a valid token dropped during admission (1,000 of them with
        the look-up held until consoled saw them go) leave no protocol, no open row or
        lease, no reactor or Autobahn timer, and no token or critical line in the log,
        once every admission has settled and a good session has been pinged."""
        events = capture_log(self)
        consoled = Consoled(self, test_settings(ping_interval=PING_INTERVAL))
        echo = hypervisors.serve(self, hypervisors.Echo)
        issued = yield consoled.authorize("novnc", "127.0.0.1", echo.port)
        port = consoled.port("novnc")
        websocket: ConsoleServerFactory = consoled.top.getServiceNamed("novnc").factory.websocket
        # Protocols other tests left to trial (a test case's attributes) are not ours.
        theirs = weakref.WeakSet(alive(ConsoleServerProtocol, DoorProtocol))
        lookups = Lookups(consoled.store)

        yield drop_upgrades_held(port, issued.token, HELD_DROPS, lookups, websocket)
        yield lookups.settled()
        held = len(lookups.made)
        started_held = len(consoled.session_rows())

        yield drop_upgrades(port, issued.token, DROPS)
        client = yield connect_pinged(port, issued.token)
        yield lookups.settled()
        at_once = len(lookups.made) - held - 1  # the good session's is the last
        started_at_once = len(consoled.session_rows()) - started_held - 1

        echoed = yield close_after_pings(client, 1)
        self.assertEqual(echoed, b"still here")
        yield consoled.wait_sessions_ended().addTimeout(10, reactor)
        # A session's row can end before its backend connection has; the echo
        # server sees each close only once consoled's side has run connectionLost.
        yield defer.gatherResults([each.lost for each in echo.connected]).addTimeout(10, reactor)
        # Check from a fresh turn of the reactor: this may still be running
        # inside the callback that ended the last row, whose frames hold its session.
        yield deferLater(reactor, 0, lambda: None)

        log.info(
            "{drops} drops at once: {reached} reached the gate, {started} started a session "
            "(their hang-up read after their admission); {held} of {held_drops} held: "
            "{started_held} started",
            drops=DROPS,
            reached=at_once,
            started=started_at_once,
            held=held,
            held_drops=HELD_DROPS,
            started_held=started_held,
        )
        # Every held drop reached the gate and left while it was admitting them.
        self.assertEqual((held, started_held), (HELD_DROPS, 0))
        self.assertGreater(at_once, DROPS // 2, "too few drops reached the gate")
        # (a) no protocol of theirs is alive, and Autobahn counts no connection
        ours = [p for p in alive(ConsoleServerProtocol, DoorProtocol) if p not in theirs]
        self.assertEqual(tally(map(shown, ours)), [])
        self.assertEqual(websocket.countConnections, 0)
        # (b) every row ended (the good session's, and those of drops whose
        # hang-up was read after their admission), no lease held
        self.assertEqual([r for r in consoled.session_rows() if r["ended_at"] is None], [])
        with consoled.engine.connect() as connection:
            self.assertEqual(connection.execute(sa.select(serial_leases)).all(), [])
        # (c) no timer of theirs in the reactor, nothing in Autobahn's batched timer
        left = [
            name_of(call.func)
            for call in reactor.getDelayedCalls()
            if isinstance(owner(call), (ConsoleServerProtocol, DoorProtocol))
            or getattr(call.func, "__name__", "") in ("_too_slow", "_notify_bucket", "_timed_out")
        ]
        self.assertEqual(tally(left), [])
        # txaio's batched timer shows its pending calls only in its buckets
        # (bucket time -> (the bucket's DelayedCall, its calls)).
        buckets = websocket._batched_timer._buckets.values()
        self.assertEqual(tally(name_of(call) for _, calls in buckets for call in calls), [])
        # (d) the log: no token, nothing critical, no sign of a dead connection's timers
        self.assertEqual([text for _, text in events if issued.token in text], [])
        self.assertEqual([text for level, text in events if level == LogLevel.critical], [])
        self.assertEqual(with_bad_signs(text for _, text in events), [])


def rss(pid: int) -> int:
    """A process's resident set size in bytes (VmRSS in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class DroppedUpgradesDaemonTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_memory_returns_after_dropped_upgrades(self) -> Any:
        """A real twistd consoled's resident memory is back within 2 MiB after 3,000
        upgrades with a valid token are dropped, and its log shows no ping timeout,
        AlreadyCalledError, critical line or traceback once a good session has been
        pinged for longer than any left-behind connection's ping would take to time out."""
        url = "sqlite:///" + os.path.abspath(self.mktemp()) + ".sqlite"
        engine = upgraded_engine(self, url)
        # The rows the drops write grow the file, and SQLite caches its pages,
        # up to 2 MiB for each of the store's connections: a cache, not a leak.
        # A small cache (stored in the file) and one store thread keep it and the
        # thread's malloc arena out of the reading.
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA default_cache_size = 16")
            connection.commit()
        daemon, _, (port,) = yield start_consoled_on_free_ports(
            self,
            1,
            lambda ports: (
                f"[database]\nconnection = {url}\n"
                f"[vnc]\nnovncproxy_host = 127.0.0.1\nnovncproxy_port = {ports[0]}\n"
                f"[consoled]\nxvp_enabled = false\nping_interval = {PING_INTERVAL}\n"
                # Thousands of upgrades from 127.0.0.1 with one token: no limits.
                "max_connections_per_address = 0\n"
                "max_sessions_per_token = 0\nmax_sessions_per_instance = 0\n"
                "db_threads = 1\n"
            ),
        )
        echo = hypervisors.serve(self, hypervisors.Echo)
        issued = yield Store(engine, InlineRunner(), reactor).authorize(
            console_type="novnc",
            host="127.0.0.1",
            port=echo.port,
            instance_uuid=INSTANCE,
            access_url_base="http://127.0.0.1/",
            ttl=600,
        )
        pid = daemon.transport.pid

        # The warm-up drops as fast as they go: store work queues up behind them,
        # and the allocator's high-water marks (freed heap is kept: consoled.malloc)
        # end above anything the measured drops need.  Those are paced, a good
        # session after each batch waiting until the store has caught up with its
        # look-ups, so the reading is what stays, not one queue's high-water mark
        # against another's (a MiB or two apart from one run to the next).
        def pace() -> defer.Deferred[Any]:
            return open_and_close(port, issued.token)

        yield drop_upgrades(port, issued.token, WARM_UP)
        # A paced round like the measured one, unmeasured: under a loaded CPU
        # (CI runs two test processes) paced drops overlap differently from the
        # flood and once raised the heap's high-water mark by 2.2 MiB on their
        # first round.  A leak grows with every round; a high-water mark, once.
        yield drop_upgrades(port, issued.token, DROPS, between=pace)
        yield pace()
        before = rss(pid)
        yield drop_upgrades(port, issued.token, DROPS, between=pace)
        # A connection left behind would ping PING_INTERVAL after it opened and
        # time out PING_TIMEOUT later: a session opened after the drops that
        # has seen this many pings has outlived both.
        client = yield connect_pinged(port, issued.token)
        yield close_after_pings(
            client, math.ceil((PING_INTERVAL + PING_TIMEOUT) / PING_INTERVAL) + 1
        )
        after = rss(pid)

        growth = after - before
        log.info(
            "daemon RSS {before} -> {after} bytes ({growth:+d}) over {drops} drops",
            before=before,
            after=after,
            growth=growth,
            drops=DROPS,
        )
        self.assertLess(growth, RSS_SLACK, f"RSS {before / 2**20:.2f} -> {after / 2**20:.2f} MiB")
        lines = daemon.text().splitlines()
        self.assertEqual([line for line in lines if issued.token in line], [])
        self.assertEqual([line for line in lines if "critical" in line.lower()], [])
        self.assertEqual(with_bad_signs(lines), [])
