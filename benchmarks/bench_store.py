"""How fast is a roll-up, and how big does the store grow?

Run by hand::

    python benchmarks/bench_store.py          # the figures in docs/store.rst
    python benchmarks/bench_store.py --quick  # CI smoke mode, a few seconds

1. Roll-up time for N active keys in one minute (target: 10,000 keys in
   under a second), on a real file with the store's pragmas (WAL,
   synchronous=NORMAL). Three cases:

   * *new minute*: the steady state; the keys' hour, day and month rows
     exist, the minute rows and watermarks are new;
   * *late increments*: the same minute again with every count grown, so
     every row is updated and every watermark moves;
   * *re-roll*: the same snapshot again: nothing to add (the cost of the
     watermark check alone).

2. SQLiteStore size per key-year. Roll one whole day of minute data (every key
   active every minute: the worst case for minute rows) for some keys, read
   each table's size from SQLite's ``dbstat`` table (pages used, b-tree
   overhead and free space in them included), divide by the row count, and
   extrapolate: a key-year has 525,600 minute rows, 8,760 hour rows, 365 day
   rows and 12 month rows. Watermarks do not grow with time: about one to
   two days of minute rows per key are kept (see SQLiteStore.prune).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trafficthreshold.store import SQLiteStore  # noqa: E402

#: 2026-05-12 10:00 UTC, an ordinary weekday.
START_MINUTE = 29_640_000 + 600
EVENT = "pageview"
ROWS_PER_KEY_YEAR = {"minutes": 365 * 1440, "hours": 365 * 24, "days": 365, "months": 12}
TABLES = ("minutes", "hours", "days", "months", "watermarks", "keys")


def account(number: int) -> str:
    """A realistic account name: ``shop-00042`` (10 bytes)."""
    return f"shop-{number:05d}"


def snapshot(keys: int, minute: int, count: int) -> list[tuple[str, str, int, int]]:
    return [(account(k), EVENT, minute, count + k % 7) for k in range(keys)]


def timed(action: Callable[..., object], *args: object) -> float:
    """Seconds ``action(*args)`` took."""
    started = time.perf_counter()
    action(*args)
    return time.perf_counter() - started


# --------------------------------------------------------------------------
# 1. roll-up time


def bench_roll(directory: str, keys: int, repeats: int) -> list[tuple[str, float]]:
    """Median seconds of each roll case over ``repeats`` minutes."""
    cases: dict[str, list[float]] = {"new minute": [], "late increments": [], "re-roll": []}
    with SQLiteStore(os.path.join(directory, "roll.sqlite3"), "UTC") as store:
        # Warm up: the keys' hour/day/month rows exist from a first minute.
        store.roll(snapshot(keys, START_MINUTE, 1), now=0.0)
        for step in range(1, repeats + 1):
            minute = START_MINUTE + step
            first, grown = snapshot(keys, minute, 1), snapshot(keys, minute, 3)
            cases["new minute"].append(timed(store.roll, first, 0.0))
            cases["late increments"].append(timed(store.roll, grown, 0.0))
            cases["re-roll"].append(timed(store.roll, grown, 0.0))
    return [(name, statistics.median(times)) for name, times in cases.items()]


# --------------------------------------------------------------------------
# 2. size per key-year


def fill_one_day(store: SQLiteStore, keys: int) -> None:
    """Every key active in every minute of one day, rolled an hour at a time."""
    for hour in range(24):
        first = START_MINUTE - 600 + hour * 60  # from 00:00 UTC
        items = [
            (account(k), EVENT, minute, 1 + (minute + k) % 13)
            for minute in range(first, first + 60)
            for k in range(keys)
        ]
        store.roll(items, now=0.0)


def table_sizes(path: str) -> dict[str, tuple[int, int, int]]:
    """{table: (rows, bytes in use, bytes of its pages)} from ``dbstat``.

    Bytes in use = page bytes minus the free space in those pages: cells,
    cell pointers and page headers of the table's b-tree.
    """
    conn = sqlite3.connect(path)
    try:
        sizes = {}
        for table in TABLES:
            rows = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            used, pages = conn.execute(
                "SELECT SUM(pgsize - unused), SUM(pgsize) FROM dbstat WHERE name = ?", (table,)
            ).fetchone()
            sizes[table] = (rows, used or 0, pages or 0)
        return sizes
    finally:
        conn.close()


def bench_size(directory: str, keys: int) -> dict[str, tuple[int, int, int]]:
    path = os.path.join(directory, "size.sqlite3")
    with SQLiteStore(path, "UTC") as store:
        fill_one_day(store, keys)
    # Closing the last connection checkpoints the WAL into the file.
    return table_sizes(path)


# --------------------------------------------------------------------------
# report


def print_roll(keys: int, results: list[tuple[str, float]]) -> None:
    print(f"\nRoll-up of {keys:,} active keys in one minute (median, file in WAL mode)")
    print(f"  {'case':<18}{'seconds':>9}{'keys/s':>12}")
    for name, seconds in results:
        print(f"  {name:<18}{seconds:>9.3f}{keys / seconds:>12,.0f}")
    verdict = "OK" if results[0][1] < 1.0 else "SLOW"
    print(f"  target: {keys:,} keys < 1 s for a new minute -> {verdict}")


def print_size(keys: int, sizes: dict[str, tuple[int, int, int]]) -> None:
    # The small tables fill a page or two, so their page bytes say nothing;
    # divide bytes in use by the page fill of the big minutes table instead
    # (rows arrive in time order, keys interleaved: b-tree pages split).
    _, minute_used, minute_pages = sizes["minutes"]
    fill = minute_used / minute_pages
    print(f"\nStore size: one day of minute data, {keys} keys, every minute active")
    print(f"  b-tree page fill (minutes table): {fill:.0%}")
    print(f"  {'table':<12}{'rows':>9}{'bytes/row':>11}", end="")
    print(f"{'rows/key-year':>15}{'bytes/key-year':>16}")
    per_year = {}
    for table, (rows, used, _) in sizes.items():
        per_row = used / rows / fill if rows else 0.0
        yearly = ROWS_PER_KEY_YEAR.get(table)
        if yearly:
            per_year[table] = per_row * yearly
            print(f"  {table:<12}{rows:>9,}{per_row:>11.1f}", end="")
            print(f"{yearly:>15,}{per_year[table]:>16,.0f}")
        else:
            print(f"  {table:<12}{rows:>9,}{per_row:>11.1f}{'(bounded)':>15}")
    forever = sum(per_year.values())
    default = forever - per_year["minutes"] * (1 - 7 / 365)
    watermark_kb = sizes["watermarks"][1] / fill / keys / 1e3
    print(f"  every level kept forever:              {forever / 1e6:8.2f} MB per key-year")
    print(f"  minutes kept 7 days, the rest forever: {default / 1e6:8.2f} MB per key-year")
    print(f"  watermarks (1-2 days kept):            {watermark_kb:8.0f} kB per key-day")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke mode: a few seconds")
    args = parser.parse_args()
    roll_keys, repeats, size_keys = (10_000, 1, 10) if args.quick else (10_000, 7, 100)
    with tempfile.TemporaryDirectory(prefix="bench_store.") as directory:
        print_roll(roll_keys, bench_roll(directory, roll_keys, repeats))
        print_size(size_keys, bench_size(directory, size_keys))


if __name__ == "__main__":
    main()
