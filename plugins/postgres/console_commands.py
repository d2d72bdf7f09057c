# The admin console's commands and the result sets that answer them.
#
# Owns: parsing a simple Query's text into commands (case-insensitive,
# separated by semicolons), the SHOW tables (their columns, read from the
# running gateway through Control), and encoding a result set as
# RowDescription, DataRow and CommandComplete frames, values in text format.
# Must not know: sockets, the login, or how counters are kept (it reads them).
#
# Quotes are from the PostgreSQL documentation, "Frontend/Backend Protocol",
# "Message Formats".
from __future__ import annotations

import datetime as dt
import enum
import struct

import attrs

from gateway import Control, DropReason, mirror_health

from . import codec

__all__ = ["HELP", "Column", "ColumnType", "Command", "ResultSet", "UnknownCommand", "answer",
           "command_complete", "parse_commands"]

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_FIELD = struct.Struct("!ihihih")  # RowDescription: table, column, type, size, typmod, format


# --- result sets --------------------------------------------------------------------


class ColumnType(enum.IntEnum):
    """The pg_type OIDs of the console's columns; values are sent as text."""

    BOOL = 16
    INT8 = 20
    TEXT = 25
    FLOAT8 = 701
    TIMESTAMPTZ = 1184


# RowDescription's "Int16 The data type size (see pg_type.typlen)".
_TYPLEN = {ColumnType.BOOL: 1, ColumnType.INT8: 8, ColumnType.TEXT: -1,
           ColumnType.FLOAT8: 8, ColumnType.TIMESTAMPTZ: 8}


@attrs.frozen
class Column:
    """One column of a result set."""

    name: str
    type: ColumnType = ColumnType.TEXT


def _text(value: object, kind: ColumnType) -> bytes | None:
    """A value in Postgres' text output format; None is NULL."""
    if value is None:
        return None
    if kind is ColumnType.BOOL:
        return b"t" if value else b"f"
    if kind is ColumnType.FLOAT8:
        return f"{float(value):.3f}".encode()  # type: ignore[arg-type]
    if kind is ColumnType.TIMESTAMPTZ:
        # DateStyle ISO, TimeZone UTC, as announced in ParameterStatus.
        when = dt.datetime.fromtimestamp(float(value), dt.UTC)  # type: ignore[arg-type]
        return when.strftime("%Y-%m-%d %H:%M:%S.%f+00").encode()
    return str(value).encode()


@attrs.frozen
class ResultSet:
    """Rows to answer a command with: RowDescription, DataRows, CommandComplete."""

    columns: tuple[Column, ...]
    rows: tuple[tuple[object, ...], ...]
    tag: str = "SHOW"

    def encode(self) -> bytes:
        """The frames of the answer, ReadyForQuery excepted."""
        # RowDescription: "Int16 Specifies the number of fields in a row", then
        # per field its name, table OID, column number, type OID, type size,
        # type modifier and format code (zero: text).
        parts = [_INT16.pack(len(self.columns))]
        for column in self.columns:
            parts.append(codec._string(column.name))
            parts.append(_FIELD.pack(0, 0, column.type, _TYPLEN[column.type], -1, 0))
        out = [codec.frame(b"T", b"".join(parts))]
        kinds = [c.type for c in self.columns]
        for row in self.rows:
            # DataRow: "Int32 The length of the column value ... As a special
            # case, -1 indicates a NULL column value."
            cells = [_INT16.pack(len(row))]
            for value, kind in zip(row, kinds, strict=True):
                data = _text(value, kind)
                cells.append(_INT32.pack(-1) if data is None else _INT32.pack(len(data)) + data)
            out.append(codec.frame(b"D", b"".join(cells)))
        out.append(command_complete(self.tag))
        return b"".join(out)


def command_complete(tag: str) -> bytes:
    """A CommandComplete ('C'): "String The command tag"."""
    return codec.frame(b"C", codec._string(tag))


# --- commands -----------------------------------------------------------------------


class Command(enum.Enum):
    """What the console answers; the value is the command as typed."""

    SHOW_MIRRORS = "SHOW MIRRORS"
    SHOW_LISTENERS = "SHOW LISTENERS"
    SHOW_CLIENTS = "SHOW CLIENTS"
    SHOW_HELP = "SHOW HELP"
    RELOAD = "RELOAD"


HELP = {
    Command.SHOW_MIRRORS: "per listener and mirror: counters, queue depth, lag and health",
    Command.SHOW_LISTENERS: "listeners: address, primary, clients, units, mirrors, bound",
    Command.SHOW_CLIENTS: "client sessions of every listener and the mirrors they go to",
    Command.SHOW_HELP: "this list",
    Command.RELOAD: "read the config file again and apply it (as SIGHUP does)",
}
_KNOWN = ", ".join(c.value for c in Command)
_BY_TEXT = {c.value: c for c in Command}


class UnknownCommand(Exception):
    """A statement the console does not know (SQLSTATE 42601, syntax_error)."""

    def __init__(self, text: str) -> None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        super().__init__(f'unknown command "{shown}"; the console knows {_KNOWN}')
        self.message = str(self)


def parse_commands(sql: str) -> list[Command]:
    """The commands of a simple Query string, in order.

    Case and spacing do not matter; statements are separated by semicolons and
    a trailing one is optional. An empty list means an empty query.

    :raises UnknownCommand: for the first statement that is not a command.
    """
    commands = []
    for statement in sql.split(";"):
        words = " ".join(statement.split()).upper()
        if not words:
            continue
        command = _BY_TEXT.get(words)
        if command is None:
            raise UnknownCommand(" ".join(statement.split()))
        commands.append(command)
    return commands


_MIRROR_COLUMNS = (
    Column("listener"), Column("mirror"), Column("upstream"), Column("host"),
    Column("port", ColumnType.INT8), Column("offered", ColumnType.INT8),
    Column("skipped", ColumnType.INT8), Column("delivered", ColumnType.INT8),
    Column("outcomes"), Column("dropped", ColumnType.INT8),
    *(Column(reason.value, ColumnType.INT8) for reason in DropReason),
    Column("queue_units", ColumnType.INT8), Column("queue_bytes", ColumnType.INT8),
    Column("in_flight", ColumnType.INT8), Column("lag_seconds", ColumnType.FLOAT8),
    Column("health"),
)
_LISTENER_COLUMNS = (
    Column("name"), Column("protocol"), Column("listen"), Column("primary"),
    Column("clients", ColumnType.INT8), Column("units", ColumnType.INT8), Column("mirrors"),
    Column("bound", ColumnType.BOOL),
)
_CLIENT_COLUMNS = (
    Column("listener"), Column("peer"), Column("user"), Column("database"),
    Column("application_name"), Column("state"), Column("since", ColumnType.TIMESTAMPTZ),
    Column("requests", ColumnType.INT8), Column("mirrors"),
)


def _show_mirrors(control: Control) -> ResultSet:
    pools = control.upstream_pools()
    rows = []
    for ctx in control.listeners():
        # Mirrors a reload removed too, as in /metrics: their queues may still
        # be draining, and their counts are part of the listener's story.
        for mirror in ctx.all_mirrors:
            stats = mirror.stats
            upstream = mirror.upstream
            outcomes = " ".join(f"{k}={v}" for k, v in sorted(stats.delivered.items()))
            rows.append((
                ctx.name, mirror.name, upstream.name, upstream.host, upstream.port,
                stats.offered, stats.skipped, stats.delivered_total, outcomes,
                stats.dropped_total, *(stats.dropped[reason] for reason in DropReason),
                stats.queued, stats.queued_bytes, stats.in_flight, mirror.lag(),
                "retired" if mirror.retired
                else mirror_health(mirror, pools.get(upstream.name))["state"],
            ))
    return ResultSet(_MIRROR_COLUMNS, tuple(rows))


def _show_listeners(control: Control) -> ResultSet:
    rows = tuple(
        (ctx.name, ctx.listener.protocol, str(ctx.listener.listen), ctx.primary.name,
         len(ctx.sessions), ctx.stats.primary_units,
         ", ".join(m.name for m in ctx.mirrors), control.bound(ctx))
        for ctx in control.listeners())
    return ResultSet(_LISTENER_COLUMNS, rows)


def _show_clients(control: Control) -> ResultSet:
    rows = []
    for ctx in control.listeners():
        for session in list(ctx.sessions):
            d = session.describe()
            rows.append((ctx.name, d.get("peer"), d.get("user"), d.get("database"),
                         d.get("application_name"), d.get("state"), d.get("since"),
                         d.get("requests"), ", ".join(d.get("mirrors", ()))))
    return ResultSet(_CLIENT_COLUMNS, tuple(rows))


def _show_help() -> ResultSet:
    return ResultSet((Column("command"), Column("description")),
                     tuple((c.value, text) for c, text in HELP.items()))


def answer(command: Command, control: Control) -> ResultSet:
    """The result set of a SHOW command, read from the running gateway."""
    if command is Command.SHOW_MIRRORS:
        return _show_mirrors(control)
    if command is Command.SHOW_LISTENERS:
        return _show_listeners(control)
    if command is Command.SHOW_CLIENTS:
        return _show_clients(control)
    if command is Command.SHOW_HELP:
        return _show_help()
    raise ValueError(f"{command} is not answered by a result set")
