"""The Postgres protocol plugin: a relay to the primary, a replayer for mirrors.

Registered through the ``mirrorgate`` entry-point group, like any third-party
plugin; it imports only the public API of ``gateway``.
"""
# Owns: the protocol class a `protocol = "postgres"` listener runs, its config
# keys, the listener-wide map of backend keys for CancelRequest routing, and the
# per-session choice of mirrors.
from __future__ import annotations

import asyncio
import logging
from typing import Any

import attrs

from gateway import (
    ListenerContext,
    Mirror,
    MirrorSet,
    NoOptions,
    ProtocolHandler,
    ProtocolRegistry,
    hookimpl,
)

from . import codec
from .framewalk import IMPLEMENTATION
from .relay import LANE, PgSession, lane_poller
from .replayer import PgReplayer, _send_cancel
from .statements import StatementRegistry

__all__ = ["PostgresMirrorOptions", "PostgresProtocol"]

log = logging.getLogger("mirrorgate.postgres")

# The largest message a mirror may send while the gateway logs in (the server's
# own cap is 1 GiB); after that its answers are stepped over, never held.
MIRROR_MAX_MESSAGE = codec.MAX_MESSAGE


def _fraction(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be between 0.0 and 1.0, not {value}")


@attrs.frozen
class PostgresMirrorOptions:
    """Keys a Postgres listener's [[listener.mirror]] adds."""

    exposure: float = attrs.field(default=1.0, converter=float, validator=_fraction)


class PostgresProtocol(ProtocolHandler):
    """Postgres wire protocol v3."""

    id = "postgres"
    url_schemes = ("postgres", "postgresql")
    ListenerOptions = NoOptions
    MirrorOptions = PostgresMirrorOptions

    def __init__(self, context: ListenerContext) -> None:
        super().__init__(context)
        self.sessions_by_key: dict[tuple[int, bytes], PgSession] = {}
        self.reconfigure()

    def reconfigure(self) -> None:
        # Both outcomes are exported from the start, for every mirror.
        for mirror in self.context.mirrors:
            for outcome in ("ok", "error"):
                mirror.stats.delivered.setdefault(outcome, 0)

    def client_protocol(self) -> asyncio.Protocol:
        return PgSession(self)

    def lane_poller(self) -> Any:
        """The epoll set where the C lanes of this listener's sessions own
        their sockets (relay.lane_poller: one per event loop); None where
        the lane is not built or does not read sockets."""
        return lane_poller()

    def open_mirrors(self, session: PgSession) -> MirrorSet:
        """Choose this session's mirrors (``exposure``, once per session)."""
        assert session.startup is not None
        statements = StatementRegistry()
        params = dict(session.startup.params)
        replayers: list[PgReplayer] = []

        def make(mirror: Mirror) -> PgReplayer:
            r = PgReplayer(mirror, self.context.pool_for(mirror), params, statements,
                           MIRROR_MAX_MESSAGE, session.peer)
            replayers.append(r)
            return r

        mirrors = self.context.open_mirrors(make)
        session.statements = statements
        session.replayers = replayers
        return mirrors

    def cancel(self, request: codec.CancelRequest) -> None:
        """Route a CancelRequest: to the primary always, to the session's mirrors if known."""
        primary = self.context.primary
        packet = codec.cancel_request(request.pid, request.key)
        loop = asyncio.get_running_loop()
        loop.create_task(_send_cancel(primary.host, primary.port, packet,
                                      primary.connect_timeout))
        session = self.sessions_by_key.get((request.pid, request.key))
        if session is not None:
            for replayer in session.replayers:
                replayer.cancel()


@hookimpl
def gateway_register_protocols(registry: ProtocolRegistry) -> None:
    registry.add(PostgresProtocol)


@hookimpl
def gateway_configured(config: object) -> None:
    log.info("postgres: frame headers read by the %s loop; unmirrored and dark sessions "
             "counted by %s", IMPLEMENTATION, LANE)
