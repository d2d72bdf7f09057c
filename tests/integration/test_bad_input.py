# Bad input from clients, over raw sockets, against a real gateway and real Postgres.
#
# Owns: the evidence for design.md §1.6 (a malformed startup packet, an
# oversized length, a stalled or vanished client, an encryption request,
# an unsupported protocol, garbage after login) and the wire traps of
# anchors.md: each bad session gets a protocol-correct ErrorResponse (or the
# one-byte `N`) and is closed, while another client through the same gateway
# is served and the process stays up.
from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.support.faults import (
    GSSENC_REQUEST,
    SSL_REQUEST,
    DelayProxy,
    GatewayPorts,
    Launcher,
    abort_socket,
    assert_balanced,
    connect,
    counts,
    error_fields,
    parse_frames,
    pg_config,
    raw_login,
    read_until_closed,
    simple_query,
    startup_packet,
    wait_at_rest,
)
from tests.support.pgcluster import DEFAULT_PASSWORD, PgCluster

pytestmark = pytest.mark.integration

MIRROR = "mirror0"


class Served:
    """A gateway shared by this module's tests: primary, one mirror, startup_timeout 1s."""

    def __init__(self, gw: object, ports: GatewayPorts) -> None:
        self.gw = gw
        self.ports = ports

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres:{DEFAULT_PASSWORD}@127.0.0.1:{self.ports.listen}/{dbname}"

    def assert_healthy(self) -> None:
        """The process is alive and another normal client session is served."""
        assert self.gw.returncode is None, self.gw.log_tail()  # type: ignore[attr-defined]
        with psycopg.connect(self.dsn(), connect_timeout=10) as conn:
            assert conn.execute("SELECT 'still served'").fetchone() == ("still served",)
        assert_balanced(counts(self.gw, MIRROR))


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, pg_primary: PgCluster, pg_mirror: PgCluster
) -> Iterator[Served]:
    launcher = Launcher(tmp_path_factory.mktemp("bad-input"))
    ports = GatewayPorts()
    config = pg_config(
        ports,
        ("127.0.0.1", pg_primary.port),
        [{"url": f"postgres://127.0.0.1:{pg_mirror.port}", "password": DEFAULT_PASSWORD}],
        general={"startup_timeout": "1s"},
    )
    try:
        yield Served(launcher(config, ports), ports)
    finally:
        launcher.stop_all()


def _only_error(data: bytes) -> dict[str, str]:
    """The fields of the single ErrorResponse that makes up ``data``."""
    frames = parse_frames(data)
    assert [k for k, _ in frames] == [b"E"], data[:200]
    assert sum(5 + len(b) for _, b in frames) == len(data), "bytes after the ErrorResponse"
    return error_fields(frames[0][1])


# --------------------------------------------------------------------------- startup


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n", id="http"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), id="tls-hello"),
        pytest.param(struct.pack("!ii", 16, 0x12345678) + b"abcdefgh", id="bad-code"),
        pytest.param(struct.pack("!i", 3) + b"\xff" * 12, id="short-length"),
        pytest.param(startup_packet({"user": "postgres"})[:-1] + b"x", id="no-terminator"),
    ],
)
def test_garbage_startup_packet_gets_an_error_then_close(served: Served, garbage: bytes) -> None:
    sock = connect(served.ports.listen)
    sock.sendall(garbage)
    data, closed = read_until_closed(sock)
    sock.close()
    fields = _only_error(data)
    assert closed
    assert fields["C"] in ("08P01", "0A000")
    assert "startup_timeout" not in fields["M"]  # refused for what it is, not for stalling
    served.assert_healthy()


def test_oversized_startup_length_is_refused_without_waiting_for_the_body(
    served: Served,
) -> None:
    sock = connect(served.ports.listen)
    sock.sendall(struct.pack("!ii", 0x7FFFFFFF, 196608))
    data, closed = read_until_closed(sock)
    sock.close()
    fields = _only_error(data)
    assert closed
    assert fields["C"] == "08P01"
    assert "length" in fields["M"] and "startup_timeout" not in fields["M"]
    served.assert_healthy()


def test_truncated_startup_then_close_never_reaches_the_primary(
    tmp_path: object, pg_primary: PgCluster
) -> None:
    launcher = Launcher(tmp_path)
    # A relay in front of the primary counts every connection the gateway opens to it.
    with DelayProxy("127.0.0.1", pg_primary.port) as counter:
        ports = GatewayPorts()
        try:
            gw = launcher(pg_config(ports, ("127.0.0.1", counter.port)), ports)
            tcp_backends = (
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND client_addr IS NOT NULL")
            before = int(pg_primary.query_value(tcp_backends))
            packet = startup_packet({"user": "postgres", "database": "postgres"})
            for cut in (2, 4, 9, len(packet) - 1):
                sock = connect(ports.listen)
                sock.sendall(packet[:cut])
                sock.close()
            time.sleep(0.3)  # let the gateway see the closes
            assert gw.returncode is None, gw.log_tail()
            assert counter.accepted == 0
            assert int(pg_primary.query_value(tcp_backends)) <= before
            with psycopg.connect(f"postgresql://postgres:{DEFAULT_PASSWORD}@127.0.0.1:"
                                 f"{ports.listen}/postgres") as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            assert counter.accepted == 1
            assert "Traceback" not in gw.log()
        finally:
            launcher.stop_all()


def test_stalled_startup_is_closed_with_an_error_after_startup_timeout(served: Served) -> None:
    sock = connect(served.ports.listen)
    sock.sendall(b"\x00\x00")
    data, closed = read_until_closed(sock, timeout=20)
    sock.close()
    assert closed
    fields = _only_error(data)
    assert fields["C"] == "08P01"
    assert "startup_timeout" in fields["M"]
    served.assert_healthy()


@pytest.mark.parametrize(
    "extra",
    [pytest.param({}, id="normal"), pytest.param({"replication": "database"}, id="replication")],
)
def test_client_stalled_in_authentication_is_closed_after_startup_timeout(
    served: Served, extra: dict[str, str]
) -> None:
    # A replication connection is relayed unmirrored once ready, but its
    # authentication is bounded by startup_timeout like any other.
    sock = connect(served.ports.listen)
    sock.sendall(startup_packet({"user": "postgres", "database": "postgres", **extra}))
    data, closed = read_until_closed(sock, timeout=20)  # never answers the SCRAM challenge
    sock.close()
    assert closed
    frames = parse_frames(data)
    assert [k for k, _ in frames] == [b"R", b"E"], frames
    fields = error_fields(frames[1][1])
    assert fields["C"] == "08P01" and "startup_timeout" in fields["M"]
    served.assert_healthy()


def test_ssl_request_gets_one_N_then_a_normal_startup_works(served: Served) -> None:
    sock = connect(served.ports.listen)
    sock.sendall(SSL_REQUEST)
    assert sock.recv(1) == b"N"
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(1)  # nothing after the N
    sock.setblocking(True)
    sock.settimeout(10)
    raw_login(served.ports.listen, "postgres", DEFAULT_PASSWORD, "postgres", sock=sock)
    frames = simple_query(sock, "SELECT 40 + 2")
    assert (b"D", struct.pack("!hi", 1, 2) + b"42") in frames
    sock.close()
    served.assert_healthy()


def test_newer_protocol_minor_gets_the_primarys_negotiate_protocol_version(
    served: Served,
) -> None:
    # A 3.2 startup with an option the server does not know: the primary (15)
    # answers NegotiateProtocolVersion ('v'), which the gateway relays as it is,
    # and the session goes on in 3.0.
    seen: list[bytes] = []
    sock = raw_login(served.ports.listen, "postgres", DEFAULT_PASSWORD, "postgres",
                     version=(3 << 16) | 2, params={"_pq_.mirrorgate_test": "1"}, seen=seen)
    assert seen[0] == b"v", seen
    frames = simple_query(sock, "SELECT 40 + 2")
    assert (b"D", struct.pack("!hi", 1, 2) + b"42") in frames
    sock.close()
    served.assert_healthy()


def test_ssl_request_with_bytes_after_it_in_one_write_is_refused(served: Served) -> None:
    # CVE-2021-23214: bytes sent before the answer to SSLRequest must not be
    # taken as part of the (would-be encrypted) session.
    sock = connect(served.ports.listen)
    sock.sendall(SSL_REQUEST + startup_packet({"user": "postgres", "database": "postgres"}))
    data, closed = read_until_closed(sock)
    sock.close()
    assert not data.startswith(b"N")
    fields = _only_error(data)
    assert closed and fields["C"] == "08P01"
    served.assert_healthy()


def test_gssenc_request_gets_N(served: Served) -> None:
    sock = connect(served.ports.listen)
    sock.sendall(GSSENC_REQUEST)
    assert sock.recv(1) == b"N"
    raw_login(served.ports.listen, "postgres", DEFAULT_PASSWORD, "postgres", sock=sock)
    sock.close()
    served.assert_healthy()


def test_protocol_2_is_refused_with_0A000(served: Served) -> None:
    sock = connect(served.ports.listen)
    sock.sendall(startup_packet({"user": "postgres", "database": "postgres"}, version=2 << 16))
    data, closed = read_until_closed(sock)
    sock.close()
    fields = _only_error(data)
    assert closed and fields["C"] == "0A000"
    served.assert_healthy()


# --------------------------------------------------------------------------- after login


def _wait_value(cluster: PgCluster, sql: str, want: str, dbname: str = "postgres",
                timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got = cluster.query_value(sql, dbname)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_disconnect_mid_transaction_rolls_back_primary_and_mirror(
    served: Served, pg_primary: PgCluster, pg_mirror: PgCluster, fresh_db: str
) -> None:
    for cluster in (pg_primary, pg_mirror):
        cluster.execute("CREATE TABLE t (x int)", fresh_db)
    sock = raw_login(served.ports.listen, "postgres", DEFAULT_PASSWORD, fresh_db)
    assert simple_query(sock, "BEGIN")[-1] == (b"Z", b"T")
    assert simple_query(sock, "INSERT INTO t VALUES (1), (2)")[-1] == (b"Z", b"T")
    # The mirror has the insert inside its open transaction before the client dies.
    wait_at_rest(served.gw, MIRROR)
    abort_socket(sock)

    in_tx = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
             "AND state LIKE 'idle in transaction%'")
    assert _wait_value(pg_primary, in_tx, "0", fresh_db) == "0"
    assert pg_primary.query_value("SELECT count(*) FROM t", fresh_db) == "0"
    c = wait_at_rest(served.gw, MIRROR, clients=0)
    assert_balanced(c)
    assert _wait_value(pg_mirror, in_tx, "0", fresh_db, timeout=5) == "0"
    assert pg_mirror.query_value("SELECT count(*) FROM t", fresh_db) == "0"
    served.assert_healthy()


def test_garbage_after_login_ends_that_session_only(served: Served) -> None:
    other = psycopg.connect(served.dsn(), autocommit=True)
    try:
        sock = raw_login(served.ports.listen, "postgres", DEFAULT_PASSWORD, "postgres")
        assert simple_query(sock, "SELECT 1")[-1] == (b"Z", b"I")
        # A type byte no frontend message has, then noise.
        sock.sendall(b"\x01" + os.urandom(200))
        data, closed = read_until_closed(sock)
        sock.close()
        assert closed
        errors = [error_fields(b) for k, b in parse_frames(data) if k == b"E"]
        assert errors, data[:200]
        assert errors[0]["C"] == "08P01"  # the primary's own verdict, relayed
        assert other.execute("SELECT 'other'").fetchone() == ("other",)
    finally:
        other.close()
    c = wait_at_rest(served.gw, MIRROR, clients=0)
    assert_balanced(c)
    served.assert_healthy()


def test_bad_client_frame_length_after_login_is_judged_by_the_primary(
    served: Served, pg_primary: PgCluster
) -> None:
    # A Query whose length word is below the minimum of 4. Postgres logs
    # "invalid message length" as a COMMERROR (not sent) and closes: through
    # the gateway the client must see exactly what it sees from the primary.
    bad = b"Q" + struct.pack("!i", 2) + b"\0\0\0\0"
    seen = []
    for port in (pg_primary.port, served.ports.listen):
        sock = raw_login(port, "postgres", DEFAULT_PASSWORD, "postgres")
        sock.sendall(bad)
        data, closed = read_until_closed(sock)
        sock.close()
        assert closed
        seen.append(data)
    assert seen[1] == seen[0]
    c = wait_at_rest(served.gw, MIRROR, clients=0)
    assert_balanced(c)
    served.assert_healthy()


def test_many_bad_clients_at_once_leave_the_gateway_serving(served: Served) -> None:
    socks: list[socket.socket] = []
    for i in range(50):
        s = connect(served.ports.listen)
        s.sendall([b"\x00\x00", SSL_REQUEST + b"x", struct.pack("!i", 0x7FFFFFFF)][i % 3])
        socks.append(s)
    served.assert_healthy()
    for s in socks:
        s.close()
    served.assert_healthy()
