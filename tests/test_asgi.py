"""Tests for trafficthreshold.asgi: http counted at http.response.start,
lifespan and websocket untouched, messages passed on unchanged, no error
reaching the request; and the same application under a real uvicorn with
two worker processes."""
from __future__ import annotations

import asyncio
import time
import logging

import pytest

import trafficthreshold
from trafficthreshold import asgi, pageviews
from trafficthreshold.asgi import TrafficThreshold

from apps import harness
from apps.harness import fresh_warnings, of, total  # noqa: F401  (fresh_warnings: an autouse fixture)
from apps.asgi_app import raw_app

HTML = [(b"content-type", b"text/html; charset=utf-8")]




def http_scope(path: str = "/", method: str = "GET", host: bytes | None = b"Site-A.example:8000",
               **extra) -> dict:
    headers = [(b"accept", b"text/html")] + ([(b"host", host)] if host is not None else [])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    scope.update(extra)
    return scope


def call(app, scope) -> list[dict]:
    """Run one request; returns the messages the server was sent."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def answering(status: int = 200, headers=HTML, bodies=(b"<p>hi</p>",)):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, body in enumerate(bodies):
            await send({"type": "http.response.body", "body": body,
                        "more_body": i < len(bodies) - 1})
    return app


def test_counts_an_html_page_by_host(worker_api):
    sent = call(TrafficThreshold(answering(), account="host"), http_scope())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert (of("site-a.example"), total()) == (1, 1)


@pytest.mark.parametrize("scope, status, headers", [
    ({"method": "POST"}, 200, HTML),
    ({"method": "HEAD"}, 200, HTML),
    ({}, 301, HTML),
    ({}, 302, HTML),
    ({"headers": [(b"host", b"site-a.example")]}, 304, []),  # no Accept: not a page load
    ({}, 404, HTML),
    ({}, 500, HTML),
    ({}, 200, [(b"content-type", b"application/json")]),
    ({}, 200, []),
    ({"path": "/static/page.html"}, 200, HTML),
    ({"path": "/app.css"}, 200, HTML),
    ({"path": "/healthz"}, 200, HTML),
])
def test_not_page_views(worker_api, scope, status, headers):
    call(TrafficThreshold(answering(status, headers)), http_scope(**scope))
    assert total() == 0


@pytest.mark.parametrize("scope, status, headers", [
    ({}, 304, HTML),
    ({}, 304, []),  # with the Accept of a browser below
    ({}, 204, HTML),
    ({}, 200, [(b"Content-Type", b"application/xhtml+xml")]),
])
def test_page_views(worker_api, scope, status, headers):
    scope = http_scope(**scope)
    scope["headers"] = [(b"accept", b"text/html,*/*;q=0.8")] + scope["headers"][1:]
    call(TrafficThreshold(answering(status, headers)), scope)
    assert total() == 1


def test_messages_pass_unchanged_and_count_precedes_the_start(worker_api):
    """Every message reaches the server as the same object, in order; the
    hit is counted before http.response.start is passed on."""
    messages = [{"type": "http.response.start", "status": 200, "headers": HTML},
                {"type": "http.response.body", "body": b"a", "more_body": True},
                {"type": "http.response.body", "body": b"b", "more_body": False}]
    at_start = []

    async def app(scope, receive, send):
        for message in messages:
            await send(message)

    async def server_send(message):
        if message["type"] == "http.response.start":
            at_start.append(total())
        received.append(message)

    received: list = []

    async def receive():
        return {"type": "http.request"}

    asyncio.run(TrafficThreshold(app)(http_scope(), receive, server_send))
    assert len(received) == 3 and all(a is b for a, b in zip(received, messages))
    assert at_start == [1] and total() == 1


def test_streaming_counts_once(worker_api):
    sent = call(TrafficThreshold(answering(bodies=[b"1", b"2", b"3"])), http_scope())
    assert [m.get("body") for m in sent[1:]] == [b"1", b"2", b"3"]
    assert total() == 1


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
def test_other_scopes_pass_through_untouched(worker_api, kind):
    seen = []

    async def app(scope, receive, send):
        seen.append((scope, receive, send))

    async def receive():
        return {}

    async def send(message):
        pass

    scope = {"type": kind, "asgi": {"version": "3.0"}}
    before = dict(scope)
    asyncio.run(TrafficThreshold(app)(scope, receive, send))
    assert seen == [(scope, receive, send)]
    assert seen[0][0] is scope and scope == before


def test_excluded_requests_get_the_servers_send(worker_api):
    seen = []

    async def app(scope, receive, send):
        seen.append(send)

    async def receive():
        return {}

    async def send(message):
        pass

    asyncio.run(TrafficThreshold(app)(http_scope("/static/a.css"), receive, send))
    assert seen == [send]


def test_level_in_scope_and_state(worker_api):
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["trafficthreshold.level"], dict(scope["state"])))
        await answering()(scope, receive, send)

    trafficthreshold.hit(n=250)  # level 4
    mw = TrafficThreshold(app)
    call(mw, http_scope())
    lifespan_state = {"db": "pool"}
    call(mw, http_scope(state=lifespan_state))
    assert seen == [(4, {"trafficthreshold_level": 4}),
                    (4, {"db": "pool", "trafficthreshold_level": 4})]


def test_level_keys_are_configurable(worker_api):
    seen = []

    async def app(scope, receive, send):
        seen.append(sorted(k for k in scope if "level" in k or k == "state"))
        seen.append(scope.get("my.level"))

    call(TrafficThreshold(app, scope_key=None, state_key=None), http_scope())
    call(TrafficThreshold(app, scope_key="my.level", state_key=None), http_scope())
    assert seen == [[], None, ["my.level"], 0]


def test_the_app_reads_the_level_from_state(worker_api):
    sent = call(TrafficThreshold(raw_app), http_scope("/level"))
    assert sent[1]["body"] == b"<p>level 0</p>\n"


def test_app_errors_propagate_and_are_not_counted(worker_api):
    async def app(scope, receive, send):
        raise LookupError("the app's own bug")

    with pytest.raises(LookupError):
        call(TrafficThreshold(app), http_scope())
    assert total() == 0


def test_account_callable_receives_the_scope(worker_api):
    mw = TrafficThreshold(answering(), account=lambda scope: scope["path"].split("/")[1])
    call(mw, http_scope("/shop/x"))
    assert (of("shop"), total()) == (1, 1)


def test_invalid_or_missing_host_counts_in_the_total(worker_api, caplog):
    mw = TrafficThreshold(answering(), account="host", allowed_hosts=["*"])
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        call(mw, http_scope(host=b"a/b"))
        call(mw, http_scope(host=b"a/b"))
        call(mw, http_scope(host=None))
    assert total() == 3
    assert len(caplog.records) == 1 and caplog.records[0].name == "trafficthreshold.asgi"


def test_count_if(worker_api):
    seen = []

    def only_json(info):
        seen.append(info)
        return info.content_type == "application/json"

    call(TrafficThreshold(answering(headers=[(b"content-type", b"application/json")]),
                          count_if=only_json), http_scope("/api", method="POST"))
    call(TrafficThreshold(answering(), count_if=only_json), http_scope())
    assert total() == 1
    info = seen[0]
    assert (info.method, info.path, info.status, info.headers) == (
        "POST", "/api", 200, [("content-type", "application/json")])
    assert info.request["type"] == "http"


def test_never_raises_when_everything_fails(worker_api, monkeypatch, caplog):
    def explode(*args):
        raise RuntimeError("segment on fire")

    mw = TrafficThreshold(answering(), account="host", allowed_hosts=["*"])
    monkeypatch.setattr(pageviews, "_hit", explode)
    monkeypatch.setattr(pageviews, "_throttle_status", explode)
    monkeypatch.setattr(asgi, "_throttle_status", explode)
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        sent = call(mw, http_scope())
        call(mw, http_scope())
    assert sent[1]["body"] == b"<p>hi</p>"
    assert len(caplog.records) == 2


def test_bad_options_raise_at_start_up():
    with pytest.raises(ValueError):
        TrafficThreshold(answering(), event="~x")
    with pytest.raises(TypeError):
        TrafficThreshold(answering(), count_if=1)
    with pytest.raises(TypeError, match="single string"):
        TrafficThreshold(answering(), account="host", allowed_hosts="example.com")


def test_allowed_hosts(worker_api, caplog):
    mw = TrafficThreshold(answering(), account="host", allowed_hosts=[".site-a.example"])
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        for host in (b"Site-A.example.:8000", b"www.site-a.example", b"made-up.example",
                     b"made-up.example", b"other.example"):
            call(mw, http_scope(host=host))
    keys = {name for _, name, _ in trafficthreshold._counter._ensure().keys()}
    assert keys == {"~overflow", "all", "site-a.example", "www.site-a.example"}
    assert total() == 5
    assert len(caplog.records) == 1 and "not in allowed_hosts" in caplog.text


def test_an_app_failing_before_its_response_starts_is_not_counted(worker_api):
    """An error handler (Starlette's ServerErrorMiddleware) answers 500 for
    an exception raised before http.response.start: the 500 decides.  (ASGI
    cannot restart a response: once http.response.start is sent, it is
    final; the count follows it.)"""
    async def failing(scope, receive, send):
        raise RuntimeError("the view failed")

    async def error_handler(scope, receive, send):
        try:
            await failing(scope, receive, send)
        except RuntimeError:
            await answering(500)(scope, receive, send)

    sent = call(TrafficThreshold(error_handler), http_scope())
    assert sent[0]["status"] == 500 and total() == 0


# ------------------------------------------------------- a real uvicorn

def test_exact_under_uvicorn(installed, tmp_path):
    """Two uvicorn worker processes (each imports the application anew),
    500 requests: the segment's total equals the HTML 2xx responses
    received, under the Host account too.  (A connection per request: see
    harness.run_load for why not keep-alive with uvicorn.)"""
    key, backend = installed
    env = harness.server_env(key, backend, TT_TEST_ACCOUNT="host")
    server = harness.uvicorn("apps.asgi_app:app", env, tmp_path / "uvicorn.log",
                             port=harness.free_port(), workers=2)
    try:
        server.wait_ready(workers=2)
        first = harness.epoch_minute()
        result = harness.run_load(server.port, 500, threads=4, time_limit=30,
                                   keep_alive=False)
        last = harness.epoch_minute()
        assert result.failed == 0, result
        # HTML 2xx received: 400 GET pages and 25 HEAD (not page views)
        assert result.sent == 500 and result.pages == 425
        heads = sum(harness.plan(i)[0] == "HEAD" for i in range(500))
        assert heads == 25
        assert harness.segment_count(key, backend, first, last) == result.pages - heads
        assert harness.segment_count(key, backend, first, last,
                                     "site-a.example") == result.pages - heads
        status, _, body = harness.get(server.port, "/stream")
        assert (status, body) == (200, b"<p>0</p><p>1</p><p>2</p>")
    finally:
        server.stop()


BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
#: (method, path, Host, Accept, status, the account counted: None for the
#: total only, False for not counted).
CASES = [
    ("GET", "/", "site-a.example", None, 200, "site-a.example"),
    ("GET", "/", "Site-A.Example.", None, 200, "site-a.example"),
    ("HEAD", "/", "site-a.example", None, 200, False),
    ("GET", "/?status=302", "site-a.example", BROWSER, 302, False),
    ("GET", "/?status=304&type=none", "site-a.example", BROWSER, 304, "site-a.example"),
    ("GET", "/?status=304&type=none", "site-a.example", "*/*", 304, False),
    ("GET", "/?status=500", "site-a.example", None, 500, False),
    ("GET", "/", "Shop.Site-B.example", None, 200, "shop.site-b.example"),
    ("GET", "/", "made-up.example", None, 200, None),
]


def test_what_counts_under_uvicorn(installed, tmp_path):
    """The rule's cases through a real uvicorn serving
    tests/apps/rules_app.py's ASGI application (account="host",
    allowed_hosts site-a.example and .site-b.example)."""
    import http.client

    key, backend = installed
    env = harness.server_env(key, backend)
    server = harness.uvicorn("apps.rules_app:asgi_app", env, tmp_path / "uvicorn.log",
                             port=harness.free_port(), workers=1)
    statuses = []
    try:
        server.wait_ready(path="/?type=text/plain")
        first = harness.epoch_minute()
        for method, path, host, accept, _, _ in CASES:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            headers = {"Host": f"{host}:{server.port}", "Connection": "close"}
            if accept:
                headers["Accept"] = accept
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            conn.close()
        last = harness.epoch_minute()
    finally:
        server.stop()
    assert statuses == [case[4] for case in CASES]
    accounts = [case[5] for case in CASES if case[5] is not False]
    assert harness.segment_count(key, backend, first, last) == len(accounts)
    for name in ("site-a.example", "shop.site-b.example"):
        assert harness.segment_count(key, backend, first, last, name) == accounts.count(name)
    assert harness.segment_accounts(key, backend) == {
        "~overflow", "all", "site-a.example", "shop.site-b.example"}


# ------------------------------------------------------------ unique visitors

#: 2026-12-01 23:59:59 in Zurich: one second before midnight.
BEFORE_MIDNIGHT = 1_796_165_999


def uniques() -> tuple[int, int]:
    """The sliding-60 s ``unique`` events of site-a.example and of ``all``."""
    return (trafficthreshold.count("site-a.example", "unique", window="60s"),
            total("unique"))


def unique_mw(app=None, **options):
    options.setdefault("timezone", "Europe/Zurich")
    options.setdefault("clock", lambda: BEFORE_MIDNIGHT)
    return TrafficThreshold(app or answering(), uniques=True, account="host",
                            allowed_hosts=["*"], **options)


def with_cookie(*values: bytes, **extra) -> dict:
    scope = http_scope(**extra)
    scope["headers"] += [(b"cookie", value) for value in values]
    return scope


def test_uniques_off_by_default_leave_the_message_alone(worker_api):
    sent = call(TrafficThreshold(answering()), http_scope())
    assert sent[0]["headers"] is HTML and total("unique") == 0


def test_first_page_view_of_the_day_is_unique_and_sets_the_cookie(worker_api):
    headers = list(HTML)
    mw = unique_mw(answering(headers=headers))
    start = call(mw, http_scope())[0]
    assert start["headers"] == HTML + [
        (b"set-cookie", b"tt_day=20261201; Max-Age=1; Path=/; SameSite=Lax; HttpOnly")]
    assert headers == HTML  # the application's list is not changed
    assert (total(), uniques()) == (1, (1, 1))
    # HTTP/2 may split the Cookie header: each part is looked at.
    for scope in (with_cookie(b"tt_day=20261201"), with_cookie(b"a=b", b"tt_day=20261201")):
        assert call(mw, scope)[0]["headers"] is headers
    assert (total(), uniques()) == (3, (1, 1))


def test_the_day_turns_at_local_midnight_and_https_is_secure(worker_api):
    t = [BEFORE_MIDNIGHT]
    mw = unique_mw(clock=lambda: t[0])
    assert call(mw, with_cookie(b"tt_day=20261201"))[0]["headers"] == HTML
    t[0] += 1
    start = call(mw, with_cookie(b"tt_day=20261201", scheme="https"))[0]
    assert start["headers"][-1] == (b"set-cookie", b"tt_day=20261202; Max-Age=86400; Path=/; "
                                    b"SameSite=Lax; HttpOnly; Secure")
    assert uniques() == (1, 1)


@pytest.mark.parametrize("scope, status, headers", [
    (http_scope("/api"), 200, [(b"content-type", b"application/json")]),
    (http_scope(method="HEAD"), 200, HTML),
    (http_scope("/static/app.css"), 200, HTML),
    (http_scope(), 302, [(b"location", b"/next")] + HTML),
    (http_scope(), 500, HTML),
])
def test_only_page_views_get_the_cookie(worker_api, scope, status, headers):
    start = call(unique_mw(answering(status, headers)), scope)[0]
    assert start["headers"] is headers and uniques() == (0, 0)


def test_unique_failures_are_logged_and_the_page_still_counts(worker_api, caplog):
    def broken_clock():
        raise RuntimeError("clock on fire")

    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        sent = call(unique_mw(clock=broken_clock), http_scope())
    assert sent[0]["headers"] is HTML and sent[1]["body"] == b"<p>hi</p>"
    assert (total(), uniques()) == (1, (0, 0))
    assert "a unique visitor was not counted" in caplog.text and "clock on fire" in caplog.text


@pytest.mark.parametrize("kwargs, error", [
    ({"unique_cookie": "tt=day"}, ValueError), ({"uniques": 1}, TypeError),
    ({"timezone": "Nowhere/Else"}, ValueError),
])
def test_bad_unique_options_raise_at_start_up(kwargs, error):
    with pytest.raises(error):
        TrafficThreshold(answering(), **{"uniques": True, **kwargs})


def test_unique_visitors_under_uvicorn(installed, tmp_path):
    """The day cookie through a real uvicorn: set on the first page view
    (a header the server sends as given), not on the second that carries
    it, nor on JSON or the stream's second visit; ``unique`` counted once
    per visitor."""
    from trafficthreshold import periods

    key, backend = installed
    zone = "America/Los_Angeles"
    env = harness.server_env(key, backend, TT_TEST_TIMEZONE=zone)
    server = harness.uvicorn("apps.asgi_uniques:app", env, tmp_path / "uvicorn.log",
                             port=harness.free_port(), workers=1)
    stamps = {pageviews.day_of(time.time(), periods.resolve_timezone(zone))[0]}

    def get(path, cookie=None):
        return harness.get_page(server.port, path, cookie=cookie)

    try:
        server.wait_ready(path="/healthz")
        first = harness.epoch_minute()
        status, value = get("/")
        cookie = value.partition(";")[0]
        answers = [get("/", cookie), get("/stream", cookie), get("/api"), get("/stream")]
        last = harness.epoch_minute()
    finally:
        server.stop()
    stamps.add(pageviews.day_of(time.time(), periods.resolve_timezone(zone))[0])
    assert status == 200 and value.endswith("; Path=/; SameSite=Lax; HttpOnly")
    assert cookie.partition("=")[2] in stamps
    assert answers[:3] == [(200, None)] * 3 and answers[3][1].startswith("tt_day=")
    assert harness.segment_count(key, backend, first, last, "site-a.example") == 4
    assert harness.segment_count(key, backend, first, last, "site-a.example", "unique") == 2
    assert harness.segment_count(key, backend, first, last, None, "unique") == 2


# ------------------------------------------ one-shot headers iterables (#22)


@pytest.mark.parametrize("uniques", [False, True])
@pytest.mark.parametrize("count_if", [None, pageviews.is_page_view])
def test_a_one_shot_headers_iterable_reaches_the_server_whole(worker_api, uniques, count_if):
    """Issue #22 item 6: ASGI allows any iterable for the headers; the
    middleware searched a generator for Content-Type and passed the
    exhausted generator on: the page went out without its headers."""
    headers = [(b"content-type", b"text/html"), (b"x-page", b"1")]

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": (pair for pair in headers)})
        await send({"type": "http.response.body", "body": b"<p>hi</p>"})

    mw = TrafficThreshold(app, count_if=count_if, uniques=uniques, account="host",
                          allowed_hosts=["*"])
    sent = call(mw, http_scope())
    got = [tuple(pair) for pair in sent[0]["headers"]]
    assert got[:2] == headers, got
    assert total() == 1


def test_a_one_shot_scope_headers_iterable_reaches_the_app_whole(worker_api):
    """The scope's headers may be a one-shot iterable too: the middleware
    reads Host, Accept and Cookie from it, and the application still sees
    every header."""
    seen = []

    async def app(scope, receive, send):
        seen.extend(scope["headers"])
        await send({"type": "http.response.start", "status": 304, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope = http_scope()
    pairs = list(scope["headers"])
    scope["headers"] = iter(pairs)
    call(TrafficThreshold(app, account="host", allowed_hosts=["*"], uniques=True), scope)
    assert [tuple(p) for p in seen] == pairs
    assert (of("site-a.example"), total()) == (1, 1)   # a 304, Accept: text/html
