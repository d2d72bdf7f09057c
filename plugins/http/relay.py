# The HTTP relay: client connections in, pooled primary connections out.
#
# Owns: one client connection's request/response cycle (HttpSession), the
# primary connections (PrimaryConn, kept alive in a PrimaryPool per route),
# the head rewriting a proxy must do (hop-by-hop headers, framing,
# X-Forwarded-For), the responses the gateway makes itself (400/408/413/431/
# 501 for bad requests, 502/504 for the primary), flow control both ways, and
# cutting each request into a Unit for the mirrors once its body is whole.
# Must not know: how a mirror is reached (replayer.py) or how bytes parse
# (parse.py gives events). Bytes move through asyncio Protocol callbacks, as
# design.md §3 measured; no task is started per request unless a primary
# connection must be opened.
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from gateway import ClientSession, DropReason, Mirror, MirrorSession, Unit

from .parse import END, Body, ParseError, RequestHead, RequestParser, ResponseHead, ResponseParser
from .replayer import HttpReplayer, MirrorRequest
from .routing import RouteTarget, sampled

if TYPE_CHECKING:
    from gateway.config import Upstream

    from . import HttpProtocol

__all__ = ["HttpSession", "PrimaryConn", "PrimaryPool", "gateway_response"]

log = logging.getLogger("mirrorgate.http")

# Bytes read ahead of the request being relayed (pipelined requests, a body
# waiting for its primary connection) before the client is paused.
READ_AHEAD = 1024 * 1024
# How often a listener looks for idle connections and late primaries.
SWEEP_INTERVAL = 0.25
STATUS_TEXT = {
    400: b"Bad Request", 408: b"Request Timeout", 413: b"Content Too Large",
    431: b"Request Header Fields Too Large", 501: b"Not Implemented",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}

_clock = time.monotonic

# Reasons a client's reading is paused (a bit each).
_PAUSE_PRIMARY = 1   # the primary's socket buffer is full
_PAUSE_AHEAD = 2     # too much read ahead of the current request
_PAUSE_CONNECT = 4   # too much body waiting for a primary connection


def gateway_response(status: int, reason: str, *, head_only: bool = False) -> bytes:
    """A response the gateway makes itself, marked as such, closing the connection."""
    text = f"mirrorgate: {reason}\n".encode()
    mark = reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nX-Mirrorgate-Error: %s\r\nConnection: close\r\n\r\n"
            % (status, STATUS_TEXT.get(status, b"Error"), len(text), mark))
    return head if head_only else head + text


def _chunk(data: bytes) -> list[bytes]:
    return [b"%x\r\n" % len(data), data, b"\r\n"]


class PrimaryPool:
    """Idle keep-alive connections to one primary, at most its ``pool_size``."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.idle: list[PrimaryConn] = []
        self.max_idle = upstream.pool_size

    def take(self) -> PrimaryConn | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    def put(self, conn: PrimaryConn) -> None:
        if conn.closed or len(self.idle) >= self.max_idle:
            conn.close()
        else:
            conn.session = None
            self.idle.append(conn)

    async def connect(self) -> PrimaryConn:
        """A new connection; raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        upstream = self.upstream
        async with asyncio.timeout(upstream.connect_timeout):
            _, conn = await loop.create_connection(
                lambda: PrimaryConn(self), upstream.host, upstream.port)
        return conn

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def retire(self) -> None:
        """A reload moved the primary: connections close as they come back."""
        self.max_idle = 0
        self.close()


class PrimaryConn(asyncio.Protocol):
    """One connection to a primary, lent to one client session at a time."""

    def __init__(self, pool: PrimaryPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.session: HttpSession | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:  # an idle connection has nothing to say
            self.close()
            return
        try:
            events = self.parser.feed(data)
        except ParseError as exc:
            session.primary_failed(f"bad response from the primary: {exc.reason}")
            return
        session.primary_events(events)

    def eof_received(self) -> bool:
        session = self.session
        if session is not None:
            try:
                events = self.parser.eof()
            except ParseError:
                session.primary_failed("the primary closed the connection")
                return False
            session.primary_events(events)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        session = self.session
        if session is not None:
            self.session = None
            session.primary_failed("the primary closed the connection")

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_client(_PAUSE_PRIMARY)

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_client(_PAUSE_PRIMARY)

    def close(self) -> None:
        self.closed = True
        self.session = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.session = None
        if self.transport is not None:
            self.transport.abort()


class _Exchange:
    """One request being relayed, and what its response needs."""

    __slots__ = (
        "head", "route", "conn", "pending", "chunked", "sent", "answered",
        "to_mirrors", "mirror_request", "body", "body_size", "mirror_limit", "out_chunked",
        "close_after", "since", "started", "reuse", "out",
    )

    def __init__(self, head: RequestHead, route: RouteTarget) -> None:
        self.head = head
        self.route = route
        self.conn: PrimaryConn | None = None
        self.pending: list[bytes] | None = None  # bytes waiting for a connection
        self.chunked = head.chunked
        self.sent = False        # the whole request went to the primary
        self.answered = False    # the primary's final response head came
        self.to_mirrors: list[Mirror] = []
        self.mirror_request: MirrorRequest | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.mirror_limit = 0    # the largest body any chosen mirror takes
        self.out_chunked = False  # the response is chunked towards the client
        self.close_after = head.close_after or not head.keep_alive
        self.since = 0.0         # request sent whole, then each primary read (primary_timeout)
        self.started = 0.0       # when its head arrived (primary latency)
        self.reuse = False       # the primary keeps its connection open after
        self.out: list[bytes] = []  # for the primary, written once per client read


class HttpSession(asyncio.Protocol, ClientSession):
    """One client connection."""

    def __init__(self, protocol: HttpProtocol) -> None:
        self.protocol = protocol
        self.context = protocol.context
        options = protocol.options
        self.parser = RequestParser(max_header_bytes=options.max_header_bytes,
                                    max_body=options.max_body)
        self.forwarded_for = options.forwarded_for
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self.backlog: collections.deque[Any] = collections.deque()
        self.current: _Exchange | None = None
        self.mirror_sessions: dict[Mirror, MirrorSession] = {}
        self.generation = self.context.generation  # of the config its mirrors follow
        self.paused = 0         # _PAUSE_* bits
        self.closed = False
        self.partial = False    # bytes of a request head arrived, the head did not
        self.client_eof = False  # the client closed its sending side
        self.client_slow = False  # the client's socket buffer is full: the primary waits
        self.since = 0.0        # waiting for a request head since
        self.stats = self.context.stats
        self.opened = 0.0       # when the client connected (Unix time), for describe
        self.address = ""       # the client's host:port, for describe
        self.requests = 0       # requests started on this connection

    # -- client side ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = client = transport  # type: ignore[assignment]
        if not self.context.session_opened(self):
            log.warning("max_clients reached: answered 503", extra={"listener": self.context.name})
            client.write(gateway_response(503, "too many clients"))  # type: ignore[attr-defined]
            self.closed = True
            client.close()
            return
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = str(peer[0]).encode()
            self.address = f"{peer[0]}:{peer[1]}"
        self.since = _clock()
        self.opened = time.time()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.parser.feed(data)
        except ParseError as exc:
            self._refuse(exc.status, exc.reason)
            return
        if not events:
            if self.current is None and not self.backlog:
                self.partial = True
            return
        self.backlog.extend(events)
        self._pump()

    def eof_received(self) -> bool:
        if self.closed:
            return False
        try:
            self.parser.eof()
        except ParseError as exc:
            if self.current is None:
                self._refuse(exc.status, exc.reason)
            else:
                self._abandon()
            return False
        # A half-closed client may still read the answer to what it sent;
        # the connection closes once that is written (_response_done).
        self.client_eof = True
        return self.current is not None or bool(self.backlog)

    def connection_lost(self, exc: Exception | None) -> None:
        current = self.current
        if current is not None and current.conn is not None:
            current.conn.close()  # mid-exchange: never reused for another request
        self.current = None
        self._finish()

    def pause_writing(self) -> None:
        self.client_slow = True
        current = self.current
        if current is not None and current.conn is not None and current.conn.transport:
            current.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_slow = False
        current = self.current
        if current is not None and current.conn is not None and current.conn.transport:
            current.conn.transport.resume_reading()

    def pause_client(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_client(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def describe(self) -> dict[str, Any]:
        """The connection for SHOW CLIENTS and /status: no header is shown."""
        return {
            "peer": self.address, "since": self.opened, "requests": self.requests,
            "state": "active" if self.current is not None else "idle",
            "mirrors": sorted(m.name for m in self.mirror_sessions),
        }

    def abort(self) -> None:
        current = self.current
        if current is not None and current.conn is not None:
            current.conn.abort()
        if self.transport is not None:
            self.transport.abort()
        self._finish()

    # -- requests ------------------------------------------------------------

    def _pump(self) -> None:
        backlog = self.backlog
        while backlog:
            event = backlog[0]
            if type(event) is Body:
                backlog.popleft()
                self._body(event.data)
            elif event is END:
                backlog.popleft()
                self._end()
            else:
                if self.current is not None:
                    break  # pipelined: after the current response
                backlog.popleft()
                self._start(event)
            if self.closed:
                return
        ex = self.current
        if ex is not None and ex.out:
            # One write (writev) per client read: the head and the body of a
            # small request go to the primary in one system call.
            conn = ex.conn
            if conn is not None and conn.transport is not None:
                conn.transport.writelines(ex.out)
            ex.out = []
        if backlog:
            ahead = sum(len(e.data) for e in backlog if type(e) is Body)
            if ahead > READ_AHEAD:
                self.pause_client(_PAUSE_AHEAD)
        elif self.paused & _PAUSE_AHEAD:
            self.resume_client(_PAUSE_AHEAD)

    def _start(self, head: RequestHead) -> None:
        self.partial = False
        if self.generation != self.context.generation:
            self._reconfigured()
        self.stats.primary_units += 1
        self.requests += 1
        headers = head.forward
        if self.protocol.routes:
            host = None
            for name, value in headers:
                if len(name) == 4 and name.lower() == b"host":
                    host = value
                    break
            route = self.protocol.route(head.method, head.target, host)
        else:
            route = self.protocol.default
        # The head goes on as received when this hop drops none of its fields
        # but Content-Length (which it keeps, the body being sent as it came)
        # and its request line is HTTP/1.1; X-Forwarded-For is then added as a
        # last field, or, if the client sent one, the head is rebuilt with it.
        kept = len(headers)
        as_received = (head.version == b"1.1" and not head.chunked
                       and kept + (head.content_length is not None) == len(head.headers))
        primary_head = b""
        if self.forwarded_for and self.peer:
            headers = _append_forwarded_for(headers, self.peer)
            if as_received and len(headers) > kept:
                primary_head = b"%sX-Forwarded-For: %s\r\n\r\n" % (head.raw[:-2], self.peer)
        elif as_received:
            primary_head = head.raw
        ex = _Exchange(head, route)
        self.current = ex
        ex.started = _clock()
        if not primary_head:
            # The request line, end-to-end headers, and this hop's framing.
            parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
            for name, value in headers:
                parts += (name, b": ", value, b"\r\n")
            if ex.chunked:
                parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
            elif head.content_length is not None:
                parts.append(b"Content-Length: %d\r\n\r\n" % head.content_length)
            else:
                parts.append(b"\r\n")
            primary_head = b"".join(parts)
        self._to_primary(primary_head)
        if route.mirrors:
            self._choose_mirrors(ex, head, headers, route, primary_head)

    def _choose_mirrors(self, ex: _Exchange, head: RequestHead,
                        headers: list[tuple[bytes, bytes]], route: RouteTarget,
                        primary_head: bytes) -> None:
        length = head.content_length
        head_size = len(primary_head)
        limit = 0
        for mirror in route.mirrors:
            options = mirror.config.options
            if options.percent < 100.0 and not sampled(mirror, head.headers):
                mirror.stats.skipped += 1
                continue
            if length is not None:
                # The size is known now: a request the mirror would drop is
                # counted here, and its body is not gathered for it.
                if length > options.max_body:
                    mirror.stats.offer_dropped(DropReason.TOO_LARGE)
                    continue
                session = self.mirror_sessions.get(mirror) or self._mirror_session(mirror)
                if session.refused(length + head_size):
                    continue
            ex.to_mirrors.append(mirror)
            if options.max_body > limit:
                limit = options.max_body
        if ex.to_mirrors:
            ex.mirror_limit = limit
            # The primary's head serves a mirror that rewrites nothing, unless
            # it frames a chunked body or asks the primary hop to Expect.
            reusable = not head.chunked
            if reusable:
                for name, _ in headers:
                    if len(name) == 6 and name.lower() == b"expect":
                        reusable = False
                        break
            ex.mirror_request = MirrorRequest(head.method, head.target, headers,
                                              length is not None or head.chunked, head_size,
                                              primary_head if reusable else None)

    def _reconfigured(self) -> None:
        """A reload came, and the last request is whole: close the queues to
        removed mirrors (they drain) and give the others their new settings."""
        self.generation = self.context.generation
        for mirror, session in list(self.mirror_sessions.items()):
            if mirror.retired:
                session.close()
                del self.mirror_sessions[mirror]
            else:
                session.refresh()

    def _mirror_session(self, mirror: Mirror) -> MirrorSession:
        session = self.mirror_sessions.get(mirror)
        if session is None:
            session = mirror.open_session(HttpReplayer(mirror, self.context.pool_for(mirror),
                                                       self.context.pools))
            self.mirror_sessions[mirror] = session
        return session

    def _body(self, data: bytes) -> None:
        ex = self.current
        assert ex is not None
        if ex.chunked:
            self._to_primary_many(_chunk(data))
        else:
            self._to_primary(data)
        if ex.to_mirrors:
            ex.body_size += len(data)
            if ex.body_size <= ex.mirror_limit:
                ex.body.append(data)

    def _end(self) -> None:
        ex = self.current
        assert ex is not None
        if ex.chunked:
            self._to_primary(b"0\r\n\r\n")
        ex.sent = True
        ex.since = _clock()
        if ex.to_mirrors:
            self._offer(ex)

    def _offer(self, ex: _Exchange) -> None:
        request = ex.mirror_request
        assert request is not None
        chunks = ex.body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        unit: Unit | None = None
        for mirror in ex.to_mirrors:
            if ex.body_size > mirror.config.options.max_body:
                mirror.stats.offer_dropped(DropReason.TOO_LARGE)
                continue
            if unit is None:
                unit = Unit(body)
                unit.size += request.size
                unit.meta = request
            self._mirror_session(mirror).offer(unit)
        ex.body = []

    # -- the primary ---------------------------------------------------------

    def _to_primary(self, data: bytes) -> None:
        ex = self.current
        assert ex is not None
        if ex.conn is not None:
            ex.out.append(data)
            return
        if ex.pending is None:
            conn = ex.route.pool.take()
            if conn is not None:
                self._attach(ex, conn)
                ex.out.append(data)
                return
            ex.pending = []
            asyncio.get_running_loop().create_task(self._connect(ex))
        ex.pending.append(data)
        if sum(map(len, ex.pending)) > READ_AHEAD:
            self.pause_client(_PAUSE_CONNECT)

    def _to_primary_many(self, parts: list[bytes]) -> None:
        ex = self.current
        assert ex is not None
        if ex.conn is not None:
            ex.out += parts
        else:
            self._to_primary(b"".join(parts))

    def _attach(self, ex: _Exchange, conn: PrimaryConn) -> None:
        ex.conn = conn
        conn.session = self
        conn.parser.expect(ex.head.method)

    async def _connect(self, ex: _Exchange) -> None:
        try:
            conn = await ex.route.pool.connect()
        except (OSError, TimeoutError) as exc:
            if self.current is ex:
                what = "timed out" if isinstance(exc, TimeoutError) else (
                    exc.strerror or type(exc).__name__)
                primary = ex.route.primary
                self._fail(502, f"primary {primary.name} unreachable: {what}")
            return
        if self.current is not ex or self.closed:
            conn.close()
            return
        self._attach(ex, conn)
        assert conn.transport is not None
        if ex.pending:
            conn.transport.writelines(ex.pending)
        ex.pending = None
        self.resume_client(_PAUSE_CONNECT)

    def primary_events(self, events: list[Any]) -> None:
        ex = self.current
        if ex is None or self.transport is None:
            return
        out: list[bytes] = []  # one write (writev) per primary read
        ex.since = _clock()  # the primary is alive (primary_timeout)
        for event in events:
            if type(event) is Body:
                if ex.out_chunked:
                    out += _chunk(event.data)
                else:
                    out.append(event.data)
            elif event is END:
                if ex.out_chunked:
                    out.append(b"0\r\n\r\n")
                self.transport.writelines(out)
                self._response_done(ex)
                return
            else:
                head = self._response_head(ex, event)
                if head:
                    out.append(head)
        if out:
            self.transport.writelines(out)

    def _response_head(self, ex: _Exchange, head: ResponseHead) -> bytes:
        """The head the client gets for the primary's ``head``."""
        request = ex.head
        if head.informational:
            # 100 Continue and 103 Early Hints reach an HTTP/1.1 client as sent.
            if request.version == b"1.1":
                parts = [b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason)]
                for name, value in head.forward:
                    parts += (name, b": ", value, b"\r\n")
                parts.append(b"\r\n")
                return b"".join(parts)
            return b""
        ex.answered = True
        ex.reuse = head.keep_alive
        parts = [b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason)]
        for name, value in head.forward:
            parts += (name, b": ", value, b"\r\n")
        no_body = (request.method == b"HEAD" or head.status in (204, 304)
                   or 100 <= head.status < 200)
        if no_body:
            if head.content_length is not None and head.status != 204:
                parts.append(b"Content-Length: %d\r\n" % head.content_length)
        elif head.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % head.content_length)
        elif request.version == b"1.1":
            ex.out_chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            ex.close_after = True  # HTTP/1.0: the body ends when the connection does
        if not ex.sent:
            # The primary answered before the request was whole: the rest of
            # the body goes nowhere, so neither connection can be reused.
            ex.close_after = True
        if ex.close_after or not self.context.accepting:
            ex.close_after = True
            parts.append(b"Connection: close\r\n\r\n")
        elif request.version != b"1.1":
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def _response_done(self, ex: _Exchange) -> None:
        conn = ex.conn
        ex.conn = None
        self.current = None
        now = _clock()
        self.stats.primary_latency.observe(now - ex.started)
        if conn is not None:
            if ex.sent and ex.reuse:
                ex.route.pool.put(conn)
            else:
                conn.close()
        self.resume_client(_PAUSE_PRIMARY)
        if ex.close_after or (self.client_eof and not self.backlog):
            self._close()
            return
        self.since = now
        if self.backlog:
            self._pump()

    def primary_failed(self, reason: str) -> None:
        ex = self.current
        if ex is None:
            return
        if ex.answered:
            self._abandon()  # a response cut short: the client must see it cut
        else:
            self._fail(502, reason)

    def _fail(self, status: int, reason: str) -> None:
        """Answer the current request with a gateway error and close."""
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.close()
            ex.conn = None
        if self.transport is not None and not self.closed:
            head_only = ex is not None and ex.head.method == b"HEAD"
            self.transport.write(gateway_response(status, reason, head_only=head_only))
            log.log(logging.WARNING if status >= 500 else logging.INFO, "answered %d: %s",
                    status, reason, extra={"listener": self.context.name,
                                           "session": self.peer.decode(),
                                           "upstream": ex and ex.route.primary.name})
        self.current = None
        self._close()

    def _refuse(self, status: int, reason: str) -> None:
        """A request the gateway will not relay (bad input): answer it, close."""
        if self.current is not None and self.current.answered:
            self._abandon()
            return
        self._fail(status, reason)

    def _abandon(self) -> None:
        """End the connection without a response (one was cut short)."""
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.close()
            ex.conn = None
        self.current = None
        if self.transport is not None:
            self.transport.abort()
        self._finish()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.backlog.clear()
        self.context.session_closed(self)
        for session in self.mirror_sessions.values():
            session.close()
        self.mirror_sessions.clear()

    # -- timeouts (called by the listener's sweep) ---------------------------

    def sweep(self, now: float, head_timeout: float, idle_timeout: float,
              primary_timeout: float, accepting: bool) -> None:
        if self.closed:
            return
        ex = self.current
        if ex is not None:
            # The primary has had the whole request and said nothing for
            # primary_timeout (not even a body chunk), while the client was
            # ready to read: before its response head, a 504; after it, the
            # client must see the response cut.
            if ex.sent and now - ex.since > primary_timeout and not self.client_slow:
                name = ex.route.primary.name
                if not ex.answered:
                    self._fail(504, f"primary {name} did not answer within "
                               f"{primary_timeout:g}s")
                else:
                    log.warning("primary sent nothing for %gs in the middle of a response; "
                                "connection closed", primary_timeout,
                                extra={"listener": self.context.name,
                                       "session": self.peer.decode(), "upstream": name})
                    self._abandon()
            return
        if self.backlog:
            return
        if self.partial:
            if now - self.since > head_timeout:
                self._fail(408, f"request head not received within {head_timeout:g}s")
        elif not accepting or now - self.since > idle_timeout:
            self._close()


def _append_forwarded_for(headers: list[tuple[bytes, bytes]], peer: bytes,
                          ) -> list[tuple[bytes, bytes]]:
    for i, (name, value) in enumerate(headers):
        if len(name) == 15 and name.lower() == b"x-forwarded-for":
            headers[i] = (name, value + b", " + peer)
            return headers
    headers.append((b"X-Forwarded-For", peer))
    return headers
