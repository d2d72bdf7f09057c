# The admin listener's operator endpoints on a real gateway process.
#
# Owns: the evidence that /status agrees with /metrics after real traffic
# (Postgres clients through a Postgres listener to real clusters) and shows no
# secret, that /readyz follows whether the primaries answer, that POST /reload
# of an unchanged config is ok, and the HTTP details (405 with Allow, HEAD,
# keep-alive, 404).
# Knows the config contract, the endpoints and metric names; nothing internal.
from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.faults import GatewayPorts, Launcher, mirror_counts, toml_value, wait_at_rest
from tests.support.net import free_port
from tests.support.pgcluster import DEFAULT_PASSWORD, PgCluster
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

MIRROR = "mirror"
USERS_TABLE_PW = "users-table-pw-51"
CONSOLE_PW = "console-pw-52"


@pytest.fixture
def side_primary() -> Iterator[socket.socket]:
    """A TCP listener standing in for a second listener's primary: readiness
    asks only that a primary accepts connections."""
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def _config(ports: GatewayPorts, side_port: int, primary: PgCluster, mirror: PgCluster,
            side_primary_port: int) -> str:
    return "\n".join([
        "[general]",
        'shutdown_timeout = "5s"',
        "",
        "[admin]",
        f'listen = "127.0.0.1:{ports.admin}"',
        'secret_headers = ["X-Api-Key"]',
        "",
        "[[admin.user]]",
        'name = "ops"',
        f"password = {toml_value(CONSOLE_PW)}",
        "",
        "[[upstream]]",
        'name = "prod"',
        f'url = "postgres://127.0.0.1:{primary.port}"',
        "",
        "[[upstream]]",
        f'name = "{MIRROR}"',
        f'url = "postgres://127.0.0.1:{mirror.port}"',
        f"password = {toml_value(DEFAULT_PASSWORD)}",
        f"users = {{ someone = {toml_value(USERS_TABLE_PW)} }}",
        "",
        "[[upstream]]",
        'name = "side_primary"',
        f'url = "postgres://127.0.0.1:{side_primary_port}"',
        "",
        "[[listener]]",
        'name = "db"',
        'protocol = "postgres"',
        f'listen = "127.0.0.1:{ports.listen}"',
        'primary = "prod"',
        "",
        "[[listener.mirror]]",
        f'upstream = "{MIRROR}"',
        "queue = 20000",
        "",
        "[[listener]]",
        'name = "side"',
        'protocol = "postgres"',
        f'listen = "127.0.0.1:{side_port}"',
        'primary = "side_primary"',
        "",
    ])


class Admin:
    """The admin listener of one gateway, over one keep-alive HTTP client."""

    def __init__(self, gw: Any, ports: GatewayPorts) -> None:
        self.gw = gw
        self.ports = ports
        self.base = f"http://{gw.admin}"
        self.http = httpx.Client(base_url=self.base, timeout=10.0)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def status(self) -> dict[str, Any]:
        response = self.get("/status")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def admin(launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster,
          side_primary: socket.socket) -> Iterator[Admin]:
    ports = GatewayPorts()
    side = free_port()
    while side in (ports.listen, ports.admin):
        side = free_port()
    gw = launch(_config(ports, side, pg_primary, pg_mirror,
                        side_primary.getsockname()[1]), ports)
    client = Admin(gw, ports)
    try:
        yield client
    finally:
        client.close()


def _workload(admin: Admin, db: str, n: int) -> None:
    port = admin.ports.listen
    dsn = f"postgresql://postgres:{DEFAULT_PASSWORD}@127.0.0.1:{port}/{db}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (x int)")
        for i in range(n):
            conn.execute("INSERT INTO t (x) VALUES (%s)", (i,))
            conn.execute("SELECT count(*) FROM t").fetchone()
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table")


def _listener(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(entry for entry in status["listeners"] if entry["name"] == name)


def test_status_counters_match_the_metrics_after_traffic(
    admin: Admin, pg_mirror: PgCluster, fresh_db: str
) -> None:
    n = 20
    _workload(admin, fresh_db, n)
    wait_at_rest(admin.gw, MIRROR, clients=0)
    status = admin.status()
    metrics = admin.gw.metrics()  # at rest: nothing changes between the two reads

    db = _listener(status, "db")
    mirror = next(m for m in db["mirrors"] if m["name"] == MIRROR)
    c = mirror_counts(metrics, MIRROR)
    assert mirror["offered"] == c.offered >= 2 * n + 2
    assert mirror["skipped"] == c.skipped == 0
    assert mirror["delivered"] == {k: int(v) for k, v in c.delivered.items()}
    assert mirror["delivered"]["error"] >= 1  # the missing table fails on the mirror too
    assert mirror["dropped"] == {k: int(v) for k, v in c.dropped.items()}
    assert mirror["queue_units"] == c.queue_units == 0
    assert mirror["queue_bytes"] == c.queue_bytes
    assert mirror["in_flight"] == c.in_flight == 0
    assert mirror["lag_seconds"] == 0.0
    assert mirror["latency"]["count"] == metrics[
        ("mirrorgate_mirror_latency_seconds_count",
         frozenset({("listener", "db"), ("mirror", MIRROR)}))]
    assert mirror["upstream"] == {"name": MIRROR, "host": "127.0.0.1", "port": pg_mirror.port,
                                  "address": f"127.0.0.1:{pg_mirror.port}"}
    assert mirror["health"]["state"] == "up"  # a pooled connection to it is open
    assert mirror["settings"]["queue"] == 20000

    labels = frozenset({("listener", "db")})
    assert db["primary_units"] == metrics[("mirrorgate_primary_units_total", labels)]
    assert db["client_connections"] == metrics[("mirrorgate_client_connections", labels)] == 0
    assert db["primary_latency"]["count"] == metrics[
        ("mirrorgate_primary_latency_seconds_count", labels)]
    assert db["primary_latency"]["p50"] is not None
    assert db["bound"] is True
    assert [p["name"] for p in db["primaries"]] == ["prod"]
    assert status["gateway"]["config"] == str(admin.gw.config_path)

    text = admin.get("/status?clients=1").text
    for secret in (DEFAULT_PASSWORD, USERS_TABLE_PW, CONSOLE_PW):
        assert secret not in text
    assert "postgres://" not in text


def test_readyz_follows_whether_every_primary_answers(
    admin: Admin, side_primary: socket.socket
) -> None:
    ready = admin.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["ready"] is True
    assert {entry["name"] for entry in ready.json()["listeners"]} == {"db", "side"}

    side_primary.close()  # the side listener's primary goes away

    def not_ready() -> httpx.Response | None:
        response = admin.get("/readyz")
        return response if response.status_code == 503 else None

    report = eventually(not_ready, "/readyz answers 503 once a primary is gone").json()
    assert report["ready"] is False
    assert len(report["failures"]) == 1
    assert "side" in report["failures"][0] and "side_primary" in report["failures"][0]
    side = next(entry for entry in report["listeners"] if entry["name"] == "side")
    assert side["bound"] is True
    assert side["primaries"][0]["reachable"] is False
    db = next(entry for entry in report["listeners"] if entry["name"] == "db")
    assert db["primaries"][0]["reachable"] is True
    assert admin.get("/healthz").status_code == 200


def test_reload_of_an_unchanged_config_is_ok(admin: Admin) -> None:
    response = admin.http.post("/reload")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"] is True
    assert isinstance(body["message"], str) and isinstance(body["changes"], list)
    assert admin.get("/readyz").status_code == 200


def test_methods_head_keep_alive_and_unknown_paths(admin: Admin) -> None:
    get = admin.get("/status")
    head = admin.http.head("/status")
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) > 0
    assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
    wrong = admin.http.post("/status")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET, HEAD"
    assert admin.get("/reload").status_code == 405
    assert admin.get("/no-such-page").status_code == 404
    metrics = admin.get("/metrics")
    assert metrics.status_code == 200
    assert "mirrorgate_mirror_offered_total" in metrics.text
    page = admin.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_bad_requests_get_a_clear_4xx_and_the_listener_carries_on(admin: Admin) -> None:
    host, port = admin.base.removeprefix("http://").rsplit(":", 1)
    # A body over the admin listener's limit: 413, nothing reloaded.
    big = admin.http.post("/reload", content=b"x" * (64 * 1024))
    assert big.status_code == 413, big.text
    # Garbage instead of a request line: 400 and the connection closed.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert admin.get("/healthz").status_code == 200
    assert admin.status()["listeners"]  # still serving
