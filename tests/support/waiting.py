# Polling with a deadline: how tests wait for a server, never by asserting a time.
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

__all__ = ["eventually"]

T = TypeVar("T")


def eventually(check: Callable[[], T], what: str, timeout: float = 10.0,
               interval: float = 0.02) -> T:
    """Poll ``check`` until it returns something other than None or False, and
    return that; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(interval)
