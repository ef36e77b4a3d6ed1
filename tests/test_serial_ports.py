"""The serial port allocator and the next free port, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.store import Store
from consoled.store.engine import make_engine
from consoled.store.runner import InlineRunner
from consoled.store.serial_ports import (
    MAX_PORTS_IN_USE,
    NoSerialPortFree,
    SerialPortsExhausted,
    SerialPortsInUse,
    tcp_probe,
)
from consoled.store.tables import serial_ports
from tests.databases import fresh_database, upgraded_engine
from tests.test_store import NOW, take_lease

INSTANCE = "9b2c4f0e-3d1a-4c5b-8e7f-0a1b2c3d4e5f"
OTHER = "1e2d3c4b-5a69-4788-9a0b-c1d2e3f4a5b6"
RANGE = (10000, 10009)


class FakeProbe:
    """A probe that records what it tested and calls ports in ``in_use`` busy."""

    def __init__(self, in_use: set[int] | None = None, everything: bool = False) -> None:
        self.tested: list[tuple[str, int]] = []
        self.in_use = in_use or set()
        self.everything = everything

    def __call__(self, host: str, port: int) -> defer.Deferred[bool]:
        self.tested.append((host, port))
        return defer.succeed(not self.everything and port not in self.in_use)


class SerialPortTestsMixin:
    """One body of allocator tests; a subclass per backend sets ``backend``."""

    backend: str

    def setUp(self: Any) -> None:
        self.url = fresh_database(self, self.backend)
        self.engine = upgraded_engine(self, self.url)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = Store(self.engine, InlineRunner(), self.clock)

    def allocate(self: Any, count: int = 1, **overrides: Any) -> list[int]:
        values: dict[str, Any] = dict(
            host="compute-1", instance_uuid=INSTANCE, count=count, port_range=RANGE
        )
        values.update(overrides)
        return self.successResultOf(self.store.allocate_serial_ports(**values))

    def refused(self: Any, error: type[Exception], count: int = 1, **overrides: Any) -> Any:
        values: dict[str, Any] = dict(
            host="compute-1", instance_uuid=INSTANCE, count=count, port_range=RANGE
        )
        values.update(overrides)
        failure = self.failureResultOf(self.store.allocate_serial_ports(**values))
        failure.trap(error)
        return failure.value

    def recorded(self: Any) -> list[tuple[str, int, str, float]]:
        query = sa.select(serial_ports).order_by(serial_ports.c.host, serial_ports.c.port)
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]

    # -- the allocator ------------------------------------------------------

    def test_lowest_ports_first_and_recorded(self: Any) -> None:
        """Ports come lowest first and each is a row: host, port, instance, when."""
        self.assertEqual(self.allocate(3), [10000, 10001, 10002])
        self.clock.advance(7)
        self.assertEqual(self.allocate(1, instance_uuid=OTHER), [10003])
        self.assertEqual(
            self.recorded(),
            [
                ("compute-1", 10000, INSTANCE, NOW),
                ("compute-1", 10001, INSTANCE, NOW),
                ("compute-1", 10002, INSTANCE, NOW),
                ("compute-1", 10003, OTHER, NOW + 7),
            ],
        )

    def test_ports_are_per_host(self: Any) -> None:
        """Another compute host has the whole range to itself."""
        self.allocate(2)
        self.assertEqual(self.allocate(2, host="compute-2", instance_uuid=OTHER), [10000, 10001])

    def test_persists_across_stores(self: Any) -> None:
        """A store opened later on the same database sees the allocations and skips them."""
        self.allocate(2)
        engine = make_engine(self.url)
        self.addCleanup(engine.dispose)
        later = Store(engine, InlineRunner(), self.clock)
        self.assertEqual(
            [(p.host, p.port, p.instance_uuid) for p in self.successResultOf(later.serial_ports())],
            [("compute-1", 10000, INSTANCE), ("compute-1", 10001, INSTANCE)],
        )
        ports = self.successResultOf(
            later.allocate_serial_ports(
                host="compute-1", instance_uuid=OTHER, count=1, port_range=RANGE
            )
        )
        self.assertEqual(ports, [10002])

    def test_a_port_handed_out_is_never_tested_again(self: Any) -> None:
        """The probe tests a port once, after its claim; allocated ports are never tested."""
        probe = FakeProbe()
        self.allocate(2, probe=probe)
        self.allocate(1, instance_uuid=OTHER, probe=probe)
        self.assertEqual([port for _, port in probe.tested], [10000, 10001, 10002])

    def test_a_port_found_in_use_is_skipped_not_recorded(self: Any) -> None:
        """A port the probe finds answering is given back and skipped; it may be tested
        again by a later allocation (it was never handed out)."""
        probe = FakeProbe(in_use={10000})
        self.assertEqual(self.allocate(1, probe=probe), [10001])
        self.assertEqual([port for _, port, *_ in self.recorded()], [10001])
        probe.in_use.clear()
        self.assertEqual(self.allocate(1, instance_uuid=OTHER, probe=probe), [10000])
        self.assertEqual([port for _, port in probe.tested], [10000, 10001, 10000])

    def test_a_shared_range_is_an_error(self: Any) -> None:
        """A probe finding port after port in use stops with an error naming the host."""
        error = self.refused(
            SerialPortsInUse, port_range=(10000, 10099), probe=FakeProbe(everything=True)
        )
        self.assertEqual(len(error.ports), MAX_PORTS_IN_USE)
        self.assertIn("compute-1", str(error))
        self.assertEqual(self.recorded(), [])

    def test_exhausted(self: Any) -> None:
        """A full range is a clear error naming the host and the range."""
        self.allocate(2, port_range=(10000, 10001))
        error = self.refused(SerialPortsExhausted, instance_uuid=OTHER, port_range=(10000, 10001))
        self.assertIn("host compute-1", str(error))
        self.assertIn("port_range 10000:10001 (2 ports)", str(error))

    def test_exhausted_midway_keeps_nothing(self: Any) -> None:
        """Asking for more ports than are left records none of them."""
        self.allocate(2, port_range=(10000, 10002))
        error = self.refused(
            SerialPortsExhausted, 2, instance_uuid=OTHER, port_range=(10000, 10002)
        )
        self.assertEqual((error.wanted, error.found), (2, 1))
        self.assertEqual([row[2] for row in self.recorded()], [INSTANCE, INSTANCE])

    def test_release(self: Any) -> None:
        """Releasing an instance frees its ports (on every host) and nobody else's."""
        self.allocate(2)
        self.allocate(1, host="compute-2")
        self.allocate(1, instance_uuid=OTHER)
        self.assertEqual(self.successResultOf(self.store.release_serial_ports(INSTANCE)), 3)
        self.assertEqual(self.recorded(), [("compute-1", 10002, OTHER, NOW)])
        self.assertEqual(self.allocate(2), [10000, 10001])
        released = self.store.release_serial_ports(INSTANCE, host="compute-2")
        self.assertEqual(self.successResultOf(released), 0)

    def test_listing(self: Any) -> None:
        """serial_ports lists by instance and by host, each host's in allocation order."""
        self.allocate(1, port_range=(10005, 10009))
        self.clock.advance(1)
        self.allocate(1)
        self.allocate(1, host="compute-2", instance_uuid=OTHER)
        mine = self.successResultOf(self.store.serial_ports(instance_uuid=INSTANCE))
        self.assertEqual([p.port for p in mine], [10005, 10000])
        hosts = self.successResultOf(self.store.serial_ports(host="compute-2"))
        self.assertEqual([(p.port, p.instance_uuid) for p in hosts], [(10000, OTHER)])

    def race(self: Any, port_range: tuple[int, int]) -> list[Any]:
        """Eight threads, each with its own engine's connections, allocating one port at once."""
        results: list[Any] = []
        barrier = threading.Barrier(8)
        engine = make_engine(self.url, pool_size=8)
        self.addCleanup(engine.dispose)
        racer = Store(engine, InlineRunner(), self.clock)

        def allocate(i: int) -> None:
            barrier.wait()
            d = racer.allocate_serial_ports(
                host="compute-1",
                instance_uuid=f"{i:08d}-0000-4000-8000-000000000000",
                count=1,
                port_range=port_range,
            )
            d.addCallbacks(results.append, lambda f: results.append(f.value))

        threads = [threading.Thread(target=allocate, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(len(results), 8, results)
        return results

    def test_racing_allocators_never_share_a_port(self: Any) -> None:
        """Eight allocators racing on one host get eight different ports."""
        results = self.race(RANGE)
        ports = [r[0] for r in results if isinstance(r, list)]
        self.assertEqual(sorted(ports), list(range(10000, 10008)), results)
        self.assertEqual(len(self.recorded()), 8)

    def test_racing_for_too_few_ports(self: Any) -> None:
        """Eight allocators racing for four ports: four get one each, four are told it is full."""
        results = self.race((10000, 10003))
        ports = sorted(r[0] for r in results if isinstance(r, list))
        errors = [r for r in results if isinstance(r, SerialPortsExhausted)]
        self.assertEqual((ports, len(errors)), ([10000, 10001, 10002, 10003], 4), results)
        self.assertEqual(len({row[2] for row in self.recorded()}), 4)

    # -- the next free port ---------------------------------------------------

    def next_free(self: Any, ports: list[int], host: str = "compute-1") -> Any:
        return self.store.next_free_serial_port(host, ports)

    def test_next_free_with_no_leases_is_the_first(self: Any) -> None:
        """Nobody connected: the instance's first port."""
        self.assertEqual(self.successResultOf(self.next_free([10004, 10002])), 10004)

    def test_next_free_skips_held_ports(self: Any) -> None:
        """A port a writer holds through any proxy is skipped; another host's lease is not."""
        self.successResultOf(take_lease(self.store, "compute-1", 10004, "proxy-a", 30))
        self.successResultOf(take_lease(self.store, "compute-2", 10002, "proxy-b", 30))
        self.assertEqual(self.successResultOf(self.next_free([10004, 10002])), 10002)

    def test_no_port_free_says_since_when_and_by_whom(self: Any) -> None:
        """Every port held: the error carries how many, and each one's holder and since when."""
        self.successResultOf(take_lease(self.store, "compute-1", 10002, "proxy-a", 30))
        self.clock.advance(5)
        self.successResultOf(take_lease(self.store, "compute-1", 10004, "proxy-b", 30))
        failure = self.failureResultOf(self.next_free([10004, 10002]))
        failure.trap(NoSerialPortFree)
        error = failure.value
        self.assertEqual(
            [(h.port, h.acquired_at, h.proxy) for h in error.holders],
            [(10004, NOW + 5, "proxy-b"), (10002, NOW, "proxy-a")],
        )
        self.assertIn("all 2 port(s)", str(error))
        self.assertIn("10004 since 2027-01-15T08:00:05Z (proxy proxy-b)", str(error))

    def test_a_lapsed_lease_is_free(self: Any) -> None:
        """A lease its proxy stopped renewing counts as free once it lapses."""
        self.successResultOf(take_lease(self.store, "compute-1", 10000, "dead-proxy", 30))
        self.clock.advance(30)
        self.failureResultOf(self.next_free([10000])).trap(NoSerialPortFree)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.next_free([10000])), 10000)

    def test_no_ports_no_port_free(self: Any) -> None:
        """An instance without serial ports has no free one either."""
        self.failureResultOf(self.next_free([])).trap(NoSerialPortFree)


class SQLiteSerialPortTests(SerialPortTestsMixin, SynchronousTestCase):
    backend = "sqlite"


class PostgreSQLSerialPortTests(SerialPortTestsMixin, SynchronousTestCase):
    backend = "postgresql"


class MariaDBSerialPortTests(SerialPortTestsMixin, SynchronousTestCase):
    backend = "mariadb"


class ListeningProtocol(Protocol):
    pass


class TCPProbeTests(TestCase):
    """The optional probe over real sockets: only a refused connect means free."""

    @defer.inlineCallbacks
    def test_listening_port_is_in_use(self) -> Any:
        """A port something listens on is in use; the probe's connection is closed."""
        port = reactor.listenTCP(0, Factory.forProtocol(ListeningProtocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        free = yield tcp_probe(reactor)("127.0.0.1", port.getHost().port)
        self.assertFalse(free)

    @defer.inlineCallbacks
    def test_refused_port_is_free(self) -> Any:
        """A port nothing listens on refuses the connect: free."""
        port = reactor.listenTCP(0, Factory.forProtocol(ListeningProtocol), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        free = yield tcp_probe(reactor)("127.0.0.1", number)
        self.assertTrue(free)
