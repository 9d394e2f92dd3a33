"""The dashboard page: its context for templates/dashboard.html and the
server-rendered SVG bar chart (no CDN, no build step).  Served by
:class:`trafficthreshold.api.StatsApp` at ``/``."""

from __future__ import annotations

import datetime
import logging
import math
import socket
from typing import Any
from zoneinfo import ZoneInfo

from trafficthreshold import alerts, names, subscribe
from trafficthreshold.config import Config
from trafficthreshold.live import LIVE_MINUTES, Snapshot
from trafficthreshold.periods import local_parts
from trafficthreshold.store import PeriodStore
from trafficthreshold.throttle import MAX_LEVEL

log = logging.getLogger("trafficthreshold.dashboard")

#: Accounts shown in the dashboard's top list.
TOP_ACCOUNTS = 10
#: Seconds between two refreshes of the dashboard.
REFRESH_S = 5
#: Closest two throttle-level labels of the chart may be, in % of its height.
LEVEL_LABEL_GAP = 8
#: The events of the "Today" card: page views, and beside them the unique
#: visitors the middleware counts with ``uniques=True`` (docs/webapps.rst).
PAGEVIEW_EVENT = names.DEFAULT_EVENT
UNIQUE_EVENT = "unique"


def dashboard_context(config: Config, store: PeriodStore, snap: Snapshot | None,
                      alert_state: alerts.AlertState | None, event: str,
                      now: float) -> dict[str, Any]:
    """Everything dashboard.html shows, as plain values (it escapes them).

    A pure renderer: the app hands over what it read (``snap`` None: no
    segment; ``alert_state`` None: no alert tables)."""
    minute = int(now // 60)
    first = minute - LIVE_MINUTES
    total_key = None
    if snap is not None:
        total_key = next((e for e in snap.keys
                          if e["account"] == names.ALL and e["event"] == event), None)
        minutes = list(total_key["minutes"]) if total_key else [0] * LIVE_MINUTES
        top = _top_from_ring(snap, event)
    else:
        minutes = _minutes_from_store(store, event, first, minute - 1)
        top = store.top_accounts(event, first, TOP_ACCOUNTS)
    uniques = _hour_uniques(store, snap, first) if event == PAGEVIEW_EVENT else None
    current = total_key["current_minute"] if total_key else 0
    throttle = snap.throttle if snap else None
    labels = [_hhmm(m, store.tz) for m in range(first, minute + 1)]
    known = {e["event"] for e in snap.keys} if snap else set(store.events())
    # The overflow key's event (~any) is internal: listed only when chosen.
    # A funnel status (order/paid) is no event: /api/stats/funnels has those.
    events = sorted({e for e in known
                     if not e.startswith("~") and names.STATUS_SEP not in e} | {event},
                    key=lambda e: (e.startswith("~"), e))
    return {
        "host": socket.gethostname(),
        "event": event,
        "events": events,
        "installed": snap is not None,
        "key": f"{config.key:#x}",
        "backend": config.backend,
        "now_text": _local(now, store.tz).strftime("%Y-%m-%d %H:%M:%S %Z"),
        "current_minute": current,
        "last_60s": total_key["last_60s"] if total_key else 0,
        "last_hour": sum(minutes) + current,
        "throttle": throttle,
        "level_class": _level_class(throttle["level"] if throttle else 0),
        "chart": bar_chart(minutes, current, labels, throttle["multiplier"] if throttle else None),
        "top": _top_rows(top, uniques),
        "alerts": _alert_rows(config, alert_state, snap, store.tz),
        "supervisor": snap.supervisor if snap else None,
        "segment": snap.segment if snap else None,
        "damaged": snap.damaged if snap else [],
        "last_roll": _ago(store.last_roll_at(), now),
        "closed_through": (_hhmm(c, store.tz) if (c := store.closed_through()) is not None
                           else None),
        "gaps": store.gap_count(),
        "refresh": REFRESH_S,
        "visits": visits(store, snap, now),
        "subscribers": subscriber_rows(config, now),
    }


def subscriber_rows(config: Config, now: float) -> list[dict[str, Any]]:
    """The subscribers panel: each ``trafficthreshold subscribe`` process
    from its stats file (:func:`subscribe.read_all`), as plain values."""
    rows = []
    for sub in subscribe.read_all(config.database, now):
        rejected = {r: int(n) for r, n in (sub.get("rejected") or {}).items() if n}
        heard = sub.get("last_heard")
        rows.append({
            "name": sub["name"], "state": sub["state"],
            "addresses": " ".join(sub.get("addresses") or []),
            "connected": sub.get("connected"), "disconnects": sub.get("disconnects", 0),
            "received": sub.get("received", 0), "counted": sub.get("counted", 0),
            "uncounted": sub.get("uncounted", 0),
            "rejected_total": sum(rejected.values()), "reasons": sorted(rejected.items()),
            "last_heard": None if heard is None else _ago(heard, now),
        })
    return rows


def visits(store: PeriodStore, snap: Snapshot | None, now: float) -> dict[str, int]:
    """Today's and this month's page views and unique visitors of all
    accounts (local day and month in the store's zone):
    ``{"pageviews_today", "pageviews_month", "uniques_today",
    "uniques_month"}``.  Each is the store's day or month row plus what
    the segment holds of the last hour that the store has not rolled yet
    (see :func:`day_and_month`)."""
    found = {}
    for label, event in (("pageviews", PAGEVIEW_EVENT), ("uniques", UNIQUE_EVENT)):
        found[f"{label}_today"], found[f"{label}_month"] = day_and_month(
            store, snap, names.ALL, event, now)
    return found


def day_and_month(store: PeriodStore, snap: Snapshot | None, account: str, event: str,
                  now: float) -> tuple[int, int]:
    """``(today, this month)`` of one key in the store's zone: the store's
    rows, plus, for each minute of the segment's last hour (the snapshot's
    closed minutes and the current one) in today, what it holds beyond the
    minute's watermark (what the supervisor's next roll adds).  A minute
    older than the snapshot's hour that was never rolled (the supervisor
    down longer than that) is not seen until it is."""
    minute = int(now // 60)
    year, month, day = local_parts(minute, store.tz)[:3]
    rows = store.period(account, event, year, month)
    today, this_month = rows["data"].get(day, 0), rows["total"]
    entry = None if snap is None else next(
        (e for e in snap.keys if e["account"] == account and e["event"] == event), None)
    if entry is None:
        return today, this_month
    first = minute - LIVE_MINUTES
    marks = store.watermark_minutes(first, snap.header.get("instance") if snap else None)
    observed = [*entry["minutes"], entry["current_minute"]]
    for offset, count in enumerate(observed):
        pending = count - marks.get((account, event, first + offset), 0)
        if pending <= 0:
            continue
        parts = local_parts(first + offset, store.tz)
        if parts[:2] == (year, month):
            this_month += pending
            if parts[2] == day:
                today += pending
    return today, this_month


def _local(now: float, tz: ZoneInfo) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now, tz)


def _hhmm(minute: int, tz: ZoneInfo) -> str:
    parts = local_parts(minute, tz)
    return f"{parts[3]:02d}:{parts[4]:02d}"


def _ago(moment: float | None, now: float) -> str | None:
    if moment is None:
        return None
    seconds = max(0, int(now - moment))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def num(value: int | float | None) -> str:
    """12345 -> "12,345"; None -> an en dash."""
    if value is None:
        return "\u2013"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def _level_class(level: int) -> str:
    return "ok" if level == 0 else "warn" if level <= 2 else "hot"


def _top_from_ring(snap: Snapshot, event: str,
                   limit: int | None = TOP_ACCOUNTS) -> list[tuple[str, int]]:
    """The busiest accounts of ``event`` over the ring's last hour (the
    ``limit`` first; None: all)."""
    totals = [
        (e["account"], sum(e["minutes"]) + e["current_minute"])
        for e in snap.keys
        if e["event"] == event and e["account"] != names.ALL and not e["account"].startswith("~")
    ]
    totals = [t for t in totals if t[1] > 0]
    totals.sort(key=lambda t: (-t[1], t[0]))
    return totals[:limit]


def _hour_uniques(store: PeriodStore, snap: Snapshot | None, first: int) -> dict[str, int] | None:
    """The unique visitors of every account over the top list's hour, from
    the same source as the page views (the ring, else the store); None if
    there are none (uniques off: the top list shows page views only)."""
    if snap is not None:
        found = dict(_top_from_ring(snap, UNIQUE_EVENT, limit=None))
    else:
        # LIMIT -1 is SQLite's "no limit": every account, so one outside the
        # uniques' top still shows its own count.
        found = dict(store.top_accounts(UNIQUE_EVENT, first, -1))
    return found or None


def _top_rows(top: list[tuple[str, int]],
              uniques: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The top list's rows; ``uniques`` (page views only): each account's
    unique visitors beside its page views."""
    biggest = max((count for _, count in top), default=0) or 1
    return [{"account": a, "count": c, "percent": round(100 * c / biggest, 1),
             "uniques": None if uniques is None else uniques.get(a, 0)} for a, c in top]


def _minutes_from_store(store: PeriodStore, event: str, first: int, last: int) -> list[int]:
    """The total's minute rows ``first..last`` from the store, when there is
    no segment to read them from: one period query per local hour."""
    hours: dict[tuple[int, ...], dict[int, int]] = {}
    counts = []
    for minute in range(first, last + 1):
        parts = local_parts(minute, store.tz)
        if parts[:4] not in hours:
            hours[parts[:4]] = store.period(names.ALL, event, *parts[:4])["data"]
        counts.append(hours[parts[:4]].get(parts[4], 0))
    return counts


def _alert_rows(config: Config, state: alerts.AlertState | None, snap: Snapshot | None,
                tz: ZoneInfo) -> list[dict[str, Any]]:
    episodes = state.episodes if state is not None else {}
    live = {(e["account"], e["event"]): e for e in snap.keys} if snap else {}
    rows = []
    for rule in config.host_alerts:  # a farm rule's state is in Redis: `alerts`
        entry = live.get((rule.account, rule.event))
        count = None
        if entry is not None:
            count = entry["current_minute"] if rule.window == "minute" else entry["last_60s"]
        episode = episodes.get(rule.name)
        rows.append({
            "name": rule.name, "account": rule.account, "event": rule.event,
            "window": rule.window, "threshold": rule.threshold, "count": count,
            "firing": episode is not None,
            "since": _hhmm(episode.start_minute, tz) if episode else None,
            "peak": episode.peak if episode else None,
        })
    return rows


def bar_chart(counts: list[int], current: int, labels: list[str],
              multiplier: int | None) -> dict[str, Any]:
    """The geometry of the dashboard's bar chart, in a 600 x 200 viewBox.

    ``counts`` are the closed minutes, oldest first, ``current`` the open
    minute (drawn last, lighter); ``labels`` the local HH:MM of every bar.
    The scale is a "nice" maximum (1, 2 or 5 times a power of ten) with four
    grid lines; ``multiplier`` adds the throttle levels' floors that fit.
    """
    values = [*counts, current]
    top = _nice_ceiling(max(values + [multiplier or 0, 4]))
    width, height = 600.0, 200.0
    step = width / len(values)
    gap = min(2.0, step * 0.2)
    bars = []
    for i, value in enumerate(values):
        bar_height = height * value / top
        bars.append({
            "x": round(i * step + gap / 2, 2), "width": round(step - gap, 2),
            "y": round(height - bar_height, 2), "height": round(bar_height, 2),
            "value": value, "label": labels[i], "current": i == len(values) - 1,
        })
    grid = [{"value": top * k // 4, "y": round(height - height * k / 4, 2),
             "percent": 100 - 25 * k} for k in range(5)]
    levels = []
    labelled: float | None = None
    for level in range(MAX_LEVEL, 0, -1):
        floor = level * (multiplier or 0)
        if not floor:
            break
        if floor > top:
            continue
        percent = round(100 - 100 * floor / top, 2)
        # Label a floor only if it is clear of the one labelled above it.
        label = labelled is None or percent - labelled >= LEVEL_LABEL_GAP
        labelled = percent if label else labelled
        levels.append({"level": level, "value": floor, "label": label, "percent": percent,
                       "y": round(height - height * floor / top, 2)})
    ticks = [{"label": labels[i], "percent": round(100 * (i + 0.5) / len(values), 2)}
             for i in range(0, len(values), 15)]
    return {"bars": bars, "grid": grid, "levels": levels, "ticks": ticks,
            "width": width, "height": height, "max": top}


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is >= value (>= 4)."""
    power = 10 ** max(0, int(math.log10(max(value, 1))))
    for factor in (1, 2, 4, 5, 10):
        if factor * power >= value:
            return factor * power
    return 10 * power


def farm_section(view: dict[str, Any] | None, error: str | None, event: str,
                 now: float) -> dict[str, Any]:
    """The dashboard's farm panel (``[store] backend = "redis"``) from
    :func:`trafficthreshold.live.farm_view`: the farm's total of ``event``
    (all accounts), the alerts' leader, and a row per host; ``error`` when
    the farm's Redis did not answer."""
    if view is None:
        return {"error": error, "hosts": [], "leader": None, "alive": 0,
                "current_minute": None, "last_60s": None}

    def total(keys: list[dict[str, Any]]) -> tuple[int, int]:
        entry = next((k for k in keys if k["account"] == names.ALL and k["event"] == event),
                     None)
        return (0, 0) if entry is None else (entry["current_minute"], entry["last_60s"])

    rows = []
    for h in view["hosts"]:
        minute, sliding = total(h["keys"])
        rows.append({"host": h["host"], "alive": h["alive"], "here": h["host"] == view["host"],
                     "level": h["level"], "level_class": _level_class(h["level"] or 0),
                     "current_minute": minute if h["alive"] else None,
                     "last_60s": sliding if h["alive"] else None,
                     "seen": _ago(h["published_at"], now),
                     "last_roll": _ago(h["last_roll_at"], now)})
    minute, sliding = total(view["keys"])
    return {"error": None, "hosts": rows, "leader": view["leader"], "alive": view["hosts_alive"],
            "current_minute": minute, "last_60s": sliding}
