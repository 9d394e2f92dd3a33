"""Shared fixtures: every test gets its own segment key and removes what it
created, on both backends; the stats app's tests get a store file and
servers over it."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest
import sysv_ipc

import trafficthreshold
from apps.harness import NOW, XSS, ZONE, make_config, minute_at, start_live
from trafficthreshold import api, segment
from trafficthreshold.api import server as webserver
from trafficthreshold.errors import SegmentNotFound
from trafficthreshold.store import SQLiteStore


def remove_everything(key: int) -> None:
    """Remove whatever a test left at `key`, on both backends."""
    for make, remove in ((lambda: sysv_ipc.SharedMemory(key), "remove"),
                         (lambda: sysv_ipc.Semaphore(key), "remove"),
                         (lambda: posix_ipc.SharedMemory(segment.posix_name(key)), "unlink"),
                         (lambda: posix_ipc.Semaphore(segment.posix_name(key)), "unlink")):
        try:
            obj = make()
        except (sysv_ipc.ExistentialError, posix_ipc.ExistentialError):
            continue
        getattr(obj, remove)()
        if hasattr(obj, "detach"):
            obj.detach()
        if hasattr(obj, "close_fd"):
            obj.close_fd()


@pytest.fixture
def key():
    """A fresh IPC key; anything at it is removed afterwards."""
    k = segment.unused_key()
    yield k
    trafficthreshold._counter._reset()
    remove_everything(k)


@pytest.fixture(params=segment.BACKENDS)
def backend(request):
    """Runs the test once per backend."""
    return request.param


@pytest.fixture
def installed(key, backend):
    """An installed segment: (key, backend)."""
    segment.install(key, backend, now=1_800_000_000)
    return key, backend


@pytest.fixture
def counter(installed):
    """A Counter attached to the test's own segment (stripe 0)."""
    c = segment.attach(*installed, stripe=0)
    yield c
    c.detach()


@pytest.fixture
def worker_api(installed, monkeypatch):
    """The module-level API (hit, count, throttle_status) pointed at the
    test's own segment, in strict mode."""
    key, backend = installed
    trafficthreshold.configure(key=key, backend=backend, strict=True)
    yield installed
    trafficthreshold._settings.clear()
    trafficthreshold.configure()


# ------------------------- the stats app's tests (api, dashboard, openapi)


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A store file with counts on 2026-02-03 (hours 9 and 14) and 2026-05-01."""
    path = str(tmp_path / "stats.sqlite3")
    items = [
        ("all", "pageview", minute_at(2026, 2, 3, 9, 5), 7),
        ("acme", "pageview", minute_at(2026, 2, 3, 9, 5), 7),
        ("all", "pageview", minute_at(2026, 2, 3, 14, 59), 3),
        ("acme", "pageview", minute_at(2026, 2, 3, 14, 59), 3),
        ("all", "pageview", minute_at(2026, 5, 1, 0, 0), 11),
        ("shop", "pageview", minute_at(2026, 5, 1, 0, 0), 11),
        ("all", "signup", minute_at(2026, 5, 1, 0, 0), 1),
        ("shop", "signup", minute_at(2026, 5, 1, 0, 0), 1),
        (XSS, "pageview", minute_at(2026, 5, 1, 0, 0), 4),
    ]
    with SQLiteStore(path, ZONE) as store:
        store.roll(items, now=NOW, closed_through=minute_at(2026, 5, 1, 0, 0))
    return path


@pytest.fixture
def serve() -> Iterator[Callable[..., webserver.Server]]:
    """serve(app) -> a started server on a free loopback port; all stopped after."""
    servers: list[webserver.Server] = []

    def start(app: Any, listen: str = "127.0.0.1:0") -> webserver.Server:
        server = webserver.start(app, listen)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def no_segment(db: str, serve: Callable[..., webserver.Server]) -> webserver.Server:
    """A server over the store, with no segment installed."""
    def missing() -> Any:
        raise SegmentNotFound("no segment here; run `trafficthreshold install`")

    return serve(api.make_app(make_config(db), counter_factory=missing, now=lambda: NOW))


@pytest.fixture
def live_server(installed: tuple[int, str], db: str,
                serve: Callable[..., webserver.Server]) -> tuple[webserver.Server, Any]:
    """start_live() on each backend."""
    return start_live(*installed, db, serve)


@pytest.fixture
def redis_server(tmp_path: Path, request: Any) -> Iterator[Any]:
    """A real redis-server on a free loopback port (append-only, fsync
    always, or a module's ``REDIS_FSYNC``) with its own data directory;
    killed afterwards."""
    from tt_redis import RedisServer

    srv = RedisServer(tmp_path, fsync=getattr(request.module, "REDIS_FSYNC", "always"))
    srv.start()
    yield srv
    if srv.proc and srv.proc.poll() is None:
        srv.kill()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With TRAFFICTHRESHOLD_NO_SKIPS=1 (CI), a skipped test fails: a test
    that needs Postfix or Chromium and did not run proves nothing."""
    outcome = yield
    report = outcome.get_result()
    if (os.environ.get("TRAFFICTHRESHOLD_NO_SKIPS") == "1" and report.skipped
            and not hasattr(report, "wasxfail")):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI, which must run everything: {reason}"
