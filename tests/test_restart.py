"""A proxy killed with ``kill -9`` and started again under the same name.

Its previous process left a session row open and a serial lease held; the
new process holds no session, so it gives both back as it starts, instead of
refusing its own user as "port in use" until the lease lapses (30 s here).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from consoled.store import Store
from consoled.store.runner import InlineRunner
from tests import hypervisors
from tests.daemon import start_consoled, start_consoled_on_free_ports
from tests.databases import upgraded_engine
from tests.harness import INSTANCE
from tests.wsclient import http_request, upgrade_request, ws_connect

LEASE_SECONDS = 30.0


class RestartTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_restarted_proxy_gives_back_its_own_lease_at_once(self) -> Any:
        url = "sqlite:///" + os.path.abspath(self.mktemp()) + ".sqlite"
        engine = upgraded_engine(self, url)
        store = Store(engine, InlineRunner(), reactor)

        def config_text(ports: list[int]) -> str:
            return (
                f"[database]\nconnection = {url}\n"
                f"[vnc]\nnovncproxy_host = 127.0.0.1\nnovncproxy_port = {ports[0]}\n"
                "[serial_console]\nenabled = true\nserialproxy_host = 127.0.0.1\n"
                f"serialproxy_port = {ports[1]}\n"
                "[consoled]\nproxy_name = phoenix\nxvp_enabled = false\n"
                f"touch_interval = 10\nlease_seconds = {LEASE_SECONDS}\n"
            )

        first, config, (_, serial_port) = yield start_consoled_on_free_ports(self, 2, config_text)
        echo = hypervisors.serve(self, hypervisors.Echo)
        issued = yield store.authorize(
            console_type="serial",
            host="127.0.0.1",
            port=echo.port,
            instance_uuid=INSTANCE,
            access_url_base=None,
            ttl=600,
        )
        user = yield ws_connect(serial_port, issued.token)
        self.addCleanup(user.transport.abortConnection)
        user.send(b"x")
        self.assertEqual((yield user.read(1)), b"x")
        (held,) = yield store.list_sessions()

        yield first.kill()
        second = yield start_consoled(self, config)
        status, _, body = yield http_request(
            serial_port, upgrade_request(f"/?token={issued.token}")
        )
        self.assertEqual(status, 101, body)
        rows = {row["id"]: row for row in (yield store.list_sessions(live=False))}
        self.assertEqual(rows[held["id"]]["end_reason"], "proxy restarted: session lost")
        self.assertIn(
            "proxy phoenix restarted: ended 1 session row(s) and gave back 1 serial lease(s)",
            second.text(),
        )
