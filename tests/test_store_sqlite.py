"""Tests for trafficthreshold.store: real SQLite files, no mocks.

The nasty cases on purpose: re-rolls, late increments, a failure halfway
through a roll, midnight / month / leap day / year boundaries, both DST
changes in Europe/Zurich, a reader during a write, and a roller killed with
SIGKILL in the middle of its rolls.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from trafficthreshold.store import SQLiteStore, StoreError
from trafficthreshold.store.sqlite import SCHEMA_VERSION

ZONE = "Europe/Zurich"
EVENT = "pageview"


def minute_at(*parts: int, fold: int = 0, zone: str = ZONE) -> int:
    """Epoch minute of a local wall-clock time (year, month, day, hour, minute)."""
    moment = datetime.datetime(*parts, tzinfo=ZoneInfo(zone), fold=fold)
    return int(moment.timestamp() // 60)


def now_of(minute: int) -> float:
    """A ``now`` shortly after ``minute`` closed."""
    return (minute + 1) * 60 + 5.0


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "var" / "stats.sqlite3")


@pytest.fixture
def store(path: str) -> Iterator[SQLiteStore]:
    with SQLiteStore(path, ZONE) as opened:
        yield opened


def rows(path: str, sql: str, *args: object) -> list[tuple]:
    """Read with a separate plain connection: what is really committed."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def level_totals(path: str) -> dict[str, int]:
    """Sum of the counts of each period table, and of the watermarks."""
    tables = ("minutes", "hours", "days", "months", "watermarks")
    return {t: rows(path, f"SELECT COALESCE(SUM(count), 0) FROM {t}")[0][0] for t in tables}


# --------------------------------------------------------------------------
# opening


def test_creates_the_parent_directory_with_wal(store: SQLiteStore, path: str) -> None:
    assert Path(path).is_file()
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_unusable_parent_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create the directory .*set `database`"):
        SQLiteStore(str(blocker / "sub" / "stats.sqlite3"))


def test_a_newer_schema_is_refused(path: str) -> None:
    SQLiteStore(path, ZONE).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this trafficthreshold"):
        SQLiteStore(path, ZONE)


def test_reopening_keeps_data_and_schema(path: str) -> None:
    minute = minute_at(2026, 5, 12, 10, 0)
    with SQLiteStore(path, ZONE) as first:
        first.roll([("acme", EVENT, minute, 3)], now_of(minute))
    with SQLiteStore(path, ZONE) as second:
        assert second.period("acme", EVENT, 2026, 5, 12, 10)["total"] == 3
        assert second.roll([("acme", EVENT, minute, 3)], now_of(minute)) == 0


def test_memory_store_works() -> None:
    minute = minute_at(2026, 5, 12, 10, 0)
    with SQLiteStore(":memory:", ZONE) as store:
        assert store.roll([("acme", EVENT, minute, 2)], now_of(minute)) == 2
        assert store.period("acme", EVENT, 2026)["data"][5] == 2


def test_unknown_timezone_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        SQLiteStore(str(tmp_path / "x.sqlite3"), "Mars/Olympus")


# --------------------------------------------------------------------------
# rolling exactly once


def test_roll_adds_to_every_level(store: SQLiteStore) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    added = store.roll([("acme", EVENT, minute, 5), ("all", EVENT, minute, 5)], now_of(minute))
    assert added == 10
    assert store.period("acme", EVENT, 2026)["data"][5] == 5
    assert store.period("acme", EVENT, 2026, 5)["data"][12] == 5
    assert store.period("acme", EVENT, 2026, 5, 12)["data"][10] == 5
    assert store.period("acme", EVENT, 2026, 5, 12, 10)["data"][17] == 5
    hour = (2026, 5, 12, 10)
    assert store.period("all", EVENT, *hour) == store.period("acme", EVENT, *hour)


def test_rerolling_the_same_snapshot_adds_nothing(store: SQLiteStore, path: str) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    snapshot = [("acme", EVENT, minute, 5), ("acme", EVENT, minute + 1, 2)]
    assert store.roll(snapshot, now_of(minute + 1)) == 7
    assert store.roll(snapshot, now_of(minute + 1)) == 0
    assert store.roll(list(reversed(snapshot)), now_of(minute + 1)) == 0
    assert level_totals(path) == dict.fromkeys(level_totals(path), 7)


def test_late_increments_add_only_the_delta(store: SQLiteStore) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    assert store.roll([("acme", EVENT, minute, 5)], now_of(minute)) == 5
    assert store.roll([("acme", EVENT, minute, 8)], now_of(minute) + 60) == 3
    assert store.period("acme", EVENT, 2026, 5, 12, 10)["data"][17] == 8
    assert store.period("acme", EVENT, 2026, 5, 12)["total"] == 8
    assert store.watermark_minutes(minute) == {("acme", EVENT, minute): 8}


def test_a_repeated_item_in_one_roll_counts_once(store: SQLiteStore) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    items = [("acme", EVENT, minute, 4), ("acme", EVENT, minute, 6), ("acme", EVENT, minute, 6)]
    assert store.roll(items, now_of(minute)) == 6
    assert store.period("acme", EVENT, 2026, 5, 12)["total"] == 6


def test_a_count_going_down_adds_nothing_and_warns(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    store.roll([("acme", EVENT, minute, 9)], now_of(minute))
    with caplog.at_level(logging.WARNING, logger="trafficthreshold.store"):
        assert store.roll([("acme", EVENT, minute, 2)], now_of(minute)) == 0
    assert "went down from 9 to 2" in caplog.text
    assert store.period("acme", EVENT, 2026, 5, 12)["total"] == 9
    assert store.watermark_minutes(minute)[("acme", EVENT, minute)] == 9


def test_an_outer_transaction_that_raises_leaves_nothing(store: SQLiteStore, path: str) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.roll([("acme", EVENT, minute, 5)], now_of(minute), closed_through=minute)
            raise RuntimeError("crash after the roll, before the commit")
    assert level_totals(path) == dict.fromkeys(level_totals(path), 0)
    assert store.closed_through() is None
    assert store.roll([("acme", EVENT, minute, 5)], now_of(minute)) == 5


def test_items_failing_midway_leave_nothing(store: SQLiteStore, path: str) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)

    def items() -> Iterator[tuple[str, str, int, int]]:
        yield ("acme", EVENT, minute, 5)
        yield ("beta", EVENT, minute, 7)
        raise OSError("segment went away")

    with pytest.raises(OSError):
        store.roll(items(), now_of(minute))
    assert level_totals(path) == dict.fromkeys(level_totals(path), 0)
    assert store.accounts() == []


def test_a_write_failing_between_tables_leaves_nothing(store: SQLiteStore, path: str) -> None:
    # A trigger makes the month write fail after minutes, hours and days
    # were written inside the same transaction.
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TRIGGER sabotage BEFORE INSERT ON months WHEN NEW.account = 'bad'"
        " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    )
    conn.commit()
    conn.close()
    minute = minute_at(2026, 5, 12, 10, 17)
    with pytest.raises(StoreError, match="disk on fire"):
        store.roll([("good", EVENT, minute, 5), ("bad", EVENT, minute, 7)], now_of(minute))
    assert level_totals(path) == dict.fromkeys(level_totals(path), 0)
    assert store.watermark_minutes(0) == {}
    assert store.roll([("good", EVENT, minute, 5)], now_of(minute)) == 5


def test_closed_through_commits_with_the_roll_and_never_goes_back(store: SQLiteStore) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    assert store.closed_through() is None
    assert store.last_rolled_minute() is None
    store.roll([("acme", EVENT, minute, 1)], 1000.0, closed_through=minute)
    assert store.closed_through() == minute
    assert store.last_roll_at() == 1000.0
    store.set_closed_through(minute - 10)
    assert store.closed_through() == minute
    store.set_closed_through(minute + 5)
    assert store.closed_through() == minute + 5
    assert store.last_rolled_minute() == minute + 5


def test_last_rolled_minute_is_the_newest_watermark(store: SQLiteStore) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    store.roll([("a", EVENT, minute, 1), ("b", EVENT, minute + 3, 1)], now_of(minute + 3))
    assert store.last_rolled_minute() == minute + 3


def test_watermark_minutes_since(store: SQLiteStore) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    store.roll([("a", EVENT, minute, 1), ("b", "click", minute + 3, 4)], now_of(minute + 3))
    assert store.watermark_minutes(minute + 1) == {("b", "click", minute + 3): 4}
    assert len(store.watermark_minutes(minute)) == 2


# --------------------------------------------------------------------------
# calendar boundaries and DST


def within(counts: dict[tuple[int, ...], int], prefix: tuple[int, ...]) -> int:
    """The sum of the counts of the minutes that lie in the period ``prefix``."""
    return sum(count for parts, count in counts.items() if parts[: len(prefix)] == prefix)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((2026, 5, 12, 23, 59), (2026, 5, 13, 0, 0)),  # midnight
        ((2026, 1, 31, 23, 59), (2026, 2, 1, 0, 0)),  # month end
        ((2028, 2, 28, 23, 59), (2028, 2, 29, 0, 0)),  # into the leap day
        ((2028, 2, 29, 23, 59), (2028, 3, 1, 0, 0)),  # out of the leap day
        ((2026, 12, 31, 23, 59), (2027, 1, 1, 0, 0)),  # year end
    ],
)
def test_consecutive_minutes_across_a_boundary(
    store: SQLiteStore, before: tuple[int, ...], after: tuple[int, ...]
) -> None:
    first = minute_at(*before)
    assert minute_at(*after) == first + 1
    store.roll([("acme", EVENT, first, 3), ("acme", EVENT, first + 1, 4)], now_of(first + 1))
    counts = {before: 3, after: 4}
    for parts in counts:
        # Each period, from the hour up, holds the counts of the minutes in it.
        for width in (4, 3, 2, 1):
            period = store.period("acme", EVENT, *parts[:width])
            assert period["data"][parts[width]] == within(counts, parts[: width + 1])
            assert period["total"] == within(counts, parts[:width])


def test_the_leap_day_has_its_own_row(store: SQLiteStore) -> None:
    minute = minute_at(2028, 2, 29, 12, 0)
    store.roll([("acme", EVENT, minute, 6)], now_of(minute))
    february = store.period("acme", EVENT, 2028, 2)
    assert list(february["data"]) == list(range(1, 30))
    assert february["data"][29] == 6
    assert len(store.period("acme", EVENT, 2027, 2)["data"]) == 28
    with pytest.raises(ValueError, match="February 2027 has 28 days"):
        store.period("acme", EVENT, 2027, 2, 29)


def roll_every_real_minute(store: SQLiteStore, first: int, last: int) -> None:
    """Roll one hit for every epoch minute first..last-1."""
    items = [("acme", EVENT, m, 1) for m in range(first, last)]
    store.roll(items, now_of(last))


def test_spring_forward_day_has_no_0200_hour(store: SQLiteStore) -> None:
    first, last = minute_at(2026, 3, 29, 0, 0), minute_at(2026, 3, 30, 0, 0)
    assert last - first == 23 * 60
    roll_every_real_minute(store, first, last)
    day = store.period("acme", EVENT, 2026, 3, 29)
    assert day["total"] == 23 * 60
    assert day["data"][2] == 0  # skipped: absent, zero-filled
    assert all(day["data"][h] == 60 for h in range(24) if h != 2)
    assert store.period("acme", EVENT, 2026, 3, 29, 2)["total"] == 0


def test_fall_back_day_merges_the_repeated_0200_hour(store: SQLiteStore) -> None:
    first, last = minute_at(2026, 10, 25, 0, 0), minute_at(2026, 10, 26, 0, 0)
    assert last - first == 25 * 60
    roll_every_real_minute(store, first, last)
    day = store.period("acme", EVENT, 2026, 10, 25)
    assert day["total"] == 25 * 60  # every real minute is there
    assert day["data"][2] == 120  # two real hours in one wall-clock hour
    assert all(day["data"][h] == 60 for h in range(24) if h != 2)
    repeated = store.period("acme", EVENT, 2026, 10, 25, 2)
    assert set(repeated["data"].values()) == {2}
    # The two real 02:30 minutes keep separate watermarks.
    early, late = minute_at(2026, 10, 25, 2, 30), minute_at(2026, 10, 25, 2, 30, fold=1)
    assert late - early == 60
    assert store.roll([("acme", EVENT, late, 3)], now_of(last)) == 2
    assert store.period("acme", EVENT, 2026, 10, 25, 2)["data"][30] == 4


# --------------------------------------------------------------------------
# reading


def test_period_is_zero_filled_in_numeric_order(store: SQLiteStore) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    store.roll([("acme", EVENT, minute, 2), ("acme", EVENT, minute + 30, 1)], now_of(minute + 30))
    hour = store.period("acme", EVENT, 2026, 5, 12, 10)
    assert list(hour["data"]) == list(range(60))
    assert all(type(k) is int and type(v) is int for k, v in hour["data"].items())
    assert hour["data"][17] == 2 and hour["data"][47] == 1 and hour["total"] == 3
    assert list(store.period("acme", EVENT, 2026)["data"]) == list(range(1, 13))
    assert list(store.period("acme", EVENT, 2026, 5)["data"]) == list(range(1, 32))
    assert list(store.period("acme", EVENT, 2026, 5, 12)["data"]) == list(range(24))


def test_an_unknown_key_reads_as_zeros(store: SQLiteStore) -> None:
    zeros = {"data": dict.fromkeys(range(1, 13), 0), "total": 0}
    assert store.period("nobody", EVENT, 2026) == zeros


@pytest.mark.parametrize(
    "args", [(2026, 13), (2026, 2, 30), (2026, 4, 31), (2026, 4, 1, 24), (2026, None, 1)]
)
def test_impossible_dates_raise_value_error(store: SQLiteStore, args: tuple) -> None:
    with pytest.raises(ValueError):
        store.period("acme", EVENT, *args)


def test_accounts_events_and_top_accounts(store: SQLiteStore) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    store.roll(
        [
            ("acme", EVENT, minute - 10, 100),  # before the window
            ("acme", EVENT, minute, 3),
            ("beta", EVENT, minute, 5),
            ("beta", EVENT, minute + 1, 5),
            ("gamma", EVENT, minute + 1, 4),
            ("all", EVENT, minute, 117),
            ("acme", "click", minute, 50),
        ],
        now_of(minute + 1),
    )
    assert store.accounts() == ["acme", "all", "beta", "gamma"]
    assert store.accounts("click") == ["acme"]
    assert store.events() == ["click", EVENT]
    assert store.top_accounts(EVENT, minute, 2) == [("beta", 10), ("gamma", 4)]
    assert store.top_accounts(EVENT, minute - 10, 5) == [("acme", 103), ("beta", 10), ("gamma", 4)]
    assert store.top_accounts("nothing", minute, 5) == []


def test_events_of_an_account_and_years_of_a_key(store: SQLiteStore) -> None:
    """The discovery reads of the API: events(account), years(account, event),
    years still found when retention pruned the month rows."""
    store.roll(
        [
            ("acme", EVENT, minute_at(2024, 12, 31, 23, 59), 2),
            ("acme", EVENT, minute_at(2026, 1, 1, 0, 0), 3),
            ("acme", "click", minute_at(2025, 6, 1, 12, 0), 1),
            ("beta", "signup", minute_at(2025, 6, 1, 12, 0), 1),
        ],
        now_of(minute_at(2026, 1, 1, 0, 0)),
    )
    assert store.events("acme") == ["click", EVENT]
    assert store.events("beta") == ["signup"]
    assert store.events("nobody") == []
    assert store.years("acme", EVENT) == [2024, 2026]
    assert store.years("acme", "click") == [2025]
    assert store.years("beta", EVENT) == []
    store.prune(now_of(minute_at(2026, 1, 1, 0, 0)), {"months": 1})  # months before Dec 2025 go
    assert rows(store.path, "SELECT year FROM months WHERE account = 'acme' AND event = ?",
                EVENT) == [(2026,)]
    assert store.years("acme", EVENT) == [2024, 2026]  # the day rows still hold 2024


# --------------------------------------------------------------------------
# gaps and retention


def test_gaps_are_recorded_in_order(store: SQLiteStore) -> None:
    store.record_gap(200, 210, "segment reinstalled", 13000.0)
    store.record_gap(100, 100, "supervisor stalled", 12000.0)
    names = ("first_minute", "last_minute", "reason", "recorded_at")
    assert store.gaps() == [
        dict(zip(names, (100, 100, "supervisor stalled", 12000.0), strict=True)),
        dict(zip(names, (200, 210, "segment reinstalled", 13000.0), strict=True)),
    ]
    with pytest.raises(ValueError, match="first > last"):
        store.record_gap(5, 4, "backwards", 0.0)


def test_prune_keeps_each_level_for_its_days(store: SQLiteStore, path: str) -> None:
    # One hit a day at 12:00 local, 2026-01-01 .. 2026-03-31 (90 days).
    days = [minute_at(2026, 1, 1, 12, 0) + d * 1440 for d in range(90)]
    store.roll([("acme", EVENT, m, 1) for m in days], now_of(days[-1]))
    now = (minute_at(2026, 4, 1, 0, 30)) * 60.0
    deleted = store.prune(now, {"minutes": 7, "hours": 30, "days": 0, "months": 60})
    # Minutes: cutoff 2026-03-25 00:30 -> 03-25 12:00 onwards stays (7 rows).
    assert rows(path, "SELECT COUNT(*) FROM minutes") == [(7,)]
    assert deleted["minutes"] == 83
    # Hours: cutoff 2026-03-02 00:00 -> 03-02 .. 03-31 stays (30 rows).
    assert rows(path, "SELECT MIN(day), COUNT(*) FROM hours") == [(2, 30)]
    # Days are kept forever; months: cutoff 2026-01-31 -> January still in use.
    assert rows(path, "SELECT COUNT(*) FROM days") == [(90,)]
    assert rows(path, "SELECT COUNT(*) FROM months") == [(3,)]
    later = minute_at(2026, 5, 1, 0, 30) * 60.0
    store.prune(later, {"months": 60})
    assert rows(path, "SELECT month FROM months ORDER BY month") == [(3,)]
    assert store.period("acme", EVENT, 2026)["data"] == {**dict.fromkeys(range(1, 13), 0), 3: 31}


def test_prune_with_zero_keeps_everything(store: SQLiteStore, path: str) -> None:
    minute = minute_at(2020, 1, 1, 12, 0)
    store.roll([("acme", EVENT, minute, 1)], now_of(minute))
    zero = {"minutes": 0, "hours": 0, "days": 0, "months": 0}
    store.prune(minute_at(2026, 1, 1, 0, 0) * 60.0, zero)
    assert level_totals(path)["minutes"] == level_totals(path)["months"] == 1


def test_prune_rejects_unknown_levels(store: SQLiteStore) -> None:
    with pytest.raises(ValueError, match="unknown retention level"):
        store.prune(0.0, {"weeks": 3})


def test_pruned_watermarks_are_never_counted_twice(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    old = minute_at(2026, 5, 10, 10, 0)
    new = old + 2 * 1440
    store.roll([("acme", EVENT, old, 5), ("acme", EVENT, new, 1)], now_of(new))
    deleted = store.prune(now_of(new), {"minutes": 7})
    assert deleted["watermarks"] == 1
    assert list(store.watermark_minutes(0)) == [("acme", EVENT, new)]
    # The ring still holding the old minute must not count it again.
    with caplog.at_level(logging.WARNING, logger="trafficthreshold.store"):
        assert store.roll([("acme", EVENT, old, 7)], now_of(new)) == 0
    assert "below the watermark floor" in caplog.text
    assert store.period("acme", EVENT, 2026, 5, 10)["total"] == 5


def test_watermarks_follow_the_newest_minute_not_a_runaway_clock(store: SQLiteStore) -> None:
    minute = minute_at(2026, 5, 10, 10, 0)
    store.roll([("acme", EVENT, minute, 5)], now_of(minute))
    store.prune(now_of(minute) + 365 * 86400, {})
    assert store.watermark_minutes(0) == {("acme", EVENT, minute): 5}


def test_prune_forgets_keys_without_rows(store: SQLiteStore) -> None:
    minute = minute_at(2026, 1, 1, 12, 0)
    store.roll([("gone", EVENT, minute, 1)], now_of(minute))
    everything = {"minutes": 1, "hours": 1, "days": 1, "months": 1}
    deleted = store.prune(minute_at(2026, 6, 1, 0, 0) * 60.0, everything)
    assert deleted["keys"] == 1
    assert store.accounts() == [] and store.events() == []


# --------------------------------------------------------------------------
# concurrency


def test_a_reader_reads_while_the_writer_writes(store: SQLiteStore, path: str) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    store.roll([("acme", EVENT, minute, 1)], now_of(minute))
    with SQLiteStore(path, ZONE) as reader:
        with store.transaction():
            store.roll([("acme", EVENT, minute, 5)], now_of(minute))
            started = time.monotonic()
            # WAL: no waiting for the write lock, and the last commit is seen.
            assert reader.period("acme", EVENT, 2026, 5, 12)["total"] == 1
            assert time.monotonic() - started < 1.0
        assert reader.period("acme", EVENT, 2026, 5, 12)["total"] == 5


def test_a_reader_thread_sees_only_whole_rolls(path: str) -> None:
    minute = minute_at(2026, 5, 12, 10, 0)
    steps = 40
    SQLiteStore(path, ZONE).close()

    def write() -> None:
        with SQLiteStore(path, ZONE) as writer:
            for step in range(1, steps + 1):
                items = [(f"a{k}", EVENT, minute + k, step) for k in range(50)]
                writer.roll(items, now_of(minute + 50))

    thread = threading.Thread(target=write)
    seen = []
    with SQLiteStore(path, ZONE) as reader:
        thread.start()
        while thread.is_alive() or not seen:
            # Every roll moves all 50 keys at once; a0 is read first.
            first = reader.period("a0", EVENT, 2026, 5, 12)["total"]
            last = reader.period("a49", EVENT, 2026, 5, 12)["total"]
            assert first <= last <= steps
            seen.append(first)
        thread.join()
        assert seen == sorted(seen)
        assert reader.period("a0", EVENT, 2026, 5, 12)["total"] == steps


# --------------------------------------------------------------------------
# kill -9 in the middle of rolling

KILL_KEYS = 150
KILL_MINUTES = 4
KILL_STEPS = 60


def kill_snapshot(step: int, first_minute: int) -> list[tuple[str, str, int, int]]:
    """The ring at ``step``: cumulative counts that only grow."""
    return [
        (f"acct{k}", EVENT, first_minute + j, (step + 1) * (k % 5 + 1) + j)
        for k in range(KILL_KEYS)
        for j in range(KILL_MINUTES)
    ]


def snapshot_total(step: int, first_minute: int) -> int:
    return sum(count for *_, count in kill_snapshot(step, first_minute))


def roll_until_killed(path: str, first_minute: int, start: int, progress, rolling) -> None:
    """Child process: roll snapshots start.. and report each commit in
    ``progress``; ``rolling`` is 1 while inside roll()."""
    logging.getLogger("trafficthreshold.store").setLevel(logging.ERROR)
    store = SQLiteStore(path, ZONE)
    for step in range(start, KILL_STEPS):
        snapshot = kill_snapshot(step, first_minute)
        rolling.value = 1
        store.roll(snapshot, now_of(first_minute + KILL_MINUTES))
        rolling.value = 0
        progress.value = step + 1


def check_consistent(path: str, first_minute: int) -> int:
    """Counts and watermarks were committed together: every level holds
    the same total, and it is exactly one whole snapshot. Returns the step."""
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]
    totals = level_totals(path)
    assert len(set(totals.values())) == 1, totals
    per_key = rows(
        path,
        "SELECT account, SUM(count) FROM minutes GROUP BY account"
        " EXCEPT SELECT account, SUM(count) FROM watermarks GROUP BY account",
    )
    assert per_key == []
    by_total = {snapshot_total(s, first_minute): s for s in range(KILL_STEPS)}
    total = totals["minutes"]
    assert total == 0 or total in by_total, total
    return -1 if total == 0 else by_total[total]


@pytest.mark.timeout(60)
def test_sigkill_in_the_middle_of_rolls_loses_and_doubles_nothing(path: str) -> None:
    first_minute = minute_at(2026, 5, 12, 23, 58)  # the four minutes cross midnight
    SQLiteStore(path, ZONE).close()
    context = multiprocessing.get_context("fork")
    progress = context.Value("i", 0, lock=False)
    rolling = context.Value("i", 0, lock=False)
    start, killed_inside_roll = 0, 0
    for kill_after in (8, 20, 35):
        args = (path, first_minute, start, progress, rolling)
        child = context.Process(target=roll_until_killed, args=args)
        child.start()
        deadline = time.monotonic() + 30
        # Kill once it has committed kill_after rolls and is inside the next
        # one (on a loaded machine the poll may otherwise land, every time,
        # between a commit and the next roll's start).
        while ((progress.value < kill_after or not rolling.value) and child.is_alive()
               and time.monotonic() < deadline):
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        killed_inside_roll += rolling.value
        committed = check_consistent(path, first_minute)
        assert committed >= progress.value - 1
        # Resume like a restarted supervisor: from the last reported
        # snapshot, which may be rolled already (adds nothing then).
        start = max(progress.value - 1, 0)
    # roll() is nearly all of the child's time; the kills do hit it.
    assert killed_inside_roll >= 1

    with SQLiteStore(path, ZONE) as store:
        final = kill_snapshot(KILL_STEPS - 1, first_minute)
        store.roll(final, now_of(first_minute + KILL_MINUTES))
        assert store.roll(final, now_of(first_minute + KILL_MINUTES)) == 0
        expected = snapshot_total(KILL_STEPS - 1, first_minute)
        assert check_consistent(path, first_minute) == KILL_STEPS - 1
        may12 = store.period("acct3", EVENT, 2026, 5, 12)["total"]
        may13 = store.period("acct3", EVENT, 2026, 5, 13)["total"]
        assert may12 + may13 == sum(c for a, _, _, c in final if a == "acct3")
        assert store.period("acct3", EVENT, 2026, 5, 12, 23)["data"][59] == KILL_STEPS * 4 + 1
        may = [store.period(f"acct{k}", EVENT, 2026)["data"][5] for k in range(KILL_KEYS)]
        assert sum(may) == expected


def test_a_failed_commit_leaves_no_transaction_open(tmp_path) -> None:
    """The one transaction helper of the period and alert stores: a COMMIT
    that fails (here a deferred foreign key) is rolled back, so the next
    transaction can begin (the alert store's copy once left it open)."""
    from trafficthreshold.store.sqlite import connect, transaction
    conn = connect(str(tmp_path / "t.sqlite3"))
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE child (parent INTEGER REFERENCES parent(id) "
                 "DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError):
        with transaction(conn):
            conn.execute("INSERT INTO child VALUES (42)")
    assert not conn.in_transaction
    with transaction(conn):
        conn.execute("INSERT INTO parent VALUES (42)")
        conn.execute("INSERT INTO child VALUES (42)")
    assert conn.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 1
    conn.close()


# --------------------------------------------------------------------------
# a damaged database: StoreError naming the file and the recovery


def damage_table(path: str, table: str) -> None:
    """Overwrite the b-tree page type of ``table``'s root page (a real
    damaged page: "database disk image is malformed")."""
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                           (table,)).fetchone()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\x07" * 16)


def test_a_damaged_page_is_a_store_error_naming_the_recovery(path: str) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    with SQLiteStore(path, ZONE) as store:
        store.roll([("acme", EVENT, minute, 5)], now_of(minute))
    damage_table(path, "minutes")
    with SQLiteStore(path, ZONE) as store:
        with pytest.raises(StoreError) as caught:
            store.period("acme", EVENT, 2026, 5, 12, 10)
        message = str(caught.value)
        assert path in message and "malformed" in message
        assert ".recover" in message and "aside" in message
        with pytest.raises(StoreError, match="malformed"):
            store.roll([("acme", EVENT, minute + 1, 5)], now_of(minute + 1))
        for read in (lambda: store.period("acme", EVENT, 2026, 5),  # other tables still read
                     store.accounts, store.closed_through):
            read()


# --------------------------------------------------------------------------
# readers never write


def test_a_reader_of_an_empty_file_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "stats.sqlite3"
    path.write_bytes(b"")
    with SQLiteStore(str(path), ZONE, readonly=True) as store:
        assert "no period tables yet" in store.empty
        assert store.period("acme", EVENT, 2026)["total"] == 0
        assert store.accounts() == [] and store.closed_through() is None
    assert path.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.sqlite3"]


def test_a_reader_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "var" / "stats.sqlite3"
    with SQLiteStore.open_readonly(str(path), ZONE) as store:
        assert "does not exist yet" in store.empty and "trafficthreshold run" in store.empty
        assert store.gaps() == [] and store.watermark_minutes(0) == {}
        with pytest.raises(StoreError, match="read-only"):
            store.roll([("acme", EVENT, 100, 1)], 6060.0)
    assert not path.parent.exists()


def test_a_reader_never_takes_the_write_lock_and_cannot_write(store: SQLiteStore, path: str) -> None:
    minute = minute_at(2026, 5, 12, 10, 17)
    store.roll([("acme", EVENT, minute, 5)], now_of(minute))
    with store.transaction():                        # the writer holds the lock
        store.roll([("acme", EVENT, minute, 6)], now_of(minute))
        started = time.monotonic()
        with SQLiteStore(path, ZONE, readonly=True) as reader:
            assert reader.empty is None
            assert reader.period("acme", EVENT, 2026, 5)["total"] == 5
            with pytest.raises(StoreError, match="read-only"):
                reader.roll([("acme", EVENT, minute, 9)], now_of(minute))
        assert time.monotonic() - started < 1        # no busy wait
    assert store.period("acme", EVENT, 2026, 5)["total"] == 6


def schema_1_file(tmp_path: Path, *rows: str) -> str:
    """A file of schema 1 (watermarks without instances, no funnels) with
    one watermark (minute 100, acme/pageview: 4) and the INSERTs ``rows``."""
    from trafficthreshold.store import sqlite as store_module
    path = str(tmp_path / "old.sqlite3")
    conn = sqlite3.connect(path)
    for statement in [*store_module.DDL,
                      "INSERT INTO watermarks VALUES (100, 'acme', 'pageview', 4)", *rows,
                      "PRAGMA user_version = 1"]:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


def test_a_reader_of_a_schema_1_file_does_not_migrate_it(tmp_path: Path) -> None:
    path = schema_1_file(tmp_path)
    with SQLiteStore(path, ZONE, readonly=True) as reader:
        assert reader.watermark_minutes(0) == {("acme", "pageview", 100): 4}
    assert rows(path, "PRAGMA user_version") == [(1,)]


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                    reason="needs root to drop to the user nobody, and a system python3")
@pytest.mark.parametrize("daemon_running", [False, True])
def test_the_group_reads_a_0440_file_in_a_read_only_directory(daemon_running: bool) -> None:
    """With the systemd unit the group may only read: a reader as another
    user (nobody, group nogroup) reads a 0440 file in a 0550 directory,
    whether or not the daemon has it open (-wal/-shm present or not)."""
    import grp
    import shutil
    import subprocess
    import tempfile
    top = tempfile.mkdtemp(prefix="tt-ro-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        data = os.path.join(top, "data")
        path = os.path.join(data, "stats.sqlite3")
        minute = minute_at(2026, 5, 12, 10, 17)
        writer = SQLiteStore(path, ZONE)
        writer.roll([("acme", EVENT, minute, 5)], now_of(minute))
        if not daemon_running:
            writer.close()
        gid = grp.getgrnam("nogroup").gr_gid
        for name in os.listdir(data):
            os.chown(os.path.join(data, name), -1, gid)
            os.chmod(os.path.join(data, name), 0o440)
        os.chown(data, -1, gid)
        os.chmod(data, 0o550)
        before = sorted(os.listdir(data))
        script = (f"from trafficthreshold.store import SQLiteStore\n"
                  f"s = SQLiteStore({path!r}, {ZONE!r}, readonly=True)\n"
                  f"print(s.empty, s.period('acme', 'pageview', 2026, 5)['total'])\n")
        # The package from a world-readable copy: the clone may be in a
        # directory nobody cannot enter (a 0700 mktemp -d, root's home).
        from tt_nobody import readable_package
        out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                              SYSTEM_PYTHON, "-c", script], capture_output=True, text=True,
                             env={"PYTHONPATH": readable_package(),
                                  "PATH": os.environ.get("PATH", "")},
                             timeout=30)
        assert out.stdout.strip() == "None 5", out.stderr
        assert sorted(os.listdir(data)) == before
        if daemon_running:
            writer.close()
    finally:
        shutil.rmtree(top)


# --------------------------------------------------------------------------
# private files


def test_new_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "new" / "dir" / "stats.sqlite3"
        minute = minute_at(2026, 5, 12, 10, 17)
        with SQLiteStore(str(path), ZONE) as store:
            store.roll([("acme", EVENT, minute, 5)], now_of(minute))
            modes = {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir()}
            assert modes == {"stats.sqlite3": 0o640, "stats.sqlite3-wal": 0o640,
                             "stats.sqlite3-shm": 0o640}
        assert path.parent.stat().st_mode & 0o777 == 0o750
        assert path.parent.parent.stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


def test_an_existing_directory_and_file_keep_their_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        admin = tmp_path / "admin"
        admin.mkdir(mode=0o755)
        os.chmod(admin, 0o755)
        path = admin / "stats.sqlite3"
        path.write_bytes(b"")
        os.chmod(path, 0o600)
        with SQLiteStore(str(path), ZONE):
            pass
        assert admin.stat().st_mode & 0o777 == 0o755
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_lock_held_too_long_is_a_store_error(store: SQLiteStore, path: str) -> None:
    """Another writer keeps the write lock past busy_timeout: BEGIN fails
    with a StoreError naming the file, not a bare sqlite3 error."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        store._conn.execute("PRAGMA busy_timeout=50")  # not 5 s in a test
        with pytest.raises(StoreError, match="locked") as caught:
            with store.transaction():
                pass
        assert path in str(caught.value)
    finally:
        other.execute("ROLLBACK")
        other.close()


# --------------------------------------------------------------------------
# /metrics' reading


def test_metrics_reading_is_one_snapshot_of_totals_marks_and_meta(path: str) -> None:
    big = 2**63 + 5  # a u64 instance above SQLite's signed range
    minute = minute_at(2027, 3, 1, 10, 0)
    with SQLiteStore(path, ZONE) as store:
        store.roll([("acme", EVENT, minute, 4), ("acme", "order/paid", minute, 2)],
                   now_of(minute), instance=big)
        store.roll([("shop", EVENT, minute + 1, 1)], now_of(minute + 1), instance=7)
        store.record_gap(minute - 10, minute - 5, "test", now_of(minute))
        store.set_bad_keys(["slot 3: not UTF-8"])
    with SQLiteStore(path, ZONE, readonly=True) as reader:
        got = reader.metrics_reading(big, minute, minute + 1)
        assert got["totals"] == {("acme", EVENT): 4, ("acme", "order/paid"): 2,
                                 ("shop", EVENT): 1}
        # Only the marks of the instance asked for, in the window asked for.
        assert got["watermarks"] == {("acme", EVENT, minute): 4,
                                     ("acme", "order/paid", minute): 2}
        assert reader.metrics_reading(big, minute + 1, minute + 1)["watermarks"] == {}
        assert got["last_roll_at"] == now_of(minute + 1)
        assert (got["gaps"], got["late_dropped"], got["bad_keys"]) == (1, 0, 1)
        # No segment: no watermarks read at all.
        assert reader.metrics_reading(None, minute, minute + 1)["watermarks"] is None
        assert not reader._conn.in_transaction  # the snapshot was let go


def test_metrics_reading_of_a_damaged_meta_value_names_the_recovery(path: str) -> None:
    SQLiteStore(path, ZONE).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('late_dropped', 'x')")
    conn.commit()
    conn.close()
    with SQLiteStore(path, ZONE, readonly=True) as reader:
        with pytest.raises(StoreError, match="damaged.*late_dropped.*recover"):
            reader.metrics_reading(None, 0, 0)
        assert not reader._conn.in_transaction


# --------------------------------------------------------------------------
# export: what `store migrate` reads (no SQL outside this module)


def test_the_export_reads_every_level_funnel_and_watermark(path: str) -> None:
    """export_periods gives every row of every level in key order (the same
    counts as plain SQL); export_funnels sums a year's months or gives the
    months; export_groups counts the (key, period but its last part) groups
    both yield; export_watermarks gives one instance's; export_pairs lists
    the keys."""
    m1, m2 = minute_at(2026, 3, 1, 12, 5), minute_at(2026, 4, 2, 8, 0)
    with SQLiteStore(path, ZONE) as store:
        store.roll([("shop", EVENT, m1, 3), ("acme", EVENT, m1, 2), ("acme", EVENT, m2, 7),
                    ("shop", "order/paid", m1, 4), ("shop", "order/paid", m2, 5),
                    ("shop", "order/new", m2, 1)], now_of(m2), instance=2**64 - 5)
    with SQLiteStore(path, ZONE, readonly=True) as old, old.snapshot():
        periods = list(old.export_periods())
        levels = [p[0] for p in periods]
        assert levels == sorted(levels, key=["months", "days", "hours", "minutes"].index)
        for table in ("months", "days", "hours", "minutes"):
            got = [p[1:] for p in periods if p[0] == table]
            assert got == sorted(got)
            assert sum(p[-1] for p in got) == rows(path, f"SELECT SUM(count) FROM {table}")[0][0]
        assert ("months", "acme", EVENT, (2026, 4), 7) in periods
        assert ("minutes", "shop", EVENT, (2026, 3, 1, 12, 5), 3) in periods
        assert list(old.export_funnels(by_month=False)) == [
            ("shop", "order", (2026,), "new", 1), ("shop", "order", (2026,), "paid", 9)]
        assert list(old.export_funnels(by_month=True)) == [
            ("shop", "order", (2026, 3), "paid", 4), ("shop", "order", (2026, 4), "new", 1),
            ("shop", "order", (2026, 4), "paid", 5)]
        # months: (acme, 2026), (shop, 2026); days: 2 + 1 months; hours and
        # minutes: 2 + 1 days each; funnels: 1 year + 2 months
        assert old.export_groups() == 2 + 3 + 3 + 3 + 1 + 2
        assert old.export_pairs() == [("acme", EVENT), ("shop", EVENT)]
        marks = sorted(old.export_watermarks(2**64 - 5))
        assert (m2, "acme", EVENT, 7) in marks and (m1, "shop", "order/paid", 4) in marks
        assert list(old.export_watermarks(9)) == []
    assert rows(path, "SELECT COUNT(*) FROM months")[0][0] == 3  # nothing written


def test_the_export_reads_one_snapshot_while_a_writer_writes(path: str) -> None:
    """Inside snapshot() a roll committed by another connection is not
    seen (the periods and the watermarks read agree); after it, it is."""
    m = minute_at(2026, 3, 1, 12, 5)
    with SQLiteStore(path, ZONE) as writer:
        writer.roll([("acme", EVENT, m, 2)], now_of(m))
        with SQLiteStore(path, ZONE, readonly=True) as old:
            with old.snapshot():
                first = list(old.export_periods())
                writer.roll([("acme", EVENT, m, 9), ("shop", EVENT, m, 1)], now_of(m))
                assert list(old.export_periods()) == first
                assert list(old.export_watermarks(0)) == [(m, "acme", EVENT, 2)]
            assert ("months", "acme", EVENT, (2026, 3), 9) in list(old.export_periods())


def test_the_export_of_a_schema_1_file_has_no_instances_and_no_funnels(tmp_path: Path) -> None:
    path = schema_1_file(tmp_path, "INSERT INTO months VALUES ('a:b', 'pageview', 2026, 1, 4)")
    with SQLiteStore(path, ZONE, readonly=True) as old:
        assert list(old.export_watermarks(12345)) == [(100, "acme", EVENT, 4)]
        assert list(old.export_funnels(by_month=True)) == []
        assert old.export_groups() == 1
        assert old.names_with(":") == [("a:b", EVENT)]
        assert "funnels" not in old.rename_sql(":", "-")


@pytest.mark.parametrize("sep", [":", "\\", ".", "'", ".."])
def test_names_with_a_separator_and_the_sql_that_renames_them(path: str, sep: str) -> None:
    """names_with finds a separator in accounts, events and funnel
    statuses; rename_sql, run as given, leaves none (a quote too)."""
    m = minute_at(2026, 3, 1, 12, 5)
    with SQLiteStore(path, ZONE) as store:
        store.roll([(f"a{sep}b", EVENT, m, 1), ("c", f"e{sep}f", m, 2), ("clean", EVENT, m, 3),
                    ("shop", f"order/pa{sep}id", m, 4)], now_of(m))
        assert store.names_with(sep) == [(f"a{sep}b", EVENT), ("c", f"e{sep}f"),
                                         ("shop", f"order/pa{sep}id")]
        sql = store.rename_sql(sep, "-")
        with pytest.raises(ValueError, match="would leave"):
            store.rename_sql(sep, f"-{sep}")  # the names would keep it
    conn = sqlite3.connect(path)
    conn.executescript(sql)
    conn.close()
    with SQLiteStore(path, ZONE, readonly=True) as old:
        assert old.names_with(sep) == []
        assert ("a-b", EVENT) in old.export_pairs()
        # the keys table too: accounts() lists, and prune() prunes, by it
        assert old.accounts() == ["a-b", "c", "clean"] and old.events("c") == ["e-f"]


def test_the_snapshot_reads_the_schema_of_its_own_state(tmp_path: Path) -> None:
    """The schema is the snapshot's too: a file of schema 1 opened for the
    export, then migrated and rolled into by a daemon (of this version)
    before the snapshot begins, is read as the schema 3 file it now is (one
    instance's watermarks, its funnels), as main's migrate.py read the
    columns inside its transaction."""
    m = minute_at(2026, 3, 1, 12, 5)
    path = schema_1_file(tmp_path)
    with SQLiteStore(path, ZONE, readonly=True) as old:
        with SQLiteStore(path, ZONE) as daemon:  # migrates the file to schema 3
            daemon.roll([("acme", EVENT, m, 2), ("shop", "order/paid", m, 3)], now_of(m),
                        instance=7)
            daemon.roll([("acme", EVENT, m + 1, 5)], now_of(m + 1), instance=8)
        with old.snapshot():
            assert sorted(old.export_watermarks(8)) == [
                (mm, a, e, c) for mm, a, e, c in sorted(rows(
                    path, "SELECT epoch_minute, account, event, count FROM watermarks "
                    "WHERE instance = 8"))]
            assert list(old.export_funnels(by_month=False)) == [
                ("shop", "order", (2026,), "paid", 3)]
