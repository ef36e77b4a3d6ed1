"""Two real consoled behind a real HAProxy with the PROXY protocol (issue 15.2).

Proxies A and B are ``twistd consoled`` processes on one PostgreSQL database,
their noVNC and serial doors named in ``[consoled] proxy_protocol`` and
HAProxy's address (127.0.0.1) in ``trusted_proxies``.  HAProxy runs the
repository's own ``etc/haproxy-consoled.cfg`` (TCP mode, ``send-proxy-v2``,
health checks), its addresses given in the environment.

Everything here is on the loopback, so the user connects from 127.0.0.2
(its socket bound there) and HAProxy from 127.0.0.1: a row or a log line
that says 127.0.0.2 got it from the PROXY header.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from consoled.store import Store
from consoled.store.runner import InlineRunner
from tests import hypervisors
from tests.daemon import CHECKOUT, ENV, Twistd, start_consoled_on_free_ports
from tests.databases import fresh_database, upgraded_engine
from tests.peers import free_port, require_executable
from tests.test_two_proxies import _hang_up, _later, proxy_config, wait_until
from tests.wsclient import StreamClient, upgrade_request

log = Logger()

CONFIG = os.path.join(CHECKOUT, "etc", "haproxy-consoled.cfg")
INSTANCE = "5d0c6a4e-8f1b-4e0a-9c7d-2b3a4c5d6e7f"
#: The user's address, and HAProxy's (the proxies' TCP peer).
USER = "127.0.0.2"
HAPROXY = "127.0.0.1"
TOUCH_INTERVAL = 0.2
LEASE_SECONDS = 2.0


@dataclass
class Proxy:
    name: str
    novnc_port: int
    serial_port: int
    process: Twistd


class RawClient(Protocol):
    """Sends what it is given; ``lost`` fires with every byte it got, once closed."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(self.received)


class HAProxyTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.haproxy_path = require_executable(
            self, "haproxy", "apt-get install --no-install-recommends haproxy"
        )
        url = fresh_database(self, "postgresql")
        engine = upgraded_engine(self, url)
        self.store = Store(engine, InlineRunner(), reactor)
        self.a, self.b = yield defer.gatherResults(
            [self.start_proxy("A", url), self.start_proxy("B", url)], consumeErrors=True
        )
        self.proxies = {"A": self.a, "B": self.b}
        yield self.start_haproxy()

    @defer.inlineCallbacks
    def start_proxy(self, name: str, url: str) -> Any:
        extra = f"proxy_protocol = novnc, serial\ntrusted_proxies = {HAPROXY}\n"

        def config_text(ports: list[int]) -> str:
            return proxy_config(url, name, ports, extra, TOUCH_INTERVAL, LEASE_SECONDS)

        process, _, (novnc_port, serial_port) = yield start_consoled_on_free_ports(
            self, 2, config_text
        )
        return Proxy(name, novnc_port, serial_port, process)

    @defer.inlineCallbacks
    def start_haproxy(self) -> Any:
        """Run etc/haproxy-consoled.cfg in the foreground; fire once both frontends accept."""
        self.novnc_port, self.serial_port = free_port(), free_port()
        env = {
            **ENV,
            "CONSOLED_LISTEN": "127.0.0.1",
            "NOVNC_PORT": str(self.novnc_port),
            "SERIAL_PORT": str(self.serial_port),
            "PROXY_A": "127.0.0.1",
            "PROXY_B": "127.0.0.1",
            "A_NOVNC": str(self.a.novnc_port),
            "A_SERIAL": str(self.a.serial_port),
            "B_NOVNC": str(self.b.novnc_port),
            "B_SERIAL": str(self.b.serial_port),
        }
        self.haproxy = Twistd()
        argv = [self.haproxy_path, "-f", CONFIG, "-db"]
        reactor.spawnProcess(self.haproxy, self.haproxy_path, argv, env=env, path=CHECKOUT)
        self.addCleanup(self.haproxy.stop)

        def accepting() -> defer.Deferred[bool]:
            probes = [self.probe(port) for port in (self.novnc_port, self.serial_port)]
            return defer.gatherResults(probes).addCallback(all)

        yield wait_until(self, accepting, timeout=10, every=0.05)

    @defer.inlineCallbacks
    def probe(self, port: int) -> Any:
        if self.haproxy.reason is not None:
            self.fail(f"haproxy ended: {self.haproxy.text()}")
        try:
            client = yield connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1), RawClient()
            )
        except error.ConnectError:
            return False
        client.transport.abortConnection()
        return True

    @defer.inlineCallbacks
    def token(self, console_type: str, console_port: int) -> Any:
        issued = yield self.store.authorize(
            console_type=console_type,
            host="127.0.0.1",
            port=console_port,
            instance_uuid=INSTANCE,
            access_url_base="ws://127.0.0.1:6080/",
            ttl=600,
        )
        return issued.token

    def user(
        self, port: int, token: str, headers: dict[str, str] | None = None
    ) -> defer.Deferred[StreamClient]:
        """A websocket from the user's address (127.0.0.2) to ``port``; fires once open."""
        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{port}/?token={token}", protocols=["binary"], headers=headers
        )
        factory.protocol = StreamClient
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5, bindAddress=(USER, 0))
        opened = endpoint.connect(factory).addCallback(lambda client: client.opened)
        return opened.addCallback(lambda client: self.addCleanup(_hang_up, client) or client)

    @defer.inlineCallbacks
    def user_until_served(self, port: int, token: str, timeout: float) -> Any:
        """The user's websocket, tried again every 0.1 s while refused; fails after ``timeout``."""
        deadline = reactor.seconds() + timeout
        while True:
            try:
                return (yield self.user(port, token))
            except (ConnectionError, error.ConnectError):
                if reactor.seconds() > deadline:
                    raise
            yield _later(0.1)

    @defer.inlineCallbacks
    def echoes(self, client: StreamClient, data: bytes) -> Any:
        client.send(data)
        self.assertEqual((yield client.read(len(data))), data)

    def live_sessions(self) -> defer.Deferred[list[dict[str, Any]]]:
        return self.store.list_sessions(live=True)

    def one_live_session(self) -> defer.Deferred[dict[str, Any]]:
        """The one live session row, once written (the row follows the relay's start)."""
        rows = wait_until(
            self, lambda: self.live_sessions().addCallback(lambda r: len(r) == 1 and r)
        )
        return rows.addCallback(lambda rows: rows[0])

    @defer.inlineCallbacks
    def test_client_address_reaches_rows_and_logs(self) -> Any:
        """The user's address from the PROXY header is in the session row and the proxies' logs.

        Neither HAProxy's address nor an ``X-Forwarded-For`` the user wrote
        (the user is not a trusted proxy) takes its place; the gate's
        refusal line for a bad token names the user too.
        """
        echo = hypervisors.serve(self, hypervisors.Echo)
        token = yield self.token("novnc", echo.port)
        user = yield self.user(self.novnc_port, token, {"X-Forwarded-For": "198.51.100.1"})
        yield self.echoes(user, b"x")
        row = yield self.one_live_session()
        self.assertEqual(row["client_address"], USER)
        holder = self.proxies[row["proxy"]].process
        yield holder.when_logged(f"novnc from {USER} to novnc".encode())
        self.assertNotIn(b"198.51.100.1", self.a.process.output + self.b.process.output)

        bad = self.user(self.novnc_port, "not-a-token")
        yield self.assertFailure(bad, ConnectionError)
        refused = f"refused novnc connection from {USER}: invalid or expired token".encode()

        def said() -> defer.Deferred[bool]:
            output = self.a.process.output + self.b.process.output
            return defer.succeed(refused in output)

        yield wait_until(self, said)

    @defer.inlineCallbacks
    def test_connection_without_header_is_refused(self) -> Any:
        """A browser reaching a proxy_protocol door directly is closed unanswered, and logged.

        From HAProxy's address (trusted) the missing header is named; from
        any other address the connection is refused before a byte is read.
        """
        token = yield self.token("novnc", hypervisors.closed_port())
        request = upgrade_request(f"/?token={token}")
        for source, why in (
            (HAPROXY, "no PROXY protocol header"),
            (USER, "not from [consoled] trusted_proxies"),
        ):
            endpoint = TCP4ClientEndpoint(
                reactor, "127.0.0.1", self.a.novnc_port, timeout=5, bindAddress=(source, 0)
            )
            try:
                client = yield connectProtocol(endpoint, RawClient())
            except error.ConnectError:
                pass  # closed (reset) before the client saw its connect complete
            else:
                client.transport.write(request)
                self.assertEqual((yield client.lost.addTimeout(10, reactor)), b"")
            yield self.a.process.when_logged(
                f"refused novnc connection from {source}: {why}".encode()
            )
        self.assertEqual((yield self.store.list_sessions(live=False)), [])

    @defer.inlineCallbacks
    def test_novnc_user_reconnects_to_the_other_proxy_after_kill_9(self) -> Any:
        """kill -9 of the proxy serving a noVNC user: the same token through HAProxy reaches the other.

        HAProxy sends the reconnection to the surviving proxy (a refused
        connection is redispatched; health checks then take the dead one
        out), which serves it from the same address within seconds.
        """
        echo = hypervisors.serve(self, hypervisors.Echo)
        token = yield self.token("novnc", echo.port)
        user = yield self.user(self.novnc_port, token)
        yield self.echoes(user, b"x")
        row = yield self.one_live_session()
        holder = self.proxies[row["proxy"]]
        survivor = self.b if holder is self.a else self.a

        killed_at = reactor.seconds()
        started = time.monotonic()
        yield holder.process.kill()
        code, _ = yield user.closed.addTimeout(5, reactor)
        self.assertEqual(code, 1006)
        again = yield self.user_until_served(self.novnc_port, token, timeout=10)
        yield self.echoes(again, b"y")
        served_in = time.monotonic() - started
        log.info("figure: noVNC user served by the other proxy {s:.3f}s after kill -9", s=served_in)
        self.assertLess(reactor.seconds() - killed_at, 5)

        def served_by_survivor() -> defer.Deferred[bool]:
            rows = self.live_sessions()
            return rows.addCallback(
                lambda rows: (
                    (survivor.name, USER) in [(r["proxy"], r["client_address"]) for r in rows]
                )
            )

        yield wait_until(self, served_by_survivor)

    @defer.inlineCallbacks
    def test_serial_port_moves_within_one_lease_after_kill_9(self) -> Any:
        """kill -9 of the proxy holding a serial port: within one lease period the other serves it.

        Until the dead proxy's lease lapses the survivor refuses the user
        (409, the port is held); the first success comes at most
        ``lease_seconds`` after the kill (plus one 0.1 s poll and the
        handshake).
        """
        echo = hypervisors.serve(self, hypervisors.Echo)
        token = yield self.token("serial", echo.port)
        user = yield self.user(self.serial_port, token)
        yield self.echoes(user, b"x")
        row = yield self.one_live_session()
        holder = self.proxies[row["proxy"]]
        survivor = self.b if holder is self.a else self.a

        started = time.monotonic()
        yield holder.process.kill()
        again = yield self.user_until_served(self.serial_port, token, timeout=LEASE_SECONDS + 5)
        yield self.echoes(again, b"y")
        moved_in = time.monotonic() - started
        log.info(
            "figure: serial port served by the other proxy {s:.3f}s after kill -9 "
            "(lease_seconds {lease:g})",
            s=moved_in,
            lease=LEASE_SECONDS,
        )
        self.assertLess(moved_in, LEASE_SECONDS + 0.5)
        rows = yield self.live_sessions()
        mine = [r for r in rows if r["proxy"] == survivor.name]
        self.assertEqual([(r["client_address"], r["end_reason"]) for r in mine], [(USER, None)])
