# What /status says: the running gateway as one JSON-ready snapshot.
#
# Owns: the shape of the snapshot (gateway, listeners, their mirrors with
# counters, queue depth, lag, latency quantiles, health and settings), the
# estimate of a quantile from histogram buckets, and keeping secrets out of it:
# upstreams are shown by name and host:port (never a URL), and every option
# value that is a secret header's, or equal to a password of the config, is
# replaced by REDACTED.
# Must not know: HTTP (admin.py serves this), any protocol (a protocol's
# options are shown through attrs, whatever their fields), or how the counters
# are kept (accounting.py).
from __future__ import annotations

import enum
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .accounting import DropReason, Histogram
from .config_values import Address
from .mirror import Mirror
from .pool import UpstreamPool
from .protocol import Control, ListenerContext
from .secrets import REDACTED, is_secret_header, secret_values

__all__ = ["MirrorHealth", "mirror_health", "quantile", "snapshot"]

_clock = time.monotonic


class MirrorHealth(enum.Enum):
    """What a mirror's upstream is doing, as an operator would ask it."""

    UP = "up"  # mirror sessions or connections are open, no backoff pending
    BACKOFF = "backoff"  # the last connect failed: units are dropped until retry
    IDLE = "idle"  # nothing to replay and no connection open


def quantile(q: float, histogram: Histogram) -> float | None:
    """Estimate the ``q`` quantile (0..1) from the buckets, the way Prometheus's
    ``histogram_quantile`` does: linear within the bucket the rank falls in;
    the highest finite bound when it falls in +Inf.

    :returns: seconds, or None when nothing was observed.
    """
    cumulative = histogram.cumulative()
    total = cumulative[-1][1]
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _latency(histogram: Histogram) -> dict[str, Any]:
    cumulative = histogram.cumulative()
    return {
        "count": histogram.count,
        "sum": histogram.sum,
        "p50": quantile(0.5, histogram),
        "p99": quantile(0.99, histogram),
        # Cumulative counts per finite bound, then the total (+Inf): the
        # dashboard takes differences of these for a recent window.
        "le": list(histogram.bounds),
        "cumulative": [n for _, n in cumulative],
    }


class _Scrubber:
    """Makes option values JSON-ready and hides what is secret in them."""

    def __init__(self, secret_headers: Iterable[str], secrets: Iterable[str]) -> None:
        self.secret_headers = tuple(secret_headers)
        self.secrets = frozenset(s for s in secrets if s)

    def __call__(self, value: Any) -> Any:
        if attrs.has(type(value)):
            return self(attrs.asdict(value, recurse=True))
        if isinstance(value, Mapping):
            return {str(k): REDACTED if is_secret_header(str(k), self.secret_headers)
                    else self(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self(v) for v in value]
        if isinstance(value, enum.Enum):
            return self(value.value)
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        text = value if isinstance(value, str) else str(value)
        return REDACTED if text in self.secrets else text


def mirror_health(mirror: Mirror, pool: UpstreamPool[Any] | None) -> dict[str, Any]:
    """A mirror's health as /status and the admin console show it: ``state``
    (a MirrorHealth value), connect ``failures``, ``retry_in_seconds``."""
    failures = pool.failures if pool is not None else 0
    retry_at = pool.retry_at() if pool is not None else 0.0
    if retry_at:
        return {"state": MirrorHealth.BACKOFF.value, "failures": failures,
                "retry_in_seconds": max(0.0, retry_at - _clock())}
    busy = bool(mirror.sessions) or (pool is not None and pool.open > 0)
    state = MirrorHealth.UP if busy else MirrorHealth.IDLE
    return {"state": state.value, "failures": failures, "retry_in_seconds": 0.0}


def _mirror(mirror: Mirror, pool: UpstreamPool[Any] | None, scrub: _Scrubber) -> dict[str, Any]:
    st = mirror.stats
    config = mirror.config
    upstream = mirror.upstream
    return {
        "name": mirror.name,
        # Removed by a reload: its counters stay, its live queues drain.
        "retired": mirror.retired,
        "upstream": {"name": upstream.name, "host": upstream.host, "port": upstream.port,
                     "address": str(Address(upstream.host, upstream.port))},
        "offered": st.offered,
        "skipped": st.skipped,
        "delivered": dict(sorted(st.delivered.items())),
        "delivered_total": st.delivered_total,
        "dropped": {reason.value: st.dropped[reason] for reason in DropReason},
        "dropped_total": st.dropped_total,
        "queue_units": st.queued,
        "queue_bytes": st.queued_bytes,
        "in_flight": st.in_flight,
        "lag_seconds": mirror.lag(),
        "sessions": len(mirror.sessions),
        "latency": _latency(st.latency),
        "health": mirror_health(mirror, pool),
        "settings": {
            "timeout": config.timeout,
            "queue": config.queue,
            "queue_bytes": config.queue_bytes,
            "options": scrub(config.options) if config.options is not None else {},
        },
    }


def _listener(control: Control, ctx: ListenerContext, scrub: _Scrubber,
              clients: bool) -> dict[str, Any]:
    pools = control.upstream_pools()
    out: dict[str, Any] = {
        "name": ctx.name,
        "protocol": ctx.listener.protocol,
        "listen": str(ctx.listener.listen),
        "bound": control.bound(ctx),
        "primaries": [
            {"name": name, "address": str(Address(up.host, up.port))}
            for name, up in ctx.primaries.items()
        ],
        "client_connections": ctx.stats.client_connections,
        "primary_units": ctx.stats.primary_units,
        "primary_latency": _latency(ctx.stats.primary_latency),
        "mirrors": [_mirror(m, pools.get(m.upstream.name), scrub) for m in ctx.all_mirrors],
    }
    if clients:
        out["clients"] = [scrub(session.describe()) for session in list(ctx.sessions)]
    return out


def snapshot(control: Control, *, clients: bool = False) -> dict[str, Any]:
    """The gateway as an operator sees it, ready for ``json.dumps``.

    Counters of one snapshot are read in one synchronous step on the event
    loop, so they are consistent with each other (the accounting invariant
    holds within a snapshot). Nothing secret is in it: no URL, password or
    users table, and values of secret headers (``[admin] secret_headers`` and
    the always-secret ones) are REDACTED.

    :param clients: also list every client session (``ClientSession.describe``).
    """
    from . import __version__  # the package imports this module first

    config = control.config
    scrub = _Scrubber(config.admin.secret_headers, secret_values(config))
    now = time.time()
    return {
        "time": now,
        "gateway": {
            "version": __version__,
            "started": control.started,
            "uptime_seconds": max(0.0, now - control.started),
            "config": config.path,
        },
        "listeners": [_listener(control, ctx, scrub, clients) for ctx in control.listeners()],
    }
