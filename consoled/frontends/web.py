"""The HTTP side of a websocket door: a twisted.web Site that serves static
files and hands websocket upgrades, on any path, to Autobahn.

- GET and HEAD only (405 otherwise); no directory listings (404).
- A request target starting with ``//`` is answered 400: browsers read
  ``//host/…`` as another site, the open redirect of CVE-2021-3654.
- The access log never shows a query string: noVNC's URL carries the token.
"""

from __future__ import annotations

import os
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.logger import Logger
from twisted.web import http, resource, server, static

from consoled.frontends.websocket import ConsoleServerFactory

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


def _is_upgrade(request: server.Request) -> bool:
    upgrade = request.getHeader(b"upgrade") or b""
    return b"websocket" in upgrade.lower()


class DoorRoot(resource.Resource):
    """Every path: a websocket upgrade goes to Autobahn, anything else to the files."""

    def __init__(self, websocket: WebSocketResource, files: resource.Resource) -> None:
        super().__init__()
        self._websocket = websocket
        self._files = files

    def getChildWithDefault(self, name: bytes, request: server.Request) -> Any:
        if _is_upgrade(request):
            return self._websocket
        return self._files.getChildWithDefault(name, request)

    def render(self, request: server.Request) -> Any:
        if _is_upgrade(request):
            return self._websocket.render(request)
        return self._files.render(request)


class DoorSite(server.Site):
    """Refuses what must never reach a resource, before any traversal."""

    def getResourceFor(self, request: server.Request) -> Any:
        if request.uri.startswith(b"//"):
            return _Refuse(400, "request path must not start with //")
        if request.method not in (b"GET", b"HEAD"):
            return _Refuse(405, "only GET and HEAD")
        return super().getResourceFor(request)


def _access_line(timestamp: str, request: http.Request) -> str:
    """Combined log format without the query string (it may hold a token)."""
    path, _, query = request.uri.partition(b"?")
    target = path.decode("latin-1") + ("?…" if query else "")
    referrer = (request.getHeader(b"referer") or b"-").partition(b"?")[0].decode("latin-1")
    agent = (request.getHeader(b"user-agent") or b"-").decode("latin-1")
    return (
        f'"{request.getClientAddress().host}" - - {timestamp} '
        f'"{request.method.decode("latin-1")} {target} {request.clientproto.decode("latin-1")}" '
        f'{request.code} {request.sentLength or "-"} "{referrer}" "{agent}"'
    )


def door_site(
    factory: ConsoleServerFactory,
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
    root = DoorRoot(WebSocketResource(factory), files)
    site = DoorSite(root, logFormatter=_access_line, timeout=timeout)
    site.displayTracebacks = False
    return site
