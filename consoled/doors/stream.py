"""What the two doors over a raw stream (XVP, raw serial) share: one deadline
to present a token, one admission at the gate in flight, one endpoint after.

A door subclasses :class:`GatedStream`, names itself (``door``), calls
:meth:`wait` to arm its deadline, :meth:`admit` with the token it read, and
implements :meth:`admitted` (start the pass) and :meth:`refused` (say why).
Leaving at any point cancels the deadline and the admission (the gate gives
back what it took) and ends the session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from consoled.endings import Refusal
from consoled.gate import Endpoint, Facts, Pass


class GatedStream(Protocol):
    door: str
    factory: Any
    state = "closed"
    client_address = "?"
    #: where the user's bytes go once the session started (a relay, or a seat)
    relay: Endpoint | None = None
    _deadline: IDelayedCall | None = None
    #: the gate's answer being awaited
    _admitting: defer.Deferred[Pass] | None = None

    def connectionMade(self) -> None:
        self.client_address = getattr(self.transport.getPeer(), "host", "?")

    def wait(self, seconds: float, then: Callable[[], None]) -> None:
        """Arm the door's one deadline."""
        self.stop_waiting()
        self._deadline = self.factory.clock.callLater(seconds, self._expired, then)

    def _expired(self, then: Callable[[], None]) -> None:
        self._deadline = None
        then()

    def stop_waiting(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def admit(self, token: str) -> None:
        """Hand the token to the gate; ``admitted`` or ``refused`` follows."""
        self._admitting = self.factory.gate.admit(self.door, token, Facts(peer=self.client_address))
        self._admitting.addCallbacks(self._passed, self._failed)

    def _passed(self, admitted: Pass) -> None:
        self._admitting = None
        self.admitted(admitted)

    def _failed(self, failure: Failure) -> None:
        self._admitting = None
        if failure.check(Refusal):  # else cancelled: the user left, or the door gave up
            self.refused(failure.value)

    def admitted(self, admitted: Pass) -> None:
        raise NotImplementedError

    def refused(self, refusal: Refusal) -> None:
        raise NotImplementedError

    def give_up(self) -> None:
        """The door closes: no deadline, no admission left in flight."""
        self.stop_waiting()
        if self._admitting is not None:
            self._admitting.cancel()

    def rebind(self, endpoint: Any) -> None:
        """A takeover: the user's bytes go to ``endpoint`` now (the relay, or a seat)."""
        self.relay = endpoint

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        previous, self.state = self.state, "closed"
        self.give_up()
        if self.relay is not None:
            self.relay.client_lost("connection lost" if previous != "closed" else "")
