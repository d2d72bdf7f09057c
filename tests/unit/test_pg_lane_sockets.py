"""The C lane reading and writing a session's sockets itself (_lane.c's Poller).

A session on real loopback TCP connections, under the event loop the gateway runs on and
under asyncio's own: what the lane forwards while it owns the sockets, how
it holds back a fast side for a slow one, and how it gives the sockets back
to the transports (at an end of file, a chunk it hands back, the session's
end, a failure), after which the transports carry on as if it had never
owned them. The integration tests compare whole gateways with and without it
against real Postgres servers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway import ListenerStats
from gateway_postgres import codec
from gateway_postgres import relay as relay_module
from gateway_postgres.relay import PgSession, Phase, PrimaryLink
from tests.unit.test_pg_relay_scan import Handler

pytestmark = pytest.mark.skipif(relay_module.Poller is None, reason="the C lane is not built")

CYCLE = (codec.frame(b"B", b"\0s\0\0\0\0\0\0\0") + codec.frame(b"E", b"\0\0\0\0\0")
         + codec.sync())
ANSWER = (codec.frame(b"2", b"") + codec.frame(b"D", b"\0\x01\0\0\0\x011")
          + codec.frame(b"C", b"SELECT 1\0") + codec.ready_for_query(b"I"))


class SocketHandler(Handler):
    """The test rig's handler, with the event loop's Poller as the plugin has it."""

    def lane_poller(self) -> Any:
        return relay_module.lane_poller()


class Ends:
    """A READY unmirrored session between two socket pairs: ``client`` and
    ``primary`` are the far ends, as the client and the server hold them."""

    def __init__(self, session: PgSession, client: socket.socket, primary: socket.socket) -> None:
        self.session, self.client, self.primary = session, client, primary

    async def read(self, sock: socket.socket, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        got = bytearray()
        while len(got) < n:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(got)), 5)
            if not chunk:
                break
            got += chunk
        return bytes(got)

    async def ask(self) -> bytes:
        """The client sends a request cycle: what the primary reads of it."""
        await asyncio.get_running_loop().sock_sendall(self.client, CYCLE)
        return await self.read(self.primary, len(CYCLE))

    async def eof(self, sock: socket.socket) -> bool:
        loop = asyncio.get_running_loop()
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 5)
            if not chunk:
                return True


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets: the gateway's end, and the far one.
    (A peer closing a TCP socket is an end of file to read, where a closed
    Unix socket pair also reports a hang-up.)"""
    with socket.create_server(("127.0.0.1", 0)) as server:
        far = socket.create_connection(server.getsockname())
        near, _ = server.accept()
    return near, far


async def owned(stats: Any = None) -> Ends:
    loop = asyncio.get_running_loop()
    handler = SocketHandler()
    if stats is not None:
        handler.context.stats = stats
    session = PgSession(handler)
    gw_client, client = tcp_pair()
    gw_primary, primary = tcp_pair()
    for sock in (client, primary):
        sock.setblocking(False)
    await loop.connect_accepted_socket(lambda: session, gw_client)
    transport, _ = await loop.connect_accepted_socket(lambda: PrimaryLink(session), gw_primary)
    session.primary = transport  # type: ignore[assignment]
    session._timer.cancel()
    session._timer = None
    session.phase = Phase.READY
    session._relaying = True
    session.mirrors = None
    session._lane_plain()
    assert session._lane.owning
    return Ends(session, client, primary)


def run(test: Callable[[], Awaitable[None]], loop_kind: str) -> None:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(test())
    finally:
        loop.close()


loops = pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])


@loops
def test_the_lane_forwards_and_counts_on_the_sockets_it_owns(loop_kind: str) -> None:
    async def test() -> None:
        ends = await owned()
        loop = asyncio.get_running_loop()
        for i in range(1, 51):
            assert await ends.ask() == CYCLE
            await loop.sock_sendall(ends.primary, ANSWER)
            assert await ends.read(ends.client, len(ANSWER)) == ANSWER
            assert ends.session.stats.primary_units == i
        assert ends.session._lane.owning
        assert not ends.session.client.is_reading()  # type: ignore[union-attr]
        assert ends.session.stats.primary_latency.count == 50

    run(test, loop_kind)


@loops
def test_a_slow_client_holds_the_primary_back_and_loses_nothing(loop_kind: str) -> None:
    async def test() -> None:
        ends = await owned()
        loop = asyncio.get_running_loop()
        row = codec.frame(b"D", b"\0\x01\0\0\x04\0" + b"x" * 1024)
        answer = row * 16384 + codec.frame(b"C", b"SELECT 16384\0") + codec.ready_for_query(b"I")
        await ends.ask()
        sending = asyncio.ensure_future(loop.sock_sendall(ends.primary, answer))
        await asyncio.sleep(0.3)
        # 16 MiB, the client reads nothing: the lane stopped reading the
        # primary once the client's socket was full, so the primary's send
        # waits, and the lane holds at most the chunk it could not write.
        assert not sending.done()
        assert ends.session._lane.owning
        assert await ends.read(ends.client, len(answer)) == answer
        await sending
        assert ends.session.stats.primary_units == 1

    run(test, loop_kind)


@loops
def test_the_client_going_away_ends_the_session_through_the_transports(loop_kind: str) -> None:
    async def test() -> None:
        ends = await owned()
        await ends.ask()
        ends.client.close()
        # The lane reads the end of file and gives the sockets back; the
        # client transport reads it again and the session ends as always,
        # closing its primary connection.
        assert await ends.eof(ends.primary)
        assert ends.session.phase is Phase.CLOSED
        assert not ends.session._lane.owning

    run(test, loop_kind)


@loops
def test_a_chunk_handed_back_gives_the_sockets_back_to_the_transports(loop_kind: str) -> None:
    async def test() -> None:
        ends = await owned()
        loop = asyncio.get_running_loop()
        await ends.ask()
        # A length word below 4: the lane leaves the chunk to the session's
        # Python, after forwarding it.
        bad = b"Z\0\0\0\x02"
        await loop.sock_sendall(ends.primary, bad)
        assert await ends.read(ends.client, len(bad)) == bad
        await asyncio.sleep(0.05)
        session = ends.session
        assert not session._lane.owning
        assert session.client.is_reading() and session.primary.is_reading()  # type: ignore[union-attr]
        # The transports carry the session on.
        assert await ends.ask() == CYCLE

    run(test, loop_kind)


@loops
def test_the_session_s_abort_takes_the_sockets_back_before_they_close(loop_kind: str) -> None:
    async def test() -> None:
        ends = await owned()
        session = ends.session
        owning_at_close: list[bool] = []

        class Watched:
            """The client transport, noting whether the lane still owned
            the sockets when it was aborted."""

            def __init__(self, transport: Any) -> None:
                self.transport = transport

            def __getattr__(self, name: str) -> Any:
                return getattr(self.transport, name)

            def abort(self) -> None:
                owning_at_close.append(session._lane.owning)
                self.transport.abort()

        session.client = Watched(session.client)  # type: ignore[assignment]
        session.abort()
        # The lane let go before the transports closed the sockets (their
        # numbers could be reused at once, by a socket another lane owns).
        assert owning_at_close == [False]
        assert not session._lane.owning
        assert await ends.eof(ends.client)
        assert await ends.eof(ends.primary)

    run(test, loop_kind)


class FailingStats(ListenerStats):
    """Stats whose unit counter cannot be written: the lane's work raises."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        if name == "primary_units" and value:
            raise RuntimeError("counter broke")
        super().__setattr__(name, value)


@loops
def test_a_failure_in_the_lane_ends_that_session_and_is_reported(loop_kind: str) -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        ends = await owned(FailingStats("t"))
        await ends.ask()
        await loop.sock_sendall(ends.primary, ANSWER)
        # The answer was forwarded before counting failed; then the session
        # ends, as when a protocol's data_received raises.
        assert await ends.read(ends.client, len(ANSWER)) == ANSWER
        assert await ends.eof(ends.client)
        assert await ends.eof(ends.primary)
        assert ends.session.phase is Phase.CLOSED
        assert [str(c.get("exception")) for c in reported] == ["counter broke"]

    run(test, loop_kind)
