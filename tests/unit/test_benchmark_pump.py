"""The bare pump of the benchmarks still does what their figures claim.

``benchmarks/pump.py`` is the ceiling both benchmarks hold the gateway
against (docs/performance.md): with ``--tee``, every client byte reaches the
primary and the mirror, only the primary's answers reach the client, and
closing the client closes both. Two small TCP servers on loopback stand on
either side of it.
"""

from __future__ import annotations

import signal
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.common import start_pump


class _Server(socketserver.ThreadingTCPServer):
    """Keeps every byte it is sent; answers each chunk with ``reply``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.received = bytearray()
        self.closed = threading.Event()  # a client connection ended
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.server.received += data
                reply = self.server.reply
                self.request.sendall(data if reply is None else reply)
        except OSError:
            pass  # the pump closed first, while an answer was on its way
        finally:
            self.server.closed.set()


@pytest.fixture
def servers() -> Iterator[tuple[_Server, _Server]]:
    primary, mirror = _Server(None), _Server(b"mirror says no")  # primary echoes
    for s in (primary, mirror):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield primary, mirror
    for s in (primary, mirror):
        s.shutdown()
        s.server_close()


def test_teeing_pump_copies_client_bytes_to_both_and_answers_from_the_primary(
    servers: tuple[_Server, _Server], tmp_path: Path,
) -> None:
    primary, mirror = servers
    log = tmp_path / "pump.log"
    port, proc, error = start_pump(log, primary.server_address[1], mirror.server_address[1])
    try:
        assert error is None, error
        sent = b"".join(b"request %d;" % i for i in range(200))
        got = bytearray()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            for i in range(0, len(sent), 100):
                client.sendall(sent[i:i + 100])
            while len(got) < len(sent):
                chunk = client.recv(65536)
                assert chunk, "the pump closed before answering"
                got += chunk
        # Only the primary's answers reach the client; the mirror's are dropped.
        assert bytes(got) == sent
        assert primary.closed.wait(10) and mirror.closed.wait(10)
        assert bytes(primary.received) == sent
        assert bytes(mirror.received) == sent
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    out = log.read_text()
    assert proc.returncode == 0, out
    assert "mirror connections cut off for falling behind: 0" in out
