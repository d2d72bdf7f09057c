"""The C lane (_lane.c) against the session's own Python.

The lane does the per-chunk work of an unmirrored session and of a dark one
(every mirror refusing units) and hands every other chunk back to the session.
Each test drives a session with the lane and one without it (its Python reads
every chunk) through the same traffic, split the same ways, and compares what
they forwarded and counted, and the state the session would go on from.
"""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_postgres import codec
from gateway_postgres import relay as relay_module
from gateway_postgres.relay import PgSession
from tests.unit.test_pg_relay_scan import (
    IDLE,
    IN_TX,
    PARSE_BIND_COMPLETE,
    Rig,
    _apply,
    backend_noise_st,
    bind,
    chunks,
    command_complete,
    cuts_st,
    cycles,
    execute,
    item_st,
    mirror_event_st,
    plain_item_st,
    relay_settings,
    status_st,
)

pytestmark = pytest.mark.skipif(relay_module.Lane is None, reason="the C lane is not built")

PLAIN, DARK = 1, 2
CYCLE = bind(b"P0_1") + execute() + codec.sync()
ANSWER = PARSE_BIND_COMPLETE + command_complete("SELECT 1") + IDLE


def synced(rig: Rig) -> PgSession:
    """The session, with what its lane counted into set on it (the lane runs on)."""
    s = rig.session
    if s._lane is not None and (state := s._lane.state()) is not None:
        s._take_lane(state)
    return s


def observed(rig: Rig) -> tuple[object, ...]:
    s, m = synced(rig), rig.mirrors
    hist = rig.stats.primary_latency
    return (m.questions, m.dropped, m.left_out.skipped, [u.data for u in m.offered],
            [u.settled for u in m.offered],
            rig.stats.primary_units, list(hist.counts), hist.sum,
            dict(s.statements._parses) if s.statements else None, s._idle,
            list(s._pending), s._down_until, m.reconfigured, s._back.skip, s._back.tail,
            s._last_unit is None, s._last_term,
            s._waiting_since, s._answered_since, s.phase, s.mirrors is None,
            rig.primary.data, rig.client.data)


def unmirrored(lane: bool) -> Rig:
    """A session that sampling left unmirrored, past start-up as _ready leaves it."""
    rig = Rig(mirrored=False, lane=lane)
    rig.session.ctx.mirrors = []
    rig.session._ready(b"")
    return rig


# --- a dark session ------------------------------------------------------------------


@relay_settings
@given(
    rounds=st.lists(
        st.tuples(st.lists(st.one_of(plain_item_st, plain_item_st, item_st), min_size=1,
                           max_size=3),
                  st.lists(status_st, max_size=3),
                  mirror_event_st, st.sampled_from(["whole", "whole", "messages", "cuts"]),
                  st.booleans()),
        min_size=1, max_size=12),
    cuts=cuts_st,
    budget=st.sampled_from([64 * 1024 * 1024, 60]),  # a mirror's queue_bytes
)
def test_the_lane_counts_a_dark_session_as_its_python_does(
    rounds: list[tuple[list[list[bytes]], list[bytes], str, str, bool]], cuts: list[int],
    budget: int,
) -> None:
    clock = [100.0]
    relay_module._clock = lambda: clock[0]  # type: ignore[attr-defined]
    try:
        laned, python = Rig(lane=True), Rig()
        for rig in (laned, python):
            rig.mirrors.sessions[0].mirror.config.queue_bytes = budget
            rig.session._budgets(rig.mirrors)
            rig.mirrors.down, rig.mirrors.until = True, float("inf")
        for items, statuses, event, split, answer_whole in rounds:
            sent, answer = cycles(items, statuses, split, cuts)
            answered = [answer] if answer_whole else chunks(answer, cuts)
            for rig in (laned, python):
                _apply(rig, event, clock[0])
                rig.send(sent)
            clock[0] += 0.25  # a latency on a bucket's bound: le, not lt
            for rig in (laned, python):
                rig.answer(answered)
            clock[0] += 0.25
            assert observed(laned) == observed(python)
    finally:
        relay_module._clock = time.monotonic  # type: ignore[attr-defined]


def test_a_dark_session_s_pgbench_cycles_stay_in_the_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(lane=True)
    rig.go_dark()
    lane = rig.session._lane
    assert lane.mode == DARK

    def no_python(*args: object) -> None:
        raise AssertionError("the session's Python read a chunk")

    for name in ("_dark_front", "_scan_front", "_dark_back", "_scan_back", "_handoff"):
        monkeypatch.setattr(PgSession, name, no_python)
    monkeypatch.setattr(relay_module, "_clock", no_python)  # the lane took the clock before
    for _ in range(3):
        rig.send([CYCLE])
        rig.answer([ANSWER])
    rig.send([CYCLE + CYCLE])  # pipelined, answered in two chunks
    rig.answer([IN_TX + command_complete("SELECT 1"), IN_TX])
    rig.answer([])
    assert lane.mode == DARK
    assert rig.mirrors.lane_counted.offered == 5
    assert rig.mirrors.lane_counted.dropped == {"refused": 5}
    assert rig.stats.primary_units == 6 and rig.stats.primary_latency.count == 6
    s = synced(rig)
    assert not s._pending and not s._idle and s._last_unit is None
    assert rig.primary.data.endswith(CYCLE + CYCLE)
    assert rig.client.data.endswith(IN_TX)


def test_a_chunk_the_lane_cannot_count_goes_back_to_the_session_and_the_lane_resumes() -> None:
    rig = Rig(lane=True)
    m = rig.mirrors
    rig.go_dark()
    lane = rig.session._lane
    rig.send([CYCLE])
    rig.answer([ANSWER])
    parse = codec.parse(b"s1", b"SELECT 1")
    rig.send([parse + bind(b"s1") + execute() + codec.sync()])  # a Parse: the full scan
    assert lane.mode == 0
    assert rig.session.statements.get(b"s1") == parse
    assert len(m.unoffered) == 1 and m.lane_counted.offered == 1
    rig.answer([ANSWER])  # nothing pending: the lane takes over again
    assert lane.mode == DARK
    rig.send([CYCLE])
    rig.answer([ANSWER])
    assert m.dropped == {"too_large": 0, "refused": 3} and rig.stats.primary_units == 4
    # A queue changed: the next transaction asks the mirrors again, in Python.
    m.changes.count += 1
    m.down, m.until = False, 0.0
    rig.send([CYCLE])
    assert lane.mode == 0 and len(m.offered) == 2 and m.offered[-1].data == CYCLE
    rig.answer([ANSWER])
    assert lane.mode == 0  # lit: every unit is cut in Python


def test_the_lane_hands_back_the_first_chunk_after_the_backoff_to_ask_again() -> None:
    clock = [10.0]
    relay_module._clock = lambda: clock[0]  # type: ignore[attr-defined]
    try:
        rig = Rig(lane=True)
        m = rig.mirrors
        m.down, m.until = True, 11.0  # a mirror in backoff until then
        rig.send([CYCLE])
        rig.answer([ANSWER])
        lane = rig.session._lane
        assert lane.mode == DARK and m.questions == 1
        clock[0] = 10.9
        rig.send([CYCLE])
        rig.answer([ANSWER])
        assert lane.mode == DARK and m.questions == 1
        clock[0] = 11.0
        rig.send([CYCLE])
        assert lane.mode == 0 and m.questions == 2
    finally:
        relay_module._clock = time.monotonic  # type: ignore[attr-defined]


def test_a_chunk_over_a_mirror_s_byte_budget_goes_back_to_the_session() -> None:
    rig = Rig(lane=True)
    m = rig.mirrors
    m.sessions[0].mirror.config.queue_bytes = len(CYCLE) + 10
    rig.session._budgets(m)
    rig.go_dark()
    rig.send([CYCLE])
    rig.answer([ANSWER])
    assert rig.session._lane.mode == DARK
    big = bind(b"P0_1") + execute() + codec.frame(b"H", b"x" * 20) + codec.sync()
    rig.send([big])
    assert rig.session._lane.mode == 0
    assert m.dropped == {"too_large": 1, "refused": 1}


@pytest.mark.parametrize("cut", ["inside_a_unit", "inside_a_header"])
def test_the_lane_waits_for_a_unit_boundary_on_the_client_side(
    cut: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_module, "_clock", lambda: 1.0)  # the same latencies in both
    # The primary answers while the client's next unit is only partly in:
    # the lane takes over only once the session stands between two units.
    laned, python = Rig(lane=True), Rig()
    parse = codec.parse(b"s1", b"SELECT 1")
    close = codec.close_statement(b"s1") + codec.flush()
    for rig in (laned, python):
        rig.go_dark()
        rig.send([parse + bind(b"s1") + execute() + codec.sync()])
        rig.answer([ANSWER])
        if cut == "inside_a_unit":
            rig.send([CYCLE + close])  # the Close's unit ends at the next Sync
            rig.answer([ANSWER])
            rig.send([codec.sync()])
        else:
            rig.send([CYCLE + CYCLE[:3]])
            rig.answer([ANSWER])
            rig.send([CYCLE[3:]])
        rig.answer([IDLE])
        rig.send([CYCLE])
        rig.answer([ANSWER])
    assert observed(laned) == observed(python)
    assert (laned.session.statements.get(b"s1") is None) == (cut == "inside_a_unit")


def test_a_split_ready_for_query_goes_back_to_the_session() -> None:
    rig = Rig(lane=True)
    rig.go_dark()
    lane = rig.session._lane
    rig.send([CYCLE])
    answer = ANSWER
    rig.answer([answer[:-1]])  # the status byte still to come
    assert lane.mode == 0
    rig.answer([answer[-1:]])
    s = synced(rig)
    assert not s._pending and s._idle and rig.stats.primary_units == 2
    assert lane.mode == DARK


def test_a_bytearray_chunk_is_handed_back_before_it_is_forwarded() -> None:
    rig = Rig(lane=True)
    rig.go_dark()
    rig.send([bytearray(CYCLE)])  # type: ignore[list-item]
    assert rig.primary.data.endswith(CYCLE) and rig.primary.data.count(CYCLE) == 1
    assert rig.session._lane.mode == 0 and len(rig.mirrors.unoffered) == 1


# --- an unmirrored session -----------------------------------------------------------

client_st = st.lists(st.one_of(plain_item_st, item_st), max_size=6).map(
    lambda items: b"".join(m for item in items for m in item))


@relay_settings
@given(
    exchanges=st.lists(
        st.tuples(client_st, backend_noise_st, st.lists(status_st, max_size=3), cuts_st,
                  st.booleans()),
        min_size=1, max_size=8),
    garbage=st.one_of(st.none(), st.binary(min_size=1, max_size=12)),
)
def test_the_lane_counts_an_unmirrored_session_as_its_python_does(
    exchanges: list[tuple[bytes, bytes, list[bytes], list[int], bool]], garbage: bytes | None
) -> None:
    clock = [50.0]
    relay_module._clock = lambda: clock[0]  # type: ignore[attr-defined]
    try:
        laned, python = unmirrored(True), unmirrored(False)
        assert laned.session._lane.mode == PLAIN
        for client, noise, statuses, cuts, client_split in exchanges:
            answer = noise + b"".join(codec.ready_for_query(s) for s in statuses)
            sent = chunks(client, cuts) if client_split else [client]
            for rig in (laned, python):
                rig.send([c for c in sent if c])
            clock[0] += 0.25
            for rig in (laned, python):
                rig.answer([c for c in chunks(answer, cuts) if c])
            assert observed(laned) == observed(python)
        if garbage is not None:  # anything at all, maybe a bad length
            for rig in (laned, python):
                rig.answer([garbage, IDLE])
                rig.send([CYCLE])
            assert observed(laned) == observed(python)
    finally:
        relay_module._clock = time.monotonic  # type: ignore[attr-defined]


def test_an_unmirrored_session_s_chunks_stay_in_the_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = unmirrored(True)

    def no_python(*args: object) -> None:
        raise AssertionError("the session's Python read a chunk")

    for name in ("_count_back", "_handoff"):
        monkeypatch.setattr(PgSession, name, no_python)
    monkeypatch.setattr(relay_module, "_clock", no_python)  # the lane took the clock before
    for _ in range(4):
        rig.send([CYCLE])
        rig.answer([ANSWER[:7], ANSWER[7:]])  # a header split between chunks
    assert rig.session._lane.mode == PLAIN
    assert rig.stats.primary_units == 4 and rig.stats.primary_latency.count == 4
    assert rig.primary.data == CYCLE * 4 and rig.client.data == ANSWER * 4


def test_the_lane_reads_time_monotonic_s_clock_itself_on_the_same_scale() -> None:
    # With the clock relay._clock normally is, the lane reads CLOCK_MONOTONIC
    # without calling it: the times it keeps must be time.monotonic()'s.
    assert relay_module._clock is time.monotonic
    rig = unmirrored(True)
    before = time.monotonic()
    rig.send([CYCLE])
    since = rig.session._lane.state()[3]
    rig.answer([ANSWER])
    after = time.monotonic()
    assert before <= since <= after
    assert 0.0 <= rig.stats.primary_latency.sum <= after - before


def test_an_unmirrored_session_with_a_skipped_mirror_counts_in_python() -> None:
    rig = Rig(mirrored=False, lane=True)
    skipped: Any = type("Stats", (), {"skipped": 0})()
    rig.session.handler.open_mirrors = lambda session: type(  # type: ignore[method-assign]
        "Set", (), {"sessions": [], "skipped": [skipped]})()
    rig.session._ready(b"")
    assert rig.session._lane.mode == 0
    rig.send([CYCLE])
    rig.answer([ANSWER])
    assert skipped.skipped == 1


def test_the_lane_stops_when_the_session_ends() -> None:
    rig = unmirrored(True)
    rig.send([CYCLE])
    rig.session.connection_lost(None)
    assert rig.session._lane.mode == 0
    rig.answer([ANSWER])  # late bytes: the closed session ignores them
    assert rig.stats.primary_units == 0


def test_a_session_and_its_lane_are_collected() -> None:
    rig = unmirrored(True)
    rig.send([CYCLE])
    ref = weakref.ref(rig.session)
    del rig
    gc.collect()
    assert ref() is None


def test_the_lane_refuses_drops_that_are_not_pairs() -> None:
    rig = Rig(lane=True)
    s = rig.session
    with pytest.raises(TypeError):
        s._lane.dark(s.primary.write, s.client.write, s.stats, time.monotonic, 0, True, 1.0,
                     100, [object()], [], rig.mirrors.changes, 0, s.ctx, 0)
    assert s._lane.mode == 0
