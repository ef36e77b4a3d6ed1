"""``twistd consoled``: options and service assembly, nothing else.

Read settings, open the store, compose the services.  Start-up order is the
order of the children; shut-down runs the other way round and waits for
each child before the next: doors stop accepting, sessions end (rows closed,
locks released), then the store's thread pool stops after calls in flight.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from consoled import malloc
from consoled.api import management_listener
from consoled.api.consoles import ConsoleIssuer
from consoled.backends import Backends
from consoled.config import ConfigError, Settings, load_settings
from consoled.consoleauth import legacy_from_settings
from consoled.gate import Gate
from consoled.limits import FailureThrottle
from consoled.listeners import (
    CertificateReloader,
    DoorService,
    serial_tcp_doors,
    websocket_doors,
    xvp_doors,
)
from consoled.logs import speed_up_text_logs
from consoled.metrics import Metrics
from consoled.reactor import install as install_reactor
from consoled.sessions import Sessions
from consoled.sessions.recording import Recorder
from consoled.store import Store, open_store, schema
from consoled.store.engine import describe_error, safe_url
from consoled.timers import clean_expired_tokens, duty, end_lost_sessions
from consoled.tls import ReloadableServerTLS, TLSError, server_tls_from_settings
from consoled.web_directories import missing_web_directories

log = Logger()


class Options(usage.Options):
    synopsis = "[--config-file FILE ...]"
    longdesc = "Serve remote consoles (noVNC, SPICE, serial, XVP) from one reactor."

    optParameters = [["worker", None, None, "internal: run as worker N of [consoled] workers"]]

    def __init__(self) -> None:
        super().__init__()
        self["config_files"] = []

    def opt_config_file(self, path: str) -> None:
        """An INI file (nova.conf works as it is); repeatable, later files win."""
        self["config_files"].append(path)

    def postOptions(self) -> None:
        # Before anything imports the default reactor (twistd --reactor wins).
        install_reactor()
        try:
            self.settings: Settings = load_settings(self["config_files"], log=log)
        except ConfigError as error:
            # A file that cannot be read at all: name the option that gave it.
            given = "--config-file " if error.group is None and error.option is None else ""
            raise SystemExit(f"consoled: {given}{error}")


class SequentialMultiService(MultiService):
    """A MultiService that stops its children one at a time, last first."""

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if not self.running:
            return
        Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=child.name)


class StoreService(Service):
    """Owns the store's thread pool: started first, stopped last."""

    name = "store"

    def __init__(self, store: Store) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        d = self.store.stop()
        d.addCallback(lambda _: log.info("store stopped"))
        return d


class Announcer(Service):
    """Logs, once the reactor runs (signal handlers in place), that consoled serves.

    It first gives twistd's text log observer (installed by now) the faster
    formatter of the same lines (consoled.logs), and once the reactor runs
    moves what start-up made out of the garbage collector's generations.
    """

    name = "announcer"

    def __init__(self, reactor: Any, message: str, **fields: Any) -> None:
        self._reactor = reactor
        self._message = message
        self._fields = fields

    def startService(self) -> None:
        super().startService()
        speed_up_text_logs()
        # What start-up made (modules, settings, factories) lives as long as
        # the process: out of the collector's sight, its collections walk
        # only what sessions make.  With 100 set-ups in flight the proxy's
        # CPU per session went from ~824 to ~762 µs (issue 16).
        self._reactor.callWhenRunning(gc.freeze)
        self._reactor.callWhenRunning(log.info, self._message, **self._fields)


def prepare_schema(store: Store, embedded: bool) -> None:
    """Bring the embedded SQLite default to head; refuse any other database behind it.

    Runs before the reactor does, so blocking here blocks nothing.
    """
    try:
        if embedded:
            schema.upgrade(store.engine)
        else:
            schema.check(store.engine)
    except schema.SchemaBehind as error:
        raise SystemExit(f"consoled: {error}")
    except Exception as error:
        raise SystemExit(f"consoled: {describe_error(error, store.engine.url)}")


def store_refusal(error: Exception, settings: Settings) -> str:
    """One line for a store that cannot even be built (a bad URL, an unusable state_path)."""
    # Not the URL itself: it did not parse, so its password cannot be hidden.
    if settings.database.connection is None:
        option = f"[DEFAULT] state_path {settings.default.state_path or '(unset)'}"
    else:
        option = "[database] connection"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{option}: cannot open the database: {type(error).__name__}: {first}"


def proxy_name(settings: Settings, worker: int = 0) -> str:
    name = settings.consoled.proxy_name
    if name is None:
        return f"{socket.gethostname()}:{os.getpid()}"
    return f"{name}/w{worker}" if worker else name


def recorder_from_settings(settings: Settings, reactor: Any) -> Recorder | None:
    """Serial console logs in [consoled] record_dir, else nova's [DEFAULT] record as a directory."""
    directory = settings.consoled.record_dir or settings.default.record
    if not directory:
        return None
    return Recorder(
        directory, settings.consoled.record_max_bytes, settings.consoled.record_max_files, reactor
    )


def web_refusal(settings: Settings) -> str | None:
    """One line for the web directories of enabled doors that are missing, or None."""
    missing = missing_web_directories(settings)
    if not missing:
        return None
    return "; ".join(each.refusal() for each in missing)


def makeService(options: Options, reactor: Any = None) -> IService:
    """The whole consoled, or SystemExit with one line naming what to fix.

    Start-up never half-starts: a missing web directory, a bad database,
    schema or TLS file stops it here, before twistd starts logging; a door
    that cannot bind stops it in ``privilegedStartService``
    (consoled.listeners.DoorService), before any service starts.  Either way
    twistd prints the line and exits with 1.  ``consoled-manage check``
    (consoled/check.py) asks the same questions without starting.
    """
    if reactor is None:
        from twisted.internet import reactor
    settings = options.settings
    refusal = web_refusal(settings)
    if refusal is not None:
        raise SystemExit(f"consoled: {refusal}")
    malloc.tune()
    try:
        store, embedded = open_store(
            settings.database.connection,
            reactor,
            threads=settings.consoled.db_threads,
            state_path=settings.default.state_path,
            recycle=settings.database.connection_recycle_time,
        )
    except Exception as error:
        raise SystemExit(f"consoled: {store_refusal(error, settings)}") from None
    prepare_schema(store, embedded)
    worker = int(options["worker"] or 0)
    try:
        top = compose(settings, store, reactor, worker=worker)
        if settings.consoled.workers > 1 and not worker:
            workers_monitor(options, settings.consoled.workers, reactor).setServiceParent(top)
        return top
    except TLSError as error:
        raise SystemExit(f"consoled: {error}")


def workers_monitor(options: Options, workers: int, reactor: Any) -> IService:
    """Runs workers 1..N-1 as twistd processes and restarts any that die."""
    from twisted.runner.procmon import ProcessMonitor

    monitor = ProcessMonitor(reactor=reactor)
    monitor.setName("workers")
    twistd = "from twisted.scripts.twistd import run; run()"
    for worker in range(1, workers):
        argv = [sys.executable, "-c", twistd, "-n", "--pidfile=", "consoled"]
        for path in options["config_files"]:
            argv += ["--config-file", os.path.abspath(path)]
        monitor.addProcess(f"worker-{worker}", argv + ["--worker", str(worker)], env=os.environ)
    return monitor


def _sweeps(settings: Settings, store: Store, clock: Any) -> MultiService:
    """Expired tokens and the rows and leases of lost proxies, swept on timers."""
    sweeps = MultiService()
    sweeps.setName("sweeps")
    duty(
        "token-cleaner",
        settings.consoled.token_clean_interval,
        clean_expired_tokens,
        store,
        settings.consoled.token_clean_batch,
        clock=clock,
    ).setServiceParent(sweeps)
    # A live proxy touches its rows every touch_interval; rows silent for one
    # and a half periods are a dead proxy's, swept every half period: ended
    # within two touch periods of its death.
    touch = settings.consoled.touch_interval
    duty(
        "session-janitor", touch / 2, end_lost_sessions, store, 1.5 * touch, clock=clock
    ).setServiceParent(sweeps)
    return sweeps


def build_doors(
    settings: Settings,
    gate: Gate | None,
    reactor: Any,
    tls: ReloadableServerTLS | None,
    proxy: str,
) -> list[DoorService]:
    """Every door the settings enable, in the order they bind.

    ``gate`` None builds doors only to bind them (``consoled-manage check``):
    they are closed again without ever serving.
    """
    return [
        *websocket_doors(settings, gate, reactor, tls),  # type: ignore[arg-type]
        *xvp_doors(settings, gate, reactor, tls),  # type: ignore[arg-type]
        *serial_tcp_doors(settings, gate, reactor, tls, proxy_name=proxy),  # type: ignore[arg-type]
    ]


def compose(
    settings: Settings, store: Store, reactor: Any, clock: Any = None, worker: int = 0
) -> SequentialMultiService:
    """Every service of one consoled, in start order (they stop the other way round).

    ``clock`` drives every timer of the sessions, the gate, the periodic duties
    and the recorder (tests pass a Clock); the reactor, when it is None.
    """
    top = SequentialMultiService()
    StoreService(store).setServiceParent(top)
    sessions = Sessions(
        store,
        reactor,
        proxy_name(settings, worker),
        connect_timeout=settings.consoled.connect_timeout,
        idle_timeout=settings.consoled.idle_timeout,
        enforce_session_timeout=settings.consoleauth.enforce_session_timeout,
        lease_seconds=settings.consoled.lease_seconds,
        recorder=recorder_from_settings(settings, clock or reactor),
        spectators=settings.consoled.serial_spectators,
        clock=clock,
    )
    sessions.setServiceParent(top)
    metrics = Metrics()
    metrics.watch(sessions)
    sessions.metrics = metrics
    duty(
        "session-toucher", settings.consoled.touch_interval, sessions.touch, clock=clock
    ).setServiceParent(top)
    if not worker:  # the cell-wide sweeps run in the first process only
        _sweeps(settings, store, clock).setServiceParent(top)
    tls = server_tls_from_settings(settings)
    backends = Backends.from_settings(settings)
    if tls is not None:
        CertificateReloader(tls, reactor).setServiceParent(top)
    legacy = legacy_from_settings(settings, reactor, clock)  # None unless enable_consoleauth
    if legacy is not None:
        legacy.setServiceParent(top)
    gate = Gate(
        store,
        sessions,
        clock or reactor,
        timeout=settings.consoled.admission_timeout,
        allowed_origins=settings.console.allowed_origins,
        trusted_proxies=settings.consoled.trusted_proxies,
        backends=backends,
        throttle=FailureThrottle(
            clock or reactor,
            settings.consoled.failed_token_limit,
            settings.consoled.failed_token_window,
            settings.consoled.failed_token_ban,
        ),
        max_sessions_per_token=settings.consoled.max_sessions_per_token,
        max_sessions_per_instance=settings.consoled.max_sessions_per_instance,
        legacy=legacy,
        metrics=metrics,
    )
    doors = build_doors(settings, gate, reactor, tls, proxy_name(settings, worker))
    for door in doors:
        door.setServiceParent(top)
    if settings.consoled.api_key_hashes and not worker:
        issuer = ConsoleIssuer(settings, store, reactor)
        issuer.setServiceParent(top)
        management_listener(
            settings,
            metrics=metrics,
            store=store,
            doors=doors,
            reactor=reactor,
            clock=clock,
            issuer=issuer,
        ).setServiceParent(top)
    Announcer(
        reactor,
        "consoled ready: database {database}, proxy {proxy}",
        database=safe_url(store.engine.url),
        proxy=proxy_name(settings, worker),
    ).setServiceParent(top)
    return top
