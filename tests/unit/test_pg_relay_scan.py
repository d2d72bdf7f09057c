"""Sans-IO tests of the relay's boundary finding: PgSession in its READY phase.

A real PgSession is driven through ``data_received`` (client bytes) and
``primary_data`` (primary bytes), with small recording stand-ins for the two
transports and the MirrorSet. Every stream is fed whole, byte by byte and at
hypothesis-chosen split points, as h11's test helpers do. No event loop: in the
READY phase the relay only writes and scans.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import ListenerStats, Unit
from gateway_postgres import codec
from gateway_postgres import relay as relay_module
from gateway_postgres.relay import PgSession, Phase
from gateway_postgres.statements import StatementRegistry

relay_settings = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- stand-ins for what a session talks to -------------------------------------------


class RecordingTransport:
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.reading = True

    @property
    def data(self) -> bytes:
        return b"".join(self.written)

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def __repr__(self) -> str:
        return f"<RecordingTransport {len(self.data)}B closed={self.closed}>"


class RecordingMirrors:
    """A MirrorSet look-alike: records offers; ``extend`` grows the unit like MirrorSet."""

    def __init__(self) -> None:
        self.offered: list[Unit] = []
        self.extended: list[tuple[Unit, bytes]] = []
        self.unoffered: list[int] = []  # sizes of units counted while every mirror was down
        # What a C lane counts those units into (dark_counts): one mirror.
        self.lane_counted = SimpleNamespace(offered=0, dropped={"refused": 0})
        # A mirror sampling left out: it counts every unit as skipped.
        self.left_out = SimpleNamespace(skipped=0)
        self.closed = False
        self.down = False  # what MirrorSet.offer found: every mirror unavailable
        self.until = 0.0   # what down_until answers
        self.changes = SimpleNamespace(count=0)  # bumped when a queue changes
        self.asked = -1    # changes.count when down_until was last asked
        self.questions = 0  # how often down_until was asked
        self.reconfigured = 0  # reloads the session followed
        # What a session's budgets are read from: one mirror, default queue_bytes.
        self.sessions = [SimpleNamespace(mirror=SimpleNamespace(
            config=SimpleNamespace(queue_bytes=64 * 1024 * 1024)))]

    def __bool__(self) -> bool:
        return True

    def offer(self, unit: Unit) -> None:
        self.offered.append(unit)

    def down_until(self) -> float:
        self.asked = self.changes.count
        self.questions += 1
        return self.until

    def drop_unoffered(self, size: int, times: int = 1) -> None:
        self.unoffered.extend([size] * times)
        self.left_out.skipped += times

    def dark_counts(self) -> tuple[list[tuple[object, str]], list[object]]:
        return [(self.lane_counted, "refused")], [self.left_out]

    @property
    def dropped(self) -> dict[str, int]:
        """Units counted while every mirror was down, by the session or its
        lane, by reason: as MirrorSet counts them, too large for the mirror's
        byte budget or refused."""
        budget = self.sessions[0].mirror.config.queue_bytes
        large = sum(1 for size in self.unoffered if size > budget)
        return {"too_large": large,
                "refused": len(self.unoffered) - large + self.lane_counted.dropped["refused"]}

    def extend(self, unit: Unit, chunk: bytes) -> None:
        self.extended.append((unit, chunk))
        unit.grow(chunk)

    def reconfigure(self, keep: object, serving: object = None) -> None:
        self.reconfigured += 1

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"<RecordingMirrors offered={len(self.offered)} closed={self.closed}>"


class Context:
    """The parts of a ListenerContext that PgSession reads."""

    def __init__(self) -> None:
        self.name = "t"
        self.stats = ListenerStats("t")
        self.mirrors = [object()]  # non-empty: mirroring is on
        self.generation = 0  # bumped by a reload
        self.startup_timeout = 5.0
        self.primary = None
        self.sessions: set[PgSession] = set()

    def session_opened(self, session: PgSession) -> bool:
        self.sessions.add(session)
        return True

    def session_closed(self, session: PgSession) -> None:
        self.sessions.discard(session)

    def still_sampled(self, session: object) -> bool:
        return True  # a reload that keeps every mirror

    def serving(self, skipped: list[object]) -> list[object]:
        return skipped


class Handler:
    def __init__(self) -> None:
        self.context = Context()
        self.sessions_by_key: dict[tuple[int, bytes], PgSession] = {}

    def open_mirrors(self, session: PgSession) -> RecordingMirrors:
        return RecordingMirrors()

    def lane_poller(self) -> None:
        return None  # the rig's transports have no sockets for the lane to read


class PythonSession(PgSession):
    """A session without the C lane: its Python does every chunk's work."""

    _lane_type = None


class Rig:
    """A READY session with its recording client, primary and mirrors; its
    Python alone reads the chunks unless ``lane`` (where the lane is built)."""

    def __init__(self, mirrored: bool = True, lane: bool = False) -> None:
        self.session = s = (PgSession if lane else PythonSession)(Handler())
        self.client = RecordingTransport()
        self.primary = RecordingTransport()
        self.mirrors = RecordingMirrors()
        s.client = self.client  # type: ignore[assignment]
        s.primary = self.primary  # type: ignore[assignment]
        s.phase = Phase.READY
        s._relaying = True
        if mirrored:
            s.mirrors = self.mirrors  # type: ignore[assignment]
            s.statements = StatementRegistry()
            s._budgets(self.mirrors)  # one mirror, the default queue_bytes

    @property
    def stats(self) -> ListenerStats:
        return self.session.stats

    @property
    def offered(self) -> list[Unit]:
        return self.mirrors.offered

    def send(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.session.data_received(piece)

    def answer(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.session.primary_data(piece)

    def go_dark(self) -> None:
        """Every mirror's queue is full: a unit refused at a transaction
        boundary, and from there the session only counts units."""
        self.mirrors.down, self.mirrors.until = True, float("inf")
        self.send([codec.query("SELECT 0")])
        self.answer([codec.ready_for_query(b"I")])


# --- splitting ---------------------------------------------------------------------

cuts_st = st.lists(st.integers(0, 1 << 16), max_size=12)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_ways(data: bytes, cuts: list[int]) -> Iterator[list[bytes]]:
    """The stream whole, byte by byte, and cut at the chosen points."""
    yield [data] if data else []
    yield byte_by_byte(data)
    yield chunks(data, cuts)


# --- frontend messages -------------------------------------------------------------

names_st = st.binary(max_size=12).filter(lambda b: b"\0" not in b)
sql_st = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=300
)


def bind(statement: bytes, portal: bytes = b"") -> bytes:
    # Portal, statement, Int16 format count, Int16 parameter count, Int16 result formats.
    return codec.frame(b"B", portal + b"\0" + statement + b"\0" + struct.pack("!hhh", 0, 0, 0))


def describe(statement: bytes) -> bytes:
    return codec.frame(b"D", b"S" + statement + b"\0")


def execute(portal: bytes = b"", rows: int = 0) -> bytes:
    return codec.frame(b"E", portal + b"\0" + struct.pack("!i", rows))


def function_call(oid: int, arg: bytes) -> bytes:
    # Int32 function OID, Int16 arg format count (0), Int16 args (1), Int32 len, value,
    # Int16 result format.
    return codec.frame(b"F", struct.pack("!ihhi", oid, 0, 1, len(arg)) + arg + b"\0\0")


def copy_data(payload: bytes) -> bytes:
    return codec.frame(b"d", payload)


query_st = sql_st.map(codec.query)
function_call_st = st.builds(function_call, st.integers(1, 1 << 30), st.binary(max_size=200))
extended_part_st = st.one_of(
    st.builds(codec.parse, names_st, sql_st.map(str.encode)),
    st.builds(bind, names_st),
    st.builds(describe, names_st),
    st.builds(execute),
    st.just(codec.flush()),
    st.builds(codec.close_statement, names_st),
)
batch_st = st.lists(extended_part_st, max_size=6).map(lambda parts: [*parts, codec.sync()])
# Messages that end no unit: they join the unit cut at the next Q/S/F.
loose_st = st.one_of(st.just(codec.flush()), st.builds(codec.close_statement, names_st))
item_st = st.one_of(
    query_st.map(lambda m: [m]),
    function_call_st.map(lambda m: [m]),
    batch_st,
    loose_st.map(lambda m: [m]),
)
messages_st = st.lists(item_st, max_size=12).map(lambda items: [m for i in items for m in i])

TERMINATORS = frozenset(b"QSF")


def expected_units(messages: list[bytes]) -> list[bytes]:
    """The bytes of each unit: everything since the last unit, up to a Q, S or F."""
    units, current = [], b""
    for m in messages:
        current += m
        if m[0] in TERMINATORS:
            units.append(current)
            current = b""
    return units


# --- backend messages --------------------------------------------------------------

status_st = st.sampled_from([b"I", b"T", b"E"])
backend_noise_st = st.lists(
    st.one_of(
        st.builds(lambda b: codec.frame(b"D", b), st.binary(max_size=300)),  # DataRow
        st.just(codec.frame(b"C", b"SELECT 1\0")),  # CommandComplete
        st.builds(lambda v: codec.parameter_status("TimeZone", v), st.sampled_from(["UTC", "x"])),
        st.just(codec.notice_response("01000", "hello")),
        st.just(codec.error_response("42601", "syntax error", "ERROR")),
        st.just(b"1\0\0\0\4"),  # ParseComplete
        st.just(b"2\0\0\0\4"),  # BindComplete
    ),
    max_size=4,
).map(b"".join)

COPY_IN_RESPONSE = codec.frame(b"G", b"\0" + struct.pack("!hh", 1, 0))
PARSE_BIND_COMPLETE = b"1\0\0\0\4" + b"2\0\0\0\4"


def command_complete(tag: str) -> bytes:
    return codec.frame(b"C", tag.encode() + b"\0")


# --- 1. forwarding -----------------------------------------------------------------


@relay_settings
@given(
    client_bytes=st.binary(max_size=600),
    primary_bytes=st.binary(max_size=600),
    client_cuts=cuts_st,
    primary_cuts=cuts_st,
    order=st.lists(st.booleans(), max_size=40),
    mirrored=st.booleans(),
)
def test_every_byte_is_forwarded_unchanged_whatever_the_bytes_and_splits(
    client_bytes: bytes,
    primary_bytes: bytes,
    client_cuts: list[int],
    primary_cuts: list[int],
    order: list[bool],
    mirrored: bool,
) -> None:
    # Garbage included: a bad length stops mirroring, never the relaying.
    for front in split_ways(client_bytes, client_cuts):
        back = chunks(primary_bytes, primary_cuts)
        rig = Rig(mirrored)
        f, b = iter(front), iter(back)
        for client_first in [*order, *([True] * len(front)), *([False] * len(back))]:
            piece = next(f, None) if client_first else next(b, None)
            if piece is not None:
                (rig.session.data_received if client_first else rig.session.primary_data)(piece)
        assert rig.primary.data == client_bytes
        assert rig.client.data == primary_bytes


@relay_settings
@given(messages=messages_st, replies=st.lists(status_st, max_size=30), cuts=cuts_st)
def test_valid_traffic_is_forwarded_unchanged(
    messages: list[bytes], replies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(messages)
    answers = b"".join(codec.ready_for_query(s) for s in replies)
    for front, back in zip(split_ways(stream, cuts), split_ways(answers, cuts), strict=True):
        rig = Rig()
        rig.send(front)
        rig.answer(back)
        assert rig.primary.data == stream
        assert rig.client.data == answers
        assert rig.session.phase is Phase.READY


# --- 2. units ----------------------------------------------------------------------


@relay_settings
@given(messages=messages_st, cuts=cuts_st)
def test_units_end_at_each_query_sync_and_function_call(
    messages: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(messages)
    expected = expected_units(messages)
    for pieces in split_ways(stream, cuts):
        rig = Rig()
        rig.send(pieces)
        assert [u.data for u in rig.offered] == expected
        cut_at = sum(len(u) for u in expected)
        assert b"".join(u.data for u in rig.offered) == stream[:cut_at]
        assert all(not u.closed and not u.settled and not u.chunks for u in rig.offered)
        assert len(rig.session._pending) == len(expected)


@relay_settings
@given(messages=messages_st, cuts=cuts_st)
def test_a_unit_is_offered_as_soon_as_its_last_byte_arrives(
    messages: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(messages)
    ends, pos = [], 0
    for m in messages:
        pos += len(m)
        if m[0] in TERMINATORS:
            ends.append(pos)
    for pieces in split_ways(stream, cuts):
        rig = Rig()
        fed = 0
        for piece in pieces:
            rig.send([piece])
            fed += len(piece)
            assert len(rig.offered) == sum(1 for e in ends if e <= fed)


@relay_settings
@given(name=names_st.filter(bool), sql=sql_st, cuts=cuts_st)
def test_named_parse_is_noted_for_re_preparing(name: bytes, sql: str, cuts: list[int]) -> None:
    parse = codec.parse(name, sql.encode())
    stream = parse + bind(name) + execute() + codec.sync()
    for pieces in split_ways(stream, cuts):
        rig = Rig()
        rig.send(pieces)
        assert rig.session.statements.get(name) == parse


@relay_settings
@given(name=names_st.filter(bool), budget=st.integers(1, 400), cuts=cuts_st)
def test_named_parse_over_the_byte_budget_is_noted_however_it_is_split(
    name: bytes, budget: int, cuts: list[int]
) -> None:
    # A unit over every mirror's byte budget keeps none of its bytes past the
    # budget, yet a Parse in it, whichever chunks it spans, must be known for
    # re-preparing the Binds that follow (and a Close must still forget it).
    parse = codec.parse(name, b"SELECT 1 /* " + b"x" * 300 + b" */")
    close = codec.frame(b"C", b"S" + name + b"\0")
    first = parse + bind(name) + execute() + codec.sync()
    second = close + codec.frame(b"Q", b"SELECT 2 /* " + b"y" * 300 + b" */\0")
    for pieces, more in zip(split_ways(first, cuts), split_ways(second, cuts), strict=True):
        rig = Rig()
        rig.session._max_unit = rig.session._min_unit = budget
        rig.send(pieces)
        assert rig.session.statements.get(name) == parse
        rig.send(more)
        assert rig.session.statements.get(name) is None
        assert [u.size for u in rig.offered] == [len(first), len(second)]


# --- 3. settling -------------------------------------------------------------------


@relay_settings
@given(
    units=st.lists(st.tuples(item_st, backend_noise_st, status_st), min_size=1, max_size=8),
    cuts=cuts_st,
)
def test_ready_for_query_settles_units_in_order_with_their_status(
    units: list[tuple[list[bytes], bytes, bytes]], cuts: list[int]
) -> None:
    # A loose Flush or Close gets a Sync, so that each item is exactly one unit.
    messages = []
    for item, _, _ in units:
        messages += item if item[-1][0] in TERMINATORS else [*item, codec.sync()]
    statuses = [s for _, _, s in units]
    answers, z_ends = b"", []
    for _, noise, status in units:
        answers += noise + codec.ready_for_query(status)
        z_ends.append(len(answers))
    ways = [*split_ways(answers, cuts), [answers[: z_ends[0] - 1], answers[z_ends[0] - 1 :]]]
    for back in ways:  # the last way cuts the first ReadyForQuery before its status
        rig = Rig()
        rig.send([b"".join(messages)])
        offered = rig.offered
        assert len(offered) == len(units)
        fed = 0
        for piece in back:
            rig.answer([piece])
            fed += len(piece)
            done = sum(1 for e in z_ends if e <= fed)
            assert [u.settled for u in offered] == [True] * done + [False] * (len(units) - done)
            assert [u.closed for u in offered] == [u.settled for u in offered]
            assert rig.stats.primary_units == done
        assert [u.result for u in offered] == [s[0] for s in statuses]
        assert not rig.session._pending
        assert rig.stats.primary_latency is not None


def test_ready_for_query_split_between_header_and_status_settles_once_complete() -> None:
    rig = Rig()
    rig.send([codec.query("BEGIN")])
    (unit,) = rig.offered
    z = codec.ready_for_query(b"T")
    rig.answer([z[:5]])
    assert not unit.settled and rig.stats.primary_units == 0
    rig.answer([z[5:]])
    assert unit.settled and unit.result == ord("T") and unit.closed
    assert rig.stats.primary_units == 1


def test_ready_for_query_with_nothing_pending_is_ignored() -> None:
    rig = Rig()
    rig.answer([codec.ready_for_query(b"I")])
    assert rig.stats.primary_units == 0
    rig.send([codec.query("SELECT 1")])
    rig.answer([codec.ready_for_query(b"I")])
    assert rig.offered[0].settled and rig.stats.primary_units == 1


def test_ready_for_query_with_nothing_pending_is_ignored_in_a_dark_session() -> None:
    rig = Rig()
    rig.go_dark()
    rig.answer([codec.ready_for_query(b"T")])
    rig.send([bind(b"s") + execute() + codec.sync()])
    rig.answer([codec.ready_for_query(b"I"), codec.ready_for_query(b"T")])
    assert rig.stats.primary_units == 2 and rig.session._idle
    assert len(rig.mirrors.unoffered) == 1 and not rig.session._pending


# --- 4. COPY -----------------------------------------------------------------------

copy_payloads_st = st.lists(st.binary(max_size=300), max_size=8)


def copy_script(extended: bool, fail: bool, payloads: list[bytes]) -> tuple[bytes, bytes, bytes]:
    """(the request, the primary's answer up to CopyInResponse, the copy stream)."""
    end = codec.copy_fail("client gave up") if fail else codec.copy_done()
    copy = b"".join(copy_data(p) for p in payloads) + end
    if extended:
        request = (codec.parse(b"", b"COPY t FROM STDIN") + bind(b"") + execute()
                   + codec.sync())
        # "The backend will ignore Flush and Sync messages received during copy-in
        # mode": the batch's Sync earns nothing; the Sync after CopyDone ends it.
        return request, PARSE_BIND_COMPLETE + COPY_IN_RESPONSE, copy + codec.sync()
    return codec.query("COPY t FROM STDIN"), COPY_IN_RESPONSE, copy


def copy_end(fail: bool, rows: int) -> bytes:
    if fail:
        return (codec.error_response("57014", "COPY from stdin failed", "ERROR")
                + codec.ready_for_query(b"I"))
    return command_complete(f"COPY {rows}") + codec.ready_for_query(b"I")


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
@pytest.mark.parametrize("fail", [False, True], ids=["CopyDone", "CopyFail"])
@relay_settings
@given(payloads=copy_payloads_st, cuts=cuts_st, back_cuts=cuts_st)
def test_copy_data_grows_the_copy_unit_until_the_primary_is_ready(
    extended: bool, fail: bool, payloads: list[bytes], cuts: list[int], back_cuts: list[int]
) -> None:
    request, copy_in, copy = copy_script(extended, fail, payloads)
    follow_up = codec.query("SELECT 2")
    end = copy_end(fail, len(payloads))
    for front in split_ways(copy + follow_up, cuts):
        rig = Rig()
        rig.send([request])
        (unit,) = rig.offered
        assert unit.data == request
        rig.answer(chunks(copy_in, back_cuts))
        rig.send(front)
        assert b"".join(unit.chunks) == copy  # the extended COPY's last Sync included
        assert unit.meta == (ord("f") if fail else ord("c"))
        assert not unit.closed and not unit.settled
        # The follow-up is a unit of its own; nothing else was cut, so the
        # extended COPY's second Sync awaits no ReadyForQuery of its own.
        assert [u.data for u in rig.offered] == [request, follow_up]
        assert len(rig.session._pending) == 2
        rig.answer(chunks(end, back_cuts))
        assert unit.closed and unit.settled and unit.result == ord("I")
        assert rig.stats.primary_units == 1
        rig.answer([codec.ready_for_query(b"I")])
        assert rig.offered[1].settled and rig.stats.primary_units == 2
        assert rig.primary.data == request + copy + follow_up
        assert rig.client.data == copy_in + end + codec.ready_for_query(b"I")


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
@relay_settings
@given(payloads=copy_payloads_st, cuts=cuts_st)
def test_copy_in_an_unmirrored_session_counts_one_unit(
    extended: bool, payloads: list[bytes], cuts: list[int]
) -> None:
    request, copy_in, copy = copy_script(extended, False, payloads)
    for front in split_ways(copy, cuts):
        rig = Rig(mirrored=False)
        rig.send([request])
        rig.answer([copy_in])
        rig.send(front)
        rig.answer([copy_end(False, len(payloads))])
        assert rig.stats.primary_units == 1
        assert not rig.session._pending
        assert rig.primary.data == request + copy


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
def test_copy_data_sent_before_copy_in_response_still_ends_the_copy(extended: bool) -> None:
    # Legal if unusual: the backend reads messages in order, so a client may send
    # its CopyData without waiting for CopyInResponse.
    request, copy_in, copy = copy_script(extended, False, [b"1\n", b"2\n"])
    follow_up = codec.query("SELECT 2")
    rig = Rig()
    rig.send([request + copy])
    rig.answer([copy_in])
    rig.send([follow_up])
    rig.answer([copy_end(False, 2), codec.ready_for_query(b"I")])
    copy_unit = rig.offered[0]
    assert b"".join([copy_unit.data, *copy_unit.chunks]) == request + copy
    assert [u.data for u in rig.offered[1:]] == [follow_up]
    assert all(u.settled for u in rig.offered)
    assert rig.stats.primary_units == 2 and not rig.session._pending


# --- 5. garbage after login --------------------------------------------------------


@relay_settings
@given(
    before=messages_st,
    bad_length=st.integers(-(1 << 31), 3),
    after=st.binary(max_size=200),
    cuts=cuts_st,
)
def test_a_frame_shorter_than_its_header_stops_mirroring_not_relaying(
    before: list[bytes], bad_length: int, after: bytes, cuts: list[int]
) -> None:
    good = b"".join(before)
    stream = good + b"Q" + struct.pack("!i", bad_length) + after
    expected = expected_units(before)
    for pieces in split_ways(stream, cuts):
        rig = Rig()
        rig.send(pieces)
        assert rig.session.mirrors is None and rig.mirrors.closed
        assert rig.session.phase is Phase.RAW
        assert [u.data for u in rig.offered] == expected
        # Units the primary will never answer for the mirrors are settled unknown.
        assert all(u.settled and u.result is None and u.closed for u in rig.offered)
        rig.send([b"more"])
        rig.answer([codec.ready_for_query(b"I")])
        assert rig.primary.data == stream + b"more"
        assert rig.client.data == codec.ready_for_query(b"I")


# --- 6. unmirrored sessions --------------------------------------------------------


@relay_settings
@given(messages=messages_st, cuts=cuts_st)
def test_an_unmirrored_session_counts_units_and_offers_none(
    messages: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(messages)
    n_units = len(expected_units(messages))
    answers = codec.ready_for_query(b"I") * n_units
    for front, back in zip(split_ways(stream, cuts), split_ways(answers, cuts), strict=True):
        rig = Rig(mirrored=False)
        rig.send(front)
        # Unmirrored: no unit is cut or held; the primary's ReadyForQuery
        # frames count the units, each with a latency.
        assert not rig.session._pending
        rig.answer(back)
        assert rig.session.mirrors is None and not rig.offered and not rig.mirrors.extended
        assert not rig.session._pieces  # bytes are held only for mirrors
        assert rig.stats.primary_units == n_units
        assert rig.stats.primary_latency.count == (n_units if stream else 0)
        assert rig.primary.data == stream
        assert rig.client.data == answers


@relay_settings
@given(ready=st.integers(0, 4), bad_length=st.integers(-(1 << 31), 3),
       after=st.binary(max_size=50), cuts=cuts_st)
def test_an_unmirrored_session_counts_the_units_before_a_bad_primary_frame(
    ready: int, bad_length: int, after: bytes, cuts: list[int]
) -> None:
    answers = codec.ready_for_query(b"I") * ready + b"Z" + struct.pack("!i", bad_length) + after
    for back in split_ways(answers, cuts):
        rig = Rig(mirrored=False)
        rig.send([codec.query("SELECT 1")])
        rig.answer(back)
        assert rig.stats.primary_units == ready
        assert rig.session.phase is Phase.RAW  # relayed on, no longer read
        assert rig.client.data == answers


@relay_settings
@given(data=st.binary(max_size=100), cuts=cuts_st)
def test_split_ways_keep_every_byte(data: bytes, cuts: list[int]) -> None:
    for pieces in split_ways(data, cuts):
        assert b"".join(pieces) == data and all(pieces)


# --- every mirror down ----------------------------------------------------------------

IDLE, IN_TX = codec.ready_for_query(b"I"), codec.ready_for_query(b"T")


def test_while_every_mirror_is_down_units_are_counted_and_resume_at_a_boundary() -> None:
    rig = Rig()
    m = rig.mirrors
    clock = [100.0]
    relay_module._clock = lambda: clock[0]  # type: ignore[attr-defined]
    try:
        # A unit offered while every mirror refused it, ending in a transaction:
        # cutting goes on until the transaction is over.
        m.down, m.until = True, 160.0
        rig.send([codec.query("BEGIN")])
        rig.answer([IN_TX])
        assert len(m.offered) == 1 and not m.unoffered
        rig.send([codec.query("INSERT 1")])
        rig.answer([IN_TX])
        commit = codec.query("COMMIT")
        rig.send([commit])
        rig.answer([IDLE])  # a boundary: from here units are only counted
        assert len(m.offered) == 3
        parse = codec.parse(b"s1", b"SELECT 1")
        rig.send([parse, bind(b"s1"), execute(), codec.sync()])
        rig.answer([IDLE])
        rig.send([codec.query("BEGIN")])
        rig.answer([IN_TX])
        assert len(m.offered) == 3
        assert m.unoffered[0] == len(parse + bind(b"s1") + execute() + codec.sync())
        assert len(m.unoffered) == 2
        # Named statements are still followed for the mirror's return.
        assert rig.session.statements.get(b"s1") == parse
        # The mirror may be back, but not inside the transaction.
        clock[0] = 200.0
        m.down, m.until = False, 0.0
        rig.send([codec.query("INSERT 2")])
        rig.answer([IN_TX])
        rig.send([codec.query("COMMIT")])
        rig.answer([IDLE])
        assert len(m.offered) == 3 and len(m.unoffered) == 4
        # After the boundary, units are cut and offered again.
        rig.send([codec.query("SELECT 2")])
        rig.answer([IDLE])
        assert len(m.offered) == 4 and m.offered[-1].data == codec.query("SELECT 2")
        assert rig.stats.primary_units == 8
        assert rig.primary.data.endswith(codec.query("SELECT 2"))
    finally:
        relay_module._clock = time.monotonic  # type: ignore[attr-defined]


def test_a_full_queue_is_asked_again_only_once_a_queue_changed() -> None:
    rig = Rig()
    m = rig.mirrors
    m.down, m.until = True, float("inf")  # queues full: no time ends it
    rig.send([codec.query("SELECT 0")])
    rig.answer([IDLE])  # refused, at a boundary: from here units are only counted
    assert m.questions == 1
    for i in range(5):
        rig.send([codec.query(f"SELECT {i + 1}")])
        rig.answer([IDLE])
    # Nothing left any queue: each unit starts a transaction, none asks again.
    assert m.questions == 1 and len(m.unoffered) == 5
    # A queue gave up a unit: the next unit that starts a transaction asks,
    # and is cut and offered since a mirror would take it now.
    m.changes.count += 1
    m.down, m.until = False, 0.0
    rig.send([codec.query("SELECT 6")])
    rig.answer([IDLE])
    assert m.questions == 2
    assert len(m.offered) == 2 and m.offered[-1].data == codec.query("SELECT 6")
    assert len(m.unoffered) == 5


# --- 6. a dark session's one-tally path ---------------------------------------------

# What may happen to the mirrors between two request cycles.
mirror_event_st = st.sampled_from(
    ["none", "queue_changed", "full", "backoff", "back", "reload"])
# Request cycles as pgbench -M prepared sends them: no Parse, Close or Query.
plain_item_st = st.one_of(
    st.just([bind(b"P0_1"), execute(), codec.sync()]),
    st.builds(lambda n: [bind(n), describe(n), execute(), codec.flush(), codec.sync()],
              names_st),
)


def cycles(items: list[list[bytes]], statuses: list[bytes], split: str, cuts: list[int]
           ) -> tuple[list[bytes], bytes]:
    """Request cycles as the client sends them (``whole``, one message per
    chunk, or cut at ``cuts``) and the primary's answer to them: a
    BindComplete and a ReadyForQuery per unit, with the statuses in turn."""
    messages = [m for item in items for m in item]
    units = sum(1 for m in messages if m[0] in TERMINATORS)
    answer = b"".join(b"2\0\0\0\4" + codec.ready_for_query(statuses[i % len(statuses)]
                                                            if statuses else b"I")
                      for i in range(units))
    client = b"".join(messages)
    return {"whole": [client], "messages": messages}.get(split) or chunks(client, cuts), answer


def _apply(rig: Rig, event: str, now: float) -> None:
    m = rig.mirrors
    if event == "reload":
        rig.session.ctx.generation += 1
    elif event == "queue_changed":
        m.changes.count += 1
    elif event == "full":
        m.down, m.until = True, float("inf")
    elif event == "backoff":
        m.down, m.until = True, now + 1.0
    elif event == "back":
        m.down, m.until = False, 0.0


def _observed(rig: Rig) -> tuple[object, ...]:
    s, m = rig.session, rig.mirrors
    return (m.questions, len(m.unoffered), [u.data for u in m.offered],
            [u.settled for u in m.offered], rig.stats.primary_units,
            rig.stats.primary_latency.count, dict(s.statements._parses), s._idle,
            len(s._pending), s._down_until, m.reconfigured, rig.primary.data, rig.client.data)


@relay_settings
@given(
    rounds=st.lists(
        st.tuples(st.lists(st.one_of(plain_item_st, item_st), min_size=1, max_size=3),
                  st.lists(status_st, max_size=3),
                  mirror_event_st, st.sampled_from(["whole", "messages", "cuts"])),
        min_size=1, max_size=8),
    cuts=cuts_st,
)
def test_a_dark_session_counts_as_the_full_scan_does(
    rounds: list[tuple[list[list[bytes]], list[bytes], str, str]], cuts: list[int]
) -> None:
    # The same traffic and the same mirror events, through a session that may
    # count whole Sync-ended chunks in one tally and one that always scans
    # frame by frame: the mirrors are asked at the same units, the same units
    # are offered and counted, the primary's answers settle the same way.
    clock = [100.0]
    relay_module._clock = lambda: clock[0]  # type: ignore[attr-defined]
    try:
        tallying, scanning = Rig(), Rig()
        scanning.session._dark_front = lambda data, down: False  # type: ignore[method-assign]
        scanning.session._dark_back = lambda data: False  # type: ignore[method-assign]
        for rig in (tallying, scanning):
            rig.mirrors.down, rig.mirrors.until = True, float("inf")
        for items, statuses, event, split in rounds:
            sent, answer = cycles(items, statuses, split, cuts)
            answered = [answer] if split == "whole" else chunks(answer, cuts)
            for rig in (tallying, scanning):
                _apply(rig, event, clock[0])
                rig.send(sent)
                rig.answer(answered)
            clock[0] += 0.5
            assert _observed(tallying) == _observed(scanning)
    finally:
        relay_module._clock = time.monotonic  # type: ignore[attr-defined]


def test_a_dark_session_counts_bind_execute_sync_chunks_without_the_frame_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig()
    m = rig.mirrors
    rig.go_dark()
    cycle = bind(b"s") + execute() + codec.sync()

    def no_scan(*args: object) -> None:
        raise AssertionError("the frame-by-frame scan ran")

    monkeypatch.setattr(relay_module, "walk", no_scan)
    monkeypatch.setattr(PgSession, "_scan_back", no_scan)
    for _ in range(3):  # one cycle per chunk, then two pipelined in one
        rig.send([cycle])
        rig.answer([PARSE_BIND_COMPLETE + command_complete("SELECT 1") + IDLE])
    rig.send([cycle + cycle])
    rig.answer([IN_TX + command_complete("SELECT 1"), IN_TX])
    assert len(m.unoffered) == 5 and len(m.offered) == 1
    assert rig.stats.primary_units == 6 and rig.stats.primary_latency.count == 6
    assert not rig.session._pending and not rig.session._idle
    assert m.questions == 1
    assert rig.primary.data.endswith(cycle + cycle)


def test_a_dark_session_tallies_only_from_a_frame_boundary() -> None:
    # A Bind whose parameter value holds bytes that read as a Flush frame, cut
    # just before them: the rest of the chunk would tally as Flush, Execute,
    # Sync. The session knows it is inside the Bind and scans it instead.
    rig = Rig()
    m = rig.mirrors
    rig.go_dark()
    # Only the header counts to the relay: the body ends in the look-alike.
    cycle = codec.frame(b"B", b"\0s\0" + b"v" * 7 + codec.flush()) + execute() + codec.sync()
    cut = cycle.index(codec.flush())
    rig.send([cycle[:cut], cycle[cut:]])
    rig.answer([IDLE])
    rig.send([cycle])
    rig.answer([IDLE])
    parse = codec.parse(b"s2", b"SELECT 2")
    rig.send([parse + bind(b"s2") + execute() + codec.sync()])
    rig.answer([IDLE])
    assert len(m.unoffered) == 3 and rig.stats.primary_units == 4
    assert not rig.session._pending and rig.session._fskip == 0
    assert rig.session.statements.get(b"s2") == parse


@pytest.mark.parametrize("lane", [False, True])
@pytest.mark.parametrize("side", ["client", "primary"])
def test_a_dark_session_given_a_frame_shorter_than_its_header_stops_mirroring(
    side: str, lane: bool,
) -> None:
    # The tally (and the C lane, where built) refuses the chunk; the full
    # scan finds the bad frame, ends mirroring for the session and goes on
    # relaying, as for a lit one.
    if lane and relay_module.Lane is None:
        pytest.skip("the C lane is not built")
    rig = Rig(lane=lane)
    rig.go_dark()
    cycle = bind(b"s") + execute() + codec.sync()
    bad = b"Q" + struct.pack("!i", 2) + b"junk"
    if side == "client":
        rig.send([cycle + bad])
    else:
        rig.send([cycle])
        rig.answer([IDLE + bad])
    assert rig.session.mirrors is None and rig.mirrors.closed
    assert rig.session.phase is Phase.RAW
    assert rig.session._lane is None or rig.session._lane.mode == 0
    rig.send([b"more"])
    assert rig.primary.data.endswith(b"more")
    assert rig.mirrors.dropped["refused"] == 1  # the cycle (before the bad frame)
