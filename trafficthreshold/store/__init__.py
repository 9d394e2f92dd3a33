"""The period store: one interface, two backends.

* :mod:`.base`: what a roll is (``RollItem``, ``KeyMinute``), the
  interface every backend keeps (:class:`~.base.PeriodStore`) and
  :class:`~.base.StoreError`.
* :mod:`.sqlite`: :class:`~.sqlite.SQLiteStore`, the embedded default for
  one host (the file at the top-level ``database``).
* :mod:`.redis`: :class:`~.redis.RedisStore`, a farm's shared Redis in
  Bootic's key layout, reached by ``url`` or ``sentinels`` + ``service``.

This module is the one place that opens the configured store (``[store]``);
the roller, the API, the CLI and the alerts take what it gives and never
ask which backend it is.  The Redis password is read from
``password_file`` or ``password_env`` each time a client is made (a rotated
password is picked up at the next start or reconnect), never from the
configuration file.

* :func:`open_writer`: the supervisor's store (and ``uninstall``'s final
  roll).  For Redis it records or checks the farm's time zone.
* :func:`open_reader`: what ``stats`` and the API read: ``period``,
  ``accounts``, ``events``, ``empty``, ``close``, a context manager.
* :func:`ping`: ``config check`` and ``status``: does the store answer?

Alert state and the mail queue stay in the SQLite file in every case (they
are this host's own).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trafficthreshold.errors import ConfigError
from trafficthreshold.periods import resolve_timezone

from .base import MAX_MINUTE_COUNT, KeyMinute, PeriodStore, RollItem, StoreError
from .redis import SOCKET_TIMEOUT, RedisStore, connect, redact_url
from .sqlite import WATERMARK_KEEP_MINUTES, SQLiteStore, describe, reader_problem

if TYPE_CHECKING:  # a reader of the store (another user's `stats`) needs no config
    from trafficthreshold.config import Config, StoreConfig

__all__ = ["PeriodStore", "SQLiteStore", "RedisStore", "StoreError", "RollItem", "KeyMinute",
           "MAX_MINUTE_COUNT", "open_writer", "open_reader", "ping", "location",
           "redis_client", "password", "zone_name", "PING_TIMEOUT", "farm_host",
           "unavailable", "unreachable", "file_problem", "WATERMARK_KEEP_MINUTES"]

log = logging.getLogger("trafficthreshold.store")

#: Seconds ``config check`` and ``status`` wait for Redis to answer.
PING_TIMEOUT = 1.0

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
                      prefix=config.store.prefix, minute_days=config.retention.minutes,
                      funnels_prefix=config.store.funnels_prefix,
                      forget_after=config.store.forget_hosts_days * 86_400)


def open_writer(config: Config, env: Any = None) -> PeriodStore:
    """The store the supervisor rolls into.  For Redis, the farm's time
    zone is recorded, or a different one refused (ConfigError naming both);
    a Redis that does not answer raises redis-py's ConnectionError or
    TimeoutError (the supervisor retries)."""
    if config.store.backend != "redis":
        return SQLiteStore(config.database, config.timezone)
    store = _redis_store(config, redis_client(config, env=env))
    try:
        store.check_zone(zone_name(config))
    except BaseException:
        store.close()
        raise
    return store


def open_reader(config: Config, env: Any = None, *,
                database: str | None = None) -> PeriodStore:
    """The store ``stats`` and the API read: a read-only SQLiteStore of
    ``database`` (default ``config.database``; its ``empty`` says why a
    missing or tableless file reads as nothing), or the farm's Redis
    (``empty`` is None: an empty farm reads as zeros)."""
    if config.store.backend != "redis":
        return SQLiteStore(database or config.database, config.timezone, readonly=True)
    return _redis_store(config, redis_client(config, env=env))


def farm_host(config: Config) -> str | None:
    """This host's name in the farm (``[store] host``) when the store is
    the farm's Redis; None for one host's SQLite file."""
    return config.store.host if config.store.backend == "redis" else None


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is the farm's store not answering (a redis-py
    connection, timeout or failover error): the store is unavailable, not
    our bug.  Checked by module, so redis-py stays optional."""
    return type(exc).__module__.split(".")[0] == "redis"


def unavailable(exc: BaseException, database: str) -> str | None:
    """What a reader answers (a 503) for an error of its store, or None
    when ``exc`` is not one (a bug: a 500).  A sqlite3 error of the file
    ``database`` says whether to retry or how to recover it; a Redis that
    does not answer says how to check it."""
    if isinstance(exc, sqlite3.Error):
        return reader_problem(database, exc)
    if unreachable(exc):
        return (f"the Redis store did not answer ({exc}); try again; "
                "`trafficthreshold config check` says whether Redis answers")
    return None


def file_problem(exc: BaseException, database: Callable[[], str]) -> str | None:
    """What a command says for ``exc`` when it is an error of the SQLite
    file ``database()`` (asked only then): the problem and its recovery
    (.recover, move aside, ...); None when ``exc`` is not one."""
    if isinstance(exc, sqlite3.Error):
        return describe(database(), exc)
    return None


def location(config: Config) -> str:
    """Where the store is, for logs and messages (never the password)."""
    s = config.store
    if s.backend != "redis":
        return f"sqlite {config.database}"
    where = redact_url(s.url) if s.url else f"sentinels {','.join(s.sentinels)} service {s.service}"
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
            store = SQLiteStore(config.database, config.timezone, readonly=True)
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
