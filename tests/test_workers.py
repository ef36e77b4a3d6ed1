"""[consoled] workers: several processes serve the same ports and share the database."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from consoled.store import Store
from consoled.store.runner import InlineRunner
from consoled.store.tables import sessions as sessions_table
from tests import hypervisors
from tests.daemon import start_consoled, write_config
from tests.databases import upgraded_engine
from tests.harness import INSTANCE
from tests.peers import free_port
from tests.wsclient import ws_connect


class WorkersTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_two_workers_share_the_port(self) -> Any:
        """With workers = 2 both processes accept on the one port; SIGTERM stops both."""
        from twisted.internet import reactor

        url = "sqlite:///" + os.path.abspath(self.mktemp()) + ".sqlite"
        engine = upgraded_engine(self, url)
        port = free_port()
        config = write_config(
            self,
            f"[database]\nconnection = {url}\n"
            f"[vnc]\nnovncproxy_host = 127.0.0.1\nnovncproxy_port = {port}\n"
            "[consoled]\nxvp_enabled = false\nworkers = 2\nproxy_name = cell1\n"
            "touch_interval = 0.2\nlease_seconds = 2\n"
            # 24 sessions of one token: the kernel's hash may give one worker
            # more than the default 16 a token may have there (429).
            "max_sessions_per_token = 0\nmax_sessions_per_instance = 0\n",
        )
        daemon = yield start_consoled(self, config)
        yield daemon.when_logged(b"proxy cell1/w1", 20)  # the second worker is ready too
        echo = hypervisors.serve(self, hypervisors.Echo)
        store = Store(engine, InlineRunner(), reactor)
        issued = yield store.authorize(
            console_type="novnc",
            host="127.0.0.1",
            port=echo.port,
            instance_uuid=INSTANCE,
            access_url_base="http://127.0.0.1/",
            ttl=600,
        )
        clients = []
        for _ in range(24):
            client = yield ws_connect(port, issued.token)
            client.send(b"x")
            yield client.read(1)
            clients.append(client)

        def proxies() -> set[str]:
            with engine.connect() as connection:
                query = sa.select(sessions_table.c.proxy).distinct()
                return set(connection.execute(query).scalars())

        self.assertEqual(proxies(), {"cell1", "cell1/w1"})
        for client in clients:
            client.sendClose(1000)
            yield client.closed
        reason = yield daemon.stop()
        self.assertIn("Server Shut Down", daemon.text())
        # Every session row was ended, by whichever worker held it.
        for _ in range(100):
            with engine.connect() as connection:
                open_rows = connection.execute(
                    sa.select(sa.func.count())
                    .select_from(sessions_table)
                    .where(sessions_table.c.ended_at.is_(None))
                ).scalar_one()
            if not open_rows:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(open_rows, 0)
        self.assertIsNotNone(reason)
