"""Instructions per one-byte round trip, counted by callgrind: a figure noise cannot move.

    python benchmarks/instructions.py [--round-trips 2000] [--targets bare-python,consoled,...]
    python benchmarks/instructions.py --setups 300 [--in-flight 25] --targets bare-autobahn,consoled
    python benchmarks/instructions.py --setups 200 --targets consoled --tls rsa,ec

Wall-clock latency on this VM moves by 20-40 % between runs, so a change
worth a few microseconds cannot be told from noise there.  This runs each
proxy under ``valgrind --tool=callgrind`` with instrumentation off, opens one
session, does 200 unmeasured round trips, switches counting on
(``callgrind_control -i on``), does ``--round-trips`` more and switches it
off before the session closes.  What it prints is the proxy's user-space
instructions per round trip, and each one's ratio to the bare Python relay
and to websocat, all measured in the same run.  Kernel work (the system
calls themselves) is not counted; it is the same for every proxy.  One run
takes a few minutes: everything runs about fifty times slower under valgrind.

With ``--setups N`` it counts sessions instead: N sessions against the
greeter (the set-up step's backend), ``--in-flight`` at a time, each
opened, read to its first console byte and closed, and the proxy's
instructions for all of it (its database threads too, and each session's
end, counted until the proxy's CPU time stops moving) divided by N: what
one session of a reconnect storm costs, beside the bare Autobahn relay
that is its floor.  ``--tls rsa,ec`` adds each over ``wss://``
(``consoled+rsa``) beside ``direct+rsa``, the TLS server alone (set-up
ends at the first byte, so it is the TLS handshake and the greeting).
Each thread's share is printed too: the database
threads' instructions run beside the reactor's, and hand the GIL back and
forth with it.

Needs valgrind (Debian's ``valgrind``; ``scripts/setup --test`` installs it).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import client
from peers import (
    Certificate,
    ConsoledSetup,
    Target,
    backends,
    cpu_seconds,
    make_certificate,
    proxy,
    raise_fd_limit,
    websocat_binary,
)
from swarm import open_sessions

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP = 200
TARGETS = (
    "bare-python",
    "bare-autobahn",
    "consoled",
    "consoled-xvp",
    "consoled-serial",
    "websocat",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument(
        "--setups", type=int, default=0, help="count per session set-up, not per round trip"
    )
    parser.add_argument(
        "--tls",
        default="",
        help="with --setups: also each target over wss:// with these certificates (rsa,ec)",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=25,
        help="sessions opening at once (at 100, valgrind's 50x slowdown trips the store's breaker)",
    )
    return parser.parse_args()


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def count(
    name: str,
    port: int,
    workdir: Path,
    setup: ConsoledSetup,
    trips: int,
    in_flight: int = 0,
    certificates: dict[str, Certificate] | None = None,
) -> tuple[float, list[float]]:
    """Instructions per round trip of one proxy, counted only during the measured trips,
    and each thread's share (largest first).

    With ``in_flight``: per session set-up instead, ``trips`` sessions.
    """
    out = workdir / f"callgrind-{name}.out"
    for old in glob.glob(f"{out}*"):
        Path(old).unlink()
    wrapper = (
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    )
    with proxy(
        name,
        port,
        workdir,
        setup,
        None,
        wrapper=wrapper,
        start_timeout=300,
        certificates=certificates,
        behaviour=("greeter", 0),
    ) as target:
        assert target.pid is not None
        if in_flight:
            _counted_sessions(target, trips, in_flight, str(target.pid))
        else:
            _counted(target, trips, str(target.pid))
    # One file per dump and thread; the counted dump is the one with instructions.
    threads = []
    for path in glob.glob(f"{out}.*"):
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith("totals:") and int(line.split()[1]):
                threads.append(int(line.split()[1]) / trips)
    if not threads:
        raise RuntimeError(f"callgrind wrote no totals for {name}: see {workdir}")
    return sum(threads), sorted(threads, reverse=True)


def _counted(target: Target, trips: int, pid: str) -> None:
    """One session: warm-up round trips, then ``trips`` counted ones, then close."""

    def counting_off() -> None:
        _control("-i", "off", pid)  # before the close: its work is not a round trip's
        _control("-d", pid)

    client.round_trips(
        target,
        trips,
        warmup=WARMUP,
        after_warmup=lambda: _control("-i", "on", pid),
        before_close=counting_off,
    )


def _counted_sessions(target: Target, sessions: int, in_flight: int, pid: str) -> None:
    """Warm-up sessions, then ``sessions`` counted ones, each to its first byte and closed."""
    warm = open_sessions(target, WARMUP, in_flight)
    if warm.failures:
        raise RuntimeError(f"{target.name}: warm-up sessions failed: {warm.failures}")
    _settle(target)
    _control("-i", "on", pid)
    opened = open_sessions(target, sessions, in_flight)
    if opened.failures:
        raise RuntimeError(f"{target.name}: sessions failed: {opened.failures}")
    _settle(target)  # each session's end (rows, log lines) is part of its cost
    _control("-i", "off", pid)
    _control("-d", pid)


def _settle(target: Target) -> None:
    """Until the proxy's CPU time stops moving for half a second (its work is done)."""
    assert target.pid is not None
    before = cpu_seconds(target.pid)
    while True:
        time.sleep(0.5)
        now = cpu_seconds(target.pid)
        if now == before:
            return
        before = now


def main() -> None:
    args = parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("instructions.py needs valgrind (apt-get install valgrind)")
    names = [t for t in TARGETS if t in args.targets.split(",")]
    kinds = [k for k in args.tls.split(",") if k] if args.setups else []
    # A TLS column per target that serves TLS ("direct+rsa" is the TLS server alone).
    names += [f"{t}+{k}" for k in kinds for t in ("direct", *names) if t in ("direct", "consoled")]
    notes = []
    if "websocat" in names and websocat_binary() is None:
        names.remove("websocat")
        notes.append("websocat not installed: its column is skipped")
    workdir = RESULTS / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    per_trip: dict[str, float] = {}
    per_thread: dict[str, list[float]] = {}
    if args.setups:
        raise_fd_limit()
    certificates = {kind: make_certificate(workdir, kind) for kind in kinds}
    with backends(workdir, None, source_bytes=1 << 20, sink_bytes=1 << 20) as ports:
        setup = ConsoledSetup(workdir)
        for name in names:
            print(f"  {name} under callgrind ...", file=sys.stderr, flush=True)
            if args.setups:
                per_trip[name], per_thread[name] = count(
                    name,
                    ports["greeter"],
                    workdir,
                    setup,
                    args.setups,
                    args.in_flight,
                    certificates,
                )
                print(f"    {per_trip[name]:,.0f} instructions per session", file=sys.stderr)
                continue
            per_trip[name], _ = count(name, ports["echo"], workdir, setup, args.round_trips)
            print(f"    {per_trip[name]:,.0f} instructions per round trip", file=sys.stderr)
    if args.setups:
        _report_sessions(per_trip, per_thread, args.setups, args.in_flight, notes)
        return
    print(f"instructions per 1-byte round trip ({args.round_trips:,} counted), user space")
    print(f"{'target':18}{'instructions':>14}{'× bare-python':>16}{'× websocat':>13}")
    for name, value in per_trip.items():
        bare = per_trip.get("bare-python")
        websocat = per_trip.get("websocat")
        ratio_bare = f"{value / bare:.2f}" if bare else "—"
        ratio_websocat = f"{value / websocat:.2f}" if websocat else "—"
        print(f"{name:18}{value:>14,.0f}{ratio_bare:>16}{ratio_websocat:>13}")
    for note in notes:
        print(f"note: {note}")
    report = {"round_trips": args.round_trips, "instructions_per_round_trip": per_trip}
    (RESULTS / "instructions.json").write_text(json.dumps(report, indent=2) + "\n")


def _report_sessions(
    per_session: dict[str, float],
    per_thread: dict[str, list[float]],
    sessions: int,
    in_flight: int,
    notes: list[str],
) -> None:
    print(f"instructions per session ({sessions:,} counted, {in_flight} in flight), user space")
    print(f"{'target':18}{'instructions':>14}{'× bare-autobahn':>18}  by thread")
    floor = per_session.get("bare-autobahn")
    for name, value in per_session.items():
        ratio = f"{value / floor:.2f}" if floor else "—"
        threads = " + ".join(f"{share:,.0f}" for share in per_thread[name])
        print(f"{name:18}{value:>14,.0f}{ratio:>18}  {threads}")
    for note in notes:
        print(f"note: {note}")
    report = {
        "sessions": sessions,
        "in_flight": in_flight,
        "instructions_per_session": per_session,
        "instructions_per_session_by_thread": per_thread,
    }
    (RESULTS / "instructions-setup.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
