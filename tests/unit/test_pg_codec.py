"""Sans-IO tests of the Postgres codec: bytes whole, byte by byte, at split points."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_postgres import codec
from gateway_postgres.codec import (
    CancelRequest,
    FrameReader,
    GSSENCRequest,
    MessageTooLarge,
    ProtocolViolation,
    SSLRequest,
    StartupMessage,
    TransactionStatus,
    parse_initial_packet,
)

# --- helpers -----------------------------------------------------------------------

frames_st = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=200)).map(
        lambda tb: codec.frame(bytes([tb[0]]), tb[1])
    ),
    max_size=20,
)
names_st = st.binary(max_size=300).filter(lambda b: b"\0" not in b)
text_st = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40
)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def read_frames(pieces: list[bytes], raw: bool = False) -> list:
    reader = FrameReader(max_message=1 << 20)
    out = []
    for piece in pieces:
        reader.feed(piece)
        while (item := reader.next_raw() if raw else reader.next_frame()) is not None:
            out.append(item)
    assert reader.buffered == 0
    return out


def one_frame(data: bytes) -> tuple[int, bytes]:
    (item,) = read_frames([data])
    return item


# --- FrameReader ---------------------------------------------------------------------


@given(frames_st, st.lists(st.integers(0, 10_000), max_size=30))
def test_frames_are_the_same_whole_bytewise_and_at_split_points(frames, cuts):
    stream = b"".join(frames)
    expected = [(f[0], f[5:]) for f in frames]
    assert read_frames([stream]) == expected
    assert read_frames([stream[i : i + 1] for i in range(len(stream))]) == expected
    assert read_frames(chunks(stream, cuts)) == expected


@given(frames_st, st.lists(st.integers(0, 10_000), max_size=30))
def test_raw_frames_round_trip_exactly(frames, cuts):
    stream = b"".join(frames)
    raw = read_frames(chunks(stream, cuts), raw=True)
    assert raw == frames
    assert b"".join(raw) == stream


def test_reader_stays_correct_across_buffer_compaction():
    frames = [codec.frame(b"d", bytes([i % 251]) * 1000) for i in range(400)]
    stream = b"".join(frames)
    reader = FrameReader()
    out = []
    for i in range(0, len(stream), 7919):  # a prime, so cuts fall everywhere
        reader.feed(stream[i : i + 7919])
        if i % 3 == 0:  # leave frames buffered now and then
            continue
        while (raw := reader.next_raw()) is not None:
            out.append(raw)
    while (raw := reader.next_raw()) is not None:
        out.append(raw)
    assert out == frames


def test_oversize_length_raises_before_the_body_arrives():
    reader = FrameReader(max_message=1024)
    reader.feed(b"Q" + struct.pack("!i", 1024 + 4 + 1))
    with pytest.raises(MessageTooLarge) as info:
        reader.next_frame()
    assert info.value.size == 1025 and info.value.limit == 1024
    assert "1025" in str(info.value) and "1024" in str(info.value)
    assert info.value.sqlstate == "08P01"


def test_body_at_the_limit_is_accepted():
    reader = FrameReader(max_message=16)
    reader.feed(codec.frame(b"d", b"x" * 16))
    assert reader.next_frame() == (ord("d"), b"x" * 16)


@pytest.mark.parametrize("length", [-1, 0, 1, 3, -(2**31)])
def test_length_below_four_is_a_protocol_violation(length):
    reader = FrameReader()
    reader.feed(b"Q" + struct.pack("!i", length))
    with pytest.raises(ProtocolViolation) as info:
        reader.next_raw()
    assert not isinstance(info.value, MessageTooLarge)


def test_empty_body_frames_and_incomplete_header():
    reader = FrameReader()
    reader.feed(b"S\0\0\0")
    assert reader.next_frame() is None
    reader.feed(b"\4H")
    assert reader.next_frame() == (ord("S"), b"")
    assert reader.next_frame() is None
    assert reader.take_buffered() == b"H"
    assert reader.buffered == 0


def test_max_message_must_be_within_the_protocol_cap():
    with pytest.raises(ValueError):
        FrameReader(max_message=codec.MAX_MESSAGE + 1)
    assert "buffered=0" in repr(FrameReader())


# --- the initial packet -------------------------------------------------------------

params_st = st.dictionaries(
    text_st.filter(lambda k: k not in ("", "user")), text_st, max_size=5
).flatmap(lambda extra: st.builds(lambda user: {"user": user, **extra}, text_st.filter(bool)))
initial_st = st.one_of(
    st.just(struct.pack("!ii", 8, codec.SSL_REQUEST_CODE)),
    st.just(struct.pack("!ii", 8, codec.GSSENC_REQUEST_CODE)),
    st.builds(codec.cancel_request, st.integers(0, 2**31 - 1), st.binary(min_size=4, max_size=256)),
    st.builds(
        codec.startup_message,
        params_st,
        st.sampled_from([codec.PROTOCOL_3_0, codec.PROTOCOL_3_2, 3 << 16 | 9]),
    ),
)


@given(initial_st)
def test_every_prefix_of_a_valid_initial_packet_is_incomplete(packet):
    for end in range(len(packet)):
        assert parse_initial_packet(packet[:end]) == (None, 0)
    parsed, consumed = parse_initial_packet(packet)
    assert parsed is not None and consumed == len(packet)


@given(initial_st, st.binary(max_size=20))
def test_trailing_bytes_are_left_to_the_caller(packet, rest):
    parsed, consumed = parse_initial_packet(memoryview(packet + rest))
    assert consumed == len(packet)
    assert parsed == parse_initial_packet(packet)[0]


def test_ssl_and_gssenc_requests_parse():
    assert parse_initial_packet(b"\0\0\0\x08\x04\xd2\x16\x2f") == (SSLRequest(), 8)
    assert parse_initial_packet(b"\0\0\0\x08\x04\xd2\x16\x30") == (GSSENCRequest(), 8)


@pytest.mark.parametrize("key", [b"\1\2\3\4", bytes(range(32))])
def test_cancel_request_parses_short_and_long_keys(key):
    packet = codec.cancel_request(4242, key)
    assert parse_initial_packet(packet) == (CancelRequest(4242, key), len(packet))
    assert key.hex() not in repr(CancelRequest(4242, key))


@pytest.mark.parametrize("version", [codec.PROTOCOL_3_0, codec.PROTOCOL_3_2])
def test_startup_message_parses_and_keeps_raw_bytes(version):
    params = {"user": "app", "database": "shop", "application_name": "psql", "options": ""}
    packet = codec.startup_message(params, version)
    parsed, consumed = parse_initial_packet(packet)
    assert isinstance(parsed, StartupMessage)
    assert (parsed.version, parsed.params, parsed.raw, consumed) == (
        version,
        params,
        packet,
        len(packet),
    )
    assert parsed.user == "app" and parsed.database == "shop"


def test_database_defaults_to_the_user_and_replication_is_reported():
    parsed, _ = parse_initial_packet(codec.startup_message({"user": "u", "replication": "true"}))
    assert isinstance(parsed, StartupMessage)
    assert parsed.database == "u" and parsed.params["replication"] == "true"


@given(params_st)
def test_startup_message_round_trips(params):
    parsed, _ = parse_initial_packet(codec.startup_message(params))
    assert isinstance(parsed, StartupMessage) and parsed.params == params


@given(st.binary(max_size=64))
def test_garbage_only_ever_raises_protocol_violation(data):
    try:
        parse_initial_packet(data)
    except ProtocolViolation:
        pass


@given(st.integers(0, 2**31 - 1), st.binary(max_size=64))
def test_garbage_with_a_plausible_length_only_raises_protocol_violation(code, body):
    packet = struct.pack("!ii", 8 + len(body), code) + body
    try:
        parse_initial_packet(packet)
    except ProtocolViolation:
        pass


def startup_with_body(body: bytes, version: int = codec.PROTOCOL_3_0) -> bytes:
    return struct.pack("!ii", 8 + len(body), version) + body


def violation(packet: bytes) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        parse_initial_packet(packet)
    return info.value


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no terminator
        b"user\0app\0",  # pairs without the final NUL
        b"user\0app",  # value not terminated
        b"user\0",  # name without value
        b"user\0app\0\0junk",  # bytes after the terminator
        b"user\0app\0\0\0",  # two terminators
    ],
)
def test_malformed_startup_bodies_are_protocol_violations(body):
    assert violation(startup_with_body(body)).sqlstate == "08P01"


@pytest.mark.parametrize("length", [0, 4, 7, -1])
def test_startup_length_below_eight_is_a_violation(length):
    assert violation(struct.pack("!i", length)).sqlstate == "08P01"


def test_oversized_startup_is_refused_as_soon_as_the_length_is_in():
    exc = violation(struct.pack("!i", codec.MAX_STARTUP_PACKET + 1))
    assert exc.sqlstate == "08P01" and "10001" in exc.message
    assert parse_initial_packet(struct.pack("!i", codec.MAX_STARTUP_PACKET)) == (None, 0)


@pytest.mark.parametrize("body", [b"database\0db\0\0", b"user\0\0\0", b"\0"])
def test_missing_or_empty_user_is_28000(body):
    exc = violation(startup_with_body(body))
    assert exc.sqlstate == "28000"
    assert exc.message == "no PostgreSQL user name specified in startup packet"


@pytest.mark.parametrize("version", [2 << 16, 4 << 16, 1234 << 16 | 5681, 0])
def test_unsupported_protocol_version_is_0a000(version):
    assert violation(startup_with_body(b"user\0u\0\0", version)).sqlstate == "0A000"


def test_non_utf8_parameters_are_violations():
    assert violation(startup_with_body(b"user\0\xff\xfe\0\0")).sqlstate == "08P01"


@pytest.mark.parametrize(
    "packet",
    [
        struct.pack("!iii", 12, codec.SSL_REQUEST_CODE, 0),
        struct.pack("!iii", 12, codec.CANCEL_REQUEST_CODE, 1),  # no key
        struct.pack("!iii", 15, codec.CANCEL_REQUEST_CODE, 1) + b"abc",  # key too short
        struct.pack("!iii", 12 + 257, codec.CANCEL_REQUEST_CODE, 1) + b"k" * 257,
    ],
)
def test_bad_request_packet_lengths_are_violations(packet):
    assert violation(packet).sqlstate == "08P01"


# --- decoders and builders -----------------------------------------------------------


@given(names_st, names_st, st.lists(st.integers(0, 2**32 - 1), max_size=5))
def test_parse_round_trips_to_its_statement_name(name, sql, types):
    raw = codec.parse(name, sql, types)
    kind, body = one_frame(raw)
    assert kind == ord("P")
    assert codec.statement_name_of_parse(body) == name
    assert codec.statement_name_of_parse(memoryview(raw)[5:]) == name
    assert body.endswith(struct.pack(f"!H{len(types)}I", len(types), *types))


@given(names_st, names_st)
def test_bind_gives_its_second_string(portal, statement):
    raw = codec.frame(b"B", portal + b"\0" + statement + b"\0" + b"\0\0\0\0\0\0")
    assert codec.statement_name_of_bind(one_frame(raw)[1]) == statement
    assert codec.statement_name_of_bind(memoryview(raw)[5:]) == statement


@given(names_st)
def test_close_and_describe_targets(name):
    kind, body = one_frame(codec.close_statement(name))
    assert kind == ord("C") and codec.close_target(body) == (b"S", name)
    describe = codec.frame(b"D", b"P" + name + b"\0")
    assert codec.describe_target(memoryview(describe)[5:]) == (b"P", name)


@pytest.mark.parametrize("body", [b"X\0", b"", b"Sname"])
def test_bad_targets_are_violations(body):
    with pytest.raises(ProtocolViolation):
        codec.close_target(body)
    with pytest.raises(ProtocolViolation):
        codec.describe_target(memoryview(body))


def test_unterminated_names_are_violations():
    with pytest.raises(ProtocolViolation):
        codec.statement_name_of_parse(memoryview(b"x" * 1000))
    with pytest.raises(ProtocolViolation):
        codec.statement_name_of_bind(b"portal\0stmt")


@pytest.mark.parametrize("status", list(TransactionStatus))
def test_ready_for_query_round_trips(status):
    kind, body = one_frame(codec.ready_for_query(status.value))
    assert kind == ord("Z") and codec.ready_status(body) is status
    assert codec.ready_status(memoryview(body)) == status.value


@pytest.mark.parametrize("body", [b"", b"X", b"II"])
def test_bad_ready_for_query_bodies_are_violations(body):
    with pytest.raises(ProtocolViolation):
        codec.ready_status(body)


@given(text_st, text_st, st.none() | text_st, st.none() | text_st)
def test_error_response_round_trips_through_error_fields(sqlstate, message, detail, hint):
    kind, body = one_frame(codec.error_response(sqlstate, message, "ERROR", detail, hint))
    fields = codec.error_fields(body)
    assert kind == ord("E")
    assert (fields["S"], fields["V"], fields["C"], fields["M"]) == (
        "ERROR",
        "ERROR",
        sqlstate,
        message,
    )
    assert fields.get("D") == detail and fields.get("H") == hint
    assert codec.format_error(fields) == f"ERROR {sqlstate}: {message}"


def test_notice_response_and_default_severity():
    kind, body = one_frame(codec.notice_response("00000", "hello"))
    assert (
        kind == ord("N") and codec.format_error(codec.error_fields(body)) == "NOTICE 00000: hello"
    )
    _, body = one_frame(codec.error_response("08P01", "bad"))
    assert codec.format_error(codec.error_fields(body)) == "FATAL 08P01: bad"


def test_simple_frames_have_the_documented_bytes():
    assert codec.sync() == b"S\0\0\0\x04"
    assert codec.flush() == b"H\0\0\0\x04"
    assert codec.terminate() == b"X\0\0\0\x04"
    assert codec.copy_done() == b"c\0\0\0\x04"
    assert codec.query("select 1") == b"Q\0\0\0\x0dselect 1\0"
    assert codec.copy_fail("gone") == b"f\0\0\0\x09gone\0"
    assert codec.password_message("pw") == b"p\0\0\0\x07pw\0"
    assert codec.sasl_response(b"abc") == b"p\0\0\0\x07abc"
    assert codec.parameter_status("a", "b") == b"S\0\0\0\x08a\0b\0"
    assert codec.authentication_ok() == codec.frame(b"R", b"\0\0\0\0")


def test_authentication_and_backend_key_round_trip():
    _, body = one_frame(codec.authentication_ok())
    assert codec.authentication_request(body) == (0, b"")
    _, body = one_frame(codec.frame(b"R", struct.pack("!i", 5) + b"salt"))
    assert codec.authentication_request(memoryview(body)) == (5, b"salt")
    for key in (b"abcd", bytes(range(32)), b"k" * 256):
        kind, body = one_frame(codec.backend_key_data(77, key))
        assert kind == ord("K") and codec.backend_key(body) == (77, key)
    with pytest.raises(ProtocolViolation):
        codec.backend_key(b"\0\0\0\1abc")
    with pytest.raises(ProtocolViolation):
        codec.authentication_request(b"\0\0")


@given(st.binary(max_size=100) | st.none())
def test_sasl_initial_response_layout(data):
    kind, body = one_frame(codec.sasl_initial_response("SCRAM-SHA-256", data))
    assert kind == ord("p") and body.startswith(b"SCRAM-SHA-256\0")
    (length,) = struct.unpack_from("!i", body, 14)
    assert (length, body[18:]) == ((-1, b"") if data is None else (len(data), data))


def test_builders_refuse_nul_bytes_and_bad_keys():
    for build in (
        lambda: codec.query("a\0b"),
        lambda: codec.parse(b"a\0", b"select 1"),
        lambda: codec.startup_message({"user": "a\0"}),
        lambda: codec.cancel_request(1, b"abc"),
        lambda: codec.backend_key_data(1, b"k" * 257),
        lambda: codec.ready_for_query(b"X"),
        lambda: codec.frame(b"QQ", b""),
    ):
        with pytest.raises(ValueError):
            build()
