# The Postgres admin console: a client that asks for the admin database
# (`[admin] database`, "mirrorgate" by default) on any Postgres listener talks
# to the gateway itself, as pgbouncer's and PgDog's admin databases do, and
# gets SHOW MIRRORS, SHOW LISTENERS, SHOW CLIENTS, SHOW HELP and RELOAD
# answered as result sets.
#
# Owns: the console's side of the protocol, sans-IO in the style of h11
# (ConsoleConnection takes bytes and returns the bytes to answer with; its
# state tells the driver when to run a reload or close): the login messages
# around SCRAM (console_login.py checks the proof), the session start
# (ParameterStatus, BackendKeyData), the simple query protocol, and refusing
# the extended one; and ConsoleSession, the asyncio Protocol that drives a
# ConsoleConnection on the connection the relay hands over after the startup
# packet. The commands and result sets are console_commands.py's.
# Must not know: the primary (a console session never opens an upstream
# connection), how a unit reaches a mirror, or how a reload is done
# (Control.reload does it; the console only asks and reports).
#
# Quotes are from the PostgreSQL documentation, "Frontend/Backend Protocol".
from __future__ import annotations

import asyncio
import enum
import logging
import os
import secrets
import struct
from collections.abc import Mapping

from gateway import Control, ListenerContext, ReloadResult, __version__

from . import codec
from .console_commands import Command, UnknownCommand, answer, command_complete, parse_commands
from .console_login import SCRAM_SHA_256, LoginFailed, ScramLogin

__all__ = ["ConsoleConnection", "ConsoleSession", "ConsoleState", "admin_database"]

log = logging.getLogger("mirrorgate.postgres.console")

# The largest message a console client may send: a command or a SCRAM message.
MAX_MESSAGE = 64 * 1024
# Reported as server_version: a Postgres version number first, so that libpq's
# PQserverVersion and psql's version checks read it.
SERVER_VERSION = f"16.0 (mirrorgate {__version__})"

_INT32 = struct.Struct("!i")

# Authentication request codes (AuthenticationSASL and what follows it).
_AUTH_OK, _AUTH_SASL, _AUTH_SASL_CONTINUE, _AUTH_SASL_FINAL = 0, 10, 11, 12


# --- the connection, sans-IO --------------------------------------------------------


class ConsoleState(enum.Enum):
    LOGIN = enum.auto()        # AuthenticationSASL sent: waiting for SASLInitialResponse
    LOGIN_FINAL = enum.auto()  # AuthenticationSASLContinue sent: waiting for SASLResponse
    READY = enum.auto()        # answering simple Queries
    RELOADING = enum.auto()    # RELOAD asked: the driver runs it, then calls reload_done
    CLOSED = enum.auto()       # the driver writes what it was given and closes


def admin_database(ctx: ListenerContext) -> str:
    """The database name that opens the console (the config serving now)."""
    config = ctx.control.config if ctx.control is not None else ctx.config
    return config.admin.database


def _auth(code: int, data: bytes = b"") -> bytes:
    return codec.frame(b"R", _INT32.pack(code) + data)


# Extended query protocol messages: refused until the next Sync.
_EXTENDED = frozenset(b"PBDECH")
_FUNCTION_CALL = ord("F")  # answered, like a Query, with its own ReadyForQuery
_IGNORED = frozenset(b"dcf")  # CopyData/CopyDone/CopyFail outside COPY: ignored, as Postgres


class ConsoleConnection:
    """The console's side of one client connection, from just after the startup packet.

    ``start`` gives the first bytes to send; ``receive_data`` takes client
    bytes and gives the answer. In state RELOADING the driver runs the reload
    and hands its result to ``reload_done``; in state CLOSED it writes what it
    got and closes the connection.

    :param startup: the client's startup packet.
    :param users: ``[[admin.user]]`` names and passwords; empty: the console is off.
    :param control: the running gateway, read by SHOW commands and asked to
        RELOAD (None: every command is answered with an error).
    :param backend_key: the (process ID, secret key) to send in BackendKeyData.
    """

    def __init__(self, startup: codec.StartupMessage, users: Mapping[str, str],
                 control: Control | None, backend_key: tuple[int, bytes]) -> None:
        self.startup = startup
        self.user = startup.user
        self.state = ConsoleState.LOGIN
        self.refusal: str | None = None  # why the login was refused, for the log
        self._users = users
        self._control = control
        self._key = backend_key
        self._reader = codec.FrameReader(MAX_MESSAGE)
        self._login: ScramLogin | None = None
        self._skipping = False           # an extended message was refused: until Sync
        self._queued: list[Command] = []  # commands after a RELOAD, run once it is done

    def __repr__(self) -> str:
        return f"<ConsoleConnection user={self.user!r} {self.state.name}>"

    def start(self) -> bytes:
        """The bytes to send right after the startup packet."""
        if not self._users:
            return self._fatal("28000", "the mirrorgate admin console is off: "
                                        "configure [[admin.user]] to turn it on")
        out = [self._negotiate()]
        self._login = ScramLogin(self.user, self._users.get(self.user))
        # AuthenticationSASL: "a list of SASL authentication mechanisms, in the
        # server's order of preference. A zero byte is required as terminator
        # after the last authentication mechanism name."
        out.append(_auth(_AUTH_SASL, codec._string(SCRAM_SHA_256) + b"\0"))
        return b"".join(out)

    def _negotiate(self) -> bytes:
        # NegotiateProtocolVersion: sent when the client asks for a newer minor
        # version or for protocol options ("_pq_.") the server does not know.
        unknown = sorted(k for k in self.startup.params if k.startswith("_pq_."))
        if self.startup.version == codec.PROTOCOL_3_0 and not unknown:
            return b""
        body = _INT32.pack(0) + _INT32.pack(len(unknown)) + b"".join(
            codec._string(k) for k in unknown)
        return codec.frame(b"v", body)

    def receive_data(self, data: bytes) -> bytes:
        """Take client bytes; return what to send back."""
        if self.state is ConsoleState.CLOSED:
            return b""
        self._reader.feed(data)
        return self._run()

    def _run(self) -> bytes:
        out: list[bytes] = []
        try:
            while self.state in (ConsoleState.LOGIN, ConsoleState.LOGIN_FINAL,
                                 ConsoleState.READY):
                item = self._reader.next_frame()
                if item is None:
                    break
                kind, body = item
                if self.state is ConsoleState.READY:
                    self._message(kind, body, out)
                else:
                    self._login_message(kind, body, out)
        except LoginFailed as exc:
            self.refusal = exc.message
            out.append(self._fatal(exc.sqlstate, exc.message))
        except codec.ProtocolViolation as exc:
            out.append(self._fatal(exc.sqlstate, exc.message))
        return b"".join(out)

    def _fatal(self, sqlstate: str, message: str) -> bytes:
        self.state = ConsoleState.CLOSED
        return codec.error_response(sqlstate, message)

    # -- login --

    def _login_message(self, kind: int, body: bytes, out: list[bytes]) -> None:
        login = self._login
        assert login is not None
        if kind == ord("X"):
            self.state = ConsoleState.CLOSED
            return
        if kind != ord("p"):
            raise LoginFailed("08P01", f"expected SASL response, got message type {chr(kind)!r}")
        if self.state is ConsoleState.LOGIN:
            # SASLInitialResponse: "String Name of the SASL authentication
            # mechanism that the client selected." then "Int32 Length of SASL
            # mechanism specific 'Initial Client Response' that follows, or -1".
            mechanism, pos = codec._cstring(body, 0)
            if mechanism.decode(errors="replace") != SCRAM_SHA_256:
                raise LoginFailed("28000", "client selected an invalid SASL "
                                           "authentication mechanism")
            if len(body) < pos + 4 or _INT32.unpack_from(body, pos)[0] != len(body) - pos - 4:
                raise LoginFailed("08P01", "malformed SASLInitialResponse")
            first = login.server_first(_decode(body[pos + 4:]))
            out.append(_auth(_AUTH_SASL_CONTINUE, first.encode()))
            self.state = ConsoleState.LOGIN_FINAL
            return
        final = login.server_final(_decode(body))
        self._login = None
        out.append(_auth(_AUTH_SASL_FINAL, final.encode()))
        out.append(self._welcome())
        self.state = ConsoleState.READY

    def _welcome(self) -> bytes:
        params = self.startup.params
        status = {
            "server_version": SERVER_VERSION, "server_encoding": "UTF8",
            "client_encoding": "UTF8", "DateStyle": "ISO, MDY", "IntervalStyle": "postgres",
            "TimeZone": "UTC", "integer_datetimes": "on",
            "standard_conforming_strings": "on", "is_superuser": "off",
            "session_authorization": self.user,
            "application_name": params.get("application_name", ""),
        }
        out = [_auth(_AUTH_OK)]
        out += [codec.parameter_status(k, v) for k, v in status.items()]
        out.append(codec.backend_key_data(*self._key))
        out.append(codec.ready_for_query(b"I"))
        return b"".join(out)

    # -- commands --

    def _message(self, kind: int, body: bytes, out: list[bytes]) -> None:
        if kind == ord("X"):
            self.state = ConsoleState.CLOSED
        elif self._skipping and kind != ord("S"):
            # "the backend will discard following messages until a Sync is read"
            return
        elif kind == ord("S"):
            # "At completion of each series of extended-query messages, the
            # frontend should issue a Sync message" which earns a ReadyForQuery.
            self._skipping = False
            out.append(codec.ready_for_query(b"I"))
        elif kind in _EXTENDED:
            self._skipping = True
            out.append(codec.error_response(
                "0A000", "the mirrorgate admin console speaks the simple query "
                         "protocol only", severity="ERROR"))
        elif kind == ord("Q"):
            self._query(body, out)
        elif kind == _FUNCTION_CALL:
            out.append(codec.error_response("0A000", "the mirrorgate admin console has no "
                                                     "functions to call", severity="ERROR"))
            out.append(codec.ready_for_query(b"I"))
        elif kind not in _IGNORED:
            raise codec.ProtocolViolation(f"invalid frontend message type {kind}")

    def _query(self, body: bytes, out: list[bytes]) -> None:
        text, _ = codec._cstring(body, 0)
        try:
            commands = parse_commands(_decode(text))
        except UnknownCommand as exc:
            out.append(codec.error_response("42601", exc.message, severity="ERROR"))
            out.append(codec.ready_for_query(b"I"))
            return
        if not commands:
            out.append(codec.frame(b"I", b""))  # EmptyQueryResponse
        self._commands(commands, out)

    def _commands(self, commands: list[Command], out: list[bytes]) -> None:
        for i, command in enumerate(commands):
            if self._control is None:
                out.append(codec.error_response("55000", "no running gateway to report on",
                                                severity="ERROR"))
                break
            if command is Command.RELOAD:
                self.state = ConsoleState.RELOADING
                self._queued = commands[i + 1:]
                return
            out.append(answer(command, self._control).encode())
        out.append(codec.ready_for_query(b"I"))

    def reload_done(self, result: ReloadResult) -> bytes:
        """The RELOAD asked for has finished: answer it, then go on with what waits.

        :param result: what ``Control.reload`` returned.
        """
        if self.state is not ConsoleState.RELOADING:
            return b""
        self.state = ConsoleState.READY
        out: list[bytes] = []
        if result.ok:
            out += [codec.notice_response("00000", _clean(line)) for line in result.changes]
            out.append(command_complete("RELOAD"))
            queued, self._queued = self._queued, []
            self._commands(queued, out)
        else:
            # Class F0, "Configuration File Error": the old config keeps serving.
            self._queued = []
            out.append(codec.error_response("F0000", _clean(result.message),
                                            severity="ERROR"))
            out.append(codec.ready_for_query(b"I"))
        return b"".join(out) + self._run()


def _clean(text: str) -> str:
    # A protocol String ends at its first NUL: a message may not hold one.
    return text.replace("\0", "")


def _decode(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise codec.ProtocolViolation("invalid UTF-8 in message", "22021") from None


# --- the driver ---------------------------------------------------------------------

# Reloads asked from a console: the loop keeps only weak references to tasks,
# and a reload must finish even if its client leaves.
_RELOADS: set[asyncio.Task[None]] = set()


class ConsoleSession(asyncio.Protocol):
    """Drives a ConsoleConnection on a client connection the relay hands over.

    It is not one of the listener's client sessions: it opens no upstream
    connection, is not counted in ``client_connections`` nor ``max_clients``,
    and is not listed by SHOW CLIENTS.

    :param ctx: the listener the client connected to.
    :param startup: the client's startup packet.
    :param peer: the client's address, for the log.
    """

    def __init__(self, ctx: ListenerContext, startup: codec.StartupMessage, peer: str) -> None:
        control = ctx.control
        config = control.config if control is not None else ctx.config
        users = {u.name: u.password for u in config.admin.user}
        self.ctx = ctx
        self.peer = peer
        self.conn = ConsoleConnection(startup, users, control,
                                      (os.getpid(), secrets.token_bytes(4)))
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._paused = 0  # 1: the client's buffer is full, 2: a reload runs

    def __repr__(self) -> str:
        return f"<ConsoleSession {self.peer} {self.conn!r}>"

    def attach(self, transport: asyncio.Transport, rest: bytes, timeout: float) -> None:
        """Take over ``transport`` from the relay.

        :param rest: client bytes that came after the startup packet.
        :param timeout: seconds left for the login (startup_timeout).
        """
        self.transport = transport
        transport.set_protocol(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(timeout, self._login_expired)
        self._send(self.conn.start())
        if rest:
            self.data_received(rest)

    def data_received(self, data: bytes) -> None:
        self._send(self.conn.receive_data(data))

    def _send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
        state = self.conn.state
        if state is ConsoleState.READY and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            log.info("console: logged in", extra={"listener": self.ctx.name, "session": self.peer,
                                                  "user": self.conn.user})
        elif state is ConsoleState.RELOADING and self._task is None:
            self._pause(2)
            self._task = task = asyncio.get_running_loop().create_task(self._reload())
            _RELOADS.add(task)
            task.add_done_callback(_RELOADS.discard)
        elif state is ConsoleState.CLOSED:
            if self.conn.refusal is not None:
                log.warning("console: login refused: %s", self.conn.refusal,
                            extra={"listener": self.ctx.name, "session": self.peer,
                                   "user": self.conn.user})
            transport.close()

    async def _reload(self) -> None:
        control = self.ctx.control
        assert control is not None
        log.info("console: reload asked", extra={"listener": self.ctx.name, "session": self.peer,
                                                 "user": self.conn.user})
        try:
            result = await control.reload()
        except Exception as exc:  # noqa: BLE001 - the console reports it, the gateway serves on
            log.exception("console: reload failed", extra={"listener": self.ctx.name,
                                                           "session": self.peer})
            result = ReloadResult(False, f"reload failed: {exc}")
        self._task = None
        self._resume(2)
        self._send(self.conn.reload_done(result))

    def _login_expired(self) -> None:
        self._timer = None
        if self.conn.state in (ConsoleState.LOGIN, ConsoleState.LOGIN_FINAL):
            timeout = self.ctx.startup_timeout
            self.conn.state = ConsoleState.CLOSED
            self._send(codec.error_response(
                "08P01", f"mirrorgate: start-up not complete within {timeout:g}s "
                         "(startup_timeout)"))

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            transport = self.transport
            if not self._paused and transport is not None and not transport.is_closing():
                transport.resume_reading()

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its commands.
        self._pause(1)

    def resume_writing(self) -> None:
        self._resume(1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.conn.state = ConsoleState.CLOSED
