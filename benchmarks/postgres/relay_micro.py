# In-process cost of the Postgres relay's per-chunk work, without sockets.
#
# Owns: two measurements quoted in docs/performance.md. (1) The Python work per
# pgbench -S transaction (one Bind/Execute/Sync from the client, a four-message
# answer from the primary) for a session with no mirror and one whose only
# mirror is down, driven through a real PgSession with transports that only
# record. (2) Stepping over a 1,000-row answer with the C frame walker and its
# Python twin. Needs no server; compare runs on the same machine only.
#
#   python benchmarks/postgres/relay_micro.py
from __future__ import annotations

import asyncio
import sys
import time
import timeit
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.inprocess import AnsweringTransport, new_loop  # noqa: E402
from gateway.mirror import Mirror, MirrorSession, MirrorSet, Unit  # noqa: E402
from gateway.pool import UpstreamPool  # noqa: E402
from gateway_postgres import codec, framewalk  # noqa: E402
from gateway_postgres.relay import PgSession, Phase  # noqa: E402
from gateway_postgres.replayer import MirrorConn, PgReplayer  # noqa: E402
from gateway_postgres.statements import StatementRegistry  # noqa: E402

N = 200_000
BIND = codec.frame(b"B", b"\x00P0_1\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00\x0512345\x00\x00")
EXECUTE = codec.frame(b"E", b"\x00\x00\x00\x00\x00")
REQUEST = BIND + EXECUTE + codec.sync()
ANSWER = (codec.frame(b"2", b"") + codec.frame(b"D", b"\x00\x01\x00\x00\x00\x04abcd")
          + codec.frame(b"C", b"SELECT 1\x00") + codec.ready_for_query(b"I"))


class _Sink:
    def write(self, data: bytes) -> None:
        pass


def _session(mirrors: MirrorSet | None) -> PgSession:
    from gateway.accounting import ListenerStats

    context = SimpleNamespace(stats=ListenerStats("bench"), mirrors=[], startup_timeout=15.0,
                              name="bench", generation=0)
    # No sockets here: the lane takes the chunks given to it (no Poller), as
    # it does on the event loop's transports; its I/O is the system calls
    # the end-to-end benchmark measures.
    session = PgSession(SimpleNamespace(context=context, lane_poller=lambda: None))
    session.client = session.primary = _Sink()  # type: ignore[assignment]
    session.phase = Phase.READY
    session._relaying = True
    if mirrors is not None:
        session.mirrors = mirrors
        session.statements = StatementRegistry()
        session._budgets(mirrors)  # every mirror's queue_bytes, as on a real session
    else:
        session._lane_plain()  # as _ready does: the C lane, where built
    return session


def _mirror_session(queue: int, pool: UpstreamPool[Any]) -> MirrorSession:
    """A session's queue to one mirror whose worker never runs."""
    config = SimpleNamespace(name="m", queue=queue, queue_bytes=64 << 20, timeout=5.0,
                             options=None)
    upstream = SimpleNamespace(name="m", host="127.0.0.1", port=1, user=None,
                               database=None, password=None, users={})
    mirror = Mirror("bench", config, upstream, spawn=lambda fn: None)
    replayer = PgReplayer(mirror, pool, {"user": "u"}, StatementRegistry(), 1 << 20)
    return MirrorSession(mirror, replayer)


def _down_mirror() -> MirrorSet:
    pool: UpstreamPool[Any] = UpstreamPool("m", 10)
    pool.connect_failed()
    pool._retry_at = float("inf")  # a mirror in connect backoff for the whole run
    return MirrorSet([_mirror_session(500, pool)], [])


def _full_mirror() -> MirrorSet:
    """A mirror whose queue is full: the state a session is in while a
    connection attempt to a hung mirror waits out its timeout (the
    benchmark's hung mirror spends most of a run there)."""
    session = _mirror_session(1, UpstreamPool("m", 10))
    session.offer(Unit(b"queued"))
    return MirrorSet([session], [])


async def _delivering(n: int) -> float:
    """Per transaction: relay, offer, and the mirror worker's delivery of the
    unit (write, read the answer to ReadyForQuery, account)."""
    loop = asyncio.get_running_loop()
    config = SimpleNamespace(name="m", queue=500, queue_bytes=64 << 20, timeout=5.0,
                             options=None)
    upstream = SimpleNamespace(name="m", host="127.0.0.1", port=1, user=None,
                               database=None, password=None, users={})
    tasks: list[asyncio.Task[None]] = []
    mirror = Mirror("bench", config, upstream,
                    spawn=lambda fn: tasks.append(loop.create_task(fn())))
    replayer = PgReplayer(mirror, UpstreamPool("m", 10), {"user": "u"}, StatementRegistry(),
                          1 << 20)
    conn = MirrorConn(1 << 20)
    mirror_side = AnsweringTransport(conn, ANSWER)
    conn.connection_made(mirror_side)  # type: ignore[arg-type]
    conn.logged_in()
    replayer.conn = conn
    session = _session(MirrorSet([mirror.open_session(replayer)], []))
    stats = mirror.stats
    start = time.perf_counter()
    for _ in range(n):
        mirror_side.answered = answered = loop.create_future()
        session.data_received(REQUEST)
        session.primary_data(ANSWER)
        await answered
    seconds = time.perf_counter() - start
    session._stop_mirroring()
    await asyncio.gather(*tasks)
    assert stats.balanced() and stats.delivered_total == n, stats
    return seconds / n * 1e6


def per_transaction(session: PgSession) -> float:
    def one() -> None:
        session.data_received(REQUEST)
        session.primary_data(ANSWER)

    return timeit.timeit(one, number=N) / N * 1e6


def main() -> None:
    print(f"frame walker in use: {framewalk.IMPLEMENTATION}")
    print(f"no mirror:         {per_transaction(_session(None)):.2f} us per transaction")
    print(f"mirror down:       {per_transaction(_session(_down_mirror())):.2f} us per transaction")
    print(f"mirror queue full: {per_transaction(_session(_full_mirror())):.2f} us per transaction")
    delivering = new_loop().run_until_complete(_delivering(N // 4))
    print(f"mirror delivering: {delivering:.2f} us per transaction")
    row = codec.frame(b"D", b"\x00\x02\x00\x00\x00\x04abcd\x00\x00\x00\x08efghijkl")
    answer = (codec.frame(b"T", b"\x00\x00") + row * 1000
              + codec.frame(b"C", b"SELECT 1000\x00") + codec.ready_for_query(b"I"))
    table = bytes(1 if t == ord("Z") else 0 for t in range(256))
    for name, walk in (("C", framewalk.walk), ("Python", framewalk.walk_py)):
        if name == "C" and framewalk.IMPLEMENTATION != "c":
            continue
        seconds = timeit.timeit(partial(walk, answer, 0, table), number=2000) / 2000
        print(f"1,000-row answer ({len(answer)} bytes), {name} walker: {seconds * 1e6:.1f} us")


if __name__ == "__main__":
    main()
