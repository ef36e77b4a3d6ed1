"""Drivers: where an instance's consoles are, asked of the hypervisor.

Used by the API and ``consoled-manage`` to mint tokens, never by the proxy
path (nothing under ``consoled/doors``, ``consoled/gate.py`` or
``consoled/sessions`` imports this package).  A driver answers
``consoles(instance_uuid, console_type)`` with a Deferred of the
:class:`ConsoleEndpoint` values a token row is made from: one for a
graphical console, every TCP serial port in the domain's order for
``serial``.  Every call to the hypervisor's library runs in the driver's own
small thread pool, never on the reactor thread (docs/drivers.md).

Errors are the three exceptions below (and their base), with messages fit for
an operator: the API maps them to 404, 409 and 503.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConsoleEndpoint:
    """What a token row for one console holds (``console_auth_tokens`` columns).

    ``port`` is None only for a SPICE server that listens with TLS alone.
    """

    console_type: str
    host: str
    port: int | None
    tls_port: int | None = None
    internal_access_path: str | None = None


class DriverError(Exception):
    """The hypervisor answered with something a driver cannot use."""


class NoSuchInstance(DriverError):
    """No domain or VM has this instance UUID (or it is not a UUID)."""

    def __init__(self, instance_uuid: str, where: str) -> None:
        super().__init__(f"no instance {instance_uuid!r} on {where}")
        self.instance_uuid = instance_uuid


class NoSuchConsole(DriverError):
    """The instance exists but has no console of this type that can be reached."""

    def __init__(self, instance_uuid: str, console_type: str, reason: str) -> None:
        super().__init__(f"instance {instance_uuid} has no {console_type} console: {reason}")
        self.instance_uuid, self.console_type, self.reason = instance_uuid, console_type, reason


class HypervisorUnreachable(DriverError):
    """The hypervisor (libvirt, vCenter) cannot be reached or refused the login."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where} is unreachable: {detail}")
        self.where, self.detail = where, detail


def is_uuid(text: str) -> bool:
    """True for a UUID in any of the forms ``uuid.UUID`` reads."""
    try:
        uuid.UUID(text)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


class DriverThreads:
    """A driver's own thread pool: blocking library calls run here.

    Its own pool rather than the reactor's: a hypervisor that hangs a call
    then holds the driver's threads only, never the reactor's (DNS look-ups
    and ``deferToThread`` users elsewhere).  Started at once; stopped by
    :meth:`stop` or at reactor shutdown, after the calls in flight.
    """

    def __init__(self, reactor: Any, name: str, size: int) -> None:
        self._reactor: IReactorFromThreads = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        self._pool.start()
        core: IReactorCore = reactor
        self._trigger = core.addSystemEventTrigger("during", "shutdown", self._pool.stop)

    def run(self, call: Callable[..., T], *args: Any) -> Deferred[T]:
        """``call(*args)`` in the pool; the Deferred fires on the reactor thread."""
        return deferToThreadPool(self._reactor, self._pool, call, *args)

    def stop(self) -> None:
        """Wait for calls in flight, then end the threads (blocks briefly)."""
        if self._trigger is not None:
            core: IReactorCore = self._reactor  # type: ignore[assignment]
            core.removeSystemEventTrigger(self._trigger)
            self._trigger = None
            self._pool.stop()
