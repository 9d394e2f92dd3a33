"""What ``trafficthreshold status`` and ``alerts`` report: collected as plain
dicts (for ``--json``) and rendered as text."""
from __future__ import annotations

import datetime as dt
import os
import sys
from typing import Any

from . import segment, subscribe, throttle
from .config import Config
from .errors import LayoutMismatch, SegmentNotFound

WINDOW_NAMES = {v: k for k, v in segment.WINDOWS.items()}
STATE_NAMES = {segment.STATE_INSTALLING: "installing", segment.STATE_LIVE: "live",
               segment.STATE_RETIRED: "retired"}


def _iso(ts: float) -> str:
    """``ts`` as ISO 8601 UTC; a value no clock can hold (a damaged header)
    is shown as the raw number, never an error."""
    try:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"<invalid timestamp {ts!r}>"


#: What `status` says to do about a damaged segment.
REPAIR = ("a damaged segment counts wrongly: run `trafficthreshold uninstall` (it rolls "
          "what it can into the store; add --force if workers are attached) and "
          "`trafficthreshold install` again")

#: The same for a segment the library refuses to attach: its counts cannot
#: be read, so a roll-up cannot run (plain ``uninstall --force`` fails).
REPAIR_UNATTACHED = ("its counts cannot be read: run `trafficthreshold uninstall --force "
                     "--no-rollup` and `trafficthreshold install` again (the store keeps "
                     "what was rolled up before)")


def collect(cfg: Config, now: float) -> dict[str, Any]:
    """Everything about the segment, as a JSON-ready dict.  Raises
    SegmentNotFound (with the fix) when none is installed.

    Never fails on what the segment holds: a header field out of range or an
    index entry that cannot be read is listed under ``damage`` (with the
    fix, :data:`REPAIR`) and the rest is reported as far as it can be.
    Reads only; takes no lock (a key being added meanwhile may be missed).
    A segment of ours that the library refuses to attach (a corrupt header:
    geometry, layout version or state) is reported from its raw header
    instead (:func:`_collect_unattached`)."""
    try:
        counter = segment.attach(cfg.key, cfg.backend)
    except (LayoutMismatch, SegmentNotFound) as exc:
        raw = _raw_header(cfg)
        if raw is None or (isinstance(exc, SegmentNotFound)
                           and raw[1]["state"] in STATE_NAMES):
            raise  # none, not ours, or (being) installed/uninstalled: the library's word
        return _collect_unattached(cfg, now, exc, *raw)
    try:
        head = segment.header(counter)
        damage = _header_damage(head)
        damage.extend(_guarded(damage, "probe_limit", segment.probe_limit_problems,
                               counter, cfg.key, cfg.backend) or [])
        keys = _read_keys(counter, now, damage)
        keys.sort(key=lambda k: (k["event"], k["account"]))
        level = _guarded(damage, "throttle level", counter.level, now)
        info = _report(cfg, head, counter.size, level, now, damage)
        info["keys"] = keys
        info["damage"] = damage
        info["repair"] = REPAIR if damage else None
        return info
    finally:
        counter.detach()


def _raw_header(cfg: Config) -> tuple[int, dict[str, int]] | None:
    """(segment size, header fields by name) read from the raw bytes, or
    None when there is no segment or it is not trafficthreshold's (magic)."""
    try:
        size = _raw_size(cfg)
        data = _raw_bytes(cfg, 0, segment.HEADER_SIZE)
    except Exception:  # gone, or unreadable: the library's error stands
        return None
    if len(data) < segment.HEADER_SIZE or data[:8] != segment.MAGIC:
        return None
    return size, {name: int.from_bytes(data[off:off + width], sys.byteorder)
                  for name, (off, width) in segment.HEADER_FIELDS.items()}


def _collect_unattached(cfg: Config, now: float, exc: Exception, size: int,
                        head: dict[str, int]) -> dict[str, Any]:
    """What ``status`` can say about a segment the library will not attach:
    its raw header (under ``header``), the library's reason and each field
    out of range under ``damage``; no keys or counts."""
    damage = [str(exc), *_header_damage(head)]
    return {**_report(cfg, head, size, None, now, damage),
            "keys": [], "header": head, "damage": damage, "repair": REPAIR_UNATTACHED}


def _report(cfg: Config, head: dict[str, int], size: int, level: int | None, now: float,
            damage: list[str]) -> dict[str, Any]:
    """The part of the status read from the header (and /proc); what cannot
    be read is added to ``damage``."""
    return {
        "backend": cfg.backend, "key": cfg.key, "key_hex": f"{cfg.key:#x}",
        "size": size, "state": STATE_NAMES.get(head["state"], head["state"]),
        "created_at": _iso(head["created_at"]),
        "capacity": head["key_capacity"], "keys_used": head["keys_used"],
        "free_slots": head["free_slots"], "reclaimed": head["reclaimed"],
        "minutes": head["minute_buckets"], "stripes": head["stripes"],
        "overflow_hits": head["overflow_hits"], "dropped_hits": head["dropped_hits"],
        "lock_timeouts": head["lock_timeouts"],
        "attached": _guarded(damage, "attached processes", segment.attached_pids,
                             cfg.key, cfg.backend) or [],
        "permissions": _guarded(damage, "permissions", _permissions, cfg),
        "throttle": _throttle(cfg, head, level, now, damage),
        "supervisor": _supervisor(head, now),
        "store": _store(cfg, now),
        **({"farm": _farm(cfg, now)} if cfg.store.backend == "redis" else {}),
        **subscribers(cfg, now),
    }


def subscribers(cfg: Config, now: float) -> dict[str, Any]:
    """The ``trafficthreshold subscribe`` processes (from their stats files)
    and what could not be read of them (``subscriber_problems``: a state
    directory this user may not read, a damaged file), with or without a
    segment."""
    found, problems = subscribe.scan(cfg.database, now)
    return {"subscribers": found, "subscriber_problems": problems}


def _store(cfg: Config, now: float) -> dict[str, Any]:
    """The period store ([store]): which, whether it answered (Redis: one
    PING within stores.PING_TIMEOUT), this host's last roll and its age."""
    from . import store as stores  # redis-py only when the store is Redis
    info = stores.ping(cfg)
    last = info["last_roll_at"]
    info["last_roll_age"] = None if last is None else round(now - last, 1)
    info["last_roll_at"] = None if last is None else _iso(int(last))
    return info


def _farm(cfg: Config, now: float) -> dict[str, Any]:
    """The farm's live numbers (Redis store only), as ``/api/stats/live?
    scope=farm`` has them, plus ``throttle_scope`` and ``error`` (None, or
    why Redis did not answer within stores.PING_TIMEOUT)."""
    from . import farm, farmsync, store as stores
    from .live import farm_view
    try:
        client = stores.redis_client(cfg, timeout=stores.PING_TIMEOUT)
        farmsync.no_retries(client)  # one timeout at most, not redis-py's backoff
        try:
            live = farm.farm_live(client, now=now, prefix=cfg.store.prefix)
            view = farm_view(live, now, cfg.store.host)
            skews = {row.host: row.skew for row in live.hosts}
            for row in view["hosts"]:  # its clock minus Redis' (the farm's one clock)
                row["clock_skew"] = skews.get(row["host"])
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - a report, not a failure
        view = {"error": f"{type(exc).__name__}: {exc}", "host": cfg.store.host,
                "leader": None, "hosts_alive": 0, "keys": [], "hosts": []}
    else:
        view["error"] = None
    view["throttle_scope"] = cfg.throttle.scope
    return view


def _raw_size(cfg: Config) -> int:
    import sysv_ipc
    if cfg.backend == "sysv":
        shm = sysv_ipc.SharedMemory(cfg.key)
        try:
            return int(shm.size)
        finally:
            shm.detach()
    return os.stat("/dev/shm" + segment.posix_name(cfg.key)).st_size


def _guarded(damage: list[str], what: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or None with the failure added to ``damage``."""
    try:
        return fn(*args)
    except Exception as exc:  # status reports everything it can, never a traceback
        damage.append(f"{what}: cannot be read ({exc.__class__.__name__}: {exc})")
        return None


def _header_damage(head: dict[str, int]) -> list[str]:
    """Header fields whose value no install or worker writes."""
    damage = []

    def bad(name: str, allowed: str) -> None:
        damage.append(f"header field {name} (offset {segment.HEADER_FIELDS[name][0]}) = "
                      f"{head[name]:#x}, expected {allowed}")

    cap = head["key_capacity"]
    if head["state"] == segment.STATE_LIVE and not cap > head["throttle_slot"] > 0:
        bad("throttle_slot", f"a slot in 1..{cap - 1}" if cap > 1 else
            "a slot below key_capacity")
    if head["keys_used"] > cap:
        bad("keys_used", f"at most key_capacity ({cap})")
    if head["free_slots"] > head["keys_used"]:
        bad("free_slots", f"at most keys_used ({head['keys_used']})")
    if head["throttle_level"] > throttle.MAX_LEVEL:
        bad("throttle_level", f"0..{throttle.MAX_LEVEL}")
    if head["throttle_window"] not in WINDOW_NAMES:
        bad("throttle_window", " or ".join(f"{v} ({k})" for k, v in segment.WINDOWS.items()))
    if head["state"] not in STATE_NAMES:
        bad("state", ", ".join(f"{k} ({v})" for k, v in STATE_NAMES.items()))
    return damage


def _read_keys(counter: Any, now: float, damage: list[str]) -> list[dict[str, Any]]:
    """Every key with its counts, read again while a key was reclaimed
    meanwhile, so that no count is shown under another key's name
    (:func:`segment.read_consistently`); what could not be read is added to
    ``damage``."""

    def read() -> tuple[list[dict[str, Any]], list[str]]:
        found: list[str] = []
        rows = []
        for slot, account, event in _keys(counter, found):
            minute, last_60s = counter.count(slot, 1, now), counter.count(slot, 0, now)
            rows.append({"account": account, "event": event, "slot": slot,
                         "minute": minute, "last_60s": last_60s})
        return rows, found

    got, skip = segment.read_consistently(counter, read)
    if got is None:
        damage.append("the key index changed during every read (keys reclaimed meanwhile); "
                      "run `trafficthreshold status` again")
        return []
    rows, found = got
    damage.extend(found)
    if skip:
        damage.append(f"slot {min(skip)} is being reclaimed (a reclaim under way, finished "
                      "by the next lock holder); left out")
    return [row for row in rows if row["slot"] not in skip]


def _keys(counter: Any, damage: list[str]) -> list[tuple[int, str, str]]:
    """(slot, account, event) of every key; a name that is not UTF-8 (the C
    reader hands its bytes on as lone surrogates) shown escaped and
    reported; an entry whose slot is past the key table left out and
    reported."""
    past: list[tuple[int, tuple[int, str, str]]] = []
    keys = counter.keys(past)
    damage.extend(segment.describe_past_table(past))
    return [(slot, _printable(damage, slot, "account", account),
             _printable(damage, slot, "event", event))
            for slot, account, event in keys]


def _printable(damage: list[str], slot: int, field: str, name: str) -> str:
    """``name`` as the C reader gave it; one that is not UTF-8 (a reader that
    decodes with surrogateescape hands those bytes on as lone surrogates,
    which no terminal or JSON consumer can take) shown escaped and reported."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        damage.append(f"slot {slot}: the {field} name {raw!r} is not UTF-8")
        return raw.decode("utf-8", "backslashreplace")


def _raw_bytes(cfg: Config, offset: int, length: int) -> bytes:
    """``length`` bytes of the segment at ``offset``, read without the C module."""
    import sysv_ipc
    if cfg.backend == "sysv":
        shm = sysv_ipc.SharedMemory(cfg.key)
        try:
            return shm.read(length, offset)
        finally:
            shm.detach()
    with open("/dev/shm" + segment.posix_name(cfg.key), "rb") as file:
        file.seek(offset)
        return file.read(length)


def _permissions(cfg: Config) -> dict[str, Any]:
    import grp
    import pwd

    import sysv_ipc
    if cfg.backend == "sysv":
        shm = sysv_ipc.SharedMemory(cfg.key)
        uid, gid, mode = shm.uid, shm.gid, shm.mode & 0o777
        shm.detach()
    else:
        st = os.stat("/dev/shm" + segment.posix_name(cfg.key))
        uid, gid, mode = st.st_uid, st.st_gid, st.st_mode & 0o777
    def name(getter: Any, ident: int) -> str:
        try:
            return getter(ident)[0]
        except KeyError:
            return str(ident)
    return {"owner": name(pwd.getpwuid, uid), "group": name(grp.getgrgid, gid),
            "mode": f"{mode:03o}"}


def _throttle(cfg: Config, head: dict[str, int], level: int | None, now: float,
              damage: list[str]) -> dict[str, Any]:
    mult = head["throttle_multiplier"] or cfg.throttle.multiplier
    low, high = (None, None) if level is None else (
        _guarded(damage, "throttle range", throttle.level_range, level, mult) or (None, None))
    return {"level": level, "supervisor_level": head["throttle_level"], "min": low, "max": high,
            "multiplier": mult, "window": WINDOW_NAMES.get(head["throttle_window"], "?"),
            "policy": cfg.throttle.policy,
            "policy_state": _policy_state(cfg, head, now)}


def _policy_state(cfg: Config, head: dict[str, int], now: float) -> str:
    """What the policy is waiting for, in words."""
    level, since = head["throttle_level"], head["throttle_since_ms"] / 1000
    t = cfg.throttle
    if level == 0 or not since:
        return "steady"
    if t.policy == "hysteresis":
        left = max(0, t.cooldown - (now - since))
        return (f"below level {level}'s floor for {now - since:.0f} s; steps down to "
                f"{level - 1} in {left:.0f} s unless traffic returns")
    return f"next step-down test in {max(0, t.cron_test - (now - since)):.0f} s"


def _supervisor(head: dict[str, int], now: float) -> dict[str, Any]:
    if not head["heartbeat_ms"]:
        return {"running": False, "pid": None, "heartbeat_age": None}
    age = round(now - head["heartbeat_ms"] / 1000, 1)
    fresh = age <= segment.HEARTBEAT_STALE_MS / 1000  # as the hot path judges it
    return {"running": bool(head["supervisor_pid"]) and fresh,
            "pid": head["supervisor_pid"] or None, "heartbeat_age": age}


def render(info: dict[str, Any]) -> str:
    """The human-readable status."""
    t, s = info["throttle"], info["supervisor"]
    top = "-" if t["max"] is None else t["max"]
    low = "?" if t["min"] is None else t["min"]
    level = "?" if t["level"] is None else t["level"]
    sup = ("not running (no heartbeat yet)" if s["heartbeat_age"] is None else
           f"pid {s['pid']}, heartbeat {s['heartbeat_age']} s ago"
           + ("" if s["running"] else " - NOT RUNNING: start `trafficthreshold run`"))
    perm = info["permissions"] or {"owner": "?", "group": "?", "mode": "?"}
    damage = [f"DAMAGED     {d}" for d in info["damage"]]
    if damage:
        damage.append(f"            {info['repair']}")
    lines = [
        f"segment     {info['backend']} key {info['key_hex']}, {info['size']:,} bytes, "
        f"{info['state']}, created {info['created_at']}",
        *damage,
        *(["header      " + ", ".join(f"{k} {v:#x}" for k, v in info["header"].items())]
          if info.get("header") else []),
        f"permissions {perm['owner']}:{perm['group']} {perm['mode']}",
        f"keys        {info['keys_used'] - info['free_slots']} of {info['capacity']} used; "
        f"ring {info['minutes']} minutes x {info['stripes']} stripes",
        f"reclaimed   {info['reclaimed']} idle keys' slots since the install, "
        f"{info['free_slots']} free for new keys",
        f"losses      overflow hits {info['overflow_hits']}, dropped hits {info['dropped_hits']} "
        f"({_plural(info['lock_timeouts'], 'lock wait', 'lock waits')} past 50 ms)",
        f"attached    {_plural(len(info['attached']), 'other process', 'other processes')}",
        f"throttle    level {level} ({low} - {top}), window {t['window']}, "
        f"multiplier {t['multiplier']}, policy {t['policy']}: {t['policy_state']}",
        f"supervisor  {sup}",
        *([_render_store(info["store"])] if info.get("store") else []),
        *(_render_farm(info["farm"]) if info.get("farm") else []),
        *render_subscribers(info.get("subscribers") or [], info.get("subscriber_problems") or []),
        "",
        f"{'ACCOUNT':<40} {'EVENT':<16} {'MINUTE':>10} {'LAST 60 S':>10}",
    ]
    for k in info["keys"]:
        lines.append(f"{k['account']:<40} {k['event']:<16} {k['minute']:>10,} "
                     f"{k['last_60s']:>10,}")
    if info.get("farm") and not info["farm"]["error"]:
        lines += ["", f"{'FARM TOTAL: ACCOUNT':<40} {'EVENT':<16} {'MINUTE':>10} "
                      f"{'LAST 60 S':>10}"]
        lines += [f"{k['account']:<40} {k['event']:<16} {k['current_minute']:>10,} "
                  f"{k['last_60s']:>10,}" for k in info["farm"]["keys"]]
    return "\n".join(lines)


#: A host clock this far off Redis' TIME is shown (farm.SKEW_SHOWN; the
#: farm module is not imported by the status of a host without a farm).
SKEW_SHOWN = 2.0


def _render_farm(f: dict[str, Any]) -> list[str]:
    """``farm  2 of 3 hosts alive, ...`` and a line per host."""
    if f["error"]:
        return [f"farm        DID NOT ANSWER ({f['error']}); throttle scope "
                f"{f['throttle_scope']}"]
    leader = f["leader"] or "none (no host holds the lease)"
    lines = [f"farm        {f['hosts_alive']} of {_plural(len(f['hosts']), 'host', 'hosts')} "
             f"alive, alerts led by {leader}, throttle scope {f['throttle_scope']}"]
    for h in f["hosts"]:
        pages = next((k["last_60s"] for k in h["keys"]
                      if (k["account"], k["event"]) == ("all", "pageview")), 0)
        roll = ("no roll yet" if h["last_roll_at"] is None else
                f"last roll {_iso(int(h['last_roll_at']))}")
        seen = ("never published" if h["published_at"] is None
                else f"published {h['age_seconds']:.1f} s ago")
        state = (f"alive, level {h['level']}, {pages:,} page views in 60 s" if h["alive"]
                 else f"NOT ALIVE ({seen})")
        mark = " (this host)" if h["host"] == f["host"] else ""
        skew = h.get("clock_skew")
        clock = (f", CLOCK {abs(skew):.1f} s {'AHEAD OF' if skew > 0 else 'BEHIND'} the "
                 "farm's (Redis TIME): fix its NTP" if skew is not None
                 and abs(skew) > SKEW_SHOWN else "")
        lines.append(f"  {h['host']}{mark}: {state}, {roll}{clock}")
    return lines


def render_subscribers(subs: list[dict[str, Any]], problems: list[str] = ()) -> list[str]:
    """``subscriber  bus: running, ...`` a line each (trafficthreshold
    subscribe, from its stats file: see subscribe.read_all), and
    ``subscribers ...`` for each thing that could not be read."""
    lines = [f"subscribers {problem}" for problem in problems]
    for sub in subs:
        heard = ("nothing heard yet" if sub.get("last_heard") is None else
                 f"last heard {_iso(int(sub['last_heard']))}")
        state = sub["state"].upper() if sub["state"] == "not running" else sub["state"]
        where = " ".join(sub.get("addresses") or [])
        linked = ("" if sub.get("connected") is None else
                  f", {sub['connected']} of {len(sub.get('addresses') or [])} connected, "
                  f"{sub.get('disconnects', 0)} disconnects")
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted((sub.get("rejected") or {}).items())
                            if n)
        rejected = sum((sub.get("rejected") or {}).values())
        lines.append(f"subscriber  {sub['name']} ({where}): {state} (stats {sub['age']} s old)"
                     f"{linked}; {heard}")
        lines.append(f"            {sub.get('received', 0):,} received, "
                     f"{sub.get('counted', 0):,} counted, {rejected:,} rejected"
                     + (f" ({reasons})" if reasons else "")
                     + (f", {sub['uncounted']:,} not counted (no segment)"
                        if sub.get("uncounted") else ""))
    return lines


def _render_store(st: dict[str, Any]) -> str:
    """``store  redis ... answered, last roll 12.0 s ago``."""
    if not st["answered"]:
        return f"store       {st['where']}: DID NOT ANSWER ({st['error']})"
    last = ("no roll yet" if st["last_roll_age"] is None else
            f"last roll {st['last_roll_at']} ({st['last_roll_age']} s ago)")
    return f"store       {st['where']}: answered, {last}"


def _plural(n: int, one: str, many: str) -> str:
    """``1 other process``, ``2 other processes``."""
    return f"{n} {one if n == 1 else many}"


def alert_report(cfg: Config) -> dict[str, Any]:
    """Rules with their episode state, and the newest queued mails: host
    rules from this host's SQLite file, farm rules (``scope = "farm"``)
    from the farm's Redis (``farm_queue``; ``farm_error`` when Redis did
    not answer within stores.PING_TIMEOUT)."""
    from .alerts.store import AlertStore
    if not os.path.exists(cfg.database):
        state_episodes: dict[str, Any] = {}
        queue: list[Any] = []
    else:
        store = AlertStore(cfg.database)
        try:
            state_episodes = dict(store.load_state().episodes)
            queue = store.list(limit=20)
        finally:
            store.close()
    farm_episodes, farm_queue, farm_error = _farm_alerts(cfg)
    rules = []
    for r in cfg.alerts:
        ep = (farm_episodes if r.scope == "farm" else state_episodes).get(r.name)
        rules.append({"name": r.name, "scope": r.scope, "account": r.account, "event": r.event,
                      "threshold": r.threshold, "window": r.window, "to": list(r.to),
                      "firing": ep is not None,
                      "since": _iso(ep.started) if ep else None,
                      "peak": ep.peak if ep else None})

    def rows(mails: list[Any]) -> list[dict[str, Any]]:
        return [{"id": m.id, "created": _iso(m.created), "kind": m.kind, "rules": list(m.rules),
                 "to": list(m.recipients), "status": m.status, "attempts": m.attempts,
                 "last_error": m.last_error} for m in mails]

    report = {"rules": rules, "queue": rows(queue)}
    if cfg.farm_alerts:
        report.update(farm_queue=rows(farm_queue), farm_error=farm_error)
    return report


def _farm_alerts(cfg: Config) -> tuple[dict[str, Any], list[Any], str | None]:
    """The farm rules' episodes and newest mails from Redis (none without
    farm rules), and the error if Redis did not answer."""
    if cfg.store.backend != "redis" or not cfg.farm_alerts:
        return {}, [], None
    from . import farmsync, store as stores
    from .alerts.farm import FarmAlertStore
    try:
        client = stores.redis_client(cfg, timeout=stores.PING_TIMEOUT)
        farmsync.no_retries(client)
        try:
            store = FarmAlertStore(client, cfg.store.prefix)
            return dict(store.load_state().episodes), store.list(limit=20), None
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - a report, not a failure
        return {}, [], f"{type(exc).__name__}: {exc}"


def render_alerts(report: dict[str, Any]) -> str:
    lines = [f"{'RULE':<20} {'TARGET':<30} {'THRESHOLD':>10}  STATE"]
    for r in report["rules"]:
        state = f"FIRING since {r['since']}, peak {r['peak']}" if r["firing"] else "ok"
        if r.get("scope") == "farm":
            state += " (farm)"
        lines.append(f"{r['name']:<20} {r['account'] + '/' + r['event']:<30} "
                     f"{r['threshold']:>7}/{r['window']}  {state}")
    if not report["rules"]:
        lines.append("(no [[alert]] rules configured)")
    for title, key in (("", "queue"), ("farm rules' mails (Redis)", "farm_queue")):
        if key not in report:
            continue
        lines += ["", title] if title else [""]
        if key == "farm_queue" and report.get("farm_error"):
            lines.append(f"(Redis did not answer: {report['farm_error']})")
            continue
        lines.append(f"{'ID':>5} {'CREATED':<26} {'KIND':<10} {'STATUS':<8} {'TRIES':>5}  ERROR")
        for m in report[key]:
            lines.append(f"{m['id']:>5} {m['created']:<26} {m['kind']:<10} {m['status']:<8} "
                         f"{m['attempts']:>5}  {m['last_error'] or ''}")
    return "\n".join(lines)
