"""Pure alert-rule evaluation: live counts in, notices and mails out.

Nothing here reads the clock, touches a file or sends anything: the caller
passes ``now`` (float Unix seconds) and the counts, and gets back a new
:class:`AlertState` plus what should be mailed. :mod:`trafficthreshold.alerts.store`
persists the state and queues the mails; :mod:`trafficthreshold.alerts.mail`
delivers them.

The episode state machine, per rule
-----------------------------------

::

            count >= threshold                         clear_minutes closed minutes
   idle  ----------------------->  episode open  ---------------------------------> idle
         (notice "alert",                |  ^        in a row below threshold
          at the tick it happens)        |  |        (notice "resolved" if rule.resolved)
                                         +--+
                     count >= threshold and `repeat` seconds since the last notice
                     (notice "reminder")

* The alert fires on the first tick whose count reaches the threshold, i.e.
  within a second of it happening, not at the end of the minute.
* A minute is *hot* when any tick saw the count at/above the threshold in it,
  or when its final (closed) count, if the caller passes it, is.  The episode
  ends once ``clear_minutes`` whole closed minutes have passed since the last
  hot minute: with ``clear_minutes = 5`` and a last hot minute 12:05, the
  "resolved" notice goes out on the first tick of 12:11.
* Reminders only go out while the count is at/above the threshold again.

Storm control (:func:`plan_mails`)
----------------------------------

* Notices produced by one evaluation (one tick, so the same second) going to
  the same sender and set of recipients become **one** mail.
* At most ``max_per_hour`` mails are planned in any sliding hour.  A mail over
  the cap is not planned; its notices are counted per recipient group.  The
  next mail that group is allowed carries the count (the templates print
  "N further alerts were suppressed"); if that group has nothing new to say
  when room frees up, a single "N alerts suppressed" mail is planned instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Protocol, Sequence

log = logging.getLogger("trafficthreshold.alerts")

#: Length of the sliding window of the mail cap, in seconds.
CAP_WINDOW = 3600.0

#: (account, event, window) -> the count the rule compares with its threshold.
CountKey = tuple[str, str, str]
Counts = Mapping[CountKey, int]
#: (account, event) -> {epoch minute: final count of that closed minute}.
Closed = Mapping[tuple[str, str], Mapping[int, int]]


class Rule(Protocol):
    """What evaluation reads from an ``[[alert]]`` rule (duck-typed, read-only).

    :class:`trafficthreshold.config.AlertRule` is one; tests use
    :class:`types.SimpleNamespace`.
    """

    @property
    def name(self) -> str: ...
    @property
    def account(self) -> str: ...
    @property
    def event(self) -> str: ...
    @property
    def threshold(self) -> int: ...
    @property
    def window(self) -> str: ...  # "minute" or "60s"
    @property
    def to(self) -> Sequence[str]: ...
    @property
    def sender(self) -> str: ...  # "" = the mail configuration's
    @property
    def repeat(self) -> float: ...  # seconds between reminders, 0 = none
    @property
    def resolved(self) -> bool: ...
    @property
    def clear_minutes(self) -> int: ...


def epoch_minute(now: float) -> int:
    """The epoch minute containing ``now`` (see docs/architecture.rst)."""
    return int(now // 60)


def count_keys(rules: Iterable[Rule]) -> set[CountKey]:
    """The (account, event, window) counts the caller must pass for ``rules``."""
    return {(r.account, r.event, r.window) for r in rules}


# --------------------------------------------------------------------------
# Data: state, notices, mails.  All immutable; the functions below return
# new objects, so ``old_state == new_state`` tells whether to persist.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    """An open alert episode of one rule."""

    started: float  #: ``now`` of the tick that fired the alert
    start_minute: int  #: epoch minute of that tick
    last_hot_minute: int  #: last epoch minute at/above the threshold
    peak: int  #: highest count seen during the episode
    peak_minute: int  #: epoch minute of the peak
    last_notice: float  #: ``now`` of the last alert or reminder
    reminders: int = 0  #: reminders sent so far


#: (sender, recipients): mails are grouped and capped per recipient group.
Group = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class AlertState:
    """Everything evaluation remembers between ticks (persisted as JSON)."""

    episodes: Mapping[str, Episode] = field(default_factory=dict)  # by rule name
    sent: tuple[float, ...] = ()  #: times of mails planned in the last hour
    suppressed: tuple[tuple[str, tuple[str, ...], int], ...] = ()  #: per group


@dataclass(frozen=True)
class Notice:
    """One thing to tell: an alert, a reminder or a resolution."""

    kind: str  #: "alert", "reminder" or "resolved"
    rule: str
    account: str
    event: str
    window: str
    threshold: int
    count: int  #: the count that triggered it (resolved: the count now)
    minute: int  #: epoch minute ``count`` belongs to
    at: float  #: ``now`` of the tick
    started: float  #: start of the episode
    ended: float | None  #: resolved: end of the last hot minute
    peak: int
    peak_minute: int
    reminders: int
    to: tuple[str, ...]
    sender: str  #: "" = the mail configuration's sender


@dataclass(frozen=True)
class Mail:
    """One mail to plan: notices grouped for one sender and recipient set."""

    sender: str
    to: tuple[str, ...]
    notices: tuple[Notice, ...]
    suppressed: int  #: notices suppressed by the cap before this mail
    at: float

    @property
    def kind(self) -> str:
        """Template family: "alert", "resolved" or "suppressed"."""
        if not self.notices:
            return "suppressed"
        if all(n.kind == "resolved" for n in self.notices):
            return "resolved"
        return "alert"


@dataclass(frozen=True)
class MailContext:
    """What the supervisor knew at the tick, shown in the mail."""

    host: str = "localhost"
    #: busiest accounts this minute; () = none has a count of its own (only
    #: the total is counted); None = not read for this mail
    top_accounts: tuple[tuple[str, int], ...] | None = None
    throttle_level: int | None = None
    dashboard_url: str = ""
    max_per_hour: int = 20


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def evaluate(
    rules: Iterable[Rule],
    counts: Counts,
    now: float,
    state: AlertState,
    closed: Closed | None = None,
) -> tuple[AlertState, list[Notice]]:
    """Run every rule once; return the new state and the notices to send.

    ``counts`` maps (account, event, window) to the live count of that window
    (the current clock minute for "minute", the last 60 s for "60s"); a
    missing key counts as 0.  ``closed`` optionally gives the final counts of
    recently closed minutes per (account, event) — e.g. the last
    ``clear_minutes + 1`` minutes from the segment — so that hits in the last
    second of a minute, or minutes the daemon did not tick through (a
    restart), are taken into account.  Without it the counts seen on ticks
    are all there is to go on.
    """
    minute = epoch_minute(now)
    episodes: dict[str, Episode] = {}
    notices: list[Notice] = []
    for rule in rules:
        count = counts.get((rule.account, rule.event, rule.window), 0)
        history = (closed or {}).get((rule.account, rule.event), {})
        episode, notice = _evaluate_rule(
            rule, count, history, now, minute, state.episodes.get(rule.name)
        )
        if episode is not None:
            episodes[rule.name] = episode
        if notice is not None:
            notices.append(notice)
    for gone in sorted(set(state.episodes) - {r.name for r in rules}):
        log.info("rule %s no longer exists: closing its episode silently", gone)
    return replace(state, episodes=episodes), notices


def _evaluate_rule(
    rule: Rule,
    count: int,
    history: Mapping[int, int],
    now: float,
    minute: int,
    episode: Episode | None,
) -> tuple[Episode | None, Notice | None]:
    """One rule, one tick: (episode after the tick, notice or None)."""
    if episode is None:
        return _maybe_fire(rule, count, history, now, minute)
    episode = _observe(episode, rule.threshold, count, history, minute)
    if minute - 1 - episode.last_hot_minute >= rule.clear_minutes:
        log.info("rule %s: resolved after %d quiet minutes", rule.name, rule.clear_minutes)
        notice = _notice("resolved", rule, episode, count, minute, now) if rule.resolved else None
        return None, notice
    if count >= rule.threshold and _reminder_due(rule, episode, now):
        episode = replace(episode, last_notice=now, reminders=episode.reminders + 1)
        log.info("rule %s: still at %d >= %d, reminder", rule.name, count, rule.threshold)
        return episode, _notice("reminder", rule, episode, count, minute, now)
    return episode, None


def _maybe_fire(
    rule: Rule, count: int, history: Mapping[int, int], now: float, minute: int
) -> tuple[Episode | None, Notice | None]:
    """Open an episode if the live count, or the minute that just closed, is hot.

    The closed previous minute matters for the "minute" window: hits in its
    last second after the last tick are only visible in its final count.
    """
    if count < rule.threshold:
        previous = history.get(minute - 1, 0)
        if previous < rule.threshold:
            return None, None
        count, minute = previous, minute - 1
    episode = Episode(
        started=now,
        start_minute=minute,
        last_hot_minute=minute,
        peak=count,
        peak_minute=minute,
        last_notice=now,
    )
    log.warning(
        "rule %s: %s %s at %d per minute >= %d: alert",
        rule.name, rule.account, rule.event, count, rule.threshold,
    )
    return episode, _notice("alert", rule, episode, count, minute, now)


def _observe(
    episode: Episode, threshold: int, count: int, history: Mapping[int, int], minute: int
) -> Episode:
    """Fold this tick's count and any closed-minute counts into the episode."""
    seen = [(minute, count)] + [
        (m, c) for m, c in history.items() if episode.start_minute <= m < minute
    ]
    hot, peak, peak_minute = episode.last_hot_minute, episode.peak, episode.peak_minute
    for m, c in seen:
        if c >= threshold:
            hot = max(hot, m)
        if c > peak:
            peak, peak_minute = c, m
    return replace(episode, last_hot_minute=hot, peak=peak, peak_minute=peak_minute)


def _reminder_due(rule: Rule, episode: Episode, now: float) -> bool:
    """A reminder is due ``repeat`` seconds after the last notice (0 = never)."""
    return rule.repeat > 0 and now - episode.last_notice >= rule.repeat


def _notice(
    kind: str, rule: Rule, episode: Episode, count: int, minute: int, now: float
) -> Notice:
    ended = None
    if kind == "resolved":
        # The episode ends with its last hot minute; never before it started.
        ended = max(episode.started, (episode.last_hot_minute + 1) * 60.0)
    return Notice(
        kind=kind,
        rule=rule.name,
        account=rule.account,
        event=rule.event,
        window=rule.window,
        threshold=rule.threshold,
        count=count,
        minute=minute,
        at=now,
        started=episode.started,
        ended=ended,
        peak=episode.peak,
        peak_minute=episode.peak_minute,
        reminders=episode.reminders,
        to=tuple(rule.to),
        sender=rule.sender,
    )


# --------------------------------------------------------------------------
# Grouping and the hourly cap
# --------------------------------------------------------------------------


def plan_mails(
    notices: Sequence[Notice],
    now: float,
    state: AlertState,
    max_per_hour: int,
    default_sender: str,
) -> tuple[AlertState, list[Mail]]:
    """Group ``notices`` (all from one tick) into mails and apply the cap.

    ``max_per_hour <= 0`` means no cap.  Returns ``state`` itself when
    nothing changed, so the caller can skip persisting.
    """
    if not notices and not state.suppressed:
        return state, []
    sent = [t for t in state.sent if now - t < CAP_WINDOW]
    pending: dict[Group, int] = {(s, to): n for s, to, n in state.suppressed}

    def room() -> bool:
        return max_per_hour <= 0 or len(sent) < max_per_hour

    mails: list[Mail] = []
    for (sender, to), group in _group(notices, default_sender).items():
        if room():
            mails.append(Mail(sender, to, tuple(group), pending.pop((sender, to), 0), now))
            sent.append(now)
        else:
            pending[(sender, to)] = pending.get((sender, to), 0) + len(group)
            log.warning(
                "mail cap of %d an hour reached: suppressed %d notice(s) to %s",
                max_per_hour, len(group), ", ".join(to),
            )
    # Groups with suppressed notices but nothing new: one summary mail each,
    # as soon as the sliding hour has room again.
    for (sender, to) in list(pending):
        if (sender, to) in {(m.sender, m.to) for m in mails} or not room():
            continue
        mails.append(Mail(sender, to, (), pending.pop((sender, to)), now))
        sent.append(now)
    if not mails and pending == dict(((s, to), n) for s, to, n in state.suppressed):
        return state, []
    suppressed = tuple((s, to, n) for (s, to), n in pending.items())
    return replace(state, sent=tuple(sent), suppressed=suppressed), mails


def _group(notices: Sequence[Notice], default_sender: str) -> dict[Group, list[Notice]]:
    """Notices by (sender, sorted unique recipients), in first-seen order."""
    groups: dict[Group, list[Notice]] = {}
    for notice in notices:
        key = (notice.sender or default_sender, tuple(sorted(set(notice.to))))
        groups.setdefault(key, []).append(notice)
    return groups


def step(
    rules: Sequence[Rule],
    counts: Counts,
    now: float,
    state: AlertState,
    *,
    max_per_hour: int,
    default_sender: str,
    closed: Closed | None = None,
) -> tuple[AlertState, list[Mail]]:
    """:func:`evaluate` then :func:`plan_mails`: one tick, start to finish."""
    state, notices = evaluate(rules, counts, now, state, closed)
    return plan_mails(notices, now, state, max_per_hour, default_sender)


# --------------------------------------------------------------------------
# JSON (for the alert store).  Plain dicts and lists only.
# --------------------------------------------------------------------------


def state_to_json(state: AlertState) -> dict[str, Any]:
    return {
        "episodes": {name: vars(ep) for name, ep in state.episodes.items()},
        "sent": list(state.sent),
        "suppressed": [[s, list(to), n] for s, to, n in state.suppressed],
    }


def state_from_json(data: Mapping[str, Any]) -> AlertState:
    return AlertState(
        episodes={name: Episode(**ep) for name, ep in data.get("episodes", {}).items()},
        sent=tuple(data.get("sent", ())),
        suppressed=tuple((s, tuple(to), n) for s, to, n in data.get("suppressed", ())),
    )


def mail_to_json(mail: Mail) -> dict[str, Any]:
    return {
        "sender": mail.sender,
        "to": list(mail.to),
        "notices": [dict(vars(n), to=list(n.to)) for n in mail.notices],
        "suppressed": mail.suppressed,
        "at": mail.at,
    }


def mail_from_json(data: Mapping[str, Any]) -> Mail:
    notices = tuple(Notice(**dict(n, to=tuple(n["to"]))) for n in data["notices"])
    return Mail(data["sender"], tuple(data["to"]), notices, data["suppressed"], data["at"])


def context_to_json(context: MailContext) -> dict[str, Any]:
    top = context.top_accounts
    return dict(vars(context), top_accounts=None if top is None else [list(t) for t in top])


def context_from_json(data: Mapping[str, Any]) -> MailContext:
    raw = data.get("top_accounts")
    top = None if raw is None else tuple((str(a), int(c)) for a, c in raw)
    return MailContext(**dict(data, top_accounts=top))
