"""Issuing consoles: the driver finds where an instance's console is, the store mints its token.

nova's ``POST /servers/{id}/remote-consoles`` (2.6 and later) body is
``{"remote_console": {"protocol": P, "type": T}}`` with these pairs; the
answer is ``{"remote_console": {"protocol", "type", "url"}}``:

========  ==================  ==========================
protocol  type                driver
========  ==================  ==========================
vnc       novnc, xvpvnc       libvirt ([libvirt] connection_uri)
spice     spice-html5         libvirt
serial    serial              libvirt (the first serial port no user holds)
mks       webmks              vSphere ([vmware] host_ip, …)
========  ==================  ==========================

Drivers are opened on first use (the API may run without either library)
and closed when the service stops.  Nothing here is on the proxy path.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer

from consoled.config import Settings
from consoled.drivers import ConsoleEndpoint, NoSuchConsole
from consoled.tokens import IssuedToken

#: protocol -> the console types nova accepts with it
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "vnc": ("novnc", "xvpvnc"),
    "spice": ("spice-html5",),
    "serial": ("serial",),
    "mks": ("webmks",),
}


class ConsoleTypeUnavailable(Exception):
    """This deployment has no driver for the protocol (not configured, library missing):
    nova's ConsoleTypeUnavailable, a 400, not an outage."""

    def __init__(self, protocol: str, why: str) -> None:
        super().__init__(f"Unavailable console type {protocol}: {why}")


class ConsoleIssuer(Service):
    """Finds an instance's console with its driver and stores a token for it."""

    name = "console-issuer"

    def __init__(self, settings: Settings, store: Any, reactor: Any) -> None:
        self._settings = settings
        self._store = store
        self._reactor = reactor
        self._drivers: dict[str, Any] = {}

    def _driver(self, protocol: str) -> Any:
        kind = "vmware" if protocol == "mks" else "libvirt"
        if kind not in self._drivers:
            try:
                if kind == "vmware":
                    from consoled.drivers.vmware import VsphereDriver

                    self._drivers[kind] = VsphereDriver.from_settings(self._settings, self._reactor)
                else:
                    from consoled.drivers.libvirt import LibvirtDriver

                    self._drivers[kind] = LibvirtDriver.from_settings(self._settings, self._reactor)
            except ImportError as error:
                raise ConsoleTypeUnavailable(
                    protocol, f"the {kind} driver's library is not installed ({error.name})"
                )
            except ValueError as error:
                raise ConsoleTypeUnavailable(protocol, str(error))
        return self._drivers[kind]

    @defer.inlineCallbacks
    def issue(self, instance_uuid: str, protocol: str, console_type: str) -> Any:
        """A new token for the instance's console; fails with a DriverError."""
        driver = self._driver(protocol)
        found: tuple[ConsoleEndpoint, ...] = yield driver.consoles(instance_uuid, console_type)
        if not found:
            raise NoSuchConsole(instance_uuid, console_type, "none found")
        endpoint = found[0]
        if console_type == "serial":
            # nova bug 1425640: the first of the instance's ports no user holds
            # (every proxy's leases), or NoSerialPortFree naming each holder.
            ports = [e.port for e in found if e.host == endpoint.host and e.port is not None]
            free = yield self._store.next_free_serial_port(endpoint.host, ports)
            endpoint = next(e for e in found if e.host == endpoint.host and e.port == free)
        port = endpoint.port if endpoint.port is not None else endpoint.tls_port
        assert port is not None
        issued: IssuedToken = yield self._store.authorize(
            console_type=console_type,
            host=endpoint.host,
            port=port,
            tls_port=endpoint.tls_port,
            internal_access_path=endpoint.internal_access_path,
            instance_uuid=instance_uuid,
            access_url_base=self._settings.access_url_base(console_type),
            ttl=self._settings.token_ttl(console_type),
        )
        return issued

    def stopService(self) -> Any:
        super().stopService()
        drivers, self._drivers = list(self._drivers.values()), {}
        return defer.gatherResults([defer.maybeDeferred(d.close) for d in drivers])
