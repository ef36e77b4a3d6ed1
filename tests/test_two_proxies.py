"""One writer per serial port across every proxy of a cell: two real consoled, one database.

Proxies A and B are two ``twistd consoled`` processes sharing one database
(PostgreSQL, or one SQLite file); the tests reach them only as users and
operators do, through their serial websocket doors and ``consoled-manage``.
Each proxy renews its leases every 0.2 s (``touch_interval``) and a lease
lapses 1 s after its last renewal (``lease_seconds``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from consoled.store import Store, schema
from consoled.store.engine import make_engine
from consoled.store.runner import InlineRunner
from tests import hypervisors
from tests.daemon import CHECKOUT, ENV, Twistd, start_consoled_on_free_ports
from tests.databases import fresh_database
from tests.peers import start_qemu_monitor
from tests.wsclient import StreamClient, http_request, upgrade_request, ws_connect

INSTANCE = "9b2c4f0e-3d1a-4c5b-8e7f-0a1b2c3d4e5f"
TOUCH_INTERVAL = 0.2
LEASE_SECONDS = 1.0
PROMPT = b"(qemu) "


@dataclass
class Proxy:
    name: str
    config: str
    serial_port: int
    process: Twistd


def proxy_config(
    url: str,
    name: str,
    ports: list[int],
    extra: str = "",
    touch_interval: float = TOUCH_INTERVAL,
    lease_seconds: float = LEASE_SECONDS,
) -> str:
    """One proxy of the pair: its noVNC and serial doors on ``ports``, the shared database."""
    novnc_port, serial_port = ports
    return (
        f"[database]\nconnection = {url}\n"
        f"[vnc]\nnovncproxy_host = 127.0.0.1\nnovncproxy_port = {novnc_port}\n"
        "[serial_console]\nenabled = true\nserialproxy_host = 127.0.0.1\n"
        f"serialproxy_port = {serial_port}\n"
        f"[consoled]\nproxy_name = {name}\nxvp_enabled = false\n"
        f"touch_interval = {touch_interval}\nlease_seconds = {lease_seconds}\n"
        "token_clean_interval = 3600\n" + extra
    )


def _later(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(testcase: Any, condition: Any, timeout: float = 5, every: float = 0.05) -> Any:
    """Poll ``condition()`` (a Deferred of a truth) until true; fail ``testcase``
    after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not (result := (yield condition())):
        if reactor.seconds() > deadline:
            testcase.fail(f"still false after {timeout}s")
        yield _later(every)
    return result


def _hang_up(client: StreamClient) -> Any:
    if client.closed.called:
        return None
    client.sendClose(1000)
    return client.closed


class TwoProxiesMixin:
    """The cross-proxy behaviours, run on each shared database backend."""

    backend: str
    timeout = 40

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        url = fresh_database(self, self.backend)
        engine = make_engine(url)
        self.addCleanup(engine.dispose)
        # A configured database is never upgraded by the daemon: the operator does it first.
        schema.upgrade(engine)
        self.store = Store(engine, InlineRunner(), reactor)
        self.a, self.b = yield defer.gatherResults(
            [self.start_proxy("A", url), self.start_proxy("B", url)], consumeErrors=True
        )

    @defer.inlineCallbacks
    def start_proxy(self, name: str, url: str) -> Any:
        """Start proxy ``name`` on ports of its own (new ones if another process took one)."""

        process, config, (_, serial_port) = yield start_consoled_on_free_ports(
            self, 2, lambda ports: proxy_config(url, name, ports)
        )
        return Proxy(name, config, serial_port, process)

    @defer.inlineCallbacks
    def token(self, console_port: int) -> Any:
        issued = yield self.store.authorize(
            console_type="serial",
            host="127.0.0.1",
            port=console_port,
            instance_uuid=INSTANCE,
            access_url_base="ws://127.0.0.1:6083/",
            ttl=600,
        )
        return issued.token

    @defer.inlineCallbacks
    def connect(self, proxy: Proxy, console_port: int) -> Any:
        client = yield ws_connect(proxy.serial_port, (yield self.token(console_port)))
        self.addCleanup(_hang_up, client)
        return client

    @defer.inlineCallbacks
    def upgrade_status(self, proxy: Proxy, console_port: int) -> Any:
        """Ask ``proxy`` for the serial console as a browser does; (status, body)."""
        request = upgrade_request(f"/?token={(yield self.token(console_port))}")
        status, _, body = yield http_request(proxy.serial_port, request)
        return status, body

    @defer.inlineCallbacks
    def manage(self, proxy: Proxy, *argv: str) -> Any:
        """Run consoled-manage with ``proxy``'s configuration; its stdout, which must succeed."""
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "consoled.manage", "--config-file", proxy.config, *argv],
            env=ENV,
            path=CHECKOUT,
        )
        self.assertEqual(code, 0, (out + err).decode(errors="replace"))
        return out.decode()

    def live_sessions(self) -> defer.Deferred[list[dict[str, Any]]]:
        return self.store.list_sessions(live=True)

    def session_row(self, session_id: int) -> defer.Deferred[dict[str, Any]]:
        rows = self.store.list_sessions(live=False)
        return rows.addCallback(lambda rows: next(r for r in rows if r["id"] == session_id))

    @defer.inlineCallbacks
    def test_second_proxy_refuses_a_held_port(self) -> Any:
        """A user holding a QEMU serial port through A makes B refuse another user with 409.

        The refusal is kept as a row of B that names since when the port is
        held (the 409 itself has an empty body: consoled/doors/websocket.py).
        """
        qemu = yield start_qemu_monitor(self)
        user = yield self.connect(self.a, qemu.port)
        self.assertIn(b"monitor", (yield user.read_until(PROMPT)))
        status, body = yield self.upgrade_status(self.b, qemu.port)
        self.assertEqual(status, 409, body)
        rows = yield self.store.list_sessions(live=False)
        self.assertEqual(
            [(r["proxy"], r["end_reason"] is None) for r in rows], [("A", True), ("B", False)]
        )
        self.assertTrue(rows[1]["end_reason"].startswith("console port in use: held since"))

    @defer.inlineCallbacks
    def test_kick_from_any_host_frees_the_port_for_the_other_proxy(self) -> Any:
        """An operator lists and kicks A's session with B's configuration; A closes it, B serves.

        A closes the user's websocket with 4409 and the reason within about one
        touch period; the next user, on B, reaches the QEMU monitor.
        """
        qemu = yield start_qemu_monitor(self)
        user = yield self.connect(self.a, qemu.port)
        yield user.read_until(PROMPT)
        listing = yield self.manage(self.b, "session", "list")
        (row,) = [line.split() for line in listing.splitlines()[1:]]
        session_id, console, proxy = row[0], row[3], row[5]
        self.assertEqual((console, proxy), (f"127.0.0.1:{qemu.port}", "A"), listing)

        closed_at: list[float] = []
        user.closed.addCallback(lambda result: closed_at.append(reactor.seconds()) or result)
        said = yield self.manage(self.b, "session", "kick", session_id, "--reason", "maintenance")
        self.assertIn("asked 1 session(s) to close", said)
        kicked_at = reactor.seconds()  # the kick was committed before the command exited
        code, reason = yield user.closed.addTimeout(5, reactor)
        self.assertEqual((code, reason), (4409, "disconnected by an operator: maintenance"))
        # One touch period (0.2 s) after the commit, with slack for a loaded machine.
        self.assertLess(closed_at[0] - kicked_at, 1.0)
        yield self.a.process.when_logged(b"kicked by an operator: maintenance")

        # A ends the row (and drops the lease) just after it closes the websocket.
        yield wait_until(self, lambda: self.live_sessions().addCallback(lambda rows: not rows))
        ended = yield self.session_row(int(session_id))
        self.assertEqual(ended["end_reason"], "disconnected by an operator: maintenance")
        second = yield self.connect(self.b, qemu.port)
        yield second.read_until(PROMPT)
        second.send(b"info name\r")
        self.assertIn(b"info name", (yield second.read_until(PROMPT)))

    @defer.inlineCallbacks
    def test_killed_proxy_frees_the_port_after_one_lease(self) -> Any:
        """After kill -9 of A its user's lease holds for one lease period, then B serves.

        B refuses right after the kill, accepts a user once the last renewal
        is ``lease_seconds`` old, and its janitor ends the dead proxy's row.
        """
        echo = hypervisors.serve(self, hypervisors.Echo)
        user = yield self.connect(self.a, echo.port)
        user.send(b"x")
        self.assertEqual((yield user.read(1)), b"x")
        (held,) = yield self.live_sessions()

        killed_at = reactor.seconds()
        yield self.a.process.kill()
        status, body = yield self.upgrade_status(self.b, echo.port)
        self.assertEqual(status, 409, body)
        code, _ = yield user.closed.addTimeout(5, reactor)
        self.assertEqual(code, 1006)  # the kernel closed the socket: no close frame

        @defer.inlineCallbacks
        def free() -> Any:
            status, body = yield self.upgrade_status(self.b, echo.port)
            return (status, body) if status != 409 else None

        status, body = yield wait_until(self, free, timeout=5, every=0.1)
        waited = reactor.seconds() - killed_at
        self.assertEqual(status, 101, body)
        self.assertGreaterEqual(waited, LEASE_SECONDS - TOUCH_INTERVAL - 0.05)

        def lost() -> defer.Deferred[bool]:
            d = self.session_row(held["id"])
            return d.addCallback(lambda row: row["ended_at"] is not None)

        yield wait_until(self, lost, timeout=5, every=0.05)
        row = yield self.session_row(held["id"])
        self.assertEqual(row["end_reason"], "proxy lost: no touch")
        # Within two touch periods of the kill (the row's end is stamped by B's
        # janitor; the slack covers a loaded test machine's scheduling).
        self.assertLess(row["ended_at"] - killed_at, 2 * TOUCH_INTERVAL + 0.5)


class PostgreSQLTests(TwoProxiesMixin, TestCase):
    backend = "postgresql"


class SQLiteTests(TwoProxiesMixin, TestCase):
    backend = "sqlite"
