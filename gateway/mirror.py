# Mirror queues and workers: how a unit travels from a client session to a mirror.
#
# Owns: Unit (what is offered), MirrorSession (one client session's FIFO to one
# mirror, with the worker that drains it), MirrorSet (what a protocol session
# offers to), Mirror (one [[listener.mirror]] at run time), the Replayer
# contract a protocol plugin fulfils, and the exceptions that turn into drop
# reasons.
# Must not know: any protocol's bytes. Grouping (a Postgres transaction) is
# asked of the replayer through ``ends_group``; the core only applies the rule
# "a drop inside a group drops the rest of that group".
#
# Why not anyio memory object streams for the queue: a drop must be able to
# look at what is queued (the rest of a transaction is dropped with it) and the
# byte budget spans every session of a mirror; a deque with one waiter future
# does both and costs one append per offer.
from __future__ import annotations

import abc
import asyncio
import collections
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from .accounting import DropReason, MirrorStats

__all__ = [
    "Mirror", "MirrorError", "MirrorSession", "MirrorSet", "MirrorTimeout",
    "MirrorUnavailable", "Replayer", "Unit", "UnitCut",
]

_clock = time.monotonic
log = logging.getLogger("mirrorgate.mirror")


class MirrorUnavailable(Exception):
    """The mirror could not be reached, or no connection to it was free."""


class MirrorTimeout(Exception):
    """The mirror did not answer within the mirror's ``timeout``."""


class MirrorError(Exception):
    """The mirror connection broke or spoke out of protocol."""


class UnitCut(Exception):
    """A streamed unit lost its tail for this mirror (its budget ran out).

    The replayer must end what it started on the mirror (Postgres: CopyFail) so
    the mirror never applies half a unit.
    """

    def __init__(self, reason: DropReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class Unit:
    """One mirrorable piece of a client session (a Postgres request cycle, an HTTP request).

    Shared by the sessions of every mirror it is offered to, so its bytes are
    held once. A unit may grow after it is offered (a COPY streamed as it
    arrives): ``extend`` adds chunks until ``close``. ``settle`` records what
    the primary made of it (for Postgres, its transaction status afterwards),
    which replayers may await.
    """

    __slots__ = (
        "data", "size", "offered_at", "chunks", "refs", "closed", "result",
        "settled", "meta", "_waiters",
    )

    def __init__(self, data: bytes, *, closed: bool = True) -> None:
        self.data = data
        self.size = len(data)
        self.offered_at = _clock()
        # Chunks a streamed unit gained, and per chunk the mirror sessions yet
        # to read it; shared empty tuples until MirrorSet.extend, since almost
        # no unit grows.
        self.chunks: list[bytes | None] = _NO_CHUNKS  # type: ignore[assignment]
        self.refs: list[int] = _NO_CHUNKS  # type: ignore[assignment]
        self.closed = closed
        self.result: Any = None
        self.settled = False
        self.meta: Any = None  # free for the protocol that cut the unit
        self._waiters: list[asyncio.Future[None]] | None = None

    def _wake(self) -> None:
        if self._waiters:
            for w in self._waiters:
                if not w.done():
                    w.set_result(None)
            self._waiters = None

    async def _changed(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        await fut

    def grow(self, chunk: bytes) -> None:
        """Append a chunk (its readers are set by MirrorSet.extend)."""
        if self.chunks is _NO_CHUNKS:
            self.chunks, self.refs = [], []
        self.chunks.append(chunk)
        self.refs.append(0)
        self.size += len(chunk)

    def settle(self, result: Any) -> None:
        """Record the primary's verdict on this unit; it gains no more chunks.

        Called once, by the protocol.
        """
        self.result = result
        self.settled = True
        self.closed = True
        if self._waiters:
            self._wake()

    async def wait_settled(self) -> Any:
        while not self.settled:
            await self._changed()
        return self.result

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._wake()

    def __repr__(self) -> str:
        return (
            f"<Unit {self.size}B chunks={len(self.chunks)} closed={self.closed} "
            f"settled={self.settled} result={self.result!r}>"
        )


_NO_CHUNKS: tuple[()] = ()


class _Changes:
    """How many times a mirror queue, any of them, gave up a unit, released
    bytes or closed: the only events (besides time) after which an offer
    that was refused may be taken. A protocol whose session asked
    ``MirrorSet.down_until`` need not ask again while this stays the same.

    One counter for every mirror: a connection pool, whose backoff also
    decides refusals, is shared by mirrors of several listeners, and its
    backoff starts or ends only while a worker delivers a unit, which then
    leaves its queue.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


CHANGES = _Changes()


class _Dropped:
    """Queue marker: units were dropped here; the worker must close their group."""

    __slots__ = ("unit",)

    def __init__(self, unit: Unit) -> None:
        self.unit = unit


class Replayer(abc.ABC):
    """Delivers one client session's units to one mirror (a protocol plugin's part).

    One instance per (client session, mirror). The core calls it from one
    worker task, one unit at a time, in order.
    """

    @abc.abstractmethod
    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
        """Send ``unit`` to the mirror and read the mirror's whole answer.

        Chunks added to a streamed unit come from ``session.chunks(unit)``.

        :returns: the outcome label (Postgres ``ok``/``error``, HTTP ``2xx``...).
        :raises MirrorUnavailable: no connection could be had.
        :raises MirrorTimeout: the mirror did not answer in time.
        :raises MirrorError: the connection broke.
        :raises UnitCut: a streamed unit was cut for this mirror.
        """

    def unavailable(self) -> bool:
        """True while the mirror is known to be unreachable (connect backoff).

        Checked at each offer, so that units are dropped there, counted
        ``mirror_unavailable``, without waking the worker: a dead mirror then
        costs the relay a few counter increments per unit.
        """
        return False

    def retry_at(self) -> float:
        """While ``unavailable``: when (``time.monotonic``) it may change, or
        ``inf`` if never for this session; 0.0 otherwise or when unknown.

        Lets a protocol stop cutting units for a session whose every mirror is
        down, counting them as ``mirror_unavailable`` drops instead, until then.
        """
        return 0.0

    async def ends_group(self, unit: Unit) -> bool:
        """Whether the primary left no group (transaction) open after ``unit``.

        May wait for the primary's answer. The default: every unit stands alone.
        """
        return True

    async def abort_group(self) -> None:  # noqa: B027 - optional hook
        """Undo what the mirror did of the current group (Postgres: ROLLBACK)."""

    def cancel(self) -> None:  # noqa: B027 - optional hook
        """Best effort: ask the mirror to stop the unit it is running."""

    def reconfigure(self) -> None:  # noqa: B027 - optional hook
        """A reload changed the mirror's settings (``mirror.config``): read
        again what was taken from them (timeouts, header rewrites). Called
        between units, at the protocol's next boundary."""

    @abc.abstractmethod
    async def close(self) -> None:
        """The session is over: give the mirror connection back or close it."""


class MirrorSession:
    """One client session's bounded FIFO to one mirror, and the worker draining it."""

    def __init__(self, mirror: Mirror, replayer: Replayer) -> None:
        self.mirror = mirror
        self.stats = mirror.stats
        self.replayer = replayer
        self._q: collections.deque[Unit | _Dropped] = collections.deque()
        self._units = 0  # units in _q (drop markers take no slot)
        self._limit = mirror.config.queue
        self._budget = mirror.config.queue_bytes
        # unit -> [bytes charged, next chunk to read, chunks accepted]
        self._held: dict[Unit, list[int]] = {}
        self._cut: dict[Unit, DropReason] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._aborted = False
        self._bug_logged = False
        self._current: Unit | None = None
        # Why offers are refused, as MirrorSet.down_until last found.
        self.dark_reason = DropReason.QUEUE_FULL
        # The sampling fraction this session was taken at (Postgres exposure),
        # so that a reload lowering it keeps the same share of live sessions.
        self.sampled_at = 1.0

    def refresh(self) -> None:
        """Take the mirror's settings again after a reload (queue bounds,
        and whatever the replayer read from them)."""
        self._limit = self.mirror.config.queue
        self._budget = self.mirror.config.queue_bytes
        self.replayer.reconfigure()

    # -- the offering side (synchronous, called from the protocol relay) --

    def offer(self, unit: Unit) -> bool:
        """Queue ``unit`` without waiting; a full queue is a counted drop.

        :returns: whether it was dropped.
        """
        size = unit.size
        reason = self._refusing(size)
        if reason is None:
            self._q.append(unit)
            self._units += 1
            self._held[unit] = [size, len(unit.chunks), len(unit.chunks)]
            self.stats.offer_queued(size)
            self._wake()
            return False
        self.stats.offer_dropped(reason)
        if reason is not DropReason.SHUTDOWN:
            self._mark_dropped(unit)
        return True

    def _refusing(self, size: int) -> DropReason | None:
        """Why an offer of ``size`` bytes would be dropped now; None if it
        would be queued."""
        if self._closed:
            return DropReason.SHUTDOWN
        if size > self._budget:
            return DropReason.TOO_LARGE
        if self.replayer.unavailable():
            return DropReason.MIRROR_UNAVAILABLE
        if self._units >= self._limit or self.stats.queued_bytes + size > self._budget:
            return DropReason.QUEUE_FULL
        return None

    def refused(self, size: int) -> bool:
        """Count the drop an ``offer`` of ``size`` bytes would be now, if it
        would be one, with nothing queued.

        Lets a protocol that knows a unit's size before it has the unit (an
        HTTP request's Content-Length) skip gathering what would be dropped.
        No drop marker is queued, so only for a unit that is a group of its
        own.

        :returns: whether it was refused (and counted).
        """
        reason = self._refusing(size)
        if reason is None:
            return False
        self.stats.offer_dropped(reason)
        return True

    def refusal(self) -> tuple[float, DropReason]:
        """While an offer would be dropped whatever its size: until when
        (``time.monotonic``; ``inf`` when only a change of a queue can end
        it, see ``CHANGES``; the present time when unknown; 0.0 when one may
        be queued), and the reason such a drop is counted under."""
        if self._closed:
            return math.inf, DropReason.SHUTDOWN
        if self.replayer.unavailable():
            return self.replayer.retry_at() or _clock(), DropReason.MIRROR_UNAVAILABLE
        if self._units >= self._limit or self.stats.queued_bytes >= self._budget:
            return math.inf, DropReason.QUEUE_FULL
        return 0.0, DropReason.QUEUE_FULL

    def drop_unoffered(self, size: int, times: int = 1) -> None:
        """Count a unit of ``size`` bytes (``times`` such units) that was not
        cut while this mirror refused units (``refusal``): the drop ``offer``
        would have counted, with nothing queued.

        Only for units outside any group the worker has seen (the protocol
        stops cutting at a group boundary), so no drop marker is needed.
        """
        self.stats.offer_dropped(self._refusing(size) or DropReason.QUEUE_FULL, times)

    def extend(self, unit: Unit, chunk: bytes) -> bool:
        """Charge a chunk that ``unit`` gained; cut the unit if the budget is gone.

        :returns: whether this session will read the chunk.
        """
        held = self._held.get(unit)
        if held is None or unit in self._cut:
            return False  # dropped or finished for this mirror
        stats = self.stats
        if stats.queued_bytes + len(chunk) > self._budget:
            self._cut[unit] = DropReason.QUEUE_FULL
            self._wake()
            return False
        held[0] += len(chunk)
        held[2] = len(unit.chunks)
        stats.queued_grew(len(chunk))
        return True

    def _mark_dropped(self, unit: Unit) -> None:
        # The marker does not wake the worker: it is dealt with before the next
        # queued unit (or at close), so a run of drops costs no task switch.
        q = self._q
        if q and isinstance(q[-1], _Dropped):
            q[-1].unit = unit  # the group question is asked of the latest drop
        else:
            q.append(_Dropped(unit))

    def close(self) -> None:
        """No more units: the worker delivers what is queued, then ends."""
        self._closed = True
        CHANGES.count += 1
        self._wake()

    def abort(self, reason: DropReason = DropReason.SHUTDOWN) -> None:
        """Drop everything queued now; the worker stops after its current unit."""
        self._closed = True
        self._aborted = True
        CHANGES.count += 1
        while self._q:
            item = self._q.popleft()
            if isinstance(item, Unit):
                self._units -= 1
                self.stats.queued_dropped(reason)
                self._finish(item)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- the worker side --

    @property
    def oldest(self) -> float | None:
        """When the oldest queued unit was offered (for the lag gauge)."""
        for item in self._q:
            if isinstance(item, Unit):
                return item.offered_at
        return None

    async def chunks(self, unit: Unit) -> AsyncIterator[bytes]:
        """The chunks a streamed unit gains, until it is closed.

        :raises UnitCut: the unit was cut for this mirror.
        """
        held = self._held[unit]
        while True:
            reason = self._cut.get(unit)
            if reason is not None:
                raise UnitCut(reason)
            i = held[1]
            if i < held[2]:
                chunk = unit.chunks[i]
                assert chunk is not None
                held[1] = i + 1
                held[0] -= len(chunk)
                self.stats.release_bytes(len(chunk))
                CHANGES.count += 1
                _unref(unit, i)
                yield chunk
                continue
            if unit.closed:
                return
            await self._wait_unit(unit)

    async def _wait_unit(self, unit: Unit) -> None:
        # Woken by Unit.extend/close (through unit waiters) or by a cut here.
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiter = fut
        unit_wait = asyncio.ensure_future(unit._changed())
        try:
            await asyncio.wait((fut, unit_wait), return_when=asyncio.FIRST_COMPLETED)
        finally:
            unit_wait.cancel()
            self._waiter = None

    def _finish(self, unit: Unit) -> None:
        held = self._held.pop(unit, None)
        if held is None:
            return
        self.stats.release_bytes(held[0])
        CHANGES.count += 1
        self._cut.pop(unit, None)
        for i in range(held[1], held[2]):
            _unref(unit, i)  # chunks this session will never read

    async def run(self) -> None:
        """Drain the queue in order until the session closes; never raises."""
        stats = self.stats
        replayer = self.replayer
        loop = asyncio.get_running_loop()
        q = self._q
        skipping = False
        try:
            while True:
                item: Unit | _Dropped
                if not q:
                    if self._closed:
                        break
                    # Woken by offer, close, abort or a drop marker's group end.
                    self._waiter = fut = loop.create_future()
                    try:
                        await fut
                    finally:
                        self._waiter = None
                    continue
                item = q.popleft()
                if type(item) is Unit:
                    self._units -= 1
                    CHANGES.count += 1  # a slot is free
                if isinstance(item, _Dropped):
                    if not skipping:
                        await self._abort_group()
                    skipping = not await replayer.ends_group(item.unit)
                    continue
                unit = item
                if skipping:
                    stats.queued_dropped(DropReason.TRANSACTION_ABORTED)
                    self._finish(unit)
                    skipping = not await replayer.ends_group(unit)
                    continue
                stats.start()
                self._current = unit
                started = _clock()
                reason: DropReason | None = None
                try:
                    outcome = await replayer.deliver(unit, self)
                except MirrorUnavailable:
                    reason = DropReason.MIRROR_UNAVAILABLE
                except MirrorTimeout:
                    reason = DropReason.MIRROR_TIMEOUT
                except MirrorError:
                    reason = DropReason.MIRROR_ERROR
                except UnitCut as cut:
                    reason = cut.reason
                except Exception:
                    # A replayer bug costs this unit, never the gateway: other
                    # sessions and listeners share the process.
                    if not self._bug_logged:
                        self._bug_logged = True
                        mirror = self.mirror
                        log.exception("replayer failed; unit dropped as mirror_error",
                                      extra={"listener": mirror.stats.listener,
                                             "mirror": mirror.name,
                                             "upstream": getattr(mirror.upstream, "name",
                                                                 None)})
                    reason = DropReason.MIRROR_ERROR
                finally:
                    self._current = None
                if reason is None:
                    stats.delivered_as(outcome, _clock() - started)
                    self._finish(unit)
                else:
                    stats.in_flight_dropped(reason)
                    self._finish(unit)
                    await self._abort_group()
                    skipping = not await replayer.ends_group(unit)
        except asyncio.CancelledError:
            self._drop_rest(DropReason.SHUTDOWN)
            raise
        finally:
            self._drop_rest(DropReason.SHUTDOWN)
            self.mirror.sessions.discard(self)
            await _shielded_close(replayer)

    async def _abort_group(self) -> None:
        if not self._aborted:
            try:
                await self.replayer.abort_group()
            except Exception:  # noqa: BLE001 - a failed undo leaves nothing more to undo
                pass

    def _drop_rest(self, reason: DropReason) -> None:
        if self._current is not None:
            self.stats.in_flight_dropped(reason)
            self._finish(self._current)
            self._current = None
        while self._q:
            item = self._q.popleft()
            if isinstance(item, Unit):
                self._units -= 1
                self.stats.queued_dropped(reason)
                self._finish(item)

    def __repr__(self) -> str:
        return (
            f"<MirrorSession {self.mirror.name} queued={self._units} "
            f"closed={self._closed} current={self._current!r}>"
        )


def _unref(unit: Unit, index: int) -> None:
    # The last reader frees a chunk, so a long COPY is never held whole.
    refs = unit.refs
    refs[index] -= 1
    if refs[index] <= 0:
        unit.chunks[index] = None


async def _shielded_close(replayer: Replayer) -> None:
    task = asyncio.ensure_future(replayer.close())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        pass
    except Exception:  # noqa: BLE001 - a failing close must not take the worker down
        pass


class Mirror:
    """One [[listener.mirror]] at run time: its config, counters and live sessions.

    A reload changes ``config`` and ``upstream`` in place, so the counters
    carry on; a mirror the new config no longer has is ``retired``: live
    sessions close their queue to it at their next boundary, and it takes no
    new session.
    """

    def __init__(self, listener: str, config: Any, upstream: Any,
                 spawn: Callable[..., Any]) -> None:
        self.config = config
        self.upstream = upstream
        self.name: str = config.name
        self.stats = MirrorStats(listener, self.name)
        self.sessions: set[MirrorSession] = set()
        self.retired = False
        self._spawn = spawn

    def reconfigure(self, config: Any, upstream: Any) -> None:
        self.config = config
        self.upstream = upstream
        self.retired = False

    def open_session(self, replayer: Replayer) -> MirrorSession:
        """A queue and a worker for one client session."""
        session = MirrorSession(self, replayer)
        self.sessions.add(session)
        self._spawn(session.run)
        return session

    def lag(self) -> float:
        """Age in seconds of the oldest queued unit across sessions."""
        oldest = min((t for s in self.sessions if (t := s.oldest) is not None), default=None)
        return 0.0 if oldest is None else max(0.0, _clock() - oldest)

    def __repr__(self) -> str:
        return f"<Mirror {self.name} sessions={len(self.sessions)} {self.stats!r}>"


class MirrorSet:
    """What one client session offers its units to: sampled mirrors, and skipped ones."""

    __slots__ = ("sessions", "skipped", "down", "changes", "asked", "_dark")

    def __init__(self, sessions: list[MirrorSession], skipped: list[MirrorStats]) -> None:
        self.sessions = sessions
        self.skipped = skipped
        self.down = False  # every mirror dropped the last unit offered
        # The counter of queue changes (``CHANGES``; a slot, the quickest
        # read): while ``asked`` equals its count, what ``down_until`` found
        # still holds until the time it gave.
        self.changes = CHANGES
        self.asked = -1
        # Set by down_until while every mirror refuses: each session then
        # holds the reason its drops are counted under (dark_reason), so that
        # drop_unoffered costs a counter update per mirror.
        self._dark = False

    def __bool__(self) -> bool:
        return bool(self.sessions)

    def offer(self, unit: Unit) -> None:
        down = 0
        for s in self.sessions:
            down += s.offer(unit)
        self.down = down == len(self.sessions)
        for st in self.skipped:
            st.skipped += 1

    def down_until(self) -> float:
        """If every mirror refuses units (unavailable, or its queue full):
        until when, by time, the answer holds (``time.monotonic``; ``inf``
        when only a queue can end it); 0.0 if one would queue a unit now.

        The answer also holds only while ``asked == changes.count``: a
        protocol asks again when either the time has come or a queue changed.
        """
        self.asked = CHANGES.count
        self._dark = False
        if not self.sessions:
            return 0.0
        until = math.inf
        for s in self.sessions:
            at, s.dark_reason = s.refusal()
            if not at:
                return 0.0
            if at < until:
                until = at
        self._dark = True
        return until

    def drop_unoffered(self, size: int, times: int = 1) -> None:
        """Count a unit that was not cut because every mirror refuses units
        (see ``down_until``): as ``offer`` would have, with nothing queued.

        The reasons are those ``down_until`` found: a protocol asks it again
        when the time it gave has come, at the start of its next group.

        ``times`` counts that many units at once, each of them ``size``
        bytes or fewer: a protocol that counts a run of units by their
        number only gives the size of all of them together, and does so only
        while no mirror's byte budget is below it (none of them is then
        ``too_large``, so each is counted as it would be alone).
        """
        if not self._dark:
            for s in self.sessions:
                s.drop_unoffered(size, times)
        else:
            for s in self.sessions:
                reason = s.dark_reason
                if size > s._budget and reason is not DropReason.SHUTDOWN:
                    s.stats.offer_dropped(DropReason.TOO_LARGE, times)
                else:
                    s.stats.offer_dropped(reason, times)
        for st in self.skipped:
            st.skipped += times

    def dark_counts(self) -> tuple[list[tuple[MirrorStats, DropReason]], list[MirrorStats]]:
        """While every mirror refuses units (``down_until`` said so, and
        holds): what ``drop_unoffered`` counts a unit no larger than every
        mirror's byte budget under, for a protocol that counts such units
        itself: each mirror's stats with its reason, and the stats of the
        mirrors sampling left out (their ``skipped``).
        """
        assert self._dark
        return [(s.stats, s.dark_reason) for s in self.sessions], self.skipped

    def extend(self, unit: Unit, chunk: bytes) -> None:
        """Add a chunk to a streamed unit that was offered already."""
        unit.grow(chunk)
        readers = 0
        for s in self.sessions:
            readers += s.extend(unit, chunk)
        if readers:
            unit.refs[-1] = readers
        else:
            unit.chunks[-1] = None
        unit._wake()

    def reconfigure(self, keep: Callable[[MirrorSession], bool],
                    serving: Callable[[list[MirrorStats]], list[MirrorStats]] | None = None
                    ) -> None:
        """After a reload, at a boundary of the client session: close the queues
        ``keep`` refuses (they drain, then end) and refresh the others; keep
        counting skips only for the mirrors ``serving`` keeps."""
        self._dark = False
        if serving is not None:
            self.skipped = serving(self.skipped)
        kept = []
        for s in self.sessions:
            if keep(s):
                s.refresh()
                kept.append(s)
            else:
                s.close()
                if not s.mirror.retired:
                    # Left out now as sampling would leave a new session out.
                    self.skipped.append(s.stats)
        self.sessions = kept

    def close(self) -> None:
        for s in self.sessions:
            s.close()

    def abort(self, reason: DropReason = DropReason.SHUTDOWN) -> None:
        for s in self.sessions:
            s.abort(reason)

    def __repr__(self) -> str:
        return f"<MirrorSet mirrored={len(self.sessions)} skipped={len(self.skipped)}>"


def sample(fraction: float) -> bool:
    """One sampling decision (1.0 always, 0.0 never)."""
    return fraction >= 1.0 or (fraction > 0.0 and random.random() < fraction)
