"""_counter.c and the worker API: exact counts under concurrency, time
driven across minutes and around the rings, a worker killed holding the
semaphore, fork, fail-open, bad input, a full key table, retirement, and
the throttle level.

Real segments on both backends and real processes (fork); time is always a
parameter (``now=``) except where the real clock itself is the subject.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import platform
import re
import signal
import sys
import threading
import time

import pytest
import sysv_ipc

import trafficthreshold
from trafficthreshold import _counter, segment
from trafficthreshold.errors import SegmentBusy, SegmentNotFound

from test_segment import RawReader, in_child, raw_view

NOW = 1_800_000_000.0  # a minute boundary (1_800_000_000 = 30_000_000 * 60)
MINUTE = int(NOW) // 60
FORK = multiprocessing.get_context("fork")


def all_slot(counter: trafficthreshold.Counter, event: str = "pageview") -> int:
    return counter.find(None, event)


def minute_total(counter: trafficthreshold.Counter, slot: int, first: int, last: int) -> int:
    return sum(n for s, _m, n in counter.minutes(first, last) if s == slot)


@pytest.fixture
def fail_open_api(key, backend):
    """The module-level API pointed at the test's key, NOT strict."""
    trafficthreshold.configure(key=key, backend=backend, strict=False)
    yield key, backend
    trafficthreshold._settings.clear()
    trafficthreshold.configure()


# -------------------------------------------------------------- exactness

ACCOUNTS = [f"account-{i}.example" for i in range(6)]
WRITERS, HITS = 4, 250_000


def _writer(key, backend, index, hits, clock, stripe, go, results):
    """Counter.hit in a tight loop over the accounts, starting at account
    `index`.  clock: "fixed" (every hit at NOW) or "driven" (0.7 ms of
    driven time per hit: ~3 minutes and many second-ring wraps).  Reports
    the hits refused with SegmentBusy, per account."""
    counter = segment.attach(key, backend, stripe=stripe)
    hit = counter.hit
    accounts = itertools.islice(itertools.cycle(ACCOUNTS), index, index + hits)
    refused = dict.fromkeys(ACCOUNTS, 0)
    go.wait()
    for i, account in enumerate(accounts):
        try:
            hit(account, "pageview", 1, NOW if clock == "fixed" else NOW + i * 0.0007)
        except SegmentBusy:
            # A new key not made in 50 ms (a loaded machine): the hit is
            # refused whole, nothing of it added (docs/segment.rst, "Fail
            # open"); the next hit of the account tries again.
            refused[account] += 1
    results.put(("writer", index, counter.stripe, refused))


def _reader(key, backend, go, stop, results):
    """Reads the counts of NOW's minute for as long as the writers run:
    counts never go down, and (x86: stores are seen in order) the total
    read after the accounts is never below their sum, since hit() adds to
    `all` first."""
    counter = segment.attach(key, backend)
    total_slot = all_slot(counter)
    last = [0] * (len(ACCOUNTS) + 1)
    reads, problems = 0, []
    ordered = platform.machine() in ("x86_64", "AMD64", "i686")
    go.wait()
    while not stop.is_set() or reads == 0:
        slots = [counter.find(a, "pageview") for a in ACCOUNTS]
        now = [counter.count(s, 1, NOW) if s is not None else 0 for s in slots]
        now.append(counter.count(total_slot, 1, NOW))
        if any(n < before for n, before in zip(now, last)):
            problems.append(("went down", last, now))
        if ordered and now[-1] < sum(now[:-1]):
            problems.append(("all below the sum of accounts", now))
        last = now
        reads += 1
    results.put(("reader", reads, problems[:5]))


def _run_writers(key, backend, clock, stripes):
    go, stop, results = FORK.Event(), FORK.Event(), FORK.Queue()
    writers = [FORK.Process(target=_writer, args=(key, backend, i, HITS, clock, stripes[i], go,
                                                  results))
               for i in range(WRITERS)]
    reader = FORK.Process(target=_reader, args=(key, backend, go, stop, results))
    for p in writers + [reader]:
        p.start()
    go.set()
    for p in writers:
        p.join(60)
        assert p.exitcode == 0
    stop.set()
    reader.join(60)
    assert reader.exitcode == 0
    out = [results.get(timeout=10) for _ in range(WRITERS + 1)]
    return ([o for o in out if o[0] == "writer"], [o for o in out if o[0] == "reader"][0])


def _expected(writers=()) -> dict[str, int]:
    """The hits sent per account, less those the writers report refused."""
    expected = dict.fromkeys(ACCOUNTS, 0)
    for index in range(WRITERS):
        for account in itertools.islice(itertools.cycle(ACCOUNTS), index, index + HITS):
            expected[account] += 1
    for _w, _i, _stripe, refused in writers:
        for account, n in refused.items():
            expected[account] -= n
    return expected


def _assert_every_hit_counted_or_reported(counter, writers, first, last, own):
    """The minute totals of [first, last] against what the writers sent.

    Exact when no wait for the lock passed 50 ms.  On a loaded machine a
    writer descheduled while it holds the lock (a roll-over takes it for
    microseconds) makes another writer's wait pass 50 ms, and the product
    fails open (docs/segment.rst, "Fail open", "Lock busy for 50 ms"): a
    roll-over's addition is dropped, the hit is added to dropped_hits (once
    per hit, whichever of its four additions was dropped: a hit dropped from
    a second bucket only is still in its minute), each wait to
    lock_timeouts; a new key not made in 50 ms refuses the hit whole
    (SegmentBusy, left out of `writers`' sent counts) and adds 1 to
    lock_timeouts.  What is checked then, exactly as those counters allow:
    no total above what was sent (nothing counted twice), every minute
    addition missing had its own wait that timed out and its hit is in
    dropped_hits, and on own stripes no hit dropped but by such a wait."""
    expected = _expected(writers)
    refused = sum(sum(r.values()) for *_w, r in writers)
    sent = sum(expected.values())
    assert sent == WRITERS * HITS - refused
    short = {a: n - minute_total(counter, counter.find(a, "pageview"), first, last)
             for a, n in expected.items()}
    short["all"] = sent - minute_total(counter, all_slot(counter), first, last)
    head = segment.header(counter)
    facts = {k: head[k] for k in ("dropped_hits", "lock_timeouts", "overflow_hits")}
    facts.update(refused=refused, short=short)
    assert head["overflow_hits"] == 0 and head["lock_owner_pid"] == 0, facts
    assert all(n >= 0 for n in short.values()), facts  # never counted twice
    if head["lock_timeouts"] == 0:
        assert refused == 0 and all(n == 0 for n in short.values()), facts
        if own:
            # Nobody's time ran behind a ring on their own stripe.
            assert head["dropped_hits"] == 0, facts
        return
    waits = head["lock_timeouts"] - refused  # the waits of roll-overs
    assert sum(short.values()) <= waits, facts
    # A hit adds once to its account's minute and once to `all`'s.
    accounts_short = sum(n for a, n in short.items() if a != "all")
    assert max(short["all"], accounts_short) <= head["dropped_hits"], facts
    if own:
        assert head["dropped_hits"] <= waits, facts


@pytest.mark.parametrize("stripes", ["own stripes", "one shared stripe"])
def test_exact_counts_with_four_writers_and_a_reader(key, backend, stripes):
    """4 processes x 250,000 hits over 6 accounts in one known minute, a
    fifth process reading all the while: every total exact.  Each writer
    on its own stripe, and all four on one (the worst case for the atomic
    add: every writer on the same cache lines).  On a loaded machine, less
    only what a wait for the lock past 50 ms dropped and reported."""
    segment.install(key, backend, now=NOW)
    own = stripes == "own stripes"
    writers, reader = _run_writers(key, backend, "fixed",
                                   list(range(WRITERS)) if own else [0] * WRITERS)
    counter = segment.attach(key, backend)
    try:
        _assert_every_hit_counted_or_reported(counter, writers, MINUTE, MINUTE, own)
        assert len({stripe for _w, _i, stripe, _r in writers}) == (WRITERS if own else 1)
        _, reads, problems = reader
        assert reads > 0 and not [p for p in problems if p[0] == "went down"], problems
        total = all_slot(counter)
        window, minute = counter.count(total, 0, NOW), counter.count(total, 1, NOW)
        if segment.header(counter)["lock_timeouts"] == 0:
            assert window == minute and problems == []
        else:
            # A second's or `all`'s addition dropped by a wait past 50 ms:
            # the window may miss a hit its minute has, and `all` may stay
            # below the sum of the accounts.
            assert window <= WRITERS * HITS
    finally:
        counter.detach()


@pytest.mark.parametrize("stripes", ["own stripes", "one shared stripe"])
def test_exact_counts_across_roll_overs_on_a_driven_clock(key, backend, stripes):
    """The same load with the clock advancing 0.7 ms per hit: every writer
    rolls minute and second buckets over concurrently (with one shared
    stripe, the very same buckets), and the minute snapshots still sum to
    exactly what was hit, less only what a wait for the lock past 50 ms
    dropped and reported (a loaded machine)."""
    segment.install(key, backend, now=NOW)
    own = stripes == "own stripes"
    writers, _reader = _run_writers(key, backend, "driven",
                                    list(range(WRITERS)) if own else [0] * WRITERS)
    counter = segment.attach(key, backend)
    try:
        last_minute = int(NOW + HITS * 0.0007) // 60
        assert last_minute - MINUTE >= 2
        _assert_every_hit_counted_or_reported(counter, writers, MINUTE, last_minute, own)
    finally:
        counter.detach()



def test_a_minute_roll_over_past_its_wait_is_short_by_the_hit_and_reports_it(key, backend):
    """What the exactness tests allow on a loaded machine, made to happen:
    a hit whose minute and second roll-overs all wait past 50 ms (the lock
    held) is missing from both keys' minutes, once each, is one dropped
    hit, and four waits; the next hit rolls both minutes over and counts."""
    segment.install(key, backend, now=NOW)
    counter = segment.attach(key, backend, stripe=0)
    holder = segment.attach(key, backend, stripe=1)
    try:
        counter.hit("a.example", now=NOW)
        holder.lock(1000)
        try:
            counter.hit("a.example", now=NOW + 60)
        finally:
            holder.unlock()
        counter.hit("a.example", now=NOW + 61)
        slots = (counter.find("a.example", "pageview"), all_slot(counter))
        assert [minute_total(counter, s, MINUTE + 1, MINUTE + 1) for s in slots] == [1, 1]
        head = segment.header(counter)
        assert (head["dropped_hits"], head["lock_timeouts"]) == (1, 4)
    finally:
        counter.detach()
        holder.detach()

def _lockstep_writer(key, backend, rounds, step, barrier):
    counter = segment.attach(key, backend, stripe=0)
    for r in range(rounds):
        barrier.wait()
        counter.hit("example.com", now=NOW + r * step)
        barrier.wait()


def test_writers_rolling_the_same_bucket_at_once_reset_it_only_once(key, backend):
    """The roll-over hazard itself.  4 writers on ONE stripe step together
    into a new minute and second while the test holds the semaphore, so all
    of them find the old tag and queue on the lock.  Only the first may
    reset the buckets (the tag check is repeated under the semaphore); a
    second reset would wipe the hits added before it."""
    segment.install(key, backend, now=NOW)
    counter = segment.attach(key, backend)
    rounds, step = 30, 61
    barrier = FORK.Barrier(WRITERS + 1)
    procs = [FORK.Process(target=_lockstep_writer, args=(key, backend, rounds, step, barrier))
             for _ in range(WRITERS)]
    for p in procs:
        p.start()
    checked = 0
    try:
        slot, total = None, all_slot(counter)
        for r in range(rounds):
            dropped = segment.header(counter)["dropped_hits"]
            counter.lock(1000)
            barrier.wait()
            time.sleep(0.005)  # let them queue (they give up after 50 ms)
            counter.unlock()
            barrier.wait()
            slot = slot or counter.find("example.com", "pageview")
            if segment.header(counter)["dropped_hits"] != dropped:
                continue  # a writer was starved past its timeout: no verdict
            t = NOW + r * step
            assert [counter.count(s, w, t) for s in (slot, total) for w in (1, 0)] == \
                [WRITERS] * 4, r
            checked += 1
    except BaseException:
        barrier.abort()  # release the writers (BrokenBarrierError) before joining
        raise
    finally:
        for p in procs:
            p.join(60)
        counter.detach()
    assert all(p.exitcode == 0 for p in procs)
    assert checked >= rounds // 2


# ------------------------------------------------------------- the clock

@pytest.fixture
def small_rings(key, backend):
    """A segment with a 5-minute ring, so a full wrap is quick to drive."""
    segment.install(key, backend, geometry=segment.Geometry(keys=64, minutes=5, seconds=64),
                    now=NOW)
    counter = segment.attach(key, backend)
    yield counter
    counter.detach()


def test_minute_boundaries_and_a_full_ring_wrap(small_rings):
    counter = small_rings
    ring = 5
    hits = {}
    # Minutes 0..2*ring+1: k+1 hits in minute k, the last one at :59.999.
    for k in range(2 * ring + 2):
        for i in range(k + 1):
            counter.hit("example.com", now=NOW + k * 60 + (59.999 if i == k else i))
        hits[MINUTE + k] = k + 1
        slot = counter.find("example.com", "pageview")
        for t in (NOW + k * 60, NOW + k * 60 + 59.999):
            # The current minute holds exactly its own hits: nothing leaked
            # from the minute `ring` earlier that used the same bucket.
            assert counter.count(slot, 1, t) == k + 1
            assert counter.count(all_slot(counter), 1, t) == k + 1
        # Minutes still in the ring read back; older ones read 0.
        for m in range(MINUTE, MINUTE + k + 1):
            expected = hits[m] if m > MINUTE + k - ring else 0
            assert counter.count(slot, 1, m * 60 + 30) == expected, (k, m)
        window = counter.minutes(MINUTE + k - ring + 1, MINUTE + k)
        assert sorted((m, n) for s, m, n in window if s == slot) == \
            [(m, hits[m]) for m in range(max(MINUTE, MINUTE + k - ring + 1), MINUTE + k + 1)]


def test_a_jump_of_many_rings_resets_the_bucket(small_rings):
    counter = small_rings
    counter.hit("example.com", n=7, now=NOW)
    later = NOW + 60 * 5 * 1000  # a thousand rings later, same bucket
    counter.hit("example.com", n=2, now=later)
    slot = counter.find("example.com", "pageview")
    assert counter.count(slot, 1, later) == 2
    assert counter.count(slot, 1, NOW) == 0
    assert counter.count(slot, 0, later) == 2


def test_the_sliding_60s_window_is_exact_to_the_second(small_rings):
    """Time moves forward second by second (as it does: the second ring
    holds 64 s, the window reads the last 60): i % 7 + 1 hits in second
    t0 + i for 70 s; at every second boundary the window is exact."""
    counter = small_rings
    t0 = int(NOW) + 17  # not on a minute boundary
    per_second = {t0 + i: (i % 7) + 1 for i in range(70)}
    counter.hit("example.com", now=t0 - 100)  # long gone by t0
    slot = counter.find("example.com", "pageview")
    for s in range(t0 - 1, t0 + 140):
        if s in per_second:
            assert counter.count(slot, 0, s) == sum(  # before this second's hits
                n for second, n in per_second.items() if s - 59 <= second < s)
            counter.hit("example.com", n=per_second[s], now=s + 0.5)
        expected = sum(n for second, n in per_second.items() if s - 59 <= second <= s)
        for t in (s, s + 0.5, s + 0.999):
            assert counter.count(slot, 0, t) == expected, s
        if s == t0 + 59:
            assert expected == sum(per_second[t0 + i] for i in range(60))
        if s == t0 + 60:  # the first second has just left the window
            assert expected == sum(per_second[t0 + i] for i in range(1, 61))


def test_the_second_ring_wraps_without_leaking(small_rings):
    counter = small_rings
    counter.hit("example.com", n=5, now=NOW)
    slot = counter.find("example.com", "pageview")
    assert counter.count(slot, 0, NOW + 59) == 5
    assert counter.count(slot, 0, NOW + 60) == 0
    counter.hit("example.com", n=1, now=NOW + 64)  # the same second bucket
    assert counter.count(slot, 0, NOW + 64) == 1
    # The bucket now holds second NOW + 64: asking about NOW's window
    # afterwards gets 0 for it, never the newer count.
    assert counter.count(slot, 0, NOW + 59) == 0


def real_minute() -> float:
    """The real clock's current minute boundary: whether a bucket is in the
    future is judged against the real clock, not the driven one."""
    return float(int(time.time()) // 60 * 60)


def test_a_bucket_ahead_of_the_real_clock_is_reclaimed_never_mixed(small_rings):
    """A bucket tagged a ring or more ahead of the real clock (a clock that
    jumped forward and back) is reclaimed: the writer counts, and the two
    epochs never mix."""
    counter = small_rings
    now = real_minute()
    counter.hit("example.com", n=3, now=now + 5 * 60)  # the same bucket, in the future
    counter.hit("example.com", n=100, now=now)
    slot = counter.find("example.com", "pageview")
    assert counter.count(slot, 1, now + 5 * 60) == 0
    assert counter.count(slot, 1, now) == 100
    assert segment.header(counter)["dropped_hits"] == 0


@pytest.mark.parametrize("late", [5 * 60, 64])  # a ring of minutes; a ring of seconds
def test_a_late_hit_never_resets_the_current_counts(small_rings, late):
    """A hit whose time is a ring behind (a replayed `now`, a writer
    descheduled for a whole ring) finds its bucket holding the current
    counts: it is dropped and reported, and the current counts stay."""
    counter = small_rings
    now = float(int(time.time()) - 1)  # the real clock's last whole second: not ahead of it
    counter.hit("example.com", n=7, now=now)
    counter.hit("example.com", n=100, now=now - late)
    slot = counter.find("example.com", "pageview")
    assert counter.count(slot, 1, now) == 7
    assert counter.count(slot, 0, now) == 7
    assert segment.header(counter)["dropped_hits"] == 100


def test_minutes_reads_at_most_one_ring(small_rings):
    counter = small_rings
    with pytest.raises(ValueError, match="at most 5 minutes"):
        counter.minutes(MINUTE, MINUTE + 5)
    assert counter.minutes(2**64 - 2, 2**64 - 1) == []  # ends (no wrap-around loop)
    assert counter.minutes(MINUTE + 1, MINUTE) == []


def test_the_real_clock_is_used_when_now_is_not_given(worker_api):
    for _ in range(10):
        before = time.time()
        trafficthreshold.hit("example.com")
        trafficthreshold.hit("example.com", n=2)
        counted = trafficthreshold.count("example.com")
        # Away from the minute's ends: the default clock is the coarse one,
        # up to a tick (<= 10 ms) behind time.time().
        if int(before // 60) == int(time.time() // 60) and 1 <= int(before) % 60 < 59:
            assert counted % 3 == 0 and counted >= 3
            assert trafficthreshold.count("example.com", window="60s") >= 3
            return
        time.sleep(1.1)  # a minute boundary fell in between: try again
    pytest.fail("never had a quiet second")


# -------------------------------------------------- killed with the lock

def test_a_worker_killed_holding_the_semaphore_does_not_stop_the_others(key, backend):
    segment.install(key, backend, now=NOW)
    counter = segment.attach(key, backend)
    counter.hit("before.example", n=3, now=NOW)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            segment.attach(key, backend).lock(1000)
            os.write(w, b"held")
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(w)
    assert os.read(r, 4) == b"held"
    os.close(r)
    try:
        assert segment.header(counter)["lock_owner_pid"] == pid
        # While it is held (the holder alive): a new key times out after
        # HOT_LOCK_TIMEOUT_MS, a roll-over drops the hit and says so.
        with pytest.raises(SegmentBusy, match="add a key"):
            counter.hit("new-while-held.example", now=NOW)
        assert counter.find("new-while-held.example", "pageview") is None
        counter.hit("before.example", n=2, now=NOW + 60)
        assert segment.header(counter)["dropped_hits"] == 2  # the hit, counted once
    finally:
        os.kill(pid, signal.SIGKILL)
        # Reaped: a zombie still "exists" for kill(pid, 0), see docs/segment.rst.
        os.waitpid(pid, 0)
    # SysV undid the holder's operation; POSIX: the next waiter finds the
    # holder dead and releases the lock for it.
    counter.hit("after.example", now=NOW + 1)            # a new key: needs the lock
    counter.hit("before.example", n=2, now=NOW + 120)    # a new minute: needs the lock
    counter.hit("before.example", now=NOW + 120.5)
    slot = counter.find("before.example", "pageview")
    assert counter.count(slot, 1, NOW) == 3              # nothing made before was lost
    assert counter.count(slot, 1, NOW + 120) == 3
    assert counter.count(counter.find("after.example", "pageview"), 1, NOW) == 1
    assert counter.count(all_slot(counter), 1, NOW) == 4
    head = segment.header(counter)
    assert head["dropped_hits"] == 2 and head["lock_owner_pid"] == 0
    with segment.locked(counter, 100):
        assert segment.header(counter)["lock_owner_pid"] == os.getpid()
    counter.detach()


# ------------------------------------------------------------------ fork

def test_fork_after_attach_takes_its_own_stripe(key, backend):
    segment.install(key, backend, now=NOW)
    counter = segment.attach(key, backend)
    mine = counter.stripe
    stripes = segment.header(counter)["stripes"]
    next_stripe = counter.load(segment.H_NEXT_STRIPE, 4)

    def child():
        theirs = counter.stripe
        for _ in range(1000):
            counter.hit("example.com", now=NOW)
        status, grandchild = in_child(lambda: (counter.hit("example.com", now=NOW),
                                               counter.stripe)[1])
        return theirs, grandchild[1]

    status, (how, result) = in_child(child)
    assert how == "returned", result
    theirs, grandchilds = result
    assert theirs == next_stripe % stripes != mine          # round robin
    assert grandchilds == (next_stripe + 1) % stripes
    for _ in range(500):
        counter.hit("example.com", now=NOW)
    assert counter.stripe == mine
    slot = counter.find("example.com", "pageview")
    assert counter.count(slot, 1, NOW) == 1501
    with raw_view(key, backend) as view:
        raw = RawReader(view)
        assert raw.minute_count(slot, MINUTE, stripe=mine) == 500
        assert raw.minute_count(slot, MINUTE, stripe=theirs) == 1000
        assert raw.minute_count(slot, MINUTE, stripe=grandchilds) == 1
    counter.detach()


def test_a_fixed_stripe_is_kept_across_fork(counter):
    status, result = in_child(lambda: (counter.hit("example.com", now=NOW), counter.stripe)[1])
    assert result == ("returned", 0) == ("returned", counter.stripe)


def test_the_module_api_works_in_a_forked_child(worker_api):
    trafficthreshold.hit("example.com", now=NOW)
    parent = _counter._default().stripe

    def child():
        trafficthreshold.hit("example.com", now=NOW)
        return _counter._default().stripe

    status, result = in_child(child)
    assert result[0] == "returned" and result[1] != parent
    assert trafficthreshold.count("example.com", now=NOW) == 2


# ---------------------------------------------------------- fail open

def test_a_missing_segment_fails_open_and_warns_once(fail_open_api, caplog):
    caplog.set_level(logging.DEBUG, logger="trafficthreshold")
    assert trafficthreshold.hit("example.com", now=NOW) is None
    assert trafficthreshold.hit("example.com", now=NOW + 1) is None     # no retry yet
    assert trafficthreshold.hit("example.com", now=NOW + 10) is None    # retried
    assert trafficthreshold.throttle_status(NOW + 30) == 0              # retried
    assert trafficthreshold.count("example.com", now=NOW) == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert warnings[0].name == "trafficthreshold"
    assert "not counting" in message and "trafficthreshold install" in message
    assert "shown once" in message
    # Bad input still raises when failing open.
    with pytest.raises(ValueError):
        trafficthreshold.hit("a/b", now=NOW + 40)


def test_a_missing_segment_raises_in_strict_mode(key, backend):
    trafficthreshold.configure(key=key, backend=backend, strict=True)
    try:
        with pytest.raises(SegmentNotFound, match="install"):
            trafficthreshold.hit("example.com", now=NOW)
        with pytest.raises(SegmentNotFound):
            trafficthreshold.throttle_status(NOW)
    finally:
        trafficthreshold._settings.clear()
        trafficthreshold.configure()


def test_uninstall_retires_workers_fail_open_then_reattach(fail_open_api, caplog):
    key, backend = fail_open_api
    segment.install(key, backend, now=NOW)
    trafficthreshold.hit("example.com", now=NOW)              # attaches
    assert _counter._default() is not None
    segment.uninstall(key, backend)                          # only we are attached
    assert trafficthreshold.hit("example.com", now=NOW + 1) is None   # retired: let go
    assert _counter._default() is None
    segment.install(key, backend, now=NOW)
    trafficthreshold.hit("example.com", now=NOW + 5)          # the new one: at once
    assert _counter._default() is not None
    counter = segment.attach(key, backend)
    assert counter.count(counter.find("example.com", "pageview"), 1, NOW) == 1
    counter.detach()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_every_hit_after_a_reinstall_is_in_the_new_segment(fail_open_api):
    """uninstall + install while a worker runs: its next hit notices the
    retirement and attaches to the new segment at once, whether the install
    came before that hit or after it (no 10 s of hits counted into the
    removed segment or lost); nothing is counted into the removed one."""
    key, backend = fail_open_api
    rolled = []
    for rnd in range(3):
        segment.install(key, backend, now=NOW)
        for i in range(rnd + 1):
            trafficthreshold.hit("example.com", now=NOW + rnd)
        assert _counter._default() is not None
        segment.uninstall(key, backend, rollup=lambda c: rolled.append(
            c.count(c.find("example.com", "pageview"), 1, NOW)))
        if rnd == 1:
            trafficthreshold.hit("example.com", now=NOW + 10)   # no segment: not counted
    # Every round's hits were in its own segment, counted once.
    assert rolled[1::2] == [1, 2, 3], rolled
    segment.install(key, backend, now=NOW)
    for i in range(5):
        trafficthreshold.hit("example.com", now=NOW + 11 + i)
    counter = segment.attach(key, backend)
    try:
        assert counter.count(counter.find("example.com", "pageview"), 1, NOW + 15) == 5
    finally:
        counter.detach()


def test_uninstall_while_a_thread_waits_in_hit_does_not_crash(installed):
    """A thread's hit() waits for the semaphore (a new second) while
    uninstall retires the segment and another thread's hit() lets go of
    the process's attachment: the waiting hit must not write through a
    freed mapping (it did: SIGSEGV)."""
    import threading
    key, backend = installed

    def scenario():
        trafficthreshold.configure(key=key, backend=backend)
        trafficthreshold.hit("a.example", now=NOW)
        other = segment.attach(key, backend)
        other.lock(5000)                          # as uninstall holds it
        waiting = threading.Thread(
            target=lambda: trafficthreshold.hit("a.example", now=NOW + 1))  # rolls: waits
        waiting.start()
        time.sleep(0.05)
        other.store(segment.H_STATE, 4, segment.STATE_RETIRED)
        trafficthreshold.hit("a.example", now=NOW + 1)    # retired: the default goes
        other.unlock()
        waiting.join(10)
        return _counter._default() is None

    status, result = in_child(scenario)
    assert os.WIFEXITED(status), f"died of signal {os.WTERMSIG(status)}"
    assert result == ("returned", True)


# ------------------------------------------------------------ bad input

BAD_CALLS = [
    (("",), {}, ValueError), (("x" * 65,), {}, ValueError), (("é" * 33,), {}, ValueError),
    (("a\nb",), {}, ValueError), (("a\x00b",), {}, ValueError), (("a/b",), {}, ValueError),
    (("~overflow",), {}, ValueError), (("all",), {}, ValueError),
    ((42,), {}, TypeError), ((b"example.com",), {}, TypeError),
    (("example.com", ""), {}, ValueError), (("example.com", "e" * 33), {}, ValueError),
    (("example.com", "é" * 17), {}, ValueError), (("example.com", "~any"), {}, ValueError),
    (("example.com", None), {}, TypeError),
    (("example.com",), {"n": 0}, ValueError), (("example.com",), {"n": -3}, ValueError),
    (("example.com",), {"n": 1.0}, TypeError), (("example.com",), {"n": True}, TypeError),
    (("example.com",), {"n": "1"}, TypeError), (("example.com",), {"n": 2**64}, ValueError),
    (("example.com",), {"now": 0}, ValueError), (("example.com",), {"now": float("nan")},
                                                  ValueError),
    (("example.com",), {"now": "soon"}, TypeError), (("example.com",), {"when": 1}, TypeError),
    (("example.com", "pageview", 1, NOW, 5), {}, TypeError),
    # A good account with a bad new event, a bad account with a good new event.
    (("example.com", "new/bad/event"), {}, ValueError), (("a/b", "newevent"), {}, ValueError),
    # A bad funnel status (docs/webapps.rst): a '/', empty, too long, not a str.
    (("example.com", "order"), {"status": "a/b"}, ValueError),
    (("example.com", "order"), {"status": ""}, ValueError),
    (("example.com", "order"), {"status": "s" * 27}, ValueError),
    (("example.com", "order"), {"status": 1}, TypeError),
]


@pytest.mark.parametrize("args, kwargs", [(("nosuch", 1), {}), ((), {"backend": "nosuch",
                                                                     "key": 1})])
def test_a_bad_backend_is_named_however_it_is_passed(args, kwargs):
    with pytest.raises(ValueError, match="backend 'nosuch' is not valid; use 'sysv' or 'posix'"):
        _counter.Counter(*args, **kwargs)


def _ids(call):
    return repr(call)[:40]


@pytest.mark.parametrize("args, kwargs, exc", BAD_CALLS, ids=[_ids(c) for c in BAD_CALLS])
def test_bad_input_raises_and_adds_nothing(fail_open_api, args, kwargs, exc):
    """Bad names and arguments raise (even failing open) and leave no count
    and no key behind, through Counter.hit and the module's hit()."""
    key, backend = fail_open_api
    segment.install(key, backend, now=NOW)
    trafficthreshold.hit("example.com", now=NOW)  # attach the module API
    counter = segment.attach(key, backend)
    before = segment.header(counter)
    for hit in (counter.hit, trafficthreshold.hit):
        kwargs = dict(kwargs)
        if "now" not in kwargs and len(args) < 4:
            kwargs["now"] = NOW
        with pytest.raises(exc):
            hit(*args, **kwargs)
    after = segment.header(counter)
    assert after["keys_used"] == before["keys_used"]
    assert after["overflow_hits"] == after["dropped_hits"] == 0
    assert counter.count(all_slot(counter), 1, NOW) == 1
    counter.detach()


def test_n_adds_n(counter):
    counter.hit("example.com", n=5, now=NOW)
    counter.hit("example.com", "pageview", segment.MAX_HIT_N, NOW)
    assert counter.count(counter.find("example.com", "pageview"), 1, NOW) == 5 + 2**32 - 1


# ------------------------------------------------------- full key table

def test_a_full_key_table_overflows_and_keeps_the_total_exact(key, backend):
    keys, reserve = segment.MIN_KEYS, segment.EVENT_RESERVE
    segment.install(key, backend, geometry=segment.Geometry(keys=keys), now=NOW)
    counter = segment.attach(key, backend)
    account_slots = keys - reserve - 2            # slots 2..17: overflow and all are 0 and 1
    for i in range(account_slots + 4):
        counter.hit(f"acct-{i}", n=i + 1, now=NOW)
    head = segment.header(counter)
    assert head["keys_used"] == keys - reserve
    overflowed = sum(i + 1 for i in range(account_slots, account_slots + 4))
    assert head["overflow_hits"] == overflowed
    assert counter.count(segment.OVERFLOW_SLOT, 1, NOW) == overflowed
    assert counter.find(f"acct-{account_slots}", "pageview") is None
    assert counter.count(all_slot(counter), 1, NOW) == sum(range(1, account_slots + 5))
    # Overflowed accounts keep counting into the total.
    counter.hit(f"acct-{account_slots + 1}", now=NOW)
    assert counter.count(all_slot(counter), 1, NOW) == sum(range(1, account_slots + 5)) + 1
    # The reserve: a new event still gets its `all` key (its account does not).
    counter.hit("acct-0", "signup", n=3, now=NOW)
    assert counter.count(all_slot(counter, "signup"), 1, NOW) == 3
    assert counter.find("acct-0", "signup") is None
    # Fill the reserve; then even an event's total overflows.
    for j in range(reserve - 1):
        counter.hit(event=f"event-{j}", now=NOW)
    assert segment.header(counter)["keys_used"] == keys
    before = segment.header(counter)["overflow_hits"]
    counter.hit(event="one-too-many", n=2, now=NOW)
    assert counter.find(None, "one-too-many") is None
    assert segment.header(counter)["overflow_hits"] == before + 2
    # The module API overflows the same way (it is not cached).
    trafficthreshold.configure(key=key, backend=backend, strict=True)
    try:
        for _ in range(3):
            trafficthreshold.hit("yet-another", now=NOW)
        assert trafficthreshold.count(None, now=NOW) == sum(range(1, account_slots + 5)) + 4
        # With both keys of a hit in the overflow slot (a new event and a
        # new account in a full table), the slot gets the hit once: it
        # agrees with overflow_hits (it used to get 2n per hit).
        trafficthreshold.hit("brand-new", "brand-new-event", n=5, now=NOW)
        head = segment.header(counter)
        assert counter.count(segment.OVERFLOW_SLOT, 1, NOW) == head["overflow_hits"]
    finally:
        trafficthreshold._settings.clear()
        trafficthreshold.configure()
    counter.detach()


# ------------------------------------------------------------- corruption

def test_a_corrupt_throttle_slot_or_index_entry_does_not_crash(key, backend):
    segment.install(key, backend, now=NOW)
    counter = segment.attach(key, backend)
    counter.hit("example.com", now=NOW)
    counter.detach()
    with raw_view(key, backend) as view:
        raw = RawReader(view)
        slot = raw.find("example.com", "pageview")
        for off, state, entry_slot, *_ in list(raw.entries()):  # point it past the table
            if state == 1 and entry_slot == slot:
                view[off + 4:off + 8] = (0xFFFF0000).to_bytes(4, "little")

    def use():
        fresh = segment.attach(key, backend)
        fresh.store(segment.H_THROTTLE_SLOT, 4, 0xFFFFFFFF)
        level = fresh.level(NOW)
        fresh.hit("example.com", now=NOW)  # lands in the overflow slot
        return level, fresh.count(segment.OVERFLOW_SLOT, 1, NOW)

    status, result = in_child(use)
    assert os.WIFEXITED(status), f"died of signal {os.WTERMSIG(status)}"
    assert result == ("returned", (0, 1))


# --------------------------------------------------------------- throttle

@pytest.mark.parametrize("window", ["60s", "minute"])
def test_throttle_status_is_the_live_level(key, backend, window):
    multiplier = 10
    segment.install(key, backend, multiplier=multiplier, window=window, now=NOW)
    trafficthreshold.configure(key=key, backend=backend, strict=True)
    try:
        counter = segment.attach(key, backend)
        t0 = int(NOW) + 20
        hits = {t0 + i: 1 + (i % 4) for i in range(50)}
        for s in range(t0 - 1, t0 + 120):  # time moves forward
            if s in hits:
                trafficthreshold.hit("example.com", n=hits[s], now=s + 0.25)
            if window == "60s":
                in_window = sum(n for t, n in hits.items() if s - 59 <= t <= s)
            else:
                in_window = sum(n for t, n in hits.items() if t // 60 == s // 60 and t <= s)
            expected = min(5, in_window // multiplier)
            assert trafficthreshold.throttle_status(s + 0.5) == expected, s
            assert counter.level(s + 0.5) == expected
        assert max(min(5, n // multiplier) for n in [sum(hits.values())]) == 5  # it saturated
        counter.detach()
    finally:
        trafficthreshold._settings.clear()
        trafficthreshold.configure()


def test_the_supervisors_level_is_honoured_while_fresh(worker_api):
    key, backend = worker_api
    counter = segment.attach(key, backend)
    counter.store(segment.H_THROTTLE_LEVEL, 4, 3)
    counter.store(segment.H_HEARTBEAT_MS, 8, int(NOW * 1000))
    stale_after = segment.HEARTBEAT_STALE_MS / 1000
    assert trafficthreshold.throttle_status(NOW) == 3
    assert trafficthreshold.throttle_status(NOW + stale_after - 0.1) == 3
    assert trafficthreshold.throttle_status(NOW + stale_after + 0.5) == 0   # stale: ignored
    assert counter.level(NOW + stale_after + 0.5) == 0
    # A fresh heartbeat makes it count again; a live level above it wins.
    counter.store(segment.H_HEARTBEAT_MS, 8, int((NOW + 100) * 1000))
    assert trafficthreshold.throttle_status(NOW + 101) == 3
    trafficthreshold.hit("example.com", n=4 * 60, now=NOW + 101)           # multiplier 60
    assert trafficthreshold.throttle_status(NOW + 101) == 4
    counter.store(segment.H_THROTTLE_LEVEL, 4, 9)                          # out of range
    assert trafficthreshold.throttle_status(NOW + 101) == 5
    counter.detach()


def test_throttle_status_without_a_segment_is_0(fail_open_api):
    assert trafficthreshold.throttle_status(NOW) == 0


# -------------------------------------------------------------- count()

def test_count_reads_accounts_and_the_total(worker_api):
    trafficthreshold.hit("a.example", n=2, now=NOW)
    trafficthreshold.hit("b.example", now=NOW + 30)
    trafficthreshold.hit("b.example", event="signup", now=NOW + 30)
    trafficthreshold.hit(event="signup", now=NOW + 61)
    count = trafficthreshold.count
    assert count("a.example", now=NOW) == 2
    assert count(None, now=NOW + 59) == count("all", now=NOW + 59) == 3
    assert count(None, "signup", now=NOW + 30) == 1
    assert count(None, "signup", window="60s", now=NOW + 61) == 2
    assert count(None, "signup", window="minute", now=NOW + 61) == 1
    assert count("never.example", now=NOW) == 0
    with pytest.raises(ValueError, match="'minute' or '60s'"):
        count("a.example", window="hour")
    with pytest.raises(ValueError):
        count("a/b")


# ------------------------------------------- the lock and the GIL (item 1)

def _gil_hog_hitting(key, backend, ready, seconds):
    """A process with a thread that keeps the GIL (a long switch interval)
    while its main thread rolls buckets over: with the lock taken GIL-free
    it never holds the lock while waiting for the GIL."""
    sys.setswitchinterval(0.5)
    counter = segment.attach(key, backend)
    end = time.monotonic() + seconds

    def spin():
        while time.monotonic() < end:
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    ready.set()
    i = 0
    while time.monotonic() < end:
        counter.hit("busy.example", now=NOW + 1000 + i)  # a new second: a roll-over
        i += 1
    thread.join()


def test_a_thread_holding_the_gil_never_makes_other_workers_drop(key, backend):
    segment.install(key, backend, now=NOW)
    counter = segment.attach(key, backend)
    counter.hit("busy.example", now=NOW)
    counter.hit("quiet.example", now=NOW)  # both keys exist: only roll-overs lock
    ready = FORK.Event()
    hog = FORK.Process(target=_gil_hog_hitting, args=(key, backend, ready, 1.5))
    hog.start()
    try:
        assert ready.wait(10)
        end, i = time.monotonic() + 1.0, 0
        while time.monotonic() < end:
            counter.hit("quiet.example", now=NOW + 2000 + i)  # a roll-over each
            i += 1
    finally:
        hog.join(10)
    assert hog.exitcode == 0
    head = segment.header(counter)
    assert head["dropped_hits"] == 0, f"{head['dropped_hits']} of {i} hits dropped"
    assert head["lock_owner_pid"] == 0
    counter.detach()


def test_a_lock_word_left_by_a_dead_process_is_taken_over_at_once(key):
    """POSIX: the lock word is the owner.  A holder that died (here: a
    reaped child's pid in the word) is replaced by the next taker in one
    compare-and-swap, without a timeout; uninstall takes it over too."""
    segment.install(key, "posix", now=NOW)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    counter = segment.attach(key, "posix")
    counter.store(segment.H_LOCK_OWNER_PID, 4, pid)
    start = time.monotonic()
    counter.hit("new.example", now=NOW)  # a new key and two roll-overs
    assert time.monotonic() - start < segment.HOT_LOCK_TIMEOUT_MS / 1000
    assert counter.count(counter.find("new.example", "pageview"), 1, NOW) == 1
    head = segment.header(counter)
    assert head["dropped_hits"] == 0 and head["lock_owner_pid"] == 0
    counter.store(segment.H_LOCK_OWNER_PID, 4, pid)
    counter.detach()
    segment.uninstall(key, "posix", force=True)
    assert not os.path.exists("/dev/shm" + segment.posix_name(key))


def test_install_and_the_hot_path_share_one_lock(installed):
    """segment.py's structural lock is the hot path's: while Python holds
    it, a roll-over waits, times out and is counted as dropped."""
    key, backend = installed
    counter = segment.attach(key, backend)
    raw = segment._Raw(backend, key)
    try:
        with segment._held(raw, 100):
            assert segment.header(counter)["lock_owner_pid"] == os.getpid()
            counter.hit(now=NOW + 60)  # a new minute: needs the lock
        assert segment.header(counter)["dropped_hits"] == 1
        assert segment.header(counter)["lock_owner_pid"] == 0
        counter.hit(now=NOW + 120)
        assert segment.header(counter)["dropped_hits"] == 1
    finally:
        raw.close()
        counter.detach()


# ------------------------------------------------------ clock jumps (item 8)

def test_a_clock_jump_forward_and_back_loses_only_the_jump(small_rings):
    """70 s counted 50 minutes ahead tag every second bucket and the
    minute bucket of MINUTE (50 = 10 rings of 5) with future epochs; back on
    time, every bucket is reclaimed and counts (it used to refuse additions
    for fifty minutes: 60 hits read as 0)."""
    counter = small_rings
    now = real_minute()
    for s in range(70):
        counter.hit("example.com", now=now + 3000 + s)
    for s in range(60):
        counter.hit("example.com", now=now + s)
    slot = counter.find("example.com", "pageview")
    assert counter.count(slot, 0, now + 59) == 60
    assert counter.count(slot, 1, now) == 60
    assert counter.level(now + 59) == 1  # 60 hits // multiplier 60
    assert segment.header(counter)["dropped_hits"] == 0


@pytest.mark.parametrize("scale", [1000, 1e6])
def test_now_in_milliseconds_is_refused(counter, worker_api, scale):
    before = segment.header(counter)
    for hit in (counter.hit, trafficthreshold.hit):
        with pytest.raises(ValueError, match="now looks like milliseconds"):
            hit("example.com", now=time.time() * scale)
    with pytest.raises(ValueError, match="366 days from the real clock"):
        counter.hit("example.com", now=time.time() - 400 * 86400)
    after = segment.header(counter)
    assert after["keys_used"] == before["keys_used"] and after["dropped_hits"] == 0
    assert counter.count(all_slot(counter), 1, NOW) == 0


# ------------------------------------------------------------ bounded n (item 9)

@pytest.mark.parametrize("n", [0, -1, 2**32, 2**63 - 1, 2**63, 2**64, 10**30])
def test_n_out_of_range_is_a_value_error_naming_the_maximum(counter, worker_api, n):
    for hit in (counter.hit, trafficthreshold.hit):
        with pytest.raises(ValueError, match=rf"n={n} is out of range; n must be "
                                             rf"1\.\.{segment.MAX_HIT_N}"):
            hit("example.com", n=n, now=NOW)
    assert counter.find("example.com", "pageview") is None
    assert _counter.MAX_HIT_N == segment.MAX_HIT_N == 2**32 - 1


def test_counts_read_out_saturate_below_2_63(counter, installed):
    key, backend = installed
    counter.hit(now=NOW)
    counter.hit(now=NOW)  # the all key of pageview, on stripe 0
    slot = all_slot(counter)
    with raw_view(key, backend) as view:
        raw = RawReader(view)
        for p in range(raw.stripes):  # every stripe near 2**64: the sum wraps
            off = (raw.slots_offset + slot * raw.slot_size + p * raw.stripe_size
                   + (MINUTE % raw.minutes) * 16)
            view[off:off + 16] = MINUTE.to_bytes(8, "little") + (2**64 - 5).to_bytes(8, "little")
    assert counter.count(slot, 1, NOW) == 2**63 - 1
    assert (slot, MINUTE, 2**63 - 1) in counter.minutes(MINUTE, MINUTE)


# --------------------------------------------------------- memory safety (10)

class LyingStr(str):
    """A str whose encode() lies about its length."""

    def encode(self, *args, **kwargs):  # noqa: D102
        return b"x"


@pytest.mark.parametrize("account, event", [(LyingStr("a" * 300), "pageview"),
                                            ("example.com", LyingStr("e" * 300)),
                                            (LyingStr("a" * 5_000_000), "pageview")])
def test_names_are_bounded_in_c_whatever_encode_says(installed, account, event):
    key, backend = installed

    def use():
        counter = segment.attach(key, backend)
        try:
            counter.hit(account, event, now=NOW)
        except ValueError as exc:
            return "ValueError", "UTF-8 bytes" in str(exc), counter.keys()
        return "counted", counter.keys()

    status, result = in_child(use)
    assert os.WIFEXITED(status), f"died of signal {os.WTERMSIG(status)}"
    assert result[0] == "returned", result
    kind, named, keys = result[1]
    assert kind == "ValueError" and named
    assert sorted(keys) == [(0, "~overflow", "~any"), (1, "all", "pageview")]


@pytest.mark.parametrize("call", ["load", "store"])
def test_load_and_store_with_a_bad_width_raise_never_crash(counter, call):
    def use():
        for width in (0, 3, -8):
            args = (segment.H_THROTTLE_LEVEL, width) + ((1,) if call == "store" else ())
            with pytest.raises(ValueError, match="width"):
                getattr(counter, call)(*args)
        return "ok"

    status, result = in_child(use)
    assert os.WIFEXITED(status), f"died of signal {os.WTERMSIG(status)}"
    assert result == ("returned", "ok")


# ------------------------------------------------- corrupt header fields (11)

def test_corrupt_throttle_fields_read_safely_and_are_repaired(key, backend):
    segment.install(key, backend, multiplier=1, now=NOW)
    counter = segment.attach(key, backend)
    for _ in range(3):
        counter.hit(now=NOW)
    good_slot = counter.load(segment.H_THROTTLE_SLOT, 4)
    counter.store(segment.H_THROTTLE_WINDOW, 4, 0xFFFFFFFF)
    assert counter.level(NOW) == 3  # an unknown window reads as the sliding 60 s
    counter.store(segment.H_THROTTLE_SLOT, 4, 0xFFFFFFFF)
    counter.store(segment.H_THROTTLE_LEVEL, 4, 0xFFFFFFFF)

    def read():
        fresh = segment.attach(key, backend)
        trafficthreshold.configure(key=key, backend=backend, strict=True)
        return fresh.level(NOW), trafficthreshold.throttle_status(NOW)

    status, result = in_child(read)
    assert os.WIFEXITED(status), f"died of signal {os.WTERMSIG(status)}"
    assert result == ("returned", (0, 0))  # heartbeat stale: the bad level is ignored
    problems = segment.header_problems(counter)
    assert len(problems) == 3
    assert any("throttle_slot is 4294967295" in p for p in problems)
    assert any("throttle_window is 4294967295" in p for p in problems)
    assert segment.repair_header(counter, window="minute") == problems
    head = segment.header(counter)
    assert (head["throttle_slot"], head["throttle_window"], head["throttle_level"]) == \
        (good_slot, segment.WINDOWS["minute"], 0)
    assert segment.header_problems(counter) == [] and counter.level(NOW) == 3
    counter.detach()


def test_names_that_are_not_utf8_do_not_break_keys(counter, installed):
    key, backend = installed
    counter.hit("example.com", now=NOW)
    with raw_view(key, backend) as view:
        raw = RawReader(view)
        for off, state, _slot, _h, account, _e in raw.entries():
            if account == b"example.com":
                view[off + 16:off + 16 + 11] = b"exam\xffle.co\xfe"
    keys = counter.keys()
    bad = [k for k in keys if k[1].startswith("exam")]
    assert bad and bad[0][1] == "exam\udcffle.co\udcfe"
    assert bad[0][1].encode("utf-8", "surrogateescape") == b"exam\xffle.co\xfe"
    good, skipped = segment.split_keys(counter)
    assert skipped == bad and all(k[1] != bad[0][1] for k in good)


# ------------------------------------------------ SIGKILL at random (item 12)

CRASH_HITS = 6000  # per worker: one hit a second from NOW, 100 minutes (the ring holds 120)


def _crash_worker(key, backend, wid, progress):
    """Counts CRASH_HITS hits, each in a new second (a roll-over under the
    lock; workers at seconds 64 apart reclaim each other's second buckets,
    under the lock too), a new key every 97 (inserts), recording in
    `progress` (shared) the hit it starts and the hits it finished, so the
    parent knows what a kill interrupted."""
    try:
        counter = segment.attach(key, backend)
        for k in range(CRASH_HITS):
            account = f"w{wid}-{k}" if k % 97 == 0 else f"a{k % 50}"
            progress[2 * wid] = k + 1
            counter.hit(account, now=NOW + k)
            progress[2 * wid + 1] = k + 1
    finally:
        os._exit(0)


def _crash_run(key, backend, kills, seed):
    import array
    import mmap as mmap_module
    import random
    rnd = random.Random(seed)
    segment.install(key, backend, now=NOW)
    slots = kills + 8
    shared = mmap_module.mmap(-1, slots * 2 * 8)
    progress = memoryview(shared).cast("Q")
    live, wid, killed_in_flight, done = {}, 0, 0, 0

    def spawn():
        nonlocal wid
        pid = os.fork()
        if pid == 0:
            _crash_worker(key, backend, wid, progress)
        live[pid] = wid
        wid += 1

    for _ in range(3):
        spawn()
    try:
        while done < kills:
            time.sleep(rnd.uniform(0.0005, 0.008))
            pid = rnd.choice(list(live))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # reaped at once: a zombie looks alive to kill(pid, 0)
            w = live.pop(pid)
            if progress[2 * w] != progress[2 * w + 1]:
                killed_in_flight += 1
            done += 1
            spawn()
    finally:
        for pid in live:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finished = sum(progress[2 * w + 1] for w in range(wid))
    in_flight = killed_in_flight + sum(progress[2 * w] != progress[2 * w + 1]
                                       for w in live.values())
    progress.release()
    shared.close()

    counter = segment.attach(key, backend)
    try:
        # One more key from here (the `all` key of a new event, which the
        # reserve always has room for): a lock left by a killed holder is
        # taken over (POSIX) or was given back (SysV undo), without a timeout.
        start = time.monotonic()
        counter.hit(event="final", now=NOW + CRASH_HITS)
        assert counter.find(None, "final") is not None
        assert time.monotonic() - start < segment.HOT_LOCK_TIMEOUT_MS / 1000
        head = segment.header(counter)
        assert head["lock_owner_pid"] == 0
        if backend == "sysv":
            assert sysv_ipc.Semaphore(key).value == 1
        last = MINUTE + CRASH_HITS // 60
        per_slot = {}
        for slot, _minute, n in counter.minutes(MINUTE, last):
            per_slot[slot] = per_slot.get(slot, 0) + n
        total = per_slot.get(all_slot(counter), 0)
        dropped = head["dropped_hits"]
        # Every finished hit is counted or reported dropped; a killed one
        # is counted at most once.
        assert finished - dropped <= total <= finished + in_flight, \
            (finished, in_flight, dropped, total)
        # The accounts add up to the total, give or take the hits cut between
        # their `all` addition and their account's.
        accounts = sum(per_slot.get(slot, 0) for slot, a, e in counter.keys() if a != "all")
        assert total - in_flight <= accounts <= total
        # No half-written key is visible: every ready entry is a whole name.
        names_seen = [a for _slot, a, _e in counter.keys()]
        assert all(re.fullmatch(r"w\d+-\d+|a\d+|all|~overflow", a)
                   for a in names_seen), names_seen
        slots_seen = [slot for slot, _a, _e in counter.keys()]
        assert len(slots_seen) == len(set(slots_seen)) <= head["keys_used"]
        return {"kills": kills, "finished": finished, "in_flight": in_flight,
                "dropped": dropped, "total": total}
    finally:
        counter.detach()


def test_workers_killed_at_random_instants_lose_nothing(key, backend, tmp_path):
    result = _crash_run(key, backend, kills=60, seed=1)
    # The kills did land inside hits (else this proved nothing).
    assert result["finished"] > 0 and result["in_flight"] > 0, result
    # And the store gets exactly what the ring holds, rolled twice over.
    from trafficthreshold.rollup import Roller
    from trafficthreshold.store import SQLiteStore
    counter = segment.attach(key, backend)
    try:
        with SQLiteStore(str(tmp_path / "stats.sqlite3"), "UTC") as store:
            for _ in range(2):
                Roller(counter, store).roll(NOW + CRASH_HITS + 60, include_current=True)
            stored = store.period("all", "pageview", 2027)["total"]  # NOW is in 2027-01
        assert stored == result["total"], (stored, result)
    finally:
        counter.detach()


@pytest.mark.slow
def test_workers_killed_at_random_instants_lose_nothing_soak(key, backend):
    kills = int(os.environ.get("TRAFFICTHRESHOLD_SOAK_KILLS", "600"))
    _crash_run(key, backend, kills=kills, seed=int(time.time()))


# ------------------------------------------- reclaim: a stale cache (issue 11)

def _stale_worker(key, backend, conn):
    """A web worker: the module-level hit() (its caches: the key table and
    the last event's), strict.  Hits what the parent says, when it says."""
    try:
        trafficthreshold.configure(key=key, backend=backend, strict=True)
        while True:
            msg = conn.recv()
            if msg is None:
                break
            account, n, now = msg
            trafficthreshold.hit(account, n=n, now=now)
            conn.send("done")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def test_a_process_with_a_stale_slot_counts_for_its_own_key_after_reuse(key, backend):
    """A second real process caches old.example's slot; the key goes idle,
    is rolled and reclaimed, and its slot goes to new.example.  The
    process's next hit of old.example is counted for old.example (in a slot
    of its own), and new.example's count stays exact."""
    segment.install(key, backend, geometry=segment.Geometry(keys=40, minutes=5), now=NOW)
    parent_end, child_end = FORK.Pipe()
    worker = FORK.Process(target=_stale_worker, args=(key, backend, child_end))
    worker.start()
    counter = segment.attach(key, backend)

    def worker_hits(account, n, now):
        parent_end.send((account, n, now))
        assert parent_end.recv() == "done"

    try:
        worker_hits("old.example", 3, NOW)
        worker_hits("old.example", 1, NOW + 1)  # from the cache now
        old = counter.find("old.example", "pageview")
        later = NOW + 6 * 60  # idle for longer than the 5-minute ring
        done = segment.reclaim(counter, later, MINUTE + 5)
        assert [(s, a) for s, a, _e in done] == [(old, "old.example")]
        counter.hit("new.example", n=2, now=later)
        assert counter.find("new.example", "pageview") == old  # the slot, reused
        worker_hits("old.example", 7, later + 1)   # the worker's stale cache
        worker_hits("old.example", 1, later + 2)   # and its refreshed one
        moved = counter.find("old.example", "pageview")
        assert moved not in (None, old)
        assert counter.count(old, 1, later) == 2            # new.example's own
        assert counter.count(moved, 1, later) == 8          # old.example's
        assert counter.count(all_slot(counter), 1, later) == 10
        assert segment.header(counter)["dropped_hits"] == 0
        with raw_view(key, backend) as view:
            raw = RawReader(view)
            assert raw.find("new.example", "pageview") == old
            assert raw.minute_count(old, MINUTE + 6) == 2
            assert raw.minute_count(moved, MINUTE + 6) == 8
        # Reclaimed but not reused: the worker's next hit finds out too.
        worker_hits("gone.example", 1, later)
        segment.reclaim(counter, later + 6 * 60, MINUTE + 11)
        worker_hits("gone.example", 4, later + 6 * 60)
        gone = counter.find("gone.example", "pageview")
        assert counter.count(gone, 1, later + 6 * 60) == 4
    finally:
        parent_end.send(None)
        worker.join(10)
        counter.detach()


RECLAIM_ROUNDS, RECLAIM_RING = 40, 5


def _reclaim_plan(pool: int, wid: int, r: int) -> list[tuple[str, int]]:
    """What writer `wid` hits in round r: 3 hosts of the pool.  With a pool
    of 15 a host comes back every 5 rounds: in the very round its reclaim
    becomes due, so the hits race the reclaim of their own key.  With 40,
    every 13 or 14: long after it was reclaimed (a stale cache)."""
    return [(f"p{(r * 3 + i) % pool}.example", 1 + (wid + i + r) % 4) for i in range(3)]


def _reclaim_writer(key, backend, pool, wid, barrier):
    try:
        counter = segment.attach(key, backend)
        for r in range(RECLAIM_ROUNDS):
            barrier.wait()            # the round starts: the parent reclaims meanwhile
            for host, n in _reclaim_plan(pool, wid, r):
                for k in range(n):
                    counter.hit(host, now=NOW + 60 * r + k)
            barrier.wait()            # the round is over: the parent rolls it
    finally:
        os._exit(0)


@pytest.mark.parametrize("pool", [15, 40])
def test_hits_racing_the_reclaim_of_their_own_key_are_counted_exactly(key, backend, pool):
    """Three writer processes hit hosts that went idle and are being
    reclaimed at that very moment by the parent; the parent rolls each
    minute after it closed.  Every host's total is exact: a hit is counted
    for its own key whichever of the hit and the reclaim takes the lock
    first, never for another key, never lost."""
    segment.install(key, backend, now=NOW,
                    geometry=segment.Geometry(keys=40, minutes=RECLAIM_RING))
    barrier = FORK.Barrier(4)
    writers = [FORK.Process(target=_reclaim_writer, args=(key, backend, pool, w, barrier))
               for w in range(3)]
    for w in writers:
        w.start()
    counter = segment.attach(key, backend)
    rolled: dict[str, int] = {}
    reclaimed = 0
    try:
        for r in range(RECLAIM_ROUNDS):
            barrier.wait()
            # Keys idle since before round r - RING + 1 and rolled: race the hits.
            reclaimed += len(counter.reclaim(MINUTE + r - RECLAIM_RING + 1))
            barrier.wait()
            names = {s: a for s, a, _e in counter.keys()}
            for slot, _m, n in counter.minutes(MINUTE + r, MINUTE + r):
                rolled[names[slot]] = rolled.get(names[slot], 0) + n
    finally:
        for w in writers:
            w.join(30)
    expected: dict[str, int] = {}
    for r in range(RECLAIM_ROUNDS):
        for wid in range(3):
            for host, n in _reclaim_plan(pool, wid, r):
                expected[host] = expected.get(host, 0) + n
    header = segment.header(counter)
    facts = {k: header[k] for k in ("dropped_hits", "lock_timeouts", "overflow_hits",
                                    "reclaimed", "keys_used")}
    short_all = sum(expected.values()) - rolled.pop("all")
    short = {host: n - rolled.get(host, 0) for host, n in expected.items()}
    # Never a count under another key's name, never more than was hit.
    assert set(rolled) <= set(expected) and short_all >= 0, (rolled, facts)
    assert all(n >= 0 for n in short.values()), (short, facts)
    assert header["overflow_hits"] == 0, facts
    if header["lock_timeouts"] == 0:
        assert short_all == 0 and rolled == expected, (short, facts)
        assert header["dropped_hits"] == 0, facts
    else:
        # A loaded machine: a wait for the lock passed 50 ms (fail open).
        # Every hit not counted is reported dropped.
        assert max(short_all, sum(short.values())) <= header["dropped_hits"], (short, facts)
    # With 40 every round's idle keys are reclaimed; with 15 how many
    # reclaims win their race against the hits varies, and on a loaded
    # machine none may (the writers' hits first every time): that run
    # still checks exactness, and the 40 case checks that reclaims ran.
    assert reclaimed == header["reclaimed"]
    if pool == 40:
        assert reclaimed > pool
    counter.detach()


# ------------------------------------- threads, signals (issue 20)

_THREADED_RECLAIM = r'''
import sys, threading
from trafficthreshold import segment
key, backend, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
NOW = 1_800_000_000
sys.setswitchinterval(1e-6)
shared = segment.attach(key, backend)      # one Counter, eight threads
reader = segment.attach(key, backend)
barrier = threading.Barrier(9)
errors = []

def plan(t, r):
    """Thread t's hits in round r: the cached hosts (reclaimed at every
    round's start), one new host, and hosts of another event."""
    return ([(f"h{i}.example", "pageview") for i in range(6)] +
            [(f"t{t}-r{r}.example", "pageview"), (f"h{t % 3}.example", "signup")])

def worker(t):
    try:
        for r in range(rounds):
            barrier.wait()
            for k in range(3):
                for account, event in plan(t, r):
                    shared.hit(account, event, 1 + k, NOW + 60 * r + k)
            barrier.wait()
    except BaseException as exc:
        errors.append(repr(exc))
        barrier.abort()

threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
for th in threads:
    th.start()
rolled = {}
for r in range(rounds):
    # Every key of the round before is idle and rolled: reclaim them all,
    # so the threads' cached slots are stale (forget_slots) while other
    # threads resolve new hosts (names.validate runs Python, the insert
    # lets go of the GIL).
    reader.reclaim(1_800_000_000 // 60 + r)
    barrier.wait()
    barrier.wait()
    names = {s: (a, e) for s, a, e in reader.keys()}
    for slot, _m, n in reader.minutes(NOW // 60 + r, NOW // 60 + r):
        rolled[names[slot]] = rolled.get(names[slot], 0) + n
for th in threads:
    th.join()
expected = {}
for r in range(rounds):
    for t in range(8):
        for account, event in plan(t, r):
            for k in range(3):
                expected[account, event] = expected.get((account, event), 0) + 1 + k
                expected["all", event] = expected.get(("all", event), 0) + 1 + k
head = segment.header(reader)
assert not errors, errors
assert head["dropped_hits"] == head["overflow_hits"] == 0, head
assert rolled == expected, sorted(set(rolled.items()) ^ set(expected.items()))[:10]
print("ok", head["reclaimed"])
'''


def test_threads_hitting_while_their_cached_keys_are_reclaimed(installed):
    """Eight threads of one process share a Counter; at every round the
    keys they cached are reclaimed, so their hits find them stale and
    forget the cache while other threads are resolving new names (Python
    runs, the GIL is let go).  Under PYTHONMALLOC=debug a write through a
    freed cache dict crashes the process; every hit must also be counted
    under its own key."""
    key, backend = installed
    env = {**os.environ, "PYTHONMALLOC": "debug", "PYTHONFAULTHANDLER": "1"}
    import subprocess
    proc = subprocess.run([sys.executable, "-c", _THREADED_RECLAIM, str(key), backend, "25"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout


def test_a_counter_reinitialised_by_another_thread_never_crashes_a_hit(installed):
    """__init__ and detach() from one thread while others resolve new names
    (names.validate runs Python in between): they are refused with
    SegmentBusy while a hit is inside the Counter, never unmap under it."""
    key, backend = installed
    code = r'''
import sys, threading
from trafficthreshold import segment
from trafficthreshold.errors import SegmentBusy, SegmentNotFound
key, backend = int(sys.argv[1]), sys.argv[2]
sys.setswitchinterval(1e-6)
c = segment.attach(key, backend)
stop = threading.Event()
def hits(t):
    i = 0
    while not stop.is_set():
        i += 1
        try:
            c.hit(f"t{t}-{i}.example", now=1_800_000_000)
        except (SegmentBusy, SegmentNotFound):
            pass
def churn():
    for i in range(20000):
        try:
            if i % 2:
                c.detach()
            else:
                c.__init__(backend, key)
        except SegmentBusy:
            pass
    stop.set()
threads = [threading.Thread(target=hits, args=(t,)) for t in range(4)]
threads.append(threading.Thread(target=churn))
for th in threads: th.start()
for th in threads: th.join()
print("ok")
'''
    import subprocess
    env = {**os.environ, "PYTHONMALLOC": "debug", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(key), backend], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_hits_two_halves_are_counted_in_its_own_clock(key, backend):
    """Two threads share a Counter: one replays an hour ago, one counts 30
    minutes later, each a new second per hit (the second bucket rolls over
    under the lock, with the GIL let go).  Each thread's hits land in its
    own minutes, the account's and the `all` halves alike."""
    segment.install(key, backend, now=NOW)
    c = segment.attach(key, backend)
    base = (int(time.time()) // 60 - 120) * 60  # minutes, within the ring
    plans = {"a.example": base, "b.example": base + 30 * 60}
    per_thread = 600
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def run(account):
        for k in range(per_thread):
            c.hit(account, now=plans[account] + k)

    try:
        threads = [threading.Thread(target=run, args=(a,)) for a in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    first, last = base // 60, base // 60 + 30 + per_thread // 60
    names = {s: a for s, a, _e in c.keys()}
    per_minute: dict[tuple[str, int], int] = {}
    for slot, m, n in itertools.chain(c.minutes(first, first + 15), c.minutes(first + 16, last)):
        per_minute[names[slot], m] = per_minute.get((names[slot], m), 0) + n
    for account, start in plans.items():
        mine = {m: n for (a, m), n in per_minute.items() if a == account}
        assert mine == {start // 60 + i: 60 for i in range(per_thread // 60)}, account
    total = {m: n for (a, m), n in per_minute.items() if a == "all"}
    assert sum(total.values()) == 2 * per_thread
    # (dropped_hits may move: the replay's seconds share the second ring
    # with the later thread's, and a late second is dropped there, as ever.)
    c.detach()


def _hold_lock(key, backend, ready, release):
    counter = segment.attach(key, backend)
    counter.lock(1000)
    ready.set()
    release.wait(10)
    counter.unlock()


@pytest.mark.parametrize("backend", segment.BACKENDS)
def test_the_lock_timeout_holds_for_a_worker_that_receives_signals(key, backend):
    """A worker interrupted by a signal every millisecond (an itimer, a
    profiler) still gives up on the lock after 50 ms and fails open, while
    the holder keeps it: the timeout is a deadline, not restarted at each
    interruption."""
    segment.install(key, backend, now=NOW)
    counter = segment.attach(key, backend)
    ready, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_lock, args=(key, backend, ready, release))
    holder.start()
    interrupted = []
    previous = signal.signal(signal.SIGALRM, lambda *_: interrupted.append(1))
    try:
        assert ready.wait(10)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        started = time.monotonic()
        with pytest.raises(SegmentBusy):
            counter.hit("new.example", now=NOW)   # a new key: the insert needs the lock
        waited = time.monotonic() - started
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert interrupted, "the itimer never fired"
        assert holder.is_alive() and waited < 10  # gave up while the holder held it
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
        holder.join(10)
        counter.detach()


@pytest.mark.parametrize("stray_now", [None, NOW + 30 * 86400])
def test_after_a_reinstall_a_half_made_segment_is_waited_for(key, caplog, stray_now):
    """A retired segment's worker watches for the next install; one found
    half made (created, not yet formatted: an install under way, or its
    installer killed) is not counted into and never raises; once it is
    installed the worker attaches (at most a (real) second later).  The
    retries run on the process's clock: a hit replayed with a `now` a month
    ahead (stray_now) must not keep the worker detached until then."""
    trafficthreshold.configure(key=key, backend="sysv", strict=False)
    try:
        segment.install(key, "sysv", now=NOW)
        trafficthreshold.hit("example.com", now=NOW)
        segment.uninstall(key, "sysv")
        half = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, size=8192, init_character=b"\0")
        for i in range(3):
            assert trafficthreshold.hit("example.com", now=NOW + 1) is None
        if stray_now is not None:
            assert trafficthreshold.hit("example.com", now=stray_now) is None
        assert _counter._default() is None
        half.detach()
        half.remove()
        segment.install(key, "sysv", now=NOW)
        time.sleep(1.1)   # the half-made retry is at most once a (real) second
        trafficthreshold.hit("example.com", now=NOW + 2)
        trafficthreshold.hit("example.com", now=NOW + 3)
        counter = segment.attach(key, "sysv")
        try:
            assert counter.count(counter.find("example.com", "pageview"), 1, NOW) == 2
        finally:
            counter.detach()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        trafficthreshold._settings.clear()
        trafficthreshold.configure()


def test_a_half_made_segment_is_not_tried_at_every_hit(key):
    """The core's attacher (one policy for Python, PHP and the library): a
    segment found half made after an uninstall is tried once, then again
    only a second later, not at every hit (a try maps it: the segment's
    last pid in /proc/sysvipc/shm)."""
    from test_core_ffi import tried_once_a_second
    trafficthreshold.configure(key=key, backend="sysv", strict=False)
    half = None
    try:
        segment.install(key, "sysv", now=NOW)
        trafficthreshold.hit("example.com")
        segment.uninstall(key, "sysv")
        half = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, size=8192, init_character=b"\0")
        half.detach()
        tried_once_a_second(key, lambda: trafficthreshold.hit("example.com"), os.getpid())
    finally:
        if half is not None:
            half.remove()
        trafficthreshold._settings.clear()
        trafficthreshold.configure()


_THREADED_CACHE_BOUND = r'''
import sys, threading
from trafficthreshold import segment
key, rounds = int(sys.argv[1]), int(sys.argv[2])
NOW = 1_800_000_000
sys.setswitchinterval(1e-6)
shared = segment.attach(key, "sysv")      # one Counter, four threads
reader = segment.attach(key, "sysv")
errors, sent = [], [0] * 4
stop = threading.Event()

def worker(t):
    try:
        for r in range(rounds):
            for i in range(40):
                # new names past the 64-key table: cache_ref clears the
                # cache while other threads are in a miss (GIL let go)
                shared.hit(f"t{t}-r{r}-{i}.example", "pageview", 1, NOW + 60 * r)
                shared.hit("hot.example", "pageview", 1, NOW + 60 * r)
                sent[t] += 1
    except BaseException as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
for th in threads:
    th.start()
m = NOW // 60
while any(th.is_alive() for th in threads):
    reader.reclaim(m + 10_000)   # keys come and go under the threads
for th in threads:
    th.join()
assert not errors, errors
hot = reader.find("hot.example", "pageview")
got = sum(n for s, _m, n in reader.minutes(m, m + rounds) if s == hot) if hot is not None else None
print("ok", sum(sent), got)
'''


def test_threads_past_the_cache_bound_while_keys_are_reclaimed(key):
    """Four threads share a Counter on a 64-key table and count new names
    all the time, so one thread's cache_ref forgets the cache (the bound)
    while others are resolving a miss (the GIL let go) and the table's keys
    are reclaimed under them.  Under PYTHONMALLOC=debug a use of a freed
    cache dict crashes the process."""
    import subprocess
    segment.install(key, "sysv", now=NOW, geometry=segment.Geometry(keys=64))
    try:
        env = {**os.environ, "PYTHONMALLOC": "debug", "PYTHONFAULTHANDLER": "1"}
        proc = subprocess.run([sys.executable, "-c", _THREADED_CACHE_BOUND, str(key), "15"],
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith("ok"), proc.stdout
    finally:
        segment.uninstall(key, "sysv")


def test_a_reinstall_to_the_other_backend_is_attached_at_once(key, monkeypatch):
    """With the backend not configured (found: sysv, else posix), a worker
    whose sysv segment is uninstalled and installed again as posix counts
    every hit after that install (docs/segment.rst, "Uninstalled while
    attached"), not only 10 s (ATTACH_RETRY_S) later."""
    monkeypatch.delenv("TRAFFICTHRESHOLD_BACKEND", raising=False)
    trafficthreshold.configure(key=key, strict=False)
    try:
        segment.install(key, "sysv", now=NOW)
        trafficthreshold.hit("example.com", now=NOW)
        segment.uninstall(key, "sysv")
        trafficthreshold.hit("example.com", now=NOW + 1)    # nothing installed
        segment.install(key, "posix", now=NOW)
        try:
            trafficthreshold.hit("example.com", now=NOW + 2)
            trafficthreshold.hit("example.com", now=NOW + 3)
            counter = segment.attach(key, "posix")
            try:
                slot = counter.find("example.com", "pageview")
                assert slot is not None and counter.count(slot, 1, NOW + 3) == 2
            finally:
                counter.detach()
        finally:
            _counter._reset()
            segment.uninstall(key, "posix")
    finally:
        trafficthreshold._settings.clear()
        trafficthreshold.configure()


def test_a_child_forked_while_watching_attaches_to_the_reinstall(key):
    """A worker forked while its parent watches for a re-install (the
    segment was retired) inherits the watch: after the install, the
    child's and the parent's hits are all counted in the new segment."""
    trafficthreshold.configure(key=key, backend="sysv", strict=False)
    try:
        segment.install(key, "sysv", now=NOW)
        trafficthreshold.hit("example.com", now=NOW)
        segment.uninstall(key, "sysv")
        trafficthreshold.hit("example.com", now=NOW + 1)    # retired: watching
        assert _counter._default() is None
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child: waits for the install, then counts 2
            code = 1
            try:
                os.close(w)
                os.read(r, 1)
                trafficthreshold.hit("example.com", now=NOW + 2)
                trafficthreshold.hit("example.com", now=NOW + 2)
                code = 0 if _counter._default() is not None else 2
            finally:
                os._exit(code)
        os.close(r)
        segment.install(key, "sysv", now=NOW)
        os.write(w, b"x")
        os.close(w)
        _pid, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        trafficthreshold.hit("example.com", now=NOW + 3)
        counter = segment.attach(key, "sysv")
        try:
            assert counter.count(counter.find("example.com", "pageview"), 1, NOW + 3) == 3
        finally:
            counter.detach()
    finally:
        _counter._reset()
        trafficthreshold._settings.clear()
        trafficthreshold.configure()


def test_a_counter_object_of_a_retired_segment_refuses_hits_then_a_new_one_counts(key):
    """A Counter (not the default) kept across an uninstall never counts
    into the retired segment: hit() raises SegmentNotFound naming the
    cause, even for a key it has cached and with a `now` of another clock;
    a Counter of the re-install counts."""
    segment.install(key, "sysv", now=NOW)
    old = segment.attach(key, "sysv")
    try:
        old.hit("example.com", now=NOW)
        segment.uninstall(key, "sysv")
        for now in (NOW, NOW + 30 * 86400, NOW - 86400):
            with pytest.raises(trafficthreshold.SegmentNotFound, match="uninstalled"):
                old.hit("example.com", now=now)
        segment.install(key, "sysv", now=NOW)
        new = segment.attach(key, "sysv")
        try:
            new.hit("example.com", now=NOW + 1)
            with pytest.raises(trafficthreshold.SegmentNotFound):
                old.hit("example.com", now=NOW + 1)
            assert new.count(new.find("example.com", "pageview"), 1, NOW + 1) == 1
        finally:
            new.detach()
    finally:
        old.detach()


def _attach_held_open(inside: threading.Event, go_on: threading.Event):
    """An attach callback whose first call (thread A) waits inside, as the
    Python code of _attach_default may be descheduled for another thread
    holding the GIL, until the test lets it go on; later calls go straight
    through."""
    calls = []

    def attach():
        calls.append(threading.get_ident())
        if len(calls) == 1:
            inside.set()
            go_on.wait(10)
        return trafficthreshold._attach_default()
    return attach, calls


@pytest.mark.parametrize("retired", [False, True])
def test_a_hit_while_another_thread_attaches_is_counted_once_attached(key, retired):
    """Two threads of one Python process (the GIL is let go inside the
    attach callback, which is Python): thread B hits while thread A is
    attaching the default counter, at the first hit (retired False) or
    after a reinstall (True).  B's hit is counted (before, the attacher
    said 'tried a moment ago' and B's hit was lost), and the process holds
    one attachment afterwards, not a second leaked one (before, with both
    attaching, the first Counter was overwritten without being released)."""
    trafficthreshold.configure(key=key, backend="sysv", strict=False)
    inside, go_on = threading.Event(), threading.Event()
    try:
        segment.install(key, "sysv")
        if retired:
            trafficthreshold.hit("example.com")
            segment.uninstall(key, "sysv", force=True)
            segment.install(key, "sysv")
        attach, calls = _attach_held_open(inside, go_on)
        _counter._setup(trafficthreshold.names.validate, attach, trafficthreshold._warn, False)
        if not retired:
            _counter._reset()
        a = threading.Thread(target=trafficthreshold.hit, args=("example.com",))
        a.start()
        assert inside.wait(10)
        trafficthreshold.hit("example.com")             # thread B, while A attaches
        go_on.set()
        a.join(10)
        trafficthreshold.hit("example.com")
        counter = segment.attach(key, "sysv")
        try:
            assert counter.count(counter.find("example.com", "pageview"), 0) == 3
            # This process's attachments: the default counter's and ours.
            assert sysv_ipc.SharedMemory(key).number_attached - 1 == 2
        finally:
            counter.detach()
    finally:
        go_on.set()
        trafficthreshold._settings.clear()
        trafficthreshold.configure()
