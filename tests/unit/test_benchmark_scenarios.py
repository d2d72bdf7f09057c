"""The in-process benchmark scenarios still run against the relay as it is.

``benchmarks/instructions.py`` counts them under callgrind and the
``relay_micro.py`` scripts time them; both reach into the relays' internals,
so a change of the relay can break them without any other test noticing.
Each scenario runs here for a few units, without valgrind (the delivering
ones assert their accounting balances).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "instructions.py"


@pytest.mark.parametrize(("protocol", "scenario"), [
    ("http", "none"), ("http", "full"), ("http", "delivering"),
    ("postgres", "nomirror"), ("postgres", "down"), ("postgres", "full"),
    ("postgres", "delivering"),
])
def test_each_scenario_runs(protocol: str, scenario: str) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--child", protocol, scenario, "20"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
