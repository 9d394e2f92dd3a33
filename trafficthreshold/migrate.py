"""Copy a host's SQLite history into the farm's Redis store, exactly once.

``trafficthreshold store migrate --to redis://...`` calls :func:`migrate`.
Every row of the SQLite period tables (months, days, hours, minutes) is one
field of one Redis hash in Bootic's layout (docs/store.rst), so a copy adds
each row's count to its field.  Exactly once, and incrementally: beside
each target hash, the shadow hash ``{prefix}~migrated:{host}:{target}``
holds, per field, the count copied so far, and the Lua script that adds
to the target adds only what the row grew past it and moves the shadow in
the same step.  A rerun after the file grew (a trial run, then the real
one) adds exactly what is missing; a run cut short and started again adds
nothing twice; two hosts that migrate their own files add up, as their
live roll-ups do.  (Hashes an older version copied whole are listed in the
set ``{prefix}~migrated:{host}`` and left as they are.)

This module says what goes where; the backends do the reading and the
writing: the file is read through a read-only
:class:`~trafficthreshold.store.sqlite.SQLiteStore` (its ``export_*``
methods), in one read transaction (its ``snapshot()``: the periods and the
watermarks agree, even while another process writes), and Redis is
written through :class:`~trafficthreshold.store.redis_migration.RedisMigration`.
Refused, with nothing copied (ConfigError naming the fix):

* a file with no period tables (missing, empty, or not created by the
  daemon yet): there is nothing to copy;

* while the supervisor of the configured segment runs and writes the file
  (:func:`refuse_running_daemon`, from the segment header's pid);
* once this host rolls into Redis (``last_roll_at`` in its host hash):
  what its SQLite file got since is in Redis already;
* when the file holds account or event names with ``:`` (which Redis keys
  split on: two such keys would share a hash); the message names them and
  gives the SQL that renames them.

Minute hashes expire as rolled ones do (``retention.minutes`` after their
hour, counted from the migration); those already beyond it are left out.

The funnels table (schema 3: counts per status of an event per year and
month) becomes Bootic's funnel hashes, ``{funnels_prefix}:{account}:{event}:{Y}``
and ``...:{Y}:{M}`` with a field per status, the same way
(the same copy script, :data:`trafficthreshold.store.redis_migration.COPY_SCRIPT`).

So that the host's supervisor, once switched to Redis, carries on where the
SQLite store stopped (neither re-adding nor skipping what its ring still
holds), the store's watermarks and ``closed_through`` are copied too, as
this host's (:mod:`trafficthreshold.store.redis`), each only ever moving
up.  Stop the daemon for the migration, then start it with ``[store]
backend = "redis"``.
"""
from __future__ import annotations

import datetime
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from trafficthreshold.errors import ConfigError, TrafficThresholdError
from trafficthreshold.store.redis import RedisStore
from trafficthreshold.store.redis_migration import RedisMigration
from trafficthreshold.store.sqlite import SQLiteStore

log = logging.getLogger("trafficthreshold.migrate")


@dataclass
class Summary:
    hashes: int = 0        # target hashes this run added to
    skipped: int = 0       # target hashes with nothing new since an earlier run
    expired: int = 0       # minute hashes beyond retention.minutes, not copied
    hits: int = 0          # counts added by this run, summed over the keys' months
    watermarks: int = 0


def _hashes(old: SQLiteStore, prefix: str
            ) -> Iterator[tuple[str, str, dict[str, int], str]]:
    """(table, target hash key, {field: count}, "{account}\\0{event}") for
    every period row, grouped by target hash."""
    current, fields, pair, level = None, {}, "", ""
    for table, account, event, values, count in old.export_periods():
        key = ":".join([prefix, account, event, *map(str, values[:-1])])
        if key != current and current is not None:
            yield level, current, fields, pair
            fields = {}
        current, pair, level = key, f"{account}\0{event}", table
        fields[str(values[-1])] = fields.get(str(values[-1]), 0) + count
    if current is not None:
        yield level, current, fields, pair


def _funnel_hashes(old: SQLiteStore, prefix: str
                   ) -> Iterator[tuple[bool, str, dict[str, int], str]]:
    """(a year's hash?, target hash key, {status: count}, "{account}\0{event}")
    of every funnels row, a year's hash summing its months."""
    for year_level in (True, False):
        current, fields, pair = None, {}, ""
        for account, event, values, status, count in old.export_funnels(
                by_month=not year_level):
            key = ":".join([prefix, account, event, *map(str, values)])
            if key != current and current is not None:
                yield year_level, current, fields, pair
                fields = {}
            current, pair = key, f"{account}\0{event}"
            fields[status] = count
        if current is not None:
            yield year_level, current, fields, pair


def count_hashes(path: str) -> int:
    """How many target hashes a migration of ``path`` writes (for a progress bar)."""
    with _open(path) as old:
        return old.export_groups()


def source_instance(path: str) -> int:
    """The segment instance the file's host rolled last (0 for none): its
    watermarks carry over under it."""
    with _open(path) as old:
        return old.instance() or 0


def _open(path: str) -> SQLiteStore:
    """The file, read-only (a migration never changes it); ConfigError
    when it has no period tables to copy."""
    old = SQLiteStore(path, readonly=True)
    if old.empty is not None:
        old.close()
        raise ConfigError(f"nothing to migrate: {old.empty}")
    return old


def migrate(path: str, store: RedisStore, *, instance: int = 0, now: float | None = None,
            progress: Callable[[int], None] = lambda n: None) -> Summary:
    """Copy the SQLite store at ``path`` into ``store`` (this host's view of
    the farm's Redis): what each row grew past what an earlier run copied
    (nothing twice, nothing skipped).  ``instance`` is the segment instance
    the host's supervisor will roll next (its watermarks are carried over
    under it).  ``now`` (default: the clock) dates the expiry of the minute
    hashes.  ``progress(n)`` is called after each target hash.  Refused
    (ConfigError, nothing copied) once this host rolls into Redis, or when
    the file holds names with ``:``."""
    now = time.time() if now is None else now
    refuse_after_rolls(store, now)
    writer = RedisMigration(store)
    summary = Summary()
    with _open(path) as old, old.snapshot():  # one snapshot: periods and watermarks agree
        refuse_colons(old, path)
        writer.begin(now)
        for table, key, fields, pair in _hashes(old, store.prefix):
            expire_at = _expire_at(store, key) if table == "minutes" else 0
            if expire_at and expire_at <= now:
                summary.expired += 1
                progress(1)
                continue
            added = writer.copy_hash(key, fields, expire_in=int(expire_at - now) if expire_at else 0,
                                     total_field=pair if table == "months" else "")
            _count(summary, added, table == "months")
            progress(1)
        for year_level, key, fields, pair in _funnel_hashes(old, store.funnels_prefix):
            added = writer.copy_hash(key, fields, field_head=f"{pair}/" if year_level else "",
                                     member=pair)
            _count(summary, added, year_level)
            progress(1)
        summary.watermarks = writer.keep_watermarks(instance, old.export_watermarks(instance))
        writer.add_pairs(old.export_pairs())
        # closed_through, and the instance the host last rolled (and the one
        # uninstall rolled to its end), so that the supervisor's first roll
        # into Redis sees a segment replaced since as the SQLite store would.
        closed = old.closed_through()
        if closed is not None:
            store.set_closed_through(closed)
        writer.set_instances(old.instance(), old.instance_ended())
        writer.finish(now)
    log.info("migrated %s into Redis: %d hashes added to, %d with nothing new, %d minute "
             "hashes beyond retention, %d hits", path, summary.hashes, summary.skipped,
             summary.expired, summary.hits)
    return summary


def refuse_running_daemon(config: Any, path: str) -> int:
    """Refuse (ConfigError naming the pid and the fix) while the supervisor
    of ``config``'s segment runs and writes ``path``: the file would grow
    behind the copy, and a host switched to Redis from there would roll
    into both.  Returns the segment's ring length (0 without a segment),
    for the watermarks' expiry."""
    from trafficthreshold import segment
    from trafficthreshold.farm import pid_alive

    try:
        counter = segment.attach(config.key, config.backend)
    except TrafficThresholdError:
        return 0
    try:
        pid = counter.load(segment.H_SUPERVISOR_PID, 4)
        ring = counter.load(segment.H_MINUTE_BUCKETS, 4)
    finally:
        counter.detach()
    same = os.path.realpath(path) == os.path.realpath(config.database)
    if same and pid and pid_alive(pid):
        raise ConfigError(
            f"the supervisor of segment {config.key:#x} (pid {pid}) is running and writes "
            f"{path}: stop it first (systemctl stop trafficthreshold), migrate, then start it "
            "with [store] backend = \"redis\"")
    return ring


def _count(summary: Summary, added: int, counts_hits: bool) -> None:
    if added > 0:
        summary.hashes += 1
        if counts_hits:
            summary.hits += added
    else:
        summary.skipped += 1


def _expire_at(store: RedisStore, key: str) -> int:
    """When a minute hash ``{prefix}:{a}:{e}:{Y}:{M}:{D}:{H}`` expires: its
    hour's end plus ``retention.minutes`` (the store's minute TTL), as a
    rolled one does; 0 when minutes are kept."""
    if not store.minute_ttl:
        return 0
    y, mo, d, h = (int(p) for p in key.rsplit(":", 4)[1:])
    start = datetime.datetime(y, mo, d, h, tzinfo=store.tz).timestamp()
    return int(start + 3600 + store.minute_ttl)


def refuse_after_rolls(store: RedisStore, now: float | None = None) -> None:
    """A migration comes before the switch: once this host's supervisor
    rolls into Redis, what its SQLite file got since is in Redis already
    (rolled from the ring) and would be added twice.  A rerun whose earlier
    run's records (the shadows) expired cannot tell what was copied: it
    would add everything again."""
    record = store.migration()
    rolled = store.last_roll_at()
    if rolled is None and record is not None and record[0] == "switched":
        rolled = record[1]
    if rolled is None and record is not None and now is not None \
            and record[1] + store.host_ttl < now:
        when = datetime.datetime.fromtimestamp(record[1], datetime.timezone.utc)
        raise ConfigError(
            f"the records of the last migration of host {store.host!r} into this Redis "
            f"(run at {when:%Y-%m-%d %H:%M} UTC) expired ([store] forget_hosts_days after it): a rerun "
            "cannot tell what it copied and would add it all again.  Redis holds the "
            "history as of that run: start the daemon with [store] backend = \"redis\" "
            "(what the file got since stays in SQLite), or remove what the migration "
            f"copied and `redis-cli HDEL {store.migrations_key} {store.host}`, then migrate")
    if rolled is not None:
        raise ConfigError(
            f"host {store.host!r} already rolls into this Redis (last roll at "
            f"{datetime.datetime.fromtimestamp(rolled, datetime.timezone.utc):%Y-%m-%d %H:%M} "
            "UTC): copying its SQLite file now would add what it rolled since twice.  A "
            "migration (and its reruns) comes before [store] backend = \"redis\"; to start "
            "again, remove this host's keys from Redis first")


def refuse_colons(old: SQLiteStore, path: str) -> None:
    """Names with ``:`` would share Redis hashes with others (Bootic's keys
    split on ``:``: ``shop:order``/``paid`` and ``shop``/``order:paid`` are
    both ``track:shop:order:paid``); refuse, naming them and the fix."""
    bad = old.names_with(":")
    if not bad:
        return
    shown = ", ".join(f"({a!r}, {e!r})" for a, e in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    sql = old.rename_sql(":", "-")
    raise ConfigError(
        f"{path} holds names with ':' ({len(bad)} keys: {shown}{more}); in Redis ':' "
        "separates the parts of a key, so two such keys would share one hash.  Rename them "
        f"first, with the daemon stopped: sqlite3 {shlex.quote(path)} \"{sql}\" "
        "(a rename onto a name "
        "that already exists aborts: pick another character), then migrate again")
