# Accounting: the counters behind every metric and the invariant they keep.
#
# Owns: DropReason, the per-(listener, mirror) MirrorStats, the per-listener
# ListenerStats, and a cheap fixed-bucket Histogram.
# Must not know: any protocol, sockets, or how metrics are exposed.
#
# Counters are plain ints mutated on the event loop thread, never Prometheus
# objects: an increment here costs a few nanoseconds, and the metrics module
# reads them at scrape time. The invariant of design.md §1.4 holds at every
# instant because every transition below moves one unit between two counters
# in one synchronous step:
#
#     offered == delivered + dropped + queued + in_flight
from __future__ import annotations

import bisect
import enum

__all__ = ["DropReason", "Histogram", "ListenerStats", "MirrorStats", "LATENCY_BUCKETS"]


class DropReason(enum.Enum):
    """Why a unit did not reach a mirror. One enum for every protocol."""

    QUEUE_FULL = "queue_full"
    TOO_LARGE = "too_large"
    MIRROR_UNAVAILABLE = "mirror_unavailable"
    MIRROR_TIMEOUT = "mirror_timeout"
    MIRROR_ERROR = "mirror_error"
    TRANSACTION_ABORTED = "transaction_aborted"
    SHUTDOWN = "shutdown"

    # Counters are keyed by reason on the hot path; Enum's own __hash__ is a
    # Python function (hash of the name), identity is enough for a singleton.
    __hash__ = object.__hash__


# Seconds: from 100 µs (a loopback Postgres point query) to 30 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class Histogram:
    """Cumulative-at-read histogram: one bisect and two adds per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Record ``value``, ``times`` times over (units that waited as long)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """:returns: (upper bound, cumulative count) pairs, +Inf last."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def __repr__(self) -> str:
        return f"<Histogram count={self.count} sum={self.sum:.6f}>"


class ListenerStats:
    """Counters of one listener's primary side."""

    __slots__ = ("listener", "client_connections", "primary_units", "primary_latency")

    def __init__(self, listener: str) -> None:
        self.listener = listener
        self.client_connections = 0
        self.primary_units = 0
        self.primary_latency = Histogram()

    def __repr__(self) -> str:
        return (
            f"<ListenerStats {self.listener} clients={self.client_connections} "
            f"units={self.primary_units}>"
        )


class MirrorStats:
    """Counters of one (listener, mirror) pair.

    Units move through: offer -> queued -> in_flight -> delivered(outcome), or to
    dropped(reason) from offer, queued or in_flight. ``skipped`` counts units that
    sampling left out; they are never offered.
    """

    __slots__ = (
        "listener", "mirror", "offered", "skipped", "delivered", "dropped",
        "queued", "queued_bytes", "in_flight", "latency",
    )

    def __init__(self, listener: str, mirror: str) -> None:
        self.listener = listener
        self.mirror = mirror
        self.offered = 0
        self.skipped = 0
        self.delivered: dict[str, int] = {}
        self.dropped: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.queued = 0
        self.queued_bytes = 0
        self.in_flight = 0
        self.latency = Histogram()

    # Transitions. Each keeps the invariant on its own.

    def offer_dropped(self, reason: DropReason, times: int = 1) -> None:
        """A unit (``times`` units) offered and dropped at once (it never
        entered a queue)."""
        self.offered += times
        self.dropped[reason] += times

    def offer_queued(self, size: int) -> None:
        self.offered += 1
        self.queued += 1
        self.queued_bytes += size

    def queued_grew(self, size: int) -> None:
        """A queued or in-flight unit received more bytes (a streamed COPY)."""
        self.queued_bytes += size

    def release_bytes(self, size: int) -> None:
        self.queued_bytes -= size

    def start(self) -> None:
        self.queued -= 1
        self.in_flight += 1

    def queued_dropped(self, reason: DropReason) -> None:
        self.queued -= 1
        self.dropped[reason] += 1

    def delivered_as(self, outcome: str, seconds: float) -> None:
        self.in_flight -= 1
        self.delivered[outcome] = self.delivered.get(outcome, 0) + 1
        self.latency.observe(seconds)

    def in_flight_dropped(self, reason: DropReason) -> None:
        self.in_flight -= 1
        self.dropped[reason] += 1

    # Reading.

    @property
    def delivered_total(self) -> int:
        return sum(self.delivered.values())

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def balanced(self) -> bool:
        """The accounting invariant of design.md §1.4."""
        return self.offered == (
            self.delivered_total + self.dropped_total + self.queued + self.in_flight
        )

    def __repr__(self) -> str:
        drops = {r.value: n for r, n in self.dropped.items() if n}
        return (
            f"<MirrorStats {self.listener}/{self.mirror} offered={self.offered} "
            f"skipped={self.skipped} delivered={self.delivered} dropped={drops} "
            f"queued={self.queued}/{self.queued_bytes}B in_flight={self.in_flight}>"
        )
