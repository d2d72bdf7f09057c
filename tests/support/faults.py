# Fault injection for integration tests: misbehaving servers, a delaying
# proxy, a raw Postgres wire client for bad input, and metric helpers.
#
# Owns: HungServer (accepts TCP connections and never answers), DelayProxy (a
# TCP relay that holds each chunk for a while, counts connections, and can be
# pointed at a new target), the raw wire helpers (startup packets, frame
# parsing, a SCRAM/MD5/cleartext login on a plain socket), a config builder
# for a Postgres listener, and readers of the gateway's mirror accounting
# (design.md §1.4, §7).
# Knows nothing of the gateway's internals: only sockets, the wire protocol,
# the config format and /metrics.
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scramp import ScramClient

from tests.support.net import free_port

# --------------------------------------------------------------------------- servers


class HungServer:
    """A TCP listener that accepts every connection, reads it, and never answers.

    :param reply: bytes sent once on every accepted connection before it goes
        silent (garbage for a server that speaks out of protocol).
    """

    def __init__(self, host: str = "127.0.0.1", reply: bytes = b"") -> None:
        self.host = host
        self.reply = reply
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(128)
        self.port = int(self._sock.getsockname()[1])
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hung-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in sel.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._sock:
                    try:
                        conn, _ = sock.accept()
                    except OSError:
                        continue
                    self.accepted += 1
                    self._conns.append(conn)
                    if self.reply:
                        with contextlib.suppress(OSError):
                            conn.sendall(self.reply)
                    sel.register(conn, selectors.EVENT_READ)
                else:
                    try:
                        data = sock.recv(65536)  # read and discard: never answer
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(sock)
                        sock.close()
        sel.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> HungServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DelayProxy:
    """A TCP relay to ``target`` that holds every chunk for a delay before passing it on.

    ``delay_down`` applies to what the target answers, ``delay_up`` to what the
    client sends. Each direction keeps its order; a chunk is held ``delay``
    seconds from when it was read (a latency, not a throughput limit). Runs an
    asyncio loop in a thread of its own. ``retarget`` points new connections
    elsewhere (a restarted server on a new port).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay_down: float = 0.0,
        delay_up: float = 0.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.target = (target_host, target_port)
        self.delay_down = delay_down
        self.delay_up = delay_up
        self.host = host
        self.port = 0
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="delay-proxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("DelayProxy did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, self.host, 0)
            self.port = int(self._server.sockets[0].getsockname()[1])

        self._loop.run_until_complete(start())
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer, lambda: self.delay_up),
            self._pipe(up_reader, writer, lambda: self.delay_down),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: Callable[[], float],
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
            # The reader reached EOF: half-close, then the other side closes.
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                chunk = await reader.read(65536)
                queue.put_nowait((loop.time() + delay(), chunk))
                if not chunk:
                    break
            await sender
        except (OSError, asyncio.IncompleteReadError):
            sender.cancel()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    def retarget(self, host: str, port: int) -> None:
        """New connections go to ``host:port``; open ones are left as they are."""
        self.target = (host, port)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- wire

PROTOCOL_3_0 = 196608
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)


def startup_packet(params: Mapping[str, str], version: int = PROTOCOL_3_0) -> bytes:
    """A StartupMessage: length, protocol version, name/value pairs, terminator."""
    body = struct.pack("!i", version)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def frame(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def query(sql: str) -> bytes:
    return frame(b"Q", sql.encode() + b"\0")


def parse_frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split backend bytes into (type, body) frames; a trailing partial frame is ignored."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while len(data) - pos >= 5:
        (length,) = struct.unpack_from("!i", data, pos + 1)
        if length < 4 or len(data) - pos - 1 < length:
            break
        out.append((data[pos : pos + 1], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def error_fields(body: bytes) -> dict[str, str]:
    """An ErrorResponse/NoticeResponse body as {field code: value} (``C`` is SQLSTATE)."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Read until the peer closes or ``timeout`` passes.

    :returns: (bytes read, whether the peer closed the connection).
    """
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return buf, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return buf, False
        except ConnectionResetError:
            return buf, True
        if not chunk:
            return buf, True
        buf += chunk


def read_frames_until(
    sock: socket.socket, stop: Iterable[bytes] = (b"Z",), timeout: float = 10.0
) -> list[tuple[bytes, bytes]]:
    """Read whole frames until one whose type is in ``stop`` (included) or EOF."""
    stop = set(stop)
    deadline = time.monotonic() + timeout
    buf = _leftover.pop(sock, b"")
    frames: list[tuple[bytes, bytes]] = []
    while True:
        for f in parse_frames(buf):
            buf = buf[5 + len(f[1]):]
            frames.append(f)
            if f[0] in stop:
                if buf:
                    _leftover[sock] = buf  # the next call starts with these
                return frames
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no frame of {stop} within {timeout}s; got {frames!r}")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return frames
        buf += chunk


# Bytes read past the last frame a caller asked for, per socket.
_leftover: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def raw_login(
    port: int,
    user: str,
    password: str,
    database: str,
    *,
    host: str = "127.0.0.1",
    sock: socket.socket | None = None,
    params: Mapping[str, str] | None = None,
    version: int = PROTOCOL_3_0,
    seen: list[bytes] | None = None,
) -> socket.socket:
    """Log in over a plain socket (SCRAM-SHA-256, MD5 or cleartext) up to ReadyForQuery.

    :param seen: if given, receives the type byte of every frame read.
    :raises AssertionError: if the server answers with an ErrorResponse.
    """
    sock = sock or connect(port, host)
    sock.sendall(startup_packet({"user": user, "database": database, **(params or {})},
                                version=version))
    scram: ScramClient | None = None
    while True:
        frames = read_frames_until(sock, stop=(b"R", b"Z", b"E"))
        if seen is not None:
            seen.extend(k for k, _ in frames)
        kind, body = frames[-1]
        if kind == b"E":
            raise AssertionError(f"login refused: {error_fields(body)}")
        if kind == b"Z":
            return sock
        (code,) = struct.unpack_from("!i", body)
        if code == 0:
            continue  # AuthenticationOk; ParameterStatus, BackendKeyData, Z follow
        if code == 3:
            sock.sendall(frame(b"p", password.encode() + b"\0"))
        elif code == 5:
            salt = body[4:8]
            inner = hashlib.md5((password + user).encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + salt).hexdigest()
            sock.sendall(frame(b"p", b"md5" + outer.encode() + b"\0"))
        elif code == 10:
            mechanisms = [m.decode() for m in body[4:].split(b"\0") if m]
            scram = ScramClient(mechanisms, user, password)
            first = scram.get_client_first().encode()
            mech = scram.mechanism_name.encode()
            sock.sendall(frame(b"p", mech + b"\0" + struct.pack("!i", len(first)) + first))
        elif code == 11:
            assert scram is not None
            scram.set_server_first(body[4:].decode())
            sock.sendall(frame(b"p", scram.get_client_final().encode()))
        elif code == 12:
            assert scram is not None
            scram.set_server_final(body[4:].decode())
        else:
            raise AssertionError(f"unsupported authentication request {code}")


def simple_query(sock: socket.socket, sql: str, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
    """Send a simple Query and read its answer up to ReadyForQuery."""
    sock.sendall(query(sql))
    return read_frames_until(sock, timeout=timeout)


def abort_socket(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), like a client that died."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --------------------------------------------------------------------------- config


def toml_value(value: Any) -> str:
    """``value`` written as TOML: booleans, numbers, strings, inline tables, arrays."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, Mapping):
        pairs = ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + pairs + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


@dataclass
class GatewayPorts:
    listen: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        # Two ports that were free a moment ago can be the same one: the
        # gateway then refuses its config (listener clashes with admin).
        while self.admin == self.listen:
            self.admin = free_port()


def pg_config(
    ports: GatewayPorts,
    primary: tuple[str, int],
    mirrors: list[dict[str, Any]] | None = None,
    *,
    general: Mapping[str, Any] | None = None,
    listener: Mapping[str, Any] | None = None,
) -> str:
    """A config with one Postgres listener ``db`` in front of ``primary``.

    Each mirror dict has ``url`` (the mirror upstream's URL), optionally
    ``name``, ``password`` and ``upstream`` keys (``pool_size``,
    ``connect_timeout``), and any ``[[listener.mirror]]`` keys.
    """
    lines = ["[general]"]
    for k, v in (general or {}).items():
        lines.append(f"{k} = {toml_value(v)}")
    lines += ["", "[admin]", f'listen = "127.0.0.1:{ports.admin}"', ""]
    lines += ["[[upstream]]", 'name = "prod"', f'url = "postgres://{primary[0]}:{primary[1]}"', ""]
    mirror_tables: list[list[str]] = []
    for i, m in enumerate(mirrors or []):
        m = dict(m)
        up_name = m.pop("upstream_name", f"mirror{i}")
        lines += ["[[upstream]]", f'name = "{up_name}"', f"url = {toml_value(m.pop('url'))}"]
        if "password" in m:
            lines.append(f"password = {toml_value(m.pop('password'))}")
        for k, v in m.pop("upstream", {}).items():
            lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
        table = ["[[listener.mirror]]", f'upstream = "{up_name}"']
        table += [f"{k} = {toml_value(v)}" for k, v in m.items()]
        mirror_tables.append(table + [""])
    lines += [
        "[[listener]]",
        'name = "db"',
        'protocol = "postgres"',
        f'listen = "127.0.0.1:{ports.listen}"',
        'primary = "prod"',
    ]
    for k, v in (listener or {}).items():
        lines.append(f"{k} = {toml_value(v)}")
    lines.append("")
    for table in mirror_tables:
        lines += table
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- accounting


@dataclass
class MirrorCounts:
    """One (listener, mirror)'s accounting, read from one /metrics scrape."""

    offered: float
    skipped: float
    delivered: dict[str, float]
    dropped: dict[str, float]
    queue_units: float
    queue_bytes: float
    in_flight: float

    @property
    def delivered_total(self) -> float:
        return sum(self.delivered.values())

    @property
    def dropped_total(self) -> float:
        return sum(self.dropped.values())

    def balanced(self) -> bool:
        return self.offered == (
            self.delivered_total + self.dropped_total + self.queue_units + self.in_flight
        )

    @property
    def at_rest(self) -> bool:
        return self.queue_units == 0 and self.in_flight == 0


def mirror_counts(
    metrics: Mapping[tuple[str, frozenset[tuple[str, str]]], float],
    mirror: str,
    listener: str = "db",
) -> MirrorCounts:
    def one(name: str) -> float:
        return metrics.get((name, frozenset({("listener", listener), ("mirror", mirror)})), 0.0)

    def by(name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for (n, labels), v in metrics.items():
            ls = dict(labels)
            if n == name and ls.get("listener") == listener and ls.get("mirror") == mirror:
                out[ls[label]] = v
        return out

    return MirrorCounts(
        offered=one("mirrorgate_mirror_offered_total"),
        skipped=one("mirrorgate_mirror_skipped_total"),
        delivered=by("mirrorgate_mirror_delivered_total", "outcome"),
        dropped=by("mirrorgate_mirror_dropped_total", "reason"),
        queue_units=one("mirrorgate_mirror_queue_units"),
        queue_bytes=one("mirrorgate_mirror_queue_bytes"),
        in_flight=one("mirrorgate_mirror_in_flight"),
    )


def counts(gw: Any, mirror: str, listener: str = "db") -> MirrorCounts:
    return mirror_counts(gw.metrics(), mirror, listener)


def wait_at_rest(
    gw: Any, mirror: str, listener: str = "db", timeout: float = 20.0, clients: int | None = None
) -> MirrorCounts:
    """Poll /metrics until the mirror has nothing queued or in flight (and, if
    ``clients`` is given, the listener has that many client connections).

    :raises AssertionError: with the last counts if that does not happen in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        metrics = gw.metrics()
        c = mirror_counts(metrics, mirror, listener)
        n = metrics.get(
            ("mirrorgate_client_connections", frozenset({("listener", listener)})), 0.0
        )
        if c.at_rest and (clients is None or n == clients):
            return c
        if time.monotonic() > deadline:
            raise AssertionError(f"mirror {mirror} not at rest after {timeout}s: {c} clients={n}")
        time.sleep(0.05)


def assert_balanced(c: MirrorCounts) -> None:
    assert c.balanced(), (
        f"offered {c.offered} != delivered {c.delivered} + dropped {c.dropped} "
        f"+ queued {c.queue_units} + in_flight {c.in_flight}"
    )


class GaugeWatcher:
    """Scrapes a gateway's /metrics in a thread and keeps the largest value of one sample."""

    def __init__(self, gw: Any, name: str, interval: float = 0.02, **labels: str) -> None:
        self.gw = gw
        self.key = (name, frozenset(labels.items()))
        self.interval = interval
        self.max = 0.0
        self.scrapes = 0
        self.unbalanced: list[MirrorCounts] = []
        self._mirror = labels.get("mirror")
        self._listener = labels.get("listener", "db")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gauge-watcher", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                metrics = self.gw.metrics()
            except Exception:  # noqa: BLE001 - the gateway may be stopping
                time.sleep(self.interval)
                continue
            self.scrapes += 1
            self.max = max(self.max, metrics.get(self.key, 0.0))
            if self._mirror is not None:
                c = mirror_counts(metrics, self._mirror, self._listener)
                if not c.balanced():
                    self.unbalanced.append(c)
            time.sleep(self.interval)

    def __enter__(self) -> GaugeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# --------------------------------------------------------------------------- gateways


class Launcher:
    """Starts gateways for one test and stops every one of them at the end."""

    def __init__(self, workdir: Any) -> None:
        from pathlib import Path

        self.workdir = Path(workdir)
        self.started: list[Any] = []

    def __call__(
        self, config: str, ports: GatewayPorts, *, env: Mapping[str, str] | None = None
    ) -> Any:
        from tests.support.gateway import GatewayProcess

        sub = self.workdir / f"gw{len(self.started)}"
        gw = GatewayProcess(config, workdir=sub, env=dict(env or {}))
        self.started.append(gw)
        gw.start()
        gw.wait_ready(ports.listen)
        gw.wait_ready(ports.admin)
        return gw

    def stop_all(self) -> None:
        import signal

        for gw in self.started:
            if gw.returncode is None and gw.proc is not None:
                try:
                    gw.stop(signal.SIGTERM, timeout=15)
                except Exception:  # noqa: BLE001 - killed by stop() already
                    pass
            else:
                gw._close_log()

    def tracebacks(self) -> list[str]:
        """The log tails of the gateways that logged a traceback."""
        return [f"{gw.log_path}:\n{gw.log_tail(60)}" for gw in self.started
                if "Traceback" in gw.log()]
