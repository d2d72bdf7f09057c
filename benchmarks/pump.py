# A bare TCP byte pump: the ceiling for any relay written in Python.
#
# Owns: one upstream connection per client connection, bytes copied both ways
# with asyncio Protocol callbacks on uvloop, no parsing at all, flow control
# through pause_reading/resume_reading; with --tee, a second upstream (the
# mirror) per client connection that gets a copy of every client byte and
# whose answers are read and thrown away. It knows nothing of Postgres or
# HTTP; the benchmarks put it where the gateway would be, to show how close a
# Python relay can get to pgbouncer (postgres/run.py) and, teeing, how close a
# Python mirroring relay can get to nginx's `mirror` (http/run.py): every
# mirroring relay makes at least these reads and writes.
#
#   python benchmarks/pump.py --listen 127.0.0.1:6500 --upstream 127.0.0.1:5432
#   python benchmarks/pump.py --listen 127.0.0.1:8100 --upstream 127.0.0.1:8001 \
#       --tee 127.0.0.1:8002
from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from functools import partial
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
        # One side is done: close both, as Postgres and HTTP/1.1 peers expect.
        # Half-closing the other side instead (write_eof) made uvloop 0.23
        # abort with "double free or corruption" when nginx ended its
        # keep-alive connections under wrk.
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
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
        try:
            await self._connect_more()
        except OSError:
            self.transport.close()
            upstream.transport.close()  # type: ignore[union-attr]
            return
        if self.transport.is_closing():
            upstream.transport.close()  # type: ignore[union-attr]
            return
        upstream.peer, self.peer = self, upstream
        for chunk in self.pending:
            self.data_received(chunk)
        self.pending.clear()
        self.transport.resume_reading()

    async def _connect_more(self) -> None:
        """Open what else a client connection needs before bytes flow."""


class _Tee(asyncio.Protocol):
    """The mirror's side of a teeing pair: its answers are read and thrown away.

    A mirror that falls a write buffer behind is cut off (a byte stream with
    a gap in it is garbage to the mirror) and counted in ``TEE_CUT``.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        pass

    def pause_writing(self) -> None:
        TEE_CUT[0] += 1
        print(f"cut off a mirror connection that fell behind ({TEE_CUT[0]} so far)", flush=True)
        assert self.transport is not None
        self.transport.abort()


TEE_CUT = [0]  # mirror connections cut off for falling behind


class _TeeClient(_Client):
    """A client whose every byte also goes to a mirror connection of its own."""

    def __init__(self, upstream: tuple[str, int], tee: tuple[str, int]) -> None:
        super().__init__(upstream)
        self.tee_addr = tee
        self.tee: asyncio.Transport | None = None

    async def _connect_more(self) -> None:
        transport, _ = await asyncio.get_running_loop().create_connection(_Tee, *self.tee_addr)
        self.tee = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        peer.transport.write(data)
        tee = self.tee
        if tee is not None and not tee.is_closing():
            tee.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.tee is not None:
            self.tee.close()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def serve(listen: tuple[str, int], upstream: tuple[str, int],
                tee: tuple[str, int] | None = None) -> None:
    loop = asyncio.get_running_loop()
    factory: Callable[[], _Client]
    if tee is None:
        factory = partial(_Client, upstream)
    else:
        factory = partial(_TeeClient, upstream, tee)
    server = await loop.create_server(factory, *listen, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    also = f", every client byte also to {tee[0]}:{tee[1]}" if tee else ""
    print(f"pump listening on {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]}{also}",
          flush=True)
    async with server:
        await stop.wait()
    if tee is not None:
        print(f"mirror connections cut off for falling behind: {TEE_CUT[0]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="A bare TCP byte pump on uvloop.")
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept clients on")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--tee", help="HOST:PORT that gets a copy of every client byte")
    args = parser.parse_args()
    coro = serve(_addr(args.listen), _addr(args.upstream), _addr(args.tee) if args.tee else None)
    if uvloop is not None:
        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
