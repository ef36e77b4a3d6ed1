"""The libvirt driver finds consoles through the real libvirt API.

libvirt's own test driver (``test:///ABS/PATH/node.xml``) serves domains
that each test writes into a node file; their graphics and ``<serial
type='tcp'>`` devices point at QEMU peers the test starts, and the test
connects to the console the driver found.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from consoled.drivers import ConsoleEndpoint, HypervisorUnreachable, NoSuchConsole, NoSuchInstance
from tests import peers

LIBVIRT_HINT = (
    "apt-get install -y --no-install-recommends libvirt-dev pkg-config; "
    ".venv/bin/pip install libvirt-python"
)
ROOT = Path(__file__).resolve().parent.parent


def domain(instance_uuid: str, name: str, devices: str) -> str:
    """One test-driver domain (running) holding the given device XML."""
    return (
        f"<domain type='test'><name>{name}</name><uuid>{instance_uuid}</uuid>"
        "<memory>65536</memory><os><type>hvm</type></os>"
        f"<devices>{devices}</devices></domain>"
    )


def serial_tcp(host: str, port: int, mode: str = "bind", element: str = "serial") -> str:
    return (
        f"<{element} type='tcp'><source mode='{mode}' host='{host}' service='{port}'/>"
        f"<protocol type='raw'/><target port='0'/></{element}>"
    )


class LibvirtDriverTests(unittest.TestCase):
    """Consoles read from live domain XML, then reached."""

    def setUp(self) -> None:
        available = importlib.util.find_spec("libvirt") is not None
        peers.require_peer(self, "libvirt-python", available, LIBVIRT_HINT)
        from consoled.drivers import libvirt as driver_module

        self.driver_module = driver_module
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)

    def node(self, *domains: str) -> str:
        """Write a node file holding domains; return its test:/// URI."""
        path = self.directory / f"node-{len(list(self.directory.iterdir()))}.xml"
        path.write_text("<node>" + "".join(domains) + "</node>")
        return f"test://{path}"

    def driver(self, uri: str, **options: Any) -> Any:
        from twisted.internet import reactor

        made = self.driver_module.LibvirtDriver(reactor, uri, **options)
        self.addCleanup(made.close)
        return made

    @defer.inlineCallbacks
    def test_vnc_port_reaches_qemu(self) -> Any:
        """novnc and xvpvnc give the VNC graphics' listen address and port; an RFB version arrives there."""
        vnc = yield peers.start_qemu_vnc(self)
        instance = str(uuid.uuid4())
        graphics = f"<graphics type='vnc' port='{vnc.port}' autoport='no' listen='{vnc.host}'/>"
        driver = self.driver(self.node(domain(instance, "vm1", graphics)), vnc_address="192.0.2.1")
        found = yield driver.consoles(instance, "novnc")
        self.assertEqual(found, (ConsoleEndpoint("novnc", vnc.host, vnc.port),))
        xvp = yield driver.consoles(instance, "xvpvnc")
        self.assertEqual(xvp, (ConsoleEndpoint("xvpvnc", vnc.host, vnc.port),))
        hello = yield peers.connect_and_read(found[0].host, found[0].port, b"\n")
        self.assertEqual(hello, b"RFB 003.008\n")

    @defer.inlineCallbacks
    def test_spice_every_address_is_the_compute_host(self) -> Any:
        """A SPICE <listen address='0.0.0.0'> becomes [spice] server_proxyclient_address; tlsPort is read; QEMU answers REDQ there."""
        spice = yield peers.start_qemu_spice(self)
        instance = str(uuid.uuid4())
        graphics = (
            f"<graphics type='spice' port='{spice.port}' tlsPort='5999' autoport='no'>"
            "<listen type='address' address='0.0.0.0'/></graphics>"
        )
        driver = self.driver(
            self.node(domain(instance, "vm1", graphics)),
            vnc_address="192.0.2.1",
            spice_address=spice.host,
        )
        found = yield driver.consoles(instance, "spice-html5")
        self.assertEqual(found, (ConsoleEndpoint("spice-html5", spice.host, spice.port, 5999),))
        reply = yield peers.tcp_exchange(
            found[0].host,
            found[0].port,
            peers.spice_link_message(),
            peers.spice_link_reply_complete,
        )
        self.assertEqual(reply[:4], peers.SPICE_MAGIC)

    @defer.inlineCallbacks
    def test_serial_ports_in_order(self) -> Any:
        """serial gives every bound TCP serial port in document order (connect-mode ones and the console copy left out); each is a live chardev."""
        first = yield peers.start_qemu_monitor(self)
        second = yield peers.start_qemu_monitor(self)
        instance = str(uuid.uuid4())
        devices = (
            serial_tcp(first.host, first.port)
            + serial_tcp("127.0.0.1", 4, mode="connect")
            + serial_tcp("0.0.0.0", second.port)
            + serial_tcp(first.host, first.port, element="console")
        )
        driver = self.driver(
            self.node(domain(instance, "vm1", devices)), serial_address=second.host
        )
        found = yield driver.consoles(instance, "serial")
        self.assertEqual(
            found,
            (
                ConsoleEndpoint("serial", first.host, first.port),
                ConsoleEndpoint("serial", second.host, second.port),
            ),
        )
        for endpoint in found:
            banner = yield peers.connect_and_read(endpoint.host, endpoint.port, b"(qemu) ")
            self.assertIn(b"QEMU", banner)

    @defer.inlineCallbacks
    def test_console_devices_when_no_serial(self) -> Any:
        """With no TCP <serial>, the <console type='tcp'> devices are the serial ports (nova's rule)."""
        instance = str(uuid.uuid4())
        devices = serial_tcp("127.0.0.1", 4001, element="console")
        driver = self.driver(self.node(domain(instance, "vm1", devices)))
        found = yield driver.consoles(instance, "serial")
        self.assertEqual(found, (ConsoleEndpoint("serial", "127.0.0.1", 4001),))

    @defer.inlineCallbacks
    def test_every_address_with_a_remote_uri_is_its_host(self) -> Any:
        """When the URI names a host, a wildcard listen address becomes that host, not the proxyclient option."""
        import libvirt

        instance = str(uuid.uuid4())
        devices = "<graphics type='vnc' port='5901' autoport='no' listen='::'/>" + serial_tcp(
            "0.0.0.0", 4002
        )
        local = self.node(domain(instance, "vm1", devices))
        driver = self.driver(
            "qemu+tcp://compute1.example/system",
            vnc_address="192.0.2.1",
            open_connection=lambda _uri: libvirt.open(local),
        )
        vnc = yield driver.consoles(instance, "novnc")
        serial = yield driver.consoles(instance, "serial")
        self.assertEqual(vnc, (ConsoleEndpoint("novnc", "compute1.example", 5901),))
        self.assertEqual(serial, (ConsoleEndpoint("serial", "compute1.example", 4002),))

    @defer.inlineCallbacks
    def test_no_such_instance(self) -> Any:
        """An unknown UUID, and text that is no UUID, fail with NoSuchInstance."""
        driver = self.driver(self.node(domain(str(uuid.uuid4()), "vm1", "")))
        for wrong in (str(uuid.uuid4()), "not-a-uuid"):
            with self.assertRaises(NoSuchInstance) as caught:
                yield driver.consoles(wrong, "novnc")
            self.assertIn(wrong, str(caught.exception))

    @defer.inlineCallbacks
    def test_no_such_console(self) -> Any:
        """Missing graphics, no serial port, no port assigned, a socket-only listen, webmks and a stopped domain: NoSuchConsole."""
        import libvirt

        bare, unassigned, socket_only, stopped = (str(uuid.uuid4()) for _ in range(4))
        uri = self.node(
            domain(bare, "bare", ""),
            domain(unassigned, "unassigned", "<graphics type='vnc' port='-1' autoport='yes'/>"),
            domain(
                socket_only,
                "socket",
                "<graphics type='vnc'><listen type='socket' socket='/run/vnc.sock'/></graphics>",
            ),
        )
        connection = libvirt.open(uri)  # the driver closes it
        # Defined but never started: inactive.
        connection.defineXML(domain(stopped, "stopped", "<graphics type='vnc' port='5905'/>"))
        driver = self.driver(uri, open_connection=lambda _uri: connection)
        cases = [
            (bare, "novnc", "no vnc graphics"),
            (bare, "spice-html5", "no spice graphics"),
            (bare, "serial", "no TCP serial port"),
            (bare, "webmks", "libvirt domains have none"),
            (unassigned, "novnc", "no port yet"),
            (socket_only, "novnc", "UNIX socket"),
            (stopped, "novnc", "not running"),
        ]
        for instance, console_type, reason in cases:
            with self.assertRaises(NoSuchConsole) as caught:
                yield driver.consoles(instance, console_type)
            self.assertIn(reason, str(caught.exception))
            self.assertEqual(caught.exception.console_type, console_type)

    @defer.inlineCallbacks
    def test_unreachable(self) -> Any:
        """A refused libvirtd and an unreadable node file fail with HypervisorUnreachable naming the URI."""
        refused = f"qemu+tcp://127.0.0.1:{peers.free_port()}/system"
        missing = f"test://{self.directory}/missing.xml"
        for uri in (refused, missing):
            driver = self.driver(uri)
            with self.assertRaises(HypervisorUnreachable) as caught:
                yield driver.consoles(str(uuid.uuid4()), "novnc")
            self.assertIn(uri, str(caught.exception))

    @defer.inlineCallbacks
    def test_off_the_reactor_thread_and_reconnects(self) -> Any:
        """libvirt is called off the reactor thread; a connection that fails (RPC error) is replaced once."""
        import libvirt

        instance = str(uuid.uuid4())
        uri = self.node(domain(instance, "vm1", serial_tcp("127.0.0.1", 4003)))
        threads: list[threading.Thread] = []
        opened: list[FailingOnce] = []

        def open_connection(_uri: str) -> Any:
            threads.append(threading.current_thread())
            opened.append(FailingOnce(libvirt.open(uri), fail=not opened))
            return opened[-1]

        driver = self.driver(uri, open_connection=open_connection)
        found = yield driver.consoles(instance, "serial")
        self.assertEqual(found, (ConsoleEndpoint("serial", "127.0.0.1", 4003),))
        self.assertEqual(len(opened), 2)
        self.assertTrue(opened[0].closed)
        self.assertNotIn(threading.main_thread(), threads)
        again = yield driver.consoles(instance, "serial")
        self.assertEqual(again, found)
        self.assertEqual(len(opened), 2, "a working connection is kept")

    def test_proxy_path_never_imports_drivers(self) -> None:
        """Nothing on the proxy path (gate, doors, sessions, backends) imports consoled.drivers."""
        paths = [ROOT / "consoled" / "gate.py"]
        for package in ("doors", "sessions", "backends"):
            paths += sorted((ROOT / "consoled" / package).rglob("*.py"))
        for path in paths:
            text = path.read_text()
            self.assertNotIn("consoled.drivers", text, os.fspath(path))
            self.assertNotIn("from consoled import drivers", text, os.fspath(path))

    @defer.inlineCallbacks
    def test_add_devices_to_the_persistent_definition(self) -> Any:
        """Serial devices added with defineXML are in the domain's inactive XML, in order."""
        instance = str(uuid.uuid4())
        driver = self.driver(self.node(domain(instance, "vm1", "")))
        devices = [serial_tcp("compute-1", 10000), serial_tcp("compute-1", 10001)]
        yield driver.add_devices(instance, devices)

        def inactive() -> str:
            import libvirt

            connection = driver._connected()
            xml: str = connection.lookupByUUIDString(instance).XMLDesc(
                libvirt.VIR_DOMAIN_XML_INACTIVE
            )
            return xml

        from xml.etree import ElementTree

        root = ElementTree.fromstring((yield driver._threads.run(inactive)))
        services = [s.get("service") for s in root.findall("./devices/serial/source")]
        self.assertEqual(services, ["10000", "10001"])
        with self.assertRaises(NoSuchInstance):
            yield driver.add_devices(str(uuid.uuid4()), devices)


class FailingOnce:
    """A libvirt connection whose first look-up fails as a dropped RPC connection does."""

    def __init__(self, connection: Any, fail: bool) -> None:
        self._connection, self._fail, self.closed = connection, fail, False

    def isAlive(self) -> int:
        return 0 if self.closed else 1

    def lookupByUUIDString(self, text: str) -> Any:
        import libvirt

        if self._fail:
            self._fail = False
            error = libvirt.libvirtError("client socket is closed")
            error.err = (
                libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, "client socket is closed",
                libvirt.VIR_ERR_ERROR, "", None, None, -1, -1,
            )  # fmt: skip
            raise error
        return self._connection.lookupByUUIDString(text)

    def close(self) -> int:
        self.closed = True
        return int(self._connection.close())
