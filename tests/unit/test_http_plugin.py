"""The HTTP plugin's config keys, routing, sampling and the mirror's copy of a request."""
from __future__ import annotations

import random

import pytest

from gateway.config import ConfigError, Mirror, Upstream, parse_config
from gateway_http import HttpProtocol
from gateway_http.options import HttpMirrorOptions, Route
from gateway_http.parse import H11RequestParser, HttptoolsRequestParser
from gateway_http.relay import gateway_response
from gateway_http.replayer import MirrorRequest, Rewrite, shadow_host
from gateway_http.routing import RouteTarget, sampled

BASE = """
[admin]
listen = false

[[upstream]]
name = "a"
url = "http://127.0.0.1:8080"

[[upstream]]
name = "b"
url = "http://127.0.0.1:8090"

[[upstream]]
name = "c"
url = "http://127.0.0.1:8091"

[[listener]]
name = "web"
protocol = "http"
listen = "127.0.0.1:8081"
primary = "a"
"""


def parse(text: str):  # type: ignore[no-untyped-def]
    return parse_config(text, {"http": HttpProtocol})


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return [f"{p.path}: {p.message}" for p in info.value.problems]


def test_every_key_of_the_issue_is_read() -> None:
    config = parse(BASE + """
max_body = "1MiB"
max_header_bytes = "16KiB"
forwarded_for = false
primary_timeout = "2s"
idle_timeout = "30s"

[[listener.mirror]]
upstream = "b"
name = "shadow"
percent = 25
sample_by = "X-Scope-OrgID"
set_headers = { "X-Scope-OrgID" = "shadow" }
remove_headers = ["Authorization"]
host_rewrite = "mimir-b.internal"
shadow_suffix = true
max_body = "2KiB"
timeout = "250ms"
queue = 7
queue_bytes = "1MiB"
retries = 2

[[listener.route]]
prefix = "/api/v1/push"
methods = ["POST"]
host = "mimir.example"
primary = "b"

[[listener.route.mirror]]
upstream = "c"
""")
    (listener,) = config.listeners
    opts = listener.options
    assert (opts.max_body, opts.max_header_bytes, opts.forwarded_for) == (1 << 20, 16384, False)
    assert (opts.primary_timeout, opts.idle_timeout) == (2.0, 30.0)
    (mirror,) = listener.mirrors
    assert (mirror.name, mirror.queue, mirror.queue_bytes, mirror.timeout) == (
        "shadow", 7, 1 << 20, 0.25)
    m = mirror.options
    assert m == HttpMirrorOptions(percent=25.0, sample_by="X-Scope-OrgID",
                                  set_headers={"X-Scope-OrgID": "shadow"},
                                  remove_headers=("Authorization",),
                                  host_rewrite="mimir-b.internal", shadow_suffix=True,
                                  max_body=2048, retries=2)
    (route,) = opts.route
    assert isinstance(route, Route)
    assert (route.prefix, route.methods, route.host, route.primary) == (
        "/api/v1/push", ("POST",), "mimir.example", "b")
    assert [m.upstream for m in route.mirror] == ["c"]
    assert route.mirror[0].options == HttpMirrorOptions()


@pytest.mark.parametrize(("keys", "where", "fragment"), [
    ("percent = 101", "listener[0].mirror[0].percent", "between 0 and 100"),
    ("retries = -1", "listener[0].mirror[0].retries", "between 0 and 10"),
    ('remove_headers = ["Bad Header"]', "listener[0].mirror[0].remove_headers",
     "not a valid header name"),
    ('set_headers = { "X-A" = "a\\r\\nInjected: 1" }', "listener[0].mirror[0].set_headers",
     "one line"),
    ('host_rewrite = "a b"', "listener[0].mirror[0].host_rewrite", "host name"),
    ("exposure = 0.5", "listener[0].mirror[0].exposure", "unknown key"),
])
def test_bad_mirror_keys_are_reported_at_their_key(keys: str, where: str, fragment: str) -> None:
    found = problems(BASE + f'\n[[listener.mirror]]\nupstream = "b"\n{keys}\n')
    assert any(p.startswith(where) and fragment in p for p in found), found


def test_route_primary_and_mirrors_are_checked_like_the_listeners() -> None:
    found = problems(BASE + """
[[listener.route]]
prefix = "api"
primary = "nowhere"

[[listener.route.mirror]]
upstream = "a"
""")
    assert any(p.startswith("listener[0].route[0].prefix") for p in found), found
    assert any(p.startswith("listener[0].route[0].primary") and "nowhere" in p
               for p in found), found


def test_a_route_mirror_that_is_the_routes_primary_is_refused() -> None:
    found = problems(BASE + """
[[listener.route]]
prefix = "/x"
primary = "b"

[[listener.route.mirror]]
upstream = "b"
""")
    assert any("primary 'b' itself" in p for p in found), found


def test_an_http_upstream_url_names_a_server_only() -> None:
    found = problems(BASE.replace("http://127.0.0.1:8090", "http://127.0.0.1:8090/prefix"))
    assert any(p.startswith("upstream[1].url") and "not a path" in p for p in found), found


def _upstream(name: str) -> Upstream:
    return Upstream(name=name, url=f"http://{name}:80", scheme="http", host=name, port=80,
                    database=None, user=None)


def test_routes_match_prefix_method_and_host() -> None:
    target = RouteTarget(b"/api/", frozenset({b"POST"}), b"mimir.example", _upstream("a"), [])
    assert target.matches(b"POST", b"/api/v1/push", b"mimir.example")
    assert target.matches(b"POST", b"/api/v1/push", b"MIMIR.example:8080")
    assert not target.matches(b"post", b"/api/v1/push", b"mimir.example")  # case-sensitive
    assert not target.matches(b"GET", b"/api/v1/push", b"mimir.example")
    assert not target.matches(b"POST", b"/other", b"mimir.example")
    assert not target.matches(b"POST", b"/api/v1/push", b"other.example")
    assert not target.matches(b"POST", b"/api/v1/push", None)
    with_port = RouteTarget(b"/", frozenset(), b"mimir.example:8080", _upstream("a"), [])
    assert with_port.matches(b"GET", b"/", b"mimir.example:8080")
    assert not with_port.matches(b"GET", b"/", b"mimir.example")
    v6 = RouteTarget(b"/", frozenset(), b"[::1]", _upstream("a"), [])
    assert v6.matches(b"GET", b"/", b"[::1]:8080")
    anything = RouteTarget(b"/", frozenset(), None, _upstream("a"), [])
    assert anything.matches(b"DELETE", b"/x", None)


class _FakeMirror:
    def __init__(self, **options: object) -> None:
        self.config = Mirror(name="m", upstream="b", options=HttpMirrorOptions(**options))


def test_percent_samples_per_request() -> None:
    random.seed(7)
    mirror = _FakeMirror(percent=30)
    taken = sum(sampled(mirror, []) for _ in range(4000))  # type: ignore[arg-type]
    assert 1000 < taken < 1400
    assert all(sampled(_FakeMirror(percent=100), []) for _ in range(50))  # type: ignore[arg-type]
    assert not any(sampled(_FakeMirror(percent=0), []) for _ in range(50))  # type: ignore[arg-type]


def test_sample_by_is_consistent_per_header_value() -> None:
    mirror = _FakeMirror(percent=50, sample_by="X-Scope-OrgID")
    verdicts = {}
    for tenant in (b"tenant-%d" % i for i in range(200)):
        first = sampled(mirror, [(b"x-scope-orgid", tenant)])  # type: ignore[arg-type]
        again = [sampled(mirror, [(b"X-Scope-OrgID", tenant)])  # type: ignore[arg-type]
                 for _ in range(5)]
        assert again == [first] * 5
        verdicts[tenant] = first
    assert 60 < sum(verdicts.values()) < 140  # about half of the tenants


@pytest.mark.parametrize("impl", ["httptools", "h11"])
def test_hop_by_hop_headers_and_those_connection_names_are_not_forwarded(impl: str) -> None:
    parser = HttptoolsRequestParser if impl == "httptools" else H11RequestParser
    (head, *_) = parser().feed(
        b"POST / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nExpect: 100-continue\r\n"
        b"Transfer-Encoding: chunked\r\nProxy-Connection: x\r\nTrailer: x\r\n"
        b"Proxy-Authenticate: x\r\nX-Kept: yes\r\n\r\n")
    assert head.forward == [(b"Host", b"h"), (b"Expect", b"100-continue"), (b"X-Kept", b"yes")]
    (head, *_) = parser().feed(b"GET / HTTP/1.1\r\nhost: h\r\nConnection: close\r\n"
                             b"Content-Length: 0\r\nX-Kept: yes\r\n\r\n")
    assert head.forward == [(b"host", b"h"), (b"X-Kept", b"yes")]


def test_gateway_responses_are_marked_and_close() -> None:
    raw = gateway_response(502, "primary a unreachable: refused")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"\r\nX-Mirrorgate-Error: primary a unreachable: refused" in head
    assert b"\r\nConnection: close" in head
    assert b"Content-Length: %d" % len(body) in head
    assert gateway_response(504, "late", head_only=True).endswith(b"\r\n\r\n")


def _request(**options: object) -> bytes:
    rewrite = Rewrite(HttpMirrorOptions(**options))
    req = MirrorRequest(b"POST", b"/api/v1/push?x=1", [
        (b"Host", b"mimir.example:8080"), (b"Authorization", b"Bearer s"),
        (b"X-Scope-OrgID", b"t1"), (b"Expect", b"100-continue"), (b"X-Other", b"o")], True,
        120)
    return rewrite.request(req, b"body!")


def test_the_mirror_copy_keeps_the_request_and_drops_expect() -> None:
    raw = _request()
    assert raw == (b"POST /api/v1/push?x=1 HTTP/1.1\r\nHost: mimir.example:8080\r\n"
                   b"Authorization: Bearer s\r\nX-Scope-OrgID: t1\r\nX-Other: o\r\n"
                   b"Content-Length: 5\r\n\r\nbody!")


def test_a_mirror_without_rules_takes_the_primarys_head_as_it_is() -> None:
    head = b"POST /p HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\nContent-Length: 5\r\n\r\n"
    req = MirrorRequest(b"POST", b"/p", [(b"Host", b"h"), (b"X-Forwarded-For", b"1.2.3.4")],
                        True, len(head), head)
    assert Rewrite(HttpMirrorOptions()).request(req, b"body!") == head + b"body!"
    # Any rule, and the head is rebuilt with it.
    for options in ({"set_headers": {"X-A": "1"}}, {"remove_headers": ("x-forwarded-for",)},
                    {"host_rewrite": "m"}, {"shadow_suffix": True}):
        raw = Rewrite(HttpMirrorOptions(**options)).request(req, b"body!")  # type: ignore[arg-type]
        assert raw != head + b"body!" and raw.endswith(b"Content-Length: 5\r\n\r\nbody!")


def test_the_mirror_copy_gets_its_rewrites() -> None:
    raw = _request(set_headers={"x-scope-orgid": "shadow"}, remove_headers=("authorization",),
                   host_rewrite="mimir-b.internal")
    assert raw == (b"POST /api/v1/push?x=1 HTTP/1.1\r\nHost: mimir-b.internal\r\n"
                   b"X-Other: o\r\nx-scope-orgid: shadow\r\nContent-Length: 5\r\n\r\nbody!")
    assert b"\r\nHost: mimir-shadow.example:8080\r\n" not in raw
    assert b"\r\nHost: mimir.example-shadow:8080\r\n" in _request(shadow_suffix=True)


def test_shadow_host_goes_before_the_port() -> None:
    assert shadow_host(b"mimir") == b"mimir-shadow"
    assert shadow_host(b"mimir:9009") == b"mimir-shadow:9009"
    assert shadow_host(b"[::1]:80") == b"[::1]-shadow:80"
