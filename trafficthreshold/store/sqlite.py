"""The SQLite period store: minute, hour, day and month rows per key.

The supervisor rolls the closed minutes of the shared-memory ring into this
store, exactly once through crashes and restarts; the stats API reads it.
A *key* is an ``(account, event)`` pair; the account ``all`` is written by
the supervisor like any other account (the store never sums accounts).

Exactly once
------------
The ring holds a *cumulative* count per key-minute. For every key-minute of
a segment *instance* (the header's random id, drawn at each install) the
store keeps a *watermark*: the cumulative count it has already rolled. A
roll adds only ``observed - watermark`` and moves the watermark to
``observed``, and the counts and the watermark commit in the same
transaction. So:

* rolling the same snapshot twice adds nothing (delta 0);
* a late increment to a minute already rolled adds only the increment;
* a crash before the commit loses nothing: neither the counts nor the
  watermark were written, and the next roll of the ring adds the lot;
* a segment installed again (in the same minute even) starts from 0, and
  so do its watermarks.

Watermarks are needed only while a minute can still be in the ring (a few
hours), so :meth:`SQLiteStore.prune` drops those a day older than the newest one
and records that *floor*; :meth:`SQLiteStore.roll` ignores minutes below the floor
instead of counting them a second time.

Other backends
--------------
Everything the supervisor and the API need is the handful of public methods
of :class:`~trafficthreshold.store.base.PeriodStore`, which
:class:`~trafficthreshold.store.redis.RedisStore` (Bootic's key layout, for
a farm) keeps too.

Readers and errors
------------------
Threads: a SQLiteStore (its sqlite3 connection) belongs to the thread that made
it. Readers in other threads or processes open their own
``SQLiteStore(path, zone, readonly=True)`` on the same file: read-only, it never
creates, migrates or locks the file for writing, and WAL lets it read while
the supervisor writes. Every sqlite3 error of a public method is raised as
:class:`StoreError`, whose message names the file and the recovery.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sqlite3
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from trafficthreshold.names import ALL, STATUS_SEP, split_status
from trafficthreshold.periods import local_parts, resolve_timezone, segments

from .base import MAX_MINUTE_COUNT, KeyMinute, RollItem, StoreError

log = logging.getLogger("trafficthreshold.store.sqlite")

#: Calendar parts, coarse to fine; a period row is keyed by a prefix of them.
PARTS = ("year", "month", "day", "hour", "minute")

#: Period tables, coarse to fine, with the number of PARTS in their key.
#: A period with N parts given (year=1 .. hour=4) reads LEVELS[N - 1]: its
#: child segments are that table's last key column.
LEVELS: tuple[tuple[str, int], ...] = (("months", 2), ("days", 3), ("hours", 4), ("minutes", 5))

#: How far below the newest watermark older watermarks are kept (minutes).
#: The ring holds a few hours; a day leaves a wide margin.
WATERMARK_KEEP_MINUTES = 24 * 60

# The schema. Every period table is WITHOUT ROWID with the key columns as
# primary key: reading one period is one range scan on the key prefix
# (account, event, year[, month[, day[, hour]]]), and there is no second copy
# of the key in a rowid b-tree.
DDL = [
    """CREATE TABLE IF NOT EXISTS months (
        account TEXT NOT NULL, event TEXT NOT NULL,
        year INTEGER NOT NULL, month INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (account, event, year, month)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS days (
        account TEXT NOT NULL, event TEXT NOT NULL,
        year INTEGER NOT NULL, month INTEGER NOT NULL, day INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (account, event, year, month, day)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS hours (
        account TEXT NOT NULL, event TEXT NOT NULL,
        year INTEGER NOT NULL, month INTEGER NOT NULL, day INTEGER NOT NULL,
        hour INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (account, event, year, month, day, hour)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS minutes (
        account TEXT NOT NULL, event TEXT NOT NULL,
        year INTEGER NOT NULL, month INTEGER NOT NULL, day INTEGER NOT NULL,
        hour INTEGER NOT NULL, minute INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (account, event, year, month, day, hour, minute)
    ) WITHOUT ROWID""",
    # The cumulative count of a key-minute rolled so far. epoch_minute leads
    # the key: pruning, "since" reads and MAX() are range scans on it.
    """CREATE TABLE IF NOT EXISTS watermarks (
        epoch_minute INTEGER NOT NULL,
        account TEXT NOT NULL, event TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (epoch_minute, account, event)
    ) WITHOUT ROWID""",
    # Every key ever rolled (until pruning empties it): accounts(), events()
    # and per-key pruning read this small table instead of scanning minutes.
    """CREATE TABLE IF NOT EXISTS keys (
        account TEXT NOT NULL, event TEXT NOT NULL,
        PRIMARY KEY (account, event)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS gaps (
        id INTEGER PRIMARY KEY,
        first_minute INTEGER NOT NULL, last_minute INTEGER NOT NULL,
        reason TEXT NOT NULL, recorded_at REAL NOT NULL
    )""",
    # Small named values: closed_through, watermark_floor, last_roll_at,
    # instance, instance_ended, late_dropped, bad_keys.
    """CREATE TABLE IF NOT EXISTS meta (
        name TEXT PRIMARY KEY, value NOT NULL
    ) WITHOUT ROWID""",
]

#: Schema 2: watermarks keyed by the segment *instance* too (the header's
#: random id, drawn at each install), so that a segment installed again in
#: the same minute counts that minute afresh. Rows of schema 1 get instance
#: 0 (LEGACY_INSTANCE); the first roll adopts them for the segment it reads.
WATERMARKS_BY_INSTANCE = [
    """CREATE TABLE watermarks_v2 (
        epoch_minute INTEGER NOT NULL,
        instance INTEGER NOT NULL,
        account TEXT NOT NULL, event TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (epoch_minute, instance, account, event)
    ) WITHOUT ROWID""",
    "INSERT INTO watermarks_v2 (epoch_minute, instance, account, event, count)"
    " SELECT epoch_minute, 0, account, event, count FROM watermarks",
    "DROP TABLE watermarks",
    "ALTER TABLE watermarks_v2 RENAME TO watermarks",
]

#: Schema 3: Bootic's order funnels, the count per status of an event per
#: local year and month (hit(account, "order", status="paid") counts the key
#: "order/paid"; the roll adds it here, not to the period tables).  Year and
#: month lead after the key: a year's statuses and a month's are one range
#: scan each.
FUNNELS = [
    """CREATE TABLE IF NOT EXISTS funnels (
        account TEXT NOT NULL, event TEXT NOT NULL,
        year INTEGER NOT NULL, month INTEGER NOT NULL, status TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (account, event, year, month, status)
    ) WITHOUT ROWID""",
]

#: MIGRATIONS[i] takes the schema from version i to i + 1 (PRAGMA
#: user_version). Append a list of statements for each schema change.
MIGRATIONS: list[list[str]] = [DDL, WATERMARKS_BY_INSTANCE, FUNNELS]
SCHEMA_VERSION = len(MIGRATIONS)

#: The instance of watermarks written before schema 2 (and of a segment
#: installed before the header had an instance).
LEGACY_INSTANCE = 0

#: Modes of what the store creates, whatever the umask: the directory and the
#: file (and SQLite's -wal and -shm files, which copy the file's mode) are
#: private to the daemon's user and group.
DIR_MODE = 0o750
FILE_MODE = 0o640


def describe(path: str, exc: sqlite3.Error) -> str:
    """A message for a sqlite3 error on ``path`` that names the recovery."""
    text = str(exc)
    if "not a database" in text:
        return (f"cannot open the database {path}: it is not a SQLite database ({text}); "
                f"point `database` at another file, or move {path} aside to start a new one")
    if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "corrupt" in text):
        return (f"the database {path} is damaged ({text}); stop the daemon, then either "
                f"recover it: `sqlite3 {path} .recover | sqlite3 {path}.new` and move "
                f"{path}.new in place of {path}, or move {path} aside to start a new one "
                "(the segment ring keeps the last minutes meanwhile)")
    if "readonly" in text or "read-only" in text:
        return (f"the database {path} is read-only for this user ({text}); give the "
                "daemon's user write access to the file and its directory")
    if "locked" in text or "busy" in text:
        return (f"the database {path} stayed locked by another writer ({text}); "
                "check that only one daemon runs on it")
    if "unable to open" in text:
        return (f"cannot open the database {path} ({text}); check that the file and its "
                "directory exist and that this user may read them (config key `database`)")
    return (f"the database {path} failed: {text}; if this persists, check the file "
            f"with `sqlite3 {path} 'PRAGMA integrity_check'`")


class Malformed(sqlite3.DatabaseError):
    """A value read from the file that its writer cannot have written (text
    where a count belongs, a meta value that does not parse): the file is
    damaged where SQLite did not notice (a bad sector under a row, not
    under a page header).  A sqlite3.DatabaseError, so that every path that
    handles a damaged file (the API's 503, StoreError, the daemon's one
    line) handles it; its message reads as SQLite's, "malformed"."""

    def __init__(self, where: str, value: Any) -> None:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        super().__init__(f"database disk image is malformed: {where} holds {shown}")


def reader_problem(path: str, exc: sqlite3.Error) -> str:
    """What a reader (the API's 503) says of a sqlite3 error: a busy or
    unreadable database is worth a retry; a damaged one needs a person, and
    the message says how to recover it."""
    damaged = (getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
               or type(exc) in (sqlite3.DatabaseError, Malformed))
    if not damaged:
        return (f"the database {path} is not available right now ({exc}); try again; "
                "if this persists, check the disk and the file's permissions, and the "
                "server log")
    return (f"the database {path} is damaged ({exc}): stop the daemon, then recover "
            f"what can be read with `sqlite3 {path} .recover | sqlite3 {path}.recovered` "
            f"and move {path}.recovered into its place, or move {path} aside to start "
            "an empty one")


def count_of(value: Any, where: str) -> int:
    """``value`` if it is a count (a non-negative int), else :class:`Malformed`."""
    if type(value) is int and value >= 0:
        return value
    raise Malformed(where, value)


def text_of(value: Any, where: str) -> str:
    """``value`` if it is a name (text), else :class:`Malformed`: a damaged
    cell can turn a name into a blob or a number, which the readers would
    sort against text or pass on as a name."""
    if type(value) is str:
        return value
    raise Malformed(where, value)


def moment_of(value: Any) -> float:
    """A time stamp (seconds since the epoch) from its text; ValueError if
    it does not parse or is not finite (``nan``, ``1e400``)."""
    moment = float(value)
    if not math.isfinite(moment):
        raise ValueError(value)
    return moment


def parsed(value: Any, parse: Any, where: str) -> Any:
    """``parse(value)``; :class:`Malformed` if it fails (garbage in the file)."""
    try:
        return parse(value)
    except (TypeError, ValueError, KeyError, AttributeError):
        raise Malformed(where, value) from None


def _mapped(method: Any) -> Any:
    """Turn every sqlite3 error of a SQLiteStore method into a StoreError."""
    @functools.wraps(method)
    def wrapper(self: SQLiteStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreError(describe(self.path, exc)) from exc
    return wrapper


def signed(instance: int) -> int:
    """A segment instance (u64) as SQLite's signed 64-bit INTEGER."""
    return instance - 2**64 if instance >= 2**63 else instance


#: Milliseconds a writer waits for another writer's lock before failing.
BUSY_TIMEOUT_MS = 5000


def connect(path: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """Open ``path`` with the pragmas of every connection to the database
    (the period store's and the alert store's), creating the file (mode
    FILE_MODE, whatever the umask) if it is missing.

    Autocommit mode (``isolation_level=None``): transactions are explicit,
    see :func:`transaction`. WAL lets readers read while the writer writes;
    synchronous=NORMAL is durable across process crashes (a power loss may
    lose the last commits, never corrupt), FULL across power cuts too;
    busy_timeout waits up to 5 s for another writer instead of failing at
    once.
    """
    _create_private(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA synchronous={synchronous}")
    except sqlite3.Error as exc:
        raise StoreError(describe(path, exc)) from exc
    return conn


def connect_readonly(path: str) -> sqlite3.Connection:
    """Open ``path`` read-only (a ``mode=ro`` URI): no write, no lock that
    blocks the writer, nothing created. Raises StoreError naming the file.

    A WAL file can be read only by a process that may open its ``-shm``
    file. When no writer has the file open (no ``-wal`` file) and this user
    may not create the ``-shm`` file (a read-only directory), the file is
    opened ``immutable=1`` instead: SQLite then reads it without the shared
    memory. A writer starting meanwhile is not seen by this connection, so
    such a reader should be short-lived (the CLI); the daemon's own API
    readers always have the ``-shm`` file.
    """
    base = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    for uri in (base, base + "&immutable=1"):
        conn = None
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA user_version").fetchone()
            return conn
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            retry = (uri == base and isinstance(exc, sqlite3.OperationalError)
                     and not os.path.exists(path + "-wal"))
            if not retry:
                raise StoreError(describe(path, exc)) from exc
    raise AssertionError("unreachable")


def _create_private(path: str) -> None:
    """Create an empty database file with FILE_MODE if there is none, so
    SQLite (which copies its mode to the -wal and -shm files) never makes a
    world-readable one. An existing file keeps the mode its admin gave it."""
    if path in ("", ":memory:") or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    except OSError:
        return  # let sqlite3 report it, through StoreError
    try:
        os.fchmod(fd, FILE_MODE)  # exactly FILE_MODE, whatever the umask took away
    finally:
        os.close(fd)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on ``conn``: everything inside commits, or
    nothing.

    BEGIN IMMEDIATE takes the write lock up front, so a second writer waits
    (busy_timeout) at BEGIN instead of failing halfway. A nested call joins
    the outer transaction.
    """
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # Also when COMMIT itself failed: never leave a transaction open.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _make_parent_dir(path: str) -> None:
    """Create the directory of a database file if it is missing."""
    if path in ("", ":memory:") or path.startswith("file:"):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):
        return  # the admin's directory keeps its mode
    missing = []
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        for directory in reversed(missing):  # each one DIR_MODE, not only the last
            try:
                os.mkdir(directory, DIR_MODE)
            except FileExistsError:
                continue  # made meanwhile by someone else: theirs
            os.chmod(directory, DIR_MODE)  # exactly DIR_MODE, whatever the umask took away
    except OSError as exc:
        parent = missing[0]
        raise StoreError(
            f"cannot create the directory {parent!r} for the database {path!r}: "
            f"{exc.strerror}; create it (writable by this user) or set `database` "
            "to a path in a writable directory"
        ) from exc


class SQLiteStore:
    """Minute/hour/day/month counts per (account, event), in local time.

    ``SQLiteStore(path, timezone=None)``: ``path`` is a file (its directory is
    created if missing, mode DIR_MODE; the file FILE_MODE) or
    ``":memory:"``; ``timezone`` is an IANA name, ``None`` for the system's
    zone. Periods are wall-clock periods in that zone (see
    :mod:`trafficthreshold.periods` for the DST rule).

    ``readonly=True`` (the API's and ``stats``' readers): the file is opened
    with a ``mode=ro`` URI; nothing is created, migrated or locked for
    writing, so a reader never writes even into an empty file. A missing or
    empty file reads as no data: ``empty`` then holds the reason (None
    otherwise). Every method that writes raises StoreError.

    Every sqlite3 error a public method meets is raised as
    :class:`StoreError`, whose message names the file and the recovery.
    """

    def __init__(self, path: str, timezone: str | None = None, *,
                 readonly: bool = False) -> None:
        self.path = path
        self.tz = resolve_timezone(timezone)
        self.readonly = readonly
        self.empty: str | None = None
        if readonly:
            self._conn = self._open_readonly(path)
            return
        _make_parent_dir(path)
        self._conn = connect(path)
        self._version = SCHEMA_VERSION
        try:
            self._migrate()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(describe(path, exc)) from exc
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open_readonly(cls, path: str, timezone: str | None = None) -> SQLiteStore:
        """``SQLiteStore(path, timezone, readonly=True)``."""
        return cls(path, timezone, readonly=True)

    def _open_readonly(self, path: str) -> sqlite3.Connection:
        """The read-only connection; an in-memory empty schema for a missing
        or empty file (nothing is written to it)."""
        if path != ":memory:" and not os.path.exists(path):
            self.empty = (f"the database {path} does not exist yet: start the daemon "
                          "(`trafficthreshold run`) so it rolls counts into it")
        else:
            conn = connect_readonly(path) if path != ":memory:" else sqlite3.connect(path)
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.Error as exc:
                conn.close()
                raise StoreError(describe(path, exc)) from exc
            if version > SCHEMA_VERSION:
                conn.close()
                raise StoreError(_too_new(path, version))
            if version > 0:
                self._version = version
                return conn
            conn.close()
            self.empty = (f"the database {path} has no period tables yet: the daemon "
                          "(`trafficthreshold run`) creates them at its start")
        log.info("%s", self.empty)
        conn = sqlite3.connect(":memory:", isolation_level=None)
        for statements in MIGRATIONS:
            for statement in statements:
                conn.execute(statement)
        conn.execute("PRAGMA query_only = ON")  # read-only like a mode=ro file
        self._version = SCHEMA_VERSION
        return conn

    def close(self) -> None:
        """Close the connection; the SQLiteStore cannot be used afterwards."""
        self._conn.close()

    #: One host's own file: no host name to claim, rolled on the tick.
    shared = False

    def claim_host(self, instance: int, *, pid: int, wait: bool) -> None:
        """Nothing to claim: the file is this host's alone (None)."""
        return None

    def farm_live(self, now: float, only: Any = None, keep_only: bool = False) -> None:
        """No farm: one host's own file (None)."""
        return None

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------
    # transactions and schema

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (:func:`transaction`); a sqlite3 error in it
        (a lock held too long at BEGIN, a failed COMMIT) is a StoreError."""
        try:
            with transaction(self._conn) as conn:
                yield conn
        except sqlite3.Error as exc:
            raise StoreError(describe(self.path, exc)) from exc

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, in one transaction."""
        with self.transaction() as conn:
            # Read inside the write lock: two processes opening a fresh file
            # at once must not both run the migrations.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(_too_new(self.path, version))
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
                log.info("database %s: schema %d -> %d", self.path, version, SCHEMA_VERSION)

    # ------------------------------------------------------------------
    # meta values

    def _get_meta(self, name: str) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, name: str, value: Any) -> None:
        self._conn.execute(
            "INSERT INTO meta (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def set_closed_through(self, minute: int) -> None:
        """Record that every minute up to ``minute`` is closed and rolled.

        Never moves backwards: a smaller value than the stored one is ignored.
        """
        with self.transaction():
            current = self._get_meta("closed_through")
            if current is None or minute > current:
                self._set_meta("closed_through", int(minute))

    def closed_through(self) -> int | None:
        """The last minute recorded by :meth:`set_closed_through`, or None."""
        value = self._get_meta("closed_through")
        return None if value is None else parsed(value, int, "meta closed_through")

    def last_rolled_minute(self) -> int | None:
        """The newest minute known rolled: the newest watermark, or
        :meth:`closed_through` if that is later (or the watermarks were
        pruned). None for a store that never rolled anything."""
        row = self._conn.execute("SELECT MAX(epoch_minute) FROM watermarks").fetchone()
        known = [m for m in (row[0], self.closed_through()) if m is not None]
        return max(known) if known else None

    def instance(self) -> int | None:
        """The segment instance of the last roll, or None (no roll since
        schema 2)."""
        value = self._get_meta("instance")
        return None if value is None else parsed(value, int, "meta instance") % 2**64

    def claim_segment(self, instance: int, first: int | None = None) -> None:
        """Nothing to do: the file is this host's own, whatever its name
        (the Redis store carries a renamed host's watermarks over)."""

    def cover_ring(self, minutes: int) -> None:
        """Nothing to do: the watermark floor (:meth:`prune`) already keeps
        a minute below the kept watermarks from being rolled again."""

    def instance_ended(self) -> int | None:
        """The instance whose segment was retired (``uninstall``) and then
        rolled to its end by a final roll, or None."""
        value = self._get_meta("instance_ended")
        return None if value is None else parsed(value, int, "meta instance_ended") % 2**64

    def late_dropped(self) -> int:
        """Hits that reached a ring minute after its last re-read (more than
        LATE_MINUTES late) and were therefore not added: counted here, never
        silently."""
        return parsed(self._get_meta("late_dropped") or 0, int, "meta late_dropped")

    def bad_keys(self) -> list[str]:
        """The keys the last roll had to skip (an index entry that is not
        UTF-8, a count too big to be true), each described with its slot;
        empty when every key rolls."""
        value = self._get_meta("bad_keys")
        return [] if value is None else list(parsed(value, json.loads, "meta bad_keys"))

    def set_instance(self, instance: int) -> None:
        """Record the segment instance being rolled (see :meth:`instance`)."""
        with self.transaction():
            self._set_meta("instance", signed(instance))

    def set_bad_keys(self, described: Iterable[str]) -> None:
        """Record the keys a roll skips (see :meth:`bad_keys`)."""
        value = json.dumps(sorted(described))
        if value != (self._get_meta("bad_keys") or "[]"):
            with self.transaction():
                self._set_meta("bad_keys", value)

    def last_roll_at(self) -> float | None:
        """The ``now`` of the last :meth:`roll`, or None."""
        value = self._get_meta("last_roll_at")
        return None if value is None else parsed(value, moment_of, "meta last_roll_at")

    # ------------------------------------------------------------------
    # rolling

    def roll(
        self,
        items: Iterable[RollItem],
        now: float,
        *,
        closed_through: int | None = None,
        instance: int = LEGACY_INSTANCE,
    ) -> int:
        """:meth:`roll_deltas`, and return the total added."""
        return sum(self.roll_deltas(items, now, closed_through=closed_through,
                                    instance=instance).values())

    def roll_deltas(
        self,
        items: Iterable[RollItem],
        now: float,
        *,
        closed_through: int | None = None,
        instance: int = LEGACY_INSTANCE,
        ended: bool = False,
    ) -> dict[KeyMinute, int]:
        """Add what is new in a snapshot of cumulative counts; return what
        was added, per (account, event, epoch_minute) that grew.

        ``items`` holds ``(account, event, epoch_minute, observed)`` where
        ``observed`` is the *current cumulative* count of that key-minute.
        In one transaction: each item adds ``observed - watermark`` to its
        minute, hour, day and month rows (wall clock in the store's zone)
        and moves the watermark to ``observed``; ``closed_through``, if
        given, is recorded as by :meth:`set_closed_through`. A count below
        the watermark (a ring bucket reused) and a minute below the
        watermark floor (see :meth:`prune`) add nothing and log a warning.
        A count above MAX_MINUTE_COUNT (a corrupt bucket) adds nothing and
        logs an error.

        Watermarks belong to the segment ``instance`` (the header's id of
        the install), so a segment installed again starts from 0 in the
        minutes the old one already rolled. The first roll into a store
        without a recorded instance adopts the schema-1 watermarks
        (instance 0) for ``instance``. ``ended``: this is the final roll of
        a retired segment (``uninstall``); see :meth:`instance_ended`.
        """
        instance = signed(instance)
        with self.transaction():
            if self._get_meta("instance") is None and instance != LEGACY_INSTANCE:
                self._conn.execute("UPDATE watermarks SET instance = ? WHERE instance = ?",
                                   (instance, LEGACY_INSTANCE))
            floor = self._get_meta("watermark_floor")
            deltas, watermarks = self._deltas(items, floor, instance)
            self._add_to_periods(deltas)
            self._save_watermarks(watermarks, instance)
            self._set_meta("last_roll_at", float(now))
            self._set_meta("instance", instance)
            if ended:
                self._set_meta("instance_ended", instance)
            if closed_through is not None:
                self.set_closed_through(closed_through)
        log.debug("rolled %d key-minutes, %d new hits", len(deltas), sum(deltas.values()))
        return dict(deltas)

    def _deltas(
        self, items: Iterable[RollItem], floor: int | None, instance: int
    ) -> tuple[dict[KeyMinute, int], dict[KeyMinute, int]]:
        """Compare items with the stored watermarks.

        Returns (delta per key-minute, new watermark per key-minute), only
        for key-minutes that grew. An item repeated in ``items`` is compared
        with the watermark its earlier copy set. Caller holds the transaction.
        """
        stored: dict[int, dict[tuple[str, str], int]] = {}
        deltas: dict[KeyMinute, int] = defaultdict(int)
        watermarks: dict[KeyMinute, int] = {}
        for account, event, minute, observed in items:
            if observed > MAX_MINUTE_COUNT:
                log.error(
                    "count %d of %s/%s at minute %d is beyond %d (a corrupt ring bucket); "
                    "not added", observed, account, event, minute, MAX_MINUTE_COUNT,
                )
                continue
            if floor is not None and minute < floor:
                log.warning(
                    "minute %d of %s/%s is below the watermark floor %d (rolled and "
                    "pruned long ago); ignored to avoid counting it twice",
                    minute, account, event, floor,
                )
                continue
            if minute not in stored:
                stored[minute] = self._watermarks_of(minute, instance)
            seen = stored[minute].get((account, event), 0)
            if observed > seen:
                deltas[account, event, minute] += observed - seen
                watermarks[account, event, minute] = observed
                stored[minute][account, event] = observed
            elif observed < seen:
                log.warning(
                    "count of %s/%s at minute %d went down from %d to %d (ring "
                    "bucket reused?); nothing added",
                    account, event, minute, seen, observed,
                )
        return deltas, watermarks

    def _watermarks_of(self, minute: int, instance: int) -> dict[tuple[str, str], int]:
        """All watermarks of one epoch minute and instance: one range scan."""
        rows = self._conn.execute(
            "SELECT account, event, count FROM watermarks WHERE epoch_minute = ?"
            " AND instance = ?", (minute, instance)
        )
        return {(account, event): count for account, event, count in rows}

    def _add_to_periods(self, deltas: Mapping[KeyMinute, int]) -> None:
        """Add deltas to the minute, hour, day and month rows (and register
        their keys); a funnel status key's (``order/paid``) to the funnels
        rows of its local year and month instead. Caller holds the
        transaction."""
        sums: dict[str, dict[tuple[Any, ...], int]] = {t: defaultdict(int) for t, _ in LEVELS}
        funnels: dict[tuple[Any, ...], int] = defaultdict(int)
        keys = set()
        for (account, event, minute), delta in deltas.items():
            parts = local_parts(minute, self.tz)
            plain, status = split_status(event)
            if status is not None:
                funnels[(account, plain, *parts[:2], status)] += delta
                continue
            keys.add((account, event))
            for table, width in LEVELS:
                sums[table][(account, event, *parts[:width])] += delta
        for table, width in LEVELS:
            self._conn.executemany(_upsert_sql(table, width), _rows(sums[table]))
        self._conn.executemany(
            "INSERT INTO funnels (account, event, year, month, status, count)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (account, event, year, month, status)"
            " DO UPDATE SET count = count + excluded.count", _rows(funnels))
        self._conn.executemany("INSERT OR IGNORE INTO keys (account, event) VALUES (?, ?)", keys)

    def _save_watermarks(self, watermarks: Mapping[KeyMinute, int], instance: int) -> None:
        """SQLiteStore new watermarks. Caller holds the transaction."""
        self._conn.executemany(
            "INSERT INTO watermarks (account, event, epoch_minute, instance, count)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (epoch_minute, instance, account, event)"
            " DO UPDATE SET count = excluded.count",
            ((a, e, m, instance, count) for (a, e, m), count in watermarks.items()),
        )

    def drop_late(self, items: Iterable[RollItem], instance: int) -> int:
        """Count, without adding them, the hits that grew past the watermark
        of a minute no longer re-read (see :meth:`late_dropped`); move those
        watermarks so each late hit is counted once. Returns the hits: the
        growth of the ``all`` keys, where every hit counts once."""
        instance = signed(instance)
        with self.transaction():
            deltas, watermarks = self._deltas(items, self._get_meta("watermark_floor"),
                                              instance)
            late = sum(n for (account, _, _), n in deltas.items() if account == ALL)
            if watermarks:
                self._save_watermarks(watermarks, instance)
            if late:
                self._set_meta("late_dropped", self.late_dropped() + late)
        return late

    def watermark_minutes(self, since_minute: int,
                          instance: int | None = None) -> dict[KeyMinute, int]:
        """Watermarks of the minutes >= ``since_minute`` of ``instance``
        (default: the instance of the last roll):
        ``{(account, event, epoch_minute): count rolled}``."""
        if self._version < 2:  # a reader of a store not migrated yet
            rows = self._conn.execute(
                "SELECT account, event, epoch_minute, count FROM watermarks"
                " WHERE epoch_minute >= ?", (since_minute,))
            return {(a, e, m): count for a, e, m, count in rows}
        if instance is None:
            instance = self.instance()
        rows = self._conn.execute(
            "SELECT account, event, epoch_minute, count FROM watermarks WHERE epoch_minute >= ?"
            " AND instance = ?",
            (since_minute, signed(instance or LEGACY_INSTANCE)),
        )
        return {(a, e, m): count for a, e, m, count in rows}

    def metrics_reading(self, instance: int | None, first: int,
                        last: int) -> dict[str, Any]:
        """What a /metrics scrape needs, read in one read transaction (one
        snapshot of the file, whatever the supervisor commits meanwhile;
        WAL: no lock a writer waits for; always ends with ROLLBACK): the
        all-time totals per key (month rows, and a funnel status key's
        ``order/paid`` funnels rows), the watermarks of segment
        ``instance`` for the minutes first..last (None when ``instance``
        is None: no segment), the last roll, gaps, late drops and skipped
        keys.  The same keys as :meth:`RedisStore.metrics_reading`.  A
        value no writer wrote is a damaged file (StoreError naming the
        recovery)."""
        conn = self._conn
        conn.execute("BEGIN DEFERRED")
        try:
            meta = dict(conn.execute("SELECT name, value FROM meta WHERE name IN "
                                     "('last_roll_at', 'late_dropped', 'bad_keys')"))
            gaps = conn.execute("SELECT COUNT(*) FROM gaps").fetchone()[0]
            totals = self._all_time_totals()
            marks = None if instance is None else {
                (a, e, m): count for a, e, m, count in conn.execute(
                    "SELECT account, event, epoch_minute, count FROM watermarks"
                    " WHERE epoch_minute >= ? AND epoch_minute <= ? AND instance = ?",
                    (first, last, signed(instance)))}
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        last_roll = meta.get("last_roll_at")
        return {"totals": totals, "watermarks": marks,
                "last_roll_at": None if last_roll is None
                else parsed(last_roll, moment_of, "meta last_roll_at"),
                "gaps": gaps,
                "late_dropped": parsed(meta.get("late_dropped") or 0, int, "meta late_dropped"),
                "bad_keys": len(parsed(meta["bad_keys"], json.loads, "meta bad_keys"))
                if meta.get("bad_keys") else 0}

    def _all_time_totals(self) -> dict[tuple[str, str], int]:
        """All-time hits per key: the sum of its month rows, and of a funnel
        status key's (``order/paid``) funnels rows; one scan of the small
        months and funnels tables."""
        conn = self._conn
        rows = conn.execute("SELECT account, event, SUM(count) FROM months"
                            " GROUP BY account, event")
        totals = {(text_of(account, "an account of months"),
                   text_of(event, "an event of months")):
                  count_of(total, "a sum of months") for account, event, total in rows}
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'funnels'"
                        ).fetchone():  # schema 3 on
            rows = conn.execute("SELECT account, event, status, SUM(count) FROM funnels"
                                " GROUP BY account, event, status")
            for account, event, status, total in rows:
                event = f'{text_of(event, "an event of funnels")}{STATUS_SEP}' \
                        f'{text_of(status, "a status of funnels")}'
                totals[text_of(account, "an account of funnels"), event] = \
                    count_of(total, "a sum of funnels")
        return totals

    # ------------------------------------------------------------------
    # gaps

    def record_gap(self, first_minute: int, last_minute: int, reason: str, now: float) -> None:
        """Record that the minutes first..last (inclusive) were not counted."""
        if first_minute > last_minute:
            raise ValueError(f"gap from minute {first_minute} to {last_minute}: first > last")
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO gaps (first_minute, last_minute, reason, recorded_at)"
                " VALUES (?, ?, ?, ?)",
                (first_minute, last_minute, reason, now),
            )

    def gap_count(self) -> int:
        """How many gaps were recorded (the table is never pruned)."""
        return self._conn.execute("SELECT COUNT(*) FROM gaps").fetchone()[0]

    def gaps(self) -> list[dict[str, Any]]:
        """Every recorded gap, oldest first, as dicts with the column names."""
        rows = self._conn.execute(
            "SELECT first_minute, last_minute, reason, recorded_at FROM gaps"
            " ORDER BY first_minute, id"
        )
        names = ("first_minute", "last_minute", "reason", "recorded_at")
        return [dict(zip(names, row, strict=True)) for row in rows]

    # ------------------------------------------------------------------
    # reading

    def period(
        self,
        account: str,
        event: str,
        year: int,
        month: int | None = None,
        day: int | None = None,
        hour: int | None = None,
    ) -> dict[str, Any]:
        """Counts of a period by child segment: year -> months, month ->
        days, day -> hours, hour -> minutes.

        Returns ``{"data": {segment: count}, "total": count}``; ``data`` has
        every segment, zero-filled, in numeric order. An impossible date
        raises :class:`~trafficthreshold.periods.ImpossiblePeriod` (a
        ValueError). One indexed range query.
        """
        segs = segments(year, month, day, hour)
        given = [p for p in (year, month, day, hour) if p is not None]
        table, width = LEVELS[len(given) - 1]
        where = " AND ".join(f"{col} = ?" for col in PARTS[: len(given)])
        rows = self._conn.execute(
            f"SELECT {PARTS[width - 1]}, count FROM {table}"
            f" WHERE account = ? AND event = ? AND {where}",
            (account, event, *given),
        )
        data = dict.fromkeys(segs, 0)
        for segment, count in rows:
            if segment in data:
                data[segment] = count_of(count, f"a row of {table}")
        return {"data": data, "total": sum(data.values())}

    def accounts(self, event: str | None = None) -> list[str]:
        """Accounts with rows (for ``event`` if given), sorted; includes
        ``all`` and internal accounts such as ``~overflow``."""
        if event is None:
            rows = self._conn.execute("SELECT DISTINCT account FROM keys ORDER BY account")
        else:
            rows = self._conn.execute(
                "SELECT account FROM keys WHERE event = ? ORDER BY account", (event,)
            )
        return [text_of(account, "an account of keys") for (account,) in rows]

    def events(self, account: str | None = None) -> list[str]:
        """Events with rows (of ``account`` if given), sorted."""
        if account is None:
            rows = self._conn.execute("SELECT DISTINCT event FROM keys ORDER BY event")
        else:
            rows = self._conn.execute(
                "SELECT event FROM keys WHERE account = ? ORDER BY event", (account,)
            )
        return [text_of(event, "an event of keys") for (event,) in rows]

    def years(self, account: str, event: str) -> list[int]:
        """The years that have rows of ``(account, event)`` at any level,
        ascending (a level's retention may have pruned the others). One
        index range per table."""
        union = " UNION ".join(
            f"SELECT year FROM {table} WHERE account = ? AND event = ?" for table, _ in LEVELS
        )
        rows = self._conn.execute(f"{union} ORDER BY year", (account, event) * len(LEVELS))
        return [year for (year,) in rows]

    # ------------------------------------------------------------------
    # funnels

    def funnel(self, account: str, event: str, year: int,
               month: int | None = None) -> dict[str, Any]:
        """The counts per status of ``event`` in a local year or month:
        ``{"data": {status: count}, "total": n, "months": [...]}``, the
        statuses counted there by name, ``months`` the months of a year that
        hold counts (``[]`` for a month).  An impossible date raises
        :class:`~trafficthreshold.periods.ImpossiblePeriod`.  One range scan."""
        segments(year, month)
        if self._version < 3:  # a reader of a store not migrated yet: none
            return {"data": {}, "total": 0, "months": []}
        where, args = "account = ? AND event = ? AND year = ?", [account, event, year]
        if month is not None:
            where, args = where + " AND month = ?", [*args, month]
        rows = self._conn.execute(f"SELECT month, status, count FROM funnels WHERE {where}"
                                  " AND count > 0", args).fetchall()
        data: dict[str, int] = defaultdict(int)
        for _month, status, count in rows:
            data[text_of(status, "a status of funnels")] += count_of(count, "a row of funnels")
        months = [] if month is not None else sorted({m for m, _s, _c in rows})
        return {"data": dict(sorted(data.items())), "total": sum(data.values()),
                "months": months}

    def funnel_accounts(self) -> list[str]:
        """Accounts with funnel counts (``all`` included), sorted."""
        return self._funnel_list("account", "", ())

    def funnel_events(self, account: str) -> list[str]:
        """The events of ``account`` with funnel counts, sorted."""
        return self._funnel_list("event", "WHERE account = ?", (account,))

    def funnel_years(self, account: str, event: str) -> list[int]:
        """The years with funnel counts of ``(account, event)``, ascending."""
        return self._funnel_list("year", "WHERE account = ? AND event = ?", (account, event))

    def _funnel_list(self, column: str, where: str, args: tuple[str, ...]) -> list[Any]:
        if self._version < 3:
            return []
        rows = self._conn.execute(f"SELECT DISTINCT {column} FROM funnels {where}"
                                  f" ORDER BY {column}", args)
        if column == "year":
            return [value for (value,) in rows]
        return [text_of(value, f"an {column} of funnels") for (value,) in rows]

    def top_accounts(self, event: str, since_minute: int, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` accounts with the most ``event`` hits in the minute
        rows from ``since_minute`` (its local wall-clock minute) on, biggest
        first; ``all`` is left out. One index range scan per account.
        """
        since = local_parts(since_minute, self.tz)
        rows = self._conn.execute(
            "SELECT k.account, SUM(m.count) AS total FROM keys AS k"
            " JOIN minutes AS m ON m.account = k.account AND m.event = k.event"
            " WHERE k.event = ? AND k.account != 'all'"
            " AND (m.year, m.month, m.day, m.hour, m.minute) >= (?, ?, ?, ?, ?)"
            " GROUP BY k.account ORDER BY total DESC, k.account LIMIT ?",
            (event, *since, limit),
        )
        return [(text_of(account, "an account of minutes"), count_of(total, "a sum of minutes"))
                for account, total in rows]

    # ------------------------------------------------------------------
    # retention

    def prune(self, now: float, retention: Mapping[str, float]) -> dict[str, int]:
        """Delete rows past their retention; return rows deleted per table.

        ``retention`` maps ``minutes``/``hours``/``days``/``months`` to days
        to keep (0 or missing = forever). The cutoff is the local wall-clock
        time ``now - days``; a row goes once its whole period lies before
        the cutoff's period (a month row only when the cutoff is in a later
        month). Watermarks more than WATERMARK_KEEP_MINUTES below the newest
        one (or below ``now``) go too, and that floor is recorded so that
        :meth:`roll` never counts those minutes again.
        """
        unknown = set(retention) - {table for table, _ in LEVELS}
        if unknown:
            raise ValueError(
                f"unknown retention level(s) {sorted(unknown)}: use minutes, hours, days, months"
            )
        now_minute = int(now // 60)
        deleted: dict[str, int] = {}
        with self.transaction():
            keys = self._conn.execute("SELECT account, event FROM keys").fetchall()
            for table, width in LEVELS:
                days = retention.get(table, 0)
                if days < 0:
                    raise ValueError(f"retention.{table} = {days}: days must be >= 0")
                if days:
                    cutoff = local_parts(now_minute - int(days * 1440), self.tz)[:width]
                    deleted[table] = self._prune_level(table, width, cutoff, keys)
            deleted["watermarks"] = self._prune_watermarks(now_minute)
            deleted["keys"] = self._forget_empty_keys(keys)
        log.info("pruned %s", deleted)
        return deleted

    def _prune_level(
        self, table: str, width: int, cutoff: tuple[int, ...], keys: list[tuple[str, str]]
    ) -> int:
        """Delete the rows of ``table`` before ``cutoff``, key by key (an
        index range each, instead of a scan of the whole table)."""
        columns = ", ".join(PARTS[:width])
        marks = ", ".join("?" * width)
        sql = f"DELETE FROM {table} WHERE account = ? AND event = ? AND ({columns}) < ({marks})"
        before = self._conn.total_changes
        self._conn.executemany(sql, ((a, e, *cutoff) for a, e in keys))
        return self._conn.total_changes - before

    def _prune_watermarks(self, now_minute: int) -> int:
        """Drop old watermarks and raise the floor below which roll() ignores
        minutes. Relative to the newest watermark too, so that a clock
        jumping ahead cannot drop watermarks still in use."""
        newest = self._conn.execute("SELECT MAX(epoch_minute) FROM watermarks").fetchone()[0]
        floor = min(now_minute, now_minute if newest is None else newest) - WATERMARK_KEEP_MINUTES
        old_floor = self._get_meta("watermark_floor")
        if old_floor is not None and old_floor >= floor:
            return 0
        self._set_meta("watermark_floor", floor)
        deleted = self._conn.execute("DELETE FROM watermarks WHERE epoch_minute < ?", (floor,))
        return deleted.rowcount

    def _forget_empty_keys(self, keys: list[tuple[str, str]]) -> int:
        """Remove keys that have no period rows left."""
        exists = " OR ".join(
            f"EXISTS (SELECT 1 FROM {table} WHERE account = ? AND event = ?)"
            for table, _ in LEVELS
        )
        empty = [
            (a, e)
            for a, e in keys
            if not self._conn.execute(f"SELECT {exists}", (a, e) * len(LEVELS)).fetchone()[0]
        ]
        self._conn.executemany("DELETE FROM keys WHERE account = ? AND event = ?", empty)
        return len(empty)

    # ------------------------------------------------------------------
    # export: what ``store migrate`` (trafficthreshold.migrate) reads to
    # copy the file into the farm's Redis, read inside one :meth:`snapshot`

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[SQLiteStore]:
        """One read transaction: everything read inside it is one state of
        the file (the periods and the watermarks agree), even while another
        process writes.  Nothing is written.  The schema is read again
        inside it (its first read, which fixes the snapshot): a daemon may
        have migrated the file since it was opened, and which columns and
        tables the export reads must be the snapshot's."""
        try:
            self._conn.execute("BEGIN")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise StoreError(describe(self.path, exc)) from exc
        if self.empty is None:  # not the in-memory stand-in of a missing file
            if version > SCHEMA_VERSION:
                self._conn.execute("ROLLBACK")
                raise StoreError(_too_new(self.path, version))
            self._version = version
        try:
            yield self
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _export(self, sql: str, args: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        """The rows of ``sql``, its sqlite3 errors raised as StoreError."""
        try:
            yield from self._conn.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(describe(self.path, exc)) from exc

    def _has_funnels(self) -> bool:
        return self._version >= MIGRATIONS.index(FUNNELS) + 1

    def export_periods(self) -> Iterator[tuple[str, str, str, tuple[int, ...], int]]:
        """``(level, account, event, parts, count)`` of every period row:
        level "months", "days", "hours" then "minutes" (LEVELS), ``parts``
        the row's (year, month[, day[, hour[, minute]]]); each level ordered
        by account, event and parts."""
        for table, width in LEVELS:
            cols = ", ".join(PARTS[:width])
            for account, event, *values, count in self._export(
                    f"SELECT account, event, {cols}, count FROM {table} "
                    f"ORDER BY account, event, {cols}"):
                yield table, account, event, tuple(values), int(count)

    def export_funnels(self, *, by_month: bool
                       ) -> Iterator[tuple[str, str, tuple[int, ...], str, int]]:
        """``(account, event, parts, status, count)`` of the funnels, summed
        per year (``parts`` = (year,)) or per month (``by_month``: (year,
        month)); ordered by account, event, parts and status.  Nothing for a
        file older than the funnels (schema 3)."""
        if not self._has_funnels():
            return
        parts = "year, month" if by_month else "year"
        for account, event, *values, status, count in self._export(
                f"SELECT account, event, {parts}, status, SUM(count) FROM funnels"
                f" GROUP BY account, event, {parts}, status"
                f" ORDER BY account, event, {parts}, status"):
            yield account, event, tuple(values), status, int(count)

    def export_groups(self) -> int:
        """How many groups :meth:`export_periods` and :meth:`export_funnels`
        yield, a group being the rows of one (account, event) and one period
        but their last part (a Redis hash each; a progress bar's length)."""
        selects = [f"SELECT DISTINCT account, event, {', '.join(PARTS[:width - 1])} FROM {table}"
                   for table, width in LEVELS]
        if self._has_funnels():
            selects += ["SELECT DISTINCT account, event, year FROM funnels",
                        "SELECT DISTINCT account, event, year, month FROM funnels"]
        return sum(next(self._export(f"SELECT COUNT(*) FROM ({select})"))[0]
                   for select in selects)

    def export_pairs(self) -> list[tuple[str, str]]:
        """Every (account, event) with period rows (its months)."""
        return list(self._export("SELECT DISTINCT account, event FROM months"))

    def export_watermarks(self, instance: int) -> Iterator[tuple[int, str, str, int]]:
        """``(epoch_minute, account, event, count)`` of the watermarks of
        segment ``instance`` (every watermark of a file older than schema 2,
        which has no instances)."""
        if self._version >= MIGRATIONS.index(WATERMARKS_BY_INSTANCE) + 1:
            rows = self._export("SELECT epoch_minute, account, event, count FROM watermarks "
                                "WHERE instance = ?", (signed(instance),))
        else:
            rows = self._export("SELECT epoch_minute, account, event, count FROM watermarks")
        for minute, account, event, count in rows:
            yield int(minute), account, event, int(count)

    def names_with(self, sep: str) -> list[tuple[str, str]]:
        """The sorted (account, event) pairs of the periods and funnels
        whose names hold ``sep``, then the funnels' (account,
        "event/status") whose status holds it."""
        tables = ["months"] + (["funnels"] if self._has_funnels() else [])
        bad = sorted({(a, e) for t in tables for a, e in self._export(
            f"SELECT DISTINCT account, event FROM {t} WHERE instr(account, ?) > 0 "
            "OR instr(event, ?) > 0", (sep, sep))})
        if self._has_funnels():
            bad += sorted({(a, f"{e}/{st}") for a, e, st in self._export(
                "SELECT DISTINCT account, event, status FROM funnels "
                "WHERE instr(status, ?) > 0", (sep,))})
        return bad

    def rename_sql(self, sep: str, replacement: str) -> str:
        """The SQL (for the sqlite3 shell, the daemon stopped) that replaces
        ``sep`` by ``replacement`` in every name of the file (the keys
        table's too), in one
        transaction: a rename onto a name that already exists aborts and
        leaves the file as it was (the shell stops at the failed statement,
        before the COMMIT; the transaction rolls back as it exits)."""
        if not sep or sep in replacement:
            raise ValueError(f"renaming {sep!r} to {replacement!r} would leave {sep!r}")
        tables = ["months", "days", "hours", "minutes", "watermarks",
                  *(["funnels"] if self._has_funnels() else [])]
        sep, replacement = (s.replace("'", "''") for s in (sep, replacement))  # SQL literals
        updates = [f"UPDATE OR ABORT {t} SET account = replace(account, '{sep}', "
                   f"'{replacement}'), event = replace(event, '{sep}', '{replacement}')"
                   + (f", status = replace(status, '{sep}', '{replacement}')"
                      if t == "funnels" else "")
                   for t in tables]
        # keys lists what accounts() shows and prune() prunes: a renamed key
        # joins the new name's entry if it has one (no abort: their rows
        # may well be of other periods; the tables above abort on a clash)
        keys = [f"UPDATE OR IGNORE keys SET account = replace(account, '{sep}', "
                f"'{replacement}'), event = replace(event, '{sep}', '{replacement}')",
                f"DELETE FROM keys WHERE instr(account, '{sep}') > 0 "
                f"OR instr(event, '{sep}') > 0"]
        return "; ".join(["BEGIN", *updates, *keys, "COMMIT"])


def _too_new(path: str, version: int) -> str:
    return (f"the database {path!r} has schema version {version}, newer "
            f"than this trafficthreshold knows ({SCHEMA_VERSION}); upgrade "
            "trafficthreshold or point `database` at another file")


def _upsert_sql(table: str, width: int) -> str:
    """INSERT a row of ``table`` or add to its count."""
    key = ("account", "event", *PARTS[:width])
    return (
        f"INSERT INTO {table} ({', '.join(key)}, count)"
        f" VALUES ({', '.join('?' * (len(key) + 1))})"
        f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET count = count + excluded.count"
    )


def _rows(sums: Mapping[tuple[Any, ...], int]) -> Iterator[tuple[Any, ...]]:
    """(key..., count) rows for executemany."""
    return ((*key, count) for key, count in sums.items())


# Every public method turns sqlite3 errors into StoreError (see describe()).
for _name, _fn in list(vars(SQLiteStore).items()):
    if callable(_fn) and not _name.startswith("_") and _name not in ("transaction",
                                                                     "open_readonly"):
        setattr(SQLiteStore, _name, _mapped(_fn))
