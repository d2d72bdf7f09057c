# Failure modes of mirrors and of the primary, against real servers and sockets.
#
# Owns: the evidence that a mirror that is down, hung, slow, erroring or
# restarted never changes what the client gets (design.md §1.1, §1.2), that
# memory stays within queue_bytes (§1.3), that every unit is accounted for with
# the right drop reason (§1.4, §5), that a transaction is never half-applied on
# a mirror (§1.5), and that the primary being unreachable, max_clients, cancel
# and replication connections behave as a user of Postgres expects.
from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.support.faults import (
    DelayProxy,
    GatewayPorts,
    GaugeWatcher,
    HungServer,
    Launcher,
    assert_balanced,
    connect,
    counts,
    error_fields,
    parse_frames,
    pg_config,
    read_until_closed,
    startup_packet,
    wait_at_rest,
)
from tests.support.net import free_port
from tests.support.pgcluster import DEFAULT_PASSWORD, PgCluster

pytestmark = pytest.mark.integration

MIRROR = "mirror0"  # the `mirror` label: the upstream name pg_config gives mirror 0


def _dsn(ports: GatewayPorts, dbname: str, **params: str) -> str:
    url = f"postgresql://postgres:{DEFAULT_PASSWORD}@127.0.0.1:{ports.listen}/{dbname}"
    if params:
        url += "?" + "&".join(f"{k}={v}" for k, v in params.items())
    return url


def _mirror(host: str, port: int, **keys: object) -> dict[str, object]:
    return {"url": f"postgres://{host}:{port}", "password": DEFAULT_PASSWORD, **keys}


def _workload(dsn: str, n: int) -> list[tuple[int, int]]:
    """n inserts and n selects, autocommit; returns what the selects gave."""
    out: list[tuple[int, int]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(n):
            conn.execute("INSERT INTO t (x) VALUES (%s)", (i,))
            row = conn.execute("SELECT %s::int * 2, count(*)::int FROM t", (i,)).fetchone()
            assert row is not None
            out.append((row[0], row[1]))
    return out


def _expected(n: int) -> list[tuple[int, int]]:
    return [(2 * i, i + 1) for i in range(n)]


def test_mirror_down_clients_work_and_every_unit_is_mirror_unavailable(
    launch: Launcher, pg_primary: PgCluster, fresh_db: str
) -> None:
    pg_primary.execute("CREATE TABLE t (x int)", fresh_db)
    ports = GatewayPorts()
    dead = free_port()  # nothing listens here
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                          [_mirror("127.0.0.1", dead, timeout="1s")]), ports)
    n = 25
    assert _workload(_dsn(ports, fresh_db), n) == _expected(n)
    assert pg_primary.query_value("SELECT count(*) FROM t", fresh_db) == str(n)
    c = wait_at_rest(gw, MIRROR, clients=0)
    assert c.offered >= 2 * n
    assert c.delivered_total == 0
    assert c.dropped == {**dict.fromkeys(c.dropped, 0.0), "mirror_unavailable": c.offered}
    assert_balanced(c)


def test_a_down_mirror_is_counted_alike_with_and_without_the_c_lane(
    launch: Launcher, pg_primary: PgCluster, fresh_db: str, tmp_path: Any
) -> None:
    # pgbench -M prepared through two gateways whose only mirror refuses
    # connections: one where the C lane counts the dark sessions' cycles,
    # one where MIRRORGATE_PG_LANE=off leaves them to the session's Python.
    # The same workload must be counted the same, unit for unit.
    from tests.support.pgcluster import find_bindir

    script = tmp_path / "select.sql"
    script.write_text("SELECT 1;\n")
    dead = free_port()  # nothing listens here
    seen = []
    for env in ({}, {"MIRRORGATE_PG_LANE": "off"}):
        ports = GatewayPorts()
        gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                              [_mirror("127.0.0.1", dead, timeout="1s")]), ports, env=env)
        lane = "the C lane" if not env else "Python (MIRRORGATE_PG_LANE=off)"
        if not env and "C lane is not built" in gw.log():
            pytest.skip("the C lane is not built here")
        assert f"unmirrored and dark sessions counted by {lane}" in gw.log()
        result = subprocess.run(
            [str(find_bindir() / "pgbench"), "-n", "-M", "prepared", "-c", "2", "-t", "300",
             "-f", str(script), "-h", "127.0.0.1", "-p", str(ports.listen), "-U", "postgres",
             fresh_db],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("PG")},
                 "PGPASSWORD": DEFAULT_PASSWORD})
        assert result.returncode == 0, result.stderr
        c = wait_at_rest(gw, MIRROR, clients=0)
        assert_balanced(c)
        assert c.delivered_total == 0
        seen.append((gw.sample("mirrorgate_primary_units_total", listener="db"),
                     c.offered, {k: v for k, v in c.dropped.items() if v}))
    assert seen[0] == seen[1]
    units, offered, dropped = seen[0]
    assert units >= 600 and offered == units and dropped == {"mirror_unavailable": units}


def test_hung_mirror_workload_completes_and_memory_is_bounded(
    launch: Launcher, pg_primary: PgCluster, fresh_db: str
) -> None:
    pg_primary.execute("CREATE TABLE t (x int)", fresh_db)
    queue_bytes = 2048
    with HungServer() as hung:
        ports = GatewayPorts()
        gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port), [
            _mirror("127.0.0.1", hung.port, timeout="300ms", queue_bytes=queue_bytes),
        ]), ports)
        n = 150
        with GaugeWatcher(gw, "mirrorgate_mirror_queue_bytes", listener="db",
                          mirror=MIRROR) as watch:
            got = _workload(_dsn(ports, fresh_db), n)
        assert got == _expected(n)
        # The same workload without a mirror, straight to the primary, gives the same.
        pg_primary.execute("TRUNCATE t", fresh_db)
        assert _workload(pg_primary.dsn(dbname=fresh_db), n) == got
        c = wait_at_rest(gw, MIRROR, clients=0)
        assert hung.accepted >= 1
    assert watch.scrapes > 0
    assert watch.max <= queue_bytes
    assert not watch.unbalanced, watch.unbalanced[:3]
    assert c.delivered_total == 0
    assert c.dropped["mirror_unavailable"] + c.dropped["mirror_timeout"] >= 1
    unexpected = {r: v for r, v in c.dropped.items()
                  if v and r not in ("mirror_unavailable", "mirror_timeout", "queue_full")}
    assert not unexpected
    assert c.queue_bytes == 0
    assert_balanced(c)


@pytest.mark.parametrize("reply", [
    pytest.param(b"HTTP/1.1 400 Bad Request\r\n\r\n", id="http"),
    pytest.param(b"R\x00\x00\x00\x02junk", id="bad-length"),
    pytest.param(b"R\x00\x00\x00\x08\x00\x00\x00\x63", id="unknown-auth"),
    pytest.param(b"Z\x00\x00\x00\x05I", id="ready-without-auth"),
    pytest.param(b"R\x00\x00\x00\x08\x00\x00\x00\x00Z\x00\x00\x00\x05ID\x00\x00\x00\x02",
                 id="bad-length-after-login"),
])
def test_mirror_speaking_garbage_costs_the_client_nothing(
    launch: Launcher, pg_primary: PgCluster, fresh_db: str, reply: bytes
) -> None:
    pg_primary.execute("CREATE TABLE t (x int)", fresh_db)
    with HungServer(reply=reply) as junk:
        ports = GatewayPorts()
        gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                              [_mirror("127.0.0.1", junk.port, timeout="500ms")]), ports)
        assert _workload(_dsn(ports, fresh_db), 10) == _expected(10)
        c = wait_at_rest(gw, MIRROR, clients=0)
    assert gw.returncode is None
    assert "Traceback" not in gw.log()
    assert c.offered >= 20
    assert c.delivered_total == 0
    unexpected = {r: v for r, v in c.dropped.items()
                  if v and r not in ("mirror_unavailable", "mirror_timeout", "mirror_error")}
    assert not unexpected
    if b"Z" in reply and reply.startswith(b"R"):
        # Logged in, then a bad frame: each unit finds the connection ended.
        assert c.dropped["mirror_error"] > 0
    assert_balanced(c)


@contextlib.contextmanager
def _slow_mirror(launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, db: str,
                 *, queue: int, columns: str = "x int") -> Iterator[tuple[Any, str]]:
    """A gateway mirroring to ``pg_mirror`` through a proxy that holds each of
    its answers 200 ms, with a table ``t`` on both clusters: (gateway, DSN)."""
    for cluster in (pg_primary, pg_mirror):
        cluster.execute(f"CREATE TABLE t ({columns})", db)
    with DelayProxy("127.0.0.1", pg_mirror.port, delay_down=0.2) as slow:
        ports = GatewayPorts()
        gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                              [_mirror("127.0.0.1", slow.port, queue=queue)]), ports)
        yield gw, _dsn(ports, db)


def test_slow_mirror_small_queue_drops_queue_full_and_keeps_what_it_delivered(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    with _slow_mirror(launch, pg_primary, pg_mirror, fresh_db, queue=5) as (gw, dsn):
        n = 100
        # prepare_threshold=None: psycopg never adds a Parse-only unit, so one
        # unit is one insert.
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            for i in range(n):
                conn.execute("INSERT INTO t (x) VALUES (%s)", (i,))
        assert pg_primary.query_value("SELECT count(*) FROM t", fresh_db) == str(n)
        c = wait_at_rest(gw, MIRROR, clients=0, timeout=30)
    assert c.offered == n
    assert c.dropped["queue_full"] > 0
    assert c.delivered.get("error", 0) == 0
    rows = int(pg_mirror.query_value("SELECT count(*) FROM t", fresh_db))
    assert rows == c.delivered["ok"]
    assert_balanced(c)


def test_a_session_whose_mirror_queue_filled_is_mirrored_again_once_it_drains(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    # A burst fills the queue, and the session stops cutting units at a
    # transaction boundary; it must take them up again as soon as the queue
    # has room, however long nothing else happens in the gateway.
    with _slow_mirror(launch, pg_primary, pg_mirror, fresh_db, queue=2) as (gw, dsn):
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            for i in range(20):
                conn.execute("INSERT INTO t VALUES (%s)", (i,))
            burst = wait_at_rest(gw, MIRROR, timeout=30)
            assert burst.dropped["queue_full"] > 0
            for i in range(100, 105):
                conn.execute("INSERT INTO t VALUES (%s)", (i,))
                wait_at_rest(gw, MIRROR, timeout=30)
        c = wait_at_rest(gw, MIRROR, clients=0, timeout=30)
    assert c.delivered["ok"] == burst.delivered["ok"] + 5
    assert c.dropped["queue_full"] == burst.dropped["queue_full"]
    mirrored = {int(x) for x in pg_mirror.psql("SELECT x FROM t", fresh_db).split()}
    assert set(range(100, 105)) <= mirrored
    assert_balanced(c)


def test_transaction_dropped_on_slow_mirror_is_never_half_applied(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    with _slow_mirror(launch, pg_primary, pg_mirror, fresh_db, queue=2,
                      columns="tx int, x int") as (gw, dsn):
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            # Transaction 1: a burst overflows the queue of 2.
            conn.execute("BEGIN")
            for i in range(30):
                conn.execute("INSERT INTO t VALUES (1, %s)", (i,))
            # Now one statement at a time, letting the mirror catch up each
            # time: each finds the queue empty, is queued, and must then be
            # dropped by the worker as the rest of an aborted transaction.
            wait_at_rest(gw, MIRROR, timeout=30)
            for i in range(30, 35):
                conn.execute("INSERT INTO t VALUES (1, %s)", (i,))
                wait_at_rest(gw, MIRROR, timeout=30)
            conn.execute("COMMIT")
            mid = wait_at_rest(gw, MIRROR, timeout=30)
            # Transaction 2: one statement at a time, nothing dropped.
            conn.execute("BEGIN")
            wait_at_rest(gw, MIRROR, timeout=30)
            for i in range(5):
                conn.execute("INSERT INTO t VALUES (2, %s)", (i,))
                wait_at_rest(gw, MIRROR, timeout=30)
            conn.execute("COMMIT")
        c = wait_at_rest(gw, MIRROR, clients=0, timeout=30)
    assert pg_primary.query_value("SELECT count(*) FROM t", fresh_db) == "40"
    assert mid.dropped["queue_full"] > 0
    # Units of transaction 1 queued after its drop: 5 inserts and the COMMIT.
    assert mid.dropped["transaction_aborted"] >= 6, mid
    per_tx = dict(
        tuple(int(v) for v in line.split("|"))  # type: ignore[misc]
        for line in pg_mirror.psql("SELECT tx, count(*) FROM t GROUP BY tx", fresh_db).split()
    )
    assert per_tx.get(1, 0) in (0, 35)
    assert per_tx.get(2, 0) == 5
    idle_in_tx = pg_mirror.query_value(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' "
        f"AND datname = '{fresh_db}'")
    assert idle_in_tx == "0"
    assert c.dropped["transaction_aborted"] == mid.dropped["transaction_aborted"]
    assert_balanced(c)


def test_mirror_that_errors_delivers_error_outcomes_and_client_is_unaffected(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    pg_primary.execute("CREATE TABLE t (x int)", fresh_db)  # not on the mirror
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                          [_mirror("127.0.0.1", pg_mirror.port)]), ports)
    n = 10
    with psycopg.connect(_dsn(ports, fresh_db), autocommit=True,
                         prepare_threshold=None) as conn:
        for i in range(n):
            conn.execute("INSERT INTO t (x) VALUES (%s)", (i,))
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (n,)
    c = wait_at_rest(gw, MIRROR, clients=0)
    assert c.offered == n + 1
    assert c.delivered["error"] == n + 1
    assert c.dropped_total == 0
    assert_balanced(c)


def _insert_until_mirrored(gw: Any, conn: psycopg.Connection[Any], sql: str, first: int,
                           delivered: float) -> int:
    """Run ``sql`` with ``first``, ``first + 1``, ... until the mirror has
    delivered more than ``delivered`` units ok (its backoff over, 40 s at
    most). :returns: the next value."""
    i = first
    deadline = time.monotonic() + 40
    while wait_at_rest(gw, MIRROR).delivered["ok"] == delivered:
        if time.monotonic() > deadline:
            pytest.fail(f"the mirror never came back: {counts(gw, MIRROR)}")
        conn.execute(sql, (i,))
        i += 1
        time.sleep(0.2)
    return i


def test_mirror_restarted_mid_session_is_used_again_after_backoff(
    launch: Launcher, pg_primary: PgCluster, fresh_db: str
) -> None:
    pg_primary.execute("CREATE TABLE t (x int)", fresh_db)
    own = PgCluster("restarted").start()
    # The cluster comes back on a new port: a proxy keeps one address for it.
    proxy = DelayProxy("127.0.0.1", own.port)
    try:
        own.create_database(fresh_db)
        own.execute("CREATE TABLE t (x int)", fresh_db)
        ports = GatewayPorts()
        gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                              [_mirror("127.0.0.1", proxy.port, timeout="2s")]), ports)
        with psycopg.connect(_dsn(ports, fresh_db), autocommit=True,
                             prepare_threshold=None) as conn:
            for i in range(3):
                conn.execute("INSERT INTO t VALUES (%s)", (i,))
                wait_at_rest(gw, MIRROR)
            before = counts(gw, MIRROR)
            assert before.delivered["ok"] == 3

            own.stop()
            for i in range(3, 6):
                conn.execute("INSERT INTO t VALUES (%s)", (i,))
                wait_at_rest(gw, MIRROR)
            down = counts(gw, MIRROR)
            assert down.delivered["ok"] == 3
            assert down.dropped["mirror_unavailable"] + down.dropped["mirror_error"] == 3
            assert down.dropped["mirror_unavailable"] >= 1

            own.start()
            proxy.retarget("127.0.0.1", own.port)
            i = _insert_until_mirrored(gw, conn, "INSERT INTO t VALUES (%s)", 6, 3)
            # Once back, every later unit is delivered.
            ok = counts(gw, MIRROR).delivered["ok"]
            for j in range(i, i + 3):
                conn.execute("INSERT INTO t VALUES (%s)", (j,))
            c = wait_at_rest(gw, MIRROR)
            assert c.delivered["ok"] == ok + 3
        c = wait_at_rest(gw, MIRROR, clients=0)
        assert_balanced(c)
        assert c.dropped["mirror_unavailable"] >= 1
        mirrored = {int(x) for x in own.psql("SELECT x FROM t", fresh_db).split()}
        assert {0, 1, 2, i, i + 1, i + 2} <= mirrored
        assert not mirrored & {3, 4, 5}
        assert len(mirrored) == c.delivered["ok"]
    finally:
        proxy.close()
        own.close()


def test_statements_prepared_while_the_mirror_was_away_are_prepared_there_on_its_return(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    # While its mirror is away a session is dark: it counts each Bind/Execute/
    # Sync cycle without cutting it, yet still follows the statements the
    # client prepares. When the mirror is back, both the statement prepared
    # before it left and the one prepared while it was away are prepared
    # again on the new mirror connection before they are bound.
    for cluster in (pg_primary, pg_mirror):
        cluster.execute("CREATE TABLE t (x int)", fresh_db)
    proxy = DelayProxy("127.0.0.1", pg_mirror.port)
    try:
        ports = GatewayPorts()
        gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                              [_mirror("127.0.0.1", proxy.port, timeout="2s")]), ports)
        insert, shifted = "INSERT INTO t VALUES (%s)", "INSERT INTO t VALUES (%s + 1000)"
        with psycopg.connect(_dsn(ports, fresh_db), autocommit=True,
                             prepare_threshold=0) as conn:
            for i in range(3):
                conn.execute(insert, (i,))
            assert wait_at_rest(gw, MIRROR).delivered["ok"] >= 3

            proxy.retarget("127.0.0.1", free_port())  # nothing listens there
            pg_mirror.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE backend_type = 'client backend' "
                              "AND pid <> pg_backend_pid()")
            for i in range(10, 30):
                conn.execute(insert, (i,))
            for i in range(30, 40):
                conn.execute(shifted, (i,))  # prepared while the mirror is away
            away = wait_at_rest(gw, MIRROR)
            assert away.dropped["mirror_unavailable"] >= 25, away

            proxy.retarget("127.0.0.1", pg_mirror.port)
            _insert_until_mirrored(gw, conn, insert, 100, away.delivered["ok"])
            conn.execute(insert, (200,))
            conn.execute(shifted, (201,))
        c = wait_at_rest(gw, MIRROR, clients=0)
        assert_balanced(c)
        mirrored = {int(x) for x in pg_mirror.psql("SELECT x FROM t", fresh_db).split()}
        assert {0, 1, 2, 200, 1201} <= mirrored, mirrored
        assert not mirrored & (set(range(10, 30)) | set(range(1030, 1040)))
        # Both statements were bound on the new connection without an error:
        # each was prepared there first.
        assert c.delivered["error"] == 0, c
    finally:
        proxy.close()


def test_primary_unreachable_is_a_clear_08006_error(launch: Launcher) -> None:
    ports = GatewayPorts()
    dead = free_port()
    launch(pg_config(ports, ("127.0.0.1", dead)), ports)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(_dsn(ports, "postgres"), connect_timeout=10)
    message = str(info.value)
    assert '"prod"' in message and "cannot connect" in message and str(dead) in message
    # libpq does not hand the SQLSTATE of a failed connection to psycopg: read it raw.
    sock = connect(ports.listen)
    sock.sendall(startup_packet({"user": "postgres", "database": "postgres"}))
    data, closed = read_until_closed(sock)
    sock.close()
    frames = parse_frames(data)
    assert closed and [k for k, _ in frames] == [b"E"]
    fields = error_fields(frames[0][1])
    assert fields["C"] == "08006"
    assert fields["S"] == "FATAL"
    assert "cannot connect" in fields["M"] and "prod" in fields["M"]


def test_max_clients_refuses_the_third_client_with_53300(
    launch: Launcher, pg_primary: PgCluster
) -> None:
    ports = GatewayPorts()
    launch(pg_config(ports, ("127.0.0.1", pg_primary.port), listener={"max_clients": 2}), ports)
    dsn = _dsn(ports, "postgres")
    with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(dsn)
        sock = connect(ports.listen)
        sock.sendall(startup_packet({"user": "postgres", "database": "postgres"}))
        data, closed = read_until_closed(sock)
        sock.close()
        frames = parse_frames(data)
        assert closed and [k for k, _ in frames] == [b"E"]
        assert error_fields(frames[0][1])["C"] == "53300"
        # The two served clients are unaffected.
        assert a.execute("SELECT 1").fetchone() == (1,)
        assert b.execute("SELECT 2").fetchone() == (2,)
    # A slot is free again once they leave.
    deadline = time.monotonic() + 10
    while True:
        try:
            with psycopg.connect(dsn) as c:
                assert c.execute("SELECT 3").fetchone() == (3,)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_cancel_request_reaches_the_primary(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                          [_mirror("127.0.0.1", pg_mirror.port)]), ports)
    with psycopg.connect(_dsn(ports, fresh_db), autocommit=True,
                         prepare_threshold=None) as conn:
        started = threading.Event()

        def cancel_soon() -> None:
            started.wait(10)
            # Until the primary and the mirror run pg_sleep, a cancel would hit nothing.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                running = [cluster.query_value(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                    "'select pg_sleep(10)%' AND state = 'active'")
                    for cluster in (pg_primary, pg_mirror)]
                if running == ["1", "1"]:
                    break
                time.sleep(0.05)
            conn.cancel()

        t = threading.Thread(target=cancel_soon)
        t.start()
        started.set()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(10)")
        t.join()
        assert conn.execute("SELECT 1").fetchone() == (1,)
    c = wait_at_rest(gw, MIRROR, clients=0, timeout=30)
    assert_balanced(c)
    # Best effort, but on loopback it arrives: the mirror's pg_sleep was
    # cancelled too (an ErrorResponse), not run to its end.
    assert c.delivered == {"ok": 1, "error": 1}, c


def test_replication_connection_is_relayed_and_not_mirrored(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster
) -> None:
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                          [_mirror("127.0.0.1", pg_mirror.port)]), ports)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = DEFAULT_PASSWORD
    conninfo = (f"host=127.0.0.1 port={ports.listen} user=postgres dbname=postgres "
                "replication=database")
    out = subprocess.run(
        [str(pg_primary.bindir / "psql"), "-X", "-A", "-t", conninfo, "-c", "IDENTIFY_SYSTEM"],
        capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    sysid = pg_primary.query_value("SELECT system_identifier FROM pg_control_system()")
    assert out.stdout.split("|")[0].strip() == sysid
    c = wait_at_rest(gw, MIRROR, clients=0)
    assert c.offered == 0 and c.skipped == 0
    assert_balanced(c)


def test_mirror_recovers_from_an_error_on_a_prepared_statement(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    pg_primary.execute("CREATE TABLE t (x int)", fresh_db)  # the mirror lacks it at first
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                          [_mirror("127.0.0.1", pg_mirror.port)]), ports)
    with psycopg.connect(_dsn(ports, fresh_db), autocommit=True, prepare_threshold=0) as conn:
        conn.execute("INSERT INTO t (x) VALUES (%s)", (0,))  # prepared now, on both
        first = wait_at_rest(gw, MIRROR)
        assert first.delivered["error"] >= 1
        pg_mirror.execute("CREATE TABLE t (x int)", fresh_db)  # the mirror is fixed
        for i in range(1, 4):
            conn.execute("INSERT INTO t (x) VALUES (%s)", (i,))  # Bind of the same name
        c = wait_at_rest(gw, MIRROR)
    # The primary prepared the statement; the mirror's Parse failed, so the
    # statement must be prepared again there before it is bound.
    assert pg_mirror.query_value("SELECT count(*) FROM t", fresh_db) == "3", c
    assert_balanced(c)


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_message_larger_than_queue_bytes_is_not_held_whole(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                          [_mirror("127.0.0.1", pg_mirror.port, queue_bytes="1MiB")]), ports)
    big = 64 * 1024 * 1024
    with psycopg.connect(_dsn(ports, fresh_db), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        wait_at_rest(gw, MIRROR)
        before = _peak_rss_kib(gw.pid)
        sql = "SELECT length('" + "x" * big + "')"
        with conn.cursor() as cur:
            cur.execute(sql.encode(), prepare=False)  # type: ignore[call-overload]
            assert cur.fetchone() == (big,)
        del sql
        assert conn.execute("SELECT 2").fetchone() == (2,)
    c = wait_at_rest(gw, MIRROR, clients=0)
    grew_mib = (_peak_rss_kib(gw.pid) - before) / 1024
    # The unit can never fit in 1 MiB: the gateway relays it and counts it,
    # but must not buffer 64 MiB of it for a mirror.
    assert grew_mib < 16, f"gateway peak RSS grew by {grew_mib:.0f} MiB"
    assert c.dropped["too_large"] == 1
    assert c.delivered["ok"] == 2
    assert_balanced(c)


def test_mirror_timeout_inside_a_transaction_resets_and_drops_the_rest_of_it(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    for cluster in (pg_primary, pg_mirror):
        cluster.execute("CREATE TABLE t (tx int, x int)", fresh_db)
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                          [_mirror("127.0.0.1", pg_mirror.port, timeout="300ms")]), ports)
    with psycopg.connect(_dsn(ports, fresh_db), autocommit=True,
                         prepare_threshold=None) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (1, 1)")
        conn.execute("SELECT pg_sleep(2)")  # longer than the mirror's timeout
        conn.execute("INSERT INTO t VALUES (1, 2)")
        conn.execute("COMMIT")
        mid = wait_at_rest(gw, MIRROR, timeout=30)
        conn.execute("INSERT INTO t VALUES (2, 1)")  # on a fresh mirror connection
        c = wait_at_rest(gw, MIRROR, timeout=30)
    assert pg_primary.query_value("SELECT count(*) FROM t", fresh_db) == "3"
    assert mid.dropped["mirror_timeout"] == 1
    assert mid.dropped["transaction_aborted"] == 2  # the insert after it, and COMMIT
    assert c.delivered["ok"] == 3  # BEGIN, the first insert, the last insert
    deadline = time.monotonic() + 10
    while pg_mirror.query_value("SELECT count(*) FROM t WHERE tx = 1", fresh_db) != "0":
        if time.monotonic() > deadline:  # the reset connection's transaction rolls back
            pytest.fail("the mirror kept the rows of the dropped transaction")
        time.sleep(0.1)
    assert pg_mirror.query_value("SELECT count(*) FROM t WHERE tx = 2", fresh_db) == "1"
    assert_balanced(c)


def test_mirror_refusing_the_login_costs_the_client_nothing(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                          [_mirror("127.0.0.1", pg_mirror.port, password="wrong")]), ports)
    for _ in range(2):
        with psycopg.connect(_dsn(ports, fresh_db), autocommit=True) as conn:
            for i in range(5):
                assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
    c = wait_at_rest(gw, MIRROR, clients=0)
    assert c.offered >= 10
    assert c.dropped["mirror_unavailable"] == c.offered
    assert "refused" in gw.log()
    assert_balanced(c)


def test_a_session_that_found_no_mirror_connection_stays_unmirrored(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    for cluster in (pg_primary, pg_mirror):
        cluster.execute("CREATE TABLE t (who text)", fresh_db)
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port), [
        _mirror("127.0.0.1", pg_mirror.port, upstream={"pool_size": 1})]), ports)
    dsn = _dsn(ports, fresh_db)
    a = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
    b = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
    try:
        a.execute("INSERT INTO t VALUES ('a')")  # a takes the only mirror connection
        wait_at_rest(gw, MIRROR)
        b.execute("INSERT INTO t VALUES ('b1')")  # b finds none: not mirrored
        first = wait_at_rest(gw, MIRROR)
        assert first.dropped["mirror_unavailable"] == 1
        a.close()
        wait_at_rest(gw, MIRROR, clients=1)
        # design.md §5: "a session that finds no free connection is not mirrored,
        # its units counted mirror_unavailable": b must not start replaying
        # half-way through its session (its earlier state never reached the mirror).
        b.execute("INSERT INTO t VALUES ('b2')")
        c = wait_at_rest(gw, MIRROR)
    finally:
        a.close()
        b.close()
    assert c.dropped["mirror_unavailable"] == 2, c
    assert pg_mirror.psql("SELECT who FROM t ORDER BY who", fresh_db).split() == ["a"]
    assert_balanced(wait_at_rest(gw, MIRROR, clients=0))


def _backend_pids(cluster: PgCluster, dbname: str) -> list[int]:
    out = cluster.psql(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
        f"AND datname = '{dbname}' AND pid <> pg_backend_pid()")
    return [int(x) for x in out.split()]


def test_primary_connection_killed_mid_transaction_rolls_the_mirror_back(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    for cluster in (pg_primary, pg_mirror):
        cluster.execute("CREATE TABLE t (x int)", fresh_db)
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                          [_mirror("127.0.0.1", pg_mirror.port)]), ports)
    conn = psycopg.connect(_dsn(ports, fresh_db), autocommit=True, prepare_threshold=None)
    try:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (1)")
        wait_at_rest(gw, MIRROR)
        (pid,) = _backend_pids(pg_primary, fresh_db)
        pg_primary.execute(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("INSERT INTO t VALUES (2)")
    finally:
        conn.close()
    c = wait_at_rest(gw, MIRROR, clients=0)
    assert_balanced(c)
    assert pg_primary.query_value("SELECT count(*) FROM t", fresh_db) == "0"
    assert pg_mirror.query_value("SELECT count(*) FROM t", fresh_db) == "0"
    in_tx = pg_mirror.query_value(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' "
        f"AND datname = '{fresh_db}'")
    assert in_tx == "0"


def test_mirror_connection_killed_mid_transaction_never_commits_half_of_it(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    for cluster in (pg_primary, pg_mirror):
        cluster.execute("CREATE TABLE t (x int)", fresh_db)
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port),
                          [_mirror("127.0.0.1", pg_mirror.port)]), ports)
    with psycopg.connect(_dsn(ports, fresh_db), autocommit=True,
                         prepare_threshold=None) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (1)")
        wait_at_rest(gw, MIRROR)
        # The mirror loses the session (its transaction is rolled back there).
        (pid,) = _backend_pids(pg_mirror, fresh_db)
        pg_mirror.execute(f"SELECT pg_terminate_backend({pid})")
        deadline = time.monotonic() + 10
        while _backend_pids(pg_mirror, fresh_db):
            if time.monotonic() > deadline:
                pytest.fail("the terminated mirror backend did not go away")
            time.sleep(0.05)
        conn.execute("INSERT INTO t VALUES (2)")
        conn.execute("COMMIT")
        conn.execute("INSERT INTO t VALUES (3)")  # a new transaction: mirrored again
    c = wait_at_rest(gw, MIRROR, clients=0)
    assert_balanced(c)
    assert pg_primary.query_value("SELECT count(*) FROM t", fresh_db) == "3"
    # Row 1 died with the mirror's transaction: row 2 must not be committed alone.
    rows = pg_mirror.psql("SELECT x FROM t ORDER BY x", fresh_db).split()
    assert rows == ["3"], (rows, c)
