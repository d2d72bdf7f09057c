"""The Postgres admin console, sans-IO: commands, result sets, the SCRAM login
and the connection as scripts of client bytes in and server frames out.

The client side of each login is scramp's ScramClient, a real SCRAM
implementation; the gateway state the SHOW commands read is built from a real
configuration (ListenerContexts and their counters), with a small Control.
"""

from __future__ import annotations

import base64
import struct

import attrs
import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import DropReason, ReloadResult
from gateway.config import parse_config
from gateway_http import HttpProtocol
from gateway_http.relay import HttpSession
from gateway_postgres import PostgresProtocol, codec
from gateway_postgres.console import ConsoleConnection, ConsoleState
from gateway_postgres.console_commands import (
    Column,
    ColumnType,
    Command,
    ResultSet,
    UnknownCommand,
    answer,
    parse_commands,
)
from gateway_postgres.console_login import LoginFailed, ScramLogin
from gateway_postgres.relay import PgSession
from tests.support.control import StubControl

USERS = {"ops": "console-Pa55"}
CONFIG = """
[admin]
listen = false

[[admin.user]]
name = "ops"
password = "console-Pa55"

[[upstream]]
name = "prod"
url = "postgres://127.0.0.1:5999"

[[upstream]]
name = "staging"
url = "postgres://10.0.0.9:6000/stage"
password = "mirror-pw"

[[listener]]
name = "db"
protocol = "postgres"
listen = "127.0.0.1:6999"
primary = "prod"

[[listener.mirror]]
upstream = "staging"
timeout = "2s"
"""


# --- a small gateway to report on ----------------------------------------------------


@pytest.fixture
def gateway() -> StubControl:
    return StubControl(parse_config(CONFIG, {"postgres": PostgresProtocol}, env={}))


# --- helpers ---------------------------------------------------------------------------


def frames(data: bytes) -> list[tuple[str, bytes]]:
    reader = codec.FrameReader()
    reader.feed(data)
    out = []
    while (f := reader.next_frame()) is not None:
        out.append((chr(f[0]), f[1]))
    assert reader.buffered == 0, "a partial frame at the end"
    return out


def kinds(data: bytes) -> str:
    return "".join(k for k, _ in frames(data))


def error_of(data: bytes) -> dict[str, str]:
    for kind, body in frames(data):
        if kind == "E":
            return codec.error_fields(body)
    raise AssertionError(f"no ErrorResponse in {kinds(data)!r}")


def startup(user: str = "ops", **params: str) -> codec.StartupMessage:
    raw = codec.startup_message({"user": user, "database": "mirrorgate", **params})
    packet, _ = codec.parse_initial_packet(raw)
    assert isinstance(packet, codec.StartupMessage)
    return packet


def connection(gateway: StubControl | None, user: str = "ops",
               users: dict[str, str] | None = None, **params: str) -> ConsoleConnection:
    return ConsoleConnection(startup(user, **params), USERS if users is None else users,
                             gateway, (4242, b"\1\2\3\4"))  # type: ignore[arg-type]


def log_in(conn: ConsoleConnection, password: str) -> bytes:
    """Run scramp's client against the console; return the bytes after the proof."""
    out = frames(conn.start())
    assert out[-1][0] == "R" and out[-1][1] == struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0"
    client = scramp.ScramClient(["SCRAM-SHA-256"], "*", password)
    first = client.get_client_first().encode()
    answer_ = frames(conn.receive_data(codec.sasl_initial_response("SCRAM-SHA-256", first)))
    assert [k for k, _ in answer_] == ["R"]
    code, server_first = struct.unpack_from("!i", answer_[0][1])[0], answer_[0][1][4:]
    assert code == 11
    client.set_server_first(server_first.decode())
    rest = conn.receive_data(codec.sasl_response(client.get_client_final().encode()))
    if conn.state is ConsoleState.READY:
        final = frames(rest)[0][1]
        assert struct.unpack_from("!i", final)[0] == 12
        client.set_server_final(final[4:].decode())  # raises unless the server knew the password
    return rest


def ready(gateway: StubControl | None) -> ConsoleConnection:
    conn = connection(gateway)
    log_in(conn, USERS["ops"])
    assert conn.state is ConsoleState.READY
    return conn


def rows(data: bytes) -> tuple[list[str], list[list[str | None]]]:
    """Column names and rows of the one result set in ``data``."""
    names: list[str] = []
    out: list[list[str | None]] = []
    for kind, body in frames(data):
        if kind == "T":
            (count,) = struct.unpack_from("!h", body)
            pos = 2
            for _ in range(count):
                end = body.index(b"\0", pos)
                names.append(body[pos:end].decode())
                pos = end + 1 + 18
        elif kind == "D":
            (count,) = struct.unpack_from("!h", body)
            pos, row = 2, []
            for _ in range(count):
                (length,) = struct.unpack_from("!i", body, pos)
                pos += 4
                row.append(None if length < 0 else body[pos:pos + length].decode())
                pos += max(length, 0)
            out.append(row)
    return names, out


# --- commands ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["SHOW MIRRORS", "show mirrors", "Show  Mirrors;",
                                  "  show\n\tmirrors ; ", "SHOW MIRRORS;;"])
def test_commands_ignore_case_spacing_and_a_trailing_semicolon(text: str) -> None:
    assert parse_commands(text) == [Command.SHOW_MIRRORS]


def test_statements_run_in_order() -> None:
    assert parse_commands("show help; reload; SHOW CLIENTS") == [
        Command.SHOW_HELP, Command.RELOAD, Command.SHOW_CLIENTS]


@pytest.mark.parametrize("text", ["", "  ", ";", " ; ;"])
def test_an_empty_query_has_no_command(text: str) -> None:
    assert parse_commands(text) == []


@pytest.mark.parametrize("text", ["SHOW POOLS", "SELECT 1", "SHOW MIRRORS x", "RELOADS",
                                  "show help; select 1"])
def test_an_unknown_command_names_the_known_ones(text: str) -> None:
    with pytest.raises(UnknownCommand) as info:
        parse_commands(text)
    for command in Command:
        assert command.value in info.value.message


def test_an_unknown_command_is_quoted_shortened() -> None:
    with pytest.raises(UnknownCommand) as info:
        parse_commands("SELECT " + "x" * 200)
    assert 'unknown command "SELECT xxx' in info.value.message
    assert len(info.value.message) < 250


# --- result sets -------------------------------------------------------------------------


def test_result_set_is_row_description_data_rows_and_show() -> None:
    result = ResultSet(
        (Column("name"), Column("n", ColumnType.INT8), Column("lag", ColumnType.FLOAT8),
         Column("bound", ColumnType.BOOL), Column("since", ColumnType.TIMESTAMPTZ)),
        (("a", 1, 0.25, True, 0.0), ("b", None, 1.5, False, 1700000000.5)))
    out = frames(result.encode())
    assert [k for k, _ in out] == ["T", "D", "D", "C"]
    description = out[0][1]
    assert struct.unpack_from("!h", description)[0] == 5
    # name, then table OID, column, type OID, type size, typmod, format (text)
    assert description[2:7] == b"name\0"
    assert struct.unpack_from("!ihihih", description, 7) == (0, 0, 25, -1, -1, 0)
    pos = description.index(b"n\0", 7 + 18) + 2
    assert struct.unpack_from("!ihihih", description, pos) == (0, 0, 20, 8, -1, 0)
    assert out[-1] == ("C", b"SHOW\0")
    assert rows(result.encode())[1] == [
        ["a", "1", "0.250", "t", "1970-01-01 00:00:00.000000+00"],
        ["b", None, "1.500", "f", "2023-11-14 22:13:20.500000+00"],
    ]


def test_an_empty_result_set_still_describes_its_columns() -> None:
    assert kinds(ResultSet((Column("a"),), ()).encode()) == "TC"


# --- the SHOW commands read the gateway -------------------------------------------------


def test_show_mirrors_reports_the_counters(gateway: StubControl) -> None:
    stats = gateway.contexts[0].mirrors[0].stats
    stats.offer_queued(100)
    stats.offer_queued(50)
    stats.start()
    stats.delivered_as("ok", 0.01)
    stats.offer_dropped(DropReason.QUEUE_FULL)
    stats.skipped = 3
    names, table = rows(answer(Command.SHOW_MIRRORS, gateway).encode())  # type: ignore[arg-type]
    row = dict(zip(names, table[0], strict=True))
    assert row == {
        "listener": "db", "mirror": "staging", "upstream": "staging", "host": "10.0.0.9",
        "port": "6000", "offered": "3", "skipped": "3", "delivered": "1",
        "outcomes": "ok=1", "dropped": "1", "queue_full": "1", "too_large": "0",
        "mirror_unavailable": "0", "mirror_timeout": "0", "mirror_error": "0",
        "transaction_aborted": "0", "shutdown": "0", "queue_units": "1", "queue_bytes": "150",
        "in_flight": "0", "lag_seconds": "0.000", "health": "idle",
    }


def test_show_mirrors_lists_a_mirror_a_reload_removed_as_retired(gateway: StubControl) -> None:
    ctx = gateway.contexts[0]
    mirror = ctx.mirrors[0]
    mirror.stats.offer_dropped(DropReason.QUEUE_FULL)
    ctx.begin_reload(ctx.config, attrs.evolve(ctx.listener, mirrors=()))
    ctx.end_reload()
    names, table = rows(answer(Command.SHOW_MIRRORS, gateway).encode())  # type: ignore[arg-type]
    row = dict(zip(names, table[0], strict=True))
    assert (row["mirror"], row["offered"], row["health"]) == ("staging", "1", "retired")


def test_show_listeners(gateway: StubControl) -> None:
    gateway.contexts[0].stats.primary_units = 7
    names, table = rows(answer(Command.SHOW_LISTENERS, gateway).encode())  # type: ignore[arg-type]
    assert names == ["name", "protocol", "listen", "primary", "clients", "units", "mirrors",
                     "bound"]
    assert table == [["db", "postgres", "127.0.0.1:6999", "prod", "0", "7", "staging", "t"]]


class _Transport:
    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("10.1.2.3", 50123) if name == "peername" else default

    def close(self) -> None:
        pass


def test_show_clients_describes_each_session(gateway: StubControl) -> None:
    ctx = gateway.contexts[0]
    session = PgSession(PostgresProtocol(ctx))
    session.peer = "10.1.2.3:50123"
    session.opened = 1700000000.0
    session.startup = startup("app", database="shop", application_name="billing")
    ctx.session_opened(session)
    names, table = rows(answer(Command.SHOW_CLIENTS, gateway).encode())  # type: ignore[arg-type]
    assert dict(zip(names, table[0], strict=True)) == {
        "listener": "db", "peer": "10.1.2.3:50123", "user": "app", "database": "shop",
        "application_name": "billing", "state": "startup",
        "since": "2023-11-14 22:13:20.000000+00", "requests": None, "mirrors": "",
    }


HTTP_CONFIG = """
[[upstream]]
name = "api"
url = "http://127.0.0.1:5998"

[[listener]]
name = "web"
protocol = "http"
listen = "127.0.0.1:6998"
primary = "api"
"""


def test_show_clients_lists_http_connections_too() -> None:
    gateway = StubControl(parse_config(HTTP_CONFIG, {"http": HttpProtocol}, env={}))
    ctx = gateway.contexts[0]
    session = HttpSession(HttpProtocol(ctx))
    session.connection_made(_Transport())  # type: ignore[arg-type]
    session.requests = 3
    names, table = rows(answer(Command.SHOW_CLIENTS, gateway).encode())  # type: ignore[arg-type]
    row = dict(zip(names, table[0], strict=True))
    assert (row["listener"], row["peer"], row["requests"], row["state"]) == (
        "web", "10.1.2.3:50123", "3", "idle")
    assert row["user"] is None and row["mirrors"] == ""


def test_show_help_lists_every_command(gateway: StubControl) -> None:
    _, table = rows(answer(Command.SHOW_HELP, gateway).encode())  # type: ignore[arg-type]
    assert [r[0] for r in table] == [c.value for c in Command]


# --- SCRAM, the server side ---------------------------------------------------------------


def test_scram_login_proves_both_sides() -> None:
    login = ScramLogin("ops", "pw")
    client = scramp.ScramClient(["SCRAM-SHA-256"], "*", "pw")
    client.set_server_first(login.server_first(client.get_client_first()))
    client.set_server_final(login.server_final(client.get_client_final()))


def test_scram_accepts_libpq_empty_user_name() -> None:
    # libpq sends "n=," and the server uses the startup packet's user.
    login = ScramLogin("ops", "pw")
    server_first = login.server_first("n,,n=,r=clientnonce")
    assert server_first.startswith("r=clientnonce") and ",i=4096" in server_first


@pytest.mark.parametrize("password", [None, "other"])
def test_scram_refuses_wrong_password_and_unknown_user_alike(password: str | None) -> None:
    login = ScramLogin("ops", password)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "*", "pw")
    client.set_server_first(login.server_first(client.get_client_first()))
    with pytest.raises(LoginFailed) as info:
        login.server_final(client.get_client_final())
    assert (info.value.sqlstate, info.value.message) == (
        "28P01", 'password authentication failed for user "ops"')


def test_an_unknown_user_gets_the_same_salt_every_time() -> None:
    salts = {ScramLogin("ghost", None).server_first("n,,n=,r=abc").split(",")[1]
             for _ in range(2)}
    assert len(salts) == 1


@pytest.mark.parametrize("first", ["p=tls-server-end-point,,n=,r=abc", "n,,r=abc",
                                   "x,,n=,r=abc", "n,,n=,r=", "garbage"])
def test_scram_refuses_bad_client_first(first: str) -> None:
    with pytest.raises(LoginFailed):
        ScramLogin("ops", "pw").server_first(first)


def test_scram_refuses_a_changed_nonce_or_binding() -> None:
    login = ScramLogin("ops", "pw")
    client = scramp.ScramClient(["SCRAM-SHA-256"], "*", "pw")
    client.set_server_first(login.server_first(client.get_client_first()))
    final = client.get_client_final()
    forged = final.replace("c=" + base64.b64encode(b"n,,").decode(),
                           "c=" + base64.b64encode(b"y,,").decode())
    with pytest.raises(LoginFailed) as info:
        login.server_final(forged)
    assert info.value.sqlstate == "08P01"


# --- the connection ----------------------------------------------------------------------


def test_login_then_ready(gateway: StubControl) -> None:
    conn = connection(gateway, application_name="psql")
    rest = log_in(conn, USERS["ops"])
    out = frames(rest)
    assert [k for k, _ in out] == ["R", "R"] + ["S"] * 11 + ["K", "Z"]
    assert out[1][1] == b"\0\0\0\0"  # AuthenticationOk
    status = dict(body[:-1].decode().split("\0") for k, body in out if k == "S")
    assert status["server_version"].startswith("16.0 (mirrorgate")
    assert status["client_encoding"] == "UTF8"
    assert status["application_name"] == "psql"
    assert status["session_authorization"] == "ops"
    assert out[-2] == ("K", struct.pack("!i", 4242) + b"\1\2\3\4")
    assert out[-1] == ("Z", b"I")


@pytest.mark.parametrize("user,password", [("ops", "wrong"), ("nobody", USERS["ops"])])
def test_login_refused_with_28p01(gateway: StubControl, user: str, password: str) -> None:
    conn = connection(gateway, user=user)
    out = log_in(conn, password)
    assert conn.state is ConsoleState.CLOSED
    fields = error_of(out)
    assert fields["C"] == "28P01" and fields["S"] == "FATAL"
    assert fields["M"] == f'password authentication failed for user "{user}"'
    assert conn.refusal == fields["M"]


def test_console_off_without_admin_users(gateway: StubControl) -> None:
    conn = connection(gateway, users={})
    fields = error_of(conn.start())
    assert conn.state is ConsoleState.CLOSED
    assert fields["C"] == "28000" and "[[admin.user]]" in fields["M"]


def test_a_newer_minor_version_is_negotiated_down() -> None:
    raw = codec.startup_message({"user": "ops", "database": "mirrorgate",
                                 "_pq_.compression": "on"}, version=codec.PROTOCOL_3_2)
    packet, _ = codec.parse_initial_packet(raw)
    conn = ConsoleConnection(packet, USERS, None, (1, b"abcd"))  # type: ignore[arg-type]
    out = frames(conn.start())
    assert out[0] == ("v", struct.pack("!ii", 0, 1) + b"_pq_.compression\0")


def test_login_must_be_sasl(gateway: StubControl) -> None:
    conn = connection(gateway)
    conn.start()
    assert error_of(conn.receive_data(codec.query("SHOW HELP")))["C"] == "08P01"
    assert conn.state is ConsoleState.CLOSED


def test_login_refuses_another_mechanism(gateway: StubControl) -> None:
    conn = connection(gateway)
    conn.start()
    out = conn.receive_data(codec.sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=x,,n=,r=a"))
    assert error_of(out)["C"] == "28000"


def test_show_help_answers_rows_then_ready(gateway: StubControl) -> None:
    conn = ready(gateway)
    out = conn.receive_data(codec.query("show help;"))
    assert kinds(out) == "T" + "D" * len(Command) + "CZ"


def test_unknown_command_is_an_error_and_the_session_goes_on(gateway: StubControl) -> None:
    conn = ready(gateway)
    out = conn.receive_data(codec.query("SELECT 1"))
    assert kinds(out) == "EZ"
    fields = error_of(out)
    assert fields["C"] == "42601" and fields["S"] == "ERROR"
    assert "SHOW MIRRORS" in fields["M"]
    assert kinds(conn.receive_data(codec.query("SHOW LISTENERS"))) == "TDCZ"


def test_empty_query(gateway: StubControl) -> None:
    assert kinds(ready(gateway).receive_data(codec.query(""))) == "IZ"


def test_extended_protocol_is_refused_until_sync(gateway: StubControl) -> None:
    conn = ready(gateway)
    batch = (codec.parse(b"", b"SHOW HELP") + codec.frame(b"B", b"\0\0\0\0\0\0\0")
             + codec.frame(b"E", b"\0\0\0\0\0") + codec.sync())
    out = conn.receive_data(batch)
    assert kinds(out) == "EZ"
    assert error_of(out)["C"] == "0A000"
    assert kinds(conn.receive_data(codec.query("SHOW HELP"))).endswith("CZ")


def test_after_an_extended_message_everything_waits_for_sync(gateway: StubControl) -> None:
    conn = ready(gateway)
    out = conn.receive_data(codec.parse(b"", b"x") + codec.query("SHOW HELP") + codec.sync())
    assert kinds(out) == "EZ"


def test_a_function_call_is_refused_with_its_own_ready(gateway: StubControl) -> None:
    out = ready(gateway).receive_data(codec.frame(b"F", b"\0\0\0\1\0\0\0\0\0\0"))
    assert kinds(out) == "EZ" and error_of(out)["C"] == "0A000"


def test_terminate_closes(gateway: StubControl) -> None:
    conn = ready(gateway)
    assert conn.receive_data(codec.terminate()) == b""
    assert conn.state is ConsoleState.CLOSED
    assert conn.receive_data(codec.query("SHOW HELP")) == b""


def test_an_oversized_message_ends_the_session(gateway: StubControl) -> None:
    conn = ready(gateway)
    out = conn.receive_data(b"Q" + struct.pack("!i", 1 << 20))
    assert error_of(out)["S"] == "FATAL"
    assert conn.state is ConsoleState.CLOSED


def test_an_unknown_message_type_ends_the_session(gateway: StubControl) -> None:
    conn = ready(gateway)
    assert error_of(conn.receive_data(codec.frame(b"?", b"")))["C"] == "08P01"
    assert conn.state is ConsoleState.CLOSED


def test_reload_waits_for_the_driver_then_reports_changes(gateway: StubControl) -> None:
    conn = ready(gateway)
    out = conn.receive_data(codec.query("RELOAD; SHOW HELP") + codec.query("SHOW LISTENERS"))
    assert out == b"" and conn.state is ConsoleState.RELOADING
    out = conn.reload_done(ReloadResult(True, "reloaded", ("mirror staging: timeout 2s -> 3s",
                                                           "listener web: opened")))
    frames_ = frames(out)
    notices = [codec.error_fields(b)["M"] for k, b in frames_ if k == "N"]
    assert notices == ["mirror staging: timeout 2s -> 3s", "listener web: opened"]
    # RELOAD, then the SHOW HELP of the same query, then the next query.
    assert kinds(out) == "NNC" + "T" + "D" * len(Command) + "CZ" + "TDCZ"
    assert frames_[2] == ("C", b"RELOAD\0")


def test_a_refused_reload_is_an_error_and_skips_the_rest(gateway: StubControl) -> None:
    conn = ready(gateway)
    conn.receive_data(codec.query("RELOAD; SHOW HELP"))
    out = conn.reload_done(ReloadResult(False, "mirrorgate.toml:12: listener[0].primary: "
                                               "unknown upstream"))
    assert kinds(out) == "EZ"
    fields = error_of(out)
    assert fields["C"] == "F0000" and fields["M"].startswith("mirrorgate.toml:12:")
    assert conn.state is ConsoleState.READY


def test_without_a_gateway_show_is_an_error() -> None:
    conn = ready(None)
    assert error_of(conn.receive_data(codec.query("RELOAD")))["C"] == "55000"


QUERIES = (codec.query("SHOW HELP") + codec.query("bogus") + codec.query("show listeners;")
           + codec.parse(b"", b"x") + codec.sync() + codec.query(""))


@settings(deadline=None)  # each example logs in twice: PBKDF2 on a shared machine
@given(st.lists(st.integers(min_value=1, max_value=len(QUERIES) - 1), max_size=8))
def test_any_split_gives_the_same_answers(cuts: list[int]) -> None:
    gateway = StubControl(parse_config(CONFIG, {"postgres": PostgresProtocol}, env={}))
    whole = ready(gateway).receive_data(QUERIES)
    conn = ready(gateway)
    points = [0, *sorted(set(cuts)), len(QUERIES)]
    split = b"".join(conn.receive_data(QUERIES[a:b])
                     for a, b in zip(points, points[1:], strict=False))
    assert split == whole
    assert kinds(whole) == "T" + "D" * len(Command) + "CZ" + "EZ" + "TDCZ" + "EZ" + "IZ"


def test_byte_by_byte_gives_the_same_answers(gateway: StubControl) -> None:
    whole = ready(gateway).receive_data(QUERIES)
    conn = ready(gateway)
    assert b"".join(conn.receive_data(QUERIES[i:i + 1]) for i in range(len(QUERIES))) == whole


def test_repr_names_user_and_state(gateway: StubControl) -> None:
    assert repr(ready(gateway)) == "<ConsoleConnection user='ops' READY>"
    assert "ops" in repr(ScramLogin("ops", "pw")) and "pw" not in repr(ScramLogin("ops", "pw"))
