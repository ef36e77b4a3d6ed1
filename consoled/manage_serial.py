"""``consoled-manage serial``: the persistent serial port allocator, by hand.

    consoled-manage serial allocate --host H --instance UUID [--count N] [--probe]
    consoled-manage serial release --instance UUID [--host H]
    consoled-manage serial list [--host H] [--instance UUID]

``allocate`` prints the ports, then the ``<serial type='tcp'>`` devices to add
to the instance's libvirt domain, as nova's libvirt driver writes them
(``LibvirtConfigGuestSerial``: bind on the host, service the port, target
port the device's index), with the ``<protocol type='raw'/>`` libvirt fills
in.  And :func:`next_free_token` is ``token create --type serial --next-free``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any
from xml.sax.saxutils import escape

from twisted.internet import defer

from consoled.config import Settings
from consoled.store import Store
from consoled.store.serial_ports import (
    NoSerialPortFree,
    SerialPortsExhausted,
    SerialPortsInUse,
    tcp_probe,
)

#: ``token create --next-free`` when every port of the instance has a writer.
NO_PORT_FREE_STATUS = 3


class SerialCommandError(Exception):
    """A serial command's failure: one line, and the exit status.

    Its own class, not consoled.manage's CommandError: under ``python -m
    consoled.manage`` that module is ``__main__`` and importing it again
    here would make a second, different CommandError.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def add_serial_parser(area: Any, uuid_type: Any) -> None:
    """The ``serial`` area of consoled-manage's command line."""
    serial = area.add_parser("serial", help="serial port allocations").add_subparsers(
        dest="command", required=True
    )
    allocate = serial.add_parser(
        "allocate",
        help="give an instance ports of [serial_console] port_range on a compute host; "
        "prints them and their libvirt <serial> devices",
    )
    allocate.add_argument("--host", required=True, help="the compute host (the chardev's address)")
    allocate.add_argument("--instance", required=True, type=uuid_type)
    allocate.add_argument("--count", type=_count, default=1, help="ports to allocate (default 1)")
    allocate.add_argument(
        "--probe",
        action="store_true",
        help="also test each new port with a TCP connect that must be refused",
    )
    allocate.add_argument(
        "--define",
        action="store_true",
        help="also add the devices to the domain's persistent definition on "
        "[libvirt] connection_uri (the ports are given back if that fails)",
    )
    release = serial.add_parser("release", help="give back an instance's ports")
    release.add_argument("--instance", required=True, type=uuid_type)
    release.add_argument("--host", help="only the ports on this compute host")
    listing = serial.add_parser("list", help="the allocations")
    listing.add_argument("--host")
    listing.add_argument("--instance", type=uuid_type)


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ports from 1 to 64")
    return int(text)


def serial_xml(host: str, port: int, index: int) -> str:
    """One serial device as nova's libvirt driver writes it (plus libvirt's raw protocol)."""
    quoted = escape(host, {"'": "&apos;", '"': "&quot;"})
    return (
        "<serial type='tcp'>\n"
        f"  <source mode='bind' host='{quoted}' service='{port}'/>\n"
        "  <protocol type='raw'/>\n"
        f"  <target port='{index}'/>\n"
        "</serial>\n"
    )


@defer.inlineCallbacks
def _define(
    args: argparse.Namespace,
    settings: Settings,
    store: Store,
    devices: list[str],
    ports: list[int],
    reactor: Any,
) -> Any:
    """The devices into the domain's definition; on failure the new ports are given back."""
    from consoled.drivers import DriverError

    if reactor is None:
        from twisted.internet import reactor
    try:
        from consoled.drivers.libvirt import LibvirtDriver
    except ImportError:
        yield _give_back(args, store, ports)
        raise SerialCommandError("--define needs libvirt-python (pip install libvirt-python)")
    driver = LibvirtDriver.from_settings(settings, reactor)
    try:
        yield driver.add_devices(args.instance, devices)
    except DriverError as error:
        yield _give_back(args, store, ports)
        raise SerialCommandError(f"{error}; the new ports were given back")
    finally:
        yield driver.close()


def _give_back(args: argparse.Namespace, store: Store, ports: list[int]) -> Any:
    """Only this call's ports: those the instance held before stay allocated."""
    return store.release_serial_ports(args.instance, host=args.host, ports=ports)


@defer.inlineCallbacks
def run_serial(
    args: argparse.Namespace, settings: Settings, store: Store, out: Any, reactor: Any = None
) -> Any:
    """Carry out one ``serial`` command against an open, current store."""
    if args.command == "allocate":
        probe = None
        if args.probe:
            if reactor is None:
                from twisted.internet import reactor
            probe = tcp_probe(reactor)
        try:
            ports = yield store.allocate_serial_ports(
                host=args.host,
                instance_uuid=args.instance,
                count=args.count,
                port_range=settings.serial_console.port_range,
                probe=probe,
            )
        except (SerialPortsExhausted, SerialPortsInUse) as error:
            raise SerialCommandError(str(error))
        # The target index is the port's place among all the instance's
        # ports on the host, so a second allocate continues the numbering.
        every = yield store.serial_ports(instance_uuid=args.instance, host=args.host)
        index = {p.port: i for i, p in enumerate(every)}
        out.write(
            f"allocated {len(ports)} serial port(s) on {args.host} to instance {args.instance}: "
            f"{' '.join(map(str, ports))}\n\n"
        )
        devices = [serial_xml(args.host, port, index[port]) for port in ports]
        for device in devices:
            out.write(device)
        if args.define:
            yield _define(args, settings, store, devices, ports, reactor)
            out.write(
                f"\nadded to the persistent definition on {settings.libvirt.connection_uri}\n"
            )
    elif args.command == "release":
        count = yield store.release_serial_ports(args.instance, host=args.host)
        out.write(f"released {count} serial port(s) of instance {args.instance}\n")
    elif args.command == "list":
        rows = yield store.serial_ports(instance_uuid=args.instance, host=args.host)
        out.write(f"{'HOST':<24}  {'PORT':>5}  {'INSTANCE':<36}  ALLOCATED\n")
        for row in rows:
            allocated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.allocated_at))
            out.write(f"{row.host:<24}  {row.port:>5}  {row.instance_uuid:<36}  {allocated}\n")


@defer.inlineCallbacks
def next_free_token(args: argparse.Namespace, settings: Settings, store: Store) -> Any:
    """``token create --type serial --next-free``: a token for the first of the
    instance's allocated ports that no user holds (nova bug 1425640)."""
    if args.console_type != "serial":
        raise SerialCommandError("--next-free is for serial consoles: use --type serial", 2)
    if args.port is not None:
        raise SerialCommandError("--next-free chooses the port: leave --port out", 2)
    allocated = yield store.serial_ports(instance_uuid=args.instance, host=args.host)
    by_host = {
        host: [p.port for p in ports]
        for host, ports in itertools.groupby(allocated, key=lambda p: p.host)
    }
    if not by_host:
        where = f" on {args.host}" if args.host else ""
        raise SerialCommandError(
            f"instance {args.instance} has no allocated serial port{where} "
            "(consoled-manage serial allocate)"
        )
    if len(by_host) > 1:
        raise SerialCommandError(
            f"instance {args.instance} has serial ports on {len(by_host)} hosts "
            f"({', '.join(sorted(by_host))}): name one with --host",
            2,
        )
    ((host, ports),) = by_host.items()
    try:
        port = yield store.next_free_serial_port(host, ports)
    except NoSerialPortFree as error:
        raise SerialCommandError(str(error), NO_PORT_FREE_STATUS)
    issued = yield store.authorize(
        console_type="serial",
        host=host,
        port=port,
        instance_uuid=args.instance,
        access_url_base=settings.access_url_base("serial"),
        ttl=args.ttl or settings.token_ttl("serial"),
    )
    return issued
