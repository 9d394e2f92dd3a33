"""The Redis half of ``store migrate`` (:mod:`trafficthreshold.migrate`):
the scripts that copy a host's SQLite history into the farm's Redis
exactly once, and the writes around them, over a :class:`~.redis.RedisStore`.
Kept apart from redis.py, which holds what the supervisor and the readers
use."""
from __future__ import annotations

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
