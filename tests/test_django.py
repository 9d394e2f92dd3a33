"""Tests for trafficthreshold.django: the middleware under Django's test
client (sync and async stacks, settings variants), and a real request
through gunicorn serving the Django project of tests/apps/django_app.py."""
from __future__ import annotations

import logging

import pytest

django = pytest.importorskip("django")

from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402

import trafficthreshold  # noqa: E402
from trafficthreshold import pageviews  # noqa: E402
from trafficthreshold.django import TrafficThresholdMiddleware  # noqa: E402

from apps import django_app, harness  # noqa: E402,F401  # importing it configures Django
from apps.harness import fresh_warnings, of, total  # noqa: E402,F401  (fresh_warnings: an autouse fixture)




def test_pages_are_counted_by_host(worker_api):
    client = Client()
    home = client.get("/", HTTP_HOST="Site-A.example:8000")
    assert home.status_code == 200
    assert b"level 0" in home.content and b"optional" in home.content
    assert home["X-Level"] == "0"
    assert client.get("/api").json() == {"hello": "world"}
    assert client.get("/go", HTTP_HOST="site-b.example").status_code == 302   # not counted
    assert client.get("/assets/app.html").status_code == 200     # under STATIC_URL
    assert client.get("/nothing").status_code == 404
    assert client.post("/").status_code == 200                     # POST: not counted
    assert client.head("/").status_code == 200                     # HEAD: not counted
    stream = client.get("/stream")
    assert b"".join(stream.streaming_content) == b"<p>0</p><p>1</p><p>2</p>"
    assert (of("site-a.example"), of("site-b.example"), of("testserver"), total()) == (
        1, 0, 1, 2)


def test_a_navigation_through_a_redirect_is_one_view(worker_api):
    page = Client().get("/go", follow=True, HTTP_HOST="site-b.example")
    assert page.status_code == 200 and page.redirect_chain == [("/", 302)]
    assert (of("site-b.example"), total()) == (1, 1)


def test_a_not_modified_page_is_a_view(worker_api):
    """Django's ConditionalGetMiddleware answers 304 (without Content-Type)
    to a browser revalidating a page: counted; to a fetch(): not."""
    stack = ["trafficthreshold.django.TrafficThresholdMiddleware",
             "django.middleware.http.ConditionalGetMiddleware"]
    with override_settings(MIDDLEWARE=stack):
        client = Client()
        first = client.get("/", HTTP_ACCEPT="text/html,*/*;q=0.8")
        etag = first["ETag"]
        again = client.get("/", HTTP_IF_NONE_MATCH=etag, HTTP_ACCEPT="text/html,*/*;q=0.8")
        fetched = client.get("/", HTTP_IF_NONE_MATCH=etag, HTTP_ACCEPT="*/*")
    assert (first.status_code, again.status_code, fetched.status_code) == (200, 304, 304)
    assert "Content-Type" not in again
    assert total() == 2


def test_errors_are_not_counted_and_not_changed(worker_api):
    client = Client(raise_request_exception=False)
    assert client.get("/boom").status_code == 500
    assert total() == 0


def test_disallowed_host_is_not_an_account(worker_api):
    """CommonMiddleware answers 400 for a host outside ALLOWED_HOSTS: not
    a page view.  Without it, the page counts in the total only."""
    assert Client().get("/", HTTP_HOST="evil.example").status_code == 400
    with override_settings(MIDDLEWARE=["trafficthreshold.django.TrafficThresholdMiddleware"]):
        assert Client().get("/", HTTP_HOST="evil.example").status_code == 200
    assert total() == 1
    assert trafficthreshold._counter._ensure().find("evil.example", "pageview") is None


def test_the_level_reaches_views_and_templates(worker_api):
    trafficthreshold.hit(n=200)  # multiplier 60: level 3
    home = Client().get("/")
    assert home["X-Level"] == "3"
    assert b"level 3" in home.content and b"optional" not in home.content


def test_async_stack(worker_api):
    import asyncio

    async def requests():
        client = AsyncClient()
        page = await client.get("/async")
        api = await client.get("/api")
        return page, api

    page, api = asyncio.run(requests())
    assert page.status_code == 200 and b"async level 0" in page.content
    assert api.status_code == 200
    assert (of("testserver"), total()) == (1, 1)


def test_middleware_follows_the_stack_kind():
    def sync_view(request):
        return None

    async def async_view(request):
        return None

    from asgiref.sync import iscoroutinefunction
    assert not iscoroutinefunction(TrafficThresholdMiddleware(sync_view))
    assert iscoroutinefunction(TrafficThresholdMiddleware(async_view))


@override_settings(TRAFFICTHRESHOLD={"account": "apps.django_app.section_account",
                                     "event": "view",
                                     "count_if": "apps.django_app.count_api_only"})
def test_settings_by_dotted_path(worker_api):
    client = Client()
    client.get("/")
    client.get("/api")
    assert (trafficthreshold.count("api", "view", "60s"), total("view"), total()) == (1, 1, 0)


@override_settings(TRAFFICTHRESHOLD={"account": lambda request: "x/y"})
def test_invalid_account_counts_in_the_total(worker_api, caplog):
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        Client().get("/")
        Client().get("/")
    assert total() == 2
    assert len(caplog.records) == 1 and caplog.records[0].name == "trafficthreshold.django"


@override_settings(TRAFFICTHRESHOLD=None)
def test_no_setting_counts_the_total(worker_api):
    Client().get("/", HTTP_HOST="site-a.example")
    assert (total(), of("site-a.example")) == (1, 0)


def test_never_raises(worker_api, monkeypatch, caplog):
    def explode(*args):
        raise RuntimeError("segment on fire")

    monkeypatch.setattr(pageviews, "_hit", explode)
    monkeypatch.setattr(pageviews, "_throttle_status", explode)
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        home = Client().get("/")
    assert home.status_code == 200 and home["X-Level"] == "0"
    assert len(caplog.records) == 2


@pytest.mark.parametrize("setting, message", [
    ({"acount": "host"}, "unknown keys"),
    ({"account": "no.such.module.func"}, "cannot be imported"),
    ({"account": "example.com"}, "cannot be imported"),
    ({"event": "a/b"}, "'/'"),
    ({"count_if": 3}, "callable"),
    (["host"], "must be a dict"),
    ({"account": "host", "allowed_hosts": "example.com"}, "single string"),
    ({"account": "host", "allowed_hosts": [""]}, "is empty"),
    ({"allowed_hosts": ["example.com"]}, "account='host' only"),
])
def test_bad_settings_are_improperly_configured(setting, message):
    with override_settings(TRAFFICTHRESHOLD=setting):
        with pytest.raises(ImproperlyConfigured, match=message):
            TrafficThresholdMiddleware(lambda request: None)


def test_real_requests_through_gunicorn(installed, tmp_path):
    """The Django project under gunicorn (2 sync workers), configured only
    by the environment: pages count under their (normalised) host; HEAD,
    redirects, JSON, STATIC_URL, POST and hosts outside ALLOWED_HOSTS do
    not."""
    key, backend = installed
    server = harness.gunicorn("apps.django_app:application", harness.server_env(key, backend),
                              tmp_path / "gunicorn.log", workers=2)
    try:
        server.wait_ready(path="/api", workers=2)
        first = harness.epoch_minute()
        answers = [harness.get(server.port, path, method, host) for path, method, host in [
            ("/", "GET", "site-a.example"), ("/", "GET", "Site-A.example:80"),
            ("/", "HEAD", "site-b.example"), ("/stream", "GET", "site-b.example"),
            ("/api", "GET", "site-a.example"), ("/assets/app.html", "GET", "site-a.example"),
            ("/", "GET", "evil.example"), ("/", "POST", "site-a.example"),
            ("/", "GET", "site-a.example."), ("/go", "GET", "site-b.example")]]
        last = harness.epoch_minute()
    finally:
        server.stop()
    assert [a[0] for a in answers] == [200, 200, 200, 200, 200, 200, 400, 200, 200, 302]
    assert answers[0][1]["x-level"] == "0"
    assert answers[3][2] == b"<p>0</p><p>1</p><p>2</p>"
    assert harness.segment_count(key, backend, first, last) == 4
    assert harness.segment_count(key, backend, first, last, "site-a.example") == 3
    assert harness.segment_count(key, backend, first, last, "site-b.example") == 1


# ------------------------------------------------------------ unique visitors

#: 2026-12-01 23:59:59 in Zurich: one second before midnight.
BEFORE_MIDNIGHT = 1_796_165_999
CLOCK = [BEFORE_MIDNIGHT]
UNIQUES = {"account": "host", "uniques": True, "timezone": "Europe/Zurich",
           "clock": lambda: CLOCK[0]}


def uniques(account: str = "site-a.example") -> tuple[int, int]:
    return (trafficthreshold.count(account, "unique", window="60s"), total("unique"))


def test_uniques_are_off_by_default(worker_api):
    response = Client().get("/", HTTP_HOST="site-a.example")
    assert "tt_day" not in response.cookies and total("unique") == 0


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_first_page_view_of_the_day_is_unique(worker_api, client_class):
    """The test client keeps cookies like a browser: one unique, then page
    views; after local midnight the stale cookie makes a new unique (sync
    and async stacks)."""
    import asyncio

    CLOCK[0] = BEFORE_MIDNIGHT
    with override_settings(TRAFFICTHRESHOLD=UNIQUES):
        client = client_class()

        def get(path="/"):
            result = client.get(path)  # Host: testserver
            return asyncio.run(result) if client_class is AsyncClient else result

        first = get()
        cookie = first.cookies["tt_day"]
        assert cookie.value == "20261201" and cookie["max-age"] == 1
        assert (cookie["path"], cookie["samesite"], cookie["httponly"], cookie["secure"]) == (
            "/", "Lax", True, "")
        assert "tt_day" not in get().cookies
        assert "tt_day" not in get("/api").cookies          # not a page view
        assert "tt_day" not in get("/go").cookies           # a redirect
        CLOCK[0] += 1
        assert get().cookies["tt_day"].value == "20261202"
    assert (of("testserver"), uniques("testserver")) == (3, (2, 2))


def test_https_cookie_is_secure_and_the_apps_own_cookie_wins(worker_api):
    CLOCK[0] = BEFORE_MIDNIGHT
    with override_settings(TRAFFICTHRESHOLD={**UNIQUES, "unique_cookie": "visit"}):
        response = Client().get("/", HTTP_HOST="site-a.example", secure=True)
        assert response.cookies["visit"]["secure"] is True
    with override_settings(TRAFFICTHRESHOLD={**UNIQUES, "unique_cookie": "csrftoken"}):
        middleware = TrafficThresholdMiddleware(lambda request: None)
    from django.http import HttpResponse
    from django.test import RequestFactory
    response = HttpResponse("<p>hi</p>")
    response.set_cookie("csrftoken", "theirs")
    middleware._unique(RequestFactory().get("/"), response)
    assert response.cookies["csrftoken"].value == "theirs"
    assert uniques() == (1, 1)


def test_unique_failures_are_logged_not_raised(worker_api, caplog):
    def broken_clock():
        raise RuntimeError("clock on fire")

    with override_settings(TRAFFICTHRESHOLD={**UNIQUES, "clock": broken_clock}):
        with caplog.at_level(logging.WARNING, "trafficthreshold"):
            response = Client().get("/", HTTP_HOST="site-a.example")
    assert response.status_code == 200 and "tt_day" not in response.cookies
    assert (of("site-a.example"), uniques()) == (1, (0, 0))
    assert "clock on fire" in caplog.text


@pytest.mark.parametrize("setting, message", [
    ({"uniques": "yes"}, "must be True or False"),
    ({"uniques": True, "unique_cookie": "a b"}, "not a valid cookie name"),
    ({"uniques": True, "timezone": "Mars/Olympus"}, "unknown time zone"),
])
def test_bad_unique_settings_are_improperly_configured(setting, message):
    with override_settings(TRAFFICTHRESHOLD=setting):
        with pytest.raises(ImproperlyConfigured, match=message):
            TrafficThresholdMiddleware(lambda request: None)


def test_unique_visitors_through_gunicorn(installed, tmp_path):
    """The day cookie through Django's WSGI handler under a real gunicorn
    (2 workers): on a visitor's first page view only (not on the page views
    carrying it, JSON or a redirect), not Secure over http, unique counted
    once per visitor."""
    key, backend = installed
    server = harness.gunicorn("apps.django_uniques:application",
                              harness.server_env(key, backend, TT_TEST_TIMEZONE="UTC"),
                              tmp_path / "gunicorn.log", workers=2)

    def get(path, cookie=None):
        return harness.get_page(server.port, path, cookie=cookie)

    try:
        server.wait_ready(path="/api", workers=2)
        first = harness.epoch_minute()
        status, value = get("/")
        cookie = value.partition(";")[0]
        again = [get("/", cookie), get("/", f"a=b; {cookie}"), get("/api"), get("/go")]
        last = harness.epoch_minute()
    finally:
        server.stop()
    assert status == 200 and cookie.startswith("tt_day=")
    assert "HttpOnly" in value and "SameSite=Lax" in value and "Path=/" in value
    assert "Secure" not in value
    assert again == [(200, None), (200, None), (200, None), (302, None)]
    assert harness.segment_count(key, backend, first, last, "site-a.example") == 3
    assert harness.segment_count(key, backend, first, last, "site-a.example", "unique") == 1


# ------------------------------ streaming that fails before its first chunk (#22)


def test_a_stream_failing_before_its_first_chunk_is_not_counted(worker_api):
    """Issue #22 item 4, Django: a streaming response was counted when it
    came back through the middleware, before its content ran; content that
    raises before its first chunk is the server's 500."""
    client = Client()
    failing = client.get("/stream-fails")
    assert total() == 0
    with pytest.raises(RuntimeError):
        b"".join(failing.streaming_content)
    assert total() == 0
    good = client.get("/stream", HTTP_HOST="site-a.example")
    assert total() == 0                       # not sent yet
    assert b"".join(good.streaming_content) == b"<p>0</p><p>1</p><p>2</p>"
    empty = client.get("/stream-empty")
    assert b"".join(empty.streaming_content) == b""
    assert (of("site-a.example"), total()) == (1, 2)


def test_an_async_stream_failing_before_its_first_chunk_is_not_counted(worker_api):
    import asyncio

    async def requests():
        client = AsyncClient()
        failing = await client.get("/async-stream?fail=1")
        try:
            async for _chunk in failing.streaming_content:
                pass
        except RuntimeError:
            pass
        good = await client.get("/async-stream")
        return [chunk async for chunk in good.streaming_content]

    assert asyncio.run(requests()) == [b"<p>0</p>", b"<p>1</p>"]
    assert total() == 1


def test_under_waitress_a_failing_stream_is_a_500_and_not_counted(worker_api):
    statuses = harness.statuses_under_waitress(
        django_app.application, ["/stream-fails", "/stream", "/stream-fails"])
    assert statuses == [500, 200, 500]
    assert (of("site-a.example"), total()) == (1, 1)
