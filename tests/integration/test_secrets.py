# Secrets never reach the logs, /status or /metrics (issue 4, item 4).
#
# Owns: the proof. One real gateway at log_level "debug", in text and in JSON,
# whose config holds every kind of secret (a mirror upstream's password, its
# users table, from ${VAR} and literal, [[admin.user]] passwords, secret header
# values a mirror sets), driven through every path that logs: clients logging in
# through it (SCRAM and a cleartext password message) to a real primary, a
# mirror that refuses the gateway's login, mirrors that cannot be reached, HTTP
# requests with Authorization, Cookie and X-Api-Key headers to a real server
# and to a mirror answering 5xx, a primary that is down, and a bad request.
# Then no secret string appears anywhere in what the process wrote, nor in the
# admin endpoints; nothing was even redacted (no call site tried to log a
# secret); the credentials clients sent, which the config does not hold and so
# no filter knows, are absent too; and the log holds the events it should,
# with their fields, so that the test cannot pass by logging nothing.
# Knows the config contract, the log line format of docs/operations.md and the
# admin endpoints; nothing of the gateway's internals.
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from gateway.secrets import REDACTED
from tests.support.faults import GatewayPorts, Launcher, toml_value, wait_at_rest
from tests.support.httpserver import HttpServer, Reply
from tests.support.net import free_port
from tests.support.pgcluster import PgCluster, PgClusterError, quote_ident
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@dataclass
class Secrets:
    """Every secret of one run: unique strings, so any leak is unmistakable."""

    tag: str

    def __getattr__(self, name: str) -> str:
        if name.startswith("_"):
            raise AttributeError(name)
        return f"{name.replace('_', '-')}-{self.tag}"

    def all(self) -> dict[str, str]:
        names = ["client_scram", "client_clear", "mirror_users_env", "mirror_users_literal",
                 "mirror_password_env", "wrong_password", "dead_password", "admin_password",
                 "admin_password2", "bearer_token", "api_key", "client_basic", "client_cookie",
                 "client_api_key", "bad_request_token"]
        return {n: getattr(self, n) for n in names}


@dataclass
class Roles:
    """Login roles made for one run: ``scram`` and ``clear`` on both clusters."""

    scram: str
    clear: str


@pytest.fixture
def roles(pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
          ) -> Iterator[tuple[Roles, Secrets]]:
    s = Secrets(uuid.uuid4().hex[:10])
    r = Roles(scram=f"app_{s.tag}", clear=f"clear_{s.tag}")
    # The primary: the clients' own passwords (relayed, never in the config);
    # `clear` logs in with a cleartext PasswordMessage through the gateway.
    pg_primary.create_user(r.scram, s.client_scram)
    pg_primary.create_user(r.clear, s.client_clear)
    pg_primary.set_hba([f"host all {r.clear} 127.0.0.1/32 password"])
    # The mirror: what the gateway logs in with (users table, then password).
    pg_mirror.create_user(r.scram, s.mirror_users_env)
    pg_mirror.create_user(r.clear, s.mirror_password_env)
    try:
        yield r, s
    finally:
        pg_primary.reset_hba()
        for cluster in (pg_primary, pg_mirror):
            for role in (r.scram, r.clear):
                try:
                    cluster.execute(f"DROP ROLE IF EXISTS {quote_ident(role)};")
                except PgClusterError:
                    pass  # best effort (a session may linger): the clusters end with the run


def _config(fmt: str, ports: GatewayPorts, web_port: int, primary: PgCluster,
            mirror: PgCluster, web: HttpServer, five: HttpServer, r: Roles, s: Secrets) -> str:
    dead_pg, dead_http, dead_primary = free_port(), free_port(), free_port()
    lines = [
        "[general]", 'shutdown_timeout = "5s"', "",
        "[admin]", f'listen = "127.0.0.1:{ports.admin}"', 'log_level = "debug"',
        f"log_format = {toml_value(fmt)}", 'secret_headers = ["X-Api-Key"]', "",
        "[[admin.user]]", 'name = "ops"', f"password = {toml_value(s.admin_password)}", "",
        "[[admin.user]]", 'name = "ops2"', 'password = "${ADMIN_PW}"', "",
        "[[upstream]]", 'name = "prod"', f'url = "postgres://127.0.0.1:{primary.port}"', "",
        "[[upstream]]", 'name = "pgmirror"', f'url = "postgres://127.0.0.1:{mirror.port}"',
        'password = "${MIRROR_PW}"',
        f"users = {{ {r.scram} = \"${{APP_PW}}\", other = {toml_value(s.mirror_users_literal)} }}",
        "",
        "[[upstream]]", 'name = "pgwrong"', f'url = "postgres://127.0.0.1:{mirror.port}"',
        f"password = {toml_value(s.wrong_password)}", "",
        "[[upstream]]", 'name = "pgdead"', f'url = "postgres://127.0.0.1:{dead_pg}"',
        f"password = {toml_value(s.dead_password)}", 'connect_timeout = "1s"', "",
        "[[upstream]]", 'name = "webprimary"', f'url = "http://127.0.0.1:{web.port}"', "",
        "[[upstream]]", 'name = "webdown"', f'url = "http://127.0.0.1:{dead_primary}"',
        'connect_timeout = "1s"', "",
        "[[upstream]]", 'name = "web5xx"', f'url = "http://127.0.0.1:{five.port}"', "",
        "[[upstream]]", 'name = "webdead"', f'url = "http://127.0.0.1:{dead_http}"',
        'connect_timeout = "1s"', "",
        "[[listener]]", 'name = "db"', 'protocol = "postgres"',
        f'listen = "127.0.0.1:{ports.listen}"', 'primary = "prod"', "",
        "[[listener.mirror]]", 'upstream = "pgmirror"', "",
        "[[listener.mirror]]", 'upstream = "pgwrong"', "",
        "[[listener.mirror]]", 'upstream = "pgdead"', 'timeout = "1s"', "",
        "[[listener]]", 'name = "web"', 'protocol = "http"', f'listen = "127.0.0.1:{web_port}"',
        'primary = "webprimary"', "",
        "[[listener.mirror]]", 'upstream = "web5xx"', 'timeout = "2s"',
        "set_headers = { Authorization = " + toml_value(f"Bearer {s.bearer_token}")
        + ", X-Api-Key = " + toml_value(s.api_key) + " }", "",
        "[[listener.mirror]]", 'upstream = "webdead"', 'timeout = "1s"', "",
        "[[listener.route]]", 'prefix = "/down"', 'primary = "webdown"', "",
    ]
    return "\n".join(lines) + "\n"


def _postgres_traffic(primary: PgCluster, port: int, db: str, r: Roles, s: Secrets) -> None:
    # SCRAM through the gateway to the primary, with psycopg.
    dsn = f"host=127.0.0.1 port={port} dbname={db} user={r.scram} password={s.client_scram}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(3):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
    # A cleartext PasswordMessage through the gateway, with psql.
    env = {**os.environ, "PGPASSWORD": s.client_clear, "PGCONNECT_TIMEOUT": "10"}
    out = subprocess.run(
        [str(primary.bindir / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port),
         "-U", r.clear, "-d", db, "-c", "SELECT 'clear ok'"],
        capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clear ok"


def _http_traffic(web_port: int, s: Secrets) -> None:
    basic = base64.b64encode(f"alice:{s.client_basic}".encode()).decode()
    headers = {"Authorization": f"Basic {basic}", "Cookie": f"sid={s.client_cookie}",
               "X-Api-Key": s.client_api_key}
    base = f"http://127.0.0.1:{web_port}"
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        for i in range(3):
            response = client.post(f"/api/{i}", content=b"payload")
            assert response.status_code == 200, response.text
        assert client.get("/down/x").status_code == 502  # the route's primary is down
    # A bad request carrying a credential: the gateway answers 400 itself.
    with socket.create_connection(("127.0.0.1", web_port), timeout=10) as sock:
        sock.sendall(b"GET /bad HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + s.bad_request_token.encode() + b"\r\nno colon here\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]


def _fields(line: str, fmt: str) -> dict[str, Any]:
    """A log line's message and fields, whichever the format."""
    if fmt == "json":
        event = json.loads(line)
        assert isinstance(event, dict), line
        return event
    # "DATE TIME LEVEL logger: message key=value key=value"
    rest = line.partition(": ")[2]
    out: dict[str, Any] = {"msg": rest}
    for token in rest.split(" "):
        key, eq, value = token.partition("=")
        if eq and key.isidentifier():
            out[key] = value
    return out


def _events(log: str, fmt: str) -> list[dict[str, Any]]:
    return [_fields(line, fmt) for line in log.splitlines() if line.strip()]


def _find(events: list[dict[str, Any]], text: str, **fields: str) -> dict[str, Any] | None:
    for event in events:
        if text in str(event["msg"]) and all(event.get(k) == v for k, v in fields.items()):
            return event
    return None


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secret_reaches_the_log_status_or_metrics(
    fmt: str, launch: Launcher, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str,
    roles: tuple[Roles, Secrets],
) -> None:
    r, s = roles
    ports = GatewayPorts()
    web_port = free_port()
    with HttpServer() as web, HttpServer(Reply(503, body=b"mirror is unwell")) as five:
        config = _config(fmt, ports, web_port, pg_primary, pg_mirror, web, five, r, s)
        env = {"MIRROR_PW": s.mirror_password_env, "APP_PW": s.mirror_users_env,
               "ADMIN_PW": s.admin_password2}
        gw = launch(config, ports, env=env)
        gw.wait_ready(web_port)

        _postgres_traffic(pg_primary, ports.listen, fresh_db, r, s)
        _http_traffic(web_port, s)

        # The mirrors had the traffic: the good one replayed it (so its
        # secrets were used), the 5xx one got the secret headers.
        wait_at_rest(gw, "pgmirror", listener="db", clients=0)
        assert gw.sample("mirrorgate_mirror_delivered_total", listener="db",
                         mirror="pgmirror", outcome="ok") >= 4
        wait_at_rest(gw, "web5xx", listener="web", clients=0)
        assert gw.sample("mirrorgate_mirror_delivered_total", listener="web",
                         mirror="web5xx", outcome="5xx") >= 3
        for listener, mirror in (("db", "pgwrong"), ("db", "pgdead"), ("web", "webdead")):
            wait_at_rest(gw, mirror, listener=listener)
        eventually(lambda: gw.log().count("mirror unreachable") >= 2
                   and "mirror refused the login" in gw.log(), "the failing mirrors are logged")
        got = five.requests[0]
        assert got.header("Authorization") == f"Bearer {s.bearer_token}"
        assert got.header("X-Api-Key") == s.api_key

        admin = f"http://127.0.0.1:{ports.admin}"
        metrics = httpx.get(f"{admin}/metrics", timeout=10)
        assert metrics.status_code == 200
        status = httpx.get(f"{admin}/status", timeout=10)
        # /status is asserted on where this build serves it.
        if status.status_code != 404:
            assert status.status_code == 200, status.text
            status.json()
        gw.stop()

    log = gw.log()
    for name, secret in s.all().items():
        assert secret not in log, f"{name} appears in the gateway's output"
        assert secret not in metrics.text, f"{name} appears in /metrics"
        assert secret not in status.text, f"{name} appears in /status"
    # Nothing even tried to log one: the scrubbing filter had nothing to do.
    assert REDACTED not in log

    # The log has the events, each naming what it concerns.
    events = _events(log, fmt)
    if fmt == "json":
        for event in events:
            assert {"ts", "level", "logger", "msg"} <= event.keys(), event
    expected = [
        ("listening on", {"listener": "db"}),
        ("listening on", {"listener": "web"}),
        ("mirror refused the login", {"listener": "db", "mirror": "pgwrong", "user": r.scram}),
        ("mirror unreachable", {"listener": "db", "mirror": "pgdead", "upstream": "pgdead"}),
        ("mirror unreachable", {"listener": "web", "mirror": "webdead"}),
        ("answered 502", {"listener": "web", "upstream": "webdown"}),
        ("answered 400", {"listener": "web", "session": "127.0.0.1"}),
        ("mirror units dropped as shutdown", {}),
    ]
    for text, fields in expected:
        assert _find(events, text, **fields), f"no {text!r} line with {fields} in:\n{log}"
    refused = _find(events, "mirror refused the login", mirror="pgwrong")
    assert refused is not None and refused.get("database") == fresh_db
    assert "Traceback" not in log
