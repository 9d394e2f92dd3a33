"""The farm's live counts: what they cost the tick and the farm thread.

Run by hand::

    python benchmarks/bench_farm.py          # the figures in docs/redis.rst
    python benchmarks/bench_farm.py --quick  # CI smoke mode, a few seconds

A real segment with N keys all hit in the current minute, a real
redis-server on a loopback port, an in-process supervisor with ``[store]
backend = "redis"`` and ``[throttle] scope = "farm"``:

1. the tick (throttle, heartbeat, the offer to the farm thread), mean over
   the ticks, with the farm thread working meanwhile (target: under 10 ms
   with 10,000 keys, as bench_supervisor's tick in an episode);
2. the farm thread's reading of the live counts of N active keys from its
   own attachment (``LiveReader.counts``);
3. one second's publication of N keys, 10 % of them changed since the
   last one, plus the farm thread's read of the level's key
   (``LivePublisher.publish`` + ``LevelReader.read``), over loopback
   (benchmarks/bench_farm_scale.py: what it costs Redis, farm-wide);
4. the full read of the farm (``farm_live``: every key of every host, what
   ``/api/stats/live?scope=farm`` and the dashboard read), two hosts of N
   keys;
5. what a farm rule adds to the farm thread's second on the leader
   (``FarmAlerts.step``: the lease's renewal and the rule's evaluation, no
   state change), against 3.

The published total is checked against the hits made.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_redis import start_redis  # noqa: E402
from trafficthreshold import config, farm, farmsync, segment  # noqa: E402
from trafficthreshold.supervisor import Supervisor  # noqa: E402


def bench(keys: int, ticks: int) -> dict[str, float]:
    key = segment.unused_key()
    segment.install(key, geometry=segment.Geometry(keys=keys + 32))
    counter = segment.attach(key)
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_redis(tmp)
        try:
            path = f"{tmp}/config.toml"
            with open(path, "w") as f:
                f.write(f'key = {key}\ndatabase = "{tmp}/s.sqlite3"\ntimezone = "UTC"\n'
                        '[http]\nenabled = false\n[throttle]\nscope = "farm"\n'
                        f'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:{port}/0"\n'
                        'host = "bench"\n[[alert]]\nname = "site"\nscope = "farm"\n'
                        'threshold = 1000000000\nto = ["ops@example.com"]\n')
            start = (time.time() // 60) * 60
            for i in range(keys):
                counter.hit(f"site{i}.example", "pageview", 1, start + 1)
            sup = Supervisor(config.load(path, env={}), config_path=path, http=False, env={})
            sup.initialize(start + 2)
            try:
                times = []
                for i in range(ticks):
                    t = time.perf_counter()
                    sup.tick(start + 2.5 + i * 0.1)
                    times.append(time.perf_counter() - t)
                    time.sleep(0.02)  # the farm thread runs meanwhile, as between ticks
                assert sup.farm.drain(30)
                reading = sup.farm.reading
                published = reading.live.count("all", "pageview", "minute")
                reader = sup.farm.reader
                instance = counter.load(segment.H_INSTANCE, 8)
                fresh = farmsync.LiveReader(key, "sysv")
                fresh.counts(instance, start + 3)  # the first reads the key names too
                t = time.perf_counter()
                counts = fresh.counts(instance, start + 3)
                read = time.perf_counter() - t
                fresh.close()
                client = sup.farm.client
                pub = farm.LivePublisher(client, "bench2")
                level = farm.LevelReader(client, "bench2", farmsync.LEVEL_KEYS)
                pub.publish(counts, level=0, now=start + 3)  # the first: whole
                level.read(start + 3)
                changed = dict(counts)
                for name in list(changed)[::10]:
                    m, s = changed[name]
                    changed[name] = (m + 1, s + 1)
                t = time.perf_counter()
                pub.publish(changed, level=0, now=start + 4)
                level.read(start + 4)
                cycle = time.perf_counter() - t
                pub.withdraw()
                t = time.perf_counter()
                farm.farm_live(client, now=start + 3)
                full = time.perf_counter() - t
                # The farm thread is idle now (drained): step on this thread.
                sup.farm.alerts.step(reading.live, start + 3, 0)  # the term's first read
                t = time.perf_counter()
                for _ in range(20):
                    sup.farm.alerts.step(reading.live, start + 3, 0)
                lead = (time.perf_counter() - t) / 20
                assert sup.farm.alerts.leading
                assert reader is not None
            finally:
                sup.shutdown(start + 4)
        finally:
            proc.kill()
            proc.wait()
            counter.detach()
            segment.uninstall(key, force=True)
    if published != keys:
        sys.exit(f"FAIL  the farm's total is {published}, {keys} hits were made")
    return {"tick": statistics.mean(times), "read": read, "cycle": cycle, "full": full,
            "lead": lead}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    keys = 1000 if args.quick else 10_000
    got = bench(keys, 10 if args.quick else 50)
    rows = [
        (f"tick, scope farm, {keys:,} keys", f"{got['tick'] * 1000:.2f} ms", "< 10 ms",
         got["tick"] < 0.01),
        (f"live counts read, {keys:,} keys", f"{got['read'] * 1000:.2f} ms", "-", True),
        (f"publish 10 % changed + level, {keys:,}", f"{got['cycle'] * 1000:.2f} ms", "-",
         True),
        (f"full farm read (API), 2 x {keys:,} keys", f"{got['full'] * 1000:.2f} ms", "-", True),
        ("farm rule on the leader (lease + eval)", f"{got['lead'] * 1000:.2f} ms", "-", True),
        ("  ratio to publish + level read", f"{got['lead'] / got['cycle']:.3f}", "-", True),
    ]
    print(f"{'measure':<36} {'value':>12} {'target':>8}  result")
    for name, value, target, ok in rows:
        print(f"{name:<36} {value:>12} {target:>8}  {'PASS' if ok else 'FAIL'}")
    print(f"(checked: the farm's total of the minute = {keys:,} hits made)")
    return 0 if args.quick or all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
