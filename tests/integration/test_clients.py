# Real clients through the real gateway: psql, pgbench, psycopg 3, asyncpg.
#
# Owns: the evidence that what a real client does through the gateway reaches
# the primary as it would directly, and is replayed on the mirror so that the
# mirror ends with the same data (design.md §1.1, §1.5, §5), with every unit
# accounted for (§1.4). Each test runs its workload through the gateway, waits
# until the mirror queues are drained, then compares the two clusters with
# queries run on each directly.
from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.integration.conftest import (
    LISTENER,
    Gateway,
    assert_balanced,
    drop_reasons,
    dropped,
    mirror_state,
    outcome,
    same_on_both,
    wait_drained,
)
from tests.support.pgcluster import PgCluster, find_bindir

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., Gateway]


def _client_env(password: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = password
    env["LC_ALL"] = "C"
    return env


def _run(args: list[str], password: str, cwd: Path, timeout: float = 120) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=_client_env(password),
                            cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (
        f"{Path(args[0]).name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


# ----------------------------------------------------------------------------- psql

PSQL_SCRIPT = """\
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10, 2));
CREATE INDEX items_name ON items (name);
INSERT INTO items VALUES (1, 'apple', 1.50), (2, 'banana', 2.25);
BEGIN;
INSERT INTO items VALUES (3, 'cherry', 3.00);
UPDATE items SET price = price * 2 WHERE id = 1;
COMMIT;
BEGIN;
INSERT INTO items VALUES (4, 'durian', 4.00);
DELETE FROM items WHERE id = 2;
ROLLBACK;
\\copy items FROM 'items.csv' WITH (FORMAT csv)
ALTER TABLE items ADD COLUMN stock int DEFAULT 7;
\\set ON_ERROR_STOP 0
BEGIN;
INSERT INTO items VALUES (5000, 'in a failed transaction', 0);
INSERT INTO items VALUES (1, 'duplicate key', 0);
COMMIT;
\\set ON_ERROR_STOP 1
COPY (SELECT id, name, price, stock FROM items ORDER BY id) TO STDOUT;
\\copy (SELECT id, name FROM items ORDER BY id) TO 'out.csv' WITH (FORMAT csv)
"""


def test_psql_script_with_transactions_and_copy_replays_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
    tmp_path: Path,
) -> None:
    gw = gateway()
    rows = [f"{i},item {i},{i}.{i % 100:02d}" for i in range(10, 2010)]
    (tmp_path / "items.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "script.sql").write_text(PSQL_SCRIPT)
    out = _run([str(find_bindir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-h", "127.0.0.1", "-p", str(gw.port), "-U", "postgres", "-d", fresh_db,
                "-f", "script.sql"], pg_primary.password, tmp_path)
    wait_drained(gw)

    direct = pg_primary.psql("COPY (SELECT id, name, price, stock FROM items ORDER BY id) "
                             "TO STDOUT;", fresh_db)
    assert out == direct  # COPY TO STDOUT came back whole, from the primary
    assert len(out.splitlines()) == 3 + 2000
    assert (tmp_path / "out.csv").read_text().splitlines()[:3] == [
        "1,apple", "2,banana", "3,cherry"]
    assert pg_primary.query_value("SELECT count(*) FROM items WHERE id IN (4, 5000)",
                                  fresh_db) == "0"
    same_on_both("SELECT * FROM items ORDER BY id", fresh_db, pg_primary, pg_mirror)
    same_on_both("SELECT indexname FROM pg_indexes WHERE tablename = 'items' ORDER BY 1",
                 fresh_db, pg_primary, pg_mirror)
    state = assert_balanced(gw)[(LISTENER, "mirror")]
    assert state["dropped"] == 0
    # The duplicate key and the COMMIT-turned-ROLLBACK fail the same way on the mirror.
    assert outcome(gw, "error") == 1


# ----------------------------------------------------------------------------- pgbench

PGBENCH_SUMS = {
    "accounts": "SELECT sum(abalance), count(*) FROM pgbench_accounts",
    "tellers": "SELECT sum(tbalance), count(*) FROM pgbench_tellers",
    "branches": "SELECT sum(bbalance), count(*) FROM pgbench_branches",
    "history": "SELECT count(*), sum(tid), sum(bid), sum(aid), sum(delta) FROM pgbench_history",
}


def _pgbench(gw: Gateway, db: str, password: str, cwd: Path, *args: str) -> str:
    return _run([str(find_bindir() / "pgbench"), "-h", "127.0.0.1", "-p", str(gw.port),
                 "-U", "postgres", *args, db], password, cwd, timeout=150)


def _assert_pgbench_tables_equal(gw: Gateway, db: str, primary: PgCluster,
                                 mirror: PgCluster) -> None:
    for sql in PGBENCH_SUMS.values():
        try:
            same_on_both(sql, db, primary, mirror)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nmirror state: {mirror_state(gw)}, drops: "
                                 f"{drop_reasons(gw)}") from None


def test_pgbench_simple_extended_prepared_runs_replay_identically(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
    tmp_path: Path,
) -> None:
    gw = gateway()
    pw = pg_primary.password
    _pgbench(gw, fresh_db, pw, tmp_path, "-i", "-s", "1", "-q")  # COPY FROM STDIN
    wait_drained(gw)
    same_on_both("SELECT count(*), sum(aid), sum(bid) FROM pgbench_accounts", fresh_db,
                 pg_primary, pg_mirror)
    for mode in ("simple", "extended", "prepared"):
        _pgbench(gw, fresh_db, pw, tmp_path, "-n", "-M", mode, "-c", "1", "-t", "200")
        wait_drained(gw)
        _assert_pgbench_tables_equal(gw, fresh_db, pg_primary, pg_mirror)
    assert pg_primary.query_value("SELECT count(*) FROM pgbench_history", fresh_db) == "600"
    state = assert_balanced(gw)[(LISTENER, "mirror")]
    assert state["dropped"] == 0
    assert outcome(gw, "error") == 0


def test_pgbench_concurrent_prepared_commutative_sums_match(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
    tmp_path: Path,
) -> None:
    gw = gateway()
    pw = pg_primary.password
    _pgbench(gw, fresh_db, pw, tmp_path, "-i", "-s", "1", "-q")
    wait_drained(gw)  # else the runs wait on the mirror for the init's locks
    _pgbench(gw, fresh_db, pw, tmp_path, "-n", "-M", "prepared", "-c", "4", "-j", "2",
             "-t", "200")
    wait_drained(gw)
    _assert_pgbench_tables_equal(gw, fresh_db, pg_primary, pg_mirror)
    assert pg_primary.query_value("SELECT count(*) FROM pgbench_history", fresh_db) == "800"
    assert_balanced(gw)
    assert dropped(gw) == 0
    assert outcome(gw, "error") == 0


# ----------------------------------------------------------------------------- psycopg 3


def test_psycopg_plain_and_binary_parameters_replay_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway()
    blob = bytes(range(256)) * 40
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, label text, data bytea, "
                     "ts timestamptz, amount numeric)")
        conn.execute("INSERT INTO t VALUES (1, 'plain', NULL, '2024-01-02 03:04:05+00', 1.5)")
        cur = conn.cursor()
        # %b: binary parameters; binary=True: binary results.
        cur.execute("INSERT INTO t VALUES (%b, %b, %b, %b, %b) RETURNING id, data",
                    (2, "binary", blob, dt.datetime(2024, 6, 7, 8, 9, 10, tzinfo=dt.UTC),
                     Decimal("12345.678")), binary=True)
        assert cur.fetchone() == (2, blob)
        cur.execute("INSERT INTO t (id, label, data) VALUES (%s, %s, %s)",
                    (3, "text params, bytea", b"\x00\x01\xff"))
        cur.execute("SELECT data FROM t WHERE id = %b", (2,), binary=True)
        assert cur.fetchone() == (blob,)
    wait_drained(gw)
    same_on_both("SELECT id, label, md5(data), ts, amount FROM t ORDER BY id", fresh_db,
                 pg_primary, pg_mirror)
    assert_balanced(gw)
    assert dropped(gw) == 0 and outcome(gw, "error") == 0


def test_psycopg_pipeline_mode_replays_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway()
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE p (id int PRIMARY KEY, v text)")
        with conn.pipeline() as p:
            for i in range(50):
                conn.execute("INSERT INTO p VALUES (%s, %s)", (i, f"v{i}"))
                if i % 10 == 9:
                    p.sync()
            cur = conn.execute("SELECT count(*), sum(id) FROM p")
        assert cur.fetchone() == (50, sum(range(50)))
        with conn.pipeline():
            conn.execute("UPDATE p SET v = v || '!' WHERE id % 2 = 0")
            conn.execute("DELETE FROM p WHERE id > %s", (40,))
    wait_drained(gw)
    same_on_both("SELECT * FROM p ORDER BY id", fresh_db, pg_primary, pg_mirror)
    assert_balanced(gw)
    assert dropped(gw) == 0 and outcome(gw, "error") == 0


def test_psycopg_copy_text_and_binary_replay_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway()
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE c (id int, name text, data bytea)")
        cur = conn.cursor()
        with cur.copy("COPY c (id, name, data) FROM STDIN") as copy:
            for i in range(20_000):  # a few hundred KB: many CopyData chunks
                copy.write_row((i, f"row {i}", bytes([i % 256]) * 8))
        with cur.copy("COPY c (id, name, data) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "bytea"])
            for i in range(20_000, 25_000):
                copy.write_row((i, f"binary {i}", bytes(range(i % 200))))
        with conn.transaction():
            with cur.copy("COPY c (id, name) FROM STDIN") as copy:
                copy.write_row((-1, "copied inside a transaction"))
        got = []
        with cur.copy("COPY (SELECT id FROM c WHERE id < 3 ORDER BY id) TO STDOUT") as copy:
            for row in copy.rows():
                got.append(row)
        assert got == [("-1",), ("0",), ("1",), ("2",)]
    wait_drained(gw)
    same_on_both("SELECT count(*), sum(id), md5(string_agg(name || md5(data), ',' ORDER BY id))"
                 " FROM c", fresh_db, pg_primary, pg_mirror)
    assert pg_mirror.query_value("SELECT count(*) FROM c", fresh_db) == "25001"
    assert_balanced(gw)
    assert dropped(gw) == 0 and outcome(gw, "error") == 0


def test_psycopg_server_side_prepared_statements_reused_replay_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway()
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE s (id int PRIMARY KEY, sq bigint)")
        for i in range(200):
            conn.execute("INSERT INTO s VALUES (%s, %s)", (i, i * i), prepare=True)
        for i in range(0, 200, 3):
            conn.execute("UPDATE s SET sq = -sq WHERE id = %s", (i,), prepare=True)
        names = {r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements")}
        assert len(names) >= 2  # really prepared server-side
        conn.execute("DEALLOCATE ALL")
        for i in range(200, 210):
            conn.execute("INSERT INTO s VALUES (%s, %s)", (i, i * i), prepare=True)
    wait_drained(gw)
    same_on_both("SELECT count(*), sum(id), sum(sq) FROM s", fresh_db, pg_primary, pg_mirror)
    assert_balanced(gw)
    assert dropped(gw) == 0 and outcome(gw, "error") == 0


def test_psycopg_transactions_commit_and_rollback_by_exception_replay_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway()
    with psycopg.connect(gw.dsn(fresh_db)) as conn:  # not autocommit: implicit BEGINs
        conn.execute("CREATE TABLE tx (id int PRIMARY KEY, note text)")
        conn.commit()
        with conn.transaction():
            conn.execute("INSERT INTO tx VALUES (1, 'committed')")
            with pytest.raises(ZeroDivisionError), conn.transaction():  # a savepoint
                conn.execute("INSERT INTO tx VALUES (2, 'savepoint rolled back')")
                raise ZeroDivisionError
            conn.execute("INSERT INTO tx VALUES (3, 'after the savepoint')")
        with pytest.raises(RuntimeError), conn.transaction():
            conn.execute("INSERT INTO tx VALUES (4, 'rolled back')")
            conn.execute("UPDATE tx SET note = 'changed' WHERE id = 1")
            raise RuntimeError("roll back")
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute("INSERT INTO tx VALUES (5, 'before the error')")
            conn.execute("INSERT INTO tx VALUES (1, 'duplicate')")
        conn.execute("INSERT INTO tx VALUES (6, 'implicit transaction')")
        conn.rollback()
        conn.execute("INSERT INTO tx VALUES (7, 'implicit, committed')")
        conn.commit()
    wait_drained(gw)
    assert pg_primary.psql("SELECT id FROM tx ORDER BY id", fresh_db).split() == ["1", "3", "7"]
    same_on_both("SELECT * FROM tx ORDER BY id", fresh_db, pg_primary, pg_mirror)
    assert_balanced(gw)
    assert dropped(gw) == 0


# ----------------------------------------------------------------------------- asyncpg


async def _aconnect(gw: Gateway, db: str, **kwargs: object) -> asyncpg.Connection:
    return await asyncpg.connect(gw.dsn(db), **kwargs)


async def _listen(conn: asyncpg.Connection, channel: str,
                  received: list[tuple[str, str]]) -> asyncio.Event:
    """LISTEN on ``channel``: each notification is appended to ``received``,
    and the event returned is set at the first."""
    got = asyncio.Event()

    def on_notify(conn: object, pid: int, channel: str, payload: str) -> None:
        received.append((channel, payload))
        got.set()

    await conn.add_listener(channel, on_notify)
    return got


def test_asyncpg_prepared_statements_and_cursor_replay_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway()

    async def main() -> None:
        conn = await _aconnect(gw, fresh_db)
        try:
            await conn.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
            await conn.execute("CREATE TABLE b (id int PRIMARY KEY, doubled int)")
            insert = await conn.prepare("INSERT INTO a VALUES ($1, $2)")
            for i in range(150):
                await insert.fetch(i, f"v{i}")
            await conn.executemany("INSERT INTO a VALUES ($1, $2)",
                                   [(i, f"many{i}") for i in range(150, 300)])
            count = await conn.prepare("SELECT count(*) FROM a WHERE id < $1")
            assert [await count.fetchval(n) for n in (10, 100, 1000)] == [10, 100, 300]
            async with conn.transaction():
                async for row in conn.cursor("SELECT id FROM a WHERE id % 7 = 0 ORDER BY id",
                                             prefetch=5):
                    await conn.execute("INSERT INTO b VALUES ($1, $2)", row["id"],
                                       row["id"] * 2)
                cur = await conn.cursor("SELECT id FROM a ORDER BY id DESC")
                top = await cur.fetch(3)
                assert [r["id"] for r in top] == [299, 298, 297]
                await conn.execute("DELETE FROM a WHERE id > $1", 290)
        finally:
            await conn.close()

    asyncio.run(main())
    wait_drained(gw)
    same_on_both("SELECT * FROM a ORDER BY id", fresh_db, pg_primary, pg_mirror)
    same_on_both("SELECT * FROM b ORDER BY id", fresh_db, pg_primary, pg_mirror)
    assert pg_mirror.query_value("SELECT count(*) FROM b", fresh_db) == "43"
    assert_balanced(gw)
    assert dropped(gw) == 0 and outcome(gw, "error") == 0


def test_asyncpg_copy_records_to_table_replays_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway()

    async def main() -> None:
        conn = await _aconnect(gw, fresh_db)
        try:
            await conn.execute("CREATE TABLE r (id int, name text, score float8)")
            result = await conn.copy_records_to_table(
                "r", records=[(i, f"n{i}", i / 3) for i in range(10_000)])
            assert result == "COPY 10000"
            async with conn.transaction():
                await conn.copy_records_to_table("r", records=[(-1, "in tx", 0.5)])
        finally:
            await conn.close()

    asyncio.run(main())
    wait_drained(gw)
    same_on_both("SELECT count(*), sum(id), sum(score), md5(string_agg(name, ',' ORDER BY id))"
                 " FROM r", fresh_db, pg_primary, pg_mirror)
    assert_balanced(gw)
    assert dropped(gw) == 0 and outcome(gw, "error") == 0


def test_asyncpg_notify_reaches_listener_exactly_once(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway()
    received: list[tuple[str, str]] = []

    async def main() -> None:
        listener = await _aconnect(gw, fresh_db)
        sender = await _aconnect(gw, fresh_db)
        try:
            got = await _listen(listener, "events", received)
            # Let the mirror replay the LISTEN before the NOTIFY, so that the
            # mirror's own notification exists and must be held back.
            wait_drained(gw)
            await sender.execute("NOTIFY events, 'hello'")
            await asyncio.wait_for(got.wait(), 10)
            wait_drained(gw)
            # Anything the mirror might leak would arrive with the next exchange.
            await asyncio.sleep(0.3)
            assert await listener.fetchval("SELECT 1") == 1
            await asyncio.sleep(0.1)
        finally:
            await sender.close()
            await listener.close()

    asyncio.run(main())
    assert received == [("events", "hello")]
    wait_drained(gw)
    assert_balanced(gw)
    assert dropped(gw) == 0 and outcome(gw, "error") == 0


def _cancel_count(cluster: PgCluster) -> int:
    try:
        text = cluster.logfile.read_text(errors="replace")
    except OSError:
        return 0
    return text.count("canceling statement due to user request")


def test_asyncpg_cancelled_query_leaves_connection_usable(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway(timeout="20s")
    sleeping = ("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE 'select pg_sleep(10)%' AND pid <> pg_backend_pid()")
    primary_cancels, mirror_cancels = _cancel_count(pg_primary), _cancel_count(pg_mirror)

    async def main() -> None:
        conn = await _aconnect(gw, fresh_db)
        try:
            await conn.execute("CREATE TABLE k (x int)")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.execute("select pg_sleep(10)"), 0.5)
            assert await conn.fetchval("SELECT 42") == 42
            await conn.execute("INSERT INTO k VALUES (1)")
        finally:
            await conn.close()

    asyncio.run(main())
    # The CancelRequest went through the gateway to the primary's backend.
    assert _cancel_count(pg_primary) == primary_cancels + 1
    assert pg_primary.query_value(sleeping) == "0"
    # Best effort on the mirror: the cancel reached it too, so no sleep lingers.
    deadline = time.monotonic() + 5
    while _cancel_count(pg_mirror) == mirror_cancels and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _cancel_count(pg_mirror) == mirror_cancels + 1
    assert pg_mirror.query_value(sleeping) == "0"
    wait_drained(gw)
    same_on_both("SELECT * FROM k", fresh_db, pg_primary, pg_mirror)
    assert_balanced(gw)
    assert dropped(gw) == 0
    assert outcome(gw, "error") == 1  # the cancelled sleep, on the mirror too


# ------------------------------------------------------------ unmirrored sessions


def test_an_unmirrored_session_relays_large_answers_exactly_and_counts_them(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster,
) -> None:
    # No mirror: the C lane reads and writes both sockets itself, forwarding
    # and counting every chunk, and a large answer arrives in chunks that
    # split frame headers anywhere; a client that stops reading for a while
    # holds the primary back. What the client reads must be what the primary
    # sends directly, and the units counted must be those the lane counts on
    # the event loop's transports (MIRRORGATE_PG_LANE=transports) and the
    # session's Python counts (MIRRORGATE_PG_LANE=off).
    pg_primary.execute(
        "CREATE TABLE big AS SELECT i, repeat(md5(i::text), i % 7) AS v "
        "FROM generate_series(1, 30000) AS i", fresh_db)
    query = "SELECT i, v FROM big ORDER BY i"
    wide = "SELECT i, repeat(md5(i::text), 32) FROM generate_series(1, 20000) AS i"

    def workload(dsn: str) -> tuple[list[tuple[int, str]], bytes, list[tuple[int, str]]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(query).fetchall()
            for i in range(20):  # short extended-protocol cycles between the big ones
                assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
            with conn.cursor().copy(f"COPY ({query}) TO STDOUT") as copy:
                copied = b"".join(bytes(block) for block in copy)
            streamed = []  # 20 MB, read row by row with pauses: the client falls behind
            for n, row in enumerate(conn.cursor().stream(wide)):
                if n % 5000 == 0:
                    time.sleep(0.3)
                streamed.append(row)
        return rows, copied, streamed

    direct = workload(pg_primary.dsn(dbname=fresh_db))
    units = []
    for env in ({}, {"MIRRORGATE_PG_LANE": "transports"}, {"MIRRORGATE_PG_LANE": "off"}):
        gw = gateway(mirrors=[], env=env)
        assert workload(gw.dsn(fresh_db)) == direct
        units.append((gw.sample("mirrorgate_primary_units_total", listener=LISTENER),
                      gw.sample("mirrorgate_primary_latency_seconds_count", listener=LISTENER)))
    assert units[0] == units[1] == units[2]
    assert units[0][0] >= 22


def test_an_unmirrored_session_s_lane_passes_notifications_cancels_and_a_terminated_backend(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster,
) -> None:
    # The C lane owns these sessions' sockets: what the primary sends
    # unasked (a notification, the error of a cancelled statement, the
    # FATAL of a terminated backend and its close) must reach the client as
    # directly, and the gateway must see the session end.
    gw = gateway(mirrors=[])
    received: list[tuple[str, str]] = []
    cancels = _cancel_count(pg_primary)

    async def main() -> None:
        listener = await _aconnect(gw, fresh_db)
        sender = await _aconnect(gw, fresh_db)
        try:
            got = await _listen(listener, "events", received)
            await sender.execute("NOTIFY events, 'hello'")
            await asyncio.wait_for(got.wait(), 10)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sender.execute("select pg_sleep(10)"), 0.5)
            assert await sender.fetchval("SELECT 42") == 42
            pid = await sender.fetchval("SELECT pg_backend_pid()")
            pg_primary.execute(f"SELECT pg_terminate_backend({pid})", fresh_db)
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await asyncio.wait_for(sender.fetchval("SELECT 1"), 10)
            assert await listener.fetchval("SELECT 2") == 2  # the other session carries on
        finally:
            await sender.close()
            await listener.close()

    asyncio.run(main())
    assert received == [("events", "hello")]
    assert _cancel_count(pg_primary) == cancels + 1
    deadline = time.monotonic() + 10
    while (gw.sample("mirrorgate_client_connections", listener=LISTENER)
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert gw.sample("mirrorgate_client_connections", listener=LISTENER) == 0
