"""Many sessions from one client process: non-blocking sockets on one selector.

``open_sessions`` times each session from ``connect()`` to the first console
byte (through the upgrade for websockets), keeping at most ``concurrency``
in flight; concurrency 1 is the sequential case.  ``drain`` reads held
sessions for a while and counts what arrives.  A TLS target's sessions do
the TLS handshake first (non-blocking, on the same selector), so their time
includes it; with ``resume`` each session offers the TLS session of the one
before it, as a browser reconnecting would.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from dataclasses import dataclass, field

from client import check_answer, request
from peers import Target

CONNECTING, HANDSHAKE, HEAD, FIRST = range(4)


@dataclass
class Opened:
    """Per-session set-up seconds, the sockets kept open, and what failed."""

    seconds: list[float] = field(default_factory=list)
    held: list[socket.socket] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    #: TLS sessions the server resumed (of len(seconds))
    resumed: int = 0

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


class _Opening:
    __slots__ = ("sock", "started", "state", "data", "steps")

    sock: socket.socket

    def __init__(self, sock: socket.socket, started: float, steps: list[tuple]) -> None:
        self.sock = sock
        self.started = started
        self.state = CONNECTING
        self.data = b""
        #: what is left of a raw door's preamble
        self.steps = steps

    def advance(self) -> bool:
        """Run the preamble as far as the data allows; True once it is done."""
        while self.steps:
            step = self.steps[0]
            if step[0] == "send":
                self.sock.send(step[1])  # a few dozen bytes: a fresh socket takes them whole
            else:
                found = self.data.find(step[1])
                if found < 0:
                    return False
                if not self.data.startswith(step[2]):
                    raise ConnectionError(f"the door answered {self.data[:60]!r}")
                self.data = self.data[found + len(step[1]) :]
            del self.steps[0]
        return True


def _has_first_byte(data: bytes, websocket: bool) -> bool:
    """Whether ``data`` holds a console byte; raises on a close frame."""
    if not websocket:
        return len(data) > 0
    if len(data) < 2:
        return False
    if data[0] & 0x0F == 8:
        raise ConnectionError("closed before the first byte")
    size = data[1] & 0x7F
    head = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if data[1] & 0x80 else 0)
    return size > 0 and len(data) > head


def open_sessions(
    target: Target,
    total: int,
    concurrency: int,
    *,
    hold: bool = False,
    timeout: float = 300,
    resume: bool = False,
) -> Opened:
    result = Opened()
    selector = selectors.DefaultSelector()
    address = ("127.0.0.1", target.port)
    upgrade = request(target) if target.websocket else b""
    clock = time.perf_counter
    started = in_flight = 0
    #: the TLS session the next one offers (``resume``)
    last_session: ssl.SSLSession | None = None
    begun = clock()
    deadline = begun + timeout

    def finish(opening: _Opening, error: str | None) -> None:
        nonlocal in_flight, last_session
        in_flight -= 1
        selector.unregister(opening.sock)
        if error is not None:
            result.fail(error)
            opening.sock.close()
            return
        result.seconds.append(clock() - opening.started)
        if isinstance(opening.sock, ssl.SSLSocket):
            result.resumed += opening.sock.session_reused
            if resume:
                last_session = opening.sock.session
        if hold:
            result.held.append(opening.sock)
        else:
            opening.sock.close()

    while started < total or in_flight:
        while started < total and in_flight < concurrency:
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            opening = _Opening(sock, clock(), list(target.preamble))
            sock.connect_ex(address)
            selector.register(sock, selectors.EVENT_WRITE, opening)
            started += 1
            in_flight += 1
        if clock() > deadline:
            for key in list(selector.get_map().values()):
                finish(key.data, "timed out")
            break
        for key, _ in selector.select(timeout=1.0):
            opening = key.data
            sock = opening.sock
            try:
                if opening.state == CONNECTING:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise ConnectionError(f"connect: errno {error}")
                    if target.tls is not None:
                        selector.unregister(sock)
                        opening.sock = sock = target.tls.wrap_socket(
                            sock,
                            server_hostname="127.0.0.1",
                            do_handshake_on_connect=False,
                            session=last_session if resume else None,
                        )
                        selector.register(sock, selectors.EVENT_READ, opening)
                        opening.state = HANDSHAKE
                if opening.state == HANDSHAKE:
                    assert isinstance(sock, ssl.SSLSocket)
                    try:
                        sock.do_handshake()
                    except ssl.SSLWantReadError:
                        selector.modify(sock, selectors.EVENT_READ, opening)
                        continue
                    except ssl.SSLWantWriteError:
                        selector.modify(sock, selectors.EVENT_WRITE, opening)
                        continue
                    opening.state = CONNECTING  # and on to the upgrade, as over plain TCP
                if opening.state == CONNECTING:
                    if upgrade:
                        sock.send(upgrade)  # a fresh socket takes a few hundred bytes whole
                    opening.state = HEAD if upgrade else FIRST
                    opening.advance()
                    selector.modify(sock, selectors.EVENT_READ, opening)
                    continue
                chunk = _receive(sock)
                if chunk is None:
                    continue  # a TLS record with no data in it yet (a session ticket)
                if not chunk:
                    raise ConnectionError("closed by the proxy")
                opening.data += chunk
                if opening.state == HEAD:
                    end = opening.data.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    check_answer(opening.data[:end])
                    opening.data = opening.data[end + 4 :]
                    opening.state = FIRST
                elif not opening.advance():
                    continue
                if _has_first_byte(opening.data, target.websocket):
                    finish(opening, None)
            except OSError as error:  # ConnectionError included
                finish(opening, str(error)[:80])
    selector.close()
    result.wall = clock() - begun
    return result


def _receive(sock: socket.socket) -> bytes | None:
    """What has arrived; None when a TLS socket has only a partial record (or a ticket).

    A TLS socket is read until OpenSSL wants more from the wire: what it has
    decrypted and buffered would not wake the selector.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return sock.recv(65536)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ssl.SSLWantReadError:
            return data or None
        if not chunk:
            return data
        data += chunk


def drain(sockets: list[socket.socket], seconds: float) -> tuple[int, int]:
    """Read every socket for ``seconds``; return (bytes received, sockets that closed)."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    buffer = memoryview(bytearray(1 << 16))
    received = closed = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(timeout=min(left, 0.5)):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                n = sock.recv_into(buffer)
            except (BlockingIOError, ssl.SSLWantReadError):
                continue
            except OSError:
                n = 0
            if n == 0:
                closed += 1
                selector.unregister(sock)
            received += n
    selector.close()
    return received, closed


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
