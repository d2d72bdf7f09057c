# A slow HTTP/1.1 server for the HTTP benchmark: the "slow mirror".
#
# Owns: answering every request `--delay` seconds (200 ms) after it arrived,
# with an empty 200, keep-alive, on as many connections as are opened. Each
# connection is handled on its own, and pipelined requests on one connection
# are each answered `--delay` after their own arrival (in order, as HTTP/1.1
# requires), so the server keeps up with any concurrency and only ever adds
# the delay. Knows nothing of the gateway or of nginx.
#
#   python benchmarks/http/slow_server.py --listen 127.0.0.1:8099 [--delay 0.2]
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import resource
import signal
import sys
from typing import cast

import httptools

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Stats:
    """Requests answered, across all connections."""

    def __init__(self) -> None:
        self.answered = 0
        self.connections = 0

    def __repr__(self) -> str:
        return f"<Stats answered={self.answered} connections={self.connections}>"


class SlowProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer each ``delay`` after it arrived.

    The answers wait in a FIFO of (due time, keep-alive); one timer, set for the
    head of the FIFO, writes every answer that is due. Equal delays keep the
    FIFO sorted by due time, so the answers leave in request order.
    """

    def __init__(self, delay: float, stats: Stats) -> None:
        self.delay = delay
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.due: collections.deque[tuple[float, bool]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.closing = False  # a request said Connection: close; read no more

    def __repr__(self) -> str:
        return f"<SlowProtocol due={len(self.due)} closing={self.closing}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.due.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.closing or self.transport is None:
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail()

    # httptools callback: one whole request (head and body) has arrived
    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        self.due.append((self.loop.time() + self.delay, keep_alive))
        if not keep_alive:
            self.closing = True
        if self.timer is None:
            self.timer = self.loop.call_at(self.due[0][0], self._answer_due)

    def _answer_due(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.due and self.due[0][0] <= now and self.transport is not None:
            _, keep_alive = self.due.popleft()
            self.stats.answered += 1
            if keep_alive:
                self.transport.write(OK)
            else:
                self.transport.write(OK_CLOSE)
                self.transport.close()
                return
        if self.due:
            self.timer = self.loop.call_at(self.due[0][0], self._answer_due)

    def _fail(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.write(BAD_REQUEST)
            self.transport.close()


def raise_fd_limit() -> None:
    """Many mirror connections at once need more than the usual 1024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(host: str, port: int, delay: float) -> Stats:
    loop = asyncio.get_running_loop()
    stats = Stats()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: SlowProtocol(delay, stats), host, port, backlog=4096, reuse_address=True
    )
    async with server:
        print(f"slow server on {host}:{port}, delay {delay * 1000:.0f} ms", flush=True)
        await stop.wait()
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="an HTTP/1.1 server that answers after a delay")
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--delay", type=float, default=0.2, help="seconds (0.2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    raise_fd_limit()
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    stats = run(serve(host, int(port), args.delay))
    print(f"answered {stats.answered} requests on {stats.connections} connections", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
