"""Tests of trafficthreshold.migrate: a real SQLite store copied into a
real redis-server, exactly once."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from test_store_redis import MINUTE, store_on
from tt_redis import RedisServer
from trafficthreshold.migrate import count_hashes, migrate
from trafficthreshold.store import SQLiteStore

pytestmark = pytest.mark.redis


@pytest.fixture
def history(tmp_path: Path) -> tuple[str, list]:
    rng = random.Random(3)
    items = [(acct, ev, MINUTE + rng.randrange(0, 40 * 24 * 60), rng.randrange(1, 9))
             for acct in ("acme", "shop", "all") for ev in ("pageview", "signup")
             for _ in range(150)]
    path = str(tmp_path / "stats.sqlite3")
    with SQLiteStore(path, "Europe/Zurich") as store:
        store.roll(items, now=1, closed_through=MINUTE + 40 * 24 * 60)
    return path, items


def test_a_migration_copies_every_level_and_a_rerun_adds_nothing(
        redis_server: RedisServer, history: tuple[str, list]) -> None:
    path, _ = history
    store = store_on(redis_server)
    ticks = []
    first = migrate(path, store, progress=ticks.append)
    assert first.hashes == count_hashes(path) == len(ticks) and first.skipped == 0
    again = migrate(path, store)
    assert again.hashes == 0 and again.skipped == first.hashes and again.hits == 0
    with SQLiteStore(path, "Europe/Zurich") as sqlite:
        for acct in ("acme", "shop", "all"):
            for ev in ("pageview", "signup"):
                for args in [(2026,), (2026, 2), (2026, 3), (2026, 2, 17), (2026, 3, 1, 12)]:
                    assert store.period(acct, ev, *args) == sqlite.period(acct, ev, *args)
        assert first.hits == sum(sqlite.period(a, e, 2026)["total"]
                                 for a in ("acme", "shop", "all") for e in ("pageview", "signup"))


def test_the_supervisor_carries_on_where_sqlite_stopped(
        redis_server: RedisServer, history: tuple[str, list]) -> None:
    """The watermarks come along: rolling the same ring into Redis after the
    migration adds only what grew since the last SQLite roll."""
    path, items = history
    store = store_on(redis_server)
    migrate(path, store)
    before = store.period("acme", "pageview", 2026)["total"]
    assert store.roll(items, now=2) == 0
    grown = [(a, e, m, c + 2) for a, e, m, c in items if a == "acme" and e == "pageview"]
    assert store.roll(grown, now=3) == 2 * len(grown)
    assert store.period("acme", "pageview", 2026)["total"] == before + 2 * len(grown)
    assert store.closed_through() == MINUTE + 40 * 24 * 60


def test_two_hosts_migrating_their_files_add_up(redis_server: RedisServer,
                                                history: tuple[str, list]) -> None:
    path, _ = history
    migrate(path, store_on(redis_server, "web1"))
    migrate(path, store_on(redis_server, "web2"))
    with SQLiteStore(path, "Europe/Zurich") as sqlite:
        one = sqlite.period("all", "pageview", 2026)["total"]
    assert store_on(redis_server).period("all", "pageview", 2026)["total"] == 2 * one


def test_a_migration_carries_the_all_time_totals_once(
        redis_server: RedisServer, history: tuple[str, list]) -> None:
    path, _ = history
    store = store_on(redis_server)
    migrate(path, store)
    migrate(path, store)  # a rerun adds nothing, to the totals either
    totals = store.metrics_reading(0, MINUTE, MINUTE)["totals"]
    with SQLiteStore(path, "Europe/Zurich") as sqlite:
        for acct in ("acme", "shop", "all"):
            for ev in ("pageview", "signup"):
                assert totals[acct, ev] == sum(sqlite.period(acct, ev, y)["total"]
                                               for y in (2026, 2027))


# -- reruns, live files, colons, expiry (issue 21 items 3, 4, 12) ---------------

def _totals(store, accounts=("acme", "shop", "all"), events=("pageview", "signup")):
    return {(a, e): sum(store.period(a, e, y)["total"] for y in (2026, 2027))
            for a in accounts for e in events}


def test_a_rerun_after_the_file_grew_adds_exactly_what_is_missing(
        redis_server: RedisServer, history: tuple[str, list]) -> None:
    """A trial run, the SQLite store rolls on (the same hours and days grow,
    new minutes come), the real run: Redis holds what SQLite holds, and the
    ring rolled into Redis afterwards adds nothing twice and skips nothing."""
    path, items = history
    store = store_on(redis_server)
    migrate(path, store)
    grown = [(a, e, m, c + 3) for a, e, m, c in items[:40]]
    fresh = [("acme", "pageview", MINUTE + 40 * 24 * 60 + 1, 11)]
    with SQLiteStore(path, "Europe/Zurich") as sqlite:
        sqlite.roll(grown + fresh, now=5, closed_through=MINUTE + 40 * 24 * 60 + 1)
        want = _totals(sqlite)
    second = migrate(path, store)
    assert second.hits == 3 * len(grown) + 11
    assert _totals(store) == want
    assert migrate(path, store).hits == 0
    # the ring (as SQLite last rolled it) into Redis: nothing again
    assert store.roll(grown + fresh, now=6) == 0
    assert store.roll([("acme", "pageview", MINUTE + 40 * 24 * 60 + 1, 12)], now=7) == 1


def test_a_migration_after_the_host_rolled_into_redis_is_refused(
        redis_server: RedisServer, history: tuple[str, list]) -> None:
    """Once this host's supervisor rolls into Redis, what its SQLite file
    got since would be added twice: refused, naming the fix."""
    from trafficthreshold.errors import ConfigError
    path, items = history
    store = store_on(redis_server)
    migrate(path, store)
    store.roll(items[:1], now=9)
    with pytest.raises(ConfigError, match="already rolls into this Redis"):
        migrate(path, store)


def test_names_with_a_colon_in_the_history_are_refused_naming_them(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """("shop:order", "paid") and ("shop", "order:paid") would share
    track:shop:order:paid:{Y}: the migration names the rows and the fix,
    and copies nothing."""
    from trafficthreshold.errors import ConfigError
    path = str(tmp_path / "colon.sqlite3")
    with SQLiteStore(path, "UTC") as sqlite:
        sqlite.roll([("shop:order", "paid", MINUTE, 5), ("shop", "order:paid", MINUTE, 7)],
                    now=1)
    with pytest.raises(ConfigError) as err:
        migrate(path, store_on(redis_server))
    text = str(err.value)
    assert "'shop:order'" in text and "'order:paid'" in text and "UPDATE" in text
    assert not redis_server.client().keys("track:*")


def test_migrated_minute_hashes_expire_as_rolled_ones_do(
        redis_server: RedisServer, history: tuple[str, list]) -> None:
    """retention.minutes (the store's minute_days) holds for migrated
    minutes too: each minute hash expires that long after its hour; hours
    and longer never do."""
    path, items = history
    newest = max(m for _, _, m, _ in items)
    store = store_on(redis_server, minute_days=30)
    migrate(path, store, now=newest * 60 + 120)
    r = redis_server.client()
    minute_keys = [k for k in r.scan_iter("track:acme:pageview:*") if k.count(b":") == 6]
    assert minute_keys
    for k in minute_keys:
        assert 0 < r.ttl(k) <= 31 * 86400
    assert r.ttl("track:acme:pageview:2026") == -1
    # minutes older than 30 days were not copied (they would expire at once)
    from trafficthreshold.periods import local_parts
    oldest = min(m for a, e, m, _ in items if (a, e) == ("acme", "pageview"))
    y, mo, d, h, _ = local_parts(oldest, store.tz)
    assert not r.exists(f"track:acme:pageview:{y}:{mo}:{d}:{h}")


def test_a_migration_cut_short_stops_the_roll_until_it_is_run_again(
        redis_server: RedisServer, history: tuple[str, list]) -> None:
    """A migration killed after the periods and before the watermarks: a
    supervisor switched to Redis then would add its ring again.  Its roll
    is refused, naming the fix, until the migration has run whole."""
    from trafficthreshold.errors import ConfigError
    path, items = history
    store = store_on(redis_server)
    real = store.client.register_script

    def dies_at_the_watermarks(script):
        if "HGET', KEYS[1], ARGV[1]" in script:  # WATERMARK_SCRIPT: killed at its first call
            def killed(**kw):
                raise KeyboardInterrupt("SIGKILL")
            return killed
        return real(script)

    store.client.register_script = dies_at_the_watermarks
    with pytest.raises(KeyboardInterrupt):
        migrate(path, store)
    store.client.register_script = real
    with pytest.raises(ConfigError, match="store migrate"):
        store.claim_segment(1)
    migrate(path, store)
    store.claim_segment(1)
    assert store.roll(items, now=2) == 0


@pytest.mark.parametrize("lost_at", ["second", "last"])
def test_a_migration_whose_reply_is_lost_is_run_again_and_adds_nothing_twice(
        redis_server: RedisServer, history: tuple[str, list], lost_at: str) -> None:
    """Through a proxy, every Redis reply is lost from the second or the
    last target hash on (its script runs in Redis; the migration
    stops on the timeout): the roll is refused until the migration is run again,
    and the rerun leaves Redis holding exactly what SQLite holds; the ring
    rolled afterwards adds nothing twice."""
    import redis as redis_py
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from tt_proxy import TcpProxy
    from trafficthreshold.errors import ConfigError
    from trafficthreshold.store.redis import RedisStore
    path, items = history
    n = count_hashes(path)
    at = {"second": 1, "last": n - 1}[lost_at]
    with TcpProxy(redis_server.port) as proxy:
        client = redis_py.Redis(port=proxy.port, socket_timeout=0.5,
                                retry=Retry(NoBackoff(), 0))
        store = RedisStore(client, store_on(redis_server).tz, "web1")
        done = []

        def progress(k):
            done.append(k)
            if len(done) == at:
                proxy.drop_replies()
        with pytest.raises(redis_py.RedisError):
            migrate(path, store, progress=progress)
        proxy.pass_replies()
        assert len(done) == at and proxy.dropped > 0
        fresh = RedisStore(redis_py.Redis(port=proxy.port, socket_timeout=2), store.tz, "web1")
        with pytest.raises(ConfigError, match="store migrate"):
            fresh.claim_segment(1)
        migrate(path, fresh)
    store = store_on(redis_server)
    with SQLiteStore(path, "Europe/Zurich") as sqlite:
        assert _totals(store) == _totals(sqlite)
    store.claim_segment(1)
    assert store.roll(items, now=2) == 0


def test_the_migration_records_are_bounded_and_dropped_at_the_switch(
        redis_server: RedisServer, history: tuple[str, list]) -> None:
    """The shadow hashes (what each run copied, per field) are only needed
    for a rerun: they expire with the host's hash (``forget_hosts_days``
    after the last run, refreshed by each run) and are dropped at the
    host's first roll into Redis (a rerun is refused from then on), so
    migrated history does not take twice its memory.  A rerun after they
    expired cannot tell what was copied: refused, naming the fix."""
    from trafficthreshold.errors import ConfigError
    path, items = history
    now = 1_800_000_000
    store = store_on(redis_server, forget_after=30 * 86400)
    migrate(path, store, now=now)
    r = redis_server.client()
    shadows = list(r.scan_iter("track~migrated:web1:*"))
    assert len(shadows) == count_hashes(path)
    for k in shadows:
        assert 0 < r.ttl(k) <= store.host_ttl, k
    assert 0 < r.ttl(store.host_key) <= store.host_ttl
    year = store.period("acme", "pageview", 2026)
    store.claim_segment(1)  # the supervisor's first roll into Redis
    store.roll(items[:1], now=9)
    assert not list(r.scan_iter("track~migrated:web1*"))
    assert store.period("acme", "pageview", 2026) == year
    with pytest.raises(ConfigError, match="already rolls into this Redis"):
        migrate(path, store, now=now + 60)
    # An abandoned migration: its records expire; a rerun cannot tell what
    # was copied any more and would add it all again.
    other = store_on(redis_server, "web2", forget_after=30 * 86400)
    migrate(path, other, now=now)
    for k in r.scan_iter("track~migrated:web2:*"):
        r.delete(k)  # as their expiry does
    r.delete(other.host_key)
    with pytest.raises(ConfigError, match="expired"):
        migrate(path, other, now=now + other.host_ttl + 1)
    with SQLiteStore(path, "Europe/Zurich") as sqlite:
        once = sqlite.period("shop", "signup", 2026)["total"]
    assert store.period("shop", "signup", 2026)["total"] == 2 * once  # web1's and web2's


def test_a_switch_killed_while_dropping_the_records_never_allows_a_rerun(
        redis_server: RedisServer, history: tuple[str, list]) -> None:
    """The first roll into Redis drops the shadows: killed half-way (after
    the first batch), a rerun of the migration must still be refused, not
    add again what the dropped shadows recorded as copied."""
    from trafficthreshold.errors import ConfigError
    path, _ = history
    store = store_on(redis_server)
    migrate(path, store)
    year = store.period("acme", "pageview", 2026)
    real = store.client.unlink

    def killed(*keys):
        real(*keys[:5])
        raise KeyboardInterrupt("SIGKILL")

    store.client.unlink = killed
    with pytest.raises(KeyboardInterrupt):
        store.claim_segment(1)
    store.client.unlink = real
    with pytest.raises(ConfigError, match="already rolls into this Redis"):
        migrate(path, store)
    assert store.period("acme", "pageview", 2026) == year


@pytest.mark.parametrize("made", ["missing", "empty"])
def test_a_file_without_period_tables_is_refused_and_nothing_written(
        redis_server: RedisServer, tmp_path: Path, made: str) -> None:
    """A path that does not exist, or a file the daemon never created its
    tables in: nothing to copy, said so, and no migration recorded (which
    would otherwise block a later real migration's rerun logic)."""
    from trafficthreshold.errors import ConfigError
    path = tmp_path / "stats.sqlite3"
    if made == "empty":
        path.write_bytes(b"")
    with pytest.raises(ConfigError, match="nothing to migrate.*stats.sqlite3"):
        migrate(str(path), store_on(redis_server))
    with pytest.raises(ConfigError, match="nothing to migrate"):
        count_hashes(str(path))
    assert redis_server.client().keys("*") == []
    assert (made == "missing") == (not path.exists())  # the reader created nothing


def test_a_file_whose_path_holds_uri_characters_is_migrated(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """The file is opened by SQLiteStore's read-only reader (a quoted URI):
    a '#', '?' or '%' in its path is part of the name, not of the URI (the
    old reader of migrate.py cut the path at them)."""
    folder = tmp_path / "sites?a=1%20#b"
    folder.mkdir()
    path = str(folder / "stats#1.sqlite3")
    with SQLiteStore(path, "UTC") as sqlite:
        sqlite.roll([("shop", "pageview", MINUTE, 5)], now=1)
    store = store_on(redis_server)
    summary = migrate(path, store)
    assert summary.hits == 5 and count_hashes(path) == summary.hashes
    assert store.period("shop", "pageview", 2026)["total"] == 5


@pytest.mark.parametrize("collides", [False, True])
def test_the_printed_rename_runs_in_a_shell_whole_or_not_at_all(
        redis_server: RedisServer, tmp_path: Path, collides: bool) -> None:
    """The command the refusal prints, pasted into a shell as it is (the
    real sqlite3 shell, the file in a folder whose name has a space): it
    renames every ':' and the migration then goes through; a rename onto a
    name that already exists (here a funnel status, whose watermark comes
    after the period tables) aborts and leaves the file as it was, not
    half renamed (main's statements ran one by one: the period tables
    renamed, the watermarks and funnels not)."""
    import subprocess
    from trafficthreshold.errors import ConfigError
    folder = tmp_path / "my sites"
    folder.mkdir()
    path = str(folder / "stats.sqlite3")
    items = [("a:b", "pageview", MINUTE, 1), ("shop", "order/pa:id", MINUTE, 2)]
    if collides:
        items.append(("shop", "order/pa-id", MINUTE, 4))
    with SQLiteStore(path, "UTC") as sqlite:
        sqlite.roll(items, now=1)
    with SQLiteStore(path, "UTC", readonly=True) as before, before.snapshot():
        first = (list(before.export_periods()), sorted(before.export_watermarks(0)),
                 list(before.export_funnels(by_month=True)))
    store = store_on(redis_server)
    with pytest.raises(ConfigError) as err:
        migrate(path, store)
    command = str(err.value).split("with the daemon stopped: ", 1)[1].split(" (a rename onto")[0]
    ran = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    with SQLiteStore(path, "UTC", readonly=True) as after, after.snapshot():
        now = (list(after.export_periods()), sorted(after.export_watermarks(0)),
               list(after.export_funnels(by_month=True)))
    if collides:
        assert ran.returncode != 0 and "UNIQUE" in ran.stderr
        assert now == first
        assert not redis_server.client().keys("track:*")
    else:
        assert ran.returncode == 0, ran.stderr
        migrate(path, store)
        assert store.period("a-b", "pageview", 2026)["total"] == 1


def test_a_damaged_table_is_a_store_error_naming_the_file_and_the_recovery(
        redis_server: RedisServer, history: tuple[str, list]) -> None:
    """A sqlite3 error while the file is read (here the minutes table's
    root page overwritten) is a StoreError naming the migrated file, not
    the configured database, and the recovery (.recover)."""
    import sqlite3
    from trafficthreshold.store import StoreError
    path, _ = history
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'minutes'").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(random.Random("minutes").randbytes(48))
    with pytest.raises(StoreError) as err:
        migrate(path, store_on(redis_server))
    assert path in str(err.value) and ".recover" in str(err.value)


@pytest.mark.parametrize("name", ["..", ".", "a\\\\b", "it's", 'say "hi"', "50%", "a b", "~x", "a/b", "é"])
def test_names_with_separators_and_quotes_migrate_to_their_own_hashes(
        redis_server: RedisServer, tmp_path: Path, name: str) -> None:
    """An account or event name with any character but ':' (which is
    refused) copies to its own hashes, once; '/' in an event names a
    funnel status, so the event side uses the name without it."""
    path = str(tmp_path / "odd.sqlite3")
    event = name.replace("/", "-")
    with SQLiteStore(path, "UTC") as sqlite:
        sqlite.roll([(name, "pageview", MINUTE, 5), ("all", "pageview", MINUTE, 5),
                     ("acme", event, MINUTE, 3)], now=1)
        expected = [sqlite.period(name, "pageview", 2026, 2), sqlite.period("acme", event, 2026, 2)]
    store = store_on(redis_server)
    migrate(path, store)
    assert [store.period(name, "pageview", 2026, 2), store.period("acme", event, 2026, 2)] == expected
    assert expected[0]["total"] == 5 and expected[1]["total"] == 3
    assert migrate(path, store).hits == 0
