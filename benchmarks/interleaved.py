"""One-byte echo round trips through several proxies alive at once, in turns.

    python benchmarks/interleaved.py [--targets bare-python,consoled,websocat] [--batches 8] [--trips 3000]

``run.py`` starts each proxy afresh and measures it once per repetition, so a
busy moment of this shared VM lands on one column.  Here every proxy stays up
and the batches go round-robin (one batch of each, then again), so drift
spreads over all of them; the minimum and median over batches of each
proxy's CPU per round trip (schedstat) and of its p50 are printed.  Every
process is on CPU 0, as in run.py's latency step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import statistics
from pathlib import Path

from measures import Settings, latency
from peers import ConsoledSetup, backends, proxy, websocat_binary

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="bare-python,consoled,consoled-xvp,websocat")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--trips", type=int, default=3000)
    args = parser.parse_args()
    names = args.targets.split(",")
    if "websocat" in names and websocat_binary() is None:
        names.remove("websocat")
    workdir = RESULTS / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    cpu = {0}
    os.sched_setaffinity(0, cpu)
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    settings = dataclasses.replace(Settings(), round_trips=args.trips)
    with backends(workdir, cpu, source_bytes=1 << 20, sink_bytes=1 << 20) as ports:
        setup = ConsoledSetup(workdir)
        with contextlib.ExitStack() as stack:
            targets = {
                n: stack.enter_context(proxy(n, ports["echo"], workdir, setup, cpu)) for n in names
            }
            for _ in range(args.batches):
                for name, target in targets.items():
                    batch = latency(target, settings)  # run.py's latency step, one batch
                    measured[name].append((batch["rtt_proxy_cpu_us"], batch["rtt_p50_us"]))
    print(f"{args.batches} batches of {args.trips:,} one-byte round trips each, in turns")
    print(f"{'target':18}{'CPU µs/trip min':>17}{'median':>9}{'p50 µs min':>13}{'median':>9}")
    for name, rows in measured.items():
        cpus, p50s = [c for c, _ in rows], [p for _, p in rows]
        print(
            f"{name:18}{min(cpus):>17.1f}{statistics.median(cpus):>9.1f}"
            f"{min(p50s):>13.1f}{statistics.median(p50s):>9.1f}"
        )


if __name__ == "__main__":
    main()
