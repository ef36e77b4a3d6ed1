"""Real peers for integration tests: QEMU's VNC, SPICE, serial and monitor.

Every starter spawns ``qemu-system-x86_64`` with the reactor, on 127.0.0.1 and
a free port, and returns a Deferred that fires with a `Peer` once the peer is
ready for a client.  Each registers a trial cleanup that stops the process and
waits for it to be reaped, so nothing leaks into the next test and trial's
dirty-reactor check stays quiet.  Nothing here sleeps: readiness is polled
with ``deferLater`` on the reactor.

Readiness is detected in one of two ways:

* by a TCP probe that connects, closes and waits for its own connectionLost
  (VNC, SPICE, the HMP monitor: QEMU serves a new client after the probe's
  EOF, which `tests.test_peers` checks for the monitor's one-client chardev);
* by QEMU's stderr line ``QEMU waiting for connection on:`` for a chardev with
  ``wait=on``, where a probe would itself become the one client that QEMU
  waits for and the first output would go to the probe.

What a client sees (QEMU 7.2 here):

* VNC: ``RFB 003.008\\n`` at once; security type 1 (None), or 2 (VNC
  authentication) when a password is set.
* SPICE: a ``REDQ`` 2.2 link reply to `spice_link_message`.
* SeaBIOS serial: ``ESC c ESC [?7l ESC [2J ESC [0m SeaBIOS (version
  1.16.2-debian-1.16.2-1)\\r\\nBooting from Hard Disk...\\r\\nBoot failed: ...``
  within ~80 ms of connecting.
* HMP monitor: ``QEMU 7.2.22 monitor - type 'help' for more information\\r\\n``
  then ``(qemu) ``; input is echoed with readline escape sequences, and
  ``\\r\\n`` counts as two Enters (an extra empty prompt follows the answer).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest

QEMU = "qemu-system-x86_64"
QEMU_HINT = "apt-get install -y --no-install-recommends qemu-system-x86"
HOST = "127.0.0.1"

POLL_INTERVAL = 0.02
START_TIMEOUT = 10.0
STOP_GRACE = 5.0
PORT_ATTEMPTS = 5

VNC_BASE_PORT = 5900
# What QEMU and spice-server print when the port we picked was taken meanwhile.
_PORT_TAKEN = (b"Address already in use", b"binding socket to")
_WAITING_FOR_CLIENT = b"QEMU waiting for connection on:"


def _reactor() -> Any:
    # Imported late so that trial (or a test) has installed its reactor first.
    from twisted.internet import reactor

    return reactor


class PeerStartError(Exception):
    """A peer exited or never became ready; the message carries its stderr."""


class ExchangeFailed(Exception):
    """A client helper gave up; ``received`` holds what the peer had sent."""

    def __init__(self, message: str, received: bytes) -> None:
        super().__init__(f"{message}; received {received!r}")
        self.received = received


def require_peer(
    testcase: unittest.SynchronousTestCase, what: str, available: bool, hint: str
) -> None:
    """Skip the test when a peer is missing, but fail it in CI (CI=true)."""
    if available:
        return
    if os.environ.get("CI") == "true":
        testcase.fail(f"{what} is required in CI: {hint}")
    raise unittest.SkipTest(f"{what} is not available: {hint}")


def require_executable(testcase: unittest.SynchronousTestCase, name: str, hint: str) -> str:
    """Return the full path of an executable on PATH, or skip/fail like require_peer."""
    path = shutil.which(name)
    require_peer(testcase, name, path is not None, hint)
    assert path is not None
    return path


#: Every port free_port has handed out in this process: none is handed out twice.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, never the same one twice.

    The kernel may give the same ephemeral port to two probes in a row, so
    two peers (or two doors of one daemon) asking one after the other could
    get one number; the set of ports already handed out rules that out.
    Still racy against other processes: the port is released before QEMU (or
    consoled) binds it.  Both need the number on their command line or in
    their configuration, so their starters retry with new ports when the
    address turns out to be in use (`_spawn_until_ready`,
    `tests.daemon.start_consoled_on_free_ports`).
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            port: int = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _free_vnc_port() -> int:
    # -vnc takes a display number D and listens on 5900+D.  Linux hands out
    # ephemeral ports from 32768 up, so this loop almost never repeats.
    while True:
        port = free_port()
        if port > VNC_BASE_PORT:
            return port


class QemuProcess(ProcessProtocol):
    """The handle on one spawned QEMU: its stderr, its exit, and how to stop it."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.pid: int | None = None
        self.stderr = b""
        self.exit_reason: Failure | None = None
        self._ended_waiters: list[Deferred[None]] = []
        self._stderr_waiters: list[tuple[bytes, Deferred[None]]] = []

    @property
    def has_ended(self) -> bool:
        return self.exit_reason is not None

    def describe(self) -> str:
        status = "running" if self.exit_reason is None else str(self.exit_reason.value)
        stderr = self.stderr.decode("utf-8", "replace").strip() or "(empty)"
        return f"{' '.join(self.argv)} [{status}]; stderr: {stderr}"

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        # -nodefaults leaves QEMU with nothing that reads stdin.
        self.transport.closeStdin()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        waiting, self._stderr_waiters = self._stderr_waiters, []
        for marker, waiter in waiting:
            if waiter.called:  # cancelled by a timeout
                continue
            if marker in self.stderr:
                waiter.callback(None)
            else:
                self._stderr_waiters.append((marker, waiter))

    def processEnded(self, reason: Failure) -> None:
        self.exit_reason = reason
        ended, self._ended_waiters = self._ended_waiters, []
        for waiter in ended:
            if not waiter.called:
                waiter.callback(None)
        waiting, self._stderr_waiters = self._stderr_waiters, []
        for _marker, waiter in waiting:
            if not waiter.called:
                waiter.errback(PeerStartError(f"QEMU exited: {self.describe()}"))

    def when_ended(self) -> Deferred[None]:
        """Fire once the process has exited and been reaped."""
        if self.has_ended:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._ended_waiters.append(waiter)
        return waiter

    def when_stderr_contains(self, marker: bytes) -> Deferred[None]:
        """Fire once stderr contains marker; fail with PeerStartError on exit."""
        if marker in self.stderr:
            return defer.succeed(None)
        if self.has_ended:
            return defer.fail(PeerStartError(f"QEMU exited: {self.describe()}"))
        waiter: Deferred[None] = Deferred()
        self._stderr_waiters.append((marker, waiter))
        return waiter

    def stop(self, grace: float = STOP_GRACE) -> Deferred[None]:
        """SIGTERM, SIGKILL after grace seconds; fire once the process is reaped."""
        return Deferred.fromCoroutine(self._stop(grace))

    async def _stop(self, grace: float) -> None:
        if self.has_ended:
            return
        self._signal("TERM")
        try:
            await self.when_ended().addTimeout(grace, _reactor())
        except defer.TimeoutError:
            self._signal("KILL")
            await self.when_ended()

    def _signal(self, name: str) -> None:
        assert self.transport is not None
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass


@dataclass(frozen=True)
class Peer:
    """A ready peer: where to connect, and the QEMU process behind it."""

    host: str
    port: int
    process: QemuProcess = field(repr=False)


class _Probe(Protocol):
    """Connects, and tells when its connection is gone."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class _Conversation(Protocol):
    """Collects bytes; writes `send` (after `after` appears); stops at `until`."""

    def __init__(
        self,
        send: bytes | None,
        until: bytes | Callable[[bytes], bool],
        after: bytes,
    ) -> None:
        self.received = b""
        self.done: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self._send = send
        self._until = until
        self._after = after
        self._reply_start: int | None = None

    def connectionMade(self) -> None:
        if self._send is None:
            self._reply_start = 0
        elif not self._after:
            self._write_send(0)

    def _write_send(self, reply_start: int) -> None:
        assert self.transport is not None and self._send is not None
        self.transport.write(self._send)
        self._reply_start = reply_start

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._reply_start is None:
            at = self.received.find(self._after)
            if at < 0:
                return
            self._write_send(at + len(self._after))
        assert self._reply_start is not None
        reply = self.received[self._reply_start :]
        finished = self._until(reply) if callable(self._until) else self._until in reply
        if finished and not self.done.called:
            self.done.callback(self.received)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(ExchangeFailed("peer closed the connection", self.received))
        self.lost.callback(None)


async def _converse(
    host: str,
    port: int,
    send: bytes | None,
    until: bytes | Callable[[bytes], bool],
    after: bytes,
    timeout: float,
) -> bytes:
    reactor = _reactor()
    deadline = reactor.seconds() + timeout
    conversation = _Conversation(send, until, after)
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    await connectProtocol(endpoint, conversation)
    try:
        remaining = max(deadline - reactor.seconds(), 0.0)
        return await conversation.done.addTimeout(remaining, reactor)
    except defer.TimeoutError:
        raise ExchangeFailed(
            f"no {until!r} from {host}:{port} within {timeout}s", conversation.received
        ) from None
    finally:
        # Close and wait for it, so a one-client chardev is free for the next
        # client and no socket outlives the test.
        assert conversation.transport is not None
        conversation.transport.loseConnection()
        await conversation.lost


def connect_and_read(host: str, port: int, until: bytes, timeout: float = 10.0) -> Deferred[bytes]:
    """Connect, read until `until` arrives, disconnect; fire with all bytes read."""
    return Deferred.fromCoroutine(_converse(host, port, None, until, b"", timeout))


def tcp_exchange(
    host: str,
    port: int,
    send: bytes,
    until: bytes | Callable[[bytes], bool],
    *,
    after: bytes = b"",
    timeout: float = 10.0,
) -> Deferred[bytes]:
    """Connect, write `send` (once `after` has arrived, if given), read until
    `until` is in the bytes that arrived after the write (or the predicate
    holds for them), disconnect; fire with everything the peer sent."""
    return Deferred.fromCoroutine(_converse(host, port, send, until, after, timeout))


# How a starter learns that its peer is ready: (process, host, port).
Readiness = Callable[[QemuProcess, str, int], Awaitable[None]]


async def until_accepting(process: QemuProcess, host: str, port: int) -> None:
    """Ready once a TCP connect succeeds; the probe closes and waits for its
    connectionLost.  Fails with PeerStartError if QEMU exits or START_TIMEOUT
    passes."""
    reactor = _reactor()
    deadline = reactor.seconds() + START_TIMEOUT
    while True:
        if process.has_ended:
            raise PeerStartError(f"QEMU exited: {process.describe()}")
        if reactor.seconds() > deadline:
            raise PeerStartError(
                f"nothing accepted on {host}:{port} within {START_TIMEOUT}s: {process.describe()}"
            )
        probe = _Probe()
        try:
            await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=1), probe)
        except ConnectError:
            await deferLater(reactor, POLL_INTERVAL, lambda: None)
            continue
        assert probe.transport is not None
        probe.transport.loseConnection()
        await probe.lost
        # If our port was taken by someone else meanwhile, the probe reached a
        # stranger; QEMU then exits within milliseconds.  This catches most of it.
        if process.has_ended:
            raise PeerStartError(f"QEMU exited: {process.describe()}")
        return


async def until_waiting_for_client(process: QemuProcess, host: str, port: int) -> None:
    """Ready once QEMU says it waits for the first client of a wait=on chardev,
    without connecting (a probe would become that client).  QEMU prints the
    line after listen(), just before it blocks in accept()."""
    try:
        await process.when_stderr_contains(_WAITING_FOR_CLIENT).addTimeout(
            START_TIMEOUT, _reactor()
        )
    except defer.TimeoutError:
        raise PeerStartError(
            f"no {_WAITING_FOR_CLIENT!r} within {START_TIMEOUT}s: {process.describe()}"
        ) from None


def start_qemu(
    testcase: unittest.TestCase,
    arguments: Callable[[int], list[str]],
    ready: Readiness = until_accepting,
    pick_port: Callable[[], int] = free_port,
) -> Deferred[Peer]:
    """Spawn QEMU with arguments(port) and fire with a Peer once `ready` says so.

    Retries with a new port when QEMU reports the port taken; registers a
    cleanup that stops the process.  The starters below are built on it; use
    it directly for variants (VeNCrypt, other chardevs).
    """
    executable = require_executable(testcase, QEMU, QEMU_HINT)
    return Deferred.fromCoroutine(
        _spawn_until_ready(testcase, executable, arguments, ready, pick_port)
    )


async def _spawn_until_ready(
    testcase: unittest.TestCase,
    executable: str,
    arguments: Callable[[int], list[str]],
    ready: Readiness,
    pick_port: Callable[[], int],
) -> Peer:
    tried: list[int] = []
    for _attempt in range(PORT_ATTEMPTS):
        port = pick_port()
        tried.append(port)
        argv = [QEMU, *arguments(port)]
        process = QemuProcess(argv)
        _reactor().spawnProcess(process, executable, argv, env=dict(os.environ))
        testcase.addCleanup(process.stop)
        try:
            await ready(process, HOST, port)
        except PeerStartError:
            if any(marker in process.stderr for marker in _PORT_TAKEN):
                await process.when_ended()
                continue
            raise
        return Peer(HOST, port, process)
    raise PeerStartError(f"QEMU found every port taken: {tried}")


_NO_MACHINE = ["-machine", "none", "-nodefaults", "-display", "none"]


def start_qemu_vnc(testcase: unittest.TestCase, password: str | None = None) -> Deferred[Peer]:
    """QEMU with a VNC server (RFB 3.8); security type 2 if password is given."""

    def arguments(port: int) -> list[str]:
        vnc = f"{HOST}:{port - VNC_BASE_PORT}"
        if password is None:
            return [*_NO_MACHINE, "-vnc", vnc]
        # A password on the command line is visible in ps; fine for a test.
        secret = f"secret,id=vncpw,data={password}"
        return [*_NO_MACHINE, "-object", secret, "-vnc", f"{vnc},password-secret=vncpw"]

    return start_qemu(testcase, arguments, pick_port=_free_vnc_port)


def start_qemu_spice(testcase: unittest.TestCase) -> Deferred[Peer]:
    """QEMU with a SPICE server without ticketing (no password)."""

    def arguments(port: int) -> list[str]:
        return [*_NO_MACHINE, "-spice", f"port={port},addr={HOST},disable-ticketing=on"]

    return start_qemu(testcase, arguments)


def start_qemu_serial_bios(testcase: unittest.TestCase) -> Deferred[Peer]:
    """A PC whose SeaBIOS writes its banner to a serial TCP server (one client).

    ``wait=on`` makes QEMU hold the guest until the first client connects, so
    that client sees the output from the start.  The Deferred fires on QEMU's
    "waiting for connection" line, before anyone has connected.
    """
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    sercon = os.path.join(directory, "sercon-port")
    with open(sercon, "wb") as f:
        # SeaBIOS reads the I/O port of its serial console from this fw_cfg
        # file: 0x3f8 (COM1), little-endian.  QEMU warns that the name lacks
        # an "opt/" prefix; SeaBIOS looks for exactly this name.
        f.write(struct.pack("<H", 0x3F8))

    def arguments(port: int) -> list[str]:
        return [
            *("-machine", "pc", "-m", "32", "-vga", "std"),
            *("-display", "none", "-nodefaults"),
            *("-fw_cfg", f"name=etc/sercon-port,file={sercon}"),
            *("-serial", f"tcp:{HOST}:{port},server=on,wait=on"),
        ]

    return start_qemu(testcase, arguments, until_waiting_for_client)


def start_qemu_monitor(testcase: unittest.TestCase) -> Deferred[Peer]:
    """QEMU's human monitor (HMP) on a TCP chardev: a line-based console.

    The chardev serves one client at a time; the readiness probe connects and
    closes, and QEMU serves the next client once it has read the probe's EOF
    (a client that connects meanwhile waits in the listen backlog).  With
    ``wait=off`` QEMU prints nothing on stderr to watch for instead.
    """

    def arguments(port: int) -> list[str]:
        chardev = f"socket,id=mon,host={HOST},port={port},server=on,wait=off"
        return [*_NO_MACHINE, "-chardev", chardev, "-mon", "chardev=mon,mode=readline"]

    return start_qemu(testcase, arguments)


SPICE_MAGIC = b"REDQ"
SPICE_VERSION_MAJOR = 2
SPICE_VERSION_MINOR = 2
SPICE_CHANNEL_MAIN = 1
_SPICE_HEADER = struct.Struct("<4sIII")  # magic, major, minor, size
_SPICE_LINK_MESS = struct.Struct("<IBBIII")  # see spice_link_message


def spice_link_message(
    channel_type: int = SPICE_CHANNEL_MAIN, connection_id: int = 0, channel_id: int = 0
) -> bytes:
    """A SpiceLinkHeader + SpiceLinkMess with no capabilities, as a client sends first."""
    # connection_id, channel_type, channel_id, num_common_caps,
    # num_channel_caps, caps_offset (from the start of SpiceLinkMess: 18).
    body = _SPICE_LINK_MESS.pack(
        connection_id, channel_type, channel_id, 0, 0, _SPICE_LINK_MESS.size
    )
    header = _SPICE_HEADER.pack(SPICE_MAGIC, SPICE_VERSION_MAJOR, SPICE_VERSION_MINOR, len(body))
    return header + body


def spice_link_header(data: bytes) -> tuple[bytes, int, int, int] | None:
    """(magic, major, minor, size) from the first 16 bytes, or None if fewer."""
    if len(data) < _SPICE_HEADER.size:
        return None
    magic, major, minor, size = _SPICE_HEADER.unpack_from(data)
    return magic, major, minor, size


def spice_link_reply_complete(data: bytes) -> bool:
    """True once data holds a whole SpiceLinkHeader and the body it announces."""
    header = spice_link_header(data)
    return header is not None and len(data) >= _SPICE_HEADER.size + header[3]
