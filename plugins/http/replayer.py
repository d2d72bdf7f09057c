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
import math
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

from .parse import END, BaseResponseParser, ParseError, ResponseHead, ResponseParser

try:
    import httptools
except ImportError:  # every answer is read by the strict parser
    httptools = None  # type: ignore[assignment]

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

    __slots__ = ("method", "target", "headers", "has_body", "size", "head")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                 has_body: bool, size: int, head: bytes | None = None) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.has_body = has_body
        self.size = size  # about what its head takes (the primary's copy of it)
        # The primary's head, when a mirror that rewrites nothing may take it
        # as it is: its body framed by Content-Length (or absent), no Expect.
        self.head = head


def shadow_host(host: bytes) -> bytes:
    """Envoy's shadow name: "-shadow" after the host name, before any port."""
    if host.startswith(b"["):  # [v6]:port
        end = host.find(b"]")
        return host[:end + 1] + b"-shadow" + host[end + 1:] if end >= 0 else host + b"-shadow"
    name, colon, port = host.partition(b":")
    return name + b"-shadow" + colon + port


class Rewrite:
    """One mirror's header rules, compiled once."""

    __slots__ = ("remove", "add", "host", "shadow", "plain")

    def __init__(self, options: HttpMirrorOptions) -> None:
        self.add = [(k.encode(), v.encode()) for k, v in options.set_headers.items()]
        # Set headers replace any the request had; Expect is for the primary
        # hop only (the mirror gets the body without asking).
        self.remove = frozenset({n.lower().encode() for n in options.remove_headers}
                                | {k.lower() for k, _ in self.add} | {b"expect"})
        self.host = None if options.host_rewrite is None else options.host_rewrite.encode()
        self.shadow = options.shadow_suffix
        # No rule at all: the copy is the request as the primary got it.
        self.plain = not (self.add or options.remove_headers or self.host is not None
                          or self.shadow)

    def request(self, req: MirrorRequest, body: bytes) -> bytes:
        """The bytes this mirror gets for ``req``."""
        return self.head(req, body) + body

    def head(self, req: MirrorRequest, body: bytes) -> bytes:
        """The head this mirror gets for ``req`` and its ``body`` (which
        follows it unchanged, written apart so it is never copied)."""
        if self.plain and req.head is not None:
            return req.head
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
        parts.append(b"\r\n")
        return b"".join(parts)


class MirrorConn(asyncio.Protocol):
    """A keep-alive connection to a mirror, one exchange at a time.

    A mirror's answer is read only for what the worker counts: the status of
    the final response, whether the connection stays open, Retry-After, and
    where the response ends. One llhttp parser per connection steps over the
    answers as they arrive (bodies, chunked or not, are never kept), with a
    callback per field for the three fields that matter. Answers to HEAD
    (which llhttp cannot be told have no body) and, without httptools, every
    answer are read by the strict parser of parse.py instead. Either way, a
    malformed answer ends the connection with a MirrorError.

    Each exchange's ``timeout`` is kept by one watchdog timer per connection,
    moved only when a deadline comes earlier than the one it is set for.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None
        self.status = 0
        self.keep_alive = False
        self.retry_after: float | None = None
        self.closed = False
        self._llhttp = None if httptools is None else httptools.HttpResponseParser(self)
        self._strict: BaseResponseParser | None = None  # reading an answer to HEAD
        self._framed = False  # the head read so far has Content-Length or Transfer-Encoding
        self._head = 0        # the status of the final head read, 0 before it
        self._retry_value: bytes | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        # Its event loop, asked once: on Python 3.11 every
        # asyncio.get_running_loop() is a getpid() system call.
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            self.close()  # nothing was asked
            return
        strict = self._strict
        if strict is not None:
            self._strict_feed(strict, data)
            return
        try:
            self._llhttp.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade:
            self._fail(MirrorError("bad response: unexpected 101 Switching Protocols"))
        except httptools.HttpParserError as exc:
            self._fail(MirrorError(f"bad response: {exc}"))

    # -- llhttp callbacks (the protocol object of self._llhttp) --

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        if size == 14 or size == 17:
            lower = name.lower()
            if lower == b"content-length" or lower == b"transfer-encoding":
                self._framed = True
        elif size == 11 and name.lower() == b"retry-after":
            self._retry_value = value

    def on_headers_complete(self) -> None:
        status = self._llhttp.get_status_code()  # type: ignore[union-attr]
        if status < 200:  # 100, 103: the final head comes next
            self._framed = False
            self._retry_value = None
        else:
            self._head = status

    def on_message_complete(self) -> None:
        if not self._head:
            return  # an informational response
        keep_alive = self._llhttp.should_keep_alive()  # type: ignore[union-attr]
        if self.waiter is None:  # a second answer to one request
            self._fail(MirrorError("bad response: response without a request"))
            return
        self._answered(self._head, keep_alive, _retry_after(self._retry_value))

    # -- the strict reader --

    def _strict_feed(self, parser: BaseResponseParser, data: bytes) -> None:
        try:
            events = parser.feed(data)
        except ParseError as exc:
            self._fail(MirrorError(f"bad response: {exc.reason}"))
            return
        self._strict_events(events)

    def _strict_events(self, events: list[Any]) -> None:
        for event in events:
            if type(event) is ResponseHead and not event.informational:
                self._head = event.status
                self.keep_alive = event.keep_alive
                self._retry_value = _field(event.headers, b"retry-after")
            elif event is END:
                self._answered(self._head, self.keep_alive, _retry_after(self._retry_value))
                return

    # -- ends --

    def _answered(self, status: int, keep_alive: bool, retry_after: float | None) -> None:
        self.status = status
        self.keep_alive = keep_alive
        self.retry_after = retry_after
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(status)

    def eof_received(self) -> bool:
        if self.waiter is not None:
            strict = self._strict
            if strict is not None:
                try:
                    self._strict_events(strict.eof())
                except ParseError:
                    pass
            elif self._head and not self._framed:
                # A body without a length runs until the connection closes.
                self._answered(self._head, False, _retry_after(self._retry_value))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(MirrorError("the mirror closed the connection"))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def _watch(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self.waiter is None or self.closed:
            return
        loop = self._loop
        assert loop is not None  # set by exchange(), which armed this timer
        if loop.time() >= self._deadline:
            self._fail(MirrorTimeout("no answer in time"))
        else:
            self._timer_at = self._deadline
            self._timer = loop.call_at(self._deadline, self._watch)

    def exchange(self, data: bytes, method: bytes, timeout: float,
                 body: bytes = b"") -> asyncio.Future[int]:
        """Send one request (``data``, then ``body`` if any, in one write);
        a future of the status of its final response (its body read and
        dropped). A future, not a coroutine: the worker
        awaits it without one more frame per request.

        The future raises MirrorTimeout when no whole response came within
        ``timeout`` seconds (the connection is closed), MirrorError when the
        connection broke or the answer was garbage.
        """
        assert self.transport is not None
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        self._deadline = deadline = loop.time() + timeout
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._watch)
        self.status = self._head = 0
        self._framed = False
        self._retry_value = None
        if method == b"HEAD" or self._llhttp is None:
            self._strict = ResponseParser()
            self._strict.expect(method)
        elif self._strict is not None:
            self._strict = None
        if body:
            self.transport.writelines((data, body))
        else:
            self.transport.write(data)
        return waiter

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf
        if self.transport is not None:
            self.transport.close()


def _field(headers: list[tuple[bytes, bytes]], lower: bytes) -> bytes | None:
    for name, value in headers:
        if len(name) == len(lower) and name.lower() == lower:
            return value
    return None


def _retry_after(value: bytes | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(int(value.strip())))
    except ValueError:
        return None  # an HTTP-date: the usual backoff applies


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
        body = unit.data
        head = self.rewrite.head(req, body)
        attempt = 0
        while True:
            # One coroutine for the whole delivery: an idle connection and
            # the exchange's own future are awaited here, directly.
            timeout = self.timeout
            conn = self._idle()
            if conn is None:
                conn, timeout = await self._connect_within(timeout)
            try:
                status = await conn.exchange(head, req.method, timeout, body)
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
            if attempt < self.retries and (status >= 500 or status == 429):
                retry_after = conn.retry_after
                delay = RETRY_BASE * (2 ** attempt) if retry_after is None else retry_after
                attempt += 1
                await asyncio.sleep(min(delay, RETRY_CAP))
                continue
            return OUTCOMES.get(status // 100, "5xx")

    async def _connect_within(self, timeout: float) -> tuple[MirrorConn, float]:
        """A new connection, and what is left of ``timeout`` for the exchange."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            conn = await asyncio.wait_for(self._connect(), timeout)
        except TimeoutError:
            raise MirrorTimeout(f"not connected within {timeout:g}s") from None
        return conn, max(0.001, timeout - (loop.time() - started))

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
