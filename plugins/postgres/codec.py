# The Postgres wire protocol v3 codec, sans-IO: the untyped initial packet
# (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest), a frame reader
# that finds typed-frame boundaries in a byte stream, lazy decoders for the few
# message bodies a mirroring decision needs, and builders for the messages the
# gateway writes itself.
#
# It owns byte layouts and size caps. It must not know about sockets, asyncio or
# anyio, sessions, mirrors, configuration or authentication policy: callers
# decide what to do with what it decodes (refusing replication, answering an
# SSLRequest, which size limit applies).
#
# Quotes are from the PostgreSQL documentation, "Frontend/Backend Protocol",
# sections "Message Flow" and "Message Formats".
from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence

import attrs

Buffer = bytes | bytearray | memoryview

# "The most significant 16 bits are the major version number. The least
# significant 16 bits are the minor version number. As an example protocol
# version 3.2 is represented as 196610 in decimal."
PROTOCOL_3_0 = 196608
PROTOCOL_3_2 = 196610
# "The value is chosen to contain 1234 in the most significant 16 bits, and 5679
# in the least significant 16 bits." (5680 for GSSENCRequest, 5678 for CancelRequest)
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
# The server's own cap on the initial packet (MAX_STARTUP_PACKET_LENGTH in pqcomm.h).
MAX_STARTUP_PACKET = 10000
# The absolute cap on a typed message body: the server's MaxAllocSize is 1 GiB - 1.
MAX_MESSAGE = 1 << 30
# BackendKeyData: "The minimum and maximum key length are 4 and 256 bytes, respectively."
MIN_CANCEL_KEY = 4
MAX_CANCEL_KEY = 256

_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_HEADER = struct.Struct("!Bi")  # type byte, Int32 length
_PAIR = struct.Struct("!ii")


class ProtocolViolation(Exception):
    """The peer sent bytes that break the protocol; the session must end.

    :param message: what was wrong, for the log and for the ErrorResponse.
    :param sqlstate: the SQLSTATE to report (08P01 protocol_violation by default).
    """

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class MessageTooLarge(ProtocolViolation):
    """A frame header announced a body larger than the caller's limit.

    :param size: the announced body size in bytes.
    :param limit: the largest body accepted.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class FrontendType(enum.IntEnum):
    """Type bytes of the messages a client sends (they differ by direction)."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    PASSWORD = ord("p")  # also SASLInitialResponse, SASLResponse, GSSResponse
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class BackendType(enum.IntEnum):
    """Type bytes of the messages a server sends."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_BOTH_RESPONSE = ord("W")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


class TransactionStatus(bytes, enum.Enum):
    """ReadyForQuery's status byte; members are 1-byte ``bytes`` (``IDLE == b"I"``)."""

    IDLE = b"I"
    IN_TRANSACTION = b"T"
    FAILED = b"E"


# --- the initial packet --------------------------------------------------------


@attrs.frozen
class SSLRequest:
    """The client asks for TLS; the answer is one unframed byte, ``N`` or ``S``."""


@attrs.frozen
class GSSENCRequest:
    """The client asks for GSSAPI encryption; the answer is one unframed byte."""


@attrs.frozen(repr=False)
class CancelRequest:
    """A request, on a fresh connection, to cancel the query of another backend.

    :param pid: the process ID of the target backend.
    :param key: its secret key, 4 to 256 bytes (4 before protocol 3.2).
    """

    pid: int
    key: bytes

    def __repr__(self) -> str:
        # The key is a secret: never log it.
        return f"CancelRequest(pid={self.pid}, key=<{len(self.key)} bytes>)"


@attrs.frozen
class StartupMessage:
    """The client's StartupMessage, decoded, with its exact bytes.

    :param version: the protocol version (``major << 16 | minor``), any 3.x.
    :param params: parameter names and values, in the order sent (last one wins).
    :param raw: the exact packet bytes, length word included, to relay unchanged.
    """

    version: int
    params: dict[str, str]
    raw: bytes = attrs.field(repr=lambda raw: f"<{len(raw)} bytes>")

    @property
    def user(self) -> str:
        """The ``user`` parameter, always present and non-empty."""
        return self.params["user"]

    @property
    def database(self) -> str:
        """The ``database`` parameter, which "Defaults to the user name"."""
        return self.params.get("database") or self.params["user"]


InitialPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_initial_packet(buf: Buffer) -> tuple[InitialPacket | None, int]:
    """Decode the first packet of a client connection, which has no type byte.

    "For historical reasons, the very first message sent by the client (the
    startup message) has no initial message-type byte."

    :param buf: the bytes received so far on the connection.
    :returns: ``(None, 0)`` while the packet is incomplete, else
        ``(packet, consumed)``; bytes after ``consumed`` belong to what follows.
    :raises ProtocolViolation: for a bad length (checked as soon as the length
        word is in), an unknown request code, a malformed parameter list, or
        text that is not UTF-8; sqlstate 0A000 for an unsupported protocol
        version, 28000 when no user name is given.
    """
    if len(buf) < 4:
        return None, 0
    # "Int32 Length of message contents in bytes, including self."
    (length,) = _INT32.unpack_from(buf, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")
    if len(buf) < length:
        return None, 0
    (code,) = _INT32.unpack_from(buf, 4)
    if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
        # SSLRequest / GSSENCRequest: "Int32(8) Length of message contents in bytes,
        # including self." Nothing else may ride in the same packet.
        if length != 8:
            raise ProtocolViolation(f"invalid length of encryption request packet: {length}")
        return (SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()), 8
    if code == CANCEL_REQUEST_CODE:
        # CancelRequest: "Int32 The process ID of the target backend." then "Byten
        # The secret key for the target backend. This field extends to the end of
        # the message, indicated by the length field. The maximum key length is
        # 256 bytes."
        key_length = length - 12
        if not MIN_CANCEL_KEY <= key_length <= MAX_CANCEL_KEY:
            raise ProtocolViolation(f"invalid length of cancel request packet: {length}")
        (pid,) = _INT32.unpack_from(buf, 8)
        return CancelRequest(pid=pid, key=bytes(buf[12:length])), length
    major, minor = code >> 16 & 0xFFFF, code & 0xFFFF
    if major != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{minor}: only protocol 3 is supported",
            sqlstate="0A000",
        )
    raw = bytes(buf[:length])
    return StartupMessage(version=code, params=_startup_params(raw), raw=raw), length


def _startup_params(raw: bytes) -> dict[str, str]:
    # "The protocol version number is followed by one or more pairs of parameter
    # name and value strings. A zero byte is required as a terminator after the
    # last name/value pair."
    params: dict[str, str] = {}
    pos, end = 8, len(raw)
    while pos < end and raw[pos] != 0:
        name_end = raw.find(b"\0", pos)
        value_end = raw.find(b"\0", name_end + 1) if name_end >= 0 else -1
        if value_end < 0:
            raise ProtocolViolation("invalid startup packet layout: unterminated parameter")
        try:
            name = raw[pos:name_end].decode()
            params[name] = raw[name_end + 1 : value_end].decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("invalid startup packet: parameter is not UTF-8") from None
        pos = value_end + 1
    if pos != end - 1:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    # "user: The database user name to connect as. Required; there is no default."
    if not params.get("user"):
        raise ProtocolViolation(
            "no PostgreSQL user name specified in startup packet", sqlstate="28000"
        )
    return params


# --- typed frames ----------------------------------------------------------------


class FrameReader:
    """Splits one direction of a connection into typed frames, sans-IO.

    "The first byte of a message identifies the message type, and the next four
    bytes specify the length of the rest of the message (this length count
    includes itself, but not the message-type byte)."

    Frames come out as fresh ``bytes`` (never views of the buffer, which would
    pin it against resizing). The buffer is a bytearray with a read offset,
    compacted only when the consumed prefix is large.

    :param max_message: the largest body (length word minus 4) accepted, at most
        ``MAX_MESSAGE``.
    :raises ValueError: if ``max_message`` is out of range.
    """

    __slots__ = ("_buf", "_pos", "max_message")

    _COMPACT_AT = 64 * 1024

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        if not 0 <= max_message <= MAX_MESSAGE:
            raise ValueError(f"max_message must be between 0 and {MAX_MESSAGE}")
        self.max_message = max_message
        self._buf = bytearray()
        self._pos = 0

    def __repr__(self) -> str:
        return f"<FrameReader buffered={self.buffered} max_message={self.max_message}>"

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: Buffer) -> None:
        """Append received bytes.

        :param data: the bytes, in order of arrival.
        """
        pos = self._pos
        if pos:
            if pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
            elif pos >= self._COMPACT_AT and pos * 2 >= len(self._buf):
                del self._buf[:pos]
                self._pos = 0
        self._buf += data

    def peek_type(self) -> int | None:
        """The type byte of the next frame, if any byte of it is buffered."""
        return self._buf[self._pos] if len(self._buf) > self._pos else None

    def take_buffered(self) -> bytes:
        """Remove and return every buffered byte (for a hand-over, e.g. to TLS).

        :returns: the unconsumed bytes, possibly empty.
        """
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def _frame_end(self) -> int:
        # The end offset of the next complete frame, or -1 if it is not all in.
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            return -1
        _, length = _HEADER.unpack_from(buf, pos)
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length}")
        if length - 4 > self.max_message:
            raise MessageTooLarge(length - 4, self.max_message)
        end = pos + 1 + length
        return end if len(buf) >= end else -1

    def next_frame(self) -> tuple[int, bytes] | None:
        """Take the next complete frame.

        :returns: ``(type byte, body)`` or None until a whole frame is buffered.
        :raises MessageTooLarge: as soon as a header announces a body over the limit.
        :raises ProtocolViolation: for a length word below 4.
        """
        end = self._frame_end()
        if end < 0:
            return None
        start = self._pos
        self._pos = end
        with memoryview(self._buf) as view:
            body = bytes(view[start + 5 : end])
        return self._buf[start], body

    def next_raw(self) -> bytes | None:
        """Take the next complete frame as its exact bytes (type, length, body).

        ``raw[0]`` is the type byte and ``memoryview(raw)[5:]`` the body, which
        every decoder here accepts without a copy.

        :returns: the frame bytes or None until a whole frame is buffered.
        :raises MessageTooLarge: as soon as a header announces a body over the limit.
        :raises ProtocolViolation: for a length word below 4.
        """
        end = self._frame_end()
        if end < 0:
            return None
        start = self._pos
        self._pos = end
        return bytes(self._buf[start:end])


# --- decoders: only what a decision needs, without decoding the rest -------------


def _cstring(body: Buffer, start: int) -> tuple[bytes, int]:
    # A protocol String: "A null-terminated string (C-style string)."
    # Returns the string without its NUL and the offset just past the NUL.
    if isinstance(body, memoryview):
        # memoryview has no find(): look in growing windows, so that a short
        # name in a long message costs one small copy.
        window = 128
        while True:
            chunk = body[start : start + window].tobytes()
            end = chunk.find(b"\0")
            if end >= 0:
                return chunk[:end], start + end + 1
            if start + window >= len(body):
                raise ProtocolViolation("unterminated string in message")
            window *= 4
    end = body.find(b"\0", start)
    if end < 0:
        raise ProtocolViolation("unterminated string in message")
    return bytes(body[start:end]), end + 1


def ready_status(body: Buffer) -> TransactionStatus:
    """The transaction status of a ReadyForQuery ('Z') body.

    "Byte1 Current backend transaction status indicator. Possible values are 'I'
    if idle (not in a transaction block); 'T' if in a transaction block; or 'E' if
    in a failed transaction block (queries will be rejected until block is ended)."

    :param body: the message body.
    :returns: a TransactionStatus, which compares equal to ``b"I"``, ``b"T"``, ``b"E"``.
    :raises ProtocolViolation: for any other body.
    """
    try:
        if len(body) == 1:
            return TransactionStatus(bytes(body))
    except ValueError:
        pass
    raise ProtocolViolation(f"invalid ReadyForQuery body {bytes(body[:8])!r}")


def statement_name_of_parse(body: Buffer) -> bytes:
    """The prepared statement a Parse ('P') creates; ``b""`` is the unnamed one.

    "String The name of the destination prepared statement (an empty string
    selects the unnamed prepared statement)."

    :param body: the message body.
    :raises ProtocolViolation: if the name is not terminated.
    """
    return _cstring(body, 0)[0]


def statement_name_of_bind(body: Buffer) -> bytes:
    """The prepared statement a Bind ('B') uses (its second string).

    "String The name of the destination portal (an empty string selects the
    unnamed portal)." then "String The name of the source prepared statement (an
    empty string selects the unnamed prepared statement)."

    :param body: the message body.
    :raises ProtocolViolation: if either name is not terminated.
    """
    _, pos = _cstring(body, 0)
    return _cstring(body, pos)[0]


def _target(body: Buffer, message: str) -> tuple[bytes, bytes]:
    # "Byte1 'S' to close a prepared statement; or 'P' to close a portal."
    kind = bytes(body[:1])
    if kind not in (b"S", b"P"):
        raise ProtocolViolation(f"invalid {message} target type {kind!r}")
    return kind, _cstring(body, 1)[0]


def close_target(body: Buffer) -> tuple[bytes, bytes]:
    """What a Close ('C' from the client) closes.

    :param body: the message body.
    :returns: ``(kind, name)`` with kind ``b"S"`` (statement) or ``b"P"`` (portal).
    :raises ProtocolViolation: for another kind or an unterminated name.
    """
    return _target(body, "Close")


def describe_target(body: Buffer) -> tuple[bytes, bytes]:
    """What a Describe ('D' from the client) describes.

    :param body: the message body.
    :returns: ``(kind, name)`` with kind ``b"S"`` (statement) or ``b"P"`` (portal).
    :raises ProtocolViolation: for another kind or an unterminated name.
    """
    return _target(body, "Describe")


def error_fields(body: Buffer) -> dict[str, str]:
    """The fields of an ErrorResponse ('E') or NoticeResponse ('N') body.

    "The message body consists of one or more identified fields, followed by a
    zero byte as a terminator." Each field is "Byte1 A code identifying the field
    type; if zero, this is the message terminator and no string follows." then
    "String The field value." Values are decoded as UTF-8 with replacement, since
    they are read for logs and outcomes only.

    :param body: the message body.
    :returns: field code (``"S"``, ``"V"``, ``"C"``, ``"M"``, ...) to value.
    :raises ProtocolViolation: for an unterminated field.
    """
    fields: dict[str, str] = {}
    data = bytes(body)
    pos = 0
    while pos < len(data) and data[pos] != 0:
        value, end = _cstring(data, pos + 1)
        fields[chr(data[pos])] = value.decode(errors="replace")
        pos = end
    return fields


def format_error(fields: Mapping[str, str]) -> str:
    """Render error fields as ``"SEVERITY SQLSTATE: message"`` (severity from 'S',
    else the never-localized 'V').

    :param fields: as returned by :func:`error_fields`.
    """
    severity = fields.get("S") or fields.get("V") or "ERROR"
    return f"{severity} {fields.get('C', '?????')}: {fields.get('M', '')}"


def authentication_request(body: Buffer) -> tuple[int, bytes]:
    """Split an Authentication* ('R') body.

    "Int32 Specifies that ..." (0 Ok, 3 cleartext, 5 MD5, 10 SASL, 11 SASL
    continue, 12 SASL final, ...) followed by method-specific data.

    :param body: the message body.
    :returns: ``(code, rest)``.
    :raises ProtocolViolation: if the body is shorter than 4 bytes.
    """
    if len(body) < 4:
        raise ProtocolViolation("invalid authentication request")
    return _INT32.unpack_from(body, 0)[0], bytes(body[4:])


def backend_key(body: Buffer) -> tuple[int, bytes]:
    """Decode a BackendKeyData ('K') body.

    "Int32 The process ID of this backend." then "Byten The secret key of this
    backend. This field extends to the end of the message, indicated by the
    length field. The minimum and maximum key length are 4 and 256 bytes."

    :param body: the message body.
    :returns: ``(pid, key)``.
    :raises ProtocolViolation: for a key outside 4..256 bytes.
    """
    if not MIN_CANCEL_KEY <= len(body) - 4 <= MAX_CANCEL_KEY:
        raise ProtocolViolation(f"invalid BackendKeyData length {len(body)}")
    return _INT32.unpack_from(body, 0)[0], bytes(body[4:])


# --- builders: each returns one complete frame -----------------------------------


def frame(type_byte: bytes, body: Buffer) -> bytes:
    """Frame a body: type byte, Int32 length (including itself), body.

    :param type_byte: one byte, e.g. ``b"Q"``.
    :param body: the message body.
    :raises ValueError: if type_byte is not one byte or the body exceeds MAX_MESSAGE.
    """
    if len(type_byte) != 1:
        raise ValueError("type_byte must be exactly one byte")
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"message body of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return b"".join((type_byte, _INT32.pack(len(body) + 4), body))


def _string(text: str | bytes) -> bytes:
    # A protocol String cannot hold a NUL: it would end the string early.
    data = text.encode() if isinstance(text, str) else text
    if b"\0" in data:
        raise ValueError("protocol strings cannot contain NUL bytes")
    return data + b"\0"


def _fields(
    severity: str, sqlstate: str, message: str, detail: str | None, hint: str | None
) -> bytes:
    # 'S' may be localized, 'V' is "identical to the S field except that the
    # contents are never localized"; modern servers send both.
    parts = [b"S", _string(severity), b"V", _string(severity), b"C", _string(sqlstate)]
    parts += [b"M", _string(message)]
    if detail is not None:
        parts += [b"D", _string(detail)]
    if hint is not None:
        parts += [b"H", _string(hint)]
    parts.append(b"\0")
    return b"".join(parts)


def error_response(
    sqlstate: str,
    message: str,
    severity: str = "FATAL",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An ErrorResponse ('E') with fields S, V, C, M and optionally D, H.

    :param sqlstate: the five-character SQLSTATE.
    :param message: the primary message.
    :param severity: ERROR, FATAL or PANIC.
    :param detail: optional detail line.
    :param hint: optional hint line.
    :raises ValueError: if a text contains a NUL byte.
    """
    return frame(b"E", _fields(severity, sqlstate, message, detail, hint))


def notice_response(
    sqlstate: str,
    message: str,
    severity: str = "NOTICE",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """A NoticeResponse ('N'), laid out like :func:`error_response`.

    :raises ValueError: if a text contains a NUL byte.
    """
    return frame(b"N", _fields(severity, sqlstate, message, detail, hint))


def startup_message(params: Mapping[str, str], version: int = PROTOCOL_3_0) -> bytes:
    """A StartupMessage (no type byte): length, version, name/value pairs, NUL.

    :param params: parameters in the order to send; ``user`` is required by servers.
    :param version: the protocol version.
    :raises ValueError: if a name or value contains a NUL byte or the packet is
        longer than MAX_STARTUP_PACKET.
    """
    body = b"".join(_string(k) + _string(v) for k, v in params.items()) + b"\0"
    length = len(body) + 8
    if length > MAX_STARTUP_PACKET:
        raise ValueError(f"startup packet of {length} bytes exceeds {MAX_STARTUP_PACKET}")
    return _PAIR.pack(length, version) + body


def cancel_request(pid: int, key: bytes) -> bytes:
    """A CancelRequest packet (no type byte), sent on a fresh connection.

    :param pid: the target backend's process ID.
    :param key: its secret key from BackendKeyData, 4 to 256 bytes.
    :raises ValueError: for a key of another length.
    """
    if not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
        raise ValueError(f"cancel key must be {MIN_CANCEL_KEY} to {MAX_CANCEL_KEY} bytes")
    return _PAIR.pack(12 + len(key), CANCEL_REQUEST_CODE) + _INT32.pack(pid) + key


def query(sql: str) -> bytes:
    """A simple Query ('Q'): "String The query string itself."

    :raises ValueError: if sql contains a NUL byte.
    """
    return frame(b"Q", _string(sql))


def parse(name: bytes, sql: bytes, param_types: Sequence[int] = ()) -> bytes:
    """A Parse ('P'): statement name, query, Int16 count, Int32 type OIDs.

    "Placing a zero here is equivalent to leaving the type unspecified."

    :param name: the statement name, ``b""`` for the unnamed statement.
    :param sql: the query text as sent by the client.
    :param param_types: parameter type OIDs.
    :raises ValueError: for a NUL in name or sql, or more than 65535 types.
    """
    if len(param_types) > 0xFFFF:
        raise ValueError("too many parameter types")
    types = struct.pack(f"!H{len(param_types)}I", len(param_types), *param_types)
    return frame(b"P", _string(name) + _string(sql) + types)


def close_statement(name: bytes) -> bytes:
    """A Close ('C') of a prepared statement: "'S' to close a prepared statement".

    :raises ValueError: if name contains a NUL byte.
    """
    return frame(b"C", b"S" + _string(name))


def sync() -> bytes:
    """A Sync ('S')."""
    return b"S\0\0\0\4"


def flush() -> bytes:
    """A Flush ('H')."""
    return b"H\0\0\0\4"


def terminate() -> bytes:
    """A Terminate ('X')."""
    return b"X\0\0\0\4"


def copy_done() -> bytes:
    """A CopyDone ('c')."""
    return b"c\0\0\0\4"


def copy_fail(message: str) -> bytes:
    """A CopyFail ('f'): "String An error message to report as the cause of failure."

    :raises ValueError: if message contains a NUL byte.
    """
    return frame(b"f", _string(message))


def password_message(password: str) -> bytes:
    """A PasswordMessage ('p'): "String The password (encrypted, if requested)."

    The builder adds the terminating NUL; pass the cleartext password or the
    ``md5...`` digest as text.

    :raises ValueError: if password contains a NUL byte.
    """
    return frame(b"p", _string(password))


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    """A SASLInitialResponse ('p').

    "String Name of the SASL authentication mechanism that the client selected."
    "Int32 Length of SASL mechanism specific "Initial Client Response" that
    follows, or -1 if there is no Initial Response."

    :param mechanism: e.g. ``"SCRAM-SHA-256"``.
    :param data: the initial response, or None for none.
    """
    if data is None:
        return frame(b"p", _string(mechanism) + _INT32.pack(-1))
    return frame(b"p", _string(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    """A SASLResponse ('p'): "Byten SASL mechanism specific message data."."""
    return frame(b"p", data)


def authentication_ok() -> bytes:
    """An AuthenticationOk ('R'): "Int32(0) Specifies that the authentication was
    successful."."""
    return b"R\0\0\0\x08\0\0\0\0"


def parameter_status(name: str, value: str) -> bytes:
    """A ParameterStatus ('S'): run-time parameter name and current value.

    :raises ValueError: if either contains a NUL byte.
    """
    return frame(b"S", _string(name) + _string(value))


def backend_key_data(pid: int, key: bytes) -> bytes:
    """A BackendKeyData ('K'): process ID and a 4 to 256 byte secret key.

    :raises ValueError: for a key of another length.
    """
    if not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
        raise ValueError(f"cancel key must be {MIN_CANCEL_KEY} to {MAX_CANCEL_KEY} bytes")
    return frame(b"K", _INT32.pack(pid) + key)


def ready_for_query(status: bytes) -> bytes:
    """A ReadyForQuery ('Z') with status ``b"I"``, ``b"T"`` or ``b"E"``.

    :raises ValueError: for another status.
    """
    return frame(b"Z", TransactionStatus(bytes(status)).value)
