"""The mirror connection's reading of answers after login, and its deadline.

A real MirrorConn on a running event loop, fed through ``data_received`` as
the event loop would feed it, with a transport that records. Answers are fed
whole, byte by byte and at hypothesis-chosen split points.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import MirrorError, MirrorTimeout
from gateway_postgres import codec
from gateway_postgres.replayer import MirrorConn


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True


def _conn() -> tuple[MirrorConn, Transport]:
    conn = MirrorConn(1 << 20)
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.logged_in()
    return conn, transport


def _run(coro_fn):  # type: ignore[no-untyped-def]
    return asyncio.run(coro_fn())


def _split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    last = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)):
        yield data[last:cut]
        last = cut
    yield data[last:]


PARSE_COMPLETE = codec.frame(b"1", b"")
BIND_COMPLETE = codec.frame(b"2", b"")
ROW = codec.frame(b"D", b"\x00\x01\x00\x00\x00\x04abcd")
NOTICE = codec.frame(b"N", b"SWARNING\x00Mhm\x00\x00")
NOTIFY = codec.frame(b"A", b"\x00\x00\x00\x01chan\x00payload\x00")
ERROR = codec.frame(b"E", b"SERROR\x00C42P01\x00Mno such table\x00\x00")
COMPLETE = codec.frame(b"C", b"SELECT 1\x00")
COPY_IN = codec.frame(b"G", b"\x00\x00\x01\x00\x00")


@settings(deadline=None, max_examples=200)
@given(cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_an_answer_in_any_pieces_is_read_the_same(cuts: list[int]) -> None:
    answer = (PARSE_COMPLETE + NOTICE + BIND_COMPLETE + ROW * 3 + ERROR + NOTIFY
              + codec.ready_for_query(b"E"))

    async def go() -> tuple[bool, int, bool, int]:
        conn, _ = _conn()
        conn.expect()
        fed = 0
        for piece in _split(answer, cuts):
            assert not conn.ready or fed == len(answer)
            conn.data_received(piece)
            fed += len(piece)
        await conn.answer()
        return conn.ready, conn.parsed, conn.failed, conn.status

    assert _run(go) == (True, 1, True, ord("E"))


def test_answers_one_byte_at_a_time_then_the_next_answer_starts_clean() -> None:
    async def go() -> list[tuple[int, bool, int]]:
        conn, _ = _conn()
        seen = []
        for answer in (PARSE_COMPLETE + ERROR + codec.ready_for_query(b"I"),
                       BIND_COMPLETE + ROW + COMPLETE + codec.ready_for_query(b"T")):
            conn.expect()
            for i in range(len(answer)):
                conn.data_received(answer[i:i + 1])
            await conn.answer()
            seen.append((conn.parsed, conn.failed, conn.status))
        return seen

    assert _run(go) == [(1, True, ord("I")), (0, False, ord("T"))]


def test_a_large_answer_is_stepped_over_without_being_kept() -> None:
    big_row = codec.frame(b"D", b"\x00\x01\x00\x10\x00\x00" + b"x" * (1 << 20))

    async def go() -> int:
        conn, _ = _conn()
        conn.expect()
        for i in range(0, len(big_row), 4096):
            conn.data_received(big_row[i:i + 4096])
            assert len(conn._cursor.tail) < 5  # at most a split header is held
        conn.data_received(COMPLETE + codec.ready_for_query(b"I"))
        await conn.answer()
        return conn.status

    assert _run(go) == ord("I")


def test_copy_in_response_wakes_the_reader_before_ready_for_query() -> None:
    async def go() -> tuple[bool, bool]:
        conn, _ = _conn()
        conn.expect()
        conn.data_received(COPY_IN)
        await conn.answer()
        return conn.copy_in, conn.ready

    assert _run(go) == (True, False)


def test_noise_between_answers_is_dropped_and_not_taken_for_an_answer() -> None:
    async def go() -> bool:
        conn, _ = _conn()
        conn.data_received(NOTIFY * 100 + NOTICE)
        conn.expect()
        return conn.ready or conn.failed or conn._cursor.tail != b""

    assert _run(go) is False


@pytest.mark.parametrize("bad", [
    pytest.param(b"D\x00\x00\x00\x02", id="length-below-4"),
    pytest.param(ROW + b"Z\xff\xff\xff\xff", id="negative-length"),
])
def test_a_malformed_frame_ends_the_connection_with_a_clear_error(bad: bytes) -> None:
    async def go() -> tuple[str, bool]:
        conn, transport = _conn()
        conn.expect()
        conn.data_received(bad)
        with pytest.raises(MirrorError) as exc:
            await conn.answer()
        return str(exc.value), transport.aborted

    message, aborted = _run(go)
    assert message.startswith("mirror sent a malformed message: invalid length")
    assert aborted


def test_copy_both_is_refused() -> None:
    async def go() -> str:
        conn, transport = _conn()
        conn.expect()
        conn.data_received(codec.frame(b"W", b"\x00\x00\x00"))
        with pytest.raises(MirrorError) as exc:
            await conn.answer()
        assert transport.aborted
        return str(exc.value)

    assert "COPY BOTH" in _run(go)


def test_bytes_left_from_login_are_read_as_the_first_answer() -> None:
    async def go() -> int:
        conn = MirrorConn(1 << 20)
        conn.connection_made(Transport())  # type: ignore[arg-type]
        conn.data_received(codec.ready_for_query(b"I") + NOTICE)
        kind, _ = await conn.frame()
        assert kind == ord("Z")
        conn.logged_in()
        conn.expect()
        conn.data_received(codec.ready_for_query(b"T"))
        await conn.answer()
        return conn.status

    assert _run(go) == ord("T")


def test_an_unanswered_request_times_out_and_the_connection_is_ended() -> None:
    async def go() -> tuple[str, bool]:
        conn, transport = _conn()
        with pytest.raises(MirrorTimeout) as exc:
            await conn.ask(b"Q\x00\x00\x00\x05\x00", 0.05)
        return str(exc.value), transport.aborted

    assert _run(go) == ("no answer within 0.05s", True)


def test_a_deadline_met_leaves_the_connection_alone_after_it_passes() -> None:
    async def go() -> tuple[str | None, bool, bool]:
        conn, transport = _conn()
        conn.expect()
        conn.arm(0.05)
        conn.data_received(codec.ready_for_query(b"I"))
        await conn.answer()
        conn.disarm()
        await asyncio.sleep(0.15)
        return conn.lost, conn.timed_out, transport.aborted

    assert _run(go) == (None, False, False)


def test_each_new_request_moves_the_deadline_on() -> None:
    # Requests answered within the timeout one after another, for longer
    # than the timeout in all: none is late, so none times out.
    async def go() -> tuple[int, str | None]:
        conn, _ = _conn()
        answered = 0
        for _ in range(6):
            conn.expect()
            conn.arm(0.1)
            await asyncio.sleep(0.04)
            conn.data_received(codec.ready_for_query(b"I"))
            await conn.answer()
            answered += 1
        conn.disarm()
        return answered, conn.lost

    assert _run(go) == (6, None)


# --- re-preparing statements a mirror connection lacks ------------------------------


def _bind(statement: bytes, portal: bytes = b"") -> bytes:
    return codec.frame(b"B", portal + b"\0" + statement + b"\0\0\0\0\0\0\0")


def _describe(what: bytes, name: bytes) -> bytes:
    return codec.frame(b"D", what + name + b"\0")


EXECUTE = codec.frame(b"E", b"\0\0\0\0\0")
SYNC = codec.sync()


def _replayer(*known: bytes) -> tuple[object, MirrorConn]:
    from types import SimpleNamespace

    from gateway.pool import UpstreamPool
    from gateway_postgres.replayer import PgReplayer
    from gateway_postgres.statements import StatementRegistry

    registry = StatementRegistry()
    for name in known:
        registry.note(codec.parse(name, b"SELECT " + name))
    upstream = SimpleNamespace(name="m", host="127.0.0.1", port=1, user=None, database=None,
                               password=None, users={})
    mirror = SimpleNamespace(name="m", upstream=upstream, config=SimpleNamespace(timeout=1.0))
    replayer = PgReplayer(mirror, UpstreamPool("m", 1), {"user": "u"},  # type: ignore[arg-type]
                          registry, 1 << 20)
    return replayer, MirrorConn(1 << 20)


def _prepare(data: bytes, *prepared: bytes) -> tuple[bytes, list[bytes], set[bytes]]:
    async def go() -> tuple[bytes, list[bytes], set[bytes]]:
        replayer, conn = _replayer(b"s1", b"s2")
        conn.prepared.update(prepared)
        out, parses = replayer._with_statements(conn, data)  # type: ignore[attr-defined]
        return out, parses, conn.prepared

    return _run(go)


def test_a_bind_to_a_statement_the_mirror_has_is_sent_unchanged() -> None:
    unit = _bind(b"s1") + EXECUTE + SYNC
    assert _prepare(unit, b"s1") == (unit, [], {b"s1"})


def test_a_bind_or_describe_to_a_missing_statement_gets_its_parse_first() -> None:
    unit = _describe(b"S", b"s2") + _bind(b"s1", b"portal") + EXECUTE + SYNC
    out, parses, _ = _prepare(unit)
    assert out == codec.parse(b"s2", b"SELECT s2") + codec.parse(b"s1", b"SELECT s1") + unit
    assert parses == [b"s2", b"s1"]


def test_a_statement_parsed_in_the_same_unit_is_not_injected() -> None:
    unit = codec.parse(b"s1", b"SELECT 2") + _bind(b"s1") + _describe(b"P", b"") + SYNC
    assert _prepare(unit) == (unit, [b"s1"], set())


def test_close_and_deallocate_forget_what_the_mirror_had() -> None:
    close = codec.close_statement(b"s1")
    assert _prepare(close + SYNC, b"s1", b"s2")[2] == {b"s2"}
    assert _prepare(codec.query("DEALLOCATE s2"), b"s1", b"s2")[2] == {b"s1"}
    assert _prepare(codec.query("DISCARD ALL"), b"s1", b"s2")[2] == set()


def test_unknown_unnamed_and_malformed_binds_are_left_to_the_mirror() -> None:
    unterminated = codec.frame(b"B", b"portal\0s1")
    bad_length = b"B\x00\x00\x00\x02"
    unit = _bind(b"nobody") + _bind(b"") + unterminated + SYNC + bad_length
    assert _prepare(unit) == (unit, [], set())


def test_a_shorter_timeout_is_kept_even_while_a_longer_one_is_armed() -> None:
    # A reload may lower a mirror's timeout while its connection's watchdog
    # is set for the old, longer one.
    async def go() -> str:
        conn, _ = _conn()
        conn.expect()
        conn.arm(30.0)
        conn.data_received(codec.ready_for_query(b"I"))
        await conn.answer()
        conn.disarm()
        with pytest.raises(MirrorTimeout) as exc:
            await asyncio.wait_for(conn.ask(b"Q\x00\x00\x00\x05\x00", 0.05), 5.0)
        return str(exc.value)

    assert _run(go) == "no answer within 0.05s"
