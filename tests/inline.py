"""A door's shared core in memory: a real SQLite store run inline, on a MemoryReactorClock.

For property tests that drive a door's protocol thousands of times over a
StringTransport and then ask what the database kept.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from twisted.internet.testing import MemoryReactorClock

from consoled.gate import Gate
from consoled.sessions import Sessions
from consoled.store import Store
from consoled.store.runner import InlineRunner
from consoled.store.tables import serial_leases, sessions
from tests.databases import upgraded_engine
from tests.harness import INSTANCE


class InlineCore:
    """Store, sessions and one issued token of ``console_type`` for 127.0.0.1:``port``."""

    def __init__(self, testcase: Any, console_type: str, port: int, access_url_base: str) -> None:
        self.engine = upgraded_engine(testcase, "sqlite:///" + testcase.mktemp() + ".sqlite")
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        self.store = Store(self.engine, InlineRunner(), self.reactor)
        self.sessions = Sessions(self.store, self.reactor, "fuzz", connect_timeout=5)
        self.gate = Gate(self.store, self.sessions, self.reactor, timeout=10)
        self.sessions.startService()
        issued = testcase.successResultOf(
            self.store.authorize(
                console_type=console_type,
                host="127.0.0.1",
                port=port,
                instance_uuid=INSTANCE,
                access_url_base=access_url_base,
                ttl=10**6,
            )
        )
        self.token = issued.token.encode()

    def left_behind(self) -> tuple[int, int]:
        """(session rows not ended, serial leases held)."""
        with self.engine.connect() as connection:
            open_rows = connection.execute(
                sa.select(sa.func.count())
                .select_from(sessions)
                .where(sessions.c.ended_at.is_(None))
            ).scalar_one()
            leases = connection.execute(
                sa.select(sa.func.count()).select_from(serial_leases)
            ).scalar_one()
        return open_rows, leases
