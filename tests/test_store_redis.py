"""Tests of trafficthreshold.store.redis against real redis-server processes
started on free loopback ports, each with its own data directory."""
from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trafficthreshold.errors import ConfigError
from trafficthreshold.periods import resolve_timezone
from trafficthreshold.store.redis import RedisStore
from trafficthreshold.store import SQLiteStore
from tt_redis import RedisServer, free_port

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.redis

ZONE = resolve_timezone("Europe/Zurich")
# 2026-02-03 09:05 local (08:05 UTC) as an epoch minute.
MINUTE = int(1770105900 // 60)


def store_on(srv: RedisServer, host: str = "web1", **kw) -> RedisStore:
    return RedisStore(srv.client(), ZONE, host, **kw)


def test_bootic_layout_read_with_plain_hgetall(redis_server: RedisServer) -> None:
    store_on(redis_server).roll([("acme", "pageview", MINUTE, 7), ("all", "pageview", MINUTE, 7)],
                          now=MINUTE * 60 + 90)
    r = redis_server.client()
    # Bootic's tracker: numbers unpadded, a hash per period, a field per segment.
    assert r.hgetall("track:acme:pageview:2026") == {b"2": b"7"}
    assert r.hgetall("track:acme:pageview:2026:2") == {b"3": b"7"}
    assert r.hgetall("track:acme:pageview:2026:2:3") == {b"9": b"7"}
    assert r.hgetall("track:acme:pageview:2026:2:3:9") == {b"5": b"7"}
    assert r.hgetall("track:all:pageview:2026:2:3") == {b"9": b"7"}
    # Our own keys stay out of Bootic's `track:*` patterns.
    assert all(k.startswith(b"track:") for k in r.keys("track:*"))
    assert not [k for k in r.keys("track:*") if b"~" in k]


def test_a_roll_repeated_adds_nothing_and_growth_adds_the_rest(redis_server: RedisServer) -> None:
    store = store_on(redis_server)
    assert store.roll([("acme", "pageview", MINUTE, 5)], now=1) == 5
    assert store.roll([("acme", "pageview", MINUTE, 5)], now=2) == 0
    assert store.roll([("acme", "pageview", MINUTE, 8)], now=3) == 3
    # A count that went down (a bucket reused) adds nothing.
    assert store.roll([("acme", "pageview", MINUTE, 2)], now=4) == 0
    assert store.period("acme", "pageview", 2026, 2, 3)["data"][9] == 8


def test_hosts_add_their_shares_and_instances_count_afresh(redis_server: RedisServer) -> None:
    web1, web2 = store_on(redis_server, "web1"), store_on(redis_server, "web2")
    web1.roll([("all", "pageview", MINUTE, 10)], now=1, instance=1)
    web2.roll([("all", "pageview", MINUTE, 4)], now=1, instance=7)
    web2.roll([("all", "pageview", MINUTE, 4)], now=2, instance=7)  # again: nothing
    # web1's segment re-installed within the same minute: it counts from 0.
    web1.roll([("all", "pageview", MINUTE, 3)], now=3, instance=2)
    assert web1.period("all", "pageview", 2026)["data"][2] == 17
    assert web2.period("all", "pageview", 2026)["total"] == 17


def test_periods_read_like_the_sqlite_store(redis_server: RedisServer, tmp_path: Path) -> None:
    rng = random.Random(5)
    items = [(acct, "pageview", MINUTE + rng.randrange(0, 3 * 24 * 60), rng.randrange(1, 50))
             for acct in ("acme", "shop") for _ in range(200)]
    store = store_on(redis_server)
    store.roll(items, now=1)
    with SQLiteStore(str(tmp_path / "s.sqlite3"), "Europe/Zurich") as sqlite:
        sqlite.roll(items, now=1)
        for args in [(2026,), (2026, 2), (2026, 2, 3), (2026, 2, 4, 13), (2026, 2, 5, 23)]:
            for acct in ("acme", "shop", "nobody"):
                assert store.period(acct, "pageview", *args) == sqlite.period(acct, "pageview",
                                                                              *args), args


def test_a_large_roll_goes_in_batches_and_stays_exact(redis_server: RedisServer) -> None:
    items = [(f"a{i}", "pageview", MINUTE, i + 1) for i in range(1_200)]
    store = store_on(redis_server)
    assert store.roll(items, now=1, closed_through=MINUTE) == sum(range(1, 1_201))
    assert store.roll(items, now=2) == 0
    assert store.closed_through() == MINUTE and store.last_roll_at() == 2.0


def test_the_farm_keeps_one_time_zone(redis_server: RedisServer) -> None:
    store_on(redis_server, "web1").check_zone("Europe/Zurich")
    store_on(redis_server, "web2").check_zone("Europe/Zurich")
    with pytest.raises(ConfigError, match="Europe/Zurich.*timezone = \"Europe/Zurich\""):
        RedisStore(redis_server.client(), resolve_timezone("UTC"), "web3").check_zone("UTC")


def test_a_host_name_with_a_colon_is_refused(redis_server: RedisServer) -> None:
    with pytest.raises(ConfigError, match="host"):
        store_on(redis_server, "web:1")


def test_redis_killed_mid_roll_loses_and_doubles_nothing(redis_server: RedisServer) -> None:
    """SIGKILL of redis-server (append-only, fsync always) at random instants
    while a supervisor thread rolls a growing ring without pause: each
    script ran whole or not at all, so after the restarts one more roll of
    the ring leaves the ground truth exactly, with nothing doubled."""
    rng = random.Random(11)
    truth: dict[tuple[str, int], int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    rolls = {"ok": 0, "failed": 0}
    run_ids: set[str] = set()

    def supervisor() -> None:
        store = store_on(redis_server)
        step = 0
        while not stop.is_set():
            with lock:
                for acct in ("acme", "shop", "all"):
                    minute = MINUTE + (step // 50) % 30
                    truth[acct, minute] = truth.get((acct, minute), 0) + rng.randrange(1, 20)
                # Each page view's twin as a funnel status: the same script.
                items = [(a, e, m, c) for (a, m), c in truth.items()
                         for e in ("pageview", "order/paid")]
            step += 1
            try:
                store.roll(items, now=step)
                rolls["ok"] += 1
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                rolls["failed"] += 1
                time.sleep(0.01)

    thread = threading.Thread(target=supervisor)
    thread.start()
    try:
        for _ in range(3):
            time.sleep(rng.uniform(0.2, 0.6))
            run_ids.add(redis_server.client().info("server")["run_id"])
            redis_server.kill()
            redis_server.start()
        run_ids.add(redis_server.client().info("server")["run_id"])
    finally:
        time.sleep(0.3)
        stop.set()
        thread.join()
    # redis-py retries a command whose connection broke: a script that ran
    # whole before the kill then runs again, and must add nothing.
    assert rolls["ok"] > 10, rolls
    assert len(run_ids) == 4
    store = store_on(redis_server)
    store.roll([(a, e, m, c) for (a, m), c in truth.items() for e in ("pageview", "order/paid")],
               now=10**6)
    for acct in ("acme", "shop", "all"):
        expected = sum(c for (a, _), c in truth.items() if a == acct)
        assert store.period(acct, "pageview", 2026, 2, 3)["total"] == expected
        assert store.funnel(acct, "order", 2026, 2)["data"] == {"paid": expected}


# ---------------------------------------------------------------- Sentinel


def start_process(args: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.02)


@pytest.fixture
def sentinel_farm(tmp_path: Path) -> Iterator[tuple[list[subprocess.Popen], "redis.Sentinel"]]:
    """A master, a replica and three sentinels, all real, on free ports."""
    if shutil.which("redis-sentinel") is None:
        pytest.skip("redis-sentinel is not installed (apt-get install redis-sentinel)")
    procs: list[subprocess.Popen] = []
    master, replica = free_port(), free_port()
    try:
        for port, extra in ((master, []), (replica, ["--replicaof", "127.0.0.1", str(master)])):
            d = tmp_path / f"r{port}"
            d.mkdir()
            procs.append(start_process(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--appendonly", "yes", "--save", "", *extra], port))
        sentinels = []
        for _ in range(3):
            port = free_port()
            conf = tmp_path / f"sentinel{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                f"sentinel monitor tt 127.0.0.1 {master} 2\n"
                "sentinel down-after-milliseconds tt 500\n"
                "sentinel failover-timeout tt 3000\n")
            procs.append(start_process(["redis-sentinel", str(conf)], port))
            sentinels.append(("127.0.0.1", port))
        yield procs, redis.Sentinel(sentinels, socket_timeout=1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_sentinel_failover_loses_nothing(sentinel_farm) -> None:
    """Roll through a master, SIGKILL it, let the sentinels promote the
    replica, and roll the ring again through the new master: the watermarks
    are read from Redis, never cached, so whatever the failover lost is
    re-sent and the totals are exact."""
    procs, sentinel = sentinel_farm
    store = RedisStore(sentinel.master_for("tt", socket_timeout=1), ZONE, "web1")
    truth: dict[tuple[str, int], int] = {}

    def grow_and_roll(step: int) -> None:
        for acct in ("acme", "all"):
            truth[acct, MINUTE + step % 5] = truth.get((acct, MINUTE + step % 5), 0) + 3
        store.roll([(a, "pageview", m, c) for (a, m), c in truth.items()], now=step)

    for step in range(20):
        grow_and_roll(step)
    old_master = sentinel.discover_master("tt")
    procs[0].kill()  # the master, SIGKILL
    procs[0].wait()
    deadline = time.monotonic() + 20
    while not _master_known(sentinel) or sentinel.discover_master("tt") == old_master:
        assert time.monotonic() < deadline, "no failover within 20 s"
        time.sleep(0.2)
    for step in range(20, 40):
        for _ in range(50):  # the client follows the new master
            try:
                grow_and_roll(step)
                break
            except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError):
                time.sleep(0.1)
        else:
            pytest.fail("the store never reached the new master")
    assert sentinel.discover_master("tt") != old_master
    for acct in ("acme", "all"):
        expected = sum(c for (a, _), c in truth.items() if a == acct)
        assert store.period(acct, "pageview", 2026, 2, 3)["total"] == expected


def _master_known(sentinel: "redis.Sentinel") -> bool:
    try:
        sentinel.discover_master("tt")
        return True
    except redis.sentinel.MasterNotFoundError:
        return False


def test_connect_by_url_and_its_errors(redis_server: RedisServer) -> None:
    from trafficthreshold.store.redis import connect

    client = connect(f"redis://127.0.0.1:{redis_server.port}/2")
    assert client.ping() and client.connection_pool.connection_kwargs["db"] == 2
    with pytest.raises(ConfigError, match="redis://host:port/db"):
        connect("http://example.com/")
    with pytest.raises(ConfigError, match="needs url"):
        connect("")
    with pytest.raises(ConfigError, match="service"):
        connect(sentinels=["127.0.0.1:26379"])
    with pytest.raises(ConfigError, match="not host:port"):
        connect(sentinels=["nowhere"], service="tt")


def test_connect_through_sentinels(sentinel_farm) -> None:
    from trafficthreshold.store.redis import connect

    procs, sentinel = sentinel_farm
    nodes = [f"{kw['host']}:{kw['port']}"
             for kw in (s.connection_pool.connection_kwargs for s in sentinel.sentinels)]
    assert len(nodes) == 3
    client = connect(sentinels=nodes, service="tt")
    client.set("probe", "1")  # a write: it reached the master
    assert client.get("probe") == b"1"


# -- what the Roller asks of a store (the supervisor rolls into Redis) -------

def test_a_roller_over_redis_records_a_replaced_segment_and_late_hits(redis_server, key):
    """The Roller's bookkeeping, per host in Redis: the instance, a segment
    replaced without `uninstall` (a gap in track~gaps:{host}, written with
    the new closed_through in one MULTI), late hits counted, not added."""
    from conftest import remove_everything
    from trafficthreshold import _counter, segment
    from trafficthreshold.rollup import LATE_MINUTES, Roller
    t0 = 1_800_000_000
    store = RedisStore(redis_server.client(), resolve_timezone("UTC"), "web1")
    segment.install(key, "sysv", now=t0)
    counter = segment.attach(key, "sysv")
    try:
        counter.hit("acme", "pageview", 3, t0 + 5)
        roller = Roller(counter, store)
        assert roller.roll(t0 + 65) == 3
        assert store.instance() == counter.load(segment.H_INSTANCE, 8)
        assert store.closed_through() == t0 // 60
        # a hit more than LATE_MINUTES late: counted in late_dropped, never added
        later = t0 + 60 * (LATE_MINUTES + 3) + 1
        roller.roll(later - 60)  # minute t0 + 1 read for the last time
        counter.hit("acme", "pageview", 2, t0 + 65)
        assert roller.roll(later) == 0
        assert store.late_dropped() == 2
        assert roller.roll(later + 60) == 0 and store.late_dropped() == 2  # once
        assert store.period("acme", "pageview", 2027)["total"] == 3
        counter.detach()
        remove_everything(key)  # gone without `uninstall`: a reboot, ipcrm
        _counter._reset()
        segment.install(key, "sysv", now=later + 600)
        counter = segment.attach(key, "sysv")
        counter.hit("acme", "pageview", 4, later + 605)
        assert Roller(counter, store).roll(later + 665) == 4
        gaps = store.gaps()
        assert len(gaps) == 1 and "was replaced" in gaps[0]["reason"]
        assert gaps[0]["first_minute"] == (later + 60) // 60  # after the last closed
        assert store.closed_through() == (later + 665) // 60 - 1
    finally:
        counter.detach()


def test_closed_through_never_moves_back_and_a_transaction_is_all_or_nothing(redis_server):
    store = store_on(redis_server)
    store.set_closed_through(MINUTE)
    store.set_closed_through(MINUTE - 5)
    assert store.closed_through() == MINUTE
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.record_gap(MINUTE + 1, MINUTE + 3, "test", 1.0)
            store.set_closed_through(MINUTE + 3)
            raise RuntimeError("cut short")
    assert store.gaps() == [] and store.closed_through() == MINUTE
    with store.transaction():
        store.record_gap(MINUTE + 1, MINUTE + 3, "test", 1.0)
        store.set_closed_through(MINUTE + 3)
    assert store.gap_count() == 1 and store.closed_through() == MINUTE + 3


def test_a_final_roll_of_a_retired_segment_records_its_end(redis_server):
    store = store_on(redis_server)
    store.roll([("acme", "pageview", MINUTE, 1)], 1.0, instance=7)
    assert store.instance() == 7 and store.instance_ended() is None
    store.roll_deltas([("acme", "pageview", MINUTE, 2)], 2.0, instance=7, ended=True)
    assert store.instance_ended() == 7
    assert store.period("acme", "pageview", 2026)["total"] == 2


def test_top_accounts_over_the_minute_hashes_like_sqlite(redis_server, tmp_path):
    rows = [("acme", "pageview", MINUTE, 5), ("globex", "pageview", MINUTE + 1, 9),
            ("initech", "pageview", MINUTE - 3, 50), ("acme", "pageview", MINUTE + 70, 7),
            ("all", "pageview", MINUTE, 100), ("acme", "signup", MINUTE, 1)]
    redis_store = store_on(redis_server)
    redis_store.roll(rows, 1.0)
    with SQLiteStore(str(tmp_path / "s.sqlite3"), "Europe/Zurich") as sqlite:
        sqlite.roll(rows, 1.0)
        for since, limit in ((MINUTE, 5), (MINUTE, 1), (MINUTE - 5, 5)):
            assert redis_store.top_accounts("pageview", since, limit) == \
                sqlite.top_accounts("pageview", since, limit)
    assert redis_store.top_accounts("pageview", MINUTE, 5) == [("acme", 12), ("globex", 9)]


def test_years_and_events_of_a_key_for_the_discovery_routes(redis_server: RedisServer) -> None:
    store = store_on(redis_server)
    m2025 = MINUTE - 365 * 24 * 60
    store.roll([("a*[x]", "pageview", MINUTE, 1), ("a*[x]", "pageview", m2025, 1),
                ("a*[x]", "signup", MINUTE, 1), ("ab", "pageview", MINUTE, 1)], now=1)
    assert store.years("a*[x]", "pageview") == [2025, 2026]  # glob characters escaped
    assert store.years("a", "pageview") == []
    assert store.events("a*[x]") == ["pageview", "signup"] and store.events("ab") == ["pageview"]


# -- a host renamed, a long ring (issue 21) -------------------------------------

def _segment_with_hits(key, t0, n=250, **geometry):
    from trafficthreshold import segment
    segment.install(key, "sysv", now=t0, geometry=segment.Geometry(**geometry))
    counter = segment.attach(key, "sysv")
    counter.hit("acme", "pageview", n, t0 + 5)
    return counter


def test_a_renamed_host_carries_its_watermarks_over_and_counts_nothing_twice(redis_server, key):
    """The same segment rolled under a new [store] host (a hostname change):
    the first roll under the new name adds nothing again and records no
    gap; the watermarks, closed_through and instance come along."""
    from trafficthreshold.rollup import Roller
    t0 = 1_800_000_000
    zone = resolve_timezone("UTC")
    counter = _segment_with_hits(key, t0)
    try:
        old = RedisStore(redis_server.client(), zone, "web1")
        assert Roller(counter, old).roll(t0 + 65) == 250
        counter.hit("acme", "pageview", 7, t0 + 70)
        new = RedisStore(redis_server.client(), zone, "web1-new")
        assert Roller(counter, new).roll(t0 + 125) == 7
        assert new.period("acme", "pageview", 2027)["total"] == 257
        assert new.gaps() == [] and old.gaps() == []
        assert new.closed_through() == (t0 + 125) // 60 - 1
        assert new.instance() == old.instance()
        # renamed back: the same again, nothing twice
        assert Roller(counter, RedisStore(redis_server.client(), zone, "web1")).roll(t0 + 185) == 0
        assert new.period("acme", "pageview", 2027)["total"] == 257
    finally:
        counter.detach()


def test_a_rename_while_the_old_name_still_rolls_is_refused(redis_server, key):
    """Two names rolling one segment at once (a cloned VM kept its memory):
    the new name is refused, naming both and the fix."""
    from trafficthreshold import farm
    from trafficthreshold.rollup import Roller
    t0 = 1_800_000_000
    zone = resolve_timezone("UTC")
    counter = _segment_with_hits(key, t0)
    try:
        old = RedisStore(redis_server.client(), zone, "web1")
        Roller(counter, old).roll(t0 + 65)
        from trafficthreshold import segment
        instance = counter.load(segment.H_INSTANCE, 8)
        farm.HostClaim(redis_server.client(), "web1", instance, pid=1).take()
        with pytest.raises(ConfigError, match="web1.*web2|web2.*web1"):
            Roller(counter, RedisStore(redis_server.client(), zone, "web2")).roll(t0 + 125)
        assert old.period("acme", "pageview", 2027)["total"] == 250
    finally:
        counter.detach()


def test_a_rename_right_after_a_sigkill_carries_over_at_once(redis_server, key):
    """The old name's supervisor was SIGKILLed (its name's ownership key
    lives on for its TTL) and the host restarts under a new name at once:
    the old holder is gone (this boot, its pid dead), so the new name
    carries the segment over and rolls, nothing twice; no error claiming
    that a dead supervisor is running."""
    from trafficthreshold import farm, segment
    from trafficthreshold.rollup import Roller
    t0 = 1_800_000_000
    zone = resolve_timezone("UTC")
    counter = _segment_with_hits(key, t0)
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()
    try:
        old = RedisStore(redis_server.client(), zone, "web1")
        Roller(counter, old).roll(t0 + 65)
        instance = counter.load(segment.H_INSTANCE, 8)
        farm.HostClaim(redis_server.client(), "web1", instance, pid=dead.pid).take()
        counter.hit("acme", "pageview", 7, t0 + 70)
        new = RedisStore(redis_server.client(), zone, "web1b")
        assert Roller(counter, new).roll(t0 + 125) == 7
        assert new.period("acme", "pageview", 2027)["total"] == 257
        assert new.gaps() == []
    finally:
        counter.detach()


def test_two_hosts_that_swap_names_count_nothing_twice_and_record_no_gap(redis_server, key):
    """web1 and web2 stop, their configurations are swapped (web1's machine
    is now web2 and the other way round), both start again and roll (web1's
    new holder first): every hit once, no false gap, each name rolls its
    new segment from where that segment stopped (web2 rolled its old one
    an hour further than web1 did: a's minute after that must still be
    read)."""
    from conftest import remove_everything
    from trafficthreshold import _counter, segment
    from trafficthreshold.rollup import Roller
    t0 = 1_800_000_000
    zone = resolve_timezone("UTC")
    other = segment.unused_key()
    a = _segment_with_hits(key, t0, n=10)
    segment.install(other, "sysv", now=t0)
    b = segment.attach(other, "sysv")
    b.hit("acme", "pageview", 20, t0 + 5)
    try:
        web1, web2 = (RedisStore(redis_server.client(), zone, h) for h in ("web1", "web2"))
        assert Roller(a, web1).roll(t0 + 65, True) == 10  # SIGTERM: the final roll
        assert Roller(b, web2).roll(t0 + 3665, True) == 20
        a.hit("acme", "pageview", 1, t0 + 70)
        b.hit("acme", "pageview", 2, t0 + 3670)
        swapped1, swapped2 = (RedisStore(redis_server.client(), zone, h)
                              for h in ("web1", "web2"))
        assert Roller(b, swapped1).roll(t0 + 3725) == 2   # b, now named web1
        assert Roller(a, swapped2).roll(t0 + 3725) == 1   # a, now named web2
        assert web1.period("acme", "pageview", 2027)["total"] == 33
        assert swapped1.gaps() == [] and swapped2.gaps() == []
        assert swapped1.instance() == b.load(segment.H_INSTANCE, 8)
        assert swapped2.instance() == a.load(segment.H_INSTANCE, 8)
    finally:
        a.detach()
        b.detach()
        _counter._reset()
        remove_everything(other)


def test_watermarks_outlive_a_ring_longer_than_two_days(redis_server, key):
    """A ring of 4,000 minutes: its watermarks are kept at least as long as
    the ring holds their minute (else the oldest minute, read once more for
    late hits, reads as all late)."""
    from trafficthreshold.rollup import Roller
    t0 = 1_800_000_000
    counter = _segment_with_hits(key, t0, 9, minutes=4000)
    try:
        store = RedisStore(redis_server.client(), resolve_timezone("UTC"), "web1")
        assert Roller(counter, store).roll(t0 + 65) == 9
        ttl = redis_server.client().ttl(f"track~wm:web1:{t0 // 60}")
        assert ttl >= 4000 * 60
        # what the ring's oldest minute would read after the old TTL: nothing late
        assert store.drop_late([("acme", "pageview", t0 // 60, 9)], store.instance()) == 0
    finally:
        counter.detach()


def test_the_farm_compares_zone_rules_not_names(redis_server: RedisServer) -> None:
    """A copied /etc/localtime is named "localtime" whatever the zone
    (containers): Zurich and New York under that one name are refused;
    "UTC" and "Etc/UTC" are one zone, and so is a copied Zurich file."""
    from zoneinfo import ZoneInfo

    def localtime(name: str) -> ZoneInfo:
        with open(f"/usr/share/zoneinfo/{name}", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")

    RedisStore(redis_server.client(), localtime("Europe/Zurich"), "web1").check_zone("localtime")
    RedisStore(redis_server.client(), ZoneInfo("Europe/Zurich"), "web2"
               ).check_zone("Europe/Zurich")
    with pytest.raises(ConfigError) as err:
        RedisStore(redis_server.client(), localtime("America/New_York"), "web3"
                   ).check_zone("localtime")
    assert "localtime" in str(err.value) and "rules" in str(err.value)
    other = "track2"
    RedisStore(redis_server.client(), ZoneInfo("UTC"), "web1", prefix=other).check_zone("UTC")
    RedisStore(redis_server.client(), ZoneInfo("Etc/UTC"), "web2", prefix=other
               ).check_zone("Etc/UTC")


def test_redis_memory_stays_flat_over_a_thousand_host_names_that_come_and_go(
        redis_server: RedisServer) -> None:
    """1,000 host names (containers, autoscaled machines) each roll, take
    their name, publish live counts, record a gap and leave: with their
    bookkeeping forgotten after a (here: one-second) while, Redis holds no
    more after the thousandth than after the first hundred (track~hosts
    trimmed, host hashes, gaps, watermarks and segment keys expiring)."""
    from trafficthreshold import farm
    client = redis_server.client()
    zone = resolve_timezone("UTC")
    t0 = 1_800_000_000

    def wave(first: int, now: float) -> None:
        for i in range(first, first + 100):
            host = f"auto-{i}"
            store = RedisStore(client, zone, host, forget_after=1)
            store.watermark_ttl = 1  # as cover_ring would, scaled down
            store.roll([("acme", "pageview", t0 // 60, 3), ("all", "pageview", t0 // 60, 3)],
                       now=now, instance=i + 1, closed_through=t0 // 60)
            store.record_gap(t0 // 60 - 5, t0 // 60 - 1, "test", now)
            farm.HostClaim(client, host, i + 1, pid=1, ttl_ms=500).take()
            farm.publish_live(client, host, {("all", "pageview"): (3, 3)}, level=0, now=now,
                              ttl_ms=500, forget_after=1)

    def settled_memory() -> int:
        time.sleep(2.2)  # past the longest life here: segment keys and track~last, 2 s
        for _ in client.scan_iter(count=1000):  # a SCAN expires what it meets
            pass
        # The live log keeps the last farm.LOG_KEEP_MS (30 s) of entries, a
        # few per host that came and went: trimmed as the next publication
        # after that window would (XADD ... MINID), without waiting 30 s.
        secs, usecs = client.time()
        client.xtrim("track~live~log", minid=secs * 1000 + usecs // 1000)
        return int(client.info("memory")["used_memory"])

    wave(0, t0)
    after_100 = settled_memory()
    for n in range(1, 10):
        wave(n * 100, t0 + 2 * n)
    after_1000 = settled_memory()
    hosts = client.zcard("track~hosts")
    assert hosts <= 100, hosts
    assert not client.keys("track~host:auto-1*") and not client.keys("track~gaps:auto-1*")
    assert after_1000 < after_100 * 1.1 + 50_000, (after_100, after_1000)
    assert store_on(redis_server).period("acme", "pageview", 2027)["total"] == 3000


@pytest.mark.parametrize("retired", [False, True])
def test_a_host_back_after_it_was_forgotten_with_a_new_segment_records_its_gap(
        redis_server, key, retired):
    """A host forgotten (``[store] forget_hosts_days`` after its last roll)
    comes back with a new segment (a reboot meanwhile, ipcrm): what its old
    segment counted after its last closed minute is unknown, as for any
    segment replaced without `uninstall` rolling it to its end, and is
    recorded from that minute (kept in ``track~last:{host}``, which
    outlives the host hash) to the minute before the new segment's
    creation.  One retired and rolled to its end leaves no gap.  Once that
    record is gone too, the name is a new host: no gap."""
    from conftest import remove_everything
    from trafficthreshold import segment
    from trafficthreshold.rollup import Roller
    t0 = 1_800_000_000
    zone = resolve_timezone("UTC")
    client = redis_server.client()
    store = RedisStore(client, zone, "web1", forget_after=30 * 86400)
    counter = _segment_with_hits(key, t0 - 3 * 3600, n=5)
    try:
        for t in range(t0 - 3 * 3600 + 65, t0 + 1, 600):
            Roller(counter, store).roll(t)
    finally:
        counter.detach()
    old_instance = store.instance()
    if retired:  # `uninstall`'s final roll of the retired segment, to its end
        store.roll_deltas([], t0 + 30, instance=old_instance, closed_through=t0 // 60,
                          ended=True)
        assert store.instance_ended() == old_instance
    closed = store.closed_through()
    remove_everything(key)  # a reboot
    for k in [f"track~host:web1", f"track~gaps:web1", *client.scan_iter("track~wm:web1:*")]:
        client.delete(k)  # forgotten, as their expiry does
    later = t0 + 40 * 86400
    counter = _segment_with_hits(key, later - 600, n=2)
    try:
        assert counter.load(segment.H_INSTANCE, 8) != old_instance
        assert Roller(counter, store).roll(later) == 2
        if retired:
            assert store.gaps() == []
        else:
            [gap] = store.gaps()
            assert (gap["first_minute"], gap["last_minute"]) == (closed + 1, (later - 600) // 60 - 1)
            assert "replaced" in gap["reason"], gap
    finally:
        counter.detach()
    # Away for longer than the record lives: a new host to the farm.
    remove_everything(key)
    for k in [f"track~host:web1", f"track~gaps:web1", "track~last:web1"]:
        client.delete(k)
    much_later = later + 80 * 86400
    counter = _segment_with_hits(key, much_later - 600, n=2)
    try:
        assert Roller(counter, store).roll(much_later) == 2
        assert store.gaps() == []
    finally:
        counter.detach()


@pytest.mark.parametrize("how", ["forgotten", "not forgotten, the new name stopped",
                                 "not forgotten, the new name still rolls it"])
def test_a_renamed_hosts_old_name_back_on_a_new_segment_records_no_false_gap(
        redis_server, key, how):
    """The segment moved to the new name (a rename): the old name lost
    nothing of what the new name rolled.  Forgotten, its record of its last
    segment went with the carry over: back on a new segment, it is new.
    Not forgotten (its host hash still names that segment), its gap runs
    only from the segment's own last closed minute (what it counted after
    its last roll by any name is unknown: the same machine renamed back
    after a reboot), and there is none while the new name's supervisor
    still rolls it (another machine under the old name)."""
    from conftest import remove_everything
    from trafficthreshold import farm
    from trafficthreshold.rollup import Roller
    t0 = 1_800_000_000
    zone = resolve_timezone("UTC")
    client = redis_server.client()
    counter = _segment_with_hits(key, t0)
    try:
        Roller(counter, RedisStore(client, zone, "web1")).roll(t0 + 65)
        assert client.exists("track~last:web1")
        renamed = RedisStore(client, zone, "web1-new")
        Roller(counter, renamed).roll(t0 + 3600)
        assert not client.exists("track~last:web1") and client.exists("track~last:web1-new")
        old_instance = renamed.instance()
        if how.endswith("still rolls it"):
            farm.HostClaim(client, "web1-new", old_instance, pid=1).take()
    finally:
        counter.detach()
    closed = renamed.closed_through()
    remove_everything(key)
    if how == "forgotten":
        client.delete("track~host:web1", "track~gaps:web1")
    counter = _segment_with_hits(key, t0 + 7200, n=1)
    try:
        back = RedisStore(client, zone, "web1")
        assert back.instance() == (None if how == "forgotten" else old_instance)
        assert Roller(counter, back).roll(t0 + 7200 + 65) == 1
        if how.endswith("stopped"):
            [gap] = back.gaps()
            assert (gap["first_minute"], gap["last_minute"]) == (closed + 1, (t0 + 7200) // 60 - 1)
        else:
            assert back.gaps() == []
    finally:
        counter.detach()


def test_a_host_back_after_it_was_forgotten_records_an_honest_gap(redis_server, key):
    """A host whose bookkeeping was forgotten (``[store] forget_hosts_days``
    after its last roll) comes back with the same segment: its gap runs
    from its last closed minute (kept in the segment's key, which outlives
    the host hash), not from the segment's creation (minutes it did roll).
    Once that is gone too, the gap says plainly that the start is unknown."""
    from trafficthreshold import segment
    from trafficthreshold.rollup import Roller
    t0 = 1_800_000_000
    zone = resolve_timezone("UTC")
    client = redis_server.client()
    counter = _segment_with_hits(key, t0 - 3 * 3600, n=5)  # created 3 hours before t0
    instance = counter.load(segment.H_INSTANCE, 8)

    def forget(host: str, segment_too: bool = False) -> None:
        # what their expiry does, forget_hosts_days after the last roll
        keys = [f"track~host:{host}", f"track~gaps:{host}",
                *client.scan_iter(f"track~wm:{host}:*")]
        if segment_too:  # and the host's last segment, which lives as long
            keys += [f"track~segment:{instance}", f"track~last:{host}"]
        client.delete(*keys)

    try:
        store = RedisStore(client, zone, "web1", forget_after=30 * 86400)
        for t in range(t0 - 3 * 3600 + 65, t0 + 1, 600):  # it rolls for 3 hours
            Roller(counter, store).roll(t)
        closed = store.closed_through()
        assert closed is not None and closed > (t0 - 3 * 3600) // 60 + 120
        assert client.ttl(f"track~segment:{instance}") > client.ttl("track~host:web1") > 0
        # track~last lives as long as the segment's key (docs/redis.rst)
        assert abs(client.ttl("track~last:web1") - client.ttl(f"track~segment:{instance}")) <= 2
        forget("web1")
        later = t0 + 40 * 86400
        counter.hit("acme", "pageview", 2, later - 30)
        assert Roller(counter, store).roll(later) == 2
        [gap] = store.gaps()
        assert gap["first_minute"] == closed + 1, (gap, closed)
        assert "unknown" not in gap["reason"]
        forget("web1", segment_too=True)
        much_later = later + 40 * 86400
        Roller(counter, store).roll(much_later)
        [gap] = store.gaps()
        assert "unknown" in gap["reason"] and "forget_hosts_days" in gap["reason"], gap
    finally:
        counter.detach()
