"""What the hosts of a farm share in Redis besides the periods: their live
counts, and one leader for the farm's alerts.

The supervisor publishes and reads the live counts through
:mod:`trafficthreshold.farmsync` (docs/redis.rst).

Live counts
-----------
Each supervisor publishes its host's live numbers every second as
*absolute* values (idempotent: publishing twice changes nothing), with a
short expiry, so a host that dies drops out of the farm's numbers within
seconds instead of freezing them::

    {prefix}~live:{host}   hash, expires after LIVE_TTL_MS
        "{account}\\0{event}"  "{minute count} {60 s count}", then, when the
                               minute before holds hits, " {its count}"
                               (the closed minute's final count, for the
                               farm's alert rules)
        "~level"               the host's throttle level
        "~at"                  when it published (Unix seconds)
        "~last_roll"           its last roll-up (Unix seconds, or "")
        "~redis_at"            Redis' TIME at the publication (the farm's clock:
                               ``~at - ~redis_at`` is the host's clock skew)
    {prefix}~hosts         sorted set: host -> when it last published

:func:`farm_live` adds the live hashes up and lists every host seen in the
last :data:`FORGET_AFTER` seconds, alive or not.

The leader lease
----------------
Farm-wide alert rules are evaluated by one supervisor at a time: the holder
of the lease ``{prefix}~leader`` (``SET NX PX``), renewed every second.  Each
new lease gets a fencing token from ``{prefix}~leader:token`` (``INCR``); the
lease's value is ``"{host} {token}"``.  Every write of farm alert state
(:mod:`trafficthreshold.farmalerts`) is a script that applies it only while
the lease still holds that exact value, so a leader that was paused past its
lease (and replaced) can no longer write or send.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

#: A host's live hash expires this long after its last publication.
LIVE_TTL_MS = 5_000
#: A host not heard from for this long is no longer listed at all.
FORGET_AFTER = 3_600
#: A host not heard from for this long (seconds) leaves ``{prefix}~hosts``
#: (``[store] forget_hosts_days``; the store forgets its hash too).
FORGET_HOSTS_AFTER = 30 * 86_400
#: A host's clock this far (seconds) from the reader's is taken into
#: account when comparing minutes (farmalerts.farm_count); smaller skews
#: are below what one reading a second can measure.
SKEW_IGNORED = 5.0
#: ``status`` shows a host's clock this far (seconds) from Redis' TIME.
SKEW_SHOWN = 2.0
#: The leader's lease by default (``[store] lease_ttl``): another host takes
#: over at most this long after the leader stops renewing (every second).
LEASE_TTL_MS = 10_000

LiveCounts = dict[tuple[str, str], tuple[int, int]]

# The farm's one clock on a publication: Redis TIME, in the same MULTI.
STAMP_SCRIPT = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], '~redis_at', t[1] .. '.' .. string.format('%06d', t[2]))
return 0
"""


def publish_live(client: Any, host: str, counts: LiveCounts, *, level: int, now: float,
                 last_roll: float | None = None, prefix: str = "track",
                 ttl_ms: int = LIVE_TTL_MS, previous: dict[tuple[str, str], int] | None = None,
                 forget_after: float = FORGET_HOSTS_AFTER) -> None:
    """Replace this host's live numbers in one MULTI/EXEC, stamped with
    Redis' clock too (``~redis_at``, Redis ``TIME`` in the same MULTI), so
    that a reader knows this host's clock skew (``~at - ~redis_at``).  ``previous``:
    per key, the count of the minute before ``now``'s (closed, so final).
    Hosts not heard from for ``forget_after`` seconds leave
    ``{prefix}~hosts`` in the same MULTI (it never grows for ever)."""
    key = f"{prefix}~live:{host}"
    previous = previous or {}
    mapping: dict[str, str] = {}
    for name in counts.keys() | previous.keys():
        m, s = counts.get(name, (0, 0))
        p = previous.get(name, 0)
        mapping[f"{name[0]}\0{name[1]}"] = f"{m} {s} {p}" if p else f"{m} {s}"
    mapping.update({"~level": str(level), "~at": repr(float(now)),
                    "~last_roll": "" if last_roll is None else repr(float(last_roll))})
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping=mapping)
    pipe.eval(STAMP_SCRIPT, 1, key)
    pipe.pexpire(key, ttl_ms)
    pipe.zadd(f"{prefix}~hosts", {host: float(now)})
    pipe.zremrangebyscore(f"{prefix}~hosts", "-inf", f"({float(now) - forget_after!r}")
    pipe.execute()


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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def farm_live(client: Any, *, now: float, prefix: str = "track",
              only: Sequence[tuple[str, str]] | None = None) -> FarmLive:
    """The farm's live numbers: the sum over the hosts that are alive (their
    hash has not expired), and a row per host seen lately.  A host whose
    hash expired keeps its last publication time (``at``, from
    ``{prefix}~hosts``) and its last roll (``last_roll``, from the store's
    ``{prefix}~host:{host}``), so a dead host says since when.  ``only``:
    read just these keys of each host (HMGET, not HGETALL: the farm
    thread's reading for the level every quarter second)."""
    seen = client.zrangebyscore(f"{prefix}~hosts", now - FORGET_AFTER, "+inf", withscores=True)
    names = [_text(h) for h, _ in seen]
    pipe = client.pipeline(transaction=False)
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
    *replies, leader, (secs, usecs) = pipe.execute()
    total: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    hosts = []
    for (host, (_, at)), raw, rolled in zip(zip(names, seen), replies[::2], replies[1::2],
                                            strict=True):
        if fields is not None:  # HMGET: values in field order, None for a missing one
            raw = {} if raw[1] is None else {f: v for f, v in zip(fields, raw) if v is not None}
        row = HostLive(host, alive=bool(raw), at=float(at),
                       last_roll=None if rolled is None else float(rolled))
        redis_at = None
        for k, v in raw.items():
            k, v = _text(k), _text(v)
            if k == "~level":
                row.level = int(v)
            elif k == "~at":
                row.at = float(v)
            elif k == "~last_roll" and v and row.last_roll is None:
                row.last_roll = float(v)
            elif k == "~redis_at" and v:
                redis_at = float(v)
            elif "\0" in k:
                account, event = k.split("\0", 1)
                minute, sliding, *before = (int(x) for x in v.split())
                if before and before[0]:
                    row.previous[account, event] = before[0]
                if not (minute or sliding):
                    continue  # only the minute before: not live any more
                row.counts[account, event] = (minute, sliding)
                total[account, event][0] += minute
                total[account, event][1] += sliding
        if redis_at is not None and row.at is not None:
            row.skew = row.at - redis_at
        hosts.append(row)
    return FarmLive({k: (m, s) for k, (m, s) in total.items()}, hosts,
                    None if leader is None else _text(leader).split(" ")[0],
                    redis_now=int(secs) + int(usecs) / 1e6)


# -------------------------------------------------------------- the lease

# KEYS: lease, token counter.  ARGV: host, ttl ms, current value or "",
# then what to do with a lease that holds our host name but not our value
# (one supervisor per name, farm.HostClaim, so it was ours): "adopt" it as
# it is (a call of ours whose reply was lost took it), "succeed" it with a
# new token (our predecessor's, SIGKILLed: its fence must no longer hold),
# or "" leave it.  Renews our own lease, or takes a free one with a new
# token; returns the lease's value ("host token") if we hold it now, else
# false.
LEASE_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
local mine = cur and string.sub(cur, 1, #ARGV[1] + 1) == ARGV[1] .. ' '
if cur and (cur == ARGV[3] or (mine and ARGV[4] == 'adopt')) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
if cur and not (mine and ARGV[4] == 'succeed') then return false end
local token = redis.call('INCR', KEYS[2])
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
                 ttl_ms: int = LEASE_TTL_MS) -> None:
        self.client, self.host, self.ttl_ms = client, host, ttl_ms
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
        """The fencing token of the lease we hold (it only ever grows)."""
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
                                      self._mode])
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
    and overwrite one live hash: the second is refused at its start
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
        cur = _text(self._refresh(keys=[self.key],
                                  args=[self.value, self.ttl_ms, self.identity]))
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
