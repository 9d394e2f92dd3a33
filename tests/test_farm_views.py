"""Where the farm shows: ``/api/stats/live?scope=farm``, the dashboard's
farm panel (served HTML and a real Chromium), ``trafficthreshold status``
(text and ``--json``) and ``/metrics``'s ``host`` label.

One real redis-server.  web1 is this host: a real segment and an
in-process supervisor that publishes through its farm thread; web2 and a
host whose name is an HTML tag publish with ``farm.publish_live`` (what
their supervisors do); a fourth host published once with a short expiry
and is gone.  The clock is the real one (the live hashes expire in real
time), read once.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from click.testing import CliRunner

from apps.harness import XSS, fetch, fetch_json
from test_api_dashboard import ARTIFACTS, CHROMIUM, chromium, needs_chromium
from trafficthreshold import api, config as configuration, farm, segment
from trafficthreshold.api import server as webserver
from trafficthreshold.cli import main
from trafficthreshold.supervisor import Supervisor

pytestmark = pytest.mark.redis


def write_config(tmp_path: Path, key: int, port: int | None, scope: str = "farm") -> str:
    store = (f'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:{port}/0"\nhost = "web1"\n'
             if port else "")
    path = tmp_path / "web1.toml"
    path.write_text(f"""
key = {key}
database = "{tmp_path / 'web1.sqlite3'}"
timezone = "UTC"
[throttle]
scope = "{scope if port else 'host'}"
multiplier = 20
[http]
enabled = false
{store}""")
    return str(path)


@pytest.fixture
def farm_up(key: int, tmp_path: Path, redis_server: Any) -> Iterator[dict[str, Any]]:
    """web1's segment and supervisor (published), web2 and XSS alive, "old"
    gone, web2 leading the alerts."""
    now = time.time()
    segment.install(key, "sysv", now=now)
    counter = segment.attach(key, "sysv")
    counter.hit("acme", "pageview", 30, now)
    counter.hit("acme", "signup", 2, now)
    path = write_config(tmp_path, key, redis_server.port)
    cfg = configuration.load(path, env={})
    sup = Supervisor(cfg, config_path=path, env={}, pid=4242)
    client = redis_server.client()
    farm.publish_live(client, "old", {("all", "pageview"): (9, 9)}, level=5, now=now - 60,
                      ttl_ms=1)
    sup.initialize(now)
    try:
        sup.tick(now)
        assert sup.farm.drain(10)
        farm.publish_live(client, "web2", {("all", "pageview"): (12, 20),
                                           ("shop", "pageview"): (12, 20)},
                          level=2, now=now, last_roll=now - 30)
        farm.publish_live(client, XSS, {("all", "pageview"): (1, 3), (XSS, "pageview"): (1, 3)},
                          level=2, now=now)
        client.set("track~leader", "web2 7")
        yield {"now": now, "cfg": cfg, "path": path, "counter": counter, "client": client}
    finally:
        sup.shutdown(now + 1)
        counter.detach()


def test_live_scope_farm_json(farm_up: dict[str, Any], serve: Callable[..., webserver.Server]):
    """The total of the live hosts, a row per host by name (the dead one
    with when it was last seen), the leader; account/event filter both."""
    now = farm_up["now"]
    server = serve(api.make_app(farm_up["cfg"], now=lambda: now + 0.5))
    status, body = fetch_json(server.url + "api/stats/live?scope=farm")
    assert status == 200
    assert (body["type"], body["scope"], body["host"], body["leader"]) == (
        "live", "farm", "web1", "web2")
    assert body["hosts_alive"] == 3
    totals = {(k["account"], k["event"]): (k["current_minute"], k["last_60s"])
              for k in body["keys"]}
    assert totals[("all", "pageview")] == (30 + 12 + 1, 30 + 20 + 3)  # not "old"'s 9
    assert totals[("acme", "signup")] == (2, 2)
    assert body["keys"][0]["account"] == "all"  # the total first, as /live orders keys
    rows = {h["host"]: h for h in body["hosts"]}
    assert [h["host"] for h in body["hosts"]] == sorted(rows)
    assert set(rows) == {"web1", "web2", XSS, "old"}
    assert rows["old"]["alive"] is False and rows["old"]["level"] is None
    assert rows["old"]["keys"] == [] and rows["old"]["published_at"] == pytest.approx(now - 60)
    assert rows["web2"]["level"] == 2 and rows["web2"]["last_roll_at"] == pytest.approx(now - 30)
    assert rows["web1"]["alive"] and rows["web1"]["level"] == 1  # 30 hits, multiplier 20
    assert 0 <= rows["web1"]["age_seconds"] <= 1
    assert set(rows["web1"]) == {"host", "alive", "level", "published_at", "age_seconds",
                                 "last_roll_at", "keys"}
    status, body = fetch_json(server.url + "api/stats/live?scope=farm&account=shop")
    assert [(k["account"], k["last_60s"]) for k in body["keys"]] == [("shop", 20)]
    assert [k["account"] for k in {h["host"]: h for h in body["hosts"]}["web2"]["keys"]] == [
        "shop"]
    # The farm thread's light reading: the level's key only, the same rows.
    light = farm.farm_live(farm_up["client"], now=now, only=[("all", "pageview")])
    assert light.total == {("all", "pageview"): (43, 53)}
    assert {r.host: (r.alive, r.level) for r in light.hosts} == {
        "web1": (True, 1), "web2": (True, 2), XSS: (True, 2), "old": (False, 0)}
    # The host scope is the segment's, as before.
    status, body = fetch_json(server.url + "api/stats/live?scope=host")
    assert status == 200 and "segment" in body and "scope" not in body


def test_live_scope_farm_errors(farm_up: dict[str, Any], key: int, tmp_path: Path,
                                serve: Callable[..., webserver.Server], redis_server: Any):
    """An unknown scope and scope=farm without the Redis store are 400s that
    name the fix; a Redis that does not answer is a 503."""
    sqlite_cfg = configuration.load(write_config(tmp_path / "..", key, None), env={})
    server = serve(api.make_app(sqlite_cfg))
    status, body = fetch_json(server.url + "api/stats/live?scope=farm")
    assert status == 400
    assert "backend = \"redis\"" in body["message"] and "'sqlite'" in body["message"]
    assert "without scope=farm" in body["message"]
    doc = fetch_json(server.url + "api/openapi.json")[1]  # its document says so
    scope = next(p for p in doc["paths"]["/api/stats/live"]["get"]["parameters"]
                 if p["name"] == "scope")
    assert scope["schema"]["enum"] == ["host"]
    status, body = fetch_json(server.url + "api/stats/live?scope=site")
    assert status == 400 and "scope=host" in body["message"] and "scope=farm" in body["message"]
    farm_server = serve(api.make_app(farm_up["cfg"]))
    redis_server.kill()
    status, body = fetch_json(farm_server.url + "api/stats/live?scope=farm")
    assert status == 503 and "Redis" in body["message"]


def test_openapi_describes_the_scope_parameter(farm_up, serve):
    server = serve(api.make_app(farm_up["cfg"]))
    doc = fetch_json(server.url + "api/openapi.json")[1]
    live = doc["paths"]["/api/stats/live"]["get"]
    scope = next(p for p in live["parameters"] if p["name"] == "scope")
    assert scope["schema"]["enum"] == ["host", "farm"]
    assert "400" in live["responses"]
    required = set(doc["components"]["schemas"]["FarmLive"]["required"])
    body = fetch_json(server.url + "api/stats/live?scope=farm")[1]
    assert required == set(body)


def test_metrics_label_every_host_series_with_the_host(farm_up, serve):
    """With the Redis store every series of this host carries host="web1"
    (so the hosts' series never collide and Prometheus can sum them);
    hits_total, the farm's rolled total, does not."""
    server = serve(api.make_app(farm_up["cfg"], now=lambda: farm_up["now"]))
    text = fetch(server.url + "metrics")[2].decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert 'trafficthreshold_hits_last_60s{account="acme",event="pageview",host="web1"} 30' \
        in samples
    assert 'trafficthreshold_throttle_level{host="web1"} 1' in samples
    for line in samples:
        if line.startswith("trafficthreshold_hits_total"):
            assert 'host="' not in line
        else:
            assert 'host="web1"' in line, line


def test_status_shows_the_farm(farm_up: dict[str, Any]):
    result = CliRunner().invoke(main, ["--config", farm_up["path"], "status", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)["farm"]
    assert info["error"] is None and info["leader"] == "web2"
    assert info["throttle_scope"] == "farm" and info["hosts_alive"] == 3
    assert {h["host"]: h["alive"] for h in info["hosts"]} == {
        "web1": True, "web2": True, XSS: True, "old": False}
    text = CliRunner().invoke(main, ["--config", farm_up["path"], "status"]).output
    assert "farm        3 of 4 hosts alive, alerts led by web2, throttle scope farm" in text
    assert re.search(r"  web1 \(this host\): alive, level 1, 30 page views in 60 s, ", text)
    assert re.search(r"  old: NOT ALIVE \(published \d+\.\d s ago\), no roll yet", text)
    total = text.split("FARM TOTAL")[1]
    assert re.search(r"\nall +pageview +43 +53\n", total)


def test_status_when_the_farms_redis_does_not_answer(farm_up, redis_server):
    redis_server.kill()
    result = CliRunner().invoke(main, ["--config", farm_up["path"], "status"],
                                catch_exceptions=False)
    assert result.exit_code == 0
    assert "farm        DID NOT ANSWER (ConnectionError" in result.output
    assert "FARM TOTAL" not in result.output


def test_dashboard_farm_panel(farm_up, serve):
    server = serve(api.make_app(farm_up["cfg"], now=lambda: farm_up["now"]))
    html = fetch(server.url)[2].decode()
    panel = html.split('id="farm"')[1].split("</section>")[0]
    assert 'id="farm-current-minute">43<' in panel and 'id="farm-last-60s">53<' in panel
    assert 'id="farm-leader">web2<' in panel and 'id="farm-alive">3<' in panel
    assert panel.count("<tr data-host=") == 4
    assert "&lt;img src=x onerror=alert(1)&gt;" in panel and "<img" not in panel
    old = panel.split('data-host="old"')[1].split("</tr>")[0]
    assert "gone" in old and "last seen 60 s ago" in old
    # [throttle] scope = "farm": the throttle card says its count is this host's share
    card = html.split('id="throttle"')[1].split("</article>")[0]
    assert 'id="throttle-scope">The level follows the farm' in card
    assert "This site has served" not in card


def test_dashboard_farm_panel_reads_only_what_it_shows(farm_up, serve, monkeypatch):
    """The panel shows, per host and for the farm, the total of the chosen
    event (``all``): its refresh builds those rows only, not a row per key
    of every host (100 hosts x 10,000 keys: a million rows a refresh, the
    daemon's CPU for seconds).  The API without ``account``/``event`` still
    lists every key."""
    readings, kept = [], []
    read = farm.LiveReader.read

    def spy(self, now, only=None):
        got = read(self, now, only)
        readings.append(got)
        kept.append(self.keys)
        return got

    monkeypatch.setattr(farm.LiveReader, "read", spy)
    farm.publish_live(farm_up["client"], "web3", {
        ("all", "pageview"): (500, 500), **{(f"shop{i}", "pageview"): (1, 1) for i in range(499)}},
        level=0, now=farm_up["now"])
    server = serve(api.make_app(farm_up["cfg"], now=lambda: farm_up["now"]))
    html = fetch(server.url)[2].decode()
    panel = html.split('id="farm"')[1].split("</section>")[0]
    assert 'id="farm-current-minute">543<' in panel
    assert [set(r.total) for r in readings] == [{("all", "pageview")}]
    assert {k for row in readings[0].hosts for k in row.counts} == {("all", "pageview")}
    # and its reader keeps that key alone, host by host (not hosts x keys)
    assert kept == [frozenset(["all\0pageview"])]
    status, every = fetch_json(server.url + "api/stats/live?scope=farm")
    assert status == 200 and len(every["keys"]) > 500


def test_dashboard_without_redis_has_no_farm_panel(live_server):
    server, _ = live_server
    assert 'id="farm"' not in fetch(server.url)[2].decode()


@pytest.mark.chromium
@needs_chromium
def test_dashboard_farm_panel_in_chromium(farm_up, serve, tmp_path):
    """Rendered by a real browser (after its scripts ran): the farm's rows
    are there, the host named like a tag stays text."""
    assert CHROMIUM.exists()
    server = serve(api.make_app(farm_up["cfg"], now=lambda: farm_up["now"]))
    dom = chromium(server.url, tmp_path / "profile", "--dump-dom")
    assert 'id="farm-current-minute">43<' in dom
    ARTIFACTS.mkdir(exist_ok=True)  # for a person to look at
    shot = ARTIFACTS / "dashboard-farm.png"
    shot.unlink(missing_ok=True)
    chromium(server.url, tmp_path / "profile2", f"--screenshot={shot}", size="1280,1400")
    assert shot.exists() and shot.stat().st_size > 20_000
    assert len(re.findall(r"<tr data-host=", dom)) == 4
    assert "<img" not in dom and "alerts leader" in dom
