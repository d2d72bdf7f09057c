# Instructions per request (HTTP) or transaction (Postgres) of the relay's
# in-process scenarios, counted by callgrind.
#
# Owns: the instruction counts docs/performance.md quotes to compare a change
# of the relay before and after. Timings of the in-process scenarios
# (http/relay_micro.py, postgres/relay_micro.py) move with whatever else the
# host runs; callgrind counts the same instructions for the same code. Each
# scenario runs twice, for a small and a large number of units, under
# `valgrind --tool=callgrind`; the difference of the two totals divided by the
# difference of the counts is the cost of one unit, start-up and imports
# cancelled out. User-space instructions only: system calls are not counted
# (the scenarios make none, except the event loop's polling in "delivering").
#
#   python benchmarks/instructions.py http none full delivering
#   python benchmarks/instructions.py postgres nomirror down full delivering
#
# Needs valgrind (Debian package `valgrind`). Compare runs of one interpreter
# build only: another Python counts other instructions.
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCENARIOS = {
    "http": ("none", "full", "delivering"),
    "postgres": ("nomirror", "down", "full", "delivering"),
}
# Units per run (small, large): the delivering scenarios cost more per unit.
SIZES = {"delivering": (1000, 5000)}
DEFAULT_SIZES = (5000, 25000)


def _run_http(scenario: str, n: int) -> None:
    sys.path.insert(0, str(HERE / "http"))
    import relay_micro as micro  # type: ignore[import-not-found]

    from benchmarks.inprocess import new_loop

    if scenario == "delivering":
        new_loop().run_until_complete(micro._delivering(n))
        return
    mirrors = [] if scenario == "none" else [micro._full_mirror()]
    session, conn = micro._rig(mirrors, micro.UpstreamPool("m", 10))
    session.data_received(micro.REQUEST)
    conn.data_received(micro.ANSWER)
    for mirror in mirrors:  # every later request is a queue_full drop
        session.mirror_sessions[mirror].offer(micro.Unit(b"queued"))
    for _ in range(n):
        session.data_received(micro.REQUEST)
        conn.data_received(micro.ANSWER)


def _run_postgres(scenario: str, n: int) -> None:
    sys.path.insert(0, str(HERE / "postgres"))
    import relay_micro as micro  # type: ignore[import-not-found]

    from benchmarks.inprocess import new_loop

    if scenario == "delivering":
        new_loop().run_until_complete(micro._delivering(n))
        return
    mirrors: Any = {"nomirror": None, "down": micro._down_mirror,
                    "full": micro._full_mirror}[scenario]
    session = micro._session(mirrors() if mirrors else None)
    for _ in range(n):
        session.data_received(micro.REQUEST)
        session.primary_data(micro.ANSWER)


def child(protocol: str, scenario: str, n: int) -> None:
    sys.path.insert(0, str(HERE.parent))
    (_run_http if protocol == "http" else _run_postgres)(scenario, n)


def instructions(protocol: str, scenario: str, n: int, workdir: Path) -> int:
    out = workdir / f"callgrind.{protocol}.{scenario}.{n}"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           sys.executable, str(Path(__file__).resolve()), "--child", protocol, scenario, str(n)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr[-800:]}")
    match = re.search(r"^summary:\s+(\d+)", out.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no summary line in {out}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="relay instructions per unit, by callgrind")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("protocol", choices=sorted(SCENARIOS))
    p.add_argument("scenarios", nargs="*", help="default: all of the protocol's")
    a = p.parse_args(argv)
    if a.child:  # --child PROTOCOL SCENARIO N, under valgrind
        child(a.protocol, a.scenarios[0], int(a.scenarios[1]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian package `valgrind`)", file=sys.stderr)
        return 2
    scenarios = a.scenarios or list(SCENARIOS[a.protocol])
    unknown = set(scenarios) - set(SCENARIOS[a.protocol])
    if unknown:
        p.error(f"unknown {a.protocol} scenarios: {', '.join(sorted(unknown))}")
    unit = "request" if a.protocol == "http" else "transaction"
    with tempfile.TemporaryDirectory(prefix="mirrorgate-callgrind-") as tmp:
        for scenario in scenarios:
            small, large = SIZES.get(scenario, DEFAULT_SIZES)
            low = instructions(a.protocol, scenario, small, Path(tmp))
            high = instructions(a.protocol, scenario, large, Path(tmp))
            per = (high - low) / (large - small)
            print(f"{a.protocol} {scenario}: {per:,.0f} instructions per {unit} "
                  f"({small:,} and {large:,} runs)", flush=True)
    return 0


if __name__ == "__main__":
    # The children hash strings alike run to run, so dicts probe alike.
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
