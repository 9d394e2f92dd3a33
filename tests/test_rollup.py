"""Roll-ups from the segment ring into the store: exactly once, late writes,
gaps.  Real segments (both backends) and real SQLite files; the clock is a
parameter."""
from __future__ import annotations

import pytest

from trafficthreshold import segment
from trafficthreshold.rollup import LATE_MINUTES, Roller
from trafficthreshold.store import Store

T0 = 1_800_000_000          # the fixtures install the segment at this time
M0 = T0 // 60               # its epoch minute


@pytest.fixture
def store(tmp_path):
    with Store(str(tmp_path / "stats.sqlite3"), "UTC") as s:
        yield s


def minute_total(store, account, t):
    """The store's count of the minute containing t (UTC store)."""
    import datetime as dt
    d = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return store.period(account, "pageview", d.year, d.month, d.day, d.hour)["data"][d.minute]


def test_closed_minutes_roll_once(counter, store):
    for i in range(5):
        counter.hit("acme", "pageview", i + 1, T0 + 60 * i + 1)
    roller = Roller(counter, store)
    assert roller.roll(T0 + 5 * 60) == 1 + 2 + 3 + 4 + 5
    assert roller.roll(T0 + 5 * 60 + 30) == 0                    # same minute again
    assert store.closed_through() == M0 + 4
    for i in range(5):
        assert minute_total(store, "acme", T0 + 60 * i) == i + 1
        assert minute_total(store, "all", T0 + 60 * i) == i + 1


def test_open_minute_only_in_final_roll(counter, store):
    counter.hit("acme", "pageview", 3, T0 + 10)
    roller = Roller(counter, store)
    assert roller.roll(T0 + 20) == 0
    assert roller.roll(T0 + 20, include_current=True) == 3
    counter.hit("acme", "pageview", 4, T0 + 30)   # the rest of that minute
    assert roller.roll(T0 + 61) == 4                # only the rest is added
    assert minute_total(store, "acme", T0) == 7


def test_late_write_into_closed_minute_is_picked_up(counter, store):
    roller = Roller(counter, store)
    counter.hit("acme", "pageview", 1, T0 + 59)
    assert roller.roll(T0 + 60) == 1
    # A worker read the clock at T0+59.9 but added after the roll:
    counter.hit("acme", "pageview", 1, T0 + 59.9)
    assert roller.roll(T0 + 120) == 1
    assert minute_total(store, "acme", T0) == 2


def test_late_write_older_than_recheck_window_is_not_rolled_twice(counter, store):
    roller = Roller(counter, store)
    counter.hit(None, "pageview", 5, T0 + 1)
    roller.roll(T0 + 60)
    roller.roll(T0 + 60 * (LATE_MINUTES + 5))
    assert minute_total(store, "all", T0) == 5


def test_many_keys_and_events(counter, store):
    for n in range(50):
        counter.hit(f"site{n}", "pageview" if n % 2 else "signup", n + 1, T0 + 5)
    Roller(counter, store).roll(T0 + 60)
    assert store.period("site7", "pageview", 2027, 1, 15)["total"] == 8
    assert sum(store.period(f"site{n}", "signup", 2027)["total"] for n in range(0, 50, 2)) \
        == store.period("all", "signup", 2027)["total"]


def test_down_longer_than_ring_records_gap(counter, store):
    roller = Roller(counter, store)
    counter.hit("acme", "pageview", 1, T0 + 5)
    roller.roll(T0 + 60)
    ring = counter.load(segment.H_MINUTE_BUCKETS, 4)
    later = T0 + 60 * (ring + 50)
    counter.hit("acme", "pageview", 2, later - 60)     # still inside the ring
    assert roller.roll(later) == 2
    (gap,) = store.gaps()
    assert gap["first_minute"] == M0 + 1
    assert gap["last_minute"] == later // 60 - ring
    assert "ring" in gap["reason"]


def test_no_gap_before_the_segment_existed(counter, store):
    """A store older than the segment: minutes before its creation were not lost."""
    store.set_closed_through(M0 - 10_000)
    Roller(counter, store).roll(T0 + 120)
    assert store.gaps() == []


def test_first_roll_of_fresh_store_covers_the_ring(counter, store):
    counter.hit("acme", "pageview", 1, T0 + 1)
    counter.hit("acme", "pageview", 1, T0 + 3000)
    assert Roller(counter, store).roll(T0 + 3600) == 2
