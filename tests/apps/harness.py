"""Run the test applications under real servers and load them.

* :class:`Server`: a gunicorn / uvicorn / daemon process started in its own
  session, its log in a file, its port read from that log (servers bind
  port 0, so no port is ever guessed), always stopped (SIGTERM, then
  SIGKILL of its process group) by :meth:`Server.stop`.
* :func:`run_load`: keep-alive ``http.client`` threads sending a bounded
  number of requests within a bounded time, each outcome classified.
* :func:`segment_count`: what the segment holds for a key over minutes.
* For the tests of the stats app (test_api, test_dashboard, test_openapi):
  the clock and names they share, :func:`fetch` and :func:`start_live` (a
  server over a segment with hits in it). Their fixtures (``db``,
  ``serve``, ``no_segment``, ``live_server``) are in conftest.py.

Every wait has a deadline.
"""
from __future__ import annotations

import dataclasses
import datetime
import http.client
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter as Tally
from pathlib import Path
from typing import Any, Callable, Optional
from zoneinfo import ZoneInfo

import pytest

import trafficthreshold
from trafficthreshold import api, pageviews, segment
from trafficthreshold.api import server as webserver
from trafficthreshold.config import Config

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent

#: Request plan by index: 1 in 20 static, 1 healthz, 1 JSON, 1 HEAD of a
#: page, the other 16 GET of HTML pages.
PLAN = {0: ("GET", "/static/app.css"), 1: ("GET", "/healthz"), 2: ("GET", "/api"),
        3: ("HEAD", "/")}


def plan(i: int) -> tuple[str, str]:
    return PLAN.get(i % 20, ("GET", f"/page/{i}"))


def server_env(key: int, backend: str, **extra: str) -> dict[str, str]:
    """The environment of a server pointed at a test segment, strict unset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAFFICTHRESHOLD_")}
    env.update(TRAFFICTHRESHOLD_KEY=str(key), TRAFFICTHRESHOLD_BACKEND=backend,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(TESTS),
                                                        env.get("PYTHONPATH")])))
    env.update(extra)
    return env


class Server:
    """A server process; ``port`` is read from its log."""

    LISTEN = re.compile(r"(?:Listening at: http://|running on http://|listening on )"
                        r"127\.0\.0\.1:(\d+)")

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path,
                 cwd: Path = TESTS, port_pattern: Optional[re.Pattern] = None) -> None:
        self.argv, self.log_path = argv, log_path
        self.pattern = port_pattern or self.LISTEN
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_port(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.pattern.search(self.text())
            if found:
                self.port = int(found.group(1))
                return self.port
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited ({self.proc.returncode}):\n"
                                   + self.text()[-3000:])
            time.sleep(0.05)
        raise TimeoutError(f"{self.argv} did not listen within {timeout} s:\n"
                           + self.text()[-3000:])

    def wait_ready(self, path: str = "/healthz", workers: int = 1, timeout: float = 20.0) -> None:
        """Wait for the port, then for ``workers`` distinct children (when
        the server forks) and one good answer."""
        deadline = time.monotonic() + timeout
        self.wait_port(timeout)
        while workers > 1 and len(self.children()) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{workers} workers did not start:\n" + self.text()[-3000:])
            time.sleep(0.05)
        while True:
            try:
                status, _, _ = get(self.port, path, timeout=2)
                if status < 500:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer on {path}:\n" + self.text()[-3000:])
            time.sleep(0.05)

    def children(self) -> list[int]:
        """Pids whose parent is the server (its workers)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and fields[0] != b"Z":
                found.append(int(entry))
        return sorted(found)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole process group."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            return self.proc.returncode
        finally:
            self.log.close()


def gunicorn(app: str, env: dict[str, str], log_path: Path, workers: int = 4,
             worker_class: str = "sync", threads: int = 1, preload: bool = False,
             extra: tuple[str, ...] = ()) -> Server:
    argv = [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:0",
            "--workers", str(workers), "--worker-class", worker_class,
            "--threads", str(threads), "--log-level", "info", "--graceful-timeout", "3",
            "--backlog", "2048", *(["--preload"] if preload else []), *extra, app]
    return Server(argv, env, log_path)


def uvicorn(app: str, env: dict[str, str], log_path: Path, port: int,
            workers: int = 2) -> Server:
    # uvicorn with --workers binds in the parent; port 0 would be reported
    # as 0, so the caller passes a free port (free_port()).
    argv = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--log-level", "info", "--no-access-log",
            "--timeout-graceful-shutdown", "3", app]
    server = Server(argv, env, log_path,
                    port_pattern=re.compile(r"running on http://127\.0\.0\.1:(\d+)"))
    return server


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, method: str = "GET", host: Optional[str] = None,
        timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Host": host} if host else {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


@dataclasses.dataclass
class LoadResult:
    """Outcomes: ``pages`` = HTML 2xx responses received completely (GET
    with its whole body, HEAD with its headers); ``other`` = other complete
    responses (static, healthz, JSON); ``failed`` = requests that got no
    complete response (connection refused/reset, incomplete body)."""

    pages: int = 0
    other: int = 0
    failed: int = 0
    sent: int = 0
    elapsed: float = 0.0
    statuses: Tally = dataclasses.field(default_factory=Tally)
    errors: Tally = dataclasses.field(default_factory=Tally)

    @property
    def completed(self) -> int:
        return self.pages + self.other


def run_load(port: int, total: int, threads: int = 8, time_limit: float = 30.0,
             host: str = "Site-A.example", plan: Callable[[int], tuple[str, str]] = plan,
             progress: Optional[Callable[[int], None]] = None,
             keep_alive: bool = True) -> LoadResult:
    """Send ``total`` requests (fewer if ``time_limit`` runs out) from
    ``threads`` keep-alive connections; a failed connection is replaced.

    ``keep_alive=False`` sends ``Connection: close``: for servers that
    write the headers and the body of a response separately without
    TCP_NODELAY (uvicorn), where Nagle's algorithm and the client's delayed
    ACK would add 40 ms to every response after a connection's first."""
    headers = {"Host": f"{host}:{port}"}
    if not keep_alive:
        headers["Connection"] = "close"
    result = LoadResult()
    lock = threading.Lock()
    indexes = itertools.count()
    started = time.monotonic()
    deadline = started + time_limit

    def worker() -> None:
        conn = None
        local = LoadResult()
        try:
            while time.monotonic() < deadline:
                i = next(indexes)
                if i >= total:
                    break
                method, path = plan(i)
                local.sent += 1
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    conn.request(method, path, headers=headers)
                    resp = conn.getresponse()
                    body = resp.read()
                    length = resp.getheader("Content-Length")
                    if method == "GET" and length is not None and int(length) != len(body):
                        raise http.client.IncompleteRead(body)
                    html = (resp.getheader("Content-Type") or "").startswith("text/html")
                    local.statuses[resp.status] += 1
                    if html and 200 <= resp.status < 300:
                        local.pages += 1
                    else:
                        local.other += 1
                    if resp.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException) as exc:
                    local.failed += 1
                    local.errors[type(exc).__name__] += 1
                    conn.close()
                    conn = None
                if progress is not None:
                    progress(i)
        finally:
            if conn is not None:
                conn.close()
            with lock:
                result.pages += local.pages
                result.other += local.other
                result.failed += local.failed
                result.sent += local.sent
                result.statuses.update(local.statuses)
                result.errors.update(local.errors)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(max(0.0, deadline - time.monotonic()) + 15)
    result.elapsed = time.monotonic() - started
    return result


def segment_accounts(key: int, backend: str) -> set[str]:
    """The accounts that have a key in the segment."""
    counter = segment.attach(key, backend)
    try:
        return {account for _, account, _ in counter.keys()}
    finally:
        counter.detach()


def segment_count(key: int, backend: str, first_minute: int, last_minute: int,
                  account: Optional[str] = None, event: str = "pageview") -> int:
    """The segment's count of (account or the total, event) summed over
    the epoch minutes ``first_minute..last_minute``."""
    counter = segment.attach(key, backend)
    try:
        slot = counter.find(account, event)
        if slot is None:
            return 0
        return sum(n for s, _, n in counter.minutes(first_minute, last_minute) if s == slot)
    finally:
        counter.detach()


def epoch_minute() -> int:
    return int(time.time() // 60)


# ------------------------------------------------- shared by the middleware tests

@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the middleware's "logged once" warnings anew."""
    monkeypatch.setattr(pageviews, "_warned", set())


def total(event: str = "pageview") -> int:
    """The sliding-60 s count of every account for ``event``."""
    return trafficthreshold.count(None, event, window="60s")


def of(account: str) -> int:
    """The sliding-60 s page views of one account."""
    return trafficthreshold.count(account, window="60s")


# ------------------------ shared by the stats app's tests (api, dashboard, openapi)

ZONE = "Europe/Zurich"
#: 2027-01-15 09:00:30 in Zurich; the conftest installs segments at 09:00:00.
NOW = 1_800_000_030.0
MINUTE = int(NOW // 60)
XSS = "<img src=x onerror=alert(1)>"


def minute_at(*parts: int) -> int:
    """Epoch minute of a Zurich wall-clock time (year, month, day, hour, minute)."""
    return int(datetime.datetime(*parts, tzinfo=ZoneInfo(ZONE)).timestamp() // 60)


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None,
          data: bytes | None = None) -> tuple[int, Any, bytes]:
    """(status, headers, body) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def fetch_json(url: str, **kwargs: Any) -> tuple[int, Any]:
    status, headers, body = fetch(url, **kwargs)
    assert headers["Content-Type"] == "application/json", body
    return status, json.loads(body)


def make_config(db: str, key: int = 0x2ABCDEF0, backend: str = "sysv", **kwargs: Any) -> Config:
    return Config(key=key, backend=backend, database=db, timezone=ZONE, **kwargs)


def start_live(key: int, backend: str, db: str,
               serve: Callable[..., webserver.Server]) -> tuple[webserver.Server, Any]:
    """A server over an installed segment, with hits in the last two hours."""
    counter = segment.attach(key, backend, stripe=0)
    counter.hit("acme", "pageview", 70, NOW - 10)           # current minute, 60 s
    counter.hit("acme", "pageview", 5, NOW - 45)            # previous minute, in 60 s
    counter.hit("shop", "pageview", 2, NOW - 60 * 60)       # 60 minutes ago: first bar
    counter.hit("shop", "pageview", 9, NOW - 61 * 60)       # 61 minutes ago: not shown
    counter.hit(XSS, "pageview", 4, NOW - 120)
    counter.store(segment.H_HEARTBEAT_MS, 8, int((NOW - 1.5) * 1000))
    counter.store(segment.H_SUPERVISOR_PID, 4, 4321)
    config = make_config(db, key=key, backend=backend)
    return serve(api.make_app(config, now=lambda: NOW)), counter


def get_page(port: int, path: str = "/", *, host: str = "site-a.example",
             cookie: str | None = None, method: str = "GET",
             **headers: str) -> tuple[int, str | None]:
    """One request to a server on loopback: (status, its Set-Cookie or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {**headers, "Host": host, "Connection": "close"}
        if cookie:
            headers["Cookie"] = cookie
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Set-Cookie")
    finally:
        conn.close()


def statuses_under_waitress(app: Callable[..., Any], paths: list[str],
                            host: str = "site-a.example") -> list[int]:
    """Serve ``app`` with a real waitress (one worker thread, the daemon's
    :mod:`trafficthreshold.webserver`) on a free loopback port, GET each of
    ``paths`` on a connection of its own, stop; return the statuses the
    client received."""
    server = webserver.start(app, "127.0.0.1:0", threads=1)
    try:
        statuses = []
        for path in paths:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            response.read()
            conn.close()
            statuses.append(response.status)
        return statuses
    finally:
        server.stop()
