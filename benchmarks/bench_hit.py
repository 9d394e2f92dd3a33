"""How fast is hit(), next to the floor and to the usual alternatives?

Run by hand::

    python benchmarks/bench_hit.py          # the figures in docs/segment.rst
    python benchmarks/bench_hit.py --quick  # CI smoke mode, a few seconds

Everything is measured in one run, on one machine, the same way: a loop
in a function, unrolled ten times so the loop's own cost is spread thin,
best of several repeats, reported in ns per operation and as ratios.

* ``hit("example.com")``: the worker API, one process (it adds to the
  account's key and to the ``all`` key: two keys, four buckets);
* an empty Python function called with the same argument: the floor,
  what any instrumentation written in Python costs at least;
* both again with a new (equal) str object each call, as a web worker
  passes the host of each request: the string's hash is computed then
  (for information; the targets use the first two rows);
* ``hit()`` throughput with 2 processes against 1 (the stripes at work);
* prometheus_client's multiprocess ``Counter.labels(...).inc()`` (the
  label child is resolved once, outside the loop: its fastest use);
* a naive counter in SysV shared memory guarded by a SysV semaphore:
  acquire, read-modify-write through a memoryview, release;
* redis-py ``INCR`` on a local redis-server (``--redis URL``, default
  ``unix:///tmp/redis.sock`` then ``redis://127.0.0.1:6379``); skipped with
  a note when none answers.

Every contender's count is checked afterwards (no lost counts).  The hits
land on the real clock, so they are summed over the minute snapshots
(``Counter.minutes``) from the first minute to the last.

Targets: hit() within 3x of the empty call; >= 10x faster than prometheus
multiprocess; >= 20x faster than the semaphore counter; 2 processes
>= 1.6x the throughput of one.  The exit status is 1 when a count is wrong
or (outside ``--quick``, whose runs are too short to be steady) a target
is missed.

The segment is installed at a fresh random key and removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# prometheus_client reads this when it is imported.
_PROM_DIR = tempfile.mkdtemp(prefix="bench-hit-prom-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _PROM_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sysv_ipc  # noqa: E402

import trafficthreshold  # noqa: E402
from trafficthreshold import segment  # noqa: E402

UNROLL = 10
ACCOUNT = "example.com"


def timed(op: Callable[[], object], n: int, repeats: int) -> tuple[float, int]:
    """Best ns per call of op() over `repeats` runs of n calls (n rounded
    up to a multiple of UNROLL).  Returns (ns, calls made)."""
    loops = -(-n // UNROLL)
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(loops):
                op(); op(); op(); op(); op(); op(); op(); op(); op(); op()  # noqa: E702
            best = min(best, (time.perf_counter() - start) / (loops * UNROLL))
    finally:
        gc.enable()
    return best * 1e9, loops * UNROLL * repeats


def timed_arg(op: Callable[[str], object], arg: str, n: int, repeats: int) -> tuple[float, int]:
    """timed() for a one-argument call, the argument a local variable."""
    loops = -(-n // UNROLL)
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(loops):
                op(arg); op(arg); op(arg); op(arg); op(arg)  # noqa: E702
                op(arg); op(arg); op(arg); op(arg); op(arg)  # noqa: E702
            best = min(best, (time.perf_counter() - start) / (loops * UNROLL))
    finally:
        gc.enable()
    return best * 1e9, loops * UNROLL * repeats


def timed_fresh(op: Callable[[str], object], n: int, repeats: int) -> float:
    """Best ns per op(account) where every call gets a new, equal str object
    (as a web worker does: the host name of each request is a new string,
    whose hash is not computed yet).  Not unrolled: the list walk is in it,
    for the floor as well."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeats):
            accounts = ["".join(("example", ".com")) for _ in range(n)]
            start = time.perf_counter()
            for account in accounts:
                op(account)
            best = min(best, (time.perf_counter() - start) / n)
    finally:
        gc.enable()
    return best * 1e9


def empty(account=None, event="pageview", n=1, now=None):
    """The floor: a Python function with hit()'s signature doing nothing."""


# ------------------------------------------------------------- contenders

class Checks:
    """Count checks, printed after the table."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int]] = []

    def add(self, what: str, expected: int, got: int) -> None:
        self.rows.append((what, expected, got))

    @property
    def ok(self) -> bool:
        return all(e == g for _, e, g in self.rows)


def segment_total(counter: trafficthreshold.Counter, account: str | None,
                  first_minute: int, last_minute: int) -> int:
    slot = counter.find(account, "pageview")
    if slot is None:
        return 0
    return sum(n for s, _m, n in counter.minutes(first_minute, last_minute) if s == slot)


def bench_hit(n: int, repeats: int) -> tuple[float, int]:
    return timed_arg(trafficthreshold.hit, ACCOUNT, n, repeats)


def _hit_worker(account: str, n: int, go, done) -> None:
    hit = trafficthreshold.hit
    loops = n // UNROLL
    go.wait()
    start = time.perf_counter()
    for _ in range(loops):
        hit(account); hit(account); hit(account); hit(account); hit(account)  # noqa: E702
        hit(account); hit(account); hit(account); hit(account); hit(account)  # noqa: E702
    done.put(time.perf_counter() - start)


def throughput(processes: int, n: int, account: str) -> tuple[float, int]:
    """Hits per second of `processes` forked workers doing n hits each,
    from the start signal to the last one finishing."""
    ctx = multiprocessing.get_context("fork")
    go, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_hit_worker, args=(account, n, go, done))
             for _ in range(processes)]
    for p in procs:
        p.start()
    time.sleep(0.3)  # let every child reach go.wait()
    start = time.perf_counter()
    go.set()
    for _ in procs:
        done.get()
    wall = time.perf_counter() - start
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a hit worker failed (exit code {p.exitcode})")
    made = processes * (n // UNROLL) * UNROLL
    return made / wall, made


def bench_prometheus(n: int, repeats: int, checks: Checks) -> float:
    from prometheus_client import Counter as PromCounter, CollectorRegistry
    counter = PromCounter("bench_hits", "hits", ["account"], registry=CollectorRegistry())
    child = counter.labels(ACCOUNT)
    ns, made = timed(child.inc, n, repeats)
    checks.add("prometheus multiprocess counter", made, int(child._value.get()))
    return ns


def bench_semaphore(n: int, repeats: int, checks: Checks) -> float:
    sem = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX, 0o600, initial_value=1)
    shm = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, 0o600, 4096, init_character=b"\0")
    view = memoryview(shm)
    acquire, release = sem.acquire, sem.release
    unpack_from, pack_into = struct.unpack_from, struct.pack_into

    def incr() -> None:
        acquire()
        pack_into("=Q", view, 0, unpack_from("=Q", view, 0)[0] + 1)
        release()

    try:
        ns, made = timed(incr, n, repeats)
        checks.add("semaphore-guarded SysV counter", made, unpack_from("=Q", view, 0)[0])
    finally:
        view.release()
        shm.detach()
        shm.remove()
        sem.remove()
    return ns


def connect_redis(url: str | None):
    try:
        import redis
    except ImportError:
        return None, "redis-py is not installed"
    urls = [url] if url else ["unix:///tmp/redis.sock", "redis://127.0.0.1:6379"]
    for candidate in urls:
        try:
            client = redis.Redis.from_url(candidate, socket_connect_timeout=0.5)
            client.ping()
            return client, candidate
        except (redis.RedisError, OSError):
            continue
    return None, "no redis-server answered at " + " or ".join(urls)


def bench_redis(client, n: int, repeats: int, checks: Checks) -> float:
    name = f"trafficthreshold-bench-{os.getpid()}"
    client.delete(name)
    try:
        ns, made = timed(lambda: client.incr(name), n, repeats)
        checks.add("redis INCR", made, int(client.get(name)))
    finally:
        client.delete(name)
    return ns


# ------------------------------------------------------------------ report

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke mode: a few seconds")
    parser.add_argument("--backend", choices=segment.BACKENDS, default="sysv")
    parser.add_argument("--redis", help="redis URL, e.g. unix:///tmp/redis.sock")
    args = parser.parse_args(argv)

    if args.quick:
        n_fast, n_slow, n_redis, n_proc, repeats = 200_000, 20_000, 2_000, 400_000, 3
    else:
        n_fast, n_slow, n_redis, n_proc, repeats = 2_000_000, 200_000, 20_000, 5_000_000, 5

    load_before = os.getloadavg()[0]
    key = segment.unused_key()
    segment.install(key, args.backend)
    trafficthreshold.configure(key=key, backend=args.backend, strict=True)
    checks = Checks()
    rows: list[tuple[str, float]] = []
    first_minute = int(time.time() // 60)
    try:
        trafficthreshold.hit(ACCOUNT)  # attach and create the keys outside the timing
        ns_empty, _ = timed_arg(empty, ACCOUNT, n_fast, repeats)
        ns_hit, made = bench_hit(n_fast, repeats)
        made += 1
        rows += [("empty Python function call (floor)", ns_empty),
                 (f'hit("{ACCOUNT}")', ns_hit)]
        n_fresh = n_slow * 2
        ns_empty_fresh = timed_fresh(empty, n_fresh, repeats)
        ns_hit_fresh = timed_fresh(trafficthreshold.hit, n_fresh, repeats)
        made += n_fresh * repeats
        rows += [("empty call, a new str each call", ns_empty_fresh),
                 ("hit(), a new str each call", ns_hit_fresh)]

        # Interleaved and best of three: the two cores may be shared with
        # other work, and a burst of it should not decide the ratio.
        one = two = 0.0
        made1 = made2 = 0
        for _ in range(3):
            rate, made_now = throughput(1, n_proc, "bench-1p")
            one, made1 = max(one, rate), made1 + made_now
            rate, made_now = throughput(2, n_proc, "bench-2p")
            two, made2 = max(two, rate), made2 + made_now

        ns_prom = bench_prometheus(n_slow, repeats, checks)
        rows.append(("prometheus_client multiprocess inc()", ns_prom))
        ns_sem = bench_semaphore(n_slow, repeats, checks)
        rows.append(("SysV semaphore + shm read-modify-write", ns_sem))
        client, where = connect_redis(args.redis)
        ns_redis = None
        if client is not None:
            ns_redis = bench_redis(client, n_redis, min(repeats, 3), checks)
            rows.append((f"redis-py INCR ({where})", ns_redis))

        last_minute = int(time.time() // 60)
        counter = trafficthreshold._counter._ensure()
        for account, expected in ((ACCOUNT, made), ("bench-1p", made1), ("bench-2p", made2)):
            checks.add(f"hit() account {account!r}", expected,
                       segment_total(counter, account, first_minute, last_minute))
        checks.add("hit() account 'all' = sum of accounts", made + made1 + made2,
                   segment_total(counter, None, first_minute, last_minute))
        dropped = segment.header(counter)["dropped_hits"]
        checks.add("hit() dropped_hits", 0, dropped)
    finally:
        trafficthreshold._counter._reset()
        segment.uninstall(key, args.backend, force=True)
        shutil.rmtree(_PROM_DIR, ignore_errors=True)

    print(f"trafficthreshold hit() benchmark ({args.backend} segment, "
          f"{'quick' if args.quick else 'full'} run, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]})")
    if load_before > 0.5:
        print(f"  note: load average {load_before:.2f} before the run: other processes "
              "used the CPUs, so the figures (the 2-process one most) are low")
    print()
    print(f"  {'operation':<48} {'ns/op':>9} {'ops/s':>12} {'x hit()':>8}")
    for name, ns in rows:
        print(f"  {name:<48} {ns:9.0f} {1e9 / ns:12,.0f} {ns / ns_hit:8.2f}")
    print(f"  {'hit() throughput, 1 process':<48} {1e9 / one:9.0f} {one:12,.0f}")
    print(f"  {'hit() throughput, 2 processes':<48} {1e9 / two:9.0f} {two:12,.0f}")
    if client is None:
        print(f"\n  redis skipped: {where}")

    targets = [
        ("hit() within 3x of the empty call", ns_hit / ns_empty, "<=", 3.0),
        ("hit() >= 10x faster than prometheus multiprocess", ns_prom / ns_hit, ">=", 10.0),
        ("hit() >= 20x faster than the semaphore counter", ns_sem / ns_hit, ">=", 20.0),
        ("2 processes >= 1.6x the throughput of 1", two / one, ">=", 1.6),
    ]
    print("\ntargets")
    targets_ok = True
    for what, ratio, op, bound in targets:
        ok = ratio <= bound if op == "<=" else ratio >= bound
        targets_ok &= ok
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {ratio:.2f}x")
    print("\ncounts")
    for what, expected, got in checks.rows:
        print(f"  {'PASS' if expected == got else 'FAIL'}  {what}: expected {expected:,}, "
              f"got {got:,}")
    if not checks.ok:
        return 1
    return 0 if targets_ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
