"""Farm rules (``[[alert]] scope = "farm"``): evaluated by the holder of the
farm's leader lease only, their state and mail queue in Redis.

The farm thread (:mod:`trafficthreshold.farmsync`) calls
:meth:`FarmAlerts.step` after each publication and read of the live counts:
it renews the lease (:class:`trafficthreshold.farm.Lease`), and while it
leads, runs the farm rules (:func:`trafficthreshold.alerts.step`, the same
rules as a host's: one mail per episode, reminders, resolution, the hourly
cap) over the farm's totals of that reading.  The tick never waits for any
of it.  :class:`FarmOutbox` delivers the queued mails on a thread of its own
(the mailer's :class:`~trafficthreshold.alerts.mail.Outbox`, over Redis), only
while this host leads.

Keys in Redis (``{prefix}`` is ``[store] prefix``)::

    {prefix}~farmalert:state     string: the farm rules' AlertState (JSON)
    {prefix}~farmalert:seq       INCR: the last mail id
    {prefix}~farmalert:mail:{id} hash: one queued mail (the fields of an
                                 alert_outbox row, plus claimed_by: the lease
                                 value of the host that claimed it)
    {prefix}~farmalert:due       sorted set: pending mail ids by next attempt
    {prefix}~farmalert:sending   set: ids claimed and handed to the MTA
    {prefix}~farmalert:mails     sorted set: the mail ids of the last KEEP_DONE
                                 seconds by creation time (trimmed by each save)

Exactly once, as in :mod:`trafficthreshold.alerts.store`, with the lease as
the fence: every write is a script that first checks that the lease still
holds this host's value (``"{host} {token}"``), so a host that lost it (cut
off, paused past its lease, replaced) writes nothing and sends nothing.

* The state change and the mails it produces are written in one script
  (:meth:`FarmAlertStore.save`).  A Redis error leaves us not knowing whether
  it ran: the state is read again from Redis before the next evaluation.
* A mail is claimed (status ``sending``, fenced) before the MTA gets it;
  only ``pending`` mails are claimed.
* A new leader (a new token) first marks every mail still ``sending`` as
  failed (the old leader died between claim and answer: it may or may not
  have gone out), logged at ERROR, never sent again; then it reads the state
  and sends what is pending.  Sent and failed mails expire after
  :data:`KEEP_DONE` seconds.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Sequence

from trafficthreshold import alerts, farm
from trafficthreshold.alerts import AlertState, Mail, MailContext, Rule
from trafficthreshold.alerts.engine import AlertEngine
from trafficthreshold.alerts.store import INTERRUPTED, QueuedMail, new_message_id
from trafficthreshold.errors import TrafficThresholdError
from trafficthreshold.alerts.mail import Outbox

log = logging.getLogger("trafficthreshold.farmalerts")

#: Seconds shutdown waits for a farm mail being handed to the MTA: one that
#: takes longer is left to its sendmail, and the next leader marks it
#: interrupted (logged, not sent again).
STOP_WAIT = 2.0
#: Sent and failed mails are kept this long in Redis (seconds), for the log's
#: Message-IDs and ``status``; pending and sending ones are never expired.
KEEP_DONE = 7 * 86_400


class FencedOut(TrafficThresholdError):
    """This host does not hold the lease (any more): nothing was written."""


# KEYS: lease, state, seq, due, mails.  ARGV: lease value, state JSON, now,
# mail key prefix, then 6 fields per mail (kind, rules, sender, recipients,
# message_id, payload).  Returns {1, id...}, or {0} when fenced out.  Mails
# created more than KEEP_DONE seconds ago leave the index (the sent and
# failed ones have expired by then).
SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
redis.call('SET', KEYS[2], ARGV[2])
local out = {1}
for i = 5, #ARGV, 6 do
  local id = redis.call('INCR', KEYS[3])
  redis.call('HSET', ARGV[4] .. id, 'created', ARGV[3], 'kind', ARGV[i], 'rules', ARGV[i + 1],
             'sender', ARGV[i + 2], 'recipients', ARGV[i + 3], 'message_id', ARGV[i + 4],
             'payload', ARGV[i + 5], 'status', 'pending', 'attempts', 0,
             'next_attempt', ARGV[3])
  redis.call('ZADD', KEYS[4], ARGV[3], id)
  redis.call('ZADD', KEYS[5], ARGV[3], id)
  out[#out + 1] = id
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. (tonumber(ARGV[3]) - KEEP_DONE))
return out
"""

SAVE = SAVE.replace("KEEP_DONE", str(KEEP_DONE))

# KEYS: lease, mail, due, sending.  ARGV: lease value, id, now.
# -1 fenced out, 0 not pending, 1 claimed.
CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[2], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[2], 'status', 'sending', 'claimed_at', ARGV[3], 'claimed_by', ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[2])
return 1
"""

# A claim whose reply was lost, undone by the leader that made it: the
# mail never reached the MTA (the claim did not return), so it goes back
# to the queue.  KEYS: mail, due, sending.  ARGV: lease value, id, now.
UNCLAIM = """
if redis.call('HGET', KEYS[1], 'claimed_by') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'status') ~= 'sending' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'pending', 'next_attempt', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[2])
return 1
"""

# KEYS: mail, sending.  ARGV: claimer's lease value, id, now, keep seconds.
# The MTA took it: recorded by the host that claimed it, lease or not (a
# fact; a new leader may have marked it failed as interrupted meanwhile).
MARK_SENT = """
if redis.call('HGET', KEYS[1], 'claimed_by') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'sent', 'sent_at', ARGV[3], 'last_error', '')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: mail, due, sending.  ARGV: claimer's lease value, id, error, retry at
# ("" = give up), keep seconds.  Only while the mail is still our claim.
MARK_FAILED = """
if redis.call('HGET', KEYS[1], 'claimed_by') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'status') ~= 'sending' then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SREM', KEYS[3], ARGV[2])
if ARGV[4] == '' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'last_error', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
else
  redis.call('HSET', KEYS[1], 'status', 'pending', 'last_error', ARGV[3],
             'next_attempt', ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
end
return 1
"""

# KEYS: lease, sending.  ARGV: lease value, mail key prefix, error template
# ({claimed}, {message_id}), keep seconds.  Returns {id, error} pairs, or
# false when fenced out.
RESOLVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local key = ARGV[2] .. id
  local claimed = redis.call('HGET', key, 'claimed_at') or '?'
  local mid = redis.call('HGET', key, 'message_id') or '?'
  local err = string.gsub(string.gsub(ARGV[3], '{claimed}', function() return claimed end),
                          '{message_id}', function() return mid end)
  if redis.call('HGET', key, 'status') == 'sending' then
    redis.call('HSET', key, 'status', 'failed', 'last_error', err)
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('EXPIRE', key, ARGV[4])
    out[#out + 1] = id
    out[#out + 1] = err
  end
  redis.call('SREM', KEYS[2], id)
end
return out
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FarmAlertStore:
    """The farm rules' state and mail queue in Redis (module docstring).
    Every write takes the lease value it is fenced with."""

    def __init__(self, client: Any, prefix: str = "track") -> None:
        self.client, self.prefix = client, prefix
        base = f"{prefix}~farmalert"
        self.lease_key = f"{prefix}~leader"
        self.state_key, self.seq_key = f"{base}:state", f"{base}:seq"
        self.mail_prefix = f"{base}:mail:"
        self.due_key, self.sending_key = f"{base}:due", f"{base}:sending"
        self.mails_key = f"{base}:mails"
        self._save = client.register_script(SAVE)
        self._claim = client.register_script(CLAIM)
        self._sent = client.register_script(MARK_SENT)
        self._failed = client.register_script(MARK_FAILED)
        self._resolve = client.register_script(RESOLVE)
        self._unclaim = client.register_script(UNCLAIM)

    # -- state ---------------------------------------------------------------

    def load_state(self) -> AlertState:
        raw = self.client.get(self.state_key)
        return AlertState() if raw is None else alerts.state_from_json(json.loads(raw))

    def save(self, lease: str, state: AlertState,
             mails: Sequence[tuple[Mail, MailContext]] = (), *, now: float,
             message_id: Callable[[str], str] | None = None) -> list[int]:
        """Save ``state`` and queue ``mails`` in one script, fenced by
        ``lease``; return the new mail ids.  Raises :class:`FencedOut`
        (nothing written) when the lease is not ``lease``."""
        make_id = message_id or new_message_id
        args: list[Any] = [lease, json.dumps(alerts.state_to_json(state)), repr(float(now)),
                           self.mail_prefix]
        for mail, context in mails:
            payload = {"mail": alerts.mail_to_json(mail),
                       "context": alerts.context_to_json(context)}
            args += [mail.kind, ",".join(dict.fromkeys(n.rule for n in mail.notices)),
                     mail.sender, json.dumps(list(mail.to)), make_id(context.host),
                     json.dumps(payload)]
        reply = self._save(keys=[self.lease_key, self.state_key, self.seq_key, self.due_key,
                                 self.mails_key], args=args)
        if not int(reply[0]):
            raise FencedOut("the farm's alert state was not saved: this host no longer "
                            "holds the leader lease")
        return [int(i) for i in reply[1:]]

    # -- queue ---------------------------------------------------------------

    def get(self, id: int) -> QueuedMail | None:
        raw = self.client.hgetall(f"{self.mail_prefix}{id}")
        return _queued(id, raw) if raw else None

    def next_due(self, now: float) -> QueuedMail | None:
        """The oldest pending mail due at ``now``."""
        for id in self.client.zrangebyscore(self.due_key, "-inf", now, start=0, num=1):
            return self.get(int(id))
        return None

    def next_wakeup(self) -> float | None:
        first = self.client.zrange(self.due_key, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def claim(self, lease: str, id: int, now: float) -> bool:
        """Mark pending mail ``id`` ``sending``, fenced by ``lease``; False
        if it is no longer pending.  Raises :class:`FencedOut` when this
        host does not hold the lease: then nothing may be sent."""
        key = f"{self.mail_prefix}{id}"
        try:
            done = int(self._claim(keys=[self.lease_key, key, self.due_key, self.sending_key],
                                   args=[lease, id, repr(float(now))]))
        except FencedOut:
            raise
        except Exception:
            # The claim may have run (its reply lost): read it back.  Ours:
            # it never reached the MTA, send it.  A read-back that fails
            # too raises; the caller puts it back (:meth:`unclaim`) later.
            status, claimed_by = self.client.hmget(key, "status", "claimed_by")
            if status is not None and _text(status) == "sending" \
                    and claimed_by is not None and _text(claimed_by) == lease:
                log.warning("farm mail %d: the claim's reply was lost; read back: claimed by "
                            "this host, sending it", id)
                return True
            raise
        if done < 0:
            raise FencedOut(f"farm mail {id} not sent: this host no longer holds the leader "
                            f"lease (the new leader sends it)")
        return done == 1

    def unclaim(self, lease: str, id: int, now: float) -> bool:
        """Put mail ``id`` back in the queue if it is still ``sending`` under
        our claim (``lease``): a claim whose reply and read-back were lost,
        so it never reached the MTA.  True if it was put back."""
        return bool(int(self._unclaim(keys=[f"{self.mail_prefix}{id}", self.due_key,
                                            self.sending_key],
                                      args=[lease, id, repr(float(now))])))

    def mark_sent(self, lease: str, id: int, now: float) -> None:
        self._sent(keys=[f"{self.mail_prefix}{id}", self.sending_key],
                   args=[lease, id, repr(float(now)), KEEP_DONE])

    def mark_failed(self, lease: str, id: int, now: float, error: str,
                    retry_at: float | None) -> None:
        self._failed(keys=[f"{self.mail_prefix}{id}", self.due_key, self.sending_key],
                     args=[lease, id, error, "" if retry_at is None else repr(float(retry_at)),
                           KEEP_DONE])

    def resolve_interrupted(self, lease: str) -> list[int]:
        """The takeover rule: mails still ``sending`` (claimed by a leader
        that died before the MTA's answer was recorded) become failed, are
        logged at ERROR and never sent again; fenced by ``lease``."""
        reply = self._resolve(keys=[self.lease_key, self.sending_key],
                              args=[lease, self.mail_prefix, INTERRUPTED, KEEP_DONE])
        if reply is None:
            raise FencedOut("this host no longer holds the leader lease")
        ids = []
        for id, error in zip(reply[::2], reply[1::2]):
            log.error("farm mail %s: %s", _text(id), _text(error))
            ids.append(int(id))
        return ids

    def list(self, limit: int = 100) -> list[QueuedMail]:
        """Newest mails first (expired ones are dropped from the index)."""
        out = []
        for id in self.client.zrevrange(self.mails_key, 0, limit - 1):
            mail = self.get(int(id))
            if mail is None:
                self.client.zrem(self.mails_key, id)
            else:
                out.append(mail)
        return out


def _queued(id: int, raw: dict) -> QueuedMail:
    row = {_text(k): _text(v) for k, v in raw.items()}
    payload = json.loads(row["payload"])

    def number(name: str) -> float | None:
        return float(row[name]) if row.get(name) else None

    return QueuedMail(
        id=id, created=float(row["created"]), kind=row["kind"],
        rules=tuple(r for r in row["rules"].split(",") if r), sender=row["sender"],
        recipients=tuple(json.loads(row["recipients"])), message_id=row["message_id"],
        status=row["status"], attempts=int(row["attempts"]),
        next_attempt=float(row["next_attempt"]), sent_at=number("sent_at"),
        last_error=row.get("last_error") or None,
        mail=alerts.mail_from_json(payload["mail"]),
        context=alerts.context_from_json(payload["context"]),
        claimed_at=number("claimed_at"))


class FencedQueue:
    """The farm's queue during one lease: the farm rules'
    :class:`~trafficthreshold.alerts.engine.MailQueue`, every write fenced with
    that lease's value (``lease``).  ``unsure``: the ids whose claim's reply
    (and read-back) were lost, which the outbox puts back at its next pass."""

    #: None: a Redis error may come after the save ran (a lost reply), so
    #: the engine lets it propagate and FarmAlerts reads the state again.
    UNSAVED_ERRORS: tuple[type[BaseException], ...] = ()

    def __init__(self, store: FarmAlertStore, lease: str,
                 unsure: set[int] | None = None) -> None:
        self.store, self.lease = store, lease
        self.unsure = set() if unsure is None else unsure
        self.where = f"Redis ({store.prefix}~farmalert)"

    def load_state(self) -> AlertState:
        return self.store.load_state()

    def save(self, state: AlertState, mails: Sequence[tuple[Mail, MailContext]] = (), *,
             now: float) -> list[int]:
        return self.store.save(self.lease, state, mails, now=now)

    def next_due(self, now: float) -> QueuedMail | None:
        return self.store.next_due(now)

    def claim(self, id: int, now: float) -> bool:
        try:
            return self.store.claim(self.lease, id, now)
        except FencedOut:
            raise
        except Exception:
            self.unsure.add(id)  # claimed or not: the next pass puts it back if ours
            raise

    def resolve_interrupted(self) -> list[int]:
        return []  # FarmAlerts does it as a term starts, before any claim

    def mark_sent(self, id: int, now: float) -> None:
        self.store.mark_sent(self.lease, id, now)

    def mark_failed(self, id: int, now: float, error: str, retry_at: float | None) -> None:
        self.store.mark_failed(self.lease, id, now, error, retry_at)

    def close(self) -> None:
        pass


def _store_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, FencedOut)


class FarmOutbox(Outbox):
    """The mailer's outbox over the farm's queue: sends only while
    :attr:`lease` is set (the farm thread sets it for the term it leads, and
    clears it the moment the lease is lost), each mail claimed with that
    lease's fence.  ``clock``: the tick's clock (the farm thread's last
    offer), so retries follow the same clock as the rules."""

    def __init__(self, store: FarmAlertStore, mail_config: Any, *,
                 clock: Callable[[], float], **kwargs: Any) -> None:
        self.STORE_ERRORS = _store_errors()
        self.farm_store = store
        self.lease: str | None = None
        super().__init__(f"Redis ({store.prefix}~farmalert)", mail_config, clock=clock,
                         **kwargs)
        self._recovered = True  # the takeover rule runs in FarmAlerts, per term
        #: Mails whose claim's reply (and read-back) were lost on this host:
        #: never handed to the MTA, put back in the queue at the next pass.
        self._unsure: set[int] = set()

    def _store(self) -> Any:
        lease = self.lease
        if lease is None:
            raise FencedOut("not the farm's alert leader")
        return FencedQueue(self.farm_store, lease, self._unsure)

    def _put_back(self, lease: str, now: float) -> None:
        """The unsure claims of this host, back in the queue (each only if
        it is still our claim: a new leader may have resolved it)."""
        for id in sorted(self._unsure):
            if self.farm_store.unclaim(lease, id, now):
                log.warning("farm mail %d: its claim's reply was lost; put back in the queue "
                            "(it never reached the MTA)", id)
            self._unsure.discard(id)

    def deliver_due(self, now: float, limit: int = 100, **kwargs: Any) -> list[Any]:
        lease = self.lease
        if lease is None:
            return []  # not leading: the leader sends
        try:
            if self._unsure:
                self._put_back(lease, now)
            return super().deliver_due(now, limit, **kwargs)
        except FencedOut:
            return []

    def close(self) -> None:
        pass


def farm_count(live: farm.FarmLive, account: str, event: str, window: str,
               now: float) -> int:
    """The farm's count of a key for a farm rule: the sum over the alive
    hosts; for the "minute" window only the hosts whose last publication is
    of the minute their own clock shows now (:meth:`farm.HostLive.minute_now`:
    the farm's clock, Redis ``TIME``, plus the host's published skew; so a
    host whose clock is 90 s behind still counts its own current minute),
    not a host that has not published since its minute turned (it still
    holds the last minute's count)."""
    index = 0 if window == "minute" else 1
    total = 0
    for row in live.hosts:
        if not row.alive or (index == 0 and (
                row.at is None or int(row.at // 60) != row.minute_now(live, now))):
            continue
        total += row.counts.get((account, event), (0, 0))[index]
    return total


def farm_closed(live: farm.FarmLive, keys: Sequence[tuple[str, str]], now: float
                ) -> dict[tuple[str, str], dict[int, int]]:
    """The farm's final count of the minute before ``now``'s, per key (the
    ``closed`` of :func:`alerts.step`): over the alive hosts, the count of
    the minute before the one its own clock shows now (as
    :func:`farm_count`), published once it was closed (its first
    publication of this minute), or, from a host that has not published
    this minute yet, its count at its last publication of that minute.  So
    hits in a minute's last second, after the leader's last reading of it,
    still count: the closed minute's count is seen at the next second."""
    minute = int(now // 60)
    closed: dict[tuple[str, str], dict[int, int]] = {}
    for key in keys:
        total = 0
        for row in live.hosts:
            if not row.alive or row.at is None:
                continue
            at, its = int(row.at // 60), row.minute_now(live, now)
            if at == its:
                total += row.previous.get(key, 0)
            elif at == its - 1:
                total += row.counts.get(key, (0, 0))[0]
        closed[key] = {minute - 1: total} if total else {}
    return closed


class FarmAlerts:
    """The farm rules on one host: the lease, the evaluation while it leads,
    and the delivery thread.  Used by the farm thread only (:meth:`step`,
    :meth:`stop`); :meth:`reload` swaps attributes whole."""

    def __init__(self, client: Any, host: str, rules: Sequence[Rule], mail_config: Any, *,
                 prefix: str = "track", ttl_ms: int = farm.LEASE_TTL_MS,
                 dashboard_url: str = "", outbox_client: Any = None,
                 outbox_kwargs: dict | None = None) -> None:
        self.host = host
        self.lease = farm.Lease(client, host, prefix=prefix, ttl_ms=ttl_ms)
        self.store = FarmAlertStore(client, prefix)
        self.now: float = 0.0
        self.outbox = FarmOutbox(FarmAlertStore(outbox_client or client, prefix), mail_config,
                                 clock=lambda: self.now, **(outbox_kwargs or {}))
        # The state is read from Redis by the first evaluation of each term;
        # the engine's queue is that term's (set before each evaluation).
        self.engine = AlertEngine(FencedQueue(self.store, ""), rules, mail_config, host=host,
                                  dashboard_url=dashboard_url, on_queued=self.outbox.wake,
                                  load=False)
        self.term: str | None = None          # the lease value we lead under
        self._previous: str | None = None     # the one we led under before
        self.outbox.start()

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(self.engine.rules)

    @property
    def state(self) -> AlertState | None:
        """The farm rules' state as last read or saved (None: not leading,
        or read again from Redis at the next evaluation)."""
        return self.engine.state

    def reload(self, rules: Sequence[Rule], mail_config: Any, dashboard_url: str = "") -> None:
        self.engine.reload(rules, mail_config, dashboard_url)
        self.outbox.reload(mail_config)

    def keys(self) -> list[tuple[str, str]]:
        """The (account, event) pairs the farm's reading must hold."""
        return sorted({(r.account, r.event) for r in self.rules})

    @property
    def leading(self) -> bool:
        return self.term is not None

    def suspend(self, why: str) -> None:
        """Redis failed elsewhere on the farm thread: stop leading now (the
        next :meth:`step` renews the lease if it is still ours)."""
        self.lease.value = None
        self._lose(why)

    def _lose(self, why: str) -> None:
        """Stop evaluating and sending at once."""
        self.outbox.lease = None
        if self.term is not None:
            log.warning("host %s no longer leads the farm's alerts (%s): it stops evaluating "
                        "and sending them", self.host, why)
            self._previous = self.term
        self.term, self.engine.state = None, None

    def step(self, live: farm.FarmLive, now: float, level: int | None = None) -> list[int]:
        """One second of the farm rules (the farm thread, after a fresh read
        of the farm): renew the lease; while leading, evaluate and queue.
        Returns the ids queued.  Raises on Redis errors (the caller logs
        them once); leadership ends at once on any error."""
        self.now = now
        if not self.rules:
            # No farm rules here (a reload removed them): never hold the
            # lease, and never save a state without their episodes.
            if self.term is not None or self.lease.value is not None:
                self.lease.release()
                self._lose("its farm rules were removed; the lease is released")
            return []
        try:
            held = self.lease.renew()
        except Exception:
            self._lose("Redis did not answer the lease's renewal")
            raise
        if not held:
            self._lose("another host holds the lease")
            return []
        value = self.lease.value
        assert value is not None
        if value != self.term:
            if value == self._previous:
                # The lease we held before Redis failed, still ours: nobody
                # led meanwhile, our own claims are recorded by our outbox.
                log.info("host %s leads the farm's alerts again (the same lease, token %s)",
                         self.host, self.lease.token)
            else:
                self._lose("a new lease")  # our last term (if any) is over
                failed = self.store.resolve_interrupted(value)
                log.warning("host %s leads the farm's alerts (lease token %s)%s", self.host,
                            self.lease.token, f"; mails {failed} were interrupted at "
                            "takeover and are not sent again" if failed else "")
            self.term = value
        try:
            return self._evaluate(value, live, now, level)
        except FencedOut as exc:
            self._lose(str(exc))
            return []
        except Exception:
            # Did the save run?  We cannot know: stop at once; the next
            # second resumes the same lease (if still ours) and reads the
            # state again first.
            self.suspend("its write to Redis failed")
            raise

    def _evaluate(self, lease: str, live: farm.FarmLive, now: float,
                  level: int | None) -> list[int]:
        engine = self.engine
        engine.queue = FencedQueue(self.store, lease)
        if engine.state is None:
            engine.state = engine.queue.load_state()
        self.outbox.lease = lease  # the state is ours: send what is pending
        counts = {(r.account, r.event, r.window): farm_count(live, r.account, r.event,
                                                             r.window, now)
                  for r in engine.rules}
        return engine.tick(now, counts, closed=farm_closed(live, self.keys(), now),
                           throttle_level=level)

    def stop(self, *, release: bool = True) -> None:
        """Stop sending (after the current mail) and give the lease up, so
        another host takes over at once; errors are logged."""
        self.outbox.lease = None
        self.outbox.stop(timeout=STOP_WAIT)
        self.term = None
        if release:
            try:
                self.lease.release()
            except Exception as exc:  # noqa: BLE001 - it lapses anyway
                log.info("could not give up the farm's alert lease at shutdown (%s: %s); "
                         "another host takes over when it lapses", type(exc).__name__, exc)
