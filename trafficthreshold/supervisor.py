"""The daemon: ``trafficthreshold run``.

An object with initialize / tick / shutdown (huey's consumer is the model).
``tick(now)`` is called once a second with the wall-clock time; tests call
it directly with a driven clock.  Each tick:

1. once a minute, checks that the segment at the configured key is still
   the one it maps (one removed by ``ipcrm`` or systemd's RemoveIPC stays
   mapped: what it holds is rolled, then it is let go); re-attaches if the
   segment was uninstalled or let go (a new segment starts at throttle
   level 0, and so does the supervisor); writes the heartbeat into the
   segment header;
2. checks the header fields the supervisor owns (the throttle slot of
   ``("all", "pageview")``, the window, the multiplier, the level and its
   pid) and rewrites any that shared memory holds otherwise (logged once
   per field);
3. steps the throttle level (policy "hysteresis" or "drupal") and writes
   it into the header, where throttle_status() reads it; with ``[throttle]
   scope = "farm"`` from the farm's count (:mod:`trafficthreshold.farmsync`);
   with the Redis store, hands this second's live counts to the farm
   thread, which publishes them and reads the farm's (never from the tick);
4. when the clock minute changed, rolls the ring into the period store
   configured in ``[store]`` (:mod:`trafficthreshold.rollup`): the SQLite
   file, or the farm's Redis.  A roll into Redis runs on a thread of its
   own, so a slow or unreachable Redis never delays the tick (throttle,
   alerts, heartbeat); while it is still running the next minute's roll is
   skipped (logged once), the ring keeps the minutes for the one after;
5. evaluates this host's alert rules (mail goes out from the outbox
   thread, never from the tick); the farm's rules (``scope = "farm"``) are
   the farm thread's, on the holder of the leader lease only
   (:mod:`trafficthreshold.alerts.farm`);
6. once an hour, prunes the store.

The alert state and the mail queue of host rules are always in the SQLite
file (this host's own), opened apart from the period store: a Redis that is
down does not stop them, and a damaged file does not stop the roll into
Redis.  Those of farm rules are in Redis, written under the lease.

Every step is guarded: a step that fails is logged and tried again, and
the other steps go on; the daemon does not exit for a problem that a later
tick can get past.  A failure is logged once per distinct error (our own
errors as their message, which names the fix; others with the traceback),
and once more when the step works again.  A store that cannot be opened
(a damaged file, no permission, no directory) is retried every minute; a
roll-up that meets a store error closes the store, so that the next minute
opens the configured path again (a file recovered or moved aside by the
admin is picked up without a restart).  Meanwhile the ring keeps counting:
what it still holds when the store works again is rolled then; minutes it
no longer holds (an outage longer than the ring) are recorded as a gap.

Only :meth:`Supervisor.run` reads the clock and sleeps (on the monotonic
clock).  Signal handlers only set flags: SIGTERM/SIGINT stop after a final
roll-up of everything pending (when the store works; else the ring keeps it
for the next start), SIGHUP reloads the configuration.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Mapping

from . import (alerts, config as configuration, farm, farmsync, names, notify, segment,
               store as stores, throttle)
from .alerts.engine import AlertEngine
from .alerts.store import AlertStore
from .config import Config
from .errors import ConfigError, SegmentNotFound, TrafficThresholdError
from .alerts.mail import Outbox
from .rollup import Roller
from .store import StoreError

log = logging.getLogger("trafficthreshold.supervisor")

PRUNE_EVERY = 3600.0
#: Sent and failed alert mails stay in ``alert_outbox`` this many days (the
#: last ones are in ``trafficthreshold status``), then the hourly prune deletes them.
MAIL_KEEP_DAYS = 90
#: Seconds the final mail delivery may take at shutdown: half the unit's
#: TimeoutStopSec (30), leaving time for the final roll-up.
MAIL_FLUSH_BUDGET = 15.0
TOP_ACCOUNTS = 5
#: The throttle levels a header may hold (0 = off .. 5).
MAX_LEVEL = 5
#: Configuration keys that only a restart applies: the running daemon keeps
#: its segment and store, so a reload keeps these from the running config.
RESTART_ONLY = ("key", "backend", "database", "timezone", "store",
                # The server stays bound where it started (and HTTP on or off):
                # the token rule is checked for that address (see reload).
                "http.enabled", "http.listen")
#: Seconds shutdown, a segment change or a re-attach wait for a roll into
#: Redis still running on its thread before the final roll (each command is
#: bounded by store.redis.SOCKET_TIMEOUT; a roll is a few batches).
ROLL_WAIT = 10.0


#: What happens after each guarded step failed (the ring keeps the minutes
#: not rolled for as long as it holds them, the queue keeps the mails).
_RETRIED = {
    "roll-up": "the next minute's roll-up catches up",
    "reclaim": "tried again after the next roll-up; idle keys keep their slots meanwhile",
    "alerts": "tried again at the next tick",
    "prune": "tried again within the hour",
    "final roll-up": "the next start catches up from the ring",
    "final mail delivery": "the mails stay queued for the next start",
    "heartbeat": "tried again at the next tick",
    "header check": "tried again at the next tick",
    "throttle": "tried again at the next tick; workers keep the last level",
    "opening the store": "retried every minute; the ring keeps counting meanwhile",
    "opening the alert store": "retried every minute; no alert mails meanwhile",
    "catch-up roll-up": "the next minute's roll-up catches up",
    "re-attach": "tried again at the next tick",
    "segment check": "tried again at the next minute",
    "farm link": "retried every minute; the level follows this host's count meanwhile",
    "farm offer": "tried again at the next tick",
    "letting the host name go": "it expires within 5 s (farm.OWNER_TTL_MS)",
    # A file refused is logged by reload() itself (nothing applied); this is
    # an error while applying one, after which a part may be applied.
    "reload": "the configuration may be applied only in part; send SIGHUP again",
}


def _get(config: Any, name: str) -> Any:
    """The value of a dotted key (``"http.listen"``) of a Config."""
    for part in name.split("."):
        config = getattr(config, part)
    return config


def _replace(config: Any, name: str, value: Any) -> Any:
    """``config`` with the dotted key ``name`` set to ``value``."""
    head, _, rest = name.partition(".")
    if rest:
        value = _replace(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: value})


class Supervisor:
    """The daemon's state; see the module docstring."""

    def __init__(self, config: Config, *, config_path: str | None = None, http: bool = True,
                 env: Mapping[str, str] = os.environ, pid: int | None = None) -> None:
        self.config = config
        # A reload reads the file the running configuration came from, even
        # when it was found rather than named (DEFAULT_PATH): looking again
        # would take the embedded defaults while the file is moved away.
        self.config_path = config_path or (config.source if os.path.isfile(config.source)
                                           else None)
        self.http_enabled = http and config.http.enabled
        self.env = env
        self.pid = os.getpid() if pid is None else pid
        self.counter: Any = None
        self.store: stores.PeriodStore | None = None
        self.roller: Roller | None = None
        self.engine: AlertEngine | None = None
        self.outbox: Outbox | None = None
        self.server: Any = None
        self.app: Any = None
        self.throttle_state = throttle.ThrottleState()
        self.last_minute: int | None = None
        self._checked_minute: int | None = None  # of the once-a-minute checks (tick)
        self.last_prune = 0.0
        self.closed_cache: tuple[int, dict] | None = None
        self.stop_requested = False
        self.reload_requested = False
        self.last_store_try: int | None = None
        #: The roll into Redis running on its own thread, if any.
        self._rolling: concurrent.futures.Future | None = None
        self._roll_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._peek: Roller | None = None  # top_accounts' own reader of the ring
        #: The farm's live counts (Redis store only): farmsync.py's thread.
        self.farm: farmsync.FarmSync | None = None
        self.refused: ConfigError | None = None
        #: This supervisor's hold on ``[store] host`` in the farm's Redis.
        self.claim: farm.HostClaim | None = None
        self._starting = False
        #: Rolls were stopped because another supervisor held our name.
        self._name_lost = False
        self._failing: dict[str, str] = {}     # step -> its last error, logged once
        self._repaired: set[str] = set()        # header fields repaired, logged once
        self._restart_warned: set[tuple[str, str]] = set()

    # ------------------------------------------------------------ lifecycle

    def initialize(self, now: float) -> None:
        """Attach (installing the segment if there is none), open the store,
        catch up on what the ring still holds, start mail and HTTP.  A store
        that cannot be opened or rolled into is logged and retried by
        :meth:`tick`; it does not stop the start."""
        self.counter = self._attach()
        self._write_settings()
        level = self.counter.load(segment.H_THROTTLE_LEVEL, 4)
        self.throttle_state = throttle.ThrottleState(level=level if level <= MAX_LEVEL else 0)
        self._guard("header check", self._check_header, True, True)
        self.last_minute = self._checked_minute = int(now // 60)
        self._starting = True  # a name held by another supervisor is watched (5 s) only now
        try:
            self._open_store(now)
        finally:
            self._starting = False
        if self.refused is not None:  # another farm zone, no password ...: do not start
            self.shutdown(now)
            raise self.refused
        if self.roller is not None:
            caught_up = self._guard("catch-up roll-up", self._roll, now)
            log.info("started: segment %#x (%s), store %s, %s", self.config.key,
                     self.config.backend, stores.location(self.config),
                     "catching up on its own thread" if self._rolling is not None
                     else f"{caught_up} hits caught up")
        if self.http_enabled:
            self._start_http()
        self._heartbeat(now)
        notify.ready(self.env)

    def _open_store(self, now: float) -> None:
        """Open what is not open yet, each step guarded on its own: the
        period store and the roller (:func:`stores.open_writer`), the alert
        engine and its outbox (always the SQLite file); retried each minute
        by :meth:`tick` while one cannot be opened."""
        self.last_store_try = int(now // 60)
        if self.store is None:
            self._guard("opening the store", self._open_period_store)
        if self.engine is None:
            self._guard("opening the alert store", self._open_alerts)
        # The farm link publishes and leads under [store] host: only once
        # that name is ours (the period store took it, farm.HostClaim); a
        # second supervisor under the name must not publish over the
        # first's live counts nor succeed to its lease.
        if self.farm is None and self.config.store.backend == "redis" \
                and self.claim is not None:
            self.farm = self._guard("farm link", farmsync.FarmSync.open, self.config, self.env,
                                    self.config.farm_alerts)
            if self.farm is not None:
                self.farm.claim = self.claim.on(self.farm.client)

    def _open_period_store(self) -> None:
        """The configured period store.  A ConfigError (a farm whose time
        zone differs from ours, naming both; an unreadable password_file; no
        redis-py) is kept in ``refused``: at the start the supervisor does
        not start, later it is logged and retried.  A Redis that does not
        answer is only retried."""
        try:
            store = stores.open_writer(self.config, self.env)
            try:
                self._claim_host(store)
            except BaseException:
                store.close()
                raise
        except ConfigError as exc:
            self.refused = exc
            raise
        self.store = store
        self.refused = None
        self.roller = self._new_roller()

    def _claim_host(self, store: Any) -> None:
        """In a farm, ``[store] host`` is this supervisor's alone
        (:class:`farm.HostClaim`): another live supervisor under the same
        name is a ConfigError naming both and the fix; the farm thread
        refreshes the name every second."""
        # None for one host's SQLite file; the tick never waits for it
        self.claim = store.claim_host(self.counter.load(segment.H_INSTANCE, 8),
                                      pid=self.pid, wait=self._starting)

    def _open_alerts(self) -> None:
        """The alert engine and its outbox, on the SQLite file."""
        if self.engine is None:
            outbox = Outbox(self.config.database, self.config.mail)
            self.engine = AlertEngine(AlertStore(self.config.database), self.config.host_alerts,
                                      self.config.mail, dashboard_url=self.config.dashboard_link,
                                      on_queued=outbox.wake)
            self.outbox = outbox
            outbox.start()

    def _attach(self) -> Any:
        cfg = self.config
        try:
            return segment.attach(cfg.key, cfg.backend)
        except SegmentNotFound:
            log.warning("no segment at key %#x: installing one with the defaults", cfg.key)
            segment.install(cfg.key, cfg.backend, multiplier=cfg.throttle.multiplier,
                            window=cfg.throttle.window)
            return segment.attach(cfg.key, cfg.backend)

    def _write_settings(self) -> None:
        """The settings workers need live in the header."""
        t = self.config.throttle
        self.counter.store(segment.H_THROTTLE_MULTIPLIER, 4, t.multiplier)
        self.counter.store(segment.H_THROTTLE_WINDOW, 4, segment.WINDOWS[t.window])
        self.counter.store(segment.H_SUPERVISOR_PID, 4, self.pid)

    def _start_http(self) -> None:
        from . import api
        from .api import server as webserver  # only the daemon serves HTTP
        self.app = api.make_app(self.config)
        self.server = webserver.start(self.app, self.config.http.listen)
        log.info("serving the stats API and dashboard on %s", self.server.url)

    def shutdown(self, now: float) -> None:
        """The final roll-up of everything pending (the open minute too),
        then stop HTTP and mail.  Idempotent: each resource is let go once.
        Without a working store there is no final roll-up: the ring keeps
        the minutes for the next start."""
        notify.stopping(self.env)
        taken = False  # our name held by another supervisor: no final roll under it
        if self.farm is not None:  # the farm stops counting this host at once
            self.farm, farm = None, self.farm
            taken = farm.claim_lost
            farm.stop()
        self._wait_rolling()
        if self._roll_pool is not None:
            self._roll_pool.shutdown(wait=False)
            self._roll_pool = None
        if self._segment_live():
            if taken:
                log.error("no final roll-up: [store] host = %r is held by another supervisor; "
                          "the ring keeps the minutes for the next start under this name",
                          self.config.store.host)
            elif self.roller is not None:
                added = self._guard("final roll-up", self.roller.roll, now, True)
                if added is not None:
                    log.info("stopping: final roll-up added %d counts (all keys)", added)
            self.counter.store(segment.H_SUPERVISOR_PID, 4, 0)
        self.roller = None
        if self.claim is not None:  # after the final roll: the name is free now
            self.claim, claim = None, self.claim
            self._guard("letting the host name go", claim.release)
        for name, close in (("server", lambda s: s.stop()),
                            ("outbox", lambda o: self._flush_mail(o, now)),
                            ("engine", lambda e: e.store.close()),
                            ("store", lambda s: s.close())):
            obj, _ = getattr(self, name), setattr(self, name, None)
            if obj is not None:
                close(obj)

    def _flush_mail(self, outbox: Outbox, now: float) -> None:
        """Stop the delivery thread, then one last pass over the mails that
        are due, so an alert raised just before SIGTERM still goes out; all
        within MAIL_FLUSH_BUDGET seconds, well inside the unit's
        TimeoutStopSec (what is not sent stays queued for the next start)."""
        self._guard("final mail delivery", outbox.flush, now, MAIL_FLUSH_BUDGET)

    def reload(self) -> None:
        """SIGHUP: read the configuration again; keep the old one on errors.

        ``key``, ``backend``, ``database``, ``timezone``, ``[store]``,
        ``http.enabled`` and ``http.listen`` (RESTART_ONLY) need a restart:
        a changed value is kept from the running configuration (a later
        re-attach uses the running key with the running database; the
        server stays bound where it is) and warned about once per new
        value; everything else applies at once.  What will run is checked
        as a whole once more (a public listen address kept from the running
        configuration still needs a token): a refused reload changes
        nothing and is logged as one line naming the key."""
        try:
            new = self._keep_restart_only(configuration.load(self.config_path, env=self.env))
            # Once more on what will run: with the running listen address, a
            # file that drops the token must not open a public address.
            configuration.cross_check(new)
            if self.app is not None:
                self.app.check_reload(new)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        self.config = new
        if self.counter is not None and self.counter.attached:
            # Else the segment was uninstalled: the re-attach writes them.
            self._write_settings()
        if self.engine is not None:
            self.engine.reload(new.host_alerts, new.mail, new.dashboard_link)
        if self.farm is not None:
            self._reload_farm_rules(new)
        if self.outbox is not None:
            self.outbox.reload(new.mail)
        if self.app is not None:
            self.app.reload(new)
        log.info("configuration reloaded from %s", new.source)

    def _keep_restart_only(self, new: Config) -> Config:
        """``new`` with the RESTART_ONLY keys of the running configuration;
        each changed one is warned about once per new value."""
        for name in RESTART_ONLY:
            running, wanted = _get(self.config, name), _get(new, name)
            if wanted == running:
                continue
            new = _replace(new, name, running)
            if (name, repr(wanted)) not in self._restart_warned:
                self._restart_warned.add((name, repr(wanted)))
                log.warning("%s changed in the configuration (%r, running with %r): "
                            "restart the daemon to apply it; kept until then",
                            name, wanted, running)
        return new

    def _reload_farm_rules(self, new: Config) -> None:
        """The farm rules of a reload go to the farm thread's FarmAlerts;
        the first farm rule of a daemon that started without any starts
        them (the lease and their mail thread)."""
        rules = new.farm_alerts
        if self.farm.alerts is not None:
            self.farm.alerts.reload(rules, new.mail, new.dashboard_link)
        elif rules:
            self._guard("farm link", self.farm.add_alerts, new, rules, self.env)
            log.info("[[alert]] rules with scope = \"farm\" added: this host now competes "
                     "for the farm's alert lease")

    # ----------------------------------------------------------------- tick

    def tick(self, now: float) -> None:
        """One second of work; see the module docstring.  Never raises for a
        passing problem: it is logged and retried on the next tick."""
        minute = int(now // 60)
        # The once-a-minute checks follow their own minute, not the roll's:
        # last_minute stays behind while there is no Roller (the store is
        # down), and they must not then run at every tick.
        checks = minute != self._checked_minute
        if checks and self._segment_live():
            self._guard("segment check", self._check_identity, now)
        if not self._segment_live() and not self._guard("re-attach", self._reattach):
            return
        self._guard("heartbeat", self._heartbeat, now)
        self._guard("header check", self._check_header, checks)
        self._checked_minute = minute
        hits = self._guard("throttle", self._throttle, now)
        if self.farm is not None:  # to Redis on the farm thread, never from here
            self._guard("farm offer", self.farm.offer, self.counter, now,
                        self.throttle_state.level)
        if self.store is None or self.engine is None or (
                self.farm is None and self.config.store.backend == "redis"):
            if minute != self.last_store_try:
                self._open_store(now)
        if minute != self.last_minute and self.roller is not None:
            self._guard("roll-up", self._roll, now)
            self.last_minute = minute
        if self.engine is not None:
            self._guard("alerts", self._alerts, now)
        if now - self.last_prune >= PRUNE_EVERY and self.store is not None:
            self._guard("prune", self._prune, now)
            if self.engine is not None:
                self._guard("mail prune", self.engine.queue.prune, now - MAIL_KEEP_DAYS * 86400)
            self.last_prune = now
        notify.status(f"level {self.throttle_state.level}, {hits or 0} hits in the window",
                      self.env, watchdog=True)  # one datagram a second

    def _new_roller(self) -> Roller:
        """A Roller for the attached segment (a new one per segment: it
        checks the segment's instance against the store's, for gaps)."""
        self._peek = None
        return Roller(self.counter, self.store)

    def _roll(self, now: float) -> int | None:
        """The minute's roll-up.  A StoreError (a damaged or unwritable
        file) closes the store, so that the next minute opens the file at
        the configured path again: a file recovered or moved aside by the
        admin is picked up without a restart, and the ring still holds what
        was not rolled."""
        if self.store.shared:  # the farm's Redis: claimed, rolled on its own thread
            if self.farm is not None and self.farm.claim_lost:
                raise self._name_taken()
            if self._name_lost:  # the name is ours again: a new Roller checks the
                self._name_lost = False  # segment against what the other rolled meanwhile
                self.roller = self._new_roller()
            return self._roll_on_thread(now)
        try:
            return self._roll_and_reclaim(self.roller, now)
        except StoreError:
            # Lose the Roller too: the next one, over the reopened store,
            # checks the instance and the gaps against that store.
            self.store, store = None, self.store
            self.roller = None
            if store is not None:
                store.close()
            raise

    def _name_taken(self) -> TrafficThresholdError:
        """The error of a roll refused under a name another supervisor
        holds; the next roll with the name ours again uses a new Roller."""
        self._name_lost = True
        return TrafficThresholdError(
            f"[store] host = {self.config.store.host!r} was taken by another "
            "supervisor while this one did not refresh it (paused): rolling under "
            "the same name would mix their counts and closed_through")

    def _roll_claimed(self, roller: Roller, now: float) -> int:
        """A roll into Redis on the roll thread, right after refreshing our
        name there (recording the segment rolled): the farm thread's refresh
        may not have run yet after a stall.  Taken by another supervisor:
        no roll.  Lapsed meanwhile (we stalled past its 5 s, or Redis lost
        it; another supervisor may have rolled under it and moved its
        ``closed_through``): a new Roller checks the segment against the
        store first, as after a name taken and given back."""
        claim = self.claim
        if claim is not None:
            if claim.refresh(roller.instance) is not None:
                raise self._name_taken()
            if claim.lapsed():
                log.warning("the farm host name %r lapsed (this supervisor stalled past its "
                            "%d s, or Redis lost it); the roll first checks what was rolled "
                            "under it meanwhile", self.config.store.host,
                            farm.OWNER_TTL_MS // 1000)
                roller = self.roller = Roller(roller.counter, roller.store)
        return self._roll_and_reclaim(roller, now)

    def _roll_and_reclaim(self, roller: Roller, now: float) -> int:
        """The roll, then (if it worked) the reclaim, on the thread the roll
        runs on (this one, or the roll thread for Redis).  A failed reclaim
        is logged here and never fails the roll."""
        added = roller.roll(now)
        self._guard("reclaim", self._reclaim, roller, now)
        return added

    def _reclaim(self, roller: Roller, now: float) -> int:
        """Give back the slots of keys idle for longer than the ring and
        rolled (segment.reclaim), so made-up hosts cannot fill the table for
        good."""
        done = segment.reclaim(roller.counter, now, roller.store.closed_through())
        return len(done)

    def _roll_on_thread(self, now: float) -> int | None:
        """Start this minute's roll into Redis on the roll thread; return
        what the previous one added (None if none finished since), or raise
        its error (so it is logged once, and "works again" when it does).
        A roll still running is left alone: this minute is skipped (the
        ring keeps it; the next roll reads from the last closed minute)."""
        previous = self._rolling
        if previous is not None and not previous.done():
            raise TrafficThresholdError(
                "the previous roll into Redis is still running (Redis slow or not "
                "answering within the socket timeout); this minute waits for the next roll")
        if self._roll_pool is None:
            self._roll_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="trafficthreshold-roll")
        self._rolling = self._roll_pool.submit(self._roll_claimed, self.roller, now)
        return None if previous is None else previous.result()

    def _wait_rolling(self) -> None:
        """Let a roll on the roll thread finish (ROLL_WAIT at most) before the
        ring is rolled here or the segment let go; its error is logged."""
        future, self._rolling = self._rolling, None
        if future is None:
            return
        try:
            added = future.result(ROLL_WAIT)
        except concurrent.futures.TimeoutError:
            log.error("the roll into Redis still runs after %.0f s; going on without it "
                      "(what it did not write is re-sent from the ring next time)", ROLL_WAIT)
        except Exception as exc:  # noqa: BLE001 - logged; the ring still holds it
            log.error("the last roll into Redis failed: %s: %s", type(exc).__name__, exc)
        else:
            log.debug("the last roll into Redis added %s hits", added)

    def _guard(self, what: str, fn: Any, *args: Any) -> Any:
        """Run one step; a failure is logged, not raised.  It is logged the
        first time a step fails with a given error, then nothing until the
        error changes or the step works again (no log line per second for a
        problem that stays).  Our own errors (a damaged store, a missing
        segment) are logged as their message, which names the fix; anything
        else with its traceback."""
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - the daemon must keep counting
            text = f"{type(exc).__name__}: {exc}"
            if self._failing.get(what) != text:
                self._failing[what] = text
                if isinstance(exc, TrafficThresholdError):
                    log.error("%s failed: %s; %s", what, exc, _RETRIED[what])
                else:
                    log.exception("%s failed; %s", what, _RETRIED[what])
            return None
        if self._failing.pop(what, None) is not None:
            log.info("%s works again", what)
        return result

    def _segment_live(self) -> bool:
        return (self.counter is not None and self.counter.attached
                and self.counter.load(segment.H_STATE, 4) == segment.STATE_LIVE)

    def _check_identity(self, now: float) -> None:
        """Is the segment at the configured key still the one we map?  A
        segment removed without ``uninstall`` (``ipcrm``, systemd's
        RemoveIPC, a stray ``shm_unlink``) stays mapped and LIVE for us while
        workers find none, or a new one, at the key.  Checked once a minute
        through a raw view (no Counter: nothing in the header changes).  If
        it is gone, roll what our mapping still holds (the open minute too)
        and let go of it; the next tick attaches to the new segment.  A
        segment being installed at the key is checked again next minute."""
        ours = self.counter.load(segment.H_INSTANCE, 8)
        try:
            raw = segment._Raw(self.config.backend, self.config.key)
        except SegmentNotFound:
            found = None
        else:
            try:
                magic = bytes(raw.buf[:8])
                if magic == bytes(8) or (magic == segment.MAGIC and raw.u32(
                        segment.H_STATE) == segment.STATE_INSTALLING):
                    return  # an install under way: its header is not written yet
                found = raw.u64(segment.H_INSTANCE) if magic == segment.MAGIC else -1
            finally:
                raw.close()
        if found == ours:
            return
        what = ("was removed without `trafficthreshold uninstall` (ipcrm, systemd's "
                "RemoveIPC?)" if found is None else
                f"is no longer ours (instance {ours:#x}, the key now holds "
                + ("a foreign segment" if found == -1 else f"instance {found:#x}") + ")")
        added = None
        self._wait_rolling()
        if self.roller is not None:
            added = self._guard("final roll-up", self.roller.roll, now, True)
        log.error("the segment at key %#x %s: rolled the %s hits it still held and let go "
                  "of it; %s", self.config.key, what, added,
                  "waiting for `trafficthreshold install`" if found is None
                  else "attaching to the new one")
        self.counter.detach()
        self.roller = None

    def _reattach(self) -> bool:
        """The segment was uninstalled under us: wait for a new one.  The
        new segment starts at throttle level 0 and so does the throttle
        state; a new Roller checks the new segment's instance against the
        store (a gap is recorded if the old one went without a final
        roll-up)."""
        self._wait_rolling()
        if self.counter is not None and self.counter.attached:
            log.warning("the segment was uninstalled; waiting for `trafficthreshold install`")
            self.counter.detach()
        try:
            self.counter = segment.attach(self.config.key, self.config.backend)
        except SegmentNotFound:
            return False
        self._write_settings()
        # The new segment starts at level 0: so does the throttle (a level
        # kept from the old segment would jump back after one cooldown).
        self.throttle_state = throttle.ThrottleState()
        self.counter.store(segment.H_THROTTLE_LEVEL, 4, 0)
        self.counter.store(segment.H_THROTTLE_SINCE_MS, 8, 0)
        self.roller = None if self.store is None else self._new_roller()
        self.closed_cache = None
        log.info("attached to the new segment at key %#x", self.config.key)
        return True

    def _heartbeat(self, now: float) -> None:
        self.counter.store(segment.H_HEARTBEAT_MS, 8, int(now * 1000))

    def _check_header(self, index: bool = False, names: bool = False) -> None:
        """Rewrite the header fields the supervisor owns when shared memory
        holds something else (a stray write, a corrupt segment): the
        throttle slot (the slot of ("all", "pageview")), the window, the
        multiplier, the level and the supervisor's pid.  Each repair is
        logged once per field.  Lock-free: single atomic stores of fields
        only the supervisor writes.  With ``index`` (at initialize and at
        each new minute: it reads the whole key index), also the writers'
        ``probe_limit``, checked against the index and stored anew under
        the lock when wrong (:func:`segment.repair_probe_limit`); with
        ``names`` (at initialize: it reads every key's name), names split
        into two slots are looked for too."""
        if index:
            self._check_probe_limit(names)
        t = self.config.throttle
        slot = self.counter.find(None, "pageview")
        expected = [
            ("throttle_multiplier", segment.H_THROTTLE_MULTIPLIER, t.multiplier),
            ("throttle_window", segment.H_THROTTLE_WINDOW, segment.WINDOWS[t.window]),
            ("throttle_level", segment.H_THROTTLE_LEVEL, self.throttle_state.level),
            ("supervisor_pid", segment.H_SUPERVISOR_PID, self.pid),
        ]
        if slot is not None:
            expected.append(("throttle_slot", segment.H_THROTTLE_SLOT, slot))
        for name, offset, value in expected:
            found = self.counter.load(offset, 4)
            if found == value:
                continue
            self.counter.store(offset, 4, value)
            if name not in self._repaired:
                self._repaired.add(name)
                log.error("the segment header held %s = %d, expected %d: rewritten "
                          "(a stray write into shared memory?)", name, found, value)

    def _check_probe_limit(self, names: bool) -> None:
        """A probe_limit of 0, above index_size, or too small for the keys
        the index holds (a reader misses them) is stored anew from the
        index; a name split into two slots (by a writer of an older core)
        is reported.  Each problem is logged once."""
        problems = segment.probe_limit_problems(self.counter, self.config.key,
                                                self.config.backend, names=names)
        if any(p.startswith("probe_limit") for p in problems):
            segment.repair_probe_limit(self.counter, self.config.key, self.config.backend)
        for problem in problems:
            if problem not in self._repaired:
                self._repaired.add(problem)
                log.error("the segment's key index: %s%s (a stray write into shared "
                          "memory?)", problem, ": probe_limit stored anew from the index"
                          if problem.startswith("probe_limit") else "")

    def _throttle(self, now: float) -> int:
        """Step the level; return the window count."""
        t = self.config.throttle
        slot = self.counter.find(None, "pageview")
        hits = 0 if slot is None else self.counter.count(slot, segment.WINDOWS[t.window], now)
        if t.scope == "farm" and self.farm is not None:  # the other hosts' + ours
            hits = self.farm.count(hits, now, t.window)
        state, message = throttle.step(self.throttle_state, hits, now, t.policy, t.multiplier,
                                       t.cooldown, t.cron_test)
        if message:
            log.warning("%s", message)
        if state.level != self.throttle_state.level:
            self.counter.store(segment.H_THROTTLE_LEVEL, 4, state.level)
        if state != self.throttle_state:
            since = state.below_since if t.policy == "hysteresis" else state.last_test
            self.counter.store(segment.H_THROTTLE_SINCE_MS, 8, int((since or 0) * 1000))
        self.throttle_state = state
        return hits

    # --------------------------------------------------------------- alerts

    def _count(self, account: str, event: str, window: str, now: float) -> int:
        slot = self.counter.find(None if account == names.ALL else account, event)
        return 0 if slot is None else self.counter.count(slot, segment.WINDOWS[window], now)

    def _alerts(self, now: float) -> None:
        """This host's rules (scope "host"); the farm's are the farm
        thread's (:mod:`trafficthreshold.alerts.farm`)."""
        rules = self.engine.rules
        if not rules and not self.engine.state.episodes:
            return
        counts = {k: self._count(*k, now) for k in alerts.count_keys(rules)}
        hot = any(counts[(r.account, r.event, r.window)] >= r.threshold for r in rules)
        # The top accounts read every key of the minute: only when a mail or
        # a state change needs them, not every second of an episode.
        self.engine.tick(now, counts, closed=self._closed(now),
                         top_accounts=(lambda: self.top_accounts(now)) if hot else None,
                         throttle_level=self.throttle_state.level)

    def _closed(self, now: float) -> dict:
        """(account, event) -> {minute: count} of the last closed minutes the
        rules need, computed once a minute: only the rules' keys are read,
        not the whole ring."""
        minute = int(now // 60)
        if self.closed_cache is not None and self.closed_cache[0] == minute:
            return self.closed_cache[1]
        rules = self.engine.rules
        span = max((r.clear_minutes for r in rules), default=1) + 1
        closed: dict = {}
        for account, event in {(r.account, r.event) for r in rules}:
            slot = self.counter.find(None if account == names.ALL else account, event)
            counts = {} if slot is None else {
                m: self.counter.count(slot, segment.WINDOWS["minute"], m * 60)
                for m in range(minute - span, minute)}
            closed[(account, event)] = {m: n for m, n in counts.items() if n}
        self.closed_cache = (minute, closed)
        return closed

    def top_accounts(self, now: float, event: str = "pageview") -> list[tuple[str, int]]:
        """The busiest accounts of the current minute."""
        minute = int(now // 60)
        # Its own Roller: the supervisor's may be rolling on the roll thread.
        if self._peek is None or self._peek.counter is not self.counter:
            self._peek = Roller(self.counter, self.store)
        rows = [(a, c) for a, e, _, c in self._peek.snapshot(minute, minute)
                if e == event and a != names.ALL and not a.startswith("~")]
        return sorted(rows, key=lambda r: (-r[1], r[0]))[:TOP_ACCOUNTS]

    def _prune(self, now: float) -> None:
        r = self.config.retention
        removed = self.store.prune(now, {"minutes": r.minutes, "hours": r.hours,
                                         "days": r.days, "months": r.months})
        log.debug("pruned %s", removed)

    # ------------------------------------------------------------------ run

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload_requested = True

    def run(self) -> int:
        """The loop: a tick every second on the monotonic clock, until
        SIGTERM/SIGINT.  Returns the exit status."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.initialize(time.time())
        next_tick = time.monotonic()
        try:
            while not self.stop_requested:
                if self.reload_requested:
                    self.reload_requested = False
                    notify.reloading(time.monotonic_ns() // 1000, self.env)
                    # No error in a reload ends the daemon: logged, the
                    # running configuration stays.
                    self._guard("reload", self.reload)
                    notify.ready(self.env)
                self.tick(time.time())
                next_tick += 1.0
                delay = next_tick - time.monotonic()
                if delay < 0:
                    # A stall: the next roll catches up on what the ring holds.
                    log.warning("the loop stalled for %.1f s", -delay)
                    next_tick = time.monotonic()
                    delay = 0
                time.sleep(delay)
        finally:
            self.shutdown(time.time())
        return 0
