# In-process cost of the HTTP relay's Python work per request, without sockets.
#
# Owns: the figure docs/performance.md quotes for the Python part of a relayed
# request: a real HttpSession and PrimaryConn, with transports that only
# record, take a 4 KB POST like wrk's and nginx's 200 answer to it, with no
# mirror, with a mirror whose queue is full (a slow mirror, as the relay sees
# it most of the time), and with a mirror that gets and answers every request.
# Also a baseline, as pump.py is for the Postgres relay: the same
# request and answer through two persistent httptools parsers that only drop
# hop-by-hop headers and rebuild the heads (no routing, accounting or checks
# beyond llhttp's), to show how much of the relay's cost is its layering.
# Needs no server; compare runs on the same machine only.
#
#   python benchmarks/http/relay_micro.py
from __future__ import annotations

import asyncio
import os
import sys
import time
import timeit
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.inprocess import AnsweringTransport, new_loop  # noqa: E402
from gateway.accounting import ListenerStats  # noqa: E402
from gateway.mirror import Mirror, Unit  # noqa: E402
from gateway.pool import UpstreamPool  # noqa: E402
from gateway_http.options import HttpListenerOptions, HttpMirrorOptions  # noqa: E402
from gateway_http.parse import IMPLEMENTATION  # noqa: E402
from gateway_http.relay import HttpSession, PrimaryConn, PrimaryPool  # noqa: E402
from gateway_http.replayer import MirrorConn  # noqa: E402
from gateway_http.routing import RouteTarget  # noqa: E402

N = int(os.environ.get("RELAY_MICRO_N", "50000"))
REQUEST = (b"POST /api/v1/push HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
           b"Content-Type: application/x-protobuf\r\nContent-Length: 4096\r\n\r\n" + b"x" * 4096)
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 00:00:00 GMT\r\n"
          b"Content-Type: text/plain\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n")


class _Sink:
    """A transport that takes writes and forgets them."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: list[bytes]) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def _full_mirror() -> Mirror:
    """A mirror whose queue (one unit) is full and whose worker never runs:
    what a slow mirror looks like to the relay most of the time."""
    config = SimpleNamespace(name="m", queue=1, queue_bytes=64 << 20, timeout=5.0,
                             options=HttpMirrorOptions())
    upstream = SimpleNamespace(name="m", host="127.0.0.1", port=1)
    return Mirror("bench", config, upstream, spawn=lambda fn: None)


MIRROR_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def _rig(mirrors: list[Mirror], pool: UpstreamPool[Any]) -> tuple[HttpSession, PrimaryConn]:
    upstream = SimpleNamespace(name="primary", host="127.0.0.1", port=1, pool_size=10,
                               connect_timeout=1.0)
    context = SimpleNamespace(stats=ListenerStats("bench"), accepting=True, generation=0,
                              session_opened=lambda s: True, session_closed=lambda s: None,
                              pool_for=lambda mirror: pool, pools={})
    route = RouteTarget(b"", frozenset(), None, upstream, mirrors)  # type: ignore[arg-type]
    route.pool = PrimaryPool(upstream)  # type: ignore[arg-type]
    protocol = SimpleNamespace(context=context, options=HttpListenerOptions(), routes=[],
                               default=route, route=lambda *_: route)
    session = HttpSession(protocol)  # type: ignore[arg-type]
    session.connection_made(_Sink())  # type: ignore[arg-type]
    conn = PrimaryConn(route.pool)
    conn.connection_made(_Sink())  # type: ignore[arg-type]
    route.pool.idle.append(conn)
    return session, conn


async def _delivering(n: int) -> float:
    """Per request: relay, offer, and the mirror worker's delivery (rewrite,
    write, read the answer, account), on uvloop."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    config = SimpleNamespace(name="m", queue=500, queue_bytes=64 << 20, timeout=5.0,
                             options=HttpMirrorOptions())
    upstream = SimpleNamespace(name="m", host="127.0.0.1", port=1)
    mirror = Mirror("bench", config, upstream,
                    spawn=lambda fn: tasks.append(loop.create_task(fn())))
    pool: UpstreamPool[Any] = UpstreamPool("m", 10)
    conn = MirrorConn()
    mirror_side = AnsweringTransport(conn, MIRROR_ANSWER)
    conn.connection_made(mirror_side)  # type: ignore[arg-type]
    pool.reserve()
    pool.put(None, conn)
    session, primary = _rig([mirror], pool)
    start = time.perf_counter()
    for _ in range(n):
        mirror_side.answered = answered = loop.create_future()
        session.data_received(REQUEST)
        primary.data_received(ANSWER)
        await answered
    seconds = time.perf_counter() - start
    session._finish()
    for s in mirror.sessions:
        s.close()
    await asyncio.gather(*tasks)
    stats = mirror.stats
    assert stats.balanced() and stats.delivered_total == n, stats
    return seconds / n * 1e6


_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                  b"transfer-encoding", b"upgrade", b"content-length"})


class _Baseline:
    """One direction of the baseline: a persistent llhttp parser whose
    callbacks rebuild each message and hand it to ``out`` whole."""

    def __init__(self, parser: Any, out: _Sink) -> None:
        self.parser = parser(self)
        self.out = out
        self.start = b""
        self.head: list[bytes] = []
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.head = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.start = self.parser.get_method() + b" " + url + b" HTTP/1.1\r\n"

    def on_status(self, reason: bytes) -> None:
        self.start = b"HTTP/1.1 %d %s\r\n" % (self.parser.get_status_code(), reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP:
            self.head += (name, b": ", value, b"\r\n")

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        length = sum(len(b) for b in self.body)
        self.out.writelines([self.start, *self.head, b"Content-Length: %d\r\n\r\n" % length,
                             *self.body])


def baseline() -> float:
    import httptools

    request = _Baseline(httptools.HttpRequestParser, _Sink())
    response = _Baseline(httptools.HttpResponseParser, _Sink())

    def one() -> None:
        request.parser.feed_data(REQUEST)
        response.parser.feed_data(ANSWER)

    one()
    return min(timeit.repeat(one, number=N, repeat=7)) / N * 1e6


def per_request(mirrors: list[Mirror]) -> float:
    session, conn = _rig(mirrors, UpstreamPool("m", 10))

    def one() -> None:
        session.data_received(REQUEST)
        conn.data_received(ANSWER)

    one()
    for mirror in mirrors:  # fill each queue: every later request is a queue_full drop
        session.mirror_sessions[mirror].offer(Unit(b"queued"))
    return min(timeit.repeat(one, number=N, repeat=7)) / N * 1e6


def main() -> None:
    print(f"parser: {IMPLEMENTATION}")
    print(f"relayed request, no mirror: {per_request([]):.1f} us of Python per request")
    print(f"relayed request, mirror queue full: {per_request([_full_mirror()]):.1f} us "
          "of Python per request")
    delivering = new_loop().run_until_complete(_delivering(N // 5))
    print(f"relayed request, mirror delivering: {delivering:.1f} us of Python per request")
    print(f"baseline, two persistent llhttp parsers: {baseline():.1f} us of Python per request")


if __name__ == "__main__":
    main()
