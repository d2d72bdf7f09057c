# Running the gateway: listeners, the admin endpoint, signals and shutdown.
#
# Owns: the process's task structure (one anyio task group holding every mirror
# worker), opening and closing listening sockets, and the shutdown sequence of
# design.md (stop accepting; let sessions finish and mirror queues drain within
# shutdown_timeout; count what is left as `shutdown` drops).
# Must not know: any protocol; listeners are served by the registered handler.
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from .accounting import DropReason
from .admin import AdminServer
from .config import Config
from .plugins import ProtocolRegistry
from .pool import UpstreamPool
from .protocol import ListenerContext, ProtocolHandler

__all__ = ["Gateway", "install_event_loop_policy", "run"]

log = logging.getLogger("mirrorgate")


def install_event_loop_policy() -> str:
    """Use uvloop where it is installed: design.md §3 measured the relay on it."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


class Gateway:
    """One configuration served: its listeners, pools and admin endpoint."""

    def __init__(self, config: Config, registry: ProtocolRegistry) -> None:
        self.config = config
        self.registry = registry
        self.contexts: list[ListenerContext] = []
        self.handlers: list[ProtocolHandler] = []
        self.pools: dict[str, UpstreamPool[Any]] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self._admin: AdminServer | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.stopping = anyio.Event()

    def _spawn(self, fn: Callable[[], Any]) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Serve until ``stop`` is called (or a signal arrives), then shut down."""
        loop = asyncio.get_running_loop()
        for name, upstream in self.config.upstreams.items():
            self.pools[name] = UpstreamPool(name, upstream.pool_size)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                for listener in self.config.listeners:
                    ctx = ListenerContext(self.config, listener, self.pools, self._spawn)
                    handler = self.registry[listener.protocol](ctx)
                    server = await loop.create_server(
                        handler.client_protocol, listener.listen.host, listener.listen.port,
                        reuse_address=True, backlog=1024)
                    self.contexts.append(ctx)
                    self.handlers.append(handler)
                    self._servers.append(server)
                    log.info("listener %s (%s) on %s, primary %s, mirrors %s",
                             listener.name, listener.protocol, listener.listen,
                             listener.primary, [m.name for m in listener.mirrors] or "none")
                admin = self.config.admin
                if admin.listen is not None:
                    self._admin = AdminServer(admin.listen.host, admin.listen.port,
                                              lambda: self.contexts)
                    await self._admin.start()
                    log.info("admin on %s", admin.listen)
            except BaseException:
                await self._close_servers()
                tg.cancel_scope.cancel()
                raise
            task_status.started()
            await self.stopping.wait()
            await self._shutdown()
            tg.cancel_scope.cancel()

    def stop(self) -> None:
        self.stopping.set()

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        for ctx in self.contexts:
            ctx.accepting = False

    def _busy(self) -> bool:
        for ctx in self.contexts:
            if ctx.sessions:
                return True
            for mirror in ctx.mirrors:
                if mirror.sessions:
                    return True
        return False

    async def _shutdown(self) -> None:
        timeout = self.config.general.shutdown_timeout
        log.info("shutting down: waiting up to %.1fs for sessions and mirror queues", timeout)
        await self._close_servers()
        with anyio.move_on_after(timeout):
            while self._busy():
                await anyio.sleep(0.05)
        left_sessions = sum(len(c.sessions) for c in self.contexts)
        before = self._shutdown_drops()
        for ctx in self.contexts:
            for session in list(ctx.sessions):
                session.abort()
            for mirror in ctx.mirrors:
                for ms in list(mirror.sessions):
                    ms.abort(DropReason.SHUTDOWN)
        # Workers see their aborted queues and end; give them a moment to close
        # their mirror connections, then the task group cancels the rest.
        with anyio.move_on_after(1.0):
            while any(m.sessions for c in self.contexts for m in c.mirrors):
                await anyio.sleep(0.01)
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            for handler in self.handlers:
                await handler.aclose()
            if self._admin is not None:
                await self._admin.close()
        for pool in self.pools.values():
            pool.close_idle()
        # Units still in flight now are dropped as `shutdown` when the task
        # group cancels their workers, right after this line.
        in_flight = sum(m.stats.in_flight for c in self.contexts for m in c.mirrors)
        log.info("stopped: %d sessions cut, %d mirror units dropped as shutdown",
                 left_sessions, self._shutdown_drops() - before + in_flight)

    def _shutdown_drops(self) -> int:
        return sum(m.stats.dropped[DropReason.SHUTDOWN]
                   for c in self.contexts for m in c.mirrors)


async def _watch_signals(gateway: Gateway) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            gateway.stop()
            return


async def run(config: Config, registry: ProtocolRegistry) -> None:
    """Serve ``config`` until SIGTERM or SIGINT."""
    gateway = Gateway(config, registry)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, gateway)
        await gateway.serve()  # returns after the shutdown sequence
        tg.cancel_scope.cancel()
