# Running the gateway: listeners, the admin endpoint, signals, reload and shutdown.
#
# Owns: the process's task structure (one anyio task group holding every mirror
# worker), opening and closing listening sockets, live reload (SIGHUP or the
# admin listener: a new config applied without dropping a connection), and the
# shutdown sequence of design.md (stop accepting; let sessions finish and mirror
# queues drain within shutdown_timeout; count what is left as `shutdown` drops).
# Must not know: any protocol; listeners are served by the registered handler.
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import attrs

from .accounting import DropReason
from .admin import AdminServer
from .config import Config, ConfigError, Listener, Upstream, load_config
from .config_values import Address
from .plugins import ProtocolRegistry
from .pool import UpstreamPool
from .protocol import ListenerContext, ProtocolHandler, ReloadResult

__all__ = ["Gateway", "install_event_loop_policy", "run"]

log = logging.getLogger("mirrorgate")

_BACKLOG = 1024


def install_event_loop_policy() -> str:
    """Use uvloop where it is installed: design.md §3 measured the relay on it."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


class _Served:
    """One listener at run time: its context, protocol handler and socket."""

    __slots__ = ("context", "handler", "server")

    def __init__(self, context: ListenerContext, handler: ProtocolHandler,
                 server: asyncio.base_events.Server | None = None) -> None:
        self.context = context
        self.handler = handler
        self.server = server


class Gateway:
    """One configuration served: its listeners, pools and admin endpoint.

    It is also the operators' ``Control`` (gateway.protocol): what the admin
    listener and a protocol's admin console read, and ``reload``.
    """

    def __init__(self, config: Config, registry: ProtocolRegistry,
                 on_config: Callable[[Config], None] | None = None) -> None:
        self.config = config
        self.registry = registry
        self.pools: dict[str, UpstreamPool[Any]] = {}
        self.started = time.time()
        self.stopping = anyio.Event()
        self._served: list[_Served] = []      # in config order
        self._closing: list[_Served] = []     # removed by a reload, sessions finishing
        self._admin: AdminServer | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._on_config = on_config
        self._reload_lock = anyio.Lock()

    # -- Control: what the admin listener and consoles read --

    def listeners(self) -> list[ListenerContext]:
        """Serving listeners, then removed ones whose sessions or queues are
        still finishing (their counters stay exported until then)."""
        self._closing = [s for s in self._closing if _busy(s.context)]
        serving = [s.context for s in self._served]
        names = {c.name for c in serving}
        # A name a reload opened again is the new listener's alone.
        return [*serving, *(s.context for s in self._closing if s.context.name not in names)]

    def bound(self, context: ListenerContext) -> bool:
        for s in self._served:
            if s.context is context:
                return s.server is not None and s.server.is_serving()
        return False

    def upstream_pools(self) -> dict[str, UpstreamPool[Any]]:
        return self.pools

    async def reload(self) -> ReloadResult:
        """Read the config file again and apply it; see docs/operations.md.

        A config that does not validate, or a listener that cannot bind, is
        refused as a whole: the old config keeps serving.
        """
        async with self._reload_lock:
            result = await self._reload()
        if result.ok:
            for line in result.changes:
                log.info("reload: %s", line)
            log.info("reload: %s", result.message)
        else:
            log.error("reload refused, the old config keeps serving: %s", result.message)
        return result

    # -- serving --

    def _spawn(self, fn: Callable[[], Any]) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn)

    def _open(self, config: Config, listener: Listener) -> _Served:
        ctx = ListenerContext(config, listener, self.pools, self._spawn)
        ctx.control = self
        return _Served(ctx, self.registry[listener.protocol](ctx))

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
                    served = self._open(self.config, listener)
                    self._served.append(served)
                    served.server = await loop.create_server(
                        served.handler.client_protocol, listener.listen.host,
                        listener.listen.port, reuse_address=True, backlog=_BACKLOG)
                    log.info("listening on %s (%s), primary %s, mirrors %s",
                             listener.listen, listener.protocol, listener.primary,
                             ", ".join(m.name for m in listener.mirrors) or "none",
                             extra={"listener": listener.name, "upstream": listener.primary})
                admin = self.config.admin
                if admin.listen is not None:
                    self._admin = AdminServer(admin.listen.host, admin.listen.port, self)
                    await self._admin.start()
                    log.info("admin listener on %s", admin.listen)
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

    # -- reload --

    async def _reload(self) -> ReloadResult:
        path = self.config.path
        if path is None:
            return ReloadResult(False, "the gateway was not started from a config file")
        if self.stopping.is_set():
            return ReloadResult(False, "the gateway is shutting down")
        try:
            new = load_config(path, dict(self.registry.items()))
        except ConfigError as exc:
            return ReloadResult(False, str(exc))
        old_by_name = {s.context.name: s for s in self._served}
        for listener in new.listeners:
            was = old_by_name.get(listener.name)
            if was is not None and was.context.listener.protocol != listener.protocol:
                return ReloadResult(False, f"listener {listener.name!r}: its protocol cannot "
                                    f"change from {was.context.listener.protocol!r} to "
                                    f"{listener.protocol!r} on reload; give it a new name")
        # Bind every new address first: if one fails, nothing has changed.
        socks: dict[str, socket.socket] = {}
        admin: AdminServer | None = None
        try:
            for listener in new.listeners:
                was = old_by_name.get(listener.name)
                if was is None or was.context.listener.listen != listener.listen:
                    socks[listener.name] = _bind(listener.listen)
            if new.admin.listen is not None and new.admin.listen != self.config.admin.listen:
                admin = AdminServer(new.admin.listen.host, new.admin.listen.port, self)
                await admin.start()
        except OSError as exc:
            for sock in socks.values():
                sock.close()
            return ReloadResult(False, f"cannot listen: {exc}")
        changes = self._apply(new, old_by_name)
        loop = asyncio.get_running_loop()
        for served in self._served:
            bound = socks.get(served.context.name)
            if bound is None:
                continue
            old_server = served.server
            served.server = await loop.create_server(
                served.handler.client_protocol, sock=bound, backlog=_BACKLOG)
            if old_server is not None:
                old_server.close()
        if new.admin.listen != self.config.admin.listen:
            if self._admin is not None:
                await self._admin.close()
            self._admin = admin
            changes.append(f"admin listener: {_where(self.config.admin.listen)} -> "
                           f"{_where(new.admin.listen)}")
        self.config = new
        if self._on_config is not None:
            self._on_config(new)
        return ReloadResult(True, f"{path}: applied "
                            f"({len(changes)} change{'' if len(changes) == 1 else 's'})",
                            tuple(changes))

    def _apply(self, new: Config, old_by_name: dict[str, _Served]) -> list[str]:
        """Swap the config in, synchronously: no session runs in between."""
        changes = self._apply_upstreams(new)
        served: list[_Served] = []
        for listener in new.listeners:
            was = old_by_name.pop(listener.name, None)
            if was is None:
                served.append(self._open(new, listener))
                changes.append(f"listener {listener.name} ({listener.protocol}) opened on "
                               f"{listener.listen}")
                continue
            ctx = was.context
            before = ctx.listener
            mirrors_before = {m.name: m.config for m in ctx.all_mirrors}
            ctx.begin_reload(new, listener)
            was.handler.reconfigure()
            added, removed = ctx.end_reload()
            served.append(was)
            changes.extend(f"listener {ctx.name}: mirror {m} added" for m in added)
            changes.extend(f"listener {ctx.name}: mirror {m} removed" for m in removed)
            if before.listen != listener.listen:
                changes.append(f"listener {ctx.name}: moved from {before.listen} to "
                               f"{listener.listen}")
            keys = _differences(before, listener, skip={"listen", "mirrors", "options"})
            keys += _differences(before.options, listener.options, skip={"route"})
            if getattr(before.options, "route", None) != getattr(listener.options, "route", None):
                keys.append("routes changed")
            if keys:
                changes.append(f"listener {ctx.name}: {', '.join(keys)}")
            for mirror in ctx.mirrors:
                was_config = mirrors_before.get(mirror.name)
                if was_config is None or mirror.name in added:
                    continue
                keys = _differences(was_config, mirror.config, skip={"options", "name"})
                keys += _differences(was_config.options, mirror.config.options)
                if keys:
                    changes.append(f"listener {ctx.name}: mirror {mirror.name}: "
                                   f"{', '.join(keys)}")
        for gone in old_by_name.values():
            if gone.server is not None:
                gone.server.close()
            gone.context.accepting = False
            self._closing.append(gone)
            changes.append(f"listener {gone.context.name} closed "
                           f"({len(gone.context.sessions)} sessions finishing)")
        self._served = served
        return changes

    def _apply_upstreams(self, new: Config) -> list[str]:
        changes = []
        old = self.config.upstreams
        for name, upstream in new.upstreams.items():
            was = old.get(name)
            pool = self.pools.get(name)
            if was is None or pool is None:
                self.pools[name] = UpstreamPool(name, upstream.pool_size)
                changes.append(f"upstream {name} added")
            elif _address(was) != _address(upstream):
                pool.retire()
                self.pools[name] = UpstreamPool(name, upstream.pool_size)
                changes.append(f"upstream {name}: {was.host}:{was.port} -> "
                               f"{upstream.host}:{upstream.port} for new connections")
            elif was != upstream:
                pool.capacity = upstream.pool_size
                # Names only: a URL, password or users table is a secret.
                keys = [k for k in _fields(upstream) if getattr(was, k) != getattr(upstream, k)]
                changes.append(f"upstream {name}: {', '.join(keys)} changed "
                               "for new connections")
        for name in old:
            if name not in new.upstreams:
                pool = self.pools.pop(name, None)
                if pool is not None:
                    pool.retire()
                changes.append(f"upstream {name} removed")
        return changes

    # -- shutdown --

    def _everything(self) -> list[_Served]:
        return [*self._served, *self._closing]

    async def _close_servers(self) -> None:
        for served in self._everything():
            if served.server is not None:
                served.server.close()
            served.context.accepting = False

    async def _shutdown(self) -> None:
        timeout = self.config.general.shutdown_timeout
        log.info("shutting down: waiting up to %.1fs for sessions and mirror queues", timeout)
        await self._close_servers()
        everything = self._everything()
        contexts = [s.context for s in everything]
        with anyio.move_on_after(timeout):
            while any(_busy(c) for c in contexts):
                await anyio.sleep(0.05)
        left_sessions = sum(len(c.sessions) for c in contexts)
        before = _shutdown_drops(contexts)
        for ctx in contexts:
            for session in list(ctx.sessions):
                session.abort()
            for mirror in ctx.all_mirrors:
                for ms in list(mirror.sessions):
                    ms.abort(DropReason.SHUTDOWN)
        # Workers see their aborted queues and end; give them a moment to close
        # their mirror connections, then the task group cancels the rest.
        with anyio.move_on_after(1.0):
            while any(m.sessions for c in contexts for m in c.all_mirrors):
                await anyio.sleep(0.01)
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            for served in everything:
                await served.handler.aclose()
            if self._admin is not None:
                await self._admin.close()
        for pool in self.pools.values():
            pool.close_idle()
        # Units still in flight now are dropped as `shutdown` when the task
        # group cancels their workers, right after this line.
        in_flight = sum(m.stats.in_flight for c in contexts for m in c.all_mirrors)
        log.info("stopped: %d sessions cut, %d mirror units dropped as shutdown",
                 left_sessions, _shutdown_drops(contexts) - before + in_flight)


def _busy(ctx: ListenerContext) -> bool:
    return bool(ctx.sessions) or any(m.sessions for m in ctx.all_mirrors)


def _shutdown_drops(contexts: list[ListenerContext]) -> int:
    return sum(m.stats.dropped[DropReason.SHUTDOWN] for c in contexts for m in c.all_mirrors)


def _fields(obj: object) -> list[str]:
    cls = type(obj)
    if not attrs.has(cls):
        return []
    return [f.name for f in attrs.fields(cls)]


def _differences(old: object, new: object, skip: frozenset[str] | set[str] = frozenset()
                 ) -> list[str]:
    """``key old -> new`` for each changed setting of two attrs config objects
    (``key changed`` for tables and lists: they may hold secret header values)."""
    out = []
    for key in _fields(new):
        if key in skip or not hasattr(old, key):
            continue
        a, b = getattr(old, key), getattr(new, key)
        if a == b:
            continue
        if all(x is None or isinstance(x, int | float | str) for x in (a, b)):
            out.append(f"{key} {_show(a)} -> {_show(b)}")
        else:
            out.append(f"{key} changed")
    return out


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _address(upstream: Upstream) -> tuple[str, str, int]:
    return upstream.scheme, upstream.host, upstream.port


def _where(address: Address | None) -> str:
    return "off" if address is None else str(address)


def _bind(address: Address) -> socket.socket:
    """A listening socket, bound now, so a reload knows before it changes anything."""
    infos = socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _watch_signals(gateway: Gateway) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("received SIGHUP: reloading %s", gateway.config.path)
                await gateway.reload()
                continue
            log.info("received %s", signal.Signals(signum).name)
            gateway.stop()
            return


async def run(config: Config, registry: ProtocolRegistry,
              on_config: Callable[[Config], None] | None = None) -> None:
    """Serve ``config`` until SIGTERM or SIGINT; SIGHUP reloads it.

    :param on_config: called with each config a reload applies (the CLI
        reconfigures logging with it).
    """
    gateway = Gateway(config, registry, on_config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, gateway)
        await gateway.serve()  # returns after the shutdown sequence
        tg.cancel_scope.cancel()
