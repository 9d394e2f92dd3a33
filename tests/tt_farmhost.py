"""Farm hosts for tests/test_alerts_farm.py: their config files, and a
supervisor process on an accelerated clock (run as a script).

As a script::

    python tests/tt_farmhost.py CONFIG START WALL0 SPEED LEASE_TTL

runs the supervisor of CONFIG (no HTTP) ticking every ``1 / SPEED`` real
seconds with ``now = START + (time.time() - WALL0) * SPEED``: the clock the
test's hits use too (:func:`clock`).  Time is passed in, so the daemon's
minutes, episodes and retries run SPEED times faster; the lease's TTL is
real time in Redis, so it is given apart (``LEASE_TTL`` real seconds,
below the configuration's minimum of 2, which assumes one tick a second:
here it is still many ticks).  SIGTERM: shutdown (the lease released);
SIGKILL: what the test is about.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path


def write_configs(tmp_path: Path, keys: dict, ports: dict, rules: str, *,
                  lease_ttl: float = 10) -> dict[str, str]:
    """One config file per host (tt_farm.host_config), with the lease's
    TTL, a sender and ``rules`` verbatim."""
    from tt_farm import HOSTS, host_config  # not in the supervisor process

    extra = f"""lease_ttl = {lease_ttl}
[mail]
from = "tt-farm@localhost"
{rules}"""
    return {h: host_config(tmp_path, h, keys[h], ports[h], extra) for h in HOSTS}


def clock(start: float, wall0: float, speed: float) -> float:
    return start + (time.time() - wall0) * speed


def main(argv: list[str]) -> int:
    from trafficthreshold import config as configuration
    from trafficthreshold.supervisor import Supervisor

    path, start, wall0, speed, ttl = argv[0], *map(float, argv[1:5])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = configuration.load(path, env={})
    cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, lease_ttl=ttl))
    sup = Supervisor(cfg, config_path=path, http=False, env={})
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sup.initialize(clock(start, wall0, speed))
    print("ready", flush=True)
    step = 1.0 / speed
    next_tick = time.monotonic()
    try:
        while not stop:
            sup.tick(clock(start, wall0, speed))
            next_tick += step
            time.sleep(max(0.0, next_tick - time.monotonic()))
    finally:
        sup.shutdown(clock(start, wall0, speed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
