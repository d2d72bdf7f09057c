# The gateway process's life: `check`, `version`, and shutdown on SIGTERM.
#
# Owns: the CLI's exit codes and error reports (design.md §2, §6), and the
# shutdown sequence (stop accepting, let sessions finish and mirror queues
# drain within shutdown_timeout, count what is left as `shutdown` drops), seen
# from outside: exit codes, the log, /metrics and the mirror's data.
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from gateway import __version__
from tests.support.faults import (
    DelayProxy,
    GatewayPorts,
    HungServer,
    Launcher,
    assert_balanced,
    counts,
    pg_config,
    wait_at_rest,
)
from tests.support.gateway import REPO_ROOT
from tests.support.pgcluster import DEFAULT_PASSWORD, PgCluster

pytestmark = pytest.mark.integration

MIRROR = "mirror0"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=60)


def _dsn(ports: GatewayPorts, dbname: str) -> str:
    return f"postgresql://postgres:{DEFAULT_PASSWORD}@127.0.0.1:{ports.listen}/{dbname}"


# --------------------------------------------------------------------------- CLI


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(pg_config(GatewayPorts(), ("127.0.0.1", 5432), [
        {"url": "postgres://127.0.0.1:5433/staging", "queue": 10, "timeout": "250ms"}]))
    result = _cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_accepts_the_shipped_default_config() -> None:
    result = _cli("check", "--config", str(REPO_ROOT / "mirrorgate.toml"))
    assert result.returncode == 0, result.stderr


BAD_CONFIG = """\
[general]
shutdown_timeout = "30s"

[admin]
listen = "127.0.0.1:19930"

[[upstream]]
name = "prod"
url = "postgres://127.0.0.1:5432"

[[upstream]]
name = "staging"
url = "postgres://127.0.0.1:5433/db"

[[listener]]
name = "db"
protocol = "postgres"
listen = "127.0.0.1:16432"
primary = "prod"
max_clients = "a"

[[listener.mirror]]
upstream = "staging"
queue = 0
exposur = 1.0
timeout = "5"
"""


def test_check_reports_every_error_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG)
    lines = BAD_CONFIG.splitlines()

    def line_of(text: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if line.startswith(text))

    result = _cli("check", "--config", str(path))
    assert result.returncode == 1
    out = result.stderr + result.stdout
    expected = [
        (line_of("max_clients"), "max_clients"),
        (line_of("queue = 0"), "queue"),
        (line_of("exposur"), "exposur"),
        (line_of('timeout = "5"'), "timeout"),
    ]
    for line, key in expected:
        assert re.search(rf"{re.escape(str(path))}:{line}: \S*{key}", out), (line, key, out)


def test_check_of_a_missing_file_exits_1(tmp_path: Path) -> None:
    result = _cli("check", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "nope.toml" in result.stderr


def test_version_prints_the_package_version() -> None:
    result = _cli("version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mirrorgate {__version__}"


def test_run_on_a_taken_port_exits_1_with_a_clear_message(
    tmp_path: Path, pg_primary: PgCluster
) -> None:
    ports = GatewayPorts(listen=pg_primary.port)  # the primary holds this port
    path = tmp_path / "taken.toml"
    path.write_text(pg_config(ports, ("127.0.0.1", pg_primary.port + 1)))
    result = _cli("run", "--config", str(path))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "cannot serve" in out and "address already in use" in out
    assert "Traceback" not in out


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_with_an_idle_client_lets_the_queue_drain_and_exits_0(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    for cluster in (pg_primary, pg_mirror):
        cluster.execute("CREATE TABLE t (x int)", fresh_db)
    shutdown_timeout = 5.0
    n = 6
    with DelayProxy("127.0.0.1", pg_mirror.port, delay_down=0.2) as slow:
        ports = GatewayPorts()
        gw = launch(pg_config(
            ports, ("127.0.0.1", pg_primary.port),
            [{"url": f"postgres://127.0.0.1:{slow.port}", "password": DEFAULT_PASSWORD,
              "queue": 50}],
            general={"shutdown_timeout": f"{shutdown_timeout:g}s"}), ports)
        conn = psycopg.connect(_dsn(ports, fresh_db), autocommit=True, prepare_threshold=None)
        try:
            for i in range(n):
                conn.execute("INSERT INTO t VALUES (%s)", (i,))
            before = counts(gw, MIRROR)
            assert_balanced(before)
            assert before.offered == n
            code = gw.stop(signal.SIGTERM, timeout=shutdown_timeout + 10)
            assert code == 0, gw.log_tail()
            # The idle client was cut at the deadline.
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        finally:
            conn.close()
    assert pg_primary.query_value("SELECT count(*) FROM t", fresh_db) == str(n)
    # The queue drained before the deadline: the mirror has every row.
    assert pg_mirror.query_value("SELECT count(*) FROM t", fresh_db) == str(n)
    last = gw.log().splitlines()[-1]
    assert "1 sessions cut, 0 mirror units dropped as shutdown" in last, last
    assert "Traceback" not in gw.log() and "Task was destroyed" not in gw.log()


def test_sigterm_with_a_hung_mirror_drops_the_queue_as_shutdown_and_exits_0(
    launch: Launcher, pg_primary: PgCluster, fresh_db: str
) -> None:
    with HungServer() as hung:
        ports = GatewayPorts()
        gw = launch(pg_config(
            ports, ("127.0.0.1", pg_primary.port),
            [{"url": f"postgres://127.0.0.1:{hung.port}", "password": DEFAULT_PASSWORD,
              "timeout": "60s"}],
            general={"shutdown_timeout": "1s"}), ports)
        with psycopg.connect(_dsn(ports, fresh_db), autocommit=True,
                             prepare_threshold=None) as conn:
            for i in range(10):
                assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        deadline = time.monotonic() + 10
        while (before := counts(gw, MIRROR)).in_flight == 0:  # the worker is connecting
            if time.monotonic() > deadline:
                pytest.fail(f"the worker never started connecting: {before}")
            time.sleep(0.05)
        assert_balanced(before)
        held = int(before.queue_units + before.in_flight)
        assert held == 10
        code = gw.stop(signal.SIGTERM, timeout=15)
    assert code == 0, gw.log_tail()
    last = gw.log().splitlines()[-1]
    # Units still held when the grace period ends are dropped as shutdown; one
    # in flight may end first on its own (its mirror timeout) and be counted so.
    found = re.search(r"(\d+) mirror units dropped as shutdown", last)
    assert found is not None, last
    assert 1 <= int(found.group(1)) <= held, last
    assert "Traceback" not in gw.log() and "Task was destroyed" not in gw.log()


def test_sigterm_without_clients_exits_0_and_stops_listening(
    launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    ports = GatewayPorts()
    gw = launch(pg_config(ports, ("127.0.0.1", pg_primary.port), [
        {"url": f"postgres://127.0.0.1:{pg_mirror.port}", "password": DEFAULT_PASSWORD}]),
        ports)
    with psycopg.connect(_dsn(ports, fresh_db), autocommit=True) as conn:
        conn.execute("SELECT 1")
    c = wait_at_rest(gw, MIRROR, clients=0)
    assert_balanced(c)
    assert gw.stop(signal.SIGTERM, timeout=15) == 0
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_dsn(ports, fresh_db), connect_timeout=3)
    assert "0 sessions cut, 0 mirror units dropped as shutdown" in gw.log().splitlines()[-1]
