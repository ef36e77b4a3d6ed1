"""The relay: bytes both ways between a user's door and a hypervisor's socket.

Flow control is Twisted's producer/consumer pairing, as in
``twisted.protocols.portforward``: the hypervisor connection is registered as
the producer for the user's transport, and the user's transport as the
producer for the hypervisor connection, so a slow reader on either side
pauses reading on the other and no buffer grows without bound.

Two clocks live here because they watch the bytes: the idle timeout (traffic
either way resets it) and the session deadline (``[consoleauth]
enforce_session_timeout``: the token's expiry).  Neither re-arms a timer per
chunk: the idle timer wakes once per period and compares timestamps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime

from consoled.endings import Ending, Kind
from consoled.wire import write_now


def no_delay(transport: Any) -> None:
    """Turn off Nagle's algorithm on a TCP transport (TLS wrappers pass it down)."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass  # not TCP (a test's transport), or already closed


class ClientSide(Protocol):
    """What a door hands the relay: the user's end of the session."""

    #: the transport that carries bytes to the user (backend reads pause on it)
    consumer: IConsumer
    #: what pauses reading from the user when the hypervisor is slow
    producer: IPushProducer

    def ready(self) -> None:
        """The console is connected; relaying starts right after this returns."""

    def send(self, data: bytes) -> None: ...

    def close(self, ending: Ending) -> None: ...

    def rebind(self, endpoint: Any) -> None:
        """From now on hand the user's bytes to ``endpoint`` (a takeover swaps them)."""


class TransportClientSide:
    """For a door whose user's transport is both the consumer and the producer."""

    transport: Any

    @property
    def consumer(self) -> Any:
        return self.transport

    @property
    def producer(self) -> Any:
        return self.transport

    def rebind(self, endpoint: Any) -> None:
        self.relay = endpoint


class BackendSide(Protocol):
    transport: Any

    def attach(self, relay: Relay) -> Any:
        """Start handing the console's bytes to ``relay``; may return a front for the user's."""


class Relay:
    """One live session's pipe; ends once, whichever side goes first."""

    def __init__(
        self,
        client: ClientSide,
        clock: IReactorTime,
        on_end: Callable[[Ending], None],
        *,
        idle_timeout: float = 0,
        deadline: float | None = None,
    ) -> None:
        self.client = client
        self.backend: BackendSide | None = None
        self.bytes_to_client = 0
        self.bytes_to_server = 0
        self.ending: Ending | None = None
        #: sees every chunk on its way to the user (serial recording)
        self.tap: Callable[[bytes], None] | None = None
        #: read-only users of the same console (serial spectators)
        self.watchers: list[Any] = []
        self._clock = clock
        self._on_end = on_end
        self._pending: list[bytes] = []
        self._idle_timeout = idle_timeout
        self._last_traffic = clock.seconds()
        self._timers: list[IDelayedCall] = []
        if idle_timeout > 0:
            self._timers.append(clock.callLater(idle_timeout, self._check_idle))
        if deadline is not None:
            delay = max(0.0, deadline - clock.seconds())
            self._timers.append(
                clock.callLater(delay, self.end, Ending(Kind.TOKEN_EXPIRED, "session timeout"))
            )

    # -- wiring -------------------------------------------------------------

    def attach_backend(self, backend: BackendSide) -> None:
        """Start relaying: pair producers and deliver what the user sent early."""
        if self.ending is not None:
            backend.transport.loseConnection()
            return
        self.backend = backend
        # Consoles are interactive: a keystroke or a small screen update must
        # not wait behind Nagle's algorithm for an ACK.
        no_delay(backend.transport)
        no_delay(self.client.consumer)
        self.client.ready()
        # A backend whose handshake has a half on the user's side (the RFB
        # security proxy plays the server to the user) gives a front: the
        # user's bytes go there until it hands the user back to this relay.
        front = backend.attach(self)
        self.client.consumer.registerProducer(backend.transport, True)
        backend.transport.registerProducer(self.client.producer, True)
        pending, self._pending = self._pending, []
        if front is not None:
            self.client.rebind(front)
            for chunk in pending:
                front.from_client(chunk)
        elif pending:
            backend.transport.writeSequence(pending)
        if pending:
            self.client.producer.resumeProducing()

    def hand_over(self, client: ClientSide) -> ClientSide:
        """Give the console to another user on the same connection; returns the previous one."""
        assert self.backend is not None
        previous, transport = self.client, self.backend.transport
        previous.consumer.unregisterProducer()
        transport.unregisterProducer()
        self.client = client
        client.consumer.registerProducer(transport, True)
        transport.registerProducer(client.producer, True)
        return previous

    # -- data ---------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self.bytes_to_server += len(data)
        self._last_traffic = self._clock.seconds()
        if self.backend is None:
            # Not connected yet: hold this chunk and stop reading until we are.
            self._pending.append(data)
            self.client.producer.pauseProducing()
            return
        write_now(self.backend.transport, data)

    def from_backend(self, data: bytes) -> None:
        self.bytes_to_client += len(data)
        self._last_traffic = self._clock.seconds()
        if self.tap is not None:
            self.tap(data)
        self.client.send(data)
        for watcher in self.watchers:
            watcher.from_backend(data)

    # -- endings ------------------------------------------------------------

    def client_lost(self, detail: str = "") -> None:
        self.end(Ending(Kind.CLIENT_CLOSED, detail))

    def backend_lost(self, detail: str = "") -> None:
        self.end(Ending(Kind.BACKEND_CLOSED, detail))

    def end(self, ending: Ending) -> None:
        """Close both sides once and report the ending (the session row closes on it)."""
        if self.ending is not None:
            return
        self.ending = ending
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._pending = []
        if self.backend is not None:
            transport = self.backend.transport
            if ending.kind is not Kind.BACKEND_CLOSED:
                transport.loseConnection()
        if ending.kind is not Kind.CLIENT_CLOSED:
            self.client.close(ending)
        self._on_end(ending)

    def _check_idle(self) -> None:
        idle = self._clock.seconds() - self._last_traffic
        if idle >= self._idle_timeout:
            self.end(Ending(Kind.IDLE, f"no traffic for {idle:.0f}s"))
        else:
            self._timers = [t for t in self._timers if t.active()]
            self._timers.append(self._clock.callLater(self._idle_timeout - idle, self._check_idle))
