# The metric names and labels of design.md §7 are an interface: check them all.
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from gateway.accounting import DropReason, ListenerStats
from gateway.metrics import render
from gateway.mirror import Mirror

EXPECTED = {
    "mirrorgate_client_connections": ("gauge", {"listener"}),
    "mirrorgate_primary_units": ("counter", {"listener"}),
    "mirrorgate_mirror_offered": ("counter", {"listener", "mirror"}),
    "mirrorgate_mirror_skipped": ("counter", {"listener", "mirror"}),
    "mirrorgate_mirror_delivered": ("counter", {"listener", "mirror", "outcome"}),
    "mirrorgate_mirror_dropped": ("counter", {"listener", "mirror", "reason"}),
    "mirrorgate_mirror_queue_units": ("gauge", {"listener", "mirror"}),
    "mirrorgate_mirror_queue_bytes": ("gauge", {"listener", "mirror"}),
    "mirrorgate_mirror_in_flight": ("gauge", {"listener", "mirror"}),
    "mirrorgate_mirror_lag_seconds": ("gauge", {"listener", "mirror"}),
    "mirrorgate_primary_latency_seconds": ("histogram", {"listener"}),
    "mirrorgate_mirror_latency_seconds": ("histogram", {"listener", "mirror"}),
}


def _context() -> SimpleNamespace:
    config = SimpleNamespace(name="staging", queue=10, queue_bytes=100, timeout=1.0)
    mirror = Mirror("db", config, upstream=None, spawn=lambda fn: None)
    mirror.stats.delivered["ok"] = 0
    mirror.stats.offer_queued(10)
    mirror.stats.start()
    mirror.stats.delivered_as("ok", 0.002)
    mirror.stats.offer_dropped(DropReason.QUEUE_FULL)
    stats = ListenerStats("db")
    stats.primary_units = 2
    stats.primary_latency.observe(0.001)
    return SimpleNamespace(name="db", stats=stats, mirrors=[mirror], all_mirrors=[mirror])


def test_every_metric_of_the_design_is_exposed_with_its_labels() -> None:
    text = render(lambda: [_context()]).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in EXPECTED.items():
        family = families[name]
        assert family.type == kind, name
        sample_labels = {k for s in family.samples for k in s.labels} - {"le"}
        assert sample_labels == labels, name


def test_values_and_every_drop_reason_are_exposed() -> None:
    text = render(lambda: [_context()]).decode()
    assert 'mirrorgate_primary_units_total{listener="db"} 2.0' in text
    assert 'mirrorgate_mirror_delivered_total{listener="db",mirror="staging",outcome="ok"} 1.0' \
        in text
    for reason in DropReason:
        assert f'reason="{reason.value}"' in text
    assert ('mirrorgate_mirror_dropped_total{listener="db",mirror="staging",'
            'reason="queue_full"} 1.0') in text
    assert 'mirrorgate_mirror_latency_seconds_count{listener="db",mirror="staging"} 1.0' in text
