# The client side of Postgres authentication, used when the gateway logs in to a
# mirror server on its own: trust, cleartext, MD5 and SCRAM-SHA-256 (through
# scramp, without channel binding). Sans-IO: it takes each Authentication*
# request and returns the frame to answer with.
#
# It owns the password while authenticating and must never show it (reprs and
# messages name the user and the state only). It must not know about sockets,
# sessions, configuration lookup (which password applies to which user) or the
# primary: primary authentication is relayed, never done here.
from __future__ import annotations

import enum
import hashlib

import scramp

from . import codec

__all__ = ["AuthFailed", "AuthState", "MirrorAuth"]

# Authentication request codes: "Int32(n) Specifies that ...".
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SCM_CREDENTIAL = 6
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_UNSUPPORTED = {
    AUTH_KERBEROS_V5: "Kerberos V5",
    AUTH_SCM_CREDENTIAL: "SCM credentials",
    AUTH_GSS: "GSSAPI",
    AUTH_GSS_CONTINUE: "GSSAPI",
    AUTH_SSPI: "SSPI",
}

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"


class AuthFailed(Exception):
    """Logging in to a mirror cannot succeed; the message never holds a secret.

    :param message: what failed and, where possible, what to change.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AuthState(enum.Enum):
    """Where the exchange stands."""

    STARTED = enum.auto()  # nothing received yet
    PASSWORD_SENT = enum.auto()  # cleartext or MD5 answered, waiting for Ok
    SASL_STARTED = enum.auto()  # SASLInitialResponse sent, waiting for SASLContinue
    SASL_CONTINUED = enum.auto()  # SASLResponse sent, waiting for SASLFinal
    SASL_VERIFIED = enum.auto()  # server signature checked, waiting for Ok
    DONE = enum.auto()  # AuthenticationOk received
    FAILED = enum.auto()  # AuthFailed raised; the connection must be closed


class MirrorAuth:
    """Answers a mirror server's Authentication* requests as ``user``.

    :param user: the user name sent in the StartupMessage.
    :param password: the password, or None when the mirror is expected to trust us.
    """

    __slots__ = ("_password", "_scram", "method", "state", "user")

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self._password = password
        self._scram: scramp.ScramClient | None = None
        self.state = AuthState.STARTED
        self.method = "trust"

    def __repr__(self) -> str:
        return f"<MirrorAuth user={self.user!r} method={self.method} state={self.state.name}>"

    @property
    def done(self) -> bool:
        """True once AuthenticationOk has been received."""
        return self.state is AuthState.DONE

    def receive(self, code: int, data: bytes) -> bytes | None:
        """Handle one Authentication* ('R') message from the mirror.

        :param code: the request code, as from :func:`codec.authentication_request`.
        :param data: the bytes after the code.
        :returns: the frame to send back, or None when nothing is to be sent
            (AuthenticationOk, or AuthenticationSASLFinal once verified).
        :raises AuthFailed: when no password is configured but one is needed, the
            method is unsupported, the server's SCRAM signature does not verify, or
            the messages arrive out of order.
        """
        try:
            return self._receive(code, bytes(data))
        except AuthFailed:
            self.state = AuthState.FAILED
            raise

    def _receive(self, code: int, data: bytes) -> bytes | None:
        if self.state in (AuthState.DONE, AuthState.FAILED):
            raise AuthFailed(f"unexpected authentication request {code} in state {self.state.name}")
        if code == AUTH_OK:
            self._ok()
            return None
        if code == AUTH_CLEARTEXT:
            self._expect(AuthState.STARTED, code)
            # "The frontend must now send a PasswordMessage containing the password
            # in clear-text form."
            self.method = "cleartext"
            message = codec.password_message(self._need_password())
            self.state = AuthState.PASSWORD_SENT
            return message
        if code == AUTH_MD5:
            self._expect(AuthState.STARTED, code)
            return self._md5(data)
        if code == AUTH_SASL:
            self._expect(AuthState.STARTED, code)
            return self._sasl_start(data)
        if code == AUTH_SASL_CONTINUE:
            self._expect(AuthState.SASL_STARTED, code)
            return self._sasl_continue(data)
        if code == AUTH_SASL_FINAL:
            self._expect(AuthState.SASL_CONTINUED, code)
            self._sasl_final(data)
            return None
        if code in _UNSUPPORTED:
            raise AuthFailed(
                f"mirror asks for {_UNSUPPORTED[code]} authentication for user {self.user!r}, "
                "which the gateway does not support; allow trust, password, md5 or "
                "scram-sha-256 for the gateway's address in the mirror's pg_hba.conf"
            )
        raise AuthFailed(f"mirror sent an unknown authentication request code {code}")

    def _expect(self, state: AuthState, code: int) -> None:
        if self.state is not state:
            raise AuthFailed(f"unexpected authentication request {code} in state {self.state.name}")

    def _need_password(self) -> str:
        if self._password is None:
            raise AuthFailed(
                f"mirror requires a password for user {self.user!r}; "
                "set password or users in the mirror upstream"
            )
        return self._password

    def _ok(self) -> None:
        # "AuthenticationSASLFinal ... followed immediately by an AuthenticationOk":
        # an Ok in the middle of SCRAM would skip the server's proof of identity.
        if self.state in (AuthState.SASL_STARTED, AuthState.SASL_CONTINUED):
            raise AuthFailed("mirror sent AuthenticationOk before completing SCRAM authentication")
        self.state = AuthState.DONE

    def _md5(self, salt: bytes) -> bytes:
        # AuthenticationMD5Password: "Byte4 The salt to use when encrypting the password."
        if len(salt) != 4:
            raise AuthFailed(f"mirror sent an MD5 salt of {len(salt)} bytes, expected 4")
        self.method = "md5"
        password = self._need_password()
        # concat('md5', md5(concat(md5(concat(password, username)), random-salt)))
        inner = hashlib.md5((password + self.user).encode()).hexdigest()
        digest = hashlib.md5(inner.encode() + salt).hexdigest()
        self.state = AuthState.PASSWORD_SENT
        return codec.password_message("md5" + digest)

    def _sasl_start(self, data: bytes) -> bytes:
        # AuthenticationSASL: "The message body is a list of SASL authentication
        # mechanisms, in the server's order of preference. A zero byte is required
        # as terminator after the last authentication mechanism name."
        mechanisms = [m.decode(errors="replace") for m in data.split(b"\0") if m]
        self.method = "scram-sha-256"
        if SCRAM_SHA_256 not in mechanisms:
            if SCRAM_SHA_256_PLUS in mechanisms:
                raise AuthFailed(
                    f"mirror offers only {SCRAM_SHA_256_PLUS} for user {self.user!r}: channel "
                    "binding is not supported by the gateway's mirror connections"
                )
            offered = ", ".join(mechanisms) or "none"
            raise AuthFailed(f"mirror offers no supported SASL mechanism (offered: {offered})")
        password = self._need_password()
        try:
            # The server ignores the SCRAM user name and uses the startup packet's.
            self._scram = scramp.ScramClient([SCRAM_SHA_256], self.user or "*", password)
            first = self._scram.get_client_first()
        except scramp.ScramException as exc:
            raise AuthFailed(f"cannot start SCRAM for user {self.user!r}: {exc}") from None
        self.state = AuthState.SASL_STARTED
        return codec.sasl_initial_response(SCRAM_SHA_256, first.encode())

    def _sasl_continue(self, data: bytes) -> bytes:
        # AuthenticationSASLContinue: "Byten SASL data, specific to the SASL
        # mechanism being used." (the SCRAM server-first-message)
        assert self._scram is not None
        try:
            self._scram.set_server_first(data.decode())
            final = self._scram.get_client_final()
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise AuthFailed(f"invalid SCRAM challenge from mirror: {exc}") from None
        self.state = AuthState.SASL_CONTINUED
        return codec.sasl_response(final.encode())

    def _sasl_final(self, data: bytes) -> None:
        # AuthenticationSASLFinal: "SASL outcome "additional data", specific to the
        # SASL mechanism being used." (the SCRAM server-final-message, v=signature)
        assert self._scram is not None
        try:
            self._scram.set_server_final(data.decode())
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise AuthFailed(f"mirror's SCRAM server signature does not verify: {exc}") from None
        self._scram = None  # holds key material; not needed any more
        self.state = AuthState.SASL_VERIFIED
