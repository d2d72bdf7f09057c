# Tests of the test harness itself: the throwaway clusters and fresh_db.
#
# Owns: the evidence that PgCluster starts real servers with the settings and
# authentication the other integration tests rely on. Nothing here touches
# the gateway.
from __future__ import annotations

import uuid

import asyncpg
import psycopg
import pytest

from tests.support.pgcluster import PgCluster, PgClusterError

pytestmark = pytest.mark.integration


def _user() -> str:
    return f"u_{uuid.uuid4().hex[:8]}"


def test_cluster_runs_with_the_requested_settings(pg_primary: PgCluster) -> None:
    assert pg_primary.running
    assert pg_primary.host == "127.0.0.1" and pg_primary.port > 0
    settings = pg_primary.psql(
        "SELECT name || '=' || setting FROM pg_settings WHERE name IN "
        "('fsync', 'synchronous_commit', 'full_page_writes', 'max_connections', "
        "'log_min_messages', 'unix_socket_directories') ORDER BY name"
    ).split()
    assert settings == [
        "fsync=off",
        "full_page_writes=off",
        "log_min_messages=warning",
        "max_connections=200",
        "synchronous_commit=off",
        f"unix_socket_directories={pg_primary.sockdir}",
    ]


def test_primary_and_mirror_are_distinct_clusters(
    pg_primary: PgCluster, pg_mirror: PgCluster
) -> None:
    assert pg_primary.port != pg_mirror.port
    ids = {
        c.query_value("SELECT system_identifier FROM pg_control_system()")
        for c in (pg_primary, pg_mirror)
    }
    assert len(ids) == 2


def test_superuser_logs_in_with_scram_over_tcp(pg_primary: PgCluster) -> None:
    with psycopg.connect(pg_primary.dsn()) as conn:
        row = conn.execute("SELECT current_user, inet_server_port()").fetchone()
    assert row == ("postgres", pg_primary.port)
    stored = pg_primary.query_value("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
    assert stored.startswith("SCRAM-SHA-256$")


def test_wrong_password_is_refused(pg_primary: PgCluster) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_primary.dsn(password="not-the-password"))


def test_asyncpg_logs_in_with_scram(pg_primary: PgCluster) -> None:
    import asyncio

    async def main() -> int:
        conn = await asyncpg.connect(pg_primary.dsn())
        try:
            return int(await conn.fetchval("SELECT 41 + 1"))
        finally:
            await conn.close()

    assert asyncio.run(main()) == 42


def test_psql_returns_unaligned_tuples(pg_primary: PgCluster) -> None:
    out = pg_primary.psql("SELECT 1, 'a'; SELECT 2, 'b';")
    assert out.splitlines() == ["1|a", "2|b"]


def test_psql_failure_raises_with_the_server_error(pg_primary: PgCluster) -> None:
    with pytest.raises(PgClusterError, match="no_such_table"):
        pg_primary.psql("SELECT * FROM no_such_table")


def test_fresh_db_exists_on_primary_and_mirror(
    fresh_db: str, pg_primary: PgCluster, pg_mirror: PgCluster
) -> None:
    for cluster in (pg_primary, pg_mirror):
        assert (
            cluster.query_value(f"SELECT count(*) FROM pg_database WHERE datname = '{fresh_db}'")
            == "1"
        )
        cluster.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1);", dbname=fresh_db)
    with psycopg.connect(pg_primary.dsn(dbname=fresh_db)) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_fresh_db_is_new_for_each_test(fresh_db: str, pg_primary: PgCluster) -> None:
    # The previous test made table t in its own database; this one starts empty.
    assert (
        pg_primary.query_value(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", dbname=fresh_db
        )
        == "0"
    )


def test_fresh_db_reaches_mirror2_when_asked(fresh_db: str, pg_mirror2: PgCluster) -> None:
    assert (
        pg_mirror2.query_value(f"SELECT count(*) FROM pg_database WHERE datname = '{fresh_db}'")
        == "1"
    )


def test_md5_user_logs_in_after_set_hba(pg_primary: PgCluster, fresh_db: str) -> None:
    user = _user()
    pg_primary.create_user(user, "md5-secret", method="md5")
    stored = pg_primary.query_value(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'")
    assert stored.startswith("md5")
    try:
        # With the default scram-sha-256 line an MD5-stored password cannot log in.
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(pg_primary.dsn(user, "md5-secret", dbname=fresh_db))
        pg_primary.set_hba([f"host all {user} 127.0.0.1/32 md5"])
        with psycopg.connect(pg_primary.dsn(user, "md5-secret", dbname=fresh_db)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)
    finally:
        pg_primary.reset_hba()


def test_password_and_trust_methods_after_set_hba(pg_primary: PgCluster) -> None:
    clear, trusted = _user(), _user()
    pg_primary.create_user(clear, "clear-secret", method="password")
    pg_primary.create_user(trusted, None, method="trust")
    try:
        pg_primary.set_hba(
            [
                f"host all {clear} 127.0.0.1/32 password",
                f"host all {trusted} 127.0.0.1/32 trust",
            ]
        )
        with psycopg.connect(pg_primary.dsn(clear, "clear-secret")) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (clear,)
        with psycopg.connect(pg_primary.dsn(trusted)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (trusted,)
    finally:
        pg_primary.reset_hba()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_primary.dsn(trusted))


def test_create_user_superuser_flag(pg_primary: PgCluster) -> None:
    plain, admin = _user(), _user()
    pg_primary.create_user(plain, "pw1")
    pg_primary.create_user(admin, "pw2", superuser=True)
    flags = pg_primary.psql(
        f"SELECT rolname, rolsuper FROM pg_roles WHERE rolname IN ('{plain}', '{admin}') "
        "ORDER BY rolsuper"
    ).split()
    assert flags == [f"{plain}|f", f"{admin}|t"]


def test_dsn_is_a_libpq_url(pg_primary: PgCluster) -> None:
    dsn = pg_primary.dsn("bob", "p@ss:w/rd", dbname="app")
    assert dsn == f"postgresql://bob:p%40ss%3Aw%2Frd@127.0.0.1:{pg_primary.port}/app"
    assert psycopg.conninfo.conninfo_to_dict(dsn)["password"] == "p@ss:w/rd"


def test_stopped_cluster_can_start_again_and_cleans_up() -> None:
    cluster = PgCluster("restart").start()
    try:
        cluster.execute("CREATE TABLE kept (x int);")
        cluster.stop()
        assert not cluster.running
        cluster.start()
        assert cluster.query_value("SELECT count(*) FROM pg_tables WHERE tablename = 'kept'") == "1"
        assert "PgCluster restart running" in repr(cluster)
    finally:
        cluster.close()
    assert not cluster.base.exists()
