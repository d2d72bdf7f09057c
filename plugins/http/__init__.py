"""The HTTP/1.1 protocol plugin: a relay to the primary, a fire-and-forget copy to mirrors.

Registered through the ``mirrorgate`` entry-point group, like any third-party
plugin; it imports only the public API of ``gateway``.
"""
# Owns: the protocol class a `protocol = "http"` listener runs: its routes at
# run time, its idle primary connections, and the sweep that times out slow
# clients and late primaries. Config keys are in options.py, routing and
# sampling in routing.py, the bytes in relay.py and replayer.py, parsing in
# parse.py.
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from gateway import ListenerContext, ProtocolHandler, ProtocolRegistry, hookimpl

from .options import HttpListenerOptions, HttpMirrorOptions, Route
from .parse import IMPLEMENTATION
from .relay import SWEEP_INTERVAL, HttpSession, PrimaryPool
from .routing import RouteTarget

if TYPE_CHECKING:
    from gateway.config import Upstream

__all__ = ["HttpListenerOptions", "HttpMirrorOptions", "HttpProtocol", "Route"]

log = logging.getLogger("mirrorgate.http")

OUTCOMES = ("2xx", "3xx", "4xx", "5xx")


class HttpProtocol(ProtocolHandler):
    """HTTP/1.1."""

    id = "http"
    url_schemes = ("http",)
    ListenerOptions = HttpListenerOptions
    MirrorOptions = HttpMirrorOptions

    def __init__(self, context: ListenerContext) -> None:
        super().__init__(context)
        self.routes: list[RouteTarget] = []
        self.default = RouteTarget(b"", frozenset(), None, context.primary, [])
        self._build({})
        context.spawn(self._sweep)

    def reconfigure(self) -> None:
        """A reload: new routes, mirrors and options from the next request.
        Idle primary connections are kept where a route's primary is unchanged."""
        old = {_pool_key(t.primary): t.pool for t in [*self.routes, self.default]}
        kept = self._build(dict(old))
        for key, pool in old.items():
            if key not in kept:
                pool.retire()

    def _build(self, pools: dict[tuple[object, ...], PrimaryPool]) -> set[tuple[object, ...]]:
        context = self.context
        options: HttpListenerOptions = context.options  # type: ignore[assignment]
        self.options = options
        routes: list[RouteTarget] = []
        for route in options.route:
            mirrors = [context.add_mirror(m) for m in route.mirror]
            routes.append(RouteTarget(
                route.prefix.encode(), frozenset(m.upper().encode() for m in route.methods),
                None if route.host is None else route.host.lower().encode(),
                context.upstream(route.primary), mirrors))
        listener_mirrors = [m for m in context.mirrors
                            if all(m not in r.mirrors for r in routes)]
        default = RouteTarget(b"", frozenset(), None, context.primary, listener_mirrors)
        for mirror in context.mirrors:
            for outcome in OUTCOMES:
                mirror.stats.delivered.setdefault(outcome, 0)
        kept = set()
        for target in [*routes, default]:
            key = _pool_key(target.primary)
            if key not in pools:
                pools[key] = PrimaryPool(target.primary)
            else:
                kept.add(key)
            target.pool = pools[key]
        self.routes, self.default = routes, default
        return kept

    async def _sweep(self) -> None:
        """Time out slow request heads, idle connections and late primaries.

        One pass per listener a few times a second costs less than a timer per
        request on the hot path.
        """
        context = self.context
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            options = self.options  # a reload may have changed them
            head_timeout = context.startup_timeout
            now = time.monotonic()
            accepting = context.accepting
            for session in list(context.sessions):
                if isinstance(session, HttpSession):
                    session.sweep(now, head_timeout, options.idle_timeout,
                                  options.primary_timeout, accepting)

    def route(self, method: bytes, target: bytes, host: bytes | None) -> RouteTarget:
        for r in self.routes:
            if r.matches(method, target, host):
                return r
        return self.default

    def client_protocol(self) -> asyncio.Protocol:
        return HttpSession(self)

    async def aclose(self) -> None:
        for target in [*self.routes, self.default]:
            target.pool.close()


def _pool_key(upstream: Upstream) -> tuple[object, ...]:
    """Routes whose primary is the same server share idle connections."""
    return (upstream.name, upstream.host, upstream.port, upstream.pool_size,
            upstream.connect_timeout)


@hookimpl
def gateway_register_protocols(registry: ProtocolRegistry) -> None:
    registry.add(HttpProtocol)


@hookimpl
def gateway_configured(config: object) -> None:
    log.info("http: requests parsed by %s", IMPLEMENTATION)
