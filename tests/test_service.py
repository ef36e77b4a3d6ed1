"""The daemon: assembly, timers, ordered shut-down, and a real `twistd consoled` process."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.service import Options, SequentialMultiService, makeService
from consoled.store import schema
from consoled.store.engine import make_engine
from consoled.timers import clean_expired_tokens, duty
from tests.databases import fresh_database
from tests.peers import free_port
from tests.wsclient import http_request, upgrade_request

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = "from twisted.scripts.twistd import run; run()"


def write_config(testcase: SynchronousTestCase, text: str) -> str:
    path = os.path.abspath(testcase.mktemp())
    with open(path, "w") as f:
        f.write(text)
    return path


def options_for(*paths: str) -> Options:
    options = Options()
    argv: list[str] = []
    for path in paths:
        argv += ["--config-file", path]
    options.parseOptions(argv)
    return options


class FlakyStore:
    """A store whose clean fails on the first call and then succeeds."""

    def __init__(self) -> None:
        self.calls = 0

    def clean_expired(self, batch: int) -> defer.Deferred[int]:
        self.calls += 1
        if self.calls == 1:
            return defer.fail(RuntimeError("database went away"))
        return defer.succeed(3)


class TimerTests(SynchronousTestCase):
    def test_cleaner_survives_a_failing_run(self) -> None:
        """A failing clean is logged and the next period runs again."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock, store = Clock(), FlakyStore()
        service = duty("token-cleaner", 60, clean_expired_tokens, store, 10, clock=clock)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(store.calls, 1)
        failures = [e for e in events if e.get("log_failure") is not None]
        self.assertEqual(len(failures), 1)
        self.flushLoggedErrors(RuntimeError)
        clock.advance(60)
        self.assertEqual(store.calls, 2)
        self.assertTrue(any(e.get("count") == 3 for e in events))
        clock.advance(60)
        self.assertEqual(store.calls, 3)


class AssemblyTests(SynchronousTestCase):
    def test_services_and_stop_order(self) -> None:
        """The store starts first and stops last; children stop one after the other."""
        url = fresh_database(self, "sqlite")
        config = write_config(self, f"[database]\nconnection = {url}\n")
        engine = make_engine(url)
        schema.upgrade(engine)
        engine.dispose()
        top = makeService(options_for(config), reactor=reactor)
        self.assertIsInstance(top, SequentialMultiService)
        self.assertEqual(
            [s.name for s in IServiceCollection(top)],
            ["store", "sessions", "session-toucher", "sweeps", "novnc", "xvp", "announcer"],
        )

    def test_refuses_schema_behind(self) -> None:
        """A configured database behind head stops start-up with the upgrade command."""
        url = fresh_database(self, "sqlite")
        engine = make_engine(url)
        schema.upgrade(engine, "001")
        engine.dispose()
        config = write_config(self, f"[database]\nconnection = {url}\n")
        exit_ = self.assertRaises(SystemExit, makeService, options_for(config), reactor)
        self.assertIn("consoled-manage db upgrade", str(exit_.code))

    def test_bad_config_exits_before_anything(self) -> None:
        """A bad option value exits with one line naming file, group and option."""
        config = write_config(self, "[vnc]\nnovncproxy_port = 99999\n")
        exit_ = self.assertRaises(SystemExit, options_for, config)
        self.assertIn(config, str(exit_.code))
        self.assertIn("novncproxy_port", str(exit_.code))

    def test_sequential_stop(self) -> None:
        """The second-added child stops only after the first-added... in reverse, one at a time."""
        from twisted.application.service import Service

        order: list[str] = []
        gates: dict[str, defer.Deferred[None]] = {}

        class Recorder(Service):
            def stopService(self) -> defer.Deferred[None]:
                order.append(self.name)
                gates[self.name] = defer.Deferred()
                return gates[self.name]

        top = SequentialMultiService()
        for name in ("store", "sessions", "doors"):
            child = Recorder()
            child.setName(name)
            child.setServiceParent(top)
        top.startService()
        stopped = top.stopService()
        self.assertEqual(order, ["doors"])
        gates["doors"].callback(None)
        self.assertEqual(order, ["doors", "sessions"])
        gates["sessions"].callback(None)
        gates["store"].callback(None)
        self.assertEqual(order, ["doors", "sessions", "store"])
        self.successResultOf(stopped)


class _Twistd(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[BaseException] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"consoled ready" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value)


class DaemonTests(TestCase):
    """`twistd -n consoled` as an operator runs it."""

    timeout = 60

    @defer.inlineCallbacks
    def run_daemon(self, config: str) -> Any:
        twistd = _Twistd()
        transport = reactor.spawnProcess(
            twistd,
            sys.executable,
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "consoled", "--config-file", config],
            env={**os.environ, "PYTHONPATH": CHECKOUT},
            path=CHECKOUT,
        )
        self.addCleanup(lambda: twistd.ended if twistd.ended.called else _kill(transport, twistd))
        yield twistd.ready
        return transport, twistd

    @defer.inlineCallbacks
    def test_start_and_sigterm(self) -> Any:
        """The daemon starts on the embedded SQLite default, cleans tokens, stops on SIGTERM.

        The raw token of a stored console never appears in its output.
        """
        state = os.path.abspath(self.mktemp())
        novnc_port = free_port()
        config = write_config(
            self,
            f"[DEFAULT]\nstate_path = {state}\n[consoled]\ntoken_clean_interval = 0.05\n"
            f"[vnc]\nnovncproxy_host = 127.0.0.1\nnovncproxy_port = {novnc_port}\n",
        )
        # A token that expired long ago, created through the CLI's code path.
        from consoled.store import Store
        from consoled.store.engine import default_url
        from consoled.store.runner import InlineRunner

        os.makedirs(state)
        engine = make_engine(default_url(state))
        schema.upgrade(engine)
        clock = Clock()
        store = Store(engine, InlineRunner(), clock)
        issued = self.successResultOf(
            store.authorize(
                console_type="novnc",
                host="h",
                port=5900,
                instance_uuid="9b2c4f0e-3d1a-4c5b-8e7f-0a1b2c3d4e5f",
                access_url_base="http://x/",
                ttl=1,
            )
        )
        engine.dispose()

        transport, twistd = yield self.run_daemon(config)
        # The expired token is refused at the door, with its hash prefix in the log line.
        status, _, _ = yield http_request(novnc_port, upgrade_request(f"/?token={issued.token}"))
        self.assertEqual(status, 401)
        while b"deleted 1 expired console tokens" not in twistd.output:
            yield _later(0.05)
        transport.signalProcess("TERM")
        reason = yield twistd.ended
        text = twistd.output.decode()
        # twistd re-raises the signal it stopped on, after a clean shut-down.
        self.assertEqual(getattr(reason, "signal", None), signal.SIGTERM, text)
        self.assertIn("Server Shut Down", text)
        self.assertIn("store stopped", text)
        # twistd without --reactor runs consoled's own (consoled/reactor.py).
        self.assertIn("reactor class: consoled.reactor.ConsoledReactor", text)
        self.assertIn(f"(token {issued.connect_info.hash_prefix})", text)
        self.assertNotIn(issued.token, text)
        self.assertTrue(os.path.exists(os.path.join(state, "consoled.sqlite")))

    @defer.inlineCallbacks
    def test_bad_config_exits_non_zero(self) -> Any:
        """A bad value: twistd exits non-zero with the file, group and option named."""
        config = write_config(self, "[consoled]\ndb_threads = many\n")
        twistd = _Twistd()
        reactor.spawnProcess(
            twistd,
            sys.executable,
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "consoled", "--config-file", config],
            env={**os.environ, "PYTHONPATH": CHECKOUT},
            path=CHECKOUT,
        )
        twistd.ready.addErrback(lambda _: None)
        reason = yield twistd.ended
        self.assertIsInstance(reason, error.ProcessTerminated)
        self.assertNotEqual(reason.exitCode, 0)
        self.assertIn(b"db_threads", twistd.output)
        self.assertNotIn(b"Traceback", twistd.output)


def _later(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def _kill(transport: Any, twistd: _Twistd) -> defer.Deferred[Any]:
    try:
        transport.signalProcess(signal.SIGKILL)
    except error.ProcessExitedAlready:
        pass
    return twistd.ended


class AnnouncerTests(SynchronousTestCase):
    def test_start_up_is_frozen_out_of_the_collector_once_running(self) -> None:
        """Once the reactor runs, what start-up made leaves the collector's
        generations (gc.freeze), then consoled says it is ready."""
        import gc

        from consoled.service import Announcer

        class Reactor:
            def __init__(self) -> None:
                self.when_running: list[Any] = []

            def callWhenRunning(self, f: Any, *args: Any, **kwargs: Any) -> None:
                self.when_running.append(f)

        fake = Reactor()
        Announcer(fake, "consoled ready").startService()
        self.assertIn(gc.freeze, fake.when_running)
        self.assertLess(fake.when_running.index(gc.freeze), len(fake.when_running) - 1)
