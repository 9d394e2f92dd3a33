"""The segment now: one lock-free read of every key and of the header, for
``/api/stats/live``, ``/metrics`` and the dashboard.

A shared module under :mod:`trafficthreshold.api.app` (which serves it),
:mod:`trafficthreshold.api.dashboard` and :mod:`trafficthreshold.api.openapi`
(which render it), so that those two never import the app.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trafficthreshold import names, segment
from trafficthreshold.throttle import MAX_LEVEL, block_text, level_range

log = logging.getLogger("trafficthreshold.live")

#: Closed minutes shown by /api/stats/live and the dashboard.
LIVE_MINUTES = 60
#: A supervisor heartbeat older than this counts as stale: the limit after
#: which the C hot path ignores the supervisor's level.
HEARTBEAT_STALE_S = segment.HEARTBEAT_STALE_MS / 1000


@dataclass
class Snapshot:
    """What the segment says at ``now``: one read of every key."""

    minute: int
    keys: list[dict[str, Any]]
    header: dict[str, int]
    throttle: dict[str, Any]
    supervisor: dict[str, Any]
    segment: dict[str, int]
    #: What was found damaged in shared memory and how it was read instead
    #: (empty when all is well).  Reported, never raised.
    damaged: list[str] = field(default_factory=list)


def snapshot(counter: Any, now: float) -> Snapshot:
    """Read every key's current minute, sliding 60 s and last closed
    minutes, and the header.  Lock-free reads; no lock is held.

    What is read from shared memory is checked, never trusted: an unknown
    throttle window is read as 60 s, a throttle slot past the key table as
    no throttle key, a supervisor level over 5 as 5, an index name that is not UTF-8 is left out; each is
    listed in ``Snapshot.damaged`` instead of raising.
    """
    damaged: list[str] = []
    header = segment.header(counter)
    minute = int(now // 60)
    # The ring holds the current minute and minute_buckets - 1 closed ones.
    span = max(1, min(LIVE_MINUTES, header["minute_buckets"] - 1))
    first = minute - LIVE_MINUTES
    def read() -> tuple[list[dict[str, Any]], list[str]]:
        read_damage: list[str] = []
        ring: dict[int, list[int]] = defaultdict(lambda: [0] * LIVE_MINUTES)
        for slot, epoch_minute, count in counter.minutes(minute - span, minute - 1):
            ring[slot][epoch_minute - first] = count
        return [
            {
                "slot": slot, "account": account, "event": event,
                "current_minute": counter.count(slot, 1, now),
                "last_60s": counter.count(slot, 0, now),
                "minutes": ring[slot] if slot in ring else [0] * LIVE_MINUTES,
            }
            for slot, account, event in _readable_keys(counter, read_damage)
        ], read_damage

    # Read again while a key was reclaimed meanwhile: its slot may hold a
    # new key's counts (docs/segment.rst, "Reclaim").
    got, skip = segment.read_consistently(counter, read)
    if got is None:
        keys = []
        damaged.append("the key index changed during every read (keys reclaimed meanwhile); "
                       "the keys are left out of this reading")
    else:
        keys, read_damage = got
        damaged += read_damage
        keys = [k for k in keys if k["slot"] not in skip]
        if skip:
            damaged.append(f"slot {min(skip)} is being reclaimed (a reclaim under way, "
                           "finished by the next lock holder); left out")
    keys.sort(key=_key_order)
    throttle = _throttle(counter, header, now, damaged)
    _log_damage(damaged)
    return Snapshot(minute, keys, header, throttle, _supervisor(header, now),
                    _segment_info(header), damaged)


_reported: set[str] = set()
#: Texts remembered as logged; past this many the set starts afresh (a text
#: may then be logged once more), so months of new damage texts (another
#: slot, other bad names) cannot grow it for ever.
MAX_REPORTED = 256


def _log_damage(damaged: list[str]) -> None:
    """Log each kind of damage once per process (the dashboard reads the
    segment every few seconds; the responses report it every time)."""
    for text in damaged:
        if text not in _reported:
            if len(_reported) >= MAX_REPORTED:
                _reported.clear()
            _reported.add(text)
            log.warning("the segment is damaged: %s", text)


def _readable_keys(counter: Any, damaged: list[str]) -> list[tuple[int, str, str]]:
    """``counter.keys()`` without the entries whose name bytes are not UTF-8
    (a writer in another language) or whose slot is past the key table (a
    scribbled entry): those are left out and reported in ``damaged``, and
    every other key is listed."""
    past: list[tuple[int, tuple[int, str, str]]] = []
    readable, bad = segment.split_keys(counter, past)
    if bad:
        shown = ", ".join(repr(a.encode("utf-8", "surrogateescape")) for _, a, _ in bad[:3])
        damaged.append(f"{len(bad)} key index {'entry has a name' if len(bad) == 1 else 'entries have names'} "
                       f"that {'is' if len(bad) == 1 else 'are'} not UTF-8 ({shown}); left out")
    damaged.extend(segment.describe_past_table(past))
    return readable


def _key_order(entry: Mapping[str, Any]) -> tuple[int, str, int, str]:
    """Events by name, the total first, internal keys last, then by name."""
    account = entry["account"]
    rank = 0 if account == names.ALL else 2 if account.startswith("~") else 1
    return (entry["event"].startswith("~"), entry["event"], rank, account)


def _throttle(counter: Any, header: Mapping[str, int], now: float,
              damaged: list[str]) -> dict[str, Any]:
    """Drupal's throttle block: level, its range, pages in the past minute.
    Appends to ``damaged`` what it could not trust in the header."""
    multiplier = max(1, header["throttle_multiplier"])
    window = header["throttle_window"]
    if window not in segment.WINDOWS.values():
        damaged.append(f"throttle_window is {window} (0 = 60s, 1 = minute); read as 60s")
        window = segment.WINDOWS["60s"]
    if header["throttle_level"] > MAX_LEVEL:
        damaged.append(f"throttle_level is {header['throttle_level']} (0..{MAX_LEVEL}); "
                       f"the level shown is capped at {MAX_LEVEL}")
    slot = header["throttle_slot"]
    if slot >= header["key_capacity"]:
        damaged.append(f"throttle_slot is {slot}, past the {header['key_capacity']} key slots; "
                       "pages_past_minute reads 0")
    level = min(MAX_LEVEL, counter.level(now))
    low, high = level_range(level, multiplier)
    text = block_text(level, multiplier)  # Drupal's own words: "Current Level: 5 (300+)"
    return {
        "level": level,
        "supervisor_level": header["throttle_level"],
        "min": low,
        "max": high,
        "text": text,
        "multiplier": multiplier,
        "window": "60s" if window == 0 else "minute",
        "pages_past_minute": (counter.count(slot, window, now)
                              if slot < header["key_capacity"] else 0),
    }


def _supervisor(header: Mapping[str, int], now: float) -> dict[str, Any]:
    beat = header["heartbeat_ms"]
    age = None if beat == 0 else round(max(0.0, now - beat / 1000), 3)
    return {
        "pid": header["supervisor_pid"] or None,
        "heartbeat_age_seconds": age,
        "alive": age is not None and age <= HEARTBEAT_STALE_S,
    }


def _segment_info(header: Mapping[str, int]) -> dict[str, int]:
    return {name: header[name] for name in (
        "key_capacity", "keys_used", "free_slots", "reclaimed", "minute_buckets",
        "overflow_hits", "dropped_hits")}


# ------------------------------------------------------------------ the farm


def farm_view(reading: Any, now: float, host: str, account: str | None = None,
              event: str | None = None) -> dict[str, Any]:
    """``/api/stats/live?scope=farm`` (and the dashboard's and ``status``'s
    farm section) from a :class:`trafficthreshold.farm.FarmLive`: the total
    of the hosts that are alive, one row per host seen in the last hour, and
    the alerts' leader.  ``host`` is the host answering; ``account`` and
    ``event`` keep only those keys."""

    def keys(counts: Mapping[tuple[str, str], tuple[int, int]]) -> list[dict[str, Any]]:
        rows = [{"account": a, "event": e, "current_minute": m, "last_60s": s}
                for (a, e), (m, s) in counts.items()
                if (account is None or a == account) and (event is None or e == event)]
        return sorted(rows, key=_key_order)

    hosts = [{
        "host": row.host,
        "alive": row.alive,
        "level": row.level if row.alive else None,
        "published_at": row.at,
        "age_seconds": None if row.at is None else round(max(0.0, now - row.at), 3),
        "last_roll_at": row.last_roll,
        "keys": keys(row.counts),
    } for row in sorted(reading.hosts, key=lambda r: r.host)]
    return {
        "type": "live",
        "scope": "farm",
        "now": now,
        "host": host,
        "leader": reading.leader,
        "hosts_alive": sum(1 for row in reading.hosts if row.alive),
        "keys": keys(reading.total),
        "hosts": hosts,
    }
