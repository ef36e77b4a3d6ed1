"""The XVP door: Java VNC viewers through an HTTP CONNECT.

The exchange (docs/xvp.md has the whole of it)::

    client:  CONNECT /console?token=T HTTP/1.0\\r\\n      (or HTTP/1.1)
             [header lines]\\r\\n
             \\r\\n
             [RFB bytes may follow at once]
    consoled validates the token, connects to the hypervisor, then
    server:  HTTP/1.1 200 OK\\r\\n\\r\\n
             raw RFB both ways from here on

Bytes the client sends after the blank line, before the answer, are kept
and forwarded first, in order.  Refusals are a status line, a short
plain-text body, then close.  The door's own: 400 malformed request line or
header, 405 a method other than CONNECT, 408 request not complete in time,
431 request head over 8 KiB.  Everything else is the gate's
(consoled/gate.py), with the HTTP status of its kind in
``consoled.endings.ANSWERS`` (docs/refusals.md): 401 no, unknown or expired
token, 403 a token of another console type, 502 or 504 hypervisor
unreachable or slow (or its internal_access_path CONNECT not 200), 503 token
store unreachable or slow, or consoled shutting down.

The protocol is a small state machine: ``reading`` the request head,
``admitting`` (token, policy, hypervisor), ``relaying``, ``closed``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from consoled.doors.answers import plain_response
from consoled.doors.stream import GatedStream
from consoled.endings import ANSWERS, Ending, Refusal
from consoled.gate import Gate, Pass
from consoled.sessions.relay import TransportClientSide, write_now

log = Logger()

#: Largest request head (request line and headers) accepted.
MAX_HEAD = 8 * 1024

#: Bytes the client may send ahead of the 200 answer before reading pauses.
MAX_EARLY = 64 * 1024

OK = b"HTTP/1.1 200 OK\r\n\r\n"


class XVPProtocol(TransportClientSide, GatedStream):
    """One Java viewer's connection."""

    factory: XVPFactory
    door = "xvp"
    state = "reading"

    def connectionMade(self) -> None:
        super().connectionMade()
        self._head = b""
        self._early: list[bytes] = []
        self._early_size = 0
        self.wait(self.factory.request_timeout, self._request_timed_out)

    # -- reading the request ------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.state == "relaying":
            assert self.relay is not None
            self.relay.from_client(data)
        elif self.state == "admitting":
            self._hold(data)
        elif self.state == "reading":
            self._read_head(data)

    def _read_head(self, data: bytes) -> None:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._answer(431, "request head over 8 KiB", "head too large")
            return
        if end + 4 > MAX_HEAD:
            self._answer(431, "request head over 8 KiB", "head too large")
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = b""
        self.stop_waiting()
        self.state = "admitting"
        if rest:
            self._hold(rest)
        try:
            token = self._parse(head)
        except _Answer as answer:
            self._answer(answer.code, answer.text, answer.text)
            return
        self.admit(token)

    def _parse(self, head: bytes) -> str:
        lines = head.split(b"\r\n")
        try:
            request_line = lines[0].decode("ascii")
        except UnicodeDecodeError:
            raise _Answer(400, "malformed request line") from None
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise _Answer(400, "malformed request line")
        method, target, version = parts
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            raise _Answer(400, "malformed request line")
        if method != "CONNECT":
            raise _Answer(405, "only CONNECT")
        for line in lines[1:]:
            name, colon, _ = line.partition(b":")
            if not colon or not name.strip() or name != name.strip():
                raise _Answer(400, "malformed header line")
        query = urlsplit(target).query if target.startswith("/") else ""
        return (parse_qs(query).get("token") or [""])[0]  # none: the gate says so

    def _hold(self, data: bytes) -> None:
        """Keep what the viewer sends before the answer; pause past a bound."""
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size > MAX_EARLY:
            self.transport.pauseProducing()

    # -- admission ---------------------------------------------------------

    def admitted(self, admitted: Pass) -> None:
        self.relay = admitted.start(self)
        early, self._early = self._early, []
        for chunk in early:
            self.relay.from_client(chunk)

    def refused(self, refusal: Refusal) -> None:
        ending = refusal.ending
        self._answer(ANSWERS[ending.kind].http, str(ending), None)

    def _answer(self, code: int, text: str, log_reason: str | None) -> None:
        """A status line and a short body, then close; logged unless already logged."""
        if self.state == "closed":
            return
        if log_reason is not None:
            log.info(
                "refused xvp connection from {client}: {reason}",
                client=self.client_address,
                reason=log_reason,
            )
        self.state = "closed"
        self.give_up()
        self.transport.write(plain_response(code, text))
        self.transport.loseConnection()

    def _request_timed_out(self) -> None:
        if self.state == "reading":
            self._answer(408, "request not complete in time", "request timeout")

    # -- ClientSide, for the relay -----------------------------------------

    def ready(self) -> None:
        self.transport.write(OK)
        self.state = "relaying"
        self.transport.resumeProducing()

    def send(self, data: bytes) -> None:
        write_now(self.transport, data)

    def close(self, ending: Ending) -> None:
        if self.state == "relaying":
            self.state = "closed"
            self.transport.loseConnection()
        else:
            self._answer(ANSWERS[ending.kind].http, str(ending), None)


class _Answer(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


class XVPFactory(Factory):
    protocol = XVPProtocol

    def __init__(self, gate: Gate, clock: Any, request_timeout: float) -> None:
        self.gate = gate
        self.clock = clock
        self.request_timeout = request_timeout
