"""nova's ``os-getConsoleOutput`` from the capped serial console logs consoled records.

Where an instance's log is: consoled records serial sessions per console
``host:port`` (consoled/sessions/recording.py, ``[consoled] record_dir``), so the
instance is mapped to its serial ports, in this order:

1. the allocator's ports for the instance (``consoled_serial_ports``, in the
   order they were allocated: the first is the guest's ``serial0``);
2. the ports of the instance's serial sessions, newest first (ports nova or an
   operator chose, not the allocator), leaving out any port the allocator now
   gives to another instance (a port reused must not show another guest's output).

The first of those with a log file is the console log (nova's libvirt driver
likewise reads the first console).  Tokens are not used: they expire and are
cleaned away, while allocations and session rows stay.

Files are read off the reactor thread, newest first (``X.log``, then the
rotated ``X.log.1``, ``X.log.2``, …), at most :data:`MAX_CONSOLE_BYTES` from
the end (nova's libvirt driver caps its answer the same way).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, threads

from consoled.sessions.recording import _UNSAFE

#: The most bytes of log read for one answer (nova's libvirt MAX_CONSOLE_BYTES).
MAX_CONSOLE_BYTES = 100 * 1024


class NoConsoleLog(Exception):
    """The instance has no console log here (no port, no record_dir, no file)."""


def log_path(directory: str, host: str, port: int) -> str:
    """The file Recorder writes for a console port (the same name it builds)."""
    return os.path.join(directory, _UNSAFE.sub("_", f"{host}_{port}") + ".log")


def read_tail(path: str, cap: int = MAX_CONSOLE_BYTES) -> bytes | None:
    """The last ``cap`` bytes of a rotated log (current file, then .1, .2, …), or None.

    Blocking: call it off the reactor thread.
    """
    chunks: list[bytes] = []
    remaining = cap
    names = [path] + [f"{path}.{i}" for i in range(1, 1000)]
    found = False
    complete = True
    for i, name in enumerate(names):
        try:
            f = open(name, "rb")
        except FileNotFoundError:
            if i == 0:
                continue  # rotated just now, or only old files left
            break
        with f:
            found = True
            size = f.seek(0, os.SEEK_END)
            take = min(size, remaining)
            f.seek(size - take)
            chunks.append(f.read(take))
            remaining -= take
            complete = complete and take == size
        if remaining <= 0:
            complete = complete and not os.path.exists(names[i + 1])
            break
    if not found:
        return None
    data = b"".join(reversed(chunks))
    if not complete and b"\n" in data:
        # The cap cut a line: start at the first whole one.
        data = data[data.index(b"\n") + 1 :]
    return data


def last_lines(data: bytes, length: int | None) -> str:
    text = data.decode("utf-8", errors="replace")
    if length is None:
        return text
    if length == 0:
        return ""
    return "".join(text.splitlines(keepends=True)[-length:])


@defer.inlineCallbacks
def candidate_ports(store: Any, instance_uuid: str) -> Any:
    """The instance's serial (host, port)s, in the order their logs are tried."""
    allocated = yield store.serial_ports(instance_uuid=instance_uuid)
    ports: list[tuple[str, int]] = [(a.host, a.port) for a in allocated]
    sessions = yield store.list_sessions(
        live=False, instance_uuid=instance_uuid, console_type="serial"
    )
    owners: dict[str, dict[int, str]] = {}
    for row in sorted(sessions, key=lambda r: r["started_at"], reverse=True):
        key = (row["host"], row["port"])
        if key in ports:
            continue
        if row["host"] not in owners:
            held = yield store.serial_ports(host=row["host"])
            owners[row["host"]] = {a.port: a.instance_uuid for a in held}
        if owners[row["host"]].get(row["port"], instance_uuid) != instance_uuid:
            continue
        ports.append(key)
    return ports


def _first_log(directory: str, ports: Sequence[tuple[str, int]], cap: int) -> bytes | None:
    for host, port in ports:
        data = read_tail(log_path(directory, host, port), cap)
        if data is not None:
            return data
    return None


@defer.inlineCallbacks
def console_output(
    store: Any, directory: str | None, instance_uuid: str, length: int | None, reactor: Any = None
) -> Any:
    """The last ``length`` lines (all when None) of the instance's console log."""
    if not directory:
        raise NoConsoleLog("serial console logs are not recorded here ([consoled] record_dir)")
    ports = yield candidate_ports(store, instance_uuid)
    if not ports:
        raise NoConsoleLog(f"Instance {instance_uuid[:64]} has no serial console port")
    if reactor is None:
        from twisted.internet import reactor
    data = yield threads.deferToThreadPool(
        reactor, reactor.getThreadPool(), _first_log, directory, ports, MAX_CONSOLE_BYTES
    )
    if data is None:
        raise NoConsoleLog(f"Instance {instance_uuid[:64]} has no console log yet")
    return last_lines(data, length)
