"""Prometheus metrics of one proxy process (prometheus_client, its own registry).

Counted where things happen, once each, never per relayed chunk:

- ``consoled_sessions_started_total{door,console_type}``: a session whose
  console answered (Sessions, at its start line);
- ``consoled_refusals_total{door,reason}``: every refusal the gate decides,
  by its kind (the refusal table's text);
- ``consoled_setup_seconds``: from a session's admission to its console
  ready to relay (histogram);
- ``consoled_token_lookup_seconds``: the gate's store look-up (histogram);
- ``consoled_store_errors_total``: look-ups that failed;

and read when scraped, from what the sessions hold (no bookkeeping on the
data path):

- ``consoled_sessions_live{door,console_type}``;
- ``consoled_bytes_total{direction}``: bytes relayed by ended sessions plus
  what the live ones relayed so far (``to_client``, ``to_server``);
- ``consoled_serial_leases_held``: serial ports whose writer is here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

#: Latency buckets in seconds: a set-up takes milliseconds, a slow store seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The metrics of one process; ``watch(sessions)`` adds what is read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = PromCounter(
            "consoled_sessions_started",
            "Sessions whose console answered",
            ["door", "console_type"],
            registry=self.registry,
        )
        self.refusals = PromCounter(
            "consoled_refusals",
            "Connections refused at the gate, by reason",
            ["door", "reason"],
            registry=self.registry,
        )
        self.setup = Histogram(
            "consoled_setup_seconds",
            "From admission to the console ready to relay",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.lookup = Histogram(
            "consoled_token_lookup_seconds",
            "The gate's token look-up in the store",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.store_errors = PromCounter(
            "consoled_store_errors", "Token look-ups that failed", registry=self.registry
        )
        #: bytes of sessions that ended (the live ones are added at scrape time)
        self.ended_bytes = {"to_client": 0, "to_server": 0}

    def watch(self, sessions: Any) -> None:
        """Read live sessions, bytes and leases from ``sessions`` when scraped."""
        self.registry.register(_SessionsCollector(sessions, self.ended_bytes))

    def session_ended(self, relay: Any) -> None:
        if relay is not None:
            self.ended_bytes["to_client"] += relay.bytes_to_client
            self.ended_bytes["to_server"] += relay.bytes_to_server

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _SessionsCollector:
    def __init__(self, sessions: Any, ended_bytes: dict[str, int]) -> None:
        self._sessions = sessions
        self._ended = ended_bytes

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        live = GaugeMetricFamily(
            "consoled_sessions_live", "Sessions live now", labels=["door", "console_type"]
        )
        counts: Counter[tuple[str, str]] = Counter()
        relayed = dict(self._ended)
        for session in self._sessions.live:
            counts[(session.door, session.info.console_type)] += 1
            if session.relay is not None:
                relayed["to_client"] += session.relay.bytes_to_client
                relayed["to_server"] += session.relay.bytes_to_server
        for (door, console_type), count in sorted(counts.items()):
            live.add_metric([door, console_type], count)
        yield live
        relayed_family = CounterMetricFamily(
            "consoled_bytes", "Bytes relayed, by direction", labels=["direction"]
        )
        for direction, count in relayed.items():
            relayed_family.add_metric([direction], count)
        yield relayed_family
        yield GaugeMetricFamily(
            "consoled_serial_leases_held",
            "Serial ports whose writer is on this proxy",
            value=self._sessions.leases_held(),
        )
