"""Order funnels (Bootic's ``funnels:{account}:{event}:{Y}[:{M}]``), end to
end: ``hit(account, "order", status="paid")`` into a real segment, the roll
into a real SQLite file and a real redis-server (read back with plain
HGETALL, as Bootic's handlers did), exactly once through repeats and a
SIGKILL mid-roll, the API route and ``stats --funnels``."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sqlite3
import time

import pytest

import trafficthreshold
from apps.harness import minute_at
from trafficthreshold import _counter, names, segment
from trafficthreshold.rollup import Roller
from trafficthreshold.store import SQLiteStore
from trafficthreshold.store import sqlite as sqlite_store

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC, a minute boundary
MINUTE = int(NOW) // 60


# ------------------------------------------------------------- the hot path

def test_a_status_hit_is_one_key_and_its_all_nothing_else(worker_api):
    """Bootic's tracker counted an order with a status in the funnels only:
    the status key and its `all`, and the plain event stays untouched."""
    key, backend = worker_api
    trafficthreshold.hit("acme", "order", status="paid", now=NOW)
    trafficthreshold.hit("acme", "order", status="paid", n=2, now=NOW)
    trafficthreshold.hit("acme", "order", status="pending", now=NOW + 1)
    trafficthreshold.hit("shop", "order", status="paid", now=NOW + 2)
    counter = segment.attach(key, backend)
    try:
        keys = {(a, e) for _slot, a, e in counter.keys()}
        assert {("acme", "order/paid"), ("all", "order/paid"), ("acme", "order/pending"),
                ("all", "order/pending"), ("shop", "order/paid")} <= keys
        assert ("acme", "order") not in keys and ("all", "order") not in keys
        assert trafficthreshold.count("acme", "order", status="paid", now=NOW) == 3
        assert trafficthreshold.count("all", "order", status="paid", now=NOW) == 4
        assert trafficthreshold.count(None, "order/pending", now=NOW) == 1
        assert trafficthreshold.count("acme", "order", now=NOW) == 0
    finally:
        counter.detach()


def test_the_event_name_with_a_status_is_the_same_key(counter):
    counter.hit("acme", "order", status="paid", now=NOW)
    counter.hit("acme", "order/paid", now=NOW)
    assert counter.count(counter.find("acme", "order/paid"), 1, NOW) == 2
    assert counter.count(counter.find(None, "order/paid"), 1, NOW) == 2


def test_status_is_keyword_only_and_none_means_no_status(counter):
    with pytest.raises(TypeError, match="status is a keyword argument"):
        counter.hit("acme", "order", 1, NOW, "paid")
    counter.hit("acme", "order", status=None, now=NOW)
    assert counter.find("acme", "order") is not None


def test_a_bad_status_raises_failing_open_too(key, backend, caplog):
    """No segment installed, fail open: a bad status still raises (a site
    in development sees it before production), and a good one is silent."""
    caplog.set_level(logging.WARNING, logger="trafficthreshold")
    trafficthreshold.configure(key=key, backend=backend, strict=False)
    try:
        assert trafficthreshold.hit("acme", "order", status="paid", now=NOW) is None
        with pytest.raises(ValueError, match="status name 'a/b' contains '/'|more than one"):
            trafficthreshold.hit("acme", "order", status="a/b", now=NOW)
        with pytest.raises(ValueError, match="shorten the status"):
            trafficthreshold.hit("acme", "order", status="s" * 27, now=NOW)
    finally:
        trafficthreshold._settings.clear()
        trafficthreshold.configure()


def test_the_index_entry_holds_event_slash_status_for_other_writers(counter):
    """docs/segment.rst: a writer in another language counts a status by
    writing the key event name ``order/paid``; the raw entry is that."""
    counter.hit("acme", "order", status="refunded", now=NOW)
    slot = counter.find("acme", "order/refunded")
    entries = {s: (a, e) for s, a, e in counter.keys()}
    assert entries[slot] == ("acme", "order" + names.STATUS_SEP + "refunded")
    assert _counter.STATUS_SEP == names.STATUS_SEP


# ------------------------------------------------- the roll into SQLite

ZONE = "Europe/Zurich"
#: 2027-01-31 23:58 in Zurich: two minutes before February.
EVE = minute_at(2027, 1, 31, 23, 58)


def _orders(counter) -> None:
    """Orders on both sides of midnight, January 31 -> February 1, and a
    page view and a plain order beside them."""
    t = EVE * 60
    counter.hit("acme", "order", status="pending", n=3, now=t + 70)    # Jan 31 23:59
    counter.hit("acme", "order", status="paid", n=2, now=t + 75)
    counter.hit("shop", "order", status="paid", now=t + 80)
    counter.hit("acme", "order", status="paid", n=5, now=t + 125)      # Feb 1 00:00
    counter.hit("acme", "order", status="refunded", now=t + 130)
    counter.hit("acme", "pageview", n=7, now=t + 130)
    counter.hit("acme", "order", now=t + 130)                          # no status


@pytest.fixture
def eve_counter(key, backend):
    """A segment installed on the eve, attached on stripe 0."""
    segment.install(key, backend, now=EVE * 60)
    c = segment.attach(key, backend, stripe=0)
    yield c
    c.detach()


def test_statuses_roll_into_the_funnels_per_year_and_month_exactly_once(eve_counter, tmp_path):
    _orders(eve_counter)
    with SQLiteStore(str(tmp_path / "stats.sqlite3"), ZONE) as store:
        roller = Roller(eve_counter, store)
        now = (EVE + 3) * 60
        assert roller.roll(now) == 3 + 2 + 1 + 5 + 1 + 7 + 1
        assert roller.roll(now + 20) == 0
        assert roller.roll(now + 30, include_current=True) == 0
        assert store.funnel("acme", "order", 2027) == {
            "data": {"paid": 7, "pending": 3, "refunded": 1}, "total": 11, "months": [1, 2]}
        assert store.funnel("acme", "order", 2027, 1)["data"] == {"paid": 2, "pending": 3}
        assert store.funnel("acme", "order", 2027, 2) == {
            "data": {"paid": 5, "refunded": 1}, "total": 6, "months": []}
        assert store.funnel("all", "order", 2027)["data"] == {
            "paid": 8, "pending": 3, "refunded": 1}
        assert store.funnel("shop", "order", 2027, 1)["data"] == {"paid": 1}
        assert store.funnel("acme", "order", 2026) == {"data": {}, "total": 0, "months": []}
        # The plain event counts only its own hit; no period row, account
        # or event of a status key.
        assert store.period("acme", "order", 2027, 2)["total"] == 1
        assert store.period("acme", "pageview", 2027, 2)["total"] == 7
        assert store.events("acme") == ["order", "pageview"]
        assert "order/paid" not in store.events()
        # Discovery of the funnels.
        assert store.funnel_accounts() == ["acme", "all", "shop"]
        assert store.funnel_events("acme") == ["order"]
        assert store.funnel_years("acme", "order") == [2027]
        assert store.funnel_years("acme", "signup") == []
        # /metrics' all-time totals: a status is the key event order/paid.
        totals = store.metrics_reading(None, 0, 0)["totals"]
        assert totals["acme", "order/paid"] == 7 and totals["all", "order/paid"] == 8
        assert totals["acme", "order"] == 1
        # A late status hit in a closed minute adds only itself.
        eve_counter.hit("acme", "order", status="paid", now=(EVE + 2) * 60 + 5)
        assert roller.roll(now + 40) == 1
        assert store.funnel("acme", "order", 2027, 2)["data"]["paid"] == 6


def test_an_impossible_funnel_period_is_refused(tmp_path):
    from trafficthreshold.periods import ImpossiblePeriod
    with SQLiteStore(str(tmp_path / "stats.sqlite3"), ZONE) as store:
        with pytest.raises(ImpossiblePeriod, match="month 13"):
            store.funnel("acme", "order", 2027, 13)
        with pytest.raises(ImpossiblePeriod, match="year 0"):
            store.funnel("acme", "order", 0)


def test_a_schema_2_file_migrates_to_funnels_and_a_reader_of_it_sees_none(tmp_path):
    """A store of the previous release: its reader finds no funnels (and
    writes nothing), the daemon's writer adds the table and keeps the rest."""
    path = str(tmp_path / "old.sqlite3")
    conn = sqlite3.connect(path)
    for statements in sqlite_store.MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO months VALUES ('acme', 'pageview', 2027, 1, 5)")
    conn.commit()
    conn.close()
    with SQLiteStore(path, ZONE, readonly=True) as reader:
        assert reader.funnel("acme", "order", 2027) == {"data": {}, "total": 0, "months": []}
        assert reader.funnel_accounts() == []
    with SQLiteStore(path, ZONE) as writer:
        writer.roll([("acme", "order/paid", EVE, 2)], now=1)
        assert writer.funnel("acme", "order", 2027, 1)["data"] == {"paid": 2}
        assert writer.period("acme", "pageview", 2027)["data"][1] == 5
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3


def _roll_funnels_until_killed(path: str, progress, rolling) -> None:
    """A supervisor's store rolling a growing snapshot of funnel keys
    without pause: step s holds s + 1 hits per key-minute."""
    store = SQLiteStore(path, ZONE)
    for step in range(KILL_STEPS):
        rolling.value = 1
        store.roll(_kill_snapshot(step), now=step)
        rolling.value = 0
        progress.value = step + 1


KILL_STEPS = 400
KILL_KEYS = [(a, f"order/{s}") for a in ("acme", "all") for s in ("paid", "pending", "x")]


def _kill_snapshot(step: int) -> list[tuple[str, str, int, int]]:
    return [(a, e, EVE + m, step + 1) for a, e in KILL_KEYS for m in range(4)]


@pytest.mark.timeout(60)
def test_sigkill_in_the_middle_of_funnel_rolls_loses_and_doubles_nothing(tmp_path):
    """The funnels rows move with the watermarks, in one commit: after each
    SIGKILL the funnels hold exactly one whole snapshot, and rolling on
    from the last one reported adds each hit once."""
    path = str(tmp_path / "stats.sqlite3")
    SQLiteStore(path, ZONE).close()
    context = multiprocessing.get_context("fork")
    progress = context.Value("i", 0, lock=False)
    rolling = context.Value("i", 0, lock=False)
    inside = 0
    for kill_after in (20, 60, 150):
        child = context.Process(target=_roll_funnels_until_killed,
                                args=(path, progress, rolling))
        child.start()
        deadline = time.monotonic() + 30
        while progress.value < kill_after and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        inside += rolling.value
        conn = sqlite3.connect(path)
        funnels = conn.execute("SELECT SUM(count) FROM funnels").fetchone()[0] or 0
        marks = conn.execute("SELECT SUM(count) FROM watermarks").fetchone()[0] or 0
        conn.close()
        # One whole snapshot (4 minutes x 6 keys x (step + 1)), never a part.
        assert funnels == marks and funnels % (4 * len(KILL_KEYS)) == 0
        assert funnels // (4 * len(KILL_KEYS)) >= progress.value
    with SQLiteStore(path, ZONE) as store:
        final = _kill_snapshot(KILL_STEPS - 1)
        store.roll(final, now=10**6)
        assert store.roll(final, now=10**6) == 0
        january = store.funnel("acme", "order", 2027, 1)["data"]
        february = store.funnel("acme", "order", 2027, 2)["data"]
        # Minutes 23:58 and 23:59 in January, 00:00 and 00:01 in February.
        assert january == february == {"paid": 2 * KILL_STEPS, "pending": 2 * KILL_STEPS,
                                       "x": 2 * KILL_STEPS}
    assert inside >= 1  # roll() is nearly all of the child's time: the kills do hit it


# ------------------------------------------------- the roll into Redis

def _redis_store(srv, host: str = "web1", **kw):
    from trafficthreshold.periods import resolve_timezone
    from trafficthreshold.store import RedisStore
    return RedisStore(srv.client(), resolve_timezone(ZONE), host, **kw)


@pytest.mark.redis
def test_statuses_roll_into_bootics_funnel_hashes_read_with_plain_hgetall(
        eve_counter, redis_server):
    """Bootic's TrackFunnel: HINCRBY funnels:{account}:{event}:{Y} and
    ...:{Y}:{M}, field the status, for the account and for `all`; what its
    handlers read with HGETALL.  A repeated roll adds nothing; a second
    host adds its share."""
    _orders(eve_counter)
    store = _redis_store(redis_server)
    roller = Roller(eve_counter, store)
    now = (EVE + 3) * 60
    assert roller.roll(now) == 3 + 2 + 1 + 5 + 1 + 7 + 1
    assert roller.roll(now + 30, include_current=True) == 0
    r = redis_server.client()
    assert r.hgetall("funnels:acme:order:2027") == {b"paid": b"7", b"pending": b"3",
                                                    b"refunded": b"1"}
    assert r.hgetall("funnels:acme:order:2027:1") == {b"paid": b"2", b"pending": b"3"}
    assert r.hgetall("funnels:acme:order:2027:2") == {b"paid": b"5", b"refunded": b"1"}
    assert r.hgetall("funnels:all:order:2027") == {b"paid": b"8", b"pending": b"3",
                                                   b"refunded": b"1"}
    assert r.hgetall("funnels:shop:order:2027:1") == {b"paid": b"1"}
    # No track hash for a status key, and no key of ours under funnels:*.
    assert not r.keys("track:*:order/*")
    assert r.hgetall("track:acme:order:2027:2") == {b"1": b"1"}
    assert all(k.count(b":") in (3, 4) and b"~" not in k for k in r.keys("funnels:*"))
    # The same reads as the SQLite store's.
    assert store.funnel("acme", "order", 2027) == {
        "data": {"paid": 7, "pending": 3, "refunded": 1}, "total": 11, "months": [1, 2]}
    assert store.funnel("acme", "order", 2027, 2)["total"] == 6
    assert store.funnel_accounts() == ["acme", "all", "shop"]
    assert store.funnel_events("acme") == ["order"]
    assert store.funnel_years("acme", "order") == [2027]
    assert store.events("acme") == ["order", "pageview"]
    # /metrics' all-time totals count a status as the key event order/paid.
    totals = store.metrics_reading(0, EVE, EVE)["totals"]
    assert totals["acme", "order/paid"] == 7 and totals["acme", "order"] == 1
    # Another host's share adds up; its repeat adds nothing.
    web2 = _redis_store(redis_server, "web2")
    items = [("acme", "order/paid", EVE + 2, 4), ("all", "order/paid", EVE + 2, 4)]
    assert web2.roll(items, now=1, instance=7) == 8
    assert web2.roll(items, now=2, instance=7) == 0
    assert r.hgetall("funnels:all:order:2027:2")[b"paid"] == b"9"


@pytest.mark.redis
def test_the_funnels_prefix_is_configurable(redis_server):
    store = _redis_store(redis_server, funnels_prefix="orders")
    store.roll([("acme", "order/paid", EVE, 2)], now=1)
    r = redis_server.client()
    assert r.hgetall("orders:acme:order:2027:1") == {b"paid": b"2"}
    assert not r.keys("funnels:*")


def test_the_funnels_prefix_must_differ_from_the_track_prefix(tmp_path):
    from trafficthreshold import config
    from trafficthreshold.errors import ConfigError
    path = tmp_path / "config.toml"
    path.write_text('[store]\nprefix = "stats"\nfunnels_prefix = "stats"\n')
    with pytest.raises(ConfigError, match="funnels_prefix.*same as store.prefix"):
        config.load(str(path))


@pytest.mark.redis
def test_a_migration_copies_the_funnels_once(tmp_path, redis_server):
    from trafficthreshold.migrate import count_hashes, migrate
    path = str(tmp_path / "stats.sqlite3")
    items = [("acme", "order/paid", EVE + 1, 2), ("acme", "order/paid", EVE + 2, 5),
             ("acme", "order/pending", EVE + 1, 3), ("all", "order/paid", EVE + 2, 6),
             ("acme", "pageview", EVE + 2, 9)]
    with SQLiteStore(path, ZONE) as sqlite:
        sqlite.roll(items, now=1, closed_through=EVE + 2)
    store = _redis_store(redis_server)
    first = migrate(path, store)
    assert first.hashes == count_hashes(path) and first.skipped == 0
    r = redis_server.client()
    assert r.hgetall("funnels:acme:order:2027") == {b"paid": b"7", b"pending": b"3"}
    assert r.hgetall("funnels:acme:order:2027:1") == {b"paid": b"2", b"pending": b"3"}
    assert r.hgetall("funnels:acme:order:2027:2") == {b"paid": b"5"}
    assert r.hgetall("funnels:all:order:2027:2") == {b"paid": b"6"}
    again = migrate(path, store)
    assert again.hashes == 0 and again.hits == 0
    assert r.hgetall("funnels:acme:order:2027") == {b"paid": b"7", b"pending": b"3"}
    assert store.funnel_accounts() == ["acme", "all"]
    totals = store.metrics_reading(0, EVE, EVE)["totals"]
    assert totals["acme", "order/paid"] == 7 and totals["acme", "pageview"] == 9
    # The watermarks came along: the supervisor, now on Redis, adds nothing twice.
    assert store.roll(items, now=2) == 0


@pytest.mark.redis
def test_a_migration_rerun_after_the_file_grew_adds_the_funnels_growth(tmp_path, redis_server):
    """Funnels are copied incrementally as the periods are: a trial run,
    the file grows (a status grows, a new one comes), the real run adds
    exactly the growth, to the hashes, the all-time totals and the key set."""
    from trafficthreshold.migrate import migrate
    path = str(tmp_path / "stats.sqlite3")
    with SQLiteStore(path, ZONE) as sqlite:
        sqlite.roll([("acme", "order/paid", EVE + 1, 2)], now=1, closed_through=EVE + 1)
    store = _redis_store(redis_server)
    migrate(path, store)
    with SQLiteStore(path, ZONE) as sqlite:
        sqlite.roll([("acme", "order/paid", EVE + 1, 5), ("acme", "order/lost", EVE + 2, 4),
                     ("globex", "order/paid", EVE + 2, 1)], now=2, closed_through=EVE + 2)
    again = migrate(path, store)
    assert again.hits == 3 + 4 + 1
    r = redis_server.client()
    assert r.hgetall("funnels:acme:order:2027") == {b"paid": b"5", b"lost": b"4"}
    assert r.hgetall("funnels:acme:order:2027:1") == {b"paid": b"5"}
    assert r.hgetall("funnels:acme:order:2027:2") == {b"lost": b"4"}
    assert store.funnel_accounts() == ["acme", "globex"]
    totals = store.metrics_reading(0, EVE, EVE)["totals"]
    assert totals["acme", "order/paid"] == 5 and totals["acme", "order/lost"] == 4
    assert migrate(path, store).hits == 0


# ------------------------------------------------- the API and the CLI

LINKS = "http://127.0.0.1:8787/"


@pytest.fixture
def funnel_db(tmp_path) -> str:
    """A store with orders of acme (January and February 2027) and one of
    an account whose name needs quoting."""
    path = str(tmp_path / "stats.sqlite3")
    items = [("acme", "order/pending", EVE + 1, 3), ("acme", "order/paid", EVE + 1, 2),
             ("acme", "order/paid", EVE + 2, 5), ("acme", "order/refunded", EVE + 3, 1),
             ("all", "order/paid", EVE + 2, 5), ("a b", "order/paid", EVE + 2, 1),
             ("acme", "pageview", EVE + 2, 9)]
    with SQLiteStore(path, ZONE) as store:
        store.roll(items, now=1, closed_through=EVE + 3)
    return path


@pytest.fixture
def funnel_server(funnel_db, serve):
    from apps.harness import make_config
    from trafficthreshold import api
    from trafficthreshold.errors import SegmentNotFound

    def missing():
        raise SegmentNotFound("no segment here")

    return serve(api.make_app(make_config(funnel_db), counter_factory=missing,
                              now=lambda: NOW))


def test_the_funnels_route_answers_counts_per_status_like_bootic(funnel_server):
    from apps.harness import fetch_json
    base = LINKS + "api/stats/funnels/acme/order/2027"
    status, year = fetch_json(funnel_server.url + "api/stats/funnels/acme/order/2027")
    assert status == 200
    assert year == {"type": "funnels", "account": "acme", "event": "order",
                    "year": 2027, "month": None,
                    "data": {"paid": 7, "pending": 3, "refunded": 1}, "total": 11,
                    "links": [f"{base}/1", f"{base}/2"]}
    status, february = fetch_json(funnel_server.url + "api/stats/funnels/acme/order/2027/02")
    assert status == 200
    assert february == {"type": "funnels", "account": "acme", "event": "order",
                        "year": 2027, "month": 2,
                        "data": {"paid": 5, "refunded": 1}, "total": 6, "links": []}
    _, nothing = fetch_json(funnel_server.url + "api/stats/funnels/shop/order/2027")
    assert (nothing["data"], nothing["total"], nothing["links"]) == ({}, 0, [])
    _, quoted = fetch_json(funnel_server.url + "api/stats/funnels/a%20b/order/2027")
    assert quoted["account"] == "a b" and quoted["links"] == [
        LINKS + "api/stats/funnels/a%20b/order/2027/2"]


def test_funnel_discovery_lists_accounts_events_and_years(funnel_server):
    from apps.harness import fetch_json
    funnels = LINKS + "api/stats/funnels"
    assert fetch_json(funnel_server.url + "api/stats/funnels") == (200, {
        "type": "funnels", "account": None, "event": None,
        "links": [f"{funnels}/a%20b", f"{funnels}/acme", f"{funnels}/all"]})
    assert fetch_json(funnel_server.url + "api/stats/funnels/acme") == (200, {
        "type": "funnels", "account": "acme", "event": None,
        "links": [f"{funnels}/acme/order"]})
    assert fetch_json(funnel_server.url + "api/stats/funnels/acme/order") == (200, {
        "type": "funnels", "account": "acme", "event": "order",
        "links": [f"{funnels}/acme/order/2027"]})
    # The track tree knows nothing of the statuses.
    _, events = fetch_json(funnel_server.url + "api/stats/track/acme")
    assert events["links"] == [LINKS + "api/stats/track/acme/pageview"]


@pytest.mark.parametrize("path, status, words", [
    ("api/stats/funnels/acme/order/2027/13", 400, "impossible month 13"),
    ("api/stats/funnels/acme/order/0", 400, "impossible year 0"),
    ("api/stats/funnels/acme/order/2027/2/1", 404, "no such page"),
    ("api/stats/funnels/acme/order/2027/feb", 404, "no such page"),
    ("api/stats/funnels/~acme/order/2027", 404, "reserved"),
    ("api/stats/funnels/acme/order%2Fpaid/2027", 404, "percent-encoded slashes"),
    ("api/stats/funnels/acme/" + "e" * 33 + "/2027", 404, "33 bytes"),
    ("api/stats/funnels/shop", 404, "no funnel counts stored for account 'shop'"),
    ("api/stats/track/acme/order%2Fpaid/2027", 404, "percent-encoded slashes"),
])
def test_funnel_errors_follow_our_rules(funnel_server, path, status, words):
    from apps.harness import fetch_json
    got, body = fetch_json(funnel_server.url + path)
    assert got == status, body
    assert body["status"] == status and words in body["message"], body


def _cli(cfg_path, *args, ok=True):
    from click.testing import CliRunner
    from trafficthreshold.cli import main
    result = CliRunner().invoke(main, ["--config", cfg_path, *args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


@pytest.fixture
def funnel_cfg(funnel_db, tmp_path, key):
    path = tmp_path / "config.toml"
    path.write_text(f'key = {key}\ndatabase = "{funnel_db}"\ntimezone = "{ZONE}"\n'
                    '[http]\nenabled = false\n')
    return str(path)


def test_stats_funnels_prints_and_dumps_the_counts_per_status(funnel_cfg):
    out = _cli(funnel_cfg, "stats", "--funnels", "acme", "order", "2027")
    assert out.splitlines() == ["acme order 2027 by status",
                                "paid                 7",
                                "pending              3",
                                "refunded             1",
                                "total               11"]
    data = json.loads(_cli(funnel_cfg, "stats", "--funnels", "acme", "order", "2027", "1",
                           "--json"))
    assert data == {"account": "acme", "event": "order", "year": 2027, "month": 1,
                    "data": {"paid": 2, "pending": 3}, "total": 5}
    assert "no day or hour" in _cli(funnel_cfg, "stats", "--funnels", "acme", "order", "2027",
                                    "1", "5", ok=False)
    assert "impossible month 13" in _cli(funnel_cfg, "stats", "--funnels", "acme", "order",
                                         "2027", "13", ok=False)


def test_the_cli_hit_counts_a_status(funnel_cfg, key):
    segment.install(key, "sysv", now=NOW)
    _cli(funnel_cfg, "hit", "acme", "order", "--status", "paid", "-n", "2")
    assert "more than one '/'" in _cli(funnel_cfg, "hit", "acme", "order", "--status", "a/b",
                                       ok=False)
    counter = segment.attach(key, "sysv")
    try:
        slot = counter.find("acme", "order/paid")
        assert slot is not None
        assert sum(n for s, _m, n in counter.minutes(int(time.time() // 60) - 1,
                                                     int(time.time() // 60)) if s == slot) == 2
    finally:
        counter.detach()


def test_the_dashboard_lists_no_status_as_an_event(installed, funnel_db, serve):
    """A status key in the segment (order/paid) is no event of the
    dashboard's menu: its ?event= link would be a 404."""
    from apps.harness import fetch, make_config
    from trafficthreshold import api
    key, backend = installed
    counter = segment.attach(key, backend)
    try:
        counter.hit("acme", "order", status="paid", now=NOW - 5)
        counter.hit("acme", "signup", now=NOW - 5)
        server = serve(api.make_app(make_config(funnel_db, key=key, backend=backend),
                                    now=lambda: NOW))
        status, _headers, body = fetch(server.url)
        page = body.decode()
        assert status == 200
        assert '?event=signup"' in page and "?event=order%2Fpaid" not in page
        assert "?event=order/paid" not in page
    finally:
        counter.detach()


@pytest.mark.redis
def test_the_funnels_route_reads_the_farms_redis(redis_server, tmp_path, serve):
    """[store] backend = "redis" with a funnels_prefix: two hosts' shares
    of a status add up in the route and its discovery."""
    from apps.harness import fetch_json, make_config
    from trafficthreshold import api
    from trafficthreshold.config import StoreConfig
    for host, n in (("web1", 4), ("web2", 3)):
        _redis_store(redis_server, host, funnels_prefix="orders").roll(
            [("acme", "order/paid", EVE + 2, n), ("all", "order/paid", EVE + 2, n)], now=1)
    cfg = make_config(str(tmp_path / "local.sqlite3"), store=StoreConfig(
        backend="redis", url=f"redis://127.0.0.1:{redis_server.port}/0",
        funnels_prefix="orders"))
    server = serve(api.make_app(cfg, now=lambda: NOW))
    status, body = fetch_json(server.url + "api/stats/funnels/acme/order/2027")
    assert status == 200 and body["data"] == {"paid": 7} and body["links"] == [
        LINKS + "api/stats/funnels/acme/order/2027/2"]
    status, body = fetch_json(server.url + "api/stats/funnels/acme/order")
    assert status == 200 and body["links"] == [LINKS + "api/stats/funnels/acme/order/2027"]
    assert redis_server.client().hgetall("orders:all:order:2027:2") == {b"paid": b"7"}
