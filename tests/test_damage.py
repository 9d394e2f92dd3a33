"""A damaged SQLite file, one table at a time: every sqlite3 error on every
path (the API's readers, /metrics, the dashboard, the daemon's roll-up,
alerts and mail threads) ends as the documented 503 or one log line naming
the file and the recovery, never a 500 or a traceback (issue #22 item 11).

For each table of a real store file written by a real supervisor: a fresh
copy, 48 random bytes over the header of the table's root b-tree page.
"""
from __future__ import annotations

import logging
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from apps.harness import fetch
from trafficthreshold import api, config as configuration, segment
from trafficthreshold.supervisor import Supervisor

T0 = 1_800_000_000
#: Every table of a store file with host alerts.
TABLES = ["alert_meta", "alert_outbox", "alert_state", "days", "funnels", "gaps", "hours",
          "keys", "meta", "minutes", "months", "sqlite_sequence", "watermarks"]
#: Damages per table, each with its own random bytes.
SEEDS = range(6)
ROUTES = ("api/stats/track/acme/pageview/2027", "api/stats/track/acme/pageview/2027/1/15",
          "api/stats/track", "api/stats/track/acme", "api/stats/track/acme/pageview",
          "api/stats/funnels", "api/stats/funnels/acme/order/2027", "api/stats/live",
          "metrics", "", "api/openapi.json")


def write_config(tmp_path: Path, key: int, backend: str, database: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
key = {key}
backend = "{backend}"
database = "{database}"
timezone = "UTC"
[http]
enabled = false
[mail]
transport = "smtp"
smtp_host = "127.0.0.1"
smtp_port = 9
timeout = 1
[[alert]]
name = "burst"
threshold = 5
to = ["ops@example.com"]
""")
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A store file as a daemon leaves it: periods, funnels, watermarks,
    gaps, the alert state and a queued mail."""
    tmp = tmp_path_factory.mktemp("pristine")
    key = segment.unused_key()
    segment.install(key, "sysv", now=T0)
    try:
        database = tmp / "stats.sqlite3"
        path = write_config(tmp, key, "sysv", database)
        sup = Supervisor(configuration.load(str(path), env={}), config_path=str(path), env={})
        sup.initialize(T0)
        sup.counter.hit("acme", "pageview", 9, T0 + 10)
        for i in range(40):                    # rows enough to span a page or two
            sup.counter.hit(f"site{i}.example", "pageview", i + 1, T0 + 10)
        sup.counter.hit("acme", "order/paid", 2, T0 + 10)
        sup.tick(T0 + 11)                      # the alert fires: state and a mail
        sup.tick(T0 + 61)                      # rolled
        sup.shutdown(T0 + 62)
    finally:
        segment.uninstall(key, "sysv", force=True)
    with sqlite3.connect(database) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return database


def tables(path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT name, rootpage FROM sqlite_master WHERE type = 'table' "
                            "AND rootpage > 1 ORDER BY name").fetchall()


def damaged_copy(pristine: Path, into: Path, table: str, seed: int) -> Path:
    """A copy of the store with 48 random bytes over ``table``'s root page
    header (a bad sector under one table)."""
    into = into / f"{table}-{seed}"
    into.mkdir()
    copy = into / "stats.sqlite3"
    shutil.copyfile(pristine, copy)
    with sqlite3.connect(copy) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = dict(tables(copy))[table]
    conn.close()
    with open(copy, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(random.Random(f"{table}-{seed}").randbytes(48))
    return copy


def test_the_pristine_store_has_the_tables_this_test_damages(pristine):
    """Every table of the file is damaged in turn (a new table: add it)."""
    assert sorted(name for name, _root in tables(pristine)) == sorted(TABLES)


@pytest.mark.parametrize("backend", ["sysv"])
@pytest.mark.parametrize("table", TABLES)
def test_every_route_answers_200_404_or_503(pristine, tmp_path, installed, serve, table,
                                            caplog):
    key, backend = installed
    current: list = []
    server = serve(lambda environ, start_response: current[0](environ, start_response))
    for seed in SEEDS:
        copy = damaged_copy(pristine, tmp_path, table, seed)
        config = configuration.Config(key=key, backend=backend, database=str(copy),
                                      timezone="UTC")
        current[:] = [api.make_app(config, now=lambda: T0 + 120)]  # new threads' stores
        for route in ROUTES:
            status, headers, body = fetch(server.url + route)
            assert status in (200, 404, 503), (table, seed, route, status, body[:300])
            if status == 503:
                assert str(copy) in body.decode(), (table, seed, route, body[:300])
    assert not [r for r in caplog.records if r.exc_info], caplog.text


@pytest.mark.parametrize("backend", ["sysv"])
@pytest.mark.parametrize("table", TABLES)
def test_the_daemon_logs_one_line_never_a_traceback(pristine, tmp_path, installed, table,
                                                    caplog):
    caplog.set_level(logging.INFO, "trafficthreshold")
    for seed in SEEDS:
        copy = damaged_copy(pristine, tmp_path, table, seed)
        path = write_config(copy.parent, *installed, copy)
        sup = Supervisor(configuration.load(str(path), env={}), config_path=str(path), env={})
        try:
            sup.initialize(T0 + 120)
            sup.counter.hit("acme", "pageview", 9, T0 + 130)
            for t in range(T0 + 130, T0 + 250, 30):
                sup.tick(t)
            sup.reload()
        finally:
            sup.shutdown(T0 + 260)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for line in errors:
        assert "\n" not in line, line


#: Values no writer of the file wrote, where SQLite sees no damage (a bad
#: sector under a row, not under a page header): the reader must notice.
GARBAGE = [
    "UPDATE months SET count = 'abc' WHERE account = 'acme'",
    "UPDATE months SET count = X'00ff' WHERE account = 'acme'",
    "UPDATE months SET count = 1e300 WHERE account = 'all'",
    "UPDATE days SET count = 'x'",
    "UPDATE hours SET count = -5",
    "UPDATE funnels SET count = 'x'",
    "UPDATE minutes SET count = 'x'",
    "UPDATE meta SET value = 'abc' WHERE name = 'last_roll_at'",
    "UPDATE meta SET value = 'x' WHERE name = 'closed_through'",
    "INSERT OR REPLACE INTO meta (name, value) VALUES ('bad_keys', '{')",
    "INSERT OR REPLACE INTO meta (name, value) VALUES ('late_dropped', 'many')",
    "UPDATE alert_state SET value = 'garbage'",
    "UPDATE alert_state SET value = '{\"episodes\": 5}'",
    # A name that is not text (a damaged cell's serial type): /metrics
    # sorted bytes against str, the dashboard called bytes.startswith(str).
    "UPDATE months SET account = X'00ff' WHERE account = 'acme'",
    "UPDATE months SET event = 7 WHERE account = 'acme'",
    "UPDATE funnels SET account = X'ff' WHERE account = 'acme'",
    "UPDATE funnels SET status = X'ff' WHERE account = 'acme'",
    "UPDATE keys SET event = X'ff' WHERE event = 'pageview' AND account != 'all'",
    "UPDATE keys SET account = 5 WHERE account = 'acme'",
    "UPDATE minutes SET account = X'ff' WHERE account = 'acme'",
    # A time that parses but is no time: the dashboard's int(now - nan).
    "UPDATE meta SET value = 'nan' WHERE name = 'last_roll_at'",
    "UPDATE meta SET value = '1e400' WHERE name = 'last_roll_at'",
]


@pytest.mark.parametrize("backend", ["sysv"])
@pytest.mark.parametrize("statement", GARBAGE)
def test_a_value_no_writer_wrote_is_a_503_not_a_500(pristine, tmp_path, installed, serve,
                                                    statement, caplog):
    """They used to be 500s (a TypeError in a sum, a ValueError in float()):
    now the 503 of a damaged file, naming it and the recovery."""
    copy = garbled_copy(pristine, tmp_path, statement)
    key, backend = installed
    config = configuration.Config(key=key, backend=backend, database=str(copy), timezone="UTC")
    server = serve(api.make_app(config, now=lambda: T0 + 120))
    for route in ROUTES:
        status, headers, body = fetch(server.url + route)
        assert status in (200, 404, 503), (statement, route, status, body[:300])
        if status == 503:
            assert "malformed" in body.decode() and ".recover" in body.decode(), body[:300]
    assert not [r for r in caplog.records if r.exc_info], caplog.text


@pytest.mark.parametrize("backend", ["sysv"])
@pytest.mark.parametrize("table", ["alert_outbox", "alert_meta"])
def test_the_mail_thread_logs_one_line_never_a_traceback(pristine, tmp_path, installed, table,
                                                         caplog):
    """The outbox thread meets the damage on its own (its first pass runs
    at start): one line, once, not a traceback every second."""
    caplog.set_level(logging.INFO, "trafficthreshold")
    daemon_and_mail_thread(damaged_copy(pristine, tmp_path, table, 0), installed)
    assert_one_line_once(caplog)


def garbled_copy(pristine: Path, into: Path, statement: str) -> Path:
    """A copy of the store with ``statement`` run on it (a value no writer wrote)."""
    copy = into / "stats.sqlite3"
    shutil.copyfile(pristine, copy)
    with sqlite3.connect(copy) as conn:
        assert conn.execute(statement).rowcount > 0
    conn.close()
    return copy


def daemon_and_mail_thread(copy: Path, installed: tuple[int, str], ticks: int = 0) -> None:
    """A supervisor on ``copy`` (its start, ``ticks`` ticks), then the mail
    thread on its own for ten passes."""
    import time
    from trafficthreshold.alerts.mail import Outbox
    path = write_config(copy.parent, *installed, copy)
    sup = Supervisor(configuration.load(str(path), env={}), config_path=str(path), env={})
    try:
        sup.initialize(T0 + 120)
        for t in range(ticks):
            sup.tick(T0 + 130 + 30 * t)
        outbox = Outbox(str(copy), sup.config.mail, poll=0.05)  # the thread, on its own
        outbox.start()
        time.sleep(0.5)                                           # ten passes
        outbox.stop()
    finally:
        sup.shutdown(T0 + 260)


def assert_one_line_once(caplog: pytest.LogCaptureFixture) -> None:
    """No traceback; the mail thread's failure logged once at most; every
    error one line."""
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    mail = [r.getMessage() for r in caplog.records if "mail delivery pass" in r.getMessage()]
    assert len(mail) <= 1, mail
    for line in [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]:
        assert "\n" not in line, line


#: Values of the alert tables no writer wrote (SQLite sees no damage).
ALERT_GARBAGE = [
    "UPDATE alert_meta SET value = 'x' WHERE key = 'schema_version'",
    "UPDATE alert_outbox SET payload = '{'",
    "UPDATE alert_outbox SET payload = '{\"mail\": 5}'",
    "UPDATE alert_outbox SET recipients = 'x'",
    "UPDATE alert_outbox SET next_attempt = 'soon'",
]


@pytest.mark.parametrize("backend", ["sysv"])
@pytest.mark.parametrize("statement", ALERT_GARBAGE)
def test_alert_values_no_writer_wrote_are_one_line(pristine, tmp_path, installed, statement,
                                                   caplog):
    """The daemon (opening the alert store, its alert pass) and the mail
    thread (every pass reads the outbox): one line naming the file, once,
    not a traceback (they were a ValueError's traceback, the mail thread's
    every pass)."""
    caplog.set_level(logging.INFO, "trafficthreshold")
    daemon_and_mail_thread(garbled_copy(pristine, tmp_path, statement), installed, ticks=3)
    assert_one_line_once(caplog)
