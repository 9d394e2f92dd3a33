"""The segment under threads, signals and kills: a stress run (issue 20).

Run by hand::

    python benchmarks/bench_stress_segment.py            # 60 s
    python benchmarks/bench_stress_segment.py --quick    # CI smoke mode, ~8 s
    PYTHONMALLOC=debug python benchmarks/bench_stress_segment.py --quick

and under AddressSanitizer (an ASan build of the extension; see
docs/segment.rst, "Speed", for the commands used)::

    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
        PYTHONPATH=/tmp/asan-build python benchmarks/bench_stress_segment.py --quick

What runs at once, on one segment:

* 3 worker processes of 8 threads each, the threads of a process sharing
  one attachment (a threaded web server).  Each batch of a thread hits a
  mix of keys: *cached* ones (the same ten names every batch), *reclaimed*
  ones (names of a pool that come back after being idle, so reclaimed
  meanwhile: the thread's cached slot is stale), a *new* name, all with an
  explicit clock (the "replay" event, in the era's minute, see below); and
  *live* names (the "pageview" event) with the real clock, some with
  ``now=None``, some with ``now=time.time()``.
* a 4th process, the reclaimer, which every few milliseconds moves the
  explicit clock on by a minute (an "era"), waits until no thread still
  hits the old era, rolls that era's minute (names and counts read
  consistently, segment.read_consistently) and reclaims every key idle
  before the new era;
* the parent, which SIGKILLs a random worker every 150..450 ms and starts
  a new one in its place.

Each thread writes what a batch will hit before it starts (intent) and
what it hit after (done), one line each.  At the end:

* no process died but by our SIGKILL (a crash: a signal, a non-zero exit);
* the lock is free (taken and given back at once);
* free_slots equals the free list's length, no slot free and owned, no
  reclaim or insert left under way, index_seq even;
* every finished hit is counted under its own key or reported dropped:
  per key, counted >= finished - (hits the thread saw refused) - the
  dropped/overflow allowance (the header's dropped_hits and
  overflow_hits, shared by all keys), and counted <= intended (a killed
  batch may have counted part of its hits); no count under a name nobody
  hit.

The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import struct
import sys
import threading
import time
from collections import Counter as Tally
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trafficthreshold import segment  # noqa: E402
from trafficthreshold.errors import SegmentBusy  # noqa: E402

FORK = multiprocessing.get_context("fork")
PROCESSES, THREADS = 3, 8
FAR = 1 << 62  # a thread slot that no longer holds anyone back
#: The explicit clock starts this far back: eras advance a minute every few
#: ms and must stay behind the real clock (the live keys) and within the
#: 366 days a `now` may differ from it.
BACK_S = 300 * 86400
GEOMETRY = segment.Geometry(keys=4096, minutes=30, seconds=64, stripes=2)


def era_now(t0: int, era: int, k: int) -> int:
    return t0 + 60 * era + k


def batch_plan(rnd: random.Random, era: int, wid: str, seq: int) -> list[tuple[str, str, str]]:
    """(account, event, clock) of one batch: clock 'era', 'real' (now=None)
    or 'wall' (now=time.time())."""
    plan = [(f"c{i}", "replay", "era") for i in range(0, 10, 3)]
    plan += [(f"p{(era * 7 + j) % 60}", "replay", "era") for j in range(3)]
    if seq % 16 == 0:  # a new name now and then: the table must not fill up
        plan.append((f"n{wid}-{seq}", "replay", "era"))
    plan += [(f"live{rnd.randrange(5)}", "pageview", rnd.choice(("real", "wall")))
             for _ in range(3)]
    rnd.shuffle(plan)
    return plan


def worker(key: int, backend: str, t0: int, index: int, era, slots, stop,
           log_dir: str) -> None:
    """A worker process: 8 threads on one shared attachment."""
    counter = segment.attach(key, backend)
    log = os.open(os.path.join(log_dir, f"w{index}-{os.getpid()}.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(record: dict) -> None:
        os.write(log, (json.dumps(record) + "\n").encode())

    def thread(t: int) -> None:
        rnd = random.Random(os.getpid() * 100 + t)
        me = index * THREADS + t
        wid = f"{os.getpid()}-{t}"
        seq = 0
        while not stop.value:
            e = era.value
            slots[me] = e
            while era.value != e:  # moved on meanwhile: take the new era
                e = era.value
                slots[me] = e
            seq += 1
            plan = batch_plan(rnd, e, wid, seq)
            write({"intent": [[a, ev, c] for a, ev, c in plan], "era": e})
            done, busy = Tally(), Tally()
            for k, (account, event, clock) in enumerate(plan):
                now = (era_now(t0, e, rnd.randrange(60)) if clock == "era"
                       else None if clock == "real" else time.time())
                try:
                    counter.hit(account, event, 1, now)
                except SegmentBusy:
                    busy[account, event, e if clock == "era" else -1] += 1
                    continue
                done[account, event, e if clock == "era" else -1] += 1
            write({"done": [[a, ev, m, n] for (a, ev, m), n in done.items()],
                   "busy": [[a, ev, m, n] for (a, ev, m), n in busy.items()]})
        slots[me] = FAR

    threads = [threading.Thread(target=thread, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    os.close(log)
    os._exit(0)


def reclaimer(key: int, backend: str, t0: int, era, slots, stop, interval: float,
              out: str) -> None:
    """Moves the era on, rolls the era nobody hits any more, reclaims."""
    counter = segment.attach(key, backend)
    rolled: Tally = Tally()
    e = era.value
    rounds = reclaimed = 0
    longest: list = [0.0, []]

    def roll(minute: int) -> None:
        def read():
            names = {s: (a, ev) for s, a, ev in counter.keys()}
            return [(names.get(s), n) for s, _m, n in counter.minutes(minute, minute)]
        got, skip = segment.read_consistently(counter, read)
        assert got is not None and not skip, "the index never settled for the roll"
        for name, n in got:
            assert name is not None, f"a count in minute {minute} under no name"
            if name[1] == "replay":
                rolled[name[0], minute] += n

    while not stop.value:
        time.sleep(interval)
        era.value = e + 1
        waited = time.monotonic()
        while min(slots[:]) <= e and not stop.value:
            time.sleep(0.0005)
        waited = time.monotonic() - waited
        if waited > longest[0]:
            longest[:] = [waited, [i for i, v in enumerate(slots[:]) if v <= e]]
        if stop.value:
            break
        roll((t0 // 60) + e)
        reclaimed += len(counter.reclaim((t0 // 60) + e + 1))
        rounds += 1
        e += 1
    # Whatever the last era counted: nobody hits any more (the parent
    # stopped the workers before it stopped us).
    roll((t0 // 60) + e)
    with open(out, "w") as f:
        json.dump({"rolled": [[a, m, n] for (a, m), n in rolled.items()],
                   "rounds": rounds, "reclaimed": reclaimed, "longest_wait": longest, "last_era": e}, f)
    os._exit(0)


def raw_bytes(key: int, backend: str) -> bytes:
    """The segment's bytes, read without the C module."""
    if backend == "sysv":
        import sysv_ipc
        shm = sysv_ipc.SharedMemory(key)
        try:
            return shm.read()
        finally:
            shm.detach()
    with open("/dev/shm" + segment.posix_name(key), "rb") as f:
        return f.read()


def check_structure(key: int, backend: str, problems: list[str]) -> dict:
    """The free list, the owners of slots and the records, from the bytes."""
    buf = raw_bytes(key, backend)
    u32 = lambda off: struct.unpack_from("=I", buf, off)[0]  # noqa: E731
    cap, isize = u32(segment.H_KEY_CAPACITY), u32(segment.H_INDEX_SIZE)
    index = struct.unpack_from("=Q", buf, segment.H_INDEX_OFFSET)[0]
    table = index + isize * segment.INDEX_ENTRY_SIZE
    owned: dict[int, bytes] = {}
    for i in range(isize):
        off = index + i * segment.INDEX_ENTRY_SIZE
        state, slot = struct.unpack_from("=II", buf, off)
        if state == segment.ENTRY_READY:
            if slot in owned:
                problems.append(f"slot {slot} owned twice")
            owned[slot] = buf[off + segment.E_ACCOUNT:off + segment.E_ACCOUNT + 8]
    free, head = [], u32(segment.H_FREE_HEAD)
    while head and len(free) <= cap:
        free.append(head - 1)
        head = u32(table + (head - 1) * 8 + 4)
    if len(free) != u32(segment.H_FREE_SLOTS):
        problems.append(f"free_slots {u32(segment.H_FREE_SLOTS)} but the free list holds "
                        f"{len(free)}")
    if set(free) & set(owned):
        problems.append(f"slots both free and owned: {sorted(set(free) & set(owned))[:5]}")
    if u32(segment.H_KEYS_USED) != len(free) + len(owned):
        problems.append(f"keys_used {u32(segment.H_KEYS_USED)} != {len(owned)} owned + "
                        f"{len(free)} free: slots lost")
    for name in ("H_RECLAIM_SLOT", "H_INSERT_SLOT"):
        if u32(getattr(segment, name)):
            problems.append(f"{name[2:].lower()} left under way after the run's last holder")
    if struct.unpack_from("=Q", buf, segment.H_INDEX_SEQ)[0] % 2:
        problems.append("index_seq odd after the run")
    return {"owned": len(owned), "free": len(free)}


def read_logs(log_dir: str) -> tuple[Tally, Tally, Tally]:
    """(finished, refused, intended) per (account, event, era or -1)."""
    finished, refused, intended = Tally(), Tally(), Tally()
    for path in Path(log_dir).glob("w*.log"):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by SIGKILL
            if "intent" in rec:
                for a, ev, clock in rec["intent"]:
                    intended[a, ev, rec["era"] if clock == "era" else -1] += 1
            else:
                for a, ev, m, n in rec["done"]:
                    finished[a, ev, m] += n
                for a, ev, m, n in rec["busy"]:
                    refused[a, ev, m] += n
    return finished, refused, intended


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke mode, ~8 s")
    parser.add_argument("--seconds", type=float, help="how long to run (default 60, quick 6)")
    parser.add_argument("--backend", choices=segment.BACKENDS, default="sysv")
    parser.add_argument("--interval", type=float, default=0.004,
                        help="the reclaimer's pause between eras, in seconds")
    args = parser.parse_args(argv)
    seconds = args.seconds or (6.0 if args.quick else 60.0)
    import tempfile
    log_dir = tempfile.mkdtemp(prefix="stress-segment-")
    key = segment.unused_key()
    segment.install(key, args.backend, geometry=GEOMETRY)
    # The explicit clock's minute 0, one for every process.
    t0 = int(time.time()) - BACK_S
    t0 -= t0 % 60
    era = FORK.Value("q", 0, lock=False)
    slots = FORK.Array("q", [FAR] * (PROCESSES * THREADS), lock=False)
    stop_workers = FORK.Value("b", 0, lock=False)
    stop_reclaimer = FORK.Value("b", 0, lock=False)
    out = os.path.join(log_dir, "reclaimer.json")
    problems: list[str] = []
    kills = crashes = 0
    rnd = random.Random(20)

    def start(i: int) -> multiprocessing.Process:
        p = FORK.Process(target=worker, args=(key, args.backend, t0, i, era, slots, stop_workers,
                                              log_dir))
        p.start()
        return p

    started = time.monotonic()
    try:
        rec = FORK.Process(target=reclaimer, args=(key, args.backend, t0, era, slots,
                                                   stop_reclaimer, args.interval, out))
        rec.start()
        workers = [start(i) for i in range(PROCESSES)]
        while time.monotonic() - started < seconds:
            time.sleep(rnd.uniform(0.15, 0.45))
            i = rnd.randrange(PROCESSES)
            os.kill(workers[i].pid, signal.SIGKILL)
            workers[i].join()
            kills += 1
            for t in range(THREADS):  # its threads hold nobody back any more
                slots[i * THREADS + t] = FAR
            workers[i] = start(i)
        stop_workers.value = 1
        for p in workers:
            p.join(60)
            if p.exitcode != 0:
                crashes += 1
                problems.append(f"worker {p.pid} ended with {p.exitcode}")
        stop_reclaimer.value = 1
        rec.join(60)
        if rec.exitcode != 0:
            crashes += 1
            problems.append(f"the reclaimer ended with {rec.exitcode}")
        elapsed = time.monotonic() - started

        counter = segment.attach(key, args.backend)
        try:
            counter.lock(100)  # the lock is free: taken at once
            counter.unlock()
        except SegmentBusy as exc:
            problems.append(f"the lock is not free at the end: {exc}")
        # A last holder finishes what a killed worker left: a new key.
        counter.hit("after.example", now=None)
        head = segment.header(counter)
        shape = check_structure(key, args.backend, problems)

        finished, refused, intended = read_logs(log_dir)
        with open(out) as f:
            rolled_data = json.load(f)
        counted = Tally()
        for a, m, n in rolled_data["rolled"]:
            counted[a, "replay", m - t0 // 60] += n
        minute = int(time.time()) // 60
        names = {s: (a, ev) for s, a, ev in counter.keys()}
        span = int(elapsed // 60) + 2
        for slot, m, n in counter.minutes(minute - span, minute):
            a, ev = names[slot]
            if ev == "pageview":
                counted[a, ev, -1] += n
        counter.detach()

        # The totals: `all` of each event is its accounts' sum.
        for table in (finished, refused, intended):
            for (a, ev, m), n in list(table.items()):
                if a != "all":
                    table["all", ev, m] += n
        counted.pop(("after.example", "pageview", -1), None)
        counted["all", "pageview", -1] -= 1
        allowance = head["dropped_hits"] + head["overflow_hits"]
        deficit = excess = 0
        shorts: Tally = Tally()
        for k in set(finished) | set(counted) | set(intended):
            if counted[k] > intended[k]:
                problems.append(f"{k}: counted {counted[k]} but only {intended[k]} intended")
            short = finished[k] - refused[k] - counted[k]
            if short > 0 and k[0] != "all":
                deficit += short
                shorts[k[0][:1] + k[1][:1]] += short
            excess += max(0, counted[k] - finished[k]) if k[0] != "all" else 0
        if deficit > allowance:
            problems.append(f"{deficit} finished hits neither counted under their key nor "
                            f"reported dropped (dropped + overflow: {allowance})")
        hits = sum(n for (a, _e, _m), n in finished.items() if a != "all")
        print(f"stress: {elapsed:.1f} s, backend {args.backend}, {PROCESSES} processes x "
              f"{THREADS} threads + a reclaimer; {kills} workers SIGKILLed, {crashes} crashes")
        print(f"  {hits:,} finished hits ({hits / elapsed:,.0f}/s), "
              f"{sum(v for k, v in refused.items() if k[0] != 'all'):,} refused (SegmentBusy), "
              f"{excess:,} counted from batches cut by a kill")
        print(f"  {rolled_data['rounds']:,} eras rolled, {rolled_data['reclaimed']:,} keys "
              f"reclaimed ({head['reclaimed']:,} in the header), keys_used "
              f"{head['keys_used']}, {shape['owned']} owned, {shape['free']} free; longest "
              f"wait for an era to end {rolled_data['longest_wait'][0] * 1000:.0f} ms {rolled_data['longest_wait'][1]}")
        print(f"  dropped_hits {head['dropped_hits']:,} ({head['lock_timeouts']:,} lock waits "
              f"past 50 ms), overflow_hits "
              f"{head['overflow_hits']:,}, short of finished {deficit:,} {dict(shorts)}, probe_limit "
              f"{head['probe_limit']}")
    finally:
        stop_workers.value = stop_reclaimer.value = 1
        segment.uninstall(key, args.backend, force=True, rollup=None)
        import shutil
        shutil.rmtree(log_dir, ignore_errors=True)
    for p in problems:
        print("PROBLEM:", p)
    print("stress: ok" if not problems else f"stress: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
