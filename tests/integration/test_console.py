# The Postgres admin console through real clients: psql and psycopg talk to
# the admin database of a real gateway in front of real clusters.
#
# Owns: the evidence that the console logs in with SCRAM-SHA-256 done by the
# gateway (and refuses a wrong password, an unknown user, or everyone when no
# [[admin.user]] is configured), never opens a primary connection, answers
# SHOW MIRRORS with the counters /metrics shows, lists the open client
# sessions, refuses what it does not know, follows `[admin] database`, and
# runs RELOAD on an edited config file.
from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from gateway_postgres import codec
from tests.integration.conftest import (
    LISTENER,
    MirrorSpec,
    drop_reasons,
    mirror_state,
    render_config,
    wait_drained,
)
from tests.support.gateway import GatewayProcess
from tests.support.net import free_port
from tests.support.pgcluster import PgCluster, find_bindir

pytestmark = pytest.mark.integration

OPS = ("ops", "console-Pa55")
AUDITOR = ("auditor", "audit pw with spaces")


class Console:
    """A gateway with an admin console, and the means to reach both."""

    def __init__(self, process: GatewayProcess, port: int, primary: PgCluster) -> None:
        self.process = process
        self.port = port
        self.primary = primary

    def psql(self, sql: str, *, user: str = OPS[0], password: str = OPS[1],
             dbname: str = "mirrorgate") -> subprocess.CompletedProcess[str]:
        """Run ``psql -c sql`` against the listener, tab-separated with a header."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSWORD=password, LC_ALL="C")
        conninfo = f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"
        return subprocess.run(
            [str(find_bindir() / "psql"), "-X", "-A", "-F", "\t", "-P", "footer=off",
             conninfo, "-c", sql],
            capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)

    def table(self, sql: str, **kwargs: str) -> list[dict[str, str]]:
        """The rows psql prints for ``sql``, by column name."""
        result = self.psql(sql, **kwargs)
        assert result.returncode == 0, f"psql failed:\n{result.stdout}\n{result.stderr}"
        header, *lines = result.stdout.splitlines()
        names = header.split("\t")
        return [dict(zip(names, line.split("\t"), strict=True)) for line in lines]

    def connect(self, *, user: str = OPS[0], password: str = OPS[1],
                dbname: str = "mirrorgate", **params: Any) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, dbname=dbname, user=user,
                               password=password, autocommit=True, connect_timeout=10,
                               **params)

    def client(self, dbname: str, **params: Any) -> psycopg.Connection:
        """A client of the primary, through the gateway."""
        return psycopg.connect(host="127.0.0.1", port=self.port, dbname=dbname,
                               user="postgres", password=self.primary.password,
                               autocommit=True, connect_timeout=10, **params)


def admin_lines(users: Sequence[tuple[str, str]], database: str | None) -> list[str]:
    lines = [] if database is None else [f'database = "{database}"']
    for name, password in users:
        lines += ["", "[[admin.user]]", f'name = "{name}"', f'password = "{password}"']
    return lines


@pytest.fixture
def console(tmp_path: Path, pg_primary: PgCluster, pg_mirror: PgCluster
            ) -> Iterator[Callable[..., Console]]:
    """Factory: ``console(users=(OPS, AUDITOR), database=None, startup_timeout=None)``
    -> a started Console.

    One Postgres listener in front of pg_primary, mirroring to pg_mirror.
    """
    started: list[GatewayProcess] = []

    def start(users: Sequence[tuple[str, str]] = (OPS, AUDITOR),
              database: str | None = None, startup_timeout: str | None = None) -> Console:
        port, admin = free_port(), free_port()
        text = render_config(pg_primary, [MirrorSpec(pg_mirror)], port, admin)
        if startup_timeout is not None:
            text = text.replace("[general]\n",
                                f'[general]\nstartup_timeout = "{startup_timeout}"\n', 1)
        head, sep, tail = text.partition('log_level = "debug"\n')
        text = head + sep + "\n".join(admin_lines(users, database)) + "\n" + tail
        process = GatewayProcess(text, workdir=tmp_path / f"gw{len(started)}")
        started.append(process)
        process.start()
        process.wait_ready(port)
        return Console(process, port, pg_primary)

    yield start
    problems = []
    for process in started:
        if process.returncode is None:
            process.stop()
        if "Traceback" in process.log():
            problems.append(f"{process.log_path}:\n{process.log_tail(60)}")
    if problems:
        pytest.fail("gateway logged a traceback:\n" + "\n".join(problems))


def test_show_mirrors_agrees_with_metrics_after_traffic(
    console: Callable[..., Console], fresh_db: str,
) -> None:
    gw = console()
    with gw.client(fresh_db) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        for i in range(20):
            conn.execute("INSERT INTO t VALUES (%s, %s)", (i, f"row {i}"))
        conn.execute("SELECT count(*) FROM t")
    wait_drained(gw.process)

    (row,) = gw.table("SHOW MIRRORS")
    state = mirror_state(gw.process)[(LISTENER, "mirror")]
    assert (row["listener"], row["mirror"], row["upstream"]) == (LISTENER, "mirror", "mirror")
    assert int(row["offered"]) == state["offered"] >= 22
    assert int(row["delivered"]) == state["delivered"]
    assert int(row["dropped"]) == state["dropped"]
    assert int(row["skipped"]) == state["skipped"]
    assert int(row["queue_units"]) == state["queued"] == 0
    assert int(row["in_flight"]) == state["in_flight"] == 0
    drops = drop_reasons(gw.process)
    for reason in ("queue_full", "too_large", "mirror_unavailable", "mirror_timeout",
                   "mirror_error", "transaction_aborted", "shutdown"):
        assert int(row[reason]) == drops.get((LISTENER, "mirror", reason), 0)
    assert row["health"] in ("up", "idle")
    assert float(row["lag_seconds"]) == 0.0


def test_show_listeners_through_psql(console: Callable[..., Console]) -> None:
    gw = console()
    (row,) = gw.table("show listeners;")
    assert row == {"name": LISTENER, "protocol": "postgres", "listen": f"127.0.0.1:{gw.port}",
                   "primary": "prod", "clients": "0", "units": "0", "mirrors": "mirror",
                   "bound": "t"}


def test_show_clients_lists_an_open_session_and_no_primary_connection_is_made(
    console: Callable[..., Console], fresh_db: str, pg_primary: PgCluster,
) -> None:
    gw = console()
    with gw.client(fresh_db, application_name="billing-job") as client, \
            gw.connect(application_name="console-probe") as admin:
        client.execute("SELECT 1")
        rows = admin.execute("SHOW CLIENTS").fetchall()
        names = [c.name for c in admin.execute("SHOW CLIENTS").description or ()]
        clients = [dict(zip(names, r, strict=True)) for r in rows]
        (billing,) = [c for c in clients if c["application_name"] == "billing-job"]
        assert billing["listener"] == LISTENER
        assert billing["user"] == "postgres" and billing["database"] == fresh_db
        assert billing["mirrors"] == "mirror" and billing["state"] == "ready"
        assert billing["since"].year >= 2024  # a timestamptz, read as a datetime
        # The console is the gateway talking: no session of its own on the
        # listener, and nothing reached the primary.
        assert all(c["database"] != "mirrorgate" for c in clients)
        assert pg_primary.query_value(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'console-probe'"
        ) == "0"


def test_every_configured_user_logs_in(console: Callable[..., Console]) -> None:
    gw = console()
    for user, password in (OPS, AUDITOR):
        with gw.connect(user=user, password=password) as admin:
            assert admin.info.parameter_status("session_authorization") == user
            assert len(admin.execute("SHOW HELP").fetchall()) == 5


@pytest.mark.parametrize("user,password", [("ops", "not the password"),
                                           ("intruder", OPS[1])])
def test_wrong_password_or_unknown_user_is_refused_alike(
    console: Callable[..., Console], user: str, password: str,
) -> None:
    gw = console()
    result = gw.psql("SHOW MIRRORS", user=user, password=password)
    assert result.returncode != 0
    assert f'password authentication failed for user "{user}"' in result.stderr
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        gw.connect(user=user, password=password)
    assert OPS[1] not in gw.process.log()


def test_console_is_off_without_admin_users(console: Callable[..., Console]) -> None:
    gw = console(users=())
    result = gw.psql("SHOW MIRRORS")
    assert result.returncode != 0
    assert "admin console is off" in result.stderr and "[[admin.user]]" in result.stderr


def test_unknown_command_and_extended_protocol_are_errors(
    console: Callable[..., Console],
) -> None:
    gw = console()
    with gw.connect() as admin:
        with pytest.raises(psycopg.errors.SyntaxError) as info:
            admin.execute("SHOW POOLS")
        assert "SHOW MIRRORS" in str(info.value) and "RELOAD" in str(info.value)
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            admin.execute("SHOW HELP", prepare=True)
        assert admin.execute("show help;").fetchone() is not None
    result = gw.psql("SELECT 1")
    assert result.returncode != 0 and "unknown command" in result.stderr


def test_renamed_admin_database(console: Callable[..., Console]) -> None:
    gw = console(database="gwadmin")
    assert [r["command"] for r in gw.table("SHOW HELP", dbname="gwadmin")][0] == "SHOW MIRRORS"
    # "mirrorgate" is now an ordinary database name, relayed to the primary.
    result = gw.psql("SELECT 1", user="postgres", password=gw.primary.password)
    assert result.returncode != 0
    assert 'database "mirrorgate" does not exist' in result.stderr


def test_reload_applies_an_edited_config(console: Callable[..., Console]) -> None:
    gw = console()
    config = gw.process.config_path
    text = config.read_text()
    config.write_text(text.replace("queue = 20000", 'queue = 20000\ntimeout = "7s"'))
    result = gw.psql("RELOAD")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "RELOAD"
    # One NoticeResponse per change, naming what changed.
    assert f"NOTICE:  listener {LISTENER}" in result.stderr
    status = httpx.get(f"http://{gw.process.admin}/status", timeout=10).json()
    (listener,) = status["listeners"]
    assert listener["mirrors"][0]["settings"]["timeout"] == 7.0
    assert gw.table("SHOW LISTENERS")[0]["bound"] == "t"


def test_reload_of_a_broken_config_is_refused(console: Callable[..., Console]) -> None:
    gw = console()
    config = gw.process.config_path
    config.write_text(config.read_text().replace('primary = "prod"', 'primary = "nowhere"'))
    result = gw.psql("RELOAD")
    assert result.returncode != 0
    assert "ERROR" in result.stderr and "nowhere" in result.stderr
    # The old config serves on.
    assert gw.table("SHOW LISTENERS")[0]["primary"] == "prod"


def test_a_login_left_unfinished_ends_at_startup_timeout(
    console: Callable[..., Console],
) -> None:
    gw = console(startup_timeout="1s")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        sock.sendall(codec.startup_message({"user": "ops", "database": "mirrorgate"}))
        received = b""
        while chunk := sock.recv(4096):  # the gateway closes after its error
            received += chunk
    assert received.startswith(b"R")  # AuthenticationSASL, then nothing from the client
    assert b"SCRAM-SHA-256" in received
    assert b"startup_timeout" in received and b"08P01" in received
