"""The supervisor's costs, measured on this machine.

    python benchmarks/bench_supervisor.py [--quick]

1. Roll-up time: 10,000 active keys hit in one minute, read from a real
   segment and rolled into a real SQLite store (target: under 1 s).
2. Idle CPU of ``trafficthreshold run --no-http`` with 1,000 keys in the
   segment (target: under 1% of one core), read from /proc/<pid>/stat.
3. One tick in the middle of an alert episode (a rule is hot, its mail is
   queued, the count still rising so the episode's peak changes at every
   tick), with 10,000 keys in the minute (target: under 10 ms, a hundredth
   of the tick's second).
The counts rolled are checked against the hits made.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from trafficthreshold import config, segment
from trafficthreshold.rollup import Roller
from trafficthreshold.store import SQLiteStore
from trafficthreshold.supervisor import Supervisor


def bench_rollup(keys: int) -> tuple[float, int]:
    key = segment.unused_key()
    segment.install(key, geometry=segment.Geometry(keys=keys + 32))
    counter = segment.attach(key)
    try:
        now = (time.time() // 60) * 60
        for i in range(keys):
            counter.hit(f"site{i}.example", "pageview", 1 + i % 7, now + 1)
        made = sum(1 + i % 7 for i in range(keys))
        with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.sqlite3", "UTC") as store:
            roller = Roller(counter, store)
            store.set_closed_through(int(now // 60) - 1)
            t = time.perf_counter()
            added = roller.roll(now + 61)
            elapsed = time.perf_counter() - t
        assert added == made, (added, made)
        return elapsed, added
    finally:
        counter.detach()
        segment.uninstall(key, force=True)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_idle_cpu(keys: int, seconds: float) -> float:
    key = segment.unused_key()
    segment.install(key, geometry=segment.Geometry(keys=keys + 32))
    counter = segment.attach(key)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = f"{tmp}/config.toml"
        with open(cfg, "w") as f:
            f.write(f'key = {key}\ndatabase = "{tmp}/s.sqlite3"\n[http]\nenabled = false\n')
        for i in range(keys):
            counter.hit(f"site{i}.example")
        proc = subprocess.Popen([sys.executable, "-m", "trafficthreshold.cli", "--config", cfg,
                                 "run", "--no-http"], stderr=subprocess.DEVNULL)
        try:
            time.sleep(3)                      # start-up and the first roll
            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(seconds)
            c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            counter.detach()
            segment.uninstall(key, force=True)
    return (c1 - c0) / (t1 - t0)


def bench_hot_tick(keys: int, ticks: int) -> tuple[float, int]:
    """Mean seconds per tick while an episode is open; and the mails queued
    (one: the alert)."""
    key = segment.unused_key()
    segment.install(key, geometry=segment.Geometry(keys=keys + 32))
    counter = segment.attach(key)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/config.toml"
            with open(path, "w") as f:
                f.write(f'key = {key}\ndatabase = "{tmp}/s.sqlite3"\n[http]\nenabled = false\n'
                        '[mail]\nsendmail = "/bin/true"\n'
                        '[[alert]]\nname = "busy"\nthreshold = 1\nto = ["ops@localhost"]\n')
            start = (time.time() // 60) * 60
            for i in range(keys):
                counter.hit(f"site{i}.example", "pageview", 1, start + 1)
            sup = Supervisor(config.load(path), config_path=path, http=False, env={})
            sup.initialize(start + 2)
            try:
                sup.tick(start + 2.5)             # the episode opens, its mail is queued
                t = time.perf_counter()
                for i in range(ticks):
                    counter.hit("site0.example", "pageview", 1, start + 3 + i)
                    sup.tick(start + 3.5 + i)
                elapsed = (time.perf_counter() - t) / ticks
                assert sup.engine.state.episodes, "the rule did not fire"
                mails = len(sup.engine.store.list())
            finally:
                sup.shutdown(start + 3.5 + ticks)
        return elapsed, mails
    finally:
        counter.detach()
        segment.uninstall(key, force=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    roll_keys = 1000 if args.quick else 10_000
    elapsed, added = bench_rollup(roll_keys)
    idle = bench_idle_cpu(1000, 3 if args.quick else 30)
    hot_keys = 1000 if args.quick else 10_000
    hot, mails = bench_hot_tick(hot_keys, 10 if args.quick else 50)
    rows = [
        (f"roll-up, {roll_keys:,} active keys", f"{elapsed:.3f} s", "< 1 s", elapsed < 1.0),
        ("idle CPU, 1,000 keys", f"{idle * 100:.2f} % of a core", "< 1 %", idle < 0.01),
        (f"tick in an episode, {hot_keys:,} keys", f"{hot * 1000:.2f} ms", "< 10 ms",
         hot < 0.01),
    ]
    print(f"{'measure':<32} {'value':>20} {'target':>8}  result")
    for name, value, target, ok in rows:
        print(f"{name:<32} {value:>20} {target:>8}  {'PASS' if ok else 'FAIL'}")
    print(f"(roll-up checked: {added:,} hits rolled = hits made; episode: {mails} mail queued)")
    if mails != 1:
        print(f"FAIL  the episode queued {mails} mails, not 1")
        return 1
    # --quick is a smoke run: the counts must be right; timings are reported.
    return 0 if args.quick or all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
