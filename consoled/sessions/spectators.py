"""Read-only spectators of a serial console, on the proxy that holds its writer.

A chardev serves one TCP client, so spectators share the writer's relay:
every chunk the console prints goes to the writer and then to each
spectator.  What a spectator types is dropped (they are told once).  A
spectator who stops reading is not allowed to hold the writer back: its
transport is watched as a consumer, and one that falls more than
``MAX_LAG`` bytes behind is closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from consoled.endings import Ending, Kind
from consoled.sessions.relay import ClientSide, Relay
from consoled.tokens import ConnectInfo

if TYPE_CHECKING:
    from consoled.sessions import Session
    from consoled.store import Store

log = Logger()

#: How far a paused spectator may fall behind before it is closed.
MAX_LAG = 1024 * 1024

PROMOTED = b"\r\n[an operator handed you this console: you can type now]\r\n"
DEMOTED = b"\r\n[an operator handed this console to another user: you are read-only now]\r\n"
READ_ONLY = b"\r\n[read-only: another user is typing on this console; your keys are dropped]\r\n"


@implementer(IPushProducer)
class Spectator:
    """One spectator's end: receives the console's output, sends nothing."""

    def __init__(
        self, client: ClientSide, on_end: Callable[[Ending], None], *, told: bool = False
    ) -> None:
        self.client = client
        self.bytes_to_client = 0
        self.bytes_to_server = 0
        self.ending: Ending | None = None
        self._on_end = on_end
        self._paused = False
        self._lag = 0
        #: whether the user was already told their keys are dropped
        self._told = told
        self.client_address = "?"
        self.door = "?"
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


def readable_utc(seconds: float) -> str:
    """A moment as users read it (a refusal's "held since", the escape ``w``)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


class Seats:
    """The spectator half of :class:`consoled.sessions.Sessions`: seats beside a
    serial writer of this proxy, and the operator's takeover that swaps them."""

    spectators: bool
    proxy: str
    _store: Store
    _writers: dict[tuple[str, int], Session]
    _watching: set[defer.Deferred[Any]]

    def can_watch(self, info: ConnectInfo) -> bool:
        """Whether a refused user of this console may join it read-only here."""
        writer = self._writers.get((info.host, info.port))
        return self.spectators and writer is not None and writer.relay is not None

    def watch(
        self, info: ConnectInfo, door: str, client_address: str, client: ClientSide
    ) -> Spectator | None:
        """Join the console's writer on this proxy read-only; None if there is none."""
        writer = self._writers.get((info.host, info.port))
        if not self.can_watch(info) or writer is None or writer.relay is None:
            return None
        client.ready()
        spectator = self._join(writer.relay, info, door, client_address, client, told=True)
        client.send(READ_ONLY)
        log.info(
            "spectator {client} joined {host}:{port} of writer session {session_id}",
            client=client_address,
            host=info.host,
            port=info.port,
            session_id=writer.id,
        )
        return spectator

    def _join(
        self,
        relay: Relay,
        info: ConnectInfo,
        door: str,
        client_address: str,
        client: ClientSide,
        told: bool = False,
    ) -> Spectator:
        """Add a read-only user to a writer's relay, with a spectator row of its own."""
        row = self._store.open_session(
            info=info, door=door, client_address=client_address, proxy=self.proxy, mode="spectator"
        )
        self._watching.add(row)

        def ended(ending: Ending) -> None:
            if spectator in relay.watchers:
                relay.watchers.remove(spectator)
            row.addCallback(
                lambda session_id: self._store.end_session(
                    session_id,
                    reason=str(ending),
                    bytes_to_client=spectator.bytes_to_client,
                    bytes_to_server=0,
                )
            )
            row.addErrback(lambda f: log.failure("spectator row", f))
            row.addBoth(lambda _: self._watching.discard(row))

        spectator = Spectator(client, ended, told=told)
        spectator.client_address, spectator.door = client_address, door
        relay.watchers.append(spectator)
        return spectator

    def takeover(self, session: Session) -> bool:
        """Hand a writer's console to its first spectator; the writer watches from then on.

        The console's one connection stays up: only the users swap places.
        False when there is nobody to hand it to.
        """
        relay = session.relay
        if not self.spectators or relay is None or relay.backend is None or not relay.watchers:
            return False
        promoted = relay.watchers[0]
        promoted.detach(Ending(Kind.KICKED, "promoted to writer by an operator"))
        previous = relay.hand_over(promoted.client)
        promoted.client.rebind(relay)
        old_address, old_door = session.client_address, session.door
        session.client_address, session.door = promoted.client_address, promoted.door
        demoted = self._join(relay, session.info, old_door, old_address, previous)
        previous.rebind(demoted)
        promoted.client.send(PROMOTED)
        previous.send(DEMOTED)
        assert session.id is not None
        d = self._store.reassign_session(
            session.id, client_address=promoted.client_address, door=promoted.door
        )
        d.addErrback(lambda f: log.failure("takeover row", f))
        if session.recording is not None:
            session.recording.event(
                f"takeover: {promoted.client_address} writes, {old_address} watches"
            )
        log.info(
            "session {session_id}: an operator handed {host}:{port} from {old} to {new}",
            session_id=session.id,
            host=session.info.host,
            port=session.info.port,
            old=old_address,
            new=promoted.client_address,
        )
        return True

    def who(self, info: ConnectInfo) -> str:
        """Who uses this console through this proxy, one line each."""
        writer = self._writers.get((info.host, info.port))
        if writer is None or writer.relay is None:
            return "nobody else uses this console through this proxy"
        lines = [
            f"writing: {writer.client_address} via {writer.door}"
            f" since {readable_utc(writer.started)}"
        ]
        lines += [f"watching: {w.client_address} via {w.door}" for w in writer.relay.watchers]
        return "\r\n".join(lines)
