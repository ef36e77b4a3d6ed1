"""The PROXY protocol in front of a door: the real client behind HAProxy.

HAProxy in TCP mode (``server … send-proxy-v2``) opens each connection to a
proxy with a header that names the client it accepted, then passes the
client's own bytes (a TLS handshake, an HTTP request, a serial user's line)
unchanged.  On a door named in ``[consoled] proxy_protocol`` the header comes
first, before TLS::

    TCP ─► ProxyHeaderReader ─► TLS or plain (consoled.tls) ─► PeerLimit ─► door

The reader takes the v1 (text) or v2 (binary) header with the parsers of
Twisted's ``twisted.protocols.haproxy``; only once it is whole does it build
the chain behind it, with the client's address, so `PeerLimit` counts the
client, and the reader, as the chain's transport, answers ``getPeer`` with
it: the doors, the gate (its logs, its failure throttle, ``X-Forwarded-For``
trust) and the session rows see the client, never HAProxy.  A header of the
``LOCAL`` kind (HAProxy's own health checks) names no client: the
connection's own peer stands.

A connection whose first bytes are no valid header, or that sends none
within `HEADER_TIMEOUT` seconds, or that comes from an address outside
``[consoled] trusted_proxies`` when that list is set, is refused: one log
line, closed without a word (nothing has been agreed yet in which to answer;
a client that reaches such a door directly is misconfigured or probing).

Twisted's own ``HAProxyWrappingFactory`` is not used as it is: it builds the
door's protocol before the header arrives (a door reading its peer in
``connectionMade`` would see HAProxy), closes a connection whose first read is
shorter than 16 bytes, and has no deadline.

The reader stays in the data path as the door's transport (a
``ProtocolWrapper``): the relay's ``write_now`` fast path (plain TCP only,
consoled/sessions/relay.py) is off on such a door.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from consoled.policy import Network, is_trusted

log = Logger()

#: Seconds a connection has to send its whole header (HAProxy sends it at once).
HEADER_TIMEOUT = 5.0

#: How each version's header starts.
V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = V2Parser.PREFIX
#: A v2 header is 16 bytes and at most 65,535 more; v1 is a line of at most 107.


class NoHeader(Exception):
    """Why a connection's first bytes are not a PROXY protocol header."""


def _parser_for(start: bytes) -> V1Parser | V2Parser | None:
    """The parser for a header that begins with ``start``; None while too short to tell."""
    for signature, parser in ((V1_SIGNATURE, V1Parser), (V2_SIGNATURE, V2Parser)):
        if start[: len(signature)] == signature[: len(start)]:
            if len(start) < len(signature) or (parser is V2Parser and len(start) < 16):
                return None  # a prefix of the signature (and, for v2, of its fixed part)
            if parser is V2Parser and start[12] >> 4 != 2:
                raise NoHeader("PROXY v2 signature with another version")
            return parser()
    raise NoHeader("no PROXY protocol header")


class ProxyHeaderReader(ProtocolWrapper):
    """Reads the header, then builds the door's chain and stands as its transport."""

    factory: ProxyHeaderFactory
    wrappedProtocol: Any = None
    _timer: Any = None

    def __init__(self, factory: ProxyHeaderFactory, addr: IAddress) -> None:
        self.factory = factory
        self.addr = addr
        self._start = b""
        self._parser: V1Parser | V2Parser | None = None
        self._source: IAddress | None = None
        self._destination: IAddress | None = None

    def logPrefix(self) -> str:
        return f"ProxyHeader({self.factory.door})"

    def makeConnection(self, transport: Any) -> None:
        # The chain behind is built once the header is read, not here.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        factory = self.factory
        sender = getattr(self.addr, "host", None)
        if factory.trusted and (sender is None or not is_trusted(sender, factory.trusted)):
            self._refuse("not from [consoled] trusted_proxies")
            return
        self._timer = factory.clock.callLater(
            factory.timeout, self._refuse, f"no PROXY protocol header within {factory.timeout:g}s"
        )

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        try:
            if self._parser is None:
                self._start += data
                self._parser = _parser_for(self._start)
                if self._parser is None:
                    return
                data, self._start = self._start, b""
            info, rest = self._parser.feed(data)
        except NoHeader as why:
            self._refuse(str(why))
            return
        except (InvalidProxyHeader, ValueError, IndexError) as error:
            self._refuse(f"invalid PROXY protocol header ({type(error).__name__})")
            return
        if info is None:
            return  # more of the header to come
        self._cancel_timer()
        self._parser = None
        self._source, self._destination = info.source, info.destination
        peer = self.getPeer()
        inner = self.factory.wrapped.buildProtocol(peer)
        if inner is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = inner
        inner.makeConnection(self)
        if rest:
            inner.dataReceived(rest)

    def getPeer(self) -> IAddress:
        return self._source or self.transport.getPeer()

    def getHost(self) -> IAddress:
        return self._destination or self.transport.getHost()

    def _refuse(self, why: str) -> None:
        self._cancel_timer()
        log.info(
            "refused {door} connection from {peer}: {why}",
            door=self.factory.door,
            peer=getattr(self.addr, "host", self.addr),
            why=why,
        )
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        inner, self.wrappedProtocol = self.wrappedProtocol, None
        if inner is not None:
            inner.connectionLost(reason)


class ProxyHeaderFactory(Factory):
    """A door's factory (its TLS or plain chain) behind a PROXY protocol header.

    ``trusted``: when not empty, only these addresses may send a header
    (``[consoled] trusted_proxies``); a connection from elsewhere is refused.
    """

    noisy = False

    def __init__(
        self,
        door: str,
        wrapped: IProtocolFactory,
        clock: IReactorTime,
        timeout: float = HEADER_TIMEOUT,
        trusted: Iterable[Network] = (),
    ) -> None:
        self.door = door
        self.wrapped = wrapped
        self.clock = clock
        self.timeout = timeout
        self.trusted = tuple(trusted)

    def buildProtocol(self, addr: IAddress) -> ProxyHeaderReader:
        return ProxyHeaderReader(self, addr)

    def startFactory(self) -> None:
        self.wrapped.doStart()

    def stopFactory(self) -> None:
        self.wrapped.doStop()
