"""Tests of trafficthreshold.metrics and GET /metrics.

Everything is parsed back with prometheus_client's own parser.  The nasty
cases on purpose: label values with quotes, backslashes and non-ASCII, and
the counter's semantics across a roll (stored + pending must not count a
hit twice, nor lose one, when the supervisor rolls the ring in between).
"""

from __future__ import annotations

import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trafficthreshold import alerts, api, segment
from trafficthreshold.api import metrics
from trafficthreshold.api import server as webserver
from trafficthreshold.alerts.store import AlertStore
from trafficthreshold.config import AlertRule, Config
from trafficthreshold.errors import SegmentNotFound
from trafficthreshold.store import SQLiteStore

ZONE = "Europe/Zurich"
NOW = 1_800_000_030.0
MINUTE = int(NOW // 60)
WEIRD = 'we"ird {name}=, ünïcode'  # no '\\': hit() refuses it (the render tests cover it)
#: A minute of 2026: rolled long ago, only in the month/day/hour rows now.
OLD_MINUTE = MINUTE - 400 * 1440

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value)."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def scrape_text(server: webserver.Server) -> tuple[str, Samples]:
    """The page's text and its samples, as a scraper parses them."""
    with urllib.request.urlopen(server.url + "metrics", timeout=10) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.read().decode("utf-8")
    return text, parse(text)[1]


def scrape(server: webserver.Server) -> tuple[dict[str, str], Samples]:
    return parse(scrape_text(server)[0])


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "stats.sqlite3")
    with SQLiteStore(path, ZONE) as store:
        store.roll([("all", "pageview", OLD_MINUTE, 100), ("acme", "pageview", OLD_MINUTE, 60),
                    ("shop", "pageview", OLD_MINUTE, 40)], now=NOW, closed_through=OLD_MINUTE)
    return path


@pytest.fixture
def serve() -> Iterator[Callable[..., webserver.Server]]:
    servers: list[webserver.Server] = []

    def start(config: Config, **kwargs: Any) -> webserver.Server:
        server = webserver.start(api.make_app(config, now=lambda: NOW, **kwargs), "127.0.0.1:0")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def config_for(db: str, key: int = 0x2ABCDEF0, backend: str = "sysv", **kwargs: Any) -> Config:
    return Config(key=key, backend=backend, database=db, timezone=ZONE, **kwargs)


# ------------------------------------------------------------- the format


@pytest.mark.parametrize("raw, escaped", [
    ("plain", "plain"), ('a"b', 'a\\"b'), ("a\\b", "a\\\\b"), ("a\nb", "a\\nb"),
    ("ünï", "ünï"), ('\\"\n', '\\\\\\"\\n'),
])
def test_label_values_are_escaped(raw: str, escaped: str) -> None:
    assert metrics.escape_label(raw) == escaped


def test_render_round_trips_through_prometheus_parser() -> None:
    family = metrics.Family("x_hits_total", "counter", 'help with "quotes"\\ and\nnewline')
    for raw in ('a"b', "a\\b", "a\nb", "ünï", WEIRD, "{}=,"):
        family.add(3, account=raw, event="pageview")
    gauge = metrics.Family("x_age_seconds", "gauge", "age").add(math.inf)
    text = metrics.render([family, gauge])
    types, samples = parse(text)
    assert types == {"x_hits": "counter", "x_age_seconds": "gauge"}
    for raw in ('a"b', "a\\b", "a\nb", "ünï", WEIRD, "{}=,"):
        assert value(samples, "x_hits_total", account=raw, event="pageview") == 3
    assert value(samples, "x_age_seconds") == math.inf
    assert text.endswith("\n") and "+Inf" in text


@pytest.mark.parametrize("number, text", [(3, "3"), (True, "1"), (0.25, "0.25"),
                                          (math.nan, "NaN"), (-math.inf, "-Inf")])
def test_values(number: float, text: str) -> None:
    assert metrics.format_value(number) == text


# ------------------------------------------------------------ end to end


def test_every_metric_from_store_segment_and_alerts(installed: tuple[int, str], db: str,
                                                    serve: Callable[..., webserver.Server]
                                                    ) -> None:
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    counter.hit("acme", "pageview", 5, NOW - 5)
    counter.hit(WEIRD, "pageview", 2, NOW - 70)
    counter.store(segment.H_HEARTBEAT_MS, 8, int((NOW - 2.5) * 1000))
    counter.store(segment.H_OVERFLOW_HITS, 8, 11)
    counter.store(segment.H_DROPPED_HITS, 8, 4)
    counter.store(segment.H_LOCK_TIMEOUTS, 8, 3)
    counter.store(segment.H_THROTTLE_LEVEL, 4, 2)
    rules = (AlertRule(name="burst"), AlertRule(name="calm", account="shop"))
    episode = alerts.Episode(started=NOW - 60, start_minute=MINUTE - 1, last_hot_minute=MINUTE,
                             peak=50, peak_minute=MINUTE, last_notice=NOW - 60)
    with AlertStore(db) as alert_store:
        alert_store.save(alerts.AlertState(episodes={"burst": episode}), now=NOW)

    types, samples = scrape(serve(config_for(db, key, backend, alerts=rules)))

    assert types["trafficthreshold_hits"] == "counter"
    assert value(samples, "trafficthreshold_hits_total", account="acme", event="pageview") == 65
    assert value(samples, "trafficthreshold_hits_total", account="shop", event="pageview") == 40
    assert value(samples, "trafficthreshold_hits_total", account="all", event="pageview") == 107
    assert value(samples, "trafficthreshold_hits_total", account=WEIRD, event="pageview") == 2
    assert value(samples, "trafficthreshold_hits_current_minute", account="acme",
                 event="pageview") == 5
    assert value(samples, "trafficthreshold_hits_current_minute", account=WEIRD,
                 event="pageview") == 0
    assert value(samples, "trafficthreshold_hits_last_60s", account="all", event="pageview") == 5
    assert value(samples, "trafficthreshold_throttle_level") == 2  # the supervisor's, fresh
    assert value(samples, "trafficthreshold_supervisor_heartbeat_age_seconds") == 2.5
    assert value(samples, "trafficthreshold_overflow_hits_total") == 11
    assert value(samples, "trafficthreshold_dropped_hits_total") == 4
    assert value(samples, "trafficthreshold_segment_lock_timeouts_total") == 3
    assert value(samples, "trafficthreshold_segment_keys_capacity") == 1024
    assert value(samples, "trafficthreshold_segment_keys_used") == 4  # ~overflow, all, 2
    assert value(samples, "trafficthreshold_segment_up") == 1
    assert value(samples, "trafficthreshold_alerts_firing", rule="burst") == 1
    assert value(samples, "trafficthreshold_alerts_firing", rule="calm") == 0
    assert value(samples, "trafficthreshold_store_last_roll_timestamp_seconds") == NOW
    assert value(samples, "trafficthreshold_store_gaps") == 0
    counter.detach()


def test_hits_total_counts_each_hit_once_across_rolls(installed: tuple[int, str], db: str,
                                                      serve: Callable[..., webserver.Server]
                                                      ) -> None:
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    server = serve(config_for(db, key, backend))
    slots = {slot: (a, e) for slot, a, e in counter.keys()}

    def total(account: str = "acme") -> float:
        return value(scrape(server)[1], "trafficthreshold_hits_total", account=account,
                     event="pageview")

    def roll(closed_through: int) -> None:
        """What the supervisor does: roll the ring's snapshot into the store."""
        nonlocal slots
        slots = {slot: (a, e) for slot, a, e in counter.keys()}
        items = [(*slots[slot], m, n) for slot, m, n in counter.minutes(MINUTE - 100, MINUTE)]
        with SQLiteStore(db, ZONE) as store:
            store.roll(items, now=NOW, closed_through=closed_through,
                       instance=counter.load(segment.H_INSTANCE, 8))

    assert total() == 60
    counter.hit("acme", "pageview", 3, NOW - 120)          # two minutes ago
    counter.hit("acme", "pageview", 4, NOW)                # the current minute
    assert total() == 67
    roll(closed_through=MINUTE - 1)                        # current minute rolled partly too
    assert total() == 67
    counter.hit("acme", "pageview", 2, NOW - 120)          # a late hit to a closed minute
    counter.hit("acme", "pageview", 1, NOW)
    assert total() == 70
    roll(closed_through=MINUTE - 1)
    assert total() == 70 and total("all") == 110
    # Another install's watermarks of the same minute say nothing about this
    # ring: pending hits are compared with this instance's watermarks only.
    with SQLiteStore(db, ZONE) as store:
        store.roll([("acme", "pageview", MINUTE, 50)], now=NOW, instance=12345)
    assert total() == 70 + 50
    counter.detach()


def test_late_drops_and_bad_keys_are_exported(db: str,
                                              serve: Callable[..., webserver.Server]) -> None:
    with SQLiteStore(db, ZONE) as store:
        store.set_bad_keys(["slot 7: account b'\\xff' is not UTF-8"])
    import sqlite3
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('late_dropped', 9)")
    server = serve(config_for(db, segment.unused_key(), "sysv"))
    _, samples = scrape(server)
    assert value(samples, "trafficthreshold_store_late_dropped_hits_total") == 9
    assert value(samples, "trafficthreshold_store_bad_keys") == 1


def test_without_a_segment_or_alert_tables(db: str,
                                           serve: Callable[..., webserver.Server]) -> None:
    def missing() -> Any:
        raise SegmentNotFound("none")

    types, samples = scrape(serve(config_for(db, alerts=(AlertRule(name="burst"),)),
                                  counter_factory=missing))
    assert value(samples, "trafficthreshold_segment_up") == 0
    assert value(samples, "trafficthreshold_hits_total", account="acme", event="pageview") == 60
    assert "trafficthreshold_hits_current_minute" not in types
    assert "trafficthreshold_throttle_level" not in types
    assert "trafficthreshold_alerts_firing" not in types  # the daemon never ran alerts


def test_a_supervisor_that_never_ticked_is_infinitely_old(
        installed: tuple[int, str], db: str, serve: Callable[..., webserver.Server]) -> None:
    _, samples = scrape(serve(config_for(db, *installed)))
    assert value(samples, "trafficthreshold_supervisor_heartbeat_age_seconds") == math.inf
    assert value(samples, "trafficthreshold_throttle_level") == 0


def test_counters_never_go_down_while_the_supervisor_rolls(
        installed: tuple[int, str], db: str, serve: Callable[..., webserver.Server]) -> None:
    """A roll between the read of the stored totals and the read of the
    watermarks once made hits_total drop (150 -> 100 -> 150), which
    Prometheus takes as a counter reset: one read transaction per scrape."""
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    server = serve(config_for(db, key, backend))
    stop = threading.Event()
    rolls = 0

    def supervisor() -> None:
        """Hit and roll as fast as it can, like a supervisor on a busy box."""
        nonlocal rolls
        with SQLiteStore(db, ZONE) as store:
            while not stop.is_set():
                counter.hit("acme", "pageview", 1, NOW)
                slots = {slot: (a, e) for slot, a, e in counter.keys()}
                items = [(*slots[slot], m, n)
                         for slot, m, n in counter.minutes(MINUTE - 100, MINUTE)]
                store.roll(items, now=NOW, closed_through=MINUTE - 1,
                           instance=counter.load(segment.H_INSTANCE, 8))
                rolls += 1

    thread = threading.Thread(target=supervisor)
    thread.start()
    seen: list[tuple[float, float]] = []
    try:
        deadline = time.monotonic() + 3
        while len(seen) < 600 and time.monotonic() < deadline:
            _, samples = scrape(server)
            seen.append((value(samples, "trafficthreshold_hits_total", account="acme",
                               event="pageview"),
                         value(samples, "trafficthreshold_hits_total", account="all",
                               event="pageview")))
    finally:
        stop.set()
        thread.join(10)
    assert rolls > 20 and len(seen) > 50  # the two really ran side by side
    drops = [(a, b) for a, b in zip(seen, seen[1:]) if b[0] < a[0] or b[1] < a[1]]
    assert not drops, f"{len(drops)} of {len(seen)} scrapes went down, e.g. {drops[:3]}"
    hits = counter.count(counter.find("acme", "pageview"), 1, NOW)
    _, samples = scrape(server)
    assert value(samples, "trafficthreshold_hits_total", account="acme",
                 event="pageview") == 60 + hits
    counter.detach()


def test_unique_visitors_are_exported_with_their_event_label(
        installed: tuple[int, str], db: str, serve: Callable[..., webserver.Server]) -> None:
    """The ``unique`` events the middleware's uniques count (``hit(account,
    "unique")``: the account and ``all``) reach /metrics under
    ``event="unique"``, stored and live."""
    key, backend = installed
    with SQLiteStore(db, ZONE) as store:
        store.roll([("all", "unique", OLD_MINUTE, 7), ("acme", "unique", OLD_MINUTE, 7)],
                   now=NOW, closed_through=OLD_MINUTE)
    counter = segment.attach(key, backend, stripe=0)
    try:
        counter.hit("acme", "unique", 1, NOW - 5)
        counter.hit("acme", "pageview", 3, NOW - 5)
        _, samples = scrape(serve(config_for(db, key, backend)))
    finally:
        counter.detach()
    for account in ("acme", "all"):
        assert value(samples, "trafficthreshold_hits_total", account=account,
                     event="unique") == 8
        assert value(samples, "trafficthreshold_hits_last_60s", account=account,
                     event="unique") == 1
    assert value(samples, "trafficthreshold_hits_total", account="acme", event="pageview") == 63


def test_with_the_redis_store_hits_total_is_the_farms_and_never_drops(
        installed: tuple[int, str], db: str, redis_server: Any,
        serve: Callable[..., webserver.Server]) -> None:
    """With the farm's Redis, hits_total is the farm's rolled total plus
    what this host's ring holds unrolled, read in one MULTI: a roll moves
    hits from one to the other and the sum stays; another host's roll only
    adds.  A Redis that does not answer is a 503."""
    from trafficthreshold.config import StoreConfig
    from trafficthreshold.periods import resolve_timezone
    from trafficthreshold.store.redis import RedisStore
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    zone = resolve_timezone(ZONE)
    instance = counter.load(segment.H_INSTANCE, 8)
    here = RedisStore(redis_server.client(), zone, "web1")
    other = RedisStore(redis_server.client(), zone, "web2")
    server = serve(config_for(db, key, backend, store=StoreConfig(
        backend="redis", url=f"redis://127.0.0.1:{redis_server.port}/0", host="web1")))

    def total() -> float:
        return value(scrape(server)[1], "trafficthreshold_hits_total", account="acme",
                     event="pageview")

    def roll_here() -> None:
        slots = {slot: (a, e) for slot, a, e in counter.keys()}
        items = [(*slots[slot], m, n) for slot, m, n in counter.minutes(MINUTE - 10, MINUTE)]
        here.roll(items, now=NOW, instance=instance)

    counter.hit("acme", "pageview", 5, NOW)
    assert total() == 5                                  # pending only
    roll_here()
    assert total() == 5                                  # moved to stored
    counter.hit("acme", "pageview", 2, NOW)
    other.roll([("acme", "pageview", MINUTE, 10)], now=NOW, instance=99)
    assert total() == 17                                 # 10 from web2, 7 from here
    roll_here()
    assert total() == 17
    redis_server.kill()
    with pytest.raises(urllib.error.HTTPError) as raised:
        scrape(server)
    assert raised.value.code == 503
    counter.detach()


def test_reclaimed_and_free_slots_are_exported(installed: tuple[int, str], db: str,
                                               serve: Callable[..., webserver.Server]) -> None:
    """A reclaimed key's slot: out of keys_used (in use), in slots_free, and
    counted in slots_reclaimed_total."""
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    counter.hit("gone.example", "pageview", 1, NOW - 300 * 60)
    counter.hit("kept.example", "pageview", 1, NOW - 5)
    done = segment.reclaim(counter, NOW, int(NOW // 60) - 1)
    assert [a for _s, a, _e in done] == ["gone.example"]
    types, samples = scrape(serve(config_for(db, key, backend)))
    assert types["trafficthreshold_segment_slots_reclaimed"] == "counter"
    assert value(samples, "trafficthreshold_segment_slots_reclaimed_total") == 1
    assert value(samples, "trafficthreshold_segment_slots_free") == 1
    assert value(samples, "trafficthreshold_segment_keys_used") == 3  # ~overflow, all, kept
    counter.detach()


# ------------------------------------------- subscribers that cannot be read


def _stats(directory: Path, name: str) -> None:
    """A stats file written at NOW (the app's clock), as a running
    subscriber writes it."""
    import json
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps({
        "name": name, "addresses": ["tcp://127.0.0.1:6000"], "topics": [""], "types": [],
        "hwm": 1000, "max_size": 65536, "pid": 1, "started_at": NOW,
        "updated_at": NOW, "monotonic": None, "boot_id": None, "last_heard": None,
        "connected": 1, "disconnects": 0, "stopped": False, "received": 5, "counted": 5,
        "uncounted": 0, "rejected": {}}))


def test_a_damaged_stats_file_is_said_not_silently_left_out(
        db: str, serve: Callable[..., webserver.Server], caplog: pytest.LogCaptureFixture) -> None:
    """A file in subscribers/ that is not a stats file: the good one is
    shown, the bad one counted in trafficthreshold_subscribers_unreadable,
    named in a comment line and logged once (not at every scrape)."""
    directory = Path(db).parent / "subscribers"
    _stats(directory, "good")
    (directory / "bad.json").write_bytes(b"\x00{not json")
    server = serve(config_for(db))
    text, samples = scrape_text(server)
    assert value(samples, "trafficthreshold_subscriber_up", subscriber="good") == 1
    assert value(samples, "trafficthreshold_subscribers_unreadable") == 1
    assert f"# ERROR trafficthreshold_subscribers_unreadable {directory}/bad.json is not" in text
    scrape(server)
    assert caplog.text.count(f"{directory}/bad.json is not a subscriber's stats file") == 1
    (directory / "bad.json").unlink()
    _, samples = scrape(server)
    assert value(samples, "trafficthreshold_subscribers_unreadable") == 0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become nobody")
def test_a_state_directory_the_daemon_cannot_read_is_said(key: int) -> None:
    """/metrics served by a real server running as nobody, who may not
    enter the subscribers' directory (root's, 0700): the scrape says so
    (trafficthreshold_subscribers_unreadable 1, a comment line naming the
    directory and the fix, the log) instead of showing no subscribers."""
    import pwd
    import shutil
    import signal
    import tempfile
    from tt_nobody import readable_package, use_readable_package
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="tt-metrics-"))
    try:
        base.chmod(0o777)
        with SQLiteStore(str(base / "stats.sqlite3"), ZONE):
            pass
        for name in ("stats.sqlite3", "stats.sqlite3-wal", "stats.sqlite3-shm"):
            if (base / name).exists():
                os.chown(base / name, nobody.pw_uid, nobody.pw_gid)
        _stats(base / "subscribers", "shop")
        (base / "subscribers").chmod(0o700)              # root's: nobody may not enter
        cfg = config_for(str(base / "stats.sqlite3"), key=key)
        readable_package()
        read, write = os.pipe()
        log_path = base / "child.log"
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(read)
                use_readable_package()
                import logging
                logging.basicConfig(filename=str(log_path), level=logging.INFO, force=True)
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                server = webserver.start(api.make_app(cfg, now=lambda: NOW), "127.0.0.1:0")
                os.write(write, server.url.encode())
                os.close(write)
                signal.pause()
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            url = pipe.read().decode()
        try:
            assert url, "the child did not start its server"
            with urllib.request.urlopen(url + "metrics", timeout=10) as response:
                text = response.read().decode("utf-8")
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        _, samples = parse(text)
        assert value(samples, "trafficthreshold_subscribers_unreadable") == 1
        assert "trafficthreshold_subscriber_up" not in text.replace(
            "trafficthreshold_subscribers_unreadable", "")
        assert (f"# ERROR trafficthreshold_subscribers_unreadable CANNOT READ "
                f"{base}/subscribers (Permission denied)") in text
        assert f"CANNOT READ {base}/subscribers (Permission denied)" in log_path.read_text()
    finally:
        shutil.rmtree(base)


def test_a_file_name_that_is_not_utf8_does_not_break_the_page(
        db: str, serve: Callable[..., webserver.Server]) -> None:
    """A junk file in subscribers/ whose name is not UTF-8 (os.listdir gives
    it with surrogate escapes): the page is still served and parsed, the
    name shown with its bytes escaped, never a 500 that blinds every metric."""
    directory = Path(db).parent / "subscribers"
    _stats(directory, "good")
    with open(os.fsencode(directory) + b"/caf\xe9\n.json", "wb") as f:
        f.write(b"{not json")
    os.symlink(b"/nonexistent", os.fsencode(directory) + b"/gone\xe9.json")  # an OSError
    _stats(directory, "shop")               # a good file under a name that is not UTF-8
    os.rename(directory / "shop.json", os.fsencode(directory) + b"/sh\xf6p.json")
    text, samples = scrape_text(serve(config_for(db)))
    assert value(samples, "trafficthreshold_subscriber_up", subscriber="good") == 1
    assert value(samples, "trafficthreshold_subscribers_unreadable") == 3
    assert f"# ERROR trafficthreshold_subscribers_unreadable {directory}/caf\\\\xe9\\n.json" in text
    assert f"{directory}/sh\\\\xf6p.json is not a subscriber's stats file" in text
    assert f"{directory}/gone\\\\xe9.json is not a subscriber's stats file" in text
