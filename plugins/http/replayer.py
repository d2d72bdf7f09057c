# The HTTP mirror sender: one request at a time to one mirror, answer discarded.
#
# Owns: the copy of a request a mirror gets (its own header rewrites: set,
# remove, Host, -shadow), the raw keep-alive connections to the mirror (held in
# the core's UpstreamPool, which also backs off a mirror that refuses
# connections), reading the mirror's response only to count its status class,
# and the bounded retries of 5xx and 429 that honour Retry-After.
# Must not know: the client connection; a unit's bytes and parsed head are all
# it gets. Runs in the mirror session's worker task, never on the client's path.
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway import (
    Mirror,
    MirrorError,
    MirrorSession,
    MirrorTimeout,
    MirrorUnavailable,
    Replayer,
    Unit,
    UpstreamPool,
)

from .parse import END, ParseError, ResponseHead, ResponseParser

if TYPE_CHECKING:
    from .options import HttpMirrorOptions

__all__ = ["HttpReplayer", "MirrorConn", "MirrorRequest", "Rewrite"]

log = logging.getLogger("mirrorgate.http.mirror")

OUTCOMES = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
# Retries wait this long at first, doubling, and never longer than the cap
# (Retry-After included), so a mirror cannot park a worker for long.
RETRY_BASE = 0.1
RETRY_CAP = 30.0
_POOL_KEY = None  # every connection to a mirror serves every request


class MirrorRequest:
    """A request as the primary got it (after hop-by-hop headers and
    X-Forwarded-For), for the mirrors to rewrite."""

    __slots__ = ("method", "target", "headers", "has_body", "size")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                 has_body: bool, size: int) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.has_body = has_body
        self.size = size  # about what its head takes (the primary's copy of it)


def shadow_host(host: bytes) -> bytes:
    """Envoy's shadow name: "-shadow" after the host name, before any port."""
    if host.startswith(b"["):  # [v6]:port
        end = host.find(b"]")
        return host[:end + 1] + b"-shadow" + host[end + 1:] if end >= 0 else host + b"-shadow"
    name, colon, port = host.partition(b":")
    return name + b"-shadow" + colon + port


class Rewrite:
    """One mirror's header rules, compiled once."""

    __slots__ = ("remove", "add", "host", "shadow")

    def __init__(self, options: HttpMirrorOptions) -> None:
        self.add = [(k.encode(), v.encode()) for k, v in options.set_headers.items()]
        # Set headers replace any the request had; Expect is for the primary
        # hop only (the mirror gets the body without asking).
        self.remove = frozenset({n.lower().encode() for n in options.remove_headers}
                                | {k.lower() for k, _ in self.add} | {b"expect"})
        self.host = None if options.host_rewrite is None else options.host_rewrite.encode()
        self.shadow = options.shadow_suffix

    def request(self, req: MirrorRequest, body: bytes) -> bytes:
        """The bytes this mirror gets for ``req``."""
        remove = self.remove
        host = self.host
        parts = [req.method, b" ", req.target, b" HTTP/1.1\r\n", b""]
        found_host = None
        for name, value in req.headers:
            lower = name.lower()
            if lower == b"host":
                found_host = value
                continue
            if lower in remove:
                continue
            parts += (name, b": ", value, b"\r\n")
        if host is None and b"host" not in remove:
            host = found_host
        if host is not None:
            parts[4] = b"Host: " + (shadow_host(host) if self.shadow else host) + b"\r\n"
        for name, value in self.add:
            parts += (name, b": ", value, b"\r\n")
        if req.has_body or body:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts += (b"\r\n", body)
        return b"".join(parts)


class MirrorConn(asyncio.Protocol):
    """A keep-alive connection to a mirror, one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.waiter: asyncio.Future[int] | None = None
        self.status = 0
        self.keep_alive = False
        self.retry_after: float | None = None
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            self.close()  # nothing was asked
            return
        try:
            events = self.parser.feed(data)
        except ParseError as exc:
            self._fail(MirrorError(f"bad response: {exc.reason}"))
            return
        self._events(events)

    def _events(self, events: list[Any]) -> None:
        for event in events:
            if event is END:
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                waiter, self.waiter = self.waiter, None
                if waiter is not None and not waiter.done():
                    waiter.set_result(self.status)
                return
            if type(event) is ResponseHead and not event.informational:
                self.status = event.status
                self.keep_alive = event.keep_alive
                self.retry_after = _retry_after(event.headers)

    def eof_received(self) -> bool:
        if self.waiter is not None:
            try:
                self._events(self.parser.eof())
            except ParseError:
                pass
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(MirrorError("the mirror closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def _expired(self) -> None:
        self.timer = None
        self._fail(MirrorTimeout("no answer in time"))

    async def exchange(self, data: bytes, method: bytes, timeout: float) -> int:
        """Send one request; the status of its final response, body read and dropped.

        :raises MirrorTimeout: no whole response within ``timeout`` seconds
            (the connection is closed).
        :raises MirrorError: the connection broke or the answer was garbage.
        """
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        # A timer handle, not asyncio.timeout(): this runs once per mirrored
        # request, and a handle costs a fraction of a timeout context.
        self.timer = loop.call_later(timeout, self._expired)
        self.status = 0
        self.parser.expect(method)
        self.transport.write(data)
        return await self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    for name, value in headers:
        if len(name) == 11 and name.lower() == b"retry-after":
            try:
                return max(0.0, float(int(value.strip())))
            except ValueError:
                return None  # an HTTP-date: the usual backoff applies
    return None


class HttpReplayer(Replayer):
    """Delivers one client connection's requests to one mirror, in order."""

    def __init__(self, mirror: Mirror, pool: UpstreamPool[Any],
                 pools: Mapping[str, UpstreamPool[Any]] | None = None) -> None:
        self.mirror = mirror
        self.pool = pool
        self._pools = pools  # the gateway's pools by upstream name, for reloads
        self.reconfigure()

    def reconfigure(self) -> None:
        """Take the mirror's settings; after a reload, from the next request."""
        mirror = self.mirror
        options: HttpMirrorOptions = mirror.config.options
        self.upstream = mirror.upstream
        if self._pools is not None:
            self.pool = self._pools.get(mirror.upstream.name, self.pool)
        self.timeout: float = mirror.config.timeout
        self.retries = options.retries
        self.rewrite = Rewrite(options)

    def unavailable(self) -> bool:
        return not self.pool.available()

    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
        req: MirrorRequest = unit.meta
        data = self.rewrite.request(req, unit.data)
        retries = self.retries
        attempt = 0
        while True:
            status, retry_after = await self._attempt(data, req.method)
            if attempt < retries and (status >= 500 or status == 429):
                delay = RETRY_BASE * (2 ** attempt) if retry_after is None else retry_after
                attempt += 1
                await asyncio.sleep(min(delay, RETRY_CAP))
                continue
            return OUTCOMES.get(status // 100, "5xx")

    async def _attempt(self, data: bytes, method: bytes) -> tuple[int, float | None]:
        timeout = self.timeout
        conn = self._idle()
        if conn is None:
            started = asyncio.get_running_loop().time()
            try:
                conn = await asyncio.wait_for(self._connect(), timeout)
            except TimeoutError:
                raise MirrorTimeout(f"not connected within {timeout:g}s") from None
            timeout = max(0.001, timeout - (asyncio.get_running_loop().time() - started))
        try:
            status = await conn.exchange(data, method, timeout)
        except MirrorTimeout:
            self._drop(conn)
            raise MirrorTimeout(f"no answer within {self.timeout:g}s") from None
        except BaseException:  # broken, or cancelled (shutdown) half way
            self._drop(conn)
            raise
        if conn.keep_alive and not conn.closed:
            self.pool.put(_POOL_KEY, conn)
        else:
            self._drop(conn)
        return status, conn.retry_after

    def _idle(self) -> MirrorConn | None:
        pool = self.pool
        while (idle := pool.take(_POOL_KEY)) is not None:
            if not idle.closed:
                return idle
            pool.discard()
        return None

    async def _connect(self) -> MirrorConn:
        pool = self.pool
        if not pool.available():
            raise MirrorUnavailable(f"{pool.name} is backing off after failures")
        if not pool.reserve():
            raise MirrorUnavailable(f"no free connection to {pool.name} "
                                    f"(pool_size {pool.capacity})")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(MirrorConn, self.upstream.host,
                                                   self.upstream.port)
        except OSError as exc:
            pool.discard()
            pool.connect_failed()
            log.warning("mirror unreachable at %s:%d: %s; backing off", self.upstream.host,
                        self.upstream.port, exc.strerror or exc,
                        extra={"listener": self.mirror.stats.listener, "mirror": self.mirror.name,
                               "upstream": self.upstream.name})
            raise MirrorUnavailable(f"cannot connect to {pool.name}: {exc}") from None
        except BaseException:
            pool.discard()
            raise
        pool.connect_succeeded()
        return conn

    def _drop(self, conn: MirrorConn) -> None:
        conn.close()
        self.pool.discard()

    async def close(self) -> None:
        """Connections go back to the pool after each request: nothing is held."""
