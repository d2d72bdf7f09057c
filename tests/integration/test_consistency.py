# Mirror session consistency through the real gateway (design.md §1.5, §5).
#
# Owns: the evidence that a mirror replays a client session faithfully even
# when parts of it are dropped (prepared statements re-prepared, transactions
# rolled back whole), that the session's start-up parameters and user reach the
# mirror, that sampling (exposure) and several mirrors behave, and that the
# gateway authenticates to a mirror, and relays the client's authentication to
# the primary, with every method Postgres offers.
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest

from tests.integration.conftest import (
    LISTENER,
    Gateway,
    MirrorSpec,
    assert_balanced,
    dropped,
    mirror_state,
    outcome,
    same_on_both,
    wait_drained,
)
from tests.support.pgcluster import PgCluster, quote_ident

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., Gateway]


def _name(stem: str) -> str:
    return f"{stem}_{uuid.uuid4().hex[:6]}"


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def _mirror_blocked(mirror: PgCluster, db: str, table: str) -> Iterator[psycopg.Connection]:
    """Hold an exclusive lock on ``table`` on the mirror (directly) until the block ends."""
    with psycopg.connect(mirror.dsn(dbname=db)) as conn:
        conn.execute(f"LOCK TABLE {quote_ident(table)} IN ACCESS EXCLUSIVE MODE")
        try:
            yield conn
        finally:
            conn.rollback()


def _in_flight(gw: Gateway) -> float:
    return gw.sample("mirrorgate_mirror_in_flight", listener=LISTENER, mirror="mirror")


def _grant(db: str, user: str, *clusters: PgCluster) -> None:
    for c in clusters:
        c.execute(f"GRANT ALL ON SCHEMA public TO {quote_ident(user)};", db)


# ----------------------------------------------------------------------------- prepared


def test_prepared_statement_whose_parse_was_too_large_is_reprepared_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    # The Parse unit is larger than the mirror's whole byte budget, so it is
    # always dropped (too_large); the Binds that follow are small and queued.
    gw = gateway(queue_bytes="32KiB")
    padding = "/* " + "x" * 40_000 + " */"
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        for i in range(100):
            conn.execute(f"INSERT INTO t VALUES (%s, %s) {padding}", (i, f"v{i}"), prepare=True)
        conn.execute(f"UPDATE t SET v = upper(v) WHERE id < %s {padding}", (10,), prepare=True)
    wait_drained(gw)
    assert dropped(gw, reason="too_large") == 2  # the two Parse units
    assert dropped(gw) == 2, mirror_state(gw)
    assert outcome(gw, "error") == 0  # every Bind found its statement re-prepared
    same_on_both("SELECT * FROM t ORDER BY id", fresh_db, pg_primary, pg_mirror)
    assert_balanced(gw)


def test_prepared_statement_parse_dropped_from_full_queue_is_reprepared(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway(queue=1)
    insert = "INSERT INTO t VALUES (%s, %s)"
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE gate (x int)")
        wait_drained(gw)
        with _mirror_blocked(pg_mirror, fresh_db, "gate"):
            conn.execute("SELECT count(*) FROM gate")  # stuck on the mirror: in flight
            _wait_for(lambda: _in_flight(gw) == 1, "the mirror to start the blocked unit")
            conn.execute("SELECT 1")  # fills the mirror's queue of one
            # Parse (its own cycle with psycopg) and the first Bind: both dropped.
            conn.execute(insert, (0, "dropped"), prepare=True)
            assert dropped(gw, reason="queue_full") == 2
        wait_drained(gw)
        for i in range(1, 21):
            conn.execute(insert, (i, f"v{i}"), prepare=True)
            wait_drained(gw)  # a queue of one: one unit at a time
        names = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
        assert names == (1,)
    wait_drained(gw)
    assert outcome(gw, "error") == 0
    assert dropped(gw) == 2, mirror_state(gw)
    assert pg_mirror.query_value("SELECT count(*), min(id) FROM t", fresh_db) == "20|1"
    assert pg_primary.query_value("SELECT count(*), min(id) FROM t", fresh_db) == "21|0"
    same_on_both("SELECT * FROM t WHERE id > 0 ORDER BY id", fresh_db, pg_primary, pg_mirror)
    assert_balanced(gw)


def test_prepared_statements_survive_mirror_connection_reset(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway(timeout="1s")
    insert = "INSERT INTO t VALUES (%s, current_setting('application_name'))"
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True, application_name="resetme") as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, app text)")
        conn.execute("CREATE TABLE gate (x int)")
        conn.execute(insert, (1,), prepare=True)
        wait_drained(gw)
        with _mirror_blocked(pg_mirror, fresh_db, "gate"):
            conn.execute("SELECT count(*) FROM gate")  # times out on the mirror
            _wait_for(lambda: dropped(gw, reason="mirror_timeout") == 1, "the mirror timeout")
        # A new mirror connection: the statement and the start-up parameters
        # must be given to it again.
        for i in range(2, 30):
            conn.execute(insert, (i,), prepare=True)
    wait_drained(gw)
    assert outcome(gw, "error") == 0
    same_on_both("SELECT * FROM t ORDER BY id", fresh_db, pg_primary, pg_mirror)
    assert pg_mirror.query_value("SELECT DISTINCT app FROM t", fresh_db) == "resetme"
    assert_balanced(gw)


def test_statement_deallocated_by_name_and_parsed_again_is_reprepared(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    # libpq's own prepare/exec_prepared, so that a statement name is reused.
    gw = gateway(queue=1)
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int); CREATE TABLE gate (x int)")
        pgconn = conn.pgconn

        def ok(result: psycopg.pq.abc.PGresult) -> None:
            assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
            wait_drained(gw)

        ok(pgconn.prepare(b"ins", b"INSERT INTO t VALUES ($1::int)"))
        ok(pgconn.exec_prepared(b"ins", [b"1"]))
        ok(pgconn.exec_(b"DEALLOCATE ins"))
        with _mirror_blocked(pg_mirror, fresh_db, "gate"):
            conn.execute("SELECT count(*) FROM gate")
            _wait_for(lambda: _in_flight(gw) == 1, "the mirror to start the blocked unit")
            conn.execute("SELECT 1")  # fills the queue of one
            # The new definition of "ins" does not reach the mirror.
            assert pgconn.prepare(b"ins", b"INSERT INTO t VALUES ($1::int * 10)").status \
                == psycopg.pq.ExecStatus.COMMAND_OK
            assert dropped(gw, reason="queue_full") == 1, mirror_state(gw)
        wait_drained(gw)
        ok(pgconn.exec_prepared(b"ins", [b"2"]))
    wait_drained(gw)
    assert outcome(gw, "error") == 0, mirror_state(gw)
    same_on_both("SELECT x FROM t ORDER BY x", fresh_db, pg_primary, pg_mirror)
    assert pg_primary.psql("SELECT x FROM t ORDER BY x", fresh_db).split() == ["1", "20"]
    assert_balanced(gw)


# ----------------------------------------------------------------------------- transactions


def test_drop_inside_transaction_rolls_back_the_mirror_whole(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway(queue=1)
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE gate (x int)")
        wait_drained(gw)
        with _mirror_blocked(pg_mirror, fresh_db, "gate"):
            with conn.transaction():
                conn.execute("INSERT INTO gate VALUES (1)")  # in flight, blocked
                _wait_for(lambda: _in_flight(gw) == 1, "the mirror to start the blocked unit")
                conn.execute("INSERT INTO t VALUES (1)")  # queued
                conn.execute("INSERT INTO t VALUES (2)")  # dropped: queue full
                conn.execute("INSERT INTO t VALUES (3)")
            # COMMIT went the same way.
        wait_drained(gw)
        with conn.transaction():  # the next transaction is whole again
            wait_drained(gw)  # (a queue of one: one unit at a time)
            conn.execute("INSERT INTO t VALUES (10)")
            wait_drained(gw)
            conn.execute("INSERT INTO t VALUES (11)")
            wait_drained(gw)
    wait_drained(gw)
    assert pg_primary.psql("SELECT id FROM t ORDER BY id", fresh_db).split() == [
        "1", "2", "3", "10", "11"]
    # Never half a transaction: nothing of the first one is on the mirror.
    assert pg_mirror.psql("SELECT id FROM t ORDER BY id", fresh_db).split() == ["10", "11"]
    assert pg_mirror.query_value("SELECT count(*) FROM gate", fresh_db) == "0"
    assert dropped(gw, reason="queue_full") >= 1
    assert_balanced(gw)


def test_transaction_failed_on_primary_only_is_rolled_back_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    # The mirror's table lacks the primary's key: the duplicate fails on the
    # primary alone, and the mirror must not commit what the primary did not.
    pg_primary.execute("CREATE TABLE t (id int PRIMARY KEY);", fresh_db)
    pg_mirror.execute("CREATE TABLE t (id int);", fresh_db)
    gw = gateway()
    with psycopg.connect(gw.dsn(fresh_db)) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        conn.execute("INSERT INTO t VALUES (2)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()  # the primary rolls back
        conn.execute("INSERT INTO t VALUES (3)")
        conn.commit()
    wait_drained(gw)
    assert pg_primary.psql("SELECT id FROM t ORDER BY id", fresh_db).split() == ["1", "3"]
    assert pg_mirror.psql("SELECT id FROM t ORDER BY id", fresh_db).split() == ["1", "3"]
    assert_balanced(gw)


def test_savepoint_recovering_from_primary_only_failure_keeps_the_mirror_transaction(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    # get_or_create as ORMs do it: try the INSERT in a savepoint, roll back to it
    # on a unique violation. The mirror (its key missing, as after drops) takes
    # the INSERT; ROLLBACK TO SAVEPOINT undoes it there too, and the rest of the
    # transaction must still commit on the mirror as on the primary.
    pg_primary.execute("CREATE TABLE t (id int PRIMARY KEY);", fresh_db)
    pg_mirror.execute("CREATE TABLE t (id int);", fresh_db)
    pg_primary.execute("INSERT INTO t VALUES (1);", fresh_db)
    pg_mirror.execute("INSERT INTO t VALUES (1);", fresh_db)
    gw = gateway()
    with psycopg.connect(gw.dsn(fresh_db)) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (10)")
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("INSERT INTO t VALUES (11)")
        # Failed on the primary alone, and never recovered: nothing of it commits.
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute("INSERT INTO t VALUES (20)")
            conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("INSERT INTO t VALUES (30)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("INSERT INTO t VALUES (31)")
        conn.commit()  # the primary rolls back
        conn.execute("INSERT INTO t VALUES (40)")
        conn.commit()
    wait_drained(gw)
    assert pg_primary.psql("SELECT id FROM t ORDER BY id", fresh_db).split() == [
        "1", "10", "11", "40"]
    same_on_both("SELECT id FROM t ORDER BY id", fresh_db, pg_primary, pg_mirror)
    assert_balanced(gw)


def test_client_gone_mid_transaction_is_rolled_back_on_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway()
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
    conn = psycopg.connect(gw.dsn(fresh_db))
    conn.execute("INSERT INTO t VALUES (1)")  # in the implicit transaction
    wait_drained(gw)
    conn.close()  # Terminate, no COMMIT
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    wait_drained(gw)
    # Once no mirror session of this database is left in a transaction:
    _wait_for(lambda: pg_mirror.query_value(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state LIKE 'idle in transaction%'", fresh_db) == "0", "the mirror's rollback")
    same_on_both("SELECT id FROM t ORDER BY id", fresh_db, pg_primary, pg_mirror)
    assert pg_mirror.query_value("SELECT string_agg(id::text, ',') FROM t", fresh_db) == "2"
    assert_balanced(gw)


def test_pooled_mirror_connection_is_reset_between_sessions(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway()
    pg_primary.execute("CREATE SCHEMA other;", fresh_db)
    pg_mirror.execute("CREATE SCHEMA other;", fresh_db)
    session_sql = [
        "CREATE TABLE IF NOT EXISTS t (session int, backend int)",
        "INSERT INTO t VALUES (%s, pg_backend_pid())",  # the mirror's own pid there
        "CREATE TEMP TABLE scratch (x int)",
        "PREPARE q AS SELECT 1",
        "LISTEN chan",
        "SET search_path = other",
    ]
    discarded = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                 "AND state = 'idle' AND query = 'DISCARD ALL'")
    for session in (1, 2):
        with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
            for sql in session_sql:
                conn.execute(sql, (session,) if "%s" in sql else None)
        wait_drained(gw)
        _wait_for(lambda: pg_mirror.query_value(discarded, fresh_db) == "1",
                  "the mirror connection to be reset and pooled")
    # Session 2 ran on the same mirror connection, and found none of session 1's
    # state: no temp table, no prepared statement, search_path back to public.
    assert pg_mirror.query_value("SELECT count(DISTINCT backend) FROM public.t",
                                 fresh_db) == "1"
    assert outcome(gw, "error") == 0
    same_on_both("SELECT session FROM public.t ORDER BY session", fresh_db, pg_primary,
                 pg_mirror)
    assert_balanced(gw)


def test_mirror_url_database_overrides_the_clients_database(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    other = fresh_db + "_m"
    pg_mirror.create_database(other)
    try:
        gw = gateway(mirrors=[MirrorSpec(pg_mirror, database=other)])
        with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT current_database() AS db")
        wait_drained(gw)
        assert pg_primary.query_value("SELECT db FROM t", fresh_db) == fresh_db
        assert pg_mirror.query_value("SELECT db FROM t", other) == other
        assert pg_mirror.query_value(
            "SELECT count(*) FROM pg_tables WHERE tablename = 't'", fresh_db) == "0"
        assert outcome(gw, "error") == 0 and dropped(gw) == 0
        assert_balanced(gw)
        gw.process.stop()
    finally:
        pg_mirror.drop_database(other)


# ----------------------------------------------------------------------------- start-up


def test_startup_parameters_are_replayed_on_the_mirror(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = gateway()
    # libpq sends PGTZ and PGDATESTYLE as the TimeZone and DateStyle start-up parameters.
    monkeypatch.setenv("PGTZ", "Asia/Tokyo")
    monkeypatch.setenv("PGDATESTYLE", "SQL, DMY")
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as setup:
        setup.execute("CREATE SCHEMA myschema")
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True, application_name="xyz",
                         options="-c search_path=myschema") as conn:
        conn.execute("CREATE TABLE t (tz text, ds text, app text, path text, day text)")
        conn.execute("INSERT INTO t VALUES (current_setting('TimeZone'), "
                     "current_setting('DateStyle'), current_setting('application_name'), "
                     "current_setting('search_path'), '2024-03-05'::date::text)")
        wait_drained(gw)
        apps = ("SELECT usename, application_name FROM pg_stat_activity "
                f"WHERE datname = '{fresh_db}' AND pid <> pg_backend_pid()")
        # The gateway's mirror connection, while the client is connected.
        assert "postgres|xyz" in pg_mirror.psql(apps).split()
        assert "postgres|xyz" in pg_primary.psql(apps).split()
    wait_drained(gw)
    row = same_on_both("SELECT * FROM myschema.t", fresh_db, pg_primary, pg_mirror)
    assert row.strip() == "Asia/Tokyo|SQL, DMY|xyz|myschema|05/03/2024"
    for cluster in (pg_primary, pg_mirror):
        assert cluster.query_value(
            "SELECT count(*) FROM pg_tables WHERE tablename = 't' AND schemaname = 'public'",
            fresh_db) == "0"
    assert_balanced(gw)
    assert dropped(gw) == 0 and outcome(gw, "error") == 0


# ----------------------------------------------------------------------------- sampling


def test_exposure_zero_offers_nothing_and_counts_skipped_units(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    gw = gateway(exposure=0.0)
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        for i in range(20):
            conn.execute("INSERT INTO t VALUES (%s)", (i,))
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (-1)")
    wait_drained(gw)
    state = assert_balanced(gw)[(LISTENER, "mirror")]
    units = gw.sample("mirrorgate_primary_units_total", listener=LISTENER)
    assert units >= 24
    assert state["offered"] == 0 and state["delivered"] == 0 and state["dropped"] == 0
    assert state["skipped"] == units
    assert pg_primary.query_value("SELECT count(*) FROM t", fresh_db) == "21"
    assert pg_mirror.query_value(
        "SELECT count(*) FROM pg_tables WHERE tablename = 't'", fresh_db) == "0"


def test_two_mirrors_with_full_exposure_both_get_identical_data(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
    pg_mirror2: PgCluster,
) -> None:
    gw = gateway(mirrors=[MirrorSpec(pg_mirror, name="m1", options={"exposure": 1.0}),
                          MirrorSpec(pg_mirror2, name="m2", options={"exposure": 1.0})])
    with psycopg.connect(gw.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        for i in range(50):
            conn.execute("INSERT INTO t VALUES (%s, %s)", (i, f"v{i}"), prepare=True)
        with conn.cursor().copy("COPY t FROM STDIN") as copy:
            for i in range(50, 3000):
                copy.write_row((i, f"copied {i}"))
        with conn.transaction():
            conn.execute("UPDATE t SET v = v || '+' WHERE id % 3 = 0")
        with pytest.raises(ValueError), conn.transaction():
            conn.execute("DELETE FROM t")
            raise ValueError
    wait_drained(gw)
    same_on_both("SELECT count(*), md5(string_agg(id || v, ',' ORDER BY id)) FROM t",
                 fresh_db, pg_primary, pg_mirror, pg_mirror2)
    state = assert_balanced(gw)
    for name in ("m1", "m2"):
        s = state[(LISTENER, name)]
        assert s["offered"] > 50 and s["dropped"] == 0 and s["skipped"] == 0
        assert outcome(gw, "error", mirror=name) == 0
    assert state[(LISTENER, "m1")]["offered"] == state[(LISTENER, "m2")]["offered"]


# ----------------------------------------------------------------------------- users


def _session_users(cluster: PgCluster, db: str) -> set[str]:
    out = cluster.psql("SELECT usename FROM pg_stat_activity WHERE datname = "
                       f"'{db}' AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
    return set(out.split())


def test_mirror_user_defaults_to_the_clients_user(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    app = _name("app")
    for c in (pg_primary, pg_mirror):
        c.create_user(app, "pw")
    _grant(fresh_db, app, pg_primary, pg_mirror)
    for c in (pg_primary, pg_mirror):
        c.execute("CREATE TABLE private (x int);", fresh_db)  # owned by postgres
    gw = gateway(mirrors=[MirrorSpec(pg_mirror, password=None, users={app: "pw"})])
    with psycopg.connect(gw.dsn(fresh_db, app, "pw"), autocommit=True) as conn:
        conn.execute("CREATE TABLE mine (x int)")
        conn.execute("INSERT INTO mine VALUES (1), (2)")
        # Refused on the primary, and on the mirror with the same privileges.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO private VALUES (1)")
        wait_drained(gw)
        assert _session_users(pg_mirror, fresh_db) == {app}
    wait_drained(gw)
    same_on_both("SELECT x FROM mine ORDER BY x", fresh_db, pg_primary, pg_mirror)
    same_on_both("SELECT count(*) FROM private", fresh_db, pg_primary, pg_mirror)
    assert pg_mirror.query_value("SELECT tableowner FROM pg_tables WHERE tablename = 'mine'",
                                 fresh_db) == app
    assert outcome(gw, "error") == 1
    assert_balanced(gw)
    assert dropped(gw) == 0


def test_mirror_url_user_overrides_the_clients_user(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    app, shadow = _name("app"), _name("shadow")
    pg_primary.create_user(app, "pw")
    pg_mirror.create_user(shadow, "shadow-pw")
    _grant(fresh_db, app, pg_primary)
    _grant(fresh_db, shadow, pg_mirror)
    gw = gateway(mirrors=[MirrorSpec(pg_mirror, user=shadow, password="shadow-pw")])
    with psycopg.connect(gw.dsn(fresh_db, app, "pw"), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (who text)")
        conn.execute("INSERT INTO t VALUES (current_user)")
        wait_drained(gw)
        assert _session_users(pg_mirror, fresh_db) == {shadow}
    wait_drained(gw)
    assert pg_primary.query_value("SELECT who FROM t", fresh_db) == app
    assert pg_mirror.query_value("SELECT who FROM t", fresh_db) == shadow
    assert pg_mirror.query_value("SELECT tableowner FROM pg_tables WHERE tablename = 't'",
                                 fresh_db) == shadow
    assert outcome(gw, "error") == 0 and dropped(gw) == 0
    assert_balanced(gw)


# ----------------------------------------------------------------------------- auth


def test_gateway_authenticates_to_mirror_with_md5_cleartext_and_trust(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    user = _name("mauth")
    pg_primary.create_user(user, "pw")
    pg_mirror.create_user(user, "pw", method="md5")  # an MD5 hash: md5 and password work
    _grant(fresh_db, user, pg_primary, pg_mirror)
    for c in (pg_primary, pg_mirror):
        c.execute(f"CREATE TABLE t (method text); GRANT ALL ON t TO {quote_ident(user)};",
                  fresh_db)
    gw = gateway(mirrors=[MirrorSpec(pg_mirror, password=None, users={user: "pw"})])
    try:
        for method in ("md5", "password", "trust"):
            pg_mirror.set_hba([f"host all {user} 127.0.0.1/32 {method}"])
            # A new application_name: a new mirror connection, so a new login.
            with psycopg.connect(gw.dsn(fresh_db, user, "pw"), autocommit=True,
                                 application_name=f"via-{method}") as conn:
                conn.execute("INSERT INTO t VALUES (%s)", (method,))
            wait_drained(gw)
            assert pg_mirror.query_value(f"SELECT count(*) FROM t WHERE method = '{method}'",
                                         fresh_db) == "1", gw.log()
    finally:
        pg_mirror.reset_hba()
    same_on_both("SELECT method FROM t ORDER BY method", fresh_db, pg_primary, pg_mirror)
    assert dropped(gw) == 0 and outcome(gw, "error") == 0
    assert_balanced(gw)


def test_client_authenticates_to_primary_through_gateway_with_md5_cleartext_and_scram(
    gateway: GatewayFactory, fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster,
) -> None:
    users = {"md5": _name("cmd5"), "password": _name("cclear"),
             "scram-sha-256": _name("cscram")}
    for method, user in users.items():
        pg_primary.create_user(user, f"pw-{method}", method=method)
        pg_mirror.create_user(user, "mirror-pw")
        _grant(fresh_db, user, pg_primary, pg_mirror)
    pg_primary.execute("CREATE TABLE t (who text, method text);"
                       "GRANT ALL ON t TO PUBLIC;", fresh_db)
    pg_mirror.execute("CREATE TABLE t (who text, method text);"
                      "GRANT ALL ON t TO PUBLIC;", fresh_db)
    gw = gateway(mirrors=[MirrorSpec(pg_mirror, password=None,
                                     users=dict.fromkeys(users.values(), "mirror-pw"))])
    try:
        pg_primary.set_hba([f"host all {u} 127.0.0.1/32 {m}" for m, u in users.items()])
        for method, user in users.items():
            with psycopg.connect(gw.dsn(fresh_db, user, f"pw-{method}"),
                                 autocommit=True) as conn:
                conn.execute("INSERT INTO t VALUES (current_user, %s)", (method,))
            with pytest.raises(psycopg.OperationalError, match="authentication failed"):
                psycopg.connect(gw.dsn(fresh_db, user, "wrong"))
    finally:
        pg_primary.reset_hba()
    wait_drained(gw)
    out = same_on_both("SELECT who, method FROM t ORDER BY method", fresh_db, pg_primary,
                       pg_mirror)
    assert len(out.split()) == 3
    assert dropped(gw) == 0 and outcome(gw, "error") == 0
    state = mirror_state(gw)[(LISTENER, "mirror")]
    assert state["offered"] == 3
    assert_balanced(gw)
