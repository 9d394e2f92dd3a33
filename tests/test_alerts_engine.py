"""The alert engine (trafficthreshold.alerts.engine) over both queues: the
host's AlertStore in a real SQLite file, the farm's FencedQueue in a real
redis-server."""

from __future__ import annotations

import sqlite3
import time
from types import SimpleNamespace
from typing import Any

import pytest

from trafficthreshold import farm
from trafficthreshold.alerts import AlertState
from trafficthreshold.alerts.engine import AlertEngine, MailQueue, default_sender
from trafficthreshold.alerts.farm import FarmAlertStore, FencedOut, FencedQueue
from trafficthreshold.alerts.store import AlertStore

# The host queue's fixture and constants (``db`` is a pytest fixture).
from test_alerts_store import COUNT_KEY, MAIL, T0, db, make_rule  # noqa: E402,F401


# -- the engine ------------------------------------------------------------------


def test_engine_queues_once_and_a_restart_continues_the_episode(db: str) -> None:
    woken: list[int] = []
    rule = make_rule(repeat=300, clear_minutes=2)
    store = AlertStore(db)
    engine = AlertEngine(store, [rule], MAIL, host="h", on_queued=lambda: woken.append(1))
    assert engine.tick(T0, {COUNT_KEY: 10}) != []
    assert all(engine.tick(T0 + s, {COUNT_KEY: 10 + s}) == [] for s in range(1, 30))
    store.close()
    # Restart mid-episode: a new store and engine on the same file.
    store = AlertStore(db)
    engine = AlertEngine(store, [rule], MAIL, host="h")
    assert engine.state.episodes["burst"].peak == 39
    assert all(engine.tick(T0 + s, {COUNT_KEY: 50}) == [] for s in range(30, 300))
    assert engine.tick(T0 + 300, {COUNT_KEY: 50}) != []  # the reminder, on time
    assert engine.tick(T0 + 301, {COUNT_KEY: 0}) == []
    resolved = engine.tick(T0 + 8 * 60, {COUNT_KEY: 0})
    kinds = [m.kind for m in reversed(store.list())]
    assert kinds == ["alert", "alert", "resolved"]  # alert, reminder, resolved
    assert [n.kind for m in reversed(store.list()) for n in m.mail.notices] == [
        "alert", "reminder", "resolved"]
    assert resolved and woken == [1]
    assert store.list()[0].context.dashboard_url == "http://d/"
    store.close()


def test_engine_writes_only_when_something_changed(db: str) -> None:
    store = AlertStore(db)
    engine = AlertEngine(store, [make_rule()], MAIL, host="h")
    calls: list[int] = []
    real_save = store.save
    store.save = lambda *a, **k: calls.append(1) or real_save(*a, **k)  # type: ignore
    for s in range(100):
        engine.tick(T0 + s, {COUNT_KEY: 3})
    assert calls == []
    engine.tick(T0 + 100, {COUNT_KEY: 10})
    assert calls == [1]
    store.close()


def test_engine_keeps_old_state_when_saving_fails(db: str, caplog: pytest.LogCaptureFixture
                                                  ) -> None:
    store = AlertStore(db)
    engine = AlertEngine(store, [make_rule()], MAIL, host="h")

    def failing_save(*args: Any, **kwargs: Any) -> list[int]:
        raise sqlite3.OperationalError("database is locked")

    real_save, store.save = store.save, failing_save  # type: ignore
    assert engine.tick(T0, {COUNT_KEY: 10}) == []  # logged, not raised
    store.save = real_save  # type: ignore
    assert engine.state == AlertState()
    assert "database is locked; retrying next tick" in caplog.text
    assert engine.tick(T0 + 1, {COUNT_KEY: 10}) != []  # fires on the next tick
    store.close()


def test_engine_reload_keeps_open_episodes(db: str) -> None:
    store = AlertStore(db)
    engine = AlertEngine(store, [make_rule(threshold=10)], MAIL, host="h")
    engine.tick(T0, {COUNT_KEY: 10})
    engine.reload([make_rule(threshold=5, repeat=3600)], MAIL)
    assert engine.tick(T0 + 1, {COUNT_KEY: 20}) == []
    assert "burst" in engine.state.episodes
    engine.reload([make_rule(name="second")], MAIL, dashboard_url="http://127.0.0.1:8787/")
    (mail_id,) = engine.tick(T0 + 2, {COUNT_KEY: 20})
    assert store.get(mail_id).context.dashboard_url == "http://127.0.0.1:8787/"
    store.close()


def test_engine_keeps_the_documented_meaning_of_repeat_0_and_max_per_hour_0(db: str) -> None:
    """docs/alerts.rst: ``repeat = 0`` turns reminders off; ``max_per_hour = 0``
    is no cap.  Both come through config.parse, as the daemon reads them."""
    from trafficthreshold import config
    text = "[mail]\nmax_per_hour = 0\n" + "".join(
        f"[[alert]]\nname = 'r{i}'\nto = ['o{i}@example.com']\nrepeat = 0\nclear_minutes = 1\n"
        for i in range(30))
    cfg = config.parse(text, "config.toml")
    with AlertStore(db) as store:
        engine = AlertEngine(store, cfg.alerts, cfg.mail, host="h")
        assert len(engine.tick(T0, {COUNT_KEY: 50})) == 30  # 30 > the default cap of 20
        # Hot for two more hours: no reminder ever, whatever the time since the alert.
        for second in range(1, 7200, 30):
            assert engine.tick(T0 + second, {COUNT_KEY: 50}) == []
        assert len(store.list(limit=1000)) == 30


# -- one interface, two queues ---------------------------------------------------


def test_both_queues_declare_every_method_of_the_interface() -> None:
    wanted = {name for name in vars(MailQueue) if not name.startswith("_")} \
        | set(MailQueue.__annotations__)
    for queue in (AlertStore, FencedQueue):
        missing = {name for name in wanted
                   if not hasattr(queue, name) and name not in ("where",)}
        assert not missing, (queue, missing)


def test_the_default_sender_is_the_configured_one_else_the_hosts() -> None:
    assert default_sender(MAIL, "web1") == "tt@localhost"
    assert default_sender(SimpleNamespace(sender=""), "web1") == "trafficthreshold@web1"


@pytest.mark.redis
def test_the_engine_over_the_farm_queue_saves_fenced_and_never_hides_a_lost_save(
        redis_server) -> None:
    """Over the farm's queue a failed save is not retried as if nothing was
    written (FencedQueue.UNSAVED_ERRORS is empty): FencedOut propagates, the
    state in memory stays the old one, and the queue holds nothing of it."""
    client = redis_server.client()
    a = farm.Lease(client, "web1", ttl_ms=300)
    b = farm.Lease(client, "web2", ttl_ms=10_000)
    store = FarmAlertStore(client)
    assert a.renew()
    engine = AlertEngine(FencedQueue(store, a.value), [make_rule()], MAIL, host="web1",
                         load=False)
    (first,) = engine.tick(T0, {COUNT_KEY: 10})
    assert store.get(first).context.host == "web1" and store.get(first).sender == "tt@localhost"
    assert "burst" in store.load_state().episodes
    time.sleep(0.4)  # A is paused past its lease; B takes over
    assert b.renew()
    engine.reload([make_rule(name="second")], MAIL)
    saved = engine.state
    with pytest.raises(FencedOut):
        engine.tick(T0 + 1, {COUNT_KEY: 10})
    assert engine.state is saved
    assert [m.id for m in store.list()] == [first]
    # B's engine reads the state A saved and goes on with it.
    engine_b = AlertEngine(FencedQueue(store, b.value), [make_rule()], MAIL, host="web2",
                           load=False)
    assert engine_b.tick(T0 + 2, {COUNT_KEY: 10}) == []
    assert "burst" in engine_b.state.episodes
