# The console's login: the server side of SCRAM-SHA-256, done by the gateway.
#
# Owns: one SCRAM exchange (RFC 5802, RFC 7677) as the server, checking the
# client's proof against a password from `[[admin.user]]`, and the mock
# exchange an unknown user gets, so that the two cannot be told apart. Sans-IO:
# SCRAM messages in, SCRAM messages out. scramp derives the stored and server
# keys; the messages are read here because scramp's server refuses the empty
# user name libpq sends ("n=,": Postgres takes the user from the startup packet).
# Must not know: Postgres framing (console.py wraps the messages), sockets, or
# where the passwords come from.
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

import scramp

__all__ = ["SCRAM_SHA_256", "LoginFailed", "ScramLogin"]

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_ITERATIONS = 4096


class LoginFailed(Exception):
    """The console login cannot go on; the client gets a FATAL ErrorResponse.

    :param sqlstate: 28P01 for a wrong user or password, 08P01 for a malformed
        SCRAM message, 28000 for what the console does not offer.
    """

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


# Per-process: an unknown user gets the salt and iteration count a known one
# would, the same at each attempt (so they do not tell the two apart), as
# Postgres' mock authentication does.
_MOCK_SECRET = secrets.token_bytes(32)


def _derive(purpose: bytes, name: str) -> bytes:
    return hmac.new(_MOCK_SECRET, purpose + b"\0" + name.encode(), hashlib.sha256).digest()


@functools.lru_cache(maxsize=64)
def _auth_info(password: str, salt: bytes) -> tuple[bytes, bytes, bytes, int]:
    # PBKDF2 costs a few milliseconds on the event loop: once per user and password.
    salt_, stored_key, server_key, iterations = scramp.ScramMechanism(
        SCRAM_SHA_256).make_auth_info(password, SCRAM_ITERATIONS, salt=salt)
    return salt_, stored_key, server_key, iterations


def _attributes(message: str, what: str) -> list[tuple[str, str]]:
    pairs = []
    for part in message.split(","):
        name, sep, value = part.partition("=")
        if not sep or len(name) != 1:
            raise LoginFailed("08P01", f"malformed SCRAM message ({what})")
        pairs.append((name, value))
    return pairs


class ScramLogin:
    """The server side of one SCRAM-SHA-256 exchange (RFC 5802, RFC 7677).

    As in Postgres, the user is the startup packet's and the SCRAM user name
    is ignored (libpq sends it empty), and channel binding is not offered: the
    console speaks plain TCP.

    :param user: the startup packet's user name.
    :param password: the configured password, or None for a user not in
        ``[[admin.user]]`` (the exchange runs and fails at the proof).
    """

    __slots__ = ("_gs2", "_keys", "_nonce", "_bare", "_server_first", "known", "user")

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.known = password is not None
        secret = password if password is not None else _derive(b"password", user).hex()
        _, stored_key, server_key, iterations = _auth_info(secret, _derive(b"salt", user)[:16])
        self._keys = (stored_key, server_key, iterations)
        self._gs2 = self._nonce = self._bare = self._server_first = ""

    def __repr__(self) -> str:
        return f"<ScramLogin user={self.user!r} stage={'final' if self._nonce else 'first'}>"

    def _refused(self) -> LoginFailed:
        # The same words for an unknown user and a wrong password, as Postgres.
        return LoginFailed("28P01", f'password authentication failed for user "{self.user}"')

    def server_first(self, client_first: str) -> str:
        """Answer the client-first-message.

        :raises LoginFailed: for a malformed message or one asking for channel binding.
        """
        # gs2-header = gs2-cbind-flag "," [ authzid ] ","
        flag, _, rest = client_first.partition(",")
        authzid, sep, bare = rest.partition(",")
        if not sep or flag not in ("n", "y"):
            if flag.startswith("p="):
                raise LoginFailed("28000", "SCRAM channel binding is not supported by the "
                                           "console (it has no TLS)")
            raise LoginFailed("08P01", "malformed SCRAM message (client-first)")
        attrs_ = _attributes(bare, "client-first")
        # client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
        if len(attrs_) < 2 or attrs_[0][0] != "n" or attrs_[1][0] != "r" or not attrs_[1][1]:
            raise LoginFailed("08P01", "malformed SCRAM message (client-first)")
        iterations = self._keys[2]
        salt = _derive(b"salt", self.user)[:16]
        self._gs2 = f"{flag},{authzid},"
        self._bare = bare
        self._nonce = attrs_[1][1] + base64.b64encode(secrets.token_bytes(18)).decode()
        self._server_first = (f"r={self._nonce},s={base64.b64encode(salt).decode()},"
                              f"i={iterations}")
        return self._server_first

    def server_final(self, client_final: str) -> str:
        """Check the client's proof and answer with the server's signature.

        :raises LoginFailed: 28P01 for a proof that does not verify (or an
            unknown user), 08P01 for a malformed message.
        """
        if not self._nonce:
            raise LoginFailed("08P01", "SCRAM client-final-message before client-first")
        without_proof, sep, proof_text = client_final.rpartition(",p=")
        attrs_ = dict(_attributes(without_proof, "client-final")) if sep else {}
        try:
            proof = base64.b64decode(proof_text, validate=True)
            binding = base64.b64decode(attrs_.get("c", ""), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise LoginFailed("08P01", "malformed SCRAM message (client-final)") from None
        if binding != self._gs2 or attrs_.get("r") != self._nonce:
            raise LoginFailed("08P01", "SCRAM channel binding or nonce does not match")
        stored_key, server_key, _ = self._keys
        auth_message = f"{self._bare},{self._server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(signature):
            raise self._refused()
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key) \
                or not self.known:
            raise self._refused()
        verifier = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return "v=" + base64.b64encode(verifier).decode()
