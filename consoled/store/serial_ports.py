"""Serial ports: the persistent allocator, and the next port no user holds.

The allocator hands out ports of ``[serial_console] port_range`` per compute
host and records each in ``consoled_serial_ports``: a recorded port is never
tested or handed out again until its instance releases it.  A port is claimed
by inserting its row, one row per transaction, so the primary key on
(host, port) lets exactly one of two racing allocators (threads, processes,
proxies of one cell) have it; the loser moves on to the next port.

"Tested free" is the database by default: consoled cannot look at the compute
host's sockets from the proxy.  An optional probe (:func:`tcp_probe`, a
non-blocking TCP connect from the reactor) runs only after the claim, so no
port is ever tested by two allocators, and a port it finds answering (or
silent) is given back and skipped for this call, not recorded.

The next free port (nova bug 1425640) reads the serial leases every proxy of
the cell takes (``consoled_serial_leases``, store/sessions.py): the first of
an instance's ports without a live lease; a lapsed lease counts as free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

from consoled.store.runner import StorePart
from consoled.store.tables import serial_leases as leases_table
from consoled.store.tables import serial_ports as ports_table

#: ``probe(host, port)`` fires True when the port is free (the connection refused).
Probe = Callable[[str, int], "defer.Deferred[bool]"]

#: Ports a probe may find in use in one allocation before it gives up: a
#: range that others use too is a configuration error, not something to scan.
MAX_PORTS_IN_USE = 16


@dataclass(frozen=True, slots=True)
class SerialPort:
    """One allocation: ``port`` on ``host`` belongs to ``instance_uuid``."""

    host: str
    port: int
    instance_uuid: str
    allocated_at: float


@dataclass(frozen=True, slots=True)
class PortHolder:
    """Who holds a serial port: its writer's lease."""

    port: int
    acquired_at: float
    proxy: str
    session_id: int


class SerialPortsExhausted(Exception):
    """Every port of the range on this host is allocated (or found in use)."""

    def __init__(self, host: str, port_range: tuple[int, int], wanted: int, found: int) -> None:
        self.host = host
        self.port_range = port_range
        self.wanted = wanted
        self.found = found
        low, high = port_range
        super().__init__(
            f"no free serial port on host {host} in [serial_console] port_range "
            f"{low}:{high} ({high - low + 1} ports): {wanted} wanted, {found} found; "
            "release the ports of deleted instances (consoled-manage serial release) "
            "or widen the range"
        )


class SerialPortsInUse(Exception):
    """The probe found too many unrecorded ports answering: the range is shared."""

    def __init__(self, host: str, ports: Sequence[int]) -> None:
        self.host = host
        self.ports = list(ports)
        super().__init__(
            f"{len(self.ports)} serial ports on host {host} answer although consoled "
            f"never allocated them ({', '.join(map(str, self.ports))}): something else "
            "uses [serial_console] port_range there; give consoled a range of its own"
        )


class NoSerialPortFree(Exception):
    """Every serial port of the instance has a writer (nova bug 1425640)."""

    def __init__(self, host: str, holders: Sequence[PortHolder]) -> None:
        self.host = host
        self.holders = list(holders)
        held = "; ".join(
            f"{h.port} since {_iso(h.acquired_at)} (proxy {h.proxy})" for h in self.holders
        )
        super().__init__(
            f"no serial port free: all {len(self.holders)} port(s) of the instance on "
            f"{host} are held: {held}"
        )


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _claim(
    engine: sa.Engine,
    host: str,
    instance_uuid: str,
    port_range: tuple[int, int],
    now: float,
    skip: frozenset[int],
) -> int | None:
    """Record the lowest unrecorded port of the range for the instance (on a
    database thread); None when there is none.  Each try is its own
    transaction: the primary key decides a race, the loser tries the next."""
    low, high = port_range
    with engine.connect() as connection:
        recorded = set(
            connection.execute(
                sa.select(ports_table.c.port).where(
                    ports_table.c.host == host, ports_table.c.port.between(low, high)
                )
            ).scalars()
        )
    row = {"host": host, "instance_uuid": instance_uuid, "allocated_at": now}
    for port in range(low, high + 1):
        if port in recorded or port in skip:
            continue
        for attempt in range(3):
            try:
                with engine.begin() as connection:
                    connection.execute(ports_table.insert(), {**row, "port": port})
                return port
            except sa.exc.IntegrityError:
                break  # another allocator has it
            except sa.exc.OperationalError:
                # A deadlock or lock timeout between two inserts (MariaDB):
                # taken if the row is there now, else try the same port again.
                if _recorded(engine, host, port):
                    break
                if attempt == 2:
                    raise
    return None


def _recorded(engine: sa.Engine, host: str, port: int) -> bool:
    with engine.connect() as connection:
        query = sa.select(ports_table.c.port).where(
            ports_table.c.host == host, ports_table.c.port == port
        )
        return connection.execute(query).first() is not None


def _unrecord(host: str, instance_uuid: str, ports: Sequence[int]) -> Any:
    statement = ports_table.delete().where(
        ports_table.c.host == host,
        ports_table.c.instance_uuid == instance_uuid,
        ports_table.c.port.in_(list(ports)),
    )
    return lambda connection: connection.execute(statement).rowcount


class SerialPortRows(StorePart):
    """Methods over ``consoled_serial_ports`` (and, read only, the serial leases)."""

    @defer.inlineCallbacks
    def allocate_serial_ports(
        self,
        *,
        host: str,
        instance_uuid: str,
        count: int,
        port_range: tuple[int, int],
        probe: Probe | None = None,
    ) -> Any:
        """Give ``count`` ports of ``port_range`` on ``host`` to the instance.

        Fires with the ports, lowest first, or fails with
        :class:`SerialPortsExhausted` (nothing is kept: the ports this call
        recorded are given back) or :class:`SerialPortsInUse`.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        taken: list[int] = []
        in_use: list[int] = []
        try:
            while len(taken) < count:
                port = yield self._runner.run(
                    _claim,
                    self.engine,
                    host,
                    instance_uuid,
                    port_range,
                    self._now(),
                    frozenset(in_use),
                )
                if port is None:
                    raise SerialPortsExhausted(host, port_range, count, len(taken))
                if probe is not None and not (yield probe(host, port)):
                    yield self._run(_unrecord(host, instance_uuid, [port]))
                    in_use.append(port)
                    if len(in_use) >= MAX_PORTS_IN_USE:
                        raise SerialPortsInUse(host, in_use)
                    continue
                taken.append(port)
        except BaseException:
            if taken:
                yield self._run(_unrecord(host, instance_uuid, taken))
            raise
        return taken

    def release_serial_ports(
        self, instance_uuid: str, host: str | None = None, ports: Sequence[int] | None = None
    ) -> defer.Deferred[int]:
        """Give back every port of the instance (on ``host`` only, if named; only
        ``ports``, if given): how many."""
        statement = ports_table.delete().where(ports_table.c.instance_uuid == instance_uuid)
        if host is not None:
            statement = statement.where(ports_table.c.host == host)
        if ports is not None:
            statement = statement.where(ports_table.c.port.in_(list(ports)))
        return self._run(lambda connection: connection.execute(statement).rowcount)

    def serial_ports(
        self, *, instance_uuid: str | None = None, host: str | None = None
    ) -> defer.Deferred[list[SerialPort]]:
        """The allocations, by host, then in the order they were made."""
        query = sa.select(ports_table).order_by(
            ports_table.c.host, ports_table.c.allocated_at, ports_table.c.port
        )
        if instance_uuid is not None:
            query = query.where(ports_table.c.instance_uuid == instance_uuid)
        if host is not None:
            query = query.where(ports_table.c.host == host)

        def select(connection: sa.Connection) -> list[SerialPort]:
            return [SerialPort(**row._asdict()) for row in connection.execute(query)]

        return self._run(select)

    def next_free_serial_port(self, host: str, ports: Sequence[int]) -> defer.Deferred[int]:
        """The first of ``ports`` (an instance's serial ports on ``host``, in
        order) that no user holds, by the leases of every proxy of the cell;
        a lapsed lease is free.  Fails with :class:`NoSerialPortFree`."""
        if not ports:
            return defer.fail(NoSerialPortFree(host, []))
        now = self._now()
        query = sa.select(
            leases_table.c.port,
            leases_table.c.acquired_at,
            leases_table.c.proxy,
            leases_table.c.session_id,
        ).where(
            leases_table.c.host == host,
            leases_table.c.port.in_(list(ports)),
            # A lease is lapsed once expires_at < now (store/sessions.py takes it over).
            leases_table.c.expires_at >= now,
        )

        def first_free(connection: sa.Connection) -> int:
            held = {row.port: PortHolder(**row._asdict()) for row in connection.execute(query)}
            for port in ports:
                if port not in held:
                    return port
            raise NoSerialPortFree(host, [held[port] for port in ports])

        return self._read(first_free)


class _Hangup(protocol.Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


def tcp_probe(reactor: Any, timeout: float = 2.0) -> Probe:
    """A probe that calls a port free only when a TCP connect to it is refused.

    The connect is non-blocking, from the reactor.  A connection that opens
    (something listens: another instance's chardev) is closed at once and
    means in use; a timeout or any other error means unknown, so in use too.
    """

    def probe(host: str, port: int) -> defer.Deferred[bool]:
        kind = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = kind(reactor, host, port, timeout=timeout)
        d = endpoint.connect(protocol.Factory.forProtocol(_Hangup))

        def refused(failure: Any) -> bool:
            return failure.check(error.ConnectionRefusedError) is not None

        return d.addCallbacks(lambda _: False, refused)

    return probe
