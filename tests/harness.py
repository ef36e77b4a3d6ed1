"""A consoled inside the test's reactor: a SQLite store and every door on port 0."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from consoled.config import Settings
from consoled.listeners import DoorService
from consoled.service import compose
from consoled.store import Store, schema
from consoled.store.engine import make_engine
from consoled.store.runner import ThreadRunner
from consoled.store.tables import sessions as sessions_table
from consoled.tokens import IssuedToken

INSTANCE = "9b2c4f0e-3d1a-4c5b-8e7f-0a1b2c3d4e5f"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: trial runs in its temp directory; the checkout's npm packages are here.
XTERM_DIR = os.path.join(CHECKOUT, "node_modules", "@xterm", "xterm")


def test_settings(**consoled: Any) -> Settings:
    """Defaults with every door on 127.0.0.1 port 0 and the given [consoled] options."""
    base = Settings()
    return dataclasses.replace(
        base,
        vnc=dataclasses.replace(base.vnc, novncproxy_host="127.0.0.1", novncproxy_port=0),
        spice=dataclasses.replace(
            base.spice, enabled=True, html5proxy_host="127.0.0.1", html5proxy_port=0
        ),
        serial_console=dataclasses.replace(
            base.serial_console, enabled=True, serialproxy_host="127.0.0.1", serialproxy_port=0
        ),
        consoled=dataclasses.replace(
            base.consoled,
            **{
                "proxy_name": "test-proxy",
                "token_clean_interval": 3600.0,
                "xvp_host": "127.0.0.1",
                "xvp_port": 0,
                "serial_tcp_enabled": True,
                "serial_tcp_host": "127.0.0.1",
                "serial_tcp_port": 0,
                "xterm_dir": XTERM_DIR,
                **consoled,
            },
        ),
    )


def drop_autobahn_timer_buckets() -> None:
    """Cancel Autobahn's emptied timer buckets.

    Autobahn batches its protocol timers (handshake, ping, close) into
    one-second buckets; cancelling a timer leaves its bucket's DelayedCall
    pending until the bucket time, with nothing to do.  Trial would call that
    a dirty reactor.
    """
    for call in reactor.getDelayedCalls():
        if getattr(call.func, "__name__", "") == "_notify_bucket":
            call.cancel()


class Consoled:
    """One running consoled; ``port(door)`` gives a door's bound port."""

    def __init__(self, testcase: TestCase, settings: Settings, clock: Any = None) -> None:
        path = os.path.abspath(testcase.mktemp()) + ".sqlite"
        self.engine = make_engine(f"sqlite:///{path}")
        schema.upgrade(self.engine)
        self.store = Store(self.engine, ThreadRunner(reactor, 2), reactor)
        self.settings = settings
        self.top = compose(settings, self.store, reactor, clock)
        self.top.startService()
        testcase.addCleanup(drop_autobahn_timer_buckets)
        testcase.addCleanup(self.top.stopService)

    @property
    def sessions(self) -> Any:
        return self.top.getServiceNamed("sessions")

    def port(self, door: str) -> int:
        service = self.top.getServiceNamed(door)
        assert isinstance(service, DoorService) and service.port is not None
        return service.port.getHost().port

    def authorize(
        self, console_type: str, host: str, port: int, **extra: Any
    ) -> defer.Deferred[IssuedToken]:
        extra.setdefault("ttl", 600)
        extra.setdefault("access_url_base", self.settings.access_url_base(console_type))
        return self.store.authorize(
            console_type=console_type, host=host, port=port, instance_uuid=INSTANCE, **extra
        )

    def session_rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            query = sa.select(sessions_table).order_by(sessions_table.c.id)
            return [dict(row._mapping) for row in connection.execute(query)]

    def wait_sessions_ended(self) -> defer.Deferred[None]:
        """Fires once every live session's row has been ended."""
        return self.sessions.settled()

    @defer.inlineCallbacks
    def wait_doors_idle(self, timeout: float = 10) -> Any:
        """Fires once no door holds a connection: each has read its client's last
        bytes (a token line sent just before a reset starts an admission) and
        its end.  A client's own close comes before that; sessions.settled()
        knows only the admissions already under way."""
        factories = [
            service.port.factory
            for service in self.top
            if isinstance(service, DoorService) and service.port is not None
        ]
        deadline = reactor.seconds() + timeout
        while any(getattr(factory, "open", None) for factory in factories):
            if reactor.seconds() > deadline:
                raise AssertionError(f"doors still hold connections after {timeout}s")
            yield deferLater(reactor, 0.01, lambda: None)
