# The mirror queue's accounting, as a hypothesis state machine.
#
# Owns: the evidence that gateway.mirror's MirrorSession/MirrorSet keep the
# invariant of design.md §1.4 (offered == delivered + dropped + queued +
# in_flight) at every step, stay within their byte budget (§1.3), deliver in
# FIFO order per client session (§1.5), and come to rest (queued == in_flight
# == 0, no bytes held) once every session is closed. The replayer here is a
# plain scripted class: this tests the core's bookkeeping, not a server.
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway import (
    DropReason,
    Mirror,
    MirrorError,
    MirrorSession,
    MirrorSet,
    MirrorTimeout,
    MirrorUnavailable,
    Replayer,
    Unit,
)

ACTIONS = ("ok", "error", "timeout", "mirror_error", "unavailable", "block")
FINAL = ("ok", "error", "timeout", "mirror_error", "unavailable")
STATUSES = (ord("I"), ord("T"), ord("E"))


@dataclass
class MirrorConfig:
    name: str
    queue: int
    queue_bytes: int
    timeout: float = 1.0
    options: Any = None


class ScriptedReplayer(Replayer):
    """Delivers by a script drawn by hypothesis; records what it was asked to do."""

    def __init__(self, machine: MirrorQueueMachine, script: list[str]) -> None:
        self.machine = machine
        self.script = collections.deque(script)
        self.running: Unit | None = None
        self.seen: list[int] = []          # sequence numbers of delivered units, in order
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.raised: collections.Counter[str] = collections.Counter()
        self.closed = False
        self.aborts = 0

    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
        assert self.running is None, "two units in flight on one mirror session"
        assert not self.closed
        self.running = unit
        self.seen.append(self.machine.seq[unit])
        try:
            action = self.script.popleft() if self.script else "ok"
            if unit.meta == "stream" and action in ("ok", "error", "block"):
                async for _ in session.chunks(unit):  # like a COPY: read every chunk
                    pass
            while action == "block":
                fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                self.machine.blocked.append(fut)
                action = await fut
            if action == "timeout":
                self.raised["timeout"] += 1
                raise MirrorTimeout("scripted")
            if action == "mirror_error":
                self.raised["mirror_error"] += 1
                raise MirrorError("scripted")
            if action == "unavailable":
                self.raised["unavailable"] += 1
                raise MirrorUnavailable("scripted")
            self.outcomes[action] += 1
            return action
        finally:
            self.running = None

    async def ends_group(self, unit: Unit) -> bool:
        status = await unit.wait_settled()
        return status is None or status == ord("I")

    async def abort_group(self) -> None:
        self.aborts += 1

    async def close(self) -> None:
        assert self.running is None
        self.closed = True


@dataclass(eq=False)
class Client:
    """One client session: its MirrorSet and the units it offered."""

    mset: MirrorSet
    replayers: list[ScriptedReplayer]
    unsettled: collections.deque[Unit] = field(default_factory=collections.deque)
    done: bool = False


class MirrorQueueMachine(RuleBasedStateMachine):
    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tasks: list[asyncio.Task[None]] = []
        self.blocked: list[asyncio.Future[str]] = []
        self.seq: dict[Unit, int] = {}
        self.mirrors: list[Mirror] = []
        self.all_clients: list[Client] = []
        self.replayers: dict[Mirror, list[ScriptedReplayer]] = {}

    def _spawn(self, fn: Any) -> None:
        self.tasks.append(self.loop.create_task(fn()))

    def _step(self, n: int) -> None:
        for _ in range(n):
            self.loop.run_until_complete(asyncio.sleep(0))

    @initialize(
        limits=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 600)), min_size=1,
                        max_size=2)
    )
    def make_mirrors(self, limits: list[tuple[int, int]]) -> None:
        for i, (queue, queue_bytes) in enumerate(limits):
            cfg = MirrorConfig(name=f"m{i}", queue=queue, queue_bytes=queue_bytes)
            mirror = Mirror("db", cfg, None, self._spawn)
            self.mirrors.append(mirror)
            self.replayers[mirror] = []

    # -- client sessions --

    @precondition(lambda self: len(self.all_clients) < 6)
    @rule(target=clients, data=st.data())
    def open_client(self, data: st.DataObject) -> Client:
        replayers = []
        sessions = []
        for mirror in self.mirrors:
            script = data.draw(st.lists(st.sampled_from(ACTIONS), max_size=12))
            r = ScriptedReplayer(self, script)
            replayers.append(r)
            self.replayers[mirror].append(r)
            sessions.append(mirror.open_session(r))
        client = Client(MirrorSet(sessions, []), replayers)
        self.all_clients.append(client)
        return client

    @rule(client=clients, size=st.integers(0, 300), streamed=st.booleans())
    def offer(self, client: Client, size: int, streamed: bool) -> None:
        if client.done:
            return
        unit = Unit(b"x" * size, closed=False)  # the relay closes a unit when answered
        unit.meta = "stream" if streamed else None
        self.seq[unit] = len(self.seq)
        client.mset.offer(unit)
        client.unsettled.append(unit)

    @rule(client=clients, size=st.integers(1, 200), data=st.data())
    def extend(self, client: Client, size: int, data: st.DataObject) -> None:
        streams = [u for u in client.unsettled if u.meta == "stream"]
        if client.done or not streams:
            return
        unit = data.draw(st.sampled_from(streams))
        client.mset.extend(unit, b"c" * size)

    @rule(client=clients, status=st.sampled_from(STATUSES))
    def settle(self, client: Client, status: int) -> None:
        """The primary answers the oldest pending unit (ReadyForQuery's status)."""
        if client.unsettled:
            unit = client.unsettled.popleft()
            unit.settle(status)
            unit.close()

    def _end(self, client: Client) -> None:
        # As the relay's _stop_mirroring: pending units settle as None and close.
        while client.unsettled:
            unit = client.unsettled.popleft()
            unit.settle(None)
            unit.close()
        client.mset.close()
        client.done = True

    @rule(client=consumes(clients))
    def close_client(self, client: Client) -> None:
        self._end(client)

    @rule(client=consumes(clients), reason=st.sampled_from(
              [DropReason.SHUTDOWN, DropReason.QUEUE_FULL]),
          first=st.booleans())
    def abort_client(self, client: Client, reason: DropReason, first: bool) -> None:
        if first:
            client.mset.abort(reason)
            self._end(client)
        else:
            self._end(client)
            client.mset.abort(reason)

    # -- the event loop and the mirror --

    @rule(n=st.integers(1, 6))
    def run_workers(self, n: int) -> None:
        self._step(n)

    @precondition(lambda self: any(not f.done() for f in self.blocked))
    @rule(data=st.data(), action=st.sampled_from(FINAL))
    def unblock(self, data: st.DataObject, action: str) -> None:
        pending = [f for f in self.blocked if not f.done()]
        fut = data.draw(st.sampled_from(pending))
        fut.set_result(action)
        self.blocked = [f for f in self.blocked if not f.done()]

    # -- invariants --

    @invariant()
    def accounting_balances(self) -> None:
        for mirror in self.mirrors:
            s = mirror.stats
            assert s.balanced(), s
            assert s.queued >= 0 and s.in_flight >= 0 and s.queued_bytes >= 0, s
            replayers = self.replayers[mirror]
            running = [r.running for r in replayers if r.running is not None]
            assert s.in_flight == len(running), (s, running)
            outcomes: collections.Counter[str] = collections.Counter()
            for r in replayers:
                outcomes.update(r.outcomes)
            assert {k: v for k, v in s.delivered.items() if v} == dict(outcomes), s
            raised: collections.Counter[str] = collections.Counter()
            for r in replayers:
                raised.update(r.raised)
            # A failed delivery is one drop of its reason; other drops of those
            # reasons do not happen in this model.
            assert s.dropped[DropReason.MIRROR_TIMEOUT] == raised["timeout"], s
            assert s.dropped[DropReason.MIRROR_ERROR] == raised["mirror_error"], s
            assert s.dropped[DropReason.MIRROR_UNAVAILABLE] >= raised["unavailable"], s

    @invariant()
    def bytes_are_bounded(self) -> None:
        for mirror in self.mirrors:
            s = mirror.stats
            largest = max((r.running.size for r in self.replayers[mirror]
                           if r.running is not None), default=0)
            assert s.queued_bytes <= mirror.config.queue_bytes + largest, s

    @invariant()
    def fifo_per_session(self) -> None:
        for replayers in self.replayers.values():
            for r in replayers:
                assert r.seen == sorted(r.seen) and len(set(r.seen)) == len(r.seen), r.seen

    # -- the end --

    def teardown(self) -> None:
        try:
            for client in self.all_clients:
                if not client.done:
                    self._end(client)
            for _ in range(2000):
                for fut in self.blocked:
                    if not fut.done():
                        fut.set_result("ok")
                self.blocked = []
                if all(t.done() for t in self.tasks):
                    break
                self._step(1)
            assert all(t.done() for t in self.tasks), [t for t in self.tasks if not t.done()]
            for t in self.tasks:
                assert t.exception() is None, t.exception()
            for mirror in self.mirrors:
                s = mirror.stats
                assert s.balanced(), s
                assert s.queued == 0 and s.in_flight == 0 and s.queued_bytes == 0, s
                assert not mirror.sessions
                assert all(r.closed for r in self.replayers[mirror])
        finally:
            for t in self.tasks:
                t.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()


MirrorQueueMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMirrorQueue = MirrorQueueMachine.TestCase


class _GatedReplayer(Replayer):
    """Every delivery waits until the test opens its gate."""

    def __init__(self) -> None:
        self.gates: list[asyncio.Future[None]] = []

    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
        gate = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        await gate
        return "ok"

    async def close(self) -> None:
        pass


def test_queue_counts_units_not_drop_markers() -> None:
    loop = asyncio.new_event_loop()
    tasks: list[asyncio.Task[None]] = []
    mirror = Mirror("db", MirrorConfig(name="m", queue=2, queue_bytes=1 << 20), None,
                    lambda fn: tasks.append(loop.create_task(fn())))
    replayer = _GatedReplayer()
    session = mirror.open_session(replayer)

    def step() -> None:
        for _ in range(5):
            loop.run_until_complete(asyncio.sleep(0))

    def unit() -> Unit:
        u = Unit(b"Q")
        u.settle(ord("I"))  # autocommit units: each is a group of its own
        return u

    try:
        session.offer(unit())          # A: taken by the worker, held at its gate
        step()
        session.offer(unit())          # B: queued
        session.offer(unit())          # C: queued (2 waiting: the queue is full)
        session.offer(unit())          # D: dropped, queue_full (right)
        assert mirror.stats.dropped[DropReason.QUEUE_FULL] == 1
        replayer.gates[0].set_result(None)
        step()                         # A delivered; B taken and held at its gate
        assert mirror.stats.queued == 1  # only C waits
        session.offer(unit())          # E: one unit waits and queue = 2, so E must fit
        assert mirror.stats.dropped[DropReason.QUEUE_FULL] == 1, mirror.stats
        assert mirror.stats.queued == 2
    finally:
        session.abort()
        for gate in replayer.gates:
            if not gate.done():
                gate.set_result(None)
        step()
        for t in tasks:
            t.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
