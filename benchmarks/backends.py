"""The consoles behind the proxies: plain TCP servers, one port per behaviour.

Run as its own process (``python benchmarks/backends.py --source-bytes N ...``);
it prints one JSON line naming each behaviour's port, then serves until
SIGTERM.  Behaviours:

- ``source``: streams ``--source-bytes`` as fast as the reader takes them
  with ``sendfile`` from a 64 MiB file of zeros, then closes (nothing is
  copied through this process: the reader, which shares its CPU, is left
  what it needs);
- ``echo``: writes back whatever arrives;
- ``sink``: discards what arrives and answers ``!`` once ``--sink-bytes`` have come;
- ``greeter``: sends ``RFB 003.008\\n`` on connect (a VNC server's first
  words), then holds the connection and discards input;
- ``spring``: sends ``--spring-bytes`` with ``sendfile`` from a 64 MiB file of
  zeros, over and over (no copy through this process, so four of them barely
  load a CPU), then closes;
- ``framed``: a console that speaks websocket itself, for a relay that does not
  (HAProxy's column): answers the upgrade with 101, then streams
  ``--source-bytes`` of payload in 256 KiB binary frames (``sendfile`` from a
  file of frames), then closes;
- ``trickle``: sends ``--trickle-rate`` bytes per second to every connection,
  a chunk every ``--trickle-period`` seconds, connections spread over the period.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Callable
from typing import Any

CHUNK = memoryview(bytes(1 << 20))
GREETING = b"RFB 003.008\n"
SPRING_FILE = 64 << 20
#: A framed source's frame: the payload of one, and the frame, header and all.
FRAME_PAYLOAD = 256 << 10
FRAME = memoryview(struct.pack("!BBQ", 0x82, 127, FRAME_PAYLOAD) + bytes(FRAME_PAYLOAD))
#: how many frames the framed source's file holds (64 MiB of payload)
FRAMES_IN_FILE = 256
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Subdivisions of the trickle period, so sessions do not all burst at once.
TRICKLE_SLOTS = 10


class _Base(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.started()

    def started(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass


class Spring(_Base):
    """Sends ``total`` bytes of ``path`` (its first ``size`` bytes, again and
    again) with ``sendfile``, then closes: nothing is copied through this
    process, whose CPU the reader shares."""

    def __init__(self, path: str, total: int, size: int = SPRING_FILE) -> None:
        self.path = path
        self.total = total
        self.size = size

    def started(self) -> None:
        self.task = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        await self._send_file()
        self.transport.close()

    async def _send_file(self) -> bool:
        """Whether all went: False if the reader left first."""
        try:
            loop = asyncio.get_running_loop()
            left = self.total
            with open(self.path, "rb") as file:
                while left > 0:
                    count = min(left, self.size)
                    await loop.sendfile(self.transport, file, 0, count)
                    left -= count
        except (ConnectionError, RuntimeError):
            return False  # the reader left
        return True


class Framed(Spring):
    """A source that frames its bytes itself, once the upgrade request came.

    ``path`` holds `FRAMES_IN_FILE` whole frames: whole frames go with
    ``sendfile``, the last (shorter) one with a write.
    """

    def __init__(self, path: str, total: int) -> None:
        super().__init__(path, total // FRAME_PAYLOAD * len(FRAME), FRAMES_IN_FILE * len(FRAME))
        self.rest = total % FRAME_PAYLOAD
        self.head = b""
        self.upgraded = False

    def started(self) -> None:
        pass  # the upgrade request comes first

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        key = b""
        for line in self.head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.upgraded = True
        self.task = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        if await self._send_file() and self.rest:
            self.transport.write(struct.pack("!BBQ", 0x82, 127, self.rest) + bytes(self.rest))
        self.transport.close()


class Echo(_Base):
    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Sink(_Base):
    def __init__(self, total: int) -> None:
        self.left = total

    def data_received(self, data: bytes) -> None:
        if self.left > 0:
            self.left -= len(data)
            if self.left <= 0:
                self.transport.write(b"!")


class Greeter(_Base):
    def started(self) -> None:
        self.transport.write(GREETING)


class Trickle(_Base):
    """Registered with a :class:`Trickler`, which writes to it on a timer."""

    def __init__(self, trickler: Trickler) -> None:
        self.trickler = trickler

    def started(self) -> None:
        self.trickler.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.trickler.remove(self.transport)


class Trickler:
    """Each connection gets ``rate * period`` bytes once per period, in its slot."""

    def __init__(self, rate: int, period: float) -> None:
        self.chunk = bytes(max(1, int(rate * period)))
        self.period = period
        self.slots: list[set[asyncio.Transport]] = [set() for _ in range(TRICKLE_SLOTS)]
        self.next_slot = 0
        #: chunks not written because the proxy had not taken the previous ones
        self.skipped = 0

    def add(self, transport: asyncio.Transport) -> None:
        self.slots[self.next_slot].add(transport)
        self.next_slot = (self.next_slot + 1) % TRICKLE_SLOTS

    def remove(self, transport: asyncio.Transport) -> None:
        for slot in self.slots:
            slot.discard(transport)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        step = self.period / TRICKLE_SLOTS
        tick = loop.time()
        index = 0
        while True:
            for transport in self.slots[index]:
                if transport.get_write_buffer_size() > 4 * len(self.chunk):
                    self.skipped += 1
                else:
                    transport.write(self.chunk)
            index = (index + 1) % TRICKLE_SLOTS
            tick += step
            await asyncio.sleep(max(0.0, tick - loop.time()))


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    trickler = Trickler(args.trickle_rate, args.trickle_period)
    spring = tempfile.NamedTemporaryFile(prefix="consoled-bench-spring-")
    for _ in range(SPRING_FILE // len(CHUNK)):  # written, so it is in the page cache
        spring.write(CHUNK)
    spring.flush()
    frames = tempfile.NamedTemporaryFile(prefix="consoled-bench-frames-")
    for _ in range(FRAMES_IN_FILE):
        frames.write(FRAME)
    frames.flush()
    makers: dict[str, Callable[[], Any]] = {
        "source": lambda: Spring(spring.name, args.source_bytes),
        "framed": lambda: Framed(frames.name, args.source_bytes),
        "echo": Echo,
        "sink": lambda: Sink(args.sink_bytes),
        "greeter": Greeter,
        "trickle": lambda: Trickle(trickler),
        "spring": lambda: Spring(spring.name, args.spring_bytes),
    }
    ports = {}
    servers = []
    for name, maker in makers.items():
        server = await loop.create_server(maker, "127.0.0.1", 0, backlog=4096)
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    ticker = asyncio.create_task(trickler.run())
    await stop.wait()
    ticker.cancel()
    spring.close()
    frames.close()
    if trickler.skipped:
        print(f"backends: trickle skipped {trickler.skipped} chunks", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source-bytes", type=int, default=64 << 20)
    parser.add_argument("--sink-bytes", type=int, default=64 << 20)
    parser.add_argument("--spring-bytes", type=int, default=256 << 20)
    parser.add_argument("--trickle-rate", type=int, default=50_000)
    parser.add_argument("--trickle-period", type=float, default=0.1)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
