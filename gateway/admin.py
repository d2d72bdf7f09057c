# The admin listener: the operator's endpoints over HTTP/1.1.
#
# Owns: serving /metrics, /healthz, /readyz, /status, the dashboard at / and
# POST /reload, and the readiness probe behind /readyz (is every listener
# bound, does every primary accept a TCP connection). It is low-traffic, so it
# is parsed by h11 (the pure-Python reference parser, design.md §3) over
# asyncio streams.
# Must not know: protocols, or how the gateway reloads. It reads the gateway
# through the Control interface, counters through metrics.render, and the
# snapshot through status.snapshot.
from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import attrs
import h11

from .config_values import Address
from .metrics import render
from .protocol import Control
from .status import snapshot

__all__ = ["AdminServer", "Answer", "ReadinessProbe"]

log = logging.getLogger("mirrorgate.admin")

_MAX_REQUEST = 16 * 1024  # request line and headers
_MAX_BODY = 16 * 1024  # no endpoint takes a body; POST /reload may carry a small one
_IDLE_TIMEOUT = 30.0
_PROM_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_JSON_TYPE = "application/json"
_TEXT_TYPE = "text/plain; charset=utf-8"
_HTML_TYPE = "text/html; charset=utf-8"
# The dashboard is one file with inline CSS and JS that talks only to us: the
# browser is told so, and refuses anything else even if the page asked.
_DASHBOARD_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_GET = frozenset({b"GET", b"HEAD"})
_POST = frozenset({b"POST"})
_DASHBOARD = "dashboard.html"  # package data of ``gateway``


@attrs.frozen
class Answer:
    """One response: status, content type, body and any further headers."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, value: Any) -> Answer:
    body = json.dumps(value, indent=1, allow_nan=False).encode() + b"\n"
    return Answer(status, _JSON_TYPE, body)


def _text(status: int, text: str) -> Answer:
    return Answer(status, _TEXT_TYPE, text.encode() + b"\n")


class ReadinessProbe:
    """Whether the gateway can serve: every listener's socket is open and
    every primary of every listener accepts a TCP connection within
    ``timeout``. Primaries are tried concurrently, each address once; the
    answer is reused for ``ttl`` seconds so that a busy prober costs the
    primaries one connection a second at most."""

    def __init__(self, control: Control, *, timeout: float = 1.0, ttl: float = 1.0) -> None:
        self.control = control
        self.timeout = timeout
        self.ttl = ttl
        self._lock = asyncio.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    async def check(self) -> dict[str, Any]:
        """:returns: ``{"ready": bool, "failures": [...], "listeners": [...]}``."""
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.ttl:
                return self._cached[1]
            report = await self._probe()
            self._cached = (time.monotonic(), report)
            return report

    async def _probe(self) -> dict[str, Any]:
        # Listeners a reload removed may still be finishing their sessions,
        # unbound by design: only those of the config serving now count.
        serving = {listener.name for listener in self.control.config.listeners}
        contexts = [ctx for ctx in self.control.listeners() if ctx.name in serving]
        targets = sorted({(up.host, up.port) for ctx in contexts for up in ctx.primaries.values()})
        errors = dict(zip(targets, await asyncio.gather(
            *(self._reach(host, port) for host, port in targets)), strict=True))
        failures: list[str] = []
        listeners = []
        for ctx in contexts:
            bound = self.control.bound(ctx)
            if not bound:
                failures.append(f"listener {ctx.name}: not bound to {ctx.listener.listen}")
            primaries = []
            for name, up in ctx.primaries.items():
                error = errors[(up.host, up.port)]
                address = str(Address(up.host, up.port))
                if error is not None:
                    failures.append(f"listener {ctx.name}: primary {name} ({address}): {error}")
                primaries.append({"name": name, "address": address, "reachable": error is None,
                                  "error": error})
            listeners.append({"name": ctx.name, "bound": bound, "primaries": primaries})
        return {"ready": not failures, "failures": failures, "listeners": listeners}

    async def _reach(self, host: str, port: int) -> str | None:
        """None if ``host:port`` accepts a connection in time, else why not."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                               self.timeout)
        except TimeoutError:
            return f"no connection within {self.timeout:g}s"
        except OSError as exc:
            return exc.strerror or str(exc) or type(exc).__name__
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None


_Handler = Callable[[dict[str, list[str]]], Awaitable[Answer]]


class _TooLarge(Exception):
    """A request body beyond _MAX_BODY."""


class AdminServer:
    """Serves the operator's endpoints for the running gateway.

    :param control: the gateway (its listeners, pools, config and reload).
    """

    def __init__(self, host: str, port: int, control: Control) -> None:
        self.host = host
        self.port = port
        self.control = control
        self.readiness = ReadinessProbe(control)
        self._dashboard = (importlib.resources.files("gateway") / _DASHBOARD).read_bytes()
        self._server: asyncio.base_events.Server | None = None
        self._routes: dict[bytes, tuple[frozenset[bytes], _Handler]] = {
            b"/": (_GET, self._get_dashboard),
            b"/metrics": (_GET, self._get_metrics),
            b"/healthz": (_GET, self._get_healthz),
            b"/readyz": (_GET, self._get_readyz),
            b"/status": (_GET, self._get_status),
            b"/reload": (_POST, self._post_reload),
        }

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def __repr__(self) -> str:
        state = "serving" if self._server is not None and self._server.is_serving() else "closed"
        return f"<AdminServer {self.host}:{self.port} {state}>"

    # -- routes --

    async def answer(self, method: bytes, target: bytes) -> Answer:
        """The response to one request (its body, if any, is not used)."""
        path, _, query = target.partition(b"?")
        route = self._routes.get(path)
        if route is None:
            return _text(404, "not found")
        methods, handler = route
        if method not in methods:
            allow = ", ".join(sorted(m.decode() for m in methods))
            return attrs.evolve(_text(405, "method not allowed"), headers=(("allow", allow),))
        return await handler(parse_qs(query.decode("latin-1")))

    async def _get_dashboard(self, query: dict[str, list[str]]) -> Answer:
        return Answer(200, _HTML_TYPE, self._dashboard,
                      (("content-security-policy", _DASHBOARD_CSP),
                       ("x-content-type-options", "nosniff")))

    async def _get_metrics(self, query: dict[str, list[str]]) -> Answer:
        return Answer(200, _PROM_TYPE, render(self.control.listeners))

    async def _get_healthz(self, query: dict[str, list[str]]) -> Answer:
        return _text(200, "ok")

    async def _get_readyz(self, query: dict[str, list[str]]) -> Answer:
        report = await self.readiness.check()
        return _json(200 if report["ready"] else 503, report)

    async def _get_status(self, query: dict[str, list[str]]) -> Answer:
        clients = query.get("clients", ["0"])[-1] not in ("", "0", "false", "no")
        return _json(200, snapshot(self.control, clients=clients))

    async def _post_reload(self, query: dict[str, list[str]]) -> Answer:
        log.info("reload asked through the admin listener")
        try:
            result = await self.control.reload()
        except Exception as exc:  # noqa: BLE001 - the old config keeps serving
            log.exception("reload failed")
            return _json(500, {"ok": False, "message": f"reload failed: {exc}", "changes": []})
        return _json(200 if result.ok else 422, {
            "ok": result.ok, "message": result.message, "changes": list(result.changes)})

    # -- HTTP/1.1 --

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            while True:
                try:
                    request = await self._read_request(conn, reader)
                except _TooLarge:
                    await self._send(conn, writer, b"POST", _text(413, "request body too large"),
                                     close=True)
                    break
                if request is None:
                    break
                try:
                    answer = await self.answer(request.method, request.target)
                except Exception:  # noqa: BLE001 - one bad answer must not end the listener
                    log.exception("admin %s %s failed", request.method.decode(),
                                  request.target.decode("latin-1"))
                    answer = _text(500, "internal error: see the gateway's log")
                await self._send(conn, writer, request.method, answer)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                await self._send(conn, writer, b"GET",
                                 _text(exc.error_status_hint, f"bad request: {exc}"), close=True)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader
                            ) -> h11.Request | None:
        """One whole request (its body read and discarded); None at the end."""
        request: h11.Request | None = None
        body = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await asyncio.wait_for(reader.read(65536), _IDLE_TIMEOUT))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > _MAX_BODY:
                    raise _TooLarge
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, method: bytes,
                    answer: Answer, *, close: bool = False) -> None:
        headers = [("content-type", answer.content_type),
                   ("content-length", str(len(answer.body))),
                   ("cache-control", "no-store"), *answer.headers]
        if close:
            headers.append(("connection", "close"))
        writer.write(conn.send(h11.Response(status_code=answer.status, headers=headers)))
        if method != b"HEAD":
            writer.write(conn.send(h11.Data(data=answer.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
