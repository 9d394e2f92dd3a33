"""The Redis half of ``store migrate`` (:mod:`trafficthreshold.migrate`):
the scripts that copy a host's SQLite history into the farm's Redis
exactly once, and the writes around them, over a :class:`~.redis.RedisStore`.
Kept apart from redis.py, which holds what the supervisor and the readers
use."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .redis import RedisStore

# One target hash (a period's or a funnel's), incrementally.  KEYS: the
# legacy marker set (hashes copied whole by an older version), the shadow
# hash (per field, the count copied so far), the target hash, the totals
# hash, a key set (the funnels': KEYS[5] gets ARGV[4]).  ARGV: expire in
# (seconds from now, as the roll's EXPIRE; 0 = never), the totals field
# that gets the sum added ("" for none: only a year's hash, whose fields are
# the months, adds to the key's all-time total), the head of the totals
# field each field adds to on its own ("" for none: a funnel year's
# statuses, "{account}\0{event}/"), the key set's member ("" for none), the
# shadow's expiry when the target is kept (seconds: the host hash's, so an
# abandoned migration's records go with it), then field, count pairs.
# Adds what each field grew past its copied count and moves the shadow in
# the same step; returns the sum added, or -1 for a hash an older version
# copied.
COPY_SCRIPT = """
if redis.call('SISMEMBER', KEYS[1], KEYS[3]) == 1 then return -1 end
local total = 0
for i = 6, #ARGV, 2 do
  local copied = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  local delta = tonumber(ARGV[i + 1]) - copied
  if delta > 0 then
    redis.call('HINCRBY', KEYS[3], ARGV[i], delta)
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[4], ARGV[3] .. ARGV[i], delta) end
    total = total + delta
  end
end
if total > 0 and ARGV[2] ~= '' then redis.call('HINCRBY', KEYS[4], ARGV[2], total) end
if ARGV[4] ~= '' then redis.call('SADD', KEYS[5], ARGV[4]) end
if ARGV[1] ~= '0' then
  redis.call('EXPIRE', KEYS[3], ARGV[1], 'NX')
  redis.call('EXPIRE', KEYS[2], ARGV[1])
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return total
"""

# A watermark only ever moves up: keep the larger of the two.
WATERMARK_SCRIPT = """
local seen = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > seen then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 0
"""


class RedisMigration:
    """One run of ``store migrate`` into ``store`` (this host's view of the
    farm's Redis): every write it makes, in the order migrate.py calls them
    (:meth:`begin`, :meth:`copy_hash` per target hash, :meth:`keep_watermarks`,
    :meth:`add_pairs`, :meth:`set_instances`, :meth:`finish`)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        #: The legacy marker set; ``{marker}:{key}`` is a target's shadow hash.
        self.marker = f"{store.prefix}~migrated:{store.host}"
        self._copy = store.client.register_script(COPY_SCRIPT)
        self._keep = store.client.register_script(WATERMARK_SCRIPT)

    def begin(self, now: float) -> None:
        """Until the run is whole (the watermarks come last), this host's
        supervisor must not roll into Redis (RedisStore.claim_segment).
        The host hash and the shadows expire as a host's do (an abandoned
        migration goes with them); the record in {prefix}~migrations
        outlives them, so that a rerun after they expired is refused."""
        store = self.store
        pipe = store.client.pipeline(transaction=True)
        pipe.hset(store.migrations_key, store.host, f"copying {float(now)!r}")
        pipe.hset(store.host_key, "migrating", repr(float(now)))
        pipe.expire(store.host_key, store.host_ttl)
        pipe.execute()

    def copy_hash(self, key: str, fields: Mapping[str, int], *, expire_in: int = 0,
                  total_field: str = "", field_head: str = "", member: str = "") -> int:
        """Add to the target hash ``key`` what each of its ``fields`` grew
        past the count an earlier run copied (:data:`COPY_SCRIPT`, whose
        ARGV these are); the sum added, or -1 for a hash an older version
        copied whole."""
        store = self.store
        args: list[object] = [expire_in, total_field, field_head, member, store.host_ttl]
        for field, count in fields.items():
            args.extend([field, count])
        return int(self._copy(keys=[self.marker, f"{self.marker}:{key}", key, store.totals_key,
                                    store.funnel_keys_key], args=args))

    def keep_watermarks(self, instance: int,
                        rows: Iterable[tuple[int, str, str, int]]) -> int:
        """This host's watermarks ``(epoch_minute, account, event, count)``
        of segment ``instance``, each only ever moving up; how many."""
        store = self.store
        per_minute: dict[int, list[tuple[str, int]]] = defaultdict(list)
        n = 0
        for minute, account, event, count in rows:
            per_minute[minute].append((f"{instance}\0{account}\0{event}", count))
            n += 1
        for minute, fields in per_minute.items():
            key = f"{store.prefix}~wm:{store.host}:{minute}"
            for field, count in fields:
                self._keep(keys=[key], args=[field, count, store.watermark_ttl])
        return n

    def add_pairs(self, pairs: Iterable[tuple[str, str]]) -> None:
        """The (account, event) keys RedisStore.accounts() and events() list."""
        members = [f"{a}\0{e}" for a, e in pairs]
        if members:
            self.store.client.sadd(self.store.keys_key, *members)

    def set_instances(self, instance: int | None, instance_ended: int | None) -> None:
        """The instance the host last rolled (and the one ``uninstall``
        rolled to its end), in its host hash."""
        for name, value in (("instance", instance), ("instance_ended", instance_ended)):
            if value is not None:
                self.store.client.hset(self.store.host_key, name, value)

    def finish(self, now: float) -> None:
        """The run is whole: the supervisor may roll into Redis."""
        store = self.store
        pipe = store.client.pipeline(transaction=True)
        pipe.hdel(store.host_key, "migrating")
        pipe.expire(store.host_key, store.host_ttl)
        pipe.hset(store.migrations_key, store.host, f"copied {float(now)!r}")
        pipe.execute()
