# A real HTTP/1.1 server for tests: the primary or a mirror behind the gateway.
#
# Owns: a listening socket served by an asyncio loop in a thread of its own,
# a small strict request reader (request line, header lines in order, bodies
# framed by Content-Length or chunked, RFC 9112 §6.3), the record of every
# request received, and the replies a test asks for: status, headers, body,
# chunked body, a delay, a hang, a close without answering, a close in the
# middle of the body, a pause in the middle of the body, and 100 Continue.
# Knows nothing of the gateway: it is the server a gateway talks to.
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Behaviour", "HttpServer", "Reply", "Request", "echo", "echo_body"]

# Replies that never have a body (RFC 9112 §6.3, items 1 and 2).
NO_BODY_STATUSES = frozenset({204, 304})
REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified",
    400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
}
MAX_HEAD = 1024 * 1024


@dataclass(frozen=True)
class Request:
    """One whole request as the server read it.

    :param headers: every header line as (name, value), in order, names as sent.
    :param body: the body, de-chunked if it came chunked.
    :param connection: which accepted connection it came on (1, 2, ...).
    :param arrived: ``time.monotonic()`` when its head had been read.
    """

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int
    arrived: float

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def header(self, name: str) -> str | None:
        """The values of ``name`` joined with ", " (RFC 9110 §5.3), or None."""
        values = self.values(name)
        return ", ".join(values) if values else None


@dataclass(frozen=True)
class Reply:
    """How to answer one request.

    :param headers: sent in this order; Content-Length (or Transfer-Encoding:
        chunked when ``chunks`` is given) is added unless already there, and
        never for 1xx, 204 and 304.
    :param chunks: send these as a chunked body instead of ``body``.
    :param delay: seconds to wait before answering.
    :param hang: never answer; the connection stays open until the server stops.
    :param close: close the connection without answering.
    :param truncate: send the head and this many bytes of the framed body, then close.
    :param pause_at: send the head and this many bytes of the framed body, then
        wait until ``resume`` is set before sending the rest.
    """

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    chunks: Sequence[bytes] | None = None
    delay: float = 0.0
    hang: bool = False
    close: bool = False
    truncate: int | None = None
    pause_at: int | None = None
    resume: threading.Event | None = None
    reason: str | None = None

    def framed(self, method: str) -> tuple[bytes, bytes]:
        """The head and the body as they go on the wire for a request of ``method``."""
        names = {n.lower() for n, _ in self.headers}
        headers = list(self.headers)
        body = self.body
        bodiless = self.status < 200 or self.status in NO_BODY_STATUSES
        if self.chunks is not None:
            if "transfer-encoding" not in names:
                headers.append(("Transfer-Encoding", "chunked"))
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in self.chunks if c)
            body += b"0\r\n\r\n"
        elif not bodiless and "content-length" not in names:
            headers.append(("Content-Length", str(len(body))))
        if bodiless or method == "HEAD":
            body = b""
        reason = self.reason if self.reason is not None else REASONS.get(self.status, "Status")
        lines = [f"HTTP/1.1 {self.status} {reason}"] + [f"{n}: {v}" for n, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body

    @property
    def closes(self) -> bool:
        """Whether the server closes the connection after this reply."""
        return any(n.lower() == "connection" and "close" in v.lower() for n, v in self.headers)


def echo_body(request: Request) -> bytes:
    """``METHOD TARGET\\n`` then the request body: tells a test which request was answered."""
    return f"{request.method} {request.target}\n".encode("latin-1") + request.body


def echo(request: Request) -> Reply:
    """The default behaviour: 200 with :func:`echo_body`."""
    return Reply(200, [("Content-Type", "text/plain")], echo_body(request))


Behaviour = Reply | Callable[[Request], Reply]


class BadRequest(Exception):
    """The peer sent bytes that are not HTTP/1.1 (recorded in ``HttpServer.errors``)."""


@dataclass
class _Stats:
    requests: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connections: int = 0
    body_bytes: int = 0
    incomplete: int = 0


class HttpServer:
    """An HTTP/1.1 server on 127.0.0.1 that records requests and answers as told.

    :param behaviour: a :class:`Reply` for every request, or a callable that
        makes one from the :class:`Request`; may be changed while serving.
    :param send_continue: answer ``Expect: 100-continue`` with ``100 Continue``
        before reading the body.
    """

    def __init__(self, behaviour: Behaviour = echo, *, send_continue: bool = True) -> None:
        self.behaviour: Behaviour = behaviour
        self.send_continue = send_continue
        self.port = 0
        self._lock = threading.Lock()
        self._stats = _Stats()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name="http-test-server")
        self._thread.start()
        if not ready.wait(10) or self._server is None:
            raise RuntimeError("HttpServer did not start")

    def __repr__(self) -> str:
        s = self._stats
        return (f"<HttpServer 127.0.0.1:{self.port} connections={s.connections} "
                f"requests={len(s.requests)} body_bytes={s.body_bytes} errors={len(s.errors)}>")

    # -- observation -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[Request]:
        """Every whole request received so far, in order of arrival."""
        with self._lock:
            return list(self._stats.requests)

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.requests]

    @property
    def errors(self) -> list[str]:
        """What was wrong with each malformed request received."""
        with self._lock:
            return list(self._stats.errors)

    @property
    def connections(self) -> int:
        return self._stats.connections

    @property
    def body_bytes(self) -> int:
        """Body bytes read so far, requests not yet whole included."""
        return self._stats.body_bytes

    @property
    def incomplete(self) -> int:
        """Requests whose connection closed before their body was whole."""
        return self._stats.incomplete

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Request]:
        """Wait until at least ``n`` requests have been received; return them all.

        :raises AssertionError: with what did arrive, if fewer came within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            got = self.requests
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self!r}: expected {n} requests within {timeout}s, got {len(got)}: "
                    f"{[(r.method, r.target) for r in got]}")
            time.sleep(0.01)

    # -- life cycle ----------------------------------------------------------------

    def stop(self) -> None:
        """Close the listener and every connection; idempotent."""
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0,
                                                      limit=MAX_HEAD)
            self.port = int(self._server.sockets[0].getsockname()[1])

        self._loop.run_until_complete(start())
        ready.set()
        self._loop.run_forever()

    # -- serving -------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._stats.connections += 1
            conn_id = self._stats.connections
        try:
            await self._serve(conn_id, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away; a half request is counted in `incomplete`
        except asyncio.CancelledError:
            pass  # stop(): end quietly, the server is going away
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _serve(self, conn_id: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    self._note_error(f"connection {conn_id} closed inside a request head")
                return
            except asyncio.LimitOverrunError:
                self._note_error(f"connection {conn_id}: request head over {MAX_HEAD} bytes")
                return
            arrived = time.monotonic()
            try:
                method, target, version, headers = parse_head(head)
                framing = body_framing(headers)
            except BadRequest as exc:
                self._note_error(f"connection {conn_id}: {exc}: {head[:200]!r}")
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                await writer.drain()
                return
            expects = any(n.lower() == "expect" and v.lower() == "100-continue"
                          for n, v in headers)
            if expects and self.send_continue and framing != 0:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            try:
                body = await self._read_body(reader, framing)
            except asyncio.IncompleteReadError:
                with self._lock:
                    self._stats.incomplete += 1
                return
            except BadRequest as exc:
                self._note_error(f"connection {conn_id}: {exc}")
                return
            request = Request(method, target, version, headers, body, conn_id, arrived)
            with self._lock:
                self._stats.requests.append(request)
            behaviour = self.behaviour
            reply = behaviour(request) if callable(behaviour) else behaviour
            if not await self._answer(reply, method, writer):
                return
            wants_close = any(n.lower() == "connection" and "close" in v.lower()
                              for n, v in headers)
            if wants_close or reply.closes or version == "HTTP/1.0":
                return

    async def _read_body(self, reader: asyncio.StreamReader, framing: int | None) -> bytes:
        """``framing``: a Content-Length, or None for chunked."""
        if framing is not None:
            return await self._read_exactly(reader, framing)
        parts: list[bytes] = []
        while True:
            line = await reader.readuntil(b"\r\n")
            size_text = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest(f"bad chunk size line {line[:80]!r}") from None
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailer fields: read and set aside
                return b"".join(parts)
            parts.append(await self._read_exactly(reader, size))
            if await reader.readexactly(2) != b"\r\n":
                raise BadRequest("chunk data not followed by CRLF")

    async def _read_exactly(self, reader: asyncio.StreamReader, n: int) -> bytes:
        parts: list[bytes] = []
        left = n
        while left:
            data = await reader.read(min(left, 65536))
            if not data:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(data)
            left -= len(data)
            with self._lock:
                self._stats.body_bytes += len(data)
        return b"".join(parts)

    async def _answer(self, reply: Reply, method: str, writer: asyncio.StreamWriter) -> bool:
        """Send ``reply``; False when the connection must end now."""
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.hang:
            await asyncio.Event().wait()  # cancelled by stop()
        if reply.close:
            return False
        head, body = reply.framed(method)
        if reply.truncate is not None:
            writer.write(head + body[: reply.truncate])
            await writer.drain()
            return False
        if reply.pause_at is not None:
            writer.write(head + body[: reply.pause_at])
            await writer.drain()
            while reply.resume is None or not reply.resume.is_set():
                await asyncio.sleep(0.01)
            writer.write(body[reply.pause_at :])
        else:
            writer.write(head + body)
        await writer.drain()
        return True

    def _note_error(self, message: str) -> None:
        with self._lock:
            self._stats.errors.append(message)


def parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    """Split a request head (ending in CRLF CRLF) into its parts (RFC 9112 §3, §5).

    :raises BadRequest: on a malformed request line or header line.
    """
    lines = head[:-4].split(b"\r\n")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(f"bad request line {lines[0][:100]!r}") from None
    if version not in ("HTTP/1.1", "HTTP/1.0") or not method.isalpha() or not target:
        raise BadRequest(f"bad request line {lines[0][:100]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # RFC 9112 §5.1: no whitespace between the name and the colon; §5.2: no obs-fold.
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise BadRequest(f"bad header line {line[:100]!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return method, target, version, headers


def body_framing(headers: list[tuple[str, str]]) -> int | None:
    """The Content-Length of the body, or None when it is chunked (RFC 9112 §6.3).

    Transfer-Encoding wins over Content-Length when both are present (§6.3 item 3).

    :raises BadRequest: on a transfer coding other than chunked last, or a bad length.
    """
    codings = [c.strip().lower() for n, v in headers if n.lower() == "transfer-encoding"
               for c in v.split(",")]
    if codings:
        if codings[-1] != "chunked":
            raise BadRequest(f"Transfer-Encoding {codings} does not end in chunked")
        return None
    lengths = {v.strip() for n, v in headers if n.lower() == "content-length"}
    if not lengths:
        return 0
    if len(lengths) > 1 or not next(iter(lengths)).isdigit():
        raise BadRequest(f"bad Content-Length {sorted(lengths)}")
    return int(next(iter(lengths)))

