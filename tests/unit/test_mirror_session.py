# MirrorSession: behaviours the accounting invariant alone does not show.
import asyncio
import math
from types import SimpleNamespace

from gateway.accounting import DropReason
from gateway.mirror import Mirror, MirrorSession, Replayer, Unit


class ScriptedReplayer(Replayer):
    """Delivers by a script of outcomes; an exception instance is raised."""

    def __init__(self, script: list[object]) -> None:
        self.script = list(script)
        self.delivered: list[bytes] = []
        self.closed = False

    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        self.delivered.append(unit.data)
        return str(step)

    async def close(self) -> None:
        self.closed = True


def _mirror(queue: int = 10, queue_bytes: int = 1000) -> tuple[Mirror, list[object]]:
    tasks: list[object] = []
    config = SimpleNamespace(name="m", queue=queue, queue_bytes=queue_bytes, timeout=1.0)
    return Mirror("l", config, upstream=None, spawn=tasks.append), tasks


def _run(mirror: Mirror, replayer: Replayer, units: list[Unit]) -> MirrorSession:
    async def go() -> MirrorSession:
        session = MirrorSession(mirror, replayer)
        for unit in units:
            session.offer(unit)
        session.close()
        await session.run()
        return session

    return asyncio.run(go())


def test_a_replayer_bug_costs_one_unit_not_the_worker() -> None:
    mirror, _ = _mirror()
    replayer = ScriptedReplayer(["ok", RuntimeError("plugin bug"), "ok"])
    units = [Unit(b"a"), Unit(b"b"), Unit(b"c")]
    _run(mirror, replayer, units)
    stats = mirror.stats
    assert replayer.delivered == [b"a", b"c"]
    assert stats.dropped[DropReason.MIRROR_ERROR] == 1
    assert stats.delivered == {"ok": 2}
    assert stats.balanced() and stats.queued == stats.in_flight == stats.queued_bytes == 0
    assert replayer.closed


def test_a_full_queue_drops_and_counts_without_waiting() -> None:
    mirror, _ = _mirror(queue=2)
    replayer = ScriptedReplayer(["ok"] * 5)
    _run(mirror, replayer, [Unit(bytes([i])) for i in range(5)])
    stats = mirror.stats
    assert stats.offered == 5
    assert stats.dropped[DropReason.QUEUE_FULL] == 3
    assert replayer.delivered == [b"\x00", b"\x01"]
    assert stats.balanced()


def test_a_unit_over_the_byte_budget_is_too_large() -> None:
    mirror, _ = _mirror(queue_bytes=10)
    replayer = ScriptedReplayer(["ok"])
    _run(mirror, replayer, [Unit(b"x" * 11), Unit(b"y")])
    assert mirror.stats.dropped[DropReason.TOO_LARGE] == 1
    assert replayer.delivered == [b"y"]
    assert mirror.stats.balanced()


class DownReplayer(ScriptedReplayer):
    """A mirror in connect backoff until ``until``."""

    def __init__(self, until: float) -> None:
        super().__init__([])
        self.until = until

    def unavailable(self) -> bool:
        return self.until > 0

    def retry_at(self) -> float:
        return self.until


def test_a_set_whose_every_mirror_is_down_says_so_and_counts_uncut_units() -> None:
    from gateway.mirror import MirrorSet

    (m1, _), (m2, _), (skipped, _) = _mirror(), _mirror(queue_bytes=10), _mirror()
    down = MirrorSet([MirrorSession(m1, DownReplayer(50.0)),
                      MirrorSession(m2, DownReplayer(40.0))], [skipped.stats])
    down.offer(Unit(b"a"))
    assert down.down and down.down_until() == 40.0
    down.drop_unoffered(5)
    down.drop_unoffered(11)  # over m2's byte budget: too_large there, as an offer would be
    assert m1.stats.dropped[DropReason.MIRROR_UNAVAILABLE] == 3 and m1.stats.offered == 3
    assert m2.stats.dropped[DropReason.MIRROR_UNAVAILABLE] == 2
    assert m2.stats.dropped[DropReason.TOO_LARGE] == 1
    assert skipped.stats.skipped == 3
    assert m1.stats.balanced() and m2.stats.balanced()

    (m3, _), (m4, _) = _mirror(), _mirror()
    half = MirrorSet([MirrorSession(m3, DownReplayer(50.0)),
                      MirrorSession(m4, ScriptedReplayer(["ok"]))], [])
    half.offer(Unit(b"b"))
    assert not half.down and half.down_until() == 0.0


def test_uncut_units_of_a_closed_set_are_shutdown_drops_whatever_their_size() -> None:
    from gateway.mirror import MirrorSet

    mirror, _ = _mirror(queue_bytes=10)
    closed = MirrorSet([MirrorSession(mirror, DownReplayer(50.0))], [])
    closed.close()
    closed.drop_unoffered(5)  # not asked down_until yet: each session decides
    assert closed.down_until() == math.inf
    closed.drop_unoffered(11)  # as offer would: a closed queue drops as shutdown first
    assert mirror.stats.dropped[DropReason.SHUTDOWN] == 2
    assert mirror.stats.dropped[DropReason.TOO_LARGE] == 0 and mirror.stats.balanced()


def test_a_run_of_uncut_units_is_counted_as_each_would_be() -> None:
    from gateway.mirror import MirrorSet

    (m1, _), (m2, _) = _mirror(), _mirror(queue_bytes=10)
    skipped, _ = _mirror()
    for ask in (False, True):  # before down_until (each session decides) and after
        down = MirrorSet([MirrorSession(m1, DownReplayer(40.0)),
                          MirrorSession(m2, DownReplayer(40.0))], [skipped.stats])
        if ask:
            assert down.down_until() == 40.0
        down.drop_unoffered(10, 4)  # four units of at most 10 bytes
    for m in (m1, m2):
        assert m.stats.dropped[DropReason.MIRROR_UNAVAILABLE] == 8 and m.stats.offered == 8
        assert m.stats.balanced()
    assert skipped.stats.skipped == 8


def test_a_dark_set_names_the_counters_and_reasons_of_its_drops() -> None:
    from gateway.mirror import MirrorSet

    (m1, _), (m2, _), (skipped, _) = _mirror(), _mirror(queue=1), _mirror()
    full = MirrorSession(m2, ScriptedReplayer([]))
    full.offer(Unit(b"queued"))
    dark = MirrorSet([MirrorSession(m1, DownReplayer(40.0)), full], [skipped.stats])
    assert dark.down_until() == 40.0
    drops, left_out = dark.dark_counts()
    assert drops == [(m1.stats, DropReason.MIRROR_UNAVAILABLE),
                     (m2.stats, DropReason.QUEUE_FULL)]
    assert left_out == [skipped.stats]
    # What a protocol counting into them does is what drop_unoffered does.
    dark.drop_unoffered(5, 2)
    assert m1.stats.dropped[DropReason.MIRROR_UNAVAILABLE] == 2
    assert m2.stats.dropped[DropReason.QUEUE_FULL] == 2 and skipped.stats.skipped == 2
    assert m1.stats.balanced() and m2.stats.balanced()


def test_a_set_whose_every_queue_is_full_is_down_until_a_queue_changes() -> None:
    from gateway.mirror import MirrorSet

    mirror, _ = _mirror(queue=1)
    full = MirrorSet([MirrorSession(mirror, ScriptedReplayer([]))], [])
    full.offer(Unit(b"a"))
    assert not full.down  # queued
    full.offer(Unit(b"b"))
    # No time ends a full queue: only a queue giving up a unit can.
    assert full.down and full.down_until() == math.inf
    assert full.asked == full.changes.count
    full.drop_unoffered(3)
    assert mirror.stats.dropped[DropReason.QUEUE_FULL] == 2 and mirror.stats.balanced()


class GatedReplayer(ScriptedReplayer):
    """Delivers each unit once ``gate`` is set, so a test sees the worker mid-way."""

    def __init__(self) -> None:
        super().__init__([])
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
        self.started.set()
        await self.gate.wait()
        self.delivered.append(unit.data)
        return "ok"


def test_every_way_a_queue_makes_room_or_closes_moves_the_change_count() -> None:
    from gateway.mirror import CHANGES, MirrorSet

    async def go() -> None:
        mirror, _ = _mirror(queue=1)
        replayer = GatedReplayer()
        session = MirrorSession(mirror, replayer)
        full = MirrorSet([session], [])
        full.offer(Unit(b"a"))
        full.offer(Unit(b"b"))  # refused: the queue holds "a"
        assert full.down_until() == math.inf
        worker = asyncio.ensure_future(session.run())
        await replayer.started.wait()
        # The worker took "a": its slot is free, so the answer may differ now.
        assert full.asked != CHANGES.count
        assert full.down_until() == 0.0
        full.offer(Unit(b"c"))
        assert full.down_until() == math.inf
        asked = full.asked
        replayer.gate.set()
        await asyncio.sleep(0)  # "a" is delivered: its bytes are released
        assert CHANGES.count != asked
        asked = CHANGES.count
        session.close()
        assert CHANGES.count != asked  # closed: a refusal is now `shutdown`
        await worker
        assert replayer.delivered == [b"a", b"c"]
        assert mirror.stats.balanced()

        aborted = MirrorSession(mirror, ScriptedReplayer([]))
        aborted.offer(Unit(b"d"))
        asked = CHANGES.count
        aborted.abort()
        assert CHANGES.count != asked
        assert mirror.stats.balanced()

    asyncio.run(go())


def test_refused_counts_the_drop_an_offer_would_be() -> None:
    mirror, _ = _mirror(queue=1, queue_bytes=10)
    stats = mirror.stats
    session = MirrorSession(mirror, ScriptedReplayer([]))
    assert not session.refused(10)  # would be queued: nothing counted
    assert stats.offered == 0
    assert session.refused(11)  # over the byte budget
    assert stats.dropped[DropReason.TOO_LARGE] == 1
    session.offer(Unit(b"x" * 4))
    assert session.refused(1)  # the queue holds its one unit
    assert stats.dropped[DropReason.QUEUE_FULL] == 1
    assert stats.offered == 3 and stats.balanced()
    down_mirror = _mirror()[0]
    down = MirrorSession(down_mirror, DownReplayer(5.0))
    assert down.refused(1)
    assert down_mirror.stats.dropped[DropReason.MIRROR_UNAVAILABLE] == 1
    down.close()
    assert down.refused(1)
    assert down_mirror.stats.dropped[DropReason.SHUTDOWN] == 1 and down_mirror.stats.balanced()

