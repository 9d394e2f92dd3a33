"""The daemon: driven-clock ticks in-process, and real processes for
signals, sd_notify and the SIGKILL crash loop."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from trafficthreshold import config as configuration, segment
from trafficthreshold.store import SQLiteStore
from trafficthreshold.supervisor import Supervisor

T0 = 1_800_000_000


def make_config(tmp_path, key, backend, extra=""):
    path = tmp_path / "config.toml"
    path.write_text(f"""
key = {key}
backend = "{backend}"
database = "{tmp_path / 'stats.sqlite3'}"
timezone = "UTC"
{extra}
[http]
enabled = false
""")
    return configuration.load(str(path), env={}), str(path)


@pytest.fixture
def sup(tmp_path, installed):
    cfg, path = make_config(tmp_path, *installed)
    s = Supervisor(cfg, config_path=path, env={}, pid=4242)
    yield s
    s.shutdown(T0 + 10**6)


def level(sup):
    return sup.counter.load(segment.H_THROTTLE_LEVEL, 4)


def test_initialize_writes_settings_and_heartbeat(sup):
    sup.initialize(T0 + 5)
    assert sup.counter.load(segment.H_SUPERVISOR_PID, 4) == 4242
    assert sup.counter.load(segment.H_HEARTBEAT_MS, 8) == (T0 + 5) * 1000
    assert sup.counter.load(segment.H_THROTTLE_MULTIPLIER, 4) == 60
    sup.tick(T0 + 6.5)
    assert sup.counter.load(segment.H_HEARTBEAT_MS, 8) == (T0 + 6.5) * 1000


def test_tick_rolls_when_the_minute_changes(sup):
    sup.initialize(T0)
    sup.counter.hit("acme", "pageview", 7, T0 + 30)
    sup.tick(T0 + 31)
    assert sup.store.period("acme", "pageview", 2027, 1, 15)["total"] == 0
    sup.tick(T0 + 61)
    assert sup.store.period("acme", "pageview", 2027, 1, 15)["total"] == 7


def test_shutdown_rolls_the_open_minute(sup, tmp_path):
    sup.initialize(T0)
    sup.counter.hit("acme", "pageview", 3, T0 + 10)
    sup.shutdown(T0 + 11)
    with SQLiteStore(str(tmp_path / "stats.sqlite3"), "UTC") as store:
        assert store.period("acme", "pageview", 2027)["total"] == 3


def test_restart_catches_up_without_double_counting(tmp_path, installed):
    cfg, path = make_config(tmp_path, *installed)
    counter = segment.attach(*installed)
    for restart in range(3):
        s = Supervisor(cfg, config_path=path, env={})
        s.initialize(T0 + 200 * restart)
        counter.hit("acme", "pageview", 5, T0 + 200 * restart + 1)
        s.tick(T0 + 200 * restart + 100)
        s.shutdown(T0 + 200 * restart + 150)
    with SQLiteStore(cfg.database, "UTC") as store:
        assert store.period("acme", "pageview", 2027)["total"] == 15
        assert store.gaps() == []
    counter.detach()


def test_gap_recorded_when_down_longer_than_ring(tmp_path, installed):
    cfg, path = make_config(tmp_path, *installed)
    s = Supervisor(cfg, config_path=path, env={})
    s.initialize(T0)
    s.shutdown(T0 + 30)
    s = Supervisor(cfg, config_path=path, env={})
    s.initialize(T0 + 60 * 300)          # 300 minutes later, the ring holds 120
    gaps = s.store.gaps()
    s.shutdown(T0 + 60 * 300 + 1)
    assert len(gaps) == 1 and gaps[0]["last_minute"] - gaps[0]["first_minute"] + 1 >= 179


def drive(sup, start, per_minute, seconds=60):
    """Spread per_minute hits of the all key evenly over a minute, ticking
    every second; return the level after each second."""
    levels = []
    for s in range(seconds):
        now = start + s
        quota = per_minute * (s + 1) // 60 - per_minute * s // 60
        if quota:
            sup.counter.hit(None, "pageview", quota, now)
        sup.tick(now + 0.5)
        levels.append(level(sup))
    return levels


def test_drupal_worked_example(tmp_path, installed):
    """Multiplier 20: 45 hits -> level 2; a later minute of 35 hits keeps 2;
    back to 0 only through the policy's step-down (cron_test)."""
    cfg, path = make_config(tmp_path, *installed, """
[throttle]
multiplier = 20
window = "minute"
policy = "drupal"
cron_test = 600
""")
    s = Supervisor(cfg, config_path=path, env={})
    s.initialize(T0)
    assert drive(s, T0, 45)[-1] == 2
    assert drive(s, T0 + 60, 35)[-1] == 2           # 35 // 20 = 1, kept at 2
    assert set(drive(s, T0 + 120, 0)) == {2}        # quiet, but no test due yet
    t = T0 + 180
    while level(s) > 0 and t < T0 + 3 * 3600:
        s.tick(t)
        t += 60
    assert level(s) == 0 and t - T0 >= 2 * 600       # two step-down tests
    s.shutdown(t)


def test_hysteresis_rises_at_once_and_never_flaps(tmp_path, installed):
    cfg, path = make_config(tmp_path, *installed, """
[throttle]
multiplier = 20
window = "minute"
cooldown = 300
""")
    s = Supervisor(cfg, config_path=path, env={})
    s.initialize(T0)
    levels = drive(s, T0, 45)
    assert levels[-1] == 2 and levels.index(2) < 59   # rose inside the minute
    changes = []
    for m in range(1, 10):                             # oscillate around the floor
        lv = drive(s, T0 + 60 * m, 35 if m % 2 else 45)
        changes.append(lv[-1])
    assert changes.count(1) <= 1 and all(x >= 1 for x in changes)
    s.shutdown(T0 + 600)


def test_worker_sees_the_supervisor_level(sup):
    import trafficthreshold
    sup.initialize(T0)
    sup.counter.store(segment.H_THROTTLE_LEVEL, 4, 3)
    assert sup.counter.level(T0 + 1) == 3
    assert sup.counter.level(T0 + 60) == 0              # heartbeat stale: ignored
    del trafficthreshold


def test_reload_applies_settings_and_keeps_config_on_error(sup, tmp_path, caplog):
    sup.initialize(T0)
    path = tmp_path / "config.toml"
    path.write_text(path.read_text() + "\n[throttle]\nmultiplier = 7\n")
    sup.reload()
    assert sup.counter.load(segment.H_THROTTLE_MULTIPLIER, 4) == 7
    path.write_text(path.read_text().replace("multiplier = 7", "multiplier = 0"))
    sup.reload()
    assert "reload refused" in caplog.text
    assert sup.config.throttle.multiplier == 7


def test_tick_survives_a_broken_store(sup, caplog):
    sup.initialize(T0)
    sup.store._conn.close()
    sup.tick(T0 + 61)                       # roll-up fails, logged, no raise
    assert "roll-up failed" in caplog.text


# ------------------------------------------------------------ real processes

def run_daemon(cfg_path, env_extra=None):
    env = dict(os.environ, TRAFFICTHRESHOLD_CONFIG=cfg_path, **(env_extra or {}))
    env.pop("NOTIFY_SOCKET", None) if not env_extra or "NOTIFY_SOCKET" not in env_extra else None
    return subprocess.Popen([sys.executable, "-m", "trafficthreshold.cli", "run", "--no-http"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_daemon_speaks_sd_notify_and_stops_on_sigterm(tmp_path, installed):
    cfg, path = make_config(tmp_path, *installed)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(15)
    proc = run_daemon(path, {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "2000000"})
    try:
        seen = []
        while not (any("WATCHDOG=1" in m for m in seen)
                   and any(m.startswith("STATUS=") for m in seen)):
            seen.append(sock.recv(4096).decode())
        assert seen[0].startswith("READY=1") or "READY=1" in seen
        assert any(m.startswith("STATUS=level 0") for m in seen)
        counter = segment.attach(*installed)
        counter.hit("acme", "pageview", 9)
        proc.send_signal(signal.SIGHUP)
        while "RELOADING=1" not in "".join(seen):
            seen.append(sock.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen.append(sock.recv(4096).decode())
        assert proc.wait(15) == 0
        counter.detach()
    finally:
        proc.kill()
        sock.close()
    with SQLiteStore(cfg.database, "UTC") as store:
        assert store.period("acme", "pageview", time.gmtime().tm_year)["total"] == 9


def _worker(key, backend, stop_path, result_path):
    """Hit as fast as a web worker would, until told to stop; write the
    ground truth."""
    counter = segment.attach(key, backend)
    made = 0
    while not os.path.exists(stop_path):
        for _ in range(200):
            counter.hit("acme" if made % 3 else "beta", "pageview", 1)
            made += 1
        time.sleep(0.001)
    with open(result_path, "w") as f:
        f.write(str(made))


@pytest.mark.parametrize("backend", ["sysv"])
def test_crash_loop_loses_and_doubles_nothing(tmp_path, installed):
    """Workers hit continuously while the supervisor is SIGKILLed and
    restarted 20+ times at random instants; the store then equals the
    workers' ground truth exactly."""
    import multiprocessing
    cfg, path = make_config(tmp_path, *installed)
    stop = str(tmp_path / "stop")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_worker, args=(*installed, stop, str(tmp_path / f"w{i}")))
               for i in range(2)]
    for w in workers:
        w.start()
    rng = random.Random(1234)
    kills = 0
    try:
        while kills < 22:
            proc = run_daemon(path)
            time.sleep(rng.uniform(0.05, 0.9))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    finally:
        open(stop, "w").close()
        for w in workers:
            w.join(30)
    truth = sum(int(open(tmp_path / f"w{i}").read()) for i in range(2))
    final = run_daemon(path)
    time.sleep(1.5)
    final.send_signal(signal.SIGTERM)
    assert final.wait(20) == 0, final.stdout.read().decode()
    year = time.gmtime().tm_year
    with SQLiteStore(cfg.database, "UTC") as store:
        all_total = store.period("all", "pageview", year)["total"]
        parts = sum(store.period(a, "pageview", year)["total"] for a in ("acme", "beta"))
        assert store.gaps() == []
    assert truth > 10_000
    assert all_total == truth
    assert parts == truth


# ------------------------------------------------------- alerts, end to end

from tt_postfix import MAILBOX, SENDMAIL, requires_postfix, wait_for_mail  # noqa: E402


@pytest.mark.postfix
@pytest.mark.skipif(bool(requires_postfix[1].args[0]), reason=requires_postfix[1].kwargs["reason"])
def test_burst_mails_once_through_postfix_and_restart_sends_no_duplicate(tmp_path, installed):
    """Hits past the threshold: one mail in the real mailbox within the
    second the count crossed, with the burst's numbers; a daemon restarted
    mid-episode does not mail again."""
    import uuid
    token = f"tt{uuid.uuid4().hex[:10]}"
    cfg, path = make_config(tmp_path, *installed, f"""
[mail]
sendmail = "{SENDMAIL}"
from = "tt-daemon@localhost"

[[alert]]
name = "burst-{token}"
threshold = 10
to = ["{MAILBOX}"]
repeat = 3600
""")
    start = (time.time() // 60) * 60
    counter = segment.attach(*installed)
    s = Supervisor(cfg, config_path=path, env={})
    s.initialize(start)
    for second in range(20):
        counter.hit("shop.example", "pageview", 1, start + second)
        s.tick(start + second + 0.5)
    s.shutdown(start + 20.5)
    s = Supervisor(cfg, config_path=path, env={})          # restart mid-episode
    s.initialize(start + 21)
    for second in range(21, 40):
        counter.hit("shop.example", "pageview", 1, start + second)
        s.tick(start + second + 0.5)
    s.shutdown(start + 40.5)
    counter.detach()
    (mail,) = wait_for_mail(token, 1)
    assert mail["Subject"].startswith(f"[trafficthreshold] burst-{token}: 10 pageview/min")
    assert mail["From"] == "tt-daemon@localhost"
    assert mail["Date"].datetime.timestamp() == start + 9     # the 10th hit's tick
    assert "shop.example" in mail.get_content()
    time.sleep(1)
    assert wait_for_mail(token, 1, deadline=2) == []            # nothing more came


def test_configured_timezone_splits_days_at_local_midnight_and_merges_dst(tmp_path, installed):
    """Europe/Zurich: a hit at 23:59:30 and one at 00:00:30 local land on two
    days; on 2026-10-25 the repeated 02:00 hour holds both real hours."""
    import datetime as dt
    from zoneinfo import ZoneInfo
    cfg, path = make_config(tmp_path, *installed)
    import dataclasses
    cfg = dataclasses.replace(cfg, timezone="Europe/Zurich")
    zurich = ZoneInfo("Europe/Zurich")
    before = dt.datetime(2026, 10, 23, 23, 59, 30, tzinfo=zurich).timestamp()
    first_2am = dt.datetime(2026, 10, 25, 2, 30, tzinfo=zurich, fold=0).timestamp()
    second_2am = dt.datetime(2026, 10, 25, 2, 30, tzinfo=zurich, fold=1).timestamp()
    assert second_2am - first_2am == 3600
    counter = segment.attach(*installed)
    for t, n in ((before, 1), (before + 60, 2), (first_2am, 3), (second_2am, 4)):
        s = Supervisor(cfg, config_path=path, env={})
        s.initialize(t - 1)
        counter.hit("acme", "pageview", n, t)
        s.shutdown(t + 1)
    counter.detach()
    with SQLiteStore(cfg.database, "Europe/Zurich") as store:
        days = store.period("acme", "pageview", 2026, 10)["data"]
        assert days[23] == 1 and days[24] == 2 and days[25] == 7
        hours = store.period("acme", "pageview", 2026, 10, 25)["data"]
        assert hours[2] == 7 and len(hours) == 24


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_served_and_reload_reaches_the_app(tmp_path, installed):
    """The daemon serves the API on its listen address; a reload's new alert
    rules reach the running app."""
    import json
    import urllib.request
    port = _free_port()
    cfg, path = make_config(tmp_path, *installed)
    text = open(path).read().replace("enabled = false", f'listen = "127.0.0.1:{port}"')
    open(path, "w").write(text)
    cfg = configuration.load(path, env={})
    s = Supervisor(cfg, config_path=path, env={})
    s.initialize(time.time())
    try:
        s.counter.hit("acme", "pageview", 4)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats/live") as r:
            live = json.load(r)
        assert r.status == 200 and "throttle" in live
        open(path, "a").write('[[alert]]\nname = "newrule"\nto = ["ops@example.com"]\n')
        s.reload()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as r:
            assert "newrule" in r.read().decode()
    finally:
        s.shutdown(time.time())


# ------------------------------------- re-attach, reload, corrupt header, db

def test_reattach_after_reinstall_resets_the_throttle(tmp_path, installed, caplog):
    """The new segment says level 0: the supervisor starts from 0 too, and
    stays there without traffic (it used to jump to 4 a cooldown later)."""
    cfg, path = make_config(tmp_path, *installed, """
[throttle]
multiplier = 20
window = "minute"
cooldown = 60
""")
    s = Supervisor(cfg, config_path=path, env={})
    s.initialize(T0)
    assert drive(s, T0, 200)[-1] == 5
    segment.uninstall(*installed, force=True)
    segment.install(*installed, now=T0 + 61)
    s.tick(T0 + 61)
    assert s.throttle_state.level == 0 and level(s) == 0
    for t in range(T0 + 62, T0 + 62 + 300, 10):     # five cooldowns, no hits
        s.tick(t)
        assert level(s) == 0, t
    s.shutdown(T0 + 400)


def test_reload_keeps_restart_only_settings_and_warns_once(sup, tmp_path, caplog):
    sup.initialize(T0)
    path = tmp_path / "config.toml"
    text = path.read_text()
    path.write_text(text.replace(str(tmp_path / "stats.sqlite3"), str(tmp_path / "other.db"))
                    .replace('timezone = "UTC"', 'timezone = "Europe/Zurich"')
                    + "\n[throttle]\nmultiplier = 9\n")
    sup.reload()
    sup.reload()
    assert sup.config.database == str(tmp_path / "stats.sqlite3")
    assert sup.config.timezone == "UTC"
    assert sup.config.throttle.multiplier == 9                  # the rest applies
    assert sup.counter.load(segment.H_THROTTLE_MULTIPLIER, 4) == 9
    for name in ("database", "timezone"):
        assert caplog.text.count(f"{name} changed in the configuration") == 1
    assert not (tmp_path / "other.db").exists()
    # A re-attach after the reload still uses the running key and database.
    segment.uninstall(sup.config.key, sup.config.backend, force=True)
    segment.install(sup.config.key, sup.config.backend, now=T0 + 61)
    sup.tick(T0 + 61)
    assert sup._segment_live() and sup.store.path == str(tmp_path / "stats.sqlite3")


@pytest.mark.parametrize("field, offset, value", [
    ("throttle_slot", segment.H_THROTTLE_SLOT, 0xFFFFFFFF),
    ("throttle_window", segment.H_THROTTLE_WINDOW, 77),
    ("throttle_multiplier", segment.H_THROTTLE_MULTIPLIER, 0),
    ("throttle_level", segment.H_THROTTLE_LEVEL, 4_000_000),
    ("supervisor_pid", segment.H_SUPERVISOR_PID, 1),
])
def test_a_corrupt_header_field_is_repaired_and_the_daemon_goes_on(
        sup, caplog, field, offset, value):
    sup.initialize(T0)
    good = sup.counter.load(offset, 4)
    sup.counter.hit(None, "pageview", 10, T0 + 1)
    sup.counter.store(offset, 4, value)
    for t in range(T0 + 2, T0 + 70):
        sup.tick(t)                                   # never raises
    assert sup.counter.load(offset, 4) == good or field == "throttle_level"
    assert sup.counter.load(segment.H_THROTTLE_LEVEL, 4) <= 5
    assert caplog.text.count(f"held {field} = {value}") == 1
    assert sup.store.period("all", "pageview", 2027)["total"] == 10   # rolled at T0+60


def test_a_probe_limit_too_small_is_repaired_at_the_next_minute(sup, caplog):
    """A scribbled probe_limit hides keys from every lock-free probe (a
    reader misses them): the supervisor checks the limit against the key
    index at initialize and at each new minute (one read of the index, not
    every second), stores it anew under the lock, and logs it once."""
    from test_segment import far_key
    sup.initialize(T0)
    name, slot, length = far_key(sup.counter, keys=300)
    good = sup.counter.load(segment.H_PROBE_LIMIT, 4)
    sup.counter.store(segment.H_PROBE_LIMIT, 4, 1)
    sup.tick(T0 + 1)                                  # the same minute: not read yet
    reader = segment.attach(sup.config.key, sup.config.backend)
    try:
        assert reader.find(name, "pageview") is None
        for t in range(T0 + 2, T0 + 62):
            sup.tick(t)
        assert sup.counter.load(segment.H_PROBE_LIMIT, 4) == good
        assert reader.find(name, "pageview") == slot
    finally:
        reader.detach()
    assert caplog.text.count(f"probe_limit is 1: the key ({name.encode()!r}") == 1
    sup.counter.store(segment.H_PROBE_LIMIT, 4, 0)    # a value no writer stores
    for t in range(T0 + 62, T0 + 122):
        sup.tick(t)
    assert sup.counter.load(segment.H_PROBE_LIMIT, 4) == good
    assert caplog.text.count("probe_limit is 0, not 1..") == 1


def test_an_index_entry_that_is_not_utf8_does_not_stop_initialize(sup, tmp_path):
    from test_segment import RawReader, raw_view
    sup.initialize(T0)
    sup.counter.hit("acme", "pageview", 3, T0 + 1)
    with raw_view(sup.config.key, sup.config.backend) as view:
        (off,) = [o for o, _s, _slot, _h, a, _e in RawReader(view).entries() if a == b"acme"]
        view[off + 16:off + 20] = b"\xff\xfe\xfd\xfc"
    sup.shutdown(T0 + 2)
    again = Supervisor(sup.config, config_path=str(tmp_path / "config.toml"), env={})
    again.initialize(T0 + 3)                          # used to raise UnicodeDecodeError
    again.counter.hit("beta", "pageview", 2, T0 + 4)
    again.tick(T0 + 4)
    assert again.counter.load(segment.H_HEARTBEAT_MS, 8) == (T0 + 4) * 1000
    again.tick(T0 + 61)                               # the other keys still roll
    assert again.store.period("beta", "pageview", 2027)["total"] == 2
    assert again.store.period("all", "pageview", 2027)["total"] == 3 + 2
    assert len(again.store.bad_keys()) == 1
    again.shutdown(T0 + 62)


def test_a_damaged_database_is_retried_while_the_ring_counts(tmp_path, installed, caplog):
    """A file that is not a database: initialize and tick go on, the error
    names the file and the recovery, and once the file is moved aside the
    next minute opens a new store and rolls what the ring kept."""
    caplog.set_level(logging.INFO, "trafficthreshold.supervisor")
    cfg, path = make_config(tmp_path, *installed)
    db = tmp_path / "stats.sqlite3"
    db.write_bytes(b"this is not a database" * 500)
    s = Supervisor(cfg, config_path=path, env={})
    s.initialize(T0)                                   # used to raise
    assert s.store is None
    assert "aside to start a new one" in caplog.text and str(db) in caplog.text
    assert "Traceback" not in caplog.text                # a message, not a traceback
    s.counter.hit("acme", "pageview", 4, T0 + 10)
    for t in range(T0 + 1, T0 + 30):
        s.tick(t)
    assert caplog.text.count("opening the store failed") == 1   # not once a second
    db.rename(tmp_path / "stats.damaged")
    s.tick(T0 + 61)                                    # a new minute: retried
    assert s.store is not None and "opening the store works again" in caplog.text
    s.tick(T0 + 121)
    assert s.store.period("acme", "pageview", 2027)["total"] == 4
    s.shutdown(T0 + 122)


def _damage_table(db, table):
    """Overwrite the root page of ``table`` (a b-tree page) with garbage."""
    import sqlite3
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")   # the page is in the file, not the WAL
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                           (table,)).fetchone()
    (size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xde\xad\xbe\xef" * (size // 4))


def test_a_damaged_btree_page_keeps_the_daemon_counting_until_moved_aside(
        tmp_path, installed, caplog):
    caplog.set_level(logging.INFO, "trafficthreshold.supervisor")
    cfg, path = make_config(tmp_path, *installed)
    s = Supervisor(cfg, config_path=path, env={})
    s.initialize(T0)
    s.counter.hit("acme", "pageview", 2, T0 + 1)
    s.shutdown(T0 + 2)
    _damage_table(cfg.database, "minutes")
    s = Supervisor(cfg, config_path=path, env={})
    s.initialize(T0 + 3)
    s.counter.hit("acme", "pageview", 5, T0 + 70)
    for t in range(T0 + 61, T0 + 130, 5):
        s.tick(t)                                          # never raises
    assert "malformed" in caplog.text and ".recover" in caplog.text
    assert caplog.text.count("roll-up failed") == 1
    os.rename(cfg.database, cfg.database + ".damaged")
    for t in range(T0 + 181, T0 + 250, 5):
        s.tick(t)                                          # reopened: a new file
    assert "roll-up works again" in caplog.text
    assert s.store.period("acme", "pageview", 2027)["total"] == 5 + 2   # the ring kept both
    s.shutdown(T0 + 260)


# -------------------------------- re-install and lost segments, daemon-level

def _final_rollup(cfg, now):
    """What `trafficthreshold uninstall` runs before removing the segment."""
    from trafficthreshold.rollup import Roller

    def roll(counter):
        with SQLiteStore(cfg.database, cfg.timezone) as store:
            Roller(counter, store).roll(now, True)
    return roll


def test_reinstall_within_the_minute_loses_no_hit(sup):
    """`uninstall --force && install` within one minute: the new segment's
    hits of that minute are all counted (they used to be ignored up to the
    old segment's count), and nothing is counted twice."""
    sup.initialize(T0)
    sup.counter.hit("acme", "pageview", 5, T0 + 10)
    segment.uninstall(sup.config.key, sup.config.backend, force=True,
                      rollup=_final_rollup(sup.config, T0 + 11))
    segment.install(sup.config.key, sup.config.backend, now=T0 + 12)
    sup.tick(T0 + 13)                                   # re-attaches
    sup.counter.hit("acme", "pageview", 3, T0 + 20)     # below the old count (5)
    sup.tick(T0 + 61)
    sup.tick(T0 + 121)
    assert sup.store.period("acme", "pageview", 2027, 1, 15, 8)["data"][0] == 5 + 3
    assert sup.store.period("all", "pageview", 2027)["total"] == 5 + 3
    assert sup.store.gaps() == []                       # the old one ended with a final roll


def test_a_segment_gone_without_final_roll_is_recorded_as_a_gap(sup):
    """ipcrm / RemoveIPC / a reboot: the minutes between the last roll of
    the old segment and the new segment are recorded as a gap, not skipped."""
    sup.initialize(T0)
    sup.counter.hit("acme", "pageview", 5, T0 + 10)
    sup.tick(T0 + 61)                                   # rolled through minute M0
    segment.uninstall(sup.config.key, sup.config.backend, force=True)   # no final roll
    later = T0 + 60 * 30
    segment.install(sup.config.key, sup.config.backend, now=later)
    sup.tick(later + 1)
    sup.counter.hit("acme", "pageview", 2, later + 5)
    sup.tick(later + 61)
    (gap,) = sup.store.gaps()
    assert gap["first_minute"] <= T0 // 60 + 2 and gap["last_minute"] == later // 60 - 1
    assert sup.store.period("acme", "pageview", 2027)["total"] == 5 + 2


@pytest.mark.parametrize("backend", ["sysv"])
def test_run_over_a_damaged_database_keeps_running_and_stops_cleanly(tmp_path, installed):
    """`trafficthreshold run` with a file that is not a database: it keeps
    ticking (heartbeat), says once what is wrong and how to fix it, no
    traceback, and SIGTERM still stops it with status 0."""
    cfg, path = make_config(tmp_path, *installed)
    (tmp_path / "stats.sqlite3").write_bytes(b"garbage!" * 1000)
    proc = run_daemon(path)
    try:
        counter = segment.attach(*installed)
        deadline = time.time() + 10
        first = counter.load(segment.H_HEARTBEAT_MS, 8)
        while counter.load(segment.H_HEARTBEAT_MS, 8) in (0, first) and time.time() < deadline:
            time.sleep(0.1)
        assert counter.load(segment.H_HEARTBEAT_MS, 8) not in (0, first)   # still ticking
        counter.detach()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.kill()
    out = proc.stdout.read().decode()
    assert "aside to start a new one" in out and "Traceback" not in out, out


def test_a_segment_removed_under_the_daemon_is_noticed_rolled_and_replaced(sup):
    """ipcrm / RemoveIPC while the daemon runs: its mapping stays LIVE, so
    it used to heartbeat and roll a dead segment for ever while workers used
    the new one.  Now, within a minute, it rolls what the old mapping held,
    attaches to the new segment and records the unknown minute as a gap."""
    from conftest import remove_everything
    sup.initialize(T0)
    sup.counter.hit("acme", "pageview", 5, T0 + 10)
    sup.tick(T0 + 61)
    sup.counter.hit("acme", "pageview", 3, T0 + 70)     # not rolled yet
    remove_everything(sup.config.key)                   # what ipcrm does
    segment.install(sup.config.key, sup.config.backend, now=T0 + 90)
    worker = segment.attach(sup.config.key, sup.config.backend)
    worker.hit("acme", "pageview", 2, T0 + 100)
    sup.tick(T0 + 121)                                  # a new minute: checked
    assert sup.counter.load(segment.H_INSTANCE, 8) == worker.load(segment.H_INSTANCE, 8)
    assert worker.load(segment.H_HEARTBEAT_MS, 8) == (T0 + 121) * 1000
    sup.tick(T0 + 181)
    assert sup.store.period("acme", "pageview", 2027)["total"] == 5 + 3 + 2
    assert len(sup.store.gaps()) == 1
    worker.detach()


def test_the_same_segment_is_never_taken_for_a_replacement(sup):
    sup.initialize(T0)
    for t in range(T0 + 61, T0 + 300, 60):
        sup.tick(t)
    assert sup._segment_live() and sup.store.gaps() == []


def test_the_daemon_creates_private_files_under_umask_022(tmp_path, installed):
    """Without systemd (umask 022): the data directory 0750, the database and
    its -wal and -shm files 0640, never world-readable."""
    import stat
    cfg, path = make_config(tmp_path, *installed)
    data = tmp_path / "var" / "trafficthreshold"
    cfg = dataclasses.replace(cfg, database=str(data / "stats.sqlite3"))
    old = os.umask(0o022)
    try:
        s = Supervisor(cfg, config_path=path, env={})
        s.initialize(T0)
        s.counter.hit("acme", "pageview", 1, T0 + 1)
        s.tick(T0 + 61)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir()}
        modes["dir"] = stat.S_IMODE(data.stat().st_mode)
        modes["parent"] = stat.S_IMODE(data.parent.stat().st_mode)
        s.shutdown(T0 + 62)
    finally:
        os.umask(old)
    assert modes == {"stats.sqlite3": 0o640, "stats.sqlite3-wal": 0o640,
                     "stats.sqlite3-shm": 0o640, "dir": 0o750, "parent": 0o750}


def test_hits_later_than_the_recheck_window_are_counted_not_silent(sup):
    """A worker descheduled for minutes adds to a minute no longer re-read:
    the daemon does not add it (that minute is closed) but counts it."""
    from trafficthreshold.rollup import LATE_MINUTES
    sup.initialize(T0)
    sup.counter.hit("acme", "pageview", 4, T0 + 5)
    for m in range(1, LATE_MINUTES + 3):
        sup.tick(T0 + 60 * m + 1)
    sup.counter.hit("acme", "pageview", 2, T0 + 59)    # very late, into minute M0
    for m in range(LATE_MINUTES + 3, 130):             # until minute M0 leaves the ring
        sup.tick(T0 + 60 * m + 1)
    assert sup.store.period("acme", "pageview", 2027)["total"] == 4
    assert sup.store.late_dropped() == 2


# -- [store] backend = "redis": the roll into the farm's Redis ---------------

@pytest.fixture
def redis_sup(tmp_path, key, redis_server):
    """A supervisor over a SysV segment rolling into a real redis-server."""
    segment.install(key, "sysv", now=T0)
    made = []

    def make(host="web1"):
        cfg, path = make_config(tmp_path, key, "sysv", extra=f"""
[store]
backend = "redis"
url = "redis://127.0.0.1:{redis_server.port}/0"
host = "{host}"
""")
        s = Supervisor(cfg, config_path=path, env={}, pid=4242)
        made.append(s)
        return s

    yield make
    for s in made:
        s.shutdown(T0 + 10**6)


def _redis_total(srv, account="acme", host_year=2027):
    client = srv.client()
    return {k.decode(): int(v) for k, v in
            client.hgetall(f"track:{account}:pageview:{host_year}").items()}


def test_redis_backend_rolls_into_redis_on_the_roll_thread(redis_sup, redis_server):
    sup = redis_sup()
    sup.initialize(T0)
    sup._wait_rolling()  # the catch-up roll at the start
    assert type(sup.store).__name__ == "RedisStore"
    sup.counter.hit("acme", "pageview", 7, T0 + 30)
    sup.tick(T0 + 61)
    sup._wait_rolling()
    assert _redis_total(redis_server) == {"1": 7}
    assert sup.store.period("acme", "pageview", 2027)["total"] == 7
    assert sup.store.closed_through() == (T0 + 61) // 60 - 1
    # alert state stays in the SQLite file
    assert os.path.exists(sup.config.database)


def test_redis_not_answering_never_delays_the_tick_and_is_caught_up(redis_sup, redis_server):
    """A Redis that accepts connections and never answers (the worst case:
    each command waits for the socket timeout) costs the tick nothing; the
    ring keeps the minutes and the roll after Redis answers again adds them
    exactly once."""
    sup = redis_sup()
    sup.initialize(T0)
    sup._wait_rolling()  # the catch-up roll at the start
    sup.counter.hit("acme", "pageview", 5, T0 + 10)
    redis_server.proc.send_signal(signal.SIGSTOP)  # up, listening, silent
    try:
        slowest = 0.0
        for m in range(1, 4):
            sup.counter.hit("acme", "pageview", 1, T0 + 60 * m + 1)
            for s in (2, 3):
                started = time.monotonic()
                sup.tick(T0 + 60 * m + s)
                slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.5, f"a tick took {slowest:.2f} s while Redis hung"
        assert sup.counter.count(sup.counter.find("acme", "pageview"), 0, T0 + 185) >= 0
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    sup._wait_rolling()
    sup.tick(T0 + 60 * 5 + 1)
    sup._wait_rolling()
    assert _redis_total(redis_server) == {"1": 8}


def test_redis_down_longer_than_the_ring_records_a_gap_in_redis(redis_sup, redis_server, caplog):
    sup = redis_sup()
    sup.initialize(T0)
    sup._wait_rolling()  # the catch-up roll at the start
    sup.counter.hit("acme", "pageview", 2, T0 + 10)
    sup.tick(T0 + 61)
    sup._wait_rolling()
    redis_server.kill()
    ring = sup.counter.load(segment.H_MINUTE_BUCKETS, 4)
    late = T0 + 60 * (ring + 10)
    sup.counter.hit("acme", "pageview", 3, late - 50)
    with caplog.at_level(logging.ERROR, "trafficthreshold"):
        sup.tick(late - 40)          # Redis down: the roll fails (logged once)
        sup._wait_rolling()
        redis_server.start()         # same port, same append-only file
        sup.tick(late + 1)
        sup._wait_rolling()
    gaps = [json.loads(g) for g in redis_server.client().lrange("track~gaps:web1", 0, -1)]
    assert len(gaps) == 1 and "longer than the ring" in gaps[0]["reason"]
    assert gaps[0]["first_minute"] == (T0 + 61) // 60
    assert any("lost minutes" in r.getMessage() for r in caplog.records)
    assert _redis_total(redis_server)["1"] == 5  # 2 before, 3 still in the ring


def test_a_supervisor_in_another_zone_refuses_to_start(redis_sup, redis_server):
    redis_server.client().hset("track~farm", "timezone", "Europe/Zurich")
    sup = redis_sup()
    with pytest.raises(configuration.ConfigError) as exc:
        sup.initialize(T0)
    assert "UTC" in str(exc.value) and "Europe/Zurich" in str(exc.value)
    assert sup.counter.load(segment.H_SUPERVISOR_PID, 4) == 0


def test_a_reload_keeps_the_running_store_until_a_restart(redis_sup, redis_server, caplog):
    sup = redis_sup()
    sup.initialize(T0)
    sup._wait_rolling()
    with open(sup.config_path) as f:
        text = f.read()
    with open(sup.config_path, "w") as f:
        f.write(text.replace('host = "web1"', 'host = "web9"'))
    with caplog.at_level(logging.WARNING, "trafficthreshold.supervisor"):
        sup.reload()
    assert sup.config.store.host == "web1" and sup.store.host == "web1"
    assert any("store changed" in r.getMessage() and "restart" in r.getMessage()
               for r in caplog.records)


def test_a_redis_hanging_at_the_start_costs_one_socket_timeout_at_most(redis_sup, redis_server):
    """Redis accepts and never answers (SIGSTOP) when the daemon starts: the
    start and the minute's retry each wait one socket timeout (2 s) at most,
    counting goes on, and the store opens and catches up once it answers."""
    sup = redis_sup()
    worker = segment.attach(sup.config.key, "sysv")
    worker.hit("acme", "pageview", 4, T0 + 1)
    worker.detach()
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        sup.initialize(T0 + 2)
        assert time.monotonic() - started < 2.8
        assert sup.store is None and sup.engine is not None  # alerts run anyway
        started = time.monotonic()
        sup.tick(T0 + 61)  # the minute's retry
        assert time.monotonic() - started < 2.8
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    sup.tick(T0 + 121)
    assert sup.store is not None
    sup._wait_rolling()
    assert _redis_total(redis_server) == {"1": 4}


# ------------------------------------------------ reclaim (issue 11, last item)

def _host_worker(key, backend, conn):
    """A web worker process: the module-level hit() with its caches."""
    import trafficthreshold
    try:
        trafficthreshold.configure(key=key, backend=backend, strict=True)
        while (msg := conn.recv()) is not None:
            trafficthreshold.hit(msg[0], n=msg[1], now=msg[2])
            conn.send("done")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def test_made_up_hosts_are_reclaimed_after_the_ring_and_nothing_is_lost(tmp_path, key, backend):
    """Made-up hosts fill the table; idle for longer than the ring and
    rolled, the supervisor reclaims them and new hosts get their slots.  A
    second real process that cached a reclaimed host's slot counts it for
    that host.  The store holds every host's hits exactly."""
    import multiprocessing
    segment.install(key, backend, geometry=segment.Geometry(keys=40, minutes=5), now=T0)
    cfg, path = make_config(tmp_path, key, backend)
    sup = Supervisor(cfg, config_path=path, env={}, pid=4242)
    fork = multiprocessing.get_context("fork")
    parent_end, child_end = fork.Pipe()
    worker = fork.Process(target=_host_worker, args=(key, backend, child_end))
    worker.start()

    def worker_hit(host, n, now):
        parent_end.send((host, n, now))
        assert parent_end.recv() == "done"

    expected: dict[str, int] = {}
    try:
        sup.initialize(T0)
        room = 40 - 2 - 16
        worker_hit("w.example", 5, T0 + 10)
        expected["w.example"] = 5
        for i in range(room - 1):
            sup.counter.hit(f"first-{i}.example", n=i + 1, now=T0 + 10)
            expected[f"first-{i}.example"] = i + 1
        sup.counter.hit("one-too-many.example", now=T0 + 10)  # the table is full
        assert sup.counter.find("one-too-many.example", "pageview") is None
        header = segment.header(sup.counter)
        assert header["keys_used"] - header["free_slots"] == 40 - 16
        for minute in range(1, 8):   # the rolls; the 5-minute ring passes
            sup.tick(T0 + 60 * minute + 1)
        header = segment.header(sup.counter)
        assert header["reclaimed"] == room and header["free_slots"] == room
        assert sup.counter.find("first-0.example", "pageview") is None
        later = T0 + 8 * 60 + 5
        for i in range(room - 1):
            sup.counter.hit(f"second-{i}.example", n=100 + i, now=later)
            expected[f"second-{i}.example"] = 100 + i
            assert sup.counter.find(f"second-{i}.example", "pageview") is not None
        worker_hit("w.example", 3, later + 1)      # its slot went to a second-* host
        expected["w.example"] += 3
        assert segment.header(sup.counter)["keys_used"] == header["keys_used"]
        for minute in range(9, 20):
            sup.tick(T0 + 60 * minute + 1)
        assert segment.header(sup.counter)["reclaimed"] == 2 * room
    finally:
        parent_end.send(None)
        worker.join(10)
        sup.shutdown(T0 + 20 * 60)
    with SQLiteStore(cfg.database, "UTC") as store:
        for host, n in expected.items():
            assert store.period(host, "pageview", 2027)["total"] == n, host
        assert store.period("all", "pageview", 2027)["total"] == sum(expected.values()) + 1
        assert store.gaps() == []


def test_redis_roll_thread_reclaims_after_its_roll(redis_sup, redis_server, key):
    """With Redis the roll runs on its thread, and so does the reclaim,
    after the roll and only once Redis holds the counts."""
    segment.uninstall(key, "sysv", force=True)
    segment.install(key, "sysv", geometry=segment.Geometry(keys=40, minutes=5), now=T0)
    sup = redis_sup()
    sup.initialize(T0)
    sup._wait_rolling()
    sup.counter.hit("acme", "pageview", 7, T0 + 30)
    for minute in range(1, 8):
        sup.tick(T0 + 60 * minute + 1)
        sup._wait_rolling()
    assert sup.counter.find("acme", "pageview") is None
    assert segment.header(sup.counter)["reclaimed"] == 1
    assert sup.store.period("acme", "pageview", 2027)["total"] == 7
    assert _redis_total(redis_server) == {"1": 7}


def test_the_hourly_prune_deletes_old_sent_and_failed_mails(sup, tmp_path):
    """The mail outbox keeps a row per mail; without a prune it grows for
    the life of the database (every alert, reminder and resolution)."""
    import sqlite3

    from trafficthreshold.supervisor import MAIL_KEEP_DAYS, PRUNE_EVERY

    sup.initialize(T0)
    old, recent = T0 - (MAIL_KEEP_DAYS + 1) * 86400, T0 - 86400
    db = sqlite3.connect(str(tmp_path / "stats.sqlite3"))
    with db:
        for created, status in [(old, "sent"), (old, "failed"), (recent, "sent")]:
            db.execute("INSERT INTO alert_outbox (created, kind, rules, sender, recipients, "
                       "message_id, payload, status, next_attempt) "
                       "VALUES (?, 'alert', 'r', 's@x', '[]', '<m@x>', '{}', ?, ?)",
                       (created, status, created))
    sup.tick(T0 + PRUNE_EVERY + 1)
    left = db.execute("SELECT created, status FROM alert_outbox ORDER BY id").fetchall()
    db.close()
    assert left == [(recent, "sent")]
