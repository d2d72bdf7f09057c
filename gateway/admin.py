# The admin listener: /metrics and /healthz over HTTP/1.1.
#
# Owns: serving the operator's endpoints. It is low-traffic, so it is parsed by
# h11 (the pure-Python reference parser, design.md §3) over asyncio streams.
# Must not know: protocols; it reads counters through metrics.render.
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import h11

from .metrics import render
from .protocol import ListenerContext

__all__ = ["AdminServer"]

log = logging.getLogger("mirrorgate.admin")

_MAX_REQUEST = 16 * 1024
_IDLE_TIMEOUT = 30.0
_PROM_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AdminServer:
    """Serves /metrics and /healthz for the gateway's listeners."""

    def __init__(self, host: str, port: int,
                 listeners: Callable[[], Iterable[ListenerContext]]) -> None:
        self.host = host
        self.port = port
        self._listeners = listeners
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _route(self, target: bytes) -> tuple[int, str, bytes]:
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            return 200, _PROM_TYPE, render(self._listeners)
        if path == b"/healthz":
            return 200, "text/plain", b"ok\n"
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), _IDLE_TIMEOUT)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    if event.method not in (b"GET", b"HEAD"):
                        status, ctype, body = 405, "text/plain", b"method not allowed\n"
                    else:
                        status, ctype, body = self._route(event.target)
                    headers = [("content-type", ctype), ("content-length", str(len(body)))]
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                    if event.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                elif isinstance(event, h11.EndOfMessage):
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                elif event is h11.PAUSED:
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError as exc:
            body = f"bad request: {exc}\n".encode()
            try:
                writer.write(conn.send(h11.Response(
                    status_code=exc.error_status_hint,
                    headers=[("content-type", "text/plain"),
                             ("content-length", str(len(body))), ("connection", "close")])))
                writer.write(conn.send(h11.Data(data=body)))
                writer.write(conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
