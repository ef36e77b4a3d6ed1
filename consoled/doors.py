"""Listeners: one service per door, each from an endpoint string.

A door that cannot bind its port stops start-up with the error, so an
operator never runs a consoled that silently lacks a door.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from consoled.authorizer import Authorizer
from consoled.config import Settings
from consoled.endings import Ending, Kind
from consoled.frontends.serial_tcp import SerialTCPFactory
from consoled.frontends.web import DoorFactory, door_site
from consoled.frontends.websocket import ConsoleServerFactory, Door
from consoled.frontends.xvp import XVPFactory
from consoled.sessions import Sessions
from consoled.tls import ReloadableServerTLS, reload_on_sighup, tls_factory

log = Logger()

#: consoled's own pages (serial.html), shipped in the package.
PACKAGED_WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")


def endpoint_string(host: str, port: int) -> str:
    # Twisted's default backlog of 50 drops SYNs when a hundred browsers
    # connect at once (each then waits a 1 s SYN retry).
    return f"tcp:port={port}:interface={host.replace(':', chr(92) + ':')}:backlog=1024"


@implementer(IStreamServerEndpoint)
class SharedPortEndpoint:
    """A TCP listener that every consoled worker binds too (``SO_REUSEPORT``).

    The kernel spreads new connections over the workers' sockets; sessions,
    leases and kicks of all workers meet in the database.
    """

    def __init__(self, reactor: Any, host: str, port: int, backlog: int = 1024) -> None:
        self._reactor, self._host, self._port, self._backlog = reactor, host, port, backlog

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._host, self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
            return defer.succeed(self._reactor.adoptStreamPort(sock.fileno(), family, factory))
        except OSError as error:
            return defer.fail(CannotListenError(self._host, self._port, error))
        finally:
            sock.close()  # adoptStreamPort keeps its own duplicate of the descriptor


class DoorService(Service):
    """Listens on one endpoint while running; ``port`` is the bound port."""

    def __init__(
        self, name: str, description: str, endpoint: Any, factory: IProtocolFactory
    ) -> None:
        self.setName(name)
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        d = self.endpoint.listen(self.factory)
        failures: list[Failure] = []
        d.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        log.info(
            "{door} door listening on {host}:{port}",
            door=self.name,
            host=address.host,
            port=address.port,
        )

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        return defer.maybeDeferred(self.port.stopListening)


class CertificateReloader(Service):
    """Re-reads the TLS certificate and key on SIGHUP while running."""

    name = "tls-reloader"

    def __init__(self, tls: ReloadableServerTLS, reactor: Any) -> None:
        self._tls = tls
        self._reactor = reactor
        self._uninstall: Any = None

    def startService(self) -> None:
        super().startService()
        self._uninstall = reload_on_sighup([self._tls], self._reactor)

    def stopService(self) -> None:
        super().stopService()
        if self._uninstall is not None:
            self._uninstall()


def door(
    name: str,
    description: str,
    host: str,
    port: int,
    factory: IProtocolFactory,
    *,
    settings: Settings,
    tls: ReloadableServerTLS | None,
    first_byte_timeout: float,
    reactor: Any,
) -> DoorService:
    """A listener on host:port serving ``factory``, behind TLS as configured."""
    if settings.consoled.workers > 1:
        endpoint: Any = SharedPortEndpoint(reactor, host, port)
    else:
        endpoint = serverFromString(reactor, endpoint_string(host, port))
    wrapped = tls_factory(factory, tls, settings.default.ssl_only, first_byte_timeout)
    return DoorService(name, description, endpoint, wrapped)


def websocket_doors(
    settings: Settings,
    authorizer: Authorizer,
    sessions: Sessions,
    reactor: Any,
    tls: ReloadableServerTLS | None = None,
) -> list[DoorService]:
    """The noVNC, spice-html5 and serial doors that the settings enable."""
    c = settings.consoled
    plan = []
    if settings.novnc_door_enabled:
        plan.append(
            (
                "novnc",
                settings.vnc.novncproxy_host,
                settings.vnc.novncproxy_port,
                settings.default.web,
                {},
            )
        )
    if settings.spice_door_enabled:
        plan.append(
            (
                "spice",
                settings.spice.html5proxy_host,
                settings.spice.html5proxy_port,
                c.spice_web,
                {},
            )
        )
    if settings.serial_door_enabled:
        plan.append(
            (
                "serial",
                settings.serial_console.serialproxy_host,
                settings.serial_console.serialproxy_port,
                c.serial_web or PACKAGED_WEB,
                {
                    b"xterm": c.xterm_dir,
                    b"xterm-addon-fit": os.path.join(os.path.dirname(c.xterm_dir), "addon-fit"),
                },
            )
        )
    doors = []
    for name, host, port, web_dir, extra in plan:
        core = Door(
            name,
            authorizer,
            sessions,
            allowed_origins=settings.console.allowed_origins,
            trusted_proxies=c.trusted_proxies,
        )
        factory = ConsoleServerFactory(
            core, ping_interval=c.ping_interval, handshake_timeout=c.handshake_timeout
        )
        site = DoorFactory(
            door_site(web_dir, extra=extra, timeout=c.handshake_timeout),
            factory,
            reactor,
            c.handshake_timeout,
        )
        doors.append(
            door(
                name,
                f"websocket {name}",
                host,
                port,
                site,
                settings=settings,
                tls=tls,
                first_byte_timeout=c.handshake_timeout,
                reactor=reactor,
            )
        )
    return doors


def xvp_doors(
    settings: Settings,
    authorizer: Authorizer,
    sessions: Sessions,
    reactor: Any,
    tls: ReloadableServerTLS | None = None,
) -> list[DoorService]:
    """The XVP (HTTP CONNECT) door for Java VNC viewers, when enabled."""
    c = settings.consoled
    if not c.xvp_enabled:
        return []
    factory = XVPFactory(authorizer, sessions, reactor, c.xvp_request_timeout)
    return [
        door(
            "xvp",
            "XVP (HTTP CONNECT)",
            c.xvp_host,
            c.xvp_port,
            factory,
            settings=settings,
            tls=tls,
            first_byte_timeout=c.xvp_request_timeout,
            reactor=reactor,
        )
    ]


def serial_tcp_doors(
    settings: Settings,
    authorizer: Authorizer,
    sessions: Sessions,
    reactor: Any,
    tls: ReloadableServerTLS | None = None,
    proxy_name: str = "",
) -> list[DoorService]:
    """The raw TCP serial door for terminal users, when enabled.

    The door speaks first (its token prompt), so it cannot tell TLS from
    plain by the client's first byte: it is TLS only with ``ssl_only``, and
    plain otherwise.
    """
    c = settings.consoled
    if not c.serial_tcp_enabled:
        return []
    factory = SerialTCPFactory(
        authorizer,
        sessions,
        reactor,
        c.serial_prompt_timeout,
        proxy_name,
        spectators=c.serial_spectators,
    )

    def watch(info: Any, protocol: Any) -> Any:
        spectator = sessions.watch(info, "serial-tcp", protocol.client_address, protocol)
        if spectator is None:  # the writer is on another proxy, or just left
            protocol.close(Ending(Kind.PORT_BUSY, "held through another proxy"))
            return None
        return spectator.client_lost

    factory.watch = watch
    return [
        door(
            "serial-tcp",
            "raw TCP serial",
            c.serial_tcp_host,
            c.serial_tcp_port,
            factory,
            settings=settings,
            tls=tls if settings.default.ssl_only else None,
            first_byte_timeout=0,
            reactor=reactor,
        )
    ]
