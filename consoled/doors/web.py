"""The HTTP side of a websocket door: upgrades, on any path, to Autobahn;
everything else to a twisted.web Site that serves static files.

- GET and HEAD only (405 otherwise); no directory listings (404).
- A request head must be complete within ``[consoled] handshake_timeout``
  (408) and stay under 16 KiB (431); a connection for files is closed after
  ``[consoled] http_connection_max`` seconds however busy it keeps.
- A request target starting with ``//`` is answered 400: browsers read
  ``//host/…`` as another site, the open redirect of CVE-2021-3654.
- No log line shows a request's query string or fragment (noVNC's URL
  carries the token there), nor anything else of it shaped like a token:
  the access log, and twisted.web's own lines that quote a request.

:class:`DoorFactory` reads each connection's request head first and gives a
websocket upgrade (a GET with ``Upgrade: websocket``, on any path but one
starting with ``//``) straight to Autobahn; everything else goes to the Site
(so an odd upgrade, a HEAD say, is a file request).  Autobahn parses the head
all the same: sending upgrades through twisted.web first (its parser, a
Request, resource traversal, then Autobahn's ``WebSocketResource`` writing
the request out again) cost about a quarter of a session's set-up
(benchmarks/run.py --only setup).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server, static

from consoled.doors.answers import plain_response
from consoled.doors.websocket import ConsoleServerFactory
from consoled.redaction import redact

log = Logger()


class _Refuse(resource.Resource):
    isLeaf = True

    def __init__(self, code: int, text: str) -> None:
        super().__init__()
        self._code = code
        self._text = text.encode("utf-8") + b"\n"

    def render(self, request: server.Request) -> bytes:
        request.setResponseCode(self._code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self._code == 405:
            request.setHeader(b"allow", b"GET, HEAD")
        return self._text


class StaticFiles(static.File):
    """Files of a web directory, never a listing of one."""

    def directoryListing(self) -> resource.Resource:
        return _Refuse(404, "no such file")

    def createSimilarFile(self, path: str) -> StaticFiles:
        similar = super().createSimilarFile(path)
        similar.__class__ = StaticFiles
        return similar


def _shown(target: bytes) -> str:
    """A request target or URL as logged: query and fragment cut, no token left."""
    text = target.decode("latin-1")
    cut = min((at for at in (text.find("?"), text.find("#")) if at >= 0), default=-1)
    if cut >= 0:
        text = text[: cut + 1] + "…"
    return redact(text)


class DoorRequest(server.Request):
    """A twisted.web Request that shows no token when it is logged.

    twisted.web puts the request itself into some of its own log events (the
    warning that a HEAD answer's body was eaten, as its field and as the
    event's source): its repr must not carry the query.
    """

    def __repr__(self) -> str:
        method = redact(getattr(self, "method", b"?").decode("latin-1"))
        target = _shown(getattr(self, "uri", b""))
        return f"<{type(self).__name__} at 0x{id(self):x} method={method} uri={target}>"


class DoorSite(server.Site):
    """Refuses what must never reach a resource, before any traversal."""

    requestFactory = DoorRequest

    def getResourceFor(self, request: server.Request) -> Any:
        if request.uri.startswith(b"//"):
            return _Refuse(400, "request path must not start with //")
        if request.method not in (b"GET", b"HEAD"):
            return _Refuse(405, "only GET and HEAD")
        return super().getResourceFor(request)


def _access_line(timestamp: str, request: http.Request) -> str:
    """Combined log format without query, fragment or anything shaped like a token."""
    method = redact(request.method.decode("latin-1"))
    version = redact(request.clientproto.decode("latin-1"))
    referrer = request.getHeader(b"referer")
    agent = request.getHeader(b"user-agent")
    return (
        f'"{request.getClientAddress().host}" - - {timestamp} '
        f'"{method} {_shown(request.uri)} {version}" {request.code} {request.sentLength or "-"} '
        f'"{_shown(referrer) if referrer else "-"}" '
        f'"{redact(agent.decode("latin-1")) if agent else "-"}"'
    )


def door_site(
    web_dir: str | None,
    *,
    extra: dict[bytes, str] | None = None,
    timeout: float = 60,
) -> DoorSite:
    """The Site for one websocket door; ``extra`` mounts more directories."""
    if web_dir and os.path.isdir(web_dir):
        files: resource.Resource = StaticFiles(web_dir)
    else:
        log.warn("web directory {path} not found: no pages served here", path=web_dir)
        files = resource.Resource()
    for name, directory in (extra or {}).items():
        if os.path.isdir(directory):
            files.putChild(name, StaticFiles(directory))
        else:
            log.warn("directory {path} for /{name}/ not found", path=directory, name=name.decode())
    site = DoorSite(files, logFormatter=_access_line, timeout=timeout)
    site.displayTracebacks = False
    return site


#: The most of a request head read before it is refused with 431.
MAX_HEAD = 16 * 1024


def _upgrade_head(head: bytes) -> bool:
    """Whether a request head (up to its blank line) asks for a websocket Autobahn may take."""
    request_line, _, headers = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[1].startswith(b"//"):
        return False  # the Site answers these (400, 405) as for any request
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade":
            return b"websocket" in value.lower()
    return False


class DoorProtocol(Protocol):
    """Reads the request head, then passes the connection on and forwards to it."""

    factory: DoorFactory
    _chosen: Any = None
    _deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._head = b""
        timeout = self.factory.timeout
        if timeout:
            self._deadline = self.factory.clock.callLater(timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._chosen is not None:
            self._chosen.dataReceived(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        # However the head arrives, in pieces or in one read with more after it.
        if (len(self._head) if end < 0 else end + 4) > MAX_HEAD:
            self._answer(431, "request head over 16 KiB")
            return
        if end < 0:
            return
        upgrade = _upgrade_head(self._head[:end])
        factory = self.factory.websocket if upgrade else self.factory.site
        chosen = factory.buildProtocol(self.transport.getPeer())
        if chosen is None:
            self.transport.loseConnection()
            return
        self._cancel_deadline()
        if not upgrade and self.factory.connection_max:
            # Keep-alive requests, each within the Site's idle timeout, could
            # hold a file connection for ever (a byte every few seconds).
            self._deadline = self.factory.clock.callLater(
                self.factory.connection_max, self._held_too_long
            )
        self._chosen = chosen
        # From here on the transport's reads come straight to the chosen one.
        self.dataReceived = chosen.dataReceived  # type: ignore[method-assign]
        head, self._head = self._head, b""
        chosen.makeConnection(self.transport)
        chosen.dataReceived(head)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._chosen is not None:
            self._chosen.connectionLost(reason)

    def _timed_out(self) -> None:
        self._deadline = None
        timeout = self.factory.timeout
        self._answer(408, f"no complete request within {timeout:g}s")

    def _held_too_long(self) -> None:
        self._deadline = None
        log.info(
            "closed an HTTP connection from {client}: open {seconds:g}s"
            " ([consoled] http_connection_max)",
            client=getattr(self.transport.getPeer(), "host", "?"),
            seconds=self.factory.connection_max,
        )
        self.transport.abortConnection()

    def _answer(self, code: int, why: str) -> None:
        """Refuse before any request was parsed: a status line, a short body, one log line."""
        self._cancel_deadline()
        log.info(
            "refused a connection from {client}: {why}",
            client=getattr(self.transport.getPeer(), "host", "?"),
            why=why,
        )
        self.transport.write(plain_response(code, why))
        self.transport.loseConnection()
        self.dataReceived = lambda data: None  # type: ignore[method-assign]

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class DoorFactory(Factory):
    """One websocket door's listener: Autobahn for upgrades, the Site for the rest."""

    protocol = DoorProtocol
    noisy = False

    def __init__(
        self,
        site: DoorSite,
        websocket: ConsoleServerFactory,
        clock: IReactorTime,
        timeout: float,
        connection_max: float = 0,
    ) -> None:
        self.site = site
        self.websocket = websocket
        self.clock = clock
        self.timeout = timeout
        #: the longest a connection that is not a websocket may stay open (0: no cap)
        self.connection_max = connection_max

    def doStart(self) -> None:
        super().doStart()
        self.site.doStart()
        self.websocket.doStart()

    def doStop(self) -> None:
        self.site.doStop()
        self.websocket.doStop()
        super().doStop()
