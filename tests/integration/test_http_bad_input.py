# Bad requests from clients, over raw sockets, against the real gateway in front
# of real HTTP servers (issue 3, item 4; design.md §1.6).
#
# Owns: the evidence that garbage, an oversized header block, an oversized
# body, request smuggling with both Content-Length and Transfer-Encoding, a
# slow header trickle, Upgrade and CONNECT each get the gateway's clear error
# (or a close), reach neither the primary nor the mirror, and harm no other
# connection: a healthy keep-alive client connected before the bad one is
# still served after it, and the mirror's accounting still balances.
from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.integration.http_fixtures import (
    MirrorTo,
    RawClient,
    RawResponse,
    Relay,
    parse_response,
    request_bytes,
)
from tests.integration.http_fixtures import relay as relay
from tests.integration.http_fixtures import servers as servers
from tests.support.httpserver import HttpServer
from tests.support.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# Every bad request's target starts with this, so neither server may ever see it.
BAD = "/bad"


class Bystander:
    """A healthy keep-alive client connection, opened before the bad one."""

    def __init__(self, r: Relay) -> None:
        self.client = r.raw()
        self.asked = 0
        self.check()

    def check(self) -> None:
        """One more request on the same connection gets the primary's answer."""
        self.asked += 1
        target = f"/bystander/{self.asked}"
        self.client.send(request_bytes("GET", target))
        response = self.client.response()
        assert (response.status, response.body) == (200, f"GET {target}\n".encode()), response


@dataclass
class Served:
    relay: Relay
    primary: HttpServer
    mirror: HttpServer
    bystander: Bystander

    def bad_client(self) -> RawClient:
        return self.relay.raw()

    def assert_unharmed(self) -> None:
        """The bystander is served, the process is up, nothing bad got through."""
        self.bystander.check()
        assert self.relay.gw.returncode is None, self.relay.gw.log_tail()
        self.relay.at_rest("shadow")
        for server in (self.primary, self.mirror):
            leaked = [(q.method, q.target) for q in server.requests
                      if q.target.startswith(BAD) or q.method == "CONNECT"]
            assert not leaked, f"{server!r} received bad requests: {leaked}"


@pytest.fixture
def served(servers: Callable[..., HttpServer], relay: Callable[..., Relay]) -> Iterator[Served]:
    """A gateway (max_body 64KiB, startup_timeout 1s) with a mirror and a bystander."""
    primary, mirror = servers(), servers()
    r = relay(primary, [MirrorTo(mirror, "shadow")],
              general={"startup_timeout": "1s"}, listener={"max_body": "64KiB"})
    bystander = Bystander(r)
    try:
        yield Served(r, primary, mirror, bystander)
    finally:
        bystander.client.close()


def _gateway_answer(data: bytes) -> RawResponse:
    """The one response in ``data``, which must be the gateway's own."""
    parsed = parse_response(data)
    assert parsed is not None, f"no whole response before the close: {data[:300]!r}"
    response, used = parsed
    assert response.header("X-Mirrorgate-Error"), f"not marked as the gateway's: {response}"
    assert data[used:] == b"", f"bytes after the gateway's answer: {data[used:][:200]!r}"
    return response


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("garbage", [
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), id="tls-hello"),
    pytest.param(b"GET /bad HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n", id="no-colon"),
    pytest.param(b"GET /bad HTTP/1.1\r\nHost : x\r\n\r\n", id="space-before-colon"),
    pytest.param(b"GET /bad\x00 HTTP/1.1\r\nHost: x\r\n\r\n", id="nul-in-target"),
    pytest.param(b"POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                 b"Content-Length: 6\r\n\r\nhello!", id="two-lengths"),
    pytest.param(b"POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                 id="negative-length"),
    pytest.param(b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"zz\r\nhello\r\n0\r\n\r\n", id="bad-chunk-size"),
])
def test_garbage_gets_400_and_a_close(served: Served, garbage: bytes) -> None:
    with served.bad_client() as c:
        c.send(garbage)
        data, closed = c.read_to_close()
    assert closed, f"connection left open after garbage; got {data[:300]!r}"
    assert _gateway_answer(data).status == 400
    served.assert_unharmed()


def test_oversized_header_block_sent_at_once_gets_431(served: Served) -> None:
    with served.bad_client() as c:
        c.send(request_bytes("GET", f"{BAD}/big-head", [("X-Big", "a" * 100_000)]))
        data, closed = c.read_to_close()
    assert closed
    assert _gateway_answer(data).status == 431
    served.assert_unharmed()


def test_body_over_max_body_with_content_length_gets_413(served: Served) -> None:
    with served.bad_client() as c:
        c.send(request_bytes("POST", f"{BAD}/huge", [("Content-Length", "1000000")])
               + b"x" * 1024)
        data, closed = c.read_to_close()
    assert closed
    assert _gateway_answer(data).status == 413
    assert served.primary.body_bytes == 0, "the primary got part of a refused body"
    served.assert_unharmed()


def test_chunked_body_over_max_body_gets_413_or_a_close(served: Served) -> None:
    with served.bad_client() as c:
        c.send(request_bytes("POST", f"{BAD}/huge-chunked", [("Transfer-Encoding", "chunked")]))
        chunk = b"%x\r\n%s\r\n" % (8192, b"y" * 8192)
        with contextlib.suppress(OSError):  # the gateway may close before all is sent
            for _ in range(16):  # 128 KiB, twice max_body
                c.send(chunk)
            c.send(b"0\r\n\r\n")
        data, closed = c.read_to_close()
    assert closed, f"connection left open after a body over max_body; got {data[:300]!r}"
    if data:
        assert _gateway_answer(data).status == 413
    served.assert_unharmed()


# --------------------------------------------------------------------------- smuggling


@pytest.mark.parametrize("content_length", ["4", "48"], ids=["cl-short", "cl-long"])
def test_content_length_with_transfer_encoding_is_framed_by_chunked_then_closed(
    served: Served, content_length: str
) -> None:
    """RFC 9112 §6.1: Transfer-Encoding overrides Content-Length, and the
    connection closes after the response, so the request hidden after the
    chunked body never reaches the primary. Refusing the request with 400
    (also allowed there) is accepted too."""
    smuggled = request_bytes("GET", f"{BAD}/smuggled")
    with served.bad_client() as c:
        c.send(request_bytes("POST", f"{BAD}/first", [("Content-Length", content_length),
                                                     ("Transfer-Encoding", "chunked")])
               + b"5\r\nhello\r\n0\r\n\r\n" + smuggled)
        response = c.response()
        rest, closed = c.read_to_close()
    assert closed, f"connection left open after a request with both framings; got {rest!r}"
    assert rest == b"", f"a second response: the smuggled request was served: {rest[:300]!r}"
    reached = [q for q in served.primary.requests if q.target.startswith(BAD)]
    if response.status == 400:
        assert response.header("X-Mirrorgate-Error"), response
        assert reached == []
    else:
        assert (response.status, response.body) == (200, f"POST {BAD}/first\nhello".encode())
        (got,) = reached
        assert (got.target, got.body) == (f"{BAD}/first", b"hello")
        # RFC 9112 §6.1: a sender MUST NOT send Content-Length with Transfer-Encoding.
        assert not (got.values("Content-Length") and got.values("Transfer-Encoding")), (
            f"forwarded with both framings: {got.headers}")
    # Not assert_unharmed: /bad/first may rightly have reached both servers.
    served.bystander.check()
    assert served.relay.gw.returncode is None, served.relay.gw.log_tail()
    served.relay.at_rest("shadow")
    assert f"{BAD}/smuggled" not in served.primary.targets + served.mirror.targets


def test_transfer_coding_not_ending_in_chunked_is_refused(served: Served) -> None:
    """RFC 9112 §6.1: such a request's length cannot be determined: 400, then close."""
    with served.bad_client() as c:
        c.send(request_bytes("POST", f"{BAD}/gzip", [("Transfer-Encoding", "gzip"),
                                                    ("Content-Length", "5")]) + b"hello")
        data, closed = c.read_to_close()
    assert closed
    assert _gateway_answer(data).status in (400, 501)
    served.assert_unharmed()


# --------------------------------------------------------------------------- slow, upgrades


def test_header_block_trickled_past_startup_timeout_gets_408_or_a_close(served: Served) -> None:
    deadline = time.monotonic() + 8  # startup_timeout is 1s
    with served.bad_client() as c:
        pieces = [f"GET {BAD}/slow HTTP/1.1\r\n".encode()]
        pieces += [b"X-Slow-%d: x\r\n" % i for i in range(1000)]
        for piece in pieces:
            try:
                c.send(piece)
            except OSError:
                break  # closed by the gateway
            if select.select([c.sock], [], [], 0.2)[0]:
                break  # an answer or a close
            if time.monotonic() > deadline:
                pytest.fail("the gateway still reads a header block trickled for 8s "
                            "with startup_timeout = 1s")
        data, closed = c.read_to_close(timeout=5)
    assert closed, f"connection left open after the trickle; got {data[:300]!r}"
    if data:
        assert _gateway_answer(data).status == 408
    served.assert_unharmed()


@pytest.mark.parametrize("request_", [
    pytest.param(request_bytes("GET", f"{BAD}/ws", [
        ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]), id="websocket"),
    pytest.param(request_bytes("GET", f"{BAD}/h2c", [
        ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")]), id="h2c"),
    pytest.param(b"CONNECT bad.example:443 HTTP/1.1\r\nHost: bad.example:443\r\n\r\n",
                 id="connect"),
])
def test_upgrade_and_connect_get_501_and_are_not_forwarded(
    served: Served, request_: bytes
) -> None:
    with served.bad_client() as c:
        c.send(request_)
        response = c.response()
    assert response.status == 501, response
    assert response.header("X-Mirrorgate-Error"), response
    served.assert_unharmed()


# --------------------------------------------------------------------------- vanishing


def test_client_gone_mid_body_leaves_no_half_request_on_a_primary_connection(
    served: Served,
) -> None:
    primary = served.primary
    with served.bad_client() as c:
        c.send(request_bytes("POST", f"{BAD}/half", [("Content-Length", "10000")])
               + b"h" * 100)
        eventually(lambda: primary.body_bytes >= 100,
                   "the primary got the first 100 bytes of a streamed body")
    # The primary's connection carrying the half body must be closed, never
    # reused: the next request would be read as the rest of that body.
    with served.bad_client() as c:
        c.send(request_bytes("POST", "/next", body=b"the next body"))
        response = c.response()
    assert (response.status, response.body) == (200, b"POST /next\nthe next body")
    eventually(lambda: primary.incomplete == 1,
               "the gateway closed the primary connection that had the half body")
    (got,) = [q for q in primary.requests if q.target == "/next"]
    assert got.body == b"the next body"
    served.assert_unharmed()
