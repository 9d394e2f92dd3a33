"""The Redis period store against the SQLite one, side by side in one run.

Run by hand::

    python benchmarks/bench_redis.py          # the figures in docs/store.rst
    python benchmarks/bench_redis.py --quick  # CI smoke mode, a few seconds

1. Roll-up of N active keys in one minute into each store (target: 10,000
   keys in under a second): a new minute, the same minute with every count
   grown (late increments), and the same snapshot again (re-roll: nothing
   to add).  Redis runs here as a real redis-server on a loopback port,
   append-only with ``appendfsync everysec`` (its usual durable setting);
   SQLite as the supervisor runs it (WAL, synchronous=NORMAL).
2. Reading one period (a month of one account), as the API does: the p50
   and p99 of single reads on each store, in-process and over HTTP (the
   stats API served by waitress on loopback, one keep-alive connection,
   ``GET /api/stats/track/<account>/pageview/2026/5``).

Both stores are checked to hold the same, exact totals.
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from trafficthreshold import api
from trafficthreshold.api import server as webserver  # noqa: E402
from trafficthreshold.config import Config, StoreConfig  # noqa: E402
from trafficthreshold.periods import resolve_timezone  # noqa: E402
from trafficthreshold.store.redis import RedisStore  # noqa: E402
from trafficthreshold.store import SQLiteStore  # noqa: E402

START_MINUTE = 29_640_000 + 600  # 2026-05-12 10:00 UTC


def snapshot(keys: int, minute: int, count: int) -> list[tuple[str, str, int, int]]:
    return [(f"shop-{k:05d}", "pageview", minute, count + k % 7) for k in range(keys)]


def start_redis(directory: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench_redis: redis-server is not installed (apt-get install redis-server)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             directory, "--appendonly", "yes", "--appendfsync", "everysec",
                             "--save", ""], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.01)
    sys.exit("bench_redis: redis-server did not start")


def roll_cases(store, keys: int, repeats: int) -> dict[str, float]:
    cases: dict[str, list[float]] = {"new minute": [], "late increments": [], "re-roll": []}
    store.roll(snapshot(keys, START_MINUTE, 1), now=0.0)
    for step in range(1, repeats + 1):
        minute = START_MINUTE + step
        for name, items in (("new minute", snapshot(keys, minute, 1)),
                            ("late increments", snapshot(keys, minute, 3)),
                            ("re-roll", snapshot(keys, minute, 3))):
            started = time.perf_counter()
            store.roll(items, now=0.0)
            cases[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in cases.items()}


def read_times(store, keys: int, reads: int) -> tuple[float, float]:
    times = []
    for i in range(reads):
        started = time.perf_counter()
        store.period(f"shop-{i * 7919 % keys:05d}", "pageview", 2026, 5)
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def http_times(config: Config, keys: int, reads: int) -> tuple[float, float]:
    """p50 and p99 of one period request to the stats API over HTTP."""
    server = webserver.start(api.make_app(config, counter_factory=lambda: None), "127.0.0.1:0")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        times = []
        for i in range(reads):
            path = f"/api/stats/track/shop-{i * 7919 % keys:05d}/pageview/2026/5"
            started = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            times.append(time.perf_counter() - started)
            if response.status != 200:
                sys.exit(f"bench_redis: FAIL {path} answered {response.status}")
        conn.close()
    finally:
        server.stop()
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke mode: a few seconds")
    args = parser.parse_args()
    keys, repeats, reads = (10_000, 1, 300) if args.quick else (10_000, 5, 3_000)
    zone = resolve_timezone("UTC")
    with tempfile.TemporaryDirectory(prefix="bench_redis.") as directory:
        proc, port = start_redis(directory)
        try:
            rstore = RedisStore(redis.Redis(port=port), zone, "bench")
            with SQLiteStore(os.path.join(directory, "roll.sqlite3"), "UTC") as sstore:
                results = {"sqlite": roll_cases(sstore, keys, repeats),
                           "redis": roll_cases(rstore, keys, repeats)}
                reading = {"sqlite": read_times(sstore, keys, reads),
                           "redis": read_times(rstore, keys, reads)}
                sqlite_path = os.path.join(directory, "roll.sqlite3")
                over_http = {
                    "sqlite": http_times(Config(database=sqlite_path, timezone="UTC"),
                                         keys, reads),
                    "redis": http_times(Config(database=sqlite_path, timezone="UTC",
                                               store=StoreConfig(
                                                   backend="redis", host="bench",
                                                   url=f"redis://127.0.0.1:{port}/0")),
                                        keys, reads)}
                for k in (0, keys // 2, keys - 1):
                    name = f"shop-{k:05d}"
                    a = sstore.period(name, "pageview", 2026, 5)
                    b = rstore.period(name, "pageview", 2026, 5)
                    if a != b:
                        sys.exit(f"bench_redis: FAIL the stores differ for {name}")
        finally:
            proc.kill()
            proc.wait()
    print(f"Roll-up of {keys:,} active keys in one minute (median of {repeats})")
    print(f"  {'case':<18}{'sqlite s':>10}{'redis s':>10}{'redis/sqlite':>14}")
    for name in results["sqlite"]:
        s, r = results["sqlite"][name], results["redis"][name]
        print(f"  {name:<18}{s:>10.3f}{r:>10.3f}{r / s:>13.2f}x")
    verdict = "OK" if results["redis"]["new minute"] < 1.0 else "SLOW"
    print(f"  target: {keys:,} keys < 1 s for a new minute into Redis -> {verdict}")
    print(f"\nOne period read (a month of one account), {reads:,} reads")
    for name, (p50, p99) in reading.items():
        print(f"  {name:<8} p50 {p50 * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms   in-process")
    for name, (p50, p99) in over_http.items():
        print(f"  {name:<8} p50 {p50 * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms   over HTTP")
    verdict = "OK" if over_http["redis"][1] < 0.010 else "SLOW"
    print(f"  target: the API's p99 over HTTP < 10 ms on Redis -> {verdict}")
    print("  counts: the stores agree exactly")


if __name__ == "__main__":
    main()
