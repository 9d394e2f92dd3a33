"""Rolling the segment's minute ring into the period store, exactly once.

The segment keeps, per key, the counts of the last M minutes (M =
``minute_buckets``, 120 by default).  The store keeps, per segment instance,
key and minute, a *watermark*: the cumulative count already added.  A roll
reads the ring and hands the store the current cumulative counts; the store
adds only what grew past each watermark and moves the watermarks in the same
transaction.  So a roll can be repeated, or cut short by SIGKILL at any
instant, and the store still holds every hit it rolled exactly once (what
could not be rolled is listed below).  Watermarks are
keyed by the header's ``instance`` (drawn at each install): a segment
installed again in the same minute counts that minute from 0 and is rolled
from 0.

Funnel statuses: a key whose event names a status (``order/paid``, see
:mod:`trafficthreshold.names`) rolls like any key, by the same watermarks;
the store routes it to its funnels (counts per status per year and month)
instead of the period tables, in the same transaction.

Which minutes a roll reads: from the first minute not yet closed
(``closed_through + 1``), and always the last ``LATE_MINUTES`` closed
minutes again, so an increment that lands just after its minute closed (a
worker read the clock, then was descheduled) is still picked up.  The
current, open minute is read only by the final roll (shutdown, uninstall):
its watermark then makes the next roll add just the rest.

What cannot be rolled is recorded, never skipped silently:

* minutes older than the ring (the supervisor was down for longer than the
  ring) are recorded in the store's ``gaps`` table and logged;
* when the segment was replaced (a new ``instance``) and the old one was not
  retired by ``uninstall`` and rolled to its end (a crash then a reboot,
  ``ipcrm``, systemd's RemoveIPC, ``uninstall --no-rollup``), the minutes
  from the last closed minute + 1 to the minute before the new segment's
  creation (at least that first minute) are recorded as a gap and logged:
  what the old segment held for them is unknown;
* a hit that reaches a minute after its last re-read (more than
  ``LATE_MINUTES`` late) is not added; each roll reads the minute that has
  just left the re-read window and the oldest ring minute once more, and
  counts such hits into the store's ``late_dropped``;
* a key that cannot be rolled (an index entry that is not UTF-8, a minute
  count above ``store.MAX_MINUTE_COUNT``) is skipped, logged once, and
  listed in the store's ``bad_keys`` (and :attr:`Roller.bad_keys`); the
  other keys roll on.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from . import names, segment
from ._counter import Counter
from .store import MAX_MINUTE_COUNT, PeriodStore

log = logging.getLogger("trafficthreshold.rollup")

#: Closed minutes read again on every roll, for late increments.
LATE_MINUTES = 2


def _raw(name: str) -> bytes:
    """The bytes of a name ``keys()`` decoded with surrogateescape."""
    return name.encode("utf-8", "surrogateescape")


class Roller:
    """Reads ``counter``'s ring and rolls it into ``store``.

    Lock-free: the ring is read without the semaphore.  A bucket's tag is
    checked, so a bucket never mixes two minutes: while a writer resets a
    bucket for a newer minute, it reads as 0 for the old and the new minute.
    A 0 adds nothing (the watermark stays), and the next rolls re-read the
    new minute.  Not thread-safe: one Roller per supervisor thread.

    ``key`` and ``backend`` let the Roller read the index bytes itself when
    an entry is not UTF-8 (``Counter.keys()`` then fails as a whole): without
    them such a segment's keys cannot be named and none rolls.
    """

    def __init__(self, counter: Counter, store: PeriodStore) -> None:
        self.counter = counter
        self.store = store
        self.instance = counter.load(segment.H_INSTANCE, 8)
        #: slot -> why the key is skipped (see the module docstring).
        self.bad_keys: dict[int, str] = {}
        self._unnamed = "has counts but no published index entry"
        self._reported: set[str] = set()
        self._names = segment.KeyNames()
        self._instance_checked = False
        self._late_checked: dict[str, int] = {}  # role -> the last minute read
        store.cover_ring(counter.load(segment.H_MINUTE_BUCKETS, 4))

    # ------------------------------------------------------------- keys

    def names(self, slots: Iterable[int] = ()) -> dict[int, tuple[str, str]]:
        """slot -> (account, event) (:class:`segment.KeyNames`), current for
        ``slots``.  Keys whose name bytes are not UTF-8 (a writer in another
        language) are left out and listed in ``bad_keys``: the others roll
        on."""
        return self._names.read(self.counter, slots)

    def _why_unnamed(self, slot: int) -> str:
        bad = self._names.bad.get(slot)
        if bad is None:
            return f"slot {slot}: {self._unnamed}"
        return f"slot {slot}: account {_raw(bad[0])!r}, event {_raw(bad[1])!r} is not UTF-8"

    def _report(self, slot: int, why: str) -> None:
        """Skip a key, logging it once."""
        self.bad_keys[slot] = why
        if why not in self._reported:
            self._reported.add(why)
            log.error("skipping a key the roll-up cannot store (%s); the other keys "
                      "roll on", why)

    # ------------------------------------------------------------- reading

    def snapshot(self, first: int, last: int) -> list[tuple[str, str, int, int]]:
        """(account, event, epoch_minute, count) of every key-minute in
        [first, last] with a count, read from the ring.  Bad keys (see
        ``bad_keys``) are left out."""
        rows = self.counter.minutes(first, last)
        names = self.names(slot for slot, _, _ in rows)
        out = []
        for slot, minute, count in rows:
            if slot not in names:
                self._report(slot, self._why_unnamed(slot))
                continue
            if count > MAX_MINUTE_COUNT:
                account, event = names[slot]
                self._report(slot, f"slot {slot} ({account}/{event}): count {count} at "
                                   f"minute {minute} is beyond {MAX_MINUTE_COUNT}")
                continue
            out.append((*names[slot], minute, count))
        return out

    def window(self, now: float, include_current: bool) -> tuple[int, int] | None:
        """The minutes the next roll reads, after recording any gap."""
        minute = int(now // 60)
        ring = self.counter.load(segment.H_MINUTE_BUCKETS, 4)
        oldest = minute - ring + 1
        created = self.counter.load(segment.H_CREATED_AT, 8) // 60
        if not self._instance_checked:
            self._check_instance(created, now)
            self._instance_checked = True
        closed = self.store.closed_through()
        start = created if closed is None else max(closed + 1, created)
        if start < oldest:
            self._record_gap(start, oldest - 1, ring, now, known=closed is not None)
            start = oldest
        first = max(oldest, min(start, minute - 1 - LATE_MINUTES))
        last = minute if include_current else minute - 1
        return (first, last) if first <= last else None

    def _check_instance(self, created: int, now: float) -> None:
        """A new segment instance: unless ``uninstall`` retired the old one
        and rolled it to its end, what it counted after the last closed
        minute is unknown (workers may have counted into it after any roll
        of it, even a final one); record that span as a gap."""
        ring = self.counter.load(segment.H_MINUTE_BUCKETS, 4)
        first = max(created, int(now // 60) - ring + 1)  # its first minute the ring holds
        self.store.claim_segment(self.instance, first)  # a renamed host carries its marks over
        previous = self.store.instance()
        if previous is None or previous == self.instance:
            return
        closed = self.store.closed_through()
        with self.store.transaction():  # the gap and the new instance, or neither
            if self.store.instance_ended() != previous and closed is not None:
                first = closed + 1
                last = max(first, created - 1)
                reason = (f"the segment was replaced (instance {previous:#x} -> "
                          f"{self.instance:#x}) without `uninstall` retiring the old one "
                          "and rolling it to its end (a reboot, ipcrm, RemoveIPC, "
                          "uninstall --no-rollup): what it counted after the last closed "
                          "minute is unknown")
                log.error("lost minutes %d..%d (%d minutes): %s", first, last,
                          last - first + 1, reason)
                self.store.record_gap(first, last, reason, now)
                if created - 1 >= first:
                    self.store.set_closed_through(created - 1)
            else:
                log.info("a new segment instance %#x (the previous one was rolled to its "
                         "end)", self.instance)
            self.store.set_instance(self.instance)

    def _record_gap(self, first: int, last: int, ring: int, now: float,
                    known: bool = True) -> None:
        """``known``: ``first`` follows the store's last closed minute of
        this host; else the store has none (this segment never rolled into
        it, or the host was forgotten, ``[store] forget_hosts_days``, and
        the segment's own record too) and ``first`` is the segment's
        creation: what of it was rolled before is unknown, and said so."""
        reason = (f"the supervisor did not roll for longer than the ring "
                  f"({ring} minutes); counts of these minutes were overwritten")
        if not known:
            reason = (f"no closed minute of this host is recorded in the store (it never "
                      f"rolled this segment into it, or it was forgotten after [store] "
                      f"forget_hosts_days without a roll): the segment's minutes from its "
                      f"creation to the ring's oldest ({ring} minutes back) were rolled "
                      f"before or lost; which is unknown")
        log.error("lost minutes %d..%d (%d minutes): %s", first, last, last - first + 1, reason)
        with self.store.transaction():  # the gap and the new mark, or neither
            self.store.record_gap(first, last, reason, now)
            self.store.set_closed_through(last)

    def _check_late(self, oldest: int, first: int) -> None:
        """Read two closed minutes once more: the one that has just left the
        re-read window (late hits show at once) and the oldest of the ring,
        before it is overwritten (the rest of them).  What grew there after
        its last read is counted in ``late_dropped``, and its watermark
        moved, so each late hit is counted once."""
        for minute, role in ((first - 1, "recent"), (oldest, "oldest")):
            if not oldest <= minute < first or self._late_checked.get(role, minute - 1) >= minute:
                continue
            self._late_checked[role] = minute
            late = self.store.drop_late(self.snapshot(minute, minute), self.instance)
            if late:
                log.warning("%d hits reached minute %d more than %d minutes late and were "
                            "not added (counted in late_dropped)", late, minute, LATE_MINUTES)

    # ------------------------------------------------------------- rolling

    def roll(self, now: float, include_current: bool = False) -> int:
        """Roll what is new; return the new hits (the growth of the `all`
        keys; every hit counts there once, whatever its account).

        ``include_current`` also reads the open minute (the final roll); a
        final roll of a retired segment (``uninstall``) records that this
        instance was rolled to its end."""
        span = self.window(now, include_current)
        if span is None:
            return 0
        first, last = span
        self.bad_keys = {}
        ended = include_current and \
            self.counter.load(segment.H_STATE, 4) == segment.STATE_RETIRED
        deltas = self.store.roll_deltas(self.snapshot(first, last), now,
                                        closed_through=int(now // 60) - 1,
                                        instance=self.instance, ended=ended)
        ring = self.counter.load(segment.H_MINUTE_BUCKETS, 4)
        self._check_late(int(now // 60) - ring + 1, first)
        self.store.set_bad_keys(self.bad_keys.values())
        added = sum(n for (account, _event, _minute), n in deltas.items() if account == names.ALL)
        if added:
            log.debug("rolled minutes %d..%d: %d hits", first, last, added)
        return added
