"""The legacy consoleauth store: tokens nova's consoleauth service kept in memcached.

Read only, and only with ``[workarounds] enable_consoleauth = true``; the
whole format and its sources are in docs/consoleauth.md.  In short, nova
stable/stein wrote, through ``nova.cache_utils.CacheClient`` over an
oslo.cache (dogpile.cache) region on ``[cache] memcache_servers``::

    key    sha1(token.encode("utf-8")).hexdigest()     oslo.cache's key mangler
    flags  1                                            a pickle (python-memcached, pymemcache)
    value  pickle of dogpile's CachedValue(payload, {"ct": <time.time()>, "v": 1 or 2})
    payload  json.dumps({"token", "instance_uuid", "console_type", "host", "port",
                         "internal_access_path", "access_url", "last_activity_at"})

memcached itself never expires these entries (nova set no memcached expiry):
dogpile's region does, on read, once ``ct`` is ``[consoleauth] token_ttl``
seconds old, and so do we.  The pickle is read with an unpickler that knows
three names only (dogpile's CachedValue, and ``tuple`` with copyreg's
``_reconstructor`` for a protocol-0 pickle of a NamedTuple); any other
pickle, JSON or field is "no token" and logged once per kind of fault.
Every configured server is asked (python-memcached and pymemcache place a
key by different hashes, and rehash when a server is down); the first
valid entry wins.  A server that cannot be reached, or does not answer
within ``timeout``, counts as "no token" and is logged once, until it
answers again.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import math
import pickle
import zlib
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.memcache import MemCacheProtocol
from twisted.python.failure import Failure

from consoled.tokens import CONSOLE_TYPES, ConnectInfo, hash_token

log = Logger()

#: The ConnectInfo.id of a legacy token: database rows start at 1.
LEGACY_TOKEN_ID = 0

#: [cache] backend values whose memcached entries this module reads.
SUPPORTED_BACKENDS = (
    "dogpile.cache.memcached",  # python-memcached, pickle protocol 0
    "oslo_cache.memcache_pool",  # the same python-memcached client, pooled
    "dogpile.cache.pymemcache",  # pymemcache's pickle_serde (after stein; same flags)
)

#: memcached's flag bits as python-memcached and pymemcache set them.
FLAG_PICKLE = 1 << 0
FLAG_COMPRESSED = 1 << 3

#: A nova entry is a few hundred bytes; nothing larger is unpickled.
MAX_ENTRY_BYTES = 64 * 1024


class LegacyEntryError(ValueError):
    """An entry that is not a nova consoleauth token; the message never holds it."""


def legacy_key(token: str) -> bytes:
    """The memcached key of ``token``: oslo.cache's SHA-1 mangling of ``token.encode('UTF-8')``."""
    return hashlib.sha1(token.encode("utf-8")).hexdigest().encode("ascii")


# --- the value ---------------------------------------------------------------


class _CachedValue(tuple):  # type: ignore[type-arg]
    """Stands in for dogpile.cache.api.CachedValue: ``(payload, metadata)``, nothing else."""

    def __new__(cls, payload: Any, metadata: Any) -> _CachedValue:
        return tuple.__new__(cls, (payload, metadata))


def _reconstruct(cls: Any, base: Any, state: Any) -> _CachedValue:
    # copyreg._reconstructor, as a protocol-0/1 pickle of a NamedTuple calls it;
    # only ever for our stand-in over a tuple.
    if cls is not _CachedValue or base is not tuple or not isinstance(state, tuple):
        raise pickle.UnpicklingError("unexpected _reconstructor call")
    return tuple.__new__(_CachedValue, state)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("dogpile.cache.api", "CachedValue"): _CachedValue,
    ("copyreg", "_reconstructor"): _reconstruct,
    ("copy_reg", "_reconstructor"): _reconstruct,
    ("builtins", "tuple"): tuple,
    ("__builtin__", "tuple"): tuple,
}


class _CachedValueUnpickler(pickle.Unpickler):
    """Loads dogpile's CachedValue and plain data; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def decode_entry(flags: int, data: bytes) -> tuple[dict[str, Any], float]:
    """The token fields and dogpile's creation time of one memcached value.

    Raises LegacyEntryError for anything that is not a nova consoleauth entry.
    """
    if len(data) > MAX_ENTRY_BYTES:
        raise LegacyEntryError(f"entry of {len(data)} bytes")
    if flags & FLAG_COMPRESSED:
        inflate = zlib.decompressobj()
        try:
            data = inflate.decompress(data, MAX_ENTRY_BYTES)
        except zlib.error:
            raise LegacyEntryError("bad compressed entry") from None
        if inflate.unconsumed_tail:
            raise LegacyEntryError("compressed entry too large")
        flags &= ~FLAG_COMPRESSED
    if flags != FLAG_PICKLE:
        raise LegacyEntryError(f"memcached flags {flags}, not a pickled dogpile value")
    try:
        value = _CachedValueUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except Exception as error:  # any malformed pickle, or a refused global
        raise LegacyEntryError(f"refused pickle ({type(error).__name__}: {error})") from None
    if not isinstance(value, _CachedValue) or len(value) != 2:
        raise LegacyEntryError(f"pickle of {type(value).__name__}, not a CachedValue")
    payload, metadata = value
    if not isinstance(metadata, dict) or metadata.get("v") not in (1, 2):
        raise LegacyEntryError("CachedValue without dogpile's metadata")
    created = metadata.get("ct")
    if isinstance(created, bool) or not isinstance(created, int | float):
        raise LegacyEntryError("CachedValue without a creation time")
    if isinstance(payload, bytes):  # a python 2 str
        payload = payload.decode("utf-8", "replace")
    if not isinstance(payload, str):
        raise LegacyEntryError(f"payload of {type(payload).__name__}, not JSON text")
    try:
        fields = json.loads(payload)
    except ValueError:
        raise LegacyEntryError("payload is not JSON") from None
    if not isinstance(fields, dict):
        raise LegacyEntryError("payload is not a JSON object")
    return fields, float(created)


def connect_info(
    token: str,
    fields: dict[str, Any],
    created: float,
    *,
    token_ttl: int,
    now: float,
    base_for: Callable[[str], str],
) -> ConnectInfo | None:
    """Where a decoded entry leads, or None once dogpile would call it expired."""
    if not math.isfinite(created) or now - created > token_ttl:
        return None
    stored = fields.get("token")
    if not isinstance(stored, str) or not hmac.compare_digest(
        stored.encode("utf-8"), token.encode("utf-8")
    ):
        raise LegacyEntryError("entry names another token")
    console_type, host, port = fields.get("console_type"), fields.get("host"), fields.get("port")
    instance_uuid = fields.get("instance_uuid")
    if console_type not in CONSOLE_TYPES:
        raise LegacyEntryError("entry without a known console_type")
    if not isinstance(host, str) or not host:
        raise LegacyEntryError("entry without a host")
    if isinstance(port, str) and port.isdigit():
        port = int(port)  # nova passed what the driver gave; some gave text
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise LegacyEntryError("entry without a TCP port")
    if not isinstance(instance_uuid, str) or not instance_uuid:
        raise LegacyEntryError("entry without an instance_uuid")
    path = fields.get("internal_access_path")
    return ConnectInfo(
        id=LEGACY_TOKEN_ID,
        token_hash=hash_token(token),
        console_type=console_type,
        host=host,
        port=port,
        tls_port=None,
        internal_access_path=path if isinstance(path, str) and path else None,
        instance_uuid=instance_uuid,
        access_url_base=_url_base(fields.get("access_url")) or base_for(console_type),
        expires=math.floor(created + token_ttl),
    )


def _url_base(url: Any) -> str | None:
    # nova's access_url holds the token in its query: keep scheme, host and path.
    if not isinstance(url, str) or not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


# --- the memcached servers -----------------------------------------------------


class _Server:
    """One of ``[cache] memcache_servers``: one connection, kept up with backoff, quietly.

    Not ClientService: that logs a line per retry, and an unreachable
    memcached is to be one line until it answers again.
    """

    def __init__(
        self, name: str, endpoint: IStreamClientEndpoint, clock: IReactorTime, timeout: float
    ) -> None:
        self.name = name
        self.clock = clock
        self.timeout = timeout
        self.protocol: _Protocol | None = None
        #: unreachable since the last line saying so
        self.down = False
        self._endpoint = endpoint
        self._factory = Factory.forProtocol(lambda: _Protocol(self))
        self._factory.noisy = False
        self._retry = backoffPolicy(initialDelay=0.5, maxDelay=30.0)
        self._failures = 0
        self._running = False
        self._attempt: defer.Deferred[Any] | None = None
        self._next: IDelayedCall | None = None
        self._waiters: list[defer.Deferred[_Protocol]] = []

    # -- the connection -----------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._connect()

    def stop(self) -> defer.Deferred[None]:
        self._running = False
        if self._next is not None and self._next.active():
            self._next.cancel()
        if self._attempt is not None:
            self._attempt.cancel()
        self._wake(Failure(defer.CancelledError()))
        if self.protocol is None:
            return defer.succeed(None)
        lost = self.protocol.lost
        self.protocol.transport.loseConnection()
        return lost

    def _connect(self) -> None:
        self._next = None
        self._attempt = self._endpoint.connect(self._factory)
        self._attempt.addCallbacks(self._connected, self._not_connected)

    def _connected(self, protocol: _Protocol) -> None:
        self._attempt = None
        self._failures = 0
        self._wake(protocol)

    def _not_connected(self, failure: Failure) -> None:
        self._attempt = None
        if not self._running:
            return
        self.unreachable(failure.getErrorMessage())
        self._wake(failure)
        self._failures += 1
        self._next = self.clock.callLater(self._retry(self._failures), self._connect)

    def lost(self, protocol: _Protocol) -> None:
        if self.protocol is protocol:
            self.protocol = None
            if self._running:
                self._next = self.clock.callLater(self._retry(1), self._connect)

    def _wake(self, result: Any) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

    # -- one look-up --------------------------------------------------------------

    def get(self, key: bytes) -> defer.Deferred[tuple[int, bytes] | None]:
        """``(flags, value)``, or None for a miss, an error or no answer in time; never fails."""
        if self.protocol is not None:
            asked: defer.Deferred[Any] = self.protocol.get(key)
        elif self.down or not self._running:
            return defer.succeed(None)
        else:  # starting, or reconnecting after a lost connection
            asked = defer.Deferred()
            self._waiters.append(asked)
            asked.addCallback(lambda protocol: protocol.get(key))
        asked.addTimeout(self.timeout, self.clock)
        return asked.addCallbacks(self._answered, self._failed)

    def _answered(self, answer: tuple[int, bytes | None]) -> tuple[int, bytes] | None:
        if self.down:
            self.down = False
            log.info("legacy consoleauth store: memcached {server} answers again", server=self.name)
        flags, value = answer
        return None if value is None else (flags, value)

    def _failed(self, failure: Failure) -> None:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            why = f"no answer within {self.timeout:g}s"
            if self.protocol is not None:
                self.protocol.transport.abortConnection()  # reconnect rather than wait on it
        else:
            why = failure.getErrorMessage()
        if self._running:
            self.unreachable(why)
        return None

    def unreachable(self, why: str) -> None:
        if not self.down:
            self.down = True
            log.warn(
                "legacy consoleauth store: memcached {server} is unreachable ({why}); "
                "legacy tokens count as unknown until it answers again",
                server=self.name,
                why=why,
            )


class _Protocol(MemCacheProtocol):
    def __init__(self, server: _Server) -> None:
        super().__init__(timeOut=max(1, math.ceil(server.timeout)))
        self.callLater = server.clock.callLater  # TimeoutMixin's timer on our clock
        self._server = server
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        super().connectionMade()
        self._server.protocol = self

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._server.lost(self)
        self.lost.callback(None)


class LegacyTokens(Service):
    """``find_legacy(token)``: nova's consoleauth entry for a token, as a ConnectInfo."""

    name = "legacy-consoleauth"

    def __init__(
        self,
        servers: Sequence[tuple[str, IStreamClientEndpoint]],
        clock: IReactorTime,
        *,
        token_ttl: int,
        timeout: float,
        base_for: Callable[[str], str],
    ) -> None:
        self._clock = clock
        self._token_ttl = token_ttl
        self._base_for = base_for
        self._servers = [_Server(name, endpoint, clock, timeout) for name, endpoint in servers]
        self._faults_logged: set[str] = set()

    def startService(self) -> None:
        super().startService()
        for server in self._servers:
            server.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        stopped = defer.gatherResults([server.stop() for server in self._servers])
        return stopped.addCallback(lambda _: None)

    def find_legacy(self, token: str) -> defer.Deferred[ConnectInfo | None]:
        """Where ``token`` leads by the legacy store, or None; never fails."""
        if not self.running:
            return defer.succeed(None)
        key = legacy_key(token)
        asks = defer.gatherResults([server.get(key) for server in self._servers])
        return asks.addCallback(self._first_valid, token)

    def _first_valid(
        self, answers: list[tuple[int, bytes] | None], token: str
    ) -> ConnectInfo | None:
        for answer in answers:
            if answer is None:
                continue
            try:
                fields, created = decode_entry(*answer)
                info = connect_info(
                    token,
                    fields,
                    created,
                    token_ttl=self._token_ttl,
                    now=self._clock.seconds(),
                    base_for=self._base_for,
                )
            except LegacyEntryError as fault:
                self._log_fault(str(fault), hash_token(token))
                continue
            if info is not None:
                return info
        return None

    def _log_fault(self, fault: str, token_hash: str) -> None:
        kind = fault.split(" (", 1)[0]
        if kind in self._faults_logged:
            return
        self._faults_logged.add(kind)
        log.warn(
            "legacy consoleauth store: entry for token {hash_prefix} ignored: {fault} "
            "(logged once per kind of fault)",
            hash_prefix=token_hash[:8],
            fault=fault,
        )


def legacy_from_settings(settings: Any, reactor: Any, clock: Any = None) -> LegacyTokens | None:
    """The legacy store ``[workarounds] enable_consoleauth`` asks for, or None.

    None, and nothing connected, when the flag is off; None with one warning
    when nova's ``[cache]`` options name no memcached this module can read.
    """
    if not settings.workarounds.enable_consoleauth:
        return None
    cache = settings.cache
    why = None
    if not cache.enabled:
        why = "[cache] enabled is false: nova kept consoleauth tokens in its own memory"
    elif cache.backend not in SUPPORTED_BACKENDS:
        why = f"[cache] backend {cache.backend} is not one of {', '.join(SUPPORTED_BACKENDS)}"
    elif not cache.memcache_servers:
        why = "[cache] memcache_servers is empty"
    if why is not None:
        log.warn("[workarounds] enable_consoleauth: no legacy tokens are read: {why}", why=why)
        return None
    timeout = cache.memcache_socket_timeout
    servers = [
        (
            f"{host}:{port}",
            HostnameEndpoint(reactor, host, port, timeout=max(1, math.ceil(timeout))),
        )
        for host, port in cache.memcache_servers
    ]
    return LegacyTokens(
        servers,
        clock or reactor,
        token_ttl=settings.consoleauth.token_ttl,
        timeout=timeout,
        base_for=settings.access_url_base,
    )
