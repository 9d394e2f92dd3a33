"""The Redis period store: Bootic's key layout, exactly once per host.

A farm of web hosts shares one Redis.  Each host's supervisor rolls its own
closed minutes into it; the account ``all`` is the farm's total because
every host adds its own share.  The layout is Bootic's (its tracker's
``HIncrBy`` calls, numbers unpadded as ``strconv.Itoa`` wrote them), so
Bootic's own API server reads what we write::

    {prefix}:{account}:{event}:{Y}              field {M}   months of a year
    {prefix}:{account}:{event}:{Y}:{M}          field {D}   days of a month
    {prefix}:{account}:{event}:{Y}:{M}:{D}      field {H}   hours of a day
    {prefix}:{account}:{event}:{Y}:{M}:{D}:{H}  field {m}   minutes of an hour (ours)

and Bootic's order funnels (its ``TrackFunnel``), the counts per status of
an event, from the keys whose event names a status (``order/paid``)::

    {funnels_prefix}:{account}:{event}:{Y}      field {status}   a year
    {funnels_prefix}:{account}:{event}:{Y}:{M}  field {status}   a month

Exactly once
------------
As in the SQLite store, the ring gives cumulative counts per key-minute and
the store keeps a *watermark* per key-minute: what it already added.  Here
the watermark belongs to one host and one segment instance (a re-installed
segment counts afresh), and lives in Redis beside the data::

    {prefix}~wm:{host}:{epoch minute}   hash, field "{instance}\\0{account}\\0{event}"

A roll is one Lua script per batch of key-minutes: for each it reads the
watermark, adds ``observed - watermark`` to the four period hashes and moves
the watermark, all atomically on the server.  Repeating a roll adds nothing;
a roll cut short (the supervisor killed, the connection lost, Redis killed)
either happened whole or not at all; two hosts never share a watermark.
After a failover that lost the last writes, the watermarks are lost with
the data, so the next roll, which always reads the watermarks from Redis,
re-sends them from the ring.

Per-host state (``closed_through``, ``last_roll_at``) is the hash
``{prefix}~host:{host}``, written by the same script.  The farm's time zone
is ``{prefix}~farm`` field ``timezone``: the first supervisor records it, one
with another zone is refused.  ``{prefix}~...`` keys never match Bootic's
``{prefix}:*`` patterns.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any
from zoneinfo import ZoneInfo

from trafficthreshold.errors import ConfigError
from trafficthreshold.names import ALL, split_status
from trafficthreshold.periods import local_parts, segments
from .base import KeyMinute, RollItem

log = logging.getLogger("trafficthreshold.store.redis")

#: Key-minutes per script call: one call blocks Redis for its duration, so
#: a large roll goes in slices (each atomic and idempotent on its own).
BATCH = 500

#: How long a host's watermarks are kept at least, in seconds: beyond the
#: ring's length (:meth:`RedisStore.cover_ring`: a ring of 100,000 minutes
#: keeps them that long and this much more), so a minute still in a ring
#: always finds its own.
WATERMARK_TTL = 2 * 24 * 3600

# Merge one watermark hash into another, each field keeping the larger
# count (a watermark only ever moves up).  KEYS: the target.  ARGV: TTL,
# then field, count pairs.
MERGE_WATERMARKS_SCRIPT = """
for i = 2, #ARGV, 2 do
  local seen = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > seen then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 0
"""

#: A host that has not rolled for this long (seconds; ``[store]
#: forget_hosts_days``) is forgotten: its host hash and gaps expire, and
#: each live publication (:class:`trafficthreshold.farm.LivePublisher`)
#: drops it from ``{prefix}~hosts``.
FORGET_HOSTS_AFTER = 30 * 86_400

#: The gaps kept per host (the newest): a host that loses minutes every
#: minute for a year does not grow its list for ever.
GAPS_KEPT = 1_000

#: The largest cumulative count a roll passes on: the script's arithmetic is
#: Lua's (doubles), exact up to 2**53.
MAX_COUNT = 2**53 - 1

# KEYS: per item, 1 watermark hash + 4 hashes to add to, then the totals
# hash, the key set, the funnels' key set, the host hash, the segment's
# key ({prefix}~segment:{instance}: "{host}\n{closed_through}", which host
# rolls it and through which minute it is closed) and the host's last
# segment ({prefix}~last:{host}: "{instance}\n{closed_through}\n
# {instance_ended}", living as long as the segment's key: a host back
# after it was forgotten, on a new segment, finds where it stopped).  ARGV: watermark
# TTL, minute-hash TTL (0 = keep), now, closed_through ('' = unchanged),
# instance, ended ('' = not ended), host, the host hash's TTL (it is
# forgotten that long after its last roll; the segment's key lives twice
# that: a host back after it was forgotten finds its closed minute there),
# then per item: watermark
# field, observed, the 4 hashes' fields, "{account}\0{event}", kind.  Kind
# "t": the 4 period hashes (year .. hour, the last one expiring); "f": a
# funnel status, the year and month hashes only (fields: the status), the
# other two keys unused; its "{account}\0{event}" (the plain event) goes to
# the funnels' key set, the totals get "{account}\0{event}/{status}".
# Returns the delta added per item.
ROLL_SCRIPT = """
local wm_ttl = tonumber(ARGV[1])
local minute_ttl = tonumber(ARGV[2])
local n = (#KEYS - 6) / 5
local totals = KEYS[#KEYS - 5]
local keys_set = KEYS[#KEYS - 4]
local funnel_set = KEYS[#KEYS - 3]
local added = {}
for i = 0, n - 1 do
  local k = i * 5
  local a = 8 + i * 8
  local wm_key, field = KEYS[k + 1], ARGV[a + 1]
  local observed = tonumber(ARGV[a + 2])
  local seen = tonumber(redis.call('HGET', wm_key, field) or '0')
  local delta = 0
  if observed > seen then
    delta = observed - seen
    redis.call('HINCRBY', KEYS[k + 2], ARGV[a + 3], delta)
    redis.call('HINCRBY', KEYS[k + 3], ARGV[a + 4], delta)
    if ARGV[a + 8] == 't' then
      redis.call('HINCRBY', KEYS[k + 4], ARGV[a + 5], delta)
      redis.call('HINCRBY', KEYS[k + 5], ARGV[a + 6], delta)
      if minute_ttl > 0 then redis.call('EXPIRE', KEYS[k + 5], minute_ttl) end
      redis.call('SADD', keys_set, ARGV[a + 7])
      redis.call('HINCRBY', totals, ARGV[a + 7], delta)
    else
      redis.call('SADD', funnel_set, ARGV[a + 7])
      redis.call('HINCRBY', totals, ARGV[a + 7] .. '/' .. ARGV[a + 3], delta)
    end
    redis.call('HSET', wm_key, field, ARGV[a + 2])
    redis.call('EXPIRE', wm_key, wm_ttl)
  end
  added[i + 1] = delta
end
local host_key = KEYS[#KEYS - 2]
redis.call('HSET', host_key, 'last_roll_at', ARGV[3], 'instance', ARGV[5])
redis.call('EXPIRE', host_key, ARGV[8])
if ARGV[4] ~= '' then
  local closed = tonumber(redis.call('HGET', host_key, 'closed_through') or '-1')
  if tonumber(ARGV[4]) > closed then redis.call('HSET', host_key, 'closed_through', ARGV[4]) end
end
if ARGV[6] ~= '' then redis.call('HSET', host_key, 'instance_ended', ARGV[6]) end
local closed_now = redis.call('HGET', host_key, 'closed_through') or ''
redis.call('SET', KEYS[#KEYS - 1], ARGV[7] .. '\\n' .. closed_now, 'EX', 2 * tonumber(ARGV[8]))
redis.call('SET', KEYS[#KEYS], ARGV[5] .. '\\n' .. closed_now .. '\\n'
           .. (redis.call('HGET', host_key, 'instance_ended') or ''), 'EX', 2 * tonumber(ARGV[8]))
return added
"""

# closed_through never moves backwards.  KEYS: the host hash; ARGV: minute.
CLOSE_SCRIPT = """
local closed = tonumber(redis.call('HGET', KEYS[1], 'closed_through') or '-1')
if tonumber(ARGV[1]) > closed then redis.call('HSET', KEYS[1], 'closed_through', ARGV[1]) end
return 0
"""

# Late hits: move the watermarks without adding to the periods, and count
# the growth of the `all` keys into the host's late_dropped.  KEYS: per item
# the watermark hash, then the host hash.  ARGV: watermark TTL, then per
# item: field, observed, 1 if the account is `all` else 0.
LATE_SCRIPT = """
local late = 0
for i = 1, #KEYS - 1 do
  local a = 1 + (i - 1) * 3
  local observed = tonumber(ARGV[a + 2])
  local seen = tonumber(redis.call('HGET', KEYS[i], ARGV[a + 1]) or '0')
  if observed > seen then
    redis.call('HSET', KEYS[i], ARGV[a + 1], ARGV[a + 2])
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    if ARGV[a + 3] == '1' then late = late + observed - seen end
  end
end
if late > 0 then redis.call('HINCRBY', KEYS[#KEYS], 'late_dropped', late) end
return late
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: The span whose UTC offsets fingerprint a zone (zone_rules), fixed so that
#: every host computes the same one whenever it starts.
RULES_YEARS = (2000, 2050)


def zone_rules(zone: ZoneInfo) -> str:
    """A fingerprint of a zone's rules: its UTC offset at the start of
    RULES_YEARS and every change of it through those years (to the
    minute), hashed.  Two names of one zone ("UTC", "Etc/UTC") or a copied
    zone file ("localtime") have the same; Zurich and New York do not."""
    import datetime
    import hashlib

    start = datetime.datetime(RULES_YEARS[0], 1, 1, tzinfo=datetime.timezone.utc)
    days = (datetime.datetime(RULES_YEARS[1], 1, 1, tzinfo=datetime.timezone.utc) - start).days

    def offset(minutes: int) -> int:
        at = start + datetime.timedelta(minutes=minutes)
        return int(at.astimezone(zone).utcoffset().total_seconds())

    changes, last = [f"{offset(0)}"], offset(0)
    for day in range(1, days + 1):
        here = offset(day * 1440)
        if here != last:  # the change within the day before, to the minute
            lo, hi = (day - 1) * 1440, day * 1440
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if offset(mid) == last else (lo, mid)
            changes.append(f"{hi}:{here}")
            last = here
    return hashlib.sha256(" ".join(changes).encode()).hexdigest()[:32]


def _loadable(name: str) -> ZoneInfo | None:
    """The IANA zone ``name``, or None ("localtime", unknown)."""
    from zoneinfo import ZoneInfoNotFoundError

    if not name or name == "localtime":
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


class RedisStore:
    """The period store of a farm, over a redis-py client.

    ``host`` names this host in the farm; ``instance`` (the segment header's
    ``instance``) keys its watermarks; ``zone`` turns epoch minutes into
    local periods.  Thread-safe as far as the client is (redis-py's is).
    """

    def __init__(self, client: Any, zone: ZoneInfo, host: str, *, prefix: str = "track",
                 minute_days: float = 0, funnels_prefix: str = "funnels",
                 forget_after: float = FORGET_HOSTS_AFTER) -> None:
        if not host or ":" in host or "\0" in host:
            raise ConfigError(f"[store] host {host!r} is not a usable host name; use a name "
                              "without ':' (default: this machine's host name)")
        self.client, self.tz, self.host, self.prefix = client, zone, host, prefix
        self.funnels_prefix = funnels_prefix
        self.minute_ttl = int(minute_days * 86400)
        self._roll = client.register_script(ROLL_SCRIPT)
        self._close = client.register_script(CLOSE_SCRIPT)
        self._late = client.register_script(LATE_SCRIPT)
        self._merge = client.register_script(MERGE_WATERMARKS_SCRIPT)
        #: Seconds a watermark is kept after its last move (cover_ring).
        self.watermark_ttl = WATERMARK_TTL
        #: Seconds after its last roll that this host's hash and gaps are
        #: forgotten (``[store] forget_hosts_days``; never before its
        #: watermarks: see :attr:`host_ttl`).
        self.forget_after = forget_after
        self.host_key = f"{prefix}~host:{host}"
        self.keys_key = f"{prefix}~keys"
        #: "{account}\0{event}" of every event with funnel counts.
        self.funnel_keys_key = f"{prefix}~funnel_keys"
        #: All-time count per key, "{account}\0{event}" -> n, moved in the
        #: same script as the periods and the watermarks (for /metrics).
        self.totals_key = f"{prefix}~totals"
        self.gaps_key = f"{prefix}~gaps:{host}"
        #: "{instance}\n{closed_through}\n{instance_ended}" of this host's
        #: last roll, kept :attr:`segment_ttl` (twice the host hash's life).
        self.last_key = f"{prefix}~last:{host}"
        #: Per host, its ``store migrate``: "copying {t}", "copied {t}" or
        #: "switched {t}" (its first roll into Redis; the shadows dropped).
        self.migrations_key = f"{prefix}~migrations"
        #: What a reader says when there is nothing to read (never, for Redis:
        #: an empty farm reads as zeros); the SQLiteStore's attribute.
        self.empty: str | None = None
        self._pipe: Any = None  # the MULTI of an open transaction()

    # ------------------------------------------------------------ the farm

    def check_zone(self, zone_name: str) -> None:
        """Record the farm's time zone, or refuse one whose rules differ.
        Rules, not names (:func:`zone_rules`): a copied ``/etc/localtime``
        is named "localtime" whatever the zone, and "UTC" and "Etc/UTC"
        are one zone.  ``{prefix}~farm`` holds the first supervisor's zone
        name (``timezone``) and rules (``timezone_rules``)."""
        key = f"{self.prefix}~farm"
        rules = zone_rules(self.tz)
        # One round trip: a Redis that hangs costs one socket timeout, not two.
        pipe = self.client.pipeline(transaction=False)
        pipe.hsetnx(key, "timezone", zone_name)
        pipe.hmget(key, "timezone", "timezone_rules")
        first, (farm, farm_rules) = pipe.execute()
        farm = _text(farm)
        if farm_rules is not None:
            if _text(farm_rules) == rules:
                return
        elif first or farm == zone_name or (
                _loadable(farm) is not None and zone_rules(_loadable(farm)) == rules):
            # Recorded by us now, or by an older version (a name only): the
            # same zone as far as can be told; its rules from now on.
            self.client.hsetnx(key, "timezone_rules", rules)
            return
        fix = (f"set timezone = \"{farm}\" on every host" if _loadable(farm) else
               "set timezone = \"<IANA name>\" (e.g. \"Europe/Zurich\") on every host: a "
               "copied /etc/localtime is named \"localtime\" whatever its zone")
        raise ConfigError(
            f"this host's time zone is {zone_name} but the farm's is {farm} (recorded in "
            f"Redis by the first supervisor) and their rules differ (UTC offsets and "
            f"daylight-saving changes): hosts would mix hours; {fix}")

    @property
    def host_ttl(self) -> int:
        """Seconds this host's hash (``closed_through``, instance, ...) and
        gaps live after its last roll: ``forget_after``, but never less
        than the watermarks' (a host back within that time must find its
        ``closed_through`` with them, or it would record a false gap)."""
        return int(max(self.forget_after, self.watermark_ttl))

    @property
    def segment_ttl(self) -> int:
        """Seconds ``{prefix}~segment:{instance}`` lives after its last
        write: twice :attr:`host_ttl`, so that a host that comes back after
        it was forgotten finds its last closed minute there (its gap starts
        there, not at the segment's creation)."""
        return 2 * self.host_ttl

    # ------------------------------------------------- which host rolls what

    def _segment_key(self, instance: int) -> str:
        return f"{self.prefix}~segment:{instance}"

    def cover_ring(self, minutes: int) -> None:
        """Keep watermarks (and the segment's host) for as long as a ring of
        ``minutes`` holds their minute, plus :data:`WATERMARK_TTL`: a ring
        of 100,000 minutes must not outlive them (the oldest ring minute,
        read once more for late hits, would read as all late)."""
        self.watermark_ttl = max(WATERMARK_TTL, int(minutes) * 60 + WATERMARK_TTL)

    def claim_segment(self, instance: int, first: int | None = None) -> None:
        """The segment ``instance`` rolls under this host's name from now
        on.  The roll script records which host rolls a segment and its
        ``closed_through`` (``{prefix}~segment:{instance}``); when that is
        another name (the host was renamed: ``[store] host`` changed, or its
        default, the machine's host name; two hosts swapped names), that
        name's watermarks of this segment are carried over first, then the
        segment's ``closed_through`` and instance become this name's, so
        nothing of the ring is added twice or skipped and no gap is
        recorded.  The old name
        still rolling this segment (its ownership key alive with this
        instance: a cloned machine) is refused, naming both; one SIGKILLed on
        this boot (its pid dead) is not.  Idempotent: a
        carry-over cut short is done again whole at the next start.  A
        segment that never rolled into this Redis (no record; ``first``:
        its first minute the ring still holds, its creation or later) while
        the name's ``closed_through`` reaches ``first`` (another segment
        rolled under the name meanwhile: a clone took it while this
        supervisor was paused before its first roll) carries on from
        ``first``, not from that one's mark.  A
        ``store migrate`` of this host cut short (``migrating`` in the host
        hash) is a ConfigError until it is run again whole."""
        from trafficthreshold import farm

        pipe = self.client.pipeline(transaction=False)
        pipe.get(self._segment_key(instance))
        pipe.hget(self.host_key, "migrating")
        pipe.hget(self.migrations_key, self.host)
        pipe.hget(self.host_key, "instance")
        pipe.get(self.last_key)
        old, migrating, record, cur, last = pipe.execute()
        if migrating is not None or (record is not None and _text(record).startswith("copying")):
            raise ConfigError(
                f"a `store migrate` of host {self.host!r} into this Redis was cut short: "
                "rolling now would add again what its watermarks do not cover yet.  Run "
                "`trafficthreshold store migrate --to ...` again (it adds only what is "
                "missing); the ring keeps counting meanwhile")
        if record is not None and _text(record).startswith("copied"):
            self._switched()
        # "{host}\n{closed_through}" (an older value: the host alone)
        old, _, seg_closed = (None, "", "") if old is None else _text(old).partition("\n")
        if old is None:
            if cur is None and last is not None:
                self._back_on_a_new_segment(instance, _text(last))
            elif cur is not None and _text(cur) != str(instance):
                self._left_to_another_name(instance, int(_text(cur)))
                self._never_rolled(instance, int(_text(cur)), first)
            return
        if old == self.host:
            # Our segment, but the name rolled another one since (a clone
            # took the name while this supervisor was paused): the name's
            # closed_through is that one's; take this segment's back.  Or
            # the name was forgotten (no roll for forget_hosts_days): its
            # hash is gone, the segment's key still says where it stopped.
            if seg_closed and (cur is None or _text(cur) != str(instance)):
                if cur is None:
                    log.warning("host %r was forgotten ([store] forget_hosts_days without a "
                                "roll); segment %#x carries on from its closed minute %s",
                                self.host, instance, seg_closed)
                else:
                    log.warning("host %r rolled segment %#x meanwhile; segment %#x carries "
                                "on from its own closed minute %s", self.host,
                                int(_text(cur)), instance, seg_closed)
                with self.transaction():
                    self._writer().hset(self.host_key, mapping={
                        "closed_through": seg_closed, "instance": str(instance)})
            return
        holder = farm.HostClaim.holder(self.client, old, prefix=self.prefix)
        # A holder SIGKILLed on this boot leaves its key for its TTL: gone.
        if holder is not None and holder.get("instance") == instance \
                and not farm.HostClaim.gone(holder):
            raise ConfigError(
                f"segment instance {instance:#x} is rolled by host {old!r} right now (its "
                f"supervisor pid {holder.get('pid')} is running) and this supervisor would "
                f"roll it as {self.host!r}: every hit would be counted twice.  Give each "
                "machine its own segment and [store] host (a cloned machine keeps its "
                "memory: reinstall the segment there), or stop the other one")
        log.warning("host %r rolls segment %#x that host %r rolled until now (renamed): "
                    "carrying over its watermarks and closed_through", self.host, instance,
                    old)
        want, moved = f"{instance}\0", 0
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", f"{self.prefix}~wm:{old}:") + "*"
        for key in self.client.scan_iter(match=pattern, count=1000):
            minute = _text(key).rsplit(":", 1)[1]
            fields = {_text(f): int(v) for f, v in self.client.hgetall(key).items()
                      if _text(f).startswith(want)}
            if fields:
                args: list[Any] = [self.watermark_ttl]
                for field, count in fields.items():
                    args.extend([field, count])
                self._merge(keys=[f"{self.prefix}~wm:{self.host}:{minute}"], args=args)
                moved += len(fields)
        before = {_text(k): _text(v) for k, v in
                  self.client.hgetall(f"{self.prefix}~host:{old}").items()}
        old_last = _text(self.client.get(f"{self.prefix}~last:{old}") or "")
        if not seg_closed and before.get("instance") == str(instance):
            seg_closed = before.get("closed_through", "")  # an older segment key
        with self.transaction():
            # This name rolls this segment from now on: its closed_through
            # is the segment's (set, not only moved up: the name may have
            # rolled another segment further, two hosts that swapped names),
            # and its instance is this one (no "replaced" gap: the other
            # segment moved to another name, it was not lost).  Without a
            # recorded closed_through (a segment key of an older version,
            # the old name onto another segment since) the name keeps its
            # own, as before.
            writer = self._writer()
            if seg_closed:
                writer.hset(self.host_key, "closed_through", seg_closed)
                writer.hset(self.host_key, "instance", str(instance))
            if before.get("instance") == str(instance) and before.get("instance_ended"):
                writer.hset(self.host_key, "instance_ended", before["instance_ended"])
            writer.set(self._segment_key(instance), f"{self.host}\n{seg_closed}",
                       ex=self.segment_ttl)
            if old_last.split("\n", 1)[0] == str(instance):
                # This segment is this name's now: the old name, forgotten
                # and back on another segment, lost nothing of it.
                writer.delete(f"{self.prefix}~last:{old}")
        log.warning("carried %d watermarks of segment %#x over from host %r to %r", moved,
                    instance, old, self.host)

    def _never_rolled(self, instance: int, previous: int, first: int | None) -> None:
        """Segment ``instance`` never rolled into this Redis, yet the name's
        ``closed_through`` (segment ``previous``'s) reaches ``first`` (its
        first minute the ring still holds): none of its minutes was rolled
        (its watermarks are its own), so it carries on from ``first``, as a
        segment back on its name carries on from its own closed minute."""
        closed = self.closed_through()
        if first is None or closed is None or closed < first:
            return  # a segment replaced after the last roll: the Roller records it
        log.warning("host %r rolled segment %#x through minute %d meanwhile; segment %#x, "
                    "never rolled into this Redis, carries on from minute %d",
                    self.host, previous, closed, instance, first)
        with self.transaction():
            self._writer().hset(self.host_key, mapping={
                "closed_through": str(first - 1), "instance": str(instance)})

    def _left_to_another_name(self, instance: int, previous: int) -> None:
        """This name comes to segment ``instance``, its hash naming segment
        ``previous``, which another name rolled since (a rename, then the
        old name back): that name rolled it on, so this one did not lose
        what it counted after this name's last closed minute.  Only what
        it counted after its own last roll (``{prefix}~segment:{previous}``
        says through which minute) is unknown, unless its supervisor is
        still rolling it (nothing lost: this is another machine under the
        old name)."""
        from trafficthreshold import farm

        value = self.client.get(self._segment_key(previous))
        if value is None:
            return
        owner, _, closed = _text(value).partition("\n")
        if owner == self.host:
            return  # ours: a segment replaced, as the Roller records it
        holder = farm.HostClaim.holder(self.client, owner, prefix=self.prefix)
        rolled_on = holder is not None and holder.get("instance") == previous \
            and not farm.HostClaim.gone(holder)
        log.warning("host %r comes to segment %#x; its last segment %#x is rolled by host %r "
                    "since (closed through minute %s)%s", self.host, instance, previous, owner,
                    closed or "-", ": nothing of it is lost" if rolled_on else "")
        with self.transaction():
            if rolled_on or not closed:
                self._writer().hset(self.host_key, "instance_ended", str(previous))
            else:
                self.set_closed_through(int(closed))

    def _back_on_a_new_segment(self, instance: int, last: str) -> None:
        """This name was forgotten (no roll for forget_hosts_days: its hash
        expired) and comes back on segment ``instance`` that never rolled
        into Redis, with its last roll still in :attr:`last_key`: its
        instance, closed_through and instance_ended go back into the host
        hash, so that the Roller sees a segment replaced and records what is
        unknown (from the closed minute + 1 to the new segment's creation),
        or nothing when ``uninstall`` rolled the old one to its end."""
        before, closed, ended = (last.split("\n") + ["", ""])[:3]
        if not before or not closed:
            return
        log.warning("host %r was forgotten ([store] forget_hosts_days without a roll) and "
                    "comes back on segment %#x; its last segment %#x was closed through minute "
                    "%s", self.host, instance, int(before), closed)
        fields = {"closed_through": closed, "instance": before}
        if ended:
            fields["instance_ended"] = ended
        with self.transaction():
            writer = self._writer()
            writer.hset(self.host_key, mapping=fields)
            writer.expire(self.host_key, self.host_ttl)

    def migration(self) -> tuple[str, float] | None:
        """This host's ``store migrate`` record: ("copying" | "copied" |
        "switched", when), or None."""
        value = self.client.hget(self.migrations_key, self.host)
        if value is None:
            return None
        state, _, at = _text(value).partition(" ")
        return state, float(at or 0)

    def _switched(self) -> None:
        """This host's first roll into Redis after its migration: a rerun is
        refused from now on, so the shadow hashes (what each run copied,
        per field: as large as the migrated history) are dropped; the
        record says "switched"."""
        import time

        # "switched" first: a SIGKILL while dropping leaves shadows that
        # expire on their own, never a rerun allowed over shadows half gone.
        self.client.hset(self.migrations_key, self.host, f"switched {time.time()!r}")
        marker = f"{self.prefix}~migrated:{self.host}"
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", f"{marker}:") + "*"
        batch: list[Any] = [marker]
        for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                self.client.unlink(*batch)
                batch = []
        if batch:
            self.client.unlink(*batch)
        log.info("host %r rolls into Redis: the records of its migration are dropped (a "
                 "rerun is refused from now on)", self.host)

    # ------------------------------------------------------------- rolling

    def _period_keys(self, account: str, event: str, parts: tuple[int, ...]) -> list[str]:
        y, mo, d, h, _ = parts
        base = f"{self.prefix}:{account}:{event}"
        return [f"{base}:{y}", f"{base}:{y}:{mo}", f"{base}:{y}:{mo}:{d}",
                f"{base}:{y}:{mo}:{d}:{h}"]

    def _funnel_keys(self, account: str, event: str, parts: tuple[int, ...]) -> list[str]:
        base = f"{self.funnels_prefix}:{account}:{event}:{parts[0]}"
        return [base, f"{base}:{parts[1]}"]

    def roll_deltas(self, items: Iterable[RollItem], now: float, *, instance: int = 0,
                    closed_through: int | None = None,
                    ended: bool = False) -> dict[KeyMinute, int]:
        """Add what is new in a snapshot of cumulative counts; return what
        was added per key-minute that grew.  See the module docstring."""
        latest: dict[KeyMinute, int] = {}
        for account, event, minute, observed in items:
            key = (account, event, minute)
            latest[key] = max(latest.get(key, 0), min(int(observed), MAX_COUNT))
        ordered = list(latest.items())
        added: dict[KeyMinute, int] = defaultdict(int)
        for start in range(0, max(len(ordered), 1), BATCH):
            batch = ordered[start:start + BATCH]
            last = start + BATCH >= len(ordered)
            keys: list[str] = []
            args: list[Any] = [self.watermark_ttl, self.minute_ttl, repr(float(now)),
                               "" if closed_through is None or not last else closed_through,
                               instance, instance if ended and last else "", self.host,
                               self.host_ttl]
            for (account, event, minute), observed in batch:
                parts = local_parts(minute, self.tz)
                keys.append(f"{self.prefix}~wm:{self.host}:{minute}")
                args.extend([f"{instance}\0{account}\0{event}", observed])
                plain, status = split_status(event)
                if status is None:
                    keys.extend(self._period_keys(account, event, parts))
                    args.extend([*parts[1:], f"{account}\0{event}", "t"])
                else:
                    year, month = self._funnel_keys(account, plain, parts)
                    keys.extend([year, month, month, month])  # the last two unused
                    args.extend([status, status, "", "", f"{account}\0{plain}", "f"])
            keys.extend([self.totals_key, self.keys_key, self.funnel_keys_key, self.host_key,
                         self._segment_key(instance), self.last_key])
            deltas = self._roll(keys=keys, args=args)
            for ((account, event, minute), _), delta in zip(batch, deltas, strict=True):
                if delta:
                    added[account, event, minute] += int(delta)
        return dict(added)

    def roll(self, items: Iterable[RollItem], now: float, *, instance: int = 0,
             closed_through: int | None = None) -> int:
        """:meth:`roll_deltas`, and return the total added."""
        return sum(self.roll_deltas(items, now, instance=instance,
                                    closed_through=closed_through).values())

    def _host_field(self, name: str) -> bytes | str | None:
        return self.client.hget(self.host_key, name)

    def closed_through(self) -> int | None:
        """The last minute this host has closed, or None."""
        value = self._host_field("closed_through")
        return None if value is None else int(value)

    def last_roll_at(self) -> float | None:
        """When this host last rolled (Unix seconds), or None."""
        value = self._host_field("last_roll_at")
        return None if value is None else float(value)

    # ------------------------------------------- what the Roller asks of a store
    # The same methods as the SQLiteStore's (trafficthreshold.rollup), per host.

    def instance(self) -> int | None:
        """The segment instance of this host's last roll, or None."""
        value = self._host_field("instance")
        return None if value is None else int(value)

    def instance_ended(self) -> int | None:
        """The instance of this host that ``uninstall`` retired and a final
        roll rolled to its end, or None."""
        value = self._host_field("instance_ended")
        return None if value is None else int(value)

    def late_dropped(self) -> int:
        """This host's hits that came too late to be added (see rollup)."""
        return int(self._host_field("late_dropped") or 0)

    def bad_keys(self) -> list[str]:
        """The keys this host's last roll had to skip, described."""
        value = self._host_field("bad_keys")
        return [] if value is None else list(json.loads(value))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """The writes of :meth:`set_closed_through`, :meth:`set_instance` and
        :meth:`record_gap` made inside go in one MULTI/EXEC: all or none.
        Reads inside see the state before it."""
        if self._pipe is not None:  # nested: the outer one executes
            yield self._pipe
            return
        self._pipe = self.client.pipeline(transaction=True)
        try:
            yield self._pipe
            self._pipe.execute()
        finally:
            self._pipe.reset()
            self._pipe = None

    def _writer(self) -> Any:
        return self.client if self._pipe is None else self._pipe

    def set_closed_through(self, minute: int) -> None:
        """Record that this host closed every minute up to ``minute``; never
        moves backwards."""
        self._close(keys=[self.host_key], args=[int(minute)], client=self._writer())

    def set_instance(self, instance: int) -> None:
        """Record the segment instance this host rolls."""
        self._writer().hset(self.host_key, "instance", instance)

    def set_bad_keys(self, described: Iterable[str]) -> None:
        """Record the keys a roll skips (see :meth:`bad_keys`)."""
        value = sorted(described)
        if value != self.bad_keys():
            self._writer().hset(self.host_key, "bad_keys", json.dumps(value))

    def drop_late(self, items: Iterable[RollItem], instance: int) -> int:
        """Move the watermarks of late hits without adding them; count the
        growth of the ``all`` keys into ``late_dropped``; return it."""
        latest: dict[KeyMinute, int] = {}
        for account, event, minute, observed in items:
            key = (account, event, minute)
            latest[key] = max(latest.get(key, 0), min(int(observed), MAX_COUNT))
        if not latest:
            return 0
        keys, args = [], [self.watermark_ttl]
        for (account, event, minute), observed in latest.items():
            keys.append(f"{self.prefix}~wm:{self.host}:{minute}")
            args.extend([f"{instance}\0{account}\0{event}", observed,
                         1 if account == ALL else 0])
        return int(self._late(keys=[*keys, self.host_key], args=args))

    def record_gap(self, first_minute: int, last_minute: int, reason: str, now: float) -> None:
        """Record that this host did not count minutes first..last: one JSON
        entry appended to the list ``{prefix}~gaps:{host}`` (the last
        :data:`GAPS_KEPT` kept; the list expires with the host hash)."""
        if first_minute > last_minute:
            raise ValueError(f"gap from minute {first_minute} to {last_minute}: first > last")
        entry = {"first_minute": first_minute, "last_minute": last_minute, "reason": reason,
                 "recorded_at": now}
        writer = self._writer()
        writer.rpush(self.gaps_key, json.dumps(entry))
        writer.ltrim(self.gaps_key, -GAPS_KEPT, -1)
        writer.expire(self.gaps_key, self.host_ttl)

    def gaps(self) -> list[dict[str, Any]]:
        """This host's recorded gaps, in the order recorded."""
        return [json.loads(item) for item in self.client.lrange(self.gaps_key, 0, -1)]

    def watermark_minutes(self, since_minute: int, instance: int | None = None,
                          span: int = 3 * 60) -> dict[KeyMinute, int]:
        """This host's watermarks of ``instance`` (default: the instance it
        last rolled) for the ``span`` minutes from ``since_minute``, as the
        SQLite store's method gives them (the dashboard's pending counts)."""
        if instance is None:
            instance = self.instance() or 0
        return self.metrics_reading(instance, since_minute,
                                    since_minute + span - 1)["watermarks"]

    def metrics_reading(self, instance: int | None, first: int, last: int) -> dict[str, Any]:
        """What a /metrics scrape needs, read in one MULTI (one snapshot,
        like the SQLite store's read transaction): the farm's all-time
        totals per key, this host's watermarks of ``instance`` for the
        minutes first..last (None when ``instance`` is None: no segment),
        its last roll, gaps, late drops and skipped
        keys.  A roll lands wholly before or after it, so stored plus this
        host's pending never goes down."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self.totals_key)
        pipe.hgetall(self.host_key)
        pipe.llen(self.gaps_key)
        minutes = [] if instance is None else list(range(first, last + 1))
        for minute in minutes:
            pipe.hgetall(f"{self.prefix}~wm:{self.host}:{minute}")
        totals_raw, host, gaps, *marks_raw = pipe.execute()
        totals = {}
        for field, value in totals_raw.items():
            account, _, event = _text(field).partition("\0")
            totals[account, event] = int(value)
        marks: dict[KeyMinute, int] = {}
        want = f"{instance}\0"
        for minute, fields in zip(minutes, marks_raw, strict=True):
            for field, value in fields.items():
                text = _text(field)
                if text.startswith(want):
                    account, _, event = text[len(want):].partition("\0")
                    marks[account, event, minute] = int(value)
        host = {_text(k): _text(v) for k, v in host.items()}
        return {"totals": totals, "watermarks": None if instance is None else marks,
                "last_roll_at": float(host["last_roll_at"]) if "last_roll_at" in host else None,
                "gaps": int(gaps), "late_dropped": int(host.get("late_dropped") or 0),
                "bad_keys": len(json.loads(host["bad_keys"])) if host.get("bad_keys") else 0}

    def gap_count(self) -> int:
        """How many gaps this host recorded."""
        return int(self.client.llen(self.gaps_key))

    def prune(self, now: float, retention: Any) -> dict[str, int]:
        """Nothing to do: minute hashes expire on their own (``minute_days``),
        watermarks after WATERMARK_TTL; hours, days and months are kept."""
        return {}

    # ------------------------------------------------------------- reading

    def period(self, account: str, event: str, year: int, month: int | None = None,
               day: int | None = None, hour: int | None = None) -> dict[str, Any]:
        """Counts of a period by child segment, zero-filled, the same shape
        as the SQLite store's: ``{"data": {segment: count}, "total": n}``.
        One HGETALL, as Bootic's handlers did."""
        segs = segments(year, month, day, hour)
        given = [p for p in (year, month, day, hour) if p is not None]
        key = ":".join([self.prefix, account, event, *map(str, given)])
        data = dict.fromkeys(segs, 0)
        for field, value in self.client.hgetall(key).items():
            try:
                segment = int(field)
            except ValueError:
                continue  # a field someone else wrote; not ours to show
            if segment in data:
                data[segment] = int(value)
        return {"data": data, "total": sum(data.values())}

    def _pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for member in self.client.smembers(self.keys_key):
            text = member.decode() if isinstance(member, bytes) else member
            account, _, event = text.partition("\0")
            pairs.append((account, event))
        return pairs

    def accounts(self, event: str | None = None) -> list[str]:
        """Accounts the farm has rolled (for ``event`` if given), sorted;
        ``all`` included.  Read from ``{prefix}~keys``, which every roll and
        migration adds to (Bootic's own writes are not listed there)."""
        return sorted({a for a, e in self._pairs() if event is None or e == event})

    def events(self, account: str | None = None) -> list[str]:
        """Events the farm has rolled (of ``account`` if given), sorted."""
        return sorted({e for a, e in self._pairs() if account is None or a == account})

    def years(self, account: str, event: str) -> list[int]:
        """The years that hold counts of ``(account, event)``, ascending: the
        year part of its period hashes, found with SCAN (never KEYS, which
        blocks the server), the glob characters of the names escaped."""
        return self._years_under(":".join([self.prefix, account, event]) + ":")

    def _years_under(self, base: str) -> list[int]:
        """The numeric first parts of the keys below ``base``, ascending."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", base) + "*"
        years = set()
        for key in self.client.scan_iter(match=pattern, count=1000):
            rest = (key.decode() if isinstance(key, bytes) else key)[len(base):]
            head = rest.split(":", 1)[0]
            if head.isdigit():
                years.add(int(head))
        return sorted(years)

    # ------------------------------------------------------------- funnels

    def funnel(self, account: str, event: str, year: int,
               month: int | None = None) -> dict[str, Any]:
        """The counts per status of ``event`` in a year or a month, the
        SQLite store's shape: ``{"data": {status: n}, "total": n, "months":
        [...]}``.  HGETALL of Bootic's hash, as its handlers did; a year
        also asks which of its 12 month hashes exist (one pipeline)."""
        segments(year, month)  # ImpossiblePeriod for month 13
        base = f"{self.funnels_prefix}:{account}:{event}:{year}"
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(base if month is None else f"{base}:{month}")
        if month is None:
            for m in range(1, 13):
                pipe.exists(f"{base}:{m}")
        fields, *exist = pipe.execute()
        data = {}
        for field, value in fields.items():
            try:
                data[_text(field)] = int(value)
            except ValueError:
                continue  # a field someone else wrote; not ours to show
        data = {k: v for k, v in sorted(data.items()) if v > 0}
        return {"data": data, "total": sum(data.values()),
                "months": [m for m, there in zip(range(1, 13), exist) if there]}

    def _funnel_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for member in self.client.smembers(self.funnel_keys_key):
            account, _, event = _text(member).partition("\0")
            pairs.append((account, event))
        return pairs

    def funnel_accounts(self) -> list[str]:
        """Accounts with funnel counts, sorted; ``all`` included.  Read from
        ``{prefix}~funnel_keys``, which every roll and migration adds to."""
        return sorted({a for a, _e in self._funnel_pairs()})

    def funnel_events(self, account: str) -> list[str]:
        """The events of ``account`` with funnel counts, sorted."""
        return sorted({e for a, e in self._funnel_pairs() if a == account})

    def funnel_years(self, account: str, event: str) -> list[int]:
        """The years of ``(account, event)``'s funnel hashes, found with SCAN."""
        return self._years_under(":".join([self.funnels_prefix, account, event]) + ":")

    def top_accounts(self, event: str, since_minute: int, limit: int,
                     span: int = 24 * 60) -> list[tuple[str, int]]:
        """The ``limit`` accounts with the most ``event`` hits in the minutes
        ``since_minute`` .. ``since_minute + span - 1``, biggest first;
        ``all`` left out (the SQLite store's method, over the minute hashes:
        one HGETALL per account and hour, in one pipeline)."""
        hours: dict[tuple[int, ...], set[int]] = defaultdict(set)
        for minute in range(since_minute, since_minute + span):
            parts = local_parts(minute, self.tz)
            hours[parts[:4]].add(parts[4])
        accounts = [a for a in self.accounts(event) if a != ALL]
        pipe = self.client.pipeline(transaction=False)
        asked = []
        for account in accounts:
            for hour, minutes in hours.items():
                pipe.hgetall(":".join([self.prefix, account, event, *map(str, hour)]))
                asked.append((account, minutes))
        totals: dict[str, int] = defaultdict(int)
        for (account, minutes), fields in zip(asked, pipe.execute(), strict=True):
            totals[account] += sum(int(v) for f, v in fields.items()
                                   if f.isdigit() and int(f) in minutes)
        ranked = sorted(((a, n) for a, n in totals.items() if n), key=lambda r: (-r[1], r[0]))
        return ranked[:limit]

    def close(self) -> None:
        """Let go of the client's connections."""
        self.client.close()

    # -- the farm's host name (the supervisor's claim; issue 23: no backend
    # test outside store/).  Kept apart from the reading methods above.

    #: Shared by the hosts of a farm over the network: the supervisor claims
    #: ``[store] host`` (:meth:`claim_host`) and rolls on its own thread.
    shared = True

    def claim_host(self, instance: int, *, pid: int, wait: bool) -> Any:
        """Take ``[store] host`` for this supervisor (:class:`farm.HostClaim`
        over this store's client and prefix) and return the claim; another
        live supervisor under the name is a ConfigError naming both and the
        fix.  ``wait``: watch another holder up to its TTL (at the start)."""
        from trafficthreshold.farm import HostClaim

        claim = HostClaim(self.client, self.host, instance, pid=pid, prefix=self.prefix)
        claim.take(wait=wait)
        return claim

    def farm_live(self, now: float, only: Any = None, keep_only: bool = False) -> Any:
        """The farm's live numbers at ``now`` (:func:`farm.farm_live`: the
        :class:`farm.LiveReader` of this store's client and prefix, which
        reads only the live log's entries since its last reading); ``only``:
        the rows of these keys alone (None: every key of every host), read
        by a reader that keeps them alone with ``keep_only``."""
        from trafficthreshold.farm import farm_live

        return farm_live(self.client, now=now, prefix=self.prefix, only=only,
                         keep_only=keep_only)

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------- connecting

#: Seconds a command may take before the supervisor gives up on it for this
#: tick: a slow Redis never delays the tick (throttle, alerts, heartbeat).
SOCKET_TIMEOUT = 2.0


def redact_url(url: str) -> str:
    """``url`` as it may be printed: a password in it (``user:pass@``, or a
    query argument holding a secret in any spelling redis-py passes on:
    ``password``, ``Password``, ``ssl_password``, ``pass%77ord`` ...; all
    refused by the configuration) replaced by ``***``, and the user name
    too (someone may have written the password there)."""
    import urllib.parse

    from trafficthreshold.config import url_secrets

    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = f"***@{netloc.rpartition('@')[2]}"
        secret = set(url_secrets(url))
        query = [(k, "***" if k in secret else v)
                 for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
        return urllib.parse.urlunsplit(parts._replace(
            netloc=netloc, query=urllib.parse.urlencode(query, safe="*")))
    except ValueError:
        return "(a Redis URL that cannot be shown)"


def connect(url: str = "", *, sentinels: Iterable[str] = (), service: str = "",
            password: str | None = None, timeout: float = SOCKET_TIMEOUT) -> Any:
    """A redis-py client for ``[store]``: ``url`` (``redis://``, ``rediss://``,
    ``unix://``, with a db number) or ``sentinels`` ("host:port" strings)
    with the master's ``service`` name.  Connects lazily; errors say what to
    install or change."""
    try:
        import redis
        from redis.sentinel import Sentinel
    except ImportError:
        raise ConfigError("[store] backend = \"redis\" needs redis-py: pip install "
                          "'trafficthreshold[redis]'") from None
    sentinels = list(sentinels)
    if sentinels:
        if not service:
            raise ConfigError("[store] sentinels needs service = \"<master name>\" (the name "
                              "in the sentinels' `sentinel monitor` line)")
        nodes = []
        for node in sentinels:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"[store] sentinels: {node!r} is not host:port; write e.g. "
                                  "\"10.0.0.5:26379\"")
            nodes.append((host.strip("[]"), int(port)))
        sentinel = Sentinel(nodes, socket_timeout=timeout,
                            sentinel_kwargs={"socket_timeout": timeout})
        return sentinel.master_for(service, socket_timeout=timeout, password=password)
    if not url:
        raise ConfigError("[store] backend = \"redis\" needs url = \"redis://host:6379/0\" or "
                          "sentinels = [\"host:26379\", ...] with service")
    try:
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                    password=password)
    except ValueError as exc:
        raise ConfigError(f"[store] url {redact_url(url)!r} is not a Redis URL ({exc}); use "
                          "redis://host:port/db, rediss://... or unix:///path/redis.sock") from None
