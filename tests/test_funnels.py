"""Order funnels (Bootic's ``funnels:{account}:{event}:{Y}[:{M}]``), end to
end: ``hit(account, "order", status="paid")`` into a real segment, the roll
into a real SQLite file and a real redis-server (read back with plain
HGETALL, as Bootic's handlers did), exactly once through repeats and a
SIGKILL mid-roll, the API route and ``stats --funnels``."""
from __future__ import annotations

import logging

import pytest

import trafficthreshold
from trafficthreshold import _counter, names, segment

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC, a minute boundary
MINUTE = int(NOW) // 60


# ------------------------------------------------------------- the hot path

def test_a_status_hit_is_one_key_and_its_all_nothing_else(worker_api):
    """Bootic's tracker counted an order with a status in the funnels only:
    the status key and its `all`, and the plain event stays untouched."""
    key, backend = worker_api
    trafficthreshold.hit("acme", "order", status="paid", now=NOW)
    trafficthreshold.hit("acme", "order", status="paid", n=2, now=NOW)
    trafficthreshold.hit("acme", "order", status="pending", now=NOW + 1)
    trafficthreshold.hit("shop", "order", status="paid", now=NOW + 2)
    counter = segment.attach(key, backend)
    try:
        keys = {(a, e) for _slot, a, e in counter.keys()}
        assert {("acme", "order/paid"), ("all", "order/paid"), ("acme", "order/pending"),
                ("all", "order/pending"), ("shop", "order/paid")} <= keys
        assert ("acme", "order") not in keys and ("all", "order") not in keys
        assert trafficthreshold.count("acme", "order", status="paid", now=NOW) == 3
        assert trafficthreshold.count("all", "order", status="paid", now=NOW) == 4
        assert trafficthreshold.count(None, "order/pending", now=NOW) == 1
        assert trafficthreshold.count("acme", "order", now=NOW) == 0
    finally:
        counter.detach()


def test_the_event_name_with_a_status_is_the_same_key(counter):
    counter.hit("acme", "order", status="paid", now=NOW)
    counter.hit("acme", "order/paid", now=NOW)
    assert counter.count(counter.find("acme", "order/paid"), 1, NOW) == 2
    assert counter.count(counter.find(None, "order/paid"), 1, NOW) == 2


def test_status_is_keyword_only_and_none_means_no_status(counter):
    with pytest.raises(TypeError, match="status is a keyword argument"):
        counter.hit("acme", "order", 1, NOW, "paid")
    counter.hit("acme", "order", status=None, now=NOW)
    assert counter.find("acme", "order") is not None


def test_a_bad_status_raises_failing_open_too(key, backend, caplog):
    """No segment installed, fail open: a bad status still raises (a site
    in development sees it before production), and a good one is silent."""
    caplog.set_level(logging.WARNING, logger="trafficthreshold")
    trafficthreshold.configure(key=key, backend=backend, strict=False)
    try:
        assert trafficthreshold.hit("acme", "order", status="paid", now=NOW) is None
        with pytest.raises(ValueError, match="status name 'a/b' contains '/'|more than one"):
            trafficthreshold.hit("acme", "order", status="a/b", now=NOW)
        with pytest.raises(ValueError, match="shorten the status"):
            trafficthreshold.hit("acme", "order", status="s" * 27, now=NOW)
    finally:
        trafficthreshold._settings.clear()
        trafficthreshold.configure()


def test_the_index_entry_holds_event_slash_status_for_other_writers(counter):
    """docs/segment.rst: a writer in another language counts a status by
    writing the key event name ``order/paid``; the raw entry is that."""
    counter.hit("acme", "order", status="refunded", now=NOW)
    slot = counter.find("acme", "order/refunded")
    entries = {s: (a, e) for s, a, e in counter.keys()}
    assert entries[slot] == ("acme", "order" + names.STATUS_SEP + "refunded")
    assert _counter.STATUS_SEP == names.STATUS_SEP
