"""The ZMQ subscriber against Bootic's own method, side by side in one run.

Run by hand::

    python benchmarks/bench_subscribe.py          # the figures in docs/subscribe.rst
    python benchmarks/bench_subscribe.py --quick  # CI smoke mode, a few seconds

The same Bootic-format frames (``topic {json}``: page views with and
without ``unq``, orders with four statuses, over 50 accounts) are counted:

1. **subscribe, end to end**: a real ``trafficthreshold subscribe`` process
   (pinned to one core when the machine has two) connected to a PUB socket
   of this process (pinned to another), events/s from the first frame sent
   to the last one counted in the segment.
2. **subscribe, in process**: ``EventCounter.frames`` over the frames in a
   list (the parsing and the counting, no socket): where the time goes.
3. **Bootic's method** in Python, on the same parsed events: per event the
   year, month and day HINCRBYs of ``track:{account}:{event}:...`` for the
   account and ``all`` (the same again for ``unique``; an order's two
   ``funnels:`` HINCRBYs for each), into a real redis-server started here
   on a free port: one command at a time, and pipelined (1,000 events a
   round trip).

Every count is checked: the segment holds exactly what was sent.
Goal (issue 26): at least 200,000 events/s end to end, 10x Bootic's
method.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402
import zmq  # noqa: E402

import trafficthreshold  # noqa: E402
from trafficthreshold import segment  # noqa: E402
from trafficthreshold.subscribe import EventCounter  # noqa: E402
from bench_redis import start_redis  # noqa: E402  (benchmarks/ is sys.path[0])

ACCOUNTS = [f"shop-{i:02d}" for i in range(50)]
STATUSES = ["pending", "paid", "shipped", "refunded"]


def frames(n: int) -> tuple[list[bytes], int]:
    """n frames as Bootic's bus carries them, and the hits they make
    (a page view counts its account and all; so does unique and an order)."""
    out, hits = [], 0
    for i in range(n):
        account = ACCOUNTS[i * 7 % len(ACCOUNTS)]
        url = f"http://{account}.bootic.net/products/{i % 997}"
        if i % 5 == 4:
            event = {"type": "order", "time": "2026-12-07T16:00:00Z",
                     "data": {"account": account, "status": STATUSES[i % 4], "url": url}}
            topic, hits = b"order", hits + 1
        else:
            data = {"account": account, "url": url, "ua": "Mozilla/5.0 (X11; Linux x86_64)"}
            if i % 3 == 0:
                data["unq"] = "1"
                hits += 1
            event = {"type": "pageview", "time": "2026-12-07T16:00:00Z", "data": data}
            topic, hits = b"pageview", hits + 1
        out.append(topic + b" " + json.dumps(event, separators=(",", ":")).encode())
    return out, hits


def segment_hits(counter: trafficthreshold.Counter) -> int:
    """Hits of every `all` key in the ring (what was counted, once per hit)."""
    now = int(time.time() // 60)
    alls = {slot for slot, account, _e in counter.keys() if account == "all"}
    return sum(n for slot, _m, n in counter.minutes(now - 5, now) if slot in alls)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(pid: int, cpu: int) -> str:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "not pinned (one CPU)"
    os.sched_setaffinity(pid, {cpus[cpu % len(cpus)]})
    return f"pinned to CPU {cpus[cpu % len(cpus)]}"


def end_to_end(key: int, sent: list[bytes], hits: int, tmp: str) -> tuple[float, str]:
    """Events/s through a real `trafficthreshold subscribe` process."""
    port = free_port()
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)  # never drop: the benchmark counts every event
    pub.bind(f"tcp://127.0.0.1:{port}")
    env = {**os.environ, "TRAFFICTHRESHOLD_KEY": str(key)}
    env.pop("TRAFFICTHRESHOLD_CONFIG", None)
    config = Path(tmp) / "config.toml"
    config.write_text(f'database = "{tmp}/stats.sqlite3"\n')
    proc = subprocess.Popen([sys.executable, "-m", "trafficthreshold.cli", "--config",
                             str(config), "subscribe", f"tcp://127.0.0.1:{port}", "--hwm", "0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    where = pin(proc.pid, 1)
    pin(os.getpid(), 0)
    counter = segment.attach(key, "sysv")
    try:
        # The slow joiner: probe until the subscriber counts one.
        probe = b'pageview {"type":"pageview","data":{"account":"probe"}}'
        deadline = time.monotonic() + 30
        while segment_hits(counter) == 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("bench_subscribe: the subscriber did not start: "
                         + proc.stderr.read().decode(errors="replace"))
            pub.send(probe)
            time.sleep(0.02)
        time.sleep(0.2)  # the probes still in flight
        before = segment_hits(counter)
        started = time.perf_counter()
        send = pub.send
        for frame in sent:
            send(frame)
        while segment_hits(counter) < before + hits:
            if time.perf_counter() - started > 120:
                sys.exit(f"bench_subscribe: {segment_hits(counter) - before} of {hits} "
                         "hits counted after 120 s")
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
        time.sleep(0.1)
        got = segment_hits(counter) - before
        if got != hits:
            sys.exit(f"bench_subscribe: {got} hits counted, {hits} sent")
        return len(sent) / elapsed, where
    finally:
        counter.detach()
        proc.terminate()
        proc.wait(10)
        pub.close(linger=0)
        context.term()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def in_process(key: int, sent: list[bytes], hits: int) -> float:
    trafficthreshold.configure(key=key, backend="sysv")
    counter = segment.attach(key, "sysv")
    try:
        before = segment_hits(counter)
        tally = EventCounter()
        started = time.perf_counter()
        tally.frames(sent)
        elapsed = time.perf_counter() - started
        if segment_hits(counter) - before != hits or tally.counted != len(sent):
            sys.exit("bench_subscribe: the in-process count is wrong")
        return len(sent) / elapsed
    finally:
        counter.detach()


def bootic(client: redis.Redis, sent: list[bytes], pipelined: bool) -> float:
    """Bootic's tracker.go in Python: parse as its bootic_zmq did, then the
    HINCRBYs of TrackTime / TrackFunnel for the account and `all`."""
    client.flushall()
    pipe = client.pipeline(transaction=False) if pipelined else client
    started = time.perf_counter()
    for i, frame in enumerate(sent):
        event = json.loads(frame.split(b" ", 1)[1])
        data = event["data"]
        now = time.gmtime()
        y, m, d, h = str(now.tm_year), str(now.tm_mon), str(now.tm_mday), str(now.tm_hour)
        for key in (data["account"], "all"):
            if event["type"] == "order":
                pipe.hincrby(f"funnels:{key}:order:{y}", data["status"], 1)
                pipe.hincrby(f"funnels:{key}:order:{y}:{m}", data["status"], 1)
                continue
            names = ("pageview", "unique") if data.get("unq") == "1" else ("pageview",)
            for name in names:
                pipe.hincrby(f"track:{key}:{name}:{y}", m, 1)
                pipe.hincrby(f"track:{key}:{name}:{y}:{m}", d, 1)
                pipe.hincrby(f"track:{key}:{name}:{y}:{m}:{d}", h, 1)
        if pipelined and i % 1000 == 999:
            pipe.execute()
    if pipelined:
        pipe.execute()
    elapsed = time.perf_counter() - started
    now = time.gmtime()
    y, m = str(now.tm_year), str(now.tm_mon)
    total = int(client.hget(f"track:all:pageview:{y}", m) or 0)
    orders = sum(int(v) for v in client.hgetall(f"funnels:all:order:{y}").values())
    if total + orders != len(sent):
        sys.exit(f"bench_subscribe: Bootic's method counted {total + orders} of {len(sent)}")
    return len(sent) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke mode: a few seconds")
    args = parser.parse_args()
    n, slow_n = (20_000, 2_000) if args.quick else (300_000, 20_000)
    sent, hits = frames(n)
    key = segment.unused_key()
    segment.install(key, "sysv")
    tmp = tempfile.mkdtemp(prefix="bench_subscribe.")
    redis_proc = None
    try:
        e2e, where = end_to_end(key, sent, hits, tmp)
        local = in_process(key, sent, hits)
        redis_proc, port = start_redis(tmp)  # append-only, fsync every second
        client = redis.Redis(port=port)
        one = bootic(client, sent[:slow_n], pipelined=False)
        piped = bootic(client, sent, pipelined=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        segment.uninstall(key, "sysv", force=True)
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(map(len, sent)) / len(sent)
    print(f"{n:,} Bootic-format frames ({size:.0f} bytes on average), {hits:,} hits; "
          f"{os.cpu_count()} CPUs")
    print(f"  subscribe, ZMQ end to end ({where}) {e2e:>12,.0f} events/s")
    print(f"  subscribe, in process (no socket)      {local:>12,.0f} events/s")
    print(f"  Bootic's method, one HINCRBY at a time {one:>12,.0f} events/s "
          f"({slow_n:,} events)")
    print(f"  Bootic's method, pipelined (1,000/trip) {piped:>11,.0f} events/s")
    print(f"  end to end / Bootic pipelined: {e2e / piped:.1f}x; "
          f"/ one at a time: {e2e / one:.1f}x")


if __name__ == "__main__":
    main()
