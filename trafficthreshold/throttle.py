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
    Drupal's own rule.  Rise at once.  Drop at once only when the new level is
    3 or more levels lower.  Otherwise every ``cron_test`` seconds (Drupal's
    cron, three hours by default) step down one level to test the load.  The
    test is made with the count at hand: if the load is still there the level
    "rises again at once", i.e. it does not change and no message is logged
    (Drupal would log a decrease and an increase a minute apart).

Each change comes with Drupal's watchdog line, e.g.
``"45 hits in past minute; throttle increased to level 2"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

#: The highest level; counting goes on above it.
MAX_LEVEL = 5

#: Drop at once (policy "drupal") when the target is this many levels lower.
DRUPAL_DROP_GAP = 3

#: The policy names, in documentation order; the first is the default.
POLICIES = ("hysteresis", "drupal")


@dataclasses.dataclass(frozen=True)
class ThrottleState:
    """What the throttle remembers between two evaluations.

    ``below_since``: when the count was first seen below the current level's
    floor (policy "hysteresis"); None while it is not below.
    ``last_test``: when the last step-down test was made, or when the level
    rose from 0 (policy "drupal"); None while the level is 0.
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
    """Rise at once; drop at once by 3+ levels; else test one level down."""
    if target > state.level or state.level - target >= DRUPAL_DROP_GAP:
        # A rise from 0 starts the test timer; any other jump keeps it.
        return _drupal_state(target, state.last_test if state.level else now)
    last_test = now if state.last_test is None else state.last_test
    if state.level == 0 or now - last_test < cron_test:
        return _drupal_state(state.level, last_test)
    # The test: one level down, unless the load is still there (then the
    # level "rises again at once" to where it was, i.e. stays).
    level = state.level - 1 if target < state.level else state.level
    return _drupal_state(level, now)


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
