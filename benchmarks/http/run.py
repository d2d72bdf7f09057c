# The HTTP benchmark: mirrorgate side by side with nginx's proxy_pass and mirror.
#
# Owns: the whole run in one go, as bench-anchors.md describes: a backend
# nginx (the primary and a fast mirror, both `return 200`), the slow mirror
# (slow_server.py, every answer after 200 ms), a front nginx (proxy_pass,
# proxy_pass + mirror, proxy_pass + mirror to the slow one), and the gateway
# in three configs; then wrk with 4 KiB POSTs (post.lua) against every path,
# alternating the paths within each round (in reverse order every other
# round), and a table of requests/s and p99 latency with the ratios that
# issue 3 sets targets for. Knows the gateway
# only through its CLI, config file and /metrics (tests/support/gateway.py).
#
#   python benchmarks/http/run.py [--rounds 2] [--duration 6] [--only direct,nginx]
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import (  # noqa: E402
    brief,
    choose_paths,
    cpu_seconds,
    failures_section,
    last_lines,
    round_order,
    start_pump,
    stop_gateway,
    tail,
    terminate,
    wait_drained,
)
from tests.support.gateway import GatewayError, GatewayProcess  # noqa: E402
from tests.support.net import free_port, wait_listening  # noqa: E402

PATHS = [
    "direct",
    "nginx",
    "nginx-mirror",
    "nginx-slow",
    "pump",
    "pump-mirror",
    "mirrorgate-nomirror",
    "mirrorgate-mirror",
    "mirrorgate-slow",
]
HERE = Path(__file__).resolve().parent
POST_LUA = HERE / "post.lua"
SLOW_SERVER = HERE / "slow_server.py"
OUT = REPO_ROOT / "benchmarks" / "out" / "http.md"
URL_PATH = "/api/v1/push"  # what Prometheus remote write posts to; every server answers any path
LISTENER = "http"
SLOW_DELAY = 0.2

# (numerator, denominator, target): the targets are issue 3's
RATIOS: list[tuple[str, str, str]] = [
    ("mirrorgate-mirror", "nginx-mirror", ">= 1.0"),
    ("mirrorgate-slow", "mirrorgate-nomirror", ">= 0.9"),
    ("nginx-slow", "nginx-mirror", ""),
    ("mirrorgate-nomirror", "nginx", ""),
    # The ceilings of any Python relay on this machine: no parsing at all.
    ("pump-mirror", "nginx-mirror", ""),
    ("pump", "nginx", ""),
    ("mirrorgate-mirror", "pump-mirror", ""),
    ("mirrorgate-nomirror", "pump", ""),
]
DELIVERED_TARGET = 0.99  # of the requests offered to the fast mirror


@dataclass
class Target:
    """One way from wrk to the primary: a port, and how to stop what serves it."""

    name: str
    port: int = 0
    gateway: GatewayProcess | None = None
    error: str | None = None
    stop: Callable[[], None] | None = None
    relay_pid: Callable[[], int | None] | None = None  # the relay process, None for direct


@dataclass
class Run:
    rps: float
    p99_ms: float
    requests: int
    cpu_us: float | None = None  # the relay's CPU time (user + system) per request
    delivered: float | None = None  # mirror requests delivered / offered, gateways only
    drops: dict[str, float] = field(default_factory=dict)  # gateways only, by reason


@dataclass
class Servers:
    """What every path leans on: ports of the primary and both mirrors."""

    primary: int
    mirror: int
    slow: int | None = None
    stops: list[Callable[[], None]] = field(default_factory=list)
    error: str | None = None  # the backends did not start: nothing can run
    slow_error: str | None = None  # the slow mirror did not start: its paths cannot run


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    servers: Servers | None = None
    paths: dict[str, Target] = field(default_factory=dict)
    results: dict[str, list[Run]] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)


# -- nginx -----------------------------------------------------------------------


def nginx_exe() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_conf(d: Path, servers: str) -> str:
    """A whole nginx.conf whose pid, logs and temp files all stay inside ``d``."""
    # As root the workers would switch to `nobody`, who cannot enter the
    # run's temp dir (mode 0700); the user directive is refused otherwise.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes auto;\n"
        f"pid {d / 'nginx.pid'};\n"
        f"error_log {d / 'error.log'} warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    access_log off;\n"
        f"    client_body_temp_path {d / 'client_body'};\n"
        f"    proxy_temp_path {d / 'proxy'};\n"
        f"    fastcgi_temp_path {d / 'fastcgi'};\n"
        f"    uwsgi_temp_path {d / 'uwsgi'};\n"
        f"    scgi_temp_path {d / 'scgi'};\n"
        f"{servers}"
        "}\n"
    )


def static_server(port: int) -> str:
    return f"    server {{ listen 127.0.0.1:{port}; location / {{ return 200; }} }}\n"


def upstream(name: str, port: int) -> str:
    return f"    upstream {name} {{ server 127.0.0.1:{port}; keepalive 128; }}\n"


# proxy_pass over kept-alive upstream connections (bench-anchors.md)
PROXY = 'proxy_pass http://primary; proxy_http_version 1.1; proxy_set_header Connection "";'


def front_server(port: int, mirror: str | None) -> str:
    """A front server block: proxy_pass to the primary, mirroring to ``mirror`` if set."""
    if mirror is None:
        return (
            "    server {\n"
            f"        listen 127.0.0.1:{port};\n"
            f"        location / {{ {PROXY} }}\n"
            "    }\n"
        )
    return (
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        f"        location / {{ mirror /__mirror; mirror_request_body on; {PROXY} }}\n"
        "        location = /__mirror {\n"
        f"            internal; proxy_pass http://{mirror}$request_uri;\n"
        '            proxy_http_version 1.1; proxy_set_header Connection "";\n'
        "        }\n"
        "    }\n"
    )


def start_nginx(
    workdir: Path, name: str, servers: str, ports: list[int]
) -> tuple[Callable[[], None], str | None]:
    """nginx as a non-daemon child with its own prefix dir; (stop, error or None)."""
    d = workdir / name
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(nginx_conf(d, servers))
    cmd = [nginx_exe(), "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")]
    proc = subprocess.Popen(
        [*cmd, "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=open(d / "stderr.log", "wb"),  # noqa: SIM115 - the child holds it
        stdin=subprocess.DEVNULL,
    )
    stop = functools.partial(terminate, proc)
    deadline = time.monotonic() + 10
    for port in ports:
        left = max(0.1, deadline - time.monotonic())
        if proc.poll() is not None or not wait_listening("127.0.0.1", port, timeout=left):
            stop()
            return stop, f"{name} nginx did not start: " + tail(d / "stderr.log", d / "error.log")
    return stop, None


def start_backends(bench: Bench) -> Servers:
    """The primary and the fast mirror (one nginx), and the slow mirror if a path needs it."""
    primary, mirror = free_port(), free_port()
    servers = Servers(primary, mirror)
    stop, error = start_nginx(
        bench.workdir, "backends", static_server(primary) + static_server(mirror), [primary, mirror]
    )
    servers.stops.append(stop)
    servers.error = error
    if error is None and {"nginx-slow", "mirrorgate-slow"} & set(bench.args.paths):
        slow, slow_stop, servers.slow_error = start_slow_server(bench.workdir)
        servers.stops.append(slow_stop)
        servers.slow = None if servers.slow_error else slow
    return servers


def start_slow_server(workdir: Path) -> tuple[int, Callable[[], None], str | None]:
    port = free_port()
    log = workdir / "slow_server.log"
    proc = subprocess.Popen(
        [sys.executable, str(SLOW_SERVER), "--listen", f"127.0.0.1:{port}"]
        + ["--delay", str(SLOW_DELAY)],
        stdout=open(log, "wb"),  # noqa: SIM115 - the child holds it
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    stop = functools.partial(terminate, proc)
    if not wait_listening("127.0.0.1", port, timeout=10) or proc.poll() is not None:
        stop()
        return port, stop, "slow server did not start: " + tail(log)
    return port, stop, None


def start_front(bench: Bench, names: list[str]) -> dict[str, Target]:
    """One front nginx with a server block for each selected nginx path."""
    s = bench.servers
    assert s is not None
    pid_file = bench.workdir / "front" / "nginx.pid"
    targets = {name: Target(name, free_port(), relay_pid=lambda: _read_pid(pid_file))
               for name in names}
    blocks = upstream("primary", s.primary) + upstream("mirror", s.mirror)
    if s.slow is not None:
        blocks += upstream("slow", s.slow)
    mirrors = {"nginx": None, "nginx-mirror": "mirror", "nginx-slow": "slow"}
    for name, t in targets.items():
        blocks += front_server(t.port, mirrors[name])
    stop, error = start_nginx(bench.workdir, "front", blocks, [t.port for t in targets.values()])
    for t in targets.values():
        t.error = error
    s.stops.append(stop)
    return targets


def pump_path(bench: Bench, name: str, tee: int | None) -> Target:
    """The bare byte pump in front of the primary; teeing every client byte
    to the fast mirror if ``tee`` is its port."""
    s = bench.servers
    assert s is not None
    port, proc, error = start_pump(bench.workdir / f"{name}.log", s.primary, tee)
    path = Target(name, port, stop=functools.partial(terminate, proc),
                  relay_pid=lambda: proc.pid)
    if error:
        path.error = error
    return path


# -- the gateway -----------------------------------------------------------------


def gateway_config(primary: int, mirror: int | None) -> tuple[str, int]:
    port, admin = free_port(), free_port()
    text = (
        '[general]\nshutdown_timeout = "10s"\n\n'
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n\n'
        f'[[upstream]]\nname = "primary"\nurl = "http://127.0.0.1:{primary}"\n\n'
    )
    if mirror is not None:
        text += f'[[upstream]]\nname = "mirror"\nurl = "http://127.0.0.1:{mirror}"\n\n'
    text += (
        f'[[listener]]\nname = "{LISTENER}"\nprotocol = "http"\n'
        f'listen = "127.0.0.1:{port}"\nprimary = "primary"\n'
    )
    if mirror is not None:
        text += '\n[[listener.mirror]]\nupstream = "mirror"\n'
    return text, port


def start_gateway(bench: Bench, name: str, mirror: int | None) -> Target:
    s = bench.servers
    assert s is not None
    text, port = gateway_config(s.primary, mirror)
    gw = GatewayProcess(text, workdir=bench.workdir / name)
    path = Target(name, port, gateway=gw, stop=lambda: stop_gateway(gw),
                  relay_pid=lambda: gw.pid)
    try:
        gw.start()
        gw.wait_ready(port, timeout=15)
    except (GatewayError, OSError) as exc:
        stop_gateway(gw)
        path.error = "gateway did not start: " + last_lines(str(exc), 12)
    return path


def mirror_counts(gw: GatewayProcess) -> tuple[float, float, dict[str, float]] | None:
    """(offered, delivered over every outcome, dropped by reason) for the listener."""
    try:
        m = gw.metrics()
    except Exception:  # noqa: BLE001 - a missing /metrics only loses a column
        return None
    offered = delivered = 0.0
    drops: dict[str, float] = {}
    for (n, labels), v in m.items():
        if ("listener", LISTENER) not in labels:
            continue
        if n == "mirrorgate_mirror_offered_total":
            offered += v
        elif n == "mirrorgate_mirror_delivered_total":
            delivered += v
        elif n == "mirrorgate_mirror_dropped_total":
            reason = dict(labels).get("reason", "?")
            drops[reason] = drops.get(reason, 0.0) + v
    return offered, delivered, drops


# -- paths -----------------------------------------------------------------------


def setup_paths(bench: Bench) -> None:
    s = bench.servers
    assert s is not None
    wanted = [n for n in PATHS if n in bench.args.paths]
    front = [n for n in wanted if n.startswith("nginx") and (n != "nginx-slow" or s.slow)]
    fronts = start_front(bench, front) if front else {}
    for name in wanted:
        if name.endswith("-slow") and s.slow is None:
            path = Target(name, error=s.slow_error or "no slow mirror")
        elif name == "direct":
            path = Target(name, s.primary)
        elif name in fronts:
            path = fronts[name]
        elif name == "pump":
            path = pump_path(bench, name, None)
        elif name == "pump-mirror":
            path = pump_path(bench, name, s.mirror)
        elif name == "mirrorgate-nomirror":
            path = start_gateway(bench, name, None)
        elif name == "mirrorgate-mirror":
            path = start_gateway(bench, name, s.mirror)
        elif name == "mirrorgate-slow":
            path = start_gateway(bench, name, s.slow)
        else:
            raise ValueError(name)
        bench.paths[name] = path
        status = brief(path.error) if path.error else f"ready on port {path.port}"
        print(f"{name}: {status}", flush=True)


# -- measuring -------------------------------------------------------------------

UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(out: str) -> tuple[float, float, int, list[str]]:
    """(requests/s, p99 ms, requests, problems) from wrk's --latency output.

    :raises RuntimeError: if the output lacks the figures (wrk failed).
    """
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p99 = re.search(r"^\s+99(?:\.000)?%\s+([\d.]+)(us|ms|s|m|h)\b", out, re.M)
    total = re.search(r"^\s+(\d+) requests in ", out, re.M)
    if not (rps and p99 and total):
        raise RuntimeError("no figures in wrk's output:\n" + last_lines(out, 12))
    problems = []
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx and int(non2xx.group(1)):
        problems.append(f"{non2xx.group(1)} non-2xx responses")
    sock = re.search(r"Socket errors: (connect \d+, read \d+, write \d+, timeout \d+)", out)
    if sock and any(int(x) for x in re.findall(r"\d+", sock.group(1))):
        problems.append(f"socket errors: {sock.group(1)}")
    ms = float(p99.group(1)) * UNIT_MS[p99.group(2)]
    return float(rps.group(1)), ms, int(total.group(1)), problems


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def wrk(bench: Bench, path: Target) -> Run:
    """One wrk run against ``path``; a run with any error raises RuntimeError."""
    a = bench.args
    if path.gateway is not None and path.gateway.returncode is not None:
        path.error = f"gateway exited with {path.gateway.returncode}:\n" + (
            path.gateway.log_tail(12)
        )
        raise RuntimeError(path.error)
    cmd = ["wrk", f"-t{a.threads}", f"-c{a.connections}", f"-d{a.duration}s", "--latency"]
    cmd += ["-s", str(POST_LUA), f"http://127.0.0.1:{path.port}{URL_PATH}"]
    before = mirror_counts(path.gateway) if path.gateway else None
    pid = path.relay_pid() if path.relay_pid else None
    cpu_before = cpu_seconds(pid)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=a.duration + 60)
    cpu_after = cpu_seconds(pid)
    if result.returncode != 0:
        said = last_lines(result.stderr + result.stdout, 8)
        raise RuntimeError(f"wrk exit {result.returncode}: {said}")
    rps, p99, total, problems = parse_wrk(result.stdout)
    if problems:
        raise RuntimeError(f"{total} requests, " + "; ".join(problems))
    run = Run(rps, p99, total)
    if cpu_before is not None and cpu_after is not None and total:
        run.cpu_us = (cpu_after - cpu_before) / total * 1e6
    if path.gateway is not None and before is not None:
        wait_drained(path.gateway, 60 if path.name == "mirrorgate-mirror" else 30)
        after = mirror_counts(path.gateway)
        if after and after[0] > before[0]:
            run.delivered = (after[1] - before[1]) / (after[0] - before[0])
            run.drops = {
                r: v - before[2].get(r, 0.0) for r, v in after[2].items() if v > before[2].get(r, 0)
            }
    return run


# -- reporting -------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "n/a"


def _met(value: float, target: str) -> str:
    if not target:
        return ""
    bound = float(target.split()[1])
    return "met" if value >= bound else "NOT met"


@dataclass
class Summary:
    rps: float
    p99_ms: float
    cpu_us: float | None
    ok: int
    delivered: float | None
    drops: dict[str, float]


def summary(bench: Bench) -> dict[str, Summary]:
    out = {}
    for name, runs in bench.results.items():
        dl = [r.delivered for r in runs if r.delivered is not None]
        cpu = [r.cpu_us for r in runs if r.cpu_us is not None]
        drops: dict[str, float] = {}
        for r in runs:
            for reason, v in r.drops.items():
                drops[reason] = drops.get(reason, 0.0) + v
        out[name] = Summary(
            statistics.median(r.rps for r in runs),
            statistics.median(r.p99_ms for r in runs),
            statistics.median(cpu) if cpu else None,
            len(runs),
            min(dl) if dl else None,
            drops,
        )
    return out


def tool_versions() -> str:
    try:
        nginx = subprocess.run([nginx_exe(), "-v"], capture_output=True, text=True).stderr
        wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    except OSError as exc:
        return str(exc)
    nginx_v = nginx.strip().split(":", 1)[-1].strip()
    wrk_line = (wrk_v.strip().splitlines() or ["wrk ?"])[0].split(" Copyright")[0]
    return f"{nginx_v}, {wrk_line}"


def report(bench: Bench) -> str:
    a, s = bench.args, summary(bench)
    lines = [
        "# HTTP benchmark",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, {platform.node()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {tool_versions()}.",
        f"wrk -t{a.threads} -c{a.connections} -d{a.duration}s --latency, POST {URL_PATH} with "
        "a 4096-byte application/x-protobuf body (post.lua); "
        f"{a.rounds} round(s), paths alternated within each round, in reverse order every "
        f"other round; req/s, p99 and relay CPU "
        "per request (user + system of the gateway, or of the front nginx and its workers, "
        "from /proc) are medians over the runs without errors (any non-2xx response or "
        "socket error fails a run). "
        f"Slow mirror: every answer after {SLOW_DELAY * 1000:.0f} ms.",
        "",
        "| path | req/s | p99 ms | relay CPU µs/req | runs ok | mirror delivered | mirror drops |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, path in bench.paths.items():
        fails = bench.failures.get(name, [])
        if name not in s:
            why = path.error or (fails[-1] if fails else "no result")
            lines.append(f"| {name} | FAILED: {brief(why)} ||||||")
            continue
        r = s[name]
        dl = f"{r.delivered * 100:.2f}%" if r.delivered is not None else ""
        drops = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.drops.items()))
        if name == "pump-mirror":
            # A raw tee counts no requests; it can only cut a mirror off.
            log = bench.workdir / f"{name}.log"
            cut = log.read_text().count("cut off") if log.exists() else 0
            drops = f"mirror connections cut off: {cut}"
        lines.append(
            f"| {name} | {r.rps:.0f} | {r.p99_ms:.2f} "
            f"| {'' if r.cpu_us is None else format(r.cpu_us, '.1f')} | {r.ok}/{r.ok + len(fails)} "
            f"| {dl} | {drops} |"
        )
    lines += [
        "",
        "| ratio | req/s | p99 | target (req/s) | |",
        "|---|---:|---:|---|---|",
    ]
    for num, den, target in RATIOS:
        x, y = s.get(num), s.get(den)
        if x is None or y is None:
            lines.append(f"| {num} / {den} | n/a | n/a | {target} | |")
            continue
        lines.append(
            f"| {num} / {den} | {_ratio(x.rps, y.rps)} | {_ratio(x.p99_ms, y.p99_ms)} "
            f"| {target} | {_met(x.rps / y.rps, target)} |"
        )
    mm = s.get("mirrorgate-mirror")
    if mm is not None and mm.delivered is not None:
        verdict = "met" if mm.delivered >= DELIVERED_TARGET else "NOT met"
        lines.append(
            f"| mirrorgate-mirror delivered / offered | {mm.delivered:.4f} | "
            f"| >= {DELIVERED_TARGET} | {verdict} |"
        )
    errors = {n: p.error for n, p in bench.paths.items() if p.error}
    for name, fails in bench.failures.items():
        for i, f in enumerate(fails):
            if f != errors.get(name):
                errors[f"{name} (failed run {i + 1})"] = f
    lines += failures_section(errors)
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mirrorgate vs nginx proxy_pass and mirror (wrk)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=int, default=6, help="seconds per wrk run (-d)")
    p.add_argument("--connections", type=int, default=32, help="wrk -c")
    p.add_argument("--threads", type=int, default=2, help="wrk -t")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(PATHS))
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    choose_paths(p, args, PATHS)
    for tool in ("wrk", nginx_exe()):
        if shutil.which(tool) is None:
            p.error(f"{tool} not found (Debian packages wrk and nginx)")
    return args


def measure(bench: Bench) -> None:
    for rnd in range(bench.args.rounds):
        for name in round_order(list(bench.paths), rnd):
            path = bench.paths[name]
            if path.error:
                continue
            try:
                run = wrk(bench, path)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                bench.failures.setdefault(name, []).append(str(exc))
                print(f"round {rnd} {name:20} FAILED {brief(str(exc))}", flush=True)
                continue
            bench.results.setdefault(name, []).append(run)
            dl = f"  delivered {run.delivered * 100:.2f}%" if run.delivered is not None else ""
            cpu = f"  cpu {run.cpu_us:6.1f} us/req" if run.cpu_us is not None else ""
            print(
                f"round {rnd} {name:20} req/s {run.rps:8.0f}  p99 {run.p99_ms:7.2f} ms{cpu}{dl}",
                flush=True,
            )
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mirrorgate-http-bench-"))
    bench = Bench(args, workdir)
    try:
        print(f"workdir {workdir}", flush=True)
        bench.servers = start_backends(bench)
        if bench.servers.error:
            print(bench.servers.error, file=sys.stderr)
            return 1
        setup_paths(bench)
        measure(bench)
        text = report(bench)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text)
        print("\n" + text + f"written to {OUT.relative_to(REPO_ROOT)}")
        return 0 if bench.results else 1
    finally:
        for path in bench.paths.values():
            if path.stop:
                path.stop()
        if bench.servers:
            for stop in reversed(bench.servers.stops):
                stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
