# What a benchmark reads of a relay process from /proc: its process tree and
# CPU time, so that every script reports CPU per unit of work the same way.
from __future__ import annotations

import glob
import os
from pathlib import Path

__all__ = ["cpu_seconds", "family"]


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


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of ``pid`` and its descendants so far (None: no pid)."""
    if pid is None:
        return None
    ticks = 0
    for p in family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")
