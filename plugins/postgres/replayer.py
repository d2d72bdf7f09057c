# Replaying one client session on one mirror Postgres.
#
# Owns: the gateway's own connection to a mirror (start-up with the client's
# parameters, authentication as the client's user or the mirror URL's), and
# delivering units on it: re-preparing statements the mirror missed, streaming
# a COPY, ending a COPY that cannot finish with CopyFail, rolling the mirror
# back when the rest of a transaction is dropped, resetting the connection
# (DISCARD ALL) before it returns to the pool. Everything the mirror answers is
# read and discarded: notices, notifications and parameter changes never reach
# the client.
# Must not know: the client's socket or the queue (the core drives deliver()).
from __future__ import annotations

import asyncio
import logging
import math
import struct
from typing import Any

from gateway import (
    Mirror,
    MirrorError,
    MirrorSession,
    MirrorTimeout,
    MirrorUnavailable,
    Replayer,
    Unit,
    UnitCut,
    UpstreamPool,
)

from . import codec
from .auth import AuthFailed, MirrorAuth
from .framewalk import Cursor, FrameError, walk
from .statements import StatementRegistry, deallocated_statement, resets_statements

log = logging.getLogger("mirrorgate.postgres.mirror")

_len = struct.Struct("!i").unpack_from
_READY, _ERROR, _COPY_IN, _COPY_OUT, _COPY_BOTH = (ord(c) for c in "ZEGHW")
_AUTH, _KEY, _PARSE_COMPLETE = ord("R"), ord("K"), ord("1")
_PARSE, _BIND, _DESCRIBE, _CLOSE, _QUERY = (ord(c) for c in "PBDCQ")
_STATEMENT = ord("S")  # a Describe or Close of a statement, not a portal
# The client frames that name prepared statements (or may drop them: Query).
_NAMING_ACTIONS = bytes(1 if t in b"PBDCQ" else 0 for t in range(256))
# The answer frames a replayer acts on; the rest (rows, notices,
# notifications, parameter changes) are stepped over.
_ANSWER_ACTIONS = bytes(1 if t in b"Z1EGW" else 0 for t in range(256))
_IDLE, _IN_TX, _FAILED = ord("I"), ord("T"), ord("E")
_COPY_DONE, _COPY_FAIL = ord("c"), ord("f")
_SYNC_FRAME = b"S\x00\x00\x00\x04"
_ROLLBACK = codec.query("ROLLBACK")
_DISCARD_ALL = codec.query("DISCARD ALL")
_HIGH_WATER = 256 * 1024
# Parameters that are the gateway's to set, not the client's, on a mirror.
_NOT_REPLAYED = frozenset({"user", "database", "replication"})


class MirrorConn(asyncio.Protocol):
    """One connection to a mirror server.

    During login its frames are read one by one (``frame``). After it, the
    answers to units are only stepped over with the frame walker as they
    arrive: no body is kept, and what deliver needs (ParseComplete count,
    whether an ErrorResponse came, CopyInResponse, the ReadyForQuery status)
    is tallied as the chunks come, so the worker wakes once per answer.
    A watchdog timer, armed per unit and re-armed lazily, ends a connection
    whose answer is late: one timer per ``timeout`` rather than one per unit.
    """

    def __init__(self, max_message: int) -> None:
        self.reader: codec.FrameReader | None = codec.FrameReader(max_message)
        self.transport: asyncio.Transport | None = None
        self.lost: str | None = None
        self.timed_out = False
        self.status = _IDLE
        self.backend_key: tuple[int, bytes] | None = None
        self.prepared: set[bytes] = set()
        # The answer being read (reset by expect()).
        self.ready = False
        self.parsed = 0
        self.failed = False
        self.copy_in = False
        self._cursor = Cursor()
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._deadline = math.inf
        self._timeout = 0.0
        self._watch: asyncio.TimerHandle | None = None
        # When _watch fires: uvloop's TimerHandle.when() costs about 500
        # instructions, and arm() runs per unit.
        self._watch_at = math.inf

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self._walk(data)
        else:
            self.reader.feed(data)
            self._wake()

    def logged_in(self) -> None:
        """Login is over: from now on answers are walked, not buffered."""
        reader = self.reader
        self.reader = None
        if reader is not None and reader.buffered:
            self._walk(reader.take_buffered())

    def _walk(self, data: bytes) -> None:
        data, hits, bad = self._cursor.walk(data, _ANSWER_ACTIONS)
        if bad is not None:
            self._fail(f"mirror sent a malformed message: invalid length {bad[2]} "
                       f"(type {chr(bad[1])!r})")
            return
        if not hits:
            return
        n = len(data)
        for kind, begin, end in hits:
            if kind == _READY:
                if end > n:
                    # Split before its status byte: read it whole next time.
                    self._cursor.hold(data, begin)
                    break
                self.status = data[begin + 5]
                self.ready = True
            elif kind == _PARSE_COMPLETE:
                self.parsed += 1
            elif kind == _ERROR:
                self.failed = True
            elif kind == _COPY_IN:
                self.copy_in = True
            else:  # CopyBothResponse
                self._fail("mirror started COPY BOTH (replication is not mirrored)")
                return
        self._wake()

    def _fail(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        if self.transport is not None:
            self.transport.abort()
        self._wake()
        self._release_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = str(exc) if exc else "the mirror closed the connection"
        self._wake()
        self._release_drain()

    def _release_drain(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        self._release_drain()
        self._drained = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- the deadline --

    def arm(self, timeout: float) -> None:
        """The mirror has ``timeout`` seconds from now to answer."""
        self._timeout = timeout
        self._deadline = deadline = self._loop.time() + timeout
        if self._watch is None:
            self._watch_at = deadline
            self._watch = self._loop.call_at(deadline, self._check)
        elif deadline < self._watch_at:  # a shorter timeout since (a reload)
            self._watch.cancel()
            self._watch_at = deadline
            self._watch = self._loop.call_at(deadline, self._check)

    def disarm(self) -> None:
        """Nothing is asked of the mirror (between units, or waiting for the client)."""
        self._deadline = math.inf

    def _check(self) -> None:
        self._watch = None
        if self.lost is not None or self._deadline == math.inf:
            return
        if self._loop.time() >= self._deadline:
            self.timed_out = True
            self._fail(f"no answer within {self._timeout:g}s")
        else:
            self._watch_at = self._deadline
            self._watch = self._loop.call_at(self._deadline, self._check)

    def _error(self) -> Exception:
        assert self.lost is not None
        if self.timed_out:
            return MirrorTimeout(self.lost)
        return MirrorError(self.lost)

    # -- asking --

    def write(self, data: bytes) -> None:
        if self.lost is not None:
            raise self._error()
        self.transport.write(data)  # type: ignore[union-attr]

    def expect(self) -> None:
        """A new request goes out: forget what the last answer said."""
        self.ready = False
        self.parsed = 0
        self.failed = False
        self.copy_in = False

    async def answer(self) -> None:
        """Wait for the ReadyForQuery that ends the answer, or a CopyInResponse.

        :raises MirrorTimeout: the deadline passed.
        :raises MirrorError: the connection is gone or the mirror broke protocol.
        """
        while not self.ready and not self.copy_in:
            if self.lost is not None:
                raise self._error()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def ask(self, request: bytes, timeout: float) -> bool:
        """Send a request of the gateway's own and read its answer in ``timeout``.

        :returns: whether an ErrorResponse came.
        """
        self.expect()
        self.arm(timeout)
        self.write(request)
        try:
            return await self.until_ready()
        finally:
            self.disarm()

    async def until_ready(self) -> bool:
        """Read to ReadyForQuery. :returns: whether an ErrorResponse came first."""
        while True:
            await self.answer()
            if self.ready:
                return self.failed
            self.copy_in = False  # not asked for here; the server will say so

    async def drain(self) -> None:
        if self._drained is not None:
            await self._drained
        if self.lost is not None:
            raise self._error()

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the mirror, during login.

        :raises MirrorError: the connection is gone or the mirror broke protocol.
        """
        reader = self.reader
        assert reader is not None, "frames are read one by one during login only"
        while True:
            try:
                f = reader.next_frame()
            except codec.ProtocolViolation as exc:
                self.close()
                raise MirrorError(f"mirror sent a malformed message: {exc.message}") from exc
            if f is not None:
                return f
            if self.lost is not None:
                raise MirrorError(self.lost)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.lost is None:
            self.lost = "closed by the gateway"
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def __repr__(self) -> str:
        return (f"<MirrorConn status={chr(self.status)} prepared={len(self.prepared)} "
                f"lost={self.lost!r}>")


class PgReplayer(Replayer):
    """Replays one client session's units on one mirror."""

    def __init__(self, mirror: Mirror, pool: UpstreamPool[Any], params: dict[str, str],
                 statements: StatementRegistry, max_message: int, session: str = "?") -> None:
        upstream = mirror.upstream
        self.mirror = mirror
        self.session = session  # the client's address, for log lines
        self.pool = pool
        self.timeout: float = mirror.config.timeout
        self.statements = statements
        self.max_message = max_message
        client_user = params.get("user", "")
        self.user: str = upstream.user or client_user
        self.database: str = upstream.database or params.get("database") or client_user
        self.password: str | None = upstream.users.get(self.user, upstream.password)
        startup = {k: v for k, v in params.items() if k not in _NOT_REPLAYED}
        startup = {"user": self.user, "database": self.database, **startup}
        self.startup = startup
        self.key = tuple(sorted(startup.items()))
        self.conn: MirrorConn | None = None
        self._refused: str | None = None  # this session cannot log in to the mirror
        self._running = False
        # The primary failed a statement of the open transaction that the mirror
        # ran (so the mirror is in T where the primary is in E): the mirror keeps
        # its transaction in case the client recovers (ROLLBACK TO SAVEPOINT),
        # and is rolled back before the unit that ends the primary's.
        self._diverged = False

    # -- connection --

    async def _connection(self) -> MirrorConn:
        conn = self.conn
        if conn is not None and conn.lost is None:
            return conn
        if conn is not None:
            in_transaction = conn.status != _IDLE
            self._drop_conn()
            if in_transaction:
                # A new connection would run the rest of the transaction in
                # autocommit: drop it instead (the core drops the rest of the
                # group) and reconnect at the next transaction boundary.
                raise MirrorError("mirror connection lost inside a transaction")
        if self._refused is not None:
            raise MirrorUnavailable(self._refused)
        pool = self.pool
        if not pool.available():
            raise MirrorUnavailable(f"{pool.name} is backing off after failures")
        while (idle := pool.take(self.key)) is not None:
            if idle.lost is None:
                self.conn = idle
                return idle
            pool.discard()
        if not pool.reserve():
            # design.md §5: a session that finds no free connection is not
            # mirrored; all its units are counted mirror_unavailable.
            self._refused = f"no free connection to {pool.name} (pool_size {pool.capacity})"
            raise MirrorUnavailable(self._refused)
        try:
            conn = await self._open()
        except BaseException:
            pool.discard()
            raise
        pool.connect_succeeded()
        self.conn = conn
        return conn

    async def _open(self) -> MirrorConn:
        upstream = self.mirror.upstream
        loop = asyncio.get_running_loop()
        conn: MirrorConn | None = None
        try:
            async with asyncio.timeout(self.timeout):
                _, conn = await loop.create_connection(
                    lambda: MirrorConn(self.max_message), upstream.host, upstream.port)
                conn.write(codec.startup_message(self.startup))
                auth = MirrorAuth(self.user, self.password)
                while True:
                    kind, body = await conn.frame()
                    if kind == _AUTH:
                        out = auth.receive(*codec.authentication_request(body))
                        if out:
                            conn.write(out)
                    elif kind == _KEY:
                        conn.backend_key = codec.backend_key(body)
                    elif kind == _ERROR:
                        msg = codec.format_error(codec.error_fields(body))
                        raise AuthFailed(msg)
                    elif kind == _READY:
                        conn.status = body[0]
                        conn.logged_in()
                        return conn
        except AuthFailed as exc:
            # The mirror refused this session (user, password, database): other
            # sessions may still log in, so no backoff for the whole upstream.
            if conn is not None:
                conn.close()
            self._refused = f"mirror {self.mirror.name} refused {self.user}@{self.database}: " \
                            f"{exc.message}"
            log.warning("mirror refused the login: %s", exc.message,
                        extra={"listener": self.mirror.stats.listener, "session": self.session,
                               "mirror": self.mirror.name, "upstream": upstream.name,
                               "user": self.user,
                               "database": self.database})
            raise MirrorUnavailable(self._refused) from exc
        except (OSError, TimeoutError, MirrorError) as exc:
            if conn is not None:
                conn.close()
            self.pool.connect_failed()
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            log.warning("mirror unreachable at %s:%d: %s; backing off", upstream.host,
                        upstream.port, getattr(exc, "strerror", None) or reason,
                        extra={"listener": self.mirror.stats.listener, "session": self.session,
                               "mirror": self.mirror.name, "upstream": upstream.name})
            raise MirrorUnavailable(reason) from exc

    def _drop_conn(self) -> None:
        conn = self.conn
        self.conn = None
        self._diverged = False
        if conn is not None:
            conn.close()
            self.pool.discard()

    # -- delivering --

    def _with_statements(self, conn: MirrorConn, data: bytes) -> tuple[bytes, list[bytes]]:
        """Prefix Parse frames for named statements this mirror connection lacks.

        One call of the frame walker finds the frames that name statements;
        a unit of Binds to statements the connection has (most units) costs
        a set lookup per Bind. A frame too malformed to name its statement
        is left for the mirror to refuse, as the primary did.

        :returns: the bytes to send, and the names of every Parse in them in
            order (b"" for the unnamed statement), to be confirmed by the
            mirror's ParseComplete answers.
        """
        try:
            _, hits = walk(data, 0, _NAMING_ACTIONS)
        except FrameError as exc:
            _, hits = walk(data[:exc.args[0]], 0, _NAMING_ACTIONS)
        prepared = conn.prepared
        pending: set[bytes] = set()  # parsed earlier in this unit
        missing: list[bytes] = []
        parses: list[bytes] = []
        find = data.find
        for kind, body, end in hits:
            body += 5
            if kind == _BIND:
                # Portal name, then statement name.
                nul = find(b"\0", body, end)
                stop = find(b"\0", nul + 1, end) if nul >= 0 else -1
                if stop < 0:
                    continue
                name = data[nul + 1:stop]
            elif kind == _PARSE:
                stop = find(b"\0", body, end)
                if stop >= 0:
                    name = data[body:stop]
                    parses.append(name)
                    pending.add(name)
                continue
            elif kind == _QUERY:
                sql = memoryview(data)[body:end]
                if resets_statements(sql):
                    prepared.clear()
                    pending.clear()
                elif (gone := deallocated_statement(sql)) is not None:
                    prepared.discard(gone)
                    pending.discard(gone)
                continue
            else:  # Describe or Close: 'S' for a statement, then its name
                stop = find(b"\0", body + 1, end)
                if stop < 0 or data[body] != _STATEMENT:
                    continue
                name = data[body + 1:stop]
                if kind == _CLOSE:
                    prepared.discard(name)
                    pending.discard(name)
                    continue
            if name and name not in prepared and name not in pending:
                parse = self.statements.get(name)
                if parse is not None:
                    missing.append(parse)
                    pending.add(name)
        if missing:
            # The injected Parses run first, so their names come first.
            injected = [codec.statement_name_of_parse(memoryview(p)[5:]) for p in missing]
            return b"".join(missing) + data, injected + parses
        return data, parses

    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
        conn = self.conn
        if conn is None or conn.lost is not None:
            conn = await self._connection()
        if self._diverged and conn.status == _IN_TX:
            # The primary's transaction is aborted, the mirror's is not: if this
            # unit ends the primary's (its COMMIT is a rollback there), the
            # mirror must not commit it. The primary's answer tells.
            primary = unit.result if unit.settled else await unit.wait_settled()
            if primary != _IN_TX and primary != _FAILED:
                await self.abort_group()
            conn = await self._connection()
        data, parses = self._with_statements(conn, unit.data)
        self._running = True
        try:
            conn.expect()
            conn.arm(self.timeout)
            conn.write(data)
            await conn.answer()
            while not conn.ready:  # CopyInResponse: the mirror waits for the data
                conn.copy_in = False
                await self._stream_copy(unit, session, conn)
                await conn.answer()
        except (MirrorTimeout, MirrorError):
            self._drop_conn()
            raise
        except UnitCut:
            conn.disarm()
            raise
        except BaseException:
            self._drop_conn()  # cancelled mid-unit: the connection is out of step
            raise
        finally:
            self._running = False
        conn.disarm()
        if parses:
            # "ParseComplete" answers each Parse that succeeded; after an error
            # the server skips to Sync, so the Parses past the count did not happen.
            conn.prepared.update(name for name in parses[:conn.parsed] if name)
        failed = conn.failed
        # _follow_primary has nothing to do for a unit the primary settled in
        # the mirror's state, out of a divergence: no coroutine for it then.
        if not unit.settled or unit.result != conn.status or self._diverged:
            await self._follow_primary(unit, conn, session)
        return "error" if failed else "ok"

    async def _stream_copy(self, unit: Unit, session: MirrorSession, conn: MirrorConn) -> None:
        """The mirror is in copy-in: pass it the COPY data as the client sends it."""
        extended = unit.data.endswith(_SYNC_FRAME)
        conn.disarm()  # waiting for the client is not the mirror's fault
        try:
            async for chunk in session.chunks(unit):
                conn.arm(self.timeout)
                conn.write(chunk)
                await conn.drain()
                conn.disarm()
        except UnitCut:
            # All or nothing: the mirror must not keep the rows it already got.
            conn.arm(self.timeout)
            conn.write(codec.copy_fail("mirrorgate: COPY dropped for this mirror "
                                       "(queue budget exhausted)")
                       + (codec.sync() if extended else b""))
            await conn.until_ready()
            raise
        conn.arm(self.timeout)
        if unit.meta not in (_COPY_DONE, _COPY_FAIL):
            # The client's COPY never finished (it went away, or the primary
            # failed): end it on the mirror without applying it.
            conn.write(codec.copy_fail("mirrorgate: the client's COPY did not complete")
                       + (codec.sync() if extended else b""))

    async def _follow_primary(self, unit: Unit, conn: MirrorConn,
                              session: MirrorSession) -> None:
        """Keep the mirror's transaction state in step with the primary's."""
        primary = unit.result if unit.settled else await unit.wait_settled()
        mirror = conn.status
        if primary == _IN_TX:
            self._diverged = False  # in step again (e.g. ROLLBACK TO SAVEPOINT)
        if primary is None or primary == mirror:
            return
        if primary == _FAILED and mirror == _IN_TX:
            # A statement failed on the primary alone. The client may recover
            # (ROLLBACK TO SAVEPOINT undoes the mirror's run of it too) or end
            # the transaction; deliver() rolls the mirror back in the latter case.
            self._diverged = True
        elif primary == _IDLE:
            # The primary ended the transaction the mirror is still in: roll
            # the mirror back rather than let it commit on its own.
            await self.abort_group()

    # -- the Replayer contract --

    def reconfigure(self) -> None:
        # The connection, its user and database stay as the session opened
        # them; only the per-unit timeout follows a reload.
        self.timeout = self.mirror.config.timeout

    def unavailable(self) -> bool:
        conn = self.conn
        if conn is not None and conn.lost is None:
            return False
        return self._refused is not None or not self.pool.available()

    def retry_at(self) -> float:
        conn = self.conn
        if conn is not None and conn.lost is None:
            return 0.0
        if self._refused is not None:
            return math.inf  # refused for this session: never
        return self.pool.retry_at()

    async def ends_group(self, unit: Unit) -> bool:
        status = unit.result if unit.settled else await unit.wait_settled()
        return status is None or status == _IDLE

    async def abort_group(self) -> None:
        self._diverged = False
        conn = self.conn
        if conn is None or conn.lost is not None or conn.status == _IDLE:
            return
        try:
            await conn.ask(_ROLLBACK, self.timeout)
        except (MirrorTimeout, MirrorError):
            self._drop_conn()

    def cancel(self) -> None:
        conn = self.conn
        if not self._running or conn is None or conn.backend_key is None:
            return
        pid, key = conn.backend_key
        upstream = self.mirror.upstream
        asyncio.get_running_loop().create_task(
            _send_cancel(upstream.host, upstream.port, codec.cancel_request(pid, key),
                         self.timeout))

    async def close(self) -> None:
        conn = self.conn
        self.conn = None
        if conn is None:
            return
        if conn.lost is not None:
            self.pool.discard()
            return
        try:
            if conn.status != _IDLE:
                await conn.ask(_ROLLBACK, self.timeout)
            # "DISCARD ALL ... resets a session to its initial state":
            # prepared statements, LISTENs, temp tables, settings.
            if await conn.ask(_DISCARD_ALL, self.timeout):
                raise MirrorError("DISCARD ALL failed")
        except (MirrorTimeout, MirrorError):
            conn.close()
            self.pool.discard()
            return
        conn.prepared.clear()
        self.pool.put(self.key, conn)

    def __repr__(self) -> str:
        return (f"<PgReplayer {self.mirror.name} {self.user}@{self.database} "
                f"conn={self.conn!r} refused={self._refused is not None}>")


async def _send_cancel(host: str, port: int, packet: bytes, timeout: float) -> None:
    """Deliver a CancelRequest on a fresh connection; best effort, errors ignored."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(packet)
            await writer.drain()
    except (OSError, TimeoutError):
        pass
    finally:
        if writer is not None:
            writer.close()
