"""The websocket door: noVNC, spice-html5 and the serial page, through Autobahn.

Wire summary (docs/websocket.md has the whole table):

- Upgrades are answered on any path; the token is the ``token`` query
  parameter, else the ``token`` cookie.
- The token goes to the gate (consoled/gate.py) with the Origin, Host and
  forwarding headers; a refusal is its row of ``consoled.endings.ANSWERS``
  (docs/refusals.md): the HTTP status with an empty body before the 101
  answer, or, when the query carries ``explain`` (consoled's serial page),
  the upgrade and then the row's close code and reason.
- The ``binary`` subprotocol is chosen when offered; none is fine too.
- After the upgrade a session ends with its kind's close code (1000 console
  closed, 1012 proxy restarting (SIGTERM), 1011 internal error, 44xx and 45xx as
  the table says).

Autobahn swallows exceptions raised in its callbacks, so every callback here
catches, logs and answers itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.doors.answers import empty_response
from consoled.doors.frames import MAX_MESSAGE, FastFrames
from consoled.endings import ANSWERS, Ending, Kind, Refusal
from consoled.gate import Endpoint, Facts, Gate, Pass
from consoled.policy import token_from
from consoled.redaction import redact
from consoled.sessions.relay import TransportClientSide

log = Logger()


#: How much may wait in consoled for a slow browser before the hypervisor pauses.
USER_WRITE_BUFFER = 256 * 1024


@dataclass(frozen=True)
class Door:
    """What one websocket listener knows: its name (the console types it serves) and the gate."""

    name: str
    gate: Gate


class ConsoleServerProtocol(TransportClientSide, FastFrames, WebSocketServerProtocol):
    """One user's websocket; a thin adapter between Autobahn and the gate."""

    factory: ConsoleServerFactory
    relay: Endpoint | None = None
    client_address = "?"
    #: the gate's answer being awaited (cancelled if the user leaves meanwhile)
    _admitting: defer.Deferred[Pass] | None = None
    #: admitted, not yet started (the upgrade is being answered)
    _pass: Pass | None = None
    #: refused, to be told after the upgrade (the page asked with ``explain``)
    _refusal: Refusal | None = None
    #: the user left; nothing more is answered or started
    _gone = False

    def connectionMade(self) -> None:
        self.client_address = getattr(self.transport.getPeer(), "host", "?")
        # Autobahn copies its ~36 options from the factory and pretty-prints
        # the list for a debug line on every connection, debug on or off:
        # about 15% of a session's set-up.  Copied here, its list is empty.
        factory = self.factory
        for name in WebSocketServerProtocol.CONFIG_ATTRS:
            setattr(self, name, getattr(factory, name))
        self.CONFIG_ATTRS = ()
        super().connectionMade()

    # -- the opening handshake ---------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> defer.Deferred[str | None]:
        headers = request.headers
        gate = self.factory.door.gate
        facts = Facts(
            peer=self.client_address,
            origin=headers.get("origin"),
            host=headers.get("host"),
            forwarded_for=headers.get("x-forwarded-for"),
            forwarded_proto=headers.get("x-forwarded-proto"),
        )
        self.client_address = gate.client_address(facts)
        token = token_from(request.params, headers.get("cookie"))
        explain = "explain" in request.params
        subprotocol = "binary" if "binary" in request.protocols else None
        self._admitting = gate.admit(self.factory.door.name, token, facts)
        return self._admitting.addCallbacks(
            self._admitted, self._refused, (subprotocol,), None, (subprotocol, explain)
        )

    def _admitted(self, admitted: Pass, subprotocol: str | None) -> str | None:
        self._admitting = None
        self._pass = admitted
        return subprotocol

    def _refused(self, failure: Failure, subprotocol: str | None, explain: bool) -> str | None:
        """Refuse the upgrade (the gate logged why), or accept it to say why when asked.

        Browsers never show a refused upgrade's status to the page, so a page
        that asks (``explain`` in the query, as consoled's serial page does)
        gets the upgrade and then a close code and reason from ``ANSWERS``;
        every other client, Tempest and noVNC among them, gets the status
        with an empty body.
        """
        self._admitting = None
        if not failure.check(Refusal):  # cancelled: the user left meanwhile
            raise ConnectionDeny(400, "client left during admission")
        self._refusal = failure.value
        if explain:
            return subprotocol
        ending = failure.value.ending
        raise ConnectionDeny(ANSWERS[ending.kind].http, str(ending))

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Answer a refused upgrade with a status line and an empty body, then close.

        The body is empty because OpenStack's gate (Tempest's
        ``test_novnc_bad_token``) reads any byte after the head as a frame.
        """
        if self._gone:
            return
        if self._refusal is None:
            # Autobahn's own validation: its reason may quote the request line.
            reason = redact(reason)
            log.info(
                "refused {door} websocket handshake from {client}: {reason}",
                door=self.factory.door.name,
                client=self.client_address,
                reason=reason,
            )
        # Answered in full and logged once: Autobahn drops the connection
        # quietly (an unclean drop is a warning line per refused token).
        self.wasClean = True
        self.sendData(empty_response(code))
        self.dropConnection(abort=False)

    # -- the session -------------------------------------------------------

    def onOpen(self) -> None:
        if self._gone:
            return
        if self._refusal is not None:
            self.close(self._refusal.ending)
            return
        try:
            assert self._pass is not None
            self.relay = self._pass.start(self)
        except Exception:
            log.failure("could not start a session")
            self.close(Ending(Kind.INTERNAL))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relay is not None:
            self.relay.from_client(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._gone = True
        if self._admitting is not None:
            self._admitting.cancel()  # the gate gives back what it took meanwhile
        if self.relay is not None:
            self.relay.client_lost(f"close code {code}" if code else "connection lost")
        elif self._pass is not None:
            self._pass.release("client left before the session started")

    # -- ClientSide, for the relay ------------------------------------------

    def ready(self) -> None:
        # A slow browser may hold up to this much in consoled before the
        # hypervisor is paused.  Twisted's 64 KiB default paused and resumed
        # the hypervisor around every 64 KiB read plus its frame header.
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = USER_WRITE_BUFFER

    def close(self, ending: Ending) -> None:
        code = ANSWERS[ending.kind].close
        reason = str(ending).encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
        # sendClose() only takes 1000 and 3000-4999; 1011 and 1012 are ours to send too.
        self.sendCloseFrame(code=code, reasonUtf8=reason, isReply=False)


class ConsoleServerFactory(WebSocketServerFactory):
    protocol = ConsoleServerProtocol

    def __init__(self, door: Door, *, ping_interval: float) -> None:
        super().__init__()
        self.door = door
        self.setProtocolOptions(
            # No timer of Autobahn's for the opening handshake: the door's head
            # reader times the request head, the gate times the admission.
            openHandshakeTimeout=0,
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
