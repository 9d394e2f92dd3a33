"""Roll-ups from the segment ring into the store: exactly once, late writes,
gaps.  Real segments (both backends) and real SQLite files; the clock is a
parameter."""
from __future__ import annotations

import pytest

from trafficthreshold import segment
from trafficthreshold.rollup import LATE_MINUTES, Roller
from trafficthreshold.store import SQLiteStore

T0 = 1_800_000_000          # the fixtures install the segment at this time
M0 = T0 // 60               # its epoch minute


@pytest.fixture
def store(tmp_path):
    with SQLiteStore(str(tmp_path / "stats.sqlite3"), "UTC") as s:
        yield s


def minute_total(store, account, t):
    """The store's count of the minute containing t (UTC store)."""
    import datetime as dt
    d = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return store.period(account, "pageview", d.year, d.month, d.day, d.hour)["data"][d.minute]


def test_closed_minutes_roll_once(counter, store):
    for i in range(5):
        counter.hit("acme", "pageview", i + 1, T0 + 60 * i + 1)
    roller = Roller(counter, store)
    assert roller.roll(T0 + 5 * 60) == 1 + 2 + 3 + 4 + 5
    assert roller.roll(T0 + 5 * 60 + 30) == 0                    # same minute again
    assert store.closed_through() == M0 + 4
    for i in range(5):
        assert minute_total(store, "acme", T0 + 60 * i) == i + 1
        assert minute_total(store, "all", T0 + 60 * i) == i + 1


def test_open_minute_only_in_final_roll(counter, store):
    counter.hit("acme", "pageview", 3, T0 + 10)
    roller = Roller(counter, store)
    assert roller.roll(T0 + 20) == 0
    assert roller.roll(T0 + 20, include_current=True) == 3
    counter.hit("acme", "pageview", 4, T0 + 30)   # the rest of that minute
    assert roller.roll(T0 + 61) == 4                # only the rest is added
    assert minute_total(store, "acme", T0) == 7


def test_late_write_into_closed_minute_is_picked_up(counter, store):
    roller = Roller(counter, store)
    counter.hit("acme", "pageview", 1, T0 + 59)
    assert roller.roll(T0 + 60) == 1
    # A worker read the clock at T0+59.9 but added after the roll:
    counter.hit("acme", "pageview", 1, T0 + 59.9)
    assert roller.roll(T0 + 120) == 1
    assert minute_total(store, "acme", T0) == 2


def test_late_write_older_than_recheck_window_is_not_rolled_twice(counter, store):
    roller = Roller(counter, store)
    counter.hit(None, "pageview", 5, T0 + 1)
    roller.roll(T0 + 60)
    roller.roll(T0 + 60 * (LATE_MINUTES + 5))
    assert minute_total(store, "all", T0) == 5


def test_many_keys_and_events(counter, store):
    for n in range(50):
        counter.hit(f"site{n}", "pageview" if n % 2 else "signup", n + 1, T0 + 5)
    Roller(counter, store).roll(T0 + 60)
    assert store.period("site7", "pageview", 2027, 1, 15)["total"] == 8
    assert sum(store.period(f"site{n}", "signup", 2027)["total"] for n in range(0, 50, 2)) \
        == store.period("all", "signup", 2027)["total"]


def test_down_longer_than_ring_records_gap(counter, store):
    roller = Roller(counter, store)
    counter.hit("acme", "pageview", 1, T0 + 5)
    roller.roll(T0 + 60)
    ring = counter.load(segment.H_MINUTE_BUCKETS, 4)
    later = T0 + 60 * (ring + 50)
    counter.hit("acme", "pageview", 2, later - 60)     # still inside the ring
    assert roller.roll(later) == 2
    (gap,) = store.gaps()
    assert gap["first_minute"] == M0 + 1
    assert gap["last_minute"] == later // 60 - ring
    assert "ring" in gap["reason"]


def test_no_gap_before_the_segment_existed(counter, store):
    """A store older than the segment: minutes before its creation were not lost."""
    store.set_closed_through(M0 - 10_000)
    Roller(counter, store).roll(T0 + 120)
    assert store.gaps() == []


def test_first_roll_of_fresh_store_covers_the_ring(counter, store):
    counter.hit("acme", "pageview", 1, T0 + 1)
    counter.hit("acme", "pageview", 1, T0 + 3000)
    assert Roller(counter, store).roll(T0 + 3600) == 2


# ---------------------------------------------------------------- helpers

def poke(key, backend, fmt, offset, *values):
    """Write raw bytes into the real segment (a writer in another language,
    or a corrupting bug)."""
    import struct
    raw = segment._Raw(backend, key)
    try:
        struct.pack_into(fmt, raw.buf, offset, *values)
    finally:
        raw.close()


def minute_bucket(counter, slot, minute, stripe=0):
    """Offset of a key's minute bucket in a stripe (docs/segment.rst)."""
    slots = counter.load(segment.H_SLOTS_OFFSET, 8)
    slot_size = counter.load(segment.H_SLOT_SIZE, 4)
    stripe_size = counter.load(segment.H_STRIPE_SIZE, 4)
    ring = counter.load(segment.H_MINUTE_BUCKETS, 4)
    return slots + slot * slot_size + stripe * stripe_size + (minute % ring) * 16


def entry_offset(key, backend, account):
    """The offset of the published index entry holding `account`."""
    raw = segment._Raw(backend, key)
    try:
        base, size = raw.u64(segment.H_INDEX_OFFSET), raw.u32(segment.H_INDEX_SIZE)
        for i in range(size):
            ent = base + i * segment.INDEX_ENTRY_SIZE
            alen = raw.buf[ent + segment.E_ACCOUNT_LEN]
            name = bytes(raw.buf[ent + segment.E_ACCOUNT:ent + segment.E_ACCOUNT + alen])
            if raw.u32(ent) == 1 and name == account.encode():
                return ent
    finally:
        raw.close()
    raise AssertionError(f"{account} not in the index")


# ------------------------------------------------- watermarks per instance

def test_reinstall_in_the_same_minute_counts_the_new_segment(installed, store):
    """uninstall (with its final roll) then install again within the minute:
    the new segment's hits of that minute are added, not taken for a count
    that "went down"."""
    key, backend = installed
    counter = segment.attach(key, backend)
    counter.hit("acme", "pageview", 5, T0 + 10)
    counter.detach()
    segment.uninstall(key, backend, force=True,
                      rollup=lambda c: Roller(c, store).roll(T0 + 20, True))
    segment.install(key, backend, now=T0 + 30)
    counter = segment.attach(key, backend)
    try:
        counter.hit("acme", "pageview", 3, T0 + 40)
        roller = Roller(counter, store)
        assert roller.roll(T0 + 61) == 3
        assert roller.roll(T0 + 62) == 0                  # same instance: a no-op
        assert Roller(counter, store).roll(T0 + 63) == 0  # a new Roller too
        assert minute_total(store, "acme", T0) == 8
        assert store.gaps() == []                         # the old one ended cleanly
    finally:
        counter.detach()


def test_schema_1_watermarks_are_adopted_not_counted_again(counter, tmp_path):
    """A store written before watermarks had an instance: after the
    migration, re-rolling the same ring adds nothing."""
    import sqlite3
    from trafficthreshold.store import sqlite as store_module
    path = str(tmp_path / "old.sqlite3")
    conn = sqlite3.connect(path)
    for statement in store_module.DDL:
        conn.execute(statement)
    conn.execute("INSERT INTO watermarks VALUES (?, 'acme', 'pageview', 4)", (M0,))
    conn.execute("INSERT INTO watermarks VALUES (?, 'all', 'pageview', 4)", (M0,))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    counter.hit("acme", "pageview", 4, T0 + 5)
    with SQLiteStore(path, "UTC") as s:
        assert Roller(counter, s).roll(T0 + 60) == 0
        counter.hit("acme", "pageview", 1, T0 + 6)
        assert Roller(counter, s).roll(T0 + 61) == 1
        assert s.instance() == counter.load(segment.H_INSTANCE, 8)


# ---------------------------------------------------------- bad keys

def test_a_key_that_is_not_utf8_is_skipped_and_the_others_roll(installed, store, caplog):
    key, backend = installed
    counter = segment.attach(key, backend)
    try:
        counter.hit("acme", "pageview", 2, T0 + 5)
        counter.hit("beta", "pageview", 3, T0 + 5)
        poke(key, backend, "=2s", entry_offset(key, backend, "beta") + segment.E_ACCOUNT,
             b"\xff\xfe")
        roller = Roller(counter, store)
        assert roller.roll(T0 + 60) == 5                  # the all key holds both
        assert minute_total(store, "acme", T0) == 2
        assert store.closed_through() == M0
        (bad,) = store.bad_keys()
        assert "not UTF-8" in bad and "\\xff\\xfeta" in bad
        assert list(roller.bad_keys.values()) == [bad]
        counter.hit("acme", "pageview", 1, T0 + 65)
        counter.hit("beta", "pageview", 1, T0 + 65)   # the index still holds the bytes
        roller.roll(T0 + 120)
        assert caplog.text.count("skipping a key") == 1   # logged once per key
        assert minute_total(store, "acme", T0 + 60) == 1
    finally:
        counter.detach()


def test_a_count_beyond_int64_is_refused_and_the_others_roll(installed, counter, store):
    from trafficthreshold.store import MAX_MINUTE_COUNT
    counter.hit("acme", "pageview", 2, T0 + 5)
    counter.hit("huge", "pageview", 1, T0 + 5)
    slot = counter.find("huge", "pageview")
    # Stripe 0 (the fixture's): the count is 8 bytes after the bucket's tag.
    poke(*installed, "=Q", minute_bucket(counter, slot, M0) + 8, 2**64 - 2)
    roller = Roller(counter, store)
    roller.roll(T0 + 60)                                   # no OverflowError
    assert minute_total(store, "acme", T0) == 2
    assert minute_total(store, "huge", T0) == 0
    assert store.closed_through() == M0
    (bad,) = store.bad_keys()
    assert "huge/pageview" in bad and str(MAX_MINUTE_COUNT) in bad
    # A store handed such a count directly refuses it too.
    assert store.roll([("x", "pageview", M0, 2**63 + 5)], T0 + 61) == 0


# ---------------------------------------------------------------- gaps, late hits

def test_a_segment_gone_without_final_roll_is_a_recorded_gap(installed, store, caplog):
    """ipcrm, RemoveIPC, a reboot: the old segment's minutes after the last
    roll are unknown; the first roll of the new instance records them."""
    key, backend = installed
    counter = segment.attach(key, backend)
    counter.hit("acme", "pageview", 1, T0 + 5)
    Roller(counter, store).roll(T0 + 120)                  # closes M0, M0 + 1
    counter.hit("acme", "pageview", 9, T0 + 130)           # never rolled
    counter.detach()
    segment.uninstall(key, backend, force=True)            # no final roll
    segment.install(key, backend, now=T0 + 600)            # minute M0 + 10
    counter = segment.attach(key, backend)
    try:
        counter.hit("acme", "pageview", 2, T0 + 610)
        assert Roller(counter, store).roll(T0 + 660) == 2
        (gap,) = store.gaps()
        assert (gap["first_minute"], gap["last_minute"]) == (M0 + 2, M0 + 9)
        assert "replaced" in gap["reason"] and "lost minutes" in caplog.text
        assert Roller(counter, store).roll(T0 + 720) == 0  # recorded once
        assert len(store.gaps()) == 1
        assert minute_total(store, "acme", T0 + 600) == 2
    finally:
        counter.detach()


def test_a_replacement_in_the_next_minute_records_that_minute(installed, store):
    key, backend = installed
    counter = segment.attach(key, backend)
    Roller(counter, store).roll(T0 + 60)                   # closes M0
    counter.detach()
    segment.uninstall(key, backend, force=True)
    segment.install(key, backend, now=T0 + 70)             # minute M0 + 1
    counter = segment.attach(key, backend)
    try:
        counter.hit("acme", "pageview", 4, T0 + 80)
        assert Roller(counter, store).roll(T0 + 121) == 4  # the new one's minute rolls
        (gap,) = store.gaps()
        assert (gap["first_minute"], gap["last_minute"]) == (M0 + 1, M0 + 1)
    finally:
        counter.detach()


def test_hits_later_than_the_recheck_window_are_counted_as_dropped(counter, store, caplog):
    ring = counter.load(segment.H_MINUTE_BUCKETS, 4)
    roller = Roller(counter, store)
    counter.hit("acme", "pageview", 1, T0 + 5)
    assert roller.roll(T0 + 60) == 1
    roller.roll(T0 + 60 * (LATE_MINUTES + 3))              # M0 is no longer re-read
    counter.hit("acme", "pageview", 4, T0 + 6)             # a very late worker
    assert roller.roll(T0 + 60 * (LATE_MINUTES + 4)) == 0
    assert store.late_dropped() == 0                       # not yet the oldest minute
    last_chance = T0 + 60 * (ring - 1) + 1                 # M0 is the ring's oldest minute
    roller.roll(last_chance)
    assert store.late_dropped() == 4                       # hits, as the all key counts them
    assert "more than 2 minutes late" in caplog.text
    Roller(counter, store).roll(last_chance + 1)           # read again: counted once
    assert store.late_dropped() == 4
    assert minute_total(store, "acme", T0) == 1


def test_a_non_utf8_name_is_reported_by_its_bytes(installed, store):
    key, backend = installed
    counter = segment.attach(key, backend)
    try:
        counter.hit("beta", "pageview", 3, T0 + 5)
        poke(key, backend, "=1s", entry_offset(key, backend, "beta") + segment.E_ACCOUNT, b"\xff")
        Roller(counter, store).roll(T0 + 60)
        assert [b for b in store.bad_keys() if "b'\\xffeta'" in b and "not UTF-8" in b]
        assert minute_total(store, "all", T0) == 3
    finally:
        counter.detach()


def test_a_late_hit_is_counted_as_soon_as_its_minute_leaves_the_recheck_window(counter, store):
    roller = Roller(counter, store)
    counter.hit("acme", "pageview", 1, T0 + 5)
    for m in range(1, LATE_MINUTES + 2):                  # M0's last re-read at M0 + 3
        roller.roll(T0 + 60 * m + 1)
    counter.hit("acme", "pageview", 2, T0 + 6)
    assert roller.roll(T0 + 60 * (LATE_MINUTES + 2) + 1) == 0
    assert store.late_dropped() == 2
    assert minute_total(store, "acme", T0) == 1
    roller.roll(T0 + 60 * (counter.load(segment.H_MINUTE_BUCKETS, 4) - 1) + 1)
    assert store.late_dropped() == 2                       # not again when it is oldest
