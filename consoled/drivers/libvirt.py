"""The libvirt driver: an instance's consoles from its domain's live XML.

For an instance UUID on ``[libvirt] connection_uri`` (nova's option) it reads
``lookupByUUIDString(uuid).XMLDesc(0)`` and finds:

- ``novnc``, ``xvpvnc``: the ``<graphics type='vnc'>`` element's port;
- ``spice-html5``: the ``<graphics type='spice'>`` element's port and tlsPort;
- ``serial``: every ``<serial type='tcp'>`` whose ``<source mode='bind'>`` is a
  TCP server, in document order; when there is none, the ``<console
  type='tcp'>`` devices instead (s390x guests have consoles only), as nova's
  ``get_serial_ports_from_guest`` does.

A graphics address is the first ``<listen address=…>`` child's, else the
element's ``listen`` attribute.  An address that means "every address"
(``0.0.0.0``, ``::``, or none) is replaced by the compute host's: the
connection URI's host when it names one (``qemu+tcp://compute1/system``),
else nova's ``[vnc] server_proxyclient_address``, ``[spice]
server_proxyclient_address`` or ``[serial_console] proxyclient_address``.

Threads: every libvirt call runs in the driver's own pool of
:data:`THREADS` threads.  They share one connection, which libvirt makes
thread-safe (its calls are serialised inside the library as needed); a lock
guards only opening and replacing it.  A connection that fails (libvirtd
restarted, the network gone) is closed and opened again once per call.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import libvirt
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from consoled.config import Settings
from consoled.drivers import (
    ConsoleEndpoint,
    DriverError,
    DriverThreads,
    HypervisorUnreachable,
    NoSuchConsole,
    NoSuchInstance,
    is_uuid,
)

log = Logger()

#: Threads of the driver's pool: look-ups are short; a hung libvirtd holds these only.
THREADS = 4

_GRAPHICS = {"novnc": "vnc", "xvpvnc": "vnc", "spice-html5": "spice"}
_EVERY_ADDRESS = {"", "0.0.0.0", "::", "[::]"}
# Errors after which the connection itself is suspect: open a new one.
_CONNECTION_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}
_CONNECTION_CODES = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC}


def _quiet(_context: Any, _error: Any) -> None:
    # libvirt prints every error on stderr by default; they are raised as
    # libvirtError anyway, and mapped and logged here.
    pass


class LibvirtDriver:
    """Consoles of the domains on one libvirt connection."""

    def __init__(
        self,
        reactor: Any,
        uri: str,
        *,
        vnc_address: str = "127.0.0.1",
        spice_address: str = "127.0.0.1",
        serial_address: str = "127.0.0.1",
        open_connection: Callable[[str], Any] = libvirt.open,
    ) -> None:
        self.uri = uri
        host = urlsplit(uri).hostname
        # A URI naming a host is the compute host; a local one is this host,
        # known to consoled only through nova's proxyclient options.
        self._compute_host = {
            "vnc": host or vnc_address,
            "spice": host or spice_address,
            "serial": host or serial_address,
        }
        self._open = open_connection
        self._lock = threading.Lock()
        self._connection: Any = None
        libvirt.registerErrorHandler(_quiet, None)
        self._threads = DriverThreads(reactor, "consoled-libvirt", THREADS)

    @classmethod
    def from_settings(cls, settings: Settings, reactor: Any) -> LibvirtDriver:
        return cls(
            reactor,
            settings.libvirt.connection_uri,
            vnc_address=settings.vnc.server_proxyclient_address,
            spice_address=settings.spice.server_proxyclient_address,
            serial_address=settings.serial_console.proxyclient_address,
        )

    def consoles(
        self, instance_uuid: str, console_type: str
    ) -> Deferred[tuple[ConsoleEndpoint, ...]]:
        """Where the instance's consoles of console_type listen (one, or every serial port).

        Fails with NoSuchInstance, NoSuchConsole, HypervisorUnreachable or DriverError.
        """
        return self._threads.run(self._consoles, instance_uuid, console_type)

    def domain_xml(self, instance_uuid: str) -> Deferred[str]:
        """The domain's live XML (``XMLDesc(0)``)."""
        return self._threads.run(self._live_xml, instance_uuid)

    def add_devices(self, instance_uuid: str, devices: Sequence[str]) -> Deferred[None]:
        """Add device XML (e.g. ``<serial type='tcp'>``) to the domain's persistent
        definition (``defineXML``); a running domain gets them at its next start."""
        return self._threads.run(self._add_devices, instance_uuid, list(devices))

    def close(self) -> Deferred[None]:
        """Close the connection in the pool, then stop the pool."""
        d = self._threads.run(self._drop_connection, None)
        d.addBoth(lambda result: (self._threads.stop(), result)[1])
        return d

    # --- in the pool's threads ------------------------------------------------

    def _consoles(self, instance_uuid: str, console_type: str) -> tuple[ConsoleEndpoint, ...]:
        if console_type != "serial" and console_type not in _GRAPHICS:
            raise NoSuchConsole(instance_uuid, console_type, "libvirt domains have none")
        root = ElementTree.fromstring(self._live_xml(instance_uuid, console_type))
        if console_type == "serial":
            return self._serial_ports(root, instance_uuid)
        return (self._graphics(root, instance_uuid, console_type),)

    def _graphics(self, root: Any, instance_uuid: str, console_type: str) -> ConsoleEndpoint:
        kind = _GRAPHICS[console_type]
        graphics = root.find(f"./devices/graphics[@type='{kind}']")
        if graphics is None:
            raise NoSuchConsole(instance_uuid, console_type, f"the domain has no {kind} graphics")
        address = _listen_address(graphics)
        if address is None:
            raise NoSuchConsole(
                instance_uuid, console_type, f"its {kind} server listens on a UNIX socket only"
            )
        port = _port(graphics.get("port"))
        tls_port = _port(graphics.get("tlsPort")) if kind == "spice" else None
        if port is None and tls_port is None:
            raise NoSuchConsole(instance_uuid, console_type, f"its {kind} server has no port yet")
        return ConsoleEndpoint(console_type, self._host(kind, address), port, tls_port)

    def _serial_ports(self, root: Any, instance_uuid: str) -> tuple[ConsoleEndpoint, ...]:
        sources = root.findall("./devices/serial[@type='tcp']/source[@mode='bind']")
        if not sources:
            sources = root.findall("./devices/console[@type='tcp']/source[@mode='bind']")
        ports = []
        for source in sources:
            port = _port(source.get("service"))
            if port is not None:
                ports.append(
                    ConsoleEndpoint("serial", self._host("serial", source.get("host")), port)
                )
        if not ports:
            raise NoSuchConsole(instance_uuid, "serial", "the domain has no TCP serial port")
        return tuple(ports)

    def _add_devices(self, instance_uuid: str, devices: list[str]) -> None:
        if not is_uuid(instance_uuid):
            raise NoSuchInstance(instance_uuid, self.uri)
        connection = self._connected()
        try:
            domain = connection.lookupByUUIDString(instance_uuid)
            root = ElementTree.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            found = root.find("./devices")
            if found is None:
                found = ElementTree.SubElement(root, "devices")
            for device in devices:
                found.append(ElementTree.fromstring(device))
            connection.defineXML(ElementTree.tostring(root, encoding="unicode"))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NoSuchInstance(instance_uuid, self.uri) from None
            raise DriverError(f"libvirt at {self.uri}: {e.get_error_message()}") from None

    def _host(self, kind: str, address: str | None) -> str:
        if address is None or address in _EVERY_ADDRESS:
            return self._compute_host[kind]
        return address

    def _live_xml(self, instance_uuid: str, console_type: str | None = None) -> str:
        # With console_type: the domain must be running (its ports are assigned).
        if not is_uuid(instance_uuid):
            raise NoSuchInstance(instance_uuid, self.uri)
        for attempt in (1, 2):
            connection = self._connected()
            try:
                domain = connection.lookupByUUIDString(instance_uuid)
                if console_type is not None and not domain.isActive():
                    raise NoSuchConsole(instance_uuid, console_type, "the domain is not running")
                xml: str = domain.XMLDesc(0)
                return xml
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise NoSuchInstance(instance_uuid, self.uri) from None
                if not _connection_failed(e):
                    raise DriverError(f"libvirt at {self.uri}: {e.get_error_message()}") from None
                self._drop_connection(connection)
                if attempt == 2:
                    raise HypervisorUnreachable(self.uri, str(e.get_error_message())) from None
                log.info("libvirt at {uri}: connection lost ({error}); opening a new one",
                         uri=self.uri, error=e.get_error_message())  # fmt: skip
        raise AssertionError("unreachable")

    def _connected(self) -> Any:
        with self._lock:
            if self._connection is not None:
                try:
                    alive = self._connection.isAlive()
                except libvirt.libvirtError:
                    alive = False
                if alive:
                    return self._connection
                self._close_quietly(self._connection)
                self._connection = None
            try:
                self._connection = self._open(self.uri)
            except libvirt.libvirtError as e:
                raise HypervisorUnreachable(self.uri, str(e.get_error_message())) from None
            return self._connection

    def _drop_connection(self, connection: Any) -> None:
        # None: whatever connection is open (close()); else only that one.
        with self._lock:
            if self._connection is not None and connection in (None, self._connection):
                self._close_quietly(self._connection)
                self._connection = None

    @staticmethod
    def _close_quietly(connection: Any) -> None:
        try:
            connection.close()
        except libvirt.libvirtError:
            pass


def _connection_failed(e: libvirt.libvirtError) -> bool:
    return e.get_error_domain() in _CONNECTION_DOMAINS or e.get_error_code() in _CONNECTION_CODES


def _port(text: str | None) -> int | None:
    """A port attribute: None when absent, -1 (none assigned) or not a port."""
    try:
        value = int(text or "")
    except ValueError:
        return None
    return value if 0 < value < 65536 else None


def _listen_address(graphics: Any) -> str | None:
    """The address a graphics server listens on; '' for every address; None: a socket only."""
    listens = graphics.findall("listen")
    for listen in listens:
        if listen.get("type") in ("address", "network") and listen.get("address"):
            return str(listen.get("address"))
    if graphics.get("listen"):
        return str(graphics.get("listen"))
    if listens and all(listen.get("type") in ("socket", "none") for listen in listens):
        return None
    return ""
