"""Tests of trafficthreshold.farm against a real redis-server: live counts
published per host and summed, hosts that die dropping out, one leader with
a fencing token."""
from __future__ import annotations

import time

import pytest

from trafficthreshold.farm import LEASE_SCRIPT, Lease, farm_live, publish_live
from tt_redis import RedisServer

pytestmark = pytest.mark.redis
NOW = 1_800_000_000.0


def test_the_farm_is_the_sum_of_its_live_hosts(redis_server: RedisServer) -> None:
    r = redis_server.client()
    for i, host in enumerate(("web1", "web2", "web3")):
        publish_live(r, host, {("all", "pageview"): (10 + i, 40 + i), ("acme", "pageview"): (i, i)},
                     level=i, now=NOW, last_roll=NOW - 30)
    # Publishing again is idempotent: absolute values, not increments.
    publish_live(r, "web2", {("all", "pageview"): (11, 41), ("acme", "pageview"): (1, 1)},
                 level=1, now=NOW, last_roll=NOW - 30)
    farm = farm_live(r, now=NOW)
    assert farm.count("all", "pageview", "minute") == 33
    assert farm.count("all", "pageview", "60s") == 123
    assert farm.count("acme", "pageview", "minute") == 3
    assert [(h.host, h.alive, h.level) for h in farm.hosts] == [
        ("web1", True, 0), ("web2", True, 1), ("web3", True, 2)]
    assert farm.hosts[0].last_roll == NOW - 30


def test_a_host_that_stops_publishing_drops_out_within_its_ttl(
        redis_server: RedisServer) -> None:
    r = redis_server.client()
    publish_live(r, "web1", {("all", "pageview"): (5, 5)}, level=0, now=NOW)
    publish_live(r, "web2", {("all", "pageview"): (7, 7)}, level=0, now=NOW, ttl_ms=200)
    assert farm_live(r, now=NOW).count("all", "pageview", "minute") == 12
    time.sleep(0.4)  # web2 died: its hash expired on the server
    farm = farm_live(r, now=NOW)
    assert farm.count("all", "pageview", "minute") == 5
    assert {h.host: h.alive for h in farm.hosts} == {"web1": True, "web2": False}


def test_one_leader_and_a_paused_leader_cannot_lead(redis_server: RedisServer) -> None:
    """The lease itself; the fence of its writes is farmalerts' (test_farmalerts)."""
    r = redis_server.client()
    a, b = Lease(r, "web1", ttl_ms=300), Lease(r, "web2", ttl_ms=300)
    assert a.renew() and not b.renew()
    assert farm_live(r, now=NOW).leader == "web1"
    assert r.get("track~leader") == a.value.encode() == f"web1 {a.token}".encode()
    first = a.token
    time.sleep(0.5)  # web1 paused past its lease
    assert b.renew() and b.token > first
    assert not a.renew() and a.value is None  # no way back while web2 holds it
    assert b.renew() and b.token > first  # renewing keeps the token
    second = b.token
    b.release()  # at shutdown: the next host takes over at once, not after the TTL
    assert a.renew() and a.token > second


def test_a_redis_error_ends_the_lead_and_renewal_continues_the_same_lease(
        redis_server: RedisServer) -> None:
    """No answer: not leading (value None) at once; the next renewal with
    Redis back continues the lease still held under our value (same token)."""
    r = redis_server.client()
    a = Lease(r, "web1", ttl_ms=10_000)
    assert a.renew()
    token = a.token
    a._lease = lambda **kw: (_ for _ in ()).throw(ConnectionError("cut off"))
    with pytest.raises(ConnectionError):
        a.renew()
    assert a.value is None
    a._lease = r.register_script(LEASE_SCRIPT)
    assert a.renew() and a.token == token
