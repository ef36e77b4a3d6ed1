"""Abuse limits: what one client address may ask of one proxy.

- :class:`FailureThrottle`: ``limit`` failed token checks from one address
  within ``window`` seconds ban it for ``ban`` seconds; a banned address is
  answered at the gate without touching the store.
- :class:`PeerLimit`: at most ``limit`` open connections per client address
  on one door, counted where the door accepts them; one more is answered on
  the door's own wire and closed.  Addresses of ``[consoled]
  trusted_proxies`` are not counted (every user behind a load balancer
  shares its address).

Each is in memory, per process: with several proxies (or workers) a client
may reach each of them up to its limit.  Memory is bounded: each table holds
at most ``MAX_ADDRESSES`` addresses, dropping the least recently seen.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.endings import Ending, Kind
from consoled.policy import Network, is_trusted

log = Logger()

#: The most addresses a table remembers.
MAX_ADDRESSES = 100_000


class FailureThrottle:
    """Failed token checks per client address, and the bans they earn."""

    def __init__(self, clock: IReactorTime, limit: int, window: float, ban: float) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self.ban = ban
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._banned: OrderedDict[str, float] = OrderedDict()

    def banned_until(self, address: str) -> float | None:
        """When the ban of ``address`` ends, or None if it may try."""
        until = self._banned.get(address)
        if until is None:
            return None
        if until <= self._clock.seconds():
            del self._banned[address]
            return None
        return until

    def failed(self, address: str) -> bool:
        """Count a failure; True if it earned ``address`` a ban."""
        if self.limit <= 0:
            return False
        now = self._clock.seconds()
        times = self._failures.pop(address, None) or deque(maxlen=self.limit)
        times.append(now)
        self._failures[address] = times  # most recently seen last
        _trim(self._failures)
        if len(times) < self.limit or now - times[0] > self.window:
            return False
        del self._failures[address]
        self._banned[address] = now + self.ban
        _trim(self._banned)
        log.warn(
            "banned {address} for {ban:g}s: {limit} failed token checks within {window:g}s",
            address=address,
            ban=self.ban,
            limit=self.limit,
            window=self.window,
        )
        return True


def _trim(table: OrderedDict[str, Any]) -> None:
    while len(table) > MAX_ADDRESSES:
        table.popitem(last=False)


class Refuser(Protocol):
    """Says a door's refusal on its wire and closes."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connectionMade(self) -> None:
        self.transport.write(self._answer)
        self.transport.loseConnection()


class PeerLimit(Factory):
    """At most ``limit`` open connections per client address to one door.

    Stands in front of the door's factory.  The door's protocol is the one
    the transport talks to (no wrapper in the data path): its
    ``connectionLost`` is chained on the instance to count the connection
    out.  ``answer`` renders a refusal on the door's wire (an HTTP status, a
    line of text).
    """

    noisy = False

    def __init__(
        self,
        door: str,
        factory: Any,
        limit: int,
        answer: Callable[[Ending], bytes],
        trusted: Iterable[Network] = (),
    ) -> None:
        self.door = door
        self.wrapped = factory
        self.limit = limit
        self.answer = answer
        self.trusted = tuple(trusted)
        #: open connections per counted address
        self.open: dict[str, int] = {}

    def logPrefix(self) -> str:
        # The port's "… starting on N" line names the door's factory, not this one.
        prefix: str = self.wrapped.logPrefix()
        return prefix

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        address = getattr(addr, "host", None)
        if (
            self.limit <= 0
            or address is None
            or (self.trusted and is_trusted(address, self.trusted))
        ):
            return self.wrapped.buildProtocol(addr)
        count = self.open.get(address, 0)
        if count >= self.limit:
            ending = Ending(Kind.TOO_MANY_CONNECTIONS, f"{count} open from this address")
            log.info(
                "refused {door} connection from {address}: {ending}",
                door=self.door,
                address=address,
                ending=ending,
            )
            return Refuser(self.answer(ending))
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        self.open[address] = count + 1
        lost = protocol.connectionLost

        def counted_out(reason: Failure = connectionDone) -> None:
            left = self.open.pop(address, 1) - 1
            if left:
                self.open[address] = left
            lost(reason)

        protocol.connectionLost = counted_out
        return protocol

    def __getattr__(self, name: str) -> Any:
        # The door factory's own attributes (gate, clock, …) stay reachable.
        return getattr(self.wrapped, name)
