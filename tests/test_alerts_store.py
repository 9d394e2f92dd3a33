"""Tests of trafficthreshold.alertstore: alert state + mail queue in SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from trafficthreshold import alerts
from trafficthreshold.alerts import AlertState, MailContext
from trafficthreshold.alerts.store import SCHEMA_VERSION, AlertStore, AlertStoreError
from trafficthreshold.errors import TrafficThresholdError

T0 = 1_700_000_040.0


import functools  # noqa: E402

import tt_alerts  # noqa: E402

#: Shorter reminders and clearing than the defaults, for these tests.
make_rule = functools.partial(tt_alerts.make_rule, repeat=300, clear_minutes=2)


MAIL = SimpleNamespace(sender="tt@localhost", max_per_hour=20, dashboard_url="http://d/")
COUNT_KEY = ("all", "pageview", "minute")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "stats.sqlite3")


def queue_one(store: AlertStore, now: float = T0) -> int:
    """Save a state with one open episode and queue its alert mail."""
    state, mails = alerts.step([make_rule()], {COUNT_KEY: 10}, now, AlertState(),
                               max_per_hour=20, default_sender="tt@localhost")
    (mail_id,) = store.save(state, [(m, MailContext(host="h")) for m in mails], now=now)
    return mail_id


# -- schema ------------------------------------------------------------------


def test_schema_lives_in_alert_tables_and_leaves_user_version_alone(db: str) -> None:
    # The period store's tables and its user_version are there first.
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE minute (m INTEGER PRIMARY KEY, n INTEGER)")
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    with AlertStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
    conn = sqlite3.connect(db)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 7
    assert {"alert_meta", "alert_state", "alert_outbox", "minute"} <= tables
    assert all(t.startswith("alert_") or t in ("minute", "sqlite_sequence") for t in tables)
    conn.close()


def test_reopening_is_idempotent(db: str) -> None:
    for _ in range(3):
        AlertStore(db).close()
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT key, value FROM alert_meta").fetchall()
    assert rows == [("schema_version", str(SCHEMA_VERSION))]


def test_newer_schema_is_refused_with_advice(db: str) -> None:
    AlertStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE alert_meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(AlertStoreError, match="upgrade trafficthreshold") as info:
        AlertStore(db)
    assert isinstance(info.value, TrafficThresholdError)


def test_version_1_tables_gain_claimed_at_and_keep_their_rows(db: str) -> None:
    from trafficthreshold.alerts.store import SCHEMA_V1
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE alert_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for statement in SCHEMA_V1:
        conn.execute(statement)
    conn.execute("INSERT INTO alert_meta VALUES ('schema_version', '1')")
    conn.execute("""INSERT INTO alert_outbox (created, kind, rules, sender, recipients,
                    message_id, payload, next_attempt, status)
                    VALUES (1, 'alert', 'r', 's', '[]', '<m@h>', '{}', 1, 'sent')""")
    conn.commit()
    conn.close()
    with AlertStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION == 2
        assert store.prune(2) == 1  # the old row is still there, and prunable
        mail_id = queue_one(store)
        assert store.claim(mail_id, T0) and store.get(mail_id).claimed_at == T0
        assert store.list("sending")[0].id == mail_id


def test_wal_and_busy_timeout(db: str) -> None:
    with AlertStore(db) as store:
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


# -- state + queue -------------------------------------------------------------


def test_state_and_mail_are_saved_together_and_survive_reopening(db: str) -> None:
    with AlertStore(db) as store:
        mail_id = queue_one(store)
    with AlertStore(db) as store:
        state = store.load_state()
        assert state.episodes["burst"].started == T0
        item = store.get(mail_id)
    assert item is not None
    assert item.status == "pending" and item.attempts == 0 and item.kind == "alert"
    assert item.rules == ("burst",) and item.recipients == ("ops@example.com",)
    assert item.message_id.startswith("<") and item.message_id.endswith("@h>")
    assert item.mail.notices[0].count == 10 and item.context.host == "h"


def test_a_failed_transaction_keeps_neither_state_nor_mail(db: str) -> None:
    with AlertStore(db) as store:
        state, mails = alerts.step([make_rule()], {COUNT_KEY: 10}, T0, AlertState(),
                                   max_per_hour=20, default_sender="tt@localhost")

        def broken_id(host: str) -> str:
            raise RuntimeError("disk on fire")

        with pytest.raises(RuntimeError):
            store.save(state, [(mails[0], MailContext())], now=T0, message_id=broken_id)
        assert store.load_state() == AlertState()
        assert store.list() == []


def test_next_due_mark_sent_mark_failed_and_attempts(db: str) -> None:
    with AlertStore(db) as store:
        first, second = queue_one(store, T0), queue_one(store, T0 + 1)
        assert store.next_due(T0 - 1) is None
        assert store.next_due(T0 + 5).id == first  # oldest first
        store.mark_failed(first, T0 + 5, "exit 75", retry_at=T0 + 65)
        assert store.next_due(T0 + 6).id == second
        store.mark_sent(second, T0 + 6)
        assert store.next_due(T0 + 7) is None
        assert store.next_wakeup() == T0 + 65
        item = store.next_due(T0 + 65)
        assert item.id == first and item.attempts == 1 and item.last_error == "exit 75"
        store.mark_failed(first, T0 + 65, "exit 1: boom", retry_at=None)  # given up
        assert store.next_due(T0 + 10_000) is None and store.next_wakeup() is None
        listed = {m.id: m for m in store.list()}
        assert listed[first].status == "failed" and listed[first].attempts == 2
        assert listed[first].last_error == "exit 1: boom"
        assert listed[second].status == "sent" and listed[second].sent_at == T0 + 6
        assert [m.id for m in store.list()] == [second, first]  # newest first
        assert [m.id for m in store.list(status="failed")] == [first]
        with pytest.raises(ValueError):
            store.list(status="bogus")
        assert store.prune(before=T0 + 2) == 2
        assert store.list() == []
