# Fixtures for integration tests that run real clients through the real gateway.
#
# Owns: `gateway`, a factory that writes a config (one Postgres listener in front
# of pg_primary, mirroring to the clusters asked for), starts the gateway as a
# subprocess and stops it at teardown; `wait_drained` and `assert_balanced`,
# which read the gateway's /metrics (design.md §7) to wait for the mirrors to
# catch up and to check the accounting invariant (design.md §1.4).
# Knows the config contract (design.md §6) and metric names, nothing internal.
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.support.faults import Launcher, toml_value
from tests.support.gateway import GatewayProcess
from tests.support.net import free_port
from tests.support.pgcluster import SUPERUSER, PgCluster

LISTENER = "db"
# Units per client session. The default of 500 is about what a fast sequential
# client (pgbench -c 1) gets ahead of the mirror on this machine, so a busy
# machine would drop units; tests of end data want none dropped unless they
# ask for a smaller queue themselves.
DEFAULT_QUEUE = 20_000
_UNSET: Any = object()


@dataclass
class MirrorSpec:
    """One mirror of the listener: a cluster and the keys of its two tables.

    :param user: a user named in the mirror URL (overrides the client's user).
    :param password: the upstream's ``password`` (default: the cluster superuser's).
    :param users: the upstream's ``users`` table.
    :param options: keys of the ``[[listener.mirror]]`` table (queue, exposure...).
    """

    cluster: PgCluster
    name: str = "mirror"
    user: str | None = None
    database: str | None = None
    password: str | None = _UNSET
    users: Mapping[str, str] = field(default_factory=dict)
    upstream: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Gateway:
    """A started gateway and how to reach it."""

    process: GatewayProcess
    port: int
    primary: PgCluster
    mirrors: list[MirrorSpec]
    host: str = "127.0.0.1"

    def dsn(self, dbname: str, user: str = SUPERUSER, password: str | None = None,
            **params: str) -> str:
        """A libpq URL to the gateway's listener (password defaults as PgCluster.dsn)."""
        if password is None:
            password = self.primary.password if user == SUPERUSER else ""
        auth = quote(user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        url = f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"
        if params:
            url += "?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
        return url

    def sample(self, name: str, **labels: str) -> float:
        return self.process.sample(name, **labels)

    def sample_sum(self, name: str, **labels: str) -> float:
        return self.process.sample_sum(name, **labels)

    def log(self) -> str:
        return self.process.log()


def render_config(primary: PgCluster, mirrors: list[MirrorSpec], port: int, admin: int,
                  listener: Mapping[str, Any] | None = None) -> str:
    lines = [
        "[general]",
        'shutdown_timeout = "5s"',
        "",
        "[admin]",
        f'listen = "127.0.0.1:{admin}"',
        'log_level = "debug"',
        "",
        "[[upstream]]",
        'name = "prod"',
        f'url = "postgres://127.0.0.1:{primary.port}"',
    ]
    for m in mirrors:
        auth = quote(m.user, safe="") + "@" if m.user else ""
        db = "/" + quote(m.database, safe="") if m.database else ""
        password = m.cluster.password if m.password is _UNSET else m.password
        lines += ["", "[[upstream]]", f"name = {toml_value(m.name)}",
                  f'url = "postgres://{auth}127.0.0.1:{m.cluster.port}{db}"']
        if password is not None:
            lines.append(f"password = {toml_value(password)}")
        if m.users:
            lines.append(f"users = {toml_value(dict(m.users))}")
        lines += [f"{k} = {toml_value(v)}" for k, v in m.upstream.items()]
    lines += ["", "[[listener]]", f'name = "{LISTENER}"', 'protocol = "postgres"',
              f'listen = "127.0.0.1:{port}"', 'primary = "prod"']
    lines += [f"{k} = {toml_value(v)}" for k, v in (listener or {}).items()]
    for m in mirrors:
        lines += ["", "[[listener.mirror]]", f"upstream = {toml_value(m.name)}"]
        options = {"queue": DEFAULT_QUEUE, **m.options}
        lines += [f"{k} = {toml_value(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """A Launcher for this test: every gateway it started is stopped at
    teardown, and a traceback in one's log fails the test there."""
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()
    broken = launcher.tracebacks()
    if broken:
        pytest.fail("gateway logged a traceback:\n" + "\n".join(broken))


@pytest.fixture
def gateway(tmp_path: Path, pg_primary: PgCluster, pg_mirror: PgCluster
            ) -> Iterator[Callable[..., Gateway]]:
    """Factory: ``gateway(mirrors=None, listener=None, env=None, **mirror_options)``
    -> Gateway.

    Without ``mirrors``, one mirror: pg_mirror with the superuser password and
    ``mirror_options`` as its ``[[listener.mirror]]`` keys (``queue`` defaults
    to DEFAULT_QUEUE). ``env``: more environment for the gateway process.
    Every gateway started is stopped at teardown; a traceback in its log fails
    the test there.
    """
    started: list[Gateway] = []

    def start(mirrors: list[MirrorSpec] | None = None,
              listener: Mapping[str, Any] | None = None,
              env: Mapping[str, str] | None = None, **options: Any) -> Gateway:
        if mirrors is None:
            mirrors = [MirrorSpec(pg_mirror, options=options)]
        port, admin = free_port(), free_port()
        text = render_config(pg_primary, mirrors, port, admin, listener)
        workdir = tmp_path / f"gw{len(started)}"
        proc = GatewayProcess(text, workdir=workdir, env=dict(env or {}))
        gw = Gateway(proc, port, pg_primary, mirrors)
        started.append(gw)
        proc.start()
        proc.wait_ready(port)
        return gw

    yield start
    problems = []
    for gw in started:
        if gw.process.returncode is None:
            gw.process.stop()
        if "Traceback" in gw.process.log():
            problems.append(f"{gw.process.log_path}:\n{gw.process.log_tail(60)}")
    if problems:
        pytest.fail("gateway logged a traceback:\n" + "\n".join(problems))


def _per_mirror(samples: Mapping[Any, float], name: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for (n, labels), value in samples.items():
        if n == name:
            d = dict(labels)
            key = (d["listener"], d["mirror"])
            out[key] = out.get(key, 0.0) + value
    return out


def mirror_state(gw: Gateway | GatewayProcess) -> dict[tuple[str, str], dict[str, float]]:
    """Per (listener, mirror): offered, skipped, delivered, dropped, queued, in_flight."""
    proc = gw.process if isinstance(gw, Gateway) else gw
    samples = proc.metrics()
    names = {
        "offered": "mirrorgate_mirror_offered_total",
        "skipped": "mirrorgate_mirror_skipped_total",
        "delivered": "mirrorgate_mirror_delivered_total",
        "dropped": "mirrorgate_mirror_dropped_total",
        "queued": "mirrorgate_mirror_queue_units",
        "in_flight": "mirrorgate_mirror_in_flight",
    }
    table = {field: _per_mirror(samples, name) for field, name in names.items()}
    keys = set().union(*table.values())
    return {k: {f: table[f].get(k, 0.0) for f in names} for k in keys}


def drop_reasons(gw: Gateway | GatewayProcess) -> dict[tuple[str, str, str], float]:
    """Non-zero drops by (listener, mirror, reason), for failure messages."""
    proc = gw.process if isinstance(gw, Gateway) else gw
    out = {}
    for (n, labels), value in proc.metrics().items():
        if n == "mirrorgate_mirror_dropped_total" and value:
            d = dict(labels)
            out[(d["listener"], d["mirror"], d["reason"])] = value
    return out


def wait_drained(gw: Gateway | GatewayProcess, timeout: float = 30.0) -> None:
    """Poll /metrics until every mirror has nothing queued or in flight.

    The caller's clients must be done sending (units are offered as they are
    sent, so nothing new appears afterwards).
    """
    deadline = time.monotonic() + timeout
    state: dict[tuple[str, str], dict[str, float]] = {}
    while time.monotonic() < deadline:
        state = mirror_state(gw)
        if state and all(s["queued"] == 0 and s["in_flight"] == 0 for s in state.values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"mirrors not drained within {timeout}s: {state}")


def assert_balanced(gw: Gateway | GatewayProcess) -> dict[tuple[str, str], dict[str, float]]:
    """offered == delivered + dropped + queued + in_flight for every (listener, mirror).

    :returns: the state read, for further assertions.
    """
    state = mirror_state(gw)
    assert state, "no mirror metrics exposed"
    for key, s in state.items():
        assert s["offered"] == s["delivered"] + s["dropped"] + s["queued"] + s["in_flight"], (
            f"accounting out of balance for {key}: {s}")
    return state


def outcome(gw: Gateway, outcome: str, mirror: str = "mirror") -> float:
    return gw.sample("mirrorgate_mirror_delivered_total", listener=LISTENER, mirror=mirror,
                     outcome=outcome)


def dropped(gw: Gateway, mirror: str = "mirror", **labels: str) -> float:
    return gw.sample_sum("mirrorgate_mirror_dropped_total", listener=LISTENER, mirror=mirror,
                         **labels)


def same_on_both(sql: str, db: str, primary: PgCluster, *mirrors: PgCluster) -> str:
    """Run a query on each cluster directly; assert the outputs match; return it."""
    want = primary.psql(sql, db)
    for m in mirrors:
        got = m.psql(sql, db)
        assert got == want, f"{m.name} differs from primary for {sql!r}:\n{got!r}\n!=\n{want!r}"
    return want
