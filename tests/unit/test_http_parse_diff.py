"""The httptools parsers and the h11 parsers give one verdict on any input.

Valid messages, mutated ones and known smuggling shapes are fed to both
implementations, whole and at hypothesis-chosen split points: the heads, the
de-chunked bodies and the ends must match, or both must refuse with one status.
"""

from __future__ import annotations

import attrs
import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_http.parse import (
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

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_HEADER_BYTES = 250
MAX_BODY = 60

# --- building messages -------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
tokens = st.text(TCHAR, min_size=1, max_size=12).map(str.encode)
FRAMING = {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect"}
names = tokens.filter(lambda name: name.lower() not in FRAMING)
# Field values: visible characters and obs-text, single spaces or tabs inside.
value_chars = st.sampled_from([bytes([b]) for b in [*range(0x21, 0x7F), 0x80, 0xC3, 0xA9, 0xFF]])
values = st.lists(
    st.tuples(st.lists(value_chars, min_size=1, max_size=6), st.sampled_from([b" ", b"\t"])),
    max_size=4,
).map(lambda parts: b"".join(b"".join(word) + gap for word, gap in parts).strip(b" \t"))
ows = st.sampled_from([b"", b" ", b"  ", b"\t"])
path_chars = st.sampled_from([bytes([b]) for b in range(0x21, 0x7F)])
origin_form = st.lists(path_chars, max_size=20).map(lambda cs: b"/" + b"".join(cs))
absolute_form = st.tuples(
    st.sampled_from([b"http", b"https", b"HTTP"]),
    st.sampled_from([b"example.com", b"127.0.0.1:8080", b"[::1]:80", b"a.b-c"]),
    origin_form,
).map(lambda p: p[0] + b"://" + p[1] + p[2])
targets = st.one_of(origin_form, origin_form, origin_form, absolute_form, st.just(b"*"))
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"])
bodies = st.one_of(st.binary(max_size=20), st.binary(min_size=50, max_size=80))


@st.composite
def chunked_bodies(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` chunked at random sizes, with extensions and trailers at times."""
    out = []
    pos = 0
    while pos < len(body):
        size = draw(st.integers(1, max(1, len(body) - pos)))
        ext = draw(st.sampled_from([b"", b";a=b", b";x", b';q="v"']))
        digits = draw(st.sampled_from(["{:x}", "{:X}", "{:03x}"])).format(size).encode()
        out.append(digits + ext + b"\r\n" + body[pos : pos + size] + b"\r\n")
        pos += size
    trailers = draw(st.lists(st.tuples(names, values), max_size=2))
    out.append(b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n")
    return b"".join(out)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(methods)
    target = draw(targets)
    if target == b"*":
        method = b"OPTIONS"
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    fields = draw(st.lists(st.tuples(names, values), max_size=5))
    if version == b"HTTP/1.1" or draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b"example.com"))
    extra = draw(
        st.sampled_from(
            [
                None,
                (b"Connection", b"close"),
                (b"Connection", b"keep-alive"),
                (b"connection", b"Keep-Alive, foo"),
                (b"Expect", b"100-continue"),
                (b"Upgrade", b"websocket"),
            ]
        )
    )
    if extra:
        fields.append(extra)
    if draw(st.booleans()):
        # Around the header cap, and bodies around max_body, at times.
        fields.append((b"X-Pad", b"p" * draw(st.integers(0, MAX_HEADER_BYTES))))
    body = draw(bodies)
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "none" or version == b"HTTP/1.0" and framing == "chunked":
        encoded = b""
    elif framing == "length":
        fields.append(
            (draw(st.sampled_from([b"Content-Length", b"content-LENGTH"])), b"%d" % len(body))
        )
        encoded = body
    else:
        fields.append((b"Transfer-Encoding", draw(st.sampled_from([b"chunked", b"Chunked"]))))
        encoded = draw(chunked_bodies(body))
    lines = b"".join(n + b":" + draw(ows) + v + draw(ows) + b"\r\n" for n, v in fields)
    return method + b" " + target + b" " + version + b"\r\n" + lines + b"\r\n" + encoded


SMUGGLING = [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Content-Length: 3\r\nContent-Length: 3\r\n",
    b"Content-Length: 3\r\nContent-Length: 4\r\n",
    b"Content-Length: 3, 3\r\n",
    b"Content-Length: +3\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked, chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding : chunked\r\n",
    b"Transfer-Encoding:\x0bchunked\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"X: a\r\n Transfer-Encoding: chunked\r\n",
    b"X: a\n\nTransfer-Encoding: chunked\r\n",
    b"X: a\rTransfer-Encoding: chunked\r\n",
    b"Host: a\r\n",
    b"X: \x01\r\n",
    b"X: a\x7fb\r\n",
    b"X" * 700 + b": a\r\n",
    b"Connection: upgrade\r\nUpgrade: h2c\r\n",
    b"Expect: 100-continue\r\n",
]


@st.composite
def mutated(draw: st.DrawFn, messages: st.SearchStrategy[bytes]) -> bytes:
    """A message with bytes flipped, inserted or deleted, or a risky field added."""
    data = bytearray(draw(messages))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "field", "crlf"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from([b" ", b"\t", b"\r", b"\n", b":", b"\x00", b"0"]))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 3))]
        elif kind == "crlf":
            line = data.find(b"\r\n", at)
            if line >= 0:
                data[line : line + 2] = draw(st.sampled_from([b"\n", b"\r", b"\r\n\r\n", b""]))
        else:
            line = data.find(b"\r\n")
            if line >= 0:
                data[line + 2 : line + 2] = draw(st.sampled_from(SMUGGLING))
    return bytes(data)


def pipelined(messages: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.lists(messages, min_size=1, max_size=3).map(b"".join)


# --- running both ------------------------------------------------------------------


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def outcome(parser, chunks: list[bytes], eof: bool = True) -> list:
    """The events, with bodies joined per message, then the refusal's status if any."""
    out: list = []
    try:
        for chunk in chunks:
            for event in parser.feed(chunk):
                add(out, event)
        if eof:
            for event in parser.eof() or ():
                add(out, event)
    except ParseError as exc:
        out.append(("refused", exc.status))
    return out


def add(out: list, event) -> None:
    if isinstance(event, Body):
        if out and isinstance(out[-1], bytes):
            out[-1] += event.data
        else:
            out.append(event.data)
    elif isinstance(event, RequestHead | ResponseHead):
        out.append(attrs.asdict(event))
    else:
        assert isinstance(event, End)
        out.append("end")


def same_requests(data: bytes, cuts: list[int]) -> list:
    limits = {"max_header_bytes": MAX_HEADER_BYTES, "max_body": MAX_BODY}
    for chunks in ([data], pieces(data, cuts)):
        fast = outcome(HttptoolsRequestParser(**limits), chunks)
        slow = outcome(H11RequestParser(**limits), chunks)
        assert fast == slow, chunks
    return fast


# --- requests ----------------------------------------------------------------------


@SETTINGS
@given(pipelined(requests()), st.lists(st.integers(0, 10_000), max_size=6))
def test_valid_requests_agree_and_are_accepted(data: bytes, cuts: list[int]) -> None:
    result = same_requests(data, cuts)
    refusals = [item for item in result if isinstance(item, tuple)]
    # A valid request is refused only for its size, or for an Upgrade it asks for.
    assert all(status in (413, 431, 501) for _, status in refusals), result


@SETTINGS
@given(pipelined(mutated(requests())), st.lists(st.integers(0, 10_000), max_size=6))
def test_mutated_requests_get_one_verdict(data: bytes, cuts: list[int]) -> None:
    same_requests(data, cuts)


@SETTINGS
@given(st.binary(max_size=200), st.lists(st.integers(0, 10_000), max_size=4))
def test_random_bytes_get_one_verdict(data: bytes, cuts: list[int]) -> None:
    same_requests(data, cuts)


@pytest.mark.parametrize("field", SMUGGLING)
@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_smuggling_shapes_get_one_verdict(field: bytes, method: bytes) -> None:
    data = method + b" / HTTP/1.1\r\nHost: a\r\n" + field + b"\r\n3\r\nabc\r\n0\r\n\r\n"
    same_requests(data, [len(data) // 2])


@SETTINGS
@given(requests())
def test_valid_chunked_bodies_decode_as_h11_decodes_them(data: bytes) -> None:
    # h11 reads this body itself here: the shared de-chunking is checked against it.
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    expected = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            expected += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage) or event is h11.NEED_DATA:
            break
    result = outcome(HttptoolsRequestParser(), [data], eof=False)
    assert result[-1] == "end", result
    assert (result[1] if len(result) == 3 else b"") == expected


# --- responses ---------------------------------------------------------------------

statuses = st.one_of(
    st.sampled_from([100, 103, 200, 201, 204, 206, 301, 304, 400, 404, 429, 500, 503]),
    st.integers(100, 599),
)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A response and the method of the request it answers."""
    method = draw(st.sampled_from([b"GET", b"GET", b"POST", b"HEAD"]))
    status = draw(statuses.filter(lambda s: s != 101))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    reason = draw(st.sampled_from([b" OK", b" Not Found", b"", b" ", b" a\tb c"]))
    fields = draw(st.lists(st.tuples(names, values), max_size=4))
    extra = draw(st.sampled_from([None, (b"Connection", b"close"), (b"Connection", b"keep-alive")]))
    if extra:
        fields.append(extra)
    body = draw(bodies)
    framing = draw(st.sampled_from(["close", "length", "chunked"]))
    head_only = status < 200 or status in (204, 304) or method == b"HEAD"
    if framing == "length":
        fields.append((b"Content-Length", b"%d" % len(body)))
        encoded = b"" if head_only else body
    elif framing == "chunked" and version == b"HTTP/1.1":
        fields.append((b"Transfer-Encoding", b"chunked"))
        encoded = b"" if head_only else draw(chunked_bodies(body))
    else:
        encoded = b"" if head_only else body
    lines = b"".join(n + b":" + draw(ows) + v + b"\r\n" for n, v in fields)
    head = version + b" %03d" % status + reason + b"\r\n" + lines + b"\r\n"
    return head + encoded, method


def same_responses(exchanges: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    data = b"".join(message for message, _ in exchanges)
    for chunks in ([data], pieces(data, cuts)):
        results = []
        for cls in (HttptoolsResponseParser, H11ResponseParser):
            parser = cls(max_header_bytes=MAX_HEADER_BYTES)
            for _, method in exchanges:
                parser.expect(method)
            results.append(outcome(parser, chunks))
        assert results[0] == results[1], chunks


@SETTINGS
@given(st.lists(responses(), min_size=1, max_size=3), st.lists(st.integers(0, 10_000), max_size=6))
def test_valid_responses_agree(exchanges: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    same_responses(exchanges, cuts)


@st.composite
def mutated_responses(draw: st.DrawFn) -> tuple[bytes, bytes]:
    message, method = draw(responses())
    return draw(mutated(st.just(message))), method


@SETTINGS
@given(
    st.lists(mutated_responses(), min_size=1, max_size=2),
    st.lists(st.integers(0, 10_000), max_size=6),
)
def test_mutated_responses_get_one_verdict(
    exchanges: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    same_responses(exchanges, cuts)
