# Prometheus exposition of the accounting counters (design.md §7).
#
# Owns: the metric names and labels, and turning the plain counters of
# accounting.py into Prometheus families at scrape time.
# Must not know: protocols. Nothing here runs on the hot path: the relay only
# bumps ints; this collector reads them when /metrics is scraped.
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from .accounting import DropReason, Histogram
from .protocol import ListenerContext

__all__ = ["GatewayCollector", "render"]


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    return [("+Inf" if b == float("inf") else repr(b), float(n)) for b, n in h.cumulative()]


class GatewayCollector(Collector):
    """Reads every listener's counters at scrape time."""

    def __init__(self, listeners: Callable[[], Iterable[ListenerContext]]) -> None:
        self._listeners = listeners

    def collect(self) -> Iterator[Metric]:
        lst = list(self._listeners())
        clients = GaugeMetricFamily(
            "mirrorgate_client_connections", "Client connections open", labels=["listener"])
        units = CounterMetricFamily(
            "mirrorgate_primary_units", "Units relayed to the primary", labels=["listener"])
        plat = HistogramMetricFamily(
            "mirrorgate_primary_latency_seconds", "Primary answer time per unit",
            labels=["listener"])
        lm = ["listener", "mirror"]
        offered = CounterMetricFamily(
            "mirrorgate_mirror_offered", "Units offered to a mirror", labels=lm)
        skipped = CounterMetricFamily(
            "mirrorgate_mirror_skipped", "Units left out by sampling (never offered)", labels=lm)
        delivered = CounterMetricFamily(
            "mirrorgate_mirror_delivered", "Units the mirror answered, by outcome",
            labels=[*lm, "outcome"])
        dropped = CounterMetricFamily(
            "mirrorgate_mirror_dropped", "Units that did not reach the mirror, by reason",
            labels=[*lm, "reason"])
        qunits = GaugeMetricFamily(
            "mirrorgate_mirror_queue_units", "Units queued for the mirror", labels=lm)
        qbytes = GaugeMetricFamily(
            "mirrorgate_mirror_queue_bytes", "Bytes held for the mirror (queued and in flight)",
            labels=lm)
        inflight = GaugeMetricFamily(
            "mirrorgate_mirror_in_flight", "Units being replayed on the mirror", labels=lm)
        lag = GaugeMetricFamily(
            "mirrorgate_mirror_lag_seconds", "Age of the oldest queued unit", labels=lm)
        mlat = HistogramMetricFamily(
            "mirrorgate_mirror_latency_seconds", "Mirror answer time per delivered unit",
            labels=lm)
        for ctx in lst:
            st = ctx.stats
            name = ctx.name
            clients.add_metric([name], st.client_connections)
            units.add_metric([name], st.primary_units)
            plat.add_metric([name], _buckets(st.primary_latency), st.primary_latency.sum)
            for mirror in ctx.all_mirrors:
                ms = mirror.stats
                labels = [name, mirror.name]
                offered.add_metric(labels, ms.offered)
                skipped.add_metric(labels, ms.skipped)
                for outcome, n in sorted(ms.delivered.items()):
                    delivered.add_metric([*labels, outcome], n)
                for reason in DropReason:
                    dropped.add_metric([*labels, reason.value], ms.dropped[reason])
                qunits.add_metric(labels, ms.queued)
                qbytes.add_metric(labels, ms.queued_bytes)
                inflight.add_metric(labels, ms.in_flight)
                lag.add_metric(labels, mirror.lag())
                mlat.add_metric(labels, _buckets(ms.latency), ms.latency.sum)
        yield from (clients, units, plat, offered, skipped, delivered, dropped,
                    qunits, qbytes, inflight, lag, mlat)


def render(listeners: Callable[[], Iterable[ListenerContext]]) -> bytes:
    """The Prometheus text exposition of every listener's counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(listeners))
    return generate_latest(registry)
