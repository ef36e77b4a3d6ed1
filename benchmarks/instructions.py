"""Instructions per one-byte round trip, counted by callgrind: a figure noise cannot move.

    python benchmarks/instructions.py [--round-trips 2000] [--targets bare-python,consoled,...]

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

Needs valgrind (Debian's ``valgrind``; ``scripts/setup --test`` installs it).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import client
from peers import ConsoledSetup, Target, backends, proxy, websocat_binary

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP = 200
TARGETS = ("bare-python", "consoled", "consoled-xvp", "consoled-serial", "websocat")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--targets", default=",".join(TARGETS))
    return parser.parse_args()


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def count(name: str, echo_port: int, workdir: Path, setup: ConsoledSetup, trips: int) -> float:
    """Instructions per round trip of one proxy, counted only during the measured trips."""
    out = workdir / f"callgrind-{name}.out"
    for old in glob.glob(f"{out}*"):
        Path(old).unlink()
    wrapper = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}")
    with proxy(name, echo_port, workdir, setup, None, wrapper=wrapper, start_timeout=300) as target:
        assert target.pid is not None
        _counted(target, trips, str(target.pid))
    totals = []
    for path in glob.glob(f"{out}.*"):
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                totals.append(int(line.split()[1]))
    if not totals:
        raise RuntimeError(f"callgrind wrote no totals for {name}: see {workdir}")
    return max(totals) / trips


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


def main() -> None:
    args = parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("instructions.py needs valgrind (apt-get install valgrind)")
    names = [t for t in TARGETS if t in args.targets.split(",")]
    notes = []
    if "websocat" in names and websocat_binary() is None:
        names.remove("websocat")
        notes.append("websocat not installed: its column is skipped")
    workdir = RESULTS / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    per_trip: dict[str, float] = {}
    with backends(workdir, None, source_bytes=1 << 20, sink_bytes=1 << 20) as ports:
        setup = ConsoledSetup(workdir)
        for name in names:
            print(f"  {name} under callgrind ...", file=sys.stderr, flush=True)
            per_trip[name] = count(name, ports["echo"], workdir, setup, args.round_trips)
            print(f"    {per_trip[name]:,.0f} instructions per round trip", file=sys.stderr)
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


if __name__ == "__main__":
    main()
