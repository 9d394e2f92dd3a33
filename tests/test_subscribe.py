"""``trafficthreshold subscribe``: Bootic's event bus counted into the segment.

The real thing: real pyzmq PUB sockets on loopback TCP ports (two at once),
a real ``trafficthreshold subscribe`` process (SIGKILLed and restarted), a
real segment per test, the roll into a real SQLite file and the counts read
back through the stats API served over HTTP.  The slow joiner is waited
out with probes: a PUB socket drops what it publishes before the SUB's
subscription reached it, so each test publishes a probe event until the
segment has counted one, and only then the events it checks.
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter as Tally
from pathlib import Path
from typing import Any

import pytest

zmq = pytest.importorskip("zmq")

import trafficthreshold  # noqa: E402
from apps.harness import fetch, fetch_json  # noqa: E402
from trafficthreshold import api, segment, subscribe  # noqa: E402
from trafficthreshold.config import load as load_config  # noqa: E402
from trafficthreshold.rollup import Roller  # noqa: E402
from trafficthreshold.store import SQLiteStore  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ACCOUNTS = ["acme", "shop", "b\u00e4ckerei", "a-b", "x.y"]
STATUSES = ["pending", "paid", "shipped", "refunded"]
#: Malformed input, each with the reason it is rejected under; ``None`` as
#: the line: a frame-level fault that has no line form.
MALFORMED: list[tuple[bytes, bytes | None, str]] = [
    (b'pageview{"type":"pageview"}', None, "frame"),
    (b"pageview {not json", b"{not json", "json"),
    (b'pageview {"type":"pageview","data":{"account":"\xff"}}',
     b'{"type":"pageview","data":{"account":"\xff"}}', "json"),
    (b"pageview [1, 2]", b"[1, 2]", "not-object"),
    (b'pageview {"type":"pageview","data":"acme"}', b'{"type":"pageview","data":"acme"}',
     "not-object"),
    (b'pageview {"type":"pageview","data":{}}', b'{"type":"pageview","data":{}}', "account"),
    (b'pageview {"type":"pageview","data":{"account":7}}',
     b'{"type":"pageview","data":{"account":7}}', "account"),
    (b'order {"type":"order","data":{"account":"acme"}}',
     b'{"type":"order","data":{"account":"acme"}}', "status"),
    (b'pageview {"type":"pageview","data":{"account":"a/b"}}',
     b'{"type":"pageview","data":{"account":"a/b"}}', "name"),
    (b'pageview {"type":"pageview","data":{"account":"all"}}',
     b'{"type":"pageview","data":{"account":"all"}}', "name"),
    (b'order {"type":"order","data":{"account":"acme","status":"a/b"}}',
     b'{"type":"order","data":{"account":"acme","status":"a/b"}}', "name"),
    (b'signup {"type":"signup","data":{"account":"acme"}}',
     b'{"type":"signup","data":{"account":"acme"}}', "type"),
    (b'x {"data":{"account":"acme"}}', b'{"data":{"account":"acme"}}', "type"),
]


# ------------------------------------------------------------------ helpers


def bootic_events(n: int, seed: int) -> tuple[list[bytes], list[bytes], Tally, Tally]:
    """n frames in Bootic's format, their lines (JSON without a topic), the
    counts they make, by (account, event) with ``all`` and funnel keys
    ``order/<status>``, and the rejections by reason (1 % malformed)."""
    rnd = random.Random(seed)
    frames, lines, counts, rejected = [], [], Tally(), Tally()
    for i in range(n):
        if i % 100 == 37:
            frame, line, reason = MALFORMED[(i // 100) % len(MALFORMED)]
            frames.append(frame)
            rejected[reason] += 1
            if line is not None:
                lines.append(line)
            continue
        account = rnd.choice(ACCOUNTS)
        if rnd.random() < 0.2:
            status = rnd.choice(STATUSES)
            event = {"type": "order", "data": {"account": account, "status": status}}
            keys = [f"order/{status}"]
            topic = "order"
        else:
            data: dict[str, Any] = {"account": account, "url": f"/p/{i}"}
            keys = ["pageview"]
            unq = rnd.choice(["1", "0", 1, None])
            if unq is not None:
                data["unq"] = unq
            if unq == "1":  # the string "1" only, as Bootic's tracker
                keys.append("unique")
            event = {"type": "pageview", "time": "2013-09-05T10:00:00Z", "data": data}
            topic = "pageview"
        compact = rnd.random() < 0.5
        payload = json.dumps(event, ensure_ascii=rnd.random() < 0.5,
                             separators=(",", ":") if compact else None).encode()
        # Bootic's regular expression takes any whitespace after the topic;
        # a tab alone only before JSON without spaces (see
        # test_frames_split_as_bootics_regular_expression).
        frames.append(topic.encode() + rnd.choice([b" ", b"  ", b" \t"] + [b"\t"] * compact)
                      + payload)
        lines.append(payload)
        for key in keys:
            counts[account, key] += 1
            counts["all", key] += 1
    return frames, lines, counts, rejected


def ring_count(counter: Any, account: str | None, event: str) -> int:
    """What the segment ring holds for (account, event), over every minute."""
    slot = counter.find(None if account == "all" else account, event)
    if slot is None:
        return 0
    now = int(time.time() // 60)
    return sum(n for s, _m, n in counter.minutes(now - 30, now + 1) if s == slot)


def wait_for(what: str, check: Any, timeout: float = 30.0, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the subscriber exited ({proc.returncode}) while waiting "
                                 f"for {what}:\n{proc.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}"
                                 + (f":\n{proc.log()}" if proc is not None else ""))
        time.sleep(0.01)


class Publisher:
    """A real PUB socket bound to a free loopback port; never drops (SNDHWM
    0: the tests count every event; docs/subscribe.rst says what a bounded
    one loses)."""

    def __init__(self, context: Any) -> None:
        self.sock = context.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    def probe(self, counter: Any, account: str, proc: Any, timeout: float = 30.0) -> int:
        """The slow joiner: publish a page view of ``account`` until the
        segment counted one; returns how many were sent."""
        sent = 0
        deadline = time.monotonic() + timeout
        while ring_count(counter, account, "pageview") == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the subscriber never counted a probe:\n{proc.log()}")
            self.sock.send(b'pageview {"type":"pageview","data":{"account":"%s"}}'
                           % account.encode())
            sent += 1
            time.sleep(0.01)
        return sent

    def close(self) -> None:
        self.sock.close(linger=0)


class SubscriberProcess:
    """``trafficthreshold subscribe`` as a real process, its log in a file."""

    def __init__(self, config: Path, *args: str, stdin: Any = subprocess.DEVNULL) -> None:
        self.log_path = config.parent / f"subscriber-{time.monotonic_ns()}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAFFICTHRESHOLD_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trafficthreshold.cli", "--config", str(config),
                 "subscribe", *args], env=env, stdin=stdin, stdout=log_file,
                stderr=subprocess.STDOUT, start_new_session=True)

    def poll(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def kill_all(procs: list[SubscriberProcess]) -> None:
    """SIGKILL every subscriber process still running, and reap it."""
    for proc in procs:
        if proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)


@pytest.fixture
def bus(key: int, tmp_path: Path) -> Any:
    """An installed SysV segment, a config pointing at it (database in
    tmp_path, UTC), a zmq context, a Counter attached to the segment; every
    subscriber process and publisher started through it is stopped after."""
    segment.install(key, "sysv")
    config = tmp_path / "config.toml"
    config.write_text(f'key = {key}\ndatabase = "{tmp_path}/stats.sqlite3"\n'
                      'timezone = "UTC"\n[http]\nenabled = false\n')
    context = zmq.Context()
    counter = segment.attach(key, "sysv")

    class Bus:
        pass

    b = Bus()
    b.config, b.key, b.counter, b.tmp = config, key, counter, tmp_path
    b.procs, b.pubs = [], []

    def publisher() -> Publisher:
        pub = Publisher(context)
        b.pubs.append(pub)
        return pub

    def subscriber(*args: str, **kw: Any) -> SubscriberProcess:
        proc = SubscriberProcess(config, *args, **kw)
        b.procs.append(proc)
        return proc

    b.publisher, b.subscriber = publisher, subscriber
    yield b
    kill_all(b.procs)
    for pub in b.pubs:
        pub.close()
    context.term()
    counter.detach()


def stats_file(tmp_path: Path, name: str) -> dict[str, Any]:
    return json.loads((tmp_path / "subscribers" / f"{name}.json").read_text())


def read_back(config: Path, counter: Any, serve: Any, counts: Tally) -> None:
    """Roll the ring into the SQLite store and read every expected count
    back through the stats API: page views, uniques, funnels."""
    cfg = load_config(str(config), env={})
    with SQLiteStore(cfg.database, cfg.timezone) as store:
        Roller(counter, store).roll(time.time(), include_current=True)
    server = serve(api.make_app(cfg))
    years = sorted({time.gmtime().tm_year, time.gmtime(time.time() - 120).tm_year})
    funnels: dict[str, Tally] = {}
    for (account, key), n in counts.items():
        if key.startswith("order/"):
            funnels.setdefault(account, Tally())[key.split("/", 1)[1]] += n
            continue
        got = 0
        for year in years:
            status, body = fetch_json(f"{server.url}api/stats/track/"
                                      f"{urlquote(account)}/{key}/{year}")
            assert status == 200, body
            got += body["total"]
        assert got == n, (account, key)
    for account, by_status in funnels.items():
        got = Tally()
        for year in years:
            status, body = fetch_json(f"{server.url}api/stats/funnels/"
                                      f"{urlquote(account)}/order/{year}")
            assert status == 200, body
            got.update(body["data"])
        assert got == by_status, account


def urlquote(name: str) -> str:
    import urllib.parse
    return urllib.parse.quote(name, safe="")


# ------------------------------------------------------------------ the bus


def test_two_publishers_100k_bootic_events_exact_counts_through_the_api(bus, serve):
    """100,000 events from two PUB sockets at once (1 % malformed): every
    page view, unique and funnel count exact per account and for all, read
    back through the stats API after a roll; each rejection under its
    reason in the stats file."""
    pubs = [bus.publisher(), bus.publisher()]
    proc = bus.subscriber(*(p.address for p in pubs), "--name", "bus")
    probes = [pub.probe(bus.counter, f"probe{i}", proc) for i, pub in enumerate(pubs)]
    batches = [bootic_events(50_000, seed) for seed in (1, 2)]

    def publish(pub: Publisher, frames: list[bytes], end: str) -> None:
        for frame in frames:
            pub.sock.send(frame)
        pub.sock.send(b'pageview {"type":"pageview","data":{"account":"%s"}}' % end.encode())

    # Each PUB socket is used by its own thread only (ZMQ sockets are not
    # thread-safe); both publish at once.
    threads = [threading.Thread(target=publish, args=(pub, frames, f"end{i}"))
               for i, (pub, (frames, _l, _c, _r)) in enumerate(zip(pubs, batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # One connection delivers in order: the end marker counted means every
    # event its publisher sent before it was handled.
    wait_for("both end markers", lambda: ring_count(bus.counter, "end0", "pageview")
             and ring_count(bus.counter, "end1", "pageview"), proc=proc)
    counts = batches[0][2] + batches[1][2]
    rejected = batches[0][3] + batches[1][3]
    extra = {f"probe{i}": ring_count(bus.counter, f"probe{i}", "pageview") for i in (0, 1)}
    assert all(1 <= extra[f"probe{i}"] <= probes[i] for i in (0, 1))
    extra.update(end0=1, end1=1)
    for account, n in extra.items():
        counts[account, "pageview"] += n
        counts["all", "pageview"] += n
    for (account, key), n in counts.items():
        assert ring_count(bus.counter, account, key) == n, (account, key)
    assert proc.stop() == 0
    info = stats_file(bus.tmp, "bus")
    assert info["stopped"] and info["connected"] == 2 and info["disconnects"] == 0
    assert {r: n for r, n in info["rejected"].items() if n} == dict(rejected)
    sent = 100_000 + sum(extra.values())
    assert info["received"] == sent
    assert info["counted"] == sent - sum(rejected.values())
    read_back(bus.config, bus.counter, serve, counts)


def test_sigkill_mid_stream_and_restart_counts_nothing_twice(bus):
    """The subscriber SIGKILLed while events flow, then started again: what
    was counted stays counted once; what was in flight when it died, or
    published while no subscriber was connected, is lost (PUB/SUB by
    design), never counted twice."""
    pub = bus.publisher()
    first = bus.subscriber(pub.address, "--name", "k")
    pub.probe(bus.counter, "probe", first)
    frame = b'pageview {"type":"pageview","data":{"account":"acme","unq":"1"}}'
    for _ in range(5000):
        pub.sock.send(frame)
    pub.sock.send(b'pageview {"type":"pageview","data":{"account":"end-a"}}')
    wait_for("phase A", lambda: ring_count(bus.counter, "end-a", "pageview"), proc=first)
    stop = threading.Event()
    streamed = [0]

    def stream() -> None:
        mid = b'order {"type":"order","data":{"account":"mid","status":"paid"}}'
        while not stop.is_set():
            pub.sock.send(mid)
            streamed[0] += 1
            if streamed[0] % 100 == 0:
                time.sleep(0.001)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        wait_for("the stream", lambda: ring_count(bus.counter, "mid", "order/paid") > 500,
                 proc=first)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        # The name's lock died with it: the same name starts again at once.
        second = bus.subscriber(pub.address, "--name", "k")
        wait_for("the stream again",
                 lambda: ring_count(bus.counter, "mid", "order/paid") > 0
                 and stats_file(bus.tmp, "k")["pid"] == second.proc.pid
                 and stats_file(bus.tmp, "k")["counted"] > 100, proc=second)
    finally:
        stop.set()
        thread.join(30)
    pub.sock.send(b'pageview {"type":"pageview","data":{"account":"end-c"}}')
    for _ in range(5000):
        pub.sock.send(frame)
    pub.sock.send(b'pageview {"type":"pageview","data":{"account":"end-d"}}')
    wait_for("phase C", lambda: ring_count(bus.counter, "end-d", "pageview"), proc=second)
    assert ring_count(bus.counter, "acme", "pageview") == 10_000
    assert ring_count(bus.counter, "acme", "unique") == 10_000
    assert ring_count(bus.counter, "all", "unique") == 10_000
    mid = ring_count(bus.counter, "mid", "order/paid")
    assert 500 < mid <= streamed[0]
    assert ring_count(bus.counter, None, "order/paid") == mid
    assert second.stop() == 0
    info = stats_file(bus.tmp, "k")
    # The second process counted its share of "mid", then phase C (5,000
    # and two markers); the first one's share is the rest, over 500.
    assert info["pid"] == second.proc.pid and info["counted"] == info["received"]
    second_share = info["counted"] - 5002
    assert second_share > 100 and mid - second_share > 500


def test_subscribe_dash_counts_the_same_from_a_file(bus, serve):
    """``subscribe -`` reads the same events as JSON lines (no topic) and
    gives the same counts; it exits 0 at the end of the file."""
    frames, lines, counts, rejected = bootic_events(50_000, 1)
    del rejected["frame"]
    path = bus.tmp / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n" + b"x" * 70_000 + b"\n")
    rejected["size"] += 1
    with open(path, "rb") as stdin:
        proc = bus.subscriber("-", stdin=stdin)
        assert proc.proc.wait(60) == 0, proc.log()
    for (account, key), n in counts.items():
        assert ring_count(bus.counter, account, key) == n, (account, key)
    info = stats_file(bus.tmp, "stdin")
    assert info["stopped"] and info["connected"] is None
    assert {r: n for r, n in info["rejected"].items() if n} == dict(rejected)
    assert info["received"] == len(lines) + 1
    assert info["counted"] == len(lines) - sum(rejected.values()) + 1
    read_back(bus.config, bus.counter, serve, counts)


def test_an_oversized_frame_is_bounded_and_the_subscriber_connects_again(bus):
    """A frame over --max-size never reaches memory: libzmq drops the
    connection (a protocol error, after which it would not reconnect by
    itself); the subscriber connects again and counts the next events."""
    pub = bus.publisher()
    proc = bus.subscriber(pub.address, "--name", "big", "--max-size", "1000")
    pub.probe(bus.counter, "probe", proc)
    pub.sock.send(b"pageview " + b"x" * 5000)
    pub.probe(bus.counter, "after", proc)
    assert proc.stop() == 0
    info = stats_file(bus.tmp, "big")
    assert info["disconnects"] == 1 and info["connected"] == 1
    assert info["received"] == info["counted"]  # the big frame was never received
    assert "disconnected from tcp://127.0.0.1:" in proc.log()


def test_a_second_subscriber_of_the_same_name_is_refused(bus):
    pub = bus.publisher()
    leftover = bus.tmp / "subscribers" / "one.json.12345.tmp"  # a SIGKILL mid-write
    leftover.parent.mkdir()
    leftover.write_text("{")
    first = bus.subscriber(pub.address, "--name", "one")
    pub.probe(bus.counter, "probe", first)
    assert not leftover.exists()
    second = bus.subscriber(pub.address, "--name", "one")
    assert second.proc.wait(30) == 1
    assert "another subscriber named 'one' is running" in second.log()
    assert first.poll() is None


# ------------------------------------------------------- the rules in process


@pytest.fixture
def recorded() -> tuple[subscribe.EventCounter, list[tuple[Any, ...]]]:
    """An EventCounter whose hits are recorded, checked as hit() checks."""
    calls: list[tuple[Any, ...]] = []

    def hit(account: str, event: str, *, status: str | None = None) -> None:
        from trafficthreshold import names
        names.validate(account, names.funnel_event(event, status) if status else event)
        calls.append((account, event, status))

    return subscribe.EventCounter(["click"], hit=hit), calls


@pytest.mark.parametrize("frame, payload", [
    (b'pageview {"a":1}', b'{"a":1}'),
    (b' {"a":1}', b'{"a":1}'),                       # no topic: leading whitespace
    (b'pageview \t {"a": 1}', b'{"a": 1}'),
    (b'pageview\t{"a":1}', b'{"a":1}'),               # a tab, JSON without spaces
    (b'pageview\t{"a": 1}', b'1}'),                   # Bootic's [^ ]+ runs to the space
    (b'pageview {"a":1}\n{"b":2}', b'{"a":1}'),       # Go's . stops at a line feed
    (b'{"a":1}', None),                               # no whitespace: no match
    (b'pageview ', None),
    (b'', None),
])
def test_frames_split_as_bootics_regular_expression(frame, payload):
    """bootic_zmq's ``^(?:[^ ]+)?\\s+(.+)`` with Go's ``\\s`` and ``.``;
    the fast path agrees with it."""
    found = subscribe.FRAME.match(frame)
    assert (found.group(1) if found else None) == payload
    seen: list[bytes] = []
    tally = subscribe.EventCounter()
    tally.payloads = seen.extend  # what the frame split hands on
    tally.frames([frame])
    assert seen == ([payload] if payload is not None else [])
    assert tally.rejected["frame"] == (payload is None)


def test_bootics_rules_and_every_rejection(recorded, caplog):
    tally, calls = recorded
    good = [b'{"type":"pageview","data":{"account":"acme","unq":"1"}}',
            b'{"type":"pageview","data":{"account":"acme","unq":1}}',
            b'{"type":"pageview","data":{"account":"acme","unq":"0"}}',
            b'{"type":"order","data":{"account":"acme","status":"paid"}}',
            b'{"type":"click","data":{"account":"acme","unq":"1"}}']
    tally.payloads(good + [line for _f, line, _r in MALFORMED if line is not None])
    assert calls == [("acme", "pageview", None), ("acme", "unique", None),
                     ("acme", "pageview", None), ("acme", "pageview", None),
                     ("acme", "order", "paid"), ("acme", "click", None)]
    expected = Tally(reason for _f, line, reason in MALFORMED if line is not None)
    assert {r: n for r, n in tally.rejected.items() if n} == expected
    assert tally.counted == 5 and tally.received == 5 + sum(expected.values())
    with pytest.raises(ValueError, match="counted already"):
        subscribe.EventCounter(["order"])
    with pytest.raises(ValueError, match="contains '/'"):
        subscribe.EventCounter(["a/b"])


def test_each_reason_is_logged_once_a_minute(caplog):
    caplog.set_level(logging.WARNING, logger="trafficthreshold.subscribe")
    clock = [1000.0]
    tally = subscribe.EventCounter(hit=lambda *a, **k: None, clock=lambda: clock[0])
    for _ in range(5):
        tally.payloads([b"nope", b"[1]"])
    assert [r.getMessage().split(" (")[1].split(":")[0] for r in caplog.records] == [
        "json", "not-object"]
    caplog.clear()
    clock[0] += 59
    tally.payloads([b"nope"])
    assert not caplog.records
    clock[0] += 1
    tally.payloads([b"nope", b"nope"])
    assert len(caplog.records) == 1
    assert "5 more not logged since the last report" in caplog.records[0].getMessage()
    assert tally.rejected["json"] == 8 and tally.rejected["not-object"] == 5


def test_no_segment_fails_open_with_one_warning(key, caplog):
    """hit()'s own fail-open: nothing counted, one warning, and the events
    are tallied as received but not counted (``uncounted``)."""
    caplog.set_level(logging.WARNING, logger="trafficthreshold")
    trafficthreshold.configure(key=key, backend="sysv", strict=False)
    try:
        tally = subscribe.EventCounter()
        line = b'{"type":"pageview","data":{"account":"acme"}}'
        tally.payloads([line] * 3)
        tally.payloads([line, b'{"type":"pageview","data":{"account":"a/b"}}'])
        assert (tally.received, tally.counted, tally.uncounted) == (5, 0, 4)
        assert tally.rejected["name"] == 1  # bad names are still refused
        warnings = [r for r in caplog.records if "not counting" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        trafficthreshold._settings.clear()
        trafficthreshold.configure()


# ------------------------------------------------------------ the stats files


def test_stats_files_say_running_stopped_or_not_running(tmp_path):
    db = str(tmp_path / "stats.sqlite3")
    directory = Path(subscribe.stats_dir(db))
    directory.mkdir()
    now = 2_000_000_000.0
    for name, age, stopped in (("live", 1, False), ("done", 50, True), ("dead", 11, False),
                               ("old", subscribe.FORGET_S + 1, True)):
        (directory / f"{name}.json").write_text(json.dumps(
            {"name": name, "updated_at": now - age, "stopped": stopped}))
    (directory / "torn.json").write_text('{"name": "torn", "upd')
    for name, bad in (("list", []), ("counts", {"updated_at": now, "received": "many"}),
                      ("negative", {"updated_at": now, "rejected": {"json": -1}}),
                      ("no-time", {"received": 1})):
        (directory / f"{name}.json").write_text(json.dumps(bad))
    (directory / ".hidden.json").write_text(json.dumps({"updated_at": now}))
    (directory / "x.json.123.tmp").write_text("{}")
    found = {info["name"]: info["state"] for info in subscribe.read_all(db, now)}
    assert found == {"live": "running", "done": "stopped", "dead": "not running"}
    assert subscribe.read_all(str(tmp_path / "elsewhere" / "db"), now) == []


@pytest.mark.parametrize("addresses, name", [
    (["tcp://127.0.0.1:6000"], "tcp-127.0.0.1-6000"),
    (["-"], "stdin"),
    (["ipc:///run/bus.sock", "tcp://[::1]:6000"], "ipc-run-bus.sock-tcp-1-6000"),
    (["tcp://" + "a" * 80 + ":1"], "tcp-" + "a" * 60),
])
def test_default_names_can_name_a_file(addresses, name):
    assert subscribe.check_name(subscribe.default_name(addresses)) == name


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", ".", "a b", "x" * 65, "a\\b",
                                  "a:b"])
def test_names_that_cannot_name_a_file_are_refused(name):
    with pytest.raises(ValueError, match="--name"):
        subscribe.check_name(name)


# ------------------------------------------- status, /metrics and the dashboard


def test_status_metrics_and_dashboard_show_each_subscriber(bus, serve):
    """A running subscriber (from its stats file, refreshed every second)
    and a SIGKILLed one (its file goes stale: not running)."""
    from click.testing import CliRunner
    from prometheus_client.parser import text_string_to_metric_families

    from trafficthreshold.cli import main
    pub = bus.publisher()
    live = bus.subscriber(pub.address, "--name", "live")
    pub.probe(bus.counter, "probe", live)
    for frame in (b"pageview {nope", b'pageview {"type":"pageview","data":{"account":"a/b"}}',
                  b'pageview {"type":"pageview","data":{"account":"end"}}'):
        pub.sock.send(frame)
    wait_for("the end marker", lambda: ring_count(bus.counter, "end", "pageview"), proc=live)
    wait_for("the stats file", lambda: stats_file(bus.tmp, "live")["rejected"]["name"] == 1)
    dead = bus.tmp / "subscribers" / "dead.json"
    dead.write_text(json.dumps({"name": "dead", "addresses": ["tcp://10.0.0.9:6000"],
                                "updated_at": time.time() - subscribe.STALE_S - 5,
                                "received": 3, "counted": 3, "rejected": {}, "connected": 0,
                                "disconnects": 0, "last_heard": None, "stopped": False}))

    result = CliRunner().invoke(main, ["status", "--config", str(bus.config), "--json"])
    assert result.exit_code == 0, result.output
    subs = {s["name"]: s for s in json.loads(result.stdout)["subscribers"]}
    assert subs["live"]["state"] == "running" and subs["dead"]["state"] == "not running"
    assert subs["live"]["connected"] == 1 and subs["live"]["rejected"]["json"] == 1
    text = CliRunner().invoke(main, ["status", "--config", str(bus.config)]).stdout
    assert f"subscriber  live ({pub.address}): running" in text
    assert "subscriber  dead (tcp://10.0.0.9:6000): NOT RUNNING" in text
    assert "2 rejected (json 1, name 1)" in text

    cfg = load_config(str(bus.config), env={})
    with SQLiteStore(cfg.database, cfg.timezone) as store:  # the daemon's first start
        Roller(bus.counter, store).roll(time.time())
    server = serve(api.make_app(cfg))
    status, _headers, body = fetch(server.url + "metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode())
               for s in f.samples}
    live_label = (("subscriber", "live"),)
    assert samples["trafficthreshold_subscriber_up", live_label] == 1
    assert samples["trafficthreshold_subscriber_up", (("subscriber", "dead"),)] == 0
    assert samples["trafficthreshold_subscriber_events_rejected_total",
                   (("reason", "json"), ("subscriber", "live"))] == 1
    assert samples["trafficthreshold_subscriber_events_received_total", live_label] == \
        samples["trafficthreshold_subscriber_events_counted_total", live_label] + 2
    assert samples["trafficthreshold_subscriber_connections", live_label] == 1
    assert samples["trafficthreshold_subscriber_last_heard_timestamp_seconds",
                   live_label] > time.time() - 60

    status, _headers, body = fetch(server.url)
    html = body.decode()
    assert status == 200 and 'id="subscribers"' in html
    assert 'data-subscriber="live"' in html and 'data-subscriber="dead"' in html
    assert "not running" in html and "json 1" in html


def test_deeply_nested_json_is_rejected_not_a_crash(recorded):
    """Within --max-size, ``[[[[...`` 60,000 deep makes json.loads raise
    RecursionError, not ValueError: one such frame must not kill the
    subscriber (and with it, every event until systemd restarts it)."""
    tally, calls = recorded
    tally.frames([b"pageview " + b"[" * 60_000, b'x {"a":' * 30_000,
                  b'pageview {"type":"pageview","data":{"account":"acme"}}'])
    assert tally.rejected["json"] == 2 and tally.rejected["frame"] == 0
    assert calls == [("acme", "pageview", None)] and tally.received == 3


@pytest.mark.parametrize("account", ["\\ud800", "\\u0007bell", "~overflow", "x" * 65])
def test_names_hit_refuses_are_rejected_by_name(recorded, account):
    tally, calls = recorded
    tally.payloads([b'{"type":"pageview","data":{"account":"%s"}}' % account.encode()])
    assert tally.rejected["name"] == 1 and not calls


def test_the_fast_split_is_the_regular_expression():
    """The split without the regular expression gives what it gives, on
    every frame (a property test over the characters that matter)."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=800, deadline=None)
    @given(st.lists(st.sampled_from([b" ", b"\t", b"\n", b"\r", b"{", b"}", b"a", b"\x0b",
                                     b"\xc3\xa4"]), max_size=12).map(b"".join))
    def check(frame: bytes) -> None:
        seen: list[bytes] = []
        tally = subscribe.EventCounter()
        tally.payloads = seen.extend
        tally.frames([frame])
        found = subscribe.FRAME.match(frame)
        assert seen == ([found.group(1)] if found else [])

    check()


# ------------------------------------------------------------ the command line


def test_sighup_is_no_death_and_sigterm_a_clean_stop(bus):
    pub = bus.publisher()
    proc = bus.subscriber(pub.address, "--name", "hup")
    pub.probe(bus.counter, "probe", proc)
    proc.proc.send_signal(signal.SIGHUP)
    pub.probe(bus.counter, "after-hup", proc)
    assert proc.stop() == 0
    assert "SIGHUP: nothing to reload" in proc.log()
    assert stats_file(bus.tmp, "hup")["stopped"] is True


@pytest.mark.parametrize("args, words", [
    (["foo://bar"], "cannot connect a SUB socket to foo://bar"),
    (["-", "tcp://127.0.0.1:1"], "ADDRESS '-' (standard input) goes alone"),
    (["tcp://127.0.0.1:1", "--name", "../x"], "subscriber name '../x' is not valid"),
    (["tcp://127.0.0.1:1", "--type", "order"], "--type order: order events are counted"),
])
def test_errors_are_one_line_naming_the_fix(bus, args, words):
    proc = bus.subscriber(*args)
    assert proc.proc.wait(30) in (1, 2)
    assert words in proc.log() and "Traceback" not in proc.log()


def test_without_pyzmq_the_error_names_the_extra(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from trafficthreshold.cli import main
    monkeypatch.setitem(sys.modules, "zmq", None)  # import zmq raises ImportError
    config = tmp_path / "config.toml"
    config.write_text(f'database = "{tmp_path}/stats.sqlite3"\n')
    result = CliRunner().invoke(main, ["subscribe", "--config", str(config),
                                       "tcp://127.0.0.1:6000"])
    assert result.exit_code == 1
    assert "pip install 'trafficthreshold[zmq]'" in result.stderr


def test_counts_stay_in_the_ring_through_a_supervisor_restart(bus):
    """The real daemon (`trafficthreshold run`) SIGKILLed while the
    subscriber counts, then started again and stopped with SIGTERM (its
    final roll takes the open minute): the store holds every event counted,
    exactly once."""
    pub = bus.publisher()
    proc = bus.subscriber(pub.address, "--name", "ring")
    pub.probe(bus.counter, "probe", proc)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAFFICTHRESHOLD_",
                                                                     "NOTIFY_SOCKET"))}
    env["TRAFFICTHRESHOLD_CONFIG"] = str(bus.config)

    def daemon() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "trafficthreshold.cli", "run",
                                 "--no-http"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    def publish(n: int, end: str) -> None:
        for i in range(n):
            pub.sock.send(b'order {"type":"order","data":{"account":"acme","status":"%s"}}'
                          % STATUSES[i % 4].encode())
        pub.sock.send(b'pageview {"type":"pageview","data":{"account":"%s"}}' % end.encode())
        wait_for(end, lambda: ring_count(bus.counter, end, "pageview"), proc=proc)

    first = daemon()
    try:
        wait_for("the daemon's start", lambda: Path(bus.tmp, "stats.sqlite3").exists())
        publish(4000, "end-a")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        publish(4000, "end-b")  # nobody rolls meanwhile: the ring keeps them
        second = daemon()
        publish(4000, "end-c")
        time.sleep(1)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.stdout.read().decode()
    finally:
        for p in (first, locals().get("second")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    years = {time.gmtime().tm_year, time.gmtime(time.time() - 120).tm_year}
    with SQLiteStore(str(bus.tmp / "stats.sqlite3"), "UTC") as store:
        funnel = Tally()
        for year in years:
            funnel.update(store.funnel("acme", "order", year)["data"])
        assert funnel == {status: 3000 for status in STATUSES}
        assert sum(store.period("all", "pageview", y)["total"] for y in years) == \
            ring_count(bus.counter, "all", "pageview")


def test_a_multipart_message_counts_nothing(recorded):
    """docs/subscribe.rst: [topic, JSON] is two frames to Bootic's Recv."""
    tally, calls = recorded
    tally.frames([b"pageview", b'{"type": "pageview", "data": {"account": "acme"}}',
                  b"pageview", b'{"type":"pageview","data":{"account":"acme"}}'])
    assert not calls
    assert (tally.rejected["frame"], tally.rejected["json"]) == (3, 1)


# ------------------------------------- status without a segment, or unreadable


def _fresh_stats(directory: Path, name: str, **fields: Any) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps({
        "name": name, "addresses": ["tcp://10.0.0.9:6000"], "updated_at": time.time(),
        "received": 7, "counted": 0, "uncounted": 7, "rejected": {}, "connected": 1,
        "disconnects": 0, "last_heard": time.time(), "stopped": False, **fields}))


def test_status_without_a_segment_still_shows_the_subscribers(key, tmp_path):
    """No segment installed: `status` still lists each subscriber (the one
    case where its events go uncounted), then the one-line error."""
    from click.testing import CliRunner

    from trafficthreshold.cli import main
    config = tmp_path / "config.toml"
    config.write_text(f'key = {key}\ndatabase = "{tmp_path}/stats.sqlite3"\n')
    _fresh_stats(tmp_path / "subscribers", "shop")
    result = CliRunner().invoke(main, ["status", "--config", str(config)])
    assert result.exit_code == 1
    assert "subscriber  shop (tcp://10.0.0.9:6000): running" in result.stdout
    assert "7 not counted (no segment)" in result.stdout
    assert "trafficthreshold install" in result.stderr
    result = CliRunner().invoke(main, ["status", "--config", str(config), "--json"])
    assert result.exit_code == 1 and "trafficthreshold install" in result.stderr
    info = json.loads(result.stdout)
    assert [s["name"] for s in info["subscribers"]] == ["shop"]
    assert info["segment"] is None and "trafficthreshold install" in info["error"]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become nobody")
def test_status_says_when_it_cannot_read_the_subscribers(key, tmp_path):
    """A user who may not enter the state directory (0750, another group)
    is told so, with the fix, instead of seeing no subscribers at all; with
    or without a segment."""
    import shutil
    import tempfile

    from test_cli import _as_nobody
    base = Path(tempfile.mkdtemp(prefix="tt-sub-"))  # under /tmp, which nobody may enter
    try:
        base.chmod(0o755)
        state = base / "state"
        _fresh_stats(state / "subscribers", "shop")
        state.chmod(0o750)  # root:root: nobody may not enter it
        config = base / "config.toml"
        config.write_text(f'key = {key}\ndatabase = "{state}/stats.sqlite3"\n')
        config.chmod(0o644)
        # The config is read as utf-8-sig: its codec is loaded before the
        # child becomes nobody, who may not read this virtualenv.
        "".encode("utf-8-sig")
        outputs = []
        for installed in (False, True):
            if installed:
                segment.install(key, "sysv", mode=0o666)
            outputs.append(_as_nobody(["status", "--config", str(config)]))
        (code0, out0, _exc0), (code1, out1, _exc1) = outputs
        assert code0 == 1 and "trafficthreshold install" in out0
        assert code1 == 0 and "segment     sysv" in out1
        for out in (out0, out1):
            assert f"subscribers CANNOT READ {state}/subscribers (Permission denied)" in out
            assert "daemon's user" in out
    finally:
        shutil.rmtree(base)  # the key fixture removes the segment


# ------------------------------------------------ a hostile reviewer's cases


@pytest.fixture
def inproc(key: int, tmp_path: Path) -> Any:
    """A factory of in-process Subscribers of ``subscribe -`` (database in
    tmp_path, a segment key that is not installed); hit()'s settings are
    put back after."""
    made: list[subscribe.Subscriber] = []

    def make(name: str = "sub", addresses: tuple[str, ...] = ("-",)) -> subscribe.Subscriber:
        sub = subscribe.Subscriber(list(addresses), key=key, backend="sysv",
                                   database=str(tmp_path / "stats.sqlite3"), name=name,
                                   env={})
        made.append(sub)
        return sub

    yield make
    for sub in made:
        if sub._lock_fd is not None:
            os.close(sub._lock_fd)
    trafficthreshold._settings.clear()
    trafficthreshold.configure()


def test_a_stats_file_that_cannot_be_written_is_logged_once_a_minute(inproc, tmp_path,
                                                                     caplog):
    """A stats directory removed (or a full disk) under a running subscriber:
    one warning a minute, not one a second for ever; the directory is made
    again, and the next write works."""
    caplog.set_level(logging.WARNING, logger="trafficthreshold.subscribe")
    sub = inproc("gone")
    sub.initialize()
    directory = tmp_path / "subscribers"
    for entry in directory.iterdir():
        entry.unlink()
    directory.rmdir()
    directory.write_text("not a directory")  # makedirs cannot help: every write fails
    for _ in range(5):
        sub.housekeeping(force=True)
    cannot = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(cannot) == 1, [r.getMessage() for r in cannot]
    directory.unlink()  # removed: made again at the next write
    sub.housekeeping(force=True)
    assert stats_file(tmp_path, "gone")["name"] == "gone"
    assert not list(directory.glob("*.tmp"))


def test_starting_leaves_another_names_temporary_file_alone(inproc, tmp_path):
    """'.' is allowed in names: subscriber ``x`` must not take
    ``x.json.1.json.<pid>.tmp`` (subscriber ``x.json.1`` writing its stats)
    for a leftover of its own."""
    directory = tmp_path / "subscribers"
    directory.mkdir()
    others = directory / "x.json.1.json.4242.tmp"
    others.write_text("{}")
    mine = directory / "x.json.4242.tmp"
    mine.write_text("{")
    inproc("x").initialize()
    assert others.exists() and not mine.exists()


def test_staleness_does_not_follow_the_wall_clock(inproc, tmp_path):
    """A subscriber killed, then the clock set back an hour: its file's
    wall-clock time is in the future, but it is not running.  Running
    ones stay running when the clock jumps forward.  (A stats file of an
    earlier boot is not running either.)"""
    sub = inproc("clock")
    sub.initialize()
    info = stats_file(tmp_path, "clock")
    assert info["boot_id"] and info["monotonic"] <= time.monotonic()
    db = str(tmp_path / "stats.sqlite3")
    directory = tmp_path / "subscribers"
    now, mono = time.time(), time.monotonic()
    for name, wall, since, boot in (
            ("killed", now + 3600, 11, info["boot_id"]),    # clock set back after the kill
            ("jumped", now - 3600, 1, info["boot_id"]),     # clock set forward: running
            ("rebooted", now - 1, -100, "another-boot")):   # from before a reboot
        (directory / f"{name}.json").write_text(json.dumps(
            {"updated_at": wall, "monotonic": mono - since, "boot_id": boot}))
    states = {i["name"]: (i["state"], i["age"]) for i in subscribe.read_all(db, now)}
    assert states["killed"][0] == "not running" and states["killed"][1] >= 11
    assert states["jumped"] == ("running", pytest.approx(1, abs=1))
    assert states["rebooted"][0] == "not running"
    assert states["clock"][0] == "running"


def _every_reader_shows_good(bus: Any, serve: Any) -> str:
    """status (exit 0), /metrics and the dashboard (200) all show the
    subscriber ``good``; returns status's text."""
    from click.testing import CliRunner

    from trafficthreshold.cli import main
    result = CliRunner().invoke(main, ["status", "--config", str(bus.config)])
    assert result.exit_code == 0, result.output
    assert "subscriber  good" in result.stdout
    cfg = load_config(str(bus.config), env={})
    with SQLiteStore(cfg.database, cfg.timezone):
        pass
    server = serve(api.make_app(cfg))
    for path in ("metrics", ""):
        status, _headers, body = fetch(server.url + path)
        assert status == 200 and b"good" in body
    return result.stdout


def test_a_damaged_number_in_a_stats_file_breaks_no_reader(bus, serve):
    """Python's json reads Infinity and NaN: a stats file with them is
    skipped (and named by status), never a crash of status or /metrics."""
    from click.testing import CliRunner

    from trafficthreshold.cli import main
    directory = bus.tmp / "subscribers"
    _fresh_stats(directory, "good")
    for name, field in (("inf", "last_heard"), ("nan", "updated_at"), ("big", "started_at")):
        _fresh_stats(directory, name)
        path = directory / f"{name}.json"
        raw = json.loads(path.read_text())
        raw[field] = float("inf") if name != "nan" else float("nan")
        path.write_text(json.dumps(raw))
    out = _every_reader_shows_good(bus, serve)
    assert "subscriber  inf" not in out
    assert "inf.json is not a subscriber's stats file" in out


def test_a_fifo_in_the_stats_directory_does_not_hang_the_readers(tmp_path):
    """Junk in subscribers/: a FIFO named like a stats file would block
    open() for ever (status, every /metrics request); a file too big to be
    one is not read whole."""
    directory = tmp_path / "subscribers"
    _fresh_stats(directory, "good")
    os.mkfifo(directory / "fifo.json")
    (directory / "huge.json").write_bytes(b" " * (4 << 20) + b"{}")
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(
        subscribe.scan(str(tmp_path / "stats.sqlite3"), time.time())), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock it before failing
        os.close(os.open(directory / "fifo.json", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        pytest.fail("scan() blocked on a FIFO")
    found, problems = result[0]
    assert [i["name"] for i in found] == ["good"]
    assert any("fifo.json" in p for p in problems) and any("huge.json" in p for p in problems)



def test_a_publisher_that_restarts_is_followed_and_nothing_is_counted_twice(bus):
    """The publisher closed and bound again on the same port (a restart of
    the bus): the subscriber connects again (one connection, not two: a
    manual reconnect beside libzmq's own would deliver every event twice)
    and counts each event published after it once."""
    pub = bus.publisher()
    proc = bus.subscriber(pub.address, "--name", "restart")
    pub.probe(bus.counter, "probe", proc)
    frame = b'order {"type":"order","data":{"account":"acme","status":"paid"}}'

    def publish(p: Publisher, end: str) -> None:
        for _ in range(1000):
            p.sock.send(frame)
        p.sock.send(b'pageview {"type":"pageview","data":{"account":"%s"}}' % end.encode())
        wait_for(end, lambda: ring_count(bus.counter, end, "pageview"), proc=proc)

    publish(pub, "end-a")
    pub.close()
    bus.pubs.remove(pub)
    wait_for("the disconnect", lambda: stats_file(bus.tmp, "restart")["connected"] == 0,
             proc=proc)
    again = Publisher.__new__(Publisher)  # the same address, bound again
    again.address = pub.address
    deadline = time.monotonic() + 10
    while True:  # the port is free again once libzmq closed the old socket
        again.sock = zmq.Context.instance().socket(zmq.PUB)
        again.sock.setsockopt(zmq.SNDHWM, 0)
        again.sock.setsockopt(zmq.LINGER, 0)
        try:
            again.sock.bind(pub.address)
            break
        except zmq.ZMQError:
            again.sock.close(linger=0)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        again.probe(bus.counter, "probe-again", proc)
        publish(again, "end-b")
        wait_for("the stats", lambda: stats_file(bus.tmp, "restart")["connected"] == 1,
                 proc=proc)
        assert ring_count(bus.counter, "acme", "order/paid") == 2000
        assert proc.stop() == 0
        info = stats_file(bus.tmp, "restart")
        assert info["disconnects"] == 1 and info["counted"] == info["received"]
    finally:
        again.close()


def test_text_that_is_not_utf8_in_a_stats_file_breaks_no_reader(bus, serve):
    """JSON can spell a lone surrogate ("\\ud800"), which no UTF-8 page can
    hold: such a file (in a rejection reason, an address, a topic) is
    skipped, never a 500 of /metrics or the dashboard, nor a crash of status."""
    directory = bus.tmp / "subscribers"
    _fresh_stats(directory, "good")
    _fresh_stats(directory, "reason", rejected={"\ud800": 1})
    _fresh_stats(directory, "address", addresses=["tcp://\ud800:1"])
    _fresh_stats(directory, "topic", topics=["\udcff"])
    out = _every_reader_shows_good(bus, serve)
    for name in ("reason", "address", "topic"):
        assert f"{name}.json is not a subscriber's stats file" in out


def test_a_crash_is_not_shown_as_a_clean_stop(inproc, tmp_path, monkeypatch):
    """docs/subscribe.rst: ``stopped`` is a clean exit (SIGTERM, the end of
    the input).  A subscriber that dies of an error writes its last stats
    without it: the file goes stale, ``not running``."""
    read, write = os.pipe()
    os.write(write, b'{"type":"pageview","data":{"account":"acme"}}\n')
    os.close(write)
    sub = inproc("crash")
    sub.stdin = read
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # pytest's handlers stay

    def boom(payloads: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sub.counter, "payloads", boom)
    try:
        with pytest.raises(RuntimeError, match="a bug"):
            sub.run()
    finally:
        os.close(read)
    assert stats_file(tmp_path, "crash")["stopped"] is False
    clean = inproc("clean")
    read, write = os.pipe()
    os.close(write)
    clean.stdin = read
    try:
        assert clean.run() == 0
    finally:
        os.close(read)
    assert stats_file(tmp_path, "clean")["stopped"] is True


def test_a_peer_that_hangs_up_at_once_is_retried_at_zmqs_pace_not_in_a_spin(bus):
    """A port that accepts and closes every connection (a crash-looping
    publisher, a health-check port given by mistake): libzmq retries every
    100 ms by itself.  Connecting again by hand after every disconnect,
    without waiting, made thousands of connections a second at full CPU."""
    import socket as sockets
    server = sockets.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    accepted = [0]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted[0] += 1
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    proc = bus.subscriber(f"tcp://127.0.0.1:{server.getsockname()[1]}", "--name", "hangup")
    try:
        wait_for("a first connection", lambda: accepted[0] > 0, proc=proc)
        start, t0 = accepted[0], time.monotonic()
        time.sleep(1)
        rate = (accepted[0] - start) / (time.monotonic() - t0)
    finally:
        assert proc.stop() == 0
        server.close()
    # libzmq's pace is 10 a second; a load on the machine only slows it.
    assert rate < 30, f"{rate:.0f} connections a second"


def test_an_ipv6_publisher_is_connected(bus):
    """``tcp://[::1]:PORT``: libzmq connects to IPv6 only with ZMQ_IPV6 set on
    the socket; without it the address was taken and never connected (no
    error, "0 of 1 connected", nothing counted)."""
    pub = Publisher.__new__(Publisher)
    pub.sock = zmq.Context.instance().socket(zmq.PUB)
    pub.sock.setsockopt(zmq.IPV6, 1)
    pub.sock.setsockopt(zmq.SNDHWM, 0)
    pub.sock.setsockopt(zmq.LINGER, 0)
    try:
        pub.sock.bind("tcp://[::1]:*")
    except zmq.ZMQError as exc:
        pub.close()
        pytest.skip(f"no IPv6 loopback here ({exc})")
    pub.address = pub.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    ipv4 = bus.publisher()  # beside an IPv4 one, on the same socket
    try:
        proc = bus.subscriber(pub.address, ipv4.address, "--name", "six")
        pub.probe(bus.counter, "probe6", proc)
        ipv4.probe(bus.counter, "probe4", proc)
        assert proc.stop() == 0
        assert stats_file(bus.tmp, "six")["connected"] == 2
    finally:
        pub.close()


def test_subscribe_dash_needs_no_pyzmq(bus):
    """README: pyzmq is an extra; ``subscribe -`` reads standard input
    without it (a real process in which ``import zmq`` fails)."""
    path = bus.tmp / "events.jsonl"
    path.write_bytes(b'{"type":"pageview","data":{"account":"nozmq","unq":"1"}}\n' * 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAFFICTHRESHOLD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = ("import sys; sys.modules['zmq'] = None; from trafficthreshold.cli import main; "
            "main()")
    with open(path, "rb") as stdin:
        result = subprocess.run([sys.executable, "-c", code, "--config", str(bus.config),
                                 "subscribe", "-"], stdin=stdin, env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert ring_count(bus.counter, "nozmq", "pageview") == 3
    assert ring_count(bus.counter, "nozmq", "unique") == 3


def test_a_stats_directory_it_cannot_make_is_one_line_naming_the_fix(tmp_path, key):
    """subscribers/ that cannot be made or written (here a file is in its
    place; for a user, a state directory it does not own): one line naming
    the path and the fix, before anything is counted."""
    from click.testing import CliRunner

    from trafficthreshold.cli import main
    config = tmp_path / "config.toml"
    config.write_text(f'key = {key}\ndatabase = "{tmp_path}/stats.sqlite3"\n')
    (tmp_path / "subscribers").write_text("junk")
    try:
        result = CliRunner().invoke(main, ["subscribe", "--config", str(config), "-"])
    finally:
        trafficthreshold._settings.clear()
        trafficthreshold.configure()
    assert result.exit_code == 1
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in result.output
    assert f"cannot use {tmp_path}/subscribers" in error
    assert "the daemon's user" in error


def test_subscribers_gone_for_a_week_are_removed_not_kept_for_ever(inproc, tmp_path):
    """docs: a file older than 7 days is no longer shown; the files of such
    a name (stats and lock; ``--name job-$DATE`` makes one a run) are
    removed when a subscriber starts, not read by every /metrics request
    for ever.  A recent one, and one whose lock is held, are kept."""
    directory = tmp_path / "subscribers"
    directory.mkdir()
    old = time.time() - subscribe.FORGET_S - 60
    for name in ("gone", "held", "recent"):
        for suffix in (".json", ".lock"):
            (directory / (name + suffix)).write_text("{}")
            if name != "recent":
                os.utime(directory / (name + suffix), (old, old))
    import fcntl
    held = os.open(directory / "held.lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        inproc("new").initialize()
    finally:
        os.close(held)
    left = sorted(p.name for p in directory.iterdir())
    assert left == ["held.json", "held.lock", "new.json", "new.lock", "recent.json",
                    "recent.lock"]


def test_a_long_lived_subscriber_does_not_grow_with_names_that_come_and_go(key):
    """A subscriber lives for months and takes its account names from the
    network: names that come and go (the segment reclaims keys idle for a
    ring) must not make its memory grow for ever.  hit()'s per-process
    cache does: 4,000 names through a 256-key table keep 4,000 entries."""
    import gc
    import tracemalloc
    segment.install(key, "sysv", geometry=segment.Geometry(keys=256))
    trafficthreshold.configure(key=key, backend="sysv", strict=False)
    admin = segment.attach(key, "sysv")
    try:
        start = time.time()
        tracemalloc.start()
        try:
            for rnd in range(20):
                now = start + rnd * 3 * 3600  # a ring and more between two rounds
                for i in range(200):
                    trafficthreshold.hit(f"acct-{rnd}-{i}", "pageview", 1, now)
                admin.reclaim(int(now // 60) + 1)
                if rnd == 4:
                    gc.collect()
                    early = tracemalloc.get_traced_memory()[0]
            gc.collect()
            late = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert late < 2 * early, f"{early:,} bytes after 1,000 names, {late:,} after 4,000"
    finally:
        admin.detach()
        trafficthreshold._settings.clear()
        trafficthreshold.configure()


# ------------------------------------------- a farm: one host counts a bus

FARM_TTL = 2.0


def farm_host(bus: Any, redis_server: Any, host: str, key: int) -> Path:
    """A config of one farm host: its own segment and state directory, the
    Redis store shared with the others (lease_ttl 2 s)."""
    home = bus.tmp / host
    home.mkdir()
    config = home / "config.toml"
    config.write_text(f'key = {key}\ndatabase = "{home}/stats.sqlite3"\ntimezone = "UTC"\n'
                      f'[http]\nenabled = false\n[store]\nbackend = "redis"\n'
                      f'url = "redis://127.0.0.1:{redis_server.port}/0"\nhost = "{host}"\n'
                      f'lease_ttl = {FARM_TTL}\n')
    return config


@pytest.fixture
def farm(bus: Any, redis_server: Any) -> Any:
    """Two farm hosts (h1 on the bus's segment, h2 on a second one) whose
    subscribers both connect to the same publisher."""
    other = segment.unused_key()
    segment.install(other, "sysv")
    counters = {"h1": bus.counter, "h2": segment.attach(other, "sysv")}
    configs = {"h1": farm_host(bus, redis_server, "h1", bus.key),
               "h2": farm_host(bus, redis_server, "h2", other)}

    def start(host: str, *args: str) -> SubscriberProcess:
        proc = SubscriberProcess(configs[host], *args)
        bus.procs.append(proc)
        return proc

    bus.farm_counters, bus.start = counters, start
    yield bus
    kill_all(bus.procs)  # before the second segment goes
    counters["h2"].detach()
    segment.uninstall(other, "sysv", force=True)


def farm_total(bus: Any, account: str) -> dict[str, int]:
    return {h: ring_count(c, account, "pageview") for h, c in bus.farm_counters.items()}


def farm_connected(bus: Any, procs: dict[str, Any], name: str) -> None:
    """Wait until each host's subscriber is connected to the bus (its stats
    file says so): a standby that is not up yet would prove nothing."""
    def up(host: str) -> bool:
        try:
            info = json.loads((bus.tmp / host / "subscribers" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return False
        return info["connected"] == 1 and info["leases"] is not None

    for host, proc in procs.items():
        wait_for(f"{host}'s subscriber", lambda: up(host), proc=proc)


def farm_probe(bus: Any, pub: Any, procs: list[Any], account: str = "probe") -> None:
    """The slow joiner, on whichever host counts."""
    deadline = time.monotonic() + 30
    while not sum(farm_total(bus, account).values()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            "\n".join(p.log() for p in procs)
        pub.sock.send(b'pageview {"type":"pageview","data":{"account":"%s"}}' % account.encode())
        time.sleep(0.01)


def test_a_farm_counts_each_bus_event_on_one_host_and_a_standby_takes_over(farm):
    """With the Redis store, a subscriber on every host counts the bus once:
    one host's subscriber holds the bus's lease and counts, the other reads
    and counts nothing; SIGKILLed, the holder is replaced by the standby
    within the lease TTL, and no event of the handover stream is counted by
    both (each has its own account), what was published meanwhile being
    the only loss (PUB/SUB)."""
    bus = farm
    pub = bus.publisher()
    procs = {h: bus.start(h, pub.address, "--name", "shop-bus") for h in ("h1", "h2")}
    farm_connected(bus, procs, "shop-bus")
    farm_probe(bus, pub, list(procs.values()))
    time.sleep(0.2)  # the standby's slow joiner too: it must be hearing the bus
    frame = b'pageview {"type":"pageview","data":{"account":"acme"}}'
    for _ in range(3000):
        pub.sock.send(frame)
    pub.sock.send(b'pageview {"type":"pageview","data":{"account":"end-a"}}')
    wait_for("phase A", lambda: sum(farm_total(bus, "end-a").values()))
    counts = farm_total(bus, "acme")
    holder = max(counts, key=counts.get)
    standby = "h2" if holder == "h1" else "h1"
    assert counts == {holder: 3000, standby: 0}
    standby_file = bus.tmp / standby / "subscribers" / "shop-bus.json"
    wait_for("the standby's stats", lambda: json.loads(
        standby_file.read_text())["standby_skipped"] >= 3000, proc=procs[standby])
    info = json.loads(standby_file.read_text())
    assert info["leases"] == {pub.address: "standby"}
    assert info["counted"] < 100                        # at most probes before the lease

    stop = threading.Event()
    sent = [0]

    def stream() -> None:
        while not stop.is_set():
            pub.sock.send(b'pageview {"type":"pageview","data":{"account":"m%d"}}' % sent[0])
            sent[0] += 1
            time.sleep(0.005)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        wait_for("the stream", lambda: sent[0] > 100)
        os.kill(procs[holder].proc.pid, signal.SIGKILL)
        procs[holder].proc.wait(10)
        killed_at = time.monotonic()
        wait_for("the standby takes over", lambda: ring_count(
            bus.farm_counters[standby], f"m{sent[0] - 1}", "pageview")
            or ring_count(bus.farm_counters[standby], f"m{sent[0] - 2}", "pageview"),
            timeout=FARM_TTL + 10, proc=procs[standby])
        took = time.monotonic() - killed_at
    finally:
        stop.set()
        thread.join(30)
    assert took < FARM_TTL + 2, took
    time.sleep(0.3)
    doubled = [i for i in range(sent[0])
               if all(ring_count(c, f"m{i}", "pageview") for c in bus.farm_counters.values())]
    assert doubled == []
    # After the handover the standby counts everything, once.
    for _ in range(3000):
        pub.sock.send(b'pageview {"type":"pageview","data":{"account":"after"}}')
    pub.sock.send(b'pageview {"type":"pageview","data":{"account":"end-c"}}')
    wait_for("phase C", lambda: farm_total(bus, "end-c")[standby], proc=procs[standby])
    assert farm_total(bus, "after") == {holder: 0, standby: 3000}


def farm_holder(bus: Any) -> tuple[Any, dict[str, Any], str, str]:
    """A publisher and the subscribers "bus" of h1 and h2 on it, connected
    and probed: (publisher, processes by host, the holder, the standby)."""
    pub = bus.publisher()
    procs = {h: bus.start(h, pub.address, "--name", "bus") for h in ("h1", "h2")}
    farm_connected(bus, procs, "bus")
    farm_probe(bus, pub, list(procs.values()))
    counts = farm_total(bus, "probe")
    holder = max(counts, key=counts.get)
    return pub, procs, holder, "h2" if holder == "h1" else "h1"


def test_a_clean_stop_hands_the_bus_over_at_once(farm):
    """SIGTERM releases the lease: the standby counts from its next renewal
    (a second), not after the TTL; the stopped host counts nothing more."""
    bus = farm
    pub, procs, holder, standby = farm_holder(bus)
    assert procs[holder].stop() == 0
    stopped_at = time.monotonic()
    farm_probe(bus, pub, [procs[standby]], account="second")
    assert time.monotonic() - stopped_at < FARM_TTL
    assert farm_total(bus, "second")[holder] == 0


def test_one_host_without_redis_counts_as_before(bus):
    """The SQLite store (one host): no lease, every event counted."""
    pub = bus.publisher()
    proc = bus.subscriber(pub.address, "--name", "solo")
    pub.probe(bus.counter, "probe", proc)
    wait_for("a stats file", lambda: (bus.tmp / "subscribers" / "solo.json").exists())
    wait_for("the stats", lambda: stats_file(bus.tmp, "solo")["counted"] >= 1)
    assert stats_file(bus.tmp, "solo")["leases"] is None


def test_a_stalled_holder_stops_counting_before_a_standby_takes_over(farm):
    """The holder stopped (SIGSTOP) for longer than the TTL: the standby
    takes the lease; the holder, continued, finds its lease run out before
    it reads what it queued meanwhile, so no event is counted by both
    (each event its own account), and the standby goes on counting."""
    bus = farm
    pub, procs, holder, standby = farm_holder(bus)
    os.kill(procs[holder].proc.pid, signal.SIGSTOP)
    try:
        sent = 0
        deadline = time.monotonic() + FARM_TTL + 10
        while not ring_count(bus.farm_counters[standby], f"s{max(sent - 1, 0)}", "pageview"):
            assert time.monotonic() < deadline, procs[standby].log()
            pub.sock.send(b'pageview {"type":"pageview","data":{"account":"s%d"}}' % sent)
            sent += 1
            time.sleep(0.01)
    finally:
        os.kill(procs[holder].proc.pid, signal.SIGCONT)
    for i in range(sent, sent + 200):
        pub.sock.send(b'pageview {"type":"pageview","data":{"account":"s%d"}}' % i)
        time.sleep(0.002)
    sent += 200
    wait_for("the standby counts on", lambda: ring_count(
        bus.farm_counters[standby], f"s{sent - 1}", "pageview"), proc=procs[standby])
    time.sleep(1.0)  # the continued holder has read its queue by now
    doubled = [i for i in range(sent)
               if all(ring_count(c, f"s{i}", "pageview") for c in bus.farm_counters.values())]
    assert doubled == []
    assert procs[holder].poll() is None  # it stands by, it did not die


def test_a_holder_that_loses_redis_stops_counting_before_its_lease_lapses(redis_server,
                                                                           caplog):
    """BusLeases on a real redis-server, its clock a parameter: the holder
    counts until the moment its last good renewal was sent plus the TTL
    minus the margin, which is before Redis lets the lease lapse; Redis
    killed, renewals fail (logged once) and leave that deadline; nobody
    counts after it.  A second identity stands by meanwhile; a lease held
    by a bus's endpoint is not another endpoint's (names with ':' '/')."""
    from trafficthreshold.farmsync import no_retries
    now = [1000.0]
    client = redis_server.client()
    no_retries(client)                                  # as the subscriber's own client
    a = subscribe.BusLeases(client, ["tcp://bus:6000", "ipc:///run/a b.sock"], "h1/x/boot",
                            prefix="track", ttl_s=2.0, clock=lambda: now[0])
    b = subscribe.BusLeases(client, ["tcp://bus:6000"], "h2/x/boot", prefix="track",
                            ttl_s=2.0, clock=lambda: now[0])
    a.renew(force=True)
    b.renew(force=True)
    for _ in range(2):                                  # a fresh lease: counted after a TTL
        now[0] += 1.0
        a.renew(force=True)
    assert a.status() == {"tcp://bus:6000": "counting", "ipc:///run/a b.sock": "counting"}
    assert b.status() == {"tcp://bus:6000": "standby"}
    assert client.get("track~subscribe~tcp://bus:6000~leader").startswith(b"h1/x/boot ")
    redis_server.kill()
    now[0] += 1.0
    a.renew()
    a.renew(force=True)
    assert a.holds("tcp://bus:6000")                    # 1.0 < 2.0 - 0.5
    now[0] += 0.5
    assert not a.holds("tcp://bus:6000")                # the deadline: before Redis' expiry
    assert caplog.text.count("cannot renew the lease of bus") == 1


def _bus_leases(redis_server):
    """A clock to move by hand, one bus, a client without retries, and a
    maker of that bus's BusLeases (ttl 2 s) for an identity."""
    from trafficthreshold.farmsync import no_retries
    now = [1000.0]
    bus = "tcp://bus:6000"
    client = redis_server.client()
    no_retries(client)

    def leases(identity: str) -> subscribe.BusLeases:
        return subscribe.BusLeases(client, [bus], identity, prefix="track", ttl_s=2.0,
                                   clock=lambda: now[0])

    return now, bus, client, leases


@pytest.mark.parametrize("lost", ["restarted empty", "flushed"])
def test_a_lease_lost_with_redis_is_never_counted_by_two_hosts(redis_server, lost):
    """Redis restarted empty (no persistence, a failover to a replica that
    missed the lease, a flush) loses the holder's lease while the holder
    still counts until its deadline (it renews once a second; cut off from
    Redis, it goes on until the deadline).  A host that takes a lease whose
    end it did not see (no consecutive token, under the same redis-server)
    counts only from the reply plus the TTL, when every earlier holder's
    deadline has passed: never two hosts at once.  A take that follows a
    token seen ending on the same server (a lease that lapsed or was
    released while this host stood by) counts at once, as does a restarted
    subscriber that takes its predecessor's lease."""
    import shutil

    now, bus, client, leases = _bus_leases(redis_server)
    a, b = leases("h1/x/boot"), leases("h2/x/boot")
    a.renew(force=True)
    b.renew(force=True)
    assert not a.holds(bus) and not b.holds(bus)        # nothing seen before: a TTL first
    while not a.holds(bus):
        now[0] += 0.25
        a.renew()
        b.renew()
    assert now[0] == 1002.0 and not b.holds(bus)
    if lost == "flushed":
        client.flushall()
    else:
        redis_server.kill()                             # restarted with its data lost
        shutil.rmtree(redis_server.dir / "appendonlydir")
        redis_server.start()
        client.connection_pool.disconnect()
    now[0] += 0.3
    b.renew(force=True)                                 # b takes it: Redis holds none
    assert client.get(f"track~subscribe~{bus}~leader").startswith(b"h2/x/boot ")
    both = []
    while now[0] < 1005.0:                              # a cut off from Redis: no renewal
        both += [now[0]] if a.holds(bus) and b.holds(bus) else []
        now[0] += 0.05
        b.renew()
    assert both == []
    assert b.holds(bus) and not a.holds(bus)            # b counts once a's deadline passed
    # b stops cleanly; a, standing by, saw b's token end: it counts at once.
    a.renew(force=True)
    assert not a.holds(bus)
    b.release()
    a.renew(force=True)
    assert a.holds(bus)
    # a SIGKILLed and restarted (same identity: its predecessor is dead):
    # the new one takes the lease at once and counts at once.
    again = leases("h1/x/boot")
    again.renew(force=True)
    assert again.holds(bus)


def test_a_bus_lease_taken_after_its_token_key_expired_waits_a_ttl(redis_server):
    """The token key expires a day after the endpoint's lease was last held
    (farm.TOKEN_KEEP_MS); a token taken after that is Redis' clock in ms,
    not one above the last: even a standby that saw the last holder stop
    cannot tell that no other take came in between, so it counts only a
    lease_ttl after its take (as after Redis lost its data), never at once."""
    now, bus, client, leases = _bus_leases(redis_server)
    a, b = leases("h1/x/boot"), leases("h2/x/boot")
    a.renew(force=True)
    b.renew(force=True)
    token = a.leases[bus].token
    a.release()                                  # b saw a's token end (its stop mark)
    client.delete(a.leases[bus].counter)         # as a day without a holder does
    now[0] += 0.3
    b.renew(force=True)
    assert b.leases[bus].token not in (None, token + 1)
    assert b.leases[bus].token > token and not b.holds(bus)
    now[0] += 2.0
    b.renew(force=True)
    assert b.holds(bus)


def test_endpoints_spelled_like_the_key_layout_keep_their_own_leases(redis_server):
    """Endpoints that end in what the key layout appends ('~leader',
    ':token', '~stopped'), hold spaces, or are very long: each has its own
    lease, token and stop mark (a collision would make one endpoint's key
    another's, held or counted wrongly); a clean stop hands all of them
    over, the standby counting each at once."""
    from trafficthreshold.farmsync import no_retries
    now = [1000.0]
    client = redis_server.client()
    no_retries(client)
    buses = ["e", "e~leader", "e~leader:token", "e~leader~stopped", "e:token", "ipc:///a b~c",
             "tcp://h:1/" + "x" * 5000]

    def leases(identity: str) -> subscribe.BusLeases:
        return subscribe.BusLeases(client, buses, identity, prefix="track", ttl_s=2.0,
                                   clock=lambda: now[0])

    a, b = leases("h1/x/boot"), leases("h2/x/boot")
    for _ in range(3):
        a.renew(force=True)
        b.renew(force=True)
        now[0] += 1.0
    assert set(a.status().values()) == {"counting"} and set(b.status().values()) == {"standby"}
    tokens = {bus: a.leases[bus].token for bus in buses}
    counters = {a.leases[bus].counter for bus in buses}
    assert len(counters) == len(buses) and all(client.exists(c) for c in counters)
    a.release()
    b.renew(force=True)
    assert set(b.status().values()) == {"counting"}, b.status()
    # a counter of its own each: one take on each since a's
    assert {bus: b.leases[bus].token for bus in buses} == {bus: t + 1 for bus, t in tokens.items()}


def test_a_bus_lease_take_whose_reply_was_lost_counts_at_once(redis_server):
    """A standby saw the holder's token end (its stop mark), then its take
    ran in Redis but the reply was lost (the client timed out): the next
    renewal adopts that lease (it holds our identity).  The take followed
    the token seen ending, so it counts at once, as an answered take does:
    reading our own unanswered take back as "the last lease seen" must not
    make it look like a lease whose predecessor's end was not seen (the
    whole farm would count nothing of that bus for a lease_ttl)."""
    import redis as redis_lib
    from tt_proxy import TcpProxy

    from trafficthreshold.farmsync import no_retries
    now = [1000.0]
    bus = "tcp://bus:6000"
    direct = redis_server.client()
    no_retries(direct)
    with TcpProxy(redis_server.port) as proxy:
        via = redis_lib.Redis(port=proxy.port, socket_timeout=0.5)
        no_retries(via)
        a = subscribe.BusLeases(direct, [bus], "h1/x/boot", prefix="track", ttl_s=2.0,
                                clock=lambda: now[0])
        b = subscribe.BusLeases(via, [bus], "h2/x/boot", prefix="track", ttl_s=2.0,
                                clock=lambda: now[0])
        a.renew(force=True)
        b.renew(force=True)                          # b stands by, sees a's token
        token = a.leases[bus].token
        a.release()
        proxy.drop_replies(after=1)                  # the MGET answered (a's stop mark)
        b.renew(force=True)                          # the take runs, its reply is lost
        proxy.pass_replies()
        assert direct.get(f"track~subscribe~{bus}~leader") == f"h2/x/boot {token + 1}".encode()
        via.connection_pool.disconnect()
        now[0] += 0.3
        b.renew(force=True)                          # adopts it
        assert b.leases[bus].token == token + 1
        assert b.holds(bus)


def test_a_clone_with_the_same_host_name_and_boot_does_not_take_a_running_bus_lease(
        bus, redis_server):
    """Two containers share the machine's boot id, and may share its host
    name and the subscriber's name: each has its own state directory (its
    own flock), so the second is no restart of the first.  It must stand
    by, not take the running holder's lease as its dead predecessor's (it
    would count at once while the holder still counts: every event twice
    for up to a lease_ttl, then the holder would stand by)."""
    subs = []
    for home in ("c1", "c2"):
        (bus.tmp / home).mkdir()
        config = bus.tmp / home / "config.toml"
        config.write_text(f'key = {bus.key}\ndatabase = "{bus.tmp / home}/stats.sqlite3"\n'
                          f'timezone = "UTC"\n[http]\nenabled = false\n[store]\n'
                          f'backend = "redis"\nurl = "redis://127.0.0.1:{redis_server.port}/0"\n'
                          f'host = "web"\nlease_ttl = {FARM_TTL}\n')
        cfg = load_config(str(config))
        subs.append(subscribe.Subscriber(["tcp://bus:6000"], key=bus.key, backend="sysv",
                                         database=cfg.database, name="shop", config=cfg))
    try:
        subs[0].initialize()
        held = redis_server.client().get("track~subscribe~tcp://bus:6000~leader")
        subs[1].initialize()
        subs[1].leases.renew(force=True)
        assert redis_server.client().get("track~subscribe~tcp://bus:6000~leader") == held
        assert subs[1].leases.status() == {"tcp://bus:6000": "standby"}
        # The first SIGKILLed (its flock dies with it, its lease lives on):
        # restarted on its state directory, it succeeds its lease at once.
        os.close(subs[0]._lock_fd)
        subs[0]._lock_fd, subs[0].leases = None, None
        again = subscribe.Subscriber(["tcp://bus:6000"], key=bus.key, backend="sysv",
                                     database=subs[0].config.database, name="shop",
                                     config=subs[0].config)
        subs.append(again)
        again.initialize()
        assert again.leases.status() == {"tcp://bus:6000": "counting"}
    finally:
        for sub in subs:
            sub.shutdown()


def test_a_bus_leases_keys_in_redis_expire(redis_server):
    """What a bus's lease leaves in Redis goes by itself (docs/subscribe.rst):
    the stop mark after a lease_ttl, the token key a day after the lease
    was last held; only the one epoch key stays."""
    from trafficthreshold import farm

    now, bus, client, leases = _bus_leases(redis_server)
    a = leases("h1/x/boot")
    a.renew(force=True)
    a.release()
    lease = a.leases[bus]
    assert 0 < client.pttl(lease.key + subscribe.STOPPED_SUFFIX) <= 2000
    assert farm.TOKEN_KEEP_MS - 5_000 < client.pttl(lease.counter) <= farm.TOKEN_KEEP_MS
    assert client.pttl(a.epoch_key) == -1
    assert client.exists(lease.key) == 0
