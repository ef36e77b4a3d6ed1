"""Fuzz every door in memory for a long run: crashes and memory, one table.

    .venv/bin/python benchmarks/fuzz.py                       # 100,000 inputs per door
    .venv/bin/python benchmarks/fuzz.py --inputs 2000 --doors xvp,novnc --seed 7

Each input is one connection played by ``tests.fuzzing.DoorRig.feed`` on the
door's real factory (a real SQLite store run inline, a memory clock): a few
pieces of the door's protocol, valid, refused or mutated, and random bytes,
cut into random chunks, with or without the timeouts, then the user leaves.
A crash is anything ``feed`` reports: an exception out of the protocol, an
error logged, a session still live, a row open, a lease held, a timer left.
Memory is the process's resident set after a warm-up (a tenth of the inputs)
and at the end; the run fails (exit 1) on any crash or when the resident set
grew by more than --rss-bound MiB after the warm-up.  docs/reliability.md
has the figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fuzzing import DOORS, DoorRig, random_input  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(door: str, inputs: int, seed: int) -> dict[str, object]:
    rng = random.Random(f"{seed}-{door}")
    rig = DoorRig(door)
    crashes: list[str] = []
    warm_up = max(1, inputs // 10)
    started = time.monotonic()
    rss_warm = 0.0
    try:
        for n in range(inputs):
            if n == warm_up:
                gc.collect()
                rss_warm = rss_mib()
            data, sizes, wait = random_input(rng, door)
            wrong = rig.feed(data, sizes, wait)
            if wrong is not None:
                crashes.append(f"input {n} {data[:120]!r} {sizes} {wait}: {wrong}")
                rig = DoorRig(door)  # start clean, keep counting
    finally:
        rig.case.cleanup()
    gc.collect()
    return {
        "door": door,
        "inputs": inputs,
        "crashes": crashes,
        "rss_warm": rss_warm,
        "rss_end": rss_mib(),
        "seconds": time.monotonic() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="per door")
    parser.add_argument("--doors", default=",".join(DOORS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-bound", type=float, default=16.0, help="MiB of growth allowed")
    args = parser.parse_args()
    rows = []
    print(
        f"{'door':<11} {'inputs':>8} {'crashes':>7} {'RSS warm':>9} {'RSS end':>8} {'growth':>7} {'s':>6}"
    )
    failed = False
    for door in args.doors.split(","):
        row = run(door, args.inputs, args.seed)
        rows.append(row)
        growth = float(row["rss_end"]) - float(row["rss_warm"])  # type: ignore[arg-type]
        crashes = row["crashes"]
        assert isinstance(crashes, list)
        failed |= bool(crashes) or growth > args.rss_bound
        print(
            f"{door:<11} {args.inputs:>8,} {len(crashes):>7} {row['rss_warm']:>7.1f}Mi"
            f" {row['rss_end']:>6.1f}Mi {growth:>+5.1f}Mi {row['seconds']:>6.0f}",
            flush=True,
        )
        for crash in crashes[:5]:
            print(f"  {crash}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
