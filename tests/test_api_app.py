"""Tests of trafficthreshold.api: the WSGI app through a real waitress server.

Real SQLite store files filled with SQLiteStore.roll, real segments (the conftest
``installed`` fixture, both backends), requests with urllib on loopback.
The nasty cases on purpose: impossible dates, garbage paths, percent-encoded
slashes, bodies, long URLs, wrong tokens, an account named like an HTML tag,
a segment uninstalled and installed again under the running app, an app
that raises. What it shares with test_api_dashboard and test_api_openapi is in
apps/harness.py (helpers) and conftest.py (fixtures).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import sqlite3
import textwrap
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apps.harness import MINUTE, NOW, minute_at, XSS, ZONE, fetch, fetch_json, make_config, start_live
from test_segment import RawReader, raw_view
from trafficthreshold import segment
from trafficthreshold.api import app as api
from trafficthreshold.api import openapi
from trafficthreshold.api import server as webserver
from trafficthreshold.config import HttpConfig
from trafficthreshold.store import SQLiteStore

TOKEN = "s3cret-token-0123456789abcdef"
#: The base of the links: make_config's http.listen (the default), not the
#: address the test server really listens on.
LINKS = "http://127.0.0.1:8787/"


def raw_get(server: webserver.Server, target: str, extra: str = "") -> tuple[int, bytes]:
    """Send a request line exactly as given (no client-side quoting)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        for line in filter(None, extra.split("\n")):
            name, _, value = line.partition(": ")
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------- track


def test_year_month_day_hour_have_bootics_shape(no_segment: webserver.Server) -> None:
    url = no_segment.url + "api/stats/track/acme/pageview/2026"
    base = LINKS + "api/stats/track/acme/pageview/2026"
    status, year = fetch_json(url)
    assert status == 200
    assert year == {
        "type": "track", "account": "acme", "event": "pageview",
        "year": 2026, "month": None, "day": None, "hour": None,
        "data": {str(m): (10 if m == 2 else 0) for m in range(1, 13)},
        "total": 10,
        "links": [base + "/2"],
    }
    assert list(year["data"]) == [str(m) for m in range(1, 13)]  # numeric order

    status, month = fetch_json(url + "/2")
    assert (status, month["month"], month["day"], month["total"]) == (200, 2, None, 10)
    assert list(month["data"]) == [str(d) for d in range(1, 29)]  # 2026 is not a leap year
    assert month["data"]["3"] == 10 and month["links"] == [base + "/2/3"]

    status, day = fetch_json(url + "/2/3")
    assert list(day["data"]) == [str(h) for h in range(24)]
    assert (day["data"]["9"], day["data"]["14"], day["total"]) == (7, 3, 10)
    assert day["links"] == [base + "/2/3/9", base + "/2/3/14"]

    status, hour = fetch_json(url + "/2/3/14")
    assert list(hour["data"]) == [str(m) for m in range(60)]
    assert (hour["hour"], hour["data"]["59"], hour["total"], hour["links"]) == (14, 3, 3, [])


def test_numbers_are_json_numbers_and_leading_zeros_mean_the_same(
        no_segment: webserver.Server) -> None:
    _, padded = fetch_json(no_segment.url + "api/stats/track/acme/pageview/2026/02/03/09")
    _, plain = fetch_json(no_segment.url + "api/stats/track/acme/pageview/2026/2/3/9")
    assert padded == plain
    assert padded["month"] == 2 and isinstance(padded["total"], int)
    assert padded["data"]["5"] == 7


def get_with_host(server: webserver.Server, path: str, host: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, "X-Forwarded-Host": host,
                                           "Forwarded": f"host={host}"})
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        conn.close()


def test_links_never_come_from_the_host_header(no_segment: webserver.Server) -> None:
    body = get_with_host(no_segment, "/api/stats/track/acme/pageview/2026", "evil.example")
    assert body["links"] == [LINKS + "api/stats/track/acme/pageview/2026/2"]


@pytest.mark.parametrize("public_url", ["https://stats.example.com/tt/",
                                        "https://stats.example.com/tt"])
def test_links_are_built_on_public_url(db: str, serve: Callable[..., webserver.Server],
                                       public_url: str) -> None:
    config = make_config(db, http=HttpConfig(public_url=public_url))
    server = serve(api.make_app(config, counter_factory=lambda: None, now=lambda: NOW))
    body = get_with_host(server, "/api/stats/track/acme/pageview/2026/2", "evil.example")
    assert body["links"] == ["https://stats.example.com/tt/api/stats/track/acme/pageview/2026/2/3"]


def test_links_on_an_ipv6_listen_address(db: str, serve: Callable[..., webserver.Server]) -> None:
    config = make_config(db, http=HttpConfig(listen="[::1]:8787"))
    server = serve(api.make_app(config, counter_factory=lambda: None, now=lambda: NOW))
    body = get_with_host(server, "/api/stats/track/acme/pageview/2026", "evil.example")
    assert body["links"] == ["http://[::1]:8787/api/stats/track/acme/pageview/2026/2"]


def test_public_url_is_read_from_the_config_file(tmp_path: Path, db: str) -> None:
    from trafficthreshold import config as config_module
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'database = "{db}"\n[http]\npublic_url = "https://s.example/"\n',
                           encoding="utf-8")
    loaded = config_module.load(env={"TRAFFICTHRESHOLD_CONFIG": str(config_file)})
    assert loaded.http.public_url == "https://s.example/"
    config_file.write_text('[http]\npublic_url = "stats.example"\n', encoding="utf-8")
    with pytest.raises(config_module.ConfigError, match="public_url"):
        config_module.load(env={"TRAFFICTHRESHOLD_CONFIG": str(config_file)})


def test_all_is_the_total_and_unknown_keys_are_zero(no_segment: webserver.Server) -> None:
    _, total = fetch_json(no_segment.url + "api/stats/track/all/pageview/2026")
    assert total["data"]["2"] == 10 and total["data"]["5"] == 11 and total["total"] == 21
    _, nobody = fetch_json(no_segment.url + "api/stats/track/nobody/pageview/2026")
    assert nobody["total"] == 0 and set(nobody["data"].values()) == {0}
    assert nobody["links"] == []


def test_names_are_percent_decoded_and_links_percent_encoded(
        no_segment: webserver.Server) -> None:
    quoted = urllib.request.quote(XSS, safe="")
    status, body = fetch_json(no_segment.url + f"api/stats/track/{quoted}/pageview/2026/5")
    assert status == 200 and body["account"] == XSS and body["total"] == 4
    assert body["links"] == [LINKS + f"api/stats/track/{quoted}/pageview/2026/5/1"]


def test_data_is_never_cached(no_segment: webserver.Server) -> None:
    status, headers, _ = fetch(no_segment.url + "api/stats/track/acme/pageview/2026")
    assert status == 200
    assert headers["Cache-Control"] == "no-cache, no-store, must-revalidate"
    assert headers["Pragma"] == "no-cache"
    assert headers["Expires"] == "0"
    assert headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("period", ["2026/2/30", "2026/13", "2026/0", "0", "10000",
                                    "2026/1/1/24", "2026/4/31", "2026/1/0"])
def test_impossible_dates_are_400_with_a_message(no_segment: webserver.Server,
                                                  period: str) -> None:
    status, body = fetch_json(no_segment.url + "api/stats/track/acme/pageview/" + period)
    assert status == 400
    assert body["status"] == 400 and body["error"] == "Bad Request"
    assert "impossible" in body["message"] or "must be in" in body["message"]


@pytest.mark.parametrize("path", [
    "nope", "api", "api/statsx", "api/stats/tracks", "api/stats/track/acme/pageview/2026x",
    "api/stats/track/acme/pageview/twenty", "api/stats/track/acme/pageview/2026/2/3/9/5",
    "api/stats/track/acme/pageview/2026/-1", "api/stats/track/~overflowx/pageview/2026",
    "api/stats/track/../pageview/2026", "api/stats/track/./pageview/2026",
    "api/stats/track/" + "a" * 65 + "/pageview/2026", "api/stats/track/acme/%00/2026",
    "api/stats/track/acme/page%0Aview/2026", "api/stats/track/acme/%FF/2026",
    "api/stats/track/acme/pageview/2026/%D9%A3", "favicon.ico", "metrics/x",
])
def test_unknown_routes_and_garbage_are_404(no_segment: webserver.Server, path: str) -> None:
    status, body = raw_get(no_segment, "/" + path)
    assert status == 404
    assert json.loads(body)["status"] == 404


def test_reserved_overflow_key_can_be_read(no_segment: webserver.Server) -> None:
    status, body = fetch_json(no_segment.url + "api/stats/track/~overflow/~any/2026")
    assert status == 200 and body["total"] == 0


@pytest.mark.parametrize("target", ["/api/stats/track/a%2Fb/pageview/2026",
                                    "/api/stats/track/a%2fb/pageview/2026",
                                    "/api/stats/track/acme%5C..%5C/pageview/2026"])
def test_percent_encoded_slashes_are_refused(no_segment: webserver.Server, target: str) -> None:
    status, body = raw_get(no_segment, target)
    assert status == 404
    assert "slash" in json.loads(body)["message"]


@pytest.mark.parametrize("raw_key", ["REQUEST_URI", "RAW_URI"])
def test_percent_encoded_slashes_are_refused_from_the_raw_uri_of_other_servers(
        db: str, raw_key: str) -> None:
    """waitress, uWSGI and mod_wsgi pass the raw target as REQUEST_URI,
    gunicorn as RAW_URI; PATH_INFO has the slash decoded already."""
    import io
    app = api.make_app(make_config(db), now=lambda: NOW)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/stats/track/acme/pageview/2026",
               "QUERY_STRING": "", "wsgi.input": io.BytesIO(), "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "8787", raw_key: "/api/stats/track/acme%2Fpageview/2026"}
    answer: list[str] = []
    body = b"".join(app(environ, lambda status, headers: answer.append(status)))
    assert answer == ["404 Not Found"] and b"slash" in body


def test_trailing_slash_is_accepted(no_segment: webserver.Server) -> None:
    status, body = fetch_json(no_segment.url + "api/stats/track/acme/pageview/2026/")
    assert status == 200 and body["total"] == 10


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405(no_segment: webserver.Server, method: str) -> None:
    status, headers, body = fetch(no_segment.url + "api/stats/track/acme/pageview/2026",
                                  method=method)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert "read-only" in json.loads(body)["message"]


def test_head_has_the_headers_of_get_and_no_body(no_segment: webserver.Server) -> None:
    url = no_segment.url + "api/stats/track/acme/pageview/2026"
    _, get_headers, get_body = fetch(url)
    status, head_headers, head_body = fetch(url, method="HEAD")
    assert status == 200 and head_body == b""
    assert head_headers["Content-Length"] == str(len(get_body))
    assert head_headers["Content-Type"] == get_headers["Content-Type"]


def test_bodies_and_long_urls_are_refused(no_segment: webserver.Server) -> None:
    url = no_segment.url + "api/stats/track/acme/pageview/2026"
    status, _, body = fetch(url, data=b"x=1", method="GET")
    assert status == 413 and "no request body" in json.loads(body)["message"]
    # Larger bodies never reach the app: waitress refuses them, in our JSON.
    status, headers, body = fetch(url, data=b"x" * 4096, method="GET")
    assert (status, headers["Content-Type"]) == (413, "application/json")
    assert "no request body" in json.loads(body)["message"]
    status, _, body = fetch(url + "?" + "q" * 2100)
    assert status == 414 and json.loads(body)["status"] == 414
    status, _ = raw_get(no_segment, "/api/stats/track/acme/pageview/2026?" + "q" * 1900)
    assert status == 200


def test_a_store_that_does_not_exist_is_503_and_not_created(
        tmp_path: Path, serve: Callable[..., webserver.Server]) -> None:
    missing = tmp_path / "nowhere" / "stats.sqlite3"
    server = serve(api.make_app(make_config(str(missing)), now=lambda: NOW))
    status, body = fetch_json(server.url + "api/stats/track/all/pageview/2026")
    assert status == 503 and "does not exist" in body["message"]
    assert not missing.parent.exists()


def test_a_get_on_an_empty_database_file_writes_nothing(
        tmp_path: Path, serve: Callable[..., webserver.Server]) -> None:
    """Reading never writes: an empty file (the daemon has not started
    yet) answers the 503 of a missing one and keeps its zero bytes, no
    schema written."""
    empty = tmp_path / "stats.sqlite3"
    empty.write_bytes(b"")
    server = serve(api.make_app(make_config(str(empty)), now=lambda: NOW))
    status, body = fetch_json(server.url + "api/stats/track/all/pageview/2026")
    assert status == 503 and "no period tables yet" in body["message"], body
    assert "trafficthreshold run" in body["message"]
    assert empty.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.sqlite3"]


def test_a_thread_that_first_saw_an_empty_file_reads_the_tables_made_later(
        tmp_path: Path) -> None:
    """Issue #22 item 3: the API kept the first store of each thread, and
    for a file without tables that was an empty in-memory schema: 200 with
    zeros, then 404 for accounts that exist, until a restart.  One server
    thread, so the second request runs where the first did."""
    path = tmp_path / "stats.sqlite3"
    path.write_bytes(b"")
    server = webserver.start(api.make_app(make_config(str(path)), now=lambda: NOW),
                             "127.0.0.1:0", threads=1)
    try:
        for route in ("api/stats/track/acme/pageview/2027", "api/stats/track/acme",
                      "api/stats/funnels", "", "metrics"):
            status, _headers, _body = fetch(server.url + route)
            assert status == 503, route
        # The daemon starts: it makes the tables and rolls a minute.
        with SQLiteStore(str(path), ZONE) as store:
            store.roll([("acme", "pageview", MINUTE, 5), ("all", "pageview", MINUTE, 5)],
                       now=NOW, closed_through=MINUTE)
        status, body = fetch_json(server.url + "api/stats/track/acme/pageview/2027")
        assert status == 200 and body["total"] == 5, body
        status, body = fetch_json(server.url + "api/stats/track/acme")
        assert status == 200 and body["links"], body
        status, _headers, _body = fetch(server.url)
        assert status == 200
        status, _headers, body = fetch(server.url + "metrics")
        assert status == 200 and b'account="acme"' in body, body[:300]
    finally:
        server.stop()


def test_a_file_that_is_not_a_database_is_503(tmp_path: Path,
                                              serve: Callable[..., webserver.Server]) -> None:
    garbage = tmp_path / "stats.sqlite3"
    garbage.write_bytes(b"this is not a database, " * 100)
    server = serve(api.make_app(make_config(str(garbage)), now=lambda: NOW))
    status, body = fetch_json(server.url + "api/stats/track/all/pageview/2026")
    assert status == 503 and "cannot open the database" in body["message"]


def damage_pages(path: str) -> None:
    """Write garbage over every page but the first (the schema stays
    readable, the tables do not): what a bad disk sector does."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    size = os.path.getsize(path)
    assert size >= 3 * page_size  # there are pages to damage
    with open(path, "r+b") as f:
        f.seek(page_size)
        f.write(b"\xde\xad\xbe\xef" * ((size - page_size) // 4))


def test_a_damaged_database_is_503_with_the_recovery_on_every_route(
        installed: tuple[int, str], db: str, serve: Callable[..., webserver.Server]) -> None:
    damage_pages(db)
    server, counter = start_live(*installed, db, serve)
    for path in ("api/stats/track/acme/pageview/2026", "api/stats/track/all/pageview/2026/2/3",
                 "metrics"):
        status, body = fetch_json(server.url + path)
        assert status == 503, (path, body)
        assert "malformed" in body["message"] and ".recover" in body["message"]
        assert db in body["message"]
    status, headers, page = fetch(server.url + "?event=pageview")
    assert status == 503 and headers["Content-Type"] == api.HTML_TYPE
    assert b"malformed" in page and b".recover" in page and b"<script" not in page
    status, _ = fetch_json(server.url + "api/stats/live")  # needs the segment only
    assert status == 200
    counter.detach()


def test_the_dashboard_without_a_database_is_a_503_page(
        tmp_path: Path, serve: Callable[..., webserver.Server]) -> None:
    missing = tmp_path / "stats.sqlite3"
    server = serve(api.make_app(make_config(str(missing)), counter_factory=lambda: None,
                                now=lambda: NOW))
    status, headers, page = fetch(server.url)
    assert status == 503 and headers["Content-Type"] == api.HTML_TYPE
    assert b"does not exist yet" in page and b"trafficthreshold run" in page


# ----------------------------------------------------------------- discovery


def local(server: webserver.Server, link: str) -> str:
    """A link of the answers (built on make_config's listen address) made
    to point at the test server."""
    assert link.startswith(LINKS), link
    return server.url + link[len(LINKS):]


def test_discovery_routes_list_what_exists_as_links(no_segment: webserver.Server) -> None:
    quoted = urllib.request.quote(XSS, safe="")
    track = LINKS + "api/stats/track"
    status, root = fetch_json(no_segment.url + "api/stats/")
    assert status == 200
    assert root == {"type": None, "account": None, "event": None,
                    "links": [track, LINKS + "api/stats/funnels"]}
    _, accounts = fetch_json(no_segment.url + "api/stats/track")
    assert accounts == {"type": "track", "account": None, "event": None, "links": [
        f"{track}/{quoted}", f"{track}/acme", f"{track}/all", f"{track}/shop"]}
    _, events = fetch_json(no_segment.url + "api/stats/track/shop")
    assert events == {"type": "track", "account": "shop", "event": None,
                      "links": [f"{track}/shop/pageview", f"{track}/shop/signup"]}
    _, years = fetch_json(no_segment.url + "api/stats/track/acme/pageview/")
    assert years == {"type": "track", "account": "acme", "event": "pageview",
                     "links": [f"{track}/acme/pageview/2026"]}
    _, xss = fetch_json(local(no_segment, accounts["links"][0]))
    assert xss["account"] == XSS and xss["links"] == [f"{track}/{quoted}/pageview"]


def test_following_the_links_from_the_root_reaches_every_count(
        no_segment: webserver.Server) -> None:
    """Every link answers 200, and the leaves (hours) add up to the store's
    totals: the discovery routes and the periods are one tree."""
    totals: dict[str, int] = {}
    todo = [no_segment.url + "api/stats/track"]
    while todo:
        status, body = fetch_json(todo.pop())
        assert status == 200, body
        if body.get("hour") is not None:
            totals[body["account"] + "/" + body["event"]] = (
                totals.get(body["account"] + "/" + body["event"], 0) + body["total"])
        todo += [local(no_segment, link) for link in body["links"]]
    assert totals == {"all/pageview": 21, "acme/pageview": 10, "shop/pageview": 11,
                      "all/signup": 1, "shop/signup": 1, XSS + "/pageview": 4}


def test_names_no_url_can_carry_are_not_listed(tmp_path: Path,
                                              serve: Callable[..., webserver.Server]) -> None:
    """Issue #22 item 7: a store written before hit() refused '.', '..'
    and names with '\\' listed them as links that answered 404.  They are
    left out; every link listed answers 200."""
    path = str(tmp_path / "stats.sqlite3")
    minute = minute_at(2026, 5, 1, 0, 0)
    with SQLiteStore(path, ZONE) as store:
        store.roll([(account, event, minute, 1) for account, event in [
            (".", "pageview"), ("..", "pageview"), ("a\\b", "pageview"), ("shop", "."),
            ("shop", "x\\y"), ("shop", "pageview"), ("all", "pageview")]],
            now=NOW, closed_through=minute)
    server = serve(api.make_app(make_config(path), counter_factory=lambda: None,
                                now=lambda: NOW))
    track = LINKS + "api/stats/track"
    _, accounts = fetch_json(server.url + "api/stats/track")
    assert accounts["links"] == [f"{track}/all", f"{track}/shop"]
    _, events = fetch_json(server.url + "api/stats/track/shop")
    assert events["links"] == [f"{track}/shop/pageview"]
    for link in accounts["links"] + events["links"]:
        assert fetch_json(local(server, link))[0] == 200, link


def test_discovery_links_never_come_from_the_host_header(no_segment: webserver.Server) -> None:
    body = get_with_host(no_segment, "/api/stats/track/acme", "evil.example")
    assert body["links"] == [LINKS + "api/stats/track/acme/pageview"]
    body = get_with_host(no_segment, "/api/stats", "evil.example")
    assert all(link.startswith(LINKS) for link in body["links"])


@pytest.mark.parametrize(("path", "status", "words"), [
    ("api/stats/track/nobody", 404, "no counts stored for account 'nobody'"),
    ("api/stats/track/acme/signup", 404, "no counts stored for event 'signup' of account"),
    ("api/stats/track/~bad", 404, "reserved"),
    ("api/stats/track/acme/~bad", 404, "reserved"),
    ("api/stats/track/..", 404, "cannot carry"),
    ("api/stats/track/acme/..", 404, "cannot carry"),
    ("api/stats/track/a\\\\b/pageview/2026", 404, "browsers read"),
    ("api/stats/funnels/nobody", 404, "no funnel counts stored for account 'nobody'"),
    ("api/stats/funnels/acme/order", 404, "no funnel counts stored for event 'order' of"),
    ("api/stats/funnels/acme/~bad", 404, "reserved"),
    ("api/stats/funnels/acme/order/2026/2/3", 404, "no such page"),
    ("api/stats/funnels/acme/order/twenty", 404, "no such page"),
    ("api/stats/funnels/acme/order/2026/13", 400, "impossible month 13"),
])
def test_discovery_of_what_does_not_exist_is_404_with_a_message(
        no_segment: webserver.Server, path: str, status: int, words: str) -> None:
    got, body = raw_get(no_segment, "/" + path)
    assert got == status
    assert words in json.loads(body)["message"]


def test_discovery_on_a_database_that_is_not_there_yet_is_503(
        tmp_path: Path, serve: Callable[..., webserver.Server]) -> None:
    server = serve(api.make_app(make_config(str(tmp_path / "none.sqlite3")),
                                counter_factory=lambda: None, now=lambda: NOW))
    status, body = fetch_json(server.url + "api/stats/track")
    assert status == 503 and "does not exist yet" in body["message"]
    status, body = fetch_json(server.url + "api/stats")  # the root reads nothing
    assert status == 200 and len(body["links"]) == 2


# ------------------------------------------------------------ Bootic's README

#: The five example URLs of Bootic's Readme.mkd (bootic_stats_aggregates),
#: with what each one is (the README calls the last "16hrs"; Bootic's
#: router had no hour level, so it is February 16, and it is here too).
BOOTIC_README_URLS = [
    ("/api/stats/track/all/pageview/2013", "all", 2013, None, None),
    ("/api/stats/track/acme/pageview/2013", "acme", 2013, None, None),
    ("/api/stats/track/acme/pageview/2013/02", "acme", 2013, 2, None),
    ("/api/stats/track/acme/pageview/2013/02/02", "acme", 2013, 2, 2),
    ("/api/stats/track/acme/pageview/2013/02/16", "acme", 2013, 2, 16),
]


@pytest.fixture
def bootic_db(tmp_path: Path) -> str:
    """2013 as in Bootic's README: acme's page views in February (the 2nd
    at 16:05 and 16:40, the 16th at 09:00) and September, plus "all"."""
    from apps.harness import minute_at
    from trafficthreshold.store import SQLiteStore

    path = str(tmp_path / "bootic.sqlite3")
    counts = [((2013, 2, 2, 16, 5), 1489), ((2013, 2, 2, 16, 40), 11),
              ((2013, 2, 16, 9, 0), 21), ((2013, 9, 5, 10, 0), 101)]
    items = [(account, "pageview", minute_at(*when), n + (7 if account == "all" and
                                                          when[1] == 9 else 0))
             for when, n in counts for account in ("acme", "all")]
    items.append(("beta", "pageview", minute_at(2013, 9, 5, 10, 0), 7))
    with SQLiteStore(path, ZONE) as store:
        store.roll(items, now=NOW, closed_through=minute_at(2013, 9, 5, 10, 0))
    return path


def test_bootic_readme_urls_and_discovery(bootic_db: str,
                                          serve: Callable[..., webserver.Server]) -> None:
    """The README's five URLs and the discovery routes, on a real server,
    answer the shape docs/api.rst documents ("Differences from Bootic")."""
    server = serve(api.make_app(make_config(bootic_db), counter_factory=lambda: None,
                                now=lambda: NOW))
    answers = {}
    for path, account, year, month, day in BOOTIC_README_URLS:
        status, headers, raw = fetch(server.url + path[1:] + "?callback=jsonp")
        assert (status, headers["Content-Type"]) == (200, "application/json"), path
        body = json.loads(raw)  # no JSONP: plain JSON whatever ?callback= says
        answers[path] = body
        # numbers, null for the parts not given, hour always present
        assert {k: body[k] for k in ("type", "account", "event", "year", "month", "day",
                                     "hour")} == {
            "type": "track", "account": account, "event": "pageview",
            "year": year, "month": month, "day": day, "hour": None}, path
        # every segment, zero-filled, in numeric order, string keys "2" not "02"
        first, last = (1, 12) if month is None else (1, 28) if day is None else (0, 23)
        assert list(body["data"]) == [str(n) for n in range(first, last + 1)], path
        assert body["total"] == sum(body["data"].values())
        # children only, with counts, built on the configured address, in
        # the canonical form (2013/2, not 2013/02 as the URL was typed)
        base = "/".join(str(p) for p in (account, "pageview", year, month, day) if p)
        assert body["links"] == [f"{LINKS}api/stats/track/{base}/{k}"
                                 for k, v in body["data"].items() if v], path
    year_all = answers[BOOTIC_README_URLS[0][0]]
    assert (year_all["data"]["2"], year_all["data"]["9"], year_all["total"]) == (1521, 108, 1629)
    year_acme = answers[BOOTIC_README_URLS[1][0]]
    assert (year_acme["data"]["2"], year_acme["data"]["9"]) == (1521, 101)
    february = answers[BOOTIC_README_URLS[2][0]]
    assert (february["data"]["2"], february["data"]["16"], february["total"]) == (1500, 21, 1521)
    assert february["links"] == [LINKS + "api/stats/track/acme/pageview/2013/2/2",
                                 LINKS + "api/stats/track/acme/pageview/2013/2/16"]
    second = answers[BOOTIC_README_URLS[3][0]]
    assert second["data"]["16"] == 1500 and second["total"] == 1500
    sixteenth = answers[BOOTIC_README_URLS[4][0]]
    assert (sixteenth["day"], sixteenth["data"]["9"], sixteenth["total"]) == (16, 21, 21)

    # Discovery: Bootic's RootHandler and AllKeysHandler, our shape.
    track = LINKS + "api/stats/track"
    expected = {
        "api/stats": {"type": None, "account": None, "event": None,
                      "links": [track, LINKS + "api/stats/funnels"]},
        "api/stats/track": {"type": "track", "account": None, "event": None,
                            "links": [f"{track}/acme", f"{track}/all", f"{track}/beta"]},
        "api/stats/track/acme": {"type": "track", "account": "acme", "event": None,
                                 "links": [f"{track}/acme/pageview"]},
        "api/stats/track/acme/pageview": {"type": "track", "account": "acme",
                                          "event": "pageview",
                                          "links": [f"{track}/acme/pageview/2013"]},
    }
    for path, body in expected.items():
        assert fetch_json(server.url + path) == (200, body), path
    # Bootic's funnels route: an event with no statuses counted answers
    # zeros, like a period (tests/test_funnels.py has one with counts).
    status, body = fetch_json(server.url + "api/stats/funnels/acme/order/2013")
    assert status == 200 and (body["data"], body["total"], body["links"]) == ({}, 0, [])


# -------------------------------------------------------------------- prefix


def test_the_prefix_moves_every_stats_route_and_its_links(
        installed: tuple[int, str], db: str, serve: Callable[..., webserver.Server]) -> None:
    key, backend = installed
    config = make_config(db, key=key, backend=backend, http=HttpConfig(prefix="/stats"))
    server = serve(api.make_app(config, now=lambda: NOW))
    status, year = fetch_json(server.url + "stats/track/acme/pageview/2026")
    assert status == 200 and year["links"] == [LINKS + "stats/track/acme/pageview/2026/2"]
    _, root = fetch_json(server.url + "stats")
    assert root["links"] == [LINKS + "stats/track", LINKS + "stats/funnels"]
    _, accounts = fetch_json(server.url + "stats/track")
    assert LINKS + "stats/track/acme" in accounts["links"]
    assert fetch_json(server.url + "stats/live")[0] == 200
    for old in ("api/stats", "api/stats/track", "api/stats/track/acme/pageview/2026",
                "api/stats/live"):
        assert fetch_json(server.url + old)[0] == 404, old
    # What is not a stats route stays where it is.
    for fixed in ("", "metrics", "api/openapi.json"):
        assert fetch(server.url + fixed)[0] == 200, fixed


def test_a_reload_moves_the_prefix(db: str, serve: Callable[..., webserver.Server]) -> None:
    app = api.make_app(make_config(db), counter_factory=lambda: None, now=lambda: NOW)
    server = serve(app)
    assert fetch_json(server.url + "api/stats/track/acme")[0] == 200
    app.reload(make_config(db, http=HttpConfig(prefix="/v1/stats")))
    assert fetch_json(server.url + "api/stats/track/acme")[0] == 404
    status, body = fetch_json(server.url + "v1/stats/track/acme")
    assert status == 200 and body["links"] == [LINKS + "v1/stats/track/acme/pageview"]
    _, doc = fetch_json(server.url + "api/openapi.json")
    assert "/v1/stats/track/{account}" in doc["paths"]


def test_prefix_under_a_mount_point_and_public_url(db: str) -> None:
    """Mounted at SCRIPT_NAME /tt with prefix /stats: links are
    listen + /tt + /stats; with public_url, public_url + /stats."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/stats/track/acme", "QUERY_STRING": "",
               "SCRIPT_NAME": "/tt", "SERVER_NAME": "evil.example", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http"}
    for http_config, expected in [
            (HttpConfig(prefix="/stats"), "http://127.0.0.1:8787/tt/stats/track/acme/pageview"),
            (HttpConfig(prefix="/stats", public_url="https://s.example/tt/"),
             "https://s.example/tt/stats/track/acme/pageview")]:
        app = api.make_app(make_config(db, http=http_config), counter_factory=lambda: None,
                           now=lambda: NOW)
        started: list[str] = []
        body = b"".join(app(dict(environ), lambda status, headers: started.append(status)))
        assert started == ["200 OK"] and json.loads(body)["links"] == [expected]


def test_a_request_during_a_reload_that_drops_the_token_is_not_refused(db: str) -> None:
    """The token read once per request: a reload (on loopback) from a token
    to none, landing while a request carrying the old token is checked, is
    the old setting (the token matches) or the new (none needed), never a
    401 that neither gives."""
    app = api.make_app(make_config(db, http=HttpConfig(token=TOKEN)),
                       counter_factory=lambda: None, now=lambda: NOW)
    no_token = make_config(db)

    class Environ(dict):  # the reload lands as the request reads its header
        def get(self, name: str, default: Any = None) -> Any:
            if name == "HTTP_AUTHORIZATION" and app.requires_token:
                app.reload(no_token)
            return super().get(name, default)

    environ = Environ({"REQUEST_METHOD": "GET", "PATH_INFO": "/api/stats/track/acme/pageview/2026",
                       "QUERY_STRING": "", "SERVER_NAME": "x", "SERVER_PORT": "80",
                       "wsgi.url_scheme": "http", "HTTP_AUTHORIZATION": f"Bearer {TOKEN}"})
    started: list[str] = []
    b"".join(app(environ, lambda status, headers: started.append(status)))
    assert not app.requires_token and started == ["200 OK"]


def test_a_request_during_a_reload_sees_the_old_or_the_new_links_never_a_mix(
        db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request served on another thread while a reload runs (here, from
    inside it, at the moment it works out the new base): its links are all
    the old settings' or all the new ones'.  The app used to assign the new
    config first and its base URL after, and _base_url read both: mounted
    at /tt without public_url, reloaded to a public_url, the request in
    between got links on the listen address without the mount point."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/stats/track/acme", "QUERY_STRING": "",
               "SCRIPT_NAME": "/tt", "SERVER_NAME": "x", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http"}
    old = "http://127.0.0.1:8787/tt/api/stats/track/acme/pageview"
    new = "https://s.example/api/stats/track/acme/pageview"
    app = api.make_app(make_config(db), counter_factory=lambda: None, now=lambda: NOW)

    def links() -> list[str]:
        body = b"".join(app(dict(environ), lambda status, headers: None))
        return json.loads(body)["links"]

    seen: list[list[str]] = []
    real = api.public_url

    def meanwhile(config: Config) -> str:
        seen.append(links())          # a request while the reload is under way
        return real(config)

    monkeypatch.setattr(api, "public_url", meanwhile)
    app.reload(make_config(db, http=HttpConfig(public_url="https://s.example/")))
    assert seen and all(got in ([old], [new]) for got in seen), seen
    assert links() == [new]


# --------------------------------------------------------------------- JSONP


@pytest.mark.parametrize("query", ["?callback=steal", "?callback=alert(1)//&x=1", "?jsonp=f"])
def test_jsonp_callback_is_ignored_never_wrapped(no_segment: webserver.Server,
                                                 query: str) -> None:
    """Bootic wrapped the JSON in ``callback(...)`` as text/javascript; we
    answer the same JSON as without the parameter."""
    url = no_segment.url + "api/stats/track/acme/pageview/2026"
    status, headers, body = fetch(url + query)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body == fetch(url)[2] and body.startswith(b"{")


# ---------------------------------------------------------------------- auth


@pytest.fixture
def with_token(db: str, serve: Callable[..., webserver.Server]) -> webserver.Server:
    config = make_config(db, http=HttpConfig(listen="127.0.0.1:0", token=TOKEN))
    return serve(api.make_app(config, counter_factory=lambda: None, now=lambda: NOW))


@pytest.mark.parametrize("path", ["", "api/stats/track/acme/pageview/2026", "api/stats/live",
                                  "metrics", "api/openapi.json", "nope"])
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer " + TOKEN[:-1],
                                    "Basic " + TOKEN, TOKEN, "Bearer"])
def test_every_route_needs_the_token(with_token: webserver.Server, path: str,
                                     header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    status, response_headers, body = fetch(with_token.url + path, headers=headers)
    assert status == 401
    assert response_headers["WWW-Authenticate"] == 'Bearer realm="trafficthreshold"'
    assert "Bearer" in json.loads(body)["message"]


def test_the_right_token_opens_every_route(with_token: webserver.Server) -> None:
    auth = {"Authorization": "Bearer " + TOKEN}
    for path, expected in [("", 200), ("api/stats/track/acme/pageview/2026", 200),
                           ("metrics", 200), ("api/openapi.json", 200),
                           ("api/stats/live", 503), ("nope", 404)]:
        status, _, _ = fetch(with_token.url + path, headers=auth)
        assert status == expected, path
    status, _, _ = fetch(with_token.url + "metrics", headers={"Authorization": "bearer " + TOKEN})
    assert status == 200  # the scheme is case-insensitive (RFC 7235)


def test_non_loopback_needs_the_token(db: str) -> None:
    app = api.make_app(make_config(db), now=lambda: NOW)
    with pytest.raises(ValueError, match="loopback"):
        webserver.start(app, "0.0.0.0:0")


# ---------------------------------------------------------------------- live


def test_live_shows_minute_60s_ring_throttle_and_heartbeat(
        live_server: tuple[webserver.Server, Any]) -> None:
    server, _ = live_server
    status, body = fetch_json(server.url + "api/stats/live")
    assert status == 200
    assert (body["type"], body["minute"], body["first_minute"]) == ("live", MINUTE, MINUTE - 60)
    keys = {(k["account"], k["event"]): k for k in body["keys"]}
    assert [(k["account"], k["event"]) for k in body["keys"]][:1] == [("all", "pageview")]
    acme, total, shop = keys["acme", "pageview"], keys["all", "pageview"], keys["shop", "pageview"]
    assert (acme["current_minute"], acme["last_60s"]) == (70, 75)
    assert acme["minutes"][-1] == 5 and sum(acme["minutes"]) == 5
    assert len(shop["minutes"]) == 60 and shop["minutes"][0] == 2 and sum(shop["minutes"]) == 2
    assert total["current_minute"] == 70 and sum(total["minutes"]) == 5 + 2 + 4
    assert body["throttle"] == {
        "level": 1, "supervisor_level": 0, "min": 60, "max": 119,
        "text": "Current Level: 1 (60 - 119)", "multiplier": 60, "window": "60s",
        "pages_past_minute": 75,
    }
    assert body["supervisor"] == {"pid": 4321, "heartbeat_age_seconds": 1.5, "alive": True}
    assert body["segment"]["keys_used"] >= 5 and body["segment"]["key_capacity"] == 1024


def test_a_corrupt_throttle_window_is_reported_not_a_500(
        live_server: tuple[webserver.Server, Any]) -> None:
    server, counter = live_server
    counter.store(segment.H_THROTTLE_WINDOW, 4, 0xFFFFFFFF)
    status, body = fetch_json(server.url + "api/stats/live")
    assert status == 200
    assert body["throttle"]["window"] == "60s" and body["throttle"]["pages_past_minute"] == 75
    assert [d for d in body["damaged"] if "throttle_window is 4294967295" in d]
    status, _, metrics_text = fetch(server.url + "metrics")
    assert status == 200 and b"trafficthreshold_segment_damaged 1\n" in metrics_text
    status, _, page = fetch(server.url)
    assert status == 200 and b"throttle_window is 4294967295" in page


def test_a_name_that_is_not_utf8_is_skipped_and_reported(
        installed: tuple[int, str], db: str, serve: Callable[..., webserver.Server]) -> None:
    key, backend = installed
    server, counter = start_live(key, backend, db, serve)
    with raw_view(key, backend) as view:  # a raw poke: "acme" becomes b"\xff\xfeme"
        raw = RawReader(view)
        slot = raw.find("acme", "pageview")
        for off, state, entry_slot, *_ in list(raw.entries()):
            if state == 1 and entry_slot == slot:
                view[off + 16:off + 18] = b"\xff\xfe"
    status, body = fetch_json(server.url + "api/stats/live")
    assert status == 200
    assert [d for d in body["damaged"] if "not UTF-8" in d]
    assert ("acme", "pageview") not in {(k["account"], k["event"]) for k in body["keys"]}
    status, _, metrics_text = fetch(server.url + "metrics")
    assert status == 200 and b"trafficthreshold_segment_damaged 1\n" in metrics_text
    status, _, page = fetch(server.url)
    assert status == 200 and b"not UTF-8" in page
    counter.detach()


def test_live_filters_and_level_five(live_server: tuple[webserver.Server, Any]) -> None:
    server, counter = live_server
    counter.hit("acme", "pageview", 1000, NOW - 1)
    _, body = fetch_json(server.url + "api/stats/live?account=acme&event=pageview")
    assert [(k["account"], k["event"]) for k in body["keys"]] == [("acme", "pageview")]
    assert body["throttle"]["text"] == "Current Level: 5 (300+)"
    assert body["throttle"]["max"] is None
    status, body = fetch_json(server.url + "api/stats/live?account=~bad")
    assert status == 404 and "reserved" in body["message"]
    status, body = fetch_json(server.url + "api/stats/live?event=")
    assert status == 404 and "empty" in body["message"]


def test_live_without_a_segment_is_503(no_segment: webserver.Server) -> None:
    status, body = fetch_json(no_segment.url + "api/stats/live")
    assert status == 503
    assert "run `trafficthreshold install`" in body["message"]


def test_live_follows_a_segment_installed_again(key: int, db: str,
                                                serve: Callable[..., webserver.Server]) -> None:
    server = serve(api.make_app(make_config(db, key=key, backend="sysv"), now=lambda: NOW))
    assert fetch_json(server.url + "api/stats/live")[0] == 503  # not installed yet
    segment.install(key, "sysv", now=NOW)
    first = segment.attach(key, "sysv")
    first.hit("acme", "pageview", 3, NOW)
    assert fetch_json(server.url + "api/stats/live?account=acme")[1]["keys"][0]["last_60s"] == 3
    first.detach()
    segment.uninstall(key, "sysv", force=True)
    segment.install(key, "sysv", now=NOW)
    second = segment.attach(key, "sysv")
    second.hit("acme", "pageview", 8, NOW)
    _, body = fetch_json(server.url + "api/stats/live?account=acme")
    assert body["keys"][0]["last_60s"] == 8
    second.detach()


# ------------------------------------------------------------ errors and 500s


def test_an_exception_is_a_500_json_without_traceback(
        db: str, serve: Callable[..., webserver.Server], caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Any:
        raise RuntimeError("kaboom in the segment code")

    server = serve(api.make_app(make_config(db), counter_factory=broken, now=lambda: NOW))
    with caplog.at_level(logging.ERROR, logger="trafficthreshold.api"):
        status, body = fetch_json(server.url + "api/stats/live")
    assert status == 500
    assert body == {"status": 500, "error": "Internal Server Error",
                    "message": "internal error; the server log has the details"}
    assert "kaboom" in caplog.text and "Traceback" in caplog.text


def test_stores_are_per_thread_under_concurrent_requests(no_segment: webserver.Server) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(15):
            _, body = fetch_json(no_segment.url + "api/stats/track/all/pageview/2026/5/1")
            with lock:
                results.append(body["total"])

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [11] * 90


# ------------------------------------------------------------ entry points


def test_application_is_built_from_the_config_file(
        tmp_path: Path, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'database = "{db}"\ntimezone = "{ZONE}"\n', encoding="utf-8")
    monkeypatch.setenv("TRAFFICTHRESHOLD_CONFIG", str(config_file))
    monkeypatch.setattr(api, "_application", None)
    app = api.application
    assert isinstance(app, api.StatsApp) and app.store_path == db
    assert api.application is app  # built once
    # What a WSGI server resolves for 'trafficthreshold.api:application'.
    import importlib
    assert getattr(importlib.import_module("trafficthreshold.api"), "application") is app
    from trafficthreshold.api import make_app, StatsApp  # noqa: F401  (the package gives them)
    # A plain WSGI callable: call it the way any server would.
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/stats/track/all/pageview/2026",
               "QUERY_STRING": "", "SERVER_NAME": "example.org", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http", "SCRIPT_NAME": "/stats"}
    started: list[Any] = []
    body = b"".join(app(environ, lambda status, headers: started.append((status, headers))))
    assert started[0][0] == "200 OK"
    links = json.loads(body)["links"]
    # The configured address and the mount point, never SERVER_NAME/Host.
    assert links[0] == "http://127.0.0.1:8787/stats/api/stats/track/all/pageview/2026/2"


def test_the_json_examples_in_the_docs_are_valid_and_match_the_api() -> None:
    """Every ``code-block:: json`` in docs/api.rst parses, and the shapes are
    the ones the OpenAPI document promises."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.rst").read_text()
    blocks = re.findall(r"\.\. code-block:: json\n\n((?:  .*\n|\n)+)", text)
    assert len(blocks) >= 4
    documents = [json.loads(textwrap.dedent(block)) for block in blocks]
    schemas = openapi.openapi_document()["components"]["schemas"]
    for document in documents:
        name = {"track": "Track", "live": "Live", "funnels": "Funnel"}.get(document.get("type"),
                                                                         "Error")
        if "links" in document and "data" not in document:
            name = "Links"  # a discovery route's answer
        if document.get("scope") == "farm":
            name = "FarmLive"  # /live?scope=farm
            for host in document["hosts"]:
                assert set(host) == set(schemas["FarmHost"]["required"])
        assert set(document) <= set(schemas[name]["properties"]), name
        assert set(schemas[name]["required"]) <= set(document), name


# --------------------------------------------------------------- Redis store


def test_the_api_answers_from_the_farms_redis(redis_server: Any, tmp_path: Path,
                                               serve: Callable[..., webserver.Server]) -> None:
    """With ``[store] backend = "redis"`` the period and discovery routes
    read the farm's Redis (two hosts' shares added up); Redis down is a
    503, never a 500."""
    from trafficthreshold.config import StoreConfig
    from trafficthreshold.periods import local_parts, resolve_timezone
    from trafficthreshold.store.redis import RedisStore

    zone = resolve_timezone(ZONE)
    for host, n in (("web1", 7), ("web2", 5)):
        RedisStore(redis_server.client(), zone, host).roll(
            [("acme", "pageview", MINUTE, n), ("all", "pageview", MINUTE, n)], now=NOW)
    cfg = make_config(str(tmp_path / "local.sqlite3"),
                      store=StoreConfig(backend="redis",
                                        url=f"redis://127.0.0.1:{redis_server.port}/0"))
    server = serve(api.make_app(cfg, now=lambda: NOW))
    year, month = local_parts(MINUTE, zone)[:2]
    status, body = fetch_json(server.url + f"api/stats/track/acme/pageview/{year}")
    assert status == 200 and body["data"][str(month)] == 12
    assert sum(body["data"].values()) == 12
    status, body = fetch_json(server.url + "api/stats/track/acme/pageview")
    assert status == 200 and body["links"][-1].endswith(f"/acme/pageview/{year}")
    status, body = fetch_json(server.url + "api/stats/track")
    assert status == 200 and {link.rsplit("/", 1)[1] for link in body["links"]} == {"acme", "all"}
    redis_server.kill()
    status, body = fetch_json(server.url + f"api/stats/track/acme/pageview/{year}")
    assert status == 503 and "Redis" in body["message"]
