"""The throttle: a window count of hits -> a level 0..5, and how it moves.

Pure functions, no I/O, and the clock is a parameter (``now``, float Unix
seconds): the supervisor reads the clock once per tick and passes it in.

This is Drupal's auto-throttle (``throttle.module``).  Every evaluation looks
at the number of hits in the past minute and maps it to a level::

    level = min(5, hits // multiplier)

so with ``multiplier = 20`` level 1 starts at 20 hits a minute, level 2 at 40,
and level 5 at 100.  Level 5 is the ceiling of the *level*, not of counting:
hits are still counted (and reported) however high they go.

How the level moves is the *policy*:

``"hysteresis"`` (the default)
    Rise at once.  Step down one level only after the count has stayed below
    the current level's floor (``level * multiplier``) for ``cooldown``
    seconds; the timer restarts after each step-down, so falling from 5 to 0
    takes at least five cool-downs.  A rate oscillating around a floor never
    makes the level flap.

``"drupal"``
    Drupal 4.x's auto-throttle as its help and settings page describe it.
    A *check* (every evaluation) raises the level to the one the count
    calls for, and never lowers it: 45 then 35 hits a minute stays at 2.  At
    level 5 the checks are switched off until cron.  *Cron* lowers the level
    by one every ``cron_test`` seconds (Drupal's "cron test", three hours by
    default), counted from the rise from 0 and then from the last drop; an
    evaluation at which cron drops the level makes no check, and the next
    one (a second later under the supervisor) raises the level again if the
    load is still there, with both watchdog lines, as in Drupal.  Falling
    from 5 to 0 therefore takes five cron tests.

There is no "probability limiter": Drupal checked on one request in N to
save a database query per request; here a check is a shared-memory read of
a few nanoseconds, done once a second by the supervisor.

Each change comes with Drupal's watchdog line, e.g.
``"45 hits in past minute; throttle increased to level 2"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

#: The highest level; counting goes on above it.
MAX_LEVEL = 5

#: The policy names, in documentation order; the first is the default.
POLICIES = ("hysteresis", "drupal")


@dataclasses.dataclass(frozen=True)
class ThrottleState:
    """What the throttle remembers between two evaluations.

    ``below_since``: when the count was first seen below the current level's
    floor (policy "hysteresis"); None while it is not below.
    ``last_test``: the cron timer of policy "drupal": when cron last lowered
    the level, or when the level rose from 0; None while the level is 0.
    """

    level: int = 0
    below_since: float | None = None
    last_test: float | None = None


Step = tuple[ThrottleState, str | None]


def level_for(hits: int, multiplier: int) -> int:
    """Return the level for ``hits`` in the window: ``min(5, hits // multiplier)``.

    >>> level_for(45, 20)
    2
    >>> level_for(10_000, 20)
    5
    """
    _check_multiplier(multiplier)
    return min(MAX_LEVEL, max(0, hits) // multiplier)


def level_range(level: int, multiplier: int) -> tuple[int, int | None]:
    """Return ``(min_hits, max_hits)`` of ``level``; ``max_hits`` is None at 5.

    This is what Drupal's throttle block shows as "Current Level: 2 (40 - 59)".

    >>> level_range(2, 20)
    (40, 59)
    >>> level_range(5, 20)
    (100, None)
    """
    _check_multiplier(multiplier)
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"level {level!r} is not in 0..{MAX_LEVEL}")
    if level == MAX_LEVEL:
        return level * multiplier, None
    return level * multiplier, (level + 1) * multiplier - 1


def block_text(level: int, multiplier: int) -> str:
    """Drupal's throttle block line for ``level``.

    >>> block_text(2, 20)
    'Current Level: 2 (40 - 59)'
    >>> block_text(5, 60)
    'Current Level: 5 (300+)'
    """
    low, high = level_range(level, multiplier)
    return f"Current Level: {level} ({low}+)" if high is None else \
        f"Current Level: {level} ({low} - {high})"


def message(hits: int, old_level: int, new_level: int) -> str | None:
    """Return Drupal's watchdog line for a level change, None if no change."""
    if new_level == old_level:
        return None
    direction = "increased" if new_level > old_level else "decreased"
    return f"{hits} hits in past minute; throttle {direction} to level {new_level}"


def step(
    state: ThrottleState,
    hits: int,
    now: float,
    policy: str,
    multiplier: int,
    cooldown: float,
    cron_test: float,
) -> Step:
    """Evaluate the throttle once: return ``(new_state, message or None)``.

    ``hits`` is the count in the window at ``now``; ``cooldown`` is used by
    policy "hysteresis", ``cron_test`` by policy "drupal" (both in seconds).
    """
    try:
        policy_step = _POLICY_STEPS[policy]
    except KeyError:
        raise ValueError(
            f"throttle policy {policy!r} is not known; use one of {', '.join(POLICIES)}"
        ) from None
    target = level_for(hits, multiplier)
    new = policy_step(state, target, now, cooldown, cron_test)
    return new, message(hits, state.level, new.level)


def _hysteresis(
    state: ThrottleState, target: int, now: float, cooldown: float, cron_test: float
) -> ThrottleState:
    """Rise at once; one level down per ``cooldown`` seconds below the floor."""
    if target >= state.level:
        # At or above the floor: rise (if needed) and forget any cool-down.
        return ThrottleState(level=target, below_since=None, last_test=None)
    if state.below_since is None:
        # First evaluation below the floor: start the cool-down timer.
        return ThrottleState(level=state.level, below_since=now, last_test=None)
    if now - state.below_since < cooldown:
        return state
    level = state.level - 1
    # Restart the timer if the count is still below the new floor.
    below_since = now if target < level else None
    return ThrottleState(level=level, below_since=below_since, last_test=None)


def _drupal(
    state: ThrottleState, target: int, now: float, cooldown: float, cron_test: float
) -> ThrottleState:
    """Cron first: one level down every ``cron_test`` seconds (and no check
    at that evaluation); else the check, which only ever raises the level,
    and is off at level 5."""
    if state.level == 0:
        # The cron timer starts with the rise from 0.
        return _drupal_state(target, now) if target > 0 else _drupal_state(0, None)
    timer = now if state.last_test is None else state.last_test
    if now - timer >= cron_test:
        return _drupal_state(state.level - 1, now)  # cron: down one, timer restarts
    if state.level < MAX_LEVEL and target > state.level:
        return _drupal_state(target, timer)  # the check: up, never down
    return _drupal_state(state.level, timer)


def _drupal_state(level: int, last_test: float | None) -> ThrottleState:
    """A "drupal" state: the test timer runs only while the level is above 0."""
    return ThrottleState(level=level, below_since=None, last_test=last_test if level else None)


_POLICY_STEPS: dict[str, Callable[[ThrottleState, int, float, float, float], ThrottleState]] = {
    "hysteresis": _hysteresis,
    "drupal": _drupal,
}


def _check_multiplier(multiplier: int) -> None:
    """Refuse a multiplier < 1 (a division by zero or a negative level)."""
    if multiplier < 1:
        raise ValueError(f"throttle multiplier {multiplier!r} must be >= 1")
