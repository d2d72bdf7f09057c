# The deployment material: deploy/mirrorgate.service, deploy/Containerfile,
# docs/alerts.yml and docs/grafana-dashboard.json.
#
# Checks that every metric, label and label value these files name is one the
# gateway's /metrics really renders (from real ListenerContexts built from a
# real config), that promtool accepts every PromQL expression and that each
# alert fires on the series of tests/data/alerts_test.yml and stays quiet on
# the others, that systemd accepts the unit, and that the image file has the
# shape docs/operations.md promises. Docker is not needed: the image is not
# built here.
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.accounting import DropReason
from gateway.config import Admin, General, parse_config
from gateway.config_values import Address
from gateway.metrics import render
from gateway.plugins import load_plugins
from gateway.protocol import ListenerContext
from gateway_http.replayer import OUTCOMES as HTTP_OUTCOMES

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "docs" / "alerts.yml"
ALERTS_TEST = ROOT / "tests" / "data" / "alerts_test.yml"
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
UNIT = ROOT / "deploy" / "mirrorgate.service"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
CONFIG_PATH = "/etc/mirrorgate/mirrorgate.toml"

POSTGRES_OUTCOMES = {"ok", "error"}
# Labels the gateway sets, plus those Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
# Grafana's template variables, and what a query stands for once they are
# filled in with "all" and a rate window.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*", "$listener": ".*",
                     "$mirror": ".*"}

CONFIG = """
[admin]
listen = "127.0.0.1:9930"

[[upstream]]
name = "prod"
url = "postgres://10.0.0.1:5432"

[[upstream]]
name = "staging"
url = "postgres://10.0.0.2:5432"

[[upstream]]
name = "mimir"
url = "http://10.0.0.3:8080"

[[upstream]]
name = "mimir-next"
url = "http://10.0.0.4:8080"

[[listener]]
name = "db"
protocol = "postgres"
listen = "127.0.0.1:6432"
primary = "prod"

[[listener.mirror]]
upstream = "staging"

[[listener]]
name = "push"
protocol = "http"
listen = "127.0.0.1:8080"
primary = "mimir"

[[listener.mirror]]
upstream = "mimir-next"
"""


# -- what the gateway renders ---------------------------------------------------


def _busy_contexts() -> list[ListenerContext]:
    """One Postgres and one HTTP listener, each of whose mirrors delivered and
    dropped a unit, so every family has samples."""
    _, registry = load_plugins()
    config = parse_config(CONFIG, dict(registry.items()), env={})
    contexts = []
    for listener in config.listeners:
        ctx = ListenerContext(config, listener, {}, spawn=lambda fn: None)
        ctx.stats.client_connections = 1
        ctx.stats.primary_units = 2
        ctx.stats.primary_latency.observe(0.002)
        for mirror, outcome in zip(ctx.mirrors, ("ok", "2xx"), strict=False):
            mirror.stats.offer_queued(100)
            mirror.stats.start()
            mirror.stats.delivered_as(outcome, 0.003)
            mirror.stats.offer_dropped(DropReason.QUEUE_FULL)
            mirror.stats.skipped += 1
        contexts.append(ctx)
    return contexts


def _rendered() -> list[Any]:
    contexts = _busy_contexts()
    text = render(lambda: contexts).decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.fixture(scope="module")
def samples() -> list[Any]:
    return _rendered()


@pytest.fixture(scope="module")
def sample_names(samples: list[Any]) -> set[str]:
    return {s.name for s in samples}


@pytest.fixture(scope="module")
def label_names(samples: list[Any]) -> set[str]:
    return {k for s in samples for k in s.labels} | TARGET_LABELS


# -- the expressions of the files -----------------------------------------------


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", [])]


def _variable_queries() -> list[str]:
    return [v["query"] for v in _dashboard()["templating"]["list"]]


def _fill(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def _all_exprs() -> list[str]:
    return [r["expr"] for r in _alert_rules()] + _dashboard_exprs() + _variable_queries()


_METRIC = re.compile(r"\bmirrorgate_[a-z0-9_]+\b")
_MATCHER = re.compile(r'\b([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus: scripts/bootstrap)")
    return found


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd)


# -- metric names, labels and values --------------------------------------------


def test_every_metric_the_files_name_is_rendered(sample_names: set[str]) -> None:
    for expr in _all_exprs():
        names = _METRIC.findall(expr)
        assert names or re.search(r"\bup\b", expr), expr
        for name in names:
            assert name in sample_names, f"{name} (in {expr!r}) is not in /metrics"


def test_every_label_the_files_name_is_rendered(label_names: set[str]) -> None:
    for expr in _all_exprs():
        for label, _op, _value in _MATCHER.findall(expr):
            assert label in label_names, f"label {label} in {expr!r}"
        for group in _GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in label_names, f"label {label} in {expr!r}"


def test_every_reason_and_outcome_the_files_name_exists() -> None:
    known = {
        "reason": {r.value for r in DropReason},
        "outcome": POSTGRES_OUTCOMES | set(HTTP_OUTCOMES.values()),
    }
    for expr in _all_exprs():
        for label, _op, value in _MATCHER.findall(expr):
            if label in known:
                for one in value.split("|"):
                    assert one in known[label], f"{label}={one!r} in {expr!r}"


# -- alert rules ------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = _run([_promtool(), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_on_its_series_and_only_there() -> None:
    result = _run([_promtool(), "test", "rules", str(ALERTS_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_severity_and_annotations() -> None:
    tested = {case["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    for rule in _alert_rules():
        assert rule["alert"] in tested, f"{rule['alert']} never shown to fire"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])


# -- the Grafana dashboard --------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"instance", "listener", "mirror"}
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def _recording_rules(exprs: list[str], wrap: str = "{}") -> str:
    rules = [{"alert" if wrap != "{}" else "record": f"panel_expr_{i}",
              "expr": wrap.format(_fill(e))} for i, e in enumerate(exprs)]
    return yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    rules = tmp_path / "dashboard.yml"
    rules.write_text(_recording_rules(_dashboard_exprs()))
    result = _run([_promtool(), "check", "rules", str(rules)])
    assert result.returncode == 0, result.stdout + result.stderr


def _input_series(samples: list[Any]) -> list[dict[str, str]]:
    """The rendered samples as promtool input: counters grow, gauges stay."""
    out = []
    for s in samples:
        labels = {**s.labels, "instance": "gw1:9930", "job": "mirrorgate"}
        selector = s.name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        grows = s.name.endswith(("_total", "_bucket", "_count", "_sum"))
        step = int(s.value) + 1
        out.append({"series": selector,
                    "values": f"0+{step}x20" if grows else f"{s.value:g}x20"})
    return out


def test_every_dashboard_expression_shows_data_for_a_real_gateway(
        tmp_path: Path, samples: list[Any]) -> None:
    exprs = _dashboard_exprs()
    # absent(e) is a one-sample vector exactly when e is empty, so an alert on
    # it fires for every panel query that would draw nothing.
    (tmp_path / "dashboard.yml").write_text(_recording_rules(exprs, wrap="absent({})"))
    test = {
        "rule_files": ["dashboard.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": _input_series(samples),
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": f"panel_expr_{i}", "exp_alerts": []}
                for i in range(len(exprs))
            ],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    result = _run([_promtool(), "test", "rules", "test.yml"], cwd=tmp_path)
    assert result.returncode == 0, "\n".join(
        [f"panel_expr_{i}: {e}" for i, e in enumerate(exprs)]
        + [result.stdout, result.stderr])


# -- the systemd unit ----------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    """The unit's ``Key=value`` lines as {key: [values]} (keys may repeat)."""
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def _seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def test_unit_runs_the_gateway_hardened_and_reloads_with_sighup() -> None:
    unit = _unit()
    start = shlex.split(unit["ExecStart"][0])
    assert Path(start[0]).name == "mirrorgate"
    assert start[1:] == ["run", "--config", CONFIG_PATH]
    assert "/bin/kill -HUP $MAINPID" in unit["ExecReload"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert _seconds(unit["TimeoutStopSec"][0]) > General().shutdown_timeout
    assert unit["Restart"] == ["on-failure"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert "/etc/mirrorgate" in unit["ReadOnlyPaths"]
    assert unit.get("DynamicUser") == ["yes"] or unit.get("User", ["root"]) != ["root"]
    assert int(unit["LimitNOFILE"][0]) >= 65536


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed")
    return found


def _unit_with_stub(tmp_path: Path) -> Path:
    """The unit with its mirrorgate path pointing at a stub executable that
    exists here (verify checks that every command is executable)."""
    stub = tmp_path / "mirrorgate"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / "mirrorgate.service"
    unit.write_text(UNIT.read_text().replace("/opt/mirrorgate/bin/mirrorgate", str(stub)))
    return unit


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    unit = _unit_with_stub(tmp_path)
    result = _run([_systemd_analyze(), "verify", "--man=no", "--generators=no", str(unit)])
    # Unknown or misspelt keys are warnings on stderr with status 0.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_systemd_rates_the_unit_well_sandboxed(tmp_path: Path) -> None:
    unit = _unit_with_stub(tmp_path)
    result = _run([_systemd_analyze(), "security", "--offline=yes", "--threshold=30",
                   str(unit)])
    if "unrecognized option" in result.stderr:
        pytest.skip("this systemd-analyze has no offline security check")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# -- the Containerfile ---------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def _default_admin() -> Address:
    listen = Admin().listen
    assert listen is not None
    return listen


def test_image_runs_the_gateway_as_non_root_with_the_config_in_etc() -> None:
    stage = _final_stage()
    words = dict(stage)
    assert stage[0][1].split()[0] == "python:3.11-slim"
    user = [args for word, args in stage if word == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert json.loads(words["CMD"]) == ["mirrorgate", "run", "--config", CONFIG_PATH]
    assert words["STOPSIGNAL"] == "SIGTERM"
    assert str(_default_admin().port) in words["EXPOSE"].split()


def test_image_healthcheck_asks_healthz_on_the_default_admin_port() -> None:
    stage = _final_stage()
    words = dict(stage)
    check = words["HEALTHCHECK"]
    command = json.loads(check[check.index("CMD") + 3:].strip())
    assert command[0] == "python"  # the slim image has no curl
    env = dict(re.findall(r"(\w+)=(\S+)", words["ENV"]))
    url = env["MIRRORGATE_HEALTH_URL"]
    assert url == f"http://{_default_admin()}/healthz"
    assert "MIRRORGATE_HEALTH_URL" in command[-1]


def test_image_copies_every_package_the_project_builds() -> None:
    copied = {source for word, args in _instructions() if word == "COPY"
              for source in args.split()[:-1] if not source.startswith("--")}
    for needed in ("pyproject.toml", "setup.py", "README.md", "gateway", "plugins"):
        assert needed in copied
