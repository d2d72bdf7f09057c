# Upstream connection pools for mirrors: bounded, keyed, with connect backoff.
#
# Owns: how many connections the gateway holds to one mirror upstream, which idle
# ones may be reused by which session (the key: user, database, startup
# parameters), and when a mirror that failed to connect may be tried again.
# Must not know: how a connection is opened or reset; the protocol does that and
# hands back only connections it has reset.
from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

__all__ = ["Closeable", "UpstreamPool"]


class Closeable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closeable)

_clock = time.monotonic


class UpstreamPool(Generic[C]):
    """At most ``capacity`` connections to one upstream, idle ones kept per key.

    A session first asks ``take`` for an idle connection of its key; failing
    that, ``reserve`` gives it a slot to connect in (closing an idle connection
    of another key if the pool is full). ``put`` returns a reset connection,
    ``discard`` frees a slot whose connection is gone.
    """

    def __init__(self, name: str, capacity: int, *, backoff_min: float = 0.5,
                 backoff_max: float = 30.0) -> None:
        self.name = name
        self.capacity = capacity
        self.open = 0  # connections counted against capacity: in use, idle or connecting
        self._idle: dict[Hashable, list[C]] = {}
        self._idle_count = 0
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._delay = 0.0
        self._retry_at = 0.0
        self.failures = 0
        self.retired = False  # a reload moved the upstream: connections in use close

    def take(self, key: Hashable) -> C | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        self._idle_count -= 1
        conn = conns.pop()
        if not conns:
            del self._idle[key]
        return conn

    def reserve(self) -> bool:
        """Claim a slot for a new connection; False when the pool is full of busy ones."""
        if self.open < self.capacity:
            self.open += 1
            return True
        for key, conns in self._idle.items():
            victim = conns.pop()
            if not conns:
                del self._idle[key]
            self._idle_count -= 1
            victim.close()
            return True  # the victim's slot passes to the caller
        return False

    def put(self, key: Hashable, conn: C) -> None:
        if self.retired:
            conn.close()
            self.open -= 1
            return
        self._idle.setdefault(key, []).append(conn)
        self._idle_count += 1

    def discard(self) -> None:
        self.open -= 1

    # -- reachability --

    def available(self) -> bool:
        """False while a failed upstream waits out its backoff."""
        # Asked at every offer while a mirror is down: the clock is read only
        # while a backoff is pending.
        return self._retry_at == 0.0 or _clock() >= self._retry_at

    def retry_at(self) -> float:
        """When a failed upstream may be tried again; 0.0 if it may be now."""
        at = self._retry_at
        return at if at and _clock() < at else 0.0

    def connect_failed(self) -> None:
        self.failures += 1
        self._delay = min(self._backoff_max, max(self._backoff_min, self._delay * 2))
        self._retry_at = _clock() + self._delay

    def connect_succeeded(self) -> None:
        self._delay = 0.0
        self._retry_at = 0.0

    def close_idle(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
                self.open -= 1
        self._idle.clear()
        self._idle_count = 0

    def retire(self) -> None:
        """A reload changed the upstream's address (or removed it): close idle
        connections now, and those in use when they come back."""
        self.retired = True
        self.close_idle()

    def __repr__(self) -> str:
        state = "up" if self.available() else f"backoff {self._delay:.1f}s"
        return (
            f"<UpstreamPool {self.name} open={self.open}/{self.capacity} "
            f"idle={self._idle_count} {state}>"
        )
