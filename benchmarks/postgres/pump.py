# A bare TCP byte pump: the ceiling for any relay written in Python.
#
# Owns: one upstream connection per client connection, bytes copied both ways
# with asyncio Protocol callbacks on uvloop, no parsing at all, flow control
# through pause_reading/resume_reading. It knows nothing of Postgres; the
# benchmark puts it where the gateway would be, to show how close a Python
# relay can get to pgbouncer on this machine.
#
#   python benchmarks/postgres/pump.py --listen 127.0.0.1:6500 --upstream 127.0.0.1:5432
from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

try:
    import uvloop
except ImportError:  # pragma: no cover - the benchmark wants uvloop; run anyway
    uvloop = None  # type: ignore[assignment]


_TASKS: set[asyncio.Task[None]] = set()


class _Half(asyncio.Protocol):
    """One side of a pair: what it receives goes to ``peer``'s transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []  # client bytes that arrive before upstream is up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass: cast, not check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            if self.peer.transport.can_write_eof():
                self.peer.transport.write_eof()
                return True  # keep our write side open for the other direction
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Flow control: when our outgoing buffer is full, stop reading the peer.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Half):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._connect())
        _TASKS.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(_TASKS.discard)

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Half, *self.upstream)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            upstream.transport.close()  # type: ignore[union-attr]
            return
        upstream.peer, self.peer = self, upstream
        for chunk in self.pending:
            upstream.transport.write(chunk)  # type: ignore[union-attr]
        self.pending.clear()
        self.transport.resume_reading()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Client(upstream), *listen, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"pump listening on {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A bare TCP byte pump on uvloop.")
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept clients on")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    args = parser.parse_args()
    coro = serve(_addr(args.listen), _addr(args.upstream))
    if uvloop is not None:
        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
