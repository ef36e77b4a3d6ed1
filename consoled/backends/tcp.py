"""The hypervisor side: a TCP connection to a console server.

When the token carries an ``internal_access_path`` (XenServer style), the
connection first sends ``CONNECT <path> HTTP/1.1\\r\\n\\r\\n`` and expects a
``200`` status line; the answer's headers end with a blank line and any
bytes after it are console data, kept and relayed first.  Any other status
refuses the session (nova's old check let non-200 answers through).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from consoled.endings import Kind, Refusal

#: How much one read from the hypervisor takes at most.
READ_SIZE = 256 * 1024

#: The most of a CONNECT answer's head we read before giving up on it.
MAX_CONNECT_ANSWER = 16 * 1024


class BackendProtocol(Protocol):
    """The hypervisor end of one session."""

    def __init__(self, connect_path: str | None) -> None:
        # Cancelled by the connect timeout while the CONNECT exchange is pending.
        self.ready: defer.Deferred[BackendProtocol] = defer.Deferred(
            lambda _: self.transport.abortConnection()
        )
        self._connect_path = connect_path
        self._head = b""
        self._held: list[bytes] = []
        self._relay: Any = None
        self._lost: Failure | None = None

    def connectionMade(self) -> None:
        # Read the console in large chunks: fewer, bigger frames to the user.
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = READ_SIZE
        if self._connect_path is None:
            self.ready.callback(self)
            return
        self.transport.write(b"CONNECT %s HTTP/1.1\r\n\r\n" % self._connect_path.encode("utf-8"))

    def dataReceived(self, data: bytes) -> None:
        if self._relay is not None:
            self._relay.from_backend(data)
        elif self.ready.called:
            # Ready but not yet attached: keep it (at most one read) and stop reading.
            self._held.append(data)
            self.transport.pauseProducing()
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
        if rest:
            self._held.append(rest)
        self.ready.callback(self)

    def _refuse(self, detail: str) -> None:
        self.ready.errback(Refusal(Kind.BACKEND_REFUSED, detail))
        self.transport.loseConnection()

    def attach(self, relay: Any) -> None:
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
            self.ready.errback(Refusal(Kind.BACKEND_REFUSED, "closed before answering the CONNECT"))
        elif self._relay is not None:
            self._relay.backend_lost(reason.getErrorMessage())
        else:
            self._lost = reason  # ready but not attached yet: attach() passes it on


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A direct endpoint for an IP literal (no resolver thread hop), else HostnameEndpoint."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


def connect_backend(
    reactor: Any, host: str, port: int, *, timeout: float, connect_path: str | None = None
) -> defer.Deferred[BackendProtocol]:
    """Connect to a console server; fires when it is ready to relay.

    Fails with a :class:`Refusal` whose kind says why: unreachable, timed
    out (connect and CONNECT exchange together within ``timeout``), refused.
    """
    endpoint = _endpoint(reactor, host, port, timeout)
    factory = Factory.forProtocol(lambda: BackendProtocol(connect_path))
    factory.noisy = False  # one factory per session: no "Starting factory" line each time
    connecting = endpoint.connect(factory)

    def connected(protocol: BackendProtocol) -> defer.Deferred[BackendProtocol]:
        return protocol.ready

    def explain(failure: Failure) -> Failure:
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

    d = connecting.addCallback(connected)
    d.addTimeout(timeout, reactor)
    return d.addErrback(explain)
