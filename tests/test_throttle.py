"""Tests of trafficthreshold.throttle: levels, both policies minute by minute."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trafficthreshold.throttle import (
    MAX_LEVEL,
    POLICIES,
    ThrottleState,
    block_text,
    level_for,
    level_range,
    message,
    step,
)

T0 = 1_700_000_000.0  # any Unix time; every test counts minutes from here
COOLDOWN = 300
CRON_TEST = 10800


def run(
    policy: str,
    minutes: Sequence[int],
    multiplier: int = 20,
    cooldown: float = COOLDOWN,
    cron_test: float = CRON_TEST,
) -> tuple[list[int], list[str | None]]:
    """Feed one window count per minute; return the levels and the messages."""
    state = ThrottleState()
    levels, messages = [], []
    for i, hits in enumerate(minutes):
        state, line = step(state, hits, T0 + 60 * i, policy, multiplier, cooldown, cron_test)
        levels.append(state.level)
        messages.append(line)
    return levels, messages


# -- level_for / level_range / message ---------------------------------------


@pytest.mark.parametrize(
    "hits, level",
    [
        (0, 0),
        (19, 0),
        (20, 1),
        (39, 1),
        (40, 2),
        (45, 2),
        (99, 4),
        (100, 5),
        (10**9, 5),
        (-1, 0),
    ],
)
def test_level_for(hits: int, level: int) -> None:
    assert level_for(hits, 20) == level


def test_level_range_is_what_the_drupal_block_shows() -> None:
    assert [level_range(level, 20) for level in range(6)] == [
        (0, 19),
        (20, 39),
        (40, 59),
        (60, 79),
        (80, 99),
        (100, None),
    ]


@pytest.mark.parametrize("level", [-1, 6])
def test_level_range_refuses_levels_outside_0_to_5(level: int) -> None:
    with pytest.raises(ValueError):
        level_range(level, 20)


def test_multiplier_below_1_is_refused() -> None:
    with pytest.raises(ValueError, match="multiplier"):
        level_for(5, 0)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        step(ThrottleState(), 5, T0, "fast", 20, COOLDOWN, CRON_TEST)


def test_messages_are_drupals_watchdog_lines() -> None:
    assert message(45, 0, 2) == "45 hits in past minute; throttle increased to level 2"
    assert message(15, 2, 1) == "15 hits in past minute; throttle decreased to level 1"
    assert message(45, 2, 2) is None


# -- the Drupal worked example, both policies --------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_drupal_worked_example(policy: str) -> None:
    """multiplier 20: 45 hits -> level 2; a later minute of 35 keeps level 2."""
    levels, messages = run(policy, [45, 35])
    assert levels == [2, 2]
    assert messages == ["45 hits in past minute; throttle increased to level 2", None]


def test_worked_example_returns_to_0_only_by_hysteresis_step_down() -> None:
    # 45 hits, then nothing: one level per 5-minute cool-down.
    levels, messages = run("hysteresis", [45] + [0] * 12)
    assert levels == [2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 0, 0]
    assert messages[6] == "0 hits in past minute; throttle decreased to level 1"
    assert messages[11] == "0 hits in past minute; throttle decreased to level 0"
    assert [m for m in messages if m] == [messages[0], messages[6], messages[11]]


def test_worked_example_returns_to_0_only_by_drupal_cron_test() -> None:
    # 45 hits, then 5 a minute for 7 hours: down one level per 3-hour test.
    levels, messages = run("drupal", [45] + [5] * 420)
    assert levels[1:180] == [2] * 179
    assert levels[180] == 1  # 180 minutes = cron_test after the rise
    assert levels[181:360] == [1] * 179
    assert levels[360] == 0
    assert set(levels[361:]) == {0}
    assert messages[180] == "5 hits in past minute; throttle decreased to level 1"
    assert sum(1 for m in messages if m) == 3


# -- hysteresis minute by minute ---------------------------------------------


def test_hysteresis_rises_at_once_even_several_levels() -> None:
    levels, messages = run("hysteresis", [0, 10, 85, 130])
    assert levels == [0, 0, 4, 5]
    assert messages[2] == "85 hits in past minute; throttle increased to level 4"


def test_hysteresis_steps_down_one_level_per_cooldown() -> None:
    # From 5 to 0 takes five cool-downs, one level each, never a jump.
    levels, _ = run("hysteresis", [150] + [0] * 30)
    drops = [i for i in range(1, len(levels)) if levels[i] < levels[i - 1]]
    assert drops == [6, 11, 16, 21, 26]
    assert all(levels[i - 1] - levels[i] == 1 for i in drops)


def test_hysteresis_timer_resets_when_the_count_is_back_above_the_floor() -> None:
    # Below the floor for 4 minutes, above for one, below again: the timer
    # starts over, so the drop comes 5 minutes after the second dip began.
    levels, _ = run("hysteresis", [45, 30, 30, 30, 30, 41] + [30] * 7)
    assert levels[:11] == [2] * 11
    assert levels[11:] == [1, 1]


def test_hysteresis_stops_at_the_level_the_load_still_needs() -> None:
    levels, _ = run("hysteresis", [110] + [45] * 30)
    assert levels[-1] == 2
    assert levels[6] == 4 and levels[11] == 3 and levels[16] == 2


def test_hysteresis_no_flapping_around_a_floor() -> None:
    # A rate oscillating around 40 (level 2's floor) changes the level once.
    oscillating = [41, 39] * 60
    levels, messages = run("hysteresis", oscillating)
    assert set(levels) == {2}
    assert sum(1 for m in messages if m) == 1


def test_hysteresis_slow_oscillation_changes_level_at_most_once_per_cooldown() -> None:
    # 10 minutes above, 10 below: each dip lasts longer than the cool-down.
    pattern = ([45] * 10 + [35] * 10) * 6
    levels, messages = run("hysteresis", pattern)
    changes = [i for i, m in enumerate(messages) if m]
    assert all(b - a >= 5 for a, b in zip(changes[1::2], changes[2::2], strict=False))
    assert set(levels) == {1, 2}


# -- drupal, one test per documented rule (Drupal 4.x throttle help) ---------


def test_drupal_a_check_raises_and_never_lowers() -> None:
    # "45 then 35 hits stays 2"; 80 then 20 stays 4 (it used to drop to 1).
    assert run("drupal", [45, 35])[0] == [2, 2]
    levels, messages = run("drupal", [80, 20, 0, 0, 61])
    assert levels == [4, 4, 4, 4, 4]
    assert messages[1:] == [None] * 4


def test_drupal_at_level_5_checks_are_off_until_cron() -> None:
    # 100 then quiet: 5 stays 5 until the cron test (it used to drop to 0).
    levels, messages = run("drupal", [100] + [0] * 179)
    assert levels == [5] * 180 and messages[1:] == [None] * 179
    state = ThrottleState(level=5, last_test=T0)
    for hits in (0, 99, 100, 10**6):
        assert step(state, hits, T0 + 60, "drupal", 20, COOLDOWN, CRON_TEST) == (state, None)


def test_drupal_cron_drops_one_level_every_cron_test_period() -> None:
    levels, messages = run("drupal", [100] + [0] * 960)
    drops = [i for i in range(1, len(levels)) if levels[i] < levels[i - 1]]
    assert drops == [180, 360, 540, 720, 900]  # counted from the rise, then each drop
    assert all(levels[i - 1] - levels[i] == 1 for i in drops)
    assert levels[-1] == 0
    assert messages[900] == "0 hits in past minute; throttle decreased to level 0"


def test_drupal_cron_test_is_a_parameter_in_seconds() -> None:
    state = ThrottleState()
    state, _ = step(state, 45, T0, "drupal", 20, COOLDOWN, 600)
    state, _ = step(state, 0, T0 + 599.9, "drupal", 20, COOLDOWN, 600)
    assert state.level == 2
    state, line = step(state, 0, T0 + 600, "drupal", 20, COOLDOWN, 600)
    assert state == ThrottleState(level=1, last_test=T0 + 600)
    assert line == "0 hits in past minute; throttle decreased to level 1"


def test_drupal_the_next_check_raises_it_again_if_the_load_is_still_there() -> None:
    state, _ = step(ThrottleState(), 45, T0, "drupal", 20, COOLDOWN, CRON_TEST)
    # Cron at T0 + 3 h: down to 1, whatever the count (no check at that tick).
    state, line = step(state, 45, T0 + CRON_TEST, "drupal", 20, COOLDOWN, CRON_TEST)
    assert state.level == 1
    assert line == "45 hits in past minute; throttle decreased to level 1"
    # The next check, a second later: the load is still there, back to 2.
    state, line = step(state, 45, T0 + CRON_TEST + 1, "drupal", 20, COOLDOWN, CRON_TEST)
    assert state == ThrottleState(level=2, last_test=T0 + CRON_TEST)
    assert line == "45 hits in past minute; throttle increased to level 2"
    # The same at level 5: cron 5 -> 4, the next check 4 -> 5.
    levels, _ = run("drupal", [200] * 182)
    assert levels[179:182] == [5, 4, 5]


def test_drupal_a_rise_keeps_the_cron_timer() -> None:
    # A rise from 1 to 2 keeps the timer started by the rise from 0.
    levels, _ = run("drupal", [25] * 60 + [45] + [25] * 200)
    assert levels[60] == 2
    assert levels[179] == 2 and levels[180] == 1


def test_drupal_back_at_0_the_timer_stops_and_restarts_with_the_next_rise() -> None:
    levels, _ = run("drupal", [25] + [0] * 200 + [25] + [0] * 200)
    assert levels[180] == 0 and levels[201] == 1
    assert levels[380] == 1 and levels[381] == 0  # 180 minutes after the second rise


def test_drupal_no_flapping_around_a_floor() -> None:
    levels, messages = run("drupal", [41, 39] * 60)
    assert set(levels) == {2}
    assert sum(1 for m in messages if m) == 1


def test_block_text_is_drupals() -> None:
    assert block_text(5, 60) == "Current Level: 5 (300+)"
    assert block_text(2, 20) == "Current Level: 2 (40 - 59)"
    assert block_text(0, 60) == "Current Level: 0 (0 - 59)"


# -- both policies -----------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_counting_never_stops_at_level_5(policy: str) -> None:
    state, line = step(ThrottleState(), 100, T0, policy, 20, COOLDOWN, CRON_TEST)
    assert state.level == 5 and line is not None
    state, line = step(state, 100_000, T0 + 60, policy, 20, COOLDOWN, CRON_TEST)
    assert state.level == 5 and line is None
    assert level_range(5, 20) == (100, None)


@pytest.mark.parametrize("policy", POLICIES)
def test_state_is_not_mutated(policy: str) -> None:
    state = ThrottleState(level=3, below_since=T0, last_test=T0)
    step(state, 0, T0 + 99999, policy, 20, COOLDOWN, CRON_TEST)
    assert state == ThrottleState(level=3, below_since=T0, last_test=T0)


@given(
    policy=st.sampled_from(POLICIES),
    multiplier=st.integers(1, 100),
    counts=st.lists(st.integers(0, 1000), min_size=1, max_size=60),
    gaps=st.lists(st.floats(0, 20000), min_size=60, max_size=60),
)
def test_property_level_in_range_and_rises_immediately(
    policy: str, multiplier: int, counts: list[int], gaps: list[float]
) -> None:
    state, now = ThrottleState(), T0
    for hits, gap in zip(counts, gaps, strict=False):
        now += gap
        new, line = step(state, hits, now, policy, multiplier, 60.0, 600.0)
        target = level_for(hits, multiplier)
        assert 0 <= new.level <= MAX_LEVEL
        # At most one level down at a time, for both policies.
        assert new.level >= state.level - 1
        if new.level < state.level and policy == "drupal":
            # Only cron lowers it: cron_test seconds since the timer.
            assert state.last_test is not None and now - state.last_test >= 600.0
        elif new.level < state.level:
            assert new.level >= target  # hysteresis: never below the load
        else:
            # Every rise happens at once: never below what the load needs.
            assert new.level >= target
            if target > state.level:
                assert new.level == target
        assert (line is None) == (new.level == state.level)
        state = new
