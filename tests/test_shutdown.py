"""SIGTERM: the doors stop accepting first, then every live session ends as the proxy restarting.

A real ``twistd consoled`` with the noVNC and serial websocket doors, the
XVP door and the raw serial door holds one live session on each (an echo
console behind every one).  On SIGTERM: every door's port is closed before
any session ends (its log says so, and the ports refuse connections); the
websocket users get close code 1012 with ``proxy shutting down``; the raw
serial user reads ``[proxy shutting down]``; the XVP user's connection
closes; the process exits and every session row is ended with that reason,
no serial lease left.
"""

from __future__ import annotations

import os
import re
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from consoled.endings import ANSWERS, Kind
from consoled.store import Store
from consoled.store.runner import InlineRunner
from consoled.store.tables import serial_leases, sessions
from tests import hypervisors
from tests.daemon import start_consoled_on_free_ports
from tests.databases import upgraded_engine
from tests.harness import INSTANCE
from tests.serialclient import terminal_connect
from tests.wsclient import HOST, ws_connect
from tests.xvpclient import xvp_connect

DOORS = ("novnc", "serial", "xvp", "serial-tcp")


class SigtermTests(TestCase):
    timeout = 50

    @defer.inlineCallbacks
    def test_sigterm_closes_doors_then_sessions(self) -> Any:
        """Ports closed before any session ends; 1012, the serial line, a closed XVP
        socket; every row ended as ``proxy shutting down``, no lease held."""
        url = "sqlite:///" + os.path.abspath(self.mktemp()) + ".sqlite"
        engine = upgraded_engine(self, url)
        store = Store(engine, InlineRunner(), reactor)

        def config_text(ports: list[int]) -> str:
            novnc, serial, xvp, serial_tcp = ports
            return (
                f"[database]\nconnection = {url}\n"
                f"[vnc]\nnovncproxy_host = {HOST}\nnovncproxy_port = {novnc}\n"
                "[serial_console]\nenabled = true\n"
                f"serialproxy_host = {HOST}\nserialproxy_port = {serial}\n"
                f"[consoled]\nproxy_name = stopping\nxvp_host = {HOST}\nxvp_port = {xvp}\n"
                f"serial_tcp_enabled = true\nserial_tcp_host = {HOST}\n"
                f"serial_tcp_port = {serial_tcp}\n"
            )

        twistd, _, ports = yield start_consoled_on_free_ports(self, 4, config_text)
        port_of = dict(zip(DOORS, ports, strict=True))

        @defer.inlineCallbacks
        def token(console_type: str) -> Any:
            echo = hypervisors.serve(self, hypervisors.Echo)
            issued = yield store.authorize(
                console_type=console_type,
                host="127.0.0.1",
                port=echo.port,
                instance_uuid=INSTANCE,
                access_url_base=None,
                ttl=600,
            )
            return issued.token

        novnc = yield ws_connect(port_of["novnc"], (yield token("novnc")))
        serial = yield ws_connect(port_of["serial"], (yield token("serial")))
        xvp = yield xvp_connect(port_of["xvp"], (yield token("xvpvnc")))
        terminal = yield terminal_connect(port_of["serial-tcp"], (yield token("serial")))
        users = (novnc, serial, xvp, terminal)
        for user in users:
            self.addCleanup(user.transport.abortConnection)
            user.send(b"ping")
            self.assertEqual((yield user.read(4)), b"ping")

        twistd.signal("TERM")
        told = yield defer.gatherResults([u.closed for u in users]).addTimeout(20, reactor)
        yield twistd.when_ended().addTimeout(20, reactor)

        code = ANSWERS[Kind.SHUTDOWN].close
        self.assertEqual(code, 1012)
        self.assertEqual(told[0], (code, "proxy shutting down"))
        self.assertEqual(told[1], (code, "proxy shutting down"))
        self.assertEqual(told[2], (200, b""))  # XVP: closed, nothing more to say
        self.assertTrue(told[3][1].endswith(b"\r\n[proxy shutting down]\r\n"), told[3])

        # Every door's listening port closed before the first session ended.
        text = twistd.text()
        first_end = text.index("ended (proxy shutting down)")
        for door, port in port_of.items():
            closed = text.find(f"(TCP Port {port} Closed)")
            self.assertTrue(0 <= closed < first_end, f"{door} port {port} closed at {closed}")
        self.assertEqual(len(re.findall(r"session \d+ ended \(proxy shutting down\)", text)), 4)
        for port in ports:
            with self.assertRaises(ConnectionRefusedError):
                yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, port), Protocol())

        with engine.connect() as connection:
            rows = connection.execute(sa.select(sessions.c.end_reason, sessions.c.ended_at)).all()
            leases = connection.execute(sa.select(sa.func.count()).select_from(serial_leases))
            self.assertEqual(leases.scalar(), 0)
        self.assertEqual(len(rows), 4)
        for reason, ended_at in rows:
            self.assertEqual(reason, "proxy shutting down")
            self.assertIsNotNone(ended_at)
