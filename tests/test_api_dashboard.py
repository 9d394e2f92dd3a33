"""Tests of trafficthreshold.dashboard: the page at / of the stats app.

First the HTML as served over a real waitress server: names escaped, a
strict CSP, the counts, chart, throttle level and alert rules, the event
switch, and the page without a segment.

Then in a real browser, Debian's headless Chromium: it renders the page
over a real segment and store, takes screenshots (saved under
test-artifacts/ for a person to look at) and dumps the DOM after the
scripts ran, which shows that the chart, the numbers and the refresh work,
and that an account named like an HTML tag stays text. These need
/usr/bin/chromium (``sh .ci/chromium.sh`` installs it); skipped without
it, which CI treats as a failure.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.harness import MINUTE, NOW, XSS, ZONE, fetch, make_config, minute_at
from trafficthreshold import alerts, api, segment
from trafficthreshold.api import server as webserver
from trafficthreshold.alerts.store import AlertStore
from trafficthreshold.config import AlertRule, Config
from trafficthreshold.api.dashboard import REFRESH_S
from trafficthreshold.errors import SegmentNotFound
from trafficthreshold.store import SQLiteStore

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ACCOUNTS = ["example.com", "shop-00042", "blog.example.org", XSS, "zurich-bakery",
            "a-rather-long-account-name.example.com"]

#: The browser tests' skip, next to ``@pytest.mark.chromium`` on each of them
#: (not a module-wide pytestmark: the tests of the page as served need no browser).
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=(
    "needs Debian's chromium at /usr/bin/chromium: sh .ci/chromium.sh"))


# ------------------------------------------------------------ the page as served


def test_dashboard_escapes_names_and_sets_a_strict_csp(
        live_server: tuple[webserver.Server, Any]) -> None:
    server, _ = live_server
    status, headers, body = fetch(server.url)
    html = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert html.count("<script") == 1 and f'<script nonce="{nonce}">' in html
    assert "https://" not in html and "http://" not in html  # no CDN, nothing external


def test_dashboard_shows_counts_throttle_chart_and_top_accounts(
        live_server: tuple[webserver.Server, Any]) -> None:
    server, _ = live_server
    html = fetch(server.url)[2].decode()
    assert 'id="current-minute">70<' in html
    assert 'id="last-60s">75<' in html
    assert "Current Level: 1 (60 - 119)" in html
    assert "This site has served <b>75</b>" in html
    assert html.count('<rect class="bar') == 61
    assert 'data-count="70"' in html and 'data-count="2"' in html
    top = html.split("Top accounts")[1]
    assert top.index("acme") < top.index("&lt;img") < top.index("shop")
    assert "pid 4321" in html


def test_dashboard_counts_the_keys_in_use_after_a_reclaim(
        installed: tuple[int, str], db: str, serve: Callable[..., webserver.Server]) -> None:
    """Three made-up hosts idle for longer than the ring, rolled, reclaimed:
    the footer counts the keys in use (keys_used - free_slots), not the
    slots ever handed out, and says how many were reclaimed."""
    key, backend = installed
    counter = segment.attach(key, backend)
    try:
        old = NOW - 200 * 60
        for n in range(3):
            counter.hit(f"made-up-{n}.example", "pageview", 1, old)
        used = segment.header(counter)["keys_used"]
        done = segment.reclaim(counter, NOW, int(NOW // 60) - 1)
        assert sorted(a for _s, a, _e in done) == [f"made-up-{n}.example" for n in range(3)]
    finally:
        counter.detach()
    server = serve(api.make_app(make_config(db, key=key, backend=backend), now=lambda: NOW))
    html = fetch(server.url)[2].decode()
    assert f'id="keys-in-use">{used - 3} / ' in html
    assert 'id="keys-reclaimed">3 reclaimed<' in html


def test_dashboard_alert_rules_with_their_states(installed: tuple[int, str], db: str,
                                                  serve: Callable[..., webserver.Server]) -> None:
    key, backend = installed
    rules = (AlertRule(name="burst", threshold=5), AlertRule(name="quiet <b>", account="shop"))
    episode = alerts.Episode(started=NOW - 300, start_minute=minute_at(2027, 1, 15, 8, 55),
                             last_hot_minute=MINUTE, peak=1234, peak_minute=MINUTE,
                             last_notice=NOW - 300)
    with AlertStore(db) as store:
        store.save(alerts.AlertState(episodes={"burst": episode}), now=NOW)
    config = make_config(db, key=key, backend=backend, alerts=rules)
    server = serve(api.make_app(config, now=lambda: NOW))
    html = fetch(server.url)[2].decode()
    table = html.split("Alert rules")[1]
    assert "burst" in table and "firing" in table and "since 08:55" in table
    assert "1,234" in table
    assert "quiet &lt;b&gt;" in table and table.count('class="pill ok"') == 1


def test_dashboard_event_switch_and_bad_event(live_server: tuple[webserver.Server, Any]) -> None:
    server, counter = live_server
    counter.hit("acme", "signup", 2, NOW)
    html = fetch(server.url + "?event=signup")[2].decode()
    assert 'aria-current="page">signup<' in html and 'id="current-minute">2<' in html
    status, _, body = fetch(server.url + "?event=~nope")
    assert status == 404 and json.loads(body)["status"] == 404


def test_dashboard_without_a_segment_reads_the_store(
        tmp_path: Path, serve: Callable[..., webserver.Server]) -> None:
    path = str(tmp_path / "stats.sqlite3")
    with SQLiteStore(path, ZONE) as store:
        store.roll([("all", "pageview", MINUTE - 3, 17), ("acme", "pageview", MINUTE - 3, 17)],
                   now=NOW, closed_through=MINUTE - 1)

    def missing() -> Any:
        raise SegmentNotFound("none")

    server = serve(api.make_app(make_config(path), counter_factory=missing, now=lambda: NOW))
    status, _, body = fetch(server.url)
    html = body.decode()
    assert status == 200 and "No segment is installed" in html
    assert 'data-count="17"' in html and "acme" in html.split("Top accounts")[1]


# -------------------------------------------------------------------- in Chromium


def chromium(url: str, profile: Path, *args: str, size: str = "1280,900",
             budget: int = 2000) -> str:
    """Run headless Chromium on ``url``; return its stdout."""
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", f"--window-size={size}",
        f"--virtual-time-budget={budget}", *args, url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def dashboard(key: int, tmp_path: Path) -> Iterator[tuple[webserver.Server, Any]]:
    """A server with an hour of traffic, one firing rule, and a counter that
    adds 1000 hits to "example.com" each time the dashboard is rendered (so
    a refresh shows a new number)."""
    segment.install(key, "sysv", now=NOW)
    counter = segment.attach(key, "sysv", stripe=0)
    for minutes_ago in range(60, -1, -1):  # oldest first, as time goes
        base = 120 + (minutes_ago * 37) % 90
        for rank, account in enumerate(ACCOUNTS, start=1):
            counter.hit(account, "pageview", base // rank, NOW - 60 * minutes_ago)
    counter.hit("example.com", "signup", 3, NOW)
    counter.store(segment.H_HEARTBEAT_MS, 8, int((NOW - 0.8) * 1000))
    counter.store(segment.H_SUPERVISOR_PID, 4, 31337)
    db = str(tmp_path / "stats.sqlite3")
    with SQLiteStore(db, ZONE) as store:
        store.roll([("all", "pageview", MINUTE - 300, 5000)], now=NOW - 30,
                   closed_through=MINUTE - 1)
    episode = alerts.Episode(started=NOW - 600, start_minute=MINUTE - 10,
                             last_hot_minute=MINUTE, peak=420, peak_minute=MINUTE - 3,
                             last_notice=NOW - 600)
    with AlertStore(db) as alert_store:
        alert_store.save(alerts.AlertState(episodes={"burst": episode}), now=NOW)
    rules = (AlertRule(name="burst", threshold=300),
             AlertRule(name="shop spike", account="shop-00042", threshold=500, window="60s"))
    app = api.make_app(Config(key=key, backend="sysv", database=db, timezone=ZONE,
                              alerts=rules), now=lambda: NOW)

    def counting(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/":
            counter.hit("example.com", "pageview", 1000, NOW)
        return app(environ, start_response)

    server = webserver.start(counting, "127.0.0.1:0")
    yield server, counter
    server.stop()
    counter.detach()


def current_minute(dom: str) -> int:
    match = re.search(r'id="current-minute">([\d,]+)<', dom)
    assert match, "the current-minute card is missing"
    return int(match.group(1).replace(",", ""))


@pytest.mark.chromium
@needs_chromium
def test_screenshots_for_laptop_and_phone(dashboard: tuple[webserver.Server, Any],
                                          tmp_path: Path) -> None:
    server, _ = dashboard
    ARTIFACTS.mkdir(exist_ok=True)
    for name, size in (("dashboard.png", "1280,900"), ("dashboard-phone.png", "390,1500")):
        shot = ARTIFACTS / name
        shot.unlink(missing_ok=True)
        chromium(server.url, tmp_path / "profile", f"--screenshot={shot}", size=size)
        assert shot.exists() and shot.stat().st_size > 20_000  # not a blank page
        assert png_size(shot) == tuple(int(n) for n in size.split(","))


@pytest.mark.chromium
@needs_chromium
def test_rendered_dom_has_the_chart_numbers_and_escaped_names(
        dashboard: tuple[webserver.Server, Any], tmp_path: Path) -> None:
    server, _ = dashboard
    dom = chromium(server.url, tmp_path / "profile", "--dump-dom")
    assert len(re.findall(r'<rect class="bar[^"]*"', dom)) == 61
    assert len(re.findall(r'<rect class="bar current"', dom)) == 1
    assert current_minute(dom) >= 1000
    assert re.search(r"Current Level: \d \((\d+ - \d+|\d+\+)\)", dom)
    assert "This site has served" in dom
    # The account is text in the DOM: no <img> element was made of it.
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom
    assert "<img" not in dom
    assert "firing" in dom and "shop spike" in dom and "pid 31337" in dom
    (ARTIFACTS / "dashboard-dom.html").parent.mkdir(exist_ok=True)
    (ARTIFACTS / "dashboard-dom.html").write_text(dom, encoding="utf-8")


@pytest.mark.chromium
@needs_chromium
def test_the_page_refreshes_itself(dashboard: tuple[webserver.Server, Any],
                                   tmp_path: Path) -> None:
    server, _ = dashboard
    # Virtual time runs past the first refresh (every REFRESH_S seconds):
    # the script fetched the page again, which added another 1000 hits.
    before = current_minute(chromium(server.url, tmp_path / "p1", "--dump-dom"))
    after = current_minute(chromium(server.url, tmp_path / "p2", "--dump-dom",
                                    budget=REFRESH_S * 1000 + 1500))
    assert after == before + 2000  # this load's render, then its refresh


def test_the_renderers_do_not_import_the_app() -> None:
    """api/dashboard.py and api/openapi.py are fed by api/app.py and never
    import it (they once did, lazily, in a circle): in a fresh interpreter,
    importing them leaves trafficthreshold.api.app unloaded."""
    import sys

    code = ("import sys, trafficthreshold.api.dashboard, trafficthreshold.api.openapi, "
            "trafficthreshold.live; print('trafficthreshold.api.app' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_dashboard_shows_todays_page_views_and_unique_visitors(
        live_server: tuple[webserver.Server, Any], db: str) -> None:
    """The "Today" card: the store's day and month rows plus what the ring
    holds beyond the watermarks, so a minute the supervisor already rolled
    in part is not counted twice.  (NOW is 2027-01-15 09:00:30 in Zurich.)"""
    server, counter = live_server
    counter.hit("acme", "unique", 3, NOW - 10)       # the current minute
    counter.hit("shop", "unique", 1, NOW - 45)       # the previous one
    instance = counter.load(segment.H_INSTANCE, 8)
    with SQLiteStore(db, ZONE) as store:
        store.roll([("all", "unique", minute_at(2027, 1, 10, 12, 0), 20),
                    ("all", "pageview", minute_at(2027, 1, 10, 12, 0), 50),
                    ("all", "unique", minute_at(2026, 12, 31, 23, 59), 400),
                    # the current minute, rolled while it had 2 of its 3
                    ("all", "unique", MINUTE, 2), ("acme", "unique", MINUTE, 2)],
                   now=NOW, instance=instance)
    html = fetch(server.url)[2].decode()
    # Page views: 70 + 5 + 4 + 2 in the ring's hour (the 9 of 61 minutes
    # ago are older than the snapshot and were never rolled: not seen).
    assert 'id="pageviews-today">81<' in html and 'id="pageviews-month">131<' in html
    # Uniques: 2 rolled + 1 pending of this minute, 1 of the previous one.
    assert 'id="uniques-today">4<' in html and 'id="uniques-month">24<' in html
    # The top list (page views, the ring's hour): each account's uniques.
    top = html.split("Top accounts")[1]
    assert re.search(r"acme</span><span class=\"count\">75 <small[^>]*>· 3 unique<", top)
    assert re.search(r"shop</span><span class=\"count\">2 <small[^>]*>· 1 unique<", top)
    assert re.search(r"&lt;img[^<]*</span><span class=\"count\">4 <small[^>]*>· 0 unique<",
                     top)
    # Another event chosen: the card still shows page views and uniques, the
    # top list that event alone.
    other = fetch(server.url + "?event=unique")[2].decode()
    assert 'id="uniques-today">4<' in other and "unique</small>" not in other


def test_the_top_list_shows_no_uniques_when_none_are_counted(
        live_server: tuple[webserver.Server, Any]) -> None:
    server, _ = live_server
    assert "unique</small>" not in fetch(server.url)[2].decode()


def test_the_top_list_uniques_from_the_store_without_a_segment(
        tmp_path: Path, serve: Callable[..., webserver.Server]) -> None:
    path = str(tmp_path / "stats.sqlite3")
    items = [("all", "pageview", MINUTE - 3, 17), ("acme", "pageview", MINUTE - 3, 17),
             ("all", "unique", MINUTE - 3, 5), ("acme", "unique", MINUTE - 3, 5)]
    items += [(f"u{i:03d}", "unique", MINUTE - 3, 9) for i in range(120)]
    with SQLiteStore(path, ZONE) as store:
        store.roll(items, now=NOW, closed_through=MINUTE - 1)

    def missing() -> Any:
        raise SegmentNotFound("none")

    server = serve(api.make_app(make_config(path), counter_factory=missing, now=lambda: NOW))
    top = fetch(server.url)[2].decode().split("Top accounts")[1]
    assert re.search(r"acme</span><span class=\"count\">17 <small[^>]*>· 5 unique<", top)


def test_with_the_farms_redis_down_the_dashboard_shows_the_live_counts_and_says_so(
        installed: tuple[int, str], tmp_path: Path, redis_server: Any,
        serve: Callable[..., webserver.Server]) -> None:
    """The stored counts are in the farm's Redis; when it does not answer,
    the page still shows this host's live counts (what matters in a burst)
    with a banner naming the outage, not a 503."""
    from trafficthreshold.config import StoreConfig
    key, backend = installed
    counter = segment.attach(key, backend, stripe=0)
    counter.hit("acme", "pageview", 70, NOW - 10)
    db = str(tmp_path / "local.sqlite3")
    SQLiteStore(db, ZONE).close()
    cfg = make_config(db, key=key, backend=backend, store=StoreConfig(
        backend="redis", url=f"redis://127.0.0.1:{redis_server.port}/0"))
    server = serve(api.make_app(cfg, now=lambda: NOW))
    status, _, body = fetch(server.url)
    assert status == 200 and "did not answer" not in body.decode()
    redis_server.kill()
    status, _, body = fetch(server.url)
    html = body.decode()
    assert status == 200 and "The store did not answer" in html
    assert 'id="current-minute">70<' in html
    counter.detach()
