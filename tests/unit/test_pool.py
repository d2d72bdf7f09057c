# UpstreamPool: the bound, reuse by key, eviction of idle connections, backoff.
import pytest

from gateway.pool import UpstreamPool


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_reuse_is_by_key() -> None:
    pool: UpstreamPool[Conn] = UpstreamPool("m", 2)
    assert pool.reserve()
    a = Conn("a")
    pool.put("alice", a)
    assert pool.take("bob") is None
    assert pool.take("alice") is a
    assert pool.take("alice") is None


def test_capacity_bounds_busy_connections() -> None:
    pool: UpstreamPool[Conn] = UpstreamPool("m", 2)
    assert pool.reserve() and pool.reserve()
    assert not pool.reserve()
    pool.discard()
    assert pool.reserve()
    assert pool.open == 2


def test_full_pool_evicts_an_idle_connection_of_another_key() -> None:
    pool: UpstreamPool[Conn] = UpstreamPool("m", 1)
    assert pool.reserve()
    idle = Conn("idle")
    pool.put("alice", idle)
    assert pool.reserve()  # takes the idle connection's slot
    assert idle.closed
    assert pool.open == 1
    assert pool.take("alice") is None


def test_backoff_doubles_and_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("gateway.pool._clock", lambda: now[0])
    pool: UpstreamPool[Conn] = UpstreamPool("m", 1, backoff_min=0.5, backoff_max=4.0)
    assert pool.available()
    delays = []
    for _ in range(5):
        pool.connect_failed()
        assert not pool.available()
        start = now[0]
        while not pool.available():
            now[0] += 0.25
        delays.append(now[0] - start)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    pool.connect_failed()
    assert pool.retry_at() == now[0] + 4.0
    pool.connect_succeeded()
    assert pool.available()
    assert pool.retry_at() == 0.0


def test_repr_summarises_state() -> None:
    pool: UpstreamPool[Conn] = UpstreamPool("staging", 3)
    pool.reserve()
    pool.put("k", Conn("c"))
    assert repr(pool) == "<UpstreamPool staging open=1/3 idle=1 up>"
