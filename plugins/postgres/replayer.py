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
from .statements import StatementRegistry, deallocated_statement, frames, resets_statements

log = logging.getLogger("mirrorgate.postgres.mirror")

_len = struct.Struct("!i").unpack_from
_READY, _ERROR, _COPY_IN, _COPY_OUT, _COPY_BOTH = (ord(c) for c in "ZEGHW")
_AUTH, _KEY, _PARSE_COMPLETE = ord("R"), ord("K"), ord("1")
_PARSE, _BIND, _DESCRIBE, _CLOSE, _QUERY = (ord(c) for c in "PBDCQ")
_NOISE = frozenset(ord(c) for c in "ANS")  # notification, notice, parameter status
_IDLE, _IN_TX, _FAILED = ord("I"), ord("T"), ord("E")
_COPY_DONE, _COPY_FAIL = ord("c"), ord("f")
_SYNC_FRAME = b"S\x00\x00\x00\x04"
_ROLLBACK = codec.query("ROLLBACK")
_DISCARD_ALL = codec.query("DISCARD ALL")
_HIGH_WATER = 256 * 1024
# Parameters that are the gateway's to set, not the client's, on a mirror.
_NOT_REPLAYED = frozenset({"user", "database", "replication"})


class MirrorConn(asyncio.Protocol):
    """One connection to a mirror server, read frame by frame."""

    def __init__(self, max_message: int) -> None:
        self.reader = codec.FrameReader(max_message)
        self.transport: asyncio.Transport | None = None
        self.lost: str | None = None
        self.status = _IDLE
        self.backend_key: tuple[int, bytes] | None = None
        self.prepared: set[bytes] = set()
        self.busy = False
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        if not self.busy:
            self._discard_noise()
        self._wake()

    def _discard_noise(self) -> None:
        # Between units a LISTENing mirror may send notifications: drop them now
        # so an idle connection holds no growing buffer.
        reader = self.reader
        while reader.buffered >= 5:
            raw = reader.peek_type()
            if raw is None or raw not in _NOISE:
                return
            if reader.next_frame() is None:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = str(exc) if exc else "the mirror closed the connection"
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def write(self, data: bytes) -> None:
        if self.lost is not None:
            raise MirrorError(self.lost)
        self.transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        if self._drained is not None:
            await self._drained
        if self.lost is not None:
            raise MirrorError(self.lost)

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the mirror.

        :raises MirrorError: the connection is gone or the mirror broke protocol.
        """
        while True:
            try:
                f = self.reader.next_frame()
            except codec.ProtocolViolation as exc:
                self.close()
                raise MirrorError(f"mirror sent a malformed message: {exc.message}") from exc
            if f is not None:
                return f
            if self.lost is not None:
                raise MirrorError(self.lost)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def until_ready(self) -> bool:
        """Read to ReadyForQuery. :returns: whether an ErrorResponse came first."""
        failed = False
        while True:
            kind, body = await self.frame()
            if kind == _READY:
                self.status = body[0]
                return failed
            if kind == _ERROR:
                failed = True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.lost is None:
            self.lost = "closed by the gateway"

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
                conn.busy = True
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
                        conn.busy = False
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

        :returns: the bytes to send, and the names of every Parse in them in
            order (b"" for the unnamed statement), to be confirmed by the
            mirror's ParseComplete answers.
        """
        prepared = conn.prepared
        pending: set[bytes] = set()  # parsed earlier in this unit
        missing: list[bytes] = []
        parses: list[bytes] = []
        view = memoryview(data)
        for kind, body, end in frames(data):
            if kind == _PARSE:
                name = codec.statement_name_of_parse(view[body:end])
                parses.append(name)
                pending.add(name)
            elif kind == _BIND or kind == _DESCRIBE:
                if kind == _BIND:
                    name = codec.statement_name_of_bind(view[body:end])
                else:
                    what, name = codec.describe_target(view[body:end])
                    if what != b"S":
                        continue
                if name and name not in prepared and name not in pending:
                    parse = self.statements.get(name)
                    if parse is not None:
                        missing.append(parse)
                        pending.add(name)
            elif kind == _CLOSE:
                what, name = codec.close_target(view[body:end])
                if what == b"S":
                    prepared.discard(name)
                    pending.discard(name)
            elif kind == _QUERY:
                sql = view[body:end]
                if resets_statements(sql):
                    prepared.clear()
                    pending.clear()
                elif (gone := deallocated_statement(sql)) is not None:
                    prepared.discard(gone)
                    pending.discard(gone)
        if missing:
            # The injected Parses run first, so their names come first.
            injected = [codec.statement_name_of_parse(memoryview(p)[5:]) for p in missing]
            return b"".join(missing) + data, injected + parses
        return data, parses

    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
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
        parsed = 0  # ParseComplete answers: the first `parsed` Parses took
        failed = False
        self._running = True
        conn.busy = True
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                conn.write(data)
                while True:
                    kind, body = await conn.frame()
                    if kind == _READY:
                        conn.status = body[0]
                        break
                    if kind == _PARSE_COMPLETE:
                        parsed += 1
                    elif kind == _ERROR:
                        failed = True
                    elif kind == _COPY_IN:
                        await self._stream_copy(unit, session, conn, deadline)
                    elif kind == _COPY_BOTH:
                        raise MirrorError("mirror started COPY BOTH (replication is not mirrored)")
        except TimeoutError:
            self._drop_conn()
            raise MirrorTimeout(f"no answer within {self.timeout:g}s") from None
        except MirrorError:
            self._drop_conn()
            raise
        except UnitCut:
            raise
        except BaseException:
            self._drop_conn()  # cancelled mid-unit: the connection is out of step
            raise
        finally:
            self._running = False
            if self.conn is not None:
                self.conn.busy = False
        # "ParseComplete" answers each Parse that succeeded; after an error the
        # server skips to Sync, so the Parses past the count did not happen.
        conn.prepared.update(name for name in parses[:parsed] if name)
        await self._follow_primary(unit, conn, session)
        return "error" if failed else "ok"

    async def _stream_copy(self, unit: Unit, session: MirrorSession, conn: MirrorConn,
                           deadline: asyncio.Timeout) -> None:
        """The mirror is in copy-in: pass it the COPY data as the client sends it."""
        extended = unit.data.endswith(_SYNC_FRAME)
        loop = asyncio.get_running_loop()
        deadline.reschedule(None)  # waiting for the client is not the mirror's fault
        try:
            async for chunk in session.chunks(unit):
                conn.write(chunk)
                deadline.reschedule(loop.time() + self.timeout)
                await conn.drain()
                deadline.reschedule(None)
        except UnitCut:
            # All or nothing: the mirror must not keep the rows it already got.
            deadline.reschedule(loop.time() + self.timeout)
            conn.write(codec.copy_fail("mirrorgate: COPY dropped for this mirror "
                                       "(queue budget exhausted)")
                       + (codec.sync() if extended else b""))
            await conn.until_ready()
            raise
        deadline.reschedule(loop.time() + self.timeout)
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
        conn.busy = True
        try:
            async with asyncio.timeout(self.timeout):
                conn.write(_ROLLBACK)
                await conn.until_ready()
        except (TimeoutError, MirrorError):
            self._drop_conn()
        finally:
            conn.busy = False

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
        conn.busy = True
        try:
            async with asyncio.timeout(self.timeout):
                if conn.status != _IDLE:
                    conn.write(_ROLLBACK)
                    await conn.until_ready()
                # "DISCARD ALL ... resets a session to its initial state":
                # prepared statements, LISTENs, temp tables, settings.
                conn.write(_DISCARD_ALL)
                if await conn.until_ready():
                    raise MirrorError("DISCARD ALL failed")
        except (TimeoutError, MirrorError):
            conn.close()
            self.pool.discard()
            return
        conn.prepared.clear()
        conn.busy = False
        conn._discard_noise()
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
