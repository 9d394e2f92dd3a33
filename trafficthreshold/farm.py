"""What the hosts of a farm share in Redis besides the periods: their live
counts, and one leader for the farm's alerts.

The supervisor publishes and reads the live counts through
:mod:`trafficthreshold.farmsync` (docs/redis.rst).

Live counts
-----------
Each supervisor publishes its host's live numbers every second
(:class:`LivePublisher`), as *absolute* values (a publication sent twice
changes nothing), in one EVALSHA whose script does not parse them: the
fields whose value changed since its last acknowledged publication, packed
into one blob (:func:`pack`) appended to the farm's live log, or, at least
every :data:`FULL_EVERY` seconds, the host's whole state kept as its
snapshot.  Each publication is stamped with a sequence number: a diff
applies only on the state holding the number it was computed from (else
the host sends its state whole).  Redis keeps, for the few keys that are
watched (the level's), their sums over the live hosts from the values each
publication carries as arguments, so that the level's farm total is one
read whatever the number of hosts (:class:`LevelReader`); a host whose
deadline (Redis ``TIME``) passed is reaped by the next script on the farm:
its share subtracted, its state deleted, within seconds::

    {prefix}~live~log      stream (30 s, LOG_KEEP_MS, trimmed by each
                           publication), entries:
        h host, k "d" (a diff: s its sequence number, b the one it
        follows, m "{level} {at} {redis_at} {last_roll}", d the blob),
        "f" (a full publication: its snapshot is in the host's state),
        "x" (the host was reaped or withdrawn)
    {prefix}~live~st:{host}  hash: nonce, n (the last applied sequence
                           number), meta, snap (the last full blob),
                           snapid (its log entry), snapseq, snapmeta
    {prefix}~live~w:{host}   hash: the host's values of the watched keys
    {prefix}~live~stop:{host}  the nonce of the publisher that withdrew
    {prefix}~live~alive    sorted set: host -> its deadline (Redis ms)
    {prefix}~live~watch    sorted set: "{account}\0{event}" -> when last read
    {prefix}~live~wgen     the watch set's generation
    {prefix}~live~sum      hash: "minute\0{f}", "60s\0{f}" -> the live
                           hosts' sum, "n\0{f}" -> how many sent it
    {prefix}~hosts         sorted set: host -> when it last published

A blob line is ``"{account}\0{event}\t{minute} {60 s}"``, then, when the
minute before holds hits, ``" {its count}"`` (the closed minute's final
count, for the farm's alert rules); a field gone has an empty value.

:func:`farm_live` reads the farm through a :class:`LiveReader` kept per
client (the views, and the farm rules' leader once a second): the log
entries since its last reading, a host's snapshot when needed; it lists
every host seen in the last :data:`FORGET_AFTER` seconds, alive or not.
0.1's hash per host (``{prefix}~live:{host}``) is read for the hosts of
that version during a rolling upgrade.

The leader lease
----------------
Farm-wide alert rules are evaluated by one supervisor at a time: the holder
of the lease ``{prefix}~leader`` (``SET NX PX``), renewed every second.  Each
new lease gets a fencing token from ``{prefix}~leader:token`` (``INCR``); the
lease's value is ``"{host} {token}"``.  The token key expires
:data:`TOKEN_KEEP_MS` after the last take or renewal (one key per bus
endpoint ever configured does not stay for ever); a token taken without it
(expired, or lost by Redis) starts from Redis' clock in milliseconds, above
every token handed out before, so that a holder paused past both its lease
and the key's expiry never finds its value ("host token") reissued.  Every write of farm alert state
(:mod:`trafficthreshold.alerts.farm`) is a script that applies it only while
the lease still holds that exact value, so a leader that was paused past its
lease (and replaced) can no longer write or send.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

#: A host drops out of the farm's live numbers this long after its last
#: publication (by Redis' clock): its state is removed, its share of the
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
#: A host's clock this far (seconds) from the reader's is taken into
#: account when comparing minutes (alerts.farm.farm_count); smaller skews
#: are below what one reading a second can measure.
SKEW_IGNORED = 5.0
#: ``status`` shows a host's clock this far (seconds) from Redis' TIME.
SKEW_SHOWN = 2.0
#: The leader's lease by default (``[store] lease_ttl``): another host takes
#: over at most this long after the leader stops renewing (every second).
LEASE_TTL_MS = 10_000
#: A lease's token key expires this long (ms) after the last take or
#: renewal of the lease (at least ten TTLs).  While it lives, tokens are
#: consecutive (subscribe.BusLeases counts at once after the lease whose
#: token is one less); taken without it, a token is Redis' TIME in ms: above
#: every earlier token unless Redis' clock stepped back by more than this
#: (or more than a thousand leases a second were taken on average).
TOKEN_KEEP_MS = 86_400_000

LiveCounts = dict[tuple[str, str], tuple[int, int]]

#: A host sends its whole state (a *full* publication, its snapshot) at
#: least this often (seconds), and sooner when the diffs sent since its
#: last full one weigh more than a full one: a reader that starts (or fell
#: behind the log) rebuilds a host from its snapshot plus the diffs after
#: it, which the log keeps (:data:`LOG_KEEP_MS`).
FULL_EVERY = 10.0
#: The keys every publisher watches from its first publication on (the
#: level's, ``farmsync.LEVEL_KEYS``): their sums are complete from the
#: start (a key first watched by a reader is complete after every live
#: host's next publication: :class:`LevelReader`).
ALWAYS_WATCHED = (("all", "pageview"),)
#: The live log keeps this long (ms, Redis' clock) of diffs: more than
#: :data:`FULL_EVERY` (a snapshot's diffs are all still there) plus a
#: reader's refresh.
LOG_KEEP_MS = 30_000

# The live channel's scripts share this prelude.  KEYS[1] the alive set
# ({prefix}~live~alive: host -> the Redis time, ms, after which it is
# dead), KEYS[2] the watch set ({prefix}~live~watch: "{account}\0{event}"
# -> when a reader last asked for it), KEYS[3] the watched keys' sums
# ({prefix}~live~sum: "minute\0{f}", "60s\0{f}" -> the sum over the hosts
# in the alive set of their current minute / last 60 s, "n\0{f}" -> how
# many of them sent their value of f), KEYS[4] the watch generation
# ({prefix}~live~wgen: INCR at every change of the watch set), KEYS[5] the
# live log ({prefix}~live~log: a stream).  ARGV[1] the prefix.  The
# invariant every script keeps: for each watched key f, its sums are the
# sums of f over the watched-values hash ({prefix}~live~w:{host}) of every
# host in the alive set.  reap() removes the hosts past their deadline:
# their watched values subtracted, their state and watched values deleted,
# a "gone" entry in the log.  Host keys are named here from the prefix
# (not declared in KEYS): one Redis, not a cluster (docs/redis.rst, "Past
# one Redis").  No script parses a host's counts: they travel as one
# opaque value (the blob) per publication.
LIVE_LUA = """
local function parse(v)
  if not v then return 0, 0 end
  local m, s = string.match(v, '^(%d+) (%d+)')
  return tonumber(m) or 0, tonumber(s) or 0
end
local function add(field, dm, ds, dn)
  for _, p in ipairs({{'minute', dm}, {'60s', ds}, {'n', dn}}) do
    if p[2] ~= 0 and redis.call('HINCRBY', KEYS[3], p[1] .. '\\0' .. field, p[2]) == 0 then
      redis.call('HDEL', KEYS[3], p[1] .. '\\0' .. field)
    end
  end
end
local function drop_watched(w)
  local old = redis.call('HGETALL', w)
  for i = 1, #old, 2 do
    local m, s = parse(old[i + 1])
    add(old[i], -m, -s, -1)
  end
  redis.call('UNLINK', w)
end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function log(fields)
  return redis.call('XADD', KEYS[5], 'MINID', '~', ms - LOG_KEEP_MS, '*', unpack(fields))
end
local function reap()
  for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms)) do
    drop_watched(ARGV[1] .. '~live~w:' .. h)
    redis.call('UNLINK', ARGV[1] .. '~live~st:' .. h)
    redis.call('ZREM', KEYS[1], h)
    log({'h', h, 'k', 'x'})
  end
end
"""

# One publication: one EVALSHA.  KEYS: the prelude's five, {prefix}~hosts,
# the host's state {prefix}~live~st:{host} (nonce, n: the last applied
# publication's; ~level, ~at, ~last_roll, ~redis_at; snap: its last full
# blob, snapid: that full's log entry), its watched values
# {prefix}~live~w:{host}, its stop mark {prefix}~live~stop:{host}.  ARGV:
# prefix, host, "full", "snap" or "diff", the publisher's nonce, this attempt's
# number n, the number the state must hold for a diff, ttl ms, keep ms,
# the host's clock, the ~hosts cut-off, level, last roll, the blob, the
# diff of a "snap" (else ""), then pairs: a watched key, the host's
# "{minute} {60 s}" of it (every key of the watch set as the host knows
# it).  "snap" is a full publication computed against the host's last
# acknowledged one: kept as its snapshot, its diff in the log when the
# state holds that one (readers in step read no snapshot), else as a full.
#
# Refused (nothing written; returns {0, generation}): any publication of a
# publisher whose host was withdrawn since (the stop mark holds its
# nonce: sent before a stop, run after it); a diff on a state that does
# not hold the number it was computed from (a lost reply that ran, a host
# reaped after a pause, a Redis that lost writes, a diff that timed out
# and runs after the host's next publication; the host then sends a full
# one); a full publication older than the state (same publisher, a lower
# number: it timed out and runs late).  Applied: the blob appended to the
# log (a full one kept as the host's snapshot instead, the log getting a
# marker), the host's watched values replaced (the sums follow), its
# deadline set; returns {1, generation}: the watch generation, so that the
# host reads the watch set again when it changed.
PUBLISH_SCRIPT = LIVE_LUA + """
reap()
local S, W = KEYS[7], KEYS[8]
local gen = tonumber(redis.call('GET', KEYS[4]) or '0')
if redis.call('GET', KEYS[9]) == ARGV[4] then return {0, gen} end
local nonce, n = unpack(redis.call('HMGET', S, 'nonce', 'n'))
if ARGV[3] == 'diff' then
  if not (redis.call('ZSCORE', KEYS[1], ARGV[2]) and nonce == ARGV[4] and n == ARGV[6]) then
    return {0, gen}
  end
elseif nonce == ARGV[4] and tonumber(n) >= tonumber(ARGV[5]) then
  return {0, gen}
end
local stamp = t[1] .. '.' .. string.format('%06d', t[2])
local meta = ARGV[11] .. ' ' .. ARGV[9] .. ' ' .. stamp .. ' ' .. ARGV[12]
if ARGV[3] == 'diff' then
  log({'h', ARGV[2], 'k', 'd', 's', ARGV[4] .. ':' .. ARGV[5], 'b', ARGV[4] .. ':' .. ARGV[6],
       'm', meta, 'd', ARGV[13]})
  redis.call('HSET', S, 'nonce', ARGV[4], 'n', ARGV[5], 'meta', meta)
else
  redis.call('UNLINK', ARGV[1] .. '~live:' .. ARGV[2])  -- its 0.1 hash, if upgraded now
  local id
  if ARGV[3] == 'snap' and nonce == ARGV[4] and n == ARGV[6] then
    -- A periodic snapshot on the state it follows: the log gets its diff
    -- (a reader in step reads no snapshot), the state the whole blob.
    id = log({'h', ARGV[2], 'k', 'd', 's', ARGV[4] .. ':' .. ARGV[5],
              'b', ARGV[4] .. ':' .. ARGV[6], 'm', meta, 'd', ARGV[14]})
  else
    id = log({'h', ARGV[2], 'k', 'f', 's', ARGV[4] .. ':' .. ARGV[5], 'm', meta})
  end
  redis.call('HSET', S, 'nonce', ARGV[4], 'n', ARGV[5], 'meta', meta, 'snap', ARGV[13],
             'snapid', id, 'snapseq', ARGV[4] .. ':' .. ARGV[5], 'snapmeta', meta)
end
-- The host's watched values replaced: only the sums of those that
-- changed move (a host not in the alive set has none: reaped or new).
local old, gone = {}, {}
local flat = redis.call('HGETALL', W)
for i = 1, #flat, 2 do old[flat[i]] = flat[i + 1]; gone[flat[i]] = true end
local set = {}
for i = 15, #ARGV, 2 do
  local f, v = ARGV[i], ARGV[i + 1]
  if old[f] then
    gone[f] = nil
    if old[f] ~= v then
      local m, s = parse(v)
      local om, os = parse(old[f])
      add(f, m - om, s - os, 0)
      set[#set + 1] = f; set[#set + 1] = v
    end
  elseif redis.call('ZSCORE', KEYS[2], f) then
    local m, s = parse(v)
    add(f, m, s, 1)
    set[#set + 1] = f; set[#set + 1] = v
  end
end
for f in pairs(gone) do
  local m, s = parse(old[f])
  add(f, -m, -s, -1)
  redis.call('HDEL', W, f)
end
if #set > 0 then redis.call('HSET', W, unpack(set)) end
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[7]), ARGV[2])
if ARGV[3] ~= 'diff' then  -- at least every FULL_EVERY seconds: enough for an hour's keep
  for _, k in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], S, W}) do
    redis.call('PEXPIRE', k, ARGV[8])
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', '(' .. ARGV[10])
end
redis.call('ZADD', KEYS[6], ARGV[9], ARGV[2])
return {1, gen}
"""

# KEYS: the prelude's five, then the host's stop mark, its hash of the
# older version (0.1: {prefix}~live:{host}).  ARGV: prefix, host, the
# withdrawing publisher's nonce (or ""), keep ms.  The host leaves the
# farm's live numbers now (a stop): its deadline set to 0, then reaped;
# its older version's hash deleted.  The nonce is kept as the stop mark: a
# publication of that publisher still on its way is refused instead of
# bringing the host back; the publisher takes a new nonce.
WITHDRAW_SCRIPT = LIVE_LUA + """
if ARGV[3] ~= '' then redis.call('SET', KEYS[6], ARGV[3], 'PX', ARGV[4]) end
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then redis.call('ZADD', KEYS[1], 0, ARGV[2]) end
redis.call('UNLINK', KEYS[7])
reap()
return 1
"""

# KEYS: the prelude's five.  ARGV: prefix.  The reaper alone (the readers
# run it first).
REAP_SCRIPT = LIVE_LUA + """
reap()
return 1
"""

# KEYS: the prelude's five.  ARGV: prefix, WATCH_FOR, then the fields.
# Each field asked for is watched (every host sends its value with each
# publication from its next one on, the watch generation telling it);
# fields not asked for in WATCH_FOR seconds leave the watch set, the sums
# and the hosts' watched values.  Returns the watch set.
WATCH_SCRIPT = LIVE_LUA + """
reap()
local changed = 0
for _, f in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf',
                              '(' .. (tonumber(t[1]) - tonumber(ARGV[2])))) do
  redis.call('HDEL', KEYS[3], 'minute\\0' .. f, '60s\\0' .. f, 'n\\0' .. f)
  redis.call('ZREM', KEYS[2], f)
  for _, h in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    redis.call('HDEL', ARGV[1] .. '~live~w:' .. h, f)
  end
  changed = changed + 1
end
local new = 0
for i = 3, #ARGV do
  if redis.call('ZADD', KEYS[2], t[1], ARGV[i]) == 1 then new = new + 1 end
end
if changed + new > 0 then redis.call('INCR', KEYS[4]) end
return redis.call('ZRANGE', KEYS[2], 0, -1)
"""

for _name in ("PUBLISH_SCRIPT", "WITHDRAW_SCRIPT", "REAP_SCRIPT", "WATCH_SCRIPT"):
    globals()[_name] = globals()[_name].replace("LOG_KEEP_MS", str(LOG_KEEP_MS))


def _live_keys(prefix: str) -> list[str]:
    return [f"{prefix}~live~alive", f"{prefix}~live~watch", f"{prefix}~live~sum",
            f"{prefix}~live~wgen", f"{prefix}~live~log"]


def live_fields(counts: LiveCounts, previous: dict[tuple[str, str], int] | None = None
                ) -> dict[str, str]:
    """A host's live fields: ``"{account}\\0{event}"`` -> ``"{minute}
    {60 s}"``, then ``" {minute before}"`` when that minute held hits."""
    previous = previous or {}
    fields: dict[str, str] = {}
    for name in counts.keys() | previous.keys():
        m, s = counts.get(name, (0, 0))
        p = previous.get(name, 0)
        fields[f"{name[0]}\0{name[1]}"] = f"{m} {s} {p}" if p else f"{m} {s}"
    return fields


def pack(fields: dict[str, str], gone: Sequence[str] = ()) -> str:
    """The blob of a publication: one line per field, ``"{account}\\0{event}
    \\t{value}"``, a gone field with an empty value.  Names refuse control
    characters (:mod:`trafficthreshold.names`), so ``\\0``, ``\\t`` and
    ``\\n`` never occur in them."""
    ok = [k for k in fields if "\t" not in k and "\n" not in k]  # never: but never a line of
    return "\n".join([*(f"{k}\t{fields[k]}" for k in ok),   # another key either
                      *(f"{k}\t" for k in gone if "\t" not in k and "\n" not in k)])


#: Up to this many keys, :func:`unpack_blob` searches the blob for each;
#: beyond, it splits every line (one pass, however many keys).
FIND_KEYS_MAX = 8


def unpack_blob(blob: str, keys: "frozenset[str] | None" = None) -> list[tuple[str, str]]:
    """:func:`pack`'s lines back: (field, value), value "" for a gone one;
    ``keys``: the lines of those fields only (one search each in the blob,
    not a split of every line: a reader of a few keys parses a 100,000-line
    second of a large farm in microseconds)."""
    if not blob:
        return []
    if keys is None:
        return [tuple(line.split("\t", 1)) for line in blob.split("\n")]  # type: ignore[misc]
    if len(keys) > FIND_KEYS_MAX:  # one search a key would read the blob that many times
        return [(f, v) for f, v in unpack_blob(blob) if f in keys]
    found = []
    for f in keys:
        # A line starts the blob or follows a newline, and its field ends
        # at the tab: no field is a part of another's line (names hold
        # neither separator, pack()).
        if blob.startswith(f + "\t"):
            at = 0
        else:
            at = blob.find("\n" + f + "\t") + 1
            if not at:
                continue
        start = at + len(f) + 1
        end = blob.find("\n", start)
        found.append((f, blob[start:] if end < 0 else blob[start:end]))
    return found


@dataclass
class Publication:
    """One host's live numbers ready to send (:meth:`LivePublisher.prepare`)."""

    now: float
    meta: list[Any]
    fields: dict[str, str]
    #: The fields that differ from ``base`` and those gone (None: no base).
    changed: dict[str, str] | None
    gone: list[str] | None
    #: The acknowledged publication they were computed against.
    base: dict[str, str] | None


class LivePublisher:
    """One host's publication of its live counts (the farm thread's; not
    thread-safe): one EVALSHA a second (:data:`PUBLISH_SCRIPT`).  The first
    publication, one after an error, one more than half the TTL after the
    last acknowledged one, one whose diff was refused, and one at least
    every :data:`FULL_EVERY` seconds (or once the diffs since the last full
    one weigh more than it) are *full* (the host's snapshot replaced); the
    others send only the fields whose value changed and the fields gone (a
    *diff*, appended to the live log), stamped with a sequence number: a
    diff applies only on the state holding the number it was computed from,
    so it is never applied on top of a state it was not computed from.
    Absolute values throughout: a publication sent twice changes nothing.
    Each publication also carries the absolute values of the watched keys
    (the level's: Redis keeps their sums)."""

    def __init__(self, client: Any, host: str, *, prefix: str = "track",
                 ttl_ms: int = LIVE_TTL_MS, forget_after: float = FORGET_HOSTS_AFTER,
                 clock: Any = None, watch: Sequence[tuple[str, str]] = ALWAYS_WATCHED) -> None:
        import secrets
        import time

        self.client, self.host, self.prefix = client, host, prefix
        self.ttl_ms, self.forget_after = ttl_ms, forget_after
        #: Keys this host watches itself before its first publication (the
        #: level's: every host sends them from its first one on, so their
        #: sums are never short).
        self.declared = [f"{a}\0{e}" for a, e in watch]
        self.clock = clock or time.monotonic
        self._script = client.register_script(PUBLISH_SCRIPT)
        self._keys = [*_live_keys(prefix), f"{prefix}~hosts", f"{prefix}~live~st:{host}",
                      f"{prefix}~live~w:{host}", f"{prefix}~live~stop:{host}"]
        #: The fields of the last acknowledged publication and when it was
        #: acknowledged (``clock``); None: the next one is full.  ``_n``:
        #: the number the last attempt stamped (the state holds it when
        #: that attempt was acknowledged).
        self._sent: dict[str, str] | None = None
        self._nonce, self._n, self._acked = secrets.token_hex(4), 0, 0.0
        #: The last full publication (``clock``), its size, and the bytes
        #: of the diffs sent since.
        self._full_at, self._full_bytes, self._diff_bytes = 0.0, 0, 0
        #: The watch set as this host knows it, and its generation.
        self._watch: list[str] = []
        self._gen: int | None = None
        #: How many publications were full (the first, resyncs, snapshots).
        self.full = 0

    def publish(self, counts: LiveCounts, *, level: int, now: float,
                last_roll: float | None = None,
                previous: dict[tuple[str, str], int] | None = None) -> None:
        """Publish this second's live numbers (see the class docstring);
        raises on a Redis error (and the next publication is full: this
        one may have run)."""
        self.send(self.prepare(counts, level=level, now=now, last_roll=last_roll,
                               previous=previous))

    def prepare(self, counts: LiveCounts, *, level: int, now: float,
                last_roll: float | None = None,
                previous: dict[tuple[str, str], int] | None = None) -> "Publication":
        """The publication of these numbers, its diff computed against the
        last acknowledged one (no Redis yet: :meth:`send` sends it)."""
        fields = live_fields(counts, previous)
        meta = [level, repr(float(now)), "" if last_roll is None else repr(float(last_roll))]
        sent, changed, gone = self._sent, None, None
        if sent is not None:
            changed = {f: v for f, v in fields.items() if sent.get(f) != v}
            gone = [f for f in sent if f not in fields]
        return Publication(now, meta, fields, changed, gone, sent)

    def send(self, pub: "Publication") -> None:
        """Send a publication made by :meth:`prepare`: its diff if it was
        computed against the last acknowledged one, less than half the TTL
        ago (a host paused near its TTL may have been reaped), and the
        snapshot is recent and outweighs the diffs since; else whole."""
        sent, self._sent = self._sent, None  # until acknowledged
        clock = self.clock()
        diff = ""
        if sent is not None and pub.base is sent and pub.changed is not None \
                and clock - self._acked < self.ttl_ms / 2000:
            diff = pack(pub.changed, pub.gone or [])
            if clock - self._full_at < FULL_EVERY and self._diff_bytes < self._full_bytes:
                if self._run("diff", pub, diff):
                    self._sent, self._acked = pub.fields, self.clock()
                    self._diff_bytes += len(diff)
                    return
                diff = ""  # refused: a full one, not on that state
        blob = pack(pub.fields)
        self._run("snap" if diff else "full", pub, blob, diff)
        self._sent, self._acked = pub.fields, self.clock()
        self._full_at, self._full_bytes, self._diff_bytes = self._acked, len(blob), 0
        self.full += 1

    def _run(self, mode: str, pub: "Publication", blob: str, diff: str = "") -> bool:
        # Every attempt stamps a number never used before, acknowledged or
        # not: a publication that runs late (its reply timed out, the next
        # one ran first) never holds the number the next diff expects.
        base, self._n = self._n, self._n + 1
        if mode != "diff":  # the first, or after an error: the script may be gone
            self.client.script_load(self._script.script)
        if mode != "diff":
            # The first, or unsure (a Redis that lost its keys: the watch
            # set too): our keys watched, the watch set read (one call).
            self._watch = sorted(_text(f) for f in self.client.eval(
                WATCH_SCRIPT, 5, *_live_keys(self.prefix), self.prefix, WATCH_FOR,
                *self.declared))
        watched: list[str] = []
        for f in self._watch:
            m, s, *_ = pub.fields.get(f, "0 0").split(" ")
            watched += [f, f"{m} {s}"]
        keys = self._keys
        # EVALSHA, not redis-py's Script (a SCRIPT LOAD and a retry on
        # NOSCRIPT): a NOSCRIPT raises, and the next publication is full.
        ok, gen = self.client.evalsha(
            self._script.sha, len(keys), *keys, self.prefix, self.host, mode, self._nonce,
            self._n, base, self.ttl_ms, LIVE_KEEP_MS, pub.meta[1],
            repr(float(pub.now) - self.forget_after), pub.meta[0], pub.meta[2], blob, diff,
            *watched)
        if gen != self._gen:  # the watch set changed: send its keys from the next one on
            self._watch = sorted(_text(f) for f in self.client.zrange(keys[1], 0, -1))
            self._gen = gen
        return bool(ok)

    def withdraw(self) -> None:
        """Leave the farm's live numbers now (a stop); the next publication
        is full."""
        import secrets

        # A publication of ours still on its way is refused (the stop mark
        # holds our old nonce); the next ones stamp a new one, taken before
        # the withdrawal runs: one whose reply is lost (it raises) has run
        # all the same, and the mark must not refuse our next ones.
        nonce, self._sent = self._nonce, None
        self._nonce, self._n = secrets.token_hex(4), 0
        withdraw_live(self.client, self.host, prefix=self.prefix, nonce=nonce)


def withdraw_live(client: Any, host: str, *, prefix: str = "track", nonce: str = "") -> None:
    """``host`` leaves the farm's live numbers at once: its state deleted
    and its share of the watched sums subtracted, in one script; the
    publications of the publisher ``nonce`` still on their way are
    refused (WITHDRAW_SCRIPT)."""
    client.eval(WITHDRAW_SCRIPT, 7, *_live_keys(prefix), f"{prefix}~live~stop:{host}",
                f"{prefix}~live:{host}", prefix, host, nonce, LIVE_KEEP_MS)


def publish_live(client: Any, host: str, counts: LiveCounts, *, level: int, now: float,
                 last_roll: float | None = None, prefix: str = "track",
                 ttl_ms: int = LIVE_TTL_MS, previous: dict[tuple[str, str], int] | None = None,
                 forget_after: float = FORGET_HOSTS_AFTER) -> None:
    """Replace this host's live numbers whole (a full publication of a
    :class:`LivePublisher`, which the farm thread uses to send only what
    changed), stamped with Redis' clock too (``~redis_at``, Redis ``TIME``
    in the same script), so that a reader knows this host's clock skew.
    ``previous``: per key, the count of the minute before ``now``'s
    (closed, so final).  Hosts not heard from for ``forget_after`` seconds
    leave ``{prefix}~hosts`` in the same script (it never grows for
    ever)."""
    LivePublisher(client, host, prefix=prefix, ttl_ms=ttl_ms, forget_after=forget_after
                  ).publish(counts, level=level, now=now, last_roll=last_roll,
                            previous=previous)


@dataclass
class HostLive:
    host: str
    alive: bool
    level: int = 0
    at: float | None = None
    last_roll: float | None = None
    counts: LiveCounts = field(default_factory=dict)
    #: Per key, the final count of the minute before ``at``'s minute.
    previous: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Its clock minus the farm's (Redis TIME), seconds; None: unknown.
    skew: float | None = None
    #: ``~redis_at`` as read (:meth:`take`), until :meth:`done`.
    _redis_at: float | None = field(default=None, repr=False, compare=False)

    def minute_now(self, live: "FarmLive", now: float) -> int:
        """The minute this host's clock shows at the reader's ``now``: its
        skew from the farm's clock (Redis ``TIME``) less the reader's own
        (``now - live.redis_now``), when the two differ by
        :data:`SKEW_IGNORED` seconds or more; else ``now``'s minute (one
        clock: both skews are measured a reading apart, up to a second)."""
        if self.skew is None or live.redis_now is None:
            return int(now // 60)
        relative = self.skew - (now - live.redis_now)
        if abs(relative) < SKEW_IGNORED:
            return int(now // 60)
        return int((now + relative) // 60)

    def take(self, k: str, v: str) -> tuple[tuple[str, str], int, int] | None:
        """Read one field of its live state into this row; a count field
        gives (key, minute, 60 s) when live (else None)."""
        if k == "~level":
            self.level = int(v)
        elif k == "~at":
            self.at = float(v)
        elif k == "~last_roll" and v and self.last_roll is None:
            self.last_roll = float(v)
        elif k == "~redis_at" and v:
            self._redis_at = float(v)
        elif "\0" in k:
            account, event = k.split("\0", 1)
            minute, sliding, *before = (int(x) for x in v.split())
            if before and before[0]:
                self.previous[account, event] = before[0]
            if minute or sliding:  # else only the minute before: not live any more
                self.counts[account, event] = (minute, sliding)
                return (account, event), minute, sliding
        return None

    def done(self) -> None:
        """After its fields: ``skew`` from ``~redis_at`` and ``~at``."""
        if self._redis_at is not None and self.at is not None:
            self.skew = self.at - self._redis_at


@dataclass
class FarmLive:
    total: LiveCounts
    hosts: list[HostLive]
    leader: str | None
    #: Redis' clock (``TIME``) when it was read: the farm's one clock.
    redis_now: float | None = None

    def count(self, account: str, event: str, window: str) -> int:
        """The farm's count of a key: ``window`` "minute" or "60s"."""
        minute, sliding = self.total.get((account, event), (0, 0))
        return minute if window == "minute" else sliding

    def own(self, host: str, key: tuple[str, str], window: str) -> int:
        """What ``host`` published for ``key`` (included in ``total``)."""
        index = 0 if window == "minute" else 1
        return sum(row.counts.get(key, (0, 0))[index] for row in self.hosts
                   if row.alive and row.host == host)



def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _stale(seq: str, held: str) -> bool:
    """Whether publication ``seq`` ("{nonce}:{n}") is one its publisher
    sent before (or is) the one ``held`` (every attempt stamps a higher n;
    another nonce, another publisher: not comparable, not stale)."""
    nonce, _, n = seq.partition(":")
    held_nonce, _, held_n = held.partition(":")
    return nonce == held_nonce and n.isdigit() and held_n.isdigit() and int(n) <= int(held_n)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


@dataclass
class _HostState:
    """One host as a :class:`LiveReader` rebuilt it: its fields, the
    sequence number of its last applied publication and that entry's id."""

    seq: str
    through: tuple[int, int]
    meta: str
    fields: dict[str, str] = field(default_factory=dict)


class LiveReader:
    """The farm's live numbers host by host, kept in memory and brought up
    to date from the live log: each :meth:`read` reads the log entries after
    the last one it read (its cost grows with what changed, not with hosts x
    keys), the snapshot of a host only when that host sent a full
    publication (or when the reader starts, or fell more than
    :data:`LOG_KEEP_MS` behind the log: then every live host's snapshot).
    Used by :func:`farm_live` (the views, ``status``, the farm rules'
    leader), one per client and key set.  ``keys``: the only keys it keeps
    of each host (the farm rules' leader, the dashboard's panel: hosts x a
    few keys in memory, not hosts x keys); None: every key.  Thread-safe (a
    lock: the API's threads share it)."""

    def __init__(self, client: Any, *, prefix: str = "track",
                 keys: Sequence[tuple[str, str]] | None = None, clock: Any = None) -> None:
        import threading
        import time

        self.client, self.prefix = client, prefix
        self.keys = None if keys is None else frozenset(f"{a}\0{e}" for a, e in keys)
        self.clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._last: str | None = None  # the last log entry read
        self._read_at = 0.0  # when (clock) it was read
        self._hosts: dict[str, _HostState] = {}
        #: Snapshots read (host by host) and log entries read, for the
        #: benchmark and the tests.
        self.snapshots = self.entries = 0

    def read(self, now: float, only: Sequence[tuple[str, str]] | None = None) -> "FarmLive":
        with self._lock:
            return self._read(now, only)

    def let_go_if_idle(self) -> None:
        """Let go of the farm held (hosts x keys for a reader of every key)
        when not read for longer than the log keeps: its next reading
        starts over from the snapshots anyway.  Never waits for a reading
        in progress."""
        if self._lock.acquire(blocking=False):
            try:
                if self._idle(self.clock()):
                    self._last, self._hosts = None, {}
            finally:
                self._lock.release()

    def _idle(self, tick: float) -> bool:
        """Not read for longer than the log keeps (``_lock`` held)."""
        return self._last is not None and tick - self._read_at > LOG_KEEP_MS / 1000 - 1

    def _read(self, now: float, only: Sequence[tuple[str, str]] | None) -> "FarmLive":
        p = self.prefix
        tick = self.clock()
        if self._idle(tick):
            # Not read for longer than the log keeps: the log after our
            # last entry may be trimmed, and is 30 s of every host's diffs
            # (one large reply) anyway: start over as a new reader does,
            # from the snapshots and the entries after them.
            self._last, self._hosts = None, {}
        pipe = self.client.pipeline(transaction=False)
        # The reaper first (a reader allowed to write only; the deadlines
        # below decide without it).
        pipe.eval(REAP_SCRIPT, 5, *_live_keys(p), p)
        pipe.zrangebyscore(f"{p}~hosts", now - FORGET_AFTER, "+inf", withscores=True)
        # A reader that starts reads the snapshots first, then the log from
        # the oldest of them (_snapshots), not the whole log.
        pipe.xrange(f"{p}~live~log", "+" if self._last is None else f"({self._last}", "+")
        pipe.zrange(f"{p}~live~alive", 0, -1, withscores=True)
        pipe.get(f"{p}~leader")
        pipe.time()
        _reaped, seen, entries, deadlines, leader, clock = pipe.execute(raise_on_error=False)
        for reply in (seen, entries, deadlines, leader, clock):
            if isinstance(reply, Exception):
                raise reply
        secs, usecs = clock
        redis_ms = int(secs) * 1000 + int(usecs) // 1000
        alive = {_text(h) for h, deadline in deadlines if deadline > redis_ms}
        entries = [] if self._last is None else [
            (_text(i), {_text(k): _text(v) for k, v in e.items()}) for i, e in entries]
        self.entries += len(entries)
        self._read_at = tick
        # Behind the log's trim, or ahead of Redis' clock (a Redis restarted
        # empty, a failover to a replica that lacked the last entries: the
        # new entries' ids may be below ours): every host from its snapshot.
        behind = self._last is None or not \
            redis_ms - LOG_KEEP_MS + 1_000 <= _id_ms(self._last) <= redis_ms + 1_000
        if behind:  # the log may lack entries we need: every host from its snapshot
            self._hosts = {}
        if entries:
            self._last = entries[-1][0]
        elif self._last is None or behind:
            self._last = f"{redis_ms - 1}-0"
        need = self._apply(entries) | (alive - self._hosts.keys())
        if need:
            end = self._snapshots(sorted(need), entries)
            if end is not None and _id_key(end) > _id_key(self._last):
                self._last = end
        for host in list(self._hosts):
            if host not in alive:
                del self._hosts[host]
        names = [_text(h) for h, _ in seen]
        legacy = [h for h in names if h not in alive]
        pipe = self.client.pipeline(transaction=False)
        for host in names:
            pipe.hget(f"{p}~host:{host}", "last_roll_at")
        for host in legacy:  # an older version's host (0.1): its hash whole
            pipe.hgetall(f"{p}~live:{host}")
        replies = pipe.execute()
        rolled = dict(zip(names, replies[:len(names)]))
        old = dict(zip(legacy, replies[len(names):]))
        wanted = None if only is None else {f"{a}\0{e}" for a, e in only}
        total: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        hosts = []
        for host, at in seen:
            host = _text(host)
            got = rolled.get(host)
            row = HostLive(host, alive=False, at=float(at),
                           last_roll=None if got is None else float(got))
            state = self._hosts.get(host)
            if state is not None:
                row.alive = True
                level, at_, redis_at, last_roll = (state.meta.split(" ") + ["", "", "", ""])[:4]
                for k, v in (("~level", level), ("~at", at_), ("~redis_at", redis_at),
                             ("~last_roll", last_roll)):
                    if v:
                        row.take(k, v)
                items: Any = state.fields.items() if wanted is None else (
                    (f, state.fields[f]) for f in wanted if f in state.fields)
            else:
                raw = {_text(k): _text(v) for k, v in (old.get(host) or {}).items()}
                row.alive = bool(raw)
                items = raw.items() if wanted is None else (
                    (k, v) for k, v in raw.items() if k in wanted or k.startswith("~"))
            for k, v in items:
                got = row.take(k, v)
                if got is not None:
                    key, minute, sliding = got
                    total[key][0] += minute
                    total[key][1] += sliding
            row.done()
            hosts.append(row)
        return FarmLive({k: (m, s) for k, (m, s) in total.items()}, hosts,
                        None if leader is None else _text(leader).split(" ")[0],
                        redis_now=int(secs) + int(usecs) / 1e6)

    def _apply(self, entries: list[tuple[str, dict[str, str]]],
               only_host: str | None = None) -> set[str]:
        """Apply the log ``entries`` to the hosts kept; the hosts whose
        snapshot must be read (a full publication, or a diff that does not
        follow the state kept: the reader missed something)."""
        need: set[str] = set()
        for entry_id, e in entries:
            host = e.get("h", "")
            if only_host is not None and host != only_host:
                continue
            state = self._hosts.get(host)
            key = _id_key(entry_id)
            if state is not None and key <= state.through:
                continue
            kind = e.get("k")
            if state is not None and kind in ("d", "f") and _stale(e.get("s", ""), state.seq):
                continue  # this publisher's older one, found again: already in the state
            if kind == "x":  # reaped or withdrawn
                self._hosts.pop(host, None)
                need.discard(host)
            elif kind == "d" and state is not None and state.seq == e.get("b") \
                    and host not in need:
                for f, v in unpack_blob(e.get("d", ""), self.keys):
                    if v:
                        state.fields[f] = v
                    else:
                        state.fields.pop(f, None)
                state.seq, state.through, state.meta = e.get("s", ""), key, e.get("m", "")
            else:
                need.add(host)
        return need

    def _snapshots(self, hosts: list[str], entries: list[tuple[str, dict[str, str]]]
                   ) -> str | None:
        """Rebuild ``hosts`` from their snapshots, then the diffs after
        each (from ``entries``, or the log read again from the oldest
        snapshot when they do not cover it).  A host whose diffs after its
        snapshot are gone (trimmed) is left out until its next full
        publication."""
        pipe = self.client.pipeline(transaction=False)
        for host in hosts:
            pipe.hmget(f"{self.prefix}~live~st:{host}",
                       ["snap", "snapid", "snapseq", "snapmeta"])
        states = {}
        for host, (snap, snapid, seq, meta) in zip(hosts, pipe.execute()):
            self.snapshots += 1
            self._hosts.pop(host, None)
            if snap is None or snapid is None:
                continue  # gone meanwhile
            states[host] = _HostState(_text(seq), _id_key(_text(snapid)), _text(meta),
                                      dict(unpack_blob(_text(snap), self.keys)))
        if not states:
            return None
        first = min(s.through for s in states.values())
        last = max(s.through for s in states.values())
        log = entries
        if not (entries and _id_key(entries[0][0]) <= first
                and _id_key(entries[-1][0]) >= last):
            log = [(_text(i), {_text(k): _text(v) for k, v in e.items()})
                   for i, e in self.client.xrange(f"{self.prefix}~live~log",
                                                  f"{first[0]}-{first[1]}", "+")]
            self.entries += len(log)
        for host, state in states.items():
            self._hosts[host] = state
            if self._apply([x for x in log if _id_key(x[0]) > state.through], host):
                self._hosts.pop(host, None)  # a gap: wait for its next full publication
        if log is entries:
            return None
        # The log read again: the other hosts' entries in it are applied
        # too (a host not kept waits for its snapshot, next reading).
        self._apply([x for x in log if x[1].get("h") not in states])
        return log[-1][0] if log else None


#: A reader asks Redis to keep watching its keys this often (seconds).
WATCH_AGAIN = 600.0
#: A host in ``{prefix}~hosts`` this recently (seconds, by its clock) and
#: not in the alive set is taken for an older version's (LevelReader).
LEGACY_WINDOW = LIVE_TTL_MS / 1000 + 5


class LevelReader:
    """The farm's total of a few keys (the level's: the farm thread reads it
    four times a second), in one round trip of plain reads whatever the
    number of hosts: the sums that every publication keeps for the watched
    keys (:data:`WATCH_SCRIPT`, run at the first reading and every
    :data:`WATCH_AGAIN` seconds after, so that a key stays watched), this
    host's own watched values (:meth:`FarmLive.own`: what it put in the
    sums, so that the caller can put its count of this instant in place of
    it) and its last roll.  Not thread-safe.

    A key newly watched is in the sums of a host from that host's next
    publication on (the script's reply tells it the watch set changed; a
    host's first publication reads the watch set first): Redis cannot sum
    it from the hosts' blobs, so for up to two publications after a key is
    first watched (a farm's first start, a Redis restarted empty) its sum
    lacks the hosts that did not send it yet; ``short`` (after each
    reading) lists such keys (``n\\0{key}``, the hosts that sent it, below
    the alive set's size).

    A farm being upgraded host by host: hosts of the older version (0.1)
    publish their hash whole, not into the sums.  When more hosts published
    in the last :data:`LEGACY_WINDOW` seconds (``{prefix}~hosts``) than the
    alive set holds, the reading adds the keys of those not in it, host by
    host (their hashes expire 5 s after their last publication)."""

    def __init__(self, client: Any, host: str, keys: Sequence[tuple[str, str]], *,
                 prefix: str = "track", clock: Any = None) -> None:
        import time

        self.client, self.host, self.prefix, self.keys = client, host, prefix, tuple(keys)
        self.clock = clock or time.monotonic
        self._fields = [f"{a}\0{e}" for a, e in self.keys]
        self._sums = [f"{w}\0{f}" for f in self._fields for w in ("minute", "60s", "n")]
        self._watched: float | None = None
        self.short: list[tuple[str, str]] = []
        #: When our last roll was read (``clock``), and what it was.
        self._rolled: tuple[float, float | None] = (float("-inf"), None)
        #: The hosts taken for 0.1's (:meth:`_legacy`) and when they were listed.
        self._old: tuple[float, list[str]] = (float("-inf"), [])

    def read(self, now: float) -> FarmLive:
        """The farm's total of the keys, and this host's row, at ``now``
        (this host's clock): four plain reads in one round trip (five once
        a second: our last roll).  A key that no live host sent (a Redis
        restarted empty, a failover to a replica that lacked the watch
        set) is watched again, at most once a second."""
        clock = self.clock()
        if self._watched is None or clock - self._watched > WATCH_AGAIN:
            self._watch()
        p = self.prefix
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(f"{p}~live~sum", self._sums)
        pipe.hmget(f"{p}~live~w:{self.host}", self._fields)
        pipe.zcard(f"{p}~live~alive")
        pipe.zcount(f"{p}~hosts", now - LEGACY_WINDOW, "+inf")
        if clock - self._rolled[0] >= 1.0:
            pipe.hget(f"{p}~host:{self.host}", "last_roll_at")
        sums, own, alive, recent, *rolled = pipe.execute()
        if rolled:
            self._rolled = (clock, None if rolled[0] is None else float(rolled[0]))
        total = {key: (int(sums[3 * i] or 0), int(sums[3 * i + 1] or 0))
                 for i, key in enumerate(self.keys)}
        sent = [int(sums[3 * i + 2] or 0) for i in range(len(self.keys))]
        #: The keys not every live host sent yet (newly watched).
        self.short = [key for key, n in zip(self.keys, sent) if n < alive]
        if alive and 0 in sent and clock - self._watched > 1.0:
            self._watch()  # nobody sends it: Redis lost the watch set?
        if recent > alive:  # a 0.1 host (or one that stopped lately)
            for key, (m, s) in self._legacy(now, clock).items():
                total[key] = (total[key][0] + m, total[key][1] + s)
        total = {key: counts for key, counts in total.items() if any(counts)}
        # Our watched values: in the farm's sums (alive) since our last
        # publication.
        row = HostLive(self.host, alive=any(v is not None for v in own),
                       last_roll=self._rolled[1])
        for k, v in zip(self._fields, own):
            if v is not None:
                row.take(k, _text(v))
        return FarmLive(total, [row], None)

    def _watch(self) -> None:
        self.client.eval(WATCH_SCRIPT, 5, *_live_keys(self.prefix), self.prefix,
                         WATCH_FOR, *self._fields)
        self._watched = self.clock()

    def _legacy(self, now: float, clock: float) -> LiveCounts:
        """The keys of the hosts that published lately and are not in the
        alive set (an older version's: not in the sums), summed; the list
        of those hosts made once a second (an upgraded host's first
        publication deletes its 0.1 hash: never counted twice)."""
        if clock - self._old[0] >= 1.0:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrangebyscore(f"{self.prefix}~hosts", now - LEGACY_WINDOW, "+inf")
            pipe.zrange(f"{self.prefix}~live~alive", 0, -1)
            recent, alive = pipe.execute()
            self._old = (clock, [_text(h) for h in set(recent) - set(alive)])
        others = self._old[1]
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


#: The readers of a few keys (``only``) kept per client, the least recently
#: used dropped first (the dashboard's event is the visitor's choice: not
#: one reader per event ever asked for); one dropped and asked for again
#: starts from the snapshots.
READERS_KEPT = 8


def reader(client: Any, prefix: str = "track",
           only: Sequence[tuple[str, str]] | None = None) -> LiveReader:
    """The :class:`LiveReader` of ``client``, ``prefix`` and the keys
    ``only`` (None: every key; one each, kept as long as the client, so that
    each reading reads only what changed since the last; at most
    :data:`READERS_KEPT` key sets per client)."""
    ident = (prefix, None if only is None else frozenset(only))
    with _READERS_LOCK:
        per = _readers_of(client)
        got = per.pop(ident, None)  # re-inserted: the most recently used last
        if got is None:
            got = LiveReader(client, prefix=prefix, keys=only)
            few = [k for k in per if k[1] is not None]
            for old in few[:max(0, len(few) + 1 - READERS_KEPT)] if only is not None else ():
                del per[old]
        per[ident] = got
        others = [r for r in per.values() if r is not got]
    for other in others:  # a reader asked for no more lets go of its farm
        other.let_go_if_idle()
    return got


import threading as _threading  # noqa: E402

_READERS_LOCK = _threading.Lock()


def _readers_of(client: Any) -> dict[Any, LiveReader]:
    """``client``'s readers (``_READERS_LOCK`` held): kept on the client
    itself, so that they go with it (a reader refers to its client: in a
    table beside a weak reference to the client, neither would ever go)."""
    per = getattr(client, "_trafficthreshold_readers", None)
    if per is None:
        per = {}
        client._trafficthreshold_readers = per
    return per


def farm_live(client: Any, *, now: float, prefix: str = "track",
              only: Sequence[tuple[str, str]] | None = None, keep_only: bool = True
              ) -> FarmLive:
    """The farm's live numbers, host by host: the sum over the hosts that
    are alive (the reaper runs first: a host past its deadline is gone),
    and a row per host seen lately.  A host that is gone keeps its last
    publication time (``at``, from ``{prefix}~hosts``) and its last roll
    (``last_roll``, from the store's ``{prefix}~host:{host}``), so a dead
    host says since when.  ``only``: just these keys of each host (the
    farm rules' leader, once a second).  Read through the client's
    :class:`LiveReader` (:func:`reader`): the log entries since its last
    reading, a host's snapshot only after its full publication; the level
    reads :func:`farm_level`.  ``keep_only``: with ``only``, the reader of
    those keys (it keeps them alone: the farm rules' leader, the
    dashboard's panel, asking for the same keys again and again); else the
    client's reader of every key, its rows of ``only`` (a one-off question:
    a reader of a new key set starts from every host's snapshot)."""
    return reader(client, prefix, only if keep_only else None).read(now, only)


# -------------------------------------------------------------- the lease

# KEYS: lease, token counter.  ARGV: host, ttl ms, current value or "",
# then what to do with a lease that holds our host name but not our value
# (one supervisor per name, farm.HostClaim, so it was ours): "adopt" it as
# it is (a call of ours whose reply was lost took it), "succeed" it with a
# new token (our predecessor's, SIGKILLed: its fence must no longer hold),
# or "" leave it; then how long (ms) the token counter lives after this
# call.  Renews our own lease, or takes a free one with a new token;
# returns the lease's value ("host token") if we hold it now, else false.
# The counter's expiry is pushed back by every take and renewal, so it
# outlives every lease by ARGV[5]; a counter gone (expired, or lost by
# Redis) restarts from Redis' clock in ms, never below a token handed out
# before (a paused holder's value is never reissued).
LEASE_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
local mine = cur and string.sub(cur, 1, #ARGV[1] + 1) == ARGV[1] .. ' '
if cur and (cur == ARGV[3] or (mine and ARGV[4] == 'adopt')) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  return cur
end
if cur and not (mine and ARGV[4] == 'succeed') then return false end
local token
if redis.call('EXISTS', KEYS[2]) == 1 then
  token = redis.call('INCR', KEYS[2])
else
  local t = redis.call('TIME')
  token = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- above the lease it succeeds too (our predecessor's, taken before a
  -- clock step back)
  local held = cur and tonumber(string.match(cur, ' (%d+)$'))
  if held and held >= token then token = held + 1 end
  token = string.format('%d', token)
  redis.call('SET', KEYS[2], token)
end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local value = ARGV[1] .. ' ' .. token
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""

RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """One host's view of the farm's leader lease.  Not thread-safe."""

    def __init__(self, client: Any, host: str, *, prefix: str = "track",
                 ttl_ms: int = LEASE_TTL_MS, token_keep_ms: int = TOKEN_KEEP_MS) -> None:
        self.client, self.host, self.ttl_ms = client, host, ttl_ms
        #: how long the token key outlives the last take or renewal
        self.token_keep_ms = max(int(token_keep_ms), 10 * int(ttl_ms))
        self.key, self.counter = f"{prefix}~leader", f"{prefix}~leader:token"
        self.value: str | None = None
        #: The value we last held: after a Redis error, renewing with it
        #: continues the same lease (same token) if it has not lapsed.
        self._last: str | None = None
        #: What a lease holding our host name (not our value) is to us:
        #: "succeed" at the start (a supervisor restarted after SIGKILL
        #: finds its predecessor's lease and takes it over at once, with a
        #: new token, instead of leaving the farm without a leader for a
        #: lease_ttl), "adopt" after a call whose reply was lost (it took
        #: it), "" once a call answered.
        self._mode = "succeed"
        self._lease = client.register_script(LEASE_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)

    @property
    def token(self) -> int | None:
        """The fencing token of the lease we hold (it only ever grows: see
        :data:`TOKEN_KEEP_MS`)."""
        return None if self.value is None else int(self.value.split(" ")[1])

    def renew(self) -> bool:
        """Take or renew the lease (call every second); True while we lead.
        A Redis error means we cannot know: we stop leading (``value`` is
        None) and raise.  The next call renews the lease we last held if it
        is still ours in Redis (the same token: nobody led meanwhile), or
        one the unanswered call took (it holds our host name: read back
        instead of leaving the farm without a leader for a lease_ttl)."""
        try:
            value = self._lease(keys=[self.key, self.counter],
                                args=[self.host, self.ttl_ms, self.value or self._last or "",
                                      self._mode, self.token_keep_ms])
        except Exception:  # noqa: BLE001 - no Redis, no lease
            # The script may have run (a reply lost): the next call adopts
            # a lease that holds our name rather than wait for it to lapse.
            self.value = None
            if self._mode != "succeed":
                self._mode = "adopt"
            raise
        self._mode = ""
        self.value = None if value is None else _text(value)
        self._last = self.value
        return self.value is not None

    def release(self) -> None:
        """Give the lease up at shutdown, so another host takes over at once."""
        if self.value is not None:
            self._release(keys=[self.key], args=[self.value])
            self.value = self._last = None


# ------------------------------------------------------- one name, one host

#: A host's ownership key expires this long after its last refresh (the
#: farm thread refreshes it every second).
OWNER_TTL_MS = 5_000

# KEYS: the ownership key.  ARGV: our value, ttl ms, the value we may
# replace ("" = none).  Takes a free key, renews our own, or replaces the
# expected one; returns "" when it is ours now, else the holder's value.
TAKE_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] and cur ~= ARGV[3] then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ''
"""


# KEYS: the ownership key.  ARGV: our value, ttl ms, our identity (" {boot}
# {pid} {nonce}": our value without its instance).  The farm thread's and
# the roll thread's refresh: renews a key of ours (any instance: the
# segment may have been replaced meanwhile, and the value moves to the new
# instance), takes a free one, or leaves another supervisor's; returns ""
# when it was ours, "~lapsed" when it was free (it expired: this supervisor
# stalled past the TTL, or Redis lost it; another supervisor may have held
# the name meanwhile), else the holder's value.
REFRESH_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] and string.sub(cur, -#ARGV[3]) ~= ARGV[3] then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if cur then return '' end
return '~lapsed'
"""

RELEASE_CLAIM_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, -#ARGV[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def boot_id() -> str:
    """This machine's boot (a cloned machine boots with another one)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (in this pid namespace)."""
    import os

    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HostClaim:
    """The ownership of a host name in the farm: ``{prefix}~owner:{host}``
    holds ``"{instance} {boot id} {pid} {nonce}"`` of the one supervisor
    rolling under that name, refreshed every second by its farm thread,
    expiring :data:`OWNER_TTL_MS` after the last refresh.

    Two supervisors with one name (containers sharing the machine's host
    name, cloned machines) would roll from each other's ``closed_through``
    and overwrite one live state: the second is refused at its start
    (:meth:`take`), naming both and the fix.  A supervisor restarted after a
    SIGKILL (same segment, same boot, its old pid gone) takes its own key
    over at once; any other holder is watched for up to its TTL: refreshed
    meanwhile, it is alive and we are refused; expired, it is ours."""

    def __init__(self, client: Any, host: str, instance: int, *, pid: int,
                 prefix: str = "track", ttl_ms: int = OWNER_TTL_MS,
                 boot: str | None = None) -> None:
        import secrets

        self.client, self.host, self.pid = client, host, pid
        self.key, self.ttl_ms = f"{prefix}~owner:{host}", ttl_ms
        self.boot = boot_id() if boot is None else boot
        #: Our value without its instance: every value of ours ends with it.
        self.identity = f" {self.boot} {pid} {secrets.token_hex(4)}"
        #: Shared by the copies of :meth:`on` (the farm thread's, the roll
        #: thread's): the segment instance the name records now, and
        #: whether a refresh found the key expired (not consumed yet).
        self._state = {"instance": instance, "lapsed": False}
        self._take = client.register_script(TAKE_SCRIPT)
        self._refresh = client.register_script(REFRESH_SCRIPT)

    @property
    def instance(self) -> int:
        """The segment instance our value records (the one we roll)."""
        return self._state["instance"]

    @property
    def value(self) -> str:
        return f"{self.instance:x}{self.identity}"

    @staticmethod
    def parse(value: Any) -> dict[str, Any]:
        instance, boot, pid, *_ = _text(value).split(" ") + ["", "", "0"]
        try:
            return {"instance": int(instance, 16), "boot": boot, "pid": int(pid)}
        except ValueError:
            return {"instance": None, "boot": boot, "pid": 0}

    @classmethod
    def holder(cls, client: Any, host: str, *, prefix: str = "track") -> dict[str, Any] | None:
        """Who holds ``host``'s name now (parsed), or None."""
        value = client.get(f"{prefix}~owner:{host}")
        return None if value is None else cls.parse(value)

    @staticmethod
    def gone(holder: dict[str, Any], boot: str | None = None) -> bool:
        """Whether the supervisor ``holder`` (parsed) is gone although its
        key lives on for its TTL: it ran on this boot and its pid is dead
        (SIGKILLed, crashed)."""
        return holder["boot"] == (boot_id() if boot is None else boot) \
            and not pid_alive(holder["pid"])

    def _refused(self, other: dict[str, Any]) -> Exception:
        from .errors import ConfigError

        return ConfigError(
            f"[store] host = {self.host!r} is already used by another running supervisor "
            f"(segment instance {other['instance'] or 0:#x}, pid {other['pid']}, boot "
            f"{other['boot']}); this one (segment instance {self.instance:#x}, pid {self.pid}, "
            f"boot {self.boot}) would lose and double counts under the same name.  Every "
            "host of a farm needs its own name: set [store] host = \"<unique name>\" in this "
            "host's configuration (containers and cloned machines share the machine's host "
            "name)")

    def take(self, *, wait: bool = True, sleep: Any = None) -> None:
        """Take the name at start; ConfigError naming both when another
        supervisor holds it (see the class docstring)."""
        import time

        sleep = sleep or time.sleep
        cur = self._take(keys=[self.key], args=[self.value, self.ttl_ms, ""])
        if not cur:
            return
        other = self.parse(cur)
        if other["instance"] == self.instance and other["boot"] == self.boot \
                and (other["pid"] == self.pid or self.gone(other, self.boot)):
            # Our own segment, this boot, its supervisor gone: a restart.
            if not self._take(keys=[self.key], args=[self.value, self.ttl_ms, cur]):
                return
            raise self._refused(other)
        if not wait:
            raise self._refused(other)
        first_ttl = self.client.pttl(self.key)
        deadline = time.monotonic() + self.ttl_ms / 1000 + 1
        while time.monotonic() < deadline:
            sleep(0.2)
            now_value, ttl = self.client.get(self.key), self.client.pttl(self.key)
            if now_value is None:
                if not self._take(keys=[self.key], args=[self.value, self.ttl_ms, ""]):
                    return
                continue
            if _text(now_value) != _text(cur) or ttl > first_ttl:
                raise self._refused(self.parse(now_value))  # refreshed: alive
            first_ttl = ttl
        raise self._refused(other)

    def on(self, client: Any) -> "HostClaim":
        """The same claim (the same value) over another client: the farm
        thread's, which refreshes it."""
        other = copy.copy(self)  # the same _state: one instance, one lapse
        other.client, other._take = client, client.register_script(TAKE_SCRIPT)
        other._refresh = client.register_script(REFRESH_SCRIPT)
        return other

    def refresh(self, instance: int = 0) -> dict[str, Any] | None:
        """Renew our key (the farm thread every second, the roll thread
        before each roll); the holder's parsed value when another supervisor
        took the name meanwhile.  ``instance`` (non-zero): the segment we
        roll now, recorded in the value (a segment replaced while we run:
        a restart after SIGKILL on it knows the name is its own, and a
        rename's clone check compares the segment really rolled).  A key
        found expired is taken back and remembered as a lapse
        (:meth:`lapsed`)."""
        if instance:
            self._state["instance"] = instance
        try:
            cur = _text(self._refresh(keys=[self.key],
                                      args=[self.value, self.ttl_ms, self.identity]))
        except Exception:
            # It may have run and taken an expired key back, its answer
            # lost: the next refresh would find the key ours.  Count it
            # as a lapse (the next roll checks the store again: cheap).
            self._state["lapsed"] = True
            raise
        if cur == "~lapsed":
            self._state["lapsed"] = True
            return None
        return self.parse(cur) if cur else None

    def lapsed(self) -> bool:
        """Whether a refresh found our key expired since the last call
        (then cleared): another supervisor may have rolled under the name
        meanwhile, so the next roll must check the segment against the
        store again (a new Roller), as after a name taken and given back."""
        lapsed, self._state["lapsed"] = self._state["lapsed"], False
        return lapsed

    def release(self) -> None:
        """Let the name go at shutdown (only if it is still ours, whatever
        instance it records)."""
        self.client.eval(RELEASE_CLAIM_SCRIPT, 1, self.key, self.identity)
