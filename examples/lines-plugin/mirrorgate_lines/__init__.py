"""mirrorgate-lines: a line protocol for mirrorgate, written as a third-party plugin.

A ``protocol = "lines"`` listener relays the bytes a client sends to the
primary, and the primary's answers back, unchanged. Each newline-terminated
line the client sends is one unit, offered to the mirrors; the replayer writes
the line to its mirror and reads one line back. Upstreams are ``tcp://host:port``.
"""
# Owns: the `lines` protocol class, its config keys, the client session and the
# mirror replayer. Imports nothing from `gateway` but its public names.
from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import attrs

from gateway import (
    ClientSession,
    ListenerContext,
    Mirror,
    MirrorError,
    MirrorSession,
    MirrorSet,
    MirrorTimeout,
    MirrorUnavailable,
    ProtocolHandler,
    ProtocolRegistry,
    Replayer,
    Unit,
    UpstreamPool,
    hookimpl,
)

__all__ = ["LinesProtocol", "gateway_register_protocols"]

_NL = b"\n"
_POOL_KEY = "lines"  # every mirror connection of this protocol is interchangeable


def _at_least_one(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


def _fraction(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be between 0.0 and 1.0, got {value}")


@attrs.frozen
class LinesListenerOptions:
    """Keys a ``lines`` [[listener]] table adds."""

    max_line: int = attrs.field(default=65536, validator=_at_least_one)


@attrs.frozen
class LinesMirrorOptions:
    """Keys a ``lines`` [[listener.mirror]] table adds."""

    exposure: float = attrs.field(default=1.0, validator=_fraction)


class LinesProtocol(ProtocolHandler):
    """Newline-terminated lines over TCP. One instance per listener."""

    id = "lines"
    url_schemes = ("tcp",)
    ListenerOptions = LinesListenerOptions
    MirrorOptions = LinesMirrorOptions

    def __init__(self, context: ListenerContext) -> None:
        super().__init__(context)
        for mirror in context.mirrors:  # export both outcomes from the first scrape
            for outcome in ("ok", "error"):
                mirror.stats.delivered.setdefault(outcome, 0)

    def client_protocol(self) -> asyncio.Protocol:
        return LineSession(self.context)


class _PrimaryLink(asyncio.Protocol):
    """The gateway's connection to the primary, for one client session."""

    def __init__(self, session: LineSession) -> None:
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session.primary_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.primary_lost()

    def pause_writing(self) -> None:  # the primary reads slowly: stop reading the client
        self.session.pause_client(True)

    def resume_writing(self) -> None:
        self.session.pause_client(False)


class LineSession(asyncio.Protocol, ClientSession):
    """One client connection: relays bytes, cuts lines into units."""

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        assert isinstance(ctx.options, LinesListenerOptions)  # this listener's keys
        self.max_line = ctx.options.max_line
        self.client: asyncio.Transport | None = None
        self.primary: asyncio.Transport | None = None
        self.mirrors: MirrorSet | None = None
        self.early: list[bytes] = []  # client bytes that came while the primary connected
        self.partial = b""  # the start of a line not yet complete
        self.sent: collections.deque[float] = collections.deque()  # lines awaiting an answer
        self.registered = False
        self.client_eof = False
        self.closed = False
        self.connecting: asyncio.Task[None] | None = None

    # -- the client side --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport  # type: ignore[assignment]
        if not self.ctx.session_opened(self):
            self.fail(b"ERR too many clients")
            return
        self.registered = True
        self.connecting = asyncio.get_running_loop().create_task(self.connect())

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.primary is None:
            self.early.append(data)
            if sum(map(len, self.early)) > self.max_line:
                self.fail(b"ERR too much data before the primary was ready")
            return
        self.client_data(data)

    def eof_received(self) -> bool:
        # The client has sent all it will: pass the half-close on to the primary
        # (once connected) and keep relaying its answers until it closes too.
        self.client_eof = True
        if self.primary is not None:
            self.primary.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.end()

    # -- the primary side --

    async def connect(self) -> None:
        primary = self.ctx.primary
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(primary.connect_timeout):
                transport, _ = await loop.create_connection(
                    lambda: _PrimaryLink(self), primary.host, primary.port)
        except (OSError, TimeoutError):
            self.fail(b"ERR primary unreachable")
            return
        if self.closed:
            transport.close()
            return
        self.primary = transport
        self.mirrors = self.ctx.open_mirrors(self.replayer)
        early, self.early = self.early, []
        for data in early:
            self.client_data(data)
        if self.client_eof and not self.closed:
            transport.write_eof()

    def replayer(self, mirror: Mirror) -> LineReplayer:
        return LineReplayer(mirror, self.ctx.pool_for(mirror), self.max_line)

    def client_data(self, data: bytes) -> None:
        assert self.primary is not None
        self.primary.write(data)  # the exact bytes, at once: the primary never waits
        if _NL not in data:
            self.partial += data
        else:
            lines = (self.partial + data).split(_NL)
            self.partial = lines.pop()  # b"" when data ended with a newline
            now = time.monotonic()
            for line in lines:
                self.sent.append(now)
                if self.mirrors is not None:
                    self.mirrors.offer(Unit(line + _NL))  # never waits; a full queue drops
        if len(self.partial) > self.max_line:
            self.fail(b"ERR line too long")

    def primary_data(self, data: bytes) -> None:
        if self.client is None or self.client.is_closing():
            return
        self.client.write(data)
        stats = self.ctx.stats
        now = time.monotonic()
        for _ in range(data.count(_NL)):  # one answer line per line sent
            if self.sent:
                stats.primary_units += 1
                stats.primary_latency.observe(now - self.sent.popleft())

    def primary_lost(self) -> None:
        if self.client is not None:
            self.client.close()  # after what the primary sent last
        self.end()

    def pause_client(self, pause: bool) -> None:
        client = self.client
        if client is None or client.is_closing():
            return
        if pause:
            client.pause_reading()
        else:
            client.resume_reading()

    # -- ending --

    def fail(self, message: bytes) -> None:
        """The gateway's own answer: one error line, then close."""
        if self.client is not None and not self.client.is_closing():
            self.client.write(message + _NL)
            self.client.close()
        self.end()

    def end(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.primary is not None:
            self.primary.close()
        if self.mirrors is not None:
            self.mirrors.close()  # the workers deliver what is queued, then close
        if self.registered:
            self.ctx.session_closed(self)

    def abort(self) -> None:
        if self.client is not None:
            self.client.abort()
        if self.primary is not None:
            self.primary.abort()
        if self.connecting is not None:
            self.connecting.cancel()
        self.end()

    def __repr__(self) -> str:
        return (f"<LineSession closed={self.closed} unanswered={len(self.sent)} "
                f"mirrors={self.mirrors!r}>")


class _MirrorConn:
    """A connection to a mirror server; ``close`` is what the pool needs of it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


class LineReplayer(Replayer):
    """Replays one client session's lines on one mirror, one line at a time."""

    def __init__(self, mirror: Mirror, pool: UpstreamPool[Any], max_line: int) -> None:
        self.mirror = mirror
        self.pool = pool
        self.timeout: float = mirror.config.timeout
        self.max_line = max_line
        self.conn: _MirrorConn | None = None

    async def _connection(self) -> _MirrorConn:
        if self.conn is not None:
            return self.conn
        pool = self.pool
        if not pool.available():
            raise MirrorUnavailable(f"{pool.name} is backing off after failures")
        while (idle := pool.take(_POOL_KEY)) is not None:
            if idle.usable():
                self.conn = idle
                return idle
            idle.close()
            pool.discard()
        if not pool.reserve():
            raise MirrorUnavailable(f"no free connection to {pool.name}")
        upstream = self.mirror.upstream
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(
                    upstream.host, upstream.port, limit=self.max_line + 1)
        except (OSError, TimeoutError) as exc:
            pool.discard()
            pool.connect_failed()
            raise MirrorUnavailable(str(exc) or "connect timed out") from exc
        except BaseException:
            pool.discard()
            raise
        pool.connect_succeeded()
        self.conn = _MirrorConn(reader, writer)
        return self.conn

    def _drop_conn(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
            self.pool.discard()

    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
        conn = await self._connection()
        try:
            async with asyncio.timeout(self.timeout):
                conn.writer.write(unit.data)
                await conn.writer.drain()
                answer = await conn.reader.readuntil(_NL)
        except TimeoutError:
            self._drop_conn()
            raise MirrorTimeout(f"no answer within {self.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self._drop_conn()
            raise MirrorError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            self._drop_conn()  # cancelled mid-line: the connection is out of step
            raise
        return "error" if answer.startswith(b"ERR") else "ok"

    def unavailable(self) -> bool:
        return self.conn is None and not self.pool.available()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if conn.usable():
            self.pool.put(_POOL_KEY, conn)  # a line session leaves no state behind
        else:
            conn.close()
            self.pool.discard()

    def __repr__(self) -> str:
        return f"<LineReplayer {self.mirror.name} conn={self.conn is not None}>"


@hookimpl
def gateway_register_protocols(registry: ProtocolRegistry) -> None:
    registry.add(LinesProtocol)
