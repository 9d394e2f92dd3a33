"""Tests of trafficthreshold.alerts: the pure episode state machine and the cap.

Time is driven by passing ``now``; nothing here sleeps or sends mail.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from trafficthreshold import alerts
from trafficthreshold.alerts import AlertState, Mail, Notice

T0 = 1_700_000_040.0  # the start of an epoch minute
M0 = int(T0 // 60)
SENDER = "tt@localhost"


from tt_alerts import make_rule  # noqa: E402


def tick(
    state: AlertState, rules: list[SimpleNamespace], now: float, n: int = 0, *,
    closed: alerts.Closed | None = None, max_per_hour: int = 0,
) -> tuple[AlertState, list[Mail]]:
    """One tick where every watched count (both windows) is ``n``."""
    counts = {key: n for key in alerts.count_keys(rules)}
    return alerts.step(rules, counts, now, state, max_per_hour=max_per_hour,
                       default_sender=SENDER, closed=closed)


def notices(mails: list[Mail]) -> list[Notice]:
    return [n for m in mails for n in m.notices]


def kinds(mails: list[Mail]) -> list[str]:
    return [n.kind for n in notices(mails)]


# -- firing ------------------------------------------------------------------


def test_fires_on_the_tick_the_count_reaches_the_threshold() -> None:
    rule = make_rule(threshold=10)
    state = AlertState()
    fired_at = []
    for second in range(40):  # one hit per second: count = second
        state, mails = tick(state, [rule], T0 + second, second)
        if mails:
            fired_at.append(second)
            (notice,) = notices(mails)
    assert fired_at == [10]  # mid-minute, the very tick it happened
    assert notice.kind == "alert" and notice.count == 10 and notice.minute == M0
    assert notice.started == T0 + 10
    assert notice.to == ("ops@example.com",)


def test_below_threshold_never_fires() -> None:
    state = AlertState()
    for second in range(0, 600, 7):
        state, mails = tick(state, [make_rule()], T0 + second, 9)
        assert mails == []
    assert state.episodes == {}


def test_one_alert_per_episode() -> None:
    rule = make_rule(repeat=3600)
    state, all_mails = AlertState(), []
    for second in range(15 * 60):  # 15 minutes hot
        state, mails = tick(state, [rule], T0 + second, 50)
        all_mails += mails
    assert kinds(all_mails) == ["alert"]


def test_window_60s_reads_the_sliding_count() -> None:
    rule = make_rule(window="60s")
    state = AlertState()
    counts = {("all", "pageview", "minute"): 0, ("all", "pageview", "60s"): 12}
    state, mails = alerts.step([rule], counts, T0, state, max_per_hour=0, default_sender=SENDER)
    assert kinds(mails) == ["alert"]
    assert notices(mails)[0].window == "60s"


def test_missing_count_counts_as_zero() -> None:
    state, mails = alerts.step([make_rule()], {}, T0, AlertState(), max_per_hour=0,
                               default_sender=SENDER)
    assert mails == [] and state == AlertState()


def test_count_keys_lists_what_the_caller_must_read() -> None:
    rules = [make_rule(), make_rule(name="b", account="shop", window="60s")]
    assert alerts.count_keys(rules) == {("all", "pageview", "minute"),
                                        ("shop", "pageview", "60s")}


# -- reminders -----------------------------------------------------------------


def test_reminders_no_more_often_than_repeat() -> None:
    rule = make_rule(repeat=120)
    state, sent = AlertState(), []
    for second in range(0, 10 * 60):
        state, mails = tick(state, [rule], T0 + second, 50)
        sent += [(second, n.kind, n.reminders) for n in notices(mails)]
    assert sent == [(0, "alert", 0), (120, "reminder", 1), (240, "reminder", 2),
                    (360, "reminder", 3), (480, "reminder", 4)]


def test_no_reminder_while_below_threshold() -> None:
    rule = make_rule(repeat=60, clear_minutes=10)
    state, _ = tick(AlertState(), [rule], T0, 50)
    # Below the threshold for 5 minutes (not yet cleared): nothing.
    for second in range(1, 5 * 60):
        state, mails = tick(state, [rule], T0 + second, 3)
        assert mails == []
    # Hot again: the reminder is long due and goes out at once.
    state, mails = tick(state, [rule], T0 + 300, 11)
    assert kinds(mails) == ["reminder"]


def test_repeat_zero_means_no_reminders() -> None:
    rule = make_rule(repeat=0)
    state, all_mails = AlertState(), []
    for second in range(0, 3 * 3600, 30):
        state, mails = tick(state, [rule], T0 + second, 50)
        all_mails += mails
    assert kinds(all_mails) == ["alert"]


# -- resolution ------------------------------------------------------------------


def test_resolved_after_clear_minutes_closed_minutes_below() -> None:
    rule = make_rule(clear_minutes=5)
    state, _ = tick(AlertState(), [rule], T0 + 30, 10)  # fires in minute M0
    state, _ = tick(state, [rule], T0 + 90, 25)  # peak in M0 + 1, the last hot minute
    # M0+2 .. M0+6 are quiet; the last second of M0+6 is not enough yet ...
    for now in range(int(T0) + 120, int(T0) + 7 * 60, 10):
        state, mails = tick(state, [rule], now, 1)
        assert mails == [], now
    # ... the first tick of M0+7 closes the fifth quiet minute.
    state, mails = tick(state, [rule], T0 + 7 * 60, 1)
    (notice,) = notices(mails)
    assert notice.kind == "resolved"
    assert notice.peak == 25 and notice.peak_minute == M0 + 1
    assert notice.started == T0 + 30
    assert notice.ended == T0 + 120  # end of the last hot minute
    assert mails[0].kind == "resolved"
    assert state.episodes == {}


def test_hot_minute_before_clear_extends_the_episode() -> None:
    rule = make_rule(clear_minutes=3)
    state, _ = tick(AlertState(), [rule], T0, 10)
    state, _ = tick(state, [rule], T0 + 2 * 60 + 5, 1)
    state, mails = tick(state, [rule], T0 + 3 * 60 + 5, 12)  # hot again in M0+3
    assert mails == []
    state, mails = tick(state, [rule], T0 + 6 * 60, 0)  # only M0+4, M0+5 quiet
    assert mails == []
    state, mails = tick(state, [rule], T0 + 7 * 60, 0)
    assert kinds(mails) == ["resolved"]


def test_resolved_false_ends_silently_and_the_next_burst_is_a_new_alert() -> None:
    rule = make_rule(resolved=False, clear_minutes=2)
    state, mails = tick(AlertState(), [rule], T0, 10)
    assert kinds(mails) == ["alert"]
    state, mails = tick(state, [rule], T0 + 3 * 60, 0)
    assert mails == [] and state.episodes == {}
    state, mails = tick(state, [rule], T0 + 3 * 60 + 1, 10)
    assert kinds(mails) == ["alert"]


def test_closed_minute_count_marks_a_minute_hot() -> None:
    # The ticks never saw 10 in M0+1, but its final count was 11.
    rule = make_rule(clear_minutes=1)
    state, _ = tick(AlertState(), [rule], T0, 10)
    state, _ = tick(state, [rule], T0 + 119, 9)
    closed = {("all", "pageview"): {M0 + 1: 11}}
    state, mails = tick(state, [rule], T0 + 120, 0, closed=closed)
    assert mails == [] and state.episodes["burst"].last_hot_minute == M0 + 1
    state, mails = tick(state, [rule], T0 + 180, 0, closed=closed)
    assert kinds(mails) == ["resolved"]


def test_closed_previous_minute_fires_late_when_the_last_second_crossed() -> None:
    rule = make_rule()
    state, _ = tick(AlertState(), [rule], T0 + 59, 9)
    closed = {("all", "pageview"): {M0: 10, M0 - 5: 99}}
    state, mails = tick(state, [rule], T0 + 60, 0, closed=closed)
    (notice,) = notices(mails)
    assert notice.kind == "alert" and notice.count == 10 and notice.minute == M0


def test_removed_rule_forgets_its_episode() -> None:
    state, _ = tick(AlertState(), [make_rule()], T0, 10)
    state, mails = tick(state, [make_rule(name="other")], T0 + 1, 0)
    assert "burst" not in state.episodes and mails == []


# -- grouping and the cap --------------------------------------------------------


def test_same_second_same_recipients_is_one_mail() -> None:
    rules = [make_rule(name="a", to=("x@e.com", "y@e.com")),
             make_rule(name="b", to=("y@e.com", "x@e.com")),
             make_rule(name="c", to=("z@e.com",))]
    state, mails = tick(AlertState(), rules, T0, 10)
    assert len(mails) == 2
    assert [n.rule for n in mails[0].notices] == ["a", "b"]
    assert mails[0].to == ("x@e.com", "y@e.com") and mails[0].sender == SENDER
    assert [n.rule for n in mails[1].notices] == ["c"]


def test_rule_sender_makes_its_own_group() -> None:
    rules = [make_rule(name="a"), make_rule(name="b", sender="web@e.com")]
    state, mails = tick(AlertState(), rules, T0, 10)
    assert sorted(m.sender for m in mails) == [SENDER, "web@e.com"]


def _fire_one_rule_per_tick(count: int, start: float, max_per_hour: int,
                            state: AlertState) -> tuple[AlertState, list[Mail]]:
    """Rules r0..r{count-1}; rule i turns hot at start + i (others stay hot)."""
    # Each rule watches its own account, so they can turn hot one tick apart.
    rules = [make_rule(name=f"r{i}", account=f"acct{i}") for i in range(count)]
    all_mails: list[Mail] = []
    for i in range(count):
        counts = {(r.account, "pageview", "minute"): (10 if j <= i else 0)
                  for j, r in enumerate(rules)}
        state, mails = alerts.step(rules, counts, start + i, state,
                                   max_per_hour=max_per_hour, default_sender=SENDER)
        all_mails += mails
    return state, all_mails


def test_cap_suppresses_and_the_next_mail_says_how_many() -> None:
    state, mails = _fire_one_rule_per_tick(5, T0, 3, AlertState())
    assert len(mails) == 3
    assert state.suppressed == ((SENDER, ("ops@example.com",), 2),)
    # Within the hour: still no room, nothing planned, state unchanged.
    later, mails = alerts.plan_mails([], T0 + 3599, state, 3, SENDER)
    assert mails == [] and later is state
    # The first mail leaves the sliding hour: one summary mail.
    state, mails = alerts.plan_mails([], T0 + 3600, state, 3, SENDER)
    (mail,) = mails
    assert mail.kind == "suppressed" and mail.suppressed == 2 and mail.notices == ()
    assert state.suppressed == ()


def test_suppressed_count_rides_on_the_next_allowed_alert() -> None:
    state, _ = _fire_one_rule_per_tick(4, T0, 3, AlertState())
    rule = make_rule(name="late", account="late")
    state, mails = alerts.step([rule], {("late", "pageview", "minute"): 10}, T0 + 3600,
                               state, max_per_hour=3, default_sender=SENDER)
    (mail,) = mails
    assert [n.rule for n in mail.notices] == ["late"] and mail.suppressed == 1


def test_no_cap_when_max_per_hour_is_zero() -> None:
    state, mails = _fire_one_rule_per_tick(30, T0, 0, AlertState())
    assert len(mails) == 30 and state.suppressed == ()


def test_quiet_tick_returns_the_same_state_object() -> None:
    state, _ = tick(AlertState(), [make_rule()], T0, 0)
    again, mails = tick(state, [make_rule()], T0 + 1, 0)
    assert again == state and mails == []


# -- persistence ----------------------------------------------------------------


def test_state_survives_a_json_round_trip_and_a_restart_sends_no_duplicate() -> None:
    rules = [make_rule(repeat=600), make_rule(name="other", to=("b@e.com",))]
    state, mails = tick(AlertState(), rules, T0, 10, max_per_hour=1)
    assert len(mails) == 1 and state.suppressed  # some suppression too
    text = json.dumps(alerts.state_to_json(state))
    restored = alerts.state_from_json(json.loads(text))
    assert restored == state
    # "Restarted" with the restored state: the open episode does not fire again.
    _, mails = tick(restored, rules, T0 + 5, 50, max_per_hour=0)
    assert "alert" not in kinds(mails)


def test_mail_and_context_json_round_trip() -> None:
    _, mails = tick(AlertState(), [make_rule()], T0, 10)
    text = json.dumps(alerts.mail_to_json(mails[0]))
    assert alerts.mail_from_json(json.loads(text)) == mails[0]
    ctx = alerts.MailContext(host="h", top_accounts=(("a", 3),), throttle_level=2)
    assert alerts.context_from_json(json.loads(json.dumps(alerts.context_to_json(ctx)))) == ctx
