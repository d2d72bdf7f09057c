# The dashboard at the admin listener's "/", opened in headless Chromium.
#
# Owns: the evidence that the page a browser renders shows the figures of
# /status (per mirror and per listener), draws rates and latencies from
# successive snapshots, and loads nothing from anywhere but the admin listener.
# Chromium runs as `chromium --headless --dump-dom`: the DOM after the page's
# scripts ran, with a virtual time budget that lets it read /status a few
# times, and a net log that lists every request the page made. No browser
# driver is needed for that.
# Knows the page's data attributes (documented at the top of
# gateway/dashboard.html) and the /status JSON; nothing internal.
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from tests.integration.conftest import LISTENER, Gateway, wait_drained


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _find_chromium()
MIRROR = "mirror"
POLL_SECONDS = 2.0  # the page's interval (INTERVAL_MS)
CHART_BASELINE = 88.0  # the y of a zero value in the page's 300x90 charts

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not found on PATH "
                       "(scripts/bootstrap installs the Debian package chromium)"),
]


# --- the browser ------------------------------------------------------------------


@dataclass
class Page:
    """What Chromium made of a page: the DOM after its scripts ran, and the
    URLs that the page itself requested (not Chromium's own background ones)."""

    dom: str
    requests: list[str]


def _page_requests(netlog: Path, page_url: str) -> list[str]:
    """URLs requested on behalf of the page: those whose network isolation key
    is the page's site (a script or font from a CDN would carry it too)."""
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    parts = urlsplit(page_url)
    site = f"{parts.scheme}://{parts.hostname}"
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] != start_job or "url" not in params:
            continue
        isolation = params.get("network_isolation_key", "").split()
        if isolation[:1] == [site] or params.get("initiator") == f"{site}:{parts.port}":
            urls.append(params["url"])
    return urls


def open_page(url: str, workdir: Path, polls: int) -> Page:
    """Load ``url`` in headless Chromium and let it run ``polls`` refreshes."""
    assert CHROMIUM is not None
    workdir.mkdir(parents=True, exist_ok=True)
    netlog = workdir / "netlog.json"
    command = [
        CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", "--disable-sync",
        "--disable-background-networking", "--disable-component-update",
        "--disable-default-apps", f"--user-data-dir={workdir / 'profile'}",
        f"--log-net-log={netlog}",
        f"--virtual-time-budget={int(polls * POLL_SECONDS * 1000)}",
        "--dump-dom", url,
    ]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium will not start its sandbox as root
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "</html>" in result.stdout, (
        f"chromium exited {result.returncode}:\n{result.stderr[-3000:]}")
    return Page(result.stdout, _page_requests(netlog, url))


# --- reading the page ---------------------------------------------------------------


@dataclass
class Card:
    """One article[data-mirror] or article[data-listener]: its hooks by kind."""

    fields: dict[str, str] = field(default_factory=dict)  # data-field -> data-value
    outcomes: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    latest: dict[str, str] = field(default_factory=dict)  # legend: series -> value
    paths: dict[tuple[str, str], str] = field(default_factory=dict)  # (chart, series) -> d


class DashboardReader(HTMLParser):
    """Collects the page's cards, and the text and class of elements with an id."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.mirrors: dict[str, Card] = {}
        self.listeners: dict[str, Card] = {}
        self.by_id: dict[str, dict[str, str]] = {}
        self._card: Card | None = None
        self._chart = ""
        self._id: str | None = None
        self.feed(dom)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "article":
            if "data-mirror" in a:
                self._card = self.mirrors.setdefault(a["data-mirror"], Card())
            elif "data-listener" in a:
                self._card = self.listeners.setdefault(a["data-listener"], Card())
            return
        if "id" in a and self._card is None:
            self._id = a["id"]
            self.by_id[self._id] = {"class": a.get("class", ""), "text": ""}
        card = self._card
        if card is None:
            return
        value = a.get("data-value", "")
        for attr, into in (("data-field", card.fields), ("data-outcome", card.outcomes),
                           ("data-reason", card.reasons), ("data-latest", card.latest)):
            if attr in a:
                into[a[attr]] = value
        if tag == "svg":
            self._chart = a.get("data-chart", "")
        if tag == "path" and "data-series" in a:
            card.paths[(self._chart, a["data-series"])] = a.get("d", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "article":
            self._card = None
        self._id = None

    def handle_data(self, data: str) -> None:
        if self._id is not None:
            self.by_id[self._id]["text"] += data


def _ys(d: str) -> list[float]:
    """The y coordinates of an SVG path of M/L commands."""
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", d)]
    return numbers[1::2]


# --- the gateway ---------------------------------------------------------------------


def _status(gw: Gateway) -> dict[str, Any]:
    response = httpx.get(f"http://{gw.process.admin}/status", timeout=10)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def _mirror_status(status: dict[str, Any]) -> dict[str, Any]:
    listener = next(entry for entry in status["listeners"] if entry["name"] == LISTENER)
    return next(m for m in listener["mirrors"] if m["name"] == MIRROR)


def _workload(gw: Gateway, db: str, n: int) -> None:
    with psycopg.connect(gw.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        for i in range(n):
            conn.execute("INSERT INTO t (x) VALUES (%s)", (i,))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table")


@pytest.fixture
def busy() -> Iterator[Callable[[str], None]]:
    """``busy(dsn)``: a client sends queries in a loop until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def run(dsn: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("SELECT 1").fetchone()

    def start(dsn: str) -> None:
        thread = threading.Thread(target=run, args=(dsn,), name="busy-client", daemon=True)
        threads.append(thread)
        thread.start()

    yield start
    stop.set()
    for thread in threads:
        thread.join(10)


# --- the tests -----------------------------------------------------------------------


def test_dashboard_shows_the_figures_of_status(
    gateway: Callable[..., Gateway], fresh_db: str, tmp_path: Path
) -> None:
    gw = gateway()
    _workload(gw, fresh_db, 15)
    wait_drained(gw)
    status = _status(gw)  # at rest: the page reads the same figures
    want = _mirror_status(status)
    origin = f"http://{gw.process.admin}"

    page = open_page(origin + "/", tmp_path / "chromium", polls=3)
    reader = DashboardReader(page.dom)

    card = reader.mirrors[f"{LISTENER}/{MIRROR}"]
    for name in ("offered", "skipped", "delivered_total", "dropped_total", "queue_units",
                 "queue_bytes", "in_flight"):
        assert int(card.fields[name]) == want[name], name
    assert want["delivered_total"] > 15
    assert {k: int(v) for k, v in card.outcomes.items()} == {
        k: n for k, n in want["delivered"].items() if n}
    assert card.outcomes["error"] == "1"
    assert {k: int(v) for k, v in card.reasons.items()} == {
        k: n for k, n in want["dropped"].items() if n}
    assert card.fields["health"] == want["health"]["state"] == "up"
    assert float(card.fields["mirror_p50"]) == want["latency"]["p50"]
    assert float(card.fields["mirror_p99"]) == want["latency"]["p99"]
    assert float(card.fields["lag_seconds"]) == 0.0
    # At rest every rate is 0, and the rate chart has a line of several snapshots.
    assert float(card.latest["offered"]) == 0.0
    assert float(card.latest["delivered"]) == 0.0
    assert card.paths[("rates", "offered")].count("L") >= 1

    listener = reader.listeners[LISTENER]
    want_listener = status["listeners"][0]
    assert int(listener.fields["client_connections"]) == 0
    assert int(listener.fields["primary_units"]) == want_listener["primary_units"]
    assert float(listener.fields["primary_p50"]) == want_listener["primary_latency"]["p50"]
    assert listener.fields["bound"] == "true"

    assert reader.by_id["version"]["text"] == status["gateway"]["version"]
    assert "shown" not in reader.by_id["error"]["class"]

    # Everything the page asked for came from the admin listener.
    assert f"{origin}/" in page.requests and f"{origin}/status" in page.requests
    assert [u for u in page.requests if not u.startswith(origin + "/")] == []


def test_dashboard_draws_rates_and_latencies_while_traffic_flows(
    gateway: Callable[..., Gateway], fresh_db: str, tmp_path: Path,
    busy: Callable[[str], None],
) -> None:
    gw = gateway()
    busy(gw.dsn(fresh_db))
    page = open_page(f"http://{gw.process.admin}/", tmp_path / "chromium", polls=8)
    card = DashboardReader(page.dom).mirrors[f"{LISTENER}/{MIRROR}"]
    offered = _ys(card.paths[("rates", "offered")])
    assert len(offered) >= 2
    assert min(offered) < CHART_BASELINE, "no positive offered rate drawn while traffic flowed"
    assert _ys(card.paths[("latency", "primary_p50")])
    assert _ys(card.paths[("latency", "mirror_p50")])

