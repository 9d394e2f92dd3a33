"""Prometheus metrics: the text exposition format 0.0.4, written by hand.

No client library: the numbers come from the period store, the segment
header and the alert state at scrape time, so there is nothing to register
and no process-local state.  :func:`collect` turns those sources into
:class:`Family` objects, :func:`render` writes them out.

The metrics (``/metrics``; docs/api.rst explains each)::

  trafficthreshold_hits_total{account,event}             counter
  trafficthreshold_hits_current_minute{account,event}    gauge
  trafficthreshold_hits_last_60s{account,event}          gauge
  trafficthreshold_throttle_level                        gauge
  trafficthreshold_alerts_firing{rule}                   gauge (0/1)
  trafficthreshold_supervisor_heartbeat_age_seconds      gauge
  trafficthreshold_overflow_hits_total                   counter
  trafficthreshold_dropped_hits_total                    counter
  trafficthreshold_segment_lock_timeouts_total           counter
  trafficthreshold_segment_keys_capacity / _keys_used    gauge
  trafficthreshold_segment_slots_free                    gauge
  trafficthreshold_segment_slots_reclaimed_total         counter
  trafficthreshold_segment_up                            gauge (0/1)
  trafficthreshold_segment_damaged                       gauge
  trafficthreshold_store_last_roll_timestamp_seconds     gauge
  trafficthreshold_store_gaps                            gauge
  trafficthreshold_store_late_dropped_hits_total         counter
  trafficthreshold_store_bad_keys                        gauge
  trafficthreshold_subscriber_up{subscriber}             gauge (0/1)
  trafficthreshold_subscriber_events_received_total{subscriber}  counter
  trafficthreshold_subscriber_events_counted_total{subscriber}   counter
  trafficthreshold_subscriber_events_uncounted_total{subscriber} counter
  trafficthreshold_subscriber_events_rejected_total{subscriber,reason}  counter
  trafficthreshold_subscriber_last_heard_timestamp_seconds{subscriber}  gauge
  trafficthreshold_subscriber_connections{subscriber}    gauge
  trafficthreshold_subscriber_disconnects_total{subscriber}  counter
  trafficthreshold_subscribers_unreadable                gauge

With ``[store] backend = "redis"`` every series but ``hits_total`` also has
a ``host`` label (``[store] host``): see :func:`label_host`.

``hits_total`` is *all hits ever counted*: the sum of the store's month rows
(every hit the supervisor rolled) plus what the segment ring holds that the
next roll would add (``observed - watermark`` of each ring minute, see
:func:`pending_from`).  A scrape reads the stored totals and the watermarks
in one snapshot of the store (its ``metrics_reading``: a read transaction
of the SQLite file, one MULTI of the farm's Redis) and the ring after it
began, so a roll during the scrape never makes it go down.  It only goes
down when the ring loses minutes that were never rolled (the supervisor was
down for longer than the ring) or when ``retention.months`` prunes month
rows; Prometheus takes either as a counter reset.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trafficthreshold import segment
from trafficthreshold.store import WATERMARK_KEEP_MINUTES

#: The Content-Type of the text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Key = tuple[str, str]
Labels = Mapping[str, str]


@dataclasses.dataclass
class Family:
    """One metric: its name, TYPE, HELP and samples ``(labels, value)``."""

    name: str
    type: str
    help: str
    samples: list[tuple[Labels, float]] = dataclasses.field(default_factory=list)
    #: What kept samples out, one ``# ERROR`` comment line each (a line
    #: starting with "#" that is not HELP or TYPE: parsers skip it).
    errors: list[str] = dataclasses.field(default_factory=list)

    def add(self, value: float, **labels: str) -> Family:
        self.samples.append((labels, value))
        return self


# --------------------------------------------------------------------------
# the text format


def escape_label(value: str) -> str:
    """A label value for the text format: backslash, double quote and line
    feed are escaped (``\\\\``, ``\\"``, ``\\n``); everything else is UTF-8."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """A HELP text: backslash and line feed escaped (quotes are allowed)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """An integer without a fraction, a float with repr, NaN and infinities
    the way the format spells them."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The exposition text of ``families``: HELP, TYPE, a ``# ERROR`` comment
    per problem that kept samples out, then the samples."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        lines.extend(f"# ERROR {family.name} {escape_help(error)}" for error in family.errors)
        for labels, value in family.samples:
            if labels:
                pairs = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
                lines.append(f"{family.name}{{{pairs}}} {format_value(value)}")
            else:
                lines.append(f"{family.name} {format_value(value)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# the numbers


@dataclasses.dataclass
class StoreReading:
    """What a scrape reads from the store, all from one read transaction."""

    totals: dict[Key, int]
    last_roll_at: float | None
    gaps: int
    late_dropped: int = 0
    bad_keys: int = 0
    #: (account, event, minute) -> count rolled, of the segment's install,
    #: for the ring minutes a scrape adds (None: not read, no segment)
    watermarks: dict[tuple[str, str, int], int] | None = None

    @classmethod
    def of(cls, got: Mapping[str, Any]) -> StoreReading:
        """From a store's ``metrics_reading`` (:class:`~.store.PeriodStore`)."""
        return cls(got["totals"], got["last_roll_at"], got["gaps"], got["late_dropped"],
                   got["bad_keys"], got["watermarks"])


def pending_window(now: float, ring_minutes: int) -> tuple[int, int]:
    """The ring minutes whose pending hits a scrape adds: (first, current)."""
    minute = int(now // 60)
    # Watermarks are kept for WATERMARK_KEEP_MINUTES: older ring minutes
    # (only with a huge ring) cannot be compared and are left out.
    span = max(1, min(ring_minutes, WATERMARK_KEEP_MINUTES))
    return minute - span + 1, minute


def pending_from(marks: Mapping[tuple[str, str, int], int], counter: Any,
                 slots: Mapping[int, Key], first: int, minute: int,
                 version: tuple[int, int] | None = None) -> dict[Key, int]:
    """``observed - watermark`` per key over the ring minutes first..minute
    (the watermarks read before the ring).

    The watermarks must come from the same snapshot as the stored totals
    (one ``metrics_reading`` of the store), and the ring is read after that
    snapshot began: a roll in between then moves hits from "pending" to
    "stored" in neither reading, so the sum never drops.  Lock-free read
    (``Counter.minutes``); no lock is held.

    A slot's name is taken from ``slots`` unless the index changed since it
    was read (:func:`segment.keys_version`, passed as ``version``) or a slot
    has no name there: then from the index read after the ring, since a slot
    reclaimed and given to a new key in between holds the new key's counts
    (docs/segment.rst, "Reclaim")."""
    pending: dict[Key, int] = defaultdict(int)
    rows = counter.minutes(first, minute)
    if version is None or segment.keys_version(counter) != version \
            or any(s not in slots for s, _m, _n in rows):
        slots = {s: (a, e) for s, a, e in segment.split_keys(counter)[0]}
    for slot, epoch_minute, observed in rows:
        key = slots.get(slot)
        if key is None:
            continue
        delta = observed - marks.get((key[0], key[1], epoch_minute), 0)
        if delta > 0:
            pending[key] += delta
    return dict(pending)


def collect(
    *,
    totals: Mapping[Key, int],
    live: Sequence[Mapping[str, Any]] | None,
    header: Mapping[str, int] | None,
    throttle_level: int | None,
    heartbeat_age: float | None,
    firing: Mapping[str, bool] | None,
    last_roll_at: float | None,
    gaps: int,
    damaged: int | None = None,
    late_dropped: int = 0,
    bad_keys: int = 0,
    host: str | None = None,
    subscribers: Sequence[Mapping[str, Any]] = (),
    subscriber_problems: Sequence[str] | None = None,
) -> list[Family]:
    """The metric families from plain numbers (see the module docstring).

    ``totals``: all-time hits per key (stored + pending); ``live``: one dict
    per segment key with ``account``, ``event``, ``current_minute`` and
    ``last_60s`` (None: no segment); ``header``: :func:`segment.header`;
    ``firing``: rule name -> open episode (None: no alert tables);
    ``damaged``: how many damaged fields or index entries the segment read
    found (None: no segment); ``host``: with the farm's Redis store, this
    host's ``[store] host``, added as a ``host`` label to every series but
    ``hits_total`` (see :func:`label_host`); ``subscribers``: the stats
    files of ``trafficthreshold subscribe`` (:func:`subscribe.read_all`);
    ``subscriber_problems``: what of them could not be read (default: the
    ``problems`` that :func:`subscribe.read_all`'s list carries), exported
    as ``trafficthreshold_subscribers_unreadable`` (the number, 0 when all
    was read) and as a comment line each (``# ERROR ...``, which parsers
    skip), so that a scrape never shows "no subscribers" when it could not
    look.
    """
    fams: list[Family] = []
    hits = Family("trafficthreshold_hits_total", "counter",
                  "Hits counted per account and event since the store was created "
                  "(rolled into the store, plus what the segment holds that is not rolled yet).")
    for (account, event), total in sorted(totals.items()):
        hits.add(total, account=account, event=event)
    fams.append(hits)
    segment_up = Family("trafficthreshold_segment_up", "gauge",
                        "1 if the shared-memory segment is installed and live, else 0.")
    fams.append(segment_up.add(0 if header is None else 1))
    if live is not None:
        current = Family("trafficthreshold_hits_current_minute", "gauge",
                         "Hits in the current clock minute, per account and event.")
        sliding = Family("trafficthreshold_hits_last_60s", "gauge",
                         "Hits in the sliding last 60 seconds, per account and event.")
        for entry in live:
            labels = {"account": entry["account"], "event": entry["event"]}
            current.add(entry["current_minute"], **labels)
            sliding.add(entry["last_60s"], **labels)
        fams += [current, sliding]
    if header is not None:
        fams += _segment_families(header, throttle_level, heartbeat_age)
    if damaged is not None:
        fams.append(Family("trafficthreshold_segment_damaged", "gauge",
                           "Damaged header fields or key index entries found in the segment "
                           "(read around; /api/stats/live lists them). 0 when all is well.")
                    .add(damaged))
    if firing is not None:
        alerts = Family("trafficthreshold_alerts_firing", "gauge",
                        "1 while an alert rule has an open episode, else 0.")
        for name, is_firing in sorted(firing.items()):
            alerts.add(1 if is_firing else 0, rule=name)
        fams.append(alerts)
    if last_roll_at is not None:
        fams.append(Family("trafficthreshold_store_last_roll_timestamp_seconds", "gauge",
                           "Unix time of the supervisor's last roll into the store.")
                    .add(last_roll_at))
    fams.append(Family("trafficthreshold_store_gaps", "gauge",
                       "Recorded gaps: stretches of minutes that were not counted.").add(gaps))
    fams.append(Family("trafficthreshold_store_late_dropped_hits_total", "counter",
                       "Hits that reached a ring minute after its last re-read, not added "
                       "to the store.").add(late_dropped))
    fams.append(Family("trafficthreshold_store_bad_keys", "gauge",
                       "Keys the last roll-up skipped (a name that is not UTF-8, an "
                       "impossible count); `trafficthreshold status` names them.")
                .add(bad_keys))
    if subscribers:
        fams += subscriber_families(subscribers)
    if subscriber_problems is None:
        subscriber_problems = getattr(subscribers, "problems", ())
    fams.append(Family("trafficthreshold_subscribers_unreadable", "gauge",
                       "Subscribers' stats that could not be read (the state directory's "
                       "subscribers/ or a file in it: no permission, not a stats file); "
                       "the comment lines and the log name each. 0 when all were read.",
                       errors=list(subscriber_problems)).add(len(subscriber_problems)))
    return fams if host is None else label_host(fams, host)


def subscriber_families(subs: Sequence[Mapping[str, Any]]) -> list[Family]:
    """What each ``trafficthreshold subscribe`` process did, from its stats
    file (its counters start again at 0 when it restarts: a counter reset)."""
    def family(name: str, kind: str, text: str) -> Family:
        return Family(f"trafficthreshold_subscriber_{name}", kind, text)

    up = family("up", "gauge", "1 while the subscriber runs (its stats file is fresh), else 0.")
    received = family("events_received_total", "counter",
                      "Events (frames or lines) the subscriber received.")
    counted = family("events_counted_total", "counter", "Events counted into the segment.")
    uncounted = family("events_uncounted_total", "counter",
                       "Valid events not counted: no segment was installed (fail open).")
    rejected = family("events_rejected_total", "counter",
                      "Events rejected, by reason (docs/subscribe.rst).")
    heard = family("last_heard_timestamp_seconds", "gauge",
                   "Unix time the subscriber last received from the bus.")
    connections = family("connections", "gauge", "Publishers the ZMQ socket is connected to.")
    disconnects = family("disconnects_total", "counter",
                         "Connections to a publisher dropped (and made again).")
    for sub in subs:
        name = str(sub["name"])
        up.add(1 if sub.get("state") == "running" else 0, subscriber=name)
        received.add(int(sub.get("received", 0)), subscriber=name)
        counted.add(int(sub.get("counted", 0)), subscriber=name)
        uncounted.add(int(sub.get("uncounted", 0)), subscriber=name)
        for reason, n in sorted((sub.get("rejected") or {}).items()):
            rejected.add(int(n), subscriber=name, reason=str(reason))
        if sub.get("last_heard") is not None:
            heard.add(float(sub["last_heard"]), subscriber=name)
        if sub.get("connected") is not None:
            connections.add(int(sub["connected"]), subscriber=name)
            disconnects.add(int(sub.get("disconnects", 0)), subscriber=name)
    return [f for f in (up, received, counted, uncounted, rejected, heard, connections,
                        disconnects) if f.samples]


def label_host(fams: list[Family], host: str) -> list[Family]:
    """A farm (``[store] backend = "redis"``): every series of this host
    gets ``host="<name>"``, so that the hosts' series never collide and
    ``sum without (host)`` of the live gauges is the farm's.  Not
    ``hits_total``: it is the farm's rolled total already (plus this host's
    pending hits), the same series on every host."""
    for fam in fams:
        if fam.name != "trafficthreshold_hits_total":
            fam.samples = [({**labels, "host": host}, v) for labels, v in fam.samples]
    return fams


def _segment_families(
    header: Mapping[str, int], level: int | None, heartbeat_age: float | None
) -> list[Family]:
    """The families read from the segment header."""
    fams = [
        Family("trafficthreshold_throttle_level", "gauge",
               "The throttle level 0..5 the workers see.").add(level or 0),
        Family("trafficthreshold_overflow_hits_total", "counter",
               "Hits counted under ~overflow because the key table was full.")
        .add(header["overflow_hits"]),
        Family("trafficthreshold_dropped_hits_total", "counter",
               "Hits dropped (the segment lock not taken within 50 ms, or a hit "
               "a whole ring late).")
        .add(header["dropped_hits"]),
        Family("trafficthreshold_segment_lock_timeouts_total", "counter",
               "Workers' waits for the segment lock that passed 50 ms (each dropped "
               "an addition or a new key).").add(header.get("lock_timeouts", 0)),
        Family("trafficthreshold_segment_keys_capacity", "gauge",
               "Counter slots of the segment (reserved slots included).")
        .add(header["key_capacity"]),
        Family("trafficthreshold_segment_keys_used", "gauge",
               "Counter slots in use (keys_used minus the reclaimed slots waiting "
               "for a key).").add(header["keys_used"] - header.get("free_slots", 0)),
        Family("trafficthreshold_segment_slots_free", "gauge",
               "Reclaimed slots waiting for a new key.").add(header.get("free_slots", 0)),
        Family("trafficthreshold_segment_slots_reclaimed_total", "counter",
               "Slots of keys idle for longer than the ring given back by the "
               "supervisor, since the install.").add(header.get("reclaimed", 0)),
    ]
    # +Inf before the first tick: an alert on "age > 30" fires at once.
    age = math.inf if heartbeat_age is None else heartbeat_age
    fams.append(Family("trafficthreshold_supervisor_heartbeat_age_seconds", "gauge",
                       "Seconds since the supervisor's last tick (+Inf: never ticked).").add(age))
    return fams
