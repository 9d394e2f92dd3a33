"""A farm of three hosts on one machine, for the farm's tests
(test_farmsync, test_alerts_farm, test_farm_sim, tt_farmhost): a config file
per host, three installed segments with a TCP proxy to Redis each, and
three in-process supervisors ticked on a driven clock.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from conftest import remove_everything
from trafficthreshold import _counter, config as configuration, segment
from trafficthreshold.supervisor import Supervisor
from tt_proxy import TcpProxy

HOSTS = ("web1", "web2", "web3")


def host_config(tmp_path: Path, host: str, key: int, port: int, extra: str = "", *,
                name: str | None = None, backend: str = "redis") -> str:
    """Write ``{name}.toml``: the segment and SQLite file of ``host``, the
    farm's Redis at ``port`` (a proxy or Redis itself), ``[store] host =
    name`` (default ``host``; another name: the host renamed), then
    ``extra`` verbatim (after ``[store]``: keys of that table first, then
    other tables)."""
    name = name or host
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
key = {key}
database = "{tmp_path / host}.sqlite3"
timezone = "UTC"
[http]
enabled = false
[store]
backend = "{backend}"
url = "redis://127.0.0.1:{port}/0"
host = "{name}"
{extra}
""")
    return str(path)


@contextlib.contextmanager
def three_hosts(redis_port: int, now: float) -> Iterator[tuple[dict, dict]]:
    """Three installed SysV segments (own keys) and a proxy to Redis per
    host: (keys, proxies); all removed afterwards."""
    keys: dict[str, int] = {}
    proxies: dict[str, TcpProxy] = {}
    try:
        for host in HOSTS:
            keys[host] = segment.unused_key()
            segment.install(keys[host], "sysv", now=now)
            proxies[host] = TcpProxy(redis_port)
        yield keys, proxies
    finally:
        for proxy in proxies.values():
            proxy.close()
        _counter._reset()
        for key in keys.values():
            remove_everything(key)


class Farm:
    """Three in-process supervisors ticked by the test (a driven clock)."""

    def __init__(self, keys: dict, paths: dict, now: float, pid: int = 4000) -> None:
        self.counters = {h: segment.attach(keys[h], "sysv") for h in HOSTS}
        self.sups = {}
        for i, host in enumerate(HOSTS):
            cfg = configuration.load(paths[host], env={})
            sup = Supervisor(cfg, config_path=paths[host], env={}, pid=pid + i)
            sup.initialize(now)
            self.sups[host] = sup

    def tick(self, now: float, hosts=HOSTS) -> None:
        """One second on every host: the ticks, then each farm thread's
        publication and read (what the real second gives them)."""
        for host in hosts:
            self.sups[host].tick(now)
        for host in hosts:
            assert self.sups[host].farm.drain(10)

    def levels(self) -> dict[str, int]:
        """The level each host's workers read from their header."""
        return {h: c.load(segment.H_THROTTLE_LEVEL, 4) for h, c in self.counters.items()}

    def leaders(self) -> list[str]:
        """The hosts whose farm thread leads the farm's alerts."""
        return [h for h, s in self.sups.items()
                if s.farm is not None and s.farm.alerts is not None and s.farm.alerts.leading]

    def hit_each(self, n: int, now: float) -> None:
        for c in self.counters.values():
            c.hit("shop", "pageview", n, now)

    def close(self, now: float) -> None:
        for sup in self.sups.values():
            sup.shutdown(now)
        for c in self.counters.values():
            c.detach()
