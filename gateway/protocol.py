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
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from .accounting import ListenerStats
from .mirror import Mirror, MirrorSet, Replayer, sample
from .pool import UpstreamPool

if TYPE_CHECKING:
    from .config import Config, Listener, Upstream
    from .config import Mirror as MirrorConfig

__all__ = ["ClientSession", "ListenerContext", "NoOptions", "ProtocolHandler"]


@attrs.frozen
class NoOptions:
    """Options class of a protocol that adds no config keys."""


class ClientSession(abc.ABC):
    """What the core needs of a live client session: a way to end it."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Close the client and its upstream connections now (shutdown deadline)."""


class ListenerContext:
    """Everything the core gives one listener's protocol handler."""

    def __init__(
        self,
        config: Config,
        listener: Listener,
        pools: dict[str, UpstreamPool[Any]],
        spawn: Callable[[Callable[[], Any]], None],
    ) -> None:
        self.config = config
        self.listener = listener
        self.name: str = listener.name
        self.options = listener.options
        self.primary: Upstream = config.upstreams[listener.primary]
        self.startup_timeout: float = config.general.startup_timeout
        self.stats = ListenerStats(listener.name)
        self.pools = pools
        self.spawn = spawn
        self.mirrors: list[Mirror] = [
            Mirror(listener.name, m, config.upstreams[m.upstream], spawn)
            for m in listener.mirrors
        ]
        self.sessions: set[ClientSession] = set()
        self.accepting = True

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
            take = sampled(mirror) if sampled else sample(
                getattr(mirror.config.options, "exposure", 1.0))
            if take:
                sessions.append(mirror.open_session(replayer(mirror)))
            else:
                skipped.append(mirror.stats)
        return MirrorSet(sessions, skipped)

    def add_mirror(self, config: MirrorConfig) -> Mirror:
        """Run a mirror declared outside ``[[listener.mirror]]`` (in a protocol's
        own tables, such as an HTTP route's), counted and drained with the others.
        """
        mirror = Mirror(self.name, config, self.config.upstreams[config.upstream], self.spawn)
        self.mirrors.append(mirror)
        return mirror

    def upstream(self, name: str) -> Upstream:
        """An upstream by name (a protocol's own tables may name other primaries)."""
        return self.config.upstreams[name]

    def pool_for(self, mirror: Mirror) -> UpstreamPool[Any]:
        return self.pools[mirror.upstream.name]

    def __repr__(self) -> str:
        return (
            f"<ListenerContext {self.name} clients={len(self.sessions)} "
            f"mirrors={[m.name for m in self.mirrors]}>"
        )


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

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """The listener is closing and its sessions are gone: release what is left."""
