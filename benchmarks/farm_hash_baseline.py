"""BASELINE for benchmarks/bench_farm_scale.py: a copy of
``trafficthreshold/farm.py`` as it was before the live log (issue #25's
second design, commit b55df69: a hash per host, diffs of the changed
fields in a MULTI).  Not used by the package; kept so that one run of the
benchmark measures the designs side by side.
"""
from __future__ import annotations

# The data classes and helpers it shares with today's farm.py.
from trafficthreshold import farm as _farm
from trafficthreshold.farm import (  # noqa: F401
    FarmLive, HostLive, Publication, _text, live_fields)

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

#: A host drops out of the farm's live numbers this long after its last
#: publication (by Redis' clock): its hash is removed, its share of the
#: watched sums subtracted (the reaper, :data:`LIVE_LUA`).
LIVE_TTL_MS = 5_000
#: The live channel's keys expire this long after the last publication (a
#: bound, for a farm that stopped whole; a dead host is reaped long before).
LIVE_KEEP_MS = 3_600_000
#: A watched key (:func:`farm_level`) nobody asked for this long (seconds)
#: leaves the watch set and the sums.
WATCH_FOR = 86_400
#: A host not heard from for this long is no longer listed at all.
FORGET_AFTER = 3_600
#: A host not heard from for this long (seconds) leaves ``{prefix}~hosts``
#: (``[store] forget_hosts_days``; the store forgets its hash too).
FORGET_HOSTS_AFTER = 30 * 86_400

LiveCounts = dict[tuple[str, str], tuple[int, int]]

# The live channel's scripts share this prelude.  KEYS[1] the alive set
# ({prefix}~live~alive: host -> the Redis time, ms, after which it is dead),
# KEYS[2] the watch set ({prefix}~live~watch: "{account}\0{event}" -> when a
# reader last asked for it), KEYS[3] the watched keys' sums
# ({prefix}~live~sum: "minute\0{account}\0{event}" and
# "60s\0{account}\0{event}" -> the sum over the hosts in the alive set of
# their current minute / last 60 s).  ARGV[1] the prefix.  The invariant
# every script (and every publication's MULTI as a whole) keeps: for each
# watched key, its sums are the sums of that key's field over the hash of
# every host in the alive set.  reap() removes the hosts past their
# deadline (subtracting their watched fields, then deleting their hash); a
# dead host whose hash is gone already (it expired, LIVE_KEEP_MS, with
# nobody left to reap it) or was rewritten by an older version (no ~seq:
# the host was downgraded without a stop) makes it rebuild the sums from
# the live hosts' hashes.  Host hashes are named here from the prefix (not declared in
# KEYS): one Redis, not a cluster (docs/redis.rst, "Past one Redis").
LIVE_LUA = """
local function parse(v)
  if not v then return 0, 0 end
  local m, s = string.match(v, '^(%d+) (%d+)')
  return tonumber(m) or 0, tonumber(s) or 0
end
local function add(field, dm, ds)
  if dm ~= 0 and redis.call('HINCRBY', KEYS[3], 'minute\\0' .. field, dm) == 0 then
    redis.call('HDEL', KEYS[3], 'minute\\0' .. field)
  end
  if ds ~= 0 and redis.call('HINCRBY', KEYS[3], '60s\\0' .. field, ds) == 0 then
    redis.call('HDEL', KEYS[3], '60s\\0' .. field)
  end
end
local function add_host(key, fields, sign)
  if #fields == 0 then return end
  local vals = redis.call('HMGET', key, unpack(fields))
  for i, f in ipairs(fields) do
    local m, s = parse(vals[i])
    add(f, sign * m, sign * s)
  end
end
local function add_hosts(fields)
  if #fields == 0 then return end
  for _, h in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    add_host(ARGV[1] .. '~live:' .. h, fields, 1)
  end
end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function reap()
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms)
  if #dead == 0 then return end
  local watched = redis.call('ZRANGE', KEYS[2], 0, -1)
  local lost = false
  for _, h in ipairs(dead) do
    local key = ARGV[1] .. '~live:' .. h
    if not redis.call('HGET', key, '~seq') then
      lost = true  -- gone, or rewritten by an older version: its share is unknown
    else
      add_host(key, watched, -1)
    end
    redis.call('UNLINK', key)
    redis.call('ZREM', KEYS[1], h)
  end
  if lost then
    redis.call('DEL', KEYS[3])
    add_hosts(watched)
  end
end
"""

# A publication is one MULTI: PRE_SCRIPT, then plain HSET and HDEL of the
# fields that changed and the fields gone (Redis's cheapest way to write
# many fields: no per-field script work) into the host's staging hash,
# then POST_SCRIPT.  KEYS: the prelude's three, the host's hash,
# {prefix}~hosts, its staging hash {prefix}~live~in:{host}.  ARGV: prefix,
# host, "full" or "diff", the sequence number the host's hash must hold
# for a diff, then (POST) the new one, ttl ms, keep ms, the host's clock,
# the ~hosts cut-off, level, last roll.
#
# PRE takes the host's share out of the sums (its watched fields, if it is
# in the alive set) and out of the alive set, and renames its hash to the
# staging hash; a full publication deletes it instead.  A diff on a hash
# that does not hold the sequence number it was computed from (a lost
# reply that ran, a host reaped after a pause, a Redis that lost writes, a
# diff that timed out and runs after the host's next publication) changes
# nothing: the hash, the alive set and the sums stay as they are.
# POST renames the staging hash back, stamped (Redis TIME, level, sequence
# number), puts the share back into the sums and the host into the alive
# set with its deadline; for a diff that PRE refused it deletes the
# staging hash (the fields written in between are a part only) and
# returns 0: the host then sends a full publication.  The HSET goes to the
# staging hash so that a MULTI whose scripts fail (NOSCRIPT after a SCRIPT
# FLUSH: EXEC still runs the HSET) leaves the live hash and the sums as
# they were (the staging hash expires after the TTL).  Absolute values
# throughout: a publication sent twice changes nothing the second time.
PRE_SCRIPT = LIVE_LUA + """
reap()
local H, S = KEYS[4], KEYS[6]
redis.call('UNLINK', S)
if redis.call('GET', KEYS[7]) == string.match(ARGV[4], '^[^:]*') then
  return 0  -- its publisher withdrew the host (a stop) before this ran: refused
end
local member = redis.call('ZSCORE', KEYS[1], ARGV[2])
if ARGV[3] == 'diff' and not (member and redis.call('HGET', H, '~seq') == ARGV[4]) then
  return 0  -- refused: the hash and the sums stay as they are (a late diff)
end
if member then
  add_host(H, redis.call('ZRANGE', KEYS[2], 0, -1), -1)
  redis.call('ZREM', KEYS[1], ARGV[2])
end
if ARGV[3] == 'full' then
  redis.call('UNLINK', H)
  return 0
end
redis.call('RENAME', H, S)
return 1
"""

POST_SCRIPT = LIVE_LUA + """
local H, S = KEYS[4], KEYS[6]
if redis.call('GET', KEYS[7]) == string.match(ARGV[4], '^[^:]*')
    or (ARGV[3] == 'diff' and redis.call('HGET', S, '~seq') ~= ARGV[4]) then
  redis.call('UNLINK', S)
  return 0
end
redis.call('HSET', S, '~level', ARGV[10], '~at', ARGV[8], '~last_roll', ARGV[11],
           '~seq', ARGV[5], '~redis_at', t[1] .. '.' .. string.format('%06d', t[2]))
redis.call('RENAME', S, H)
add_host(H, redis.call('ZRANGE', KEYS[2], 0, -1), 1)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[6]), ARGV[2])
for _, k in ipairs({KEYS[1], KEYS[2], KEYS[3], H}) do redis.call('PEXPIRE', k, ARGV[7]) end
redis.call('ZADD', KEYS[5], ARGV[8], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. ARGV[9])
return 1
"""

# KEYS: the prelude's three, then the host's hash, its stop mark
# {prefix}~live~stop:{host}.  ARGV: prefix, host, the withdrawing
# publisher's nonce (or ""), keep ms.  The host leaves the farm's live
# numbers now (a stop): its deadline set to 0, then reaped.  A hash that is
# not in the alive set (an older version's) is deleted.  The nonce is
# kept as the stop mark: a publication of that publisher still on its way
# (sent before the stop, run after it) is refused by PRE and POST instead
# of bringing the host back for a TTL; the publisher takes a new nonce.
WITHDRAW_SCRIPT = LIVE_LUA + """
if ARGV[3] ~= '' then redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[4]) end
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], 0, ARGV[2])
else
  redis.call('UNLINK', KEYS[4])
end
reap()
return 1
"""

# KEYS: the prelude's three.  ARGV: prefix.  The reaper alone (the per-host
# readings run it first).
REAP_SCRIPT = LIVE_LUA + """
reap()
return 1
"""

# KEYS: the prelude's three.  ARGV: prefix, WATCH_FOR, then the fields.
# Each field asked for is watched (its sums kept by every publication from
# now on; a new one is summed from the live hosts' hashes first); fields
# not asked for in WATCH_FOR seconds leave the watch set and the sums.
WATCH_SCRIPT = LIVE_LUA + """
reap()
for _, f in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf',
                              '(' .. (tonumber(t[1]) - tonumber(ARGV[2])))) do
  redis.call('HDEL', KEYS[3], 'minute\\0' .. f, '60s\\0' .. f)
  redis.call('ZREM', KEYS[2], f)
end
local new = {}
for i = 3, #ARGV do
  if redis.call('ZADD', KEYS[2], t[1], ARGV[i]) == 1 then new[#new + 1] = ARGV[i] end
end
add_hosts(new)
return #new
"""

def _live_keys(prefix: str) -> list[str]:
    return [f"{prefix}~live~alive", f"{prefix}~live~watch", f"{prefix}~live~sum"]


class LivePublisher:
    """One host's publication of its live counts (the farm thread's; not
    thread-safe).  The first publication, one after an error, one more
    than half the TTL after the last acknowledged one, and one whose diff
    was refused are *full* (the hash replaced whole); the others send only the
    fields whose value changed and the fields gone (a *diff*), stamped with
    a sequence number: a diff applies only on the hash holding the sequence
    number it was computed from (PRE_SCRIPT), so it is never applied on top
    of a state it was not computed from.  Absolute values throughout: a
    publication sent twice changes nothing."""

    def __init__(self, client: Any, host: str, *, prefix: str = "track",
                 ttl_ms: int = LIVE_TTL_MS, forget_after: float = FORGET_HOSTS_AFTER,
                 clock: Any = None) -> None:
        import secrets
        import time

        self.client, self.host, self.prefix = client, host, prefix
        self.ttl_ms, self.forget_after = ttl_ms, forget_after
        self.clock = clock or time.monotonic
        self._pre, self._post = (client.register_script(PRE_SCRIPT),
                                 client.register_script(POST_SCRIPT))
        self._keys = [*_live_keys(prefix), f"{prefix}~live:{host}", f"{prefix}~hosts",
                      f"{prefix}~live~in:{host}", f"{prefix}~live~stop:{host}"]
        #: The fields of the last acknowledged publication and when it was
        #: acknowledged (``clock``); None: the next one is full.  ``_n``:
        #: the number the last attempt stamped (the hash holds it when that
        #: attempt was acknowledged).
        self._sent: dict[str, str] | None = None
        self._nonce, self._n, self._acked = secrets.token_hex(4), 0, 0.0
        #: How many publications were full (the first, and resyncs).
        self.full = 0

    def _seq(self, n: int) -> str:
        return f"{self._nonce}:{n}"

    # publish() and prepare() are today's, unchanged since (the fields and
    # the diff against the last acknowledged ones; send() is this design's).
    publish = _farm.LivePublisher.publish
    prepare = _farm.LivePublisher.prepare

    def send(self, pub: "Publication") -> None:
        """Send a publication made by :meth:`prepare`: its diff if it was
        computed against the last acknowledged one, less than half the TTL
        ago (a host paused near its TTL may have been reaped), else whole."""
        sent, self._sent = self._sent, None  # until acknowledged
        if sent is not None and pub.base is sent and pub.changed is not None \
                and self.clock() - self._acked < self.ttl_ms / 2000:
            if self._run("diff", pub.now, pub.meta, pub.changed, pub.gone or []):
                self._sent, self._acked = pub.fields, self.clock()
                return
        self._run("full", pub.now, pub.meta, pub.fields, [])
        self._sent, self._acked = pub.fields, self.clock()
        self.full += 1

    def _run(self, mode: str, now: float, meta: list[Any], fields: dict[str, str],
             gone: list[str]) -> bool:
        # Every attempt stamps a number never used before, acknowledged or
        # not: a publication that runs late (its reply timed out, the next
        # one ran first) never holds the number the next diff expects.
        base, self._n = self._seq(self._n), self._n + 1
        args: list[Any] = [self.prefix, self.host, mode, base]
        if mode == "full":  # the first, or after an error: the scripts may be gone
            for script in (self._pre, self._post):
                self.client.script_load(script.script)
        # EVALSHA, not redis-py's Script in a pipeline (a SCRIPT EXISTS
        # round trip before each MULTI); a NOSCRIPT fails the EXEC.
        keys, staging = self._keys, self._keys[5]
        pipe = self.client.pipeline(transaction=True)
        pipe.evalsha(self._pre.sha, len(keys), *keys, *args)
        if fields:
            pipe.hset(staging, mapping=fields)
        if gone:
            pipe.hdel(staging, *gone)
        pipe.pexpire(staging, self.ttl_ms)
        pipe.evalsha(self._post.sha, len(keys), *keys, *args, self._seq(self._n),
                     self.ttl_ms, LIVE_KEEP_MS, meta[1], repr(float(now) - self.forget_after),
                     meta[0], meta[2])
        return bool(pipe.execute()[-1])

    def withdraw(self) -> None:
        """Leave the farm's live numbers now (a stop); the next publication
        is full."""
        import secrets

        withdraw_live(self.client, self.host, prefix=self.prefix, nonce=self._nonce)
        self._sent = None
        # A publication of ours still on its way is refused (the stop mark
        # holds our old nonce); the next ones stamp a new one.
        self._nonce, self._n = secrets.token_hex(4), 0


def withdraw_live(client: Any, host: str, *, prefix: str = "track", nonce: str = "") -> None:
    """``host`` leaves the farm's live numbers at once: its hash deleted and
    its share of the watched sums subtracted, in one script; the
    publications of the publisher ``nonce`` still on their way are
    refused (WITHDRAW_SCRIPT)."""
    client.eval(WITHDRAW_SCRIPT, 5, *_live_keys(prefix), f"{prefix}~live:{host}",
                f"{prefix}~live~stop:{host}", prefix, host, nonce, LIVE_KEEP_MS)


def publish_live(client: Any, host: str, counts: LiveCounts, *, level: int, now: float,
                 last_roll: float | None = None, prefix: str = "track",
                 ttl_ms: int = LIVE_TTL_MS, previous: dict[tuple[str, str], int] | None = None,
                 forget_after: float = FORGET_HOSTS_AFTER) -> None:
    """Replace this host's live numbers whole (a full publication of a
    :class:`LivePublisher`, which the farm thread uses to send only what
    changed), stamped with Redis' clock too (``~redis_at``, Redis ``TIME``
    in the same MULTI), so that a reader knows this host's clock skew
    (``~at - ~redis_at``).  ``previous``: per key, the count of the minute
    before ``now``'s (closed, so final).  Hosts not heard from for
    ``forget_after`` seconds leave ``{prefix}~hosts`` in the same MULTI
    (it never grows for ever)."""
    LivePublisher(client, host, prefix=prefix, ttl_ms=ttl_ms, forget_after=forget_after
                  ).publish(counts, level=level, now=now, last_roll=last_roll,
                            previous=previous)


#: A reader asks Redis to keep watching its keys this often (seconds).
WATCH_AGAIN = 600.0
#: A host in ``{prefix}~hosts`` this recently (seconds, by its clock) and
#: not in the alive set is taken for an older version's (LevelReader).
LEGACY_WINDOW = LIVE_TTL_MS / 1000 + 5


class LevelReader:
    """The farm's total of a few keys (the level's: the farm thread reads it
    four times a second), in one round trip of three plain reads whatever
    the number of hosts: the sums that every publication keeps for the
    watched keys (:data:`WATCH_SCRIPT`, run at the first reading and every
    :data:`WATCH_AGAIN` seconds after, so that a key stays watched), this
    host's own published fields (:meth:`FarmLive.own`: what it put in the
    sums, so that the caller can put its count of this instant in place of
    it) and its last roll.  Not thread-safe.

    A farm being upgraded host by host: hosts of an older version publish
    their hash whole, not into the sums.  When more hosts published in the
    last :data:`LEGACY_WINDOW` seconds (``{prefix}~hosts``) than the alive
    set holds, the reading adds the keys of those not in it, host by host
    (their hashes expire 5 s after their last publication): the level
    counts every host while the farm is mixed, at the old cost."""

    def __init__(self, client: Any, host: str, keys: Sequence[tuple[str, str]], *,
                 prefix: str = "track", clock: Any = None) -> None:
        import time

        self.client, self.host, self.prefix, self.keys = client, host, prefix, tuple(keys)
        self.clock = clock or time.monotonic
        self._fields = [f"{a}\0{e}" for a, e in self.keys]
        self._sums = [f"{w}\0{f}" for f in self._fields for w in ("minute", "60s")]
        self._watched: float | None = None

    def read(self, now: float) -> FarmLive:
        """The farm's total of the keys, and this host's row, at ``now``
        (this host's clock).  A key that Redis no longer watches (a Redis
        restarted empty, a failover to a replica that lacked it) is watched
        again at once."""
        if self._watched is None or self.clock() - self._watched > WATCH_AGAIN:
            self._watch()
        sums, own, rolled, watched, recent, alive = self._read(now)
        if None in watched:
            self._watch()
            sums, own, rolled, watched, recent, alive = self._read(now)
        total = {key: (int(sums[2 * i] or 0), int(sums[2 * i + 1] or 0))
                 for i, key in enumerate(self.keys)}
        if recent > alive:
            for key, (m, s) in self._legacy(now).items():
                total[key] = (total[key][0] + m, total[key][1] + s)
        total = {key: counts for key, counts in total.items() if any(counts)}
        row = HostLive(self.host, alive=own[0] is not None,
                       last_roll=None if rolled is None else float(rolled))
        for k, v in zip(["~at", "~level", *self._fields], own):
            if v is not None:
                row.take(k, _text(v))
        return FarmLive(total, [row], None)

    def _watch(self) -> None:
        self.client.eval(WATCH_SCRIPT, 3, *_live_keys(self.prefix), self.prefix,
                         WATCH_FOR, *self._fields)
        self._watched = self.clock()

    def _read(self, now: float) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(f"{self.prefix}~live~sum", self._sums)
        pipe.hmget(f"{self.prefix}~live:{self.host}", ["~at", "~level", *self._fields])
        pipe.hget(f"{self.prefix}~host:{self.host}", "last_roll_at")
        pipe.zcount(f"{self.prefix}~hosts", now - LEGACY_WINDOW, "+inf")
        pipe.zcard(f"{self.prefix}~live~alive")
        for f in self._fields:
            pipe.zscore(f"{self.prefix}~live~watch", f)
        sums, own, rolled, recent, alive, *watched = pipe.execute()
        return [sums, own, rolled, watched, recent, alive]

    def _legacy(self, now: float) -> LiveCounts:
        """The keys of the hosts that published lately and are not in the
        alive set (an older version's: not in the sums), summed."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrangebyscore(f"{self.prefix}~hosts", now - LEGACY_WINDOW, "+inf")
        pipe.zrange(f"{self.prefix}~live~alive", 0, -1)
        recent, alive = pipe.execute()
        others = [_text(h) for h in set(recent) - set(alive)]
        pipe = self.client.pipeline(transaction=False)
        for host in others:
            pipe.hmget(f"{self.prefix}~live:{host}", ["~at", *self._fields])
        total: dict[tuple[str, str], tuple[int, int]] = {}
        for host, values in zip(others, pipe.execute()):
            if values[0] is None:
                continue  # gone, or withdrawn
            row = HostLive(host, alive=True)
            for k, v in zip(self._fields, values[1:]):
                if v is not None:
                    row.take(k, _text(v))
            for key, (m, s) in row.counts.items():
                before = total.get(key, (0, 0))
                total[key] = (before[0] + m, before[1] + s)
        return total


def farm_level(client: Any, host: str, *, now: float, prefix: str = "track",
               keys: Sequence[tuple[str, str]]) -> FarmLive:
    """One :meth:`LevelReader.read` (the keys watched first)."""
    return LevelReader(client, host, keys, prefix=prefix).read(now)


def farm_live(client: Any, *, now: float, prefix: str = "track",
              only: Sequence[tuple[str, str]] | None = None) -> FarmLive:
    """The farm's live numbers, host by host: the sum over the hosts that
    are alive (the reaper runs first: a host past its deadline is gone),
    and a row per host seen lately.  A host whose hash is gone keeps its
    last publication time (``at``, from ``{prefix}~hosts``) and its last
    roll (``last_roll``, from the store's ``{prefix}~host:{host}``), so a
    dead host says since when.  ``only``: read just these keys of each host
    (HMGET, not HGETALL: the farm rules' leader, once a second).  One read
    per host: the views and the leader; the level reads
    :func:`farm_level`."""
    seen = client.zrangebyscore(f"{prefix}~hosts", now - FORGET_AFTER, "+inf", withscores=True)
    names = [_text(h) for h, _ in seen]
    pipe = client.pipeline(transaction=False)
    # The reaper first (a reader allowed to write only; the deadlines
    # below decide without it).
    pipe.eval(REAP_SCRIPT, 3, *_live_keys(prefix), prefix)
    pipe.zrange(f"{prefix}~live~alive", 0, -1, withscores=True)
    fields = None if only is None else [
        "~level", "~at", "~last_roll", "~redis_at", *(f"{a}\0{e}" for a, e in only)]
    for host in names:
        if fields is None:
            pipe.hgetall(f"{prefix}~live:{host}")
        else:
            pipe.hmget(f"{prefix}~live:{host}", fields)
        pipe.hget(f"{prefix}~host:{host}", "last_roll_at")
    pipe.get(f"{prefix}~leader")
    pipe.time()
    _reaped, deadlines, *replies, leader, clock = pipe.execute(raise_on_error=False)
    for reply in (deadlines, *replies, leader, clock):
        if isinstance(reply, Exception):
            raise reply
    secs, usecs = clock
    redis_ms = int(secs) * 1000 + int(usecs) // 1000
    # A host in the alive set past its deadline is dead, reaped or not; a
    # hash not in it (an older version's) lives as long as it exists.
    dead = {_text(h) for h, deadline in deadlines if deadline <= redis_ms}
    total: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    hosts = []
    for (host, (_, at)), raw, rolled in zip(zip(names, seen), replies[::2], replies[1::2],
                                            strict=True):
        if fields is not None:  # HMGET: values in field order, None for a missing one
            raw = {} if raw[1] is None else {f: v for f, v in zip(fields, raw) if v is not None}
        if host in dead:
            raw = {}  # as if reaped
        row = HostLive(host, alive=bool(raw), at=float(at),
                       last_roll=None if rolled is None else float(rolled))
        for k, v in raw.items():
            got = row.take(_text(k), _text(v))
            if got is not None:
                key, minute, sliding = got
                total[key][0] += minute
                total[key][1] += sliding
        row.done()
        hosts.append(row)
    return FarmLive({k: (m, s) for k, (m, s) in total.items()}, hosts,
                    None if leader is None else _text(leader).split(" ")[0],
                    redis_now=int(secs) + int(usecs) / 1e6)
