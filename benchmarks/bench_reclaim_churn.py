"""Does a new name cost the same after 100,000 reclaims as at the start?

Run by hand::

    python benchmarks/bench_reclaim_churn.py                  # this build
    python benchmarks/bench_reclaim_churn.py --quick          # CI smoke mode
    python benchmarks/bench_reclaim_churn.py --before DIR     # side by side with
                                                              # the package in DIR

The made-up-host flood that reclaim exists for: 200 hosts that stay (hit
every round in a later minute, never idle), and rounds of 100 new hosts
that are hit once and then reclaimed.  Every 10,000 reclaims the benchmark
times 500 more new names (``Counter.hit`` of a name never seen: the
lock-free probe, names.validate, the insert under the lock with its second
probe) and reports the mean cost per new name, the first block's cost
being 1.00, and ``probe``: the mean number of index entries a probe of an
absent name reads, by the build's own rule, read from the bytes.  Before
``probe_limit`` (issue 20) tombstones filled the index: every probe of an
unknown name read the whole index, twice on insert (the second time under
the lock).  Target: the last block's probe at most twice the first's (or
4 entries); the exit status is 1 when it is missed or the table filled
(the timings move with the machine's load and are reported, not judged).
``--quick`` runs 20,000 reclaims.

``--before DIR`` runs the same rounds, in a child process, against the
trafficthreshold package in DIR (e.g. a checkout of the previous commit
with its extension built in place), one round of each alternately, so both
see the same machine load.  The segments are installed at fresh keys and
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, struct, sys, time
sys.path.insert(0, sys.argv[1])
import sysv_ipc
from trafficthreshold import segment
NOW = 1_800_000_000
MINUTE = NOW // 60
geo = segment.Geometry(keys=1024, minutes=5, seconds=64, stripes=1)
key = segment.unused_key()
segment.install(key, "sysv", geometry=geo, now=NOW)
c = segment.attach(key, "sysv")

def probe_reads():
    # Entries a probe of an absent name reads, by the build's own rule: to
    # an empty entry, and at most probe_limit (header 200) where it is kept.
    shm = sysv_ipc.SharedMemory(key)
    buf = shm.read(4096 + geo.index_size * 128)
    shm.detach()
    limit = struct.unpack_from("=I", buf, 200)[0] or geo.index_size
    mask, total = geo.index_size - 1, 0
    for i in range(200):
        h = segment.fnv1a(f"absent{i}.example".encode(), b"pageview")
        for n in range(min(limit, geo.index_size)):
            if struct.unpack_from("=I", buf, 4096 + ((h + n) & mask) * 128)[0] == 0:
                n += 1
                break
        else:
            n = min(limit, geo.index_size)
        total += n
    return total / 200

try:
    for i in range(200):
        c.hit(f"stay{i}.example", now=NOW + 60)
    reclaimed = made = 0
    for line in sys.stdin:
        target = int(line)
        while reclaimed < target:                  # churn up to `target` reclaims
            for i in range(100):
                c.hit(f"h{made}.example", now=NOW)
                made += 1
            reclaimed += len(c.reclaim(MINUTE + 1))
        started = time.perf_counter()              # then time 500 new names
        for i in range(500):
            c.hit(f"t{made}.example", now=NOW)
            made += 1
        ns = (time.perf_counter() - started) / 500 * 1e9
        reclaimed += len(c.reclaim(MINUTE + 1))
        head = segment.header(c)
        print(json.dumps({"reclaimed": reclaimed, "ns": ns, "overflow": head["overflow_hits"],
                          "probe": probe_reads(),
                          "probe_limit": head.get("probe_limit")}), flush=True)
finally:
    c.detach()
    segment.uninstall(key, "sysv", force=True)
'''


def start(package_dir: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, package_dir], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def step(proc: subprocess.Popen, target: int) -> dict:
    proc.stdin.write(f"{target}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke mode")
    parser.add_argument("--before", help="a trafficthreshold checkout to compare with")
    parser.add_argument("--reclaims", type=int, help="default 100,000 (quick 20,000)")
    args = parser.parse_args(argv)
    total = args.reclaims or (20_000 if args.quick else 100_000)
    runs = {"this build": start(str(ROOT))}
    if args.before:
        runs = {"before": start(args.before), **runs}
    rows: dict[str, list[dict]] = {name: [] for name in runs}
    for target in range(0, total + 1, 10_000):
        for name, proc in runs.items():
            rows[name].append(step(proc, target))
    for proc in runs.values():
        proc.stdin.close()
        proc.wait(60)
    header = f"{'reclaims':>9}" + "".join(f"  {name + ' ns/name':>22} {'x first':>7} "
                                             f"{'probe':>6}" for name in runs)
    print(header)
    for i in range(len(rows["this build"])):
        line = f"{rows['this build'][i]['reclaimed']:>9,}"
        for name in runs:
            r, first = rows[name][i], rows[name][0]["ns"]
            line += f"  {r['ns']:>22,.0f} {r['ns'] / first:>7.2f} {r['probe']:>6.1f}"
        print(line)
    ok = True
    for name in runs:
        if any(r["overflow"] for r in rows[name]):
            print(f"{name}: hits overflowed: the table filled, the figures are not comparable")
            ok = name == "before" and ok
    mine = rows["this build"]
    ratio = mine[-1]["ns"] / mine[0]["ns"]
    print(f"this build: the last block costs {ratio:.2f}x the first; a probe of an absent "
          f"name reads {mine[-1]['probe']:.1f} entries (first block {mine[0]['probe']:.1f}, "
          f"target: at most twice, or 4); probe_limit {mine[-1]['probe_limit']}")
    if mine[-1]["probe"] > max(4.0, 2 * mine[0]["probe"]):
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
