"""The management listener: health, metrics and nova's console API shapes.

On its own listener (``[consoled] api_host``:``api_port``, 127.0.0.1:6089),
never on a public door, and off unless ``[consoled] api_key_hashes`` is set:

- ``GET /healthz``: 200 when the store answers and every door listens, else
  503; a JSON body says which (for a load balancer's check; no key);
- ``GET /metrics``: Prometheus text (``consoled.metrics``; no key);
- ``/v2.1/…``: nova's shapes, with ``X-Auth-Token`` checked against
  ``api_key_hashes`` (SHA-256 hex digests; ``consoled-manage api-key
  create``): 401 without it.  ``GET /v2.1`` (version discovery) and
  ``GET /v2.1/os-console-auth-tokens/{token}`` (the look-up other proxies
  use) and ``POST /v2.1/servers/{id}/remote-consoles`` (a driver finds the
  console, the store mints the token: consoled/api/consoles.py) so far.

docs/api.md and docs/metrics.md have the calls and the metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from consoled.config import Settings
from consoled.listeners import API, DoorService, endpoint_string
from consoled.metrics import Metrics
from consoled.redaction import redact
from consoled.tokens import ConnectInfo, hash_token

log = Logger()

#: The microversions answered (nova's range as clients discover it).
MIN_VERSION, MAX_VERSION = "2.1", "2.99"

#: The largest request body read (a remote-console request is tens of bytes).
MAX_BODY = 64 * 1024

#: How long /healthz waits for the store.
HEALTH_TIMEOUT = 2.0


def _json(request: server.Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    data = json.dumps(body).encode()
    request.setHeader(b"content-length", str(len(data)).encode())
    return data


def _fault(request: server.Request, code: int, message: str) -> bytes:
    """nova's error body: {"badRequest": {"code": 400, "message": …}} and its kin."""
    name = {
        400: "badRequest",
        401: "unauthorized",
        404: "itemNotFound",
        405: "badMethod",
        409: "conflictingRequest",
        413: "overLimit",
        503: "serviceUnavailable",
    }
    return _json(
        request, code, {name.get(code, "computeFault"): {"code": code, "message": message}}
    )


def _deferred(request: server.Request, work: defer.Deferred[bytes]) -> Any:
    def write(body: bytes) -> None:
        if not request.finished and not getattr(request, "_gone", False):
            request.write(body)
            request.finish()

    def failed(failure: Failure) -> None:
        log.failure("management API call failed", failure)
        write(_fault(request, 500, "internal error"))

    request.notifyFinish().addErrback(lambda _: setattr(request, "_gone", True))
    work.addCallbacks(write, failed)
    return server.NOT_DONE_YET


class Health(resource.Resource):
    isLeaf = True

    def __init__(
        self,
        ping: Callable[[], defer.Deferred[Any]],
        doors: Callable[[], dict[str, bool]],
        clock: Any,
    ) -> None:
        super().__init__()
        self._ping = ping
        self._doors = doors
        self._clock = clock

    def render_GET(self, request: server.Request) -> Any:
        doors = self._doors()
        checking = self._ping().addTimeout(HEALTH_TIMEOUT, self._clock)

        def answer(result: Any) -> bytes:
            store = "ok" if not isinstance(result, Failure) else "unreachable"
            healthy = store == "ok" and all(doors.values())
            body = {
                "status": "ok" if healthy else "failing",
                "store": store,
                "doors": {
                    name: "listening" if up else "not listening" for name, up in doors.items()
                },
            }
            return _json(request, 200 if healthy else 503, body)

        return _deferred(request, checking.addBoth(answer))


class MetricsPage(resource.Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self._metrics.exposition()


class Authenticated(resource.Resource):
    """Everything under /v2.1: the key first, then the child."""

    def __init__(
        self,
        key_hashes: Iterable[str],
        find_token: Callable[[str], defer.Deferred[Any]],
        issuer: Any = None,
    ) -> None:
        super().__init__()
        self._hashes = tuple(h.lower() for h in key_hashes)
        self._find_token = find_token
        self._issuer = issuer

    def _authorised(self, request: server.Request) -> bool:
        key = request.getHeader(b"x-auth-token")
        if not key:
            return False
        digest = hashlib.sha256(key).hexdigest()
        return any(hmac.compare_digest(digest, known) for known in self._hashes)

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return self

    def render(self, request: server.Request) -> Any:
        parts = [p for p in request.path.decode("latin-1").split("/") if p]
        if parts == ["v2.1"] and request.method == b"GET":
            # Version discovery needs no key, as nova's version documents.
            return _json(request, 200, {"version": _version()})
        if not self._authorised(request):
            request.setHeader(b"www-authenticate", b'Keystone uri="consoled"')
            return _fault(request, 401, "The request you have made requires authentication.")
        if (
            request.method == b"POST"
            and len(parts) == 4
            and parts[:2] == ["v2.1", "servers"]
            and parts[3] == "remote-consoles"
        ):
            return self._remote_console(request, parts[2])
        if request.method != b"GET":
            return _fault(request, 405, "method not allowed")
        if len(parts) == 3 and parts[:2] == ["v2.1", "os-console-auth-tokens"]:
            return self._token(request, parts[2])
        return _fault(request, 404, "no such resource")

    def _remote_console(self, request: server.Request, instance_uuid: str) -> Any:
        """nova's POST /servers/{id}/remote-consoles: a new token and its URL."""
        from consoled.api.consoles import PROTOCOLS
        from consoled.drivers import HypervisorUnreachable, NoSuchConsole, NoSuchInstance
        from consoled.store.serial_ports import NoSerialPortFree

        if self._issuer is None:
            return _fault(request, 503, "no console driver is configured")
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(raw) > MAX_BODY:
            return _fault(request, 413, f"request body over {MAX_BODY} bytes")
        try:
            asked = json.loads(raw)["remote_console"]
            protocol, console_type = asked["protocol"], asked["type"]
        except (ValueError, KeyError, TypeError):
            return _fault(
                request,
                400,
                "Invalid input for field/attribute remote_console: expected"
                ' {"remote_console": {"protocol": …, "type": …}}',
            )
        if protocol not in PROTOCOLS:
            return _fault(
                request,
                400,
                f"Invalid input for field/attribute protocol: {str(protocol)[:40]!r} is not one of"
                f" {', '.join(sorted(PROTOCOLS))}",
            )
        if console_type not in PROTOCOLS[protocol]:
            return _fault(
                request,
                400,
                f"Invalid input for field/attribute type: {str(console_type)[:40]!r} is not"
                f" valid with protocol {protocol}",
            )

        def shape(issued: Any) -> bytes:
            body = {"protocol": protocol, "type": console_type, "url": issued.access_url}
            return _json(request, 200, {"remote_console": body})

        def refused(failure: Failure) -> bytes:
            if failure.check(NoSuchInstance):
                return _fault(request, 404, f"Instance {instance_uuid[:64]} could not be found.")
            if failure.check(NoSuchConsole, NoSerialPortFree):
                return _fault(request, 409, str(failure.value))
            if failure.check(HypervisorUnreachable):
                log.info("console for an API call: {why}", why=str(failure.value))
                return _fault(request, 503, str(failure.value))
            return failure  # type: ignore[return-value]

        issuing = defer.maybeDeferred(self._issuer.issue, instance_uuid, protocol, console_type)
        return _deferred(request, issuing.addCallbacks(shape, refused))

    def _token(self, request: server.Request, token: str) -> Any:
        wants_tls_port = _microversion(request) >= (2, 99)

        def shape(info: ConnectInfo | None) -> bytes:
            if info is None:
                return _fault(request, 404, "The token is invalid or has expired.")
            console = {
                "instance_uuid": info.instance_uuid,
                "host": info.host,
                "port": info.port,
                "internal_access_path": info.internal_access_path,
            }
            if wants_tls_port:
                console["tls_port"] = info.tls_port
            return _json(request, 200, {"console": console})

        return _deferred(request, self._find_token(hash_token(token)).addCallback(shape))


def _version() -> dict[str, Any]:
    return {
        "id": "v2.1",
        "status": "CURRENT",
        "version": MAX_VERSION,
        "min_version": MIN_VERSION,
        "updated": "2026-12-03T00:00:00Z",
        "links": [{"rel": "self", "href": "/v2.1/"}],
    }


def _microversion(request: server.Request) -> tuple[int, int]:
    """The compute microversion asked for (OpenStack-API-Version or the legacy header)."""
    asked = (request.getHeader(b"openstack-api-version") or b"").decode("latin-1")
    value = asked.split()[-1] if asked.lower().startswith("compute ") else ""
    legacy = request.getHeader(b"x-openstack-nova-api-version") or b""
    value = value or legacy.decode("latin-1") or MIN_VERSION
    if value == "latest":
        value = MAX_VERSION
    try:
        major, minor = (int(part) for part in value.split("."))
    except ValueError:
        return (2, 1)
    return (major, minor)


class Root(resource.Resource):
    def __init__(self, health: Health, metrics: MetricsPage, api: Authenticated) -> None:
        super().__init__()
        self.putChild(b"healthz", health)
        self.putChild(b"metrics", metrics)
        self.putChild(b"v2.1", api)

    def render_GET(self, request: server.Request) -> bytes:
        return _json(request, 200, {"versions": [_version()]})


def _access_line(timestamp: str, request: Any) -> str:
    """An access line that shows no token: a look-up's path ends in one."""
    parts = request.path.decode("latin-1").split("/")
    if len(parts) > 3 and parts[2] == "os-console-auth-tokens":
        parts[3:] = ["…"]
    path = redact("/".join(parts))
    method = redact(request.method.decode("latin-1"))
    return f'"{request.getClientAddress().host}" - - {timestamp} "{method} {path}" {request.code}'


def management_site(
    *,
    metrics: Metrics,
    ping: Callable[[], defer.Deferred[Any]],
    doors: Callable[[], dict[str, bool]],
    find_token: Callable[[str], defer.Deferred[Any]],
    key_hashes: Iterable[str],
    clock: Any,
    issuer: Any = None,
) -> server.Site:
    root = Root(
        Health(ping, doors, clock),
        MetricsPage(metrics),
        Authenticated(key_hashes, find_token, issuer),
    )
    site = server.Site(root, logFormatter=_access_line)
    site.displayTracebacks = False
    site.noisy = False
    return site


def management_listener(
    settings: Settings,
    *,
    metrics: Metrics,
    store: Any,
    doors: Iterable[Any],
    reactor: Any,
    clock: Any = None,
    issuer: Any = None,
) -> DoorService:
    """The management listener's service (bound with the doors, refused in one line likewise)."""
    doors = list(doors)
    host, port = API.read(settings)
    site = management_site(
        metrics=metrics,
        ping=store.ping,
        doors=lambda: {door.name: bool(door.running and door.port) for door in doors},
        find_token=store.find_token,
        key_hashes=settings.consoled.api_key_hashes,
        clock=clock or reactor,
        issuer=issuer,
    )
    endpoint = serverFromString(reactor, endpoint_string(host, port))
    return DoorService("api", "management (health, metrics, API)", endpoint, site, API)
