# What the in-process benchmarks (postgres/relay_micro.py, http/relay_micro.py)
# share: the event loop the gateway would run on, and a mirror transport that
# answers without a socket.
from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["AnsweringTransport", "new_loop"]


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed, as the gateway runs; asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class AnsweringTransport:
    """A mirror connection's transport that answers every write with ``answer``
    at the next loop turn, as a fast mirror would.

    ``answered``, when set, is resolved one loop turn after the answer is fed,
    that is after the worker step the answer woke, which accounts the unit.
    """

    def __init__(self, protocol: Any, answer: bytes) -> None:
        self.protocol = protocol
        self.answer = answer
        self.loop = asyncio.get_running_loop()
        self.answered: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self._answer)

    def writelines(self, data: Any) -> None:
        self.loop.call_soon(self._answer)

    def _answer(self) -> None:
        self.protocol.data_received(self.answer)
        if self.answered is not None:
            self.loop.call_soon(self.answered.set_result, None)
            self.answered = None

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass
