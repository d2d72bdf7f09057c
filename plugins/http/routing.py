# Which primary and mirrors a request goes to, and whether a mirror takes it.
#
# Owns: routes at run time (prefix, methods, host; first match wins, the
# listener's own primary and mirrors otherwise) and the per-request sampling
# decision (`percent`, consistent by `sample_by`).
# Must not know: how the request's bytes move.
from __future__ import annotations

import random
import zlib
from typing import TYPE_CHECKING, Any

from gateway import Mirror

if TYPE_CHECKING:
    from gateway.config import Upstream

    from .options import HttpMirrorOptions

__all__ = ["RouteTarget", "sampled"]


class RouteTarget:
    """A route at run time: what it matches, its primary and its mirrors."""

    __slots__ = ("prefix", "methods", "host", "primary", "mirrors", "pool")

    def __init__(self, prefix: bytes, methods: frozenset[bytes], host: bytes | None,
                 primary: Upstream, mirrors: list[Mirror]) -> None:
        self.prefix = prefix
        self.methods = methods  # upper case, as configured (HTTP methods are case-sensitive)
        self.host = host
        self.primary = primary
        self.mirrors = mirrors
        self.pool: Any = None  # the relay's idle primary connections (relay.PrimaryPool)

    def matches(self, method: bytes, target: bytes, host: bytes | None) -> bool:
        if not target.startswith(self.prefix):
            return False
        if self.methods and method not in self.methods:  # methods are case-sensitive
            return False
        want = self.host
        if want is not None:
            if host is None:
                return False
            host = host.lower()
            if host != want and not (_without_port(want) == want and _without_port(host) == want):
                return False
        return True


def _without_port(host: bytes) -> bytes:
    if host.startswith(b"["):  # [v6]:port
        return host[:host.find(b"]") + 1]
    return host.rsplit(b":", 1)[0]


def sampled(mirror: Mirror, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether this request goes to ``mirror`` (`percent`, `sample_by`)."""
    options: HttpMirrorOptions = mirror.config.options
    percent = options.percent
    if percent >= 100.0:
        return True
    if percent <= 0.0:
        return False
    key = options.sample_by
    if key is not None:
        name = key.lower().encode()
        for n, v in headers:
            if n.lower() == name:
                # Consistent: the same value is always in or always out.
                return zlib.crc32(v) % 10000 < percent * 100
        # No such header: sampled at random, like a request with no tenant.
    return random.random() * 100.0 < percent
