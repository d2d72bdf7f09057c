# MirrorSession: behaviours the accounting invariant alone does not show.
import asyncio
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
