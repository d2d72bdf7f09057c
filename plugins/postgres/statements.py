# Named prepared statements of one client session, for re-preparing on a mirror.
#
# Owns: the Parse frames a client session sent for named statements, so that a
# mirror connection that missed one (its unit was dropped, or the connection was
# reset) can be given the Parse again before a Bind that needs it; and what
# a Query does to them (DISCARD ALL, DEALLOCATE).
# Must not know: queues or sockets. Bounded: at most MAX_STATEMENTS entries and
# MAX_BYTES of Parse frames; past that the oldest are forgotten (a mirror that
# missed one of those answers the Bind with an error, counted as outcome error).
from __future__ import annotations

import re
import struct

from . import codec

__all__ = ["StatementRegistry", "deallocated_statement", "resets_statements"]

MAX_STATEMENTS = 10_000
MAX_BYTES = 16 * 1024 * 1024

_len = struct.Struct("!i").unpack_from
_PARSE, _CLOSE, _QUERY = ord("P"), ord("C"), ord("Q")
# DISCARD ALL and DEALLOCATE ALL drop every prepared statement of the session.
_RESET = re.compile(rb"\s*(?:DISCARD\s+ALL|DEALLOCATE\s+(?:PREPARE\s+)?ALL)\b", re.IGNORECASE)
# DEALLOCATE of one statement, as the whole Query (psycopg sends "DEALLOCATE _pg3_0"
# when its prepared-statement cache evicts one). Named statements of the
# protocol and of SQL PREPARE share one namespace, so this forgets a Parse too.
_DEALLOCATE_ONE = re.compile(
    rb'\s*DEALLOCATE\s+(?:PREPARE\s+)?(?!ALL\b)("(?:[^"\x00]|"")+"|[A-Za-z_\x80-\xff][\w$\x80-\xff]*)'
    rb"\s*;?\s*\x00?\Z", re.IGNORECASE)


def resets_statements(sql_body: bytes | memoryview) -> bool:
    return _RESET.match(sql_body) is not None


def deallocated_statement(sql_body: bytes | memoryview) -> bytes | None:
    """The statement name a Query that is ``DEALLOCATE name`` drops, else None.

    An unquoted name is folded to lower case, as the server does; a quoted one
    is taken as written.
    """
    m = _DEALLOCATE_ONE.match(sql_body)
    if m is None:
        return None
    name = m.group(1)
    if name.startswith(b'"'):
        return name[1:-1].replace(b'""', b'"')
    return name.lower()


class StatementRegistry:
    """Parse frames by statement name for one client session."""

    __slots__ = ("_parses", "_bytes")

    def __init__(self) -> None:
        self._parses: dict[bytes, bytes] = {}
        self._bytes = 0

    def note(self, data: bytes) -> None:
        """Record what a unit does to the session's named statements.

        Runs for every mirrored unit, so it steps over frames in a plain loop
        and reads a body only for Parse, Close and Query.
        """
        pos, n, unpack = 0, len(data), _len
        view: memoryview | None = None
        while n - pos >= 5:
            kind = data[pos]
            length = unpack(data, pos + 1)[0]
            end = pos + 1 + length
            if length < 4 or end > n:
                return
            body = pos + 5
            pos = end
            if kind != _PARSE and kind != _CLOSE and kind != _QUERY:
                continue
            if view is None:
                view = memoryview(data)
            if kind == _PARSE:
                name = codec.statement_name_of_parse(view[body:end])
                if name:
                    self._add(name, data[body - 5:end])
            elif kind == _CLOSE:
                what, name = codec.close_target(view[body:end])
                if what == b"S":
                    self._remove(name)
            elif kind == _QUERY:
                sql = view[body:end]
                if resets_statements(sql):
                    self._parses.clear()
                    self._bytes = 0
                elif (gone := deallocated_statement(sql)) is not None:
                    self._remove(gone)

    def _add(self, name: bytes, frame: bytes) -> None:
        self._remove(name)
        self._parses[name] = frame
        self._bytes += len(frame)
        while self._parses and (len(self._parses) > MAX_STATEMENTS or self._bytes > MAX_BYTES):
            self._remove(next(iter(self._parses)))

    def _remove(self, name: bytes) -> None:
        old = self._parses.pop(name, None)
        if old is not None:
            self._bytes -= len(old)

    def get(self, name: bytes) -> bytes | None:
        return self._parses.get(name)

    def __len__(self) -> int:
        return len(self._parses)

    def __repr__(self) -> str:
        return f"<StatementRegistry {len(self._parses)} statements, {self._bytes}B>"
