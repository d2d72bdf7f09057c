# Prometheus remote write through the gateway's HTTP listener, end to end.
#
# Owns: the evidence that a real Prometheus sender, writing to the gateway,
# lands the same series and samples on the primary receiver and on the
# mirror receiver; and that a mirror with nothing listening costs the sender
# nothing while the gateway counts the drops (design.md §1.4, §5, §7).
# Knows the config contract and metric names, nothing of the HTTP plugin's
# internals. Every server is real: receivers and the sender are Prometheus
# processes (tests.support.prometheus), the gateway is a subprocess.
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from tests.integration.conftest import assert_balanced, drop_reasons, wait_drained
from tests.support.faults import GatewayPorts, Launcher
from tests.support.gateway import GatewayProcess
from tests.support.net import free_port
from tests.support.prometheus import Prometheus, PrometheusError, find_binary
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

T = TypeVar("T")
LISTENER = "remote-write"
PRIMARY = "receiver-a"
MIRROR = "receiver-b"
JOB = "remote-write-sender"
SELECTOR = f'{{job="{JOB}"}}'
UP_COUNT = f'count_over_time(up{{job="{JOB}"}}[10m])'

LabelSets = set[frozenset[tuple[str, str]]]


@dataclass
class HttpGateway:
    """A started gateway with one HTTP listener, and how to reach it."""

    process: GatewayProcess
    port: int

    @property
    def write_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/write"

    def sample(self, name: str, **labels: str) -> float:
        return self.process.sample(name, **labels)

    def sample_sum(self, name: str, **labels: str) -> float:
        return self.process.sample_sum(name, **labels)


def render_config(port: int, admin: int, primary_port: int, mirror_port: int) -> str:
    return f"""\
[general]
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:{admin}"

[[upstream]]
name = "{PRIMARY}"
url = "http://127.0.0.1:{primary_port}"

[[upstream]]
name = "{MIRROR}"
url = "http://127.0.0.1:{mirror_port}"

[[listener]]
name = "{LISTENER}"
protocol = "http"
listen = "127.0.0.1:{port}"
primary = "{PRIMARY}"

[[listener.mirror]]
upstream = "{MIRROR}"
timeout = "2s"
queue = 1000
"""


@pytest.fixture(autouse=True)
def _prometheus_installed() -> None:
    try:
        find_binary()
    except PrometheusError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def receiver_a() -> Iterator[Prometheus]:
    with Prometheus(PRIMARY, receiver=True) as server:
        yield server


@pytest.fixture
def receiver_b() -> Iterator[Prometheus]:
    with Prometheus(MIRROR, receiver=True) as server:
        yield server


@pytest.fixture
def http_gateway(tmp_path: Path) -> Iterator[Callable[[int, int], HttpGateway]]:
    """Factory: ``http_gateway(primary_port, mirror_port)`` -> a started HttpGateway.

    Every gateway started is stopped at teardown; a traceback in its log
    fails the test there.
    """
    launcher = Launcher(tmp_path)

    def start(primary_port: int, mirror_port: int) -> HttpGateway:
        ports = GatewayPorts()
        text = render_config(ports.listen, ports.admin, primary_port, mirror_port)
        return HttpGateway(launcher(text, ports), ports.listen)

    yield start
    launcher.stop_all()
    broken = launcher.tracebacks()
    if broken:
        pytest.fail("gateway logged a traceback:\n" + "\n".join(broken))


def label_sets(server: Prometheus, match: str) -> LabelSets:
    return {frozenset(s.items()) for s in server.series(match)}


def holds_all(server: Prometheus, stored: LabelSets) -> bool:
    return stored <= label_sets(server, SELECTOR)


def grown(server: Prometheus, expr: str, last: float) -> float | None:
    """The value of ``expr`` on ``server`` if it is above ``last``, else None."""
    value = server.query_value(expr)
    return value if value is not None and value > last else None


def has_job(server: Prometheus) -> bool:
    return JOB in server.label_values("job")


def wait_for_job(*receivers: Prometheus) -> None:
    for r in receivers:
        eventually(partial(has_job, r), f"series of job {JOB} reach {r.name}", 20, interval=0.25)


def assert_sender_saw_no_failure(sender: Prometheus) -> None:
    """Nothing the sender sent failed or was retried, read live and as scraped."""
    assert sender.metric_sum("prometheus_remote_storage_samples_total") > 0
    for name in ("prometheus_remote_storage_samples_failed_total",
                 "prometheus_remote_storage_samples_retried_total"):
        assert sender.metric_sum(name) == 0, f"{name} on the sender:\n{sender.log_tail()}"
        scraped = sender.query_values(name)
        assert scraped and set(scraped.values()) == {0.0}, f"{name} as scraped: {scraped}"


def test_remote_write_lands_alike_on_primary_and_mirror(
    receiver_a: Prometheus, receiver_b: Prometheus,
    http_gateway: Callable[[int, int], HttpGateway],
) -> None:
    gw = http_gateway(receiver_a.port, receiver_b.port)
    with Prometheus("sender", remote_write=gw.write_url, job=JOB) as sender:
        wait_for_job(receiver_a, receiver_b)
        stored = label_sets(sender, SELECTOR)
        for r in (receiver_a, receiver_b):
            eventually(partial(holds_all, r, stored),
                       f"every series the sender stored reaches {r.name}", 15, interval=0.25)
        assert_sender_saw_no_failure(sender)
        assert sender.stop() == 0  # flushes its queue: nothing is in flight after this

    wait_drained(gw.process)
    everything = '{__name__=~".+"}'
    series_a, series_b = label_sets(receiver_a, everything), label_sets(receiver_b, everything)
    assert stored <= series_a
    assert series_a == series_b, (
        f"only on {PRIMARY}: {sorted(map(sorted, series_a - series_b))[:5]}; "
        f"only on {MIRROR}: {sorted(map(sorted, series_b - series_a))[:5]}")

    at = time.time()  # after the sender stopped: both windows hold everything sent
    for expr in (UP_COUNT,
                 f'count_over_time(scrape_samples_scraped{{job="{JOB}"}}[10m])',
                 f'count_over_time(prometheus_tsdb_head_series{{job="{JOB}"}}[10m])'):
        on_a, on_b = receiver_a.query_values(expr, at), receiver_b.query_values(expr, at)
        assert on_a, f"{expr} is empty on {PRIMARY}"
        assert on_a == on_b, f"{expr}: {PRIMARY} {on_a} != {MIRROR} {on_b}"
    # Every sample of every series: the receivers' own count of samples stored.
    appended = "prometheus_tsdb_head_samples_appended_total"
    assert receiver_a.metric_sum(appended) > 0
    assert receiver_a.metric_sum(appended) == receiver_b.metric_sum(appended)

    state = assert_balanced(gw.process)[(LISTENER, MIRROR)]
    assert state["offered"] > 0
    assert state["skipped"] == 0
    assert state["dropped"] == 0, drop_reasons(gw.process)
    assert gw.sample("mirrorgate_mirror_delivered_total", listener=LISTENER, mirror=MIRROR,
                     outcome="2xx") == state["offered"]
    assert gw.sample("mirrorgate_primary_units_total", listener=LISTENER) == state["offered"]


def test_dead_mirror_costs_the_sender_nothing(
    receiver_a: Prometheus, http_gateway: Callable[[int, int], HttpGateway],
) -> None:
    nothing_listens = free_port()
    gw = http_gateway(receiver_a.port, nothing_listens)
    with Prometheus("sender", remote_write=gw.write_url, job=JOB) as sender:
        wait_for_job(receiver_a)

        # Every series the sender has stored so far reaches the primary...
        stored = label_sets(sender, SELECTOR)
        eventually(partial(holds_all, receiver_a, stored),
                   f"every series the sender stored reaches {PRIMARY}", 15, interval=0.25)

        # ...and `up` samples keep arriving.
        seen = receiver_a.query_value(UP_COUNT) or 0.0
        for _ in range(2):
            seen = eventually(partial(grown, receiver_a, UP_COUNT, seen),
                              f"more `up` samples on {PRIMARY} than {seen}", 10, interval=0.25)

        # Every sample up to the sender's latest scrape: scrapes of one target
        # are appended in order, so the sender's count up to then is final.
        at = sender.query_value(f'timestamp(up{{job="{JOB}"}})')
        assert at is not None
        want = sender.query_value(UP_COUNT, at)
        assert want is not None
        eventually(lambda: receiver_a.query_value(UP_COUNT, at) == want,
                   f"{PRIMARY} holds all {want} `up` samples the sender had at {at}", 15,
                   interval=0.25)

        assert_sender_saw_no_failure(sender)
        assert sender.stop() == 0

    wait_drained(gw.process)
    state = assert_balanced(gw.process)[(LISTENER, MIRROR)]
    assert state["offered"] > 0
    assert state["delivered"] == 0
    failed = sum(gw.sample("mirrorgate_mirror_dropped_total", listener=LISTENER, mirror=MIRROR,
                           reason=reason)
                 for reason in ("mirror_unavailable", "mirror_error"))
    assert failed > 0, drop_reasons(gw.process)
    assert gw.sample("mirrorgate_primary_units_total", listener=LISTENER) == state["offered"]
