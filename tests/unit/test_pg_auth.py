"""MirrorAuth: the gateway logging in to a mirror, as scripts of requests and answers."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
import scramp
from hypothesis import given
from hypothesis import strategies as st

from gateway_postgres import codec
from gateway_postgres.auth import AuthFailed, AuthState, MirrorAuth

PASSWORD = "s3cr3t-Pa55"


def body_of(frame: bytes, type_byte: bytes = b"p") -> bytes:
    reader = codec.FrameReader()
    reader.feed(frame)
    kind, body = reader.next_frame()
    assert kind == type_byte[0] and reader.buffered == 0
    return body


def scram_server(password: str) -> scramp.core.ScramServer:
    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    salt, stored_key, server_key, iterations = mechanism.make_auth_info(password, 4096)
    return mechanism.make_server(lambda _user: (salt, stored_key, server_key, iterations))


def scram_exchange(auth: MirrorAuth, server) -> str:
    """Run the client through a real in-process SCRAM server; return server-final."""
    initial = body_of(auth.receive(10, b"SCRAM-SHA-256\0\0"))
    mechanism, _, rest = initial.partition(b"\0")
    (length,) = struct.unpack_from("!i", rest)
    assert mechanism == b"SCRAM-SHA-256" and length == len(rest) - 4
    server.set_client_first(rest[4:].decode())
    response = body_of(auth.receive(11, server.get_server_first().encode()))
    server.set_client_final(response.decode())  # raises if the client's proof is wrong
    return server.get_server_final()


def test_trust_needs_no_answer():
    auth = MirrorAuth("app", None)
    assert auth.receive(0, b"") is None
    assert auth.done and auth.method == "trust"


def test_cleartext_sends_the_password():
    auth = MirrorAuth("app", PASSWORD)
    assert body_of(auth.receive(3, b"")) == PASSWORD.encode() + b"\0"
    assert auth.state is AuthState.PASSWORD_SENT
    assert auth.receive(0, b"") is None and auth.done


@given(
    st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s),
    st.binary(min_size=4, max_size=4),
)
def test_md5_answer_follows_the_documented_formula(user, salt):
    auth = MirrorAuth(user, PASSWORD)
    inner = hashlib.md5(PASSWORD.encode() + user.encode()).hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode() + b"\0"
    assert body_of(auth.receive(5, salt)) == expected


def test_md5_known_value():
    # concat('md5', md5(concat(md5(concat(password, username)), random-salt)))
    inner = hashlib.md5(b"secretpostgres").hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + b"\x01\x02\x03\x04").hexdigest()
    auth = MirrorAuth("postgres", "secret")
    assert body_of(auth.receive(5, b"\x01\x02\x03\x04")) == expected.encode() + b"\0"


def test_md5_salt_must_be_four_bytes():
    with pytest.raises(AuthFailed):
        MirrorAuth("app", PASSWORD).receive(5, b"abc")


def test_scram_exchange_against_a_real_scramp_server():
    auth = MirrorAuth("app", PASSWORD)
    server_final = scram_exchange(auth, scram_server(PASSWORD))
    assert auth.receive(12, server_final.encode()) is None
    assert auth.state is AuthState.SASL_VERIFIED
    assert auth.receive(0, b"") is None
    assert auth.done and auth.method == "scram-sha-256"


def test_scram_picks_sha256_from_a_list_with_plus():
    auth = MirrorAuth("app", PASSWORD)
    frame = auth.receive(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
    assert body_of(frame).startswith(b"SCRAM-SHA-256\0")


def test_scram_with_a_wrong_password_is_refused_by_the_server():
    auth = MirrorAuth("app", "not-the-password")
    with pytest.raises(scramp.ScramException):
        scram_exchange(auth, scram_server(PASSWORD))


def test_wrong_server_signature_fails():
    auth = MirrorAuth("app", PASSWORD)
    scram_exchange(auth, scram_server(PASSWORD))
    forged = "v=" + base64.b64encode(b"\0" * 32).decode()
    with pytest.raises(AuthFailed, match="signature") as info:
        auth.receive(12, forged.encode())
    assert PASSWORD not in str(info.value)
    assert auth.state is AuthState.FAILED
    with pytest.raises(AuthFailed):
        auth.receive(0, b"")


def test_ok_before_the_server_proves_itself_fails():
    auth = MirrorAuth("app", PASSWORD)
    scram_exchange(auth, scram_server(PASSWORD))
    with pytest.raises(AuthFailed, match="before completing SCRAM"):
        auth.receive(0, b"")


def test_plus_only_offer_is_refused_clearly():
    with pytest.raises(AuthFailed, match="channel binding"):
        MirrorAuth("app", PASSWORD).receive(10, b"SCRAM-SHA-256-PLUS\0\0")
    with pytest.raises(AuthFailed, match="OAUTHBEARER"):
        MirrorAuth("app", PASSWORD).receive(10, b"OAUTHBEARER\0\0")


@pytest.mark.parametrize(("code", "data"), [(3, b""), (5, b"salt"), (10, b"SCRAM-SHA-256\0\0")])
def test_missing_password_fails_with_advice(code, data):
    with pytest.raises(AuthFailed) as info:
        MirrorAuth("reporting", None).receive(code, data)
    assert info.value.message == (
        "mirror requires a password for user 'reporting'; "
        "set password or users in the mirror upstream"
    )


@pytest.mark.parametrize(
    ("code", "name"), [(2, "Kerberos V5"), (7, "GSSAPI"), (9, "SSPI"), (6, "SCM")]
)
def test_unsupported_methods_are_named(code, name):
    with pytest.raises(AuthFailed, match=name):
        MirrorAuth("app", PASSWORD).receive(code, b"")


def test_out_of_order_requests_fail():
    with pytest.raises(AuthFailed, match="unexpected"):
        MirrorAuth("app", PASSWORD).receive(11, b"r=abc")
    auth = MirrorAuth("app", PASSWORD)
    auth.receive(3, b"")
    with pytest.raises(AuthFailed, match="unexpected"):
        auth.receive(5, b"salt")
    with pytest.raises(AuthFailed, match="unknown"):
        MirrorAuth("app", PASSWORD).receive(99, b"")


def test_garbage_scram_challenge_fails_cleanly():
    auth = MirrorAuth("app", PASSWORD)
    auth.receive(10, b"SCRAM-SHA-256\0\0")
    with pytest.raises(AuthFailed, match="SCRAM challenge"):
        auth.receive(11, b"\xff\xfe not scram")


def test_repr_shows_user_and_state_never_the_password():
    auth = MirrorAuth("app", PASSWORD)
    assert repr(auth) == "<MirrorAuth user='app' method=trust state=STARTED>"
    auth.receive(3, b"")
    assert PASSWORD not in repr(auth) and "PASSWORD_SENT" in repr(auth)
    auth = MirrorAuth("app", PASSWORD)
    scram_exchange(auth, scram_server(PASSWORD))
    assert PASSWORD not in repr(auth)
