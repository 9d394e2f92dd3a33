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
    """The lease itself; the fence of its writes is alerts/farm.py's (test_alerts_farm)."""
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


def test_the_token_key_expires_and_lives_as_long_as_a_lease_is_held(
        redis_server: RedisServer) -> None:
    """One token key per lease prefix (per bus endpoint ever configured):
    it expires, but only ``token_keep_ms`` after the last take or renewal,
    far beyond the lease's TTL; tokens stay consecutive while it lives."""
    r = redis_server.client()
    a = Lease(r, "web1", ttl_ms=200)
    assert a.renew()
    keep = r.pttl(a.counter)
    assert farm.TOKEN_KEEP_MS - 5_000 < keep <= farm.TOKEN_KEEP_MS
    r.pexpire(a.counter, 60_000)
    assert a.renew() and r.pttl(a.counter) > 60_000  # a renewal keeps it alive
    first = a.token
    a.release()
    b = Lease(r, "web2", ttl_ms=200)
    assert b.renew() and b.token == first + 1  # consecutive (subscribe's BusLeases)
    b.release()
    c = Lease(r, "web3", ttl_ms=30, token_keep_ms=300)
    assert c.renew()
    c.release()
    time.sleep(0.5)
    assert not r.exists(c.counter) and not r.exists(c.key)  # nothing left behind


@pytest.mark.parametrize("how", ["expired", "lost"])
def test_a_holder_paused_past_the_token_keys_expiry_is_still_refused(
        redis_server: RedisServer, how: str) -> None:
    """A reset token key must not hand out a token again: the paused
    holder's value ("web1 <token>") would match the new lease of a
    restarted supervisor of the same name, and its fenced writes would
    pass.  A token taken without the key starts from Redis' clock in ms,
    above every token handed out before."""
    from trafficthreshold.alerts import AlertState
    from trafficthreshold.alerts.farm import FarmAlertStore, FencedOut

    r = redis_server.client()
    old = Lease(r, "web1", ttl_ms=40, token_keep_ms=400)
    assert old.renew()
    paused = old.value
    time.sleep(0.1)  # paused past its lease...
    if how == "expired":
        time.sleep(0.4)  # ... and past the token key's expiry
    else:
        r.delete(old.counter)  # ... and Redis lost the key (a flush, a failover)
    assert not r.exists(old.counter)
    new = Lease(r, "web1", ttl_ms=10_000)  # the same name restarted
    assert new.renew() and new.value != paused and new.token > old.token
    assert not old.renew() and old.value is None  # refused, its lease is gone
    with pytest.raises(FencedOut):  # its fenced writes too
        FarmAlertStore(r).save(paused, AlertState(), now=NOW)
    assert r.get(new.key) == new.value.encode()


def test_a_lease_succeeded_without_its_token_key_gets_a_larger_token(
        redis_server: RedisServer) -> None:
    """A restarted supervisor succeeds its SIGKILLed predecessor's lease
    (farm.Lease's "succeed") after the token key was lost: its token is
    above the predecessor's even when Redis' clock reads below it (a clock
    stepped back), so the predecessor's fence no longer holds."""
    r = redis_server.client()
    ahead = 10**13 + 5  # ms beyond Redis' clock (year 2286)
    r.set("track~leader", f"web1 {ahead}", px=10_000)
    new = Lease(r, "web1")
    assert new.renew() and new.token == ahead + 1
    assert r.get(new.counter) == str(ahead + 1).encode()


# ------------------------------------------- the live channel at scale (#25)

from trafficthreshold import farm, farmsync  # noqa: E402
from tt_proxy import TcpProxy  # noqa: E402

LEVEL = ("all", "pageview")


def level_total(r, host: str = "reader", window: str = "minute") -> int:
    return farm.farm_level(r, host, now=NOW, keys=[LEVEL]).count(*LEVEL, window)


def per_host_total(r, window: str = "minute") -> int:
    return farm_live(r, now=NOW).count(*LEVEL, window)


def behind_proxy(proxy, redis_server: RedisServer):
    """web2 (100) published directly; web1's publisher behind ``proxy``
    (the farm thread's client: short timeout, no retries)."""
    import redis

    c = redis.Redis(port=proxy.port, socket_timeout=0.3)
    farmsync.no_retries(c)
    r = redis_server.client()
    farm.LivePublisher(r, "web2", ttl_ms=60_000).publish({LEVEL: (100, 100)}, level=0, now=NOW)
    return c, r, farm.LivePublisher(c, "web1", ttl_ms=60_000)


def evalshas_run(r) -> int:
    return r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


def wait_evalshas(r, calls: int) -> None:
    """Until Redis ran ``calls`` EVALSHAs in all (a held publication ran)."""
    deadline = time.monotonic() + 5
    while evalshas_run(r) < calls:
        assert time.monotonic() < deadline, "the held publication never ran"
        time.sleep(0.01)


def test_a_second_sends_only_the_keys_that_changed(redis_server: RedisServer) -> None:
    """1,000 keys published; the next second one key changed: the second
    publication is a diff, a few hundred bytes into Redis, not the 1,000
    keys again (the bytes, not a timing)."""
    r = redis_server.client()
    pub = farm.LivePublisher(r, "web1")
    counts = {(f"shop{i}", "pageview"): (i + 1, i + 1) for i in range(1000)}
    counts[LEVEL] = (5, 5)

    def sent(fn) -> int:
        before = r.info("stats")["total_net_input_bytes"]
        fn()
        return r.info("stats")["total_net_input_bytes"] - before

    full = sent(lambda: pub.publish(counts, level=0, now=NOW))
    counts[("shop7", "pageview")] = (100, 100)
    diff = sent(lambda: pub.publish(counts, level=0, now=NOW + 1))
    assert pub.full == 1
    assert full > 20_000 and diff < 1_000, (full, diff)
    row = farm_live(r, now=NOW).hosts[0]
    assert row.counts == counts and row.at == NOW + 1
    # A key gone to zero leaves the hash.
    del counts[("shop7", "pageview")]
    pub.publish(counts, level=0, now=NOW + 2)
    (_, last), = r.xrevrange("track~live~log", count=1)
    assert last[b"d"] == b"shop7\0pageview\t"  # the diff: that key gone, nothing else
    assert farm_live(r, now=NOW).hosts[0].counts == counts


def test_the_level_is_one_read_of_the_sum_and_equals_the_hosts_sum(
        redis_server: RedisServer) -> None:
    """Three hosts' diffs, a host's key newly watched after it published, a
    minute turn: the watched sum always equals the per-host reading."""
    r = redis_server.client()
    pubs = {h: farm.LivePublisher(r, h) for h in ("web1", "web2", "web3")}
    for i, (h, pub) in enumerate(pubs.items()):
        pub.publish({LEVEL: (10 + i, 40 + i), ("acme", "pageview"): (i, i)}, level=0, now=NOW)
    assert level_total(r) == 33 == per_host_total(r)
    # ("acme", "pageview") is watched from its first level read on: in the
    # sums of each host from its next publication on (Redis cannot sum it
    # from the blobs); meanwhile the reader says it is short.
    acme_reader = farm.LevelReader(r, "web2", [("acme", "pageview")])
    acme_reader.read(NOW)
    assert acme_reader.short == [("acme", "pageview")]
    pubs["web2"].publish({LEVEL: (20, 50), ("acme", "pageview"): (4, 4)}, level=0, now=NOW + 1)
    # web2 learnt the watch set from its reply: its next publication sends it.
    pubs["web2"].publish({LEVEL: (20, 50), ("acme", "pageview"): (4, 4)}, level=0, now=NOW + 1)
    for host in ("web1", "web3", "web1", "web3"):  # each: its reply, then the key
        pubs[host].publish({LEVEL: (10 + int(host[-1]) - 1, 40 + int(host[-1]) - 1),
                            ("acme", "pageview"): (int(host[-1]) - 1,) * 2}, level=0, now=NOW)
    acme = acme_reader.read(NOW + 1)
    assert acme_reader.short == []
    assert acme.count("acme", "pageview", "60s") == 6
    assert acme.own("web2", ("acme", "pageview"), "60s") == 4
    assert level_total(r) == 42 == per_host_total(r)
    assert farm.farm_level(r, "x", now=NOW, keys=[("acme", "pageview")]).count(
        "acme", "pageview", "minute") == 6
    # The minute turns on web1: its count closes (kept as "the minute before").
    pubs["web1"].publish({LEVEL: (0, 40)}, previous={LEVEL: 10}, level=0, now=NOW + 60)
    assert level_total(r) == 32 == per_host_total(r)
    assert level_total(r, window="60s") == 132 == per_host_total(r, "60s")
    rows = {row.host: row for row in farm_live(r, now=NOW).hosts}
    assert rows["web1"].previous == {LEVEL: 10}


def test_a_dead_host_leaves_the_sum_within_its_ttl(redis_server: RedisServer) -> None:
    r = redis_server.client()
    farm.LivePublisher(r, "web1").publish({LEVEL: (5, 5)}, level=0, now=NOW)
    farm.LivePublisher(r, "web2", ttl_ms=200).publish({LEVEL: (7, 7)}, level=0, now=NOW)
    assert level_total(r) == 12
    time.sleep(0.4)  # web2 died: the next script on the farm reaps it
    assert level_total(r) == 5
    assert not r.exists("track~live:web2")
    assert r.zrange("track~live~alive", 0, -1) == [b"web1"]


def test_a_dead_hosts_hash_gone_before_its_reaping_rebuilds_the_sum(
        redis_server: RedisServer) -> None:
    """A farm stopped whole for longer than the live keys' expiry, one
    host's hash expired before anyone reaped it: its share cannot be
    subtracted; the sums are rebuilt from the live hosts."""
    r = redis_server.client()
    farm.LivePublisher(r, "web1").publish({LEVEL: (5, 5)}, level=0, now=NOW)
    farm.LivePublisher(r, "web2", ttl_ms=200).publish({LEVEL: (7, 7)}, level=0, now=NOW)
    assert level_total(r) == 12
    r.delete("track~live:web2")  # as its expiry would
    time.sleep(0.3)
    assert level_total(r) == 5 == per_host_total(r)


def test_a_host_paused_past_its_ttl_publishes_whole_again(redis_server: RedisServer) -> None:
    r = redis_server.client()
    pub = farm.LivePublisher(r, "web1", ttl_ms=200)
    counts = {LEVEL: (5, 5), ("acme", "pageview"): (1, 1)}
    pub.publish(counts, level=0, now=NOW)
    time.sleep(0.3)
    assert level_total(r) == 0  # reaped: its hash is gone
    counts[LEVEL] = (6, 6)
    pub.publish(counts, level=0, now=NOW + 1)  # a diff on nothing: refused, then full
    assert pub.full == 2
    assert farm_live(r, now=NOW).hosts[0].counts == counts
    assert level_total(r) == 6


def test_lost_replies_of_a_take_and_a_renewal_keep_one_lease_and_its_token_key(
        redis_server: RedisServer) -> None:
    """The lease script's replies lost (tests/tt_proxy.py drop_replies): a
    take that ran without its token key (a token from Redis' clock) is
    succeeded at the start with the next token, one later is adopted as it
    is (no token skipped), and a renewal that ran pushed the token key's
    expiry back: one lease, its key never left without an expiry."""
    import redis

    r = redis_server.client()
    r.script_load(farm.LEASE_SCRIPT)  # a lost EVALSHA runs it, not NOSCRIPT
    with TcpProxy(redis_server.port) as proxy:
        c = redis.Redis(port=proxy.port, socket_timeout=0.3)
        farmsync.no_retries(c)
        lease = Lease(c, "web1", ttl_ms=10_000)
        c.ping()  # connected: what is lost is the script's reply

        def lost() -> None:
            proxy.drop_replies()
            with pytest.raises(redis.RedisError):
                lease.renew()
            proxy.pass_replies()
            c.connection_pool.disconnect()

        lost()  # a take without the key: it ran
        taken = int(r.get(lease.counter))
        assert r.get(lease.key) == f"web1 {taken}".encode() and r.pttl(lease.counter) > 0
        assert lease.renew() and lease.token == taken + 1  # succeeded at the start
        r.pexpire(lease.counter, 60_000)
        lost()  # a renewal: it ran
        assert r.pttl(lease.counter) > 60_000 and r.pttl(lease.key) > 0
        assert lease.renew() and lease.token == taken + 1  # the same lease
        r.delete(lease.key)  # lapsed (a stall)
        lost()  # a take with the key: it ran
        assert lease.renew() and lease.token == taken + 2  # adopted, not taken again
        assert r.get(lease.counter) == str(taken + 2).encode()
        assert farm.TOKEN_KEEP_MS - 5_000 < r.pttl(lease.counter)


def test_a_lost_reply_never_doubles_a_count(redis_server: RedisServer) -> None:
    """Publications whose replies are lost (tests/tt_proxy.py drop_replies):
    the next publication is full, never a diff on top of a state it was not
    computed from; the farm's sum stays the hosts'."""
    import redis

    with TcpProxy(redis_server.port) as proxy:
        c = redis.Redis(port=proxy.port, socket_timeout=0.3)
        farmsync.no_retries(c)  # as the farm thread's client
        r = redis_server.client()
        pub = farm.LivePublisher(c, "web1", ttl_ms=60_000)
        farm.LivePublisher(r, "web2", ttl_ms=60_000).publish({LEVEL: (100, 100)}, level=0,
                                                            now=NOW)
        pub.publish({LEVEL: (1, 1), ("acme", "pageview"): (1, 1)}, level=0, now=NOW)
        assert level_total(r) == 101
        proxy.drop_replies()
        with pytest.raises(redis.RedisError):
            pub.publish({LEVEL: (2, 2)}, level=0, now=NOW + 2)
        assert level_total(r) == 102 == per_host_total(r)  # the MULTI ran, its reply lost
        with pytest.raises(redis.RedisError):
            # Unsure, so full: its first command's reply (SCRIPT LOAD) lost.
            pub.publish({LEVEL: (3, 3)}, level=0, now=NOW + 3)
        assert level_total(r) == 102 == per_host_total(r)
        proxy.pass_replies()
        c.connection_pool.disconnect()
        pub.publish({LEVEL: (4, 4), ("acme", "pageview"): (1, 1)}, level=0, now=NOW + 4)
        assert level_total(r) == 104 == per_host_total(r)
        assert pub.full == 2  # the first, and the one after the lost replies
        pub.publish({LEVEL: (9, 9), ("acme", "pageview"): (1, 1)}, level=0, now=NOW + 5)
        assert level_total(r) == 109 == per_host_total(r) and pub.full == 2


def test_a_diff_on_a_state_it_was_not_computed_from_is_refused(
        redis_server: RedisServer) -> None:
    """A publication that ran though its host does not know it (a reply lost
    after the MULTI ran; here: a copy of the publisher sends it): the
    host's next diff does not apply (the hash holds another sequence
    number) and a full publication follows: exact, nothing doubled."""
    import copy

    r = redis_server.client()
    pub = farm.LivePublisher(r, "web1")
    farm.LivePublisher(r, "web2").publish({LEVEL: (100, 100)}, level=0, now=NOW)
    pub.publish({LEVEL: (1, 1), ("acme", "pageview"): (5, 5)}, level=0, now=NOW)
    copy.copy(pub).publish({LEVEL: (7, 7)}, level=0, now=NOW + 1)  # it ran
    assert level_total(r) == 107
    # Computed from the first publication: ("acme", "pageview") unchanged,
    # so not sent; applied on the copy's state it would be lost.
    pub.publish({LEVEL: (8, 8), ("acme", "pageview"): (5, 5)}, level=0, now=NOW + 2)
    assert pub.full == 2
    assert level_total(r) == 108 == per_host_total(r)
    rows = {row.host: row for row in farm_live(r, now=NOW).hosts}
    assert rows["web1"].counts == {LEVEL: (8, 8), ("acme", "pageview"): (5, 5)}
    # The same publication sent again (a client's retry): nothing doubles.
    pub.publish({LEVEL: (8, 8), ("acme", "pageview"): (5, 5)}, level=0, now=NOW + 2)
    farm.publish_live(r, "web2", {LEVEL: (100, 100)}, level=0, now=NOW + 2)
    assert level_total(r) == 108 == per_host_total(r)


def test_a_stop_withdraws_at_once(redis_server: RedisServer) -> None:
    r = redis_server.client()
    farm.LivePublisher(r, "web1").publish({LEVEL: (5, 5)}, level=0, now=NOW)
    pub = farm.LivePublisher(r, "web2")
    pub.publish({LEVEL: (7, 7)}, level=0, now=NOW)
    pub.withdraw()
    assert level_total(r) == 5 and not r.exists("track~live:web2")
    pub.publish({LEVEL: (8, 8)}, level=0, now=NOW + 1)  # back: a full publication
    assert level_total(r) == 13 and pub.full == 2


def test_an_older_versions_hash_is_not_subtracted_when_its_host_upgrades(
        redis_server: RedisServer) -> None:
    """A host's hash as an older version wrote it (every key, a 5-second
    expiry, not in the alive set, so not in the sums): the upgraded host's
    first publication replaces it without subtracting what was never
    added."""
    r = redis_server.client()
    farm.LivePublisher(r, "web1").publish({LEVEL: (5, 5)}, level=0, now=NOW)
    r.hset("track~live:web2", mapping={"all\0pageview": "7 7", "~level": "0",
                                       "~at": repr(NOW), "~last_roll": ""})
    r.pexpire("track~live:web2", 5000)
    assert level_total(r) == 5
    farm.LivePublisher(r, "web2").publish({LEVEL: (8, 8)}, level=0, now=NOW + 1)
    assert level_total(r) == 13 == per_host_total(r)


def test_names_with_separators_and_a_long_publication(redis_server: RedisServer) -> None:
    """Account names with ':' '/' '\\' '.' '..' and spaces, 2,500 keys (more
    than one chunk of the script's HSET), a host name with ':'."""
    r = redis_server.client()
    counts = {(f"a{i}/..\\:. x", "page view"): (i % 7, i % 7 + 1) for i in range(2500)}
    counts[LEVEL] = (3, 4)
    pub = farm.LivePublisher(r, "web:1")
    pub.publish(counts, level=2, now=NOW)
    counts.pop(("a5/..\\:. x", "page view"))
    counts[("a6/..\\:. x", "page view")] = (50, 60)
    pub.publish(counts, level=2, now=NOW + 1)
    (row,) = farm_live(r, now=NOW).hosts
    assert row.host == "web:1" and row.level == 2
    assert row.counts == {k: v for k, v in counts.items() if any(v)}
    assert level_total(r) == 3


def test_a_script_flush_leaves_the_live_hash_and_the_sums_as_they_were(
        redis_server: RedisServer) -> None:
    """SCRIPT FLUSH between two publications: the diff's EVALSHA fails
    inside the MULTI (EXEC still runs its HSET, into the staging hash
    only); the next publication loads the scripts and is full: exact."""
    import redis

    r = redis_server.client()
    pub = farm.LivePublisher(r, "web1")
    pub.publish({LEVEL: (1, 1), ("acme", "pageview"): (2, 2)}, level=0, now=NOW)
    assert level_total(r) == 1
    r.script_flush()
    with pytest.raises(redis.ResponseError, match="No matching script"):
        pub.publish({LEVEL: (5, 5), ("acme", "pageview"): (2, 2)}, level=0, now=NOW + 1)
    assert level_total(r) == 1 == per_host_total(r)
    assert farm_live(r, now=NOW).hosts[0].counts == {LEVEL: (1, 1), ("acme", "pageview"): (2, 2)}
    pub.publish({LEVEL: (6, 6), ("acme", "pageview"): (2, 2)}, level=0, now=NOW + 2)
    assert level_total(r) == 6 == per_host_total(r) and pub.full == 2
    assert not r.exists("track~live~in:web1")


def test_a_redis_that_lost_the_watch_set_is_watched_again_at_once(
        redis_server: RedisServer) -> None:
    """A Redis restarted empty under a running farm (no persistence): the
    level reader watches its key again at its next reading, not after
    WATCH_AGAIN."""
    r = redis_server.client()
    reader = farm.LevelReader(r, "web1", [LEVEL])
    pub = farm.LivePublisher(r, "web1")
    pub.publish({LEVEL: (5, 5)}, level=0, now=NOW)
    assert reader.read(NOW).count(*LEVEL, "minute") == 5
    r.flushall()
    pub.publish({LEVEL: (6, 6)}, level=0, now=NOW + 1)  # refused diff, then full
    assert reader.read(NOW + 1).count(*LEVEL, "minute") == 6 and pub.full == 2


def test_a_reader_that_may_not_write_still_drops_a_dead_host(redis_server: RedisServer) -> None:
    """farm_live's reaper is best effort: a user allowed to read only still
    sees a host past its deadline as dead (the deadlines decide)."""
    import redis

    r = redis_server.client()
    farm.LivePublisher(r, "web1").publish({LEVEL: (5, 5)}, level=0, now=NOW)
    farm.LivePublisher(r, "web2", ttl_ms=200).publish({LEVEL: (7, 7)}, level=0, now=NOW)
    r.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@read", "+time",
                      "+@connection")
    ro = redis.Redis(port=redis_server.port, username="reader", password="pw")
    time.sleep(0.3)
    live = farm_live(ro, now=NOW)
    assert live.count(*LEVEL, "minute") == 5
    assert {h.host: h.alive for h in live.hosts} == {"web1": True, "web2": False}
    assert r.exists("track~live~st:web2")  # not reaped: the reader may not write


def publish_as_before(r, host: str, counts, now: float) -> None:
    """A host of the older version (0.1): its hash whole, a 5-second
    expiry, not in the alive set nor the sums."""
    key = f"track~live:{host}"
    pipe = r.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping={**farm.live_fields(counts), "~level": "0", "~at": repr(now),
                            "~last_roll": ""})
    pipe.pexpire(key, 5000)
    pipe.zadd("track~hosts", {host: now})
    pipe.execute()


def test_a_farm_upgraded_host_by_host_counts_every_host_in_the_level(
        redis_server: RedisServer) -> None:
    """web1 upgraded, web2 and web3 still on the older version: web1's
    level reading counts all three (the older hosts read host by host
    while the farm is mixed); web2 upgraded: nothing doubled; web3 stops
    (its hash gone): it leaves the level."""
    r = redis_server.client()
    reader = farm.LevelReader(r, "web1", [LEVEL])
    web1 = farm.LivePublisher(r, "web1")
    web1.publish({LEVEL: (1, 10)}, level=0, now=NOW)
    publish_as_before(r, "web2", {LEVEL: (2, 20)}, NOW)
    publish_as_before(r, "web3", {LEVEL: (4, 40)}, NOW)
    live = reader.read(NOW)
    assert live.count(*LEVEL, "minute") == 7 and live.count(*LEVEL, "60s") == 70
    assert live.own("web1", LEVEL, "60s") == 10
    farm.LivePublisher(r, "web2").publish({LEVEL: (3, 30)}, level=0, now=NOW + 1)
    assert reader.read(NOW + 1).count(*LEVEL, "minute") == 8 == per_host_total(r)
    r.delete("track~live:web3")  # its shutdown (or its expiry)
    assert reader.read(NOW + 2).count(*LEVEL, "minute") == 4 == per_host_total(r)


def test_a_host_downgraded_without_a_stop_leaves_the_sums_exact(
        redis_server: RedisServer) -> None:
    """web2 upgraded, SIGKILLed, its older version started at once (its
    hash rewritten whole, no sequence number): at web2's deadline the
    reaper rebuilds the sums instead of subtracting a share it never
    added."""
    r = redis_server.client()
    farm.LivePublisher(r, "web1").publish({LEVEL: (5, 5)}, level=0, now=NOW)
    farm.LivePublisher(r, "web2", ttl_ms=200).publish({LEVEL: (7, 7)}, level=0, now=NOW)
    assert level_total(r) == 12
    publish_as_before(r, "web2", {LEVEL: (100, 100)}, NOW + 0.1)
    time.sleep(0.3)
    farm.LivePublisher(r, "web3").publish({LEVEL: (1, 1)}, level=0, now=NOW + 1)  # reaps web2
    assert not r.exists("track~live~st:web2", "track~live~w:web2")
    publish_as_before(r, "web2", {LEVEL: (100, 100)}, NOW + 1)
    assert level_total(r) == 106 == per_host_total(r)  # web2 read by itself, as a 0.1 host


def test_a_late_full_publication_never_becomes_the_base_of_a_diff(
        redis_server: RedisServer) -> None:
    """A full publication that times out (Redis slow: held by the proxy)
    and runs late, after the host's next full one: it must not carry the
    sequence number the host's next diff is computed from, else the diff
    applies on the late one's state (a key the host no longer has stays
    in its hash and the level for good)."""
    import redis

    with TcpProxy(redis_server.port) as proxy:
        c = redis.Redis(port=proxy.port, socket_timeout=0.3)
        farmsync.no_retries(c)
        r = redis_server.client()
        pub = farm.LivePublisher(c, "web1", ttl_ms=60_000)
        pub.publish({LEVEL: (1, 1), ("acme", "pageview"): (5, 5)}, level=0, now=NOW)
        pub.withdraw()  # (a stop, then a start): the next one is full
        c.script_load, c.eval = r.script_load, r.eval  # the scripts load; the MULTI is held
        proxy.hold()
        with pytest.raises(redis.RedisError):
            pub.publish({LEVEL: (2, 2), ("acme", "pageview"): (5, 5)}, level=0, now=NOW + 1)
        pub.client = r  # the next publication reaches Redis first
        evalshas = evalshas_run(r)
        pub.publish({LEVEL: (3, 3)}, level=0, now=NOW + 2)
        proxy.release()
        wait_evalshas(r, evalshas + 2)
        pub.publish({LEVEL: (4, 4)}, level=0, now=NOW + 3)
        assert farm_live(r, now=NOW).hosts[0].counts == {LEVEL: (4, 4)}
        assert level_total(r) == 4 == per_host_total(r)
        assert farm.farm_level(r, "x", now=NOW, keys=[("acme", "pageview")]).count(
            "acme", "pageview", "minute") == 0


def test_a_late_diff_leaves_the_hosts_newer_state_in_the_level(
        redis_server: RedisServer) -> None:
    """A diff that timed out (held by the proxy) and runs after the host's
    next, full, publication: refused (another sequence number), and the
    host's newer state stays in its hash and the level (a refused diff
    does not take a host out of the farm)."""
    import redis

    with TcpProxy(redis_server.port) as proxy:
        c, r, pub = behind_proxy(proxy, redis_server)
        pub.publish({LEVEL: (1, 1)}, level=0, now=NOW)
        execs = evalshas_run(r)
        proxy.hold()
        with pytest.raises(redis.RedisError):
            pub.publish({LEVEL: (2, 2)}, level=0, now=NOW + 1)  # a diff, held
        pub.client = r
        pub.publish({LEVEL: (3, 3)}, level=0, now=NOW + 2)  # full, runs first
        proxy.release()
        wait_evalshas(r, execs + 2)
        assert level_total(r) == 103 == per_host_total(r)
        rows = {row.host: row for row in farm_live(r, now=NOW).hosts}
        assert rows["web1"].counts == {LEVEL: (3, 3)}
        pub.publish({LEVEL: (4, 4)}, level=0, now=NOW + 3)
        assert level_total(r) == 104 == per_host_total(r) and pub.full == 2


def test_a_publisher_killed_inside_its_publication_changes_nothing(
        redis_server: RedisServer) -> None:
    """The host dies (SIGKILL: its socket closes) with half of its
    publication's EVALSHA sent: Redis never runs it; the state, the sums
    and the sequence number stay as they were, and the host's next diff
    applies."""
    import socket

    import redis

    r = redis_server.client()
    farm.LivePublisher(r, "web2").publish({LEVEL: (100, 100)}, level=0, now=NOW)
    pub = farm.LivePublisher(r, "web1")
    pub.publish({LEVEL: (1, 1), ("acme", "pageview"): (2, 2)}, level=0, now=NOW)
    keys = pub._keys
    cmd = ("EVALSHA", pub._script.sha, len(keys), *keys, "track", "web1", "full", "x", 9, 0,
           60_000, 60_000, repr(NOW), "0", 0, "", "all\0pageview\t50 50", "", "all\0pageview",
           "50 50")
    data = b"".join(redis.Connection().pack_commands([cmd]))
    with socket.create_connection(("127.0.0.1", redis_server.port)) as s:
        s.sendall(data[:len(data) - 10])  # the rest never sent: killed
    assert level_total(r) == 101 == per_host_total(r)
    pub.publish({LEVEL: (3, 3), ("acme", "pageview"): (2, 2)}, level=0, now=NOW + 1)
    assert pub.full == 1 and level_total(r) == 103 == per_host_total(r)


def test_a_publication_that_runs_after_the_hosts_stop_does_not_bring_it_back(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full publication held (Redis slow: the proxy holds it), the host
    stops meanwhile (its withdraw goes through another connection), then
    the held publication runs: refused, the host stays out of the live
    numbers (not back for its TTL)."""
    import redis

    with TcpProxy(redis_server.port) as proxy:
        c, r, pub = behind_proxy(proxy, redis_server)
        monkeypatch.setattr(farm, "FULL_EVERY", 0.0)  # every publication full
        pub.publish({LEVEL: (1, 1)}, level=0, now=NOW)
        c.script_load, c.eval = r.script_load, r.eval  # the scripts load; the publication is held
        proxy.hold()
        with pytest.raises(redis.RedisError):
            pub.publish({LEVEL: (1, 1)}, level=0, now=NOW)
        pub.client = r
        pub.withdraw()  # the stop
        execs = evalshas_run(r)
        proxy.release()
        wait_evalshas(r, execs + 1)
        assert level_total(r) == 100 == per_host_total(r)
        assert {h.host: h.alive for h in farm_live(r, now=NOW).hosts}.get("web1") is not True
        # Started again (the same publisher object): back, exact.
        pub.publish({LEVEL: (2, 2)}, level=0, now=NOW + 1)
        assert level_total(r) == 102 == per_host_total(r)


def test_two_publishers_of_one_host_name_never_add_up(redis_server: RedisServer) -> None:
    """Two supervisors publishing under one name (HostClaim refuses the
    second; here they publish all the same): one state per name, each
    refusing the other's diffs, so the farm counts the last publication,
    never the sum of both."""
    r = redis_server.client()
    a, b = farm.LivePublisher(r, "web1"), farm.LivePublisher(r, "web1")
    for i in range(4):
        a.publish({LEVEL: (10 + i, 10 + i)}, level=0, now=NOW + i)
        assert level_total(r) == 10 + i == per_host_total(r)
        b.publish({LEVEL: (100 + i, 100 + i)}, level=0, now=NOW + i)
        assert level_total(r) == 100 + i == per_host_total(r)
    assert a.full == 4 and b.full == 4  # each diff refused: the other's state


def test_a_reader_behind_the_trimmed_log_rebuilds_from_the_snapshots(
        redis_server: RedisServer) -> None:
    """A reader whose last entry is older than the log keeps (a dashboard
    left open on a paused machine) reads every host's snapshot and the
    diffs after it again: exact; one that is up to date reads the log only."""
    r = redis_server.client()
    pubs = [farm.LivePublisher(r, f"web{i}") for i in range(3)]
    reader = farm.LiveReader(r)
    for t in range(3):
        for i, pub in enumerate(pubs):
            pub.publish({LEVEL: (t + i, t + i), (f"shop{t}", "pageview"): (1, 1)}, level=0,
                        now=NOW + t)
        live = reader.read(NOW + t)
        assert live.count(*LEVEL, "minute") == 3 * t + 3
    # Each host's snapshot read once, at the start: its later full
    # publications (the diffs outweighed it) came as diffs in the log.
    assert sum(pub.full for pub in pubs) > 3 and reader.snapshots == 3
    cold = farm.LiveReader(r)  # a reader that starts: the snapshots, then the log after them
    assert cold.read(NOW + 2).count(*LEVEL, "minute") == 9
    assert {h.host: h.counts for h in cold.read(NOW + 2).hosts} == {
        h.host: h.counts for h in reader.read(NOW + 2).hosts}
    reader._last = "1-0"  # as if it had not read for longer than the log keeps
    r.xtrim("track~live~log", maxlen=0)  # and the log trimmed since
    pubs[1].publish({LEVEL: (9, 9)}, level=0, now=NOW + 3)
    live = reader.read(NOW + 3)
    assert live.count(*LEVEL, "minute") == 2 + 9 + 4 == per_host_total(r)
    assert {h.host: h.counts for h in live.hosts} == {
        "web0": {LEVEL: (2, 2), ("shop2", "pageview"): (1, 1)}, "web1": {LEVEL: (9, 9)},
        "web2": {LEVEL: (4, 4), ("shop2", "pageview"): (1, 1)}}


def test_a_name_holding_the_blobs_separators_cannot_forge_another_key(
        redis_server: RedisServer) -> None:
    """The blob's separators are control characters, which names refuse
    (names.check_name); one that got through anyway (a tab, a newline) is
    left out of the publication instead of forging a line of another key."""
    r = redis_server.client()
    pub = farm.LivePublisher(r, "web1")
    forged = ("acme\tx\nall\0pageview", "pageview")
    pub.publish({LEVEL: (1, 1), forged: (5, 5)}, level=0, now=NOW)
    pub.publish({LEVEL: (2, 2), forged: (6, 6)}, level=0, now=NOW + 1)
    live = farm_live(r, now=NOW)
    assert live.hosts[0].counts == {LEVEL: (2, 2)}
    assert level_total(r) == 2 == live.count(*LEVEL, "minute")


def read_as_before(r, now: float) -> int:
    """A reader of the older version (0.1): every host's hash whole
    (``track~live:{host}``) for the hosts of ``track~hosts``."""
    total = 0
    for host in r.zrangebyscore("track~hosts", now - 3600, "+inf"):
        for k, v in r.hgetall(f"track~live:{host.decode()}").items():
            if k == b"all\0pageview":
                total += int(v.split()[0])
    return total


def test_a_mixed_version_farm_counts_the_older_hosts_on_the_upgraded_ones_only(
        redis_server: RedisServer) -> None:
    """During a rolling upgrade from 0.1: the upgraded hosts count every
    host (the older ones' hashes read host by host, level and views); the
    older hosts do not see the upgraded ones (their live counts travel in
    the log, not in a hash per host): docs/redis.rst, "Upgrading a farm
    host by host".  A withdrawn upgraded host deletes a hash its older
    version left."""
    r = redis_server.client()
    web1 = farm.LivePublisher(r, "web1")
    web1.publish({LEVEL: (1, 10)}, level=0, now=NOW)
    publish_as_before(r, "web2", {LEVEL: (2, 20)}, NOW)
    assert level_total(r) == 3 == per_host_total(r)  # the upgraded hosts: both
    assert read_as_before(r, NOW) == 2  # an older host: itself only
    assert not r.exists("track~live:web1")
    publish_as_before(r, "web3", {LEVEL: (4, 40)}, NOW)
    farm.LivePublisher(r, "web3").publish({LEVEL: (4, 40)}, level=0, now=NOW)  # upgraded
    assert not r.exists("track~live:web3")  # its 0.1 hash: never counted twice
    assert level_total(r) == 7 == per_host_total(r)
    publish_as_before(r, "web1", {LEVEL: (1, 10)}, NOW)  # web1 went back to 0.1
    farm.withdraw_live(r, "web1")  # (or its upgraded version's stop)
    assert not r.exists("track~live:web1")


def test_a_reader_across_a_redis_restarted_empty(redis_server: RedisServer) -> None:
    """Redis restarted empty under a running farm (no persistence): the
    hosts' next diffs are refused (no state), they publish whole, and a
    reader that kept the farm in memory drops what Redis lost and reads
    the new snapshots: exact at once, nothing of the old state kept."""
    r = redis_server.client()
    pubs = [farm.LivePublisher(r, f"web{i}") for i in range(2)]
    reader = farm.LiveReader(r)
    for t in range(2):
        for i, pub in enumerate(pubs):
            pub.publish({LEVEL: (t + i, t + i), ("old", "pageview"): (1, 1)}, level=0,
                        now=NOW + t)
        assert reader.read(NOW + t).count(*LEVEL, "minute") == 2 * t + 1
    r.flushall()
    assert reader.read(NOW + 2).total == {}  # nobody alive: nothing counted
    pubs[0].publish({LEVEL: (5, 5)}, level=0, now=NOW + 3)
    live = reader.read(NOW + 3)
    assert live.total == {LEVEL: (5, 5)} and pubs[0].full == 2
    pubs[1].publish({LEVEL: (6, 6)}, level=0, now=NOW + 3)
    fresh = farm.LiveReader(r).read(NOW + 3)
    assert reader.read(NOW + 3).total == {LEVEL: (11, 11)} == fresh.total
    assert level_total(r) == 11


def test_a_reading_of_a_few_keys_keeps_only_those_keys_in_memory(
        redis_server: RedisServer) -> None:
    """The farm rules' leader (once a second) and the dashboard's panel read
    a few keys of every host (``only``): their reader keeps those keys of
    each host, not hosts x keys (100 x 10,000: a million fields in the
    daemon, every diff line parsed each second); the numbers are the same
    as the whole reading's, through diffs, a gone key, a full publication
    and a reader that starts late.  A reader per key set, a few kept per
    client (the dashboard's event is the visitor's choice)."""
    r = redis_server.client()
    rule = ("shop1", "pageview")
    pubs = [farm.LivePublisher(r, f"web{i}") for i in range(3)]
    counts = [{LEVEL: (i + 1, i + 1), rule: (i, i),
               **{(f"shop{k}", "pageview"): (k, k) for k in range(2, 200)}} for i in range(3)]
    for t in range(4):
        for i, pub in enumerate(pubs):
            counts[i][LEVEL] = (t + i + 1, t + i + 1)
            if t == 2:
                counts[i].pop(rule, None)  # gone: its line empty
            if t == 3:
                counts[i][rule] = (7, 7)
            pub.publish(counts[i], level=0, now=NOW + t, previous={rule: 3})
        few = farm_live(r, now=NOW + t, only=[LEVEL, rule])
        whole = farm_live(r, now=NOW + t)
        assert few.total == {k: v for k, v in whole.total.items() if k in (LEVEL, rule)}
        assert {h.host: (h.counts, h.previous) for h in few.hosts} == {
            h.host: ({k: v for k, v in h.counts.items() if k in (LEVEL, rule)},
                     {rule: 3}) for h in whole.hosts}
    kept = farm.reader(r, only=[LEVEL, rule])
    assert {f for state in kept._hosts.values() for f in state.fields} == {
        "all\0pageview", "shop1\0pageview"}
    assert sum(len(s.fields) for s in farm.reader(r)._hosts.values()) == 3 * 200
    late = farm.LiveReader(r, keys=[rule])
    assert late.read(NOW + 3).total == {rule: (21, 21)}
    for event in range(20):  # the dashboard's events: a few readers kept, not one per event
        farm_live(r, now=NOW + 3, only=[("all", f"e{event}")])
    assert len(farm._readers_of(r)) <= farm.READERS_KEPT + 1


def test_a_blobs_lines_of_a_few_keys_are_those_of_the_whole_blob() -> None:
    """unpack_blob(blob, keys) finds the same lines as the whole split: a
    field first, last, in the middle, gone (empty), absent, and fields
    whose names end or begin another's ("1" in "shop1", "shop" in
    "shop2")."""
    fields = {"shop1\0pageview": "1 2", "1\0pageview": "3 4 5", "shop\0pageview": "6 7",
              "shop2\0pageview": "8 9", **{f"s{i}\0pageview": f"{i} {i}" for i in range(20)}}
    blob = farm.pack(fields, gone=["old\0pageview"])
    whole = dict(farm.unpack_blob(blob))
    for keys in (["shop1\0pageview"], ["1\0pageview", "shop\0pageview"], ["old\0pageview"],
                 ["shop2\0pageview", "none\0pageview", "hop1\0pageview"], list(whole),
                 [*list(whole)[::2], "none\0pageview"]):  # more than FIND_KEYS_MAX: split
        assert dict(farm.unpack_blob(blob, frozenset(keys))) == {
            k: whole[k] for k in keys if k in whole}
    assert farm.unpack_blob("", frozenset(["1\0pageview"])) == []


def test_a_reader_idle_longer_than_the_log_keeps_does_not_read_the_log_first(
        redis_server: RedisServer) -> None:
    """A reader that has not read for longer than the log keeps (a dashboard
    closed for a minute, then opened again) starts over from the hosts'
    snapshots and the entries after them, as a new reader does: it does
    not first read the whole log after its last entry (30 s of every
    host's diffs: 84 MB at 100 hosts x 10,000 keys, one reply of Redis'
    one thread) only to throw it away.  Its numbers are exact."""
    r = redis_server.client()
    clock = [0.0]
    reader = farm.LiveReader(r, clock=lambda: clock[0])
    pubs = [farm.LivePublisher(r, f"web{i}") for i in range(3)]
    for t in range(20):
        for i, pub in enumerate(pubs):
            pub.publish({LEVEL: (t + i, t + i)}, level=0, now=NOW + t)
        if t == 0:
            reader.read(NOW)
    first = reader.entries
    clock[0] += farm.LOG_KEEP_MS / 1000 + 10
    live = reader.read(NOW + 19)
    assert live.count(*LEVEL, "minute") == 19 * 3 + 3 == per_host_total(r)
    # the entries after each host's snapshot (at most FULL_EVERY publications), not all 57
    assert reader.entries - first <= 3 * (farm.FULL_EVERY + 1) < 57


def test_a_log_entry_appended_again_is_skipped_by_its_sequence_number(
        redis_server: RedisServer) -> None:
    """A diff found in the log a second time, after the host's newer ones
    (a blob appended twice: a resent command, a replayed replication
    stream), is older than the state its reader holds by its sequence
    number: skipped, neither applied over the newer state nor taken for a
    gap that drops the host until its next full publication."""
    r = redis_server.client()
    pub = farm.LivePublisher(r, "web0")
    reader = farm.LiveReader(r)
    for t in range(3):
        pub.publish({LEVEL: (t + 1, t + 1)}, level=0, now=NOW + t)
    assert reader.read(NOW + 2).count(*LEVEL, "minute") == 3
    diffs = [e for _, e in r.xrange("track~live~log") if e[b"k"] == b"d"]
    r.xadd("track~live~log", diffs[0])  # the first diff (LEVEL 2) again
    snapshots = reader.snapshots
    live = reader.read(NOW + 2)
    assert live.count(*LEVEL, "minute") == 3 and [h.alive for h in live.hosts] == [True]
    assert reader.snapshots == snapshots
    cold = farm.LiveReader(r)  # one that starts: the snapshot, then the entries after it
    assert cold.read(NOW + 2).count(*LEVEL, "minute") == 3


def test_a_failover_to_a_replica_that_lacks_the_last_seconds(redis_server: RedisServer) -> None:
    """The farm's Redis replaced by a replica that lacked the last
    publications (the keys as they were two seconds before, restored):
    the hosts' next diffs do not follow the state Redis holds, they
    publish whole; a reader that applied the lost diffs reads the hosts'
    new snapshots, exact after that one publication, as a new reader is."""
    r = redis_server.client()
    pubs = [farm.LivePublisher(r, f"web{i}") for i in range(2)]
    reader = farm.LiveReader(r)
    saved: dict[bytes, bytes] = {}
    for t in range(5):
        for i, pub in enumerate(pubs):
            pub.publish({LEVEL: (10 * t + i, 10 * t + i), (f"s{t}", "pageview"): (1, 1)},
                        level=0, now=NOW + t)
        assert reader.read(NOW + t).count(*LEVEL, "minute") == 20 * t + 1
        if t == 2:
            saved = {k: r.dump(k) for k in r.keys("track~live*")}
    r.flushall()
    for k, v in saved.items():
        r.restore(k, 0, v)
    for i, pub in enumerate(pubs):
        pub.publish({LEVEL: (50 + i, 50 + i)}, level=0, now=NOW + 5)
    live = reader.read(NOW + 5)
    assert live.total == {LEVEL: (101, 101)} == farm.LiveReader(r).read(NOW + 5).total
    assert {h.host: h.counts for h in live.hosts} == {"web0": {LEVEL: (50, 50)},
                                                      "web1": {LEVEL: (51, 51)}}
    assert level_total(r) == 101


def test_a_reader_left_idle_lets_go_of_the_farm_it_held(redis_server: RedisServer) -> None:
    """The reader of every key (one API question, hosts x keys in memory:
    145 MB at 100 x 10,000) that is not read again for longer than the log
    keeps would start over at its next reading anyway: the next reading of
    another reader of the client (the dashboard's, every 5 s) lets go of
    what it held.  It reads exact again when asked."""
    r = redis_server.client()
    clock = [0.0]
    pub = farm.LivePublisher(r, "web0")
    pub.publish({LEVEL: (1, 1), ("shop", "pageview"): (2, 2)}, level=0, now=NOW)
    whole = farm.reader(r)
    whole.clock = lambda: clock[0]
    assert farm_live(r, now=NOW).count("shop", "pageview", "minute") == 2
    few = farm.reader(r, only=[LEVEL])
    few.clock = lambda: clock[0]
    for _ in range(3):
        clock[0] += 12
        assert farm_live(r, now=NOW, only=[LEVEL]).count(*LEVEL, "minute") == 1
    assert whole._hosts == {} and whole._last is None and few._hosts
    assert farm_live(r, now=NOW).count("shop", "pageview", "minute") == 2


def test_a_withdrawal_whose_reply_was_lost_does_not_keep_the_host_out(
        redis_server: RedisServer) -> None:
    """A withdrawal that ran but whose reply was lost (it raised): the stop
    mark holds the publisher's nonce; its later publications stamp a new
    one, so they are counted (a publisher kept out of the farm for the
    stop mark's hour, its full publications refused without a word)."""
    import redis

    with TcpProxy(redis_server.port) as proxy:
        c = redis.Redis(port=proxy.port, socket_timeout=0.3)
        farmsync.no_retries(c)
        r = redis_server.client()
        pub = farm.LivePublisher(c, "web1", ttl_ms=60_000)
        pub.publish({LEVEL: (1, 1)}, level=0, now=NOW)
        proxy.drop_replies()
        with pytest.raises(redis.RedisError):
            pub.withdraw()
        proxy.pass_replies()
        c.connection_pool.disconnect()
        assert level_total(r) == 0  # it ran
        for t in range(1, 3):
            pub.publish({LEVEL: (t + 4, t + 4)}, level=0, now=NOW + t)
            assert level_total(r) == t + 4 == per_host_total(r)


def test_a_clients_readers_go_with_the_client(redis_server: RedisServer) -> None:
    """farm.reader keeps one LiveReader per client and key set "as long as
    the client": a client let go of (a store closed, a thread's store
    opened again) takes its readers, and the farm they hold, with it.  A
    reader refers to its client, so a table that held the readers beside
    a weak reference to the client kept both for ever."""
    import gc
    import weakref

    from trafficthreshold import farm

    LEVEL = ("all", "pageview")
    r = redis_server.client()
    publish_live(r, "web1", {LEVEL: (1, 1)}, level=0, now=NOW)
    other = redis_server.client()
    farm_live(other, now=NOW)
    farm_live(other, now=NOW, only=[LEVEL])
    gone, held = weakref.ref(other), weakref.ref(farm.reader(other))
    del other
    gc.collect()
    assert gone() is None and held() is None


def test_a_watched_key_nobody_read_for_a_day_leaves_the_sums(redis_server: RedisServer) -> None:
    """docs/redis.rst: a key a LevelReader asked for is watched (its sums
    kept by every publication) until nobody read it for a day (WATCH_FOR):
    then it leaves the watch set, the sums and the hosts' watched values,
    so the dashboard's events once asked for are not summed for ever; the
    level's key, read every second, stays."""
    from trafficthreshold import farm

    r = redis_server.client()
    shop, level = ("shop", "pageview"), ("all", "pageview")
    pub = farm.LivePublisher(r, "web1")
    pub.publish({level: (1, 1), shop: (2, 2)}, level=0, now=NOW)
    farm.LevelReader(r, "web1", [shop]).read(NOW)
    pub.publish({level: (3, 3), shop: (3, 3)}, level=0, now=NOW + 1)  # told the watch set
    pub.publish({level: (3, 3), shop: (4, 4)}, level=0, now=NOW + 1)
    assert farm.LevelReader(r, "web1", [shop]).read(NOW + 1).total == {shop: (4, 4)}
    field = "shop\0pageview"
    secs = int(r.time()[0])
    r.zadd("track~live~watch", {field: secs - farm.WATCH_FOR - 1})  # as a day unread
    farm.LevelReader(r, "web1", [level]).read(NOW + 2)               # another key's watch
    assert r.zscore("track~live~watch", field) is None
    assert r.zscore("track~live~watch", "all\0pageview") is not None
    assert not any(field in _f.decode() for _f in r.hkeys("track~live~sum"))
    assert r.hget("track~live~w:web1", field) is None
    pub.publish({level: (5, 5), shop: (6, 6)}, level=0, now=NOW + 3)  # not summed again
    assert r.hget("track~live~w:web1", field) is None
    assert r.hget("track~live~sum", "minute\0" + field) is None
