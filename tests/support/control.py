# A stand-in for the running gateway's operator interface, without sockets.
#
# Owns: StubControl, the gateway.protocol.Control that unit tests of /status
# and of the Postgres console read: real ListenerContexts and UpstreamPools
# built from a config, with readiness and reload answers the test sets.
from __future__ import annotations

from typing import Any

from gateway.config import Config
from gateway.mirror import Mirror
from gateway.pool import UpstreamPool
from gateway.protocol import ListenerContext, ReloadResult


class StubControl:
    """The Control interface over listener contexts built from ``config``.

    :param started: the Unix time it reports as the gateway's start.
    """

    def __init__(self, config: Config, started: float = 1_700_000_000.0) -> None:
        self.config = config
        self.started = started
        self.pools: dict[str, UpstreamPool[Any]] = {
            name: UpstreamPool(name, up.pool_size) for name, up in config.upstreams.items()}
        self.contexts = [ListenerContext(config, listener, self.pools, lambda fn: None)
                         for listener in config.listeners]
        for ctx in self.contexts:
            ctx.control = self  # type: ignore[assignment]
        self.unbound: set[str] = set()  # names of listeners bound() says are not
        # What reload() answers, in turn; an applied reload once they run out.
        self.reloads: list[ReloadResult] = []

    def listeners(self) -> list[ListenerContext]:
        return list(self.contexts)

    def bound(self, context: ListenerContext) -> bool:
        return context.name not in self.unbound

    def upstream_pools(self) -> dict[str, UpstreamPool[Any]]:
        return self.pools

    async def reload(self) -> ReloadResult:
        return self.reloads.pop(0) if self.reloads else ReloadResult(True, "reloaded")

    def mirror(self, listener: str, name: str) -> Mirror:
        ctx = next(c for c in self.contexts if c.name == listener)
        return next(m for m in ctx.mirrors if m.name == name)
