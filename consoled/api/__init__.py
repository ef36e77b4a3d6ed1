"""The management listener: health, metrics and nova's console API shapes.

On its own listener (``[consoled] api_host``:``api_port``, 127.0.0.1:6089),
never on a public door, and off unless ``[consoled] api_key_hashes`` is set:

- ``GET /healthz``: 200 when the store answers and every door listens, else
  503; a JSON body says which (for a load balancer's check; no key);
- ``GET /metrics``: Prometheus text (``consoled.metrics``; no key);
- ``/v2.1/…``: nova's shapes, with ``X-Auth-Token`` checked against
  ``api_key_hashes`` (SHA-256 hex digests; ``consoled-manage api-key
  create``): 401 without it.  The routes are :data:`ROUTES`: nova's version
  discovery, remote-consoles (consoled/api/consoles.py), the token look-up,
  os-getConsoleOutput (consoled/api/console_log.py), and consoled's own
  os-consoled-sessions, os-consoled-connections, os-consoled-tokens and a
  token's touch;
- ``GET /openapi.json``: the OpenAPI 3.1 document (consoled/api/openapi.py; no key).

docs/api.md and docs/metrics.md have the calls and the metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

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


#: Every call under /v2.1 the API answers: (method, path template).  The
#: OpenAPI document (consoled/api/openapi.py) describes each; a test checks it.
ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/v2.1"),
    ("POST", "/v2.1/servers/{server_id}/remote-consoles"),
    ("POST", "/v2.1/servers/{server_id}/action"),
    ("DELETE", "/v2.1/servers/{server_id}/os-consoled-tokens"),
    ("GET", "/v2.1/os-console-auth-tokens/{console_token}"),
    ("POST", "/v2.1/os-console-auth-tokens/{console_token}/action"),
    ("GET", "/v2.1/os-consoled-sessions"),
    ("POST", "/v2.1/os-consoled-sessions/{session_id}/action"),
    ("GET", "/v2.1/os-consoled-connections"),
)

#: The largest id the session routes look up (the column is a 32-bit integer).
MAX_SESSION_ID = 2**31 - 1


def _match(template: str, parts: list[str]) -> list[str] | None:
    """The template's parameters in ``parts``, or None when it does not match."""
    pattern = [p for p in template.split("/") if p]
    if len(pattern) != len(parts):
        return None
    found = []
    for want, got in zip(pattern, parts, strict=True):
        if want.startswith("{"):
            found.append(got)
        elif want != got:
            return None
    return found


def _printable(value: str, limit: int) -> bool:
    return 0 < len(value) <= limit and value.isprintable()


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class OpenAPIPage(resource.Resource):
    """The OpenAPI 3.1 document of this listener (consoled/api/openapi.py); no key."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        from consoled.api.openapi import document

        return _json(request, 200, document())


class Authenticated(resource.Resource):
    """Everything under /v2.1: the key first, then the route."""

    def __init__(
        self,
        key_hashes: Iterable[str],
        find_token: Callable[[str], defer.Deferred[Any]],
        issuer: Any = None,
        *,
        store: Any = None,
        settings: Settings | None = None,
        clock: Any = None,
    ) -> None:
        super().__init__()
        self._hashes = tuple(h.lower() for h in key_hashes)
        self._find_token = find_token
        self._issuer = issuer
        self._store = store
        self._settings = settings or Settings()
        self._clock = clock
        self._handlers: dict[tuple[str, str], Callable[..., Any]] = {
            ("POST", ROUTES[1][1]): self._remote_console,
            ("POST", ROUTES[2][1]): self._server_action,
            ("DELETE", ROUTES[3][1]): self._revoke_instance,
            ("GET", ROUTES[4][1]): self._token,
            ("POST", ROUTES[5][1]): self._token_action,
            ("GET", ROUTES[6][1]): self._sessions,
            ("POST", ROUTES[7][1]): self._session_action,
            ("GET", ROUTES[8][1]): self._connections,
        }

    def _authorised(self, request: server.Request) -> bool:
        key = request.getHeader(b"x-auth-token")
        if not key:
            return False
        digest = hashlib.sha256(key).hexdigest()
        return any(hmac.compare_digest(digest, known) for known in self._hashes)

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return self

    def render(self, request: server.Request) -> Any:
        raw = request.path.decode("latin-1").split("/")
        parts = [unquote(p, errors="replace") for p in raw if p]
        method = request.method.decode("latin-1")
        if parts == ["v2.1"] and method == "GET":
            # Version discovery needs no key, as nova's version documents.
            return _json(request, 200, {"version": _version()})
        if not self._authorised(request):
            request.setHeader(b"www-authenticate", b'Keystone uri="consoled"')
            return _fault(request, 401, "The request you have made requires authentication.")
        allowed = []
        for verb, template in ROUTES:
            found = _match(template, parts)
            if found is None:
                continue
            if verb == method:
                return self._handlers[(verb, template)](request, *found)
            allowed.append(verb)
        if allowed:
            request.setHeader(b"allow", ", ".join(sorted(set(allowed))).encode())
            return _fault(request, 405, "method not allowed")
        return _fault(request, 404, "no such resource")

    def _body(self, request: server.Request) -> tuple[Any, bytes | None]:
        """The JSON body, or (None, a fault already written)."""
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(raw) > MAX_BODY:
            return None, _fault(request, 413, f"request body over {MAX_BODY} bytes")
        try:
            return json.loads(raw), None
        except ValueError:
            return None, _fault(request, 400, "Malformed request body: not JSON")

    def _action(
        self, request: server.Request, known: tuple[str, ...]
    ) -> tuple[str | None, Any, bytes | None]:
        """An action body ``{"name": {…}}``: (name, its arguments) or a fault."""
        body, fault = self._body(request)
        if fault is not None:
            return None, None, fault
        if not isinstance(body, dict) or len(body) != 1:
            return (
                None,
                None,
                _fault(
                    request,
                    400,
                    f"Malformed request body: expected one action, one of {', '.join(known)}",
                ),
            )
        ((name, arguments),) = body.items()
        if name not in known:
            return None, None, _fault(request, 400, f"There is no such action: {name[:40]!r}")
        if arguments is not None and not isinstance(arguments, dict):
            return (
                None,
                None,
                _fault(
                    request,
                    400,
                    f"Invalid input for field/attribute {name}: expected an object or null",
                ),
            )
        return name, arguments or {}, None

    def _no_store(self, request: server.Request) -> bytes:
        return _fault(request, 503, "no store behind this API")

    # POST /servers/{id}/action: os-getConsoleOutput
    def _server_action(self, request: server.Request, instance_uuid: str) -> Any:
        from consoled.api.console_log import NoConsoleLog, console_output

        name, arguments, fault = self._action(request, ("os-getConsoleOutput",))
        if fault is not None:
            return fault
        if self._store is None:
            return self._no_store(request)
        length = arguments.get("length")
        if isinstance(length, str) and re.fullmatch(r"-?[0-9]{1,18}", length):
            length = int(length)  # nova's schema takes an integer or its digits
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int) or length < -1
        ):
            return _fault(
                request,
                400,
                "Invalid input for field/attribute length: expected a whole number of lines"
                " from 0 (or -1 or null for all)",
            )
        if length == -1:
            length = None  # nova's "all"
        if not _printable(instance_uuid, 255):
            return _fault(request, 404, "Instance could not be found.")
        directory = self._settings.consoled.record_dir or self._settings.default.record

        def refused(failure: Failure) -> bytes:
            failure.trap(NoConsoleLog)
            return _fault(request, 404, str(failure.value))

        reading = console_output(self._store, directory, instance_uuid, length)
        shaped = reading.addCallback(lambda text: _json(request, 200, {"output": text}))
        return _deferred(request, shaped.addErrback(refused))

    # DELETE /servers/{id}/os-consoled-tokens
    def _revoke_instance(self, request: server.Request, instance_uuid: str) -> Any:
        if self._store is None:
            return self._no_store(request)
        if not _printable(instance_uuid, 36):
            request.setResponseCode(204)
            return b""

        def done(count: int) -> bytes:
            log.info("API: revoked {count} tokens of an instance", count=count)
            request.setResponseCode(204)
            return b""

        return _deferred(request, self._store.revoke_instance(instance_uuid).addCallback(done))

    # POST /os-console-auth-tokens/{token}/action: touch
    def _token_action(self, request: server.Request, token: str) -> Any:
        name, arguments, fault = self._action(request, ("touch",))
        if fault is not None:
            return fault
        if self._store is None:
            return self._no_store(request)
        token_hash = hash_token(token)
        gone = "The token is invalid or has expired."

        @defer.inlineCallbacks
        def touch() -> Any:
            info = yield self._store.find_token(token_hash)
            if info is None:
                return _fault(request, 404, gone)
            now = int(self._clock.seconds()) if self._clock is not None else int(time.time())
            expires = max(info.expires, now + int(self._settings.token_ttl(info.console_type)))
            count = yield self._store.extend_token(token_hash, expires)
            if not count:
                return _fault(request, 404, gone)
            console = _connection(info)
            console["expires"] = _iso(expires)
            return _json(request, 200, {"console": console})

        return _deferred(request, touch())

    # GET /os-consoled-sessions
    def _sessions(self, request: server.Request) -> Any:
        if self._store is None:
            return self._no_store(request)
        filters, fault = _filters(request, required=False)
        if fault is not None:
            return fault

        def shape(rows: list[dict[str, Any]]) -> bytes:
            return _json(request, 200, {"sessions": [_session(row) for row in rows]})

        listing = self._store.list_sessions(live=True, **filters)
        return _deferred(request, listing.addCallback(shape))

    # POST /os-consoled-sessions/{id}/action: kick, takeover
    def _session_action(self, request: server.Request, session_id: str) -> Any:
        name, arguments, fault = self._action(request, ("kick", "takeover"))
        if fault is not None:
            return fault
        if self._store is None:
            return self._no_store(request)
        reason = arguments.get("reason", "")
        if reason is None:
            reason = ""
        if not isinstance(reason, str):
            return _fault(request, 400, "Invalid input for field/attribute reason: expected text")
        # It reaches logs and the console's recording: printable, and the column's length.
        reason = "".join(c if c.isprintable() else "?" for c in reason[:255])
        missing = f"Session {session_id[:20]} could not be found."
        if not session_id.isascii() or not session_id.isdigit():
            return _fault(request, 404, missing)
        number = int(session_id)
        if number > MAX_SESSION_ID:
            return _fault(request, 404, missing)

        def done(count: int) -> bytes:
            if not count:
                return _fault(request, 404, missing)
            log.info("API: {action} asked of session {id}", action=name, id=number)
            request.setResponseCode(202)
            return b""

        kicking = self._store.request_kick(
            session_id=number, reason=reason, takeover=name == "takeover"
        )
        return _deferred(request, kicking.addCallback(done))

    # GET /os-consoled-connections
    def _connections(self, request: server.Request) -> Any:
        if self._store is None:
            return self._no_store(request)
        filters, fault = _filters(request, required=True)
        if fault is not None:
            return fault
        now = self._clock.seconds() if self._clock is not None else time.time()

        def shape(rows: list[ConnectInfo]) -> bytes:
            connections = []
            for info in rows:
                if info.expires <= now:
                    continue
                connection = _connection(info)
                connection["expires"] = _iso(info.expires)
                connections.append(connection)
            return _json(request, 200, {"connections": connections})

        return _deferred(request, self._store.list_tokens(**filters).addCallback(shape))

    def _remote_console(self, request: server.Request, instance_uuid: str) -> Any:
        """nova's POST /servers/{id}/remote-consoles: a new token and its URL."""
        from consoled.api.consoles import PROTOCOLS, ConsoleTypeUnavailable
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
        if not isinstance(protocol, str) or protocol not in PROTOCOLS:
            return _fault(
                request,
                400,
                f"Invalid input for field/attribute protocol: {str(protocol)[:40]!r} is not one of"
                f" {', '.join(sorted(PROTOCOLS))}",
            )
        if not isinstance(console_type, str) or console_type not in PROTOCOLS[protocol]:
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
            if failure.check(ConsoleTypeUnavailable):
                return _fault(request, 400, str(failure.value))
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


def _filters(request: server.Request, *, required: bool) -> tuple[dict[str, str], bytes | None]:
    """``instance_uuid`` and ``host`` from the query (one at least when required)."""
    filters: dict[str, str] = {}
    for name, limit in (("instance_uuid", 36), ("host", 255)):
        values = request.args.get(name.encode()) or []
        if not values:
            continue
        value = values[-1].decode("utf-8", errors="replace")
        if not value:
            continue  # ?host= is no filter
        if len(value) > limit or "\x00" in value:
            return {}, _fault(
                request,
                400,
                f"Invalid input for field/attribute {name}: expected at most {limit} characters"
                " and no NUL",
            )
        filters[name] = value
    if required and not filters:
        return {}, _fault(
            request,
            400,
            "Invalid input for field/attribute instance_uuid: give instance_uuid or host",
        )
    return filters, None


def _connection(info: ConnectInfo) -> dict[str, Any]:
    """A token row without its token: where it leads and its hash's first 8 hex."""
    return {
        "instance_uuid": info.instance_uuid,
        "console_type": info.console_type,
        "host": info.host,
        "port": info.port,
        "tls_port": info.tls_port,
        "internal_access_path": info.internal_access_path,
        "token_hash_prefix": info.hash_prefix,
    }


def _session(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "instance_uuid": row["instance_uuid"],
        "console_type": row["console_type"],
        "host": row["host"],
        "port": row["port"],
        "token_hash_prefix": row["token_hash_prefix"],
        "door": row["door"],
        "client_address": row["client_address"],
        "mode": row["mode"],
        "proxy": row["proxy"],
        "started_at": _iso(row["started_at"]),
        "touched_at": _iso(row["touched_at"]),
        "bytes_to_client": row["bytes_to_client"],
        "bytes_to_server": row["bytes_to_server"],
        "kick_requested": bool(row["kick_requested"]),
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
        self.putChild(b"openapi.json", OpenAPIPage())

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        if path == b"" and not request.postpath:
            return self  # GET / (Twisted's lookup of "" found nothing: 404)
        return super().getChild(path, request)

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
    store: Any = None,
    settings: Settings | None = None,
) -> server.Site:
    root = Root(
        Health(ping, doors, clock),
        MetricsPage(metrics),
        Authenticated(key_hashes, find_token, issuer, store=store, settings=settings, clock=clock),
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
        store=store,
        settings=settings,
    )
    endpoint = serverFromString(reactor, endpoint_string(host, port))
    return DoorService("api", "management (health, metrics, API)", endpoint, site, API)
