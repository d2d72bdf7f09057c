# A third-party plugin, installed with real pip and found through the entry point.
#
# Owns: the evidence for design.md §4 that the example of docs/plugins.md
# (examples/lines-plugin) installs as an ordinary package, that the gateway
# finds it through the `mirrorgate` entry-point group alone, and that the core
# accounts for the units it offers as for the built-in protocol's. The primary
# and the mirror are real TCP line servers started here; the gateway is the
# real process.
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import REPO_ROOT, GatewayProcess
from tests.support.net import free_port

pytestmark = pytest.mark.integration

EXAMPLE = REPO_ROOT / "examples" / "lines-plugin"
LISTENER = "lines"
MIRROR = "shadow"


class LineServer:
    """A TCP server in its own thread and event loop: answers each line upper-cased.

    Every line received is kept in ``lines``, in arrival order.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[bytes] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                self.lines.append(line)
                writer.write(line.upper())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def start(self) -> LineServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __repr__(self) -> str:
        return f"<LineServer {self.name} port={self.port} lines={len(self.lines)}>"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin installed with pip into a directory of its own."""
    work = tmp_path_factory.mktemp("lines-plugin")
    source = work / "src"  # build in a copy: setuptools writes build/ next to the source
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                    "__pycache__"))
    site = work / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
         "--no-build-isolation", "--disable-pip-version-check", "--target", str(site),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (
        "pip could not install the example plugin offline; --no-build-isolation needs "
        "setuptools>=70.1 (or setuptools with wheel) in this interpreter:\n"
        + result.stdout + result.stderr)
    assert (site / "mirrorgate_lines" / "__init__.py").is_file()
    return site


@pytest.fixture
def servers() -> Iterator[tuple[LineServer, LineServer]]:
    primary, mirror = LineServer("primary").start(), LineServer("mirror").start()
    yield primary, mirror
    primary.close()
    mirror.close()


def _env(site: Path | None) -> dict[str, str]:
    paths = [str(site)] if site is not None else []
    return {"PYTHONPATH": os.pathsep.join([*paths, str(REPO_ROOT)])}


def _config(port: int, admin: int, primary: int, mirror: int, protocol: str = "lines") -> str:
    return f"""\
[general]
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:{admin}"

[[upstream]]
name = "prod"
url = "tcp://127.0.0.1:{primary}"

[[upstream]]
name = "{MIRROR}"
url = "tcp://127.0.0.1:{mirror}"

[[listener]]
name = "{LISTENER}"
protocol = "{protocol}"
listen = "127.0.0.1:{port}"
primary = "prod"
max_line = 4096

[[listener.mirror]]
upstream = "{MIRROR}"
exposure = 1.0
queue = 100
"""


def _check(config: str, tmp_path: Path, site: Path | None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.toml"
    path.write_text(config)
    env = {**os.environ, **_env(site)}
    return subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(path)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60)


def _read_lines(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    sock.settimeout(timeout)
    buf = b""
    while buf.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.splitlines(keepends=True)


def _mirror_samples(gw: GatewayProcess) -> dict[str, float]:
    labels = {"listener": LISTENER, "mirror": MIRROR}
    return {
        "offered": gw.sample("mirrorgate_mirror_offered_total", **labels),
        "delivered_ok": gw.sample("mirrorgate_mirror_delivered_total", outcome="ok", **labels),
        "delivered": gw.sample_sum("mirrorgate_mirror_delivered_total", **labels),
        "dropped": gw.sample_sum("mirrorgate_mirror_dropped_total", **labels),
        "queued": gw.sample("mirrorgate_mirror_queue_units", **labels),
        "in_flight": gw.sample("mirrorgate_mirror_in_flight", **labels),
    }


def test_lines_plugin_mirrors_every_line_through_the_entry_point(
    plugin_site: Path, servers: tuple[LineServer, LineServer], tmp_path: Path
) -> None:
    primary, mirror = servers
    port, admin = free_port(), free_port()
    sent = [f"line {i} of the test\n".encode() for i in range(40)]
    config = _config(port, admin, primary.port, mirror.port)
    with GatewayProcess(config, workdir=tmp_path / "gw", env=_env(plugin_site)) as gw:
        gw.wait_ready(port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"".join(sent[:20]))  # many lines in one write
            for line in sent[20:]:  # and lines split across writes
                client.sendall(line[:3])
                client.sendall(line[3:])
            answers = _read_lines(client, len(sent))
        assert answers == [line.upper() for line in sent]

        deadline = time.monotonic() + 15
        state = _mirror_samples(gw)
        while state["delivered"] < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
            state = _mirror_samples(gw)
        assert mirror.lines == sent
        assert primary.lines == sent
        assert state == {"offered": len(sent), "delivered_ok": len(sent),
                         "delivered": len(sent), "dropped": 0, "queued": 0, "in_flight": 0}
        assert state["offered"] == (state["delivered"] + state["dropped"] + state["queued"]
                                    + state["in_flight"])
        assert gw.sample("mirrorgate_primary_units_total", listener=LISTENER) == len(sent)

        # A client that half-closes after its last line still gets every answer.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"last\nwords\n")
            client.shutdown(socket.SHUT_WR)
            assert _read_lines(client, 3) == [b"LAST\n", b"WORDS\n"]  # then EOF
        assert gw.stop() == 0
        assert mirror.lines == [*sent, b"last\n", b"words\n"]  # delivered before exit
    assert "Traceback" not in gw.log(), gw.log_tail()


def test_check_rejects_an_unknown_protocol_listing_the_known_ones(
    plugin_site: Path, tmp_path: Path
) -> None:
    config = _config(16001, 16002, 16003, 16004, protocol="linez")  # check binds nothing
    result = _check(config, tmp_path, plugin_site)
    assert result.returncode == 1
    message = next(line for line in result.stderr.splitlines() if "unknown protocol" in line)
    assert "listener[0].protocol: unknown protocol 'linez'" in message
    known = message.split("(known: ", 1)[1].rstrip(")").split(", ")
    assert "lines" in known and "postgres" in known


def test_lines_protocol_exists_only_where_the_plugin_is_installed(
    plugin_site: Path, tmp_path: Path
) -> None:
    config = _config(16001, 16002, 16003, 16004)
    with_plugin = _check(config, tmp_path, plugin_site)
    assert with_plugin.returncode == 0, with_plugin.stderr
    assert "ok (1 listener, 2 upstreams)" in with_plugin.stdout
    without = _check(config, tmp_path, None)
    assert without.returncode == 1
    assert "unknown protocol 'lines'" in without.stderr
