"""Capped serial console logs: attach, output, detach in one file per port; rotation bounds them."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests import hypervisors
from tests.harness import Consoled, test_settings
from tests.wsclient import ws_connect


class RecordingTests(TestCase):
    timeout = 30

    def start(self, **options: Any) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.consoled = Consoled(self, test_settings(record_dir=self.directory, **options))
        self.echo = hypervisors.serve(self, hypervisors.Echo)
        self.name = f"127.0.0.1_{self.echo.port}.log"

    @defer.inlineCallbacks
    def session(self, data: bytes, kick: str | None = None) -> Any:
        issued = yield self.consoled.authorize("serial", "127.0.0.1", self.echo.port)
        client = yield ws_connect(self.consoled.port("serial"), issued.token)
        for at in range(0, len(data), 500):
            client.send(data[at : at + 500])
        yield client.read(len(data))
        if kick is None:
            client.sendClose(1000)
        else:
            (row,) = [r for r in self.consoled.session_rows() if r["ended_at"] is None]
            yield self.consoled.store.request_kick(session_id=row["id"], reason=kick)
            yield self.consoled.sessions.touch()
        yield client.closed
        yield self.consoled.wait_sessions_ended()

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.directory, name), "rb") as f:
            return f.read()

    @defer.inlineCallbacks
    def test_attach_output_detach_and_kick(self) -> Any:
        """Each session writes attach, the console's output and detach (with a kick's reason)."""
        self.start()
        yield self.session(b"first session output\r\n")
        yield self.session(b"second\r\n", kick="maintenance")
        text = self.read(self.name)
        events = [line for line in text.split(b"\r\n") if line.startswith(b"[consoled ")]
        self.assertEqual(len(events), 4, text)
        self.assertIn(b"attach 127.0.0.1 via websocket/serial", events[0])
        self.assertIn(b"detach 127.0.0.1", events[1])
        self.assertIn(b"disconnected by an operator: maintenance", events[3])
        self.assertLess(text.index(b"first session output"), text.index(events[1]))

    @defer.inlineCallbacks
    def test_rotation_bounds_the_files(self) -> Any:
        """Output beyond the cap rotates; no file exceeds it and old files beyond the count go."""
        self.start(record_max_bytes=1000, record_max_files=2)
        yield self.session(bytes(range(32, 127)) * 60)  # 5,700 bytes of output
        names = sorted(os.listdir(self.directory))
        self.assertEqual(names, [self.name, self.name + ".1", self.name + ".2"])
        for name in names:
            self.assertLessEqual(len(self.read(name)), 1000, name)
        self.assertIn(b"detach", self.read(self.name))
