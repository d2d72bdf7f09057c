# What every benchmark script does the same way: read a relay process's tree
# and CPU time from /proc, start the bare pump, stop a child process or a
# gateway, wait for a gateway's mirrors to drain, order the paths of a round,
# say how far a median of rounds can be trusted, and quote logs and errors in
# a report.
from __future__ import annotations

import argparse
import glob
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.gateway import GatewayError, GatewayProcess
from tests.support.net import free_port, wait_listening

__all__ = [
    "brief", "cpu_seconds", "cpu_split", "family", "last_lines", "median_interval",
    "round_order", "start_pump", "stop_gateway", "tail", "terminate", "wait_drained",
]

PUMP = Path(__file__).resolve().parent / "pump.py"


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx's workers, a gateway's children)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_split(pid: int | None) -> tuple[float, float] | None:
    """User and system CPU time of ``pid`` and its descendants so far, in
    seconds (None: no pid)."""
    if pid is None:
        return None
    user = system = 0
    for p in family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime
        system += int(fields[12])  # stime
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of ``pid`` and its descendants so far (None: no pid)."""
    split = cpu_split(pid)
    return None if split is None else split[0] + split[1]


def start_pump(log: Path, upstream: int, tee: int | None = None
               ) -> tuple[int, subprocess.Popen[bytes], str | None]:
    """Start the bare byte pump (pump.py) in front of 127.0.0.1:``upstream``,
    teeing every client byte to 127.0.0.1:``tee`` if given, its output in
    ``log``.

    :returns: its port, its process, and why it did not start (or None).
    """
    port = free_port()
    cmd = [sys.executable, str(PUMP), "--listen", f"127.0.0.1:{port}",
           "--upstream", f"127.0.0.1:{upstream}"]
    if tee is not None:
        cmd += ["--tee", f"127.0.0.1:{tee}"]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"),  # noqa: SIM115 - the child holds it
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if not wait_listening("127.0.0.1", port, timeout=10) or proc.poll() is not None:
        terminate(proc)
        return port, proc, f"{log.stem} did not start: " + tail(log)
    return port, proc, None


def stop_gateway(gw: GatewayProcess) -> None:
    if gw.returncode is None and gw.proc is not None:
        try:
            gw.stop(timeout=15)
        except GatewayError:
            pass


def wait_drained(gw: GatewayProcess, timeout: float) -> None:
    """Let a mirror finish its backlog so that it does not load the next run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            busy = gw.sample_sum("mirrorgate_mirror_queue_units") + gw.sample_sum(
                "mirrorgate_mirror_in_flight"
            )
        except Exception:  # noqa: BLE001
            return
        if busy == 0:
            return
        time.sleep(0.2)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(*files: Path, lines: int = 12) -> str:
    text = ""
    for f in files:
        if f.exists():
            text += f.read_text(errors="replace")
    return last_lines(text, lines) or "(no log)"


def last_lines(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def brief(error: str) -> str:
    """One table cell for an error: what failed, and the error's last line."""
    lines = error.strip().splitlines() or ["?"]
    text = lines[0] if len(lines) == 1 else f"{lines[0].split(':')[0]}: {lines[-1].strip()}"
    return text.replace("|", "\\|")


def round_order(names: Sequence[str], rnd: int) -> list[str]:
    """The paths in the order round ``rnd`` runs them: as given in even rounds,
    reversed in odd ones (A B C, C B A, ...), so that no path always runs first,
    or always right after the same one, and a drift of the machine across a
    round falls on every path alike over two rounds."""
    return list(names) if rnd % 2 == 0 else list(reversed(names))


def median_interval(values: Sequence[float], want: float = 0.9
                    ) -> tuple[float, float, float]:
    """Where the median of what ``values`` sample lies, without assuming a
    distribution: between the k-th smallest and the k-th largest value.

    Each value is above the true median with chance 1/2, independently, so
    the interval misses it only if fewer than k values fall on one side:
    coverage = 1 - 2 * P(Binomial(n, 1/2) < k). k is the largest whose
    coverage is at least ``want`` (1 if none is: with few rounds the whole
    range, and its coverage says how little that is).

    :returns: ``(low, high, coverage)``.
    """
    xs = sorted(values)
    n = len(xs)
    if not n:
        raise ValueError("no values")

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= want:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


def choose_paths(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 paths: list[str]) -> None:
    """Set ``args.paths`` from ``--only`` (every path when empty); an unknown
    name is a usage error."""
    args.paths = [x for x in args.only.split(",") if x] or paths
    unknown = set(args.paths) - set(paths)
    if unknown:
        parser.error(f"unknown path(s): {', '.join(sorted(unknown))}")


def failures_section(errors: Mapping[str, object]) -> list[str]:
    """The report's closing section: each failed path and its error."""
    if not errors:
        return []
    lines = ["", "## Failures", ""]
    for name, err in errors.items():
        lines += [f"**{name}**", "", "```", str(err), "```", ""]
    return lines
