"""The one place that opens the configured period store (``[store]``).

``backend = "sqlite"`` (the default) is the file at the top-level
``database`` (:class:`~trafficthreshold.store.Store`); ``"redis"`` is the
farm's Redis (:class:`~trafficthreshold.redisstore.RedisStore`), reached by
``url`` or ``sentinels`` + ``service``, with the password read from
``password_file`` or ``password_env`` each time a client is made (a rotated
password is picked up at the next start or reconnect), never from the
configuration file.

* :func:`open_writer`: the supervisor's store (and ``uninstall``'s final
  roll).  For Redis it records or checks the farm's time zone.
* :func:`open_reader`: what ``stats`` and the API read: ``period``,
  ``accounts``, ``events``, ``empty``, ``close``, a context manager.
* :func:`ping`: ``config check`` and ``status``: does the store answer?

Alert state and the mail queue stay in the SQLite file in every case (they
are this host's own; farm-wide alerts are the next step, docs/redis.rst).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Union

from .config import Config, StoreConfig
from .errors import ConfigError
from .periods import resolve_timezone
from .redisstore import SOCKET_TIMEOUT, RedisStore, connect
from .store import Store

log = logging.getLogger("trafficthreshold.stores")

#: Seconds ``config check`` and ``status`` wait for Redis to answer.
PING_TIMEOUT = 1.0

PeriodStore = Union[Store, RedisStore]


def password(store: StoreConfig, env: Any = None) -> str | None:
    """The Redis password from ``password_file`` or ``password_env``; None
    when neither is set.  ConfigError naming the key and the fix."""
    env = os.environ if env is None else env
    if store.password_file:
        try:
            return Path(store.password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read store.password_file {store.password_file} "
                              f"({exc.strerror}): create it readable by the daemon's user, "
                              "e.g. chmod 640 and chgrp to its group") from None
    if store.password_env:
        value = env.get(store.password_env)
        if value is None:
            raise ConfigError(f"environment variable {store.password_env} (store.password_env) "
                              "is not set: set it where the daemon runs (systemd: "
                              "Environment= or EnvironmentFile=)")
        return value
    return None


def zone_name(config: Config) -> str:
    """The IANA name of the configured zone (the system's when unset)."""
    return config.timezone or str(resolve_timezone(None))


def redis_client(config: Config, timeout: float = SOCKET_TIMEOUT, env: Any = None) -> Any:
    """A redis-py client for ``[store]`` (connects lazily)."""
    s = config.store
    return connect(s.url, sentinels=s.sentinels, service=s.service,
                   password=password(s, env), timeout=timeout)


def _redis_store(config: Config, client: Any) -> RedisStore:
    return RedisStore(client, resolve_timezone(config.timezone), config.store.host,
                      prefix=config.store.prefix, minute_days=config.retention.minutes)


def open_writer(config: Config, env: Any = None) -> PeriodStore:
    """The store the supervisor rolls into.  For Redis, the farm's time
    zone is recorded, or a different one refused (ConfigError naming both);
    a Redis that does not answer raises redis-py's ConnectionError or
    TimeoutError (the supervisor retries)."""
    if config.store.backend != "redis":
        return Store(config.database, config.timezone)
    store = _redis_store(config, redis_client(config, env=env))
    try:
        store.check_zone(zone_name(config))
    except BaseException:
        store.close()
        raise
    return store


def open_reader(config: Config, env: Any = None) -> PeriodStore:
    """The store ``stats`` and the API read: a read-only SQLite Store (its
    ``empty`` says why a missing file reads as nothing), or the farm's Redis
    (``empty`` is None: an empty farm reads as zeros)."""
    if config.store.backend != "redis":
        return Store(config.database, config.timezone, readonly=True)
    return _redis_store(config, redis_client(config, env=env))


def location(config: Config) -> str:
    """Where the store is, for logs and messages (never the password)."""
    s = config.store
    if s.backend != "redis":
        return f"sqlite {config.database}"
    where = s.url or f"sentinels {','.join(s.sentinels)} service {s.service}"
    return f"redis {where} (prefix {s.prefix}, host {s.host})"


def ping(config: Config, timeout: float = PING_TIMEOUT, env: Any = None) -> dict[str, Any]:
    """Does the configured store answer?  ``{"backend", "where", "answered",
    "error", "last_roll_at", "closed_through"}``; never raises for a store
    that is down (the error is the message).  Redis: one PING and this
    host's hash, each within ``timeout`` seconds."""
    info: dict[str, Any] = {"backend": config.store.backend, "where": location(config),
                            "answered": False, "error": None, "last_roll_at": None,
                            "closed_through": None}
    started = time.monotonic()
    try:
        if config.store.backend == "redis":
            store = _redis_store(config, redis_client(config, timeout=timeout, env=env))
        else:
            store = Store(config.database, config.timezone, readonly=True)
        with store:
            if isinstance(store, RedisStore):
                store.client.ping()
            info["answered"] = True
            info["last_roll_at"] = store.last_roll_at()
            info["closed_through"] = store.closed_through()
    except Exception as exc:  # noqa: BLE001 - a report, not a failure
        info["error"] = f"{type(exc).__name__}: {exc}"
    info["seconds"] = round(time.monotonic() - started, 3)
    return info
