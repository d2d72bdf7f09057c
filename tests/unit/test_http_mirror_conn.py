"""The HTTP mirror connection's reading of answers, and its deadline.

A real MirrorConn on a running event loop, fed through ``data_received`` as
the event loop would feed it, with a transport that records. Answers are fed
whole and at hypothesis-chosen split points, through both readers: the
per-connection llhttp parser and the strict parser (answers to HEAD, and
every answer where httptools is missing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import MirrorError, MirrorTimeout
from gateway_http.replayer import MirrorConn


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True


def _conn(reader: str) -> tuple[MirrorConn, Transport]:
    conn = MirrorConn()
    if reader == "strict":
        conn._llhttp = None  # as without httptools
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def _split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``data`` in pieces, none empty (the event loop never delivers b"")."""
    last = 0
    for cut in sorted(set(c % len(data) for c in cuts) - {0}):
        yield data[last:cut]
        last = cut
    yield data[last:]


REQUEST = b"POST / HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\n\r\n"
# An informational head (its Retry-After is not the final one's), then a 503
# with a chunked body, trailers and Retry-After.
ANSWER = (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\nRetry-After: 99\r\n\r\n"
          b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n"
          b"Retry-After: 7\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n")
READERS = pytest.mark.parametrize("reader", ["llhttp", "strict"])


async def _exchange(conn: MirrorConn, pieces: Iterator[bytes], method: bytes = b"POST",
                    timeout: float = 5.0) -> int:
    task = asyncio.ensure_future(conn.exchange(REQUEST, method, timeout))
    await asyncio.sleep(0)
    for piece in pieces:
        assert not task.done()
        conn.data_received(piece)
    return await task


@settings(deadline=None, max_examples=150)
@given(cuts=st.lists(st.integers(min_value=0), max_size=8),
       reader=st.sampled_from(["llhttp", "strict"]))
def test_an_answer_in_any_pieces_is_read_the_same(cuts: list[int], reader: str) -> None:
    async def go() -> tuple[int, bool, float | None, bool]:
        conn, transport = _conn(reader)
        status = await _exchange(conn, _split(ANSWER, cuts))
        return status, conn.keep_alive, conn.retry_after, transport.closed

    assert asyncio.run(go()) == (503, True, 7.0, False)


@READERS
def test_answers_follow_each_other_on_one_connection(reader: str) -> None:
    async def go() -> list[tuple[int, bool]]:
        conn, transport = _conn(reader)
        seen = []
        for answer in (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
                       b"HTTP/1.1 204 No Content\r\n\r\n",
                       b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"):
            seen.append((await _exchange(conn, iter([answer])), conn.keep_alive))
        assert transport.written == [REQUEST] * 4 and not transport.closed
        return seen

    assert asyncio.run(go()) == [(200, True), (204, True), (404, True), (200, False)]


@READERS
def test_a_body_without_a_length_ends_with_the_connection(reader: str) -> None:
    async def go() -> tuple[int, bool]:
        conn, _ = _conn(reader)
        task = asyncio.ensure_future(conn.exchange(REQUEST, b"POST", 5.0))
        await asyncio.sleep(0)
        conn.data_received(b"HTTP/1.0 200 OK\r\n\r\nsome body")
        await asyncio.sleep(0)
        assert not task.done()
        conn.eof_received()
        conn.connection_lost(None)
        return await task, conn.keep_alive

    assert asyncio.run(go()) == (200, False)


@READERS
def test_a_body_cut_short_is_a_mirror_error(reader: str) -> None:
    async def go() -> None:
        conn, _ = _conn(reader)
        task = asyncio.ensure_future(conn.exchange(REQUEST, b"POST", 5.0))
        await asyncio.sleep(0)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        conn.eof_received()
        conn.connection_lost(None)
        with pytest.raises(MirrorError, match="closed the connection"):
            await task

    asyncio.run(go())


@READERS
@pytest.mark.parametrize("answer", [
    b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
], ids=["tls", "status", "two-lengths", "101"])
def test_a_malformed_answer_ends_the_connection(reader: str, answer: bytes) -> None:
    async def go() -> None:
        conn, transport = _conn(reader)
        with pytest.raises(MirrorError, match="bad response"):
            await _exchange(conn, iter([answer]))
        assert transport.closed and conn.closed

    asyncio.run(go())


@READERS
def test_an_answer_to_head_has_no_body_whatever_its_length(reader: str) -> None:
    async def go() -> tuple[int, int]:
        conn, _ = _conn(reader)
        head = await _exchange(conn, iter([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"]),
                               method=b"HEAD")
        created = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        after = await _exchange(conn, iter([created]))
        return head, after

    assert asyncio.run(go()) == (200, 201)


@READERS
def test_a_second_answer_to_one_request_ends_the_connection(reader: str) -> None:
    # llhttp reports the first answer before it meets the second; the strict
    # parser refuses the chunk that holds both, and the exchange with it.
    async def go() -> None:
        conn, transport = _conn(reader)
        one = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        if reader == "llhttp":
            assert await _exchange(conn, iter([one + one])) == 200
        else:
            with pytest.raises(MirrorError, match="response without a request"):
                await _exchange(conn, iter([one + one]))
        assert transport.closed and conn.closed

    asyncio.run(go())


def test_bytes_while_nothing_was_asked_end_the_connection() -> None:
    conn, transport = _conn("llhttp")
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.closed and conn.closed


def test_no_answer_within_the_timeout_is_a_mirror_timeout() -> None:
    async def go() -> None:
        conn, transport = _conn("llhttp")
        with pytest.raises(MirrorTimeout):
            await conn.exchange(REQUEST, b"POST", 0.05)
        assert transport.closed

    asyncio.run(go())


def test_the_watchdog_follows_each_exchanges_own_deadline() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    async def go() -> None:
        conn, transport = _conn("llhttp")
        # The first exchange arms the watchdog for 0.2 s from now; the second,
        # started 0.15 s later with a 0.2 s timeout and never answered, must
        # outlive that timer and still time out at its own deadline.
        assert await _exchange(conn, iter([ok]), timeout=0.2) == 200
        await asyncio.sleep(0.15)
        task = asyncio.ensure_future(conn.exchange(REQUEST, b"POST", 0.2))
        await asyncio.sleep(0.1)
        assert not task.done() and not transport.closed
        with pytest.raises(MirrorTimeout):
            await task
        assert transport.closed

    asyncio.run(asyncio.wait_for(go(), 5))


def test_a_shorter_timeout_moves_the_watchdog_forward() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    async def go() -> None:
        conn, transport = _conn("llhttp")
        assert await _exchange(conn, iter([ok]), timeout=30.0) == 200
        with pytest.raises(MirrorTimeout):
            await conn.exchange(REQUEST, b"POST", 0.05)
        assert transport.closed

    asyncio.run(asyncio.wait_for(go(), 5))


def test_closing_the_connection_mid_exchange_fails_it() -> None:
    async def go() -> None:
        conn, _ = _conn("llhttp")
        task = asyncio.ensure_future(conn.exchange(REQUEST, b"POST", 5.0))
        await asyncio.sleep(0)
        conn.close()
        conn.connection_lost(None)
        with pytest.raises(MirrorError):
            await task

    asyncio.run(go())


@READERS
def test_retry_after_is_the_final_answers_own(reader: str) -> None:
    async def go() -> float | None:
        conn, _ = _conn(reader)
        await _exchange(conn, iter([b"HTTP/1.1 100 Continue\r\nRetry-After: 5\r\n\r\n"
                                    b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"]))
        return conn.retry_after

    assert asyncio.run(go()) is None
