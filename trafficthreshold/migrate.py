"""Copy a host's SQLite history into the farm's Redis store, exactly once.

``trafficthreshold store migrate --to redis://...`` calls :func:`migrate`.
Every row of the SQLite period tables (months, days, hours, minutes) is one
field of one Redis hash in Bootic's layout (docs/store.rst), so a copy adds
each row's count to its field.  Exactly once: the rows of one target hash
are added by one Lua script that also records the hash in the set
``{prefix}~migrated:{host}``, and skips a hash already recorded there.  A
rerun, or a run cut short and started again, adds nothing twice; two hosts
that migrate their own files add up, as their live roll-ups do.

The funnels table (schema 3: counts per status of an event per year and
month) becomes Bootic's funnel hashes, ``{funnels_prefix}:{account}:{event}:{Y}``
and ``...:{Y}:{M}`` with a field per status, the same way and exactly once
too (:data:`FUNNEL_SCRIPT`).

So that the host's supervisor, once switched to Redis, carries on where the
SQLite store stopped (neither re-adding nor skipping what its ring still
holds), the store's watermarks and ``closed_through`` are copied too, as
this host's (:mod:`trafficthreshold.store.redis`).  Stop the daemon for the
migration, then start it with ``[store] backend = "redis"``.
"""
from __future__ import annotations

import logging
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from trafficthreshold.store.redis import WATERMARK_TTL, RedisStore
from trafficthreshold.store.sqlite import _signed

log = logging.getLogger("trafficthreshold.migrate")

LEVELS = (("months", ("year", "month")), ("days", ("year", "month", "day")),
          ("hours", ("year", "month", "day", "hour")),
          ("minutes", ("year", "month", "day", "hour", "minute")))

# KEYS: the marker set, the target hash, the totals hash.  ARGV: the totals
# field ("" for none: only a year's hash, whose fields are the months, adds
# to the key's all-time total), then field, count pairs.
MIGRATE_SCRIPT = """
if redis.call('SISMEMBER', KEYS[1], KEYS[2]) == 1 then return 0 end
local total = 0
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  total = total + tonumber(ARGV[i + 1])
end
if ARGV[1] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[1], total) end
redis.call('SADD', KEYS[1], KEYS[2])
return 1
"""

# A funnel hash, once.  KEYS: the marker set, the target hash, the totals
# hash, the funnels' key set.  ARGV: the totals field's head
# ("{account}\0{event}/", "" for a month's hash: only a year's fields add to
# the all-time totals, one per status), "{account}\0{event}" for the key
# set, then status, count pairs.
FUNNEL_SCRIPT = """
if redis.call('SISMEMBER', KEYS[1], KEYS[2]) == 1 then return 0 end
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  if ARGV[1] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[1] .. ARGV[i], ARGV[i + 1]) end
end
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('SADD', KEYS[1], KEYS[2])
return 1
"""

# A watermark only ever moves up: keep the larger of the two.
WATERMARK_SCRIPT = """
local seen = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > seen then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 0
"""


@dataclass
class Summary:
    hashes: int = 0        # target hashes written by this run
    skipped: int = 0       # target hashes an earlier run already wrote
    hits: int = 0          # counts added by this run, summed over the keys' months
    watermarks: int = 0


def _hashes(conn: sqlite3.Connection, prefix: str
            ) -> Iterator[tuple[str, str, dict[str, int], str]]:
    """(table, target hash key, {field: count}, "{account}\\0{event}") for
    every period row, grouped by target hash."""
    for table, parts in LEVELS:
        cols = ", ".join(parts)
        rows = conn.execute(f"SELECT account, event, {cols}, count FROM {table} "
                            f"ORDER BY account, event, {cols}")
        current, fields, pair = None, {}, ""
        for account, event, *values, count in rows:
            key = ":".join([prefix, account, event, *map(str, values[:-1])])
            if key != current and current is not None:
                yield table, current, fields, pair
                fields = {}
            current, pair = key, f"{account}\0{event}"
            fields[str(values[-1])] = fields.get(str(values[-1]), 0) + int(count)
        if current is not None:
            yield table, current, fields, pair


def _has_funnels(conn: sqlite3.Connection) -> bool:
    """Whether the file has the funnels table (schema 3 on)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'funnels'"
                        ).fetchone() is not None


def _funnel_hashes(conn: sqlite3.Connection, prefix: str
                   ) -> Iterator[tuple[bool, str, dict[str, int], str]]:
    """(a year's hash?, target hash key, {status: count}, "{account}\0{event}")
    of every funnels row, a year's hash summing its months."""
    if not _has_funnels(conn):
        return
    for year_level, parts in ((True, "year"), (False, "year, month")):
        rows = conn.execute(f"SELECT account, event, {parts}, status, SUM(count) FROM funnels"
                            f" GROUP BY account, event, {parts}, status"
                            f" ORDER BY account, event, {parts}, status")
        current, fields, pair = None, {}, ""
        for account, event, *values, status, count in rows:
            key = ":".join([prefix, account, event, *map(str, values)])
            if key != current and current is not None:
                yield year_level, current, fields, pair
                fields = {}
            current, pair = key, f"{account}\0{event}"
            fields[status] = int(count)
        if current is not None:
            yield year_level, current, fields, pair


def count_hashes(path: str) -> int:
    """How many target hashes a migration of ``path`` writes (for a progress bar)."""
    conn = _open(path)
    try:
        total = 0
        for table, parts in LEVELS:
            cols = ", ".join(["account", "event", *parts[:-1]])
            total += conn.execute(f"SELECT COUNT(*) FROM (SELECT DISTINCT {cols} FROM {table})"
                                  ).fetchone()[0]
        if _has_funnels(conn):
            for cols in ("account, event, year", "account, event, year, month"):
                total += conn.execute(f"SELECT COUNT(*) FROM (SELECT DISTINCT {cols} "
                                      "FROM funnels)").fetchone()[0]
        return total
    finally:
        conn.close()


def _open(path: str) -> sqlite3.Connection:
    # Read-only: a migration never changes the SQLite file.
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def migrate(path: str, store: RedisStore, *, instance: int = 0,
            progress: Callable[[int], None] = lambda n: None) -> Summary:
    """Copy the SQLite store at ``path`` into ``store`` (this host's view of
    the farm's Redis).  ``instance`` is the segment instance the host's
    supervisor will roll next (its watermarks are carried over under it).
    ``progress(n)`` is called after each target hash."""
    client, prefix = store.client, store.prefix
    marker = f"{prefix}~migrated:{store.host}"
    copy = client.register_script(MIGRATE_SCRIPT)
    keep = client.register_script(WATERMARK_SCRIPT)
    summary = Summary()
    conn = _open(path)
    try:
        for table, key, fields, pair in _hashes(conn, prefix):
            args: list[object] = [pair if table == "months" else ""]
            for field, count in fields.items():
                args.extend([field, count])
            if copy(keys=[marker, key, store.totals_key], args=args):
                summary.hashes += 1
                if table == "months":
                    summary.hits += sum(fields.values())
            else:
                summary.skipped += 1
            progress(1)
        _copy_funnels(conn, store, marker, summary, progress)
        summary.watermarks = _copy_watermarks(conn, store, instance, keep)
        pairs = [f"{a}\0{e}" for a, e in conn.execute("SELECT DISTINCT account, event "
                                                     "FROM months")]
        if pairs:  # what RedisStore.accounts() and events() list
            client.sadd(store.keys_key, *pairs)
        _copy_meta(conn, store)
    finally:
        conn.close()
    log.info("migrated %s into Redis: %d hashes written, %d already there, %d hits",
             path, summary.hashes, summary.skipped, summary.hits)
    return summary


def _copy_funnels(conn: sqlite3.Connection, store: RedisStore, marker: str,
                  summary: Summary, progress: Callable[[int], None]) -> None:
    """The funnels rows into Bootic's funnel hashes, each hash once."""
    copy = store.client.register_script(FUNNEL_SCRIPT)
    for year_level, key, fields, pair in _funnel_hashes(conn, store.funnels_prefix):
        args: list[object] = [f"{pair}/" if year_level else "", pair]
        for status, count in fields.items():
            args.extend([status, count])
        if copy(keys=[marker, key, store.totals_key, store.funnel_keys_key], args=args):
            summary.hashes += 1
            if year_level:
                summary.hits += sum(fields.values())
        else:
            summary.skipped += 1
        progress(1)


def _copy_meta(conn: sqlite3.Connection, store: RedisStore) -> None:
    """``closed_through``, and the instance the host last rolled (and the
    one ``uninstall`` rolled to its end), so that the supervisor's first
    roll into Redis sees a segment replaced since as the SQLite store would."""
    meta = dict(conn.execute("SELECT name, value FROM meta WHERE name IN "
                             "('closed_through', 'instance', 'instance_ended')"))
    if "closed_through" in meta:
        store.set_closed_through(int(meta["closed_through"]))
    for name in ("instance", "instance_ended"):
        if meta.get(name) is not None:
            store.client.hset(store.host_key, name, int(meta[name]) % 2**64)


def _copy_watermarks(conn: sqlite3.Connection, store: RedisStore, instance: int,
                     keep) -> int:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(watermarks)")}
    if "instance" in columns:
        rows = conn.execute("SELECT epoch_minute, account, event, count FROM watermarks "
                            "WHERE instance = ?", (_signed(instance),))
    else:
        rows = conn.execute("SELECT epoch_minute, account, event, count FROM watermarks")
    per_minute: dict[int, list[tuple[str, int]]] = defaultdict(list)
    n = 0
    for minute, account, event, count in rows:
        per_minute[minute].append((f"{instance}\0{account}\0{event}", int(count)))
        n += 1
    for minute, fields in per_minute.items():
        key = f"{store.prefix}~wm:{store.host}:{minute}"
        for field, count in fields:
            keep(keys=[key], args=[field, count, WATERMARK_TTL])
    return n
