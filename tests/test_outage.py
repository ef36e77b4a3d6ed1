"""The database unreachable for a while, by blackhole and by refusal (issue 15.4).

consoled runs in the test's reactor on a real PostgreSQL reached through
:class:`tests.dbrelay.DatabaseRelay`, with the store :func:`open_store`
builds for the daemon (its breaker included), and the raw TCP serial door in
front of an echoing console.  During the outage a live session keeps
relaying, new connections are refused within 1 s (asserted < 2 s), each
with one log line and no traceback but the outage's one; a session that ends
during the outage has its end, bytes and lease release written when the
database is back, and a session that lives through it has its row touched
and its lease renewed.  ``CONSOLED_OUTAGE_SECONDS`` sets the outage (3 s
here; scripts/outage.py runs 30 s and prints the figures).
"""

from __future__ import annotations

import os
import time
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from consoled.service import compose
from consoled.store import Store, open_store
from consoled.store.runner import InlineRunner
from consoled.store.tables import serial_leases, sessions
from tests import hypervisors
from tests.databases import ADMIN_URLS, fresh_database, upgraded_engine
from tests.dbrelay import DatabaseRelay
from tests.harness import INSTANCE, drop_autobahn_timer_buckets, test_settings
from tests.serialclient import terminal_connect

OUTAGE = float(os.environ.get("CONSOLED_OUTAGE_SECONDS", "3"))
TOUCH_INTERVAL = 0.5


def _later(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class OutageMixin:
    """One body of outage tests; ``how`` is the relay's outage (blackhole or refuse)."""

    how: str
    timeout = 60 + 2 * OUTAGE

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        url = fresh_database(self, "postgresql")
        self.engine = upgraded_engine(self, url)
        self.direct = Store(self.engine, InlineRunner(), reactor)
        self.relay = DatabaseRelay(
            ("127.0.0.1", sa.make_url(ADMIN_URLS["postgresql"]).port or 5432)
        )
        self.relay.start()
        self.addCleanup(self.relay.stop)
        self.store, _ = open_store(self.relay.url(url, sa.make_url(url).database), reactor)
        settings = test_settings(touch_interval=TOUCH_INTERVAL, lease_seconds=30.0)
        self.top = compose(settings, self.store, reactor)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.top.startService()
        self.addCleanup(drop_autobahn_timer_buckets)
        self.addCleanup(self.top.stopService)
        self.addCleanup(self.relay.restore)
        self.consoles = [hypervisors.serve(self, hypervisors.Echo) for _ in range(8)]
        yield _later(0.3)

    def door(self) -> int:
        return self.top.getServiceNamed("serial-tcp").port.getHost().port

    @defer.inlineCallbacks
    def connect(self) -> Any:
        console = self.consoles.pop()
        issued = yield self.direct.authorize(
            console_type="serial",
            host="127.0.0.1",
            port=console.port,
            instance_uuid=INSTANCE,
            access_url_base="ws://127.0.0.1:6083/",
            ttl=600,
        )
        started = time.monotonic()
        client = yield terminal_connect(self.door(), issued.token)
        client.waited = time.monotonic() - started
        self.addCleanup(lambda: None if client.closed.called else client.close())
        return client

    def rows(self, table: sa.Table) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(sa.select(table))]

    @defer.inlineCallbacks
    def outage(self) -> Any:
        if self.how == "blackhole":
            self.relay.blackhole()
        else:
            yield self.relay.refuse()

    @defer.inlineCallbacks
    def test_outage(self) -> Any:
        """Live sessions go on, new ones are refused fast with one line each, and
        every end, touch and lease renewal is written once the database is back."""
        ending = yield self.connect()
        living = yield self.connect()
        self.assertTrue(ending.attached and living.attached)
        ending.send(b"before\n")
        yield ending.read_until(b"before\n")
        yield self.outage()
        down_at = time.monotonic()
        yield _later(3 * TOUCH_INTERVAL)  # touches meet the outage; the breaker trips
        refused = []
        while time.monotonic() - down_at < OUTAGE:
            living.send(b"during\n")
            yield living.read_until(b"during\n", timeout=2)
            if len(refused) < 4:
                newcomer = yield self.connect()
                self.assertFalse(newcomer.attached)
                refused.append(newcomer.waited)
            yield _later(0.25)
        ending.send(b"x" * 1000)
        yield ending.read(1000 + len(b"before\n") - len(b"before\n"))
        ending.close()
        yield ending.closed
        self.relay.restore()
        back = time.monotonic()
        while not self.store._runner.up:
            self.assertLess(time.monotonic() - back, 15, "the store did not come back")
            yield _later(0.05)
        up_after = time.monotonic() - back
        yield _later(3 * TOUCH_INTERVAL)
        # Live sessions went on, the newcomers waited under 2 s (1 s is the aim).
        self.assertEqual(len(refused), 4)
        self.assertLess(max(refused), 2.0, refused)
        by_id = {row["id"]: row for row in self.rows(sessions)}
        ended = [row for row in by_id.values() if row["ended_at"] is not None]
        self.assertEqual(len(ended), 1, by_id)
        (done,) = ended
        self.assertEqual(done["bytes_to_server"], len(b"before\n") + 1000)
        self.assertEqual(done["bytes_to_client"], len(b"before\n") + 1000)
        self.assertIn("client", done["end_reason"])
        (lease,) = self.rows(serial_leases)  # the ended one released, the living one held
        self.assertNotEqual(lease["session_id"], done["id"])
        self.assertGreater(lease["expires_at"], reactor.seconds() + 29 - 3 * TOUCH_INTERVAL)
        live_row = by_id[lease["session_id"]]
        self.assertGreater(live_row["bytes_to_server"], 0)
        self.assertGreater(live_row["touched_at"], reactor.seconds() - 3 * TOUCH_INTERVAL)
        # One line per refused connection; at most one traceback for the whole outage.
        lines = [e for e in self.events if e.get("log_format", "").startswith("refused")]
        self.assertEqual(len(lines), 4, [e.get("reason") for e in lines])
        tracebacks = [e for e in self.events if "log_failure" in e]
        self.assertLessEqual(len(tracebacks), 1, [e.get("log_format") for e in tracebacks])
        self.flushLoggedErrors(sa.exc.OperationalError)
        figures = os.environ.get("CONSOLED_OUTAGE_FIGURES")
        if figures:  # scripts/outage.sh
            with open(figures, "a") as f:
                f.write(
                    f"{self.how}: outage {OUTAGE:g}s, {len(refused)} new connections refused"
                    f" in {min(refused):.3f}-{max(refused):.3f}s, live session relayed"
                    f" throughout, store up {up_after:.2f}s after the database,"
                    f" ended row bytes"
                    f" {done['bytes_to_client']}/{done['bytes_to_server']}, leases left"
                    f" {len(self.rows(serial_leases))}, refusal log lines {len(lines)},"
                    f" tracebacks {len(tracebacks)}\n"
                )
        # And the store serves new sessions again.
        after = yield self.connect()
        self.assertTrue(after.attached)
        living.close()
        after.close()
        yield defer.gatherResults([living.closed, after.closed])


class BlackholeTests(OutageMixin, TestCase):
    how = "blackhole"


class RefusalTests(OutageMixin, TestCase):
    how = "refuse"
