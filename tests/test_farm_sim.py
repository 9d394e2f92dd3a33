"""A farm of three hosts on one machine: three segments (own keys), three
supervisors with their own ``[store] host`` names, one real redis-server.

Workers hit known totals; supervisors are dropped without a shutdown (in
process, driven clock, across midnight) or SIGKILLed (real ``trafficthreshold
run`` processes, real clock) and started again.  In the end every level of
every key in Redis is exact, the account ``all`` is the sum of the hosts'
hits, and what plain HGETALL reads (as Bootic's handlers did) is what
``RedisStore.period`` returns.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from trafficthreshold import config as configuration, segment
from trafficthreshold.periods import local_parts
from trafficthreshold.store.redis import RedisStore
from trafficthreshold.supervisor import Supervisor
from tt_farm import HOSTS, host_config, three_hosts
from tt_proxy import TcpProxy

pytestmark = pytest.mark.redis

ACCOUNTS = ("acme", "globex", "initech")
EVENTS = ("pageview", "signup")
#: 2027-01-14 23:15 UTC: the driven run crosses midnight (a new day and hour).
START = 1_800_000_000 - 8 * 3600 - 45 * 60


@pytest.fixture
def farm(tmp_path, redis_server):
    """Three installed SysV segments and a config file per host (Redis
    itself, not the proxies)."""
    with three_hosts(redis_server.port, START) as (keys, _proxies):
        yield keys, {h: host_config(tmp_path, h, keys[h], redis_server.port) for h in HOSTS}


def expected_levels(hits: dict) -> dict[str, dict[str, int]]:
    """Redis key -> {field: count} for every level, from (account, event,
    minute) -> hits; ``all`` gets every hit."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for (account, event, minute), n in hits.items():
        y, mo, d, h, mi = local_parts(minute, ZoneInfo("UTC"))
        for acc in (account, "all"):
            base = f"track:{acc}:{event}"
            out[f"{base}:{y}"][str(mo)] += n
            out[f"{base}:{y}:{mo}"][str(d)] += n
            out[f"{base}:{y}:{mo}:{d}"][str(h)] += n
            out[f"{base}:{y}:{mo}:{d}:{h}"][str(mi)] += n
    return {k: dict(v) for k, v in out.items()}


def assert_exact(redis_server, hits: dict) -> None:
    """Every level of every key exact by plain HGETALL; RedisStore.period
    reads the same; nothing else under ``track:``."""
    client = redis_server.client()
    want = expected_levels(hits)
    found = {k.decode() for k in client.scan_iter("track:*")}
    assert found == set(want)
    reader = RedisStore(client, ZoneInfo("UTC"), "reader")
    for key, fields in want.items():
        got = {f.decode(): int(v) for f, v in client.hgetall(key).items()}
        assert got == fields, key
        _, account, event, *parts = key.split(":")
        period = reader.period(account, event, *map(int, parts))
        assert {str(s): n for s, n in period["data"].items() if n} == got, key
    total = sum(hits.values())
    for event in EVENTS:
        years = [k for k in want if k.startswith(f"track:all:{event}:") and k.count(":") == 3]
        per_host_sum = sum(n for (_, e, _), n in hits.items() if e == event)
        assert sum(sum(want[k].values()) for k in years) == per_host_sum
    assert total > 0


def test_three_hosts_driven_clock_across_midnight_with_crashes(farm, redis_server):
    """In process: supervisors dropped without a shutdown (a crash: their
    roll thread may still be writing) and started again, while another
    host's roll runs; every level exact."""
    keys, paths = farm
    rnd = random.Random(12)
    counters = {h: segment.attach(keys[h], "sysv") for h in HOSTS}
    cfgs = {h: configuration.load(paths[h], env={}) for h in HOSTS}
    sups = {}
    dropped = []
    hits: dict = defaultdict(int)

    def start(host, now):
        s = Supervisor(cfgs[host], config_path=paths[host], env={}, pid=1000 + HOSTS.index(host))
        s.initialize(now)
        sups[host] = s

    for host in HOSTS:
        start(host, START)
    for minute in range(90):
        for second in (5, 25, 45):
            now = START + minute * 60 + second
            for host in HOSTS:
                account, event = rnd.choice(ACCOUNTS), rnd.choice(EVENTS)
                n = rnd.randint(1, 50)
                counters[host].hit(account, event, n, now)
                hits[(account, event, int(now // 60))] += n
                sups[host].tick(now)
        if minute % 17 == 16:  # a crash: no shutdown, no final roll
            host = rnd.choice(HOSTS)
            dropped.append(sups.pop(host))
            start(host, START + minute * 60 + 50)
    end = START + 90 * 60 + 1
    for host in HOSTS:
        sups[host]._wait_rolling()
        sups[host].shutdown(end)  # the final roll, the open minute too
    for s in dropped:
        s._wait_rolling()
        if s.farm is not None:  # its farm thread died with it: no withdrawal
            s.farm.stop(withdraw=False)
        s.counter.detach()
    for c in counters.values():
        c.detach()
    assert len(dropped) >= 4
    assert_exact(redis_server, hits)
    client = redis_server.client()
    for host in HOSTS:  # no host lost a minute: no gap
        assert client.llen(f"track~gaps:{host}") == 0
        assert int(client.hget(f"track~host:{host}", "closed_through")) >= end // 60 - 1


def _daemon(path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trafficthreshold.cli", "--config", path,
                             "run", "--no-http"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _wait_ready(counter, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Until the daemon wrote its pid into the header (it has started)."""
    deadline = time.monotonic() + timeout
    while counter.load(segment.H_SUPERVISOR_PID, 4) != proc.pid:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.02)


def _migrate(path: str, url: str) -> str:
    """``trafficthreshold store migrate`` as a user runs it (a process);
    its output, after asserting it worked."""
    out = subprocess.run([sys.executable, "-m", "trafficthreshold.cli", "--config", path,
                          "store", "migrate", "--to", url], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def run_sigkill_farm(farm, redis_server, kills: int, seconds: float) -> None:
    """Real daemons SIGKILLed at random instants and restarted while
    workers hit.  Meanwhile: web3 counts into its SQLite file first and is
    migrated twice while the file grows (stopped, ``store migrate``,
    started again on SQLite: a trial run; later the real run, then started
    on Redis); web1 is renamed web1b (SIGTERM, a new config, started
    again); web2 talks to Redis through a proxy that loses every reply
    while web2 stops (its final roll and its name's release run in Redis,
    unanswered) and is started again.  Every hit in Redis exactly once, no
    gap."""
    keys, paths = farm
    paths = dict(paths)
    tmp = Path(paths["web1"]).parent
    proxy = TcpProxy(redis_server.port)
    paths["web2"] = host_config(tmp, "web2", keys["web2"], proxy.port)
    redis_web3 = paths["web3"]
    paths["web3"] = host_config(tmp, "web3", keys["web3"], redis_server.port,
                                backend="sqlite", name="web3-sqlite")
    rnd = random.Random(kills)
    counters = {h: segment.attach(keys[h], "sysv") for h in HOSTS}
    hits: dict = defaultdict(int)
    procs = {}
    migrations: list[str] = []

    def stop(host: str) -> None:
        procs[host].send_signal(signal.SIGTERM)
        assert procs[host].wait(30) == 0, procs[host].stderr.read().decode()
        procs[host].stderr.close()

    def start(host: str) -> None:
        procs[host] = _daemon(paths[host])
        _wait_ready(counters[host], procs[host])

    # (fraction of the run, event): each once, in this order
    events = [(0.25, "trial migration"), (0.5, "rename"), (0.6, "migration"),
              (0.75, "lost replies")]
    try:
        for host in HOSTS:
            procs[host] = _daemon(paths[host])
        for host in HOSTS:
            _wait_ready(counters[host], procs[host])
        kill_at = sorted(rnd.uniform(0.5, seconds - 0.5) for _ in range(kills))
        started = time.monotonic()
        done = 0
        # (the stops and starts take time: every kill and event happens)
        while time.monotonic() - started < seconds or done < len(kill_at) or events:
            if events and time.monotonic() - started >= events[0][0] * seconds:
                _, event = events.pop(0)
                if event == "rename":  # web1's machine renamed: restarted as web1b
                    stop("web1")
                    paths["web1"] = host_config(tmp, "web1", keys["web1"], redis_server.port,
                                                name="web1b")
                    start("web1")
                elif event.endswith("migration"):  # the file grew since the trial run
                    stop("web3")
                    migrations.append(_migrate(redis_web3, f"redis://127.0.0.1:{redis_server.port}/0"))
                    if event == "migration":
                        paths["web3"] = redis_web3
                    start("web3")
                else:  # every reply lost while web2 stops, then it starts again
                    proxy.drop_replies()
                    procs["web2"].send_signal(signal.SIGTERM)
                    procs["web2"].wait(60)
                    procs["web2"].stderr.close()
                    proxy.pass_replies()
                    start("web2")
            for host in HOSTS:
                now = time.time()
                account, event, n = rnd.choice(ACCOUNTS), rnd.choice(EVENTS), rnd.randint(1, 9)
                counters[host].hit(account, event, n, now)
                hits[(account, event, int(now // 60))] += n
            if done < len(kill_at) and time.monotonic() - started >= kill_at[done]:
                host = rnd.choice(HOSTS)
                procs[host].send_signal(signal.SIGKILL)
                procs[host].wait()
                procs[host].stderr.close()
                start(host)
                done += 1
            time.sleep(0.005)
        assert done == kills and not events
        for host in HOSTS:  # SIGTERM: the final roll of everything, the open minute too
            procs[host].send_signal(signal.SIGTERM)
        for host in HOSTS:
            assert procs[host].wait(30) == 0, procs[host].stderr.read().decode()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        for c in counters.values():
            c.detach()
        proxy.close()
    assert_exact(redis_server, hits)
    assert len(migrations) == 2 and all(" 0 hits" not in m for m in migrations), migrations
    assert proxy.dropped > 0
    client = redis_server.client()
    assert client.hget("track~host:web1b", "closed_through") is not None
    for host in (*HOSTS, "web1b"):
        assert client.llen(f"track~gaps:{host}") == 0, host


def test_three_daemons_sigkilled_and_restarted_lose_nothing(farm, redis_server):
    """Real `trafficthreshold run` processes, SIGKILLed at random instants
    and restarted while workers hit: every hit in Redis exactly once."""
    run_sigkill_farm(farm, redis_server, kills=4, seconds=6.0)


@pytest.mark.slow
def test_three_daemons_sigkilled_soak(farm, redis_server):
    """The long form: TRAFFICTHRESHOLD_SOAK_KILLS kills over at least two
    minutes of the real clock, so that kills also land around the rolls at
    minute changes.  Without the variable (CI runs everything) a short
    form: 8 kills in 12 s."""
    soak = os.environ.get("TRAFFICTHRESHOLD_SOAK_KILLS")
    kills = int(soak or 8)
    seconds = max(130.0, kills * 1.5) if soak else 12.0
    run_sigkill_farm(farm, redis_server, kills=kills, seconds=seconds)


# -- a rename, two migrations, lost replies, a Redis crash, one episode --------

def _write(tmp_path, host: str, key: int, port: int, *, backend: str = "redis",
           rules: str = "", name: str | None = None) -> str:
    """A host's config (tt_farm.host_config) with a sender and, on Redis,
    the farm rules."""
    extra = '[mail]\nfrom = "tt-farm@localhost"\n' + (rules if backend == "redis" else "")
    return host_config(tmp_path, host, key, port, extra, name=name, backend=backend)


def run_farm_life(tmp_path, redis_server, minutes: int, seed: int) -> None:
    """Three hosts on a driven clock, ``minutes`` long: web3 counts into
    its SQLite file first and is migrated twice while its file grows (a
    trial run, then the real one), then joins the farm; web2 is dropped
    without a shutdown and started again; redis-server is SIGKILLed and
    restarted; the replies of one of web2's rolls are lost; web1 is
    renamed web1b and restarted; one burst crosses the farm rule.  The
    farm's totals equal the hits exactly, no host records a gap, and the
    burst mails one alert and one resolved."""
    from click.testing import CliRunner
    from trafficthreshold.cli import main
    from tt_postfix import MAILBOX
    from tt_proxy import TcpProxy
    from test_alerts_farm import farm_rows

    rnd = random.Random(seed)
    rule = f"""
[[alert]]
name = "farm-life"
scope = "farm"
threshold = 2000
window = "minute"
to = ["{MAILBOX}"]
repeat = 0
clear_minutes = 1
"""
    burst_at, rename_at = minutes * 2 // 3, minutes // 2
    migrate_at = (minutes // 6, minutes // 3)
    with three_hosts(redis_server.port, START) as (keys, proxies):
        port = {h: p.port for h, p in proxies.items()}
        paths = {h: _write(tmp_path, h, keys[h], port[h], rules=rule) for h in HOSTS}
        paths["web3-sqlite"] = _write(tmp_path, "web3", keys["web3"], port["web3"],
                                      backend="sqlite", name="web3-sqlite")
        counters = {h: segment.attach(keys[h], "sysv") for h in HOSTS}
        hits: dict = defaultdict(int)
        sups: dict = {}
        dropped = []

        def start(host, path, now):
            cfg = configuration.load(path, env={})
            s = Supervisor(cfg, config_path=path, env={}, pid=2000 + HOSTS.index(host))
            s.initialize(now)
            sups[host] = s

        def migrate(now):
            sups.pop("web3").shutdown(now)
            url = f"redis://127.0.0.1:{redis_server.port}/0"
            out = CliRunner().invoke(main, ["--config", paths["web3"], "store", "migrate",
                                            "--to", url], catch_exceptions=False)
            assert out.exit_code == 0, out.output
            assert " 0 hits" not in out.output  # the file grew since the trial run
            migrations.append(out.output)

        migrations: list = []
        start("web1", paths["web1"], START)
        start("web2", paths["web2"], START)
        start("web3", paths["web3-sqlite"], START)
        now = START
        try:
            for minute in range(minutes):
                for second in (5, 25, 45):
                    now = START + minute * 60 + second
                    for host in HOSTS:
                        account, event = rnd.choice(ACCOUNTS), rnd.choice(EVENTS)
                        n = rnd.randint(1, 50) + (700 if minute == burst_at else 0)
                        counters[host].hit(account, event, n, now)
                        hits[(account, event, int(now // 60))] += n
                        sups[host].tick(now)
                    for s in sups.values():
                        if s.farm is not None:
                            assert s.farm.drain(10)
                if minute == 5:  # a crash: no shutdown, no final roll
                    dropped.append(sups.pop("web2"))
                    start("web2", paths["web2"], now + 5)
                if minute in migrate_at:  # the file grew since the trial run
                    migrate(now + 5)
                    start("web3", paths["web3" if minute == migrate_at[1] else "web3-sqlite"],
                          now + 6)
                if minute == migrate_at[0] + 2:  # redis-server killed, back from its AOF
                    redis_server.kill()
                    redis_server.start()
                if minute == migrate_at[0] + 4:  # the replies of web2's next roll are lost
                    proxies["web2"].drop_replies()
                if minute == migrate_at[0] + 5:
                    proxies["web2"].pass_replies()
                if minute == rename_at:  # the machine renamed, the daemon restarted
                    sups.pop("web1").shutdown(now + 5)
                    paths["web1"] = _write(tmp_path, "web1", keys["web1"], port["web1"],
                                           rules=rule, name="web1b")
                    start("web1", paths["web1"], now + 6)
            client = redis_server.client()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the leader's outbox sends (real time)
                if [(r["kind"], r["status"]) for r in farm_rows(client)] == \
                        [("alert", "sent"), ("resolved", "sent")]:
                    break
                now += 1
                for host in HOSTS:
                    sups[host].tick(now)
                time.sleep(0.2)
        finally:
            for s in sups.values():
                s._wait_rolling()
                s.shutdown(now + 1)
            for s in dropped:
                s._wait_rolling()
                if s.farm is not None:
                    s.farm.stop(withdraw=False)
                s.counter.detach()
            for c in counters.values():
                c.detach()
        assert_exact(redis_server, hits)
        rows = farm_rows(client)
        assert [(r["kind"], r["status"]) for r in rows] == [("alert", "sent"),
                                                            ("resolved", "sent")]
        for host in ("web1", "web1b", "web2", "web3"):
            assert client.llen(f"track~gaps:{host}") == 0, host
        assert proxies["web2"].dropped > 0 and len(migrations) == 2


def test_a_farm_life_with_a_rename_two_migrations_and_lost_replies(tmp_path, redis_server):
    """The short form (CI): 30 driven minutes."""
    run_farm_life(tmp_path, redis_server, minutes=30, seed=21)


@pytest.mark.slow
def test_a_farm_life_soak(tmp_path, redis_server):
    """The long form: TRAFFICTHRESHOLD_SOAK_MINUTES driven minutes (default
    180), the same events spread over them."""
    minutes = int(os.environ.get("TRAFFICTHRESHOLD_SOAK_MINUTES") or 180)
    run_farm_life(tmp_path, redis_server, minutes=minutes, seed=minutes)
