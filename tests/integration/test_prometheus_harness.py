# Tests of the Prometheus harness itself: receivers, senders and their API.
#
# Owns: the evidence that tests.support.prometheus starts real servers, that
# a sender pointed straight at a receiver delivers every series and sample it
# stores, and that a failed start says why. Nothing here touches the gateway.
from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import httpx
import pytest

from tests.support.prometheus import Prometheus, PrometheusError, find_binary
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

T = TypeVar("T")
JOB = "harness-sender"


@pytest.fixture
def receiver() -> Iterator[Prometheus]:
    try:
        find_binary()
    except PrometheusError as exc:
        pytest.skip(str(exc))
    with Prometheus("receiver", receiver=True) as server:
        yield server


def label_sets(series: list[dict[str, str]]) -> set[frozenset[tuple[str, str]]]:
    return {frozenset(s.items()) for s in series}


def test_sender_delivers_every_series_and_sample_to_a_receiver(receiver: Prometheus) -> None:
    with Prometheus("sender", remote_write=receiver.write_url, job=JOB) as sender:
        selector = f'{{job="{JOB}"}}'
        eventually(lambda: JOB in receiver.label_values("job"),
                   "the job reaches the receiver", 20, interval=0.25)
        assert receiver.query_value(f'up{{job="{JOB}"}}') == 1.0

        # Everything the sender stored up to now must arrive, label set for label set.
        stored = label_sets(sender.series(selector))
        assert len(stored) > 100  # a Prometheus exposes hundreds of its own series
        eventually(lambda: stored <= label_sets(receiver.series(selector)),
                   "every series stored by the sender reaches the receiver", 15, interval=0.25)

        # And every sample, up to the sender's latest scrape: scrapes of one
        # target are appended in order, so the sender's count up to that
        # instant is final.
        at = sender.query_value(f'timestamp(up{{job="{JOB}"}})')
        assert at is not None
        count = f'count_over_time(up{{job="{JOB}"}}[10m])'
        want = sender.query_value(count, at)
        assert want is not None and want >= 1
        eventually(lambda: receiver.query_value(count, at) == want,
                   f"the receiver holds all {want} `up` samples up to {at}", 15, interval=0.25)

        # The sender's own counters, read live: nothing failed or was retried.
        assert sender.metric_sum("prometheus_remote_storage_samples_total") > 0
        assert sender.metric_sum("prometheus_remote_storage_samples_failed_total") == 0
        assert sender.metric_sum("prometheus_remote_storage_samples_retried_total") == 0
        # The same through a query of what the sender scraped of itself.
        failed = sender.query_values("prometheus_remote_storage_samples_failed_total")
        assert failed and set(failed.values()) == {0.0}
        assert sender.stop() == 0
        assert "See you next time" in sender.log()


def test_receivers_store_only_what_is_pushed(receiver: Prometheus) -> None:
    assert receiver.label_values("__name__") == []
    assert receiver.series('{__name__=~".+"}') == []
    assert receiver.query("up") == []
    assert receiver.query_value("vector(42)") == 42.0


def test_only_receiver_mode_accepts_remote_writes(receiver: Prometheus) -> None:
    # A receiver decodes the body (so garbage is a 400); a plain server has no such endpoint.
    assert httpx.post(receiver.write_url, content=b"not snappy").status_code == 400
    with Prometheus("plain") as plain:
        assert httpx.post(plain.write_url, content=b"not snappy").status_code == 404


def test_failed_start_raises_with_the_log_tail() -> None:
    try:
        find_binary()
    except PrometheusError as exc:
        pytest.skip(str(exc))
    server = Prometheus("broken", remote_write="http://127.0.0.1:9/api/v1/write",
                        interval="soon")
    try:
        with pytest.raises(PrometheusError, match="not a valid duration string"):
            server.start()
        assert not server.running
    finally:
        server.close()
    assert not server.base.exists()


def test_query_errors_name_the_server(receiver: Prometheus) -> None:
    with pytest.raises(PrometheusError, match="receiver: GET /api/v1/query"):
        receiver.query("up{")
    with pytest.raises(PrometheusError, match="gave matrix"):
        receiver.query("up[1m]")
