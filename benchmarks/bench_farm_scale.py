"""The farm's live channel at scale: Redis's work per farm-second, the
designs before and after (issue #25), side by side in one run.

Run by hand::

    python benchmarks/bench_farm_scale.py          # the sizing table of docs/redis.rst
    python benchmarks/bench_farm_scale.py --quick  # CI smoke mode, a few seconds

Simulated hosts against one real redis-server that the benchmark starts on
a free loopback port (no segment per host: the publishing code is driven
with made-up counts).  Each host has N active keys, ``("all",
"pageview")`` among them; each farm-second 10 % of a host's keys get new
hits (``("all", "pageview")`` always), and once a minute the minute turns
(every key's minute count closes: the costliest second, weighed in as one
second in 60).  Per farm-second, as the farm thread does it:

* every host publishes its live counts and reads the level's key back,
  then reads that key again three times (``farmsync.REFRESHES``);
* one host, the farm rules' leader, also reads a farm rule's key of every
  host (the per-host reading that ``farmalerts.farm_count`` needs).

Three designs, side by side:

* **0.1** (BASELINE): the design up to issue #25, kept callable here as
  ``publish_live_before`` / ``farm_live_before`` (a copy of the old
  ``farm.publish_live`` / ``farm.farm_live``): each host deletes and
  rewrites every key's absolute counts each second; each level read reads
  every host's hash.
* **hash** (BASELINE): issue #25's first design, a copy in
  ``benchmarks/farm_hash_baseline.py``: a hash per host, the changed
  fields' ``HSET`` in a MULTI between two scripts, the level's key summed
  by Redis, the views and the leader reading every host's hash.
* **log**: ``farm.LivePublisher`` (one EVALSHA per host-second: the
  changed keys as one blob appended to the live log, the watched keys'
  values as arguments), ``farm.LevelReader`` (the level's key: one read of
  the farm's sum) and ``farm.farm_live`` (the leader's and the
  dashboard's ``LiveReader``: the log since their last reading).

Reported per farm-second: Redis's CPU (``INFO cpu``, its main thread: the
commands, the scripts and the network I/O; ``INFO commandstats`` counts a
script's or a MULTI's inner commands a second time inside the script's own
time, so its sum is not a CPU figure; its calls are reported), the bytes in
and out of Redis (``INFO stats``), Redis's memory after the run, and the
level's staleness: how old the level's count a host reads can be, one
publication period (1 s) plus ``farmsync.REFRESH_EVERY`` plus the p99
round trips of a publication and of a level read measured under this
load, or "saturated" when Redis needs more than a second per farm-second
(it falls behind without bound).  And the readers' costs: the farm rules'
leader's reading (once a farm-second), an open dashboard's refresh
(once a farm-second, not in the CPU column: its farm panel reads the
chosen event's ``all`` key of every host, ``farm_live(only=...)``), and,
once after the ordinary seconds, a reading of every key of every host
(``/api/stats/live?scope=farm`` without ``account`` and ``event``; hosts
x keys rows), each as Redis CPU and wall time in this process.  Every level read at the end of a second
is checked against the truth (the sum of the hosts' counts).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from bench_redis import start_redis  # noqa: E402
from trafficthreshold import farm, farmsync  # noqa: E402

import farm_hash_baseline  # noqa: E402

LEVEL = ("all", "pageview")
RULE = ("shop1", "pageview")
CHANGING = 0.10
#: The hosts' live TTL here: farm-seconds are simulated faster or slower
#: than real seconds, and a host must not expire (real time) between two
#: of its publications; what a second costs does not depend on it.
TTL_MS = 600_000
#: The farm's clock (farm-seconds), for the publishers of the log design.
FARM_CLOCK = [0.0]


# ------------------------------------------------- the baseline (before #25)
# A copy of farm.publish_live and farm.farm_live as they were before issue
# #25 (commit 8b5a5dd), so that one run measures both designs.

STAMP_SCRIPT_BEFORE = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], '~redis_at', t[1] .. '.' .. string.format('%06d', t[2]))
return 0
"""

def publish_live_before(client: Any, host: str, counts: farm.LiveCounts, *, level: int,
                        now: float, last_roll: float | None = None, prefix: str = "track",
                        ttl_ms: int = 5_000, previous: dict | None = None,
                        forget_after: float = 30 * 86_400) -> None:
    """BASELINE (before #25): delete and rewrite every key, every second."""
    send_before(client, host, mapping_before(counts, level=level, now=now,
                                             last_roll=last_roll, previous=previous),
                now=now, prefix=prefix, ttl_ms=ttl_ms, forget_after=forget_after)


def mapping_before(counts: farm.LiveCounts, *, level: int, now: float,
                   last_roll: float | None = None, previous: dict | None = None) -> dict:
    """BASELINE: publish_live_before's first half (no Redis); its fields
    are today's (farm.live_fields is that loop unchanged)."""
    mapping = farm.live_fields(counts, previous)
    mapping.update({"~level": str(level), "~at": repr(float(now)),
                    "~last_roll": "" if last_roll is None else repr(float(last_roll))})
    return mapping


def send_before(client: Any, host: str, mapping: dict, *, now: float, prefix: str = "track",
                ttl_ms: int = 5_000, forget_after: float = 30 * 86_400) -> None:
    """BASELINE: publish_live_before's second half (the MULTI)."""
    key = f"{prefix}~live:{host}"
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping=mapping)
    pipe.eval(STAMP_SCRIPT_BEFORE, 1, key)
    pipe.pexpire(key, ttl_ms)
    pipe.zadd(f"{prefix}~hosts", {host: float(now)})
    pipe.zremrangebyscore(f"{prefix}~hosts", "-inf", f"({float(now) - forget_after!r}")
    pipe.execute()


def farm_live_before(client: Any, *, now: float, prefix: str = "track",
                     only: Sequence[tuple[str, str]] | None = None) -> dict:
    """BASELINE (before #25): one HMGET per host per read.  Returns the
    total per key (the parsing of the old farm_live, rows left out)."""
    seen = client.zrangebyscore(f"{prefix}~hosts", now - 3600, "+inf", withscores=True)
    names = [h.decode() for h, _ in seen]
    pipe = client.pipeline(transaction=False)
    fields = None if only is None else [
        "~level", "~at", "~last_roll", "~redis_at", *(f"{a}\0{e}" for a, e in only)]
    for host in names:
        if fields is None:
            pipe.hgetall(f"{prefix}~live:{host}")
        else:
            pipe.hmget(f"{prefix}~live:{host}", fields)
        pipe.hget(f"{prefix}~host:{host}", "last_roll_at")
    pipe.get(f"{prefix}~leader")
    pipe.time()
    *replies, _leader, _time = pipe.execute()
    total: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for raw in replies[::2]:
        if fields is not None:
            raw = {} if raw[1] is None else {f: v for f, v in zip(fields, raw) if v is not None}
        for k, v in raw.items():
            k = k.decode() if isinstance(k, bytes) else k
            if "\0" in k:
                m, s, *_ = (int(x) for x in v.split())
                total[tuple(k.split("\0", 1))][0] += m
                total[tuple(k.split("\0", 1))][1] += s
    return {k: tuple(v) for k, v in total.items()}


# ------------------------------------------------------------- the designs

class Before:
    """BASELINE (0.1): every key of every host rewritten every second."""
    name = "0.1"

    def __init__(self, client: Any, host: str) -> None:
        self.client, self.host = client, host

    def prepare(self, counts, previous, now) -> Any:
        return mapping_before(counts, level=0, now=now, previous=previous), now

    def send(self, prepared) -> None:
        mapping, now = prepared
        send_before(self.client, self.host, mapping, now=now, ttl_ms=TTL_MS)

    def level(self, now: float) -> int:
        return farm_live_before(self.client, now=now, only=farmsync.LEVEL_KEYS
                                ).get(LEVEL, (0, 0))[0]

    def lead(self, now: float) -> None:
        farm_live_before(self.client, now=now, only=[LEVEL, RULE])

    @staticmethod
    def dashboard(client: Any, now: float, only: Any = (LEVEL,)) -> None:
        farm_live_before(client, now=now, only=only)


class After:
    """This design: one EVALSHA per host-second (a blob into the live log),
    the leader and the dashboard reading the log since their last entry."""
    name = "log"
    module: Any = farm

    def __init__(self, client: Any, host: str) -> None:
        self.client, self.host = client, host
        if self.module is farm:
            # The publisher's clock is the farm's (its full publication every
            # FULL_EVERY farm-seconds, as on a real farm, however slowly this
            # one process simulates them).
            self.publisher = farm.LivePublisher(client, host, ttl_ms=TTL_MS,
                                                clock=lambda: FARM_CLOCK[0])
        else:
            self.publisher = self.module.LivePublisher(client, host, ttl_ms=TTL_MS)
        self.reader = self.module.LevelReader(client, host, farmsync.LEVEL_KEYS)

    def prepare(self, counts, previous, now) -> Any:
        return self.publisher.prepare(counts, level=0, now=now, previous=previous)

    def send(self, prepared) -> None:
        self.publisher.send(prepared)

    def level(self, now: float) -> int:
        return self.reader.read(now).count(*LEVEL, "minute")

    def lead(self, now: float) -> None:
        self.module.farm_live(self.client, now=now, only=[LEVEL, RULE])

    @classmethod
    def dashboard(cls, client: Any, now: float, only: Any = (LEVEL,)) -> None:
        cls.module.farm_live(client, now=now, only=only)


class Hash(After):
    """BASELINE (issue #25's first design, benchmarks/farm_hash_baseline.py):
    a hash per host, the changed fields' HSET in a MULTI between two scripts;
    the views and the leader read every host's hash."""
    name = "hash"
    module = farm_hash_baseline


# --------------------------------------------------------- simulated hosts

class SimHost:
    """Made-up live counts of one host: N keys, 10 % changing a second."""

    def __init__(self, keys: int, rng: random.Random) -> None:
        self.keys = [LEVEL] + [(f"shop{i}", "pageview") for i in range(1, keys)]
        self.counts = {k: (rng.randint(1, 50), rng.randint(50, 200)) for k in self.keys}
        self.previous: dict[tuple[str, str], int] = {}

    def second(self, rng: random.Random, turn: bool) -> None:
        if turn:  # the minute closes: its counts become "the minute before"
            self.previous = {k: m for k, (m, _s) in self.counts.items() if m}
            self.counts = {k: (0, s) for k, (_m, s) in self.counts.items()}
        n = len(self.keys)
        for i in [0, *rng.sample(range(1, n), max(0, int(n * CHANGING) - 1))]:
            k = self.keys[i]
            m, s = self.counts[k]
            d = rng.randint(1, 5)
            self.counts[k] = (m + d, s + d)


def info(client: Any) -> dict[str, float]:
    cpu = client.info("cpu")
    stats = client.info("stats")
    calls = sum(v["calls"] for v in client.info("commandstats").values())
    return {"cpu": float(cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"]))
            + float(cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])),
            "net": float(stats["total_net_input_bytes"] + stats["total_net_output_bytes"]),
            "calls": float(calls)}


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))] if values else 0.0


def run(design: type, port: int, hosts: int, keys: int, seconds: int, seed: int = 1,
        dashboard: bool = True) -> dict[str, float]:
    """One design, one size, on a flushed Redis: a warm-up second, then
    ``seconds`` ordinary farm-seconds and one minute turn, measured apart."""
    admin = redis.Redis(port=port)
    admin.flushall()
    rng = random.Random(seed)
    clients = [redis.Redis(port=port) for _ in range(min(hosts, 50))]
    sims = [SimHost(keys, rng) for _ in range(hosts)]
    sides = [design(clients[i % len(clients)], f"web{i}") for i in range(hosts)]
    now = 1_800_000_000.0 + 5  # 5 s into a minute
    publish_lat: list[float] = []
    read_lat: list[float] = []
    dash = redis.Redis(port=port)  # an open dashboard: one refresh a farm-second
    #: The readers' costs, summed over the measured seconds: Redis CPU (s)
    #: and wall time (s, this process: the reader's own parsing too).
    costs = {"lead_cpu": 0.0, "lead_wall": 0.0, "dash_cpu": 0.0, "dash_wall": 0.0, "n": 0.0}
    whole = {"cpu": 0.0, "wall": 0.0}

    def farm_second(turn: bool) -> None:
        nonlocal now
        now += 1
        FARM_CLOCK[0] = now
        costs["n"] += 1
        for sim in sims:
            sim.second(rng, turn)
        # The hosts' own work first (each host does it on its own machine),
        # so that Redis serves the farm-second back to back, as a farm's
        # Redis does, not between long pauses of this one process.
        prepared = [side.prepare(sim.counts, sim.previous, now)
                    for sim, side in zip(sims, sides)]
        for prep, side in zip(prepared, sides):
            t = time.perf_counter()
            side.send(prep)
            t1 = time.perf_counter()
            got = side.level(now)  # the last host's: after every publication
            read_lat.append(time.perf_counter() - t1)
            publish_lat.append(t1 - t)
        c0, t = info(admin)["cpu"], time.perf_counter()
        sides[0].lead(now)
        costs["lead_wall"] += time.perf_counter() - t
        costs["lead_cpu"] += info(admin)["cpu"] - c0
        for _ in range(farmsync.REFRESHES):
            for side in sides:
                t = time.perf_counter()
                side.level(now)
                read_lat.append(time.perf_counter() - t)
        truth = sum(sim.counts[LEVEL][0] for sim in sims)
        if got != truth:
            sys.exit(f"FAIL  {design.name}: the level's farm count is {got}, the hosts' "
                     f"counts add up to {truth}")
        if dashboard:
            c0, t = info(admin)["cpu"], time.perf_counter()
            design.dashboard(dash, now)
            costs["dash_wall"] += time.perf_counter() - t
            costs["dash_cpu"] += info(admin)["cpu"] - c0

    sides[0].level(now)  # the level's key watched already (a farm that runs)
    farm_second(False)  # warm-up: every host's first (full) publication
    publish_lat.clear()
    read_lat.clear()
    costs.update(dict.fromkeys(costs, 0.0))
    def measured(fn) -> dict[str, float]:
        """Redis's counters over ``fn()`` (farm-seconds), the dashboard's
        refreshes left out (reported apart)."""
        dash0, start = costs["dash_cpu"], info(admin)
        fn()
        end = info(admin)
        got = {k: end[k] - start[k] for k in start}
        got["cpu"] -= costs["dash_cpu"] - dash0
        return got

    def ordinary_seconds() -> None:
        for _ in range(seconds):
            farm_second(False)

    per = {k: v / seconds for k, v in measured(ordinary_seconds).items()}
    if dashboard:  # every key of every host, once (the API's scope=farm unfiltered)
        c0, t = info(admin)["cpu"], time.perf_counter()
        design.dashboard(dash, now, None)
        whole.update(wall=time.perf_counter() - t, cpu=info(admin)["cpu"] - c0)
    turn = measured(lambda: farm_second(True))
    # The log design's periodic snapshot: every host's at least every
    # FULL_EVERY farm-seconds (a second in which they all fall, weighed in
    # as one in FULL_EVERY; on a farm they spread out).
    publishers = [getattr(side, "publisher", None) for side in sides]
    if all(isinstance(p, farm.LivePublisher) for p in publishers):
        farm_second(False)  # after the turn's big diff: a second like the others
        for p in publishers:
            p._full_at = float("-inf")
        snap = measured(lambda: farm_second(False))
        every = farm.FULL_EVERY
    else:
        snap, every = per, 1.0
    memory = int(admin.info("memory")["used_memory"])
    for c in [*clients, dash]:
        c.close()
    # One minute turn in 60 seconds, one snapshot in FULL_EVERY.
    mix = {k: (59 * per[k] + turn[k]) / 60 + (snap[k] - per[k]) / every for k in per}
    n = costs["n"]
    return {"cpu": mix["cpu"], "net": mix["net"], "calls": mix["calls"],
            "lead_cpu": costs["lead_cpu"] / n, "lead_wall": costs["lead_wall"] / n,
            "dash_cpu": costs["dash_cpu"] / n, "dash_wall": costs["dash_wall"] / n,
            "whole_cpu": whole["cpu"], "whole_wall": whole["wall"],
            "cpu_turn": turn["cpu"], "memory": memory,
            "publish_p99": p99(publish_lat), "read_p99": p99(read_lat)}


def staleness(got: dict[str, float]) -> str:
    if got["cpu"] >= 1.0:
        return "saturated"
    return f"{1.0 + farmsync.REFRESH_EVERY + got['publish_p99'] + got['read_p99']:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--design", choices=("all", "0.1", "hash", "log"), default="all",
                        help="run one design only")
    parser.add_argument("--size", metavar="HOSTSxKEYS", action="append",
                        help="run this size only (e.g. 100x10000; repeatable)")
    args = parser.parse_args()
    if args.quick:
        sizes, seconds = [(3, 200), (10, 200)], 2
    else:
        sizes, seconds = [(3, 1000), (30, 1000), (100, 1000), (3, 10_000), (30, 10_000),
                          (100, 10_000), (1000, 1000)], 5
    if args.size:
        sizes = [(int(h), int(k)) for h, k in (s.lower().split("x") for s in args.size)]
    designs = [d for d in (Before, Hash, After) if args.design in ("all", d.name)]
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_redis(tmp)
        try:
            print(f"{'hosts':>5} {'keys':>6} {'design':<6} {'Redis CPU/s':>11} {'% core':>7} "
                  f"{'turn s':>7} {'calls/s':>8} {'net/s':>9} {'memory':>9} {'staleness':>10} "
                  f"{'leader':>15} {'dashboard':>17} {'every key':>17}")
            results: dict[tuple[int, int], dict[str, dict[str, float]]] = {}
            for hosts, keys in sizes:
                for design in designs:
                    if design is not After and hosts >= 1000:
                        continue  # minutes per farm-second (hosts^2 reads, or hosts x keys)
                    if design is Before and hosts * keys > 300_000 and not args.quick:
                        continue  # saturated already at 30 x 10,000 (docs/redis.rst)
                    got = run(design, port, hosts, keys, seconds)
                    results.setdefault((hosts, keys), {})[design.name] = got
                    print(f"{hosts:>5} {keys:>6} {design.name:<6} "
                          f"{got['cpu'] * 1000:>8.1f} ms {got['cpu'] * 100:>6.1f}% "
                          f"{got['cpu_turn']:>6.2f}s {got['calls']:>8.0f} "
                          f"{got['net'] / 1e6:>6.2f} MB {got['memory'] / 1e6:>6.1f} MB "
                          f"{staleness(got):>10} "
                          f"{got['lead_cpu'] * 1000:>5.1f}/{got['lead_wall'] * 1000:>6.1f} ms "
                          f"{got['dash_cpu'] * 1000:>6.1f}/{got['dash_wall'] * 1000:>7.1f} ms "
                          f"{got['whole_cpu'] * 1000:>6.1f}/{got['whole_wall'] * 1000:>7.1f} ms",
                          flush=True)
        finally:
            proc.kill()
            proc.wait()
    print("(leader, dashboard: one reading a farm-second, Redis CPU / wall time in this "
          "process;\n the dashboard's refresh (its farm panel: the all key of every host) "
          "is not in the Redis CPU/s column;\n every key: one reading of every key of "
          "every host, the API's scope=farm unfiltered)")
    if len(designs) > 1:
        print("\nhash / log (Redis CPU per farm-second):")
        for (hosts, keys), pair in results.items():
            if "hash" in pair and "log" in pair:
                print(f"  {hosts:>5} hosts x {keys:>6,} keys: "
                      f"{pair['hash']['cpu'] / max(pair['log']['cpu'], 1e-6):6.1f}x")
    print("(checked: every level read at the end of a second equals the hosts' total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
