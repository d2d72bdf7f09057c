# The Postgres client session: relays bytes to the primary, cuts units for mirrors.
#
# Owns: one client connection and its primary connection, from the startup
# packet to the close; the gateway's own replies (declining TLS, errors for bad
# input, an unreachable primary, too many clients); cancel routing; and cutting
# the client's byte stream into units (a Query, an extended batch up to Sync, a
# function call; a COPY grows its unit as the data arrives).
# Must not know: how a unit reaches a mirror (replayer.py), or queues (the core).
#
# Hot path rules (design.md §3): every chunk is written on as soon as it is
# received, unchanged; then only frame headers are read (type byte + length) to
# find boundaries. A body is read only for ReadyForQuery (its status byte) and
# during start-up. No log call, no decode, no per-frame allocation after start-up.
from __future__ import annotations

import asyncio
import collections
import enum
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from gateway import ClientSession, ListenerContext, MirrorSet, Unit

from . import codec
from .console import ConsoleSession, admin_database
from .framewalk import Cursor, FrameError, count, tally, walk
from .statements import MAX_BYTES as _MAX_STATEMENT_FRAME

try:
    from ._lane import Lane, Poller
except ImportError:  # not built: the methods below do all of its work
    Lane = Poller = None
# MIRRORGATE_PG_LANE=off leaves every chunk to the Python below where the lane
# is built too (to compare, or to rule the C lane out when chasing a bug);
# MIRRORGATE_PG_LANE=transports keeps the lane but leaves the sockets to the
# event loop's transports (see PgSession._lane_own).
_LANE_SWITCH = os.environ.get("MIRRORGATE_PG_LANE", "")
if Lane is not None and _LANE_SWITCH == "off":
    Lane = Poller = None
    LANE = "Python (MIRRORGATE_PG_LANE=off)"
elif Lane is None:
    LANE = "Python (the C lane is not built)"
elif _LANE_SWITCH == "transports":
    Poller = None
    LANE = "the C lane, on the event loop's transports (MIRRORGATE_PG_LANE=transports)"
else:
    LANE = "the C lane, reading its sessions' sockets itself"

if TYPE_CHECKING:
    from .replayer import PgReplayer

log = logging.getLogger("mirrorgate.postgres")

_clock = time.monotonic

# Frontend type bytes (Postgres protocol, "Message Formats").
_F_QUERY = ord("Q")
_F_SYNC = ord("S")
_F_FUNCTION_CALL = ord("F")
_F_COPY_DATA = ord("d")
_F_COPY_DONE = ord("c")
_F_COPY_FAIL = ord("f")
# What the frontend scanner does with each type byte: 0 step over it, else
# call _frame_end. A table read through a local is the cheapest dispatch in
# CPython, and most client frames (Bind, Execute, Describe) need nothing.
_UNIT_END, _COPY_FRAME, _STATEMENT, _MARK_STATEMENT = 1, 2, 3, 4


def _actions(**kinds: bytes) -> bytes:
    table = bytearray(256)
    for action, types in ((_UNIT_END, kinds["unit_end"]), (_COPY_FRAME, kinds["copy"]),
                          (_STATEMENT, kinds.get("statement", b"")),
                          (_MARK_STATEMENT, kinds.get("mark", b""))):
        for t in types:
            table[t] = action
    return bytes(table)


# Units are cut only in mirrored sessions. A unit's statements are noted only
# if it has a Parse or Close (or is a Query, which may DEALLOCATE): most units
# are Bind/Execute/Sync.
_FRONT_ACTIONS = _actions(unit_end=b"SQF", copy=b"dcf", mark=b"PC")
# While a unit is over the byte budget, Parse and Close must be seen too.
_FRONT_ACTIONS_OVERSIZED = _actions(unit_end=b"SQF", copy=b"dcf", statement=b"PC")
_PARSE_OR_CLOSE = _actions(unit_end=b"", copy=b"", statement=b"PC")
# In the primary's bytes only ReadyForQuery matters (marked 1, as tally
# counts it too).
_BACK_ACTIONS = _actions(unit_end=b"Z", copy=b"")
# A dark session (every mirror refuses units) counts the units of a chunk
# in one tally when the chunk is whole Syncs and the frames they end (most
# often Bind/Execute/Sync): 1 marks a Sync; 2 a frame that needs the full
# scan (a Query or Parse or Close may name statements, COPY frames follow
# the COPY, a FunctionCall ends a unit the COPY rules tell apart).
_DARK_FRONT = bytes(1 if t == ord("S") else 2 if t in b"QFPCdcf" else 0 for t in range(256))
# Backend type bytes.
_B_READY = ord("Z")
# Lane modes and the sides of a chunk it hands back (_lane.c).
_LANE_PLAIN = 1
_BACK, _UNWRITTEN = 1, 2
_IDLE = ord("I")  # ReadyForQuery status: not in a transaction
_B_KEY = ord("K")


# Client bytes held while the primary connection is being opened.
_MAX_EARLY_BYTES = 1 << 20
_TRUTHY = frozenset({"true", "on", "yes", "1", "database"})


class Phase(enum.Enum):
    STARTUP = "startup"        # waiting for a complete startup packet
    CONNECTING = "connecting"  # startup packet in; opening the primary connection
    AUTH = "auth"              # relaying authentication; reading the primary's answers
    READY = "ready"            # relaying; cutting units
    RAW = "raw"                # relaying only (replication connections)
    CLOSED = "closed"


class CopyMode(enum.Enum):
    NONE = 0
    SIMPLE = 1    # COPY from a Query: ends at CopyDone/CopyFail
    EXTENDED = 2  # COPY from an extended batch: ends at the Sync after CopyDone/CopyFail


_NO_COPY = CopyMode.NONE


_poller: tuple[asyncio.AbstractEventLoop, Any] | None = None


def lane_poller() -> Any:
    """The epoll set of the sockets C lanes own (``PgSession._lane_own``) on
    the running event loop: one per loop, made at the first session that
    needs it, and watched by the loop for as long as it runs, whatever
    listeners come and go. None where the lane does not read sockets."""
    global _poller
    if Poller is None:
        return None
    loop = asyncio.get_running_loop()
    if _poller is None or _poller[0] is not loop:
        poller = Poller()
        loop.add_reader(poller.fileno(), poller.poll)
        _poller = (loop, poller)
    return _poller[1]


def _plain_fd(transport: asyncio.Transport) -> int:
    """The socket of a plain TCP transport that reads and has nothing
    buffered to write, else -1: only such a socket may be read and written
    by the lane instead."""
    if (transport.is_closing() or not transport.is_reading()
            or transport.get_write_buffer_size()
            or transport.get_extra_info("sslcontext") is not None):
        return -1
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


class PrimaryLink(asyncio.Protocol):
    """The gateway's connection to the primary for one client session."""

    def __init__(self, session: PgSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        # One call less per chunk: the event loop calls the session directly.
        self.data_received = session.primary_data  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.session.primary_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.primary_lost(exc)

    def pause_writing(self) -> None:
        # The primary reads slower than the client writes: stop reading the client.
        client = self.session.client
        if client is not None:
            client.pause_reading()

    def resume_writing(self) -> None:
        client = self.session.client
        if client is not None and not client.is_closing():
            client.resume_reading()


class PgSession(asyncio.Protocol, ClientSession):
    """One client connection: an asyncio Protocol driven by the event loop."""

    _lane_type: Any = Lane  # None: no C lane (where it is not built)

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.ctx: ListenerContext = handler.context
        self.stats = self.ctx.stats
        self.client: asyncio.Transport | None = None
        self.primary: asyncio.Transport | None = None
        self.phase = Phase.STARTUP
        self._relaying = False  # phase is READY: the per-chunk fast path
        self.startup: codec.StartupMessage | None = None
        self.peer = "?"
        self.opened = 0.0  # when the client connected (Unix time)
        self.mirrors: MirrorSet | None = None
        self.replayers: list[PgReplayer] = []
        self.statements: Any = None  # StatementRegistry when mirrored
        self.backend_key: tuple[int, bytes] | None = None
        self._skipped: list[Any] = []  # stats of mirrors sampling left out, if none took it
        self._registered = False
        self._replication = False      # a replication connection: relayed, not mirrored
        self._buf = bytearray()       # start-up phase bytes
        self._early: list[bytes] = []  # client bytes that came while connecting
        self._early_size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._auth_reader: codec.FrameReader | None = None
        # Frontend scanning state.
        self._fskip = 0               # bytes of the current frame still to come
        self._fcur = -1               # type of that frame (-1: none)
        self._ftail = b""             # a split frame header
        self._pieces: list[bytes] = []  # bytes of the unit being cut (mirrored only)
        self._held = 0                # their size (counted past _max_unit, not kept)
        self._max_unit = 0            # the largest unit any mirror could take
        self._min_unit = 0            # the largest unit every mirror could take
        self._open = False            # a unit has started and not been cut
        self._statements_seen = False  # the unit being cut has a Parse or Close
        # A Parse or Close whose bytes a unit over every byte budget no longer
        # keeps, gathered frame-wide until whole so its statement is known.
        self._stmt: bytearray | None = None
        self._stmt_size = 0           # its whole size (0 while its header is split)
        # Unmirrored sessions: when the client began asking, and whether the
        # primary has answered since (the next client chunk starts anew).
        self._waiting_since = 0.0
        self._answered_since = True
        self._last_unit: Unit | None = None
        self._last_term = -1          # the type of the frame that cut the last unit
        self._copy = CopyMode.NONE
        self._copy_end = -1           # CopyDone or CopyFail seen
        # Backend scanning state.
        self._back = Cursor()
        # Units sent and not yet answered: (time sent, unit if mirrored).
        self._pending: collections.deque[tuple[float, Unit | None]] = collections.deque()
        # While every mirror refuses units (until this time, then asked
        # again; 0.0 when not), units are only counted as drops, not cut into
        # Units: see _answered.
        self._down_until = 0.0
        self._idle = True  # the primary's last ReadyForQuery said idle
        self._generation = 0  # the listener's config generation the mirrors follow
        # The C lane (_lane.c), where built: it takes both sides' chunks and,
        # while on (unmirrored, or dark), does their work; otherwise, and for
        # any chunk it hands back, it calls the methods below.
        self._lane: Any = None
        if self._lane_type is not None:
            self._lane = lane = self._lane_type(self.data_received, self.primary_data,
                                                self._handoff)
            self.data_received = lane.front  # type: ignore[method-assign]
            self.primary_data = lane.back  # type: ignore[method-assign]

    # ---------------------------------------------------------------- client side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport  # type: ignore[assignment]
        self.opened = time.time()
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.ctx.startup_timeout, self._startup_expired)

    def data_received(self, data: bytes, forwarded: bool = False) -> None:
        """A client chunk (``forwarded``: the lane wrote it to the primary
        already, and hands it back to be read)."""
        if self._relaying:
            if not forwarded:
                self.primary.write(data)  # type: ignore[union-attr]
            if self.mirrors is not None:
                down = self._down_until
                if not down or not self._dark_front(data, down):
                    self._scan_front(data)
            elif self._answered_since:
                # Unmirrored: no unit is cut; the latency of what this chunk
                # asks runs from here to the primary's ReadyForQuery frames.
                self._waiting_since = _clock()
                self._answered_since = False
        elif self.phase is Phase.RAW or self.phase is Phase.AUTH:
            self.primary.write(data)  # type: ignore[union-attr]
        elif self.phase is Phase.STARTUP:
            self._startup_data(data)
        elif self.phase is Phase.CONNECTING:
            self._early_size += len(data)
            if self._early_size > _MAX_EARLY_BYTES:
                log.info("client sent too much before the primary connection was ready",
                         extra={"listener": self.ctx.name, "session": self.peer})
                self._fail("08P01", "too much data before the server connection was ready")
                return
            self._early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def pause_writing(self) -> None:
        if self.primary is not None:
            self.primary.pause_reading()

    def resume_writing(self) -> None:
        if self.primary is not None and not self.primary.is_closing():
            self.primary.resume_reading()

    # ---------------------------------------------------------------- start-up

    def _startup_data(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        try:
            packet, used = codec.parse_initial_packet(buf)
        except codec.ProtocolViolation as exc:
            log.info("bad start-up packet: %s", exc.message,
                     extra={"listener": self.ctx.name, "session": self.peer})
            self._fail(exc.sqlstate, exc.message)
            return
        if packet is None:
            return
        rest = bytes(buf[used:])
        buf.clear()
        if isinstance(packet, codec.SSLRequest | codec.GSSENCRequest):
            if rest:
                # CVE-2021-23214: bytes sent before the answer to SSLRequest
                # could be injected into an encrypted session; refuse them.
                log.info("client sent data after its SSL or GSS request",
                         extra={"listener": self.ctx.name, "session": self.peer})
                self._fail("08P01", "received unencrypted data after SSL or GSS request")
                return
            # "The server then responds with a single byte containing S or N";
            # mirrorgate does not terminate TLS yet, so always N.
            self.client.write(b"N")  # type: ignore[union-attr]
            return
        if isinstance(packet, codec.CancelRequest):
            self.handler.cancel(packet)
            self.client.close()  # type: ignore[union-attr]
            self.phase = Phase.CLOSED
            return
        assert isinstance(packet, codec.StartupMessage)
        if packet.database == admin_database(self.ctx):
            self._to_console(packet, rest)
            return
        self.startup = packet
        if not self.ctx.session_opened(self):
            log.warning("max_clients reached: session refused",
                        extra={"listener": self.ctx.name, "session": self.peer})
            self._fail("53300", "sorry, too many clients already")
            return
        self._registered = True
        replication = packet.params.get("replication", "false").lower() in _TRUTHY
        self.phase = Phase.CONNECTING
        if rest:
            self._early.append(rest)
            self._early_size = len(rest)
        asyncio.get_running_loop().create_task(self._connect_primary(raw=replication))

    def _to_console(self, packet: codec.StartupMessage, rest: bytes) -> None:
        """The admin database was asked for: the console answers this
        connection from now on, and no primary connection is opened. It is not
        a client session of the listener (not counted, never mirrored)."""
        remaining = self.ctx.startup_timeout
        if self._timer is not None:
            remaining = max(0.0, self._timer.when() - asyncio.get_running_loop().time())
            self._timer.cancel()
            self._timer = None
        self.phase = Phase.CLOSED
        ConsoleSession(self.ctx, packet, self.peer).attach(
            self.client, rest, remaining)  # type: ignore[arg-type]

    async def _connect_primary(self, raw: bool) -> None:
        primary = self.ctx.primary
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(primary.connect_timeout):
                _, link = await loop.create_connection(
                    lambda: PrimaryLink(self), primary.host, primary.port)
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            log.warning("primary unreachable at %s:%d: %s", primary.host, primary.port, reason,
                        extra={"listener": self.ctx.name, "session": self.peer,
                               "upstream": primary.name})
            self._fail("08006", f'mirrorgate: cannot connect to primary "{primary.name}" '
                                f"at {primary.host}:{primary.port}: {reason}")
            return
        if self.phase is Phase.CLOSED:
            link.transport.close()  # type: ignore[union-attr]
            return
        self.primary = link.transport
        assert self.startup is not None
        self.primary.write(self.startup.raw)  # type: ignore[union-attr]
        # Authentication is followed for replication sessions too, so that
        # startup_timeout bounds it; they turn raw once the primary is ready.
        self._replication = raw
        self.phase = Phase.AUTH
        self._auth_reader = codec.FrameReader()
        for chunk in self._early:
            self.primary.write(chunk)  # type: ignore[union-attr]
        self._early.clear()

    def _startup_expired(self) -> None:
        self._timer = None
        if self.phase in (Phase.STARTUP, Phase.CONNECTING, Phase.AUTH):
            log.info("start-up not complete within %gs (startup_timeout)",
                     self.ctx.startup_timeout,
                     extra={"listener": self.ctx.name, "session": self.peer})
            self._fail("08P01", "mirrorgate: start-up not complete within "
                                f"{self.ctx.startup_timeout:g}s (startup_timeout)")

    def _fail(self, sqlstate: str, message: str) -> None:
        """Answer the client with an ErrorResponse of our own and close."""
        if self.client is not None and not self.client.is_closing():
            self.client.write(codec.error_response(sqlstate, message))
            self.client.close()
        if self.primary is not None:
            self.primary.close()
        self._end()

    # ---------------------------------------------------------------- primary side

    def primary_data(self, data: bytes, forwarded: bool = False) -> None:
        """A primary chunk (``forwarded``: as for ``data_received``)."""
        if self._relaying:
            if not forwarded:
                self.client.write(data)  # type: ignore[union-attr]
            if self.mirrors is None:
                self._count_back(data)
                return
            if not self._down_until or not self._dark_back(data):
                self._scan_back(data)
            if self._down_until and not self._pending and self._lane is not None:
                self._lane_dark()
            return
        client = self.client
        if client is None or client.is_closing():
            return
        client.write(data)
        if self.phase is Phase.AUTH:
            self._auth_back(data)

    def primary_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            self.client.close()  # flushes what the primary sent last
        self._end()

    def _auth_back(self, data: bytes) -> None:
        """Follow authentication until the first ReadyForQuery."""
        reader = self._auth_reader
        assert reader is not None
        reader.feed(data)
        try:
            while (f := reader.next_frame()) is not None:
                kind, body = f
                if kind == _B_KEY:
                    self.backend_key = codec.backend_key(body)
                    self.handler.sessions_by_key[self.backend_key] = self
                elif kind == _B_READY:
                    self._ready(reader.take_buffered())
                    return
        except codec.ProtocolViolation as exc:
            log.warning("primary spoke out of protocol during start-up: %s", exc.message,
                        extra={"listener": self.ctx.name, "session": self.peer,
                               "upstream": self.ctx.primary.name})
            self._fail(exc.sqlstate, f"mirrorgate: primary sent a malformed message: "
                                     f"{exc.message}")

    def _ready(self, rest: bytes) -> None:
        self._auth_reader = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._replication:
            # Relayed, never mirrored: a replication stream (CopyBoth) is not
            # made of units a mirror could replay.
            self.phase = Phase.RAW
            return
        self.phase = Phase.READY
        self._relaying = True
        if self.ctx.mirrors:
            mirrors = self.handler.open_mirrors(self)
            if mirrors.sessions:
                self.mirrors = mirrors  # it counts the skipped mirrors itself
                self._budgets(mirrors)
            else:
                self._skipped = mirrors.skipped
            self._generation = self.ctx.generation
        if rest:
            if self.mirrors is not None:
                self._scan_back(rest)
            else:
                self._count_back(rest)
        if self.mirrors is None:
            self._lane_plain()

    # ---------------------------------------------------------------- scanning

    def _scan_front(self, data: bytes) -> None:
        """Find unit boundaries in client bytes already sent to the primary.

        Runs once per chunk of a mirrored session; framewalk reads the frame
        headers and reports only the frames whose type matters (_FRONT_ACTIONS).
        """
        if self._ftail:
            data = self._ftail + data
            self._ftail = b""
        n = len(data)
        if self._held >= self._max_unit:
            # Over the budget: what was kept is noted now, in stream order,
            # and the frame it ends inside goes on in this chunk.
            if self._pieces:
                self._spill(data)
            elif self._stmt is not None:
                self._gather(data)
        pos = self._fskip
        if pos > n:
            # The whole chunk is inside one frame that goes on.
            self._fskip = pos - n
            self._open = True
            self._hold(data, 0, n)
            return
        start = 0  # first byte of data not yet given to a unit
        if self._fcur >= 0:
            start = self._frame_end(self._fcur, data, start, pos, -1)
        act = _FRONT_ACTIONS if self._held < self._max_unit else _FRONT_ACTIONS_OVERSIZED
        fcur = -1
        bad = None
        if pos < n:
            try:
                pos, hits = walk(data, pos, act)
            except FrameError as exc:
                bad = exc.args  # (begin, type, length); the frames before it still count
                pos, hits = walk(data[:bad[0]], pos, act)
            for kind, begin, end in hits:
                what = act[kind]
                if what == _UNIT_END and end <= n and self._copy is _NO_COPY:
                    start = self._unit_end(kind, data, start, end, begin)
                elif what == _MARK_STATEMENT:
                    self._statements_seen = True
                else:
                    if (what == _COPY_FRAME and self._copy is _NO_COPY
                            and not (begin > start or (start == 0 and self._open))):
                        # CopyData/CopyDone/CopyFail right after a cut unit: its
                        # COPY's data starts here, before any of its bytes are held.
                        self._copy_starts()
                    if end <= n:
                        start = self._frame_end(kind, data, start, end, begin)
                    else:
                        fcur = kind  # it ends in a later chunk
                        if what == _STATEMENT and end - begin <= _MAX_STATEMENT_FRAME:
                            self._stmt = bytearray(data[begin:])
                            self._stmt_size = end - begin
        if bad is not None:
            self._desynchronised("client", bad[1], bad[2])
            return
        if pos < n:
            # A split header: keep its bytes for the next chunk.
            self._ftail = data[pos:]
            self._fcur = -1
            self._fskip = 0
            self._open = start < pos or (start == 0 and self._open)
            self._hold(data, start, pos)
            return
        self._fskip = pos - n
        self._fcur = fcur if pos > n else -1
        self._open = start < n or (start == 0 and self._open)
        if start < n:
            self._hold(data, start, n)

    def _dark_front(self, data: bytes, down: float) -> bool:
        """Every mirror refuses units, and ``data`` starts at a unit boundary:
        if it is whole units that end at Syncs, and no unit in it starts a
        transaction where the mirrors must be asked again, count them in one
        go, as ``_unit_end`` would one by one.

        :returns: whether it did; if not, the full scan reads ``data``.
        """
        n = len(data)
        # A unit boundary: no bytes held (a frame that goes on was held in
        # part, so this also rules out data starting inside one), no split
        # header kept, no COPY. No unit in it too large for some mirror.
        if n > self._min_unit or self._held or self._ftail or self._copy is not _NO_COPY:
            return False
        try:
            _, units, marks, last = tally(data, 0, _DARK_FRONT)
        except FrameError:
            return False
        if marks != 1 or last != n:
            return False
        pending = self._pending
        now = _clock()
        if self._idle and not pending:
            # Its first unit starts a transaction: _unit_end asks again there
            # (or follows a reload), when the time has come or a queue changed.
            mirrors = self.mirrors
            if (now >= down or mirrors.asked != mirrors.changes.count  # type: ignore[union-attr]
                    or self._generation != self.ctx.generation):
                return False
        self.mirrors.drop_unoffered(n, units)  # type: ignore[union-attr]
        entry = (now, None)
        for _ in range(units):
            pending.append(entry)
        self._last_unit = None
        self._last_term = _F_SYNC
        return True

    def _hold(self, data: bytes, start: int, end: int) -> None:
        """Keep client bytes that belong to a unit not yet complete."""
        if start >= end or self.mirrors is None:
            return
        chunk = data if (start == 0 and end == len(data)) else data[start:end]
        if self._copy is not CopyMode.NONE:
            if self._last_unit is not None:
                self.mirrors.extend(self._last_unit, chunk)
        elif self._held < self._max_unit:
            self._pieces.append(chunk)
            self._held += len(chunk)
        else:
            self._held += len(chunk)  # too large to mirror: count it, keep nothing

    def _spill(self, data: bytes) -> None:
        """Note the whole frames kept of a unit that went over the budget, and
        gather the frame they end inside if it is a Parse or a Close; its
        next bytes start ``data``."""
        kept = b"".join(self._pieces)
        self._pieces.clear()
        self.statements.note(kept)  # its whole frames: it stops at the cut one
        n = len(kept)
        pos, hits = walk(kept, 0, _PARSE_OR_CLOSE)
        if pos < n:  # a split header
            if kept[pos] != 0x50 and kept[pos] != 0x43:
                return
        elif hits and hits[-1][2] > n:
            pos = hits[-1][1]
        else:
            return  # it ends inside a frame of another type
        self._stmt = bytearray(kept[pos:])
        self._stmt_size = 0
        self._gather(data)

    def _gather(self, data: bytes) -> None:
        """Add the start of ``data`` to the Parse or Close being gathered, as
        much as it still needs; note it once whole."""
        frame = self._stmt
        assert frame is not None
        pos = 0
        if not self._stmt_size:
            pos = max(0, 5 - len(frame))
            frame += data[:pos]
            if len(frame) < 5:
                return  # its header is still split
            size = 1 + int.from_bytes(frame[1:5], "big")
            if not 5 <= size <= _MAX_STATEMENT_FRAME:
                self._stmt = None  # malformed, or too large to keep in any case
                return
            self._stmt_size = size
        more = self._stmt_size - len(frame)
        frame += data[pos:pos + more]
        if len(frame) == self._stmt_size:
            self._stmt = None
            self._stmt_size = 0
            self.statements.note(bytes(frame))

    def _frame_end(self, kind: int, data: bytes, start: int, end: int, begin: int) -> int:
        """A client frame of type ``kind`` ended at ``end`` in ``data``.

        ``begin`` is where it started in ``data``, or -1 if in an earlier chunk.
        Only the types _FRONT_ACTIONS names come here.

        Cuts a unit there if the frame ends one, and follows COPY: CopyData,
        CopyDone and CopyFail from a client only ever belong to the COPY that
        the last unit started, so the client's stream alone says where a COPY
        ends, whether or not the primary's CopyInResponse has been read yet.

        :returns: the new start of bytes not yet given to a unit.
        """
        copy = self._copy
        if copy is _NO_COPY and (kind == 0x53 or kind == 0x51 or kind == 0x46):
            return self._unit_end(kind, data, start, end, begin)  # Sync, Query, FunctionCall
        if kind == _F_COPY_DATA or kind == _F_COPY_DONE or kind == _F_COPY_FAIL:
            if copy is _NO_COPY:
                return start  # part of a batch still being sent (no Sync yet)
            if kind != _F_COPY_DATA:
                self._copy_end = kind
                if copy is CopyMode.SIMPLE:
                    return self._copy_finished(data, start, end)
            return start
        if copy is CopyMode.EXTENDED:
            if kind == _F_SYNC and self._copy_end >= 0:
                return self._copy_finished(data, start, end)
            return start  # Flush, or the next batch pipelined before the Sync
        if copy is CopyMode.SIMPLE:
            # The client left copy-in without CopyDone/CopyFail (out of
            # protocol; the primary will say so). Stop treating data as COPY.
            self._copy_finished(data, start, start)
        if kind == _F_SYNC or kind == _F_QUERY or kind == _F_FUNCTION_CALL:
            return self._unit_end(kind, data, start, end, begin)
        if begin >= 0 and self.mirrors is not None:
            # Parse or Close in a unit too large to mirror: it keeps no bytes,
            # but what it does to named statements must still be known.
            self.statements.note(data[begin:end])
        return start

    def _unit_end(self, kind: int, data: bytes, start: int, end: int, begin: int) -> int:
        """Cut the unit that ends at ``end``: offer it, and await its ReadyForQuery."""
        unit = None
        mirrors = self.mirrors
        if self._generation != self.ctx.generation and self._idle and not self._pending:
            # This unit starts a transaction, and a reload came since the last.
            mirrors = self._reconfigured()
        if mirrors is None:
            return end  # mirroring ended at this boundary: the primary side counts units
        down = self._down_until
        if down and self._idle and not self._pending:
            # This unit starts a transaction: may a mirror take it after all?
            # Only time (a backoff running out) or a queue that gave up a
            # unit since the last answer can make it so.
            if _clock() >= down or mirrors.asked != mirrors.changes.count:
                down = self._down_until = mirrors.down_until()
        if down:
            # Every mirror refuses units: count the unit as the offer would
            # have, keeping only what named statements need.
            pieces = self._pieces
            size = self._held + end - start
            if self._statements_seen or kind == 0x51:
                if self._held >= self._max_unit:
                    if pieces:
                        self.statements.note(b"".join(pieces))
                    if begin >= 0:
                        self.statements.note(data[begin:end])
                else:
                    self.statements.note(b"".join((*pieces, data[start:end])))
            pieces.clear()
            self._held = 0
            self._statements_seen = False
            mirrors.drop_unoffered(size)
        else:
            pieces = self._pieces
            held = self._held
            if held + end - start > self._max_unit:
                # Over every mirror's byte budget: offer its size only, so it
                # is counted too_large and its transaction dropped; still note
                # what it does to named statements.
                unit = Unit(b"", closed=False)
                unit.size = held + end - start
                if held < self._max_unit:
                    # Everything since the unit began is still here.
                    self.statements.note(b"".join((*pieces, data[start:end])))
                else:
                    # The bytes kept before the budget ran out; frames after
                    # it were noted one by one as they ended.
                    if pieces:
                        self.statements.note(b"".join(pieces))
                    if begin >= 0:
                        self.statements.note(data[begin:end])
                pieces.clear()
            else:
                if pieces:
                    pieces.append(data[start:end])
                    raw = b"".join(pieces)
                    pieces.clear()
                elif start == 0 and end == len(data):
                    raw = data
                else:
                    raw = data[start:end]
                if self._statements_seen or kind == 0x51:  # Parse/Close in it, or a Query
                    self.statements.note(raw)
                unit = Unit(raw, closed=False)
            self._held = 0
            self._statements_seen = False
            mirrors.offer(unit)
        self._pending.append((_clock(), unit))
        self._last_unit = unit
        self._last_term = kind
        return end

    def _copy_starts(self) -> None:
        # "The backend will ignore Flush and Sync messages received during
        # copy-in mode": a COPY from an extended batch ends at the Sync after
        # CopyDone, which earns the batch's only ReadyForQuery.
        self._copy = CopyMode.EXTENDED if self._last_term == _F_SYNC else CopyMode.SIMPLE
        self._copy_end = -1

    def _copy_finished(self, data: bytes, start: int, end: int) -> int:
        unit = self._last_unit
        if unit is not None and self.mirrors is not None and end > start:
            self.mirrors.extend(unit, data[start:end])
        if unit is not None:
            unit.meta = self._copy_end  # CopyDone or CopyFail reached the unit
        self._copy = CopyMode.NONE
        self._copy_end = -1
        return end

    def _scan_back(self, data: bytes) -> None:
        """A mirrored session: settle its units with the primary's answers."""
        back = self._back
        data, hits, bad = back.walk(data, _BACK_ACTIONS)
        n = len(data)
        for _, begin, end in hits:
            if end > n:
                # ReadyForQuery split before its status byte: read it whole
                # with the next chunk.
                back.hold(data, begin)
                break
            self._answered(data[begin + 5])
        if bad is not None:
            self._desynchronised("primary", bad[1], bad[2])

    def _dark_back(self, data: bytes) -> bool:
        """A dark session's pending units are all uncut (None), so each
        ReadyForQuery only completes one, and only the last one's status
        matters: count them in one go, as ``_answered`` would one by one.

        :returns: whether it did; if not, the full scan reads ``data``.
        """
        # Cursor.walk's steps, with tally() for walk().
        back = self._back
        if back.tail:
            return False
        n = len(data)
        pos = back.skip
        if pos >= n:
            back.skip = pos - n
            return True
        try:
            pos, ready, _, last = tally(data, pos, _BACK_ACTIONS)
        except FrameError:
            return False
        pending = self._pending
        if ready and (last > n or ready > len(pending)):
            return False  # a status byte still to come, or an answer to nothing
        back.stop(data, pos)
        if ready:
            stats = self.stats
            stats.primary_units += ready
            now = _clock()
            observe = stats.primary_latency.observe
            for _ in range(ready):
                observe(now - pending.popleft()[0])
            self._idle = data[last - 1] == _IDLE
        return True

    def _count_back(self, data: bytes) -> None:
        """An unmirrored session: count the primary's ReadyForQuery frames.

        Each one completes a unit; its latency runs from the first client chunk
        after the primary last answered (per unit for request/response clients,
        from the start of the burst for pipelining ones). Sessions that sampling
        left out count their units as skipped here. Where the C lane is built,
        it does this instead for unmirrored sessions without a skipped mirror.
        """
        # Cursor.walk's steps, with count() for walk().
        back = self._back
        if back.tail:
            data = back.tail + data
            back.tail = b""
        n = len(data)
        pos = back.skip
        if pos >= n:
            back.skip = pos - n
            return
        bad = None
        try:
            pos, ready = count(data, pos, _B_READY)
        except FrameError as exc:
            bad = exc.args  # the frames before it still count
            pos, ready = count(data[:bad[0]], pos, _B_READY)
        back.stop(data, pos)
        if ready:
            stats = self.stats
            stats.primary_units += ready
            since = self._waiting_since
            if since:
                stats.primary_latency.observe(_clock() - since, ready)
            self._answered_since = True
            if self._skipped:
                if self._generation != self.ctx.generation:
                    # A reload: stop counting skips for mirrors it removed.
                    self._generation = self.ctx.generation
                    self._skipped = self.ctx.serving(self._skipped)
                for skipped in self._skipped:
                    skipped.skipped += ready
        if bad is not None:
            self._desynchronised("primary", bad[1], bad[2])

    def _answered(self, status: int) -> None:
        """A ReadyForQuery: the oldest pending unit is complete."""
        pending = self._pending
        if not pending:
            return  # e.g. the extra ReadyForQuery of an error during start-up
        sent, unit = pending.popleft()
        stats = self.stats
        stats.primary_units += 1
        now = _clock()
        stats.primary_latency.observe(now - sent)
        if unit is not None:
            unit.settle(status)
        self._idle = idle = status == _IDLE
        if idle and not pending and not self._down_until:
            # A transaction boundary with nothing in flight, after a unit
            # every mirror refused (down, or queues full: a hung mirror is both
            # in turn): stop cutting units until one may take them again.
            # _unit_end asks again at each unit that starts a transaction, so
            # none is counted dropped that a mirror would have queued, and a
            # mirror never sees part of a transaction.
            mirrors = self.mirrors
            if mirrors is not None and mirrors.down:
                self._down_until = mirrors.down_until()

    def _lane_plain(self) -> None:
        """An unmirrored session: the C lane counts its chunks from here,
        unless sampling left mirrors out (they count skipped units, here)."""
        if self._lane is None or self._skipped:
            return
        back = self._back
        self._lane.plain(self.primary.write, self.client.write,  # type: ignore[union-attr]
                         self.stats, _clock, back.skip, back.tail, self._waiting_since,
                         self._answered_since)
        self._lane_own()

    def _lane_dark(self) -> None:
        """A dark session with nothing pending, between two primary chunks:
        if it stands at a unit boundary on both sides, the C lane counts its
        chunks from here."""
        lane = self._lane
        if (lane is None or self.mirrors is None or self._pending or self._held or self._ftail
                or self._fskip or self._copy is not _NO_COPY or self._stmt is not None
                or self._back.tail):
            return
        mirrors = self.mirrors
        assert mirrors is not None
        drops, skipped = mirrors.dark_counts()
        lane.dark(self.primary.write, self.client.write, self.stats, _clock,  # type: ignore[union-attr]
                  self._back.skip, self._idle, self._down_until, self._min_unit, drops, skipped,
                  mirrors.changes, mirrors.asked, self.ctx, self._generation)
        self._lane_own()

    def _lane_own(self) -> None:
        """The lane is on: let it read and write both sockets itself (the
        listener's Poller), when the transports are plain TCP, reading, and
        have nothing buffered to write (the handler's ``lane_poller``: the
        listener's, ``lane_poller`` above). They stop reading until the lane
        gives the sockets back (``_lane_disowned``): at a chunk it hands back,
        an end of file or error, a failed write, or the session's end."""
        poller = self.handler.lane_poller()
        client, primary = self.client, self.primary
        if poller is None or client is None or primary is None:
            return
        cfd, pfd = _plain_fd(client), _plain_fd(primary)
        if cfd < 0 or pfd < 0:
            return
        client.pause_reading()
        primary.pause_reading()
        self._lane.own(poller, cfd, pfd, self._lane_disowned)

    def _lane_disowned(self, exc: BaseException | None, to_primary: bytes | None,
                       to_client: bytes | None) -> None:
        """The lane gave the sockets back: the transports read them again and
        write what the lane had not written yet. ``exc``: the lane's work on
        a chunk raised (a bug): the session ends, as when a protocol raises."""
        client, primary = self.client, self.primary
        assert client is not None and primary is not None
        for transport in (client, primary):
            if not transport.is_closing():
                transport.resume_reading()
        if to_primary is not None and not primary.is_closing():
            primary.write(to_primary)
        if to_client is not None and not client.is_closing():
            client.write(to_client)
        if exc is not None:
            asyncio.get_running_loop().call_exception_handler({
                "message": "the Postgres lane failed on a chunk; session closed",
                "exception": exc, "protocol": self})
            self.abort()

    def _handoff(self, side: int, data: bytes, state: tuple[Any, ...]) -> None:
        """The lane gives a chunk back (and stops): take its state and read
        the chunk as if the lane had never run."""
        self._take_lane(state)
        read = PgSession.primary_data if side & _BACK else PgSession.data_received
        read(self, data, not side & _UNWRITTEN)

    def _take_lane(self, state: tuple[Any, ...]) -> None:
        """What the lane counted into, set on the session (``Lane.state``)."""
        mode, skip, tail, since, answered, idle, times, counted = state
        back = self._back
        back.skip = skip
        back.tail = tail or b""
        if mode == _LANE_PLAIN:
            self._waiting_since = since
            self._answered_since = bool(answered)
            return
        self._idle = bool(idle)
        pending = self._pending
        pending.clear()
        pending.extend((t, None) for t in times)
        if counted:
            self._last_unit = None
            self._last_term = _F_SYNC

    def _reconfigured(self) -> MirrorSet | None:
        """A reload came: at this transaction boundary, drop the mirrors the
        session no longer goes to (removed, or exposure lowered) and take the
        others' new settings. With none left, the session is unmirrored from
        here on, as if sampling had left it out."""
        self._generation = self.ctx.generation
        mirrors = self.mirrors
        assert mirrors is not None
        mirrors.reconfigure(self.ctx.still_sampled, self.ctx.serving)
        self._down_until = 0.0
        if mirrors.sessions:
            self._budgets(mirrors)
            return mirrors
        self._skipped = mirrors.skipped  # the mirrors sampling left out count on
        self._stop_mirroring()
        # The unit being cut is the first the primary side counts.
        self._waiting_since = _clock()
        self._answered_since = False
        return None

    def _budgets(self, mirrors: MirrorSet) -> None:
        budgets = [m.mirror.config.queue_bytes for m in mirrors.sessions]
        self._max_unit = max(budgets)
        self._min_unit = min(budgets)

    def _desynchronised(self, side: str, kind: int, length: int) -> None:
        # The primary judges client bytes itself (and will answer with an error);
        # the gateway stops cutting units, so this session is no longer mirrored.
        log.warning("%s sent a frame with invalid length %d (type %r); mirroring stops for "
                    "this session", side, length, chr(kind),
                    extra={"listener": self.ctx.name, "session": self.peer})
        self.phase = Phase.RAW
        self._relaying = False
        self._stop_mirroring()

    # ---------------------------------------------------------------- ending

    def _stop_mirroring(self) -> None:
        mirrors = self.mirrors
        self.mirrors = None
        self._pieces.clear()
        self._held = 0
        self._stmt = None
        for _, unit in self._pending:
            if unit is not None:
                unit.settle(None)
        if mirrors is not None:
            mirrors.close()

    def _end(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self._lane is not None:
            self._lane.release()  # nothing it counted is lost: it counts as it goes
        self.phase = Phase.CLOSED
        self._relaying = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.primary is not None:
            self.primary.close()
        self._stop_mirroring()
        self._pending.clear()
        if self.backend_key is not None:
            self.handler.sessions_by_key.pop(self.backend_key, None)
        if self._registered:
            self._registered = False
            self.ctx.session_closed(self)

    def describe(self) -> dict[str, Any]:
        """The session for SHOW CLIENTS and /status (no secret: no password
        ever reaches the startup packet)."""
        params = self.startup.params if self.startup is not None else {}
        mirrors = self.mirrors
        return {
            "peer": self.peer, "since": self.opened, "state": self.phase.value,
            "user": params.get("user"),
            "database": self.startup.database if self.startup is not None else None,
            "application_name": params.get("application_name"),
            "mirrors": [s.mirror.name for s in mirrors.sessions] if mirrors else [],
        }

    def abort(self) -> None:
        if self._lane is not None:
            self._lane.release()  # before the transports close the sockets it reads
        if self.client is not None:
            self.client.abort()
        if self.primary is not None:
            self.primary.abort()
        self._end()

    def __repr__(self) -> str:
        user = self.startup.params.get("user") if self.startup else None
        return (f"<PgSession {self.peer} user={user} {self.phase.value} "
                f"pending={len(self._pending)} mirrors={self.mirrors!r}>")
