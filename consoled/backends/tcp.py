"""The hypervisor side: a TCP connection to a console server.

When the token carries an ``internal_access_path`` (XenServer style), the
connection first sends ``CONNECT <path> HTTP/1.1\\r\\n\\r\\n`` and expects a
``200`` status line; the answer's headers end with a blank line and any
bytes after it are console data, kept and relayed first.  Any other status
refuses the session (nova's old check let non-200 answers through).

A connector whose console must be spoken to before relaying (an RFB
security handshake, TLS, an authd exchange) gives a :class:`Handshake`: it
gets the console's bytes after the CONNECT (if any) until it calls
:meth:`BackendProtocol.handshake_done` or :meth:`BackendProtocol.handshake_failed`.
It may also give a *front*: an endpoint that takes the user's first bytes
(the user's half of the handshake) before the relay does.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from typing import Any
from typing import Protocol as Interface

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from consoled.endings import Kind, Refusal

#: How much one read from the hypervisor takes at most.
READ_SIZE = 256 * 1024

#: The most of a CONNECT answer's head we read before giving up on it.
MAX_CONNECT_ANSWER = 16 * 1024


class Handshake(Interface):
    """A connector's own exchange with the console before relaying starts."""

    def start(self, backend: BackendProtocol) -> None:
        """Connected (CONNECT answered, if any): speak first if the protocol says so."""

    def data_received(self, data: bytes) -> None:
        """The console's bytes (decrypted, once the exchange started TLS)."""

    def tls_up(self) -> None:
        """A TLS handshake the exchange started has completed."""

    def closed(self, reason: Failure) -> Refusal:
        """Why the session is refused: the console closed during the exchange."""


#: Given the relay, returns the endpoint that takes the user's bytes first.
Front = Callable[[Any], Any]


@implementer(IHandshakeListener)
class BackendProtocol(Protocol):
    """The hypervisor end of one session."""

    def __init__(self, connect_path: str | None, handshake: Handshake | None = None) -> None:
        # Cancelled by the connect timeout while the CONNECT exchange or handshake is pending.
        self.ready: defer.Deferred[BackendProtocol] = defer.Deferred(
            lambda _: self.transport.abortConnection()
        )
        self._connect_path = connect_path
        #: the exchange to run once connected (and the CONNECT answered)
        self._then = handshake
        #: the exchange under way: it takes the console's bytes until ready
        self._handshake: Handshake | None = None
        self._head = b""
        self._held: list[bytes] = []
        self._relay: Any = None
        self._lost: Failure | None = None
        self._front: Front | None = None

    def connectionMade(self) -> None:
        # Read the console in large chunks: fewer, bigger frames to the user.
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = READ_SIZE
        if self._connect_path is None:
            self._connected()
            return
        self.transport.write(b"CONNECT %s HTTP/1.1\r\n\r\n" % self._connect_path.encode("utf-8"))

    def _connected(self, rest: bytes = b"") -> None:
        """Connected, and the CONNECT answered: the handshake's turn, or ready."""
        self._handshake, self._then = self._then, None
        if self._handshake is None:
            if rest:
                self._held.append(rest)
            self.ready.callback(self)
            return
        self._handshake.start(self)
        if rest and not self.ready.called:
            self._handshake.data_received(rest)

    # -- what a Handshake calls ----------------------------------------------

    def handshake_done(self, rest: bytes = b"", front: Front | None = None) -> None:
        """The console is ready; ``rest`` is its first bytes for the user."""
        self._handshake = None
        self._front = front
        if rest:
            self._held.append(rest)
        self.ready.callback(self)

    def handshake_failed(self, refusal: Refusal) -> None:
        self._handshake = None
        self.ready.errback(refusal)
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        if self._handshake is not None:
            self._handshake.tls_up()

    # -- bytes ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._relay is not None:
            self._relay.from_backend(data)
        elif self.ready.called:
            # Ready but not yet relaying: keep it (at most one read) and stop reading.
            self._held.append(data)
            self.transport.pauseProducing()
        elif self._handshake is not None:
            self._handshake.data_received(data)
        else:
            self._read_connect_answer(data)

    def _read_connect_answer(self, data: bytes) -> None:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_CONNECT_ANSWER:
                self._refuse("CONNECT answer too long")
            return
        status_line = self._head.split(b"\r\n", 1)[0].decode("latin-1")
        rest, self._head = self._head[end + 4 :], b""
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or parts[1] != "200":
            self._refuse(f"CONNECT answered {status_line[:80]!r}")
            return
        self._connected(rest)

    def _refuse(self, detail: str) -> None:
        self.ready.errback(Refusal(Kind.BACKEND_REFUSED, detail))
        self.transport.loseConnection()

    # -- relaying ------------------------------------------------------------

    def attach(self, relay: Any) -> Any:
        """Relay from now on, or, with a front, once the front calls :meth:`relay_to`.

        Returns the front's endpoint for the user's bytes, if there is one.
        """
        if self._front is not None:
            return self._front(relay)
        self.relay_to(relay)
        return None

    def relay_to(self, relay: Any) -> None:
        """Hand the console's bytes to ``relay``, what was held first."""
        self._relay = relay
        held, self._held = self._held, []
        for chunk in held:
            relay.from_backend(chunk)
        if self._lost is not None:
            relay.backend_lost(self._lost.getErrorMessage())
            return
        self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if not self.ready.called:
            self.ready.errback(_lost_early(reason, self._handshake))
        elif self._relay is not None:
            self._relay.backend_lost(reason.getErrorMessage())
        else:
            self._lost = reason  # ready but not relaying yet: relay_to() passes it on


def _lost_early(reason: Failure, handshake: Any) -> Refusal:
    """Why a console that closed before it was ready refused the session."""
    if reason.check(SSL.Error):
        return Refusal(Kind.BACKEND_TLS, ssl_reason(reason.value))
    if handshake is not None:
        return handshake.closed(reason)
    return Refusal(Kind.BACKEND_REFUSED, "closed before answering the CONNECT")


def ssl_reason(exc: Exception) -> str:
    """OpenSSL's own words: 'certificate verify failed', 'tlsv13 alert certificate required'."""
    entries = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [entry[2] for entry in entries if isinstance(entry, tuple) and len(entry) == 3]
    return ", ".join(reasons) or str(exc) or type(exc).__name__


@functools.lru_cache(maxsize=4096)
def _ip_version(host: str) -> int:
    """4 or 6 for an IP literal, 0 for a name; a cell has few hypervisors, and
    parsing the address took ~2 % of a session's set-up (issue 16)."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 0


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A direct endpoint for an IP literal (no resolver thread hop), else HostnameEndpoint."""
    version = _ip_version(host)
    if version == 0:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


def connect_backend(
    reactor: Any,
    host: str,
    port: int,
    *,
    timeout: float,
    connect_path: str | None = None,
    handshake: Callable[[], Handshake] | None = None,
    wrap: Callable[[BackendProtocol], Any] | None = None,
) -> defer.Deferred[BackendProtocol]:
    """Connect to a console server; fires when it is ready to relay.

    Fails with a :class:`Refusal` whose kind says why: unreachable, timed
    out (connect, CONNECT exchange and handshake together within
    ``timeout``), refused, TLS failed.  ``wrap``, given the backend, returns
    the protocol that the TCP connection feeds (it must pass the backend its
    connection and offer its ``ready``): a layer under the backend, such as
    WebMKS's succession of TLS sessions.
    """
    endpoint = _endpoint(reactor, host, port, timeout)

    def build() -> Any:
        backend = BackendProtocol(connect_path, handshake() if handshake else None)
        return wrap(backend) if wrap else backend

    factory = Factory.forProtocol(build)
    factory.noisy = False  # one factory per session: no "Starting factory" line each time
    connecting = endpoint.connect(factory)

    def connected(protocol: BackendProtocol) -> defer.Deferred[BackendProtocol]:
        return protocol.ready

    d = connecting.addCallback(connected)
    d.addTimeout(timeout, reactor)
    return d.addErrback(explain_failure, host, port, timeout)


def explain_failure(failure: Failure, host: str, port: int, timeout: float) -> Failure:
    """A connector's failure as a Refusal: its own, timed out, or unreachable."""
    if failure.check(Refusal):
        return failure
    # addTimeout cancels the connect; endpoints then fail with ConnectingCancelledError.
    if failure.check(
        defer.TimeoutError,
        defer.CancelledError,
        error.TimeoutError,
        error.ConnectingCancelledError,
    ):
        raise Refusal(Kind.BACKEND_TIMEOUT, f"{host}:{port} after {timeout:g}s")
    raise Refusal(Kind.BACKEND_UNREACHABLE, f"{host}:{port}: {failure.getErrorMessage()}")
