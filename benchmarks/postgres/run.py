# The Postgres benchmark: mirrorgate side by side with pgbouncer and a bare pump.
#
# Owns: the whole run in one go, as bench-anchors.md describes: throwaway
# primary and mirror clusters (pgbench -i -s 5), pgbouncer 1.18 in session
# mode, the bare byte pump (pump.py), a hung mirror (accepts, never reads),
# a down one (refuses connections), and the gateway in four configs; then
# pgbench against every path, alternating the paths within each round (in
# reverse order every other round), and a
# table of TPS, p99 latency and peak RSS as ratios to pgbouncer. Knows the
# gateway only through its CLI, config file and /metrics
# (tests/support/gateway.py).
#
#   python benchmarks/postgres/run.py [--rounds 2] [--duration 6] [--only direct,pump]
from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import (  # noqa: E402
    brief,
    choose_paths,
    cpu_split,
    failures_section,
    family,
    last_lines,
    median_interval,
    round_order,
    start_pump,
    stop_gateway,
    tail,
    terminate,
    wait_drained,
)
from tests.support.gateway import GatewayError, GatewayProcess  # noqa: E402
from tests.support.net import free_port, wait_listening  # noqa: E402
from tests.support.pgcluster import SUPERUSER, PgCluster, server_ids  # noqa: E402

PATHS = [
    "direct",
    "pgbouncer",
    "pump",
    "mirrorgate-nomirror",
    "mirrorgate-mirror",
    "mirrorgate-hung",
    "mirrorgate-down",
]
WORKLOADS = {"select-only": ["-S"], "tpcb-like": []}
DB = "bench"
OUT = REPO_ROOT / "benchmarks" / "out" / "postgres.md"


@dataclass
class Target:
    """One way from pgbench to the primary: a port, and the relay's pids for RSS."""

    name: str
    port: int = 0
    pid: int | None = None  # the relay process, None for direct
    gateway: GatewayProcess | None = None
    error: str | None = None
    stop: Callable[[], None] | None = None


@dataclass
class Run:
    tps: float
    p99_ms: float
    rss_mib: float | None
    delivered: float | None = None  # mirror units delivered / offered, gateways only
    # Mirror units not delivered in this run, by drop reason (and "outcome
    # error" for units the mirror answered with an error).
    missed: dict[str, float] = field(default_factory=dict)
    cpu_us: float | None = None  # the relay's CPU time per transaction (user + system)
    user_us: float | None = None  # the user part of it
    round: int = 0


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    clusters: list[PgCluster] = field(default_factory=list)
    paths: dict[str, Target] = field(default_factory=dict)
    results: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)
    hung: HungMirror | None = None
    down: DownMirror | None = None


# -- the servers ---------------------------------------------------------------


def start_cluster(name: str, keep: bool) -> PgCluster:
    cluster = PgCluster(name, max_connections=300, keep=keep).start()
    cluster.create_database(DB)
    env = pg_env(cluster.password)
    cmd = [str(cluster.bindir / "pgbench"), "-i", "-s", "5", "-q"]
    cmd += ["-h", cluster.host, "-p", str(cluster.port), "-U", SUPERUSER, DB]
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return cluster


def pg_env(password: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = password
    return env


def start_pgbouncer(workdir: Path, primary: PgCluster) -> Target:
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    d = workdir / "pgbouncer"
    d.mkdir()
    port = free_port()
    (d / "userlist.txt").write_text(f'"{SUPERUSER}" "{primary.password}"\n')
    (d / "pgbouncer.ini").write_text(
        f"[databases]\n* = host=127.0.0.1 port={primary.port}\n\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {d / 'userlist.txt'}\n"
        "pool_mode = session\nmax_client_conn = 500\ndefault_pool_size = 100\n"
        f"logfile = {d / 'pgbouncer.log'}\n"
    )
    ids = server_ids()
    if ids:
        for p in [d, *d.iterdir()]:
            os.chown(p, *ids)
    proc = subprocess.Popen(
        [exe, str(d / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=open(d / "stderr.log", "wb"),  # noqa: SIM115
        user=ids[0] if ids else None,  # pgbouncer refuses to run as root
        group=ids[1] if ids else None,
        extra_groups=[] if ids else None,
    )
    ok = wait_listening("127.0.0.1", port, timeout=10)
    path = Target("pgbouncer", port, proc.pid, stop=lambda: terminate(proc))
    if not ok or proc.poll() is not None:
        terminate(proc)
        path.error = "pgbouncer did not start: " + tail(d / "stderr.log", d / "pgbouncer.log")
    return path


def pump_path(workdir: Path, primary: PgCluster) -> Target:
    port, proc, error = start_pump(workdir / "pump.log", primary.port)
    path = Target("pump", port, proc.pid, stop=lambda: terminate(proc))
    if error:
        path.error = error
    return path


class HungMirror:
    """A TCP listener that accepts connections and never reads or answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="hung-mirror").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class DownMirror:
    """A port where connections are refused: bound and never listening, so no
    other process takes it during the run."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def gateway_config(primary: PgCluster, mirror_port: int | None, password: str) -> tuple[str, int]:
    port, admin = free_port(), free_port()
    text = (
        '[general]\nshutdown_timeout = "10s"\n\n'
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n\n'
        f'[[upstream]]\nname = "primary"\nurl = "postgres://127.0.0.1:{primary.port}"\n\n'
    )
    if mirror_port is not None:
        text += (
            f'[[upstream]]\nname = "mirror"\nurl = "postgres://127.0.0.1:{mirror_port}"\n'
            f'password = "{password}"\n\n'
        )
    text += (
        '[[listener]]\nname = "pg"\nprotocol = "postgres"\n'
        f'listen = "127.0.0.1:{port}"\nprimary = "primary"\nmax_clients = 500\n'
    )
    if mirror_port is not None:
        text += '\n[[listener.mirror]]\nupstream = "mirror"\n'
    return text, port


def start_gateway(bench: Bench, name: str, mirror_port: int | None) -> Target:
    primary = bench.clusters[0]
    text, port = gateway_config(primary, mirror_port, primary.password)
    gw = GatewayProcess(text, workdir=bench.workdir / name)
    path = Target(name, port, gateway=gw, stop=lambda: stop_gateway(gw))
    try:
        gw.start()
        path.pid = gw.pid
        gw.wait_ready(port, timeout=15)
    except (GatewayError, OSError) as exc:
        stop_gateway(gw)
        path.error = "gateway did not start: " + last_lines(str(exc), 12)
    return path


def setup_path(bench: Bench, name: str) -> Target:
    primary = bench.clusters[0]
    if name == "direct":
        return Target(name, primary.port)
    if name == "pgbouncer":
        return start_pgbouncer(bench.workdir, primary)
    if name == "pump":
        return pump_path(bench.workdir, primary)
    if name == "mirrorgate-nomirror":
        return start_gateway(bench, name, None)
    if name == "mirrorgate-mirror":
        if len(bench.clusters) < 2:
            print("starting the mirror cluster (pgbench -i -s 5)", flush=True)
            bench.clusters.append(start_cluster("bench-mirror", bench.args.keep))
        return start_gateway(bench, name, bench.clusters[1].port)
    if name == "mirrorgate-hung":
        bench.hung = bench.hung or HungMirror()
        return start_gateway(bench, name, bench.hung.port)
    if name == "mirrorgate-down":
        bench.down = bench.down or DownMirror()
        return start_gateway(bench, name, bench.down.port)
    raise ValueError(name)


# -- measuring -------------------------------------------------------------------


def settle(bench: Bench) -> None:
    """Let the clusters finish what the last run left them (dirty buffers from
    writes the mirror replayed, or the primary took) before the next path runs,
    so that no path pays for its predecessor's background writes."""
    for cluster in bench.clusters:
        try:
            cluster.execute("CHECKPOINT")
        except Exception:  # noqa: BLE001 - a failed checkpoint only loses the settling
            pass
    time.sleep(0.5)


def reset_peak_rss(pid: int) -> None:
    for p in family(pid):
        try:  # "5" resets VmHWM to the current RSS (proc(5), clear_refs)
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass


def peak_rss_mib(pid: int) -> float | None:
    total = 0
    for p in family(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        total += int(m.group(1)) if m else 0
    return total / 1024 if total else None


def mirror_counts(gw: GatewayProcess) -> tuple[float, float, dict[str, float]] | None:
    """Offered and delivered mirror units, and drops by reason, from /metrics."""
    try:
        m = gw.metrics()
    except Exception:  # noqa: BLE001 - a missing /metrics only loses a column
        return None
    offered = sum(v for (n, _), v in m.items() if n == "mirrorgate_mirror_offered_total")
    delivered = sum(v for (n, _), v in m.items() if n == "mirrorgate_mirror_delivered_total")
    missed: dict[str, float] = {}
    for (n, labels), v in m.items():
        label = dict(labels)
        if n == "mirrorgate_mirror_dropped_total":
            key = label.get("reason", "?")
        elif n == "mirrorgate_mirror_delivered_total" and label.get("outcome") == "error":
            key = "outcome error"
        else:
            continue
        missed[key] = missed.get(key, 0.0) + v
    return offered, delivered, missed


def pgbench(bench: Bench, path: Target, workload: str, tag: str) -> Run:
    a, primary = bench.args, bench.clusters[0]
    logs = bench.workdir / "logs"
    logs.mkdir(exist_ok=True)
    prefix = logs / tag
    cmd = [str(primary.bindir / "pgbench"), *WORKLOADS[workload], "-M", "prepared"]
    cmd += ["-c", str(a.clients), "-j", str(a.jobs), "-T", str(a.duration)]
    cmd += ["-l", f"--log-prefix={prefix}"]
    cmd += ["-h", "127.0.0.1", "-p", str(path.port), "-U", SUPERUSER, DB]
    before = mirror_counts(path.gateway) if path.gateway else None
    if path.pid:
        reset_peak_rss(path.pid)
    cpu_before = cpu_split(path.pid) if path.pid else None
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=pg_env(primary.password), timeout=a.duration + 120
    )
    rss = peak_rss_mib(path.pid) if path.pid else None
    cpu_after = cpu_split(path.pid) if path.pid else None
    user = cpu = None
    if cpu_after is not None and cpu_before is not None:
        user = cpu_after[0] - cpu_before[0]
        cpu = user + cpu_after[1] - cpu_before[1]
    m = re.search(r"^tps = ([\d.]+) \(without initial connection time\)", result.stdout, re.M)
    if result.returncode != 0 or m is None:
        raise RuntimeError(f"pgbench exit {result.returncode}: " + last_lines(result.stderr, 8))
    latencies: list[int] = []
    for f in glob.glob(f"{prefix}.*"):
        with open(f) as fh:
            latencies.extend(int(line.split()[2]) for line in fh if line.strip())
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000
    m_tx = re.search(r"^number of transactions actually processed: (\d+)", result.stdout, re.M)
    transactions = int(m_tx.group(1)) if m_tx else 0
    run = Run(float(m.group(1)), p99, rss,
              cpu_us=cpu / transactions * 1e6 if cpu is not None and transactions else None,
              user_us=user / transactions * 1e6 if user is not None and transactions else None)
    if path.gateway is not None and before is not None:
        wait_drained(path.gateway, 60 if path.name == "mirrorgate-mirror" else 10)
        after = mirror_counts(path.gateway)
        if after and after[0] > before[0]:
            run.delivered = (after[1] - before[1]) / (after[0] - before[0])
            run.missed = {k: v - before[2].get(k, 0.0) for k, v in after[2].items()
                          if v - before[2].get(k, 0.0) > 0}
    return run


# -- reporting -------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def _num(x: float | None, fmt: str) -> str:
    return format(x, fmt) if x is not None else "n/a"


def summary(bench: Bench,
            ) -> dict[tuple[str, str], tuple[float, float, float | None, float | None,
                                             float | None, float | None]]:
    out = {}
    for key, runs in bench.results.items():
        rss = [r.rss_mib for r in runs if r.rss_mib is not None]
        dl = [r.delivered for r in runs if r.delivered is not None]
        cpu = [r.cpu_us for r in runs if r.cpu_us is not None]
        user = [r.user_us for r in runs if r.user_us is not None]
        out[key] = (
            statistics.median(r.tps for r in runs),
            statistics.median(r.p99_ms for r in runs),
            max(rss) if rss else None,
            min(dl) if dl else None,
            statistics.median(cpu) if cpu else None,
            statistics.median(user) if user else None,
        )
    return out


# The comparisons the targets are stated in, as (path, against).
PAIRED = (("mirrorgate-nomirror", "pgbouncer"), ("pump", "pgbouncer"),
          ("mirrorgate-hung", "mirrorgate-nomirror"), ("mirrorgate-down", "mirrorgate-nomirror"))


def per_round(bench: Bench, a: str, b: str, workload: str) -> list[float]:
    """TPS of ``a`` over ``b`` in each round where both ran."""
    tps_a = {r.round: r.tps for r in bench.results.get((a, workload), [])}
    tps_b = {r.round: r.tps for r in bench.results.get((b, workload), [])}
    return [tps_a[k] / tps_b[k] for k in sorted(tps_a) if tps_b.get(k)]


def report(bench: Bench) -> str:
    a, s = bench.args, summary(bench)
    lines = [
        "# Postgres benchmark",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, {platform.node()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}.",
        f"pgbench -M prepared -c {a.clients} -j {a.jobs} -T {a.duration}, "
        f"{a.rounds} round(s), paths alternated within each round, "
        "in reverse order every other round; "
        "TPS, p99 and relay CPU per transaction (user + system, and the user part, "
        "from /proc) are medians "
        "over rounds, RSS the largest peak (VmHWM) of the relay.",
        "",
        "| path | workload | TPS | p99 ms | relay CPU µs/tx | of it user | peak RSS MiB "
        "| TPS / pgbouncer | p99 / pgbouncer | RSS / pgbouncer | TPS / nomirror "
        "| mirror delivered |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in WORKLOADS:
        base = s.get(("pgbouncer", workload))
        nomirror = s.get(("mirrorgate-nomirror", workload))
        for name in bench.paths:
            key = (name, workload)
            if key not in s:
                why = bench.failures.get(key) or bench.paths[name].error or "no result"
                lines.append(f"| {name} | {workload} | FAILED: {brief(why)} |||||||||")
                continue
            tps, p99, rss, dl, cpu, user = s[key]
            vs_nomirror = (
                _ratio(tps, nomirror[0]) if name.startswith("mirrorgate-") and nomirror else ""
            )
            lines.append(
                f"| {name} | {workload} | {tps:.0f} | {p99:.2f} | {_num(cpu, '.1f')} "
                f"| {_num(user, '.1f')} "
                f"| {_num(rss, '.1f')} "
                f"| {_ratio(tps, base and base[0])} | {_ratio(p99, base and base[1])} "
                f"| {_ratio(rss, base and base[2])} | {vs_nomirror} "
                f"| {_num(dl and dl * 100, '.1f')}{'%' if dl is not None else ''} |"
            )
    paired = []
    for workload in WORKLOADS:
        for path, against in PAIRED:
            ratios = per_round(bench, path, against, workload)
            if ratios:
                each = ", ".join(f"{r:.2f}" for r in ratios)
                middle = f"median {statistics.median(ratios):.2f}"
                if len(ratios) > 1:
                    low, high, cover = median_interval(ratios)
                    middle += f"; {cover:.0%} interval {low:.2f}-{high:.2f}"
                paired.append(f"- {path} / {against}, {workload}: {each} ({middle})")
    if paired:
        lines += ["", "TPS ratios paired by round (the two runs of a pair are seconds "
                      "apart, so slower drifts of the machine cancel out), with an "
                      "interval that holds the true median ratio with the chance "
                      "given (distribution-free, rounds taken as independent):",
                  "", *paired]
    missed = []
    for (name, workload), runs in bench.results.items():
        totals: dict[str, float] = {}
        for r in runs:
            for k, v in r.missed.items():
                totals[k] = totals.get(k, 0.0) + v
        if totals:
            what = ", ".join(f"{k} {v:.0f}" for k, v in sorted(totals.items()))
            missed.append(f"- {name}, {workload}: {what}")
    if missed:
        lines += ["", "Mirror units dropped (by reason) or answered with an error, "
                      "all rounds:", "", *missed]
    errors = {n: p.error for n, p in bench.paths.items() if p.error}
    errors.update({f"{n} {w}": e for (n, w), e in bench.failures.items()})
    lines += failures_section(errors)
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mirrorgate vs pgbouncer vs a bare pump (pgbench)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=int, default=6, help="seconds per pgbench run (-T)")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(PATHS))
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (clusters, logs)")
    args = p.parse_args(argv)
    choose_paths(p, args, PATHS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mirrorgate-bench-"))
    ids = server_ids()
    if ids:
        os.chown(workdir, *ids)  # pgbouncer runs as postgres and writes its log here
    bench = Bench(args, workdir)
    try:
        print(f"workdir {workdir}; starting the primary cluster (pgbench -i -s 5)", flush=True)
        bench.clusters.append(start_cluster("bench-primary", args.keep))
        for name in [n for n in PATHS if n in args.paths]:
            path = setup_path(bench, name)
            bench.paths[name] = path
            status = brief(path.error) if path.error else f"ready on port {path.port}"
            print(f"{name}: {status}", flush=True)
        for rnd in range(args.rounds):
            for workload in WORKLOADS:
                for name in round_order(list(bench.paths), rnd):
                    path, key = bench.paths[name], (name, workload)
                    if path.error or key in bench.failures:
                        continue
                    try:
                        run = pgbench(bench, path, workload, f"r{rnd}-{workload}-{name}")
                        run.round = rnd
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        bench.failures[key] = str(exc)
                        print(f"round {rnd} {workload:11} {name:20} FAILED {exc}", flush=True)
                        continue
                    bench.results.setdefault(key, []).append(run)
                    print(
                        f"round {rnd} {workload:11} {name:20} tps {run.tps:8.0f}  "
                        f"p99 {run.p99_ms:6.2f} ms  cpu {_num(run.cpu_us, '.1f')} us/tx "
                        f"(user {_num(run.user_us, '.1f')})  "
                        f"rss {_num(run.rss_mib, '.1f')} MiB",
                        flush=True,
                    )
                    settle(bench)
        text = report(bench)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text)
        print("\n" + text + f"written to {OUT.relative_to(REPO_ROOT)}")
        return 0 if bench.results else 1
    finally:
        for path in bench.paths.values():
            if path.stop:
                path.stop()
        if bench.hung:
            bench.hung.close()
        if bench.down:
            bench.down.close()
        for cluster in bench.clusters:
            cluster.close()
        if args.keep:
            print(f"kept {workdir} and " + ", ".join(str(c.base) for c in bench.clusters))
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
