# Mirroring HTTP requests, through the real gateway, to real HTTP servers
# (issue 3, item 3; design.md §1, §5).
#
# Owns: the evidence that each mirror gets a copy of each request with its own
# header rewrites and in the order its client connection sent them; that
# sampling, max_body, retries and the status-class outcomes work as
# configured; that a hung or absent mirror costs the client nothing; and that
# every unit is accounted for (offered = delivered + dropped + queued +
# in_flight), with the right drop reason, down to shutdown.
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import pytest

from tests.integration.http_fixtures import MirrorTo, Relay, nonzero
from tests.integration.http_fixtures import relay as relay
from tests.integration.http_fixtures import servers as servers
from tests.support.httpserver import HttpServer, Reply, Request, echo_body
from tests.support.net import free_port
from tests.support.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Servers = Callable[..., HttpServer]
Relays = Callable[..., Relay]


OK = Reply(200)


def _statuses(first: Sequence[Reply], then: Reply = OK) -> Callable[[Request], Reply]:
    """A behaviour that answers with ``first`` in turn, then ``then`` for good."""
    replies: Iterator[Reply] = iter(first)
    return lambda request: next(replies, then)


def _post_all(r: Relay, targets: Sequence[str], body: bytes = b"payload",
              headers: dict[str, str] | None = None) -> None:
    """POST each target on one connection; each must get the primary's echo."""
    with r.client() as client:
        for target in targets:
            response = client.post(target, content=body, headers=headers)
            assert response.status_code == 200, response
            assert response.content == f"POST {target}\n".encode() + body


# --------------------------------------------------------------------------- copies


def test_each_mirror_gets_a_copy_with_its_own_rewrites(servers: Servers, relay: Relays) -> None:
    primary, rewritten, suffixed, plain = servers(), servers(), servers(), servers()
    r = relay(primary, [
        MirrorTo(rewritten, "rewritten", {
            "set_headers": {"X-Scope-OrgID": "shadow", "X-Added": "yes"},
            "remove_headers": ["Authorization"],
            "host_rewrite": "m1.internal",
        }),
        MirrorTo(suffixed, "suffixed", {"shadow_suffix": True}),
        MirrorTo(plain, "plain"),
    ])
    body = b"\x00\x01snappy-frame" * 100
    headers = [("Host", "mimir.example"), ("Authorization", "Bearer s3cret"),
               ("X-Scope-OrgID", "tenant-1"), ("X-Custom", "kept"),
               ("Content-Type", "application/x-protobuf")]
    with r.client() as client:
        response = client.post("/api/v1/push?x=1", content=body, headers=headers)
    assert response.status_code == 200
    assert response.content == b"POST /api/v1/push?x=1\n" + body

    (p,) = primary.wait_for(1)
    assert p.values("Authorization") == ["Bearer s3cret"]
    assert p.values("X-Scope-OrgID") == ["tenant-1"]
    assert p.values("Host") == ["mimir.example"]
    for name in ("rewritten", "suffixed", "plain"):
        c = r.at_rest(name)
        assert (c.offered, nonzero(c.delivered)) == (1, {"2xx": 1}), (name, c)
    copies = {"rewritten": rewritten.requests, "suffixed": suffixed.requests,
              "plain": plain.requests}
    for name, got in copies.items():
        assert [(q.method, q.target, q.body) for q in got] == [
            ("POST", "/api/v1/push?x=1", body)], name
        assert got[0].values("X-Custom") == ["kept"], name
    (a,), (b,), (c_,) = copies.values()
    assert a.values("X-Scope-OrgID") == ["shadow"]
    assert a.values("X-Added") == ["yes"]
    assert a.values("Authorization") == []
    assert a.values("Host") == ["m1.internal"]
    assert b.values("Host") == ["mimir.example-shadow"]
    assert b.values("Authorization") == ["Bearer s3cret"]
    assert b.values("X-Scope-OrgID") == ["tenant-1"]
    assert c_.values("Host") == ["mimir.example"]  # no -shadow unless asked
    assert c_.values("Authorization") == ["Bearer s3cret"]


def test_mirror_gets_each_connections_requests_in_order(
    servers: Servers, relay: Relays
) -> None:
    def behaviour(request: Request) -> Reply:
        # Some answers are slow, so the mirror's queues fill and drain unevenly.
        slow = int(request.header("X-Seq") or 0) % 5 == 0
        return Reply(200, (), b"", delay=0.02 if slow else 0.0)

    mirror = servers(behaviour)
    r = relay(servers(), [MirrorTo(mirror, "shadow")])
    n = 25
    with r.client() as a, r.client() as b:
        for i in range(n):
            for name, client in (("a", a), ("b", b)):
                response = client.post(f"/{name}/{i}", content=f"{name}{i}".encode(),
                                       headers={"X-Client": name, "X-Seq": str(i)})
                assert response.status_code == 200
    c = r.at_rest("shadow")
    assert (c.offered, nonzero(c.delivered)) == (2 * n, {"2xx": 2 * n})
    seen: dict[str, list[int]] = defaultdict(list)
    for q in mirror.requests:
        client_name = q.header("X-Client") or "?"
        seen[client_name].append(int(q.header("X-Seq") or -1))
        assert q.body == f"{client_name}{q.header('X-Seq')}".encode()
    assert seen == {"a": list(range(n)), "b": list(range(n))}


# --------------------------------------------------------------------------- sampling


def test_percent_zero_offers_nothing_and_counts_every_request_skipped(
    servers: Servers, relay: Relays
) -> None:
    primary, mirror = servers(), servers()
    r = relay(primary, [MirrorTo(mirror, "shadow", {"percent": 0})])
    _post_all(r, [f"/zero/{i}" for i in range(20)])
    assert len(primary.requests) == 20
    c = r.at_rest("shadow")
    assert (c.offered, c.skipped) == (0, 20)
    assert mirror.requests == []


def test_percent_fifty_mirrors_some_and_skips_the_rest(servers: Servers, relay: Relays) -> None:
    mirror = servers()
    r = relay(servers(), [MirrorTo(mirror, "shadow", {"percent": 50})])
    n = 200
    _post_all(r, [f"/half/{i}" for i in range(n)], body=b"")
    c = r.at_rest("shadow")
    assert c.offered + c.skipped == n
    assert 0 < c.offered < n, c
    assert nonzero(c.delivered) == {"2xx": c.offered}
    assert len(mirror.requests) == c.offered


def test_sample_by_mirrors_all_or_none_of_each_tenant(servers: Servers, relay: Relays) -> None:
    mirror = servers()
    r = relay(servers(), [MirrorTo(mirror, "shadow",
                                   {"percent": 50, "sample_by": "X-Scope-OrgID"})])
    tenants, each = 16, 4
    with r.client() as client:
        for round_ in range(each):
            for t in range(tenants):
                response = client.post(f"/push/{t}/{round_}", content=b"s",
                                       headers={"X-Scope-OrgID": f"tenant-{t}"})
                assert response.status_code == 200
    c = r.at_rest("shadow")
    assert c.offered + c.skipped == tenants * each
    per_tenant: dict[str, int] = defaultdict(int)
    for q in mirror.requests:
        per_tenant[q.header("X-Scope-OrgID") or "?"] += 1
    assert set(per_tenant.values()) == {each}, per_tenant  # all of a tenant, or none
    assert 0 < len(per_tenant) < tenants, per_tenant
    assert c.offered == len(per_tenant) * each


# --------------------------------------------------------------------------- max_body


def test_a_mirror_without_rules_gets_a_length_and_no_expect(
    servers: Servers, relay: Relays
) -> None:
    # Such a mirror may be sent the primary's own head; not when that head
    # asks the primary hop to Expect, nor when it frames a chunked body.
    primary, plain = servers(), servers()
    r = relay(primary, [MirrorTo(plain, "plain")])
    with r.client() as client:
        assert client.post("/length", content=b"one").status_code == 200
        assert client.post("/expect", content=b"two",
                           headers={"Expect": "100-continue"}).status_code == 200
        assert client.post("/chunked", content=iter([b"th", b"ree"])).status_code == 200
    got = plain.wait_for(3)
    assert [(q.target, q.body) for q in got] == [
        ("/length", b"one"), ("/expect", b"two"), ("/chunked", b"three")]
    for q in got:
        assert q.values("Content-Length") == [str(len(q.body))], q
        assert q.values("Expect") == [] and q.values("Transfer-Encoding") == [], q
        assert len(q.values("X-Forwarded-For")) == 1, q
    assert primary.wait_for(3)[1].values("Expect") == ["100-continue"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_mirror_max_body_goes_whole_to_the_primary_and_not_to_the_mirror(
    servers: Servers, relay: Relays, chunked: bool
) -> None:
    primary, mirror = servers(), servers()
    r = relay(primary, [MirrorTo(mirror, "shadow", {"max_body": "1KiB"})])
    big = bytes(range(256)) * 16  # 4 KiB
    with r.client() as client:
        content = iter([big[:1024], big[1024:3000], big[3000:]]) if chunked else big
        response = client.post("/big", content=content)
        assert response.content == b"POST /big\n" + big
        response = client.post("/small", content=b"0123456789")
        assert response.content == b"POST /small\n0123456789"
    assert [(q.target, q.body) for q in primary.requests] == [
        ("/big", big), ("/small", b"0123456789")]
    c = r.at_rest("shadow")
    assert c.dropped.get("too_large") == 1, c
    assert nonzero(c.delivered) == {"2xx": 1}
    assert [(q.target, q.body) for q in mirror.requests] == [("/small", b"0123456789")]


# --------------------------------------------------------------------------- outcomes


def test_mirror_status_class_is_the_delivered_outcome(servers: Servers, relay: Relays) -> None:
    mirror = servers(lambda q: Reply(int(q.target.rsplit("/", 1)[1]), (), b"mirror says no"))
    r = relay(servers(), [MirrorTo(mirror, "shadow")])
    _post_all(r, ["/status/201", "/status/404", "/status/503"])
    c = r.at_rest("shadow")
    assert nonzero(c.delivered) == {"2xx": 1, "4xx": 1, "5xx": 1}, c
    assert c.dropped_total == 0


def test_mirror_5xx_is_retried_until_it_succeeds(servers: Servers, relay: Relays) -> None:
    mirror = servers(_statuses([Reply(503), Reply(503)]))
    r = relay(servers(), [MirrorTo(mirror, "shadow", {"retries": 2})])
    _post_all(r, ["/retry"], body=b"same body each time")
    c = r.at_rest("shadow")
    assert nonzero(c.delivered) == {"2xx": 1}, c
    assert c.dropped_total == 0
    assert [(q.target, q.body) for q in mirror.requests] == [
        ("/retry", b"same body each time")] * 3


def test_mirror_429_is_retried_after_retry_after(servers: Servers, relay: Relays) -> None:
    mirror = servers(_statuses([Reply(429, [("Retry-After", "1")])]))
    r = relay(servers(), [MirrorTo(mirror, "shadow", {"retries": 1})])
    _post_all(r, ["/limited"])
    c = r.at_rest("shadow")
    assert nonzero(c.delivered) == {"2xx": 1}, c
    assert mirror.targets == ["/limited", "/limited"]


def test_mirror_4xx_other_than_429_is_never_retried(servers: Servers, relay: Relays) -> None:
    mirror = servers(Reply(400, (), b"bad"))
    r = relay(servers(), [MirrorTo(mirror, "shadow", {"retries": 3})])
    _post_all(r, ["/refused"])
    c = r.at_rest("shadow")
    assert nonzero(c.delivered) == {"4xx": 1}, c
    assert mirror.targets == ["/refused"]


# --------------------------------------------------------------------------- failures


def test_hung_mirror_never_holds_up_the_client(servers: Servers, relay: Relays) -> None:
    primary, hung = servers(), servers(Reply(hang=True))
    r = relay(primary, [MirrorTo(hung, "hung", {"timeout": "500ms", "queue": 4})])
    n = 20
    # Every answer is the primary's while the mirror holds every request it
    # gets; a stall would be caught by this module's timeout.
    with r.client() as a, r.client() as b:
        for i in range(n):
            for name, client in (("a", a), ("b", b)):
                response = client.post(f"/{name}/{i}", content=b"x")
                assert response.status_code == 200
                assert response.content == f"POST /{name}/{i}\nx".encode()
    assert len(primary.requests) == 2 * n
    c = r.at_rest("hung", timeout=30)
    assert c.offered == 2 * n
    assert c.delivered_total == 0
    assert c.dropped.get("mirror_timeout", 0) >= 1, c
    assert c.dropped.get("queue_full", 0) >= 1, c
    others = {k: v for k, v in c.dropped.items() if v and k not in ("mirror_timeout", "queue_full")}
    assert not others, c


def test_unreachable_mirror_drops_mirror_unavailable_and_the_client_is_served(
    servers: Servers, relay: Relays
) -> None:
    primary = servers()
    r = relay(primary, [MirrorTo(free_port(), "gone", {"timeout": "1s"})])
    _post_all(r, [f"/gone/{i}" for i in range(10)])
    assert len(primary.requests) == 10
    c = r.at_rest("gone")
    assert c.offered == 10
    assert c.delivered_total == 0
    assert nonzero(c.dropped) == {"mirror_unavailable": 10}, c


def test_sigterm_drops_queued_units_as_shutdown_and_exits_0(
    servers: Servers, relay: Relays
) -> None:
    hung = servers(Reply(hang=True))
    r = relay(servers(), [MirrorTo(hung, "slow", {"timeout": "60s", "queue": 50})],
              general={"shutdown_timeout": "1s"})
    _post_all(r, [f"/last/{i}" for i in range(5)])

    def all_waiting() -> bool:
        c = r.counts("slow")
        return c.offered == 5 and c.queue_units + c.in_flight == 5

    eventually(all_waiting, "5 units offered to the hung mirror and all queued or in flight")
    before = r.counts("slow")
    assert before.delivered_total == 0 and before.dropped_total == 0
    assert r.gw.stop() == 0, r.gw.log_tail()
    found = re.search(r"(\d+) mirror units dropped as shutdown", r.gw.log())
    assert found, r.gw.log_tail()
    # offered == delivered + dropped: every waiting unit became a shutdown drop.
    assert int(found.group(1)) == before.offered, (
        f"{before.queue_units:.0f} units queued and {before.in_flight:.0f} in flight at "
        f"SIGTERM, but the final line counts {found.group(1)} shutdown drops")


def test_mirror_copy_keeps_the_client_body_exactly(servers: Servers, relay: Relays) -> None:
    mirror = servers(lambda q: Reply(200, (), echo_body(q)))
    r = relay(servers(), [MirrorTo(mirror, "shadow")])
    body = bytes(range(256)) * 1024  # 256 KiB, every byte value
    _post_all(r, ["/binary"], body=body)
    c = r.at_rest("shadow")
    assert nonzero(c.delivered) == {"2xx": 1}
    (got,) = mirror.requests
    assert got.body == body
