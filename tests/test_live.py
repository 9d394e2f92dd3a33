"""Tests of trafficthreshold.live: one checked read of a real segment.

The nasty cases on purpose: header fields poked to values no writer
writes, and a key name in the index that is not UTF-8 (raw bytes written
with the segment tests' raw_view, independent of the C module).
"""

from __future__ import annotations

from typing import Any

from test_segment import RawReader, raw_view
from trafficthreshold import live, segment

NOW = 1_800_000_030.0


def test_a_healthy_segment_reports_nothing_damaged(counter: Any) -> None:
    counter.hit("acme", "pageview", 3, NOW)
    snap = live.snapshot(counter, NOW)
    assert snap.damaged == []
    assert {(k["account"], k["event"]): k["current_minute"] for k in snap.keys}[
        "acme", "pageview"] == 3
    assert snap.throttle["window"] == "60s" and snap.throttle["pages_past_minute"] == 3


def test_unknown_window_level_over_5_and_a_throttle_slot_past_the_table(counter: Any) -> None:
    counter.hit("acme", "pageview", 3, NOW)
    counter.store(segment.H_THROTTLE_WINDOW, 4, 7)
    counter.store(segment.H_THROTTLE_SLOT, 4, 0xFFFFFFFF)
    counter.store(segment.H_THROTTLE_LEVEL, 4, 0xFFFFFFFF)
    counter.store(segment.H_HEARTBEAT_MS, 8, int(NOW * 1000))  # fresh: the level is used
    snap = live.snapshot(counter, NOW)
    assert snap.throttle["window"] == "60s" and snap.throttle["pages_past_minute"] == 0
    assert snap.throttle["level"] == 5
    assert len(snap.damaged) == 3
    assert "throttle_window is 7" in snap.damaged[0]
    assert "throttle_level is 4294967295" in snap.damaged[1]
    assert "throttle_slot is 4294967295" in snap.damaged[2]


def test_a_name_that_is_not_utf8_never_raises(installed: tuple[int, str]) -> None:
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    counter.hit("acme", "pageview", 3, NOW)
    with raw_view(key, backend) as view:
        raw = RawReader(view)
        slot = raw.find("acme", "pageview")
        for off, state, entry_slot, *_ in list(raw.entries()):
            if state == 1 and entry_slot == slot:
                view[off + 16] = 0xFF
    snap = live.snapshot(counter, NOW)
    assert ("acme", "pageview") not in {(k["account"], k["event"]) for k in snap.keys}
    assert len(snap.damaged) == 1 and "not UTF-8" in snap.damaged[0]
    assert snap.throttle["pages_past_minute"] == 3  # the rest still reads
    counter.detach()
