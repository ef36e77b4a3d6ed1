"""The relay's speed measures keep their promises: direct writes, no Nagle, malloc tuning."""

from __future__ import annotations

import os
import socket
from typing import Any
from unittest import mock

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled import malloc
from consoled.sessions.relay import write_now
from tests import hypervisors
from tests.harness import Consoled, test_settings
from tests.wsclient import ws_connect


class _Transport:
    """What write_now falls back to: Twisted's queueing writes."""

    def __init__(self) -> None:
        self.queued: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.queued.append(data)

    def writeSequence(self, parts: Any) -> None:
        self.queued.extend(parts)


class WriteNowTests(SynchronousTestCase):
    def test_not_plain_tcp_is_queued(self) -> None:
        """Anything but a plain TCP transport (TLS, tests) goes through its own write."""
        transport = _Transport()
        write_now(transport, b"payload", b"head")
        write_now(transport, b"more")
        self.assertEqual(b"".join(transport.queued), b"headpayloadmore")


class NoDelayTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_both_sockets_of_a_session(self) -> Any:
        """A live session's user and hypervisor sockets both have Nagle off."""
        consoled = Consoled(self, test_settings())
        echo = hypervisors.serve(self, hypervisors.Echo)
        issued = yield consoled.authorize("novnc", "127.0.0.1", echo.port)
        client = yield ws_connect(consoled.port("novnc"), issued.token)
        client.send(b"x")
        self.assertEqual((yield client.read(1)), b"x")
        [session] = consoled.sessions.live
        relay = session.relay
        for transport in (relay.backend.transport, relay.client.transport):
            option = transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            self.assertTrue(option, transport)
        client.sendClose(1000)
        yield consoled.wait_sessions_ended()


class MallocTests(SynchronousTestCase):
    def test_tuned_on_glibc(self) -> None:
        """On glibc (this machine) both thresholds are raised."""
        self.assertTrue(malloc.tune())

    def test_operator_setting_wins(self) -> None:
        """An operator's own MALLOC_*_THRESHOLD_ is left alone."""
        with mock.patch.dict(os.environ, {"MALLOC_TRIM_THRESHOLD_": "1048576"}):
            self.assertFalse(malloc.tune())
