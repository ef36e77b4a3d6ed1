"""Each measurement, run against one target (a proxy, or the backend directly).

A step names the backend behaviour it needs and returns plain numbers keyed
by metric name; :data:`METRICS` says how each is shown and which way is better.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import client
from peers import (
    Target,
    cpu_ns,
    cpu_seconds,
    fd_limit,
    listen_drops,
    machine_jiffies,
    process_tree,
    pss_kib,
    socket_fds,
)
from swarm import Opened, close_all, drain, open_sessions

MB = 1_000_000
GIB = 1 << 30
#: numbers by metric key; a string value is a note for the report (what failed)
Measured = dict[str, float | str]


@dataclass(frozen=True)
class Settings:
    stream_bytes: int = 512 << 20
    round_trips: int = 5000
    setup_sequential: int = 1000
    setup_concurrent: int = 1000
    parallel: int = 100
    held_sessions: int = 1000
    #: consoled alone holds this many for its total (0: skip)
    big_hold: int = 10_000
    cpu_sessions: int = 1000
    cpu_seconds: float = 30.0
    cpu_rate: int = 50_000
    #: the workers step: this many sessions at once, each this long
    streams: int = 4
    spring_bytes: int = 1 << 30
    #: the big step: consoled with this many workers opens and holds this many sessions
    big_workers: int = 2
    big_sessions: int = 10_000
    repetitions: int = 3


QUICK = Settings(
    stream_bytes=64 << 20,
    round_trips=1000,
    setup_sequential=200,
    setup_concurrent=200,
    parallel=50,
    held_sessions=200,
    big_hold=0,
    cpu_sessions=100,
    cpu_seconds=5.0,
    spring_bytes=256 << 20,
    big_sessions=1000,  # the big step runs in a quick run only when --only names it
    repetitions=1,
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    #: +1 higher is better, -1 lower is better, 0 informational
    better: int
    digits: int = 0


METRICS = [
    Metric("down_mbps", "downstream MB/s", +1),
    Metric("down_client_cpu", "  client CPU % while reading", 0),
    Metric("down_client_cpus_busy", "  client's CPU busy % (reader, backends)", 0),
    Metric("down_proxy_cpu", "  proxy CPU % (tick-grained)", 0),
    Metric("down_proxy_cpu_gib", "  proxy CPU s per GiB", -1, 2),
    Metric("up_mbps", "upstream MB/s (64 KiB masked frames)", +1),
    Metric("up_proxy_cpu", "  proxy CPU % (tick-grained)", 0),
    Metric("up_proxy_cpu_gib", "  proxy CPU s per GiB", -1, 2),
    Metric("rtt_p50_us", "1-byte echo RTT p50 µs", -1),
    Metric("rtt_p99_us", "1-byte echo RTT p99 µs", -1),
    Metric("rtt_added_p50_us", "  added p50 µs (proxy − direct)", -1),
    Metric("rtt_proxy_cpu_us", "  proxy CPU µs per round trip", -1, 1),
    Metric("setup_seq_p50_ms", "set-up sequential p50 ms", -1, 2),
    Metric("setup_seq_p99_ms", "set-up sequential p99 ms", -1, 2),
    Metric("setup_resumed_p50_ms", "set-up sequential, TLS resumed, p50 ms", -1, 2),
    Metric("setup_resumed_p99_ms", "set-up sequential, TLS resumed, p99 ms", -1, 2),
    Metric("setup_resumed_pct", "  sessions the server resumed %", +1),
    Metric("setup_conc_p50_ms", "set-up concurrent p50 ms", -1, 1),
    Metric("setup_conc_p99_ms", "set-up concurrent p99 ms", -1, 1),
    Metric("setup_conc_rate", "  sessions/s (concurrent)", +1),
    Metric("setup_conc_client_cpu", "  client CPU % (concurrent)", 0),
    Metric("setup_listen_drops", "  SYNs dropped, accept queue full", -1),
    Metric("setup_failures", "  failed set-ups", -1),
    Metric("mem_kib_per_session", "PSS KiB per open session", -1),
    Metric("mem_baseline_mib", "  idle PSS MiB", -1, 1),
    Metric("mem_processes", "  processes while holding", 0),
    Metric("mem_big_total_mib", "PSS MiB total, big hold (consoled)", -1),
    Metric("mem_big_kib_per_session", "  KiB per session, big hold", -1),
    Metric("big_setup_rate", "big hold, 2 workers: set-up sessions/s", +1),
    Metric("big_setup_p50_ms", "  set-up p50 ms", -1, 1),
    Metric("big_setup_p99_ms", "  set-up p99 ms", -1, 1),
    Metric("big_client_cpu", "  client CPU % (set-up)", 0),
    Metric("big_listen_drops", "  SYNs dropped, accept queue full", -1),
    Metric("big_failures", "  failed set-ups", -1),
    Metric("big_held", "  sessions open at once (client)", +1),
    Metric("big_proxy_sessions", "  sessions the workers hold (sockets / 2)", +1),
    Metric("big_closed", "  closed during 1 s read of all", -1),
    Metric("big_total_mib", "  PSS MiB total, process tree", -1),
    Metric("big_kib_per_session", "  PSS KiB per session (− idle)", -1, 1),
    Metric("big_baseline_mib", "  idle PSS MiB", -1, 1),
    Metric("big_processes", "  processes", 0),
    Metric("streams_1w_mbps", "4 streams at once, 1 worker, MB/s", +1),
    Metric("streams_2w_mbps", "4 streams at once, 2 workers, MB/s", +1),
    Metric("streams_1w_machine", "  machine CPU %, 1 worker (all processes)", 0),
    Metric("streams_2w_machine", "  machine CPU %, 2 workers (all processes)", 0),
    Metric("streams_2w_gain", "  2 workers / 1 worker", +1, 2),
    Metric("cpu_seconds", "proxy CPU s, trickling sessions", -1, 2),
    Metric("cpu_core_pct", "  % of one core", -1, 1),
    Metric("cpu_sessions", "  sessions held", +1),
    Metric("cpu_ms_per_session_s", "  CPU ms per session-second", -1, 3),
    Metric("cpu_delivered_pct", "  bytes delivered % of sent rate", +1, 1),
]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered))) - 1))
    return ordered[index]


def _cpu_now() -> float:
    times = os.times()
    return times.user + times.system


# -- the steps -------------------------------------------------------------


def _proxy_cpu(target: Target) -> float:
    return 0.0 if target.pid is None else cpu_seconds(target.pid)


def downstream(target: Target, s: Settings) -> Measured:
    """One session's stream; also how busy the client's CPU was.

    The client and the backends share their CPU(s) (pinned apart from the
    proxy, run.py's cpu_plan): when that CPU is busy all the time, the stream
    is bound by the reader and the source, not by the proxy, whose own
    margin is then the proxy CPU % below 100.
    """
    cpus = os.sched_getaffinity(0)
    busy, total = machine_jiffies(cpus)
    cpu, proxy_cpu, started = _cpu_now(), _proxy_cpu(target), time.perf_counter()
    seconds = client.downstream(target, s.stream_bytes)
    wall = time.perf_counter() - started  # with the set-up, like the CPU counters
    busy_after, total_after = machine_jiffies(cpus)
    measured: Measured = {
        "down_mbps": (s.stream_bytes - 1) / seconds / MB,
        "down_client_cpu": 100 * (_cpu_now() - cpu) / wall,
        "down_client_cpus_busy": 100 * (busy_after - busy) / max(1, total_after - total),
    }
    if target.pid is not None:
        spent = _proxy_cpu(target) - proxy_cpu
        measured["down_proxy_cpu"] = 100 * spent / wall
        measured["down_proxy_cpu_gib"] = spent / (s.stream_bytes / GIB)
    return measured


def upstream(target: Target, s: Settings) -> Measured:
    proxy_cpu, started = _proxy_cpu(target), time.perf_counter()
    seconds = client.upstream(target, s.stream_bytes)
    measured: Measured = {"up_mbps": s.stream_bytes / seconds / MB}
    if target.pid is not None:
        wall = time.perf_counter() - started
        spent = _proxy_cpu(target) - proxy_cpu
        measured["up_proxy_cpu"] = 100 * spent / wall
        measured["up_proxy_cpu_gib"] = spent / (s.stream_bytes / GIB)
    return measured


def latency(target: Target, s: Settings) -> Measured:
    before = 0 if target.pid is None else cpu_ns(target.pid)
    after: list[int] = []
    if target.pid is not None:
        pid = target.pid
        times = client.round_trips(
            target, s.round_trips, before_close=lambda: after.append(cpu_ns(pid))
        )
    else:
        times = client.round_trips(target, s.round_trips)
    measured: Measured = {
        "rtt_p50_us": percentile(times, 50) * 1e6,
        "rtt_p99_us": percentile(times, 99) * 1e6,
    }
    if target.pid is not None:  # includes the warm-up and the session's set-up
        spent = after[0] - before
        measured["rtt_proxy_cpu_us"] = spent / 1e3 / len(times)
    return measured


def _failures(target: Target, *batches: Opened) -> Measured:
    """The failed set-ups' count and, when any failed, why (with the proxy's fd limit)."""
    reasons: dict[str, int] = {}
    for opened in batches:
        for reason, count in opened.failures.items():
            reasons[reason] = reasons.get(reason, 0) + count
    if not reasons:
        return {}
    why = ", ".join(f"{count}× {reason}" for reason, count in reasons.items())
    if target.pid is not None:
        why += f" (proxy fd limit {fd_limit(target.pid)})"
    return {"setup_failures": sum(reasons.values()), "failures": why}


def _checked(opened: Opened, wanted: int) -> Opened:
    if not opened.seconds:
        raise RuntimeError(f"no session opened of {wanted}: {opened.failures}")
    return opened


def setup(target: Target, s: Settings) -> Measured:
    open_sessions(target, 5, 1)  # warm-up: imports, first allocations
    sequential = _checked(open_sessions(target, s.setup_sequential, 1), s.setup_sequential)
    if target.name == "consoled-serial":  # one writer per port: sequential only
        return {
            "setup_seq_p50_ms": percentile(sequential.seconds, 50) * 1e3,
            "setup_seq_p99_ms": percentile(sequential.seconds, 99) * 1e3,
            **_failures(target, sequential),
        }
    resumed: Measured = {}
    if target.tls is not None:
        # Each session offers the previous one's TLS session (Python's ssl client
        # resumes with ``session=``); whether the server took it is counted.
        chained = _checked(
            open_sessions(target, s.setup_sequential, 1, resume=True), s.setup_sequential
        )
        resumed = {
            "setup_resumed_p50_ms": percentile(chained.seconds, 50) * 1e3,
            "setup_resumed_p99_ms": percentile(chained.seconds, 99) * 1e3,
            "setup_resumed_pct": 100 * chained.resumed / len(chained.seconds),
        }
    cpu, drops = _cpu_now(), listen_drops()
    concurrent = _checked(open_sessions(target, s.setup_concurrent, s.parallel), s.setup_concurrent)
    client_cpu = _cpu_now() - cpu
    return {
        "setup_seq_p50_ms": percentile(sequential.seconds, 50) * 1e3,
        "setup_seq_p99_ms": percentile(sequential.seconds, 99) * 1e3,
        "setup_conc_p50_ms": percentile(concurrent.seconds, 50) * 1e3,
        "setup_conc_p99_ms": percentile(concurrent.seconds, 99) * 1e3,
        "setup_conc_rate": len(concurrent.seconds) / concurrent.wall,
        "setup_conc_client_cpu": 100 * client_cpu / concurrent.wall,
        "setup_listen_drops": listen_drops() - drops,
        **resumed,
        **_failures(target, sequential, concurrent),
    }


def _hold(target: Target, sessions: int, parallel: int) -> tuple[int, int, Opened]:
    """PSS KiB before and while holding ``sessions`` open sessions."""
    open_sessions(target, 5, 1)  # warm-up, so first-session allocations are in the baseline
    time.sleep(0.5)
    baseline = pss_kib(target.pids())
    opened = open_sessions(target, sessions, parallel, hold=True)
    time.sleep(1.0)
    return baseline, pss_kib(target.pids()), opened


def memory(target: Target, s: Settings) -> Measured:
    baseline, loaded, opened = _hold(target, s.held_sessions, s.parallel)
    try:
        held = len(_checked(opened, s.held_sessions).held)
        return {
            "mem_kib_per_session": (loaded - baseline) / held,
            "mem_baseline_mib": baseline / 1024,
            "mem_processes": len(target.pids()),
            **_failures(target, opened),
        }
    finally:
        close_all(opened.held)


def memory_big(target: Target, s: Settings) -> Measured:
    baseline, loaded, opened = _hold(target, s.big_hold, s.parallel)
    try:
        held = len(_checked(opened, s.big_hold).held)
        return {
            "mem_big_total_mib": loaded / 1024,
            "mem_big_kib_per_session": (loaded - baseline) / held,
            **_failures(target, opened),
        }
    finally:
        close_all(opened.held)


def cpu(target: Target, s: Settings) -> Measured:
    assert target.pid is not None
    opened = _checked(open_sessions(target, s.cpu_sessions, s.parallel, hold=True), s.cpu_sessions)
    try:
        drain(opened.held, 1.0)  # every session flowing before the window opens
        before, started = cpu_seconds(target.pid), time.monotonic()
        received, _ = drain(opened.held, s.cpu_seconds)
        spent, wall = cpu_seconds(target.pid) - before, time.monotonic() - started
        expected = len(opened.held) * s.cpu_rate * s.cpu_seconds
        return {
            "cpu_seconds": spent,
            "cpu_core_pct": 100 * spent / wall,
            "cpu_ms_per_session_s": 1000 * spent / (len(opened.held) * wall),
            "cpu_sessions": len(opened.held),
            "cpu_delivered_pct": 100 * received / expected,
            **_failures(target, opened),
        }
    finally:
        close_all(opened.held)


def big_hold(target: Target, s: Settings) -> Measured:
    """``s.big_sessions`` opened with ``s.parallel`` in flight and all held at once.

    The set-up figures are over all of them; then every held session is read
    for 1 s (none may close) and the proxy tree's PSS and sockets are summed.
    """
    assert target.pid is not None
    open_sessions(target, 20, 1)  # warm-up; SO_REUSEPORT spreads them over the workers
    time.sleep(0.5)
    baseline = pss_kib(target.pids())
    idle_sockets = {pid: socket_fds(pid) for pid in process_tree(target.pid)}
    cpu, drops = _cpu_now(), listen_drops()
    opened = open_sessions(target, s.big_sessions, s.parallel, hold=True)
    client_cpu = _cpu_now() - cpu
    try:
        _checked(opened, s.big_sessions)
        drops = listen_drops() - drops
        _, closed = drain(opened.held, 1.0)  # are they all still open?
        loaded = pss_kib(target.pids())
        pids = process_tree(target.pid)
        # each session is two sockets in its worker: the client's and the backend's
        per_worker = [(socket_fds(pid) - idle_sockets.get(pid, 0)) / 2 for pid in pids]
        held = len(opened.held)
        failed = sum(opened.failures.values())
        measured: Measured = {
            "big_setup_rate": len(opened.seconds) / opened.wall,
            "big_setup_p50_ms": percentile(opened.seconds, 50) * 1e3,
            "big_setup_p99_ms": percentile(opened.seconds, 99) * 1e3,
            "big_client_cpu": 100 * client_cpu / opened.wall,
            "big_listen_drops": drops,
            "big_failures": failed,
            "big_held": held - closed,
            "big_proxy_sessions": sum(per_worker),
            "big_closed": closed,
            "big_total_mib": loaded / 1024,
            "big_kib_per_session": (loaded - baseline) / held,
            "big_baseline_mib": baseline / 1024,
            "big_processes": len(pids),
            "split": "sessions per process (sockets / 2 over idle): "
            + " + ".join(f"{n:,.0f}" for n in per_worker),
        }
        if failed:
            why = ", ".join(f"{count}× {reason}" for reason, count in opened.failures.items())
            measured["failures"] = f"{why} (proxy fd limit {fd_limit(target.pid)})"
        return measured
    finally:
        close_all(opened.held)


def parallel_streams(target: Target, s: Settings) -> Measured:
    """Aggregate MB/s of ``s.streams`` sessions streaming at once, each read by its own process."""
    with multiprocessing.get_context("fork").Pool(s.streams) as pool:
        busy, total = machine_jiffies()
        runs = pool.starmap(client.discard_stream, [(target, s.spring_bytes)] * s.streams)
        busy_after, total_after = machine_jiffies()
    first = min(start for start, _, _ in runs)
    last = max(end for _, end, _ in runs)
    share = (busy_after - busy) / (total_after - total)
    return {
        "streams_mbps": sum(got for _, _, got in runs) / (last - first) / MB,
        "machine_pct": 100 * share * (os.cpu_count() or 1),
    }


@dataclass(frozen=True)
class Step:
    group: str
    backend: str
    run: Callable[[Target, Settings], Measured]
    #: run against direct TCP too (no proxy process to account)
    direct: bool = True
    only_consoled: bool = False
    #: meaningful with every session on one console (not for the serial door's one writer)
    one_console: bool = False
    #: put the proxy on the client's CPU: a strict ping-pong needs one core, and a
    #: wake-up across vCPUs costs this VM ~50 µs at p50 and milliseconds at p99
    same_core: bool = False
    #: run against the TLS targets too (``consoled+rsa``, ...)
    tls: bool = True
    #: run against consoled on the other stores too (``consoled@pg``)
    stores: bool = False


STEPS = [
    Step("throughput", "source", downstream, one_console=True),
    Step("throughput", "sink", upstream, one_console=True),
    Step("latency", "echo", latency, same_core=True, one_console=True),
    Step("setup", "greeter", setup, one_console=True, stores=True),
    Step("memory", "greeter", memory, direct=False),
    Step("memory", "greeter", memory_big, direct=False, only_consoled=True, tls=False),
    Step("cpu", "trickle", cpu, direct=False, tls=False),
]
GROUPS = tuple(dict.fromkeys(step.group for step in STEPS))
