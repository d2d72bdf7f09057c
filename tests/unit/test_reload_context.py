# A listener's side of a reload, without sockets: mirrors matched by name so
# their counters carry on, removed ones retired, exposure lowered for live
# sessions, new settings taken at the session's next boundary.
from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.mirror import MirrorSession, MirrorSet, Replayer, Unit
from gateway.plugins import load_plugins
from gateway.pool import UpstreamPool
from gateway.protocol import ListenerContext


class NullReplayer(Replayer):
    def __init__(self) -> None:
        self.reconfigured = 0

    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
        return "ok"

    def reconfigure(self) -> None:
        self.reconfigured += 1

    async def close(self) -> None:
        pass


def _config(mirrors: dict[str, dict[str, Any]]) -> Any:
    text = ['[[upstream]]\nname = "prod"\nurl = "postgres://127.0.0.1:5999"\n']
    for name in ("a", "b", "c"):
        text.append(f'[[upstream]]\nname = "{name}"\nurl = "postgres://127.0.0.1:6{ord(name)}"\n')
    text.append('[[listener]]\nname = "db"\nprotocol = "postgres"\nlisten = "127.0.0.1:6432"\n'
                'primary = "prod"\n')
    for name, keys in mirrors.items():
        text.append(f'[[listener.mirror]]\nupstream = "{name}"\n')
        text += [f"{k} = {v!r}\n" for k, v in keys.items()]
    _, registry = load_plugins()
    return parse_config("".join(text), dict(registry.items()))


def _context(config: Any) -> ListenerContext:
    pools: dict[str, UpstreamPool[Any]] = {n: UpstreamPool(n, 10) for n in config.upstreams}
    return ListenerContext(config, config.listeners[0], pools, spawn=lambda fn: None)


def _reload(ctx: ListenerContext, config: Any) -> tuple[list[str], list[str]]:
    ctx.begin_reload(config, config.listeners[0])
    return ctx.end_reload()


def test_mirrors_are_matched_by_name_and_keep_their_counters() -> None:
    ctx = _context(_config({"a": {}, "b": {}}))
    a, b = ctx.mirrors
    a.stats.offered = 7
    added, removed = _reload(ctx, _config({"a": {"timeout": "9s"}, "c": {}}))
    assert (added, removed) == (["c"], ["b"])
    assert ctx.mirrors[0] is a and a.stats.offered == 7 and a.config.timeout == 9.0
    assert [m.name for m in ctx.mirrors] == ["a", "c"]
    assert b.retired and ctx.retired == [b]
    assert [m.name for m in ctx.all_mirrors] == ["a", "c", "b"]  # b still exported
    assert ctx.generation == 1
    # Named again later: the same mirror, its counters intact.
    b.stats.offered = 3
    added, removed = _reload(ctx, _config({"a": {}, "b": {}, "c": {}}))
    assert (added, removed) == (["b"], [])
    assert ctx.mirrors[1] is b and not b.retired and b.stats.offered == 3
    assert ctx.retired == []


def test_a_live_session_drops_removed_mirrors_and_refreshes_the_rest() -> None:
    ctx = _context(_config({"a": {"queue": 5}, "b": {}}))
    replayers: list[NullReplayer] = []

    def make(mirror: Any) -> NullReplayer:
        replayers.append(NullReplayer())
        return replayers[-1]

    mirrors = ctx.open_mirrors(make)
    assert len(mirrors.sessions) == 2
    _reload(ctx, _config({"a": {"queue": 50}}))
    mirrors.reconfigure(ctx.still_sampled, ctx.serving)
    assert mirrors.skipped == []  # b is gone: no skips counted for it either
    (kept,) = mirrors.sessions
    assert kept.mirror.name == "a" and kept._limit == 50
    assert replayers[0].reconfigured == 1
    # b's queue was closed: a unit offered to it now is a counted drop.
    b = ctx.retired[0]
    assert all(s._closed for s in b.sessions)


@pytest.mark.parametrize(("was", "now", "kept"), [
    (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.5, 1.0, 1.0), (1.0, 0.25, 0.25), (0.5, 0.25, 0.5),
])
def test_lowered_exposure_keeps_the_same_share_of_live_sessions(
        was: float, now: float, kept: float) -> None:
    random.seed(7)
    ctx = _context(_config({"a": {"exposure": was}}))
    sessions = []
    for _ in range(4000):
        ms = ctx.open_mirrors(lambda m: NullReplayer())
        if ms.sessions:
            sessions.append(ms)
    _reload(ctx, _config({"a": {"exposure": now}}))
    still = 0
    for ms in sessions:
        ms.reconfigure(ctx.still_sampled, ctx.serving)
        still += bool(ms.sessions)
        assert len(ms.sessions) + len(ms.skipped) == 1  # a session left out counts skips
    share = still / len(sessions)
    assert share == pytest.approx(kept, abs=0.05)
    # Sampled sessions overall: the new exposure, as new sessions get.
    assert still / 4000 == pytest.approx(min(was, now), abs=0.05)


def test_a_reload_never_adds_a_mirror_to_a_session_that_has_none() -> None:
    ctx = _context(_config({"a": {"exposure": 0.0}}))
    ms = ctx.open_mirrors(lambda m: NullReplayer())
    assert not ms.sessions and isinstance(ms, MirrorSet)
    _reload(ctx, _config({"a": {"exposure": 1.0}}))
    ms.reconfigure(ctx.still_sampled)
    assert not ms.sessions


def test_a_retired_pool_closes_connections_as_they_come_back() -> None:
    class Conn:
        closed = False

        def close(self) -> None:
            self.closed = True

    pool: UpstreamPool[Conn] = UpstreamPool("a", 4)
    idle, busy = Conn(), Conn()
    assert pool.reserve() and pool.reserve()
    pool.put("k", idle)
    pool.retire()
    assert idle.closed and pool.take("k") is None
    pool.put("k", busy)
    assert busy.closed and pool.open == 0


def test_skips_stop_counting_for_a_removed_mirror() -> None:
    ctx = _context(_config({"a": {}, "b": {"exposure": 0.0}}))
    ms = ctx.open_mirrors(lambda m: NullReplayer())
    a, b = ctx.mirrors
    assert [s.mirror for s in ms.sessions] == [a] and ms.skipped == [b.stats]
    _reload(ctx, _config({"a": {}}))
    ms.reconfigure(ctx.still_sampled, ctx.serving)
    assert ms.skipped == []
    ms.offer(Unit(b"x"))
    assert b.stats.skipped == 0 and a.stats.offered == 1
