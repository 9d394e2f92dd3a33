"""What ``trafficthreshold status`` and ``alerts`` report: collected as plain
dicts (for ``--json``) and rendered as text."""
from __future__ import annotations

import datetime as dt
import os
from typing import Any

from . import segment, throttle
from .config import Config

WINDOW_NAMES = {v: k for k, v in segment.WINDOWS.items()}
STATE_NAMES = {segment.STATE_INSTALLING: "installing", segment.STATE_LIVE: "live",
               segment.STATE_RETIRED: "retired"}


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def collect(cfg: Config, now: float) -> dict[str, Any]:
    """Everything about the segment, as a JSON-ready dict.  Raises
    SegmentNotFound (with the fix) when none is installed."""
    counter = segment.attach(cfg.key, cfg.backend)
    try:
        head = segment.header(counter)
        keys = []
        for slot, account, event in sorted(counter.keys(), key=lambda k: (k[2], k[1])):
            keys.append({"account": account, "event": event, "slot": slot,
                         "minute": counter.count(slot, 1, now),
                         "last_60s": counter.count(slot, 0, now)})
        return {
            "backend": cfg.backend, "key": cfg.key, "key_hex": f"{cfg.key:#x}",
            "size": counter.size, "state": STATE_NAMES.get(head["state"], head["state"]),
            "created_at": _iso(head["created_at"]),
            "capacity": head["key_capacity"], "keys_used": head["keys_used"],
            "minutes": head["minute_buckets"], "stripes": head["stripes"],
            "overflow_hits": head["overflow_hits"], "dropped_hits": head["dropped_hits"],
            "attached": segment.attached_pids(cfg.key, cfg.backend),
            "permissions": _permissions(cfg),
            "throttle": _throttle(cfg, head, counter.level(now), now),
            "supervisor": _supervisor(head, now),
            "keys": keys,
        }
    finally:
        counter.detach()


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


def _throttle(cfg: Config, head: dict[str, int], level: int, now: float) -> dict[str, Any]:
    mult = head["throttle_multiplier"] or cfg.throttle.multiplier
    low, high = throttle.level_range(level, mult)
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
    sup = ("not running (no heartbeat yet)" if s["heartbeat_age"] is None else
           f"pid {s['pid']}, heartbeat {s['heartbeat_age']} s ago"
           + ("" if s["running"] else " - NOT RUNNING: start `trafficthreshold run`"))
    perm = info["permissions"]
    lines = [
        f"segment     {info['backend']} key {info['key_hex']}, {info['size']:,} bytes, "
        f"{info['state']}, created {info['created_at']}",
        f"permissions {perm['owner']}:{perm['group']} {perm['mode']}",
        f"keys        {info['keys_used']} of {info['capacity']} used; "
        f"ring {info['minutes']} minutes x {info['stripes']} stripes",
        f"losses      overflow hits {info['overflow_hits']}, dropped hits {info['dropped_hits']}",
        f"attached    {len(info['attached'])} other processes",
        f"throttle    level {t['level']} ({t['min']} - {top}), window {t['window']}, "
        f"multiplier {t['multiplier']}, policy {t['policy']}: {t['policy_state']}",
        f"supervisor  {sup}",
        "",
        f"{'ACCOUNT':<40} {'EVENT':<16} {'MINUTE':>10} {'LAST 60 S':>10}",
    ]
    for k in info["keys"]:
        lines.append(f"{k['account']:<40} {k['event']:<16} {k['minute']:>10,} "
                     f"{k['last_60s']:>10,}")
    return "\n".join(lines)


def alert_report(cfg: Config) -> dict[str, Any]:
    """Rules with their episode state, and the newest queued mails."""
    from .alertstore import AlertStore
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
    rules = []
    for r in cfg.alerts:
        ep = state_episodes.get(r.name)
        rules.append({"name": r.name, "account": r.account, "event": r.event,
                      "threshold": r.threshold, "window": r.window, "to": list(r.to),
                      "firing": ep is not None,
                      "since": _iso(ep.started) if ep else None,
                      "peak": ep.peak if ep else None})
    mails = [{"id": m.id, "created": _iso(m.created), "kind": m.kind, "rules": list(m.rules),
              "to": list(m.recipients), "status": m.status, "attempts": m.attempts,
              "last_error": m.last_error} for m in queue]
    return {"rules": rules, "queue": mails}


def render_alerts(report: dict[str, Any]) -> str:
    lines = [f"{'RULE':<20} {'TARGET':<30} {'THRESHOLD':>10}  STATE"]
    for r in report["rules"]:
        state = f"FIRING since {r['since']}, peak {r['peak']}" if r["firing"] else "ok"
        lines.append(f"{r['name']:<20} {r['account'] + '/' + r['event']:<30} "
                     f"{r['threshold']:>7}/{r['window']}  {state}")
    if not report["rules"]:
        lines.append("(no [[alert]] rules configured)")
    lines += ["", f"{'ID':>5} {'CREATED':<26} {'KIND':<10} {'STATUS':<8} {'TRIES':>5}  ERROR"]
    for m in report["queue"]:
        lines.append(f"{m['id']:>5} {m['created']:<26} {m['kind']:<10} {m['status']:<8} "
                     f"{m['attempts']:>5}  {m['last_error'] or ''}")
    return "\n".join(lines)
