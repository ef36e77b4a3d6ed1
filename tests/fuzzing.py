"""Fuzzing the doors in memory: one rig per door, the pieces inputs are made of, one feed.

A :class:`DoorRig` builds a door's real factory over an :class:`InlineCore`
(a real SQLite store run inline, a MemoryReactorClock that Autobahn's timers
run on too) and :meth:`DoorRig.feed` plays one connection: the bytes in the
given chunks, maybe the timeouts, then the user leaves.  It returns what went
wrong, if anything: an exception out of the protocol, an error logged, a
session still live, a row left open, a lease held, a timer left behind.

``tests/test_*_fuzz.py`` drive rigs from hypothesis, bounded for CI;
``benchmarks/fuzz.py`` drives them from a seeded random source for
hundreds of thousands of inputs and watches memory.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import txaio
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from consoled.doors.serial_tcp import SerialTCPFactory
from consoled.doors.web import DoorFactory, door_site
from consoled.doors.websocket import ConsoleServerFactory, Door
from consoled.doors.xvp import XVPFactory
from tests.inline import InlineCore

TOKEN = b"<TOKEN>"
PEER = IPv4Address("TCP", "192.0.2.9", 40000)
#: Door name: (console type of its token, the token row's access_url_base).
DOORS = {
    "serial-tcp": ("serial", "ws://x/"),
    "xvp": ("xvpvnc", "http://x/console"),
    "novnc": ("novnc", "http://x/vnc_lite.html"),
    "serial": ("serial", "ws://x/"),
    "webmks": ("webmks", "https://x/webmks.html"),
}
WEBSOCKET_DOORS = ("novnc", "serial", "webmks")


def _frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    key = b"\x01\x02\x03\x04"
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


_UPGRADE = (
    b"GET /?token=" + TOKEN + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
)

#: Per door, the pieces an input is a few of (besides random bytes).
PIECES: dict[str, list[bytes]] = {
    "serial-tcp": [
        TOKEN + b"\r\n",
        TOKEN + b"\r\x00",
        b"\xff",
        b"\xff\xfd\x01",
        b"\xff\xf3",
        b"\xff\xff",
        b"\xff\xfa\x18",
        b"a" * 300 + b"\r\n",
        b"\r\n",
        b"\x7f",
        b"\x1d.",
        b"\x1d",
        b"\x1dw",
        b"\x1d?",
        b"\x03",
    ],
    "xvp": [
        b"CONNECT /console?token=" + TOKEN + b" HTTP/1.0\r\n\r\n",
        b"CONNECT /console?token=" + TOKEN + b" HTTP/1.1\r\nHost: x\r\n\r\nRFB 003.008\n",
        b"CONNECT /console HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"CONNECT * HTTP/2\r\n",
        b"X-Big: " + b"a" * 9000 + b"\r\n",
        b"\r\n",
        b"\n",
    ],
    "websocket": [
        _UPGRADE,
        _UPGRADE.replace(b"token=" + TOKEN, b"token=bad"),
        _UPGRADE.replace(b"?token=" + TOKEN, b"?token=" + TOKEN + b"&explain=1"),
        _UPGRADE.replace(b"GET /", b"GET //evil/", 1),
        _UPGRADE.replace(b"GET", b"HEAD", 1),
        _UPGRADE.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"),
        _UPGRADE.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""),
        _UPGRADE.replace(b"Upgrade: websocket\r\n", b""),
        b"GET /vnc.html HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /?token=" + TOKEN + b" HTTP/1.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n",
        b"\r\n\r\n",
        _frame(0x2, b"keys"),
        _frame(0x2, b"x" * 200),
        _frame(0x1, b"\xff\xfe"),  # text, not UTF-8
        _frame(0x9, b"ping"),
        _frame(0xA, b""),
        _frame(0x8, b"\x03\xe8bye"),
        _frame(0x8, b"\x03"),  # a close with half a code
        _frame(0x2, b"part", fin=False),
        _frame(0x0, b"rest"),
        _frame(0x2, b"bare", mask=False),
        _frame(0x3, b""),  # a reserved opcode
        b"\x82\xff" + b"\x00" * 8,  # a length with its top bit set
        b"\x82\xfe\xff",  # half a 16-bit length
    ],
}


def pieces_for(door: str) -> list[bytes]:
    return PIECES["websocket" if door in WEBSOCKET_DOORS else door]


def random_input(rng: random.Random, door: str) -> tuple[bytes, list[int], bool]:
    """An input as the hypothesis tests make them: (bytes, chunk sizes, wait for timeouts)."""
    pieces = pieces_for(door)
    parts = []
    for _ in range(rng.randrange(0, 9)):
        if rng.random() < 0.3:
            parts.append(rng.randbytes(rng.randrange(0, 60)))
        else:
            piece = rng.choice(pieces)
            if rng.random() < 0.2 and piece:  # a mutated piece: a byte changed or cut
                at = rng.randrange(len(piece))
                piece = piece[:at] + bytes([rng.randrange(256)]) + piece[at + 1 :]
                piece = piece[: rng.randrange(len(piece) + 1)] if rng.random() < 0.3 else piece
            parts.append(piece)
    sizes = [rng.randrange(1, 70) for _ in range(rng.randrange(0, 40))]
    return b"".join(parts), sizes, rng.random() < 0.5


class _Transport(StringTransport):
    """A StringTransport that, like a TCP transport, lets go of no producer quietly."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class _Case:
    """What InlineCore asks of a test case, outside trial (benchmarks/fuzz.py)."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="consoled-fuzz-")
        self._cleanups: list[Any] = []

    def mktemp(self) -> str:
        return os.path.join(self._dir, f"db{len(os.listdir(self._dir))}")

    def addCleanup(self, f: Any, *args: Any) -> None:
        self._cleanups.append((f, args))

    def successResultOf(self, d: defer.Deferred[Any]) -> Any:
        result: list[Any] = []
        d.addBoth(result.append)
        if not result or isinstance(result[0], Failure):
            raise AssertionError(f"no result: {result}")
        return result[0]

    def cleanup(self) -> None:
        for f, args in reversed(self._cleanups):
            f(*args)


@contextmanager
def txaio_loop(clock: Any) -> Iterator[None]:
    """Autobahn's timers (close handshake, batched buckets) on ``clock`` meanwhile."""
    txaio.use_twisted()
    before = txaio.config.loop
    txaio.config.loop = clock
    try:
        yield
    finally:
        txaio.config.loop = before


def _site_clock(call: Any) -> bool:
    """The Site's once-a-second log date: the door's, not a connection's."""
    return getattr(call.func, "__name__", "") == "_updateLogDateTime"


class DoorRig:
    """One door's real factory over an InlineCore; ``feed`` plays one connection."""

    def __init__(self, door: str, testcase: Any = None) -> None:
        self.door = door
        self.case = testcase if testcase is not None else _Case()
        console_type, access_url_base = DOORS[door]
        self.core = InlineCore(self.case, console_type, 5900, access_url_base)
        self.reactor = self.core.reactor
        gate = self.core.gate
        if door == "serial-tcp":
            self.factory: Any = SerialTCPFactory(gate, self.reactor, 60, "fuzz")
        elif door == "xvp":
            self.factory = XVPFactory(gate, self.reactor, 15)
        else:
            websocket = ConsoleServerFactory(Door(door, gate), ping_interval=0)
            site = door_site(None, timeout=30)
            # The Site's idle timers on the memory clock too: on the global
            # reactor, which does not run here, cancelled ones pile up.
            site.reactor = self.reactor
            self.factory = DoorFactory(site, websocket, self.reactor, 30, 60)
            self.factory.doStart()
        self.errors: list[str] = []
        globalLogPublisher.addObserver(self._observe)
        self.case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("isError") or "log_failure" in event:
            failure = event.get("log_failure") or event.get("failure")
            text = failure.getTraceback() if failure is not None else repr(event)[:500]
            self.errors.append(text)

    def feed(self, data: bytes, sizes: list[int], wait: bool) -> str | None:
        """One connection: ``data`` in chunks of ``sizes``, the timeouts if ``wait``,
        then the user leaves.  What went wrong, or None."""
        data = data.replace(TOKEN, self.core.token)
        with txaio_loop(self.reactor):
            try:
                protocol = self.factory.buildProtocol(PEER)
                transport = _Transport(peerAddress=PEER)
                protocol.makeConnection(transport)
                at = 0
                for size in sizes + [len(data)]:
                    if at >= len(data) or transport.disconnecting:
                        break
                    protocol.dataReceived(data[at : at + size])
                    at += size
                if wait:
                    self.reactor.advance(61)  # prompt, head, admission and connect timeouts
                protocol.connectionLost(Failure(ConnectionError("user left")))
                self.reactor.advance(61)  # whatever was left to time out
                # MemoryReactor keeps every connection it was asked for: forget them.
                del self.reactor.tcpClients[:], self.reactor.connectors[:]
            except Exception as error:  # a crash: the protocol raised into the reactor
                return f"raised {error!r}"
        if self.errors:
            errors, self.errors = self.errors, []
            return "logged an error: " + errors[0]
        if self.core.sessions.live:
            return f"{len(self.core.sessions.live)} session(s) still live"
        if self.core.left_behind() != (0, 0):
            return f"(open rows, leases) left: {self.core.left_behind()}"
        pending = [c for c in self.reactor.getDelayedCalls() if c.active() and not _site_clock(c)]
        if pending:
            return f"timers left: {[getattr(c.func, '__qualname__', c.func) for c in pending]}"
        return None
