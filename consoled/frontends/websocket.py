"""The websocket door: noVNC, spice-html5 and the serial page, through Autobahn.

Wire summary (docs/websocket.md has the whole table):

- Upgrades are answered on any path; the token is the ``token`` query
  parameter, else the ``token`` cookie.
- Refused before the 101 answer with a plain-text body: 400 bad handshake,
  401 no/unknown/expired token, 403 Origin not allowed or a token for another
  door's console type, 409 serial port in use (with since when), 503 token
  store unavailable.
- The ``binary`` subprotocol is chosen when offered; none is fine too.
- After the upgrade a session ends with a close code: 1000 console closed,
  1001 proxy shutting down, 1011 internal error, 4401 token expired,
  4408 idle timeout, 4409 disconnected by an operator, 4502 console
  unreachable, 4503 token store unavailable, 4504 console did not answer in
  time, 4506 console refused the connection.

Autobahn swallows exceptions raised in its callbacks, so every callback here
catches, logs and answers itself.
"""

from __future__ import annotations

import pprint
import re
import struct
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.authorizer import Authorizer, log_refusal
from consoled.endings import Ending, Kind, Refusal
from consoled.frontends.answers import plain_response
from consoled.policy import Network, check_console_type, check_origin, is_trusted, token_from
from consoled.relay import Relay, TransportClientSide, write_now
from consoled.sessions import LEASED_TYPES, Admission, Sessions
from consoled.tokens import ConnectInfo

log = Logger()


class _Formatted:
    """``pformat`` deferred until a log event is actually rendered."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def __str__(self) -> str:
        return pprint.pformat(self._value)

    __repr__ = __str__


# Autobahn pretty-prints its ~36 protocol options for a debug line on every
# connection, whether or not debug is on: about 15% of a session's set-up
# (benchmarks/run.py --profile-consoled).  Formatting lazily keeps that line
# for whoever turns debug on.
autobahn_protocol.pformat = _Formatted

HTTP_STATUS = {
    Kind.NO_TOKEN: 401,
    Kind.INVALID_TOKEN: 401,
    Kind.WRONG_CONSOLE_TYPE: 403,
    Kind.ORIGIN_REFUSED: 403,
    Kind.BAD_REQUEST: 400,
    Kind.PORT_BUSY: 409,
    Kind.STORE_UNAVAILABLE: 503,
}

CLOSE_CODES = {
    Kind.BACKEND_CLOSED: 1000,
    Kind.SHUTDOWN: 1001,
    Kind.INTERNAL: 1011,
    Kind.TOKEN_EXPIRED: 4401,
    Kind.IDLE: 4408,
    Kind.KICKED: 4409,
    Kind.PORT_BUSY: 4409,
    Kind.BACKEND_UNREACHABLE: 4502,
    Kind.STORE_UNAVAILABLE: 4503,
    Kind.BACKEND_TIMEOUT: 4504,
    Kind.BACKEND_REFUSED: 4506,
}

#: A server frame's header for each payload size under 126 (a keystroke's
#: echo, a cursor update): a list index instead of building the two bytes.
_SMALL_HEADERS = [bytes((0x82, size)) for size in range(126)]
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")

#: How much may wait in consoled for a slow browser before the hypervisor pauses.
USER_WRITE_BUFFER = 256 * 1024

#: The largest websocket message accepted from a user.
MAX_MESSAGE = 4 * 1024 * 1024

#: header size -> the smallest payload length that encoding may carry (RFC 6455 5.2)
_MIN_EXTENDED = {8: 126, 14: 65536}

#: What may hold a token in text that quotes a request: a ``token=`` value (in
#: a query, a fragment, a ``;`` parameter, a cookie; its ``=`` maybe
#: URL-encoded), whatever follows a ``#`` (Autobahn quotes a fragment without
#: it), and anything shaped like a token, a uuid (dashes encoded or left out).
_TOKENISH = re.compile(
    r"(token\s*(?:=|%3D|%253D)\s*\"?)[^&;,\s\"']*"
    r"|(#|%23|fragment identifier \")[^\s\"]+"
    r"|[0-9a-f]{8}(?:-|%2D)?(?:[0-9a-f]{4}(?:-|%2D)?){3}[0-9a-f]{12}",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Text that quotes a request (a request line, a header, Autobahn's own
    reasons) with every place that may hold a token replaced by ``<redacted>``."""
    return _TOKENISH.sub(lambda found: (found[1] or found[2] or "") + "<redacted>", text)


@dataclass(frozen=True)
class Door:
    """What one websocket listener knows: its name and the shared core."""

    name: str
    authorizer: Authorizer
    sessions: Sessions
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()


class ConsoleServerProtocol(TransportClientSide, WebSocketServerProtocol):
    """One user's websocket; a thin adapter between Autobahn and the relay."""

    factory: ConsoleServerFactory
    relay: Relay | None = None
    info: ConnectInfo | None = None
    client_address = "?"
    #: set once consoled itself refused, so Autobahn's own refusals are told apart
    _refusal: Refusal | None = None
    #: the user left before the session could start (e.g. during the token check)
    _gone = False
    #: a serial console's row and lease, taken before the upgrade
    _admission: Admission | None = None
    #: admitted read-only, as a spectator of this proxy's writer
    _spectating = False

    def connectionMade(self) -> None:
        self.client_address = getattr(self.transport.getPeer(), "host", "?")
        super().connectionMade()

    # -- the opening handshake ---------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> defer.Deferred[str | None]:
        door = self.factory.door
        peer = self.transport.getPeer()
        peer_host = getattr(peer, "host", "?")
        self.client_address = _client_address(request, peer_host, door.trusted_proxies)
        headers = request.headers
        token = token_from(request.params, headers.get("cookie"))

        def admit(info: ConnectInfo) -> str | None:
            check_console_type(info, door.name)
            check_origin(
                info,
                origin=headers.get("origin"),
                host_header=headers.get("host"),
                forwarded_proto=headers.get("x-forwarded-proto"),
                peer=peer_host,
                allowed_origins=door.allowed_origins,
                trusted_proxies=door.trusted_proxies,
            )
            self.info = info
            if info.console_type not in LEASED_TYPES:
                return subprotocol()
            admitting = door.sessions.admit(info, f"websocket/{door.name}", self.client_address)
            return admitting.addCallbacks(admitted, spectate, errbackArgs=(info,))

        def spectate(failure: Failure, info: ConnectInfo) -> str | None:
            # A held port: join its writer read-only when this proxy allows it.
            if failure.check(Refusal) and failure.value.ending.kind is Kind.PORT_BUSY:
                if door.sessions.can_watch(info):
                    self._spectating = True
                    return subprotocol()
            return failure  # type: ignore[return-value]

        def admitted(admission: Admission) -> str | None:
            self._admission = admission
            if self._gone:
                door.sessions.release(admission, "client left before the session started")
            return subprotocol()

        def subprotocol() -> str | None:
            return "binary" if "binary" in request.protocols else None

        def refuse(failure: Failure) -> None:
            if failure.check(Refusal):
                refusal = failure.value
            else:
                log.failure("websocket admission failed", failure)
                refusal = Refusal(Kind.STORE_UNAVAILABLE)
            log_refusal(door.name, self.client_address, refusal)
            self._refusal = refusal
            status = HTTP_STATUS.get(refusal.ending.kind, 400)
            raise ConnectionDeny(status, str(refusal.ending))

        return door.authorizer.validate(token).addCallback(admit).addErrback(refuse)

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Answer a refused upgrade with a status line and a short plain-text body."""
        if self._refusal is None:
            # Autobahn's own validation: its reason may quote the request line.
            reason = redact(reason)
            log.info(
                "refused {door} websocket handshake from {client}: {reason}",
                door=self.factory.door.name,
                client=self.client_address,
                reason=reason,
            )
        self.wasNotCleanReason = redact(reason)
        self.sendData(plain_response(code, reason))
        self.dropConnection(abort=False)

    # -- the session -------------------------------------------------------

    def onOpen(self) -> None:
        if self._gone:
            return  # Autobahn opens after a loss during onConnect's Deferred
        try:
            assert self.info is not None
            if self._spectating:
                door = self.factory.door
                watching = door.sessions.watch(
                    self.info, f"websocket/{door.name}", self.client_address, self
                )
                if watching is None:  # the writer left meanwhile
                    self.close(Ending(Kind.PORT_BUSY, "the writer left; connect again"))
                self.relay = watching  # type: ignore[assignment]
                return
            self.relay = self.factory.door.sessions.start(
                self.info,
                f"websocket/{self.factory.door.name}",
                self.client_address,
                self,
                self._admission,
            )
        except Exception:
            log.failure("could not start a session")
            self.close(Ending(Kind.INTERNAL))

    def dataReceived(self, data: bytes) -> None:
        """Relay whole unfragmented binary frames here; Autobahn parses the rest.

        Autobahn walks every frame through a dozen callbacks (frame begin,
        data, end, message begin, data, end) before ``onMessage``: most of
        what a keystroke costs in consoled.  What browsers send a console is
        one masked binary frame per message, so between frames, with nothing
        buffered in Autobahn, those are unmasked and relayed here.  Anything
        else (control and text frames, fragments, a frame split across reads,
        reserved bits, an unmasked or oversized frame) and everything after it
        in this read goes to Autobahn, which answers as the RFC says.

        Autobahn's own ``dataReceived`` is never called: its Twisted adapter
        builds a debug line there on every read, on or off (the caller's
        qualified name, looked up and coloured), about a tenth of what a
        keystroke costs consoled.
        """
        if self.relay is None or self.state != self.STATE_OPEN or self.data or self.inside_message:
            super()._dataReceived(data)
            return
        taken = 0
        try:
            taken = self._take_frames(data)
        except Exception:
            log.failure("relaying a frame from the user failed")
            self.close(Ending(Kind.INTERNAL))
            return
        if taken < len(data):
            super()._dataReceived(data[taken:] if taken else data)

    def _take_frames(self, data: bytes) -> int:
        """Relay the complete binary frames at the start of ``data``; how far it got."""
        end = len(data)
        at = 0
        while self.state == self.STATE_OPEN and self.relay is not None:
            if end - at < 6 or data[at] != 0x82:  # FIN, binary, no reserved bits
                break
            size = data[at + 1] ^ 0x80  # the mask bit must be set
            start = at + 6
            if size >= 126:
                if size == 126:
                    start = at + 8
                    size = int.from_bytes(data[at + 2 : at + 4], "big")
                elif size == 127:
                    start = at + 14
                    size = int.from_bytes(data[at + 2 : at + 10], "big")
                else:  # unmasked: a protocol error Autobahn reports
                    break
                if not _MIN_EXTENDED[start - at] <= size <= MAX_MESSAGE or start > end:
                    break  # over-long length encoding, or too big: Autobahn closes
            stop = start + size
            if stop > end:
                break
            payload = _unmask(data[start:stop], data[start - 4 : start])
            at = stop
            self.relay.from_client(payload)
        if at and self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            self._cancelAutoPingTimeoutCall()
        return at

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relay is not None:
            self.relay.from_client(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._gone = True
        if self.relay is None and self._admission is not None:
            self.factory.door.sessions.release(
                self._admission, "client left before the session started"
            )
            self._admission = None
        if self.relay is not None:
            self.relay.client_lost(f"close code {code}" if code else "connection lost")

    # -- ClientSide, for the relay ------------------------------------------

    def ready(self) -> None:
        # A slow browser may hold up to this much in consoled before the
        # hypervisor is paused.  Twisted's 64 KiB default paused and resumed
        # the hypervisor around every 64 KiB read plus its frame header.
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = USER_WRITE_BUFFER

    def send(self, data: bytes) -> None:
        """One unmasked binary frame per chunk, written without copying the payload.

        Autobahn's sendMessage costs more per message than the bytes cost to
        move; a server's data frame is just a header in front of the payload
        (no masking, no extensions negotiated here).
        """
        if self.state != self.STATE_OPEN:
            return
        size = len(data)
        if size < 126:
            header = _SMALL_HEADERS[size]
        elif size < 65536:
            header = _HEADER_16.pack(0x82, 126, size)
        else:
            header = _HEADER_64.pack(0x82, 127, size)
        write_now(self.transport, data, header)

    def close(self, ending: Ending) -> None:
        code = CLOSE_CODES.get(ending.kind, 1011)
        reason = str(ending).encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
        # sendClose() only takes 1000 and 3000-4999; 1001 and 1011 are ours to send too.
        self.sendCloseFrame(code=code, reasonUtf8=reason, isReply=False)


class ConsoleServerFactory(WebSocketServerFactory):
    protocol = ConsoleServerProtocol

    def __init__(self, door: Door, *, ping_interval: float, handshake_timeout: float) -> None:
        super().__init__()
        self.door = door
        self.setProtocolOptions(
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=5,
            autoPingInterval=ping_interval or None,
            autoPingTimeout=max(ping_interval, 10) if ping_interval else None,
            # Autobahn buffers a message whole before onMessage: bound it.  What
            # browsers send a console is small (keys, pointer, SPICE messages);
            # past this the connection closes with 1009 (message too big).
            maxMessagePayloadSize=MAX_MESSAGE,
            maxFramePayloadSize=MAX_MESSAGE,
            # A protocol error is answered with a close frame that says what
            # was wrong (1002, 1007, 1009), not just a dropped connection.
            failByDrop=False,
        )
        self.server = "consoled"


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR a client frame's payload with its mask.

    Autobahn's native masker costs about 5 µs to set up; big integers take
    about 0.5 µs for a keystroke and fall behind it past about 1 KiB.
    """
    size = len(payload)
    if size > 1024:
        return create_xor_masker(mask, size).process(payload)
    key = (mask * ((size >> 2) + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little"
    )


def _client_address(request: ConnectionRequest, peer: str, trusted: tuple[Network, ...]) -> str:
    """The user's address: X-Forwarded-For's last hop only from a trusted proxy."""
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded and is_trusted(peer, trusted):
        return forwarded.split(",")[-1].strip() or peer
    return peer
