"""The PHP extension (php/) with the real thing: built with phpize, its own
.phpt tests under ``make test``, and a real nginx in front of a real
php-fpm pool of 4 workers (tt_php.PhpSite) counting page views into a real
segment without touching the application (``trafficthreshold.pageviews``).

The segment is read back with the Python module, so every count here is
PHP's writer and Python's reader agreeing on docs/segment.rst.
"""
from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import trafficthreshold
from trafficthreshold import segment
from trafficthreshold.store import SQLiteStore
from conftest import remove_everything
from tt_php import ApacheSite, PhpSite, build_extension
from tt_postfix import MAILBOX, SENDMAIL, requires_postfix, wait_for_mail

SITE = {
    "index.php": '<?php echo "<!doctype html><title>hello</title><p>hello, world";\n',
    "redirect.php": '<?php header("Location: /"); echo "moved";\n',
    "missing.php": '<?php http_response_code(404); echo "<p>not here";\n',
    "api.php": '<?php header("Content-Type: application/json"); echo "{}";\n',
    # The CGI way to set the status (php-fpm answers 404): no page view.
    "gone.php": '<?php header("Status: 404 Not Found"); echo "<p>gone";\n',
    # The response's type is the last header(): JSON, no page view.
    "retyped.php": '<?php header("Content-Type: text/html"); '
                   'header("Content-Type: application/json"); echo "{}";\n',
    "throttle.php": '<?php header("Content-Type: text/plain"); '
                    'echo trafficthreshold_throttle_status();\n',
    "info.php": "<?php phpinfo(INFO_MODULES);\n",
    "pid.php": '<?php header("Content-Type: text/plain"); echo getmypid();\n',
}


@pytest.fixture(scope="module")
def extension(tmp_path_factory) -> Path:
    """The extension, built once for the module: the build directory."""
    return build_extension(tmp_path_factory.mktemp("phpext"))


@pytest.fixture
def site_root(tmp_path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    for name, text in SITE.items():
        (root / name).write_text(text)
    return root


def start_site(tmp_path: Path, root: Path, extension: Path, key: int, **ini: str) -> PhpSite:
    settings = {"extension": str(extension / "modules" / "trafficthreshold.so"),
                "trafficthreshold.key": hex(key), "trafficthreshold.pageviews": "On",
                "trafficthreshold.account": "host",
                "trafficthreshold.allowed_hosts": "shop.example, .example.org",
                "log_errors": "On"}
    settings.update(ini)
    return PhpSite(tmp_path / "site", root, settings).start()


def minute_total(key: int, backend: str, account: str | None, event: str = "pageview") -> int:
    """The key's count over the last 10 minutes, read from the segment (so
    a run that crosses a minute is still counted whole)."""
    counter = segment.attach(key, backend)
    try:
        slot = counter.find(account, event)
        if slot is None:
            return 0
        now_minute = int(time.time()) // 60
        return sum(n for s, _, n in counter.minutes(now_minute - 9, now_minute) if s == slot)
    finally:
        counter.detach()


def get_many(site: PhpSite, path: str, total: int, connections: int = 8,
             host: str = "shop.example", method: str = "GET") -> list[int]:
    """`total` requests over `connections` keep-alive connections at once;
    returns every status."""
    statuses: list[int] = []
    lock = threading.Lock()
    per = [total // connections + (1 if i < total % connections else 0)
           for i in range(connections)]

    def run(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=20)
        mine = []
        for _ in range(n):
            try:
                conn.request(method, path, headers={"Host": host})
                response = conn.getresponse()
                response.read()
                mine.append(response.status)
            except (OSError, http.client.HTTPException):
                mine.append(0)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=20)
        conn.close()
        with lock:
            statuses.extend(mine)

    threads = [threading.Thread(target=run, args=(n,)) for n in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_make_test_runs_the_phpt_tests(extension):
    """`make test` (PHP's run-tests.php) passes every .phpt, none skipped;
    the counting one needs the trafficthreshold command on PATH."""
    env = dict(os.environ, NO_INTERACTION="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["make", "test"], cwd=extension, capture_output=True, text=True,
                          env=env, timeout=300)
    summary = done.stdout[done.stdout.find("TEST RESULT SUMMARY"):]
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Tests failed    :    0" in summary and "Tests skipped   :    0" in summary, summary
    phpts = len(list((extension / "tests").glob("*.phpt")))
    assert f"Tests passed    :    {phpts}" in summary, summary


def rest_and_hosts_are_no_page_views(site: PhpSite, key: int, backend: str, pages: int,
                                     more: list[tuple[str, str, int]]) -> None:
    """After `pages` page views of shop.example: HEAD, a redirect, a 404,
    JSON, a static path, a health check, a POST (and `more`) add nothing;
    a host outside allowed_hosts counts in the total only, one inside in
    its account."""
    for method, path, status in [("HEAD", "/", 200), ("GET", "/redirect.php", 302),
                                 ("GET", "/missing.php", 404), ("GET", "/api.php", 200),
                                 ("GET", "/retyped.php", 200),
                                 ("GET", "/style.css", 200), ("GET", "/healthz", 200),
                                 # the path is the URI without its query
                                 ("GET", "/style.css?v=1.2", 200),
                                 ("GET", "/healthz?probe=k8s/a.b", 200),
                                 ("POST", "/", 200), *more]:
        assert get_many(site, path, 8, connections=2, method=method) == [status] * 8, path
    assert minute_total(key, backend, None) == pages
    assert get_many(site, "/", 5, connections=1, host="other.example:8080") == [200] * 5
    assert get_many(site, "/", 7, connections=1, host="WWW.Example.ORG.") == [200] * 7
    assert minute_total(key, backend, None) == pages + 12
    assert minute_total(key, backend, "shop.example") == pages
    assert minute_total(key, backend, "other.example") == 0
    assert minute_total(key, backend, "www.example.org") == 7


def test_3000_gets_from_8_connections_are_3000_page_views(tmp_path, site_root, extension,
                                                            installed):
    """The pool's 4 workers count each page view once at the request's end
    (the total and the allowed host's account); HEAD, a redirect, a 404,
    JSON (also after a first text/html header()), a static path, a health
    check and a 404 set by a CGI "Status:" header add nothing; a host outside
    allowed_hosts counts in the total only."""
    key, backend = installed
    site = start_site(tmp_path, site_root, extension, key, **{"trafficthreshold.backend": backend})
    try:
        statuses = get_many(site, "/", 3000)
        assert statuses.count(200) == 3000
        assert minute_total(key, backend, None) == 3000
        assert minute_total(key, backend, "shop.example") == 3000
        rest_and_hosts_are_no_page_views(site, key, backend, 3000,
                                         [("GET", "/gone.php", 404)])
        log = (site.dir / "fpm.log").read_text(errors="replace")
        assert log.count("Host 'other.example' is not in trafficthreshold.allowed_hosts") <= 4
    finally:
        site.stop()


def raw_get(site: PhpSite, host: bytes) -> bytes:
    """A GET of / with the Host header's raw bytes (no client library
    would send them), answered by nginx and the pool."""
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_a_hosts_broken_utf8_never_reaches_the_log(tmp_path, site_root, extension,
                                                          installed):
    """A Host outside allowed_hosts, or one that is no account name, is
    logged, and the Host is the visitor's: bytes that are no UTF-8 (or
    control characters, which nginx refuses before PHP) must not reach the
    log.  The page views count in the total only."""
    key, backend = installed
    site = start_site(tmp_path, site_root, extension, key, **{"trafficthreshold.backend": backend})
    try:
        # nginx answers 400 to control characters in a Host, not to bytes
        # that are no UTF-8: those reach PHP's HTTP_HOST.
        for host in (b"evil\xc3.example", b"\xff\xfe.example"):
            for _ in range(8):  # every worker of the pool meets it
                assert raw_get(site, host).startswith(b"HTTP/1.1 200"), host
        assert minute_total(key, backend, None) == 16
        deadline = time.monotonic() + 10  # the master writes the workers' lines
        while b"trafficthreshold: " not in (log := (site.dir / "fpm.log").read_bytes()):
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(0.05)
        log.decode("utf-8")  # no broken UTF-8 from the visitor's Host
    finally:
        site.stop()


def throttle_status_both_ways(site: PhpSite, key: int, backend: str) -> None:
    """trafficthreshold_throttle_status() in the site's PHP answers what
    Python's throttle_status() answers: the supervisor's level while its
    heartbeat is fresh, the live level of the hits when higher."""
    trafficthreshold.configure(key=key, backend=backend)
    counter = segment.attach(key, backend)
    try:
        def both() -> tuple[int, int]:
            time.sleep(1.05)  # both cache the level for the second
            return int(site.get("/throttle.php")[1]), trafficthreshold.throttle_status()

        assert both() == (0, 0)
        counter.store(segment.H_THROTTLE_LEVEL, 4, 3)
        counter.store(segment.H_HEARTBEAT_MS, 8, int(time.time() * 1000))
        assert both() == (3, 3)
        counter.store(segment.H_HEARTBEAT_MS, 8, int(time.time() * 1000) - 60_000)  # stale
        counter.store(segment.H_THROTTLE_MULTIPLIER, 4, 10)
        assert get_many(site, "/", 40, connections=4) == [200] * 40  # 40 page views: level 4
        level = both()
        assert level[0] == level[1] and level[0] >= 4
    finally:
        counter.detach()
        trafficthreshold.configure(key=segment.DEFAULT_KEY)


def test_throttle_status_in_php_equals_pythons(tmp_path, site_root, extension, installed):
    """In a php-fpm worker (throttle_status_both_ways)."""
    key, backend = installed
    site = start_site(tmp_path, site_root, extension, key, **{"trafficthreshold.backend": backend})
    try:
        throttle_status_both_ways(site, key, backend)
    finally:
        site.stop()


def test_without_a_segment_pages_are_served_and_each_worker_logs_once(tmp_path, site_root,
                                                                        extension, key):
    """Fail open: no segment at the key; every page is served as usual, and
    the error log holds one line per worker (at most 4), naming the fix;
    phpinfo() and trafficthreshold_info() show why."""
    site = start_site(tmp_path, site_root, extension, key)
    try:
        assert get_many(site, "/", 200) == [200] * 200
        status, body = site.get("/info.php")
        assert status == 200 and b"trafficthreshold support" in body
        assert b"run `trafficthreshold install`" in body
        log = (site.dir / "fpm.log").read_text(errors="replace")
        lines = [line for line in log.splitlines() if "trafficthreshold: not counting" in line]
        assert 1 <= len(lines) <= 4, log
        assert f"no trafficthreshold segment at SysV IPC key {hex(key)}" in lines[0]
    finally:
        site.stop()


def under_load(site: PhpSite, batch: int, action) -> list[int]:
    """Runs ``action()`` while 8 connections load the site with GETs of /
    (``batch`` at a time); returns every status."""
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:
        while not stop.is_set():
            statuses.extend(get_many(site, "/", batch))

    loader = threading.Thread(target=load)
    loader.start()
    try:
        action()
    finally:
        stop.set()
        loader.join()
    return statuses


def kill_workers_under_load(site: PhpSite, key: int, backend: str, batch: int,
                            at_least: int) -> None:
    """6 of the site's PHP processes SIGKILLed under load: the server
    replaces them, the segment's lock is free, and afterwards every page
    view counts exactly once again."""
    counter = segment.attach(key, backend)
    try:
        rnd = random.Random(24)

        def kill() -> None:
            kills = 0
            while kills < 6:
                time.sleep(rnd.uniform(0.1, 0.3))
                pids = site.worker_pids()
                if pids:
                    os.kill(rnd.choice(pids), signal.SIGKILL)
                    kills += 1

        assert under_load(site, batch, kill).count(200) >= at_least
        counter.lock(1000)  # free (or taken over from a dead holder)
        counter.unlock()
        deadline = time.monotonic() + 10
        while len(site.worker_pids()) < site.workers:
            assert time.monotonic() < deadline, "the server did not replace its workers"
            time.sleep(0.05)
        before = minute_total(key, backend, None)
        assert get_many(site, "/", 600) == [200] * 600
        assert minute_total(key, backend, None) - before == 600
    finally:
        counter.detach()


def test_killed_workers_leave_nothing_wedged(tmp_path, site_root, extension, installed):
    """php-fpm workers SIGKILLed while 8 connections load the pool
    (kill_workers_under_load)."""
    key, backend = installed
    site = start_site(tmp_path, site_root, extension, key, **{"trafficthreshold.backend": backend})
    try:
        kill_workers_under_load(site, key, backend, 200, 1000)
    finally:
        site.stop()


@pytest.mark.postfix
@pytest.mark.skipif(bool(requires_postfix[1].args[0]), reason=requires_postfix[1].kwargs["reason"])
def test_run_rolls_php_page_views_and_the_alert_mail_arrives(tmp_path, site_root, extension,
                                                              key):
    """The whole path: PHP page views -> the segment -> `trafficthreshold
    run` (a real daemon process) -> the alert mail through the real Postfix,
    and on SIGTERM the final roll-up puts them in the store."""
    token = f"tt{uuid.uuid4().hex[:10]}"
    database = tmp_path / "store.sqlite3"
    config = tmp_path / "config.toml"
    config.write_text(f'key = {key}\ndatabase = "{database}"\ntimezone = "UTC"\n'
                      f'[mail]\nsendmail = "{SENDMAIL}"\nfrom = "tt-daemon@localhost"\n'
                      f'[[alert]]\nname = "php-{token}"\nthreshold = 50\n'
                      f'to = ["{MAILBOX}"]\nrepeat = 3600\n')
    segment.install(key, "sysv")
    daemon = subprocess.Popen([sys.executable, "-m", "trafficthreshold.cli", "--config",
                               str(config), "run", "--no-http"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    counter = segment.attach(key, "sysv")
    site = start_site(tmp_path, site_root, extension, key)
    try:
        deadline = time.monotonic() + 15
        while counter.load(segment.H_SUPERVISOR_PID, 4) != daemon.pid:
            assert daemon.poll() is None, daemon.stderr.read().decode()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.02)
        start = time.time()
        assert get_many(site, "/", 120) == [200] * 120
        (mail,) = wait_for_mail(token, 1)
        assert mail["Subject"].startswith(f"[trafficthreshold] php-{token}:")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.stderr.read().decode()
        day = time.gmtime(start)
        with SQLiteStore(str(database), "UTC") as store:
            days = store.period("shop.example", "pageview", day.tm_year, day.tm_mon)["data"]
            assert days[day.tm_mday] == 120
    finally:
        site.stop()
        counter.detach()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_the_sdist_builds_the_extension_from_the_same_core(tmp_path):
    """php/ and the C core travel in the sdist side by side, so `phpize &&
    ./configure && make` works in an unpacked sdist, compiling the core's
    one copy (config.m4 points at ../trafficthreshold/core)."""
    import tarfile
    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=repo,
                   check=True, capture_output=True)
    (archive,) = tmp_path.glob("trafficthreshold-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path, filter="data")
    for member in ("php/config.m4", "php/trafficthreshold.c", "php/trafficthreshold.ini",
                   "php/tests/004_counting.phpt", "trafficthreshold/core/tt_core.c",
                   "trafficthreshold/core/tt_layout.h", "trafficthreshold/core/trafficthreshold.h"):
        assert member in names, member
    assert not any(n.startswith("php/") and n.endswith((".lo", ".so", "config.h", "Makefile"))
                   for n in names)
    build = archive.parent / archive.name[:-len(".tar.gz")] / "php"
    for step in (["phpize"], ["./configure"], ["make"]):
        done = subprocess.run(step, cwd=build, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (build / "modules" / "trafficthreshold.so").exists()


def test_a_reinstalled_segment_is_followed_without_a_restart(tmp_path, site_root, extension,
                                                             key):
    """The segment is uninstalled and installed again while the pool runs:
    pages are served all along; the workers let the retired segment go at
    their next page, watch for the next install at each page (not every
    10 s), and attach to it at once: no page view after the new install is
    lost, with no php-fpm restart."""
    segment.install(key, "sysv")
    site = start_site(tmp_path, site_root, extension, key)
    try:
        assert get_many(site, "/", 40) == [200] * 40
        assert minute_total(key, "sysv", None) == 40
        segment.uninstall(key, force=True)
        # Every worker lets go of the retired one and tries (and fails) to
        # attach: before the fix, none tried again for 10 s.
        assert get_many(site, "/", 40) == [200] * 40
        segment.install(key, "sysv")
        assert get_many(site, "/", 100) == [200] * 100
        assert minute_total(key, "sysv", None) == 100
    finally:
        site.stop()


# ------------------------------------------------------- php-cli, step by step

class PhpCli:
    """A php-cli process with the extension that runs `script` once per line
    sent (`step`), so a test can change the segment between two of its
    hits; the script's output of each step is returned."""

    def __init__(self, extension: Path, key: int, backend: str, body: str, **ini: str):
        script = ("<?php\nwhile (($line = fgets(STDIN)) !== false) {\n" + body
                  + "\n echo \"\\n--\\n\"; fflush(STDOUT);\n}\n")
        settings = {"extension": str(extension / "modules" / "trafficthreshold.so"),
                    "trafficthreshold.key": hex(key), "trafficthreshold.backend": backend,
                    **ini}
        args = ["php", "-n"] + [f"-d{k}={v}" for k, v in settings.items()] + ["-r", script[6:]]
        # The error log (stderr: the one warning per process) is not the
        # script's output.
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)

    def step(self, line: str = "go") -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = []
        while (got := self.proc.stdout.readline()) not in ("--\n", ""):
            out.append(got)
        return "".join(out).strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=20)


def test_a_memoized_key_reclaimed_under_php_counts_under_its_own_name(extension, installed):
    """A script's literals are memoized by their zend_string pointers (the
    hit's fast path); the supervisor reclaims the key and another name takes
    its slot: the next hit through the memo finds the slot stale (the
    bucket tags' generation) and counts in a new slot of its own name, never
    into the slot's new owner."""
    key, backend = installed
    php = PhpCli(extension, key, backend,
                 'var_dump(trafficthreshold_hit("gone.example"), '
                 'trafficthreshold_hit("gone.example", "signup"));')
    counter = segment.attach(key, backend)
    try:
        assert php.step() == "bool(true)\nbool(true)"
        assert php.step() == "bool(true)\nbool(true)"
        now_minute = int(time.time()) // 60
        reclaimed = counter.reclaim(now_minute + 2)
        assert {r[1] for r in reclaimed} == {"gone.example", "all"}
        counter.hit("new.example", "pageview", 3)
        # The slots changed hands (the free list gives them out again).
        assert {r[0] for r in reclaimed} & {counter.find("new.example", "pageview"),
                                           counter.find(None, "pageview")}
        assert php.step() == "bool(true)\nbool(true)"
        assert php.step() == "bool(true)\nbool(true)"
        new = counter.find("new.example", "pageview")
        assert sum(n for s, _, n in counter.minutes(now_minute - 1, now_minute + 1)
                   if s == new) == 3
        for account, event in (("gone.example", "pageview"), ("gone.example", "signup")):
            found = counter.find(account, event)
            assert found is not None and found != new
            assert sum(n for s, _, n in counter.minutes(now_minute - 1, now_minute + 1)
                       if s == found) == 2, (account, event)
    finally:
        counter.detach()
        php.close()


def test_a_memoized_key_is_not_used_in_a_reinstalled_segment(extension, key, backend):
    """The memo's refs are the old segment's: after a reinstall, where
    another name took the first slots, the script's next hit of the same
    literal resolves its name in the new segment (the writer's generation
    moved at the attach) instead of adding into the new owner's slot."""
    segment.install(key, backend)
    php = PhpCli(extension, key, backend, 'var_dump(trafficthreshold_hit("a.example"));')
    try:
        assert php.step() == "bool(true)"
        assert php.step() == "bool(true)"
        segment.uninstall(key, backend, force=True)
        segment.install(key, backend)
        counter = segment.attach(key, backend)
        try:
            counter.hit("b.example", "pageview", 5)
            assert php.step() == "bool(true)"
            now_minute = int(time.time()) // 60

            def total(account):
                slot = counter.find(account, "pageview")
                return sum(n for s, _, n in counter.minutes(now_minute - 1, now_minute + 1)
                           if s == slot) if slot is not None else 0
            assert (total("a.example"), total("b.example"), total(None)) == (1, 5, 6)
        finally:
            counter.detach()
    finally:
        php.close()


def test_php_sees_a_reinstall_to_the_other_backend_at_once(extension, key):
    """trafficthreshold.backend not set (found: sysv, else posix): the sysv
    segment is uninstalled and installed again as posix under a running
    script; its next hit attaches to the new one (the core's attacher
    watches both backends; before, the extension watched the old backend
    only and waited out the 10 s)."""
    segment.install(key, "sysv")
    php = PhpCli(extension, key, "", 'var_dump(trafficthreshold_hit("a.example"));')
    try:
        assert php.step() == "bool(true)"
        segment.uninstall(key, "sysv", force=True)
        assert php.step() == "bool(false)"     # none installed: not counted
        segment.install(key, "posix")
        assert [php.step() for _ in range(3)] == ["bool(true)"] * 3
        assert minute_total(key, "posix", "a.example") == 3
    finally:
        php.close()
        segment.uninstall(key, "posix", force=True)


def test_php_does_not_try_a_half_made_segment_at_every_hit(extension, key):
    """After an uninstall, a segment found half made at the key (an install
    under way, or its installer killed) is tried once, then again only a
    second later, not at every hit (a try maps it: the segment's lpid), and
    attached once it is installed."""
    import sysv_ipc
    from test_core_ffi import tried_once_a_second
    segment.install(key, "sysv")
    php = PhpCli(extension, key, "sysv", 'var_dump(trafficthreshold_hit("a.example"));')
    half = None
    try:
        assert php.step() == "bool(true)"
        segment.uninstall(key, "sysv", force=True)
        half = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, size=8192, init_character=b"\0")
        half.detach()
        tried_once_a_second(key, php.step, php.proc.pid)
        half.remove()
        half = None
        segment.install(key, "sysv")
        time.sleep(1.1)
        assert [php.step() for _ in range(2)] == ["bool(true)"] * 2
        assert minute_total(key, "sysv", "a.example") == 2
    finally:
        php.close()
        if half is not None:
            half.remove()


NAMES = ["a.example", "a:b", "a/b", "a\\b", "..", ".", "a..b", "a b", "all", "-",
         "x" * 64, "x" * 65, "é.example"]


def test_php_names_through_the_memo_are_pythons_verdicts(extension, installed):
    """Each name as a script literal (an interned string: the memo's
    fast path), counted twice in a row and again after other names: PHP
    accepts exactly the names Python's names.validate accepts, every time
    (a refused name is never memoized; an accepted one counts each hit),
    separators ':' '/' '\\' '.' '..' included."""
    from trafficthreshold import names as tt_names
    key, backend = installed
    calls = " ".join(f"var_dump(trafficthreshold_hit({n!r}));" for n in NAMES for _ in range(2))
    php = PhpCli(extension, key, backend, calls)
    try:
        for round_ in range(2):
            got = php.step().split("\n")
            for i, name in enumerate(NAMES):
                try:
                    tt_names.validate(None if name == "all" else name, "pageview")
                    ok = "bool(true)"
                except ValueError:
                    ok = "bool(false)"
                assert got[2 * i:2 * i + 2] == [ok, ok], (name, round_)
    finally:
        php.close()
    counter = segment.attach(key, backend)
    try:
        m = int(time.time()) // 60
        for name in NAMES:
            try:
                tt_names.validate(name, "pageview")
            except ValueError:
                continue
            slot = counter.find(name, "pageview")
            assert sum(n for s, _, n in counter.minutes(m - 1, m + 1) if s == slot) == 4, name
    finally:
        counter.detach()


def test_a_literal_of_the_next_request_is_not_counted_under_the_last_ones_name(
        tmp_path, extension, installed):
    """Without opcache a script's literals are the request's interned
    strings, freed at its end; the next request's script, compiled the same
    way, gets its literal at the same address with other bytes.  One
    php-fpm worker serves one.php and two.php in turn: each hit counts
    under its own name (the names' memo is cleared between requests; a memo
    kept would count two.php's hits under 'one.example')."""
    key, backend = installed
    root = tmp_path / "www"
    root.mkdir()
    for name in ("one", "two"):
        (root / f"{name}.php").write_text(
            f'<?php var_dump(trafficthreshold_hit("{name}.example"), '
            f'function_exists("opcache_get_status"));\n')
    settings = {"extension": str(extension / "modules" / "trafficthreshold.so"),
                "trafficthreshold.key": hex(key), "trafficthreshold.backend": backend}
    site = PhpSite(tmp_path / "site", root, settings, workers=1).start()
    try:
        for _ in range(3):
            for name in ("one", "two"):
                status, body = site.get(f"/{name}.php")
                assert (status, body) == (200, b"bool(true)\nbool(false)\n"), name
    finally:
        site.stop()
    assert minute_total(key, backend, "one.example") == 3
    assert minute_total(key, backend, "two.example") == 3


# ---------------------------------------------------------------- mod_php

@pytest.fixture
def apache_segment(key, backend):
    """A segment installed for Apache's children (``--group www-data``,
    as docs/php.rst says): (key, backend)."""
    segment.install(key, backend, group="www-data")
    return key, backend


def start_apache(tmp_path: Path, root: Path, extension: Path, key: int, backend: str,
                 workers: int = 4, extra: str = "") -> ApacheSite:
    """Apache + mod_php: the extension and the segment in the server's
    php.ini, the page-view settings as php_admin_value in Apache's own
    configuration (as a site would set them)."""
    ini = {"extension": str(extension / "modules" / "trafficthreshold.so"),
           "trafficthreshold.key": hex(key), "trafficthreshold.backend": backend,
           "log_errors": "On"}
    admin = {"trafficthreshold.pageviews": "On", "trafficthreshold.account": "host",
             "trafficthreshold.allowed_hosts": "shop.example, .example.org"}
    return ApacheSite(tmp_path / "apache", root, ini, admin, workers=workers,
                      extra=extra).start()


def test_mod_php_counts_each_get_once_and_the_rest_not(tmp_path, site_root, extension,
                                                        apache_segment):
    """Under Apache's mod_php (apache2handler, 4 prefork children), 1200
    GETs from 8 connections are 1200 page views, in the total and the
    allowed host's account, from several children; HEAD, a redirect, a
    404, JSON, text/plain, a static path routed to PHP
    (FallbackResource), a POST and Apache's 403 rendered by a PHP
    ErrorDocument add none (as under php-fpm); a host outside allowed_hosts counts in
    the total only, logged in Apache's error log."""
    key, backend = apache_segment
    # Apache's own 403, its error page rendered by index.php (an HTML page
    # answered 403): no page view.
    forbidden = ('<Files "private.php">\n    Require all denied\n</Files>\n'
                 'ErrorDocument 403 /index.php\n')
    site = start_apache(tmp_path, site_root, extension, key, backend, extra=forbidden)
    try:
        counter = segment.attach(key, backend)
        try:
            writers = counter.load(segment.H_NEXT_STRIPE, 4)
        finally:
            counter.detach()
        assert get_many(site, "/", 1200) == [200] * 1200
        assert minute_total(key, backend, None) == 1200
        assert minute_total(key, backend, "shop.example") == 1200
        counter = segment.attach(key, backend)
        try:  # each child that counted took a stripe: several did
            assert counter.load(segment.H_NEXT_STRIPE, 4) - writers >= 2
        finally:
            counter.detach()
        rest_and_hosts_are_no_page_views(site, key, backend, 1200,
                                         [("GET", "/pid.php", 200), ("GET", "/private.php", 403)])
        log = site.log()
        assert 1 <= log.count("Host 'other.example' is not in trafficthreshold.allowed_hosts") <= 4
    finally:
        site.stop()


def test_mod_php_throttle_status_equals_pythons(tmp_path, site_root, extension,
                                                apache_segment):
    """In an Apache child (throttle_status_both_ways)."""
    key, backend = apache_segment
    site = start_apache(tmp_path, site_root, extension, key, backend)
    try:
        throttle_status_both_ways(site, key, backend)
    finally:
        site.stop()


def test_mod_php_killed_children_leave_nothing_wedged(tmp_path, site_root, extension,
                                                      apache_segment):
    """Apache children SIGKILLed while 8 connections load the server
    (kill_workers_under_load): the parent starts new ones."""
    key, backend = apache_segment
    site = start_apache(tmp_path, site_root, extension, key, backend)
    try:
        kill_workers_under_load(site, key, backend, 100, 300)
        assert "segfault" not in site.log().lower()
    finally:
        site.stop()


def test_mod_php_virtual_hosts_count_into_their_own_segments(tmp_path, site_root, extension,
                                                             apache_segment):
    """One Apache child serves two virtual hosts whose configuration sets
    their own trafficthreshold.key (php_admin_value in <VirtualHost>): each
    host's page views go into its own segment, whichever host the child
    served first, not all into the first one's."""
    key, backend = apache_segment
    other = segment.unused_key()
    vhosts = "".join(f"""
<VirtualHost 127.0.0.1:{{port}}>
    ServerName {name}
    DocumentRoot {{root}}
    php_admin_value trafficthreshold.key {hex(k)}
</VirtualHost>
""" for name, k in (("shop.example", key), ("www.example.org", other)))
    segment.install(other, backend, group="www-data")
    try:
        site = start_apache(tmp_path, site_root, extension, key, backend, workers=1,
                            extra=vhosts)
    except BaseException:
        remove_everything(other)
        raise
    try:
        for _ in range(3):
            assert get_many(site, "/", 10, connections=1, host="www.example.org") == [200] * 10
            assert get_many(site, "/", 20, connections=1, host="shop.example") == [200] * 20
        assert minute_total(key, backend, "shop.example") == 60
        assert minute_total(key, backend, None) == 60
        assert minute_total(other, backend, "www.example.org") == 30
        assert minute_total(other, backend, None) == 30
    finally:
        site.stop()
        remove_everything(other)


def test_mod_php_virtual_hosts_count_into_their_own_accounts(tmp_path, site_root, extension,
                                                             apache_segment):
    """One Apache child serves two virtual hosts whose configuration names
    their own account (php_admin_value trafficthreshold.account, and
    allowed_hosts): each host's page views go to its own account."""
    key, backend = apache_segment
    vhosts = "".join(f"""
<VirtualHost 127.0.0.1:{{port}}>
    ServerName {name}
    DocumentRoot {{root}}
    php_admin_value trafficthreshold.account {account}
    php_admin_value trafficthreshold.allowed_hosts {name}
</VirtualHost>
""" for name, account in (("shop.example", "shopa"), ("www.example.org", "shopb"),
                          ("blog.example.org", "host")))
    site = start_apache(tmp_path, site_root, extension, key, backend, workers=1, extra=vhosts)
    try:
        for _ in range(3):
            for host, n in (("www.example.org", 10), ("shop.example", 20),
                            ("blog.example.org", 5)):
                assert get_many(site, "/", n, connections=1, host=host) == [200] * n
        assert minute_total(key, backend, "shopa") == 60
        assert minute_total(key, backend, "shopb") == 30
        assert minute_total(key, backend, "blog.example.org") == 15
        assert minute_total(key, backend, None) == 105
    finally:
        site.stop()


def test_mod_php_graceful_restart_under_load_counts_each_page_once(tmp_path, site_root,
                                                                   extension, apache_segment):
    """apache2's graceful restart (SIGUSR1: the parent reloads mod_php and
    the extension, old children finish their requests, new ones start)
    while 8 connections load the server: every page answered 200 is one
    page view, none lost, none twice."""
    key, backend = apache_segment
    site = start_apache(tmp_path, site_root, extension, key, backend)
    try:
        def restart_twice() -> None:
            old = set(site.worker_pids())
            for _ in range(2):
                time.sleep(0.3)
                site.apache.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while old & set(site.worker_pids()):
                assert time.monotonic() < deadline, "the old children did not go"
                time.sleep(0.05)
            time.sleep(0.3)

        statuses = under_load(site, 80, restart_twice)
        assert site.apache.poll() is None
        assert statuses.count(200) >= 200
        assert minute_total(key, backend, None) == statuses.count(200)
    finally:
        site.stop()
