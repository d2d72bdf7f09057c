# Fixtures and helpers for the HTTP integration tests: real test servers, the
# real gateway in front of them, and clients that control every byte.
#
# Owns: `servers` (a factory of HttpServers stopped at teardown, which fails the
# test if one of them received malformed HTTP), `relay` (a factory that writes a
# config with one HTTP listener, its mirrors and routes, starts the gateway and
# stops it at teardown, failing the test on a traceback in its log), the config
# renderer, RawClient (a socket that reads HTTP/1.1 responses one by one, for
# pipelining, interim responses and closes), and the hop-by-hop header rules of
# RFC 9110 §7.6.1.
# Knows the config contract (design.md §6, the HTTP keys of issue 3) and the
# metric names (§7); nothing of the gateway's internals.
from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.faults import (
    GatewayPorts,
    Launcher,
    MirrorCounts,
    assert_balanced,
    counts,
    toml_value,
    wait_at_rest,
)
from tests.support.httpserver import Behaviour, HttpServer, echo

LISTENER = "web"

# RFC 9110 §7.6.1: hop-by-hop fields an intermediary removes, plus
# Transfer-Encoding, which a hop may reframe (RFC 9112 §6.1).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade",
})

Headers = Sequence[tuple[str, str]]


def end_to_end(headers: Headers, *, also: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``headers`` less hop-by-hop ones, those named in Connection, and ``also``.

    Names are lower-cased (they are case-insensitive, RFC 9110 §5.1); values
    and order are kept.
    """
    named = {token.strip().lower() for n, v in headers if n.lower() == "connection"
             for token in v.split(",")}
    drop = HOP_BY_HOP | named | {a.lower() for a in also}
    return [(n.lower(), v) for n, v in headers if n.lower() not in drop]


def values(headers: Headers, name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name.lower()]


def nonzero(counts: Mapping[str, float]) -> dict[str, float]:
    """``counts`` without the zero entries (/metrics lists every outcome and reason)."""
    return {k: v for k, v in counts.items() if v}


# --------------------------------------------------------------------------- config


Target = HttpServer | int  # a test server, or a port where nothing listens


def _port(target: Target) -> int:
    return target.port if isinstance(target, HttpServer) else target


@dataclass
class MirrorTo:
    """A ``[[listener.mirror]]`` (or ``[[listener.route.mirror]]``) table.

    :param name: the mirror's name, also the name of its upstream.
    :param options: the table's other keys (percent, set_headers, timeout...).
    """

    target: Target
    name: str = "shadow"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Route:
    """A ``[[listener.route]]`` table: ``match`` holds prefix, methods and host."""

    primary: Target
    match: Mapping[str, Any]
    mirrors: Sequence[MirrorTo] = ()


def http_config(
    ports: GatewayPorts,
    primary: Target,
    mirrors: Sequence[MirrorTo] = (),
    routes: Sequence[Route] = (),
    *,
    general: Mapping[str, Any] | None = None,
    listener: Mapping[str, Any] | None = None,
) -> str:
    """A config with one HTTP listener ``web`` in front of upstream ``primary``."""
    upstreams: list[tuple[str, int]] = [("primary", _port(primary))]
    upstreams += [(m.name, _port(m.target)) for m in mirrors]
    for i, route in enumerate(routes):
        upstreams.append((f"route{i}-primary", _port(route.primary)))
        upstreams += [(m.name, _port(m.target)) for m in route.mirrors]
    lines = ["[general]"]
    general = {"shutdown_timeout": "5s", **(general or {})}
    lines += [f"{k} = {toml_value(v)}" for k, v in general.items()]
    lines += ["", "[admin]", f'listen = "127.0.0.1:{ports.admin}"', ""]
    for name, port in upstreams:
        lines += ["[[upstream]]", f"name = {toml_value(name)}", f'url = "http://127.0.0.1:{port}"',
                  'connect_timeout = "2s"', ""]
    lines += ["[[listener]]", f"name = {toml_value(LISTENER)}", 'protocol = "http"',
              f'listen = "127.0.0.1:{ports.listen}"', 'primary = "primary"']
    lines += [f"{k} = {toml_value(v)}" for k, v in (listener or {}).items()]
    lines.append("")

    def mirror_table(header: str, m: MirrorTo) -> list[str]:
        out = [header, f"upstream = {toml_value(m.name)}"]
        return out + [f"{k} = {toml_value(v)}" for k, v in m.options.items()] + [""]

    for m in mirrors:
        lines += mirror_table("[[listener.mirror]]", m)
    for i, route in enumerate(routes):
        lines += ["[[listener.route]]", f'primary = "route{i}-primary"']
        lines += [f"{k} = {toml_value(v)}" for k, v in route.match.items()] + [""]
        for m in route.mirrors:
            lines += mirror_table("[[listener.route.mirror]]", m)
    return "\n".join(lines)


# --------------------------------------------------------------------------- clients


class ConnectionClosed(AssertionError):
    """The peer closed the connection before a whole response arrived."""

    def __init__(self, data: bytes) -> None:
        super().__init__(f"connection closed inside a response; got {data[:300]!r}")
        self.data = data


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        found = values(self.headers, name)
        return ", ".join(found) if found else None


def parse_response(buf: bytes, *, head_request: bool = False
                   ) -> tuple[RawResponse, int] | None:
    """The first response in ``buf`` and the bytes it took, or None if incomplete.

    A response delimited by the connection closing is never complete here:
    callers that expect one read to the close themselves.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise AssertionError(f"not an HTTP/1.x response: {buf[:200]!r}")
    status = int(code)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    pos = end + 4
    if head_request or status < 200 or status in (204, 304):
        return RawResponse(status, reason, headers, b""), pos
    codings = [c.strip().lower() for v in values(headers, "transfer-encoding")
               for c in v.split(",")]
    if codings and codings[-1] == "chunked":
        body = b""
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(buf[pos:eol].split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                trailer_end = buf.find(b"\r\n", pos)
                while trailer_end > pos:  # skip trailer fields
                    pos = trailer_end + 2
                    trailer_end = buf.find(b"\r\n", pos)
                if trailer_end < 0:
                    return None
                return RawResponse(status, reason, headers, body), trailer_end + 2
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos : pos + size]
            pos += size + 2
    length = values(headers, "content-length")
    if not length:
        return None
    n = int(length[0])
    if len(buf) < pos + n:
        return None
    return RawResponse(status, reason, headers, buf[pos : pos + n]), pos + n


class RawClient:
    """A client socket to the gateway that writes given bytes and reads responses.

    Bytes read past one response stay for the next call, so pipelined
    responses are read one by one in order.
    """

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""

    def __repr__(self) -> str:
        return f"<RawClient {self.sock.getsockname()} buffered={len(self.buf)}>"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, *, head_request: bool = False, timeout: float | None = None
                 ) -> RawResponse:
        """Read the next response (interim 1xx ones included).

        :raises ConnectionClosed: if the connection closes first.
        :raises TimeoutError: if it is not whole within ``timeout``.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            parsed = parse_response(self.buf, head_request=head_request)
            if parsed is not None:
                response, used = parsed
                self.buf = self.buf[used:]
                return response
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole response within the timeout; have {self.buf[:300]!r}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                raise ConnectionClosed(self.buf)
            self.buf += data

    def read_to_close(self, timeout: float = 10.0) -> tuple[bytes, bool]:
        """Read until the peer closes or ``timeout`` passes.

        :returns: (bytes read, buffered ones first; whether the peer closed).
        """
        deadline = time.monotonic() + timeout
        data, self.buf = self.buf, b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return data, False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return data, False
            except ConnectionResetError:
                return data, True
            if not chunk:
                return data, True
            data += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request_bytes(method: str, target: str, headers: Headers = (), body: bytes = b"",
                  *, host: str = "example.test") -> bytes:
    """A request with ``Host`` first, ``headers`` as given, and Content-Length when
    there is a body and no framing header among ``headers``."""
    names = {n.lower() for n, _ in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host}")
    lines += [f"{n}: {v}" for n, v in headers]
    if body and not names & {"content-length", "transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------- gateways


@dataclass
class Relay:
    """A started gateway with one HTTP listener, and how to reach it."""

    gw: Any  # tests.support.gateway.GatewayProcess
    ports: GatewayPorts

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listen}"

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client to the listener; 10 s timeouts unless told."""
        kwargs.setdefault("timeout", 10.0)
        return httpx.Client(base_url=self.url, **kwargs)

    def raw(self, timeout: float = 10.0) -> RawClient:
        return RawClient(self.ports.listen, timeout)

    def counts(self, mirror: str) -> MirrorCounts:
        return counts(self.gw, mirror, LISTENER)

    def at_rest(self, mirror: str, timeout: float = 20.0) -> MirrorCounts:
        """Wait until ``mirror`` has nothing queued or in flight; check the accounting."""
        c = wait_at_rest(self.gw, mirror, LISTENER, timeout=timeout)
        assert_balanced(c)
        return c

    def sample(self, name: str, **labels: str) -> float:
        return float(self.gw.sample(name, listener=LISTENER, **labels))


@pytest.fixture
def servers() -> Iterator[Callable[..., HttpServer]]:
    """Factory: ``servers(behaviour=echo, **kwargs)`` -> a started HttpServer.

    Every server is stopped at teardown; one that received malformed HTTP
    (from the gateway, as a primary or a mirror) fails the test there.
    """
    started: list[HttpServer] = []

    def start(behaviour: Behaviour = echo, **kwargs: Any) -> HttpServer:
        server = HttpServer(behaviour, **kwargs)
        started.append(server)
        return server

    yield start
    errors = []
    for server in started:
        server.stop()
        errors += server.errors
    if errors:
        pytest.fail("a test server received malformed HTTP:\n" + "\n".join(errors))


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """Factory: ``relay(primary, mirrors=(), routes=(), general=..., listener=...)``.

    Starts the gateway on :func:`http_config` and waits for its listener and
    admin. Every gateway is stopped at teardown; a traceback in its log fails
    the test there.
    """
    launcher = Launcher(tmp_path)

    def start(primary: Target, mirrors: Sequence[MirrorTo] = (), routes: Sequence[Route] = (),
              *, general: Mapping[str, Any] | None = None,
              listener: Mapping[str, Any] | None = None) -> Relay:
        ports = GatewayPorts()
        text = http_config(ports, primary, mirrors, routes, general=general, listener=listener)
        return Relay(launcher(text, ports), ports)

    yield start
    launcher.stop_all()
    broken = launcher.tracebacks()
    if broken:
        pytest.fail("gateway logged a traceback:\n" + "\n".join(broken))
