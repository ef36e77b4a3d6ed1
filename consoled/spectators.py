"""Read-only spectators of a serial console, on the proxy that holds its writer.

A chardev serves one TCP client, so spectators share the writer's relay:
every chunk the console prints goes to the writer and then to each
spectator.  What a spectator types is dropped (they are told once).  A
spectator who stops reading is not allowed to hold the writer back: its
transport is watched as a consumer, and one that falls more than
``MAX_LAG`` bytes behind is closed.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from consoled.endings import Ending, Kind
from consoled.relay import ClientSide

#: How far a paused spectator may fall behind before it is closed.
MAX_LAG = 1024 * 1024

PROMOTED = b"\r\n[an operator handed you this console: you can type now]\r\n"
DEMOTED = b"\r\n[an operator handed this console to another user: you are read-only now]\r\n"
READ_ONLY = b"\r\n[read-only: another user is typing on this console; your keys are dropped]\r\n"


@implementer(IPushProducer)
class Spectator:
    """One spectator's end: receives the console's output, sends nothing."""

    def __init__(self, client: ClientSide, on_end: Callable[[Ending], None]) -> None:
        self.client = client
        self.bytes_to_client = 0
        self.bytes_to_server = 0
        self.ending: Ending | None = None
        self._on_end = on_end
        self._paused = False
        self._lag = 0
        self._told = False
        client.consumer.registerProducer(self, True)

    # Relay-like, for the door that drives it.

    def from_client(self, data: bytes) -> None:
        if not self._told:
            self._told = True
            self.client.send(READ_ONLY)

    def client_lost(self, detail: str = "") -> None:
        self.end(Ending(Kind.CLIENT_CLOSED, detail))

    def from_backend(self, data: bytes) -> None:
        self.bytes_to_client += len(data)
        if self._paused:
            self._lag += len(data)
            if self._lag > MAX_LAG:
                self.end(Ending(Kind.INTERNAL, "spectator too slow to keep up"))
                return
        self.client.send(data)

    def detach(self, ending: Ending) -> None:
        """Stop watching without closing the user (promoted to writer)."""
        if self.ending is None:
            self.ending = ending
            self.client.consumer.unregisterProducer()
            self._on_end(ending)

    def end(self, ending: Ending) -> None:
        if self.ending is not None:
            return
        self.ending = ending
        if ending.kind is not Kind.CLIENT_CLOSED:
            self.client.close(ending)
        self._on_end(ending)

    # IPushProducer: the spectator's transport tells us when it is full.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._lag = 0

    def stopProducing(self) -> None:
        self._paused = True
