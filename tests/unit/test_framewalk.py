# framewalk: the C loop and its Python twin agree on any bytes, any table.
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_postgres import codec, framewalk

tables = st.binary(min_size=256, max_size=256)
frames = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=40)).map(
        lambda t: codec.frame(bytes([t[0]]), t[1])),
    max_size=12,
).map(b"".join)


def _outcome(fn, data: bytes, pos: int, table: bytes):  # type: ignore[no-untyped-def]
    try:
        return fn(data, pos, table)
    except framewalk.FrameError as exc:
        return ("error", exc.args)


@given(data=st.one_of(frames, st.binary(max_size=200)), table=tables,
       pos=st.integers(0, 220))
def test_c_and_python_walks_agree(data: bytes, table: bytes, pos: int) -> None:
    assert _outcome(framewalk.walk, data, pos, table) == _outcome(
        framewalk.walk_py, data, pos, table)


@given(data=frames, cut=st.integers(0, 400))
def test_walk_reports_every_marked_frame_with_its_bounds(data: bytes, cut: int) -> None:
    table = bytes(range(256))  # every type but 0 is marked
    head = data[: min(cut, len(data))]
    nxt, hits = framewalk.walk(head, 0, table)
    # Frames come back in order, contiguous, and `next` is the end of the last
    # header read, or where a split header starts.
    pos = 0
    for kind, begin, end in hits:
        assert begin >= pos and head[begin] == kind and kind != 0
        pos = end
    assert nxt >= pos
    assert nxt >= len(head) or len(head) - nxt < 5


def test_a_short_length_is_a_frame_error_with_where_and_what() -> None:
    data = codec.sync() + b"X\x00\x00\x00\x03"
    with pytest.raises(framewalk.FrameError) as err:
        framewalk.walk(data, 0, bytes(256))
    assert err.value.args == (5, ord("X"), 3)


def test_the_c_loop_is_in_use_where_it_was_built() -> None:
    # The build is optional (no compiler: Python fallback); where the module
    # file exists it must be the one in use.
    import importlib.util

    if importlib.util.find_spec("gateway_postgres._framewalk") is None:
        pytest.skip("C helper not built here")
    assert framewalk.IMPLEMENTATION == "c"


def test_the_c_lane_is_in_use_where_it_was_built() -> None:
    import importlib.util

    from gateway_postgres import relay

    if importlib.util.find_spec("gateway_postgres._lane") is None:
        pytest.skip("C lane not built here")
    if os.environ.get("MIRRORGATE_PG_LANE") == "off":
        pytest.skip("the C lane is switched off in this environment")
    assert relay.Lane is not None and relay.PgSession._lane_type is relay.Lane
    if os.environ.get("MIRRORGATE_PG_LANE") == "transports":
        assert relay.Poller is None
        assert relay.LANE.startswith("the C lane, on the event loop's transports")
    else:
        assert relay.Poller is not None
        assert relay.LANE == "the C lane, reading its sessions' sockets itself"


@given(data=st.one_of(frames, st.binary(max_size=200)), kind=st.integers(0, 255),
       pos=st.integers(0, 220))
def test_c_and_python_counts_agree(data: bytes, kind: int, pos: int) -> None:
    def outcome(fn):  # type: ignore[no-untyped-def]
        try:
            return fn(data, pos, kind)
        except framewalk.FrameError as exc:
            return ("error", exc.args)

    assert outcome(framewalk.count) == outcome(framewalk.count_py)


@given(data=frames, kind=st.integers(0, 255), cut=st.integers(0, 400))
def test_count_is_walk_with_one_type_marked(data: bytes, kind: int, cut: int) -> None:
    table = bytes(1 if t == kind else 0 for t in range(256))
    head = data[:cut]
    nxt, hits = framewalk.walk_py(head, 0, table)
    assert framewalk.count(head, 0, kind) == (nxt, len(hits))


@given(data=st.one_of(frames, st.binary(max_size=200)), table=tables,
       pos=st.integers(0, 220))
def test_c_and_python_tallies_agree(data: bytes, table: bytes, pos: int) -> None:
    assert _outcome(framewalk.tally, data, pos, table) == _outcome(
        framewalk.tally_py, data, pos, table)


@given(data=frames, table=tables, cut=st.integers(0, 400))
def test_tally_sums_up_what_walk_reports(data: bytes, table: bytes, cut: int) -> None:
    head = data[:cut]
    nxt, hits = framewalk.walk_py(head, 0, table)
    counted = [end for kind, _, end in hits if table[kind] & 1]
    flags = 0
    for kind, _, _ in hits:
        flags |= table[kind]
    assert framewalk.tally(head, 0, table) == (
        nxt, len(counted), flags, counted[-1] if counted else -1)


def test_tally_reports_a_short_length_as_walk_does() -> None:
    data = codec.sync() + b"X\x00\x00\x00\x02"
    with pytest.raises(framewalk.FrameError) as err:
        framewalk.tally(data, 0, bytes(256))
    assert err.value.args == (5, ord("X"), 2)


@pytest.mark.parametrize("name", ["walk", "tally"])
def test_the_c_loops_refuse_a_table_that_is_not_256_bytes(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gateway_postgres._framewalk") is None:
        pytest.skip("C helper not built here")
    from gateway_postgres import _framewalk

    fn = getattr(_framewalk, name)
    with pytest.raises(ValueError, match="256 bytes"):
        fn(codec.sync(), 0, bytes(255))
    with pytest.raises(TypeError, match=rf"{name}\(data, pos, table\)"):
        fn(codec.sync(), 0)
