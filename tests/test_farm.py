"""Tests of trafficthreshold.farm against a real redis-server: live counts
published per host and summed, hosts that die dropping out, one leader with
a fencing token."""
from __future__ import annotations

import time

import pytest

from trafficthreshold.farm import Lease, farm_live, publish_live
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


def test_one_leader_and_a_paused_leader_cannot_write(redis_server: RedisServer) -> None:
    r = redis_server.client()
    a, b = Lease(r, "web1", ttl_ms=300), Lease(r, "web2", ttl_ms=300)
    assert a.renew() and not b.renew()
    assert a.fenced("track~alerts", {"burst": "firing"})
    assert farm_live(r, now=NOW).leader == "web1"
    first = a.token
    time.sleep(0.5)  # web1 paused past its lease
    assert b.renew() and b.token > first
    # web1 wakes up and tries to write with its old lease: refused.
    assert not a.fenced("track~alerts", {"burst": "resolved"})
    assert r.hget("track~alerts", "burst") == b"firing"
    assert not a.renew()  # and it cannot take the lease back while web2 holds it
    assert b.fenced("track~alerts", {"burst": "resolved"})
    second = b.token
    b.release()  # at shutdown: the next host takes over at once, not after the TTL
    assert a.renew() and a.token > second
