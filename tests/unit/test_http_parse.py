"""Sans-IO tests of the HTTP/1.1 parsers: bytes whole, byte by byte, at split points.

Every test runs against both implementations (llhttp through httptools, and h11).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_http import parse
from gateway_http.parse import (
    END,
    BaseRequestParser,
    BaseResponseParser,
    Body,
    End,
    H11RequestParser,
    H11ResponseParser,
    HttptoolsRequestParser,
    HttptoolsResponseParser,
    ParseError,
    RequestHead,
    ResponseHead,
)

REQUEST_PARSERS = {"httptools": HttptoolsRequestParser, "h11": H11RequestParser}
RESPONSE_PARSERS = {"httptools": HttptoolsResponseParser, "h11": H11ResponseParser}


@pytest.fixture(params=["httptools", "h11"])
def impl(request: pytest.FixtureRequest) -> str:
    return request.param


def requests(impl: str, data: bytes | list[bytes], **limits: int) -> list:
    """Feed ``data`` (or its pieces in turn); return the events, bodies joined."""
    parser: BaseRequestParser = REQUEST_PARSERS[impl](**limits)
    events: list = []
    for piece in [data] if isinstance(data, bytes) else data:
        events += parser.feed(piece)
    parser.eof()
    return joined(events)


def responses(impl: str, methods: list[bytes], data: bytes | list[bytes]) -> list:
    parser: BaseResponseParser = RESPONSE_PARSERS[impl]()
    for method in methods:
        parser.expect(method)
    events: list = []
    for piece in [data] if isinstance(data, bytes) else data:
        events += parser.feed(piece)
    events += parser.eof()
    return joined(events)


def joined(events: list) -> list:
    out: list = []
    for event in events:
        if isinstance(event, Body) and out and isinstance(out[-1], Body):
            out[-1] = Body(out[-1].data + event.data)
        elif not isinstance(event, Body) or event.data:
            out.append(event)
    return out


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def refusal(impl: str, data: bytes | list[bytes], **limits: int) -> tuple[int, str]:
    with pytest.raises(ParseError) as info:
        requests(impl, data, **limits)
    return info.value.status, info.value.reason


GET = b"GET /api/v1/query?q=up HTTP/1.1\r\nHost: mimir.example\r\nUser-Agent: t\r\n\r\n"
POST = (
    b"POST /api/v1/push HTTP/1.1\r\nHost: mimir.example\r\n"
    b"Content-Type: application/x-protobuf\r\nContent-Length: 11\r\n\r\nhello world"
)
CHUNKED = (
    b"POST /api/v1/push HTTP/1.1\r\nHost: mimir.example\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n1;name=value\r\n \r\n00005\r\nworld\r\n0\r\nX-Checksum: 1\r\n\r\n"
)


# --- requests: events ----------------------------------------------------------------


def test_get_gives_its_head_and_end(impl: str) -> None:
    (head, end) = requests(impl, GET)
    assert head == RequestHead(
        method=b"GET",
        target=b"/api/v1/query?q=up",
        version=b"1.1",
        headers=[(b"Host", b"mimir.example"), (b"User-Agent", b"t")],
        content_length=None,
        chunked=False,
        keep_alive=True,
        expect_continue=False,
        close_after=False,
        forward=[(b"Host", b"mimir.example"), (b"User-Agent", b"t")],
    )
    assert end is END


def test_field_names_keep_their_case_and_values_lose_surrounding_whitespace(impl: str) -> None:
    data = b"GET / HTTP/1.1\r\nhOsT:a\r\nX-Pad:  \t padded value \t \r\nX-Empty:\r\n\r\n"
    (head, _) = requests(impl, data)
    assert head.headers == [(b"hOsT", b"a"), (b"X-Pad", b"padded value"), (b"X-Empty", b"")]


def test_content_length_body_follows_the_head(impl: str) -> None:
    head, body, end = requests(impl, POST)
    assert (head.content_length, head.chunked) == (11, False)
    assert body == Body(b"hello world")
    assert end is END


def test_chunked_body_is_dechunked_and_trailers_dropped(impl: str) -> None:
    head, body, end = requests(impl, CHUNKED)
    assert (head.content_length, head.chunked, head.close_after) == (None, True, False)
    assert body == Body(b"hello world")
    assert end is END


@pytest.mark.parametrize("data", [GET, POST, CHUNKED, POST + CHUNKED + GET])
def test_byte_by_byte_gives_what_whole_gives(impl: str, data: bytes) -> None:
    assert requests(impl, byte_by_byte(data)) == requests(impl, data)


@given(st.lists(st.integers(0, 2000), max_size=8))
@settings(max_examples=100, deadline=None)
def test_any_split_gives_what_whole_gives(cuts: list[int]) -> None:
    data = POST + CHUNKED + GET + POST
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in zip(points, points[1:], strict=False)]
    for impl in REQUEST_PARSERS:
        assert requests(impl, pieces) == requests(impl, data)


def test_pipelined_requests_come_out_in_order(impl: str) -> None:
    events = requests(impl, GET + POST + CHUNKED)
    heads = [event.method for event in events if isinstance(event, RequestHead)]
    assert heads == [b"GET", b"POST", b"POST"]
    assert [type(event) for event in events] == [
        RequestHead,
        End,
        RequestHead,
        Body,
        End,
        RequestHead,
        Body,
        End,
    ]


def test_body_pieces_are_handed_out_as_they_arrive(impl: str) -> None:
    parser = REQUEST_PARSERS[impl]()
    head, first = parser.feed(POST[:-6])
    assert isinstance(head, RequestHead) and first == Body(b"hello")
    assert parser.feed(POST[-6:]) == [Body(b" world"), END]


def test_chunk_data_is_handed_out_before_the_chunk_ends(impl: str) -> None:
    parser = REQUEST_PARSERS[impl]()
    split = CHUNKED.index(b"hello") + 3
    assert parser.feed(CHUNKED[:split])[1:] == [Body(b"hel")]


@pytest.mark.parametrize(
    ("fields", "keep_alive"),
    [
        (b"", True),
        (b"Connection: close\r\n", False),
        (b"Connection: Keep-Alive, CLOSE\r\n", False),
        (b"Connection: keep-alive\r\n", True),
    ],
)
def test_http11_keeps_alive_unless_closed(impl: str, fields: bytes, keep_alive: bool) -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n"
    assert requests(impl, data)[0].keep_alive is keep_alive


@pytest.mark.parametrize(
    ("fields", "keep_alive"),
    [(b"", False), (b"Connection: keep-alive\r\n", True), (b"Connection: foo\r\n", False)],
)
def test_http10_keeps_alive_only_when_asked(impl: str, fields: bytes, keep_alive: bool) -> None:
    (head, _) = requests(impl, b"GET / HTTP/1.0\r\n" + fields + b"\r\n")
    assert (head.version, head.keep_alive) == (b"1.0", keep_alive)


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\nx\r\n0\r\n\r\n",
    ],
)
def test_bytes_after_a_request_that_ends_the_connection_are_not_parsed(
    impl: str, first: bytes
) -> None:
    parser = REQUEST_PARSERS[impl]()
    events = parser.feed(first + b"GARBAGE\r\n\r\n")
    assert events[-1] is END
    assert sum(isinstance(event, RequestHead) for event in events) == 1
    assert parser.feed(b"more garbage") == []
    parser.eof()


def test_content_length_with_transfer_encoding_is_chunked_and_closes(impl: str) -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    head, body, _ = requests(impl, data)
    assert (head.chunked, head.content_length, head.close_after) == (True, None, True)
    assert head.keep_alive  # what the version and Connection say; close_after overrides it
    assert body == Body(b"abc")


def test_expect_100_continue_is_reported(impl: str) -> None:
    data = b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n"
    parser = REQUEST_PARSERS[impl]()
    (head,) = parser.feed(data)
    assert head.expect_continue
    assert parser.feed(b"ok") == [Body(b"ok"), END]


def test_expect_100_continue_is_ignored_in_http10(impl: str) -> None:
    data = b"PUT /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok"
    assert requests(impl, data)[0].expect_continue is False


@pytest.mark.parametrize(
    "target",
    [b"*", b"http://mimir.example/api?x=1", b"HTTP://[::1]:8080", b"//double/slash"],
)
def test_other_request_target_forms_are_accepted(impl: str, target: bytes) -> None:
    (head, _) = requests(impl, b"OPTIONS " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head.target == target


def test_eof_between_requests_is_quiet_and_within_one_is_truncated(impl: str) -> None:
    parser = REQUEST_PARSERS[impl]()
    parser.feed(GET)
    parser.eof()
    for partial in (GET[:10], POST[:-1], CHUNKED[:-2]):
        parser = REQUEST_PARSERS[impl]()
        parser.feed(partial)
        with pytest.raises(ParseError) as info:
            parser.eof()
        assert (info.value.status, info.value.reason) == (400, "truncated request")


def test_a_refusal_is_raised_again_by_later_calls(impl: str) -> None:
    parser = REQUEST_PARSERS[impl]()
    with pytest.raises(ParseError):
        parser.feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ParseError) as info:
        parser.feed(GET)
    assert info.value.status == 400
    parser.eof()


def test_repr_shows_the_state(impl: str) -> None:
    parser = REQUEST_PARSERS[impl]()
    assert repr(parser).endswith(" head pending=0>")
    parser.feed(POST[:-3])
    assert repr(parser).endswith(" <body left=3> pending=0>")
    parser.feed(POST[-3:] + CHUNKED[:20])
    assert repr(parser).endswith(" head pending=20>")
    with pytest.raises(ParseError):
        parser.feed(b"\n")
    assert "failed(400 bare LF in head)" in repr(parser)


# --- requests: limits ----------------------------------------------------------------


def padded_get(size: int) -> bytes:
    """A GET whose head is exactly ``size`` bytes."""
    base = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: \r\n\r\n"
    return base[:-4] + b"p" * (size - len(base)) + b"\r\n\r\n"


@pytest.mark.parametrize("pieces", [lambda d: [d], byte_by_byte, lambda d: [d[:-1], d[-1:]]])
def test_header_block_cap_is_exact(impl: str, pieces) -> None:
    assert requests(impl, pieces(padded_get(200)), max_header_bytes=200)[-1] is END
    status, _ = refusal(impl, pieces(padded_get(201)), max_header_bytes=200)
    assert status == 431


def test_a_head_that_never_ends_is_refused_once_past_the_cap(impl: str) -> None:
    parser = REQUEST_PARSERS[impl](max_header_bytes=100)
    parser.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 81)  # 100 bytes
    with pytest.raises(ParseError) as info:
        parser.feed(b"a")
    assert info.value.status == 431


def test_the_cap_counts_each_pipelined_head_alone(impl: str) -> None:
    data = padded_get(150) * 3
    assert len(requests(impl, data, max_header_bytes=150)) == 6


def test_a_bare_lf_is_refused_before_the_head_ends(impl: str) -> None:
    parser = REQUEST_PARSERS[impl]()
    with pytest.raises(ParseError) as info:
        parser.feed(b"GET / HTTP/1.1\nHost: a\n")
    assert info.value.status == 400


def test_a_bare_lf_past_the_cap_is_a_431(impl: str) -> None:
    data = b"GET / HTTP/1.1\r\nX: " + b"a" * 100 + b"\n\r\n"
    for pieces in ([data], byte_by_byte(data)):
        assert refusal(impl, pieces, max_header_bytes=100)[0] == 431
        assert refusal(impl, pieces, max_header_bytes=200)[0] == 400


def test_content_length_over_max_body_is_refused_at_the_head(impl: str) -> None:
    parser = REQUEST_PARSERS[impl](max_body=10)
    with pytest.raises(ParseError) as info:
        parser.feed(POST[: POST.index(b"\r\n\r\n") + 4])
    assert (info.value.status, info.value.reason) == (413, "body larger than max_body")


def test_chunked_body_over_max_body_is_refused_when_the_total_passes(impl: str) -> None:
    parser = REQUEST_PARSERS[impl](max_body=10)
    cut = CHUNKED.index(b"00005")
    events = parser.feed(CHUNKED[:cut])
    assert joined(events)[1] == Body(b"hello ")
    with pytest.raises(ParseError) as info:
        parser.feed(CHUNKED[cut:])
    assert info.value.status == 413
    assert requests(impl, CHUNKED, max_body=11)[1] == Body(b"hello world")


def test_the_trailer_section_cap_is_exact(impl: str) -> None:
    prefix = CHUNKED[: CHUNKED.index(b"0\r\n") + 3]
    section = b"X-T: " + b"t" * 150 + b"\r\nX-U: u\r\n\r\n"  # its last CRLF included
    for pieces in ([prefix + section], [prefix, *byte_by_byte(section)]):
        assert requests(impl, pieces, max_header_bytes=len(section))[-1] is END
        assert refusal(impl, pieces, max_header_bytes=len(section) - 1)[0] == 431


def test_a_chunk_size_line_is_capped(impl: str) -> None:
    head = CHUNKED[: CHUNKED.index(b"\r\n\r\n") + 4]
    long_ext = b"1;" + b"e" * (parse.MAX_CHUNK_LINE - 2)
    assert requests(impl, head + long_ext + b"\r\nx\r\n0\r\n\r\n")[1] == Body(b"x")
    assert refusal(impl, head + long_ext + b"e\r\nx\r\n0\r\n\r\n")[0] == 400
    assert refusal(impl, [head, long_ext + b"e", b"\r"])[0] == 400


# --- requests: refusals --------------------------------------------------------------

HOST = b"Host: a\r\n"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"CONNECT mimir.example:443 HTTP/1.1\r\n" + HOST + b"\r\n", 501),
        (b"GET / HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 501),
        (
            b"GET / HTTP/1.1\r\n"
            + HOST
            + b"Connection: keep-alive, upgrade\r\nUpgrade: h2c\r\n\r\n",
            501,
        ),
        (b"BREW /pot HTTP/1.1\r\n" + HOST + b"\r\n", 501),
        (b"get / HTTP/1.1\r\n" + HOST + b"\r\n", 501),
        (b"G(T / HTTP/1.1\r\n" + HOST + b"\r\n", 400),
        (b" GET / HTTP/1.1\r\n" + HOST + b"\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/0.9\r\n" + HOST + b"\r\n", 400),
        (b"GET / HTTP/2.0\r\n" + HOST + b"\r\n", 400),
        (b"GET / HTTP/1.2\r\n" + HOST + b"\r\n", 400),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 501),
        (b"GET  / HTTP/1.1\r\n" + HOST + b"\r\n", 400),
        (b"GET / HTTP/1.1 \r\n" + HOST + b"\r\n", 400),
        (b"GET /a b HTTP/1.1\r\n" + HOST + b"\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n" + HOST + b"\r\n", 400),
        (b"GET * HTTP/1.1\r\n" + HOST + b"\r\n", 400),
        (b"GET http://user@a/ HTTP/1.1\r\n" + HOST + b"\r\n", 400),
        (b"GET a/b HTTP/1.1\r\n" + HOST + b"\r\n", 400),
        (b"\r\nGET / HTTP/1.1\r\n" + HOST + b"\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + HOST + b"\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X: a\x01b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X: a\x7f\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X : a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"\xe9: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X: a\n\r\n", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nx", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1, 1\r\n\r\nx", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\nx", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1234567890123456789\r\n\r\nx", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip\r\n\r\nx", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n" * 2 + b"\r\n", 400),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ],
)
def test_bad_heads_are_refused(impl: str, data: bytes, status: int) -> None:
    assert refusal(impl, data)[0] == status
    assert refusal(impl, byte_by_byte(data))[0] == status


@pytest.mark.parametrize(
    "chunks",
    [
        b"3 \r\nabc\r\n0\r\n\r\n",
        b" 3\r\nabc\r\n0\r\n\r\n",
        b"+3\r\nabc\r\n0\r\n\r\n",
        b"0x3\r\nabc\r\n0\r\n\r\n",
        b"\r\nabc\r\n0\r\n\r\n",
        b"3\nabc\r\n0\r\n\r\n",
        b"3\r\nabcX\r\n0\r\n\r\n",
        b"3\r\nabc\n0\r\n\r\n",
        b"3;a=\x01\r\nabc\r\n0\r\n\r\n",
        b"11111111111111111\r\n",
        b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
        b"3\r\nabc\r\n0\r\n folded: x\r\n\r\n",
        b"3\r\nabc\r\n0\r\nX: \x00\r\n\r\n",
    ],
)
def test_bad_chunked_bodies_are_refused(impl: str, chunks: bytes) -> None:
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    whole = refusal(impl, data)
    assert whole[0] == 400
    assert refusal(impl, byte_by_byte(data)) == whole


def test_refusal_reasons_never_echo_the_request(impl: str) -> None:
    status, reason = refusal(impl, b"GET / HTTP/1.1\r\nHost: a\r\nX-Secret: \x01zzz\r\n\r\n")
    assert (status, reason) == (400, "malformed request head")


def test_the_default_parsers_are_the_httptools_ones() -> None:
    assert parse.IMPLEMENTATION == "httptools"
    assert parse.RequestParser is HttptoolsRequestParser
    assert parse.ResponseParser is HttptoolsResponseParser


# --- responses -----------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_OK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


def test_response_with_length_gives_head_body_end(impl: str) -> None:
    head, body, end = responses(impl, [b"GET"], OK)
    assert head == ResponseHead(
        status=200,
        reason=b"OK",
        version=b"1.1",
        headers=[(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")],
        content_length=5,
        chunked=False,
        keep_alive=True,
        informational=False,
        forward=[(b"Content-Type", b"text/plain")],
    )
    assert (body, end) == (Body(b"hello"), END)


def test_chunked_response_is_dechunked(impl: str) -> None:
    head, body, end = responses(impl, [b"GET"], CHUNKED_OK)
    assert (head.chunked, body, end) == (True, Body(b"hello"), END)


@pytest.mark.parametrize(
    ("method", "status_line"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK"),
        (b"GET", b"HTTP/1.1 204 No Content"),
        (b"GET", b"HTTP/1.1 304 Not Modified"),
    ],
)
def test_responses_without_content_end_at_the_head(
    impl: str, method: bytes, status_line: bytes
) -> None:
    data = status_line + b"\r\nContent-Length: 5\r\n\r\n" + OK
    events = responses(impl, [method, b"GET"], data)
    assert [type(event) for event in events] == [ResponseHead, End, ResponseHead, Body, End]
    assert events[0].content_length == 5


def test_informational_heads_come_before_the_final_one(impl: str) -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
    events = responses(impl, [b"POST", b"GET"], [data, CHUNKED_OK])
    assert [(e.status, e.informational) for e in events if isinstance(e, ResponseHead)] == [
        (100, True),
        (103, True),
        (200, False),
        (200, False),
    ]
    assert [type(event) for event in events][2:] == [ResponseHead, Body, End] * 2


def test_body_until_close_ends_at_eof(impl: str) -> None:
    data = b"HTTP/1.0 200 OK\r\n\r\nall of it"
    parser = RESPONSE_PARSERS[impl]()
    parser.expect(b"GET")
    head, body = parser.feed(data)
    assert (head.keep_alive, head.content_length, body) == (False, None, Body(b"all of it"))
    assert parser.feed(b" and more") == [Body(b" and more")]
    assert parser.eof() == [END]
    assert parser.eof() == []


@pytest.mark.parametrize("data", [OK[:-1], CHUNKED_OK[:-2], OK[:10], b""])
def test_a_response_cut_short_is_a_502(impl: str, data: bytes) -> None:
    parser = RESPONSE_PARSERS[impl]()
    parser.expect(b"GET")
    parser.feed(data)
    with pytest.raises(ParseError) as info:
        parser.eof()
    assert info.value.status == 502


def test_a_response_without_a_request_is_a_502(impl: str) -> None:
    parser = RESPONSE_PARSERS[impl]()
    parser.expect(b"GET")
    parser.feed(OK)
    with pytest.raises(ParseError) as info:
        parser.feed(OK)
    assert (info.value.status, info.value.reason) == (502, "response without a request")


def test_responses_that_close_end_parsing(impl: str) -> None:
    data = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhiJUNK"
    events = responses(impl, [b"GET", b"GET"], data)
    assert events[0].keep_alive is False and events[1:] == [Body(b"hi"), END]


def test_content_length_with_transfer_encoding_response_does_not_keep_alive(impl: str) -> None:
    data = CHUNKED_OK.replace(b"\r\n\r\n", b"\r\nContent-Length: 99\r\n\r\n", 1)
    head, body, _ = responses(impl, [b"GET"], data)
    assert (head.chunked, head.keep_alive, head.content_length, body) == (
        True,
        False,
        None,
        Body(b"hello"),
    )


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/1.1 600 High\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"http/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nx",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: \x01\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n\r\n",
    ],
)
def test_bad_responses_are_a_502(impl: str, data: bytes) -> None:
    for pieces in ([data], byte_by_byte(data)):
        with pytest.raises(ParseError) as info:
            responses(impl, [b"GET"], pieces)
        assert info.value.status == 502


def test_a_huge_response_head_is_a_502(impl: str) -> None:
    parser = RESPONSE_PARSERS[impl](max_header_bytes=100)
    parser.expect(b"GET")
    with pytest.raises(ParseError) as info:
        parser.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100)
    assert info.value.status == 502


def test_status_line_without_a_reason_is_accepted(impl: str) -> None:
    head, _ = responses(impl, [b"GET"], b"HTTP/1.1 204\r\n\r\n")
    assert (head.status, head.reason) == (204, b"")


@given(st.lists(st.integers(0, 500), max_size=8))
@settings(max_examples=100, deadline=None)
def test_any_split_of_responses_gives_what_whole_gives(cuts: list[int]) -> None:
    data = OK + b"HTTP/1.1 100 Continue\r\n\r\n" + CHUNKED_OK + b"HTTP/1.0 200 OK\r\n\r\nrest"
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in zip(points, points[1:], strict=False)]
    methods = [b"GET", b"POST", b"GET"]
    for impl in RESPONSE_PARSERS:
        assert responses(impl, methods, pieces) == responses(impl, methods, data)


@pytest.mark.parametrize("first", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS ClientHello
    b"G\x00ET / HTTP/1.1\r\n",
    b"GET\x7f",
])
def test_garbage_is_refused_before_a_head_could_end(impl: str, first: bytes) -> None:
    # No CRLF CRLF yet: a parser that waited for one would let the client
    # stall until the head timeout instead of getting its 400.
    parser = REQUEST_PARSERS[impl]()
    with pytest.raises(ParseError) as info:
        for i in range(len(first)):
            parser.feed(first[i:i + 1])
    assert info.value.status == 400


def test_a_valid_method_prefix_waits_for_the_rest(impl: str) -> None:
    parser = REQUEST_PARSERS[impl]()
    assert parser.feed(b"BREW") == [] and parser.feed(b" /pot HTTP/1.1\r\nHost: h") == []
    with pytest.raises(ParseError) as info:
        parser.feed(b"\r\n\r\n")  # a token the gateway does not implement: whole head, 501
    assert info.value.status == 501
