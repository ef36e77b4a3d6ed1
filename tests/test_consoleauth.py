"""The legacy consoleauth fallback: nova's memcached entries, read safely, through the gate.

Entries are written the way nova stable/stein wrote them: a real dogpile.cache
region configured as oslo.cache's ``configure_cache_region`` configures it
(its SHA-1 key mangler, the ``dogpile.cache.memcached`` or
``dogpile.cache.pymemcache`` backend over python-memcached or pymemcache),
and ``region.set(token.encode("UTF-8"), json.dumps(token_dict))`` as
``ConsoleAuthManager.authorize_console`` did through ``CacheClient.set``.
So the tests check consoled's reader against those libraries' own bytes, not
against a copy of the reader.  The integration tests run a real memcached
(Debian ``memcached``) on a free port.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
import time
from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.config import CacheSettings, Settings, WorkaroundsSettings
from consoled.consoleauth import (
    LEGACY_TOKEN_ID,
    LegacyEntryError,
    LegacyTokens,
    connect_info,
    decode_entry,
    legacy_from_settings,
    legacy_key,
)
from consoled.tokens import hash_token, new_token
from tests import hypervisors
from tests.harness import INSTANCE, Consoled, test_settings
from tests.peers import free_port, require_executable
from tests.wsclient import http_request, upgrade_request, ws_connect

NOW = 1_800_000_000.0
TTL = 600


def nova_fields(token: str, console_type: str = "novnc", port: int = 5900) -> dict[str, Any]:
    """The dict nova's authorize_console JSON-encoded (stable/stein)."""
    return {
        "token": token,
        "instance_uuid": INSTANCE,
        "console_type": console_type,
        "host": "127.0.0.1",
        "port": port,
        "internal_access_path": None,
        "access_url": f"http://proxy.example:6080/vnc_auto.html?token={token}",
        "last_activity_at": NOW,
    }


def python_memcached_bytes(payload: str, created: float = NOW) -> tuple[int, bytes]:
    """(flags, value) as python-memcached stores a dogpile CachedValue (no server needed)."""
    import memcache
    from dogpile.cache.api import CachedValue
    from dogpile.cache.region import value_version

    value = CachedValue(payload, {"ct": created, "v": value_version})
    flags, _, data = memcache.Client([])._val_to_store_info(value, 0)
    return flags, data


def pymemcache_bytes(payload: str, created: float = NOW) -> tuple[int, bytes]:
    """(flags, value) as dogpile's pymemcache backend stores it (pickle_serde)."""
    from dogpile.cache.api import CachedValue
    from dogpile.cache.region import value_version
    from pymemcache.serde import pickle_serde

    data, flags = pickle_serde.serialize(b"k", CachedValue(payload, {"ct": created, "v": 1}))
    assert value_version in (1, 2)
    return flags, data


#: What python 2's pickle (protocol 0, python-memcached's default) wrote for
#: dogpile.cache 0.7's CachedValue, a tuple subclass whose __reduce__ is
#: ``(CachedValue, (payload, metadata))``: the dogpile of nova stein on py2.
PY2_DOGPILE_07 = (
    b"cdogpile.cache.api\nCachedValue\np0\n(S'%s'\np1\n(dp2\nS'ct'\np3\nF1800000000.25\n"
    b"sS'v'\np4\nI1\nstp5\nRp6\n."
)


class Evil:
    """A pickle that would create ``path`` if it were ever loaded by plain pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.path}",))


class DecodeTests(SynchronousTestCase):
    """decode_entry and connect_info over the bytes nova's libraries produce."""

    def info(self, token: str, flags: int, data: bytes, now: float = NOW + 1) -> Any:
        fields, created = decode_entry(flags, data)
        return connect_info(
            token, fields, created, token_ttl=TTL, now=now, base_for=lambda kind: "http://x/"
        )

    def test_python_memcached_and_pymemcache(self) -> None:
        """Both clients' pickles of dogpile's CachedValue decode to the token's console."""
        token = new_token()
        payload = json.dumps(nova_fields(token))
        for flags, data in (python_memcached_bytes(payload), pymemcache_bytes(payload)):
            info = self.info(token, flags, data)
            self.assertEqual(
                (info.host, info.port, info.console_type), ("127.0.0.1", 5900, "novnc")
            )
            self.assertEqual(info.id, LEGACY_TOKEN_ID)
            self.assertEqual(info.token_hash, hash_token(token))
            self.assertEqual(info.expires, int(NOW) + TTL)
            # nova's access_url carries the token; only its scheme, host and path are kept
            self.assertEqual(info.access_url_base, "http://proxy.example:6080/vnc_auto.html")
            self.assertNotIn(token, repr(info))

    def test_python2_dogpile_07(self) -> None:
        """A python 2 era entry (str payload, dogpile 0.7's reduce, v 1) decodes too."""
        token = new_token()
        payload = json.dumps(nova_fields(token)).replace("'", "\\'").encode()
        info = self.info(token, 1, PY2_DOGPILE_07 % payload)
        self.assertEqual(info.port, 5900)
        self.assertEqual(info.expires, int(NOW + 0.25) + TTL)

    def test_expired(self) -> None:
        """Older than [consoleauth] token_ttl by dogpile's creation time: no token."""
        token = new_token()
        flags, data = python_memcached_bytes(json.dumps(nova_fields(token)))
        self.assertIsNone(self.info(token, flags, data, now=NOW + TTL + 1))

    def test_malicious_pickles_never_run(self) -> None:
        """A pickle naming any other global is refused before anything is called."""
        marker = os.path.abspath(self.mktemp())
        evil = pickle.dumps(Evil(marker), protocol=0)
        nested = pickle.dumps(
            (pickle.loads(pickle.dumps(0)), Evil(marker)), protocol=pickle.HIGHEST_PROTOCOL
        )
        for data in (evil, nested, pickle.dumps(Evil(marker), protocol=5)):
            with self.assertRaises(LegacyEntryError) as raised:
                decode_entry(1, data)
            self.assertIn("refused pickle", str(raised.exception))
        self.assertFalse(os.path.exists(marker))

    def test_not_nova_entries(self) -> None:
        """Other flags, shapes, JSON, fields or another token's entry: each a LegacyEntryError."""
        token = new_token()
        good = nova_fields(token)
        cases = [
            (16, b"text"),  # python-memcached's text flag
            (1, b"x" * 70_000),
            python_memcached_bytes("not json"),
            python_memcached_bytes(json.dumps([1, 2])),
            (1, pickle.dumps(("payload", {"ct": NOW, "v": 1}), protocol=0)),
            python_memcached_bytes(json.dumps({**good, "token": new_token()})),
            python_memcached_bytes(json.dumps({**good, "console_type": "rdp"})),
            python_memcached_bytes(json.dumps({**good, "port": "x"})),
            python_memcached_bytes(json.dumps({**good, "host": None})),
        ]
        for flags, data in cases:
            self.assertRaises(LegacyEntryError, self.info, token, flags, data)

    def test_key(self) -> None:
        """The key is oslo.cache's mangling of the token: SHA-1 hex of its UTF-8 bytes."""
        from dogpile.cache.util import sha1_mangle_key

        token = new_token()
        self.assertEqual(legacy_key(token), sha1_mangle_key(token.encode("UTF-8")).encode())


class FakeEndpoint:
    """Connects a factory's protocol to a StringTransport, or fails while ``refusing``."""

    def __init__(self) -> None:
        self.refusing = False
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.refusing:
            return defer.fail(error.ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return defer.succeed(protocol)


class LookupTests(SynchronousTestCase):
    """LegacyTokens over a StringTransport: the memcache exchange, timeouts, one line each way."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.endpoint = FakeEndpoint()
        self.legacy = LegacyTokens(
            [("mc:11211", self.endpoint)],
            self.clock,
            token_ttl=TTL,
            timeout=1.0,
            base_for=lambda kind: "http://x/",
        )
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)
        self.legacy.startService()
        self.addCleanup(self.legacy.stopService)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.warn]

    def answer(self, data: bytes) -> None:
        self.endpoint.protocols[-1].dataReceived(data)

    def test_hit_and_miss(self) -> None:
        """``get <sha1>`` is asked; a VALUE with flags 1 is the console, END alone is None."""
        token = new_token()
        flags, data = python_memcached_bytes(json.dumps(nova_fields(token)))
        found = self.legacy.find_legacy(token)
        transport = self.endpoint.protocols[-1].transport
        self.assertEqual(transport.value(), b"get " + legacy_key(token) + b"\r\n")
        self.assertNotIn(token.encode(), transport.value())
        self.answer(
            b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (legacy_key(token), flags, len(data), data)
        )
        self.assertEqual(self.successResultOf(found).port, 5900)
        missing = self.legacy.find_legacy(new_token())
        self.answer(b"END\r\n")
        self.assertIsNone(self.successResultOf(missing))
        self.assertEqual(self.warnings(), [])

    def test_bad_entries_logged_once(self) -> None:
        """An entry that is not nova's is no token; one warning per kind of fault, no token."""
        for _ in range(3):
            token = new_token()
            data = pickle.dumps(Evil("/nonexistent/x"), protocol=0)
            found = self.legacy.find_legacy(token)
            self.answer(b"VALUE %s 1 %d\r\n%s\r\nEND\r\n" % (legacy_key(token), len(data), data))
            self.assertIsNone(self.successResultOf(found))
        self.assertEqual(len(self.warnings()), 1, self.warnings())
        self.assertIn("refused pickle", self.warnings()[0])

    def test_timeout_down_and_back(self) -> None:
        """No answer within the timeout: None and one line; refused reconnects add none; back: one."""
        first = self.legacy.find_legacy(new_token())
        self.clock.advance(1.0)
        self.assertIsNone(self.successResultOf(first))
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("unreachable", self.warnings()[0])
        # the hung connection was aborted; memcached now refuses connections
        self.endpoint.refusing = True
        protocol = self.endpoint.protocols[-1]
        protocol.connectionLost(Failure(error.ConnectionLost()))
        for _ in range(5):
            self.assertIsNone(self.successResultOf(self.legacy.find_legacy(new_token())))
            self.clock.advance(31)
        self.assertEqual(len(self.warnings()), 1)
        self.endpoint.refusing = False
        self.clock.advance(31)
        back = self.legacy.find_legacy(new_token())
        self.answer(b"END\r\n")
        self.assertIsNone(self.successResultOf(back))
        lines = [formatEvent(e) for e in self.events]
        # two lines in all: down, back (no line per refused reconnect)
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[1].endswith("memcached mc:11211 answers again"), lines)

    def test_flag_off_builds_nothing(self) -> None:
        """enable_consoleauth off: no service at all; on with [cache] unusable: None, one warning."""
        self.assertIsNone(legacy_from_settings(Settings(), reactor))
        on = dataclasses.replace(Settings(), workarounds=WorkaroundsSettings(True))
        self.assertIsNone(legacy_from_settings(on, reactor))  # [cache] enabled = false
        redis = dataclasses.replace(
            on, cache=CacheSettings(enabled=True, backend="dogpile.cache.redis")
        )
        self.assertIsNone(legacy_from_settings(redis, reactor))
        self.assertEqual(len(self.warnings()), 2)


# --- a real memcached ---------------------------------------------------------


class _Memcached(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


@defer.inlineCallbacks
def start_memcached(testcase: TestCase) -> Any:
    """A memcached on 127.0.0.1 and a free port; returns (port, stop)."""
    path = require_executable(
        testcase, "memcached", "apt-get install -y --no-install-recommends memcached"
    )
    port = free_port()
    process = _Memcached()
    argv = [path, "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    if os.getuid() == 0:
        argv += ["-u", "root"]
    transport = reactor.spawnProcess(process, path, argv, env=os.environ)

    def stop() -> defer.Deferred[None]:
        if not process.ended.called:
            try:
                transport.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass
        return process.ended

    testcase.addCleanup(stop)
    for _ in range(250):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port, stop
        except OSError:
            yield deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("memcached did not start")


def memcached_stats(port: int) -> dict[str, int]:
    """memcached's ``stats`` (one connection of its own)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += s.recv(65536)
    stats = {}
    for line in data.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STAT" and parts[2].isdigit():
            stats[parts[1]] = int(parts[2])
    return stats


def nova_region(port: int, backend: str) -> Any:
    """A dogpile region set up as oslo.cache's configure_cache_region does for nova."""
    from dogpile.cache import make_region
    from dogpile.cache.util import sha1_mangle_key

    region = make_region()
    prefix = "cache.oslo"
    region.configure_from_config(
        {
            f"{prefix}.backend": backend,
            f"{prefix}.expiration_time": TTL,
            f"{prefix}.arguments.url": [f"127.0.0.1:{port}"],
        },
        f"{prefix}.",
    )
    if region.key_mangler is None:  # oslo.cache: SHA-1 when the backend has none

        def oslo_sha1(key: Any) -> str:
            try:
                key = key.encode("utf-8", errors="xmlcharrefreplace")
            except (UnicodeError, AttributeError):
                pass
            return sha1_mangle_key(key)

        region.key_mangler = oslo_sha1
    return region


def nova_authorize(region: Any, token: str, console_type: str, port: int) -> None:
    """What nova's ConsoleAuthManager.authorize_console stored (stein), through CacheClient."""
    fields = nova_fields(token, console_type, port)
    fields["last_activity_at"] = time.time()
    region.set(token.encode("UTF-8"), json.dumps(fields))
    region.set(INSTANCE.encode("UTF-8"), json.dumps([token]))  # the instance index


def legacy_settings(port: int, enabled: bool = True) -> Settings:
    base = test_settings()
    return dataclasses.replace(
        base,
        workarounds=WorkaroundsSettings(enable_consoleauth=enabled),
        cache=CacheSettings(
            enabled=True,
            backend="dogpile.cache.memcached",
            memcache_servers=(("127.0.0.1", port),),
            memcache_socket_timeout=0.5,
        ),
    )


class MemcachedTests(TestCase):
    """Through consoled's noVNC door, with nova's entries in a real memcached."""

    timeout = 30

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, text: str) -> list[str]:
        return [formatEvent(e) or "" for e in self.events if text in (formatEvent(e) or "")]

    def assert_never_logged(self, token: str) -> None:
        for event in self.events:
            self.assertNotIn(token, (formatEvent(event) or "") + repr(event))

    @defer.inlineCallbacks
    def echo_through(self, consoled: Consoled, token: str) -> Any:
        client = yield ws_connect(consoled.port("novnc"), token)
        client.send(b"hello console")
        echoed = yield client.read(len(b"hello console"))
        self.assertEqual(echoed, b"hello console")
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_legacy_token_reaches_its_console(self) -> Any:
        """Tokens nova wrote through either memcached client reach their console, logged legacy."""
        port, _ = yield start_memcached(self)
        echo = hypervisors.serve(self, hypervisors.Echo)
        consoled = Consoled(self, legacy_settings(port))
        for backend in ("dogpile.cache.memcached", "dogpile.cache.pymemcache"):
            token = new_token()
            nova_authorize(nova_region(port, backend), token, "novnc", echo.port)
            yield self.echo_through(consoled, token)
            self.assertEqual(
                len(self.lines(f"legacy consoleauth token {hash_token(token)[:8]}")), 1
            )
            self.assert_never_logged(token)
        yield consoled.wait_sessions_ended()
        self.assertEqual(len(consoled.session_rows()), 2)

    @defer.inlineCallbacks
    def test_wrong_console_type(self) -> Any:
        """A legacy spice-html5 token at the noVNC door is refused as another type (403)."""
        port, _ = yield start_memcached(self)
        consoled = Consoled(self, legacy_settings(port))
        token = new_token()
        nova_authorize(nova_region(port, "dogpile.cache.memcached"), token, "spice-html5", 5900)
        status, _, _ = yield http_request(
            consoled.port("novnc"), upgrade_request(f"/?token={token}")
        )
        self.assertEqual(status, 403)
        refused = self.lines("refused")
        self.assertEqual(len(refused), 1)
        self.assertIn("another console type", refused[0])

    @defer.inlineCallbacks
    def test_flag_off_never_contacts_memcached(self) -> Any:
        """enable_consoleauth off: an unknown token is 401 and memcached saw no connection."""
        port, _ = yield start_memcached(self)
        before = memcached_stats(port)["total_connections"]
        consoled = Consoled(self, legacy_settings(port, enabled=False))
        token = new_token()
        nova_authorize(nova_region(port, "dogpile.cache.memcached"), token, "novnc", 5900)
        after_write = memcached_stats(port)["total_connections"]
        status, _, _ = yield http_request(
            consoled.port("novnc"), upgrade_request(f"/?token={token}")
        )
        self.assertEqual(status, 401)
        yield deferLater(reactor, 0.2, lambda: None)
        # only this test's own stats connection since the write, none of consoled's
        self.assertEqual(memcached_stats(port)["total_connections"], after_write + 1)
        self.assertGreater(after_write, before)
        self.assertRaises(KeyError, consoled.top.getServiceNamed, "legacy-consoleauth")

    @defer.inlineCallbacks
    def test_memcached_stopped(self) -> Any:
        """memcached gone: database tokens still work, legacy ones are 401 fast, one line."""
        port, stop = yield start_memcached(self)
        echo = hypervisors.serve(self, hypervisors.Echo)
        consoled = Consoled(self, legacy_settings(port))
        legacy = new_token()
        nova_authorize(nova_region(port, "dogpile.cache.memcached"), legacy, "novnc", echo.port)
        yield self.echo_through(consoled, legacy)
        yield stop()
        issued = yield consoled.authorize("novnc", "127.0.0.1", echo.port)
        for _ in range(3):
            started = time.monotonic()
            status, _, _ = yield http_request(
                consoled.port("novnc"), upgrade_request(f"/?token={legacy}")
            )
            self.assertEqual(status, 401)
            self.assertLess(time.monotonic() - started, 2.0)
            yield self.echo_through(consoled, issued.token)
        unreachable = self.lines("unreachable")
        self.assertEqual(len(unreachable), 1, unreachable)
        self.assertIn(f"127.0.0.1:{port}", unreachable[0])
        self.assert_never_logged(legacy)

    @defer.inlineCallbacks
    def test_malicious_pickle_not_executed(self) -> Any:
        """A pickle calling os.system under a token's key: 401, nothing run, one warning."""
        port, _ = yield start_memcached(self)
        consoled = Consoled(self, legacy_settings(port))
        marker = os.path.abspath(self.mktemp())
        token = new_token()
        data = pickle.dumps(Evil(marker), protocol=0)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"set %s 1 0 %d\r\n%s\r\n" % (legacy_key(token), len(data), data))
            self.assertEqual(s.recv(100), b"STORED\r\n")
        status, _, _ = yield http_request(
            consoled.port("novnc"), upgrade_request(f"/?token={token}")
        )
        self.assertEqual(status, 401)
        self.assertFalse(os.path.exists(marker))
        warned = self.lines("refused pickle")
        self.assertEqual(len(warned), 1, warned)
        self.assertIn(hash_token(token)[:8], warned[0])
        self.assert_never_logged(token)
