"""Rolling the segment's minute ring into the period store, exactly once.

The segment keeps, per key, the counts of the last M minutes (M =
``minute_buckets``, 120 by default).  The store keeps, per key and minute, a
*watermark*: the cumulative count already added.  A roll reads the ring and
hands the store the current cumulative counts; the store adds only what
grew past each watermark and moves the watermarks in the same transaction.
So a roll can be repeated, or cut short by SIGKILL at any instant, and the
store still holds every hit exactly once.

Which minutes a roll reads: from the first minute not yet closed
(``closed_through + 1``), and always the last ``LATE_MINUTES`` closed
minutes again, so an increment that lands just after its minute closed (a
worker read the clock, then was descheduled) is still picked up.  The
current, open minute is read only by the final roll (shutdown, uninstall):
its watermark then makes the next roll add just the rest.

Minutes older than the ring are gone: when the supervisor was down for
longer than the ring, the span is recorded in the store's ``gaps`` table
and logged, never silently skipped.
"""
from __future__ import annotations

import logging

from . import names, segment
from ._counter import Counter
from .store import Store

log = logging.getLogger("trafficthreshold.rollup")

#: Closed minutes read again on every roll, for late increments.
LATE_MINUTES = 2


class Roller:
    """Reads ``counter``'s ring and rolls it into ``store``.

    Lock-free: the ring is read without the semaphore (a bucket's tag is
    checked, so a bucket being reset reads as its old or new epoch, never a
    mix).  Not thread-safe: one Roller per supervisor thread.
    """

    def __init__(self, counter: Counter, store: Store) -> None:
        self.counter = counter
        self.store = store
        self._names: dict[int, tuple[str, str]] = {}
        self._keys_used = -1

    def names(self) -> dict[int, tuple[str, str]]:
        """slot -> (account, event), re-read when keys were added."""
        used = self.counter.load(segment.H_KEYS_USED, 4)
        if used != self._keys_used:
            self._names = {slot: (a, e) for slot, a, e in self.counter.keys()}
            self._keys_used = used
        return self._names

    def snapshot(self, first: int, last: int) -> list[tuple[str, str, int, int]]:
        """(account, event, epoch_minute, count) of every key-minute in
        [first, last] with a count, read from the ring."""
        rows = self.counter.minutes(first, last)
        names = self.names()
        if any(slot not in names for slot, _, _ in rows):
            self._keys_used = -1  # a key published after we read the index
            names = self.names()
        return [(*names[slot], minute, count) for slot, minute, count in rows if slot in names]

    def window(self, now: float, include_current: bool) -> tuple[int, int] | None:
        """The minutes the next roll reads, after recording any gap."""
        minute = int(now // 60)
        ring = self.counter.load(segment.H_MINUTE_BUCKETS, 4)
        oldest = minute - ring + 1
        created = self.counter.load(segment.H_CREATED_AT, 8) // 60
        closed = self.store.closed_through()
        start = created if closed is None else max(closed + 1, created)
        if start < oldest:
            self._record_gap(start, oldest - 1, ring, now)
            start = oldest
        first = max(oldest, min(start, minute - 1 - LATE_MINUTES))
        last = minute if include_current else minute - 1
        return (first, last) if first <= last else None

    def _record_gap(self, first: int, last: int, ring: int, now: float) -> None:
        reason = (f"the supervisor did not roll for longer than the ring "
                  f"({ring} minutes); counts of these minutes were overwritten")
        log.error("lost minutes %d..%d (%d minutes): %s", first, last, last - first + 1, reason)
        with self.store.transaction():  # the gap and the new mark, or neither
            self.store.record_gap(first, last, reason, now)
            self.store.set_closed_through(last)

    def roll(self, now: float, include_current: bool = False) -> int:
        """Roll what is new; return the new hits (the growth of the `all`
        keys; every hit counts there once, whatever its account).

        ``include_current`` also reads the open minute (the final roll)."""
        span = self.window(now, include_current)
        if span is None:
            return 0
        first, last = span
        deltas = self.store.roll_deltas(self.snapshot(first, last), now,
                                        closed_through=int(now // 60) - 1)
        added = sum(n for (account, _event, _minute), n in deltas.items() if account == names.ALL)
        if added:
            log.debug("rolled minutes %d..%d: %d hits", first, last, added)
        return added
