# The client gets exactly the primary's response, through the real gateway,
# from real HTTP servers over real sockets (issue 3, item 2; design.md §1.1).
#
# Owns: the evidence that status, headers (less hop-by-hop ones, RFC 9110
# §7.6.1) and body reach the client unchanged, for every kind of status and
# for HEAD; that the primary gets the client's request unchanged plus
# X-Forwarded-For; that bodies stream both ways; keep-alive, pipelining,
# chunked bodies and 100-continue; the gateway's own 502 and 504 and its
# handling of a primary that breaks off; and routes.
from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.http_fixtures import (
    MirrorTo,
    RawClient,
    Relay,
    Route,
    end_to_end,
    http_config,
    parse_response,
    request_bytes,
    values,
)
from tests.integration.http_fixtures import relay as relay
from tests.integration.http_fixtures import servers as servers
from tests.support.faults import GatewayPorts
from tests.support.gateway import GatewayProcess
from tests.support.httpserver import HttpServer, Reply, Request, echo, echo_body
from tests.support.net import free_port
from tests.support.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Servers = Callable[..., HttpServer]
Relays = Callable[..., Relay]

PRIMARY_HEADERS = [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("X-Primary", "a"),
    ("Set-Cookie", "a=1; Path=/"),
    ("Set-Cookie", "b=2; Path=/"),
    ("ETag", '"v1"'),
    ("Cache-Control", "no-store"),
]


def _raw_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in response.headers.raw]


def _sent_headers(reply: Reply, method: str = "GET") -> list[tuple[str, str]]:
    """The header lines the test server puts on the wire for ``reply``."""
    head, body = reply.framed(method)
    parsed = parse_response(head + body, head_request=method == "HEAD")
    assert parsed is not None
    return parsed[0].headers


# --------------------------------------------------------------------------- responses


@pytest.mark.parametrize("status", [200, 201, 204, 304, 404, 500])
def test_client_gets_the_primary_status_headers_and_body(
    servers: Servers, relay: Relays, status: int
) -> None:
    body = b"" if status in (204, 304) else f"the primary's {status}\n".encode()
    reply = Reply(status, PRIMARY_HEADERS, body)
    primary = servers(reply)
    r = relay(primary)
    with r.client() as client:
        response = client.get("/thing?x=1")
    assert response.status_code == status
    assert response.content == body
    assert end_to_end(_raw_headers(response)) == end_to_end(_sent_headers(reply))
    assert response.headers.get("X-Mirrorgate-Error") is None
    assert [(q.method, q.target) for q in primary.requests] == [("GET", "/thing?x=1")]


def test_hop_by_hop_response_headers_are_not_relayed(servers: Servers, relay: Relays) -> None:
    hop = [("Connection", "upgrade, X-Hop-Secret"), ("X-Hop-Secret", "s3cret"),
           ("Keep-Alive", "timeout=5, max=100"), ("Proxy-Connection", "keep-alive"),
           ("Upgrade", "h2c")]
    reply = Reply(200, [*hop, ("X-End", "kept")], b"ok")
    r = relay(servers(reply))
    with r.client() as client:
        response = client.get("/hop")
    got = _raw_headers(response)
    names = {n.lower() for n, _ in got}
    assert not names & {"x-hop-secret", "keep-alive", "proxy-connection", "upgrade"}, got
    connection = {t.strip().lower() for v in values(got, "Connection") for t in v.split(",")}
    assert not connection & {"upgrade", "x-hop-secret"}, got
    assert values(got, "X-End") == ["kept"]
    assert response.content == b"ok"


def test_head_keeps_content_length_and_sends_no_body(servers: Servers, relay: Relays) -> None:
    def behaviour(request: Request) -> Reply:
        if request.method == "HEAD":
            return Reply(200, [("Content-Type", "application/octet-stream")], b"x" * 1234)
        return echo(request)

    r = relay(servers(behaviour))
    with r.raw() as c:
        c.send(request_bytes("HEAD", "/file"))
        head = c.response(head_request=True)
        # The next response on the connection must start right after the head:
        # a body leaked after the HEAD response would be read as its status line.
        c.send(request_bytes("GET", "/after"))
        after = c.response()
    assert head.status == 200
    assert head.header("Content-Length") == "1234"
    assert after.status == 200 and after.body == b"GET /after\n"


def test_chunked_response_body_reaches_the_client_intact(
    servers: Servers, relay: Relays
) -> None:
    chunks = [b"a", b"b" * 1000, b"c" * 70_000, b"\r\n0\r\n\r\n", b"tail"]
    r = relay(servers(Reply(200, [("Content-Type", "application/json")], chunks=chunks)))
    with r.client() as client:
        response = client.get("/chunks")
    assert response.status_code == 200
    assert response.content == b"".join(chunks)


def test_large_response_is_streamed_to_the_client(servers: Servers, relay: Relays) -> None:
    size = 20 * 1024 * 1024
    half = size // 2
    body = bytes(range(256)) * (size // 256)
    resume = threading.Event()
    reply = Reply(200, [("Content-Type", "application/octet-stream")], body,
                  pause_at=half, resume=resume)
    r = relay(servers(reply))
    digest = hashlib.sha256()
    received = 0
    try:
        with r.client() as client, client.stream("GET", "/big") as response:
            assert response.status_code == 200
            assert response.headers["Content-Length"] == str(size)
            chunks = response.iter_raw()
            # The primary has sent half and waits: a gateway that buffers the
            # response before passing it on never delivers this half.
            while received < half:
                chunk = next(chunks, b"")
                if not chunk:
                    pytest.fail(f"the response ended after {received} of {size} bytes")
                digest.update(chunk)
                received += len(chunk)
            resume.set()
            for chunk in chunks:
                digest.update(chunk)
                received += len(chunk)
    except httpx.ReadTimeout:
        pytest.fail(f"the client had {received} of the {half} bytes the primary sent before "
                    "pausing: the gateway holds the response back instead of streaming it")
    finally:
        resume.set()
    assert received == size
    assert digest.digest() == hashlib.sha256(body).digest()


# --------------------------------------------------------------------------- requests


CLIENT_HEADERS = [
    ("Host", "api.example:8080"),
    ("User-Agent", "raw-client/1.0"),
    ("X-Dup", "1"),
    ("x-dup", "2"),
    ("Content-Type", "application/x-protobuf"),
    ("Content-Encoding", "snappy"),
    ("X-Forwarded-For", "10.0.0.1"),
]


def test_primary_receives_the_request_exactly_with_x_forwarded_for_appended(
    servers: Servers, relay: Relays
) -> None:
    primary = servers()
    r = relay(primary)
    body = bytes(range(256)) * 4
    with r.raw() as c:
        c.send(request_bytes("POST", "/api/v1/push?a=1&b=%20x", CLIENT_HEADERS, body))
        first = c.response()
        c.send(request_bytes("GET", "/second", [("Host", "api.example:8080")]))
        second = c.response()
    assert first.status == 200 and first.body == b"POST /api/v1/push?a=1&b=%20x\n" + body
    assert second.status == 200 and second.body == b"GET /second\n"
    p1, p2 = primary.wait_for(2)
    assert (p1.method, p1.target, p1.body) == ("POST", "/api/v1/push?a=1&b=%20x", body)
    sent = [*CLIENT_HEADERS, ("Content-Length", str(len(body)))]
    assert end_to_end(p1.headers, also=["X-Forwarded-For"]) == end_to_end(
        sent, also=["X-Forwarded-For"])
    assert p1.header("X-Forwarded-For") == "10.0.0.1, 127.0.0.1"
    assert (p2.method, p2.target, p2.body) == ("GET", "/second", b"")
    assert p2.header("X-Forwarded-For") == "127.0.0.1"
    assert p2.values("Host") == ["api.example:8080"]


def test_a_head_with_no_hop_by_hop_field_reaches_the_primary_as_sent(
    servers: Servers, relay: Relays
) -> None:
    # Only Content-Length, which this hop keeps: the head goes on as it came,
    # with X-Forwarded-For as its last field. Anything more to drop, or an
    # HTTP/1.0 request line, and the head is rebuilt (Content-Length last).
    primary = servers()
    r = relay(primary)
    fields = [("Host", "api.example"), ("content-length", "3"), ("X-Tenant", "t1")]
    with r.raw() as c:
        c.send(request_bytes("POST", "/as-sent", fields, b"abc"))
        assert c.response().status == 200
        c.send(request_bytes("POST", "/rebuilt", [*fields, ("Keep-Alive", "timeout=5")], b"abc"))
        assert c.response().status == 200
    with r.raw() as c:
        c.send(b"POST /old HTTP/1.0\r\nHost: api.example\r\ncontent-length: 3\r\n\r\nabc")
        assert c.response().status == 200
    as_sent, rebuilt, old = primary.wait_for(3)
    assert as_sent.headers == [*fields, ("X-Forwarded-For", "127.0.0.1")]
    assert rebuilt.headers == [("Host", "api.example"), ("X-Tenant", "t1"),
                               ("X-Forwarded-For", "127.0.0.1"), ("Content-Length", "3")]
    assert old.headers == [("Host", "api.example"), ("X-Forwarded-For", "127.0.0.1"),
                           ("Content-Length", "3")]
    assert as_sent.body == rebuilt.body == old.body == b"abc"


def test_forwarded_for_off_leaves_x_forwarded_for_as_the_client_sent_it(
    servers: Servers, relay: Relays
) -> None:
    primary = servers()
    r = relay(primary, listener={"forwarded_for": False})
    with r.raw() as c:
        c.send(request_bytes("GET", "/one", [("X-Forwarded-For", "10.0.0.1")]))
        assert c.response().status == 200
        c.send(request_bytes("GET", "/two"))
        assert c.response().status == 200
    p1, p2 = primary.wait_for(2)
    assert p1.values("X-Forwarded-For") == ["10.0.0.1"]
    assert p2.values("X-Forwarded-For") == []


def test_hop_by_hop_request_headers_are_not_forwarded(servers: Servers, relay: Relays) -> None:
    primary = servers()
    r = relay(primary)
    headers = [("Connection", "keep-alive, X-Hop-Secret"), ("X-Hop-Secret", "s3cret"),
               ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive"),
               ("TE", "trailers"), ("X-End", "kept")]
    with r.raw() as c:
        c.send(request_bytes("POST", "/hop", headers, b"abc"))
        assert c.response().body == b"POST /hop\nabc"
    (got,) = primary.wait_for(1)
    names = {n.lower() for n, _ in got.headers}
    assert not names & {"x-hop-secret", "keep-alive", "proxy-connection", "te"}, got.headers
    connection = {t.strip().lower() for t in (got.header("Connection") or "").split(",")}
    assert "x-hop-secret" not in connection
    assert got.values("X-End") == ["kept"] and got.body == b"abc"


def test_large_upload_is_streamed_to_the_primary(servers: Servers, relay: Relays) -> None:
    size = 30 * 1024 * 1024
    half = size // 2
    body = bytes(range(256)) * (size // 256)
    primary = servers(lambda q: Reply(200, (), hashlib.sha256(q.body).hexdigest().encode()))
    r = relay(primary)
    with r.raw(timeout=30) as c:
        c.send(request_bytes("POST", "/upload", [("Content-Length", str(size))]) + body[:half])
        # The rest of the body is held back until the primary has some of it:
        # a gateway that buffers a body before forwarding it would wait forever.
        eventually(lambda: primary.body_bytes > 0,
                   f"the primary got none of the first {half} bytes of a {size}-byte upload: "
                   "the gateway buffers the body instead of streaming it")
        c.send(body[half:])
        response = c.response(timeout=30)
    assert response.status == 200
    assert response.body == hashlib.sha256(body).hexdigest().encode()
    (got,) = primary.requests
    assert len(got.body) == size


def test_keep_alive_serves_several_requests_on_one_connection(
    servers: Servers, relay: Relays
) -> None:
    primary = servers()
    r = relay(primary)
    with r.raw() as c:
        for i in range(5):
            c.send(request_bytes("POST", f"/ka/{i}", body=b"n=%d" % i))
            response = c.response()
            assert response.status == 200
            assert response.body == f"POST /ka/{i}\nn={i}".encode()
    assert primary.targets == [f"/ka/{i}" for i in range(5)]
    eventually(lambda: r.sample("mirrorgate_primary_units_total") == 5,
               "mirrorgate_primary_units_total == 5")


def test_pipelined_requests_get_their_responses_in_order(servers: Servers, relay: Relays) -> None:
    def behaviour(request: Request) -> Reply:
        # The first is the slowest: answering out of order would show.
        delay = 0.3 if request.target == "/p/1" else 0.0
        return Reply(200, (), echo_body(request), delay=delay)

    primary = servers(behaviour)
    r = relay(primary)
    with r.raw() as c:
        c.send(request_bytes("GET", "/p/1") + request_bytes("POST", "/p/2", body=b"two")
               + request_bytes("GET", "/p/3"))
        got = [c.response() for _ in range(3)]
    assert [x.body for x in got] == [b"GET /p/1\n", b"POST /p/2\ntwo", b"GET /p/3\n"]
    assert sorted(primary.targets) == ["/p/1", "/p/2", "/p/3"]


def test_chunked_request_body_reaches_the_primary(servers: Servers, relay: Relays) -> None:
    primary = servers()
    r = relay(primary)
    with r.raw() as c:
        c.send(request_bytes("POST", "/chunked", [("Transfer-Encoding", "chunked")])
               + b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n")
        first = c.response()
        c.send(request_bytes("GET", "/after"))
        after = c.response()
    assert first.status == 200 and first.body == b"POST /chunked\nhello world"
    assert after.body == b"GET /after\n"
    p1, p2 = primary.wait_for(2)
    assert (p1.target, p1.body) == ("/chunked", b"hello world")
    assert p2.target == "/after"


def test_expect_100_continue_gets_100_then_the_final_response(
    servers: Servers, relay: Relays
) -> None:
    primary = servers()
    r = relay(primary)
    with r.raw() as c:
        c.send(request_bytes("POST", "/expect",
                             [("Expect", "100-continue"), ("Content-Length", "11")]))
        try:
            interim = c.response(timeout=5)
        except TimeoutError:
            pytest.fail("no response to Expect: 100-continue within 5s (the client waits for "
                        "100 Continue before sending the body)")
        assert interim.status == 100, interim
        c.send(b"hello world")
        final = c.response()
    assert final.status == 200 and final.body == b"POST /expect\nhello world"
    (got,) = primary.wait_for(1)
    assert got.body == b"hello world"


# --------------------------------------------------------------------------- failures


def test_unreachable_primary_gets_502_from_the_gateway(relay: Relays) -> None:
    r = relay(free_port())  # nothing listens there
    with r.client() as client:
        response = client.get("/anything")
    assert response.status_code == 502
    assert response.headers.get("X-Mirrorgate-Error"), response.headers


def test_hung_primary_gets_504_after_primary_timeout(servers: Servers, relay: Relays) -> None:
    primary = servers(Reply(hang=True))
    r = relay(primary, listener={"primary_timeout": "1s"})
    with r.client() as client:
        try:
            response = client.get("/slow")
        except httpx.ReadTimeout:
            pytest.fail("no response within 10s from a gateway with primary_timeout = 1s")
    assert response.status_code == 504
    assert response.headers.get("X-Mirrorgate-Error"), response.headers
    assert primary.targets == ["/slow"]


@pytest.mark.parametrize("reply", [
    pytest.param(Reply(200, (), b"x" * 1000, truncate=100), id="content-length"),
    pytest.param(Reply(200, (), chunks=[b"y" * 100, b"z" * 100], truncate=50), id="chunked"),
])
def test_primary_closing_mid_response_closes_the_client_connection(
    servers: Servers, relay: Relays, reply: Reply
) -> None:
    r = relay(servers(reply))
    with r.raw() as c:
        c.send(request_bytes("GET", "/cut"))
        data, closed = c.read_to_close()
    assert closed, f"client connection left open after the primary broke off; got {data!r}"
    parsed = parse_response(data) if data else None
    assert parsed is None or parsed[0].status == 502, (
        f"the client got a whole response for one the primary cut short: {data[:300]!r}")


# --------------------------------------------------------------------------- routes


def test_routes_send_matching_requests_to_their_own_primary_and_mirror(
    servers: Servers, relay: Relays
) -> None:
    main, main_mirror, push, push_mirror = servers(), servers(), servers(), servers()
    route = Route(push, {"prefix": "/api/v1/push", "methods": ["POST"], "host": "mimir.example"},
                  [MirrorTo(push_mirror, "push-shadow")])
    r = relay(main, [MirrorTo(main_mirror, "shadow")], [route])
    cases = [
        ("POST", "/api/v1/push?tenant=1", "mimir.example"),  # the route
        ("GET", "/api/v1/push", "mimir.example"),  # another method
        ("POST", "/api/v1/push", "other.example"),  # another host
        ("POST", "/api/v1/query", "mimir.example"),  # another path
    ]
    with r.client() as client:
        for method, target, host in cases:
            body = b"b" if method == "POST" else None
            response = client.request(method, target, headers={"Host": host}, content=body)
            assert response.status_code == 200
    assert push.targets == ["/api/v1/push?tenant=1"]
    assert main.targets == ["/api/v1/push", "/api/v1/push", "/api/v1/query"]
    assert [q.method for q in main.requests] == ["GET", "POST", "POST"]
    r.at_rest("push-shadow")
    r.at_rest("shadow")
    assert push_mirror.targets == ["/api/v1/push?tenant=1"]
    assert main_mirror.targets == ["/api/v1/push", "/api/v1/push", "/api/v1/query"]


def test_the_pure_python_parser_serves_the_same_traffic(servers: Servers,
                                                        tmp_path: Path) -> None:
    # h11 is the fallback where httptools is missing; MIRRORGATE_HTTP_PARSER=h11
    # selects it here, and the same bytes must come out of the relay.
    primary, mirror = servers(), servers()
    ports = GatewayPorts()
    gw = GatewayProcess(http_config(ports, primary, [MirrorTo(mirror)]), workdir=tmp_path,
                        env={"MIRRORGATE_HTTP_PARSER": "h11"})
    gw.start()
    try:
        gw.wait_ready(ports.listen, timeout=15)
        assert "requests parsed by h11" in gw.log()
        with RawClient(ports.listen) as c:
            c.send(request_bytes("GET", "/h/1") + request_bytes("POST", "/h/2", body=b"two")
                   + request_bytes("POST", "/h/3", headers=[("Transfer-Encoding", "chunked")],
                                   body=b"3\r\nabc\r\n0\r\n\r\n"))
            got = [c.response() for _ in range(3)]
        assert [x.body for x in got] == [b"GET /h/1\n", b"POST /h/2\ntwo", b"POST /h/3\nabc"]
        assert [(r.target, r.body) for r in mirror.wait_for(3)] == [
            ("/h/1", b""), ("/h/2", b"two"), ("/h/3", b"abc")]
    finally:
        assert gw.stop() == 0, gw.log_tail()


def test_a_half_closed_client_gets_its_answer_then_the_connection_closes(
    servers: Servers, relay: Relays
) -> None:
    r = relay(servers())
    with r.raw() as c:
        c.send(request_bytes("POST", "/half", body=b"last words"))
        c.sock.shutdown(socket.SHUT_WR)  # like `curl` piping a request, then EOF
        data, closed = c.read_to_close()
    parsed = parse_response(data)
    assert parsed is not None, f"no whole response: {data!r}"
    response = parsed[0]
    assert response.status == 200 and response.body == b"POST /half\nlast words"
    assert closed, "the gateway kept a half-closed connection open after answering"


def test_a_primary_that_stalls_mid_response_is_cut_after_primary_timeout(
    servers: Servers, relay: Relays
) -> None:
    stalled = threading.Event()  # never set: the primary sends 10 bytes, then nothing
    body = b"x" * 100
    r = relay(servers(Reply(200, (), body, pause_at=10, resume=stalled)),
              listener={"primary_timeout": "1s"})
    try:
        with r.raw(timeout=20) as c:
            c.send(request_bytes("GET", "/stall"))
            data, closed = c.read_to_close(timeout=20)
    finally:
        stalled.set()
    assert closed, "the gateway held the client on a primary that stopped sending"
    head, _, got = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 100" in head
    assert got == body[:10]  # cut, never completed or padded
    assert "sent nothing for 1s in the middle of a response" in r.gw.log()
