"""The supervisor's reload (SIGHUP): what a new configuration may change
while the daemon runs, and that no bad value ends it.

Real daemons (``trafficthreshold run`` serving HTTP) reloaded with SIGHUP,
and the configuration loader and :meth:`Supervisor.reload` driven
in-process for the fuzzed edits (issue #22, items 1 and 2, "Done means")."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

TOKEN = "s3cret-token-for-the-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, key: int, backend: str, http: str, extra: str = "") -> None:
    path.write_text(f"""
key = {key}
backend = "{backend}"
database = "{path.parent / 'stats.sqlite3'}"
timezone = "UTC"
{extra}
[http]
{http}
""")


class Daemon:
    """``trafficthreshold run`` on a config file, its output in a file."""

    def __init__(self, config: Path) -> None:
        self.log = config.parent / "daemon.log"
        env = dict(os.environ, TRAFFICTHRESHOLD_CONFIG=str(config))
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trafficthreshold.cli", "run"], env=env,
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"the daemon exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output()}"
            time.sleep(0.05)

    def reload(self, count: int = 1) -> None:
        """SIGHUP, then wait until the daemon said what it made of it."""
        before = self.output().count("reload")
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while self.output().count("reload") <= before:
            assert self.proc.poll() is None, f"the daemon exited on SIGHUP:\n{self.output()}"
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.proc.kill()


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(config: Path) -> Daemon:
        daemon = Daemon(config)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def get(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("backend", ["sysv"])
def test_a_reload_to_loopback_without_token_keeps_the_bound_address_closed(
        tmp_path, installed, daemons):
    """Item 1: bound to 0.0.0.0 with a token; a reload says 127.0.0.1 and
    no token (config check passes that file).  The server stays on 0.0.0.0
    (listen needs a restart), so the token must stay: every route still
    answers 401 without it, and the log says listen is kept and why the
    reload is refused."""
    port = free_port()
    config = tmp_path / "config.toml"
    write_config(config, *installed, f'listen = "0.0.0.0:{port}"\ntoken = "{TOKEN}"')
    daemon = daemons(config)
    daemon.wait_for("serving the stats API")
    url = f"http://127.0.0.1:{port}"
    assert get(f"{url}/metrics") == 401
    write_config(config, *installed, f'listen = "127.0.0.1:{port + 1}"')
    daemon.reload()
    for route in ("/metrics", "/api/stats/live", "/", "/api/openapi.json"):
        assert get(url + route) == 401, route
    assert get(f"{url}/metrics", TOKEN) == 200
    out = daemon.output()
    assert "http.listen changed" in out and "restart" in out, out
    assert "http.token" in out and "reload refused" in out, out
    # A reload that keeps a token applies (and says listen is kept, once).
    write_config(config, *installed, f'listen = "127.0.0.1:{port + 1}"\ntoken = "new-{TOKEN}"')
    daemon.reload()
    daemon.wait_for("configuration reloaded")
    assert get(f"{url}/metrics", f"new-{TOKEN}") == 200
    assert get(f"{url}/metrics", TOKEN) == 401
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sysv"])
@pytest.mark.parametrize("table, line", [
    ("http", 'public_url = "http://[oops"'),
    ("http", 'cors_origins = ["https://[oops"]'),
    ("mail", 'dashboard_url = "https://[oops/"'),
    ("store", 'url = "redis://[oops:6379/0"'),
])
def test_a_url_typo_and_sighup_leave_the_daemon_running(tmp_path, installed, daemons,
                                                          table, line):
    """Item 2: "Invalid IPv6 URL" used to escape the reload and end the
    daemon.  Now the reload is refused, naming the key, and the daemon
    goes on serving until SIGTERM."""
    port = free_port()
    config = tmp_path / "config.toml"
    write_config(config, *installed, f'listen = "127.0.0.1:{port}"')
    daemon = daemons(config)
    daemon.wait_for("serving the stats API")
    key = line.split(" =")[0]
    extra = f"[{table}]\n{line}\n" if table != "http" else ""
    http = f'listen = "127.0.0.1:{port}"' + (f"\n{line}" if table == "http" else "")
    write_config(config, *installed, http, extra=extra)
    daemon.reload()
    time.sleep(1.2)  # a tick or so after the reload
    assert daemon.proc.poll() is None, daemon.output()
    out = daemon.output()
    assert f"reload refused" in out and f"{table}.{key} = " in out, out
    assert "Traceback" not in out, out
    assert get(f"http://127.0.0.1:{port}/api/openapi.json") == 200
    assert daemon.stop() == 0


# ------------------------------------------- the fuzzed config ("Done means")

import logging  # noqa: E402
import re  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from trafficthreshold import api, config as configuration  # noqa: E402
from trafficthreshold.errors import ConfigError  # noqa: E402
from trafficthreshold.supervisor import RESTART_ONLY, Supervisor, _get  # noqa: E402

#: A valid file with a value for most keys: table -> {key: value}.
VALID = {
    "": {"timezone": "UTC"},
    "throttle": {"multiplier": 60, "window": "60s", "policy": "hysteresis", "cooldown": 300,
                 "cron_test": 10800, "scope": "host"},
    "retention": {"minutes": 7, "hours": 0, "days": 0, "months": 0},
    "http": {"enabled": True, "listen": "127.0.0.1:8787", "token": "",
             "public_url": "https://stats.example.com/", "prefix": "/api/stats",
             "cors_origins": ["https://dash.example.com"]},
    "mail": {"transport": "sendmail", "sendmail": "/usr/sbin/sendmail", "smtp_host": "localhost",
             "smtp_port": 25, "starttls": False, "from": "tt@example.com", "max_per_hour": 20,
             "timeout": 30, "dashboard_url": "https://stats.example.com/"},
    "store": {"backend": "sqlite", "prefix": "track", "funnels_prefix": "funnels",
              "host": "web1", "lease_ttl": 10.0},
    "alert": {"name": "burst", "account": "acme", "event": "pageview", "threshold": 100,
              "window": "minute", "to": ["ops@example.com"], "repeat": 3600,
              "clear_minutes": 5, "scope": "host"},
}
#: Values that broke, or nearly broke, a check once.
NASTY = ["http://[oops", "https://[::1", "redis://[x:1/0", "https://a.example:99999",
         "https://a.example:0", "[::ffff:127.0.0.1]:8787", "0.0.0.0:8787", "[::]:1",
         "bücher.example", "https://bücher.example", "..", ".", "a\\b", "~x", "all", "",
         " ", "\u2028", "x" * 300, "/", "http://", "https://a b/", "Europe/Nowhere",
         "redis://:pw@h:6379/0", "unix:///run/r.sock", "*", -1, 0, 2**63, 1e309, -0.0]
#: Values some key takes, so that many edits are valid files.
GOOD = ["127.0.0.1:9999", "[::1]:8788", "https://other.example:8443/stats", "", 5, 120, 0,
        True, False, "minute", "60s", "drupal", "hysteresis", "/stats", "sendmail", "smtp",
        ["http://localhost:3000", "https://dash.example.com:443"], ["ops@example.com"],
        "Europe/Zurich", "new-token-0123456789", 3.5]
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
VALUES = st.one_of(st.sampled_from(GOOD), st.sampled_from(GOOD), TEXT, st.integers(), st.floats(), st.booleans(),
                   st.lists(st.one_of(TEXT, st.integers()), max_size=3),
                   st.sampled_from(NASTY), st.lists(st.sampled_from(NASTY), min_size=1,
                                                    max_size=2))
KEYS = [(table, key) for table, keys in VALID.items() for key in keys] + [
    ("", "key"), ("", "backend"), ("", "database"), ("store", "url"),
    ("store", "sentinels"), ("store", "password_file"), ("mail", "templates"),
    ("http", "nonsense"), ("", "http"), ("alert", "to")]


def render(tables: dict[str, dict[str, object]], database: str) -> str:
    top = {"database": database, **tables[""]}
    lines = [f"{k} = {configuration._toml(v)}" for k, v in top.items()]
    for table, keys in tables.items():
        if table == "":
            continue
        lines.append(f"\n[[{table}]]" if table == "alert" else f"\n[{table}]")
        lines += [f"{k} = {configuration._toml(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


@st.composite
def edits(draw) -> str:
    """The valid file with one or two values changed, or a few characters
    inserted, deleted or replaced anywhere (a TOML error then, often)."""
    tables = {t: dict(keys) for t, keys in VALID.items()}
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 2))):
            table, key = draw(st.sampled_from(KEYS))
            tables[table][key] = draw(VALUES)
        return render(tables, "@DB@")
    text = render(tables, "@DB@")
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        what = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from(list("=\"'[]{}#.,:\\\n 0aZ~")) | TEXT.filter(bool))
        end = at + (0 if what == "insert" else 1)
        text = text[:at] + ("" if what == "delete" else char) + text[end:]
    return text


#: A refusal line names its key (``http.public_url = ...``, ``alert[0].to
#: is missing``) or, for a file that is not TOML, the place of the error.
NAMES_ITS_KEY = re.compile(
    r"^\S+: (TOML syntax error: .+ \(at .+\); .+|[^=]+?( = .+)? "
    r"(is|has|holds|contains|are|would|needs|cannot|does|ends|starts) .+; .+)$")


@pytest.mark.parametrize("backend", ["sysv"])
def test_config_check_and_reload_agree_on_1000_fuzzed_edits(tmp_path, installed, caplog):
    """1,000 random edits of a valid file: ``config check`` (config.load)
    either accepts the file or raises a ConfigError whose every line names
    its key and a fix, never another exception; the reload of a running
    supervisor (with its stats app) accepts and refuses the same files,
    logs a refusal as the very same message, never raises, and keeps
    running with the configuration it had."""
    database = str(tmp_path / "stats.sqlite3")
    path = tmp_path / "config.toml"
    path.write_text(render(VALID, database).replace("[http]", f"[http]\n# key {installed[0]}"))
    env = {"TRAFFICTHRESHOLD_KEY": str(installed[0])}
    start = configuration.load(str(path), env=env)
    sup = Supervisor(start, config_path=str(path), http=False, env=env)
    sup.initialize(time.time())
    sup.app = api.make_app(start)          # the app's reload, without a server
    seen = {"refused": 0, "applied": 0}
    try:
        @settings(max_examples=1000, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(edits())
        def check(text: str) -> None:
            path.write_text(text.replace("@DB@", database))
            before = sup.config
            try:
                wanted = configuration.load(str(path), env=env)
            except ConfigError as exc:
                refusal = str(exc)
            else:
                refusal = None
            caplog.clear()
            with caplog.at_level(logging.INFO, "trafficthreshold"):
                sup.reload()                 # raises nothing, whatever the file
            logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            if refusal is not None:
                seen["refused"] += 1
                for line in refusal.splitlines():
                    assert NAMES_ITS_KEY.match(line), line
                assert logged == ["reload refused, keeping the running configuration: "
                                  + refusal]
                assert sup.config is before
            else:
                seen["applied"] += 1
                assert logged == []
                for name in RESTART_ONLY:        # kept from the running config
                    assert _get(sup.config, name) == _get(before, name)
                assert sup.config.http.token == wanted.http.token
                assert sup.config.alerts == wanted.alerts
                assert sup.app.config is sup.config

        check()
    finally:
        sup.shutdown(time.time())
    assert seen["refused"] > 300 and seen["applied"] > 30, seen


def test_the_app_served_on_a_public_address_refuses_a_reload_without_token(serve, tmp_path):
    """The app's own guard, whoever reloads it: served on 0.0.0.0, a config
    without a token is refused (ConfigError naming http.token) and the
    token stays."""
    import dataclasses
    database = str(tmp_path / "stats.sqlite3")
    cfg = configuration.parse(f'database = "{database}"\n[http]\nlisten = "0.0.0.0:8787"\n'
                              f'token = "{TOKEN}"\n', "config.toml", env={})
    app = api.make_app(cfg, counter_factory=lambda: None)
    server = serve(app, "0.0.0.0:0")
    open_ = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, token="",
                                                              listen="127.0.0.1:8787"))
    with pytest.raises(ConfigError, match="http.token is empty.*0.0.0.0"):
        app.reload(open_)
    assert get(f"http://127.0.0.1:{server.port}/api/openapi.json") == 401
    app.reload(dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, token="other")))
    assert get(f"http://127.0.0.1:{server.port}/api/openapi.json", "other") == 200


@pytest.mark.parametrize("backend", ["sysv"])
def test_a_real_daemon_takes_fuzzed_files_on_sighup_as_config_check_does(tmp_path, installed,
                                                                         daemons):
    """A few of the fuzzed edits, as real SIGHUPs to a real daemon: it
    never exits, logs no traceback, and refuses exactly what config.load
    (config check) refuses, with the same message."""
    import random as random_
    port = free_port()
    config = tmp_path / "config.toml"
    valid = {**VALID, "http": {**VALID["http"], "listen": f"127.0.0.1:{port}"}}
    database = str(tmp_path / "stats.sqlite3")
    env = {"TRAFFICTHRESHOLD_KEY": str(installed[0])}
    config.write_text(f"key = {installed[0]}\n" + render(valid, database))
    daemon = daemons(config)
    daemon.wait_for("serving the stats API")
    rng = random_.Random(22)
    texts = [render({**valid, "http": {**valid["http"], "public_url": "http://[oops"}},
                    database)]
    for _ in range(5):
        text = render(valid, database)
        at = rng.randrange(len(text))
        texts.append(text[:at] + rng.choice("=\"[]\\#x\n") + text[at + 1:])
    for text in texts:
        config.write_text(f"key = {installed[0]}\n" + text)
        try:
            configuration.load(str(config), env=env)
        except ConfigError as exc:
            expected = "reload refused, keeping the running configuration: " + str(exc)
        else:
            expected = "configuration reloaded"
        daemon.reload()
        daemon.wait_for(expected.splitlines()[0])
    assert daemon.proc.poll() is None
    assert "Traceback" not in daemon.output(), daemon.output()
    assert get(f"http://127.0.0.1:{port}/api/openapi.json") == 200
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sysv"])
def test_a_daemon_started_from_the_default_file_reloads_that_file(tmp_path, installed, caplog):
    """``trafficthreshold run`` without --config or $TRAFFICTHRESHOLD_CONFIG
    reads /etc/trafficthreshold/config.toml (config.DEFAULT_PATH) when it
    exists.  A reload reads that same file: it used to look for it again,
    and a file moved away for a moment (an editor's rename, a deploy tool)
    reloaded the embedded defaults, dropping the token, the alerts and the
    origins without a word.  Now a file gone at reload is refused, naming
    it, and the running configuration stays."""
    path = tmp_path / "config.toml"
    database = tmp_path / "stats.sqlite3"
    text = (f'key = {installed[0]}\ndatabase = "{database}"\ntimezone = "UTC"\n'
            f'[http]\ntoken = "{TOKEN}"\n')
    path.write_text(text)
    start = configuration.load(None, env={}, default_path=str(path))
    assert start.source == str(path) and start.http.token == TOKEN
    sup = Supervisor(start, config_path=None, http=False, env={})   # as `run` passes it
    sup.initialize(time.time())
    sup.app = api.make_app(start)
    try:
        path.write_text(text.replace(TOKEN, f"new-{TOKEN}"))
        sup.reload()
        assert sup.config.http.token == f"new-{TOKEN}"
        assert sup.config.source == str(path)
        path.unlink()
        caplog.clear()
        with caplog.at_level(logging.INFO, "trafficthreshold"):
            sup.reload()
        assert sup.config.http.token == f"new-{TOKEN}"
        assert sup.app.requires_token
        refused = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(refused) == 1 and "reload refused" in refused[0], refused
        assert str(path) in refused[0] and "no such file" in refused[0], refused
    finally:
        sup.shutdown(time.time())


@pytest.mark.parametrize("backend", ["sysv"])
def test_a_reload_while_the_segment_is_gone_applies_whole(tmp_path, installed, caplog):
    """A SIGHUP while the daemon waits for `trafficthreshold install` (the
    segment was uninstalled under it): the segment's settings are written
    at the re-attach; the rest of the reload applies whole.  It used to
    stop half-way (writing the settings into the detached segment raised),
    the daemon's config new, the app's token and the alert rules old, and
    the log said the running configuration stayed."""
    from trafficthreshold import segment
    key, backend = installed
    path = tmp_path / "config.toml"
    write_config(path, key, backend, f'listen = "127.0.0.1:8787"\ntoken = "{TOKEN}"',
                 extra="[throttle]\nmultiplier = 60\n")
    start = configuration.load(str(path), env={})
    sup = Supervisor(start, config_path=str(path), http=False, env={})
    now = time.time()
    sup.initialize(now)
    sup.app = api.make_app(start)
    try:
        segment.uninstall(key, backend, force=True)
        sup.tick(now + 1)                       # lets go of it, waits for a new one
        assert not sup._segment_live()
        write_config(path, key, backend, f'listen = "127.0.0.1:8787"\ntoken = "new-{TOKEN}"',
                     extra="[throttle]\nmultiplier = 7\n")
        caplog.clear()
        with caplog.at_level(logging.INFO, "trafficthreshold"):
            sup._guard("reload", sup.reload)    # as the daemon's loop runs it
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert sup.config.http.token == f"new-{TOKEN}"
        assert sup.app.config is sup.config
        assert sup.app._authorize({"HTTP_AUTHORIZATION": f"Bearer new-{TOKEN}"}) is None
        segment.install(key, backend, now=int(now))
        sup.tick(now + 2)                       # attaches the new one, with the new settings
        assert sup._segment_live()
        assert sup.counter.load(segment.H_THROTTLE_MULTIPLIER, 4) == 7
    finally:
        sup.shutdown(time.time())


@pytest.mark.parametrize("backend", ["sysv"])
def test_a_sighup_storm_ends_on_the_last_file(tmp_path, installed, daemons):
    """Twenty SIGHUPs in a burst, the file rewritten before each (a deploy
    tool, a reload while one runs): the daemon stays up, logs no
    traceback, and ends on the last file (a SIGHUP during a reload is not
    lost)."""
    port = free_port()
    config = tmp_path / "config.toml"
    write_config(config, *installed, f'listen = "127.0.0.1:{port}"\ntoken = "{TOKEN}-0"')
    daemon = daemons(config)
    daemon.wait_for("serving the stats API")
    url = f"http://127.0.0.1:{port}/api/openapi.json"
    for i in range(1, 21):
        write_config(config, *installed, f'listen = "127.0.0.1:{port}"\ntoken = "{TOKEN}-{i}"')
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(0.01 * (i % 3))
    deadline = time.monotonic() + 20
    while get(url, f"{TOKEN}-20") != 200:
        assert daemon.proc.poll() is None, daemon.output()
        assert time.monotonic() < deadline, daemon.output()
        time.sleep(0.1)
    assert get(url, f"{TOKEN}-19") == 401
    assert "Traceback" not in daemon.output(), daemon.output()
    assert daemon.stop() == 0
