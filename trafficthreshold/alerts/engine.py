"""One alert engine over a declared mail queue.

Host rules and farm rules run the same sequence each tick (the supervisor's
second for host rules, the farm thread's second for farm rules, while it
leads): :func:`alerts.step` over the counts, compare with the last state,
build the mails' :class:`~.alerts.MailContext`, save the new state and
queue its mails in one write, then wake the delivery worker.  That
sequence is :class:`AlertEngine`; where the state and the mails are kept is
a :class:`MailQueue`:

* :class:`~.store.AlertStore`: host rules, the ``alert_*`` tables of
  this host's SQLite file (one transaction per save);
* :class:`~.farm.FencedQueue`: farm rules, the farm's Redis, every
  write fenced with the lease the host leads under
  (:class:`~.farm.FarmAlertStore`; the lease and the takeover rule
  live in :class:`~.farm.FarmAlerts`).

The delivery worker (:class:`~.mail.Outbox`) uses the same interface:
claim a mail before the MTA gets it, record its answer, and never send
again a mail found claimed when a new worker (or a new leader) starts.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from trafficthreshold import alerts
from trafficthreshold.alerts import AlertState, Closed, Counts, Mail, MailContext, Rule

if TYPE_CHECKING:
    from trafficthreshold.alerts.store import QueuedMail

log = logging.getLogger("trafficthreshold.alertengine")

#: ``mail.max_per_hour`` when the mail configuration has none.
MAX_PER_HOUR = 20

TopAccounts = Sequence[tuple[str, int]] | Callable[[], Sequence[tuple[str, int]]] | None


class MailQueue(Protocol):
    """Where an alert engine keeps its state and queues its mails, and where
    the delivery worker takes them from.

    Exactly-once rules every implementation keeps: :meth:`save` writes the
    state and its mails together or not at all; a mail is handed to the
    MTA only after :meth:`claim` marked it ``sending``; a mail found
    ``sending`` by :meth:`resolve_interrupted` (its sender died before the
    MTA's answer was recorded) is marked failed and never sent again.
    """

    #: Where the queue is, for logs ("the database <path>", "Redis (...)").
    where: str
    #: Errors of :meth:`save` after which nothing was written, so the
    #: engine keeps its old state and evaluates the same counts again next
    #: tick.  Any other error propagates: the save may have run (a reply
    #: lost), and the caller must read the state back before going on.
    UNSAVED_ERRORS: tuple[type[BaseException], ...]

    def load_state(self) -> AlertState: ...
    def save(self, state: AlertState, mails: Sequence[tuple[Mail, MailContext]] = (), *,
             now: float) -> list[int]: ...
    def next_due(self, now: float) -> QueuedMail | None: ...
    def claim(self, id: int, now: float) -> bool: ...
    def resolve_interrupted(self) -> list[int]: ...
    def mark_sent(self, id: int, now: float) -> None: ...
    def mark_failed(self, id: int, now: float, error: str, retry_at: float | None) -> None: ...
    def close(self) -> None: ...


def default_sender(mail_config: Any, host: str) -> str:
    """The From of alert mails: ``mail.sender``, else
    ``trafficthreshold@<host>`` (as :func:`config.default_sender`)."""
    return getattr(mail_config, "sender", "") or f"trafficthreshold@{host}"


class AlertEngine:
    """Runs the rules each tick and persists what changed in its queue.

    The supervisor makes one at start-up for the host rules (it loads the
    saved state, so a restart continues open episodes), calls :meth:`tick`
    every second and :meth:`reload` on SIGHUP.  The farm's
    :class:`~.farm.FarmAlerts` makes one for the farm rules with
    ``load=False``: it sets :attr:`queue` to the fenced queue of the lease
    it leads under and :attr:`state` to None when it stops leading (the
    state is read again from the queue at the next tick).  Delivery is not
    done here: ``on_queued`` (the outbox's ``wake``) is called after mails
    were queued, and the outbox's worker thread sends them.
    """

    def __init__(
        self,
        queue: MailQueue,
        rules: Sequence[Rule],
        mail_config: Any,
        *,
        host: str | None = None,
        dashboard_url: str | None = None,
        on_queued: Callable[[], None] | None = None,
        load: bool = True,
    ) -> None:
        if not host:
            from trafficthreshold.config import default_host
            host = default_host()
        self.queue = queue
        self.host = host
        self.on_queued = on_queued
        self.rules: Sequence[Rule] = ()
        self.mail_config: Any = None
        self.dashboard_url = ""
        self.max_per_hour = MAX_PER_HOUR
        self.default_sender = ""
        self.reload(rules, mail_config, dashboard_url)
        #: The last saved state; None: read it from the queue at the next tick.
        self.state: AlertState | None = queue.load_state() if load else None

    @property
    def store(self) -> MailQueue:
        """The queue (its older name, for the host's AlertStore)."""
        return self.queue

    def reload(self, rules: Sequence[Rule], mail_config: Any,
               dashboard_url: str | None = None) -> None:
        """New configuration (SIGHUP).  Open episodes of kept rules go on.

        ``dashboard_url``: the link for the mails (the supervisor passes
        ``config.dashboard_link``); default ``mail_config.dashboard_url``.
        """
        self.rules = tuple(rules)
        self.mail_config = mail_config
        self.max_per_hour = int(getattr(mail_config, "max_per_hour", MAX_PER_HOUR))
        self.default_sender = default_sender(mail_config, self.host)
        if dashboard_url is None:
            dashboard_url = getattr(mail_config, "dashboard_url", "") or ""
        self.dashboard_url = dashboard_url

    def tick(
        self,
        now: float,
        counts: Counts,
        *,
        closed: Closed | None = None,
        top_accounts: TopAccounts = None,
        throttle_level: int | None = None,
    ) -> list[int]:
        """Evaluate every rule at ``now``; return the ids of mails queued.

        Never blocks on the MTA.  Writes to the queue only when the state
        changed (an alert, a reminder, a new peak or hot minute, a
        resolution).  An error of the queue's ``UNSAVED_ERRORS`` is logged
        and the tick retried on the next call; any other error propagates
        (the state in memory is kept as it was).  ``top_accounts`` may be a
        function: it is called only when a mail is queued, so a caller need
        not read them every second of an episode.  None (the default): not
        read for this tick, and the mail says so; an empty sequence: read,
        and no account has a count of its own (only the total is counted),
        which the mail says too.
        """
        if self.state is None:
            self.state = self.queue.load_state()
        if not self.rules and not self.state.episodes:
            return []
        new_state, mails = alerts.step(
            self.rules, counts, now, self.state, max_per_hour=self.max_per_hour,
            default_sender=self.default_sender, closed=closed,
        )
        if new_state == self.state and not mails:
            return []
        queued: list[tuple[Mail, MailContext]] = []
        if mails:  # the context (the top accounts: a read of the segment) only for mails
            if callable(top_accounts):
                top_accounts = top_accounts()
            context = MailContext(
                host=self.host,
                top_accounts=None if top_accounts is None else
                tuple((str(a), int(c)) for a, c in top_accounts),
                throttle_level=throttle_level,
                dashboard_url=self.dashboard_url,
                max_per_hour=self.max_per_hour,
            )
            queued = [(m, context) for m in mails]
        queue = self.queue
        try:
            ids = queue.save(new_state, queued, now=now)
        except queue.UNSAVED_ERRORS as exc:
            # Keep the old state in memory: the next tick evaluates the same
            # counts again and retries the save, so nothing is lost or doubled.
            log.error("cannot save alert state to %s: %s; retrying next tick", queue.where, exc)
            return []
        self.state = new_state
        if ids:
            log.info("queued %d alert mail(s) in %s: ids %s", len(ids), queue.where, ids)
            if self.on_queued is not None:
                self.on_queued()
        return ids
