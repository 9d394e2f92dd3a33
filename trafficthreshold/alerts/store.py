"""Alert state and the outgoing mail queue, in SQLite.

The tables live in the same database file as the period store
(:mod:`trafficthreshold.store`) and all start with ``alert_``.  The period
store owns ``PRAGMA user_version``; the alert tables keep their own schema
version in ``alert_meta(key, value)`` under the key ``schema_version``.

Tables::

  alert_meta    (key TEXT PRIMARY KEY, value TEXT)       schema_version, ...
  alert_state   (key TEXT PRIMARY KEY, value TEXT)       'engine' -> AlertState as JSON
  alert_outbox  one row per mail: payload (JSON of the Mail and its
                MailContext), status pending/sending/sent/failed, attempts,
                next_attempt, sent_at, last_error, claimed_at

Exactly-once rules:

* The state change that produces a mail and the mail's row are written in
  **one transaction** (:meth:`AlertStore.save`).  A crash either loses both
  (the next tick sees the same counts and fires again) or keeps both (the
  restarted daemon knows the episode and the queued mail goes out once).
* A mail goes to the MTA **at most once per row** (so per Message-ID).
  Before handing a mail over, the delivery worker *claims* its row
  (:meth:`AlertStore.claim`: status ``sending`` and ``claimed_at``, in a
  committed transaction); a row it cannot claim (the database is locked) is
  not sent on that pass.  Only ``pending`` rows are ever sent, so a row in
  ``sending`` is never handed over again, whatever happens to the write
  that records the MTA's answer: the worker keeps retrying that write
  (:meth:`mark_sent` / :meth:`mark_failed`) until the database takes it.
* The restart rule: a row still ``sending`` when a new outbox starts was
  claimed by a process that died before recording the MTA's answer.  The MTA
  may or may not have it, so :meth:`AlertStore.resolve_interrupted` marks it
  ``failed`` with a ``last_error`` that says so, logged at ERROR, and never
  sends it again.  No mail is ever sent twice; the price is that a crash in
  that window (the few milliseconds of one sendmail run) can leave one mail
  unsent, and the log and ``last_error`` name it.

Connections are per thread (sqlite3 objects must not be shared): the tick
loop uses one :class:`AlertStore`, the delivery worker opens its own on the
same path.  WAL lets the two work side by side; ``busy_timeout`` covers the
brief moments they both write.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import make_msgid
from typing import Any, Callable, Iterator, Sequence

from trafficthreshold import alerts
from trafficthreshold.store import sqlite as period_store
from trafficthreshold.alerts import AlertState, Mail, MailContext
from trafficthreshold.errors import TrafficThresholdError

log = logging.getLogger("trafficthreshold.alertstore")

#: Version of the alert_* tables written by this code.
SCHEMA_VERSION = 2

#: DDL of version 1, applied in one transaction to a database without it.
SCHEMA_V1 = [
    """CREATE TABLE IF NOT EXISTS alert_state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS alert_outbox (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        created      REAL    NOT NULL,
        kind         TEXT    NOT NULL,             -- alert / resolved / suppressed
        rules        TEXT    NOT NULL,             -- comma-separated rule names
        sender       TEXT    NOT NULL,
        recipients   TEXT    NOT NULL,             -- JSON list
        message_id   TEXT    NOT NULL,
        payload      TEXT    NOT NULL,             -- JSON: mail + context
        status       TEXT    NOT NULL DEFAULT 'pending',  -- pending / sent / failed
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL    NOT NULL,
        sent_at      REAL,
        last_error   TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS alert_outbox_due ON alert_outbox (status, next_attempt)",
]

#: Migrations: MIGRATIONS[n] lifts the alert tables from version n to n + 1.
MIGRATIONS: dict[int, list[str]] = {
    # 2: claimed_at, when a delivery attempt claimed the row (status 'sending').
    1: ["ALTER TABLE alert_outbox ADD COLUMN claimed_at REAL"],
}

STATUSES = ("pending", "sending", "sent", "failed")

#: last_error of a row found in 'sending' at start-up (see the restart rule).
INTERRUPTED = ("interrupted while handed to the MTA (claimed at {claimed}): it may or may "
               "not have been delivered; not sent again, so that it cannot arrive twice: "
               "look for Message-ID {message_id} in the mail log")


class AlertStoreError(TrafficThresholdError):
    """The alert tables cannot be used (e.g. written by a newer version)."""


class AlertDatabaseError(AlertStoreError, sqlite3.DatabaseError):
    """A sqlite3 error of an :class:`AlertStore` method (a damaged, locked or
    unreadable file), its message naming the file and the recovery
    (:func:`trafficthreshold.store.sqlite.describe`).  Both ours (the daemon
    logs it as one line) and a sqlite3.Error (what the mail worker retries)."""


def _mapped(method: Any) -> Any:
    """Raise every sqlite3 error of an AlertStore method as AlertDatabaseError."""
    @functools.wraps(method)
    def wrapper(self: AlertStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except AlertDatabaseError:
            raise
        except sqlite3.Error as exc:
            raise AlertDatabaseError(period_store.describe(self.path, exc)) from exc
    return wrapper


@dataclass(frozen=True)
class QueuedMail:
    """One row of the outbox."""

    id: int
    created: float
    kind: str
    rules: tuple[str, ...]
    sender: str
    recipients: tuple[str, ...]
    message_id: str
    status: str
    attempts: int
    next_attempt: float
    sent_at: float | None
    last_error: str | None
    mail: Mail
    context: MailContext
    claimed_at: float | None = None  #: when the last delivery attempt claimed it


def connect(path: str) -> sqlite3.Connection:
    """Open ``path`` as the period store does (:func:`trafficthreshold.store.connect`), with
    rows by name, and synchronous=FULL: a committed alert state or queued
    mail survives a power cut too."""
    conn = period_store.connect(path, synchronous="FULL")
    conn.row_factory = sqlite3.Row
    return conn


def open_reader(path: str) -> sqlite3.Connection:
    """A read-only connection to the alert tables of the file ``path`` (the
    API's): nothing written, no lock the writer waits for; StoreError
    naming the file when it cannot be opened."""
    return period_store.connect_readonly(path)


def read_state(conn: sqlite3.Connection) -> AlertState | None:
    """The saved :class:`AlertState` through any connection to the file
    (read-only is enough): an empty one if none was saved yet, None if the
    alert tables do not exist (the daemon never ran alerts)."""
    try:
        row = conn.execute("SELECT value FROM alert_state WHERE key = 'engine'").fetchone()
    except sqlite3.OperationalError:
        return None  # no such table
    if row is None:
        return AlertState()
    # JSON no writer wrote is a damaged file (Malformed), never a 500.
    return period_store.parsed(row[0], lambda text: alerts.state_from_json(json.loads(text)),
                               "alert_state")


class AlertStore:
    """The alert_* tables of one database file: the host rules'
    :class:`~trafficthreshold.alerts.engine.MailQueue`.  One instance per
    thread."""

    #: A failed transaction wrote nothing: the engine retries next tick.
    UNSAVED_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, path: str, busy_timeout: float | None = None) -> None:
        """``busy_timeout``: seconds to wait for another writer (default:
        the period store's, 5 s)."""
        self.path = path
        self.where = path
        try:
            self._conn = connect(path)
        except period_store.StoreError as exc:
            raise AlertDatabaseError(str(exc)) from exc
        try:
            if busy_timeout is not None:
                self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AlertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (:func:`trafficthreshold.store.transaction`)."""
        with period_store.transaction(self._conn) as conn:
            yield conn

    # -- schema --------------------------------------------------------------

    def _migrate(self) -> None:
        with self.transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS alert_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            row = db.execute("SELECT value FROM alert_meta WHERE key = 'schema_version'").fetchone()
            version = _schema_version(row["value"]) if row else 0
            if version > SCHEMA_VERSION:
                raise AlertStoreError(
                    f"{self.path}: alert tables have schema version {version}, this "
                    f"trafficthreshold knows up to {SCHEMA_VERSION}: upgrade trafficthreshold"
                )
            statements = list(SCHEMA_V1) if version == 0 else []
            statements += [s for v in range(max(version, 1), SCHEMA_VERSION)
                           for s in MIGRATIONS[v]]
            for statement in statements:
                db.execute(statement)
            if version != SCHEMA_VERSION:
                log.info("alert tables: schema version %d -> %d", version, SCHEMA_VERSION)
                db.execute(
                    "INSERT OR REPLACE INTO alert_meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )

    def schema_version(self) -> int:
        row = self._conn.execute(
            "SELECT value FROM alert_meta WHERE key = 'schema_version'"
        ).fetchone()
        return _schema_version(row["value"])

    # -- state ---------------------------------------------------------------

    def load_state(self) -> AlertState:
        """The last saved :class:`AlertState` (an empty one the first time)."""
        state = read_state(self._conn)  # the tables exist: _migrate made them
        return AlertState() if state is None else state

    def save(
        self,
        state: AlertState,
        mails: Sequence[tuple[Mail, MailContext]] = (),
        *,
        now: float,
        message_id: Callable[[str], str] | None = None,
    ) -> list[int]:
        """Save ``state`` and queue ``mails`` in one transaction; return the ids.

        ``message_id(host)`` makes each mail's Message-ID (stored so that a
        retry re-sends the same one); default :func:`email.utils.make_msgid`.
        """
        make_id = message_id or new_message_id
        ids: list[int] = []
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO alert_state (key, value) VALUES ('engine', ?)",
                (json.dumps(alerts.state_to_json(state)),),
            )
            for mail, context in mails:
                ids.append(self._insert_mail(db, mail, context, make_id(context.host), now))
        return ids

    @staticmethod
    def _insert_mail(
        db: sqlite3.Connection, mail: Mail, context: MailContext, message_id: str, now: float
    ) -> int:
        payload = {"mail": alerts.mail_to_json(mail), "context": alerts.context_to_json(context)}
        rules = ",".join(dict.fromkeys(n.rule for n in mail.notices))
        cursor = db.execute(
            """INSERT INTO alert_outbox
               (created, kind, rules, sender, recipients, message_id, payload, next_attempt)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (now, mail.kind, rules, mail.sender, json.dumps(list(mail.to)), message_id,
             json.dumps(payload), now),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    # -- queue ---------------------------------------------------------------

    def next_due(self, now: float) -> QueuedMail | None:
        """The oldest pending mail whose next attempt is due at ``now``."""
        row = self._conn.execute(
            """SELECT * FROM alert_outbox WHERE status = 'pending' AND next_attempt <= ?
               ORDER BY next_attempt, id LIMIT 1""",
            (now,),
        ).fetchone()
        return _queued(row) if row else None

    def next_wakeup(self) -> float | None:
        """When the earliest pending mail becomes due (None: queue empty)."""
        row = self._conn.execute(
            "SELECT MIN(next_attempt) AS t FROM alert_outbox WHERE status = 'pending'"
        ).fetchone()
        return None if row["t"] is None else period_store.parsed(
            row["t"], period_store.moment_of, "alert_outbox next_attempt")

    def claim(self, id: int, now: float) -> bool:
        """Mark the pending row ``id`` as being sent (status ``sending``,
        ``claimed_at = now``) in a committed transaction; False if it is no
        longer pending.  Raises sqlite3.Error (e.g. the database is locked):
        then the mail must not be sent on this pass.  The caller must call
        this *before* handing the mail to the MTA."""
        with self.transaction() as db:
            cursor = db.execute(
                """UPDATE alert_outbox SET status = 'sending', claimed_at = ?
                   WHERE id = ? AND status = 'pending'""",
                (now, id),
            )
        return cursor.rowcount == 1

    def resolve_interrupted(self) -> list[int]:
        """Apply the restart rule (module docstring) to rows left ``sending``
        by a process that died: mark them failed, never re-send; return their
        ids.  Call once, before this process claims anything."""
        if self._conn.execute(
                "SELECT 1 FROM alert_outbox WHERE status = 'sending' LIMIT 1").fetchone() is None:
            return []  # the usual case: nothing to resolve, no write
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id, claimed_at, message_id FROM alert_outbox WHERE status = 'sending'"
            ).fetchall()
            for row in rows:
                error = INTERRUPTED.format(claimed=row["claimed_at"],
                                           message_id=row["message_id"])
                db.execute(
                    """UPDATE alert_outbox SET status = 'failed', attempts = attempts + 1,
                       last_error = ? WHERE id = ?""",
                    (error, row["id"]),
                )
                log.error("mail %d: %s", row["id"], error)
        return [row["id"] for row in rows]

    def mark_sent(self, id: int, now: float) -> None:
        """The MTA accepted mail ``id`` at ``now``."""
        with self.transaction() as db:
            db.execute(
                """UPDATE alert_outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1,
                   last_error = NULL WHERE id = ?""",
                (now, id),
            )

    def mark_failed(self, id: int, now: float, error: str, retry_at: float | None) -> None:
        """Record a failed attempt; retry at ``retry_at``, or never if None."""
        with self.transaction() as db:
            db.execute(
                """UPDATE alert_outbox SET attempts = attempts + 1, last_error = ?,
                   status = ?, next_attempt = ? WHERE id = ?""",
                (error, "failed" if retry_at is None else "pending",
                 now if retry_at is None else retry_at, id),
            )

    def get(self, id: int) -> QueuedMail | None:
        row = self._conn.execute("SELECT * FROM alert_outbox WHERE id = ?", (id,)).fetchone()
        return _queued(row) if row else None

    def list(self, status: str | None = None, limit: int = 100) -> list[QueuedMail]:
        """Newest mails first, optionally only one status (for the CLI)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        rows = self._conn.execute(
            f"SELECT * FROM alert_outbox {where} ORDER BY id DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return [_queued(row) for row in rows]

    def prune(self, before: float) -> int:
        """Delete sent and failed mails created before ``before``; return how many."""
        with self.transaction() as db:
            cursor = db.execute(  # never a pending or 'sending' row
                "DELETE FROM alert_outbox WHERE status IN ('sent', 'failed') AND created < ?",
                (before,),
            )
        return cursor.rowcount


def new_message_id(host: str, idstring: str = "trafficthreshold") -> str:
    """A fresh ``<...@host>`` Message-ID; odd characters dropped from ``host``."""
    domain = "".join(ch for ch in host if ch.isalnum() or ch in ".-") or "localhost"
    return make_msgid(idstring, domain=domain)


def _schema_version(value: Any) -> int:
    """alert_meta's schema_version; Malformed (a damaged file) if it is not a number."""
    return period_store.parsed(value, int, "alert_meta schema_version")


def _queued(row: sqlite3.Row) -> QueuedMail:
    """The outbox row as a QueuedMail; Malformed if its JSON (payload,
    recipients) is not what a writer wrote: a damaged file."""
    return period_store.parsed(row["payload"], lambda _payload: _queued_from(row),
                               f"alert_outbox row {row['id']!r}")


def _queued_from(row: sqlite3.Row) -> QueuedMail:
    payload: dict[str, Any] = json.loads(row["payload"])
    return QueuedMail(
        id=row["id"],
        created=row["created"],
        kind=row["kind"],
        rules=tuple(r for r in row["rules"].split(",") if r),
        sender=row["sender"],
        recipients=tuple(json.loads(row["recipients"])),
        message_id=row["message_id"],
        status=row["status"],
        attempts=row["attempts"],
        next_attempt=row["next_attempt"],
        sent_at=row["sent_at"],
        last_error=row["last_error"],
        mail=alerts.mail_from_json(payload["mail"]),
        context=alerts.context_from_json(payload["context"]),
        claimed_at=row["claimed_at"],
    )


# Every method turns sqlite3 errors into AlertDatabaseError (see describe()).
for _name, _fn in list(vars(AlertStore).items()):
    if callable(_fn) and (_name == "__init__" or not _name.startswith("_")) \
            and _name not in ("transaction", "close"):
        setattr(AlertStore, _name, _mapped(_fn))
