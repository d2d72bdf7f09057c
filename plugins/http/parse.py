# HTTP/1.1 message parsers, sans-IO: a client's bytes in, request events out;
# the primary's bytes in, response events out.
#
# Owns: finding where each head ends and capping its size, deciding whether a
# head is acceptable (and with which status it is refused), and the framing of
# bodies (Content-Length, chunked, read-until-close). Must not know sockets,
# asyncio, mirrors, configuration or how a refusal is written to the client:
# callers turn a ParseError into a response.
#
# Theory of operation. Two implementations share everything except the check of
# a head's syntax: llhttp (through httptools) on the hot path, h11 as the readable
# reference and fallback. Heads are cut out of the stream here (a search for
# CRLF CRLF) and each library reads exactly one head at a time: httptools reports
# no byte offsets, so a parser fed the whole stream could not say where a head
# ends (the 431 cap must be exact, also for a head that arrives whole) nor where
# a chunked body ends and the next pipelined request begins. Bodies are framed
# here for the same reason, with C-speed bytes methods, never per byte. Once a
# library has accepted a head, the fields that decide framing are read from the
# head's bytes by shared code, so both implementations decide alike.
#
# Where llhttp and h11 disagree the stricter rule wins, so both give one verdict:
#   - a bare LF as a line end (h11 accepts, llhttp refuses): 400, found while
#     the head is still arriving; an empty line before the start line: 400;
#   - the request line must be exactly `method SP target SP HTTP/1.x` (llhttp
#     accepts runs of spaces and HTTP/0.9 or 2.0 lines; h11 any version digits);
#   - methods are llhttp's list (h11 takes any token): another token is 501,
#     anything else 400; CONNECT is 501;
#   - targets: origin-form, `*` for OPTIONS only, or a plain absolute-form;
#   - control characters in field values and obsolete line folding (h11
#     accepts both): 400;
#   - Content-Length: one field of at most 18 digits (h11 accepts equal
#     duplicates and lists like "3, 3", llhttp neither);
#   - Transfer-Encoding: one field whose value is exactly "chunked" (any case).
#     Anything else is 400, not 501: RFC 9112 §6.3 requires 400 when chunked is
#     not the final coding, and one status for every refused coding keeps the
#     verdict independent of which check of which library fires first;
#   - Content-Length with Transfer-Encoding (llhttp refuses, h11 accepts):
#     accepted, framed by chunked, and the connection closes after (§6.1);
#   - HTTP/1.1 without exactly one Host (h11 checks, llhttp does not): 400.
# Every refusal inside the header section is a 400, so the order in which the
# libraries check lines cannot change a verdict; statuses other than 400 are
# decided before (431, method 501) or after (Upgrade 501, 413) the libraries.
# A bad response is always a 502.
from __future__ import annotations

import collections
import enum
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import h11

try:
    import httptools
except ImportError:  # the pure-Python parsers serve instead
    httptools = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from httptools.parser.parser import HttpParser

__all__ = [
    "END",
    "HOP_BY_HOP",
    "IMPLEMENTATION",
    "MAX_CHUNK_LINE",
    "BaseRequestParser",
    "BaseResponseParser",
    "Body",
    "End",
    "H11RequestParser",
    "H11ResponseParser",
    "HttptoolsRequestParser",
    "HttptoolsResponseParser",
    "ParseError",
    "RequestHead",
    "RequestParser",
    "ResponseHead",
    "ResponseParser",
]

# RFC 9110 §5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" /
# "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HEXDIG = b"0123456789abcdefABCDEF"
# The control characters no field value may hold: all but HTAB, CR and LF (line
# ends are checked apart).
_CTL = bytes(range(0x09)) + bytes(range(0x0B, 0x0D)) + bytes(range(0x0E, 0x20)) + b"\x7f"
# The methods llhttp parses in an HTTP/1.x request, less CONNECT (refused: 501).
_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH "
    b"NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)
# RFC 9112 §3.2.2 absolute-form, kept to what both libraries accept: a scheme of
# letters, "://", a host (reg-name or IP-literal) and a port, then a path or
# query of visible characters. No userinfo: RFC 9110 §4.2.4, "A recipient SHOULD
# parse for userinfo and treat its presence as an error".
_ABSOLUTE_FORM = re.compile(
    rb"[A-Za-z]+://(?:[A-Za-z0-9\-._~%!$&'()*+,;=]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?"
    rb"(?:[/?][\x21-\x7e]*)?\Z"
)
_VERSIONS = frozenset((b"HTTP/1.1", b"HTTP/1.0"))
# Content-Length of at most 18 digits stays below 2**63.
_MAX_LENGTH_DIGITS = 18
# A chunk-size line (size and extensions, without CRLF) longer than this is refused.
MAX_CHUNK_LINE = 4096


class ParseError(Exception):
    """The peer sent bytes that are not an acceptable HTTP/1.1 message.

    :param status: the status to answer with: 400, 413, 431 or 501 for a
        request; 502 for a bad response from the primary.
    :param reason: a short fixed text (it never echoes the peer's bytes), fit
        for the ``X-Mirrorgate-Error`` header.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


# Heads are plain slotted classes, not frozen ones: a frozen attrs class sets
# each field through object.__setattr__, about 0.5 µs more per head on the
# hot path (a request and a response per relayed request). Nothing changes
# them after the parser made them.
@attrs.define
class RequestHead:
    """A request line and its fields, with the framing decided.

    ``headers`` keeps the fields in order, names as sent, values without the
    whitespace around them. ``content_length`` is None without Content-Length
    and when the body is chunked. ``keep_alive`` follows the version and the
    Connection field alone; ``close_after`` says both Content-Length and
    Transfer-Encoding were sent (RFC 9112 §6.1: framed by chunked, and the
    connection closes after the response). ``forward`` holds the end-to-end
    fields, in order: ``headers`` less the hop-by-hop fields (``HOP_BY_HOP``)
    and those the Connection field names (RFC 9110 §7.6.1).
    """

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    content_length: int | None
    chunked: bool
    keep_alive: bool
    expect_continue: bool
    close_after: bool
    forward: list[tuple[bytes, bytes]]
    # The head as received, request line to the empty line: what a proxy may
    # forward as it is when it drops no field but Content-Length.
    raw: bytes = attrs.field(default=b"", eq=False, repr=False)


@attrs.define
class ResponseHead:
    """A status line and its fields, with the framing decided.

    ``chunked`` says a chunked body follows (never for HEAD, 1xx, 204 or 304);
    ``content_length`` reports the field, None when absent or when chunked.
    ``keep_alive`` is False also when the body runs until the connection closes
    and when both Content-Length and Transfer-Encoding were sent. An
    ``informational`` head (1xx) is complete in itself: no Body or End follows
    it; the final head of the same response comes next. ``forward`` is as
    for a request.
    """

    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    content_length: int | None
    chunked: bool
    keep_alive: bool
    informational: bool
    forward: list[tuple[bytes, bytes]]


@attrs.define
class Body:
    """A piece of a message body, de-chunked."""

    data: bytes


class End:
    """The current message is complete (the one instance is ``END``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END = End()

RequestEvent = RequestHead | Body | End
ResponseEvent = ResponseHead | Body | End


# --- start lines ---------------------------------------------------------------------


# The bytes a method could be, before a request line's first SP (or CR, LF).
_METHOD_PREFIX = re.compile(rb"[^ \r\n]*")


def _is_token(value: bytes) -> bool:
    return bool(value) and not value.translate(None, _TCHAR)


def _split_request_line(head: bytes) -> tuple[bytes, bytes, bytes]:
    """Check a head's request line; return method, target and version ("1.1").

    :raises ParseError: 501 for CONNECT and unknown methods, else 400.
    """
    # RFC 9112 §3: request-line = method SP request-target SP HTTP-version
    parts = head[: head.find(b"\r\n")].split(b" ")
    method = parts[0]
    if method not in _METHODS:
        # RFC 9110 §9.1: "An origin server that receives a request method that is
        # unrecognized or not implemented SHOULD respond with the 501".
        if method == b"CONNECT":
            raise ParseError(501, "CONNECT is not supported")
        if _is_token(method):
            raise ParseError(501, "method not implemented")
        raise ParseError(400, "invalid method")
    if len(parts) != 3:
        raise ParseError(400, "malformed request line")
    _, target, version = parts
    if version not in _VERSIONS:
        raise ParseError(400, "unsupported HTTP version")
    if target[:1] != b"/":
        # §3.2.4: the asterisk-form "is only used for a server-wide OPTIONS request".
        if target == b"*":
            if method != b"OPTIONS":
                raise ParseError(400, "asterisk-form outside OPTIONS")
        elif not _ABSOLUTE_FORM.match(target):
            raise ParseError(400, "invalid request target")
    return method, target, version[5:]


def _split_status_line(head: bytes) -> tuple[bytes, int, bytes]:
    """Check a head's status line; return version ("1.1"), status and reason.

    :raises ParseError: 502.
    """
    # RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ];
    # the SP before an empty reason is often left out and is accepted.
    # reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ): llhttp accepts control
    # characters there too, h11 refuses NUL.
    line_end = head.find(b"\r\n")
    reason = head[13:line_end]
    if (
        line_end < 12
        or head[8] != 0x20
        or (line_end > 12 and head[12] != 0x20)
        or head[:8] not in _VERSIONS
        or not head[9:12].isdigit()
        or (reason and len(reason.translate(None, _CTL)) != len(reason))
    ):
        raise ParseError(502, "malformed status line")
    return head[5:8], int(head[9:12]), reason


# --- the fields that decide framing --------------------------------------------------


class _Field(enum.Enum):
    HOST = enum.auto()
    CONTENT_LENGTH = enum.auto()
    TRANSFER_ENCODING = enum.auto()
    CONNECTION = enum.auto()
    UPGRADE = enum.auto()
    EXPECT = enum.auto()
    HOP = enum.auto()  # another hop-by-hop field


# Attribute access on an Enum class costs about 70 ns on Python 3.11, more than
# the rest of a field's check: the loops below use these module-level names.
_HOST, _CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _UPGRADE, _EXPECT, _HOP = _Field

_FIELDS = {
    b"host": _Field.HOST,
    b"content-length": _Field.CONTENT_LENGTH,
    b"transfer-encoding": _Field.TRANSFER_ENCODING,
    b"connection": _Field.CONNECTION,
    b"upgrade": _Field.UPGRADE,
    b"expect": _Field.EXPECT,
    b"keep-alive": _Field.HOP,
    b"proxy-connection": _Field.HOP,
    b"te": _Field.HOP,
    b"trailer": _Field.HOP,
    b"proxy-authenticate": _Field.HOP,
}
# The fields that describe one hop, never forwarded (RFC 9110 §7.6.1), with
# the framing fields a proxy writes itself for each hop.
HOP_BY_HOP = frozenset(
    name for name, kind in _FIELDS.items() if kind not in (_HOST, _EXPECT)
)
# Connection options that name no end-to-end field.
_USUAL_OPTIONS = HOP_BY_HOP | {b"close", b""}


# What a head's fields say about its body and its connection, as _framing
# returns it: a plain tuple (a NamedTuple's __new__ is one more Python call
# per head) of
#   hosts: int, the number of Host fields;
#   content_length: int | None;
#   chunked: bool;
#   options: tuple[bytes, ...], the Connection options, lower-cased;
#   upgrade: bool;
#   expect_continue: bool;
#   forward: list[tuple[bytes, bytes]], the end-to-end fields.
_Framing = tuple[int, int | None, bool, tuple[bytes, ...], bool, bool,
                 list[tuple[bytes, bytes]]]


def _framing(fields: list[tuple[bytes, bytes]], version: bytes, bad: int) -> _Framing:
    """Read the fields that decide framing, and find the end-to-end ones.

    :param bad: the status of a refusal (400 for requests, 502 for responses).
    :raises ParseError: an invalid or repeated Content-Length, or a transfer
        coding other than chunked.
    """
    hosts = lengths = codings = 0
    length = coding = b""
    options: tuple[bytes, ...] = ()
    upgrade = expect_continue = False
    kinds = _FIELDS
    forward = []
    for field in fields:
        name, value = field
        kind = kinds.get(name.lower())
        if kind is None:
            forward.append(field)
            continue
        if kind is _HOST:
            hosts += 1
            forward.append(field)
        elif kind is _HOP:
            pass
        elif kind is _CONTENT_LENGTH:
            lengths += 1
            length = value
        elif kind is _TRANSFER_ENCODING:
            codings += 1
            coding = value
        elif kind is _CONNECTION:
            # RFC 9110 §7.6.1: Connection = #connection-option, case-insensitive.
            value = value.lower()
            if b"," in value:
                options += tuple([option.strip(b" \t") for option in value.split(b",")])
            else:
                options += (value.strip(b" \t"),)
        elif kind is _UPGRADE:
            upgrade = True
        else:
            forward.append(field)
            if value.lower() == b"100-continue":
                expect_continue = True
    # RFC 9112 §6.3: "If a message is received without Transfer-Encoding and with
    # either multiple Content-Length header fields having differing field-values
    # or a single Content-Length header field having an invalid value, then the
    # message framing is invalid". Equal repeats are refused too: llhttp never
    # accepts them.
    content_length = None
    if lengths:
        if lengths > 1:
            raise ParseError(bad, "multiple Content-Length fields")
        if not length.isdigit() or len(length) > _MAX_LENGTH_DIGITS:
            raise ParseError(bad, "invalid Content-Length")
        content_length = int(length)
    if codings:
        if codings > 1 or coding.lower() != b"chunked":
            raise ParseError(bad, "unsupported Transfer-Encoding")
        # §6.1: "A server or client that receives an HTTP/1.0 message containing
        # a Transfer-Encoding header field MUST treat the message as if the
        # framing is faulty".
        if version == b"1.0":
            raise ParseError(bad, "Transfer-Encoding in HTTP/1.0")
    if options and not _USUAL_OPTIONS.issuperset(options):
        # Connection names end-to-end fields as this hop's: they go no further.
        forward = [f for f in forward if f[0].lower() not in options]
    return hosts, content_length, bool(codings), options, upgrade, expect_continue, forward


def _keep_alive(options: tuple[bytes, ...], version: bytes) -> bool:
    # RFC 9112 §9.3: "close" ends the connection; HTTP/1.1 persists by default,
    # HTTP/1.0 only with the "keep-alive" option.
    if b"close" in options:
        return False
    return version == b"1.1" or b"keep-alive" in options


def _request_head(
    line: tuple[bytes, bytes, bytes],
    fields: list[tuple[bytes, bytes]],
    max_body: int | None,
) -> RequestHead:
    """Decide framing and the connection for a request head a reader accepted."""
    method, target, version = line
    hosts, length, chunked, options, upgrade, expect_continue, forward = _framing(
        fields, version, 400)
    # RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to
    # any HTTP/1.1 request message that lacks a Host header field and to any
    # request message that contains more than one Host header field line".
    if hosts > 1 or (not hosts and version == b"1.1"):
        raise ParseError(400, "missing or repeated Host")
    if upgrade and b"upgrade" in options:
        raise ParseError(501, "Upgrade is not supported")
    if chunked:
        close_after = length is not None
        length = None
    else:
        close_after = False
        if length is not None and max_body is not None and length > max_body:
            raise ParseError(413, "body larger than max_body")
    return RequestHead(
        method,
        target,
        version,
        fields,
        length,
        chunked,
        _keep_alive(options, version),
        # RFC 9110 §10.1.1: "A server that receives a 100-continue expectation in
        # an HTTP/1.0 request MUST ignore that expectation."
        expect_continue and version == b"1.1",
        close_after,
        forward,
    )


class _Frame(enum.Enum):
    """How a response body is delimited."""

    NONE = enum.auto()
    LENGTH = enum.auto()
    CHUNKED = enum.auto()
    UNTIL_CLOSE = enum.auto()


_NO_BODY, _LENGTH, _CHUNKED, _UNTIL_CLOSE = _Frame  # see _HOST


def _response_head(
    line: tuple[bytes, int, bytes],
    fields: list[tuple[bytes, bytes]],
    method: bytes,
) -> tuple[ResponseHead, _Frame]:
    """Decide framing for a response head a reader accepted."""
    version, status, reason = line
    # RFC 9110 §15: "Values outside the range 100..599 are invalid."
    if not 100 <= status <= 599:
        raise ParseError(502, "invalid status code")
    if status == 101:
        # No Upgrade request is forwarded, so no switch can have been agreed.
        raise ParseError(502, "unexpected 101 Switching Protocols")
    _, length, chunked, options, _, _, forward = _framing(fields, version, 502)
    keep_alive = _keep_alive(options, version)
    # RFC 9112 §6.3, in order: HEAD, 1xx, 204 and 304 have no content; then
    # chunked; then Content-Length; else the body runs until the connection closes.
    if status < 200 or status == 204 or status == 304 or method == b"HEAD":
        frame = _NO_BODY
    elif chunked:
        frame = _CHUNKED
    elif length is None:
        frame = _UNTIL_CLOSE
        keep_alive = False
    else:
        frame = _LENGTH if length else _NO_BODY
    if chunked:
        # §6.1: with Content-Length as well, "close the connection after".
        keep_alive = keep_alive and length is None
        length = None
    response = ResponseHead(
        status,
        reason,
        version,
        fields,
        length,
        frame is _CHUNKED,
        keep_alive,
        status < 200,
        forward,
    )
    return response, frame


# --- bodies --------------------------------------------------------------------------


class _LengthBody:
    """A body of a known length."""

    __slots__ = ("left",)

    def __init__(self, length: int) -> None:
        self.left = length

    def __repr__(self) -> str:
        return f"<body left={self.left}>"

    @property
    def done(self) -> bool:
        return not self.left

    def read(self, buf: bytes, pos: int, events: list) -> int:
        take = min(self.left, len(buf) - pos)
        events.append(Body(buf[pos : pos + take]))
        self.left -= take
        return pos + take


class _UntilClose:
    """A response body that ends when the connection does."""

    __slots__ = ()
    done = False

    def __repr__(self) -> str:
        return "<body until close>"

    def read(self, buf: bytes, pos: int, events: list) -> int:
        events.append(Body(buf[pos:]))
        return len(buf)


class _Chunk(enum.Enum):
    SIZE = enum.auto()  # expecting a chunk-size line
    DATA = enum.auto()  # inside chunk-data
    DATA_END = enum.auto()  # expecting the CRLF after chunk-data
    TRAILER = enum.auto()  # expecting a trailer field line or the final CRLF
    DONE = enum.auto()


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = _Chunk  # see _HOST


class _ChunkedBody:
    """De-chunks a body (RFC 9112 §7.1); trailer fields are checked and dropped.

    As strict as llhttp: no whitespace around the chunk size, at most 16 hex
    digits. Extensions are ignored once known to hold no control character.

    :param max_body: the cap on the de-chunked total (None: none).
    :param max_trailers: the cap on the trailer section, its last CRLF included.
    :param bad: the status of a malformed body.
    :param body_too_large: the status of a body over ``max_body``.
    :param trailers_too_large: the status of a trailer section over its cap.
    """

    __slots__ = (
        "_bad",
        "_body_too_large",
        "_left",
        "_max_body",
        "_room",
        "_state",
        "_total",
        "_trailers_too_large",
    )

    def __init__(
        self,
        max_body: int | None,
        max_trailers: int,
        *,
        bad: int,
        body_too_large: int,
        trailers_too_large: int,
    ) -> None:
        self._max_body = max_body
        self._room = max_trailers
        self._bad = bad
        self._body_too_large = body_too_large
        self._trailers_too_large = trailers_too_large
        self._state = _SIZE
        self._left = 0
        self._total = 0

    def __repr__(self) -> str:
        return f"<chunked body {self._state.name} left={self._left} total={self._total}>"

    @property
    def done(self) -> bool:
        return self._state is _DONE

    def read(self, buf: bytes, pos: int, events: list) -> int:
        n = len(buf)
        while pos < n:
            state = self._state
            if state is _DATA:
                take = min(self._left, n - pos)
                events.append(Body(buf[pos : pos + take]))
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
            elif state is _DATA_END:
                if n - pos < 2:
                    return pos
                if buf[pos : pos + 2] != b"\r\n":
                    raise ParseError(self._bad, "no CRLF after chunk data")
                pos += 2
                self._state = _SIZE
            elif state is _SIZE:
                # A line of at most MAX_CHUNK_LINE bytes has its CRLF within that + 2.
                eol = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE + 2)
                if eol < 0:
                    if n - pos < MAX_CHUNK_LINE + 2:
                        return pos
                    raise ParseError(self._bad, "chunk-size line too long")
                self._size_line(buf[pos:eol])
                pos = eol + 2
            else:
                # The trailer section must fit in what is left of its room.
                eol = buf.find(b"\r\n", pos, pos + self._room)
                if eol < 0:
                    if n - pos < self._room:
                        return pos
                    raise ParseError(self._trailers_too_large, "trailer section too large")
                self._room -= eol + 2 - pos
                if eol == pos:
                    self._state = _DONE
                    return pos + 2
                self._trailer_line(buf[pos:eol])
                pos = eol + 2
        return pos

    def _size_line(self, line: bytes) -> None:
        # chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF; chunk-size = 1*HEXDIG
        semi = line.find(b";")
        size = line if semi < 0 else line[:semi]
        if not size or len(size) > 16 or size.translate(None, _HEXDIG):
            raise ParseError(self._bad, "invalid chunk size")
        if semi >= 0 and len(line.translate(None, _CTL)) != len(line):
            raise ParseError(self._bad, "invalid chunk extension")
        value = int(size, 16)
        if not value:
            self._state = _TRAILER
            return
        self._total += value
        if self._max_body is not None and self._total > self._max_body:
            raise ParseError(self._body_too_large, "body larger than max_body")
        self._left = value
        self._state = _DATA

    def _trailer_line(self, line: bytes) -> None:
        # trailer-section = *( field-line CRLF ); a line that starts with
        # whitespace (obs-fold) has no token before its colon and is refused.
        name, colon, value = line.partition(b":")
        if not colon or not _is_token(name) or len(value.translate(None, _CTL)) != len(value):
            raise ParseError(self._bad, "invalid trailer field")


_BodyReader = _LengthBody | _ChunkedBody | _UntilClose


# --- the stream: heads cut out, bodies framed ---------------------------------------


class _MessageStream:
    """What request and response parsers share: cutting heads, framing bodies.

    Subclasses read a head (``_start``) and end a message (``_finish``), and
    say whether the connection ends there; bytes after that are never parsed.
    """

    # The statuses of refusals: a malformed head, a head over the cap.
    _BAD = 400
    _HEAD_TOO_LARGE = 431

    def __init__(self, max_header_bytes: int) -> None:
        self._max_header_bytes = max_header_bytes
        self._pending: bytearray | None = None  # bytes held back until more arrive
        self._scanned = 0  # how much of a pending partial head was searched
        self._body: _BodyReader | None = None
        self._closed = False
        self._error: ParseError | None = None

    def __repr__(self) -> str:
        if self._error is not None:
            state = f"failed({self._error})"
        elif self._closed:
            state = "closed"
        else:
            state = repr(self._body) if self._body is not None else "head"
        pending = len(self._pending) if self._pending is not None else 0
        return f"<{type(self).__name__} {state} pending={pending}>"

    def _feed(self, data: bytes) -> list:
        if self._error is not None:
            raise self._error
        events: list = []
        if not self._closed and data:
            try:
                self._run(data, events)
            except ParseError as exc:
                self._error = exc
                raise
        return events

    def _run(self, data: bytes, events: list) -> None:
        buf: bytes
        end = -1
        pending = self._pending
        if pending is not None:
            pending += data
            if self._body is None:
                end = self._head_end(pending, 0, self._scanned)
                if end < 0:
                    self._scanned = len(pending)
                    return
            buf = bytes(pending)
            self._pending = None
        else:
            buf = data
        pos = 0
        n = len(buf)
        while pos < n:
            body = self._body
            if body is None:
                if end < 0:
                    end = self._head_end(buf, pos, pos)
                    if end < 0:
                        self._pending = bytearray(buf[pos:])
                        self._scanned = n - pos
                        return
                self._body = self._start(buf[pos:end], events)
                pos = end
                end = -1
                if self._closed:
                    return
                continue
            pos = body.read(buf, pos, events)
            if not body.done:
                if pos < n:
                    self._pending = bytearray(buf[pos:])
                return
            self._body = None
            self._finish(events)
            if self._closed:
                return

    def _head_end(self, buf: bytes | bytearray, start: int, checked: int) -> int:
        """Where the head from ``start`` ends (just after CRLF CRLF), or -1 for more.

        Bytes before ``checked`` were searched by an earlier call. A verdict
        depends on the bytes only, never on how they were split: a bare LF at
        offset ``i`` of the head is a 400 when ``i`` is within the cap, else
        the head is over the cap (431). In a whole head within the cap, bare LFs
        are left to the readers, which refuse them.
        """
        limit = self._max_header_bytes
        if buf[start] == 0x0D and buf[start + 1 : start + 2] == b"\n":
            # RFC 9112 §2.2 lets a server skip empty lines before a request line;
            # h11 refuses them, so they are refused.
            raise ParseError(self._BAD, "empty line before the start line")
        end = buf.find(b"\r\n\r\n", max(start, checked - 3))
        if end >= 0:
            if end + 4 - start <= limit:
                return end + 4  # the start line is checked whole, by _start
            self._check_start(buf, start)
            self._refuse_bare_lf(buf, start, start, start + limit)
            raise ParseError(self._HEAD_TOO_LARGE, "header block too large")
        self._check_start(buf, start)
        self._refuse_bare_lf(buf, start, checked, len(buf))
        if len(buf) - start > limit:
            raise ParseError(self._HEAD_TOO_LARGE, "header block too large")
        return -1

    def _check_start(self, buf: bytes | bytearray, start: int) -> None:
        """Refuse a head not yet whole (or over the cap) whose first bytes can
        start no message, so garbage (a TLS ClientHello) is refused at once
        rather than waited on. Only verdicts the whole head would get too."""

    def _refuse_bare_lf(self, buf: bytes | bytearray, start: int, lo: int, hi: int) -> None:
        """Refuse a LF not after a CR in ``buf[lo:hi]`` if it is within the cap."""
        # RFC 9112 §2.2: "a recipient MAY recognize a single LF as a line
        # terminator"; llhttp does not.
        if buf.count(b"\n", lo, hi) == buf.count(b"\r\n", max(start, lo - 1), hi):
            return
        lf = buf.find(b"\n", lo, hi)
        while lf > start and buf[lf - 1] == 0x0D:
            lf = buf.find(b"\n", lf + 1, hi)
        if lf - start < self._max_header_bytes:
            raise ParseError(self._BAD, "bare LF in head")

    def _start(self, head: bytes, events: list) -> _BodyReader | None:
        """Read a head and append its event; return the reader of its body.

        None when no body follows: the message is then finished already (or,
        after a 1xx head, another head follows).
        """
        raise NotImplementedError

    def _finish(self, events: list) -> None:
        """End the current message (``_closed`` when the connection ends too)."""
        raise NotImplementedError


class BaseRequestParser(_MessageStream):
    """Parses the requests of one client connection.

    :param max_header_bytes: the largest head (request line, fields and the
        empty line) accepted; a larger one is refused with 431.
    :param max_body: the largest body accepted (None: no cap); a larger one is
        refused with 413, at the head when Content-Length announces it, else
        when the de-chunked total passes the cap.
    """

    def __init__(self, *, max_header_bytes: int = 65536, max_body: int | None = None) -> None:
        super().__init__(max_header_bytes)
        self._max_body = max_body
        self._last = False  # the current request ends the connection

    def feed(self, data: bytes) -> list[RequestEvent]:
        """Parse received bytes; return the events they complete, in order.

        Several requests may complete at once (pipelining). Bytes after a
        request that ends the connection (``close_after``, or ``keep_alive``
        False) are not parsed: no event comes of them. Events completed
        earlier in the same call are lost when it raises.

        :raises ParseError: the request is refused; later calls raise it again.
        """
        return self._feed(data)

    def eof(self) -> None:
        """The client closed its side.

        :raises ParseError: 400 when a request was partly received.
        """
        if self._error is None and not self._closed:
            if self._pending is not None or self._body is not None:
                raise ParseError(400, "truncated request")

    def _check_start(self, buf: bytes | bytearray, start: int) -> None:
        # The method is the bytes before the first SP; _split_request_line
        # refuses a method that is not a token with 400, whatever follows.
        method = _METHOD_PREFIX.match(buf, start)
        assert method is not None
        if method.group().translate(None, _TCHAR):
            raise ParseError(400, "invalid method")

    def _start(self, head: bytes, events: list) -> _BodyReader | None:
        # The request line first: a 501 for its method precedes any 400 for the fields.
        line = _split_request_line(head)
        request = _request_head(line, self._read_fields(head), self._max_body)
        request.raw = head
        events.append(request)
        self._last = request.close_after or not request.keep_alive
        if request.chunked:
            return _ChunkedBody(
                self._max_body,
                self._max_header_bytes,
                bad=400,
                body_too_large=413,
                trailers_too_large=431,
            )
        if request.content_length:
            return _LengthBody(request.content_length)
        self._finish(events)
        return None

    def _finish(self, events: list) -> None:
        events.append(END)
        self._closed = self._last

    def _read_fields(self, head: bytes) -> list[tuple[bytes, bytes]]:
        """Check a head's syntax; return its fields (names as sent, values stripped).

        :raises ParseError: 400 for a head the library refuses.
        """
        raise NotImplementedError


class BaseResponseParser(_MessageStream):
    """Parses the responses the primary sends on one connection.

    :param max_header_bytes: the largest head accepted; a larger one is a 502.
    """

    _BAD = 502
    _HEAD_TOO_LARGE = 502

    def __init__(self, *, max_header_bytes: int = 65536) -> None:
        super().__init__(max_header_bytes)
        self._methods: collections.deque[bytes] = collections.deque()
        self._keep_alive = True

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]} awaiting={len(self._methods)}>"

    def expect(self, method: bytes) -> None:
        """Note that a request was sent (once per request, in order; HEAD: no body)."""
        self._methods.append(method)

    def feed(self, data: bytes) -> list[ResponseEvent]:
        """Parse received bytes; return the events they complete, in order.

        Bytes after a response that ends the connection are not parsed. Events
        completed earlier in the same call are lost when it raises.

        :raises ParseError: 502; later calls raise it again.
        """
        return self._feed(data)

    def eof(self) -> list[ResponseEvent]:
        """The primary closed its side: ends a body that runs until the close.

        :raises ParseError: 502 when a response was cut short or never came.
        """
        if self._error is not None or self._closed:
            return []
        if isinstance(self._body, _UntilClose):
            self._body = None
            self._closed = True
            return [END]
        if self._pending is not None or self._body is not None:
            raise ParseError(502, "truncated response")
        if self._methods:
            raise ParseError(502, "closed before a response")
        return []

    def _start(self, head: bytes, events: list) -> _BodyReader | None:
        if not self._methods:
            raise ParseError(502, "response without a request")
        line = _split_status_line(head)
        response, frame = _response_head(line, self._read_fields(head), self._methods[0])
        events.append(response)
        if response.informational:
            return None
        self._methods.popleft()
        self._keep_alive = response.keep_alive
        if frame is _LENGTH:
            return _LengthBody(response.content_length or 0)
        if frame is _CHUNKED:
            return _ChunkedBody(
                None, self._max_header_bytes, bad=502, body_too_large=502, trailers_too_large=502
            )
        if frame is _UNTIL_CLOSE:
            return _UntilClose()
        self._finish(events)
        return None

    def _finish(self, events: list) -> None:
        events.append(END)
        self._closed = not self._keep_alive

    def _read_fields(self, head: bytes) -> list[tuple[bytes, bytes]]:
        """Check a head's syntax; return its fields (names as sent, values stripped).

        :raises ParseError: 502 for a head the library refuses.
        """
        raise NotImplementedError


# --- llhttp (httptools): the hot path ------------------------------------------------


class _FieldSink:
    """The callbacks httptools calls while llhttp reads one head."""

    __slots__ = ("complete", "fields")

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops the whitespace before a value but keeps what follows it.
        self.fields.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True


class _Llhttp:
    """Reads one head at a time with a fresh llhttp parser.

    What llhttp does after the head (its framing checks, a pause for Upgrade)
    does not matter: framing is decided by the shared code.
    """

    __slots__ = ("_make", "_reason", "_sink", "_status")

    def __init__(self, make: Callable[[_FieldSink], HttpParser], status: int, reason: str) -> None:
        self._make = make
        self._status = status
        self._reason = reason
        self._sink = _FieldSink()

    def fields(self, head: bytes) -> list[tuple[bytes, bytes]]:
        fields: list[tuple[bytes, bytes]] = []
        sink = self._sink
        sink.fields = fields
        sink.complete = False
        try:
            self._make(sink).feed_data(head)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            if not sink.complete:
                return self._lenient(head)
        return fields

    def _lenient(self, head: bytes) -> list[tuple[bytes, bytes]]:
        # llhttp refuses Content-Length with Transfer-Encoding outright; the
        # shared rules accept it (RFC 9112 §6.1): ask again with that one check
        # off, so that only a head refused for another reason is malformed.
        fields: list[tuple[bytes, bytes]] = []
        sink = self._sink
        sink.fields = fields
        sink.complete = False
        parser = self._make(sink)
        parser.set_dangerous_leniencies(lenient_chunked_length=True)
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as exc:
            if not sink.complete:
                raise ParseError(self._status, self._reason) from exc
        return fields


class HttptoolsRequestParser(BaseRequestParser):
    """Requests, with heads read by llhttp (httptools)."""

    def __init__(self, *, max_header_bytes: int = 65536, max_body: int | None = None) -> None:
        if httptools is None:
            raise RuntimeError("httptools is not installed")
        super().__init__(max_header_bytes=max_header_bytes, max_body=max_body)
        self._llhttp = _Llhttp(httptools.HttpRequestParser, 400, "malformed request head")

    def _read_fields(self, head: bytes) -> list[tuple[bytes, bytes]]:
        return self._llhttp.fields(head)


class HttptoolsResponseParser(BaseResponseParser):
    """Responses, with heads read by llhttp (httptools)."""

    def __init__(self, *, max_header_bytes: int = 65536) -> None:
        if httptools is None:
            raise RuntimeError("httptools is not installed")
        super().__init__(max_header_bytes=max_header_bytes)
        self._llhttp = _Llhttp(httptools.HttpResponseParser, 502, "malformed response head")

    def _read_fields(self, head: bytes) -> list[tuple[bytes, bytes]]:
        return self._llhttp.fields(head)


# --- h11: the reference ------------------------------------------------------------


def _h11_fields(conn: h11.Connection, head: bytes, status: int) -> list[tuple[bytes, bytes]]:
    """Have h11 read one head, after the checks it leaves out; return its fields."""
    reason = "malformed request head" if status == 400 else "malformed response head"
    fields = head[head.find(b"\r\n") : -2]
    # h11 takes a bare LF as a line end, joins obsolete line folding (RFC 9112
    # §5.2: a server "MUST either reject the message by sending a 400" or replace
    # it) and accepts control characters in values; llhttp refuses all three.
    if (
        head.count(b"\n") != head.count(b"\r\n")
        or b"\r\n " in fields
        or b"\r\n\t" in fields
        or len(fields.translate(None, _CTL)) != len(fields)
    ):
        raise ParseError(status, reason)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise ParseError(status, reason) from exc
    if not isinstance(event, h11.Request | h11.Response | h11.InformationalResponse):
        raise ParseError(status, reason)
    # h11 lower-cases names, rewrites some values and drops repeated
    # Content-Length fields: the fields are cut from the lines it accepted.
    result = []
    for line in fields[2:-2].split(b"\r\n") if len(fields) > 2 else ():
        name, _, value = line.partition(b":")
        result.append((name, value.strip(b" \t")))
    return result


class H11RequestParser(BaseRequestParser):
    """Requests, with heads read by h11."""

    def _read_fields(self, head: bytes) -> list[tuple[bytes, bytes]]:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head))
        return _h11_fields(conn, head, 400)


class H11ResponseParser(BaseResponseParser):
    """Responses, with heads read by h11."""

    def _read_fields(self, head: bytes) -> list[tuple[bytes, bytes]]:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=len(head))
        # h11 reads a response only after a request; heads alone are read here.
        conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"primary")]))
        conn.send(h11.EndOfMessage())
        return _h11_fields(conn, head, 502)


RequestParser: type[BaseRequestParser]
ResponseParser: type[BaseResponseParser]
IMPLEMENTATION: str
# MIRRORGATE_HTTP_PARSER=h11 runs the pure-Python reference where httptools is
# installed too (to compare, or to rule the C parser out when chasing a bug).
if httptools is not None and os.environ.get("MIRRORGATE_HTTP_PARSER", "") != "h11":
    RequestParser, ResponseParser = HttptoolsRequestParser, HttptoolsResponseParser
    IMPLEMENTATION = "httptools"
else:
    RequestParser, ResponseParser = H11RequestParser, H11ResponseParser
    IMPLEMENTATION = "h11"
