"""A minimal, fast websocket client: the handshake by hand, then raw frames.

A client built on a websocket library reads at most ~750 MB/s here and would
hide the proxies' differences.  This one receives with ``recv_into`` into one
1 MiB buffer and walks the frame headers in place, counting payload bytes
without ever copying or unmasking them.  What it sends is precomputed: a
masked frame is built once and sent again and again (the proxy unmasks each
one all the same).

The same functions speak plain TCP when the target is direct, so the
"direct" column is this client's own ceiling.  A target with a TLS context
(``wss://``, or ``tls_direct.py``) gets the socket wrapped before the upgrade;
the frame walking is the same.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from typing import Any

from peers import Target

BUFFER = 1 << 20
TIMEOUT = 60.0


class Closed(ConnectionError):
    """The peer sent a close frame or ended the connection."""


def request(target: Target) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    host = f"127.0.0.1:{target.port}"
    return (
        f"GET {target.path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: binary\r\n"
        f"Origin: http://{host}\r\n"
        "\r\n"
    ).encode()


def check_answer(head: bytes) -> None:
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise ConnectionError(f"upgrade refused: {status.decode('latin-1')!r}")


def masked_frame(payload_size: int, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """A masked binary frame whose payload is zeros before masking."""
    if payload_size < 126:
        head = struct.pack("!BB", 0x82, 0x80 | payload_size)
    elif payload_size < 1 << 16:
        head = struct.pack("!BBH", 0x82, 0x80 | 126, payload_size)
    else:
        head = struct.pack("!BBQ", 0x82, 0x80 | 127, payload_size)
    masked_zeros = (mask * (payload_size // 4 + 1))[:payload_size]
    return head + mask + masked_zeros


class Connection:
    """One session: a blocking socket, and the frame walker for websockets."""

    def __init__(self, target: Target, timeout: float = TIMEOUT) -> None:
        self.websocket = target.websocket
        sock = socket.create_connection(("127.0.0.1", target.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if target.tls is not None:  # wss://: recv_into and sendall work the same on it
            sock = target.tls.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.buf = bytearray(BUFFER)
        self.view = memoryview(self.buf)
        self.pos = 0
        self.end = 0
        #: payload bytes left in the current frame, and whether they count
        self.left = 0
        self.counted = True
        if self.websocket:
            self._upgrade(target)
        for step in target.preamble:
            if step[0] == "send":
                self.sock.sendall(step[1])
            else:
                self._expect(step[1], step[2])

    def _upgrade(self, target: Target) -> None:
        self.sock.sendall(request(target))
        while True:
            head_end = self.buf.find(b"\r\n\r\n", 0, self.end)
            if head_end >= 0:
                break
            self._receive()
        check_answer(bytes(self.buf[:head_end]))
        self.pos = head_end + 4

    def _expect(self, marker: bytes, starts: bytes) -> None:
        """A raw door's answer: wait for ``marker``; what precedes it must start with ``starts``."""
        while (found := self.buf.find(marker, self.pos, self.end)) < 0:
            self._receive()
        answer = bytes(self.buf[self.pos : found])
        if not answer.startswith(starts):
            raise ConnectionError(f"the door answered {answer[:80]!r}")
        self.pos = found + len(marker)

    def _receive(self) -> None:
        """Keep an unparsed partial header at the front, then receive after it."""
        rest = self.end - self.pos
        if rest:
            self.buf[:rest] = self.buf[self.pos : self.end]
        self.pos, self.end = 0, rest
        n = self.sock.recv_into(self.view[rest:])
        if n == 0:
            raise Closed("connection ended")
        self.end += n

    def read(self, want: int) -> int:
        """Block until ``want`` payload bytes have arrived; return them counted, not kept."""
        if not self.websocket:
            return self._read_raw(want)
        got = 0
        buf = self.buf
        while True:
            pos, end = self.pos, self.end
            while pos < end and got < want:
                left = self.left
                if left:
                    take = min(left, end - pos, want - got)
                    pos += take
                    self.left = left - take
                    if self.counted:
                        got += take
                    continue
                avail = end - pos
                if avail < 2:
                    break
                b0, b1 = buf[pos], buf[pos + 1]
                size = b1 & 0x7F
                head = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if b1 & 0x80 else 0)
                if avail < head:
                    break
                if size == 126:
                    size = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                elif size == 127:
                    size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                opcode = b0 & 0x0F
                if opcode == 8:
                    raise Closed(f"close frame after {got} of {want} bytes")
                pos += head
                self.left = size
                self.counted = opcode < 8  # pings and pongs carry no console bytes
            self.pos = pos
            if got >= want:
                return got
            self._receive()

    def _read_raw(self, want: int) -> int:
        got = min(want, self.end - self.pos)  # console bytes that came with a preamble
        self.pos += got
        view = self.view
        while got < want:
            n = self.sock.recv_into(view[: min(BUFFER, want - got)])
            if n == 0:
                raise Closed(f"connection ended after {got} of {want} bytes")
            got += n
        return got

    def send_payload(self, data: bytes, framed: bytes) -> None:
        """Send ``framed`` (a ready masked frame) over a websocket, else ``data``."""
        self.sock.sendall(framed if self.websocket else data)

    def close(self) -> None:
        self.sock.close()


# -- measurements on one session -------------------------------------------


def downstream(target: Target, total: int) -> float:
    """Seconds from the source's first byte to its last (``total`` bytes in all).

    The clock starts at the first byte so that the set-up (measured on its own)
    stays out of a short run's rate.
    """
    connection = Connection(target)
    try:
        connection.read(1)
        started = time.perf_counter()
        connection.read(total - 1)
        return time.perf_counter() - started
    finally:
        connection.close()


def upstream(target: Target, total: int, frame_size: int = 64 << 10) -> float:
    """Seconds to push ``total`` bytes to the sink (in masked frames) until it acknowledges."""
    per_send = max(1, (1 << 20) // frame_size)
    framed = masked_frame(frame_size) * per_send
    raw = bytes(frame_size * per_send)
    sends, rest = divmod(total, frame_size * per_send)
    if rest % frame_size:
        raise ValueError("total must be a multiple of the frame size")
    connection = Connection(target)
    try:
        started = time.perf_counter()
        for _ in range(sends):
            connection.send_payload(raw, framed)
        frames = rest // frame_size
        connection.send_payload(raw[: frames * frame_size], masked_frame(frame_size) * frames)
        connection.read(1)
        return time.perf_counter() - started
    finally:
        connection.close()


def round_trips(
    target: Target,
    count: int,
    warmup: int = 100,
    before_close: Any = None,
    after_warmup: Any = None,
) -> list[float]:
    """Seconds of each one-byte echo round trip after ``warmup`` unmeasured ones.

    ``before_close`` is called while the session is still open (websockify's
    per-session process takes its CPU counters with it when it exits), and
    ``after_warmup`` once before the first measured round trip.
    """
    framed, data = masked_frame(1), b"x"
    connection = Connection(target)
    clock = time.perf_counter
    times = []
    try:
        for i in range(warmup + count):
            if i == warmup and after_warmup is not None:
                after_warmup()
            started = clock()
            connection.send_payload(data, framed)
            connection.read(1)
            if i >= warmup:
                times.append(clock() - started)
        if before_close is not None:
            before_close()
    finally:
        connection.close()
    return times


def discard_stream(target: Target, want: int) -> tuple[float, float, int]:
    """Read ``want`` bytes off the wire, discarding them in the kernel: (first, end, bytes).

    ``MSG_TRUNC`` on a TCP socket drops what arrived without copying it out,
    so several of these barely load a CPU.  The count includes the frame
    headers (ten bytes per read of up to 256 KiB from the console), so the
    last few hundred payload bytes are not waited for: a 10^-6 error, and no
    wait for the proxy's closing handshake.
    """
    connection = Connection(target)
    sock = connection.sock
    got = connection.end - connection.pos
    first = time.perf_counter() if got else 0.0
    while got < want:
        n = sock.recv_into(connection.view, BUFFER, socket.MSG_TRUNC)
        if n == 0:
            break
        if not first:
            first = time.perf_counter()
        got += n
    end = time.perf_counter()
    connection.close()
    return first, end, got
