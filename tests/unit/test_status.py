"""/status: the snapshot's figures, its quantile estimate, what it never shows,
and the admin listener's routes (answered without a socket)."""
from __future__ import annotations

import asyncio
import json
import re
from importlib.resources import files
from typing import Any

import pytest

import gateway.mirror
import gateway.pool
import gateway.status
from gateway import __version__
from gateway.accounting import DropReason, Histogram
from gateway.admin import AdminServer
from gateway.config import parse_config
from gateway.mirror import MirrorSession, Replayer, Unit
from gateway.protocol import ClientSession, ReloadResult
from gateway.secrets import REDACTED
from gateway.status import quantile, snapshot
from gateway_http import HttpProtocol
from gateway_postgres import PostgresProtocol
from tests.support.control import StubControl

CONFIG = """
[admin]
listen = "127.0.0.1:9930"
secret_headers = ["X-Api-Key"]

[[admin.user]]
name = "ops"
password = "admin-pw-1"

[[upstream]]
name = "prod"
url = "postgres://10.0.0.1:5432"

[[upstream]]
name = "staging"
url = "postgres://10.0.2.25:5432/staging_db"
password = "staging-pw-2"
users = { app = "app-pw-3" }

[[upstream]]
name = "replica"
url = "postgres://app:url-pw-4@10.0.2.26:6543/db"

[[upstream]]
name = "api"
url = "http://10.0.3.1:8080"

[[upstream]]
name = "api-shadow"
url = "http://10.0.3.2:8080"

[[listener]]
name = "db"
protocol = "postgres"
listen = "127.0.0.1:6432"
primary = "prod"

[[listener.mirror]]
upstream = "staging"
exposure = 0.5
queue = 7
queue_bytes = "1KiB"
timeout = "250ms"

[[listener.mirror]]
upstream = "replica"

[[listener]]
name = "web"
protocol = "http"
listen = "127.0.0.1:8081"
primary = "api"

[[listener.mirror]]
upstream = "api-shadow"
set_headers = { Authorization = "Bearer token-5", X-Api-Key = "key-6", X-Team = "blue" }
"""

SECRETS = ("admin-pw-1", "staging-pw-2", "app-pw-3", "url-pw-4", "token-5", "key-6")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Idle(Replayer):
    """A replayer whose worker never runs (nothing is spawned): units stay queued."""

    async def deliver(self, unit: Unit, session: MirrorSession) -> str:
        raise AssertionError("not delivered in these tests")

    async def close(self) -> None:
        pass


class Client(ClientSession):
    def __init__(self, **described: Any) -> None:
        self.described = described

    def abort(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return self.described


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    for module in (gateway.mirror, gateway.pool, gateway.status):
        monkeypatch.setattr(module, "_clock", clock)
    return clock


@pytest.fixture
def gw() -> StubControl:
    config = parse_config(CONFIG, {"postgres": PostgresProtocol, "http": HttpProtocol},
                          path="/etc/mirrorgate.toml", env={})
    return StubControl(config)


def _listener(snap: dict[str, Any], name: str) -> dict[str, Any]:
    return next(entry for entry in snap["listeners"] if entry["name"] == name)


def _mirror(snap: dict[str, Any], listener: str, name: str) -> dict[str, Any]:
    return next(m for m in _listener(snap, listener)["mirrors"] if m["name"] == name)


# --- quantiles --------------------------------------------------------------------


def test_quantile_interpolates_within_the_bucket_like_histogram_quantile() -> None:
    h = Histogram()
    for _ in range(100):
        h.observe(0.003)  # all in (0.0025, 0.005]
    assert quantile(0.5, h) == pytest.approx(0.0025 + 0.0025 * 0.5)
    assert quantile(0.99, h) == pytest.approx(0.0025 + 0.0025 * 0.99)


def test_quantile_spans_buckets_and_caps_at_the_highest_finite_bound() -> None:
    h = Histogram()
    for _ in range(50):
        h.observe(0.0001)  # first bucket, (0, 0.0001]
    for _ in range(50):
        h.observe(100.0)  # +Inf
    assert quantile(0.5, h) == pytest.approx(0.0001)
    assert quantile(0.99, h) == 30.0


def test_quantile_of_nothing_observed_is_none() -> None:
    assert quantile(0.5, Histogram()) is None


# --- the snapshot ----------------------------------------------------------------


def test_gateway_and_listener_figures(gw: StubControl) -> None:
    db = gw.contexts[0]
    db.stats.primary_units = 12
    for _ in range(12):
        db.stats.primary_latency.observe(0.003)
    db.session_opened(Client())
    gw.unbound.add("web")
    snap = snapshot(gw)
    assert snap["gateway"]["version"] == __version__
    assert snap["gateway"]["started"] == gw.started
    assert snap["gateway"]["uptime_seconds"] == pytest.approx(snap["time"] - gw.started)
    assert snap["gateway"]["config"] == "/etc/mirrorgate.toml"
    listener = _listener(snap, "db")
    assert listener["protocol"] == "postgres"
    assert listener["listen"] == "127.0.0.1:6432"
    assert listener["bound"] is True
    assert listener["primaries"] == [{"name": "prod", "address": "10.0.0.1:5432"}]
    assert listener["client_connections"] == 1
    assert listener["primary_units"] == 12
    latency = listener["primary_latency"]
    assert latency["count"] == 12
    assert latency["p50"] == pytest.approx(0.00375)
    assert latency["cumulative"][-1] == 12
    assert len(latency["cumulative"]) == len(latency["le"]) + 1
    assert _listener(snap, "web")["bound"] is False
    assert "clients" not in listener


def test_mirror_counters_queue_lag_and_latency(gw: StubControl, clock: Clock) -> None:
    mirror = gw.mirror("db", "staging")
    session = mirror.open_session(Idle())
    session.offer(Unit(b"q" * 100))  # queued, offered at 1000.0
    clock.now += 2.5
    session.offer(Unit(b"q" * 50))
    stats = mirror.stats
    stats.offer_queued(10)  # a third unit, delivered
    stats.start()
    stats.delivered_as("ok", 0.02)
    stats.release_bytes(10)
    stats.offer_dropped(DropReason.QUEUE_FULL)
    stats.skipped += 3

    m = _mirror(snapshot(gw), "db", "staging")
    assert m["offered"] == 4
    assert m["skipped"] == 3
    assert m["delivered"] == {"ok": 1}
    assert m["delivered_total"] == 1
    assert m["dropped"] == {**{r.value: 0 for r in DropReason}, "queue_full": 1}
    assert m["dropped_total"] == 1
    assert m["queue_units"] == 2
    assert m["queue_bytes"] == 150
    assert m["in_flight"] == 0
    assert m["lag_seconds"] == 2.5
    assert m["sessions"] == 1
    assert m["latency"]["count"] == 1
    assert m["latency"]["p50"] == pytest.approx(0.01 + 0.015 * 0.5)
    assert m["offered"] == (m["delivered_total"] + m["dropped_total"] + m["queue_units"]
                            + m["in_flight"])
    assert m["retired"] is False


def test_mirror_upstream_is_a_name_and_an_address_never_a_url(gw: StubControl) -> None:
    m = _mirror(snapshot(gw), "db", "replica")
    assert m["upstream"] == {"name": "replica", "host": "10.0.2.26", "port": 6543,
                             "address": "10.0.2.26:6543"}


def test_mirror_settings_show_the_core_keys_and_the_protocol_options(gw: StubControl) -> None:
    snap = snapshot(gw)
    assert _mirror(snap, "db", "staging")["settings"] == {
        "timeout": 0.25, "queue": 7, "queue_bytes": 1024, "options": {"exposure": 0.5}}
    options = _mirror(snap, "web", "api-shadow")["settings"]["options"]
    assert options["percent"] == 100.0
    assert options["set_headers"] == {
        "Authorization": REDACTED, "X-Api-Key": REDACTED, "X-Team": "blue"}


def test_nothing_secret_appears_in_the_snapshot(gw: StubControl) -> None:
    gw.contexts[0].session_opened(Client(user="app", peer="127.0.0.1:5000"))
    text = json.dumps(snapshot(gw, clients=True), allow_nan=False)
    for secret in SECRETS:
        assert secret not in text
    assert "://" not in text
    assert '"users"' not in text and '"ops"' not in text


def test_a_value_equal_to_a_password_is_redacted_wherever_it_appears(gw: StubControl) -> None:
    gw.contexts[0].session_opened(Client(note="staging-pw-2", user="app"))
    clients = _listener(snapshot(gw, clients=True), "db")["clients"]
    assert clients == [{"note": REDACTED, "user": "app"}]


def test_health_is_idle_then_up_then_backoff_with_the_time_to_retry(
    gw: StubControl, clock: Clock
) -> None:
    mirror = gw.mirror("db", "staging")
    assert _mirror(snapshot(gw), "db", "staging")["health"]["state"] == "idle"
    mirror.open_session(Idle())
    assert _mirror(snapshot(gw), "db", "staging")["health"] == {
        "state": "up", "failures": 0, "retry_in_seconds": 0.0}
    gw.pools["staging"].connect_failed()  # backoff_min: 0.5 s
    clock.now += 0.2
    health = _mirror(snapshot(gw), "db", "staging")["health"]
    assert health["state"] == "backoff"
    assert health["failures"] == 1
    assert health["retry_in_seconds"] == pytest.approx(0.3)
    clock.now += 0.3
    assert _mirror(snapshot(gw), "db", "staging")["health"]["state"] == "up"


def test_snapshot_is_json_ready(gw: StubControl) -> None:
    snap = snapshot(gw, clients=True)
    assert json.loads(json.dumps(snap, allow_nan=False)) == snap


# --- the admin listener's routes -------------------------------------------------


def _answer(gw: StubControl, method: bytes, target: bytes) -> Any:
    server = AdminServer("127.0.0.1", 0, gw)
    return asyncio.run(server.answer(method, target))


def test_status_route_serves_the_snapshot_as_json(gw: StubControl) -> None:
    answer = _answer(gw, b"GET", b"/status")
    assert answer.status == 200
    assert answer.content_type == "application/json"
    assert _mirror(json.loads(answer.body), "db", "staging")["name"] == "staging"


def test_dashboard_route_serves_the_packaged_page_with_a_strict_policy(gw: StubControl) -> None:
    answer = _answer(gw, b"GET", b"/")
    assert answer.status == 200
    assert answer.body.startswith(b"<!doctype html>")
    policy = dict(answer.headers)["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_reload_route_answers_200_when_applied_and_422_when_refused(gw: StubControl) -> None:
    change = "mirror db/staging: exposure 0.5 -> 1"
    gw.reloads = [ReloadResult(True, "applied", (change,)),
                  ReloadResult(False, "mirrorgate.toml:3: listener[0].queue: must be at least 1")]
    ok = _answer(gw, b"POST", b"/reload")
    assert (ok.status, json.loads(ok.body)) == (
        200, {"ok": True, "message": "applied", "changes": [change]})
    refused = _answer(gw, b"POST", b"/reload")
    assert refused.status == 422
    assert json.loads(refused.body)["ok"] is False


def test_the_dashboard_names_no_other_origin() -> None:
    page = (files("gateway") / "dashboard.html").read_text()
    urls = set(re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'<>)]*", page, flags=re.I))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # an XML namespace name, never fetched
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?//""", page, flags=re.I)
    assert not re.search(r"@import|url\(", page, flags=re.I)


def test_wrong_method_is_405_with_allow_and_unknown_path_is_404(gw: StubControl) -> None:
    get_reload = _answer(gw, b"GET", b"/reload")
    assert get_reload.status == 405
    assert dict(get_reload.headers)["allow"] == "POST"
    post_status = _answer(gw, b"POST", b"/status")
    assert (post_status.status, dict(post_status.headers)["allow"]) == (405, "GET, HEAD")
    assert _answer(gw, b"GET", b"/nowhere").status == 404
