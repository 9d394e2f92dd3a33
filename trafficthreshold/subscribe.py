"""Bootic's input side: count the events of a ZMQ event bus (or of JSON lines).

``trafficthreshold subscribe tcp://127.0.0.1:6000`` is Bootic's
bootic_stats_aggregates in one process: a ZMQ SUB socket *connects* to the
publisher (to each, when several addresses are given), subscribes to the topics given (default: every message), and
counts each event into the segment through :func:`trafficthreshold.hit`,
the workers' own call (the same names rules, the same fail-open: no segment,
one warning, nothing counted).  Everything after the segment (roll-ups,
SQLite or the farm's Redis, alerts, the throttle level, the stats API) is
unchanged.  docs/subscribe.rst says what PUB/SUB loses and what this adds.

Bootic's wire format (bootic/bootic_zmq ``socket.go``): one frame, an
optional topic, whitespace, then a JSON event, as the regular expression
``^(?:[^ ]+)?\\s+(.+)`` splits it (Go's ``\\s`` is ``[\\t\\n\\f\\r ]`` and its
``.`` stops at a line feed: :data:`FRAME` is the same expression).  Bootic's
rules (bootic_stats_aggregates ``redis_stats/tracker.go``), with the clock
of this process (Bootic ignored the client's):

* ``{"type": "pageview", "data": {"account": "acme", "unq": "1"}}``: a
  ``pageview`` of ``acme`` and of ``all``; with ``unq`` the string ``"1"``,
  a ``unique`` of both too;
* ``{"type": "order", "data": {"account": "acme", "status": "paid"}}``:
  the order funnel, ``hit("acme", "order", status="paid")``;
* ``--type NAME``: events of that type count ``hit(account, NAME)``.

Bad input never stops it: each event that cannot be counted is rejected,
counted under a reason (:data:`REASONS`), logged once per reason per
minute, and the next one is counted.

The subscriber is its own process; what it did reaches ``status``,
``/metrics`` and the dashboard through a JSON file per subscriber,
``<database directory>/subscribers/<name>.json``, replaced atomically
(rename) every :data:`STATS_INTERVAL` seconds and at exit; a reader takes a
file not replaced for :data:`STALE_S` seconds as a subscriber that is not
running (:func:`read_all`).
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import selectors
import signal
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

import trafficthreshold
from trafficthreshold import _counter, names, notify

log = logging.getLogger("trafficthreshold.subscribe")

#: Bootic's split of a frame into topic and JSON (bootic_zmq socket.go),
#: with Go's meaning of ``\s`` and ``.`` spelt out.
FRAME = re.compile(rb"^(?:[^ ]+)?[\t\n\f\r ]+([^\n]+)")
#: Bootic's default publisher address (bootic_stats_aggregates main.go).
DEFAULT_ADDRESS = "tcp://127.0.0.1:6000"
#: The largest frame (ZMQ_MAXMSGSIZE) or line accepted, in bytes.
DEFAULT_MAX_SIZE = 65536
#: Messages ZMQ queues for this subscriber before it drops (ZMQ_RCVHWM).
DEFAULT_HWM = 100_000
#: Frames taken from the socket in one go before counting them.
BATCH = 4096
#: Seconds between two writes of the stats file.
STATS_INTERVAL = 1.0
#: A stats file not replaced for this long belongs to a subscriber that is
#: not running (SIGKILL, hung, a crash): readers say so.
STALE_S = 10.0
#: Stats files not replaced for this long are no longer shown (a
#: subscriber taken out of service); ``rm`` forgets one sooner.
FORGET_S = 7 * 86400
#: A stats file is a few hundred bytes: a bigger one is not one (not read).
MAX_STATS_BYTES = 65536
#: Why an event was rejected: the reason (a metrics label) and what it means.
REASONS = {
    "frame": "the frame is not `topic whitespace JSON`",
    "size": "the line is longer than --max-size",
    "json": "the payload is not JSON (or not UTF-8)",
    "not-object": "the event, or its data, is not a JSON object",
    "type": "the type is missing or not one counted (pageview, order, --type)",
    "account": "data.account is missing or not a string",
    "status": "an order's data.status is missing or not a string",
    "name": "hit() refuses the account or status name",
}
#: Rejections are logged once per reason per this many seconds.
LOG_EVERY_S = 60.0
#: After a disconnect, how long libzmq has to say it reconnects by itself
#: (EVENT_CONNECT_RETRIED, sent at once after a network error; nothing
#: follows a protocol error) before the subscriber connects again by hand.
RECONNECT_GRACE_S = 0.2
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def default_name(addresses: Iterable[str]) -> str:
    """The subscriber's name when none is given: the addresses with every
    run of characters outside ``A-Za-z0-9._-`` made one ``-``
    (``tcp-127.0.0.1-6000``), at most 64 of them; ``stdin`` for ``-``."""
    addresses = list(addresses)
    if addresses == ["-"]:
        return "stdin"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", " ".join(addresses))[:64].strip("-.")
    return name or "subscriber"


def check_name(name: str) -> str:
    """``name`` if it can name a stats file, else ValueError with the fix."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"subscriber name {name!r} is not valid: use 1..64 characters of "
                         "A-Z a-z 0-9 . _ - (not starting with '.'), e.g. --name shop-bus")
    return name


def boot_id() -> str | None:
    """This boot's id (Linux), which stamps a stats file's monotonic time:
    CLOCK_MONOTONIC is one clock for every process of a boot, and starts
    again at the next one.  None where it cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            return file.read().strip() or None
    except OSError:
        return None


def stats_dir(database: str) -> str:
    """Where subscribers write their stats files: ``subscribers/`` beside
    the database (the daemon's state directory, /var/lib/trafficthreshold
    under systemd), so the daemon and ``status`` find them from the config."""
    return os.path.join(os.path.dirname(os.path.abspath(database)), "subscribers")


# ------------------------------------------------------------------ counting


class EventCounter:
    """Bootic's rules, counting through :func:`trafficthreshold.hit`, and
    the tally of what it did.  Not thread-safe: one per subscriber loop.

    ``hit`` is the counting call (``trafficthreshold.hit``, or a
    ``Counter.hit`` in tests); ``clock`` is monotonic seconds (for the
    once-a-minute logging)."""

    def __init__(self, types: Iterable[str] = (), *,
                 hit: Callable[..., Any] = trafficthreshold.hit,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hit, self.clock = hit, clock
        self.received = 0
        self.counted = 0
        #: events that broke no rule but were not counted: no segment (fail open)
        self.uncounted = 0
        self.rejected: dict[str, int] = {reason: 0 for reason in REASONS}
        self._logged: dict[str, float] = {}
        self._since_log: dict[str, int] = {}
        self.types = {"pageview": self._pageview, "order": self._order}
        for name in types:
            names.check_name("event", name, names.EVENT_MAX)
            if name in self.types:
                raise ValueError(f"--type {name}: {name} events are counted already "
                                 "(Bootic's rules); leave it out")
            self.types[name] = self._plain

    # The rules: each takes the event's data (a dict) and its type; returns
    # a reason, or None when it counted.
    def _pageview(self, data: dict, kind: str) -> str | None:
        account = data.get("account")
        if type(account) is not str:
            return "account"
        self.hit(account, "pageview")
        if data.get("unq") == "1":
            self.hit(account, "unique")
        return None

    def _order(self, data: dict, kind: str) -> str | None:
        account, status = data.get("account"), data.get("status")
        if type(account) is not str:
            return "account"
        if type(status) is not str:
            return "status"
        self.hit(account, "order", status=status)
        return None

    def _plain(self, data: dict, kind: str) -> str | None:
        account = data.get("account")
        if type(account) is not str:
            return "account"
        self.hit(account, kind)
        return None

    def frames(self, frames: Iterable[bytes]) -> None:
        """Count ZMQ frames in Bootic's format (``topic {json}``)."""
        split = FRAME.match
        payloads = []
        append = payloads.append
        for msg in frames:
            # The common case without the regular expression: a topic with
            # no space, one space, a JSON object on one line.  What the
            # expression does for it: [^ ]+ stops at the space, \s+ takes
            # it (a '{' follows), (.+) the rest (no line feed).
            i = msg.find(b" ")
            if i >= 0 and msg[i + 1:i + 2] == b"{" and b"\n" not in msg:
                append(msg[i + 1:])
                continue
            found = split(msg)
            if found is None:
                self.received += 1
                self.reject("frame", msg)
            else:
                append(found.group(1))
        self.payloads(payloads)

    def payloads(self, payloads: Iterable[bytes]) -> None:
        """Count JSON events (a frame's payload, or a line of ``subscribe -``)."""
        loads, types, reject = json.loads, self.types, self.reject
        received = counted = 0
        for payload in payloads:
            received += 1
            try:
                event = loads(payload.decode())
            except (ValueError, RecursionError):
                # UnicodeDecodeError, JSONDecodeError, and nesting deeper
                # than the interpreter's recursion limit ("[[[[...").
                reject("json", payload)
                continue
            if type(event) is not dict:
                reject("not-object", payload)
                continue
            kind = event.get("type")
            rule = types.get(kind) if type(kind) is str else None
            if rule is None:
                reject("type", payload)
                continue
            data = event.get("data")
            if type(data) is not dict:
                reject("not-object", payload)
                continue
            try:
                reason = rule(data, kind)
            except (ValueError, TypeError) as exc:
                reject("name", payload, exc)
                continue
            if reason is not None:
                reject(reason, payload)
                continue
            counted += 1
        self.received += received
        # Fail open: with no segment hit() counted nothing (and warned once).
        if self.hit is trafficthreshold.hit and _counter._ensure() is None:
            self.uncounted += counted
        else:
            self.counted += counted

    def reject(self, reason: str, payload: bytes, exc: BaseException | None = None) -> None:
        """Count a rejection; log it if this reason was not logged in the
        last minute (with how many were not logged since)."""
        self.rejected[reason] += 1
        now = self.clock()
        last = self._logged.get(reason)
        if last is not None and now - last < LOG_EVERY_S:
            self._since_log[reason] = self._since_log.get(reason, 0) + 1
            return
        self._logged[reason] = now
        quiet = self._since_log.pop(reason, 0)
        log.warning("rejected an event (%s: %s)%s: %r%s (logged once a minute per reason%s)",
                    reason, REASONS[reason], f": {exc}" if exc is not None else "",
                    payload[:200], "..." if len(payload) > 200 else "",
                    f"; {quiet} more not logged since the last report" if quiet else "")

    def tally(self) -> dict[str, Any]:
        return {"received": self.received, "counted": self.counted,
                "uncounted": self.uncounted, "rejected": dict(self.rejected)}


# ------------------------------------------------------------------ sources


def lines(stream: IO[bytes] | int, max_size: int, on_oversize: Callable[[bytes], None],
          timeout: float = 0.5) -> Iterable[list[bytes] | None]:
    """Batches of lines read from ``stream`` (a file or descriptor), without
    their line end; None when nothing came for ``timeout`` seconds (so the
    caller can write its stats); ends at end of file.  A line longer than
    ``max_size`` is skipped to its end, ``on_oversize(its start)`` called
    once for it: memory stays bounded whatever comes in.  Blank lines are
    skipped."""
    fd = stream if isinstance(stream, int) else stream.fileno()
    selector = selectors.DefaultSelector()
    try:
        selector.register(fd, selectors.EVENT_READ)
    except (PermissionError, ValueError):  # a regular file: always readable
        selector = None
    buf, skipping = b"", False
    while True:
        if selector is not None and not selector.select(timeout):
            yield None
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            if buf and not skipping:
                yield [buf.rstrip(b"\r")]
            return
        parts = (buf + chunk).split(b"\n")
        buf = parts.pop()
        batch = []
        for part in parts:
            if skipping:  # the end of a line already rejected
                skipping = False
            elif len(part) > max_size:
                on_oversize(part)
            elif part.strip():
                batch.append(part.rstrip(b"\r"))
        if len(buf) > max_size:
            if not skipping:
                on_oversize(buf)
            buf, skipping = b"", True
        yield batch


#: A TCP address whose host is an IPv6 literal (``tcp://[::1]:6000``, also
#: with a source ``tcp://eth0;[::1]:6000``).
IPV6_LITERAL = re.compile(r"tcp://(?:[^;]*;)?\[")


def connect(sock: Any, address: str) -> None:
    """``sock.connect(address)``, with ZMQ_IPV6 on for an IPv6 literal:
    libzmq takes ``tcp://[::1]:6000`` without it and never connects.  (Not
    for every address: with it, a host name with an IPv6 address too is
    tried on IPv6 only, and a publisher bound to IPv4 alone is never
    reached.  ZMQ_IPV6 is read at each connect.)"""
    import zmq
    sock.setsockopt(zmq.IPV6, 1 if IPV6_LITERAL.match(address) else 0)
    sock.connect(address)


#: How often a subscriber of a farm renews (or tries to take) its buses'
#: leases, in seconds: well inside the lease's TTL (``[store] lease_ttl``).
LEASE_RENEW_S = 1.0


def lease_prefix(prefix: str, endpoint: str) -> str:
    """The Redis prefix of a bus's lease: ``<prefix>~subscribe~<endpoint>``
    (farm.Lease adds ``~leader``), one per endpoint as written."""
    return f"{prefix}~subscribe~{endpoint}"


#: The key, next to a bus's lease, that says its holder of a token stopped
#: cleanly: "<Redis' epoch> <token>" (BusLeases.release), for the lease_ttl.
STOPPED_SUFFIX = "~stopped"


def _lock_nonce(fd: int) -> str:
    """A random id kept in the name's lock file (held: flock), written by
    its first holder: in the bus leases' identity, so that a restart on
    this state directory succeeds its dead predecessor's lease at once,
    and a container on another one (same host name, same boot id: the
    kernel's) does not take a running holder's lease for its own."""
    value = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    if not re.fullmatch(r"[0-9a-f]{16}", value):
        value = os.urandom(8).hex()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, value.encode() + b"\n", 0)
        except OSError:
            pass  # kept in memory: a restart waits a lease_ttl, no more
    return value


class BusLeases:
    """One farm-wide lease per bus endpoint (farm.Lease, the alert leader's
    lease under another prefix), so that on a farm only one host's
    subscriber counts a given bus: the others stay connected and read it
    (no slow joiner at a takeover) but count nothing (hot standbys), and
    take the lease over within its TTL when the holder dies.  An endpoint
    is counted only before its *deadline*: the monotonic time at which a
    renewal that succeeded was *sent*, plus the TTL, minus a margin.  Redis
    expires the lease at least that late (it set the TTL on receiving the
    call), so a holder that stalled, lost Redis or was replaced stops
    counting before any other host can take over: never two hosts at once.
    The identity is ``host/name/boot id/lock id``: a subscriber restarted
    on the same boot and state directory (its predecessor is dead: the
    name's flock) takes its predecessor's lease at once (farm.Lease's
    "succeed"), a cloned host or a container with the same host name
    (another boot, or another lock file: :func:`_lock_nonce`) does not.  Not thread-safe."""

    MARGIN_S = 0.5

    def __init__(self, client: Any, endpoints: Iterable[str], identity: str, *,
                 prefix: str, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        from trafficthreshold import farm
        self.client, self.ttl_s, self.clock = client, ttl_s, clock
        identity = identity.replace(" ", "_")  # farm.Lease's value is "identity token"
        self.identity = identity
        self.epoch_key = f"{prefix}~subscribe~epoch"
        self.leases = {e: farm.Lease(client, identity, prefix=lease_prefix(prefix, e),
                                     ttl_ms=int(ttl_s * 1000)) for e in endpoints}
        self.deadline = {e: -math.inf for e in self.leases}
        #: when a lease just taken may be counted (see :meth:`_taken`)
        self.since = {e: math.inf for e in self.leases}
        #: the token of the lease we hold (None: none)
        self._token: dict[str, int | None] = {e: None for e in self.leases}
        #: the last lease seen in Redis: (Redis' epoch, its token)
        self._seen: dict[str, tuple[str, int] | None] = {e: None for e in self.leases}
        self._next = -math.inf
        self._error_logged = -math.inf
        self._held: set[str] = set()

    def holds(self, endpoint: str) -> bool:
        """Whether ``endpoint``'s events may be counted now."""
        return self.since[endpoint] <= self.clock() < self.deadline[endpoint]

    def _epoch(self) -> str:
        """What names this Redis' data: a random value the first subscriber
        stored under ``<prefix>~subscribe~epoch`` (no TTL), another once
        Redis lost its data (restarted empty, a failover to a replica
        without it, a flush).  Not INFO's run_id: an ACL may refuse INFO,
        and a restart that kept the data keeps the epoch."""
        value = self.client.get(self.epoch_key)
        if value is None:
            self.client.set(self.epoch_key, os.urandom(8).hex(), nx=True)
            value = self.client.get(self.epoch_key)
        return value.decode() if isinstance(value, bytes) else str(value)

    def _observe(self, endpoint: str) -> None:
        """Note the last lease of ``endpoint`` Redis knows: the token of the
        lease it holds now (another host's, or our dead predecessor's at
        the start), with Redis' epoch when the token is new to us;
        else the stop mark of a holder that stopped cleanly (Redis' epoch
        and its token, :meth:`release`).  One MGET a second while we stand
        by; the epoch read only when the token moves."""
        lease = self.leases[endpoint]
        value, stopped = (v.decode() if isinstance(v, bytes) else v
                          for v in self.client.mget(lease.key, lease.key + STOPPED_SUFFIX))
        if value is not None:
            if lease._mode == "adopt" and value.rsplit(" ", 1)[0] == self.identity:
                # Our own take, its reply lost: not the lease before ours
                # (seen already), which _taken compares the take with.
                return
            token = int(value.rsplit(" ", 1)[-1])
            seen = self._seen[endpoint]
            if seen is None or seen[1] != token:
                self._seen[endpoint] = (self._epoch(), token)
        elif stopped is not None:
            epoch, token = stopped.rsplit(" ", 1)
            self._seen[endpoint] = (epoch, int(token))

    def _taken(self, endpoint: str, token: int, got: float) -> None:
        """A lease just taken (a new token), at ``got`` (the reply): when
        may it be counted?  At once if the lease before it is known to have
        ended: its token, ``token - 1``, was seen held (by another host that
        released it or whose lease lapsed, or by our dead predecessor) in
        the same Redis data (its epoch), so no other take came in between.
        Otherwise (Redis lost its data and the last lease, or we never saw
        it) an earlier holder may still count until its deadline, at most a
        TTL after this reply: we count from then."""
        epoch = self._epoch()
        seen = self._seen[endpoint]
        known = seen is not None and seen == (epoch, token - 1)
        self.since[endpoint] = got if known else got + self.ttl_s
        self._token[endpoint] = token
        self._seen[endpoint] = (epoch, token)
        if not known:
            log.warning("bus %s: took a lease whose predecessor's end was not seen (Redis "
                        "restarted or failed over?): counting it in %.1f s, once any "
                        "earlier holder has stopped", endpoint, self.ttl_s)

    def renew(self, force: bool = False) -> None:
        """Take or renew every endpoint's lease, once a LEASE_RENEW_S (or at
        once with ``force``).  A Redis error leaves the deadlines as they
        are (the leases run out by themselves) and is logged once a minute."""
        now = self.clock()
        if not force and now < self._next:
            return
        self._next = now + LEASE_RENEW_S
        for endpoint, lease in self.leases.items():
            sent = self.clock()
            try:
                if self._token[endpoint] is None and lease.value is None:
                    self._observe(endpoint)  # whose lease we may take
                held = lease.renew()
                if held and lease.token != self._token[endpoint]:
                    self._taken(endpoint, lease.token, self.clock())
                elif not held:
                    self._token[endpoint] = None
            except Exception as exc:  # noqa: BLE001 - no Redis: no new deadline
                if sent - self._error_logged >= LOG_EVERY_S:
                    self._error_logged = sent
                    log.warning("cannot renew the lease of bus %s in Redis (%s): it is counted "
                                "until the lease runs out (%.1f s), then by no host until "
                                "Redis answers (logged once a minute)", endpoint, exc,
                                self.ttl_s)
                continue
            self.deadline[endpoint] = sent + self.ttl_s - self.MARGIN_S if held else -math.inf
            if held and endpoint not in self._held:
                self._held.add(endpoint)
                log.info("this host holds the lease of bus %s (token %s): counting it%s",
                         endpoint, lease.token, "" if self.holds(endpoint)
                         else f" in {self.since[endpoint] - self.clock():.1f} s")
            elif not held and endpoint in self._held:
                self._held.discard(endpoint)
                log.warning("bus %s is counted by another host now (its lease is theirs): "
                            "standing by", endpoint)

    def release(self) -> None:
        """Give every lease up (a clean stop): a standby takes over at its
        next renewal instead of after the TTL."""
        for endpoint, lease in self.leases.items():
            self.deadline[endpoint] = -math.inf
            token, self._token[endpoint] = self._token[endpoint], None
            try:
                if token is not None:
                    # We count no more: a stop mark says so (until the
                    # TTL), so that the next holder counts at once.
                    self.client.set(lease.key + STOPPED_SUFFIX, f"{self._epoch()} {token}",
                                    px=int(self.ttl_s * 1000))
                lease.release()
            except Exception as exc:  # noqa: BLE001 - it runs out by itself
                log.warning("cannot release the lease of bus %s (%s): another host takes "
                            "over when it runs out", endpoint, exc)

    def status(self) -> dict[str, str]:
        """endpoint -> "counting" or "standby", for the stats file."""
        return {e: "counting" if self.holds(e) else "standby" for e in self.leases}


class Subscriber:
    """The ``subscribe`` process: initialize / run / shutdown, like the
    supervisor.  SIGTERM and SIGINT set a flag; the loop then ends, writes
    its stats file a last time (``stopped: true``) and returns 0."""

    def __init__(self, addresses: Iterable[str], *, key: int, backend: str, database: str,
                 topics: Iterable[str] = (), types: Iterable[str] = (), hwm: int = DEFAULT_HWM,
                 max_size: int = DEFAULT_MAX_SIZE, name: str | None = None,
                 env: Mapping[str, str] = os.environ, stdin: IO[bytes] | int | None = None,
                 config: Any = None) -> None:
        self.addresses = list(addresses)
        self.key, self.backend = key, backend
        self.topics = list(topics) or [""]
        self.types = list(types)
        self.hwm, self.max_size = hwm, max_size
        self.name = check_name(name if name is not None else default_name(self.addresses))
        self.env = env
        self.stdin = stdin
        self.dir = stats_dir(database)
        self.path = os.path.join(self.dir, self.name + ".json")
        self.counter = EventCounter(self.types)
        self.started_at = time.time()
        self.last_heard: float | None = None
        #: the endpoints connected now (ZMQ's socket monitor)
        self.connected: set[str] = set()
        self.disconnects = 0
        self._disconnect_logged = -math.inf
        #: endpoint -> when to connect it again by hand (unless libzmq retries)
        self._reconnect_due: dict[str, float] = {}
        #: endpoint (as the monitor names it) -> its socket
        self._socket_of: dict[str, Any] = {}
        self.stopping = False
        #: it ended cleanly (SIGTERM, the end of the input): the stats say so
        self.stopped = False
        self._lock_fd: int | None = None
        #: the name's lock file's random id (:func:`_lock_nonce`)
        self._nonce = ""
        self._next_stats = 0.0
        self._next_dog = 0.0
        self._dog = notify.watchdog_interval(env)
        self._boot_id = boot_id()
        #: stats writes failed since the last warning (-1: the last one worked)
        self._write_failures = -1
        self._write_logged = -math.inf
        #: the configuration (its [store]): with the Redis store, the buses'
        #: farm-wide leases (:class:`BusLeases`, made by initialize)
        self.config = config
        self.leases: BusLeases | None = None
        #: events read while another host held the bus's lease (not counted)
        self.standby_skipped = 0

    # ------------------------------------------------------------- lifecycle

    def initialize(self) -> None:
        """Point hit() at the configured segment, take the name's lock (one
        process per name) and write a first stats file."""
        trafficthreshold.configure(key=self.key, backend=self.backend, strict=False)
        try:
            os.makedirs(self.dir, mode=0o750, exist_ok=True)
            fd = os.open(os.path.join(self.dir, self.name + ".lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise ValueError(
                f"cannot use {self.dir} for this subscriber's lock and stats file "
                f"({exc.strerror}: {exc.filename}): run it as the daemon's user "
                "(trafficthreshold under systemd, who owns the state directory beside "
                "the database), or remove what is in the way") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"another subscriber named {self.name!r} is running (it holds "
                             f"{self.dir}/{self.name}.lock): stop it, or give this one "
                             "another --name") from None
        self._lock_fd = fd
        self._nonce = _lock_nonce(fd)
        # What a SIGKILL between the write and the rename left (other pids);
        # not another name's ("x.json.1" writes x.json.1.json.<pid>.tmp).
        leftover = re.compile(re.escape(self.name) + r"\.json\.[0-9]+\.tmp")
        for entry in os.listdir(self.dir):
            if leftover.fullmatch(entry):
                try:
                    os.unlink(os.path.join(self.dir, entry))
                except OSError:
                    pass
        forget_stale(self.dir, time.time())
        # Attach now: with no segment, hit()'s own warning (once), fail open.
        _counter._ensure()
        self.leases = self._farm_leases()
        self.write_stats()

    def _farm_leases(self) -> BusLeases | None:
        """With ``[store] backend = "redis"`` (a farm: every host's counts
        are summed), one lease per bus endpoint; None for one host, or for
        ``-`` (lines read on this host are this host's)."""
        cfg = self.config
        if cfg is None or cfg.store.backend != "redis" or self.addresses == ["-"]:
            return None
        from trafficthreshold.farmsync import no_retries
        from trafficthreshold.store import redis_client
        # One try within the timeout: the next renewal is the retry, and the
        # loop (its stats file, the watchdog) never waits on Redis' backoff.
        client = redis_client(cfg, timeout=min(1.0, cfg.store.lease_ttl / 4))
        no_retries(client)
        leases = BusLeases(client, self.addresses,
                           f"{cfg.store.host}/{self.name}/{self._boot_id or os.getpid()}"
                           f"/{self._nonce}",
                           prefix=cfg.store.prefix, ttl_s=cfg.store.lease_ttl)
        leases.renew(force=True)
        return leases

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        # SIGHUP would end it by default, and a death by SIGHUP is not one
        # that Restart=on-failure restarts: the bus would go uncounted.
        signal.signal(signal.SIGHUP, self._on_hup)
        self.initialize()
        clean = False
        try:
            if self.addresses == ["-"]:
                self._run_lines()
            else:
                self._run_zmq()
            clean = True
        finally:
            self.shutdown(clean)
        return 0

    def shutdown(self, clean: bool = True) -> None:
        """The last stats file: ``stopped`` only after a clean end (a crash
        leaves it to go stale, "not running"); the lock released."""
        notify.stopping(self.env)
        self.stopping = True
        self.stopped = clean
        if self.leases is not None:
            self.leases.release()
        self.write_stats()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        log.warning("SIGHUP: nothing to reload (the options are the command line's); "
                    "restart the subscriber to change them")

    def housekeeping(self, force: bool = False) -> None:
        """The stats file every STATS_INTERVAL s; the watchdog at half its
        interval, with a status line for `systemctl status`."""
        now = time.monotonic()
        if force or now >= self._next_stats:
            self._next_stats = now + STATS_INTERVAL
            self.write_stats()
        if self._dog is not None and now >= self._next_dog:
            self._next_dog = now + self._dog / 2
            c = self.counter
            notify.status(f"{c.received:,} received, {c.counted:,} counted, "
                          f"{sum(c.rejected.values()):,} rejected", self.env, watchdog=True)

    # ---------------------------------------------------------------- sources

    def _run_lines(self) -> None:
        c = self.counter

        def oversize(start: bytes) -> None:
            c.received += 1
            c.reject("size", start)

        notify.ready(self.env)
        source = self.stdin if self.stdin is not None else 0
        for batch in lines(source, self.max_size, oversize):
            if batch:
                self.last_heard = time.time()
                c.payloads(batch)
            self.housekeeping()
            if self.stopping:
                break

    def _socket(self, context: Any, address: str) -> tuple[Any, Any]:
        """A SUB socket connected to ``address`` and its monitor: one per
        endpoint, so that what is read is known to come from it (a bus's
        lease gates its own events)."""
        import zmq
        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_size)
        sock.setsockopt(zmq.LINGER, 0)
        for topic in self.topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                          | zmq.EVENT_CONNECT_RETRIED
                                          | zmq.EVENT_CONNECT_DELAYED)
        try:
            connect(sock, address)
        except zmq.ZMQError:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            raise
        return sock, monitor

    def _run_zmq(self) -> None:
        import zmq
        from zmq.utils.monitor import recv_monitor_message
        context = zmq.Context()
        sockets: list[tuple[str, Any, Any]] = []
        try:
            for address in self.addresses:
                sockets.append((address, *self._socket(context, address)))
        except zmq.ZMQError as exc:
            for _address, sock, monitor in sockets:
                sock.disable_monitor()
                monitor.close(linger=0)
                sock.close(linger=0)
            context.destroy(linger=0)
            raise ValueError(f"cannot connect a SUB socket to {' '.join(self.addresses)} "
                             f"({exc}): give addresses such as tcp://127.0.0.1:6000 or "
                             "ipc:///run/bus.sock") from None
        poller = zmq.Poller()
        of_socket = {}
        for address, sock, monitor in sockets:
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            of_socket[sock] = address
        monitors = {monitor: sock for _address, sock, monitor in sockets}
        notify.ready(self.env)
        again, noblock = zmq.Again, zmq.NOBLOCK
        leases = self.leases
        counting: set[str] = set()  # endpoints whose lease we held at the last read
        try:
            while not self.stopping:
                wait = STATS_INTERVAL / 2
                if self._reconnect_due:
                    wait = max(0.0, min(wait, min(self._reconnect_due.values())
                                        - time.monotonic()))
                ready = dict(poller.poll(int(wait * 1000)))
                if leases is not None:
                    leases.renew()
                    self._take_over(leases, of_socket, counting)
                for sock, address in of_socket.items():
                    if sock not in ready:
                        continue
                    frames: list[bytes] = []
                    append, recv = frames.append, sock.recv
                    try:
                        for _ in range(BATCH):
                            append(recv(noblock))
                    except again:
                        pass
                    self.last_heard = time.time()
                    # Checked after the read: a lease that ran out while
                    # the batch was read counts none of it.
                    if leases is None or (address in counting and leases.holds(address)):
                        self.counter.frames(frames)
                    else:
                        self.standby_skipped += len(frames)
                for monitor, sock in monitors.items():
                    if monitor in ready:
                        while monitor.poll(0):
                            self._connection_event(sock, recv_monitor_message(monitor))
                if self._reconnect_due:
                    self._reconnect()
                self.housekeeping()
        finally:
            for _address, sock, monitor in sockets:
                sock.disable_monitor()
                monitor.close(linger=0)
                sock.close(linger=0)
            context.term()

    def _take_over(self, leases: BusLeases, of_socket: dict[Any, str],
                   counting: set[str]) -> None:
        """Follow the leases: an endpoint whose lease was just taken has
        what its socket queued while it was not ours dropped first (it was
        delivered while the previous holder may still have counted it:
        dropped, never counted twice, docs/subscribe.rst); one whose lease
        ran out stops counting."""
        for sock, address in of_socket.items():
            if not leases.holds(address):
                counting.discard(address)
            elif address not in counting:
                self.standby_skipped += self._drain(sock)
                counting.add(address)

    @staticmethod
    def _drain(sock: Any) -> int:
        """Read and drop what ``sock`` holds now; returns how many."""
        import zmq
        n = 0
        try:
            while True:
                sock.recv(zmq.NOBLOCK)
                n += 1
        except zmq.Again:
            return n

    def _connection_event(self, sock: Any, event: dict[str, Any]) -> None:
        """Follow the connections (ZMQ's socket monitor).  libzmq reconnects
        by itself after a network error (and says so at once,
        EVENT_CONNECT_RETRIED), at its pace (every 100 ms), but not after a
        protocol error, which is what a frame over ZMQ_MAXMSGSIZE is (it
        would leave this subscriber deaf to that publisher for good): a
        disconnect libzmq does not follow with a retry within
        RECONNECT_GRACE_S is connected again by hand (:meth:`_reconnect`).
        (Connecting by hand after every disconnect, at once, spun: a port
        that hangs up at once got thousands of connections a second.)  What
        the publisher sent in between is lost: counted as a disconnect,
        nothing more is known."""
        import zmq
        endpoint = event["endpoint"].decode("utf-8", "replace")
        kind = event["event"]
        if kind in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CONNECT_DELAYED):
            self._reconnect_due.pop(endpoint, None)  # libzmq is on it
            return
        self._socket_of[endpoint] = sock
        if kind == zmq.EVENT_CONNECTED:
            self._reconnect_due.pop(endpoint, None)
            self.connected.add(endpoint)
            return
        if kind != zmq.EVENT_DISCONNECTED:
            return
        self.connected.discard(endpoint)
        self.disconnects += 1
        now = time.monotonic()
        self._reconnect_due[endpoint] = now + RECONNECT_GRACE_S
        if now - self._disconnect_logged >= LOG_EVERY_S:
            self._disconnect_logged = now
            log.warning("disconnected from %s (the publisher went away, or sent a frame over "
                        "--max-size %d bytes): connecting again; what it published meanwhile "
                        "is lost (%d disconnects so far; logged once a minute)", endpoint,
                        self.max_size, self.disconnects)

    def _reconnect(self) -> None:
        """Connect again by hand each endpoint whose disconnect libzmq did
        not follow with a retry in time (see :meth:`_connection_event`), on
        its own socket."""
        now = time.monotonic()
        for endpoint in [e for e, due in self._reconnect_due.items() if due <= now]:
            del self._reconnect_due[endpoint]
            self._connect_again(self._socket_of[endpoint], endpoint)

    def _connect_again(self, sock: Any, endpoint: str) -> None:
        import zmq
        try:
            sock.disconnect(endpoint)
        except zmq.ZMQError:
            pass  # libzmq forgot it already (the protocol error's case)
        try:
            connect(sock, endpoint)
        except zmq.ZMQError as exc:
            log.error("cannot connect to %s again (%s)", endpoint, exc)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "addresses": self.addresses, "topics": self.topics,
                "types": self.types, "hwm": self.hwm, "max_size": self.max_size,
                "pid": os.getpid(), "started_at": self.started_at, "updated_at": time.time(),
                "monotonic": time.monotonic(), "boot_id": self._boot_id,
                "last_heard": self.last_heard,
                "connected": None if self.addresses == ["-"] else len(self.connected),
                "disconnects": self.disconnects, "stopped": self.stopped,
                "leases": None if self.leases is None else self.leases.status(),
                "standby_skipped": self.standby_skipped,
                **self.counter.tally()}

    def write_stats(self) -> None:
        """Replace the stats file atomically (a reader sees the old or the
        new file, never half of one); its directory is made again if it
        went.  A failure is logged once a minute (with how many since),
        never raised: the counting goes on."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            try:
                self._write(tmp)
            except FileNotFoundError:
                os.makedirs(self.dir, mode=0o750, exist_ok=True)
                self._write(tmp)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self._write_failures = max(self._write_failures, 0) + 1
            now = time.monotonic()
            if now - self._write_logged >= LOG_EVERY_S:
                self._write_logged = now
                log.warning("cannot write %s (%s): status and /metrics will not show this "
                            "subscriber (it counts on; %d failed writes; logged once a "
                            "minute)", self.path, exc, self._write_failures)
            return
        if self._write_failures > 0:
            log.warning("writing %s again after %d failed writes", self.path,
                        self._write_failures)
        self._write_failures = -1

    def _write(self, tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as file:
            json.dump(self.stats(), file)
        os.replace(tmp, self.path)


def forget_stale(directory: str, now: float) -> list[str]:
    """Remove the stats and lock files of every name not written for
    FORGET_S (readers no longer show them) whose lock no process holds, so
    that names used once (``--name job-$DATE``) are not kept, and read by
    every reader, for ever.  The lock is taken, its file removed while held,
    then the stats file: a subscriber of that name starting meanwhile either
    finds the lock held (and exits naming it; systemd starts it again) or
    makes a new one.  Returns the names removed."""
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        if not entry.endswith(".json") or not NAME_RE.fullmatch(entry[:-len(".json")]):
            continue
        name = entry[:-len(".json")]
        stats, lock = os.path.join(directory, entry), os.path.join(directory, name + ".lock")
        try:
            if now - os.stat(stats).st_mtime <= FORGET_S:
                continue
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(lock)
            os.unlink(stats)
            removed.append(name)
        except OSError:  # held (BlockingIOError): a subscriber of that name runs
            continue
        finally:
            os.close(fd)
    if removed:
        log.info("removed the stats of subscribers not running for %d days: %s",
                 FORGET_S // 86400, ", ".join(sorted(removed)))
    return removed


# ------------------------------------------------------------------ readers


#: What a reader who may not read the stats files is told to do.
UNREADABLE_FIX = ("the subscribers are not shown: run this as the daemon's user (e.g. "
                  "sudo -u trafficthreshold trafficthreshold status) or as a member of "
                  "the state directory's group")


class Found(list):
    """:func:`read_all`'s subscribers (a list), with ``problems``: what
    could not be read (:func:`scan`'s sentences), so that a reader that
    shows the list (``/metrics``) can also say what is missing from it."""

    def __init__(self, found: Iterable[dict[str, Any]] = (), problems: Iterable[str] = ()):
        super().__init__(found)
        self.problems = list(problems)


#: The problems :func:`read_all` logged already in this process (each once:
#: /metrics and the dashboard read every few seconds).  Bounded: emptied
#: when it reaches LOGGED_PROBLEMS_MAX, so a problem that stays is logged
#: again now and then rather than the set growing with file names for ever.
_logged_problems: set[str] = set()
LOGGED_PROBLEMS_MAX = 256


def read_all(database: str, now: float) -> Found:
    """Every subscriber's stats file (sorted by name), each with ``age``
    (seconds since written) and ``state``: ``running``, ``stopped`` (it
    exited cleanly) or ``not running`` (not replaced for STALE_S: killed,
    hung or crashed).  Files older than FORGET_S are left out; what cannot
    be read (the directory or a file this user may not read, a file that is
    not a stats file) is left out too, put in the result's ``problems`` and
    logged, each problem once per process (:func:`scan` says why)."""
    found, problems = scan(database, now)
    for problem in problems:
        if problem not in _logged_problems:
            if len(_logged_problems) >= LOGGED_PROBLEMS_MAX:
                _logged_problems.clear()
            _logged_problems.add(problem)
            log.error("subscribers: %s", problem)
    return Found(found, problems)


def scan(database: str, now: float) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`read_all`'s subscribers, and what could not be read, each a
    sentence naming the path, the reason and the fix: the directory or a
    file this user may not read, a file that is not a stats file.  A
    directory that does not exist is no problem (no subscriber ever ran)."""
    directory = stats_dir(database)
    try:
        entries = sorted(e for e in os.listdir(directory) if e.endswith(".json"))
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [f"CANNOT READ {directory} ({exc.strerror}): {UNREADABLE_FIX}"]
    found, problems = [], []
    me = boot_id()
    mono = time.monotonic()
    for entry in entries:
        path = os.path.join(directory, entry)
        try:
            info = _checked(entry[:-len(".json")], json.loads(_read_small(path)))
        except PermissionError as exc:
            problems.append(f"CANNOT READ {path} ({exc.strerror}): {UNREADABLE_FIX}")
            continue
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.debug("skipping subscriber stats %r: %s", entry, exc)
            problems.append(f"{path} is not a subscriber's stats file ({exc}): remove it")
            continue
        # The age by CLOCK_MONOTONIC when the file is of this boot: the
        # wall clock set back would keep a killed subscriber "running".
        # A file of an earlier boot is of a process that is gone.  (A file
        # without them, of an older version, goes by the wall clock.)
        stamped = me is not None and info["boot_id"] is not None and info["monotonic"] is not None
        same_boot = stamped and info["boot_id"] == me
        age = mono - info["monotonic"] if same_boot else now - info["updated_at"]
        if now - info["updated_at"] > FORGET_S and age > FORGET_S:
            continue
        info["age"] = round(age, 1)
        info["state"] = ("stopped" if info["stopped"] else
                         "running" if age <= STALE_S and (same_boot or not stamped)
                         else "not running")
        del info["monotonic"], info["boot_id"]
        found.append(info)
    # The sentences go to UTF-8 pages (/metrics) and logs: a file name that
    # is not UTF-8 (check_name refuses it), in the path or in an OSError's
    # text, is shown with its bytes escaped, never with the surrogates
    # os.listdir gives (they cannot be encoded: the page would be a 500).
    return found, [os.fsencode(p).decode("utf-8", "backslashreplace") for p in problems]


def _read_small(path: str) -> bytes:
    """A regular file's bytes, at most MAX_STATS_BYTES (OSError or
    ValueError for anything else): junk in the directory, a FIFO that would
    block open() for ever or a huge file, must not hang or load a reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_STATS_BYTES:
            raise ValueError(f"{st.st_size:,} bytes, over {MAX_STATS_BYTES:,}")
        return os.read(fd, MAX_STATS_BYTES + 1)
    finally:
        os.close(fd)


def _checked(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """A stats file's fields with the types the readers use (ValueError,
    TypeError, KeyError or AttributeError for a file that is not one): a
    damaged or foreign file must not break /metrics.  The name is the
    file's, whatever the file says."""
    def count(value: Any) -> int:
        n = int(value)
        if n < 0:
            raise ValueError(f"negative count {n}")
        return n

    def finite(value: Any) -> float:
        x = float(value)
        if not math.isfinite(x):
            raise ValueError(f"not a finite number: {value!r}")
        return x

    def text(value: Any) -> str:
        # JSON can spell a lone surrogate, which no UTF-8 output can hold
        # (UnicodeEncodeError is a ValueError: the file is damaged).
        value = str(value)
        value.encode("utf-8")
        return value

    connected, heard, mono = raw.get("connected"), raw.get("last_heard"), raw.get("monotonic")
    started = raw.get("started_at")
    return {
        "name": check_name(name), "addresses": [text(a) for a in raw.get("addresses") or []],
        "topics": [text(t) for t in raw.get("topics") or []],
        "pid": raw.get("pid") if isinstance(raw.get("pid"), int) else None,
        "started_at": None if started is None else finite(started),
        "updated_at": finite(raw["updated_at"]),
        "last_heard": None if heard is None else finite(heard),
        "monotonic": None if mono is None else finite(mono),
        "boot_id": raw.get("boot_id") if isinstance(raw.get("boot_id"), str) else None,
        "connected": None if connected is None else count(connected),
        "disconnects": count(raw.get("disconnects", 0)),
        "stopped": bool(raw.get("stopped")),
        **{field: count(raw.get(field, 0)) for field in ("received", "counted", "uncounted")},
        "rejected": {text(r): count(n) for r, n in (raw.get("rejected") or {}).items()},
    }
