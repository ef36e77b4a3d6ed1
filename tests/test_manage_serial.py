"""consoled-manage serial allocate/release/list and token create --next-free."""

from __future__ import annotations

import dataclasses
import io
import os
import xml.etree.ElementTree as ET
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from consoled.config import Settings
from consoled.manage import CommandError, build_parser, run
from consoled.manage_serial import NO_PORT_FREE_STATUS, SerialCommandError, serial_xml
from consoled.store import Store, schema
from consoled.store.engine import make_engine
from consoled.store.runner import InlineRunner
from consoled.tokens import hash_token
from tests import test_manage
from tests.databases import upgraded_engine
from tests.test_manage import INSTANCE, CommandBase
from tests.test_store import take_lease

OTHER = "1e2d3c4b-5a69-4788-9a0b-c1d2e3f4a5b6"


class SerialCommandTests(CommandBase):
    """The commands against a real SQLite store, in process."""

    def setUp(self) -> None:
        super().setUp()
        self.settings = dataclasses.replace(
            self.settings,
            serial_console=dataclasses.replace(
                self.settings.serial_console, port_range=(10000, 10003)
            ),
        )

    def allocate(self, count: int = 2, instance: str = INSTANCE) -> str:
        return self.manage(
            "serial", "allocate", "--host", "compute-1", "--instance", instance,
            "--count", str(count),
        )  # fmt: skip

    def refused(self, *argv: str) -> SerialCommandError:
        args = build_parser().parse_args(list(argv))
        failure = self.failureResultOf(run(args, self.settings, self.store, False, io.StringIO()))
        failure.trap(SerialCommandError)
        return failure.value

    def test_allocate_prints_ports_and_libvirt_xml(self) -> None:
        """allocate prints the ports, then one <serial type='tcp'> per port, as nova writes it."""
        out = self.allocate(2)
        first, _, xml = out.partition("\n\n")
        self.assertEqual(
            first, f"allocated 2 serial port(s) on compute-1 to instance {INSTANCE}: 10000 10001"
        )
        devices = ET.fromstring(f"<devices>{xml}</devices>")
        self.assertEqual(
            [
                (
                    d.get("type"),
                    d.find("source").attrib,
                    d.find("protocol").get("type"),
                    d.find("target").get("port"),
                )
                for d in devices
            ],
            [
                ("tcp", {"mode": "bind", "host": "compute-1", "service": "10000"}, "raw", "0"),
                ("tcp", {"mode": "bind", "host": "compute-1", "service": "10001"}, "raw", "1"),
            ],
        )

    def test_a_second_allocate_continues_the_target_numbering(self) -> None:
        """More ports for the same instance get the next target indexes."""
        self.allocate(1)
        self.allocate(1, instance=OTHER)
        out = self.allocate(1)
        self.assertIn("service='10002'", out)
        self.assertIn("<target port='1'/>", out)

    def test_xml_quotes_the_host(self) -> None:
        """A host with XML's special characters stays one attribute."""
        source = ET.fromstring(serial_xml("a'b&c", 10000, 0)).find("source")
        self.assertEqual(source.get("host"), "a'b&c")

    def test_exhausted(self) -> None:
        """A full range is one line naming the host and the range."""
        self.allocate(4)
        error = self.refused("serial", "allocate", "--host", "compute-1", "--instance", OTHER)
        self.assertIn("host compute-1", str(error))
        self.assertIn("port_range 10000:10003", str(error))
        self.assertEqual(error.status, 1)

    def test_list_and_release(self) -> None:
        """list shows every allocation (or one host's); release frees an instance's ports."""
        self.allocate(2)
        self.allocate(1, instance=OTHER)
        listing = self.manage("serial", "list").splitlines()
        self.assertEqual(len(listing), 4)
        self.assertEqual(listing[1].split()[:3], ["compute-1", "10000", INSTANCE])
        self.assertEqual(len(self.manage("serial", "list", "--host", "compute-2").splitlines()), 1)
        self.assertEqual(
            self.manage("serial", "release", "--instance", INSTANCE),
            f"released 2 serial port(s) of instance {INSTANCE}\n",
        )
        self.assertEqual(self.manage("serial", "list", "--instance", INSTANCE).count("\n"), 1)
        self.assertIn("10000 10001", self.allocate(2))

    def next_free(self, *extra: str) -> str:
        return self.manage(
            "token", "create", "--type", "serial", "--instance", INSTANCE, "--next-free", *extra
        ).strip()

    def port_of(self, url: str) -> int:
        info = self.successResultOf(self.store.find_token(hash_token(url.split("token=")[1])))
        return info.port

    def test_next_free_port(self) -> None:
        """--next-free gives a token for the first port of the instance nobody holds,
        and fails with status 3, naming each port's holder, when all are held."""
        self.allocate(2)
        self.assertEqual(self.port_of(self.next_free()), 10000)
        self.successResultOf(take_lease(self.store, "compute-1", 10000, "proxy-a", 30))
        self.assertEqual(self.port_of(self.next_free()), 10001)
        self.successResultOf(take_lease(self.store, "compute-1", 10001, "proxy-b", 30))
        error = self.refused(
            "token", "create", "--type", "serial", "--instance", INSTANCE, "--next-free"
        )
        self.assertEqual(error.status, NO_PORT_FREE_STATUS)
        self.assertIn("all 2 port(s)", str(error))
        self.assertIn("10001 since 2027-01-15T08:00:00Z (proxy proxy-b)", str(error))
        self.clock.advance(31)  # both leases lapse: their proxies died
        self.assertEqual(self.port_of(self.next_free()), 10000)

    def test_next_free_needs_allocated_ports_and_serial(self) -> None:
        """No allocation, another console type, or a --port: one clear line each."""
        error = self.refused(
            "token", "create", "--type", "serial", "--instance", INSTANCE, "--next-free"
        )
        self.assertIn("no allocated serial port", str(error))
        self.allocate(1)
        error = self.refused(
            "token", "create", "--type", "novnc", "--instance", INSTANCE, "--next-free"
        )
        self.assertEqual(error.status, 2)
        error = self.refused(
            "token", "create", "--type", "serial", "--instance", INSTANCE, "--next-free",
            "--port", "10000",
        )  # fmt: skip
        self.assertIn("leave --port out", str(error))

    def test_create_without_port_or_next_free(self) -> None:
        """token create with neither --host and --port nor --next-free is a usage error."""
        args = build_parser().parse_args(
            ["token", "create", "--type", "novnc", "--instance", INSTANCE]
        )
        failure = self.failureResultOf(run(args, self.settings, self.store, False, io.StringIO()))
        failure.trap(CommandError)
        self.assertEqual(failure.value.status, 2)

    def test_next_free_with_ports_on_two_hosts(self) -> None:
        """Ports on two hosts: --host picks one, without it the command says so."""
        self.allocate(1)
        self.manage("serial", "allocate", "--host", "compute-2", "--instance", INSTANCE)
        error = self.refused(
            "token", "create", "--type", "serial", "--instance", INSTANCE, "--next-free"
        )
        self.assertIn("name one with --host", str(error))
        url = self.next_free("--host", "compute-2")
        info = self.successResultOf(self.store.find_token(hash_token(url.split("token=")[1])))
        self.assertEqual((info.host, info.port), ("compute-2", 10000))


class SerialCommandLineTests(TestCase):
    """consoled-manage serial as a process, on a configuration file."""

    timeout = 60
    # CommandLineTests' helpers, without running its tests a second time.
    manage = test_manage.CommandLineTests.manage
    assertOneLineError = test_manage.CommandLineTests.assertOneLineError

    def config(self, connection: str) -> str:
        path = test_manage.CommandLineTests.config(self, connection)  # type: ignore[arg-type]
        with open(path, "a") as f:
            f.write("[serial_console]\nport_range = 10000:10001\n")
        return path

    @defer.inlineCallbacks
    def test_allocate_then_no_port_free(self) -> Any:
        """allocate prints XML; with every port held, --next-free exits 3 with one line."""
        database = os.path.abspath(self.mktemp())
        config = self.config(f"sqlite:///{database}")
        out, err, code = yield self.manage("--config-file", config, "db", "upgrade")
        self.assertEqual(code, 0, err)
        out, err, code = yield self.manage(
            "--config-file", config, "serial", "allocate", "--host", "compute-1",
            "--instance", INSTANCE, "--count", "2",
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIn("<source mode='bind' host='compute-1' service='10001'/>", out)
        engine = make_engine(f"sqlite:///{database}")
        self.addCleanup(engine.dispose)
        clock = Clock()
        clock.advance(4_000_000_000)  # the leases outlive the test
        store = Store(engine, InlineRunner(), clock)
        self.assertEqual(schema.current_revision(engine), schema.head_revision())
        for port in (10000, 10001):
            self.assertIsNone(
                self.successResultOf(take_lease(store, "compute-1", port, "a", 30))[1]
            )
        yield self.assertOneLineError(
            ["--config-file", config, "token", "create", "--type", "serial",
             "--instance", INSTANCE, "--next-free"],
            NO_PORT_FREE_STATUS,
            "no serial port free: all 2 port(s) of the instance on compute-1 are held",
        )  # fmt: skip
        yield self.assertOneLineError(
            ["--config-file", config, "serial", "allocate", "--host", "compute-1",
             "--instance", INSTANCE],
            1,
            "no free serial port on host compute-1 in [serial_console] port_range 10000:10001",
        )  # fmt: skip


class DefineTests(TestCase):
    """serial allocate --define: the devices go into the domain's definition on
    [libvirt] connection_uri (libvirt's test driver), or the new ports are given back."""

    def setUp(self) -> None:
        import importlib.util

        from tests.peers import require_peer

        available = importlib.util.find_spec("libvirt") is not None
        require_peer(self, "libvirt-python", available, "pip install libvirt-python")
        from tests.test_drivers_libvirt import domain

        node = os.path.abspath(self.mktemp()) + ".xml"
        with open(node, "w") as f:
            f.write("<node>" + domain(INSTANCE, "vm1", "") + "</node>")
        engine = upgraded_engine(self, "sqlite:///" + os.path.abspath(self.mktemp()) + ".sqlite")
        clock = Clock()
        clock.advance(1_800_000_000)
        self.store = Store(engine, InlineRunner(), clock)
        base = Settings()
        self.settings = dataclasses.replace(
            base, libvirt=dataclasses.replace(base.libvirt, connection_uri=f"test://{node}")
        )

    def allocate(self, instance: str) -> defer.Deferred[Any]:
        argv = ["serial", "allocate", "--host", "compute-1", "--instance", instance, "--define"]
        return run(build_parser().parse_args(argv), self.settings, self.store, False, io.StringIO())

    @defer.inlineCallbacks
    def test_defined(self) -> Any:
        yield self.allocate(INSTANCE)
        rows = yield self.store.serial_ports(instance_uuid=INSTANCE)
        self.assertEqual([row.port for row in rows], [10000])

    @defer.inlineCallbacks
    def test_unknown_domain_gives_the_ports_back(self) -> Any:
        yield self.allocate(INSTANCE)  # one port the instance keeps
        error = yield self.assertFailure(self.allocate(OTHER), SerialCommandError)
        self.assertIn("given back", str(error))
        self.assertEqual((yield self.store.serial_ports(instance_uuid=OTHER)), [])
        self.assertEqual(len((yield self.store.serial_ports(instance_uuid=INSTANCE))), 1)
