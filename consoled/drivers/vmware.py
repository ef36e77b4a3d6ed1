"""The vSphere driver: a WebMKS console of a VM, as a ticket from vCenter (pyvmomi).

Settings are nova's ``[vmware]`` options: ``host_ip``, ``host_port``,
``host_username``, ``host_password``, ``ca_file``, ``insecure``.  For an
instance UUID the driver finds the VM whose ``config.instanceUuid`` it is
(nova gives a VM its instance's UUID there) with
``searchIndex.FindAllByUuid(uuid=…, vmSearch=True, instanceUuid=True)``, the
first one found, as nova's ``vm_util`` does, then ``AcquireTicket``:

- ``mks`` (the default): a ``webmks`` token exactly as nova's VMware driver
  writes it (``vmops.get_mks_console``): host and port are the ticket's
  (ESXi's authd, 902), ``internal_access_path`` is
  ``json.dumps({"ticket": T, "cfgFile": F, "thumbprint": P})`` with P the
  ticket's ``sslThumbprint`` without colons, in lower case;
- ``webmks``: the direct form that consoled's WebMKS door also serves
  (``consoled.backends.webmks``): ``{"ticket": T, "thumbprint": P, "direct":
  true}`` for ``wss://host:port/ticket/T`` (the ESXi host, 443).

Threads: pyvmomi blocks, and its SOAP stub is not documented as thread-safe,
so every call runs in the driver's own pool of one thread, on one logged-in
session (``SmartConnect``) opened when first needed and logged in again once
when vCenter says the session ended (``NotAuthenticated``).
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl
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

#: Seconds a connect or one SOAP exchange may take.
TIMEOUT = 30
#: Ports when a ticket names none: ESXi's authd (mks) and its HTTPS (webmks).
DEFAULT_PORTS = {"mks": 902, "webmks": 443}

_NETWORK_ERRORS = (OSError, http.client.HTTPException)


class VsphereDriver:
    """WebMKS tickets for instances' VMs on one vCenter (or ESXi host)."""

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        ca_file: str | None = None,
        insecure: bool = False,
        protocol: str = "https",
        connect: Callable[..., Any] = SmartConnect,
    ) -> None:
        self.host, self.port = host, port
        self.where = f"vSphere at {host}:{port}"
        self._login = {"protocol": protocol, "host": host, "port": port}
        self._login |= {"user": username, "pwd": password, "httpConnectionTimeout": TIMEOUT}
        if insecure:
            self._login["disableSslCertValidation"] = True
        elif protocol == "https":
            self._login["sslContext"] = ssl.create_default_context(cafile=ca_file)
        self._connect = connect
        self._service: Any = None
        self._threads = DriverThreads(reactor, "consoled-vsphere", 1)

    @classmethod
    def from_settings(cls, settings: Settings, reactor: Any) -> VsphereDriver:
        """The driver for [vmware]; ValueError naming the option that is missing."""
        vmware = settings.vmware
        for name in ("host_ip", "host_username", "host_password"):
            if getattr(vmware, name) is None:
                raise ValueError(f"[vmware] {name} is not set: no vSphere driver")
        assert vmware.host_ip and vmware.host_username and vmware.host_password is not None
        return cls(
            reactor,
            vmware.host_ip,
            vmware.host_port,
            vmware.host_username,
            vmware.host_password,
            ca_file=vmware.ca_file,
            insecure=vmware.insecure,
        )

    def consoles(
        self, instance_uuid: str, console_type: str = "webmks", ticket_type: str = "mks"
    ) -> Deferred[tuple[ConsoleEndpoint, ...]]:
        """The instance's WebMKS console (one endpoint) from a fresh ticket.

        Fails with NoSuchInstance, NoSuchConsole, HypervisorUnreachable or DriverError.
        """
        if ticket_type not in DEFAULT_PORTS:
            raise ValueError(f"ticket_type must be mks or webmks, not {ticket_type!r}")
        return self._threads.run(self._consoles, instance_uuid, console_type, ticket_type)

    def close(self) -> Deferred[None]:
        """Log out in the pool, then stop the pool."""
        d = self._threads.run(self._log_out)
        d.addBoth(lambda result: (self._threads.stop(), result)[1])
        return d

    # --- in the pool's thread -------------------------------------------------

    def _consoles(
        self, instance_uuid: str, console_type: str, ticket_type: str
    ) -> tuple[ConsoleEndpoint, ...]:
        if console_type != "webmks":
            raise NoSuchConsole(instance_uuid, console_type, "vSphere VMs have WebMKS only")
        if not is_uuid(instance_uuid):
            raise NoSuchInstance(instance_uuid, self.where)
        ticket = self._with_session(self._ticket, instance_uuid, ticket_type)
        if not ticket.ticket or not ticket.sslThumbprint:
            raise DriverError(f"{self.where}: the {ticket_type} ticket has no ticket or thumbprint")
        thumbprint = ticket.sslThumbprint.replace(":", "").lower()
        host = ticket.host or self.host
        port = ticket.port or DEFAULT_PORTS[ticket_type]
        if ticket_type == "mks":
            # nova's get_mks_console, key for key (jsonutils.dumps is json.dumps).
            fields = {"ticket": ticket.ticket, "cfgFile": ticket.cfgFile, "thumbprint": thumbprint}
        else:
            fields = {"ticket": ticket.ticket, "thumbprint": thumbprint, "direct": True}
        return (ConsoleEndpoint("webmks", host, port, None, json.dumps(fields)),)

    def _ticket(self, service: Any, instance_uuid: str, ticket_type: str) -> Any:
        search = service.content.searchIndex
        found = search.FindAllByUuid(uuid=instance_uuid, vmSearch=True, instanceUuid=True)
        if not found:
            raise NoSuchInstance(instance_uuid, self.where)
        try:
            return found[0].AcquireTicket(ticketType=ticket_type)
        except vim.fault.InvalidState:
            raise NoSuchConsole(instance_uuid, "webmks", "the VM is not powered on") from None
        except (vmodl.fault.MethodNotFound, vmodl.fault.NotSupported):
            reason = f"{self.where} gives no {ticket_type} tickets"
            raise NoSuchConsole(instance_uuid, "webmks", reason) from None

    def _with_session(self, call: Callable[..., Any], *args: Any) -> Any:
        for attempt in (1, 2):
            service = self._session()
            try:
                return call(service, *args)
            except vim.fault.NotAuthenticated:
                self._service = None
                if attempt == 2:
                    raise HypervisorUnreachable(self.where, "the session ends at once") from None
                log.info("{where}: session ended; logging in again", where=self.where)
            except _NETWORK_ERRORS as e:
                self._service = None
                raise HypervisorUnreachable(self.where, _describe(e)) from None
            except vmodl.MethodFault as e:
                raise DriverError(f"{self.where}: {e.msg or type(e).__name__}") from None
        raise AssertionError("unreachable")

    def _session(self) -> Any:
        if self._service is None:
            try:
                self._service = self._connect(**self._login)
            except vim.fault.InvalidLogin:
                raise HypervisorUnreachable(self.where, "the login was refused") from None
            except _NETWORK_ERRORS as e:
                raise HypervisorUnreachable(self.where, _describe(e)) from None
            except vmodl.MethodFault as e:
                raise HypervisorUnreachable(self.where, e.msg or type(e).__name__) from None
        return self._service

    def _log_out(self) -> None:
        service, self._service = self._service, None
        if service is not None:
            try:
                Disconnect(service)
            except (*_NETWORK_ERRORS, vmodl.MethodFault):
                pass  # the session lapses on its own


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__
