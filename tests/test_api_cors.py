"""Tests of trafficthreshold.cors: ``[http] cors_origins`` through the app
on a real waitress server, and in headless Chromium (a page on another
origin that reads a period with the bearer token, and one that may not).

The nasty cases on purpose: origins that only look listed (a longer host,
another scheme, an explicit default port, ``null``), preflights asking for
other methods or from other origins, with and without the token, ``"*"``,
a reload that changes the list.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apps.harness import NOW, fetch, make_config
from test_api_dashboard import chromium, needs_chromium
from trafficthreshold import api
from trafficthreshold.api import cors
from trafficthreshold.api import server as webserver
from trafficthreshold.config import HttpConfig

TOKEN = "s3cret-token-0123456789abcdef"

DASH = "https://dash.example.com"


@pytest.fixture
def cors_server(db: str, serve: Callable[..., webserver.Server]) -> webserver.Server:
    """Origins DASH and http://127.0.0.1:3000 allowed, and a token."""
    config = make_config(db, http=HttpConfig(token=TOKEN, cors_origins=(
        DASH, "http://127.0.0.1:3000")))
    return serve(api.make_app(config, counter_factory=lambda: None, now=lambda: NOW))


def cors_headers(headers: Any) -> dict[str, str]:
    return {name: value for name, value in headers.items()
            if name.lower().startswith("access-control-")}


def test_an_allowed_origin_gets_its_origin_back(cors_server: webserver.Server) -> None:
    url = cors_server.url + "api/stats/track/acme/pageview/2026"
    auth = {"Authorization": "Bearer " + TOKEN}
    for origin in (DASH, "HTTPS://DASH.example.com", "http://127.0.0.1:3000"):
        status, headers, _ = fetch(url, headers={**auth, "Origin": origin})
        assert status == 200
        assert cors_headers(headers) == {"Access-Control-Allow-Origin": origin}
        assert headers["Vary"] == "Origin"
    # Errors too, so that the page can read the message: 401, 404.
    status, headers, _ = fetch(url, headers={"Origin": DASH})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == DASH
    status, headers, _ = fetch(cors_server.url + "api/stats/track/nobody",
                               headers={**auth, "Origin": DASH})
    assert status == 404 and headers["Access-Control-Allow-Origin"] == DASH


@pytest.mark.parametrize("origin", ["https://evil.example", "https://dash.example.com.evil.example",
                                    "http://dash.example.com", "https://dash.example.com:443",
                                    "null", None])
def test_other_origins_get_nothing(cors_server: webserver.Server, origin: str | None) -> None:
    headers = {"Authorization": "Bearer " + TOKEN} | ({} if origin is None else {"Origin": origin})
    status, got, _ = fetch(cors_server.url + "api/stats/track/acme/pageview/2026", headers=headers)
    assert status == 200 and cors_headers(got) == {}
    assert got["Vary"] == "Origin"  # the answer depends on Origin: caches must know


def test_a_preflight_from_an_allowed_origin_needs_no_token(cors_server: webserver.Server) -> None:
    status, headers, body = fetch(
        cors_server.url + "api/stats/track/acme/pageview/2026", method="OPTIONS",
        headers={"Origin": DASH, "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"})
    assert (status, body) == (204, b"")
    assert cors_headers(headers) == {
        "Access-Control-Allow-Origin": DASH, "Access-Control-Allow-Methods": "GET",
        "Access-Control-Allow-Headers": "Authorization",
        "Access-Control-Max-Age": str(cors.MAX_AGE)}
    assert headers["Vary"] == "Origin" and "Content-Length" not in headers


@pytest.mark.parametrize(("origin", "method"), [("https://evil.example", "GET"), (None, "GET"),
                                                (DASH, "POST"), (DASH, "DELETE"), (DASH, None)])
def test_no_preflight_success_for_other_origins_or_methods(
        cors_server: webserver.Server, origin: str | None, method: str | None) -> None:
    headers = {"Authorization": "Bearer " + TOKEN}
    if origin is not None:
        headers["Origin"] = origin
    if method is not None:
        headers["Access-Control-Request-Method"] = method
    status, got, body = fetch(cors_server.url + "api/stats/track/acme/pageview/2026",
                              method="OPTIONS", headers=headers)
    assert status == 405 and "read-only" in json.loads(body)["message"]
    assert "Access-Control-Allow-Methods" not in got
    assert got.get("Access-Control-Allow-Origin") == (DASH if origin == DASH else None)
    del headers["Authorization"]  # as a browser's preflight: the token check comes first
    status, got, _ = fetch(cors_server.url + "api/stats/track/acme/pageview/2026",
                           method="OPTIONS", headers=headers)
    assert status == 401 and "Access-Control-Allow-Methods" not in got


def test_a_star_lets_any_page_read(db: str, serve: Callable[..., webserver.Server]) -> None:
    config = make_config(db, http=HttpConfig(cors_origins=("*", DASH)))
    server = serve(api.make_app(config, counter_factory=lambda: None, now=lambda: NOW))
    url = server.url + "api/stats/track/acme/pageview/2026"
    assert fetch(url, headers={"Origin": "https://any.example"})[1][
        "Access-Control-Allow-Origin"] == "*"
    assert fetch(url, headers={"Origin": DASH})[1]["Access-Control-Allow-Origin"] == DASH
    status, headers, _ = fetch(url, method="OPTIONS", headers={
        "Origin": "https://any.example", "Access-Control-Request-Method": "GET"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"


def test_without_cors_origins_there_are_no_cors_headers(no_segment: webserver.Server) -> None:
    url = no_segment.url + "api/stats/track/acme/pageview/2026"
    status, headers, _ = fetch(url, headers={"Origin": DASH})
    assert status == 200 and cors_headers(headers) == {} and "Vary" not in headers
    status, headers, _ = fetch(url, method="OPTIONS", headers={
        "Origin": DASH, "Access-Control-Request-Method": "GET"})
    assert status == 405 and cors_headers(headers) == {}


def test_a_reload_changes_the_origins(db: str, serve: Callable[..., webserver.Server]) -> None:
    app = api.make_app(make_config(db), counter_factory=lambda: None, now=lambda: NOW)
    server = serve(app)
    url = server.url + "api/stats/track/acme/pageview/2026"
    assert "Access-Control-Allow-Origin" not in fetch(url, headers={"Origin": DASH})[1]
    app.reload(make_config(db, http=HttpConfig(cors_origins=(DASH,))))
    assert fetch(url, headers={"Origin": DASH})[1]["Access-Control-Allow-Origin"] == DASH


def page_app(script: str) -> Callable[..., list[bytes]]:
    """A WSGI app serving one HTML page that runs ``script``: the other
    origin's page of the browser test."""
    html = f"<!doctype html><title>dash</title><body>waiting<script>{script}</script>".encode()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Length", str(len(html)))])
        return [html]
    return app


@pytest.mark.chromium
@needs_chromium
def test_a_browser_page_on_a_listed_origin_reads_with_the_token(
        db: str, serve: Callable[..., webserver.Server], tmp_path: Path) -> None:
    """Headless Chromium: a page on a listed origin fetches a period with the
    bearer header (a preflight first) and reads it; the same page on an
    origin not listed is blocked by the browser."""
    target: dict[str, str] = {}
    script = ("fetch(API, {headers: {Authorization: 'Bearer %s'}})"
              ".then(r => r.json()).then(j => document.body.textContent = 'TOTAL ' + j.total)"
              ".catch(e => document.body.textContent = 'BLOCKED ' + e.name)" % TOKEN)
    pages = []
    for _ in range(2):
        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            return page_app(f"const API = {json.dumps(target['api'])};\n{script}")(
                environ, start_response)
        pages.append(serve(app))
    listed, other = (page.url.rstrip("/") for page in pages)
    config = make_config(db, http=HttpConfig(token=TOKEN, cors_origins=(listed,)))
    api_server = serve(api.make_app(config, counter_factory=lambda: None, now=lambda: NOW))
    target["api"] = api_server.url + "api/stats/track/acme/pageview/2026"
    assert "TOTAL 10" in chromium(listed + "/", tmp_path / "p1", "--dump-dom")
    assert "BLOCKED TypeError" in chromium(other + "/", tmp_path / "p2", "--dump-dom")


def test_the_pure_functions_without_a_server() -> None:
    listed = frozenset({DASH})
    environ = {"REQUEST_METHOD": "OPTIONS", "HTTP_ORIGIN": DASH,
               "HTTP_ACCESS_CONTROL_REQUEST_METHOD": "GET"}
    assert cors.allowed_origin(listed, environ) == DASH
    assert cors.allowed_origin(listed, {"HTTP_ORIGIN": "https://other.example"}) is None
    assert cors.allowed_origin(frozenset({"*"}), {"HTTP_ORIGIN": "https://other.example"}) == "*"
    assert cors.allowed_origin(frozenset({"*"}), {}) is None  # no Origin, no CORS
    assert cors.headers(frozenset(), environ) == []
    assert cors.preflight(listed, {**environ, "REQUEST_METHOD": "GET"}) is None
    assert cors.preflight(listed, {**environ, "HTTP_ACCESS_CONTROL_REQUEST_METHOD": "PUT"}) is None
    assert dict(cors.preflight(listed, environ) or [])["Access-Control-Max-Age"] == "600"
