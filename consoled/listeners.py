"""Listeners: one service per door, each from an endpoint string.

A door that cannot bind its port stops start-up with the error, so an
operator never runs a consoled that silently lacks a door.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from dataclasses import astuple, dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from consoled.config import Settings
from consoled.doors.answers import plain_response
from consoled.doors.serial_tcp import SerialTCPFactory
from consoled.doors.web import DoorFactory, door_site
from consoled.doors.websocket import ConsoleServerFactory, Door
from consoled.doors.xvp import XVPFactory
from consoled.endings import ANSWERS, Ending
from consoled.gate import Gate
from consoled.limits import PeerLimit
from consoled.proxy_protocol import ProxyHeaderFactory
from consoled.tls import HTTP_ALPN, ReloadableServerTLS, reload_on_sighup, tls_factory

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


@dataclass(frozen=True)
class Place:
    """Where a door listens, as the operator names it: a group and two options."""

    group: str
    host_option: str
    port_option: str

    def read(self, settings: Settings) -> tuple[str, int]:
        section = getattr(settings, self.group)
        return getattr(section, self.host_option), getattr(section, self.port_option)


NOVNC = Place("vnc", "novncproxy_host", "novncproxy_port")
SPICE = Place("spice", "html5proxy_host", "html5proxy_port")
SERIAL = Place("serial_console", "serialproxy_host", "serialproxy_port")
XVP = Place("consoled", "xvp_host", "xvp_port")
SERIAL_TCP = Place("consoled", "serial_tcp_host", "serial_tcp_port")
MKS = Place("consoled", "mks_host", "mks_port")
API = Place("consoled", "api_host", "api_port")


class DoorRefused(SystemExit, Exception):
    """A door cannot listen; the message is one line for the operator.

    Both bases on purpose.  twistd's ``postApplication`` handles an Exception
    from start-up: it removes the pidfile and, when daemonizing, reports it
    through the status pipe (without that report the waiting parent never
    exits).  Python's top level handles a SystemExit: it prints the message,
    with no traceback, and exits with status 1.
    """


class DoorService(Service):
    """Listens on one endpoint while running; ``port`` is the bound port.

    Under twistd every door binds in ``privilegedStartService``: twistd calls
    it on the whole tree before any ``startService`` (so before the store's
    threads start) and before it sheds ``--uid``.  A door that cannot bind
    closes the doors bound before it and raises `DoorRefused`, so the process
    ends at once instead of half-serving.
    """

    def __init__(
        self,
        name: str,
        description: str,
        endpoint: Any,
        factory: IProtocolFactory,
        place: Place,
    ) -> None:
        self.setName(name)
        self.description = description
        #: the options behind the listener, named when it cannot bind
        self.place = place
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            self._bind()
        except CannotListenError as error:
            for sibling in self.parent or ():
                if isinstance(sibling, DoorService):
                    sibling._close()
            raise DoorRefused(f"consoled: {self.refusal(error)}") from None

    def startService(self) -> None:
        super().startService()
        # Started without twistd (tests, tools): bind now.
        port = self.port if self.port is not None else self._bind()
        address = port.getHost()
        log.info(
            "{door} door listening on {host}:{port}",
            door=self.name,
            host=address.host,
            port=address.port,
        )

    def _bind(self) -> IListeningPort:
        """Listen now, or raise CannotListenError (endpoints fail synchronously)."""
        ports: list[IListeningPort] = []
        failures: list[Failure] = []
        self.endpoint.listen(self.factory).addCallbacks(ports.append, failures.append)
        if failures:
            failures[0].raiseException()
        self.port = ports[0]
        return self.port

    def _close(self) -> None:
        # Without a running reactor the socket closes when the process ends.
        if self.port is not None:
            self.port.stopListening()
            self.port = None

    def refusal(self, error: CannotListenError) -> str:
        """One line for an operator: the door, its options, the cause and the remedy."""
        group, host_option, port_option = astuple(self.place)
        cause = error.socketError
        code = getattr(cause, "errno", None)
        reason = getattr(cause, "strerror", None) or str(cause)
        reason = reason[:1].lower() + reason[1:]
        if code == errno.EADDRINUSE:
            remedy = f"stop what holds it, or set another [{group}] {port_option}"
        elif code == errno.EACCES:
            remedy = "a port below 1024 needs root (twistd --uid drops it after binding)"
        else:
            remedy = f"check [{group}] {host_option}"
        return (
            f"{self.name} door: [{group}] {port_option} {error.port} on "
            f"{error.interface or '*'}: {reason}; {remedy}"
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


def http_answer(ending: Ending) -> bytes:
    """An early refusal on an HTTP door: the kind's status and the reason."""
    return plain_response(ANSWERS[ending.kind].http, str(ending))


def line_answer(ending: Ending) -> bytes:
    """An early refusal on the raw serial door: the reason on a line."""
    return f"console unavailable: {ending}\r\n".encode()


def door(
    name: str,
    description: str,
    place: Place,
    factory: IProtocolFactory,
    *,
    settings: Settings,
    tls: ReloadableServerTLS | None,
    first_byte_timeout: float,
    reactor: Any,
    alpn: tuple[bytes, ...] = (),
    answer: Callable[[Ending], bytes] = http_answer,
) -> DoorService:
    """A listener where ``place``'s options say, serving ``factory``, behind TLS as configured.

    ``alpn``: the protocols its TLS may select from a client's ALPN list.
    ``answer``: how the door says a refusal before its protocol speaks
    (one connection too many from an address): an HTTP status by default.
    """
    host, port = place.read(settings)
    factory = PeerLimit(
        name,
        factory,
        settings.consoled.max_connections_per_address,
        answer,
        trusted=settings.consoled.trusted_proxies,
    )
    if settings.consoled.workers > 1:
        endpoint: Any = SharedPortEndpoint(reactor, host, port)
    else:
        endpoint = serverFromString(reactor, endpoint_string(host, port))
    wrapped = tls_factory(
        factory,
        tls,
        settings.default.ssl_only,
        clock=reactor,
        first_byte_timeout=first_byte_timeout,
        alpn=alpn,
        door=name,
        answer=answer,
    )
    if name in settings.consoled.proxy_protocol:
        # Outermost: the header precedes TLS, and the chain behind it (PeerLimit
        # too) is built with the client's address it names.
        wrapped = ProxyHeaderFactory(
            name, wrapped, reactor, trusted=settings.consoled.trusted_proxies
        )
    return DoorService(name, description, endpoint, wrapped, place)


def websocket_doors(
    settings: Settings,
    gate: Gate,
    reactor: Any,
    tls: ReloadableServerTLS | None = None,
) -> list[DoorService]:
    """The noVNC, spice-html5, serial and WebMKS doors that the settings enable."""
    c = settings.consoled
    plan: list[tuple[str, Place, str | None, dict[bytes, str]]] = []
    if settings.novnc_door_enabled:
        plan.append(("novnc", NOVNC, settings.default.web, {}))
    if settings.spice_door_enabled:
        plan.append(("spice", SPICE, c.spice_web, {}))
    if settings.serial_door_enabled:
        plan.append(
            (
                "serial",
                SERIAL,
                c.serial_web or PACKAGED_WEB,
                {
                    b"xterm": c.xterm_dir,
                    b"xterm-addon-fit": os.path.join(os.path.dirname(c.xterm_dir), "addon-fit"),
                },
            )
        )
    if settings.mks.enabled:
        plan.append(("webmks", MKS, c.mks_web or os.path.join(PACKAGED_WEB, "webmks"), {}))
    doors = []
    for name, place, web_dir, extra in plan:
        factory = ConsoleServerFactory(Door(name, gate), ping_interval=c.ping_interval)
        site = DoorFactory(
            door_site(web_dir, extra=extra, timeout=c.handshake_timeout),
            factory,
            reactor,
            c.handshake_timeout,
            c.http_connection_max,
        )
        doors.append(
            door(
                name,
                f"websocket {name}",
                place,
                site,
                settings=settings,
                tls=tls,
                first_byte_timeout=c.handshake_timeout,
                reactor=reactor,
                alpn=HTTP_ALPN,
            )
        )
    return doors


def xvp_doors(
    settings: Settings,
    gate: Gate,
    reactor: Any,
    tls: ReloadableServerTLS | None = None,
) -> list[DoorService]:
    """The XVP (HTTP CONNECT) door for Java VNC viewers, when enabled."""
    c = settings.consoled
    if not c.xvp_enabled:
        return []
    factory = XVPFactory(gate, reactor, c.xvp_request_timeout)
    return [
        door(
            "xvp",
            "XVP (HTTP CONNECT)",
            XVP,
            factory,
            settings=settings,
            tls=tls,
            first_byte_timeout=c.xvp_request_timeout,
            reactor=reactor,
        )
    ]


def serial_tcp_doors(
    settings: Settings,
    gate: Gate,
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
    factory = SerialTCPFactory(gate, reactor, c.serial_prompt_timeout, proxy_name)
    return [
        door(
            "serial-tcp",
            "raw TCP serial",
            SERIAL_TCP,
            factory,
            settings=settings,
            tls=tls if settings.default.ssl_only else None,
            first_byte_timeout=0,
            reactor=reactor,
            answer=line_answer,
        )
    ]
