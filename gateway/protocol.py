# The contract between the core and a protocol plugin, at run time.
#
# Owns: ProtocolHandler (what a plugin subclasses, one instance per listener) and
# ListenerContext (what the core hands it: the primary, the mirrors, counters,
# limits, and the means to open mirror sessions and spawn tasks).
# Must not know: any protocol. The relay bytes move through the asyncio Protocol
# that ``client_protocol`` returns: design.md §3 measured anyio byte streams at
# 0.6x of pgbouncer against 0.95x for Protocol callbacks on uvloop.
from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs

from .accounting import ListenerStats, MirrorStats
from .mirror import Mirror, MirrorSession, MirrorSet, Replayer, sample
from .pool import UpstreamPool

if TYPE_CHECKING:
    from .config import Config, Listener, Upstream
    from .config import Mirror as MirrorConfig

__all__ = ["ClientSession", "Control", "ListenerContext", "NoOptions", "ProtocolHandler",
           "ReloadResult"]


@attrs.frozen
class NoOptions:
    """Options class of a protocol that adds no config keys."""


class ClientSession(abc.ABC):
    """What the core needs of a live client session: a way to end it, and what
    to show of it to an operator."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Close the client and its upstream connections now (shutdown deadline)."""

    def describe(self) -> dict[str, Any]:
        """The session for SHOW CLIENTS and /status: JSON-ready values, never a
        secret (say ``peer``, ``since`` as a Unix time, ``user``, ``database``,
        ``mirrors``: the names of the mirrors it is mirrored to)."""
        return {}


@attrs.frozen
class ReloadResult:
    """What a reload did: ``ok`` False means the old config still serves and
    ``message`` says why (with the file's line, for a config that does not
    validate); ``changes`` lists what was applied, one line each."""

    ok: bool
    message: str
    changes: tuple[str, ...] = ()


class Control(Protocol):
    """What the running gateway offers its operators: the admin listener and a
    protocol's admin console (``ListenerContext.control``)."""

    @property
    def config(self) -> Config:
        """The configuration serving now."""

    @property
    def started(self) -> float:
        """When the gateway started serving (Unix time)."""

    def listeners(self) -> list[ListenerContext]:
        """The listeners serving now, in config order."""

    def bound(self, context: ListenerContext) -> bool:
        """Whether the listener's socket is open."""

    def upstream_pools(self) -> dict[str, UpstreamPool[Any]]:
        """Mirror connection pools by upstream name (reachability, backoff)."""

    async def reload(self) -> ReloadResult:
        """Read the config file again and apply it (see docs/operations.md)."""


class ListenerContext:
    """Everything the core gives one listener's protocol handler."""

    def __init__(
        self,
        config: Config,
        listener: Listener,
        pools: dict[str, UpstreamPool[Any]],
        spawn: Callable[[Callable[[], Any]], None],
    ) -> None:
        self.name: str = listener.name
        self.stats = ListenerStats(listener.name)
        self.pools = pools
        self.spawn = spawn
        self._take(config, listener)
        self.mirrors: list[Mirror] = [
            Mirror(listener.name, m, config.upstreams[m.upstream], spawn)
            for m in listener.mirrors
        ]
        self.sessions: set[ClientSession] = set()
        self.accepting = True
        # Set by the gateway: its operator interface (None in unit tests).
        self.control: Control | None = None
        # Mirrors a reload removed: their counters stay exported, their live
        # queues drain; a reload that names them again brings them back.
        self.retired: list[Mirror] = []
        # Bumped by each reload: sessions compare it at their next boundary.
        self.generation = 0
        self._reloading: dict[str, Mirror] | None = None  # by name, during a reload
        self._previous: list[str] = []

    def _take(self, config: Config, listener: Listener) -> None:
        """What the context reads from the config, at start and at each reload."""
        self.config = config
        self.listener = listener
        self.options = listener.options
        self.primary: Upstream = config.upstreams[listener.primary]
        self.startup_timeout: float = config.general.startup_timeout
        # Upstreams this listener sends client traffic to (its own primary and
        # those of a protocol's routes, recorded by ``upstream``): /readyz
        # checks that they answer.
        self.primaries: dict[str, Upstream] = {self.primary.name: self.primary}

    # -- client sessions --

    def session_opened(self, session: ClientSession) -> bool:
        """Count a session in; False when ``max_clients`` are connected already."""
        if len(self.sessions) >= self.listener.max_clients or not self.accepting:
            return False
        self.sessions.add(session)
        self.stats.client_connections = len(self.sessions)
        return True

    def session_closed(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        self.stats.client_connections = len(self.sessions)

    # -- mirrors --

    def open_mirrors(
        self,
        replayer: Callable[[Mirror], Replayer],
        sampled: Callable[[Mirror], bool] | None = None,
        mirrors: Iterable[Mirror] | None = None,
    ) -> MirrorSet:
        """Open one mirror session per sampled mirror for a new client session.

        :param replayer: makes the protocol's replayer for one mirror.
        :param sampled: whether this session is mirrored to that mirror; the
            default reads a float ``exposure`` from the mirror's options.
        :param mirrors: the mirrors to consider (default: the listener's).
        """
        sessions, skipped = [], []
        for mirror in self.mirrors if mirrors is None else mirrors:
            exposure = 1.0 if sampled else _exposure(mirror)
            if sampled(mirror) if sampled else sample(exposure):
                session = mirror.open_session(replayer(mirror))
                session.sampled_at = exposure
                sessions.append(session)
            else:
                skipped.append(mirror.stats)
        return MirrorSet(sessions, skipped)

    def still_sampled(self, session: MirrorSession) -> bool:
        """After a reload: whether a live session keeps mirroring to this
        mirror. Not if the mirror was removed; if its ``exposure`` was lowered,
        the same share of sessions as new ones would get (none for 0); a raise
        adds no mirror to a session that sampling left out."""
        mirror = session.mirror
        if mirror.retired:
            return False
        now = _exposure(mirror)
        was = session.sampled_at
        if now >= was:
            return True
        session.sampled_at = now
        return sample(now / was)

    def serving(self, skipped: list[MirrorStats]) -> list[MirrorStats]:
        """After a reload: of the mirrors a session counts its units skipped
        for, those the listener still has (a removed mirror's counts stop)."""
        live = {id(m.stats) for m in self.mirrors}
        return [st for st in skipped if id(st) in live]

    @property
    def all_mirrors(self) -> list[Mirror]:
        """Serving and retired mirrors: what metrics export and shutdown drains."""
        return [*self.mirrors, *self.retired]

    def add_mirror(self, config: MirrorConfig) -> Mirror:
        """Run a mirror declared outside ``[[listener.mirror]]`` (in a protocol's
        own tables, such as an HTTP route's), counted and drained with the others.

        During ``ProtocolHandler.reconfigure`` it returns the running mirror of
        that name, with the new settings, so its counters carry on.
        """
        upstream = self.config.upstreams[config.upstream]
        if self._reloading is not None:
            known = self._reloading.get(config.name)
            if known is not None:
                known.reconfigure(config, upstream)
                if known not in self.mirrors:
                    self.mirrors.append(known)
                return known
        mirror = Mirror(self.name, config, upstream, self.spawn)
        self.mirrors.append(mirror)
        return mirror

    def upstream(self, name: str) -> Upstream:
        """A primary by name that a protocol's own tables name (an HTTP route's)."""
        upstream = self.config.upstreams[name]
        self.primaries[name] = upstream
        return upstream

    def pool_for(self, mirror: Mirror) -> UpstreamPool[Any]:
        return self.pools[mirror.upstream.name]

    # -- reload --

    def begin_reload(self, config: Config, listener: Listener) -> None:
        """Take a new config for this listener (same name and protocol): the
        listener's own mirrors are matched by name; the protocol handler's
        ``reconfigure`` then claims those of its own tables with
        ``add_mirror``, and ``end_reload`` retires the rest."""
        self._take(config, listener)
        self._previous = [m.name for m in self.mirrors]
        self._reloading = {m.name: m for m in self.all_mirrors}
        self.mirrors = []
        for m in listener.mirrors:
            self.add_mirror(m)

    def end_reload(self) -> tuple[list[str], list[str]]:
        """Retire the mirrors no table claimed; sessions see the change at
        their next boundary. Returns the names (added, removed)."""
        known = self._reloading or {}
        self._reloading = None
        for mirror in known.values():
            mirror.retired = mirror not in self.mirrors
        self.retired = [m for m in known.values() if m.retired]
        self.generation += 1
        names = [m.name for m in self.mirrors]
        return ([n for n in names if n not in self._previous],
                [n for n in self._previous if n not in names])

    def __repr__(self) -> str:
        return (
            f"<ListenerContext {self.name} clients={len(self.sessions)} "
            f"mirrors={[m.name for m in self.mirrors]}>"
        )


def _exposure(mirror: Mirror) -> float:
    return float(getattr(mirror.config.options, "exposure", 1.0))


class ProtocolHandler(abc.ABC):
    """A protocol a listener speaks. Plugins subclass it and register the class.

    One instance is made per listener, with that listener's context.
    """

    id: ClassVar[str]
    url_schemes: ClassVar[tuple[str, ...]]
    ListenerOptions: ClassVar[type] = NoOptions
    MirrorOptions: ClassVar[type] = NoOptions

    def __init__(self, context: ListenerContext) -> None:
        self.context = context

    @abc.abstractmethod
    def client_protocol(self) -> asyncio.Protocol:
        """A new asyncio Protocol for one accepted client connection."""

    def reconfigure(self) -> None:  # noqa: B027 - optional hook
        """A reload gave the context a new config (``context.listener``,
        ``options``, ``primary``, mirrors). Rebuild what was derived from it;
        claim mirrors of the protocol's own tables with ``context.add_mirror``.
        Live sessions pick the change up at their next boundary, where they
        compare ``context.generation``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """The listener is closing and its sessions are gone: release what is left."""
