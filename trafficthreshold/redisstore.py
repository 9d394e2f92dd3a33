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

import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any
from zoneinfo import ZoneInfo

from trafficthreshold.errors import ConfigError
from trafficthreshold.periods import local_parts, segments
from trafficthreshold.store import KeyMinute, RollItem

log = logging.getLogger("trafficthreshold.redisstore")

#: Key-minutes per script call: one call blocks Redis for its duration, so
#: a large roll goes in slices (each atomic and idempotent on its own).
BATCH = 500

#: How long a host's watermarks are kept, in seconds: far longer than any
#: ring (a few hours), so a minute still in a ring always finds its own.
WATERMARK_TTL = 2 * 24 * 3600

#: The largest cumulative count a roll passes on: the script's arithmetic is
#: Lua's (doubles), exact up to 2**53.
MAX_COUNT = 2**53 - 1

# KEYS: per item, 1 watermark hash + 4 period hashes, then the host hash.
# ARGV: watermark TTL, minute-hash TTL (0 = keep), now, closed_through ('' =
# unchanged), then per item: watermark field, observed, M, D, H, minute.
# Returns the delta added per item.
ROLL_SCRIPT = """
local wm_ttl = tonumber(ARGV[1])
local minute_ttl = tonumber(ARGV[2])
local n = (#KEYS - 1) / 5
local added = {}
for i = 0, n - 1 do
  local k = i * 5
  local a = 4 + i * 6
  local wm_key, field = KEYS[k + 1], ARGV[a + 1]
  local observed = tonumber(ARGV[a + 2])
  local seen = tonumber(redis.call('HGET', wm_key, field) or '0')
  local delta = 0
  if observed > seen then
    delta = observed - seen
    redis.call('HINCRBY', KEYS[k + 2], ARGV[a + 3], delta)
    redis.call('HINCRBY', KEYS[k + 3], ARGV[a + 4], delta)
    redis.call('HINCRBY', KEYS[k + 4], ARGV[a + 5], delta)
    redis.call('HINCRBY', KEYS[k + 5], ARGV[a + 6], delta)
    if minute_ttl > 0 then redis.call('EXPIRE', KEYS[k + 5], minute_ttl) end
    redis.call('HSET', wm_key, field, ARGV[a + 2])
    redis.call('EXPIRE', wm_key, wm_ttl)
  end
  added[i + 1] = delta
end
local host_key = KEYS[#KEYS]
redis.call('HSET', host_key, 'last_roll_at', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', host_key, 'closed_through', ARGV[4]) end
return added
"""


class RedisStore:
    """The period store of a farm, over a redis-py client.

    ``host`` names this host in the farm; ``instance`` (the segment header's
    ``instance``) keys its watermarks; ``zone`` turns epoch minutes into
    local periods.  Thread-safe as far as the client is (redis-py's is).
    """

    def __init__(self, client: Any, zone: ZoneInfo, host: str, *, prefix: str = "track",
                 minute_days: float = 0) -> None:
        if not host or ":" in host or "\0" in host:
            raise ConfigError(f"[store] host {host!r} is not a usable host name; use a name "
                              "without ':' (default: this machine's host name)")
        self.client, self.tz, self.host, self.prefix = client, zone, host, prefix
        self.minute_ttl = int(minute_days * 86400)
        self._roll = client.register_script(ROLL_SCRIPT)

    # ------------------------------------------------------------ the farm

    def check_zone(self, zone_name: str) -> None:
        """Record the farm's time zone, or refuse one that differs from it."""
        key = f"{self.prefix}~farm"
        self.client.hsetnx(key, "timezone", zone_name)
        farm = self.client.hget(key, "timezone")
        farm = farm.decode() if isinstance(farm, bytes) else farm
        if farm != zone_name:
            raise ConfigError(
                f"this host's time zone is {zone_name} but the farm's is {farm} (recorded in "
                f"Redis by the first supervisor): set timezone = \"{farm}\" on every host")

    # ------------------------------------------------------------- rolling

    def _period_keys(self, account: str, event: str, parts: tuple[int, ...]) -> list[str]:
        y, mo, d, h, _ = parts
        base = f"{self.prefix}:{account}:{event}"
        return [f"{base}:{y}", f"{base}:{y}:{mo}", f"{base}:{y}:{mo}:{d}",
                f"{base}:{y}:{mo}:{d}:{h}"]

    def roll_deltas(self, items: Iterable[RollItem], now: float, *, instance: int = 0,
                    closed_through: int | None = None) -> dict[KeyMinute, int]:
        """Add what is new in a snapshot of cumulative counts; return what
        was added per key-minute that grew.  See the module docstring."""
        latest: dict[KeyMinute, int] = {}
        for account, event, minute, observed in items:
            key = (account, event, minute)
            latest[key] = max(latest.get(key, 0), min(int(observed), MAX_COUNT))
        ordered = list(latest.items())
        added: dict[KeyMinute, int] = defaultdict(int)
        host_key = f"{self.prefix}~host:{self.host}"
        for start in range(0, max(len(ordered), 1), BATCH):
            batch = ordered[start:start + BATCH]
            last = start + BATCH >= len(ordered)
            keys: list[str] = []
            args: list[Any] = [WATERMARK_TTL, self.minute_ttl, repr(float(now)),
                               "" if closed_through is None or not last else closed_through]
            for (account, event, minute), observed in batch:
                parts = local_parts(minute, self.tz)
                keys.append(f"{self.prefix}~wm:{self.host}:{minute}")
                keys.extend(self._period_keys(account, event, parts))
                args.extend([f"{instance}\0{account}\0{event}", observed, *parts[1:]])
            keys.append(host_key)
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

    def closed_through(self) -> int | None:
        """The last minute this host has closed, or None."""
        value = self.client.hget(f"{self.prefix}~host:{self.host}", "closed_through")
        return None if value is None else int(value)

    def last_roll_at(self) -> float | None:
        """When this host last rolled (Unix seconds), or None."""
        value = self.client.hget(f"{self.prefix}~host:{self.host}", "last_roll_at")
        return None if value is None else float(value)

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


# ------------------------------------------------------------- connecting

#: Seconds a command may take before the supervisor gives up on it for this
#: tick: a slow Redis never delays the tick (throttle, alerts, heartbeat).
SOCKET_TIMEOUT = 2.0


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
        raise ConfigError(f"[store] url {url!r} is not a Redis URL ({exc}); use "
                          "redis://host:port/db, rediss://... or unix:///path/redis.sock") from None
