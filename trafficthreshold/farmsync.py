"""The supervisor's link to the farm (``[store] backend = "redis"``): each
second, publish this host's live counts and read the farm's, on a thread of
its own, so that a slow or unreachable Redis never delays the tick.

The tick hands over its clock, its level and the segment's instance
(:meth:`FarmSync.offer`, never blocks: only the latest offer is kept, an
older one not yet sent is replaced); the ``trafficthreshold-farm`` thread
reads the live counts from its own attachment of the segment
(:class:`LiveReader`: the tick does not pay for reading every key), publishes
what changed (:class:`farm.LivePublisher`) and reads the level's key back
(:class:`farm.LevelReader`: the farm's sum, one round trip) on its own
Redis client, with a short socket timeout and no retries.  The latest
reading is one attribute that the tick reads (:meth:`FarmSync.count`).

``[throttle] scope = "farm"``: the tick steps the level from the farm's
count of ``("all", "pageview")`` in the configured window: the other hosts'
numbers from the latest reading plus this host's own, read from the
segment at this tick.  A reading older than :data:`STALE_AFTER` seconds
(Redis down, slow, or cut off) is not used: the level follows this host's
own count until a fresh reading comes (both changes logged once), so a host
cut off from the farm never stays at the farm's level.

``[[alert]] scope = "farm"``: after each publication and read-back, the
farm thread renews the leader lease and, while it leads, evaluates the farm
rules over a reading of the rules' keys host by host (:func:`farm.farm_live`:
the farm thread's :class:`farm.LiveReader` of those keys, which reads the
live log since its last reading and keeps those keys of each host alone;
made only when the leader evaluates: :class:`LeaderReading`)
(:class:`trafficthreshold.alerts.farm.FarmAlerts`); a failed publication
ends the lead at once.  The tick never waits for any of it.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from . import farm, names, segment
from .errors import TrafficThresholdError

log = logging.getLogger("trafficthreshold.farmsync")

#: A farm reading older than this (seconds) is not used for the level.
STALE_AFTER = 5.0
#: Socket timeout of the farm thread's Redis client: one publish plus one
#: read a second, both small.
SOCKET_TIMEOUT = 0.5
#: Between two offers the farm thread reads the farm again this often, so
#: that the tick's reading is at most this old: a level change on one host
#: reaches the others' ticks within about a second and a quarter.
REFRESH_EVERY = 0.25
#: The keys the farm thread reads back (the level's): a few fields per host,
#: however many keys the hosts publish.
LEVEL_KEYS = ((names.ALL, "pageview"),)
#: How many such reads follow one offer (the tick offers every second).
REFRESHES = 3
#: Without an offer (no live segment), the farm thread refreshes the host
#: name this often (seconds): it expires after farm.OWNER_TTL_MS.
CLAIM_EVERY = 1.0
#: Seconds shutdown waits for the farm thread (its last command included).
STOP_WAIT = 2.0


@dataclass(frozen=True)
class Offer:
    """What the tick hands to the farm thread: plain data, no segment."""

    now: float
    level: int
    #: The segment instance the tick's attachment maps (0: none live).
    instance: int


@dataclass(frozen=True)
class Reading:
    """The farm as read at ``now`` (the offer's clock, not the thread's)."""

    now: float
    live: farm.FarmLive


class LiveReader:
    """The farm thread's own attachment of the segment and its reading of
    the live counts.  Only the farm thread uses it (and detaches it): the
    supervisor may let go of its own attachment at any time."""

    def __init__(self, key: int, backend: str) -> None:
        self.key, self.backend = key, backend
        self.counter: Any = None
        self._names = segment.KeyNames()

    def counts(self, instance: int, now: float) -> farm.LiveCounts | None:
        """This host's (current minute, sliding 60 s) per key at ``now``, of
        segment ``instance``; see :meth:`read`."""
        got = self.read(instance, now)
        return None if got is None else got[0]

    def read(self, instance: int, now: float
             ) -> tuple[farm.LiveCounts, dict[tuple[str, str], int]] | None:
        """This host's (current minute, sliding 60 s) per key at ``now``,
        and per key the count of the minute before (closed: final), of
        segment ``instance`` (re-attached when the segment was replaced);
        None while that segment is not attached here.  Keys at 0 are left
        out, and so are internal ``~`` keys.  Lock-free reads: one read of
        the ring's last two minutes finds the active keys (a key with hits
        in the sliding 60 s has some in one of them) and gives both minutes,
        then one sliding count per active key."""
        counter = self._attach(instance)
        if counter is None:
            return None
        minute = int(now // 60)
        current: dict[int, int] = {}
        before: dict[int, int] = {}
        for slot, m, n in counter.minutes(minute - 1, minute):
            current[slot] = current.get(slot, 0) + (n if m == minute else 0)
            before[slot] = before.get(slot, 0) + (n if m != minute else 0)
        # Names that are not UTF-8 are left out, as the roll-up does.
        names = self._names.read(counter, current)
        sliding = segment.WINDOWS["60s"]
        counts: farm.LiveCounts = {}
        previous: dict[tuple[str, str], int] = {}
        for slot, m in current.items():
            name = names.get(slot)
            if name is None or name[0].startswith("~") or name[1].startswith("~"):
                continue
            s = counter.count(slot, sliding, now)
            if m or s:
                counts[name] = (m, s)
            if before[slot]:
                previous[name] = before[slot]
        return counts, previous

    def _attach(self, instance: int) -> Any:
        counter = self.counter
        if counter is not None and counter.attached \
                and counter.load(segment.H_STATE, 4) == segment.STATE_LIVE \
                and counter.load(segment.H_INSTANCE, 8) == instance:
            return counter
        self.close()
        if not instance:
            return None
        try:
            counter = segment.attach(self.key, self.backend)
        except TrafficThresholdError:
            return None
        if counter.load(segment.H_INSTANCE, 8) != instance:
            counter.detach()  # not the tick's segment (yet): next second
            return None
        self.counter = counter
        return counter

    def close(self) -> None:
        if self.counter is not None:
            self.counter.detach()
            self.counter = None
        self._names = segment.KeyNames()


class FarmSync:
    """The farm thread and the latest reading; see the module docstring.

    Threads: :meth:`offer`, :meth:`count` and :meth:`stop` are called by the
    tick's thread; ``_cond`` guards ``_offer``, ``_busy`` and ``_stopping``;
    ``reading`` is replaced whole by the farm thread (one attribute
    assignment) and only read by the tick.
    """

    def __init__(self, client: Any, host: str, reader: LiveReader, *, prefix: str = "track",
                 ttl_ms: int = farm.LIVE_TTL_MS, stale_after: float = STALE_AFTER,
                 alerts: Any = None, forget_after: float = farm.FORGET_HOSTS_AFTER) -> None:
        self.client, self.host, self.prefix = client, host, prefix
        self.forget_after = forget_after

        self.reader = reader
        #: This host's publication (only what changed since the last one).
        self.publisher = farm.LivePublisher(client, host, prefix=prefix, ttl_ms=ttl_ms,
                                            forget_after=forget_after)
        #: Its reading of the level's key (the farm's sum, one round trip).
        self.level_reader = farm.LevelReader(client, host, LEVEL_KEYS, prefix=prefix)
        #: The farm rules (:class:`trafficthreshold.alerts.farm.FarmAlerts`),
        #: stepped by this thread after each publication; None: no farm rules.
        self.alerts = alerts
        self._alerts_failing: str | None = None
        #: This supervisor's hold on its host name (the supervisor sets it).
        self.claim: farm.HostClaim | None = None
        self._claim_lost = False
        self._claimed_at = 0.0  # monotonic: the last refresh of the name
        self.ttl_ms, self.stale_after = ttl_ms, stale_after
        self.reading: Reading | None = None
        self._cond = threading.Condition()
        self._offer: Offer | None = None
        self._busy = False
        self._stopping = False
        self._failing: str | None = None   # the farm thread's last error, logged once
        self._first: float | None = None   # the first offer's clock
        self._fallback = False             # tick side: the level follows our own count
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="trafficthreshold-farm")
        self._thread.start()

    @classmethod
    def open(cls, config: Any, env: Any = None, farm_rules: Any = ()) -> "FarmSync":
        """The farm link for ``[store]`` (a client of its own, timeout
        :data:`SOCKET_TIMEOUT`, no retries: the next second retries); with
        ``farm_rules``, the lease and the farm's alerts too (their mail
        thread with a client of its own)."""
        from . import store as stores

        client = stores.redis_client(config, timeout=SOCKET_TIMEOUT, env=env)
        no_retries(client)
        farm_alerts = _farm_alerts(client, config, env, farm_rules) if farm_rules else None
        return cls(client, config.store.host, LiveReader(config.key, config.backend),
                   prefix=config.store.prefix, alerts=farm_alerts,
                   forget_after=config.store.forget_hosts_days * 86_400)

    def add_alerts(self, config: Any, farm_rules: Any, env: Any = None) -> None:
        """Start the farm's alerts (the lease and their mail thread) on a
        link opened without farm rules: a reload that brings the first one.
        The farm thread takes them at its next cycle (one attribute
        assignment)."""
        self.alerts = _farm_alerts(self.client, config, env, farm_rules)

    def keys(self) -> tuple[tuple[str, str], ...]:
        """The keys read back from every host: the level's and the farm rules'."""
        if self.alerts is None:
            return LEVEL_KEYS
        return tuple(dict.fromkeys([*LEVEL_KEYS, *self.alerts.keys()]))

    # ------------------------------------------------------------ the tick

    def offer(self, counter: Any, now: float, level: int) -> None:
        """Hand this second to the farm thread; never blocks on Redis nor
        reads the keys (one header load, then one attribute swapped under
        ``_cond``)."""
        live = counter is not None and counter.attached
        item = Offer(now, level, counter.load(segment.H_INSTANCE, 8) if live else 0)
        with self._cond:
            self._offer = item
            self._cond.notify()
        if self._first is None:
            self._first = now

    def fresh(self, now: float) -> Reading | None:
        """The latest reading if it is at most ``stale_after`` seconds old."""
        reading = self.reading
        if reading is None or not -1.0 <= now - reading.now <= self.stale_after:
            return None
        return reading

    def count(self, own: int, now: float, window: str) -> int:
        """The farm's count of ``("all", "pageview")`` for the level: the
        other alive hosts' from the latest reading (the farm's sum less what
        this host published) plus ``own`` (this host's, read now); ``own``
        alone when the reading is stale (logged once, and once when the
        farm's count is back)."""
        reading = self.fresh(now)
        if reading is None:
            if not self._fallback and self._first is not None \
                    and now - self._first > self.stale_after:
                self._fallback = True
                log.warning("throttle scope farm: no reading of the farm's counts for over "
                            "%.0f s (Redis not answering?); the level of host %s follows its "
                            "own count until the farm's is back", self.stale_after, self.host)
            return own
        if self._fallback:
            self._fallback = False
            log.info("throttle scope farm: the farm's counts are back; the level of host %s "
                     "follows the farm's total again", self.host)
        live = reading.live
        others = live.count(*LEVEL_KEYS[0], window) - live.own(self.host, LEVEL_KEYS[0], window)
        return others + own

    @property
    def falling_back(self) -> bool:
        """True while the level follows this host's own count."""
        return self._fallback

    # ------------------------------------------------------------- thread

    def _loop(self) -> None:
        """Publish each offer; between offers, read the farm again every
        :data:`REFRESH_EVERY` seconds (the other hosts publish meanwhile), at
        most :data:`REFRESHES` times after an offer whose cycle worked and
        until a read fails: a supervisor that stopped ticking (or a Redis
        that does not answer) costs no reads."""
        last: Offer | None = None
        left = 0
        while True:
            with self._cond:
                if self._offer is None and not self._stopping:
                    self._cond.wait(REFRESH_EVERY)
                if self._stopping:
                    self.reader.close()
                    return
                item, self._offer = self._offer, None
                self._busy = True
            try:
                if item is not None:
                    last = item
                    left = REFRESHES if self._cycle(item) else 0
                elif last is not None and left > 0:
                    left = left - 1 if self._refresh(last.now) else 0
                self._keep_name(item)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _last_roll(self) -> float | None:
        """Our last roll as the latest reading saw it (farm_live reads it
        from the store's host hash)."""
        reading = self.reading
        if reading is None:
            return None
        return next((r.last_roll for r in reading.live.hosts if r.host == self.host), None)

    def _refresh(self, now: float) -> bool:
        """Read the farm only (no publication), stamped with the last offer's
        clock (it is as fresh as our last publication); False on an error,
        which the next offer's cycle meets and logs."""
        try:
            self.reading = Reading(now, self.level_reader.read(now))
        except Exception:  # noqa: BLE001 - the next cycle says it
            return False
        return True

    def _cycle(self, item: Offer) -> bool:
        """Publish ``item``, read the farm back.  An outage is logged once
        (its first error), and once when it works again; meanwhile the
        reading is left as it was, and ages out."""
        try:
            got = self.reader.read(item.instance, item.now)
        except Exception:  # noqa: BLE001 - the segment went away meanwhile: next second
            log.debug("reading the live counts failed", exc_info=True)
            self.reader.close()
            return False
        if got is None:
            return False  # no live segment here: nothing to publish, the host is reaped
        counts, previous = got
        try:
            self.publisher.publish(counts, level=item.level, now=item.now,
                                   last_roll=self._last_roll(), previous=previous)
            live = self.level_reader.read(item.now)
        except Exception as exc:  # noqa: BLE001 - the farm thread never dies
            text = f"{type(exc).__name__}: {exc}"
            if self.alerts is not None:  # no Redis, no lead: stop at once
                self.alerts.suspend("Redis did not answer")
            if self._failing is None:
                self._failing = text
                log.error("publishing the live counts of host %s to the farm's Redis failed: "
                          "%s; tried again every second (the other hosts stop counting this "
                          "one %d s after its last publication)", self.host, text,
                          self.ttl_ms // 1000)
            return False
        if self._failing is not None:
            self._failing = None
            log.info("publishing the live counts of host %s to the farm's Redis works again",
                     self.host)
        self.reading = Reading(item.now, live)
        if self.alerts is not None:
            self._step_alerts(LeaderReading(lambda: farm.farm_live(
                self.client, now=item.now, prefix=self.prefix, only=self.keys())), item)
        return True

    @property
    def claim_lost(self) -> bool:
        """Another supervisor holds our ``[store] host`` now (the last
        refresh found it): the supervisor does not roll meanwhile."""
        return self._claim_lost

    def _keep_name(self, item: Offer | None) -> None:
        """Refresh our host name at each offer, and every
        :data:`CLAIM_EVERY` seconds without one (a supervisor whose segment
        is gone offers nothing but still runs): independent of the live
        counts, so the name never lapses while the daemon runs.  A Redis
        error is left to the publication's log (and the roll's)."""
        import time

        if self.claim is None or (item is None and
                                  time.monotonic() - self._claimed_at < CLAIM_EVERY):
            return
        self._claimed_at = time.monotonic()
        try:
            self._refresh_claim(item.instance if item is not None else 0)
        except Exception:  # noqa: BLE001 - the farm thread never dies
            log.debug("refreshing the host name failed", exc_info=True)

    def _refresh_claim(self, instance: int = 0) -> None:
        """Keep ``[store] host`` ours (:class:`farm.HostClaim`), recording
        the segment ``instance`` we roll now; another supervisor that took
        it meanwhile (we were paused past its TTL) is logged at ERROR once:
        the two would mix their counts."""
        if self.claim is None:
            return
        other = self.claim.refresh(instance)
        if other is not None and not self._claim_lost:
            log.error("another supervisor (segment instance %#x, pid %s, boot %s) took the "
                      "farm host name %r of this one (pid %s): this one stops rolling (the "
                      "ring keeps counting) until the name is free again; give each host its "
                      "own [store] host and restart", other["instance"] or 0,
                      other["pid"], other["boot"], self.host, self.claim.pid)
        self._claim_lost = other is not None

    def _step_alerts(self, live: Any, item: Offer) -> None:
        """The farm rules after a fresh read (lease, evaluation, queue);
        an error is logged once, and once when it works again."""
        try:
            self.alerts.step(live, item.now, item.level)
        except Exception as exc:  # noqa: BLE001 - the farm thread never dies
            text = f"{type(exc).__name__}: {exc}"
            if self._alerts_failing != text:
                self._alerts_failing = text
                log.error("the farm's alerts on host %s failed: %s; it does not lead them "
                          "meanwhile, tried again every second", self.host, text)
            return
        if self._alerts_failing is not None:
            self._alerts_failing = None
            log.info("the farm's alerts on host %s work again", self.host)

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until the last offer is published and read back (tests with a
        driven clock call it after each tick); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._offer is None and not self._busy, timeout)

    def stop(self, *, withdraw: bool = True) -> None:
        """Stop the thread (:data:`STOP_WAIT` at most) and, when
        ``withdraw``, withdraw this host's live state so the farm stops counting
        it at once instead of after its expiry.  Errors are logged."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(STOP_WAIT)
        if self.alerts is not None and not self._thread.is_alive():
            self.alerts.stop(release=withdraw)
        if withdraw and not self._thread.is_alive():
            try:
                self.publisher.withdraw()
            except Exception as exc:  # noqa: BLE001 - it expires anyway
                log.info("could not withdraw the live counts at shutdown (%s: %s); they "
                         "expire within %d s", type(exc).__name__, exc, self.ttl_ms // 1000)
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing sockets only
            pass


class LeaderReading:
    """The farm rules' reading, host by host (:func:`farm.farm_live`: the
    log entries since the last reading), made at its first use: only the lease's holder
    evaluates the rules, so only the leader pays for it (the other hosts'
    farm threads read the level's sum only).  Any attribute of the
    :class:`farm.FarmLive`; a Redis error raises at that use."""

    def __init__(self, load: Any) -> None:
        self._load, self._live = load, None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._live is None:
            self._live = self._load()
        return getattr(self._live, name)


def _farm_alerts(client: Any, config: Any, env: Any, farm_rules: Any) -> Any:
    """The farm rules' FarmAlerts over ``client`` (the farm thread's), its
    mail thread with a client of its own."""
    from . import store as stores
    from .alerts.farm import FarmAlerts

    mail_client = stores.redis_client(config, timeout=SOCKET_TIMEOUT, env=env)
    no_retries(mail_client)
    return FarmAlerts(client, config.store.host, farm_rules, config.mail,
                      prefix=config.store.prefix, ttl_ms=int(config.store.lease_ttl * 1000),
                      dashboard_url=config.dashboard_link, outbox_client=mail_client)


def no_retries(client: Any) -> None:
    """The next second is the retry: a command fails at once, within the
    socket timeout, instead of redis-py's default backoff."""
    try:
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:  # pragma: no cover - every supported redis-py has them
        return
    if hasattr(client, "set_retry"):
        client.set_retry(Retry(NoBackoff(), 0))
