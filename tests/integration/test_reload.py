# Live reload (issue 4): a new config applied without dropping a connection.
#
# Owns: the evidence that SIGHUP and `mirrorgate reload` apply new mirror
# settings to live sessions at their next boundary (Postgres: transaction;
# HTTP: request), open and close listeners, move upstreams for new
# connections, keep counters across a reload, and refuse a config that does
# not validate while the old one keeps serving. Against real clusters, real
# HTTP servers and the real gateway process.
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

import psycopg
import pytest

from tests.integration.http_fixtures import MirrorTo, http_config, nonzero
from tests.integration.http_fixtures import relay as relay
from tests.integration.http_fixtures import servers as servers
from tests.support.faults import (
    GatewayPorts,
    Launcher,
    assert_balanced,
    counts,
    pg_config,
    wait_at_rest,
)
from tests.support.net import free_port
from tests.support.pgcluster import DEFAULT_PASSWORD, PgCluster
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


def _dsn(port: int, dbname: str) -> str:
    return f"postgresql://postgres:{DEFAULT_PASSWORD}@127.0.0.1:{port}/{dbname}"


def _url(cluster: PgCluster) -> str:
    return f"postgres://127.0.0.1:{cluster.port}"


def reload_cli(gw: Any, text: str) -> subprocess.CompletedProcess[str]:
    """Write ``text`` as the gateway's config and run `mirrorgate reload`."""
    gw.config_path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "reload", "--config", str(gw.config_path)],
        capture_output=True, text=True, timeout=30)


def reload_sighup(gw: Any, text: str) -> str:
    """Write ``text`` as the gateway's config, send SIGHUP, wait for the
    outcome to be logged; returns the log written since."""
    gw.config_path.write_text(text)
    before = len(gw.log())
    os.kill(gw.pid, signal.SIGHUP)

    def logged() -> str | None:
        new = gw.log()[before:]
        return new if ("reload: " in new and "applied" in new) or "reload refused" in new \
            else None

    return eventually(logged, "the reload's outcome in the log")


def _rows(cluster: PgCluster, db: str) -> list[int]:
    with psycopg.connect(cluster.dsn(dbname=db)) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id")]


def _make_table(clusters: list[PgCluster], db: str) -> None:
    for cluster in clusters:
        with psycopg.connect(cluster.dsn(dbname=db), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")


def _backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


# --------------------------------------------------------------------------- Postgres


def test_removing_a_mirror_takes_effect_at_the_next_transaction_of_a_live_session(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, pg_mirror2: PgCluster,
    fresh_db: str,
) -> None:
    _make_table([pg_primary, pg_mirror, pg_mirror2], fresh_db)
    ports = GatewayPorts()
    both = [{"url": _url(pg_mirror), "password": DEFAULT_PASSWORD},
            {"url": _url(pg_mirror2), "password": DEFAULT_PASSWORD}]
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port), both), ports)
    with psycopg.connect(_dsn(ports.listen, fresh_db)) as conn:
        pid = _backend_pid(conn)
        conn.execute("INSERT INTO t VALUES (1)")  # a transaction is open
        done = reload_cli(gw, pg_config(ports, ("127.0.0.1", pg_primary.port), both[:1]))
        assert done.returncode == 0, done.stderr
        assert "mirror mirror1 removed" in done.stdout
        conn.execute("INSERT INTO t VALUES (2)")
        conn.commit()  # the transaction that began before the reload ends whole on mirror1
        conn.execute("INSERT INTO t VALUES (3)")
        conn.commit()  # the next one reaches mirror0 only
        assert _backend_pid(conn) == pid  # the same session all along
        conn.commit()
    wait_at_rest(gw, "mirror0")
    removed = wait_at_rest(gw, "mirror1")
    assert _rows(pg_primary, fresh_db) == [1, 2, 3]
    assert _rows(pg_mirror, fresh_db) == [1, 2, 3]
    assert _rows(pg_mirror2, fresh_db) == [1, 2]
    # The removed mirror's counters stay exported, balanced, none dropped.
    assert_balanced(removed)
    assert removed.offered > 0 and removed.dropped_total == 0, removed
    assert "reload: listener db: mirror mirror1 removed" in gw.log()


def test_exposure_zero_stops_live_sessions_and_counters_carry_on(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str,
) -> None:
    _make_table([pg_primary, pg_mirror], fresh_db)
    ports = GatewayPorts()
    primary = ("127.0.0.1", pg_primary.port)
    mirror = {"url": _url(pg_mirror), "password": DEFAULT_PASSWORD}
    gw = launch(pg_config(ports, primary, [mirror]), ports)
    with psycopg.connect(_dsn(ports.listen, fresh_db), autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        before = wait_at_rest(gw, "mirror0")
        log = reload_sighup(gw, pg_config(ports, primary, [{**mirror, "exposure": 0.0}]))
        assert "reload refused" not in log, log
        for i in range(2, 6):
            conn.execute("INSERT INTO t VALUES (%s)", (i,))
        after = wait_at_rest(gw, "mirror0")
        # Exposure back to 1: the live session stays unmirrored (its mirroring
        # ended), a new one is mirrored again.
        log = reload_sighup(gw, pg_config(ports, primary, [mirror]))
        assert "reload refused" not in log, log
        conn.execute("INSERT INTO t VALUES (6)")
        with psycopg.connect(_dsn(ports.listen, fresh_db), autocommit=True) as other:
            other.execute("INSERT INTO t VALUES (7)")
    final = wait_at_rest(gw, "mirror0")
    assert after.offered == before.offered  # nothing offered while exposure was 0
    assert after.skipped == before.skipped + 4  # but counted as sampling left out
    assert final.offered > after.offered >= before.offered > 0  # never reset
    assert final.skipped == after.skipped + 1  # the live session's unit after the raise
    assert_balanced(final)
    assert _rows(pg_primary, fresh_db) == [1, 2, 3, 4, 5, 6, 7]
    assert _rows(pg_mirror, fresh_db) == [1, 7]


def test_a_config_that_does_not_validate_is_refused_and_the_old_one_serves(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str,
) -> None:
    _make_table([pg_primary, pg_mirror], fresh_db)
    ports = GatewayPorts()
    primary = ("127.0.0.1", pg_primary.port)
    good = pg_config(ports, primary, [{"url": _url(pg_mirror), "password": DEFAULT_PASSWORD}])
    gw = launch(good, ports)
    broken = good.replace('primary = "prod"', 'primary = "prod"\nmax_clinets = 5')
    line = broken.splitlines().index("max_clinets = 5") + 1
    with psycopg.connect(_dsn(ports.listen, fresh_db), autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        # SIGHUP: the gateway reads the file, refuses it and says where.
        log = reload_sighup(gw, broken)
        assert "reload refused" in log
        assert f":{line}: listener[0].max_clinets" in log, log
        # The CLI checks the file itself first and never asks.
        done = reload_cli(gw, broken)
        assert done.returncode == 1
        assert f":{line}: listener[0].max_clinets" in done.stderr
        conn.execute("INSERT INTO t VALUES (2)")
        with psycopg.connect(_dsn(ports.listen, fresh_db), autocommit=True) as other:
            other.execute("INSERT INTO t VALUES (3)")
    c = wait_at_rest(gw, "mirror0")
    assert_balanced(c)
    assert _rows(pg_mirror, fresh_db) == [1, 2, 3]


def test_listeners_open_close_and_move_while_sessions_on_them_carry_on(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str,
) -> None:
    ports = GatewayPorts()
    primary = ("127.0.0.1", pg_primary.port)
    mirror = [{"url": _url(pg_mirror), "password": DEFAULT_PASSWORD}]
    base = pg_config(ports, primary, mirror)
    gw = launch(base, ports)
    second = free_port()
    added = base + (f'\n[[listener]]\nname = "db2"\nprotocol = "postgres"\n'
                    f'listen = "127.0.0.1:{second}"\nprimary = "prod"\n')
    done = reload_cli(gw, added)
    assert done.returncode == 0, done.stderr
    assert f"listener db2 (postgres) opened on 127.0.0.1:{second}" in done.stdout
    held = psycopg.connect(_dsn(second, fresh_db), autocommit=True)
    try:
        assert held.execute("SELECT 1").fetchone() == (1,)
        done = reload_cli(gw, base)  # db2 removed: closed to new clients
        assert done.returncode == 0, done.stderr
        assert "listener db2 closed (1 sessions finishing)" in done.stdout
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(_dsn(second, fresh_db), connect_timeout=3)
        assert held.execute("SELECT 2").fetchone() == (2,)  # its session carries on
        # The first listener moves: old address closed, new one serves, and a
        # session on the old one carries on.
        moved = free_port()
        with psycopg.connect(_dsn(ports.listen, fresh_db), autocommit=True) as old:
            text = base.replace(f'listen = "127.0.0.1:{ports.listen}"',
                                f'listen = "127.0.0.1:{moved}"')
            done = reload_cli(gw, text)
            assert done.returncode == 0, done.stderr
            with psycopg.connect(_dsn(moved, fresh_db), autocommit=True) as new:
                assert new.execute("SELECT 3").fetchone() == (3,)
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(_dsn(ports.listen, fresh_db), connect_timeout=3)
            assert old.execute("SELECT 4").fetchone() == (4,)
    finally:
        held.close()


def test_a_listen_address_in_use_refuses_the_whole_reload(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    ports = GatewayPorts()
    primary = ("127.0.0.1", pg_primary.port)
    mirror = {"url": _url(pg_mirror), "password": DEFAULT_PASSWORD}
    base = pg_config(ports, primary, [mirror])
    gw = launch(base, ports)
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        text = pg_config(ports, primary, [{**mirror, "exposure": 0.0}]) + (
            f'\n[[listener]]\nname = "db2"\nprotocol = "postgres"\n'
            f'listen = "127.0.0.1:{port}"\nprimary = "prod"\n')
        done = reload_cli(gw, text)
    finally:
        taken.close()
    assert done.returncode == 1
    assert "cannot listen" in done.stderr
    # Nothing of it applied: the mirror still takes every session.
    with psycopg.connect(_dsn(ports.listen, "postgres"), autocommit=True) as conn:
        conn.execute("SELECT 1")
    c = wait_at_rest(gw, "mirror0")
    assert c.offered >= 1 and c.skipped == 0, c


def test_a_moved_mirror_upstream_serves_new_sessions_and_live_ones_stay(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, pg_mirror2: PgCluster,
    fresh_db: str,
) -> None:
    _make_table([pg_primary, pg_mirror, pg_mirror2], fresh_db)
    ports = GatewayPorts()
    primary = ("127.0.0.1", pg_primary.port)
    gw = launch(pg_config(ports, primary,
                          [{"url": _url(pg_mirror), "password": DEFAULT_PASSWORD}]), ports)
    with psycopg.connect(_dsn(ports.listen, fresh_db), autocommit=True) as live:
        live.execute("INSERT INTO t VALUES (1)")
        done = reload_cli(gw, pg_config(
            ports, primary, [{"url": _url(pg_mirror2), "password": DEFAULT_PASSWORD}]))
        assert done.returncode == 0, done.stderr
        assert f"upstream mirror0: 127.0.0.1:{pg_mirror.port} -> 127.0.0.1:{pg_mirror2.port}" \
            in done.stdout
        live.execute("INSERT INTO t VALUES (2)")  # its mirror connection stays where it was
        with psycopg.connect(_dsn(ports.listen, fresh_db), autocommit=True) as new:
            new.execute("INSERT INTO t VALUES (3)")
    c = wait_at_rest(gw, "mirror0")
    assert_balanced(c)
    assert c.dropped_total == 0, c
    assert _rows(pg_mirror, fresh_db) == [1, 2]
    assert _rows(pg_mirror2, fresh_db) == [3]


def test_reloads_under_load_drop_no_connection_and_keep_the_accounting(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str,
) -> None:
    bindir = pg_primary.bindir
    env = {**os.environ, "PGPASSWORD": DEFAULT_PASSWORD}
    subprocess.run([str(bindir / "pgbench"), "-i", "-q", "-s", "1", "-h", "127.0.0.1",
                    "-p", str(pg_primary.port), "-U", "postgres", fresh_db],
                   env=env, check=True, capture_output=True)
    with psycopg.connect(pg_primary.dsn(dbname=fresh_db)) as src, \
            psycopg.connect(pg_mirror.dsn(dbname=fresh_db)) as dst:
        del src
        dst.close()
    ports = GatewayPorts()
    primary = ("127.0.0.1", pg_primary.port)
    mirror = {"url": _url(pg_mirror), "password": DEFAULT_PASSWORD}
    gw = launch(pg_config(ports, primary, [mirror]), ports)
    bench = subprocess.Popen(
        [str(bindir / "pgbench"), "-S", "-M", "prepared", "-c", "4", "-j", "2", "-T", "6",
         "-h", "127.0.0.1", "-p", str(ports.listen), "-U", "postgres", fresh_db],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes: list[int] = []

    def reload_repeatedly() -> None:
        for i in range(6):
            keys = {"timeout": f"{5 + i}s", "queue": 400 + i, "exposure": 1.0}
            outcomes.append(reload_cli(gw, pg_config(ports, primary, [{**mirror, **keys}]))
                            .returncode)

    reloader = threading.Thread(target=reload_repeatedly)
    reloader.start()
    out, err = bench.communicate(timeout=60)
    reloader.join(60)
    assert bench.returncode == 0, err
    assert "number of failed transactions: 0" in out or "failed" not in out, out
    assert outcomes == [0] * 6
    c = wait_at_rest(gw, "mirror0", clients=0)
    assert_balanced(c)
    assert c.offered > 0
    assert gw.log().count("reload: ") >= 6


# --------------------------------------------------------------------------- HTTP


def test_http_mirror_settings_apply_from_the_next_request_on_a_kept_alive_connection(
    servers: Any, relay: Any,
) -> None:
    primary, shadow = servers(), servers()
    r = relay(primary, [MirrorTo(shadow, "shadow", {"set_headers": {"X-Env": "one"}})])

    def config(**options: Any) -> str:
        return http_config(r.ports, primary, [MirrorTo(shadow, "shadow", options)])

    with r.client() as client:
        assert client.post("/a", content=b"1").status_code == 200
        shadow.wait_for(1)
        done = reload_cli(r.gw, config(set_headers={"X-Env": "two"}))
        assert done.returncode == 0, done.stderr
        assert client.post("/b", content=b"2").status_code == 200
        shadow.wait_for(2)
        done = reload_cli(r.gw, config(percent=0))
        assert done.returncode == 0, done.stderr
        assert client.post("/c", content=b"3").status_code == 200
        done = reload_cli(r.gw, http_config(r.ports, primary))  # the mirror removed
        assert done.returncode == 0, done.stderr
        assert client.post("/d", content=b"4").status_code == 200
        assert len(primary.wait_for(4)) == 4
    got = [(q.target, q.values("X-Env")) for q in shadow.requests]
    assert got == [("/a", ["one"]), ("/b", ["two"])]
    c = r.at_rest("shadow")
    assert (c.offered, c.skipped, nonzero(c.delivered)) == (2, 1, {"2xx": 2}), c


def test_http_route_primary_moves_for_new_connections(servers: Any, relay: Any) -> None:
    old, new, shadow = servers(), servers(), servers()
    r = relay(old, [MirrorTo(shadow, "shadow")])
    with r.client() as client:
        assert client.post("/x", content=b"1").status_code == 200
    done = reload_cli(r.gw, http_config(r.ports, new, [MirrorTo(shadow, "shadow")]))
    assert done.returncode == 0, done.stderr
    assert f"upstream primary: 127.0.0.1:{old.port} -> 127.0.0.1:{new.port}" in done.stdout
    with r.client() as client:
        assert client.post("/y", content=b"2").status_code == 200
    assert [q.target for q in old.requests] == ["/x"]
    assert [q.target for q in new.wait_for(1)] == ["/y"]
    c = r.at_rest("shadow")
    assert c.offered == 2 and nonzero(c.delivered) == {"2xx": 2}, c


def test_counts_of_a_reloaded_gateway_balance(servers: Any, relay: Any) -> None:
    """Every counter read through /metrics before and after a reload: never reset."""
    primary, shadow = servers(), servers()
    r = relay(primary, [MirrorTo(shadow, "shadow")])
    with r.client() as client:
        for _ in range(5):
            client.post("/p", content=b"x")
    before = r.at_rest("shadow")
    done = reload_cli(r.gw, http_config(r.ports, primary, [MirrorTo(shadow, "shadow",
                                                                     {"timeout": "3s"})]))
    assert done.returncode == 0, done.stderr
    after = counts(r.gw, "shadow", "web")
    assert after.offered == before.offered == 5
    assert after.delivered == before.delivered
