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
