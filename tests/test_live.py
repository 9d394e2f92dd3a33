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


def _poke(key: int, backend: str, account: str, at: int, data: bytes) -> None:
    """Write ``data`` at offset ``at`` of the index entry of (account,
    "pageview"), through the raw bytes."""
    with raw_view(key, backend) as view:
        raw = RawReader(view)
        slot = raw.find(account, "pageview")
        for off, state, entry_slot, *_ in list(raw.entries()):
            if state == 1 and entry_slot == slot:
                view[off + at:off + at + len(data)] = data


def test_a_name_that_is_not_utf8_never_raises(installed: tuple[int, str]) -> None:
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    counter.hit("acme", "pageview", 3, NOW)
    _poke(key, backend, "acme", 16, b"\xff")
    snap = live.snapshot(counter, NOW)
    assert ("acme", "pageview") not in {(k["account"], k["event"]) for k in snap.keys}
    assert len(snap.damaged) == 1 and "not UTF-8" in snap.damaged[0]
    assert snap.throttle["pages_past_minute"] == 3  # the rest still reads
    counter.detach()


# ------------------------------------ a slot reused under a reader (issue 20)

class RacingCounter:
    """A Counter whose first ``races`` reads of the index are each followed,
    at once, by a reclaim of every idle key and the reuse of the freed slot
    by a new key with 7 hits: the interleaving a reader meets when the
    supervisor reclaims between its read of the names and of the counts."""

    def __init__(self, counter: Any, other: Any, now: float, races: int) -> None:
        self._counter, self._other, self._now, self.races = counter, other, now, races
        self.round = 0

    def keys(self, *args: Any) -> Any:
        out = self._counter.keys(*args)
        if self.round < self.races:
            self._other.reclaim(int(self._now) // 60 + 1)   # every key is idle before it
            self._other.hit(f"k{self.round}.example", n=7, now=self._now)  # the slot, reused
            self.round += 1
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._counter, name)


def _racing(installed: tuple[int, str], races: int) -> tuple[RacingCounter, Any]:
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    other = segment.attach(key, backend, stripe=0)
    other.hit("first.example", n=7, now=NOW)
    return RacingCounter(counter, other, NOW, races), other


def _check_names(snap: live.Snapshot, other: Any) -> None:
    """Every count of 7 is under the name of the key that holds the slot."""
    for k in snap.keys:
        if k["account"] != "all" and k["current_minute"]:
            assert other.find(k["account"], k["event"]) == k["slot"], k


def test_a_reader_never_names_a_reused_slot_with_the_old_key(installed: tuple[int, str]) -> None:
    racing, other = _racing(installed, races=5)
    snap = live.snapshot(racing, NOW)
    _check_names(snap, other)
    assert racing.round == 5 and snap.damaged == []
    assert {(k["account"], k["current_minute"]) for k in snap.keys} >= {("k4.example", 7)}
    other.detach()


def test_a_reader_of_a_key_index_that_never_settles_reports_it(installed: tuple[int, str]) -> None:
    racing, other = _racing(installed, races=10**6)
    snap = live.snapshot(racing, NOW)
    _check_names(snap, other)
    assert any("changed" in d for d in snap.damaged), snap.damaged
    other.detach()


def test_an_index_entry_whose_slot_is_past_the_table_is_reported(installed: tuple[int, str]) -> None:
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    counter.hit("acme", "pageview", 3, NOW)
    counter.hit("shop", "pageview", 2, NOW)
    _poke(key, backend, "acme", 4, (0xFFFF0000).to_bytes(4, "little"))  # the slot
    snap = live.snapshot(counter, NOW)
    assert ("acme", "pageview") not in {(k["account"], k["event"]) for k in snap.keys}
    assert {(k["account"], k["event"]): k["current_minute"] for k in snap.keys}[
        "shop", "pageview"] == 2
    assert len(snap.damaged) == 1 and "4294901760" in snap.damaged[0], snap.damaged
    assert "acme" in snap.damaged[0]
    counter.detach()


def test_status_skips_and_reports_an_index_entry_past_the_table(installed, tmp_path) -> None:
    """`trafficthreshold status`, JSON and text: the entry is left out and
    reported as damage, every other key is shown."""
    from apps.harness import make_config
    from trafficthreshold import status
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    counter.hit("acme", "pageview", 3, NOW)
    counter.hit("shop", "pageview", 2, NOW)
    counter.detach()
    _poke(key, backend, "acme", 4, (0xFFFF0000).to_bytes(4, "little"))
    info = status.collect(make_config(str(tmp_path / "s.sqlite3"), key=key, backend=backend), NOW)
    text = status.render(info)
    assert {(k["account"], k["minute"]) for k in info["keys"]} >= {("shop", 2), ("all", 5)}
    assert "acme" not in {k["account"] for k in info["keys"]}
    assert any("4294901760" in d and "acme" in d for d in info["damage"]), info["damage"]
    assert "DAMAGED" in text and "4294901760" in text


def test_status_never_names_a_reused_slot_with_the_old_key(installed, tmp_path,
                                                            monkeypatch) -> None:
    from apps.harness import make_config
    from trafficthreshold import status
    key, backend = installed
    attach = segment.attach
    racing = []

    def attach_racing(*args: Any, **kwargs: Any) -> Any:
        other = attach(key, backend, stripe=0)
        racing.append(RacingCounter(attach(*args, **kwargs), other, NOW, races=2))
        return racing[-1]

    seed = attach(key, backend)
    seed.hit("first.example", n=7, now=NOW)
    monkeypatch.setattr(segment, "attach", attach_racing)
    info = status.collect(make_config(str(tmp_path / "s.sqlite3"), key=key, backend=backend), NOW)
    for k in info["keys"]:
        if k["account"] != "all" and k["minute"]:
            assert seed.find(k["account"], k["event"]) == k["slot"], k
    assert ("k1.example", 7) in {(k["account"], k["minute"]) for k in info["keys"]}
    seed.detach()


def test_a_reclaim_left_under_way_is_left_out_and_reported(installed: tuple[int, str]) -> None:
    """A reclaimer killed in the middle (index_seq odd, reclaim_slot set):
    readers keep reading every other key, leave that one slot out and say
    so, until the next lock holder finishes the reclaim."""
    from test_segment import in_child
    from trafficthreshold import _counter
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    counter.hit("gone", "pageview", 3, NOW - 30 * 60)
    counter.hit("shop", "pageview", 2, NOW)
    gone = counter.find("gone", "pageview")

    def die_reclaiming() -> None:
        reclaimer = segment.attach(key, backend)
        _counter._crash_at(102)  # after the tombstone and the generation
        reclaimer.reclaim(int(NOW) // 60)

    status, _ = in_child(die_reclaiming)
    assert status & 0x7F == 9  # SIGKILL
    assert segment.header(counter)["index_seq"] % 2 == 1
    snap = live.snapshot(counter, NOW)
    assert gone not in {k["slot"] for k in snap.keys}
    assert {(k["account"], k["current_minute"]) for k in snap.keys} >= {("shop", 2)}
    assert any(f"slot {gone} is being reclaimed" in d for d in snap.damaged), snap.damaged
    counter.hit("new", "pageview", 1, NOW)  # the next lock holder finishes it
    assert segment.header(counter)["index_seq"] % 2 == 0
    snap = live.snapshot(counter, NOW)
    assert snap.damaged == [] and ("new", 1) in {(k["account"], k["current_minute"])
                                                 for k in snap.keys}
    counter.detach()


def test_the_log_once_set_of_damage_stays_bounded(counter: Any) -> None:
    """A daemon up for months meets ever new damage texts (another slot,
    other bad names): each is logged once, but what is remembered for that
    must not grow for ever (the dashboard reads the segment every few
    seconds)."""
    counter.hit("acme", "pageview", 3, NOW)
    live._reported.clear()
    for value in range(1_200):  # each value a new text: "throttle_slot is N, past ..."
        counter.store(segment.H_THROTTLE_SLOT, 4, 0xFFFF0000 + value)
        assert any("throttle_slot is" in text for text in live.snapshot(counter, NOW).damaged)
    assert len(live._reported) <= 1_000
