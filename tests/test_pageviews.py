"""Tests for trafficthreshold.pageviews: the page-view rule, the Host
account, and the recorder that never raises into a request."""
from __future__ import annotations

import logging
import random

import pytest

import trafficthreshold
from trafficthreshold import pageviews, periods
from trafficthreshold.pageviews import RequestInfo, is_excluded_path, is_page_view


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the once-per-process warnings anew."""
    monkeypatch.setattr(pageviews, "_warned", set())


@pytest.fixture
def no_segment_strict(key):
    """Strict mode pointed at a key where nothing is installed."""
    trafficthreshold.configure(key=key, backend="sysv", strict=True)
    yield key
    trafficthreshold._settings.clear()
    trafficthreshold.configure()


def info(method="GET", path="/", status=200, content_type="text/html", request=None,
         accept=""):
    return RequestInfo(method, path, status, content_type, [], request, accept)


def total(event: str = "pageview") -> int:
    return trafficthreshold.count(None, event, window="60s")


def of(account: str, event: str = "pageview") -> int:
    return trafficthreshold.count(account, event, window="60s")


@pytest.mark.parametrize("value, expected", [
    ("text/html", "text/html"), ("text/HTML; charset=utf-8", "text/html"),
    (" application/xhtml+xml ;q=1", "application/xhtml+xml"), ("", ""), (None, ""),
])
def test_media_type(value, expected):
    assert pageviews.media_type(value) == expected


@pytest.mark.parametrize("path", [
    "/static/app.css", "/static/page.html", "/media/upload/x", "/app.js", "/a/b/LOGO.PNG",
    "/font.woff2", "/app.js.map", "/favicon.ico", "/robots.txt", "/health", "/healthz",
    "/ready", "/livez", "/ping", "/sitemap.xml", "/café/menü.Css", "/a.b/c.JPeG", "/.css",
])
def test_excluded_paths(path):
    assert is_excluded_path(path)


@pytest.mark.parametrize("path", ["/", "/about", "/static", "/staticpage", "/blog/post.html",
                                  "/healthy-living", "/node/12", "/pinguins", "", "/v1.2/page",
                                  "/a." + "x" * 40, "/menü", "/x.cssx", "/x.CS"])
def test_page_paths(path):
    assert not is_excluded_path(path)


def reference_is_excluded(path: str) -> bool:
    """The rule as its documentation states it, in plain Python."""
    last = path.rsplit("/", 1)[-1]
    ext = "." + last.rsplit(".", 1)[-1] if "." in last else ""
    return (path in pageviews.HEALTH_PATHS or path.startswith(pageviews.STATIC_PREFIXES)
            or ext.lower() in pageviews.STATIC_EXTENSIONS)


def test_the_c_rule_is_the_documented_rule():
    """Every extension in any case, under non-ASCII names, behind dots in
    directory names, and random paths: the C code agrees with the rule."""
    rng = random.Random(7)
    paths = [f"/{d}/{f}{ext.upper() if i % 2 else ext}"
             for i, ext in enumerate(sorted(pageviews.STATIC_EXTENSIONS))
             for d in ("a", "v1.2", "café") for f in ("file", "ménü", "")]
    alphabet = "/.aAcCsSjJ-_é\u212a0"
    paths += ["/" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
              for _ in range(5000)]
    assert pageviews.STATIC_EXTENSIONS
    for path in paths:
        assert is_excluded_path(path) == reference_is_excluded(path), path


def test_excluded_path_needs_a_str():
    with pytest.raises(TypeError, match="path must be str"):
        is_excluded_path(b"/static/x.css")


@pytest.mark.parametrize("kwargs, expected", [
    ({}, True),
    ({"method": "HEAD"}, False),
    ({"status": 204}, True),
    ({"status": 301}, False),
    ({"status": 302}, False),
    ({"status": 307}, False),
    ({"status": 308}, False),
    ({"status": 304}, True),
    ({"status": 304, "content_type": "", "accept": "text/html,*/*;q=0.8"}, True),
    ({"status": 304, "content_type": "", "accept": "*/*"}, False),
    ({"status": 304, "content_type": ""}, False),
    ({"status": 304, "content_type": "image/png", "accept": "text/html"}, False),
    ({"status": 304, "method": "HEAD"}, False),
    ({"content_type": "application/xhtml+xml"}, True),
    ({"method": "POST"}, False),
    ({"method": "PUT"}, False),
    ({"status": 404}, False),
    ({"status": 500}, False),
    ({"status": 101}, False),
    ({"content_type": "application/json"}, False),
    ({"content_type": ""}, False),
    ({"content_type": "text/plain"}, False),
    ({"path": "/static/x.html"}, False),
    ({"path": "/healthz"}, False),
])
def test_default_rule(kwargs, expected):
    assert is_page_view(info(**kwargs)) is expected


@pytest.mark.parametrize("accept, expected", [
    ("text/html", True), ("TEXT/HTML", True), (b"text/html", True),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
    ("application/xhtml+xml", True), ("text/html;level=1;q=0.5", True),
    ("*/*", False), ("image/avif,image/webp,*/*", False), ("application/json", False),
    ("text/html;q=0", False), ("text/html; q=0.0, */*", False), ("text/html;q=x", True),
    ("", False), (None, False),
])
def test_accepts_html(accept, expected):
    assert pageviews.accepts_html(accept) is expected


@pytest.mark.parametrize("status, content_type, accept, expected", [
    (200, "text/html", None, True), (299, "text/html", None, True),
    (200, "", "text/html", False), (300, "text/html", None, False),
    (301, "text/html", "text/html", False), (303, "text/html", None, False),
    (304, "text/html", None, True), (304, "", "text/html", True), (304, "", None, False),
    (304, "text/css", "text/html", False), (305, "text/html", None, False),
    (199, "text/html", None, False), (400, "text/html", None, False),
])
def test_is_page_response(status, content_type, accept, expected):
    assert pageviews.is_page_response(status, content_type, accept) is expected


@pytest.mark.parametrize("header, expected", [
    ("Example.COM:8080", "example.com"), ("example.com", "example.com"),
    ("example.com:", "example.com"), (" example.org ", "example.org"),
    ("example.com.", "example.com"), ("Example.COM.:8080", "example.com"),
    ("[::1]:8000", "[::1]"), ("[::1]", "[::1]"), (b"Site.Example:80", "site.example"),
    (None, None), ("", None), (b"", None), (".", None), (":80", None),
])
def test_host_name(header, expected):
    assert pageviews.host_name(header) == expected


def test_account_resolver():
    assert pageviews.account_resolver(None, dict.get) is None
    by_host = pageviews.account_resolver("host", lambda r: r["host"])
    assert by_host({"host": "A.example:1"}) == "a.example"
    func = lambda r: "x"  # noqa: E731
    assert pageviews.account_resolver(func, dict.get) is func
    with pytest.raises(TypeError, match="'host'"):
        pageviews.account_resolver("example.com", dict.get)
    with pytest.raises(TypeError, match="allowed_hosts applies to account='host' only"):
        pageviews.account_resolver(func, dict.get, ["example.com"])
    with pytest.raises(TypeError, match="allowed_hosts applies"):
        pageviews.account_resolver(None, dict.get, ["example.com"])


# -------------------------------------------------------- allowed hosts

PATTERNS = ["site-a.example", ".Site-B.example.", "[::1]", "10.0.0.1"]


@pytest.mark.parametrize("host, allowed", [
    ("site-a.example", True), ("www.site-a.example", False), ("site-a.example.org", False),
    ("site-b.example", True), ("shop.site-b.example", True), ("a.b.c.site-b.example", True),
    ("evilsite-b.example", False), ("site-b.example.evil", False), ("example", False),
    ("[::1]", True), ("[::2]", False), ("10.0.0.1", True), ("10.0.0.10", False),
    ("0.0.1", False), ("", False),
])
def test_host_matcher_is_djangos_rule(host, allowed):
    """The allow-list is Django's ALLOWED_HOSTS rule (checked against
    django.http.request.validate_host itself), by set lookups."""
    from django.http.request import validate_host

    matcher = pageviews.host_matcher(PATTERNS)
    assert matcher(host) is allowed
    django_patterns = [p.lower().rstrip(".") for p in PATTERNS]
    assert validate_host(host, django_patterns) is allowed


def test_host_matcher_star_and_errors():
    assert pageviews.host_matcher(["example.com", "*"]) is None
    assert pageviews.host_matcher([])("example.com") is False
    assert pageviews.host_matcher(("A.example",))("a.example") is True
    with pytest.raises(TypeError, match=r"allowed_hosts=\['example.com'\]"):
        pageviews.host_matcher("example.com")
    with pytest.raises(TypeError, match="not a list"):
        pageviews.host_matcher(42)
    with pytest.raises(TypeError, match="not a str"):
        pageviews.host_matcher([b"example.com"])
    with pytest.raises(ValueError, match="is empty"):
        pageviews.host_matcher(["example.com", "."])


def test_host_matcher_is_lookups_not_a_scan():
    """Thousands of patterns cost no more per host than a few: a host is
    looked up, then each parent domain (no loop over the patterns)."""
    import timeit

    small = pageviews.host_matcher(PATTERNS)
    big = pageviews.host_matcher(PATTERNS + [f"h{i}.example" for i in range(20000)]
                                 + [f".d{i}.example" for i in range(20000)])
    host = "a.b.c.unknown.example"
    t_small = min(timeit.repeat(lambda: small(host), number=2000, repeat=5))
    t_big = min(timeit.repeat(lambda: big(host), number=2000, repeat=5))
    assert not big(host) and big("x.d19999.example") and big("h0.example")
    assert t_big < 3 * t_small, (t_small, t_big)


def test_hosts_outside_the_list_count_in_the_total_only(worker_api, caplog):
    """No key per made-up name: 2,000 made-up hosts add no key; the
    allowed ones count under their (normalised) name; the total counts
    every page; one warning."""
    resolver = pageviews.account_resolver("host", lambda host: host, PATTERNS)
    record = pageviews.make_recorder(resolver, "pageview")
    with caplog.at_level(logging.DEBUG, "trafficthreshold"):
        for i in range(2000):
            record(f"made-up-{i}.example")
        for host in ("SITE-A.example.:8000", "site-a.example", "shop.site-b.example:443"):
            record(host)
    keys = {account for _, account, _ in trafficthreshold._counter._ensure().keys()}
    assert keys == {"~overflow", "all", "site-a.example", "shop.site-b.example"}
    assert (of("site-a.example"), of("shop.site-b.example"), total()) == (2, 1, 2003)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not in allowed_hosts" in warnings[0].getMessage()


def test_no_allow_list_warns_at_start_up(worker_api, caplog):
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        pageviews.middleware_recorder("host", dict.get, "pageview", None)
        pageviews.middleware_recorder("host", dict.get, "pageview", None,
                                      allowed_hosts=["*"])
        pageviews.middleware_recorder(None, dict.get, "pageview", None)
    assert len(caplog.records) == 1
    assert "without allowed_hosts" in caplog.records[0].getMessage()


@pytest.mark.parametrize("event", ["", "a/b", "~x", "e" * 33, "tab\there", 42])
def test_bad_event_rejected_at_configuration(event):
    with pytest.raises((ValueError, TypeError)):
        pageviews.make_recorder(None, event)


def test_request_info_repr():
    assert repr(info()) == "RequestInfo(GET '/' -> 200 text/html)"


def test_recorder_counts_account_and_total(worker_api):
    record = pageviews.make_recorder(lambda request: request, "pageview")
    record("a.example")
    record("a.example")
    record(None)
    assert (of("a.example"), total()) == (2, 3)


def test_recorder_other_event(worker_api):
    pageviews.make_recorder(None, "signup")(None)
    assert (total("signup"), total()) == (1, 0)


@pytest.mark.parametrize("bad", ["a/b", "all", "", "~internal", "x" * 65, "bell\x07",
                                 42, b"bytes"])
def test_invalid_account_goes_to_total_only(worker_api, caplog, bad):
    record = pageviews.make_recorder(lambda request: bad, "pageview")
    with caplog.at_level(logging.DEBUG, "trafficthreshold"):
        for _ in range(3):
            record(None)
    assert total() == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "counted in the total only" in warnings[0].getMessage()


def test_account_function_raising_goes_to_total_only(worker_api, caplog):
    def broken(request):
        raise KeyError("no such header")

    record = pageviews.make_recorder(broken, "pageview")
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        record(None)
        record(None)
    assert total() == 2
    assert len(caplog.records) == 1


def test_account_none_is_the_total_without_warning(worker_api, caplog):
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        pageviews.make_recorder(lambda request: None, "pageview")(None)
    assert total() == 1
    assert not caplog.records


def test_recorder_never_raises_in_strict_mode(no_segment_strict, caplog):
    record = pageviews.make_recorder(lambda request: "a.example", "pageview")
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        record(None)
        record(None)
    assert len(caplog.records) == 1
    assert "SegmentNotFound" in caplog.records[0].getMessage()


def test_recorder_never_raises_whatever_hit_raises(monkeypatch, caplog):
    def explode(*args):
        raise MemoryError("the worst")

    monkeypatch.setattr(pageviews, "_hit", explode)
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        pageviews.make_recorder(lambda request: "bad/name", "pageview")(None)
    assert "not counted" in caplog.text


def test_level_never_raises(no_segment_strict, caplog):
    with pytest.raises(trafficthreshold.SegmentNotFound):
        trafficthreshold.throttle_status()
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        assert pageviews.level() == 0
        assert pageviews.level() == 0
    assert len(caplog.records) == 1


def test_level_reads_the_segment(worker_api):
    trafficthreshold.hit(n=150)  # multiplier 60: level 2
    assert pageviews.level() == 2


def test_warn_once_then_debug(caplog):
    log = logging.getLogger("trafficthreshold.test")
    with caplog.at_level(logging.DEBUG, "trafficthreshold.test"):
        for i in range(3):
            pageviews.warn_once(log, "kind", "problem %d", i)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "logged once per process" in caplog.records[0].getMessage()


# ------------------------------ docs/webapps.rst's table, in each framework
#
# tests/apps/rules_app.py answers as the query string asks; each driver
# sends one request through a framework's middleware (account="host",
# allowed_hosts=ALLOWED) and returns the status the client got.

ALLOWED = ["site-a.example", ".site-b.example"]
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def via_wsgi(method, path, query, host="site-a.example", accept=None):
    import wsgiref.util

    from apps import rules_app
    from trafficthreshold.wsgi import TrafficThreshold

    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
           "SCRIPT_NAME": "", "HTTP_HOST": host}
    if accept is not None:
        env["HTTP_ACCEPT"] = accept
    wsgiref.util.setup_testing_defaults(env)
    statuses = []

    def start_response(status, headers, exc_info=None):
        statuses.append(status)
        return lambda data: None

    mw = TrafficThreshold(rules_app.raw_app, account="host", allowed_hosts=ALLOWED)
    try:
        result = mw(env, start_response)
        b"".join(result)
        getattr(result, "close", lambda: None)()
    except RuntimeError:
        return 500  # what a server answers for an application that raised
    return int(statuses[-1][:3])


def via_asgi(method, path, query, host="site-a.example", accept=None):
    import asyncio

    from apps import rules_app
    from trafficthreshold.asgi import TrafficThreshold

    headers = [(b"host", host.encode())]
    if accept is not None:
        headers.append((b"accept", accept.encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "root_path": "", "headers": headers}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    mw = TrafficThreshold(rules_app.raw_asgi, account="host", allowed_hosts=ALLOWED)
    asyncio.run(mw(scope, receive, send))
    return sent[0]["status"]


def via_django(method, path, query, host="site-a.example", accept=None, **settings):
    from django.test import Client, override_settings

    from apps import django_app  # noqa: F401  (configures Django)

    extra = {"HTTP_HOST": host}
    if accept is not None:
        extra["HTTP_ACCEPT"] = accept
    options = dict(ROOT_URLCONF="apps.rules_django", ALLOWED_HOSTS=ALLOWED,
                   MIDDLEWARE=["trafficthreshold.django.TrafficThresholdMiddleware"],
                   TRAFFICTHRESHOLD={"account": "host"})
    options.update(settings)
    with override_settings(**options):
        client = Client(raise_request_exception=False)
        response = client.generic(method, f"{path}?{query}" if query else path, **extra)
    return response.status_code


DRIVERS = {"wsgi": via_wsgi, "asgi": via_asgi, "django": via_django}

#: (method, path, query, Accept, counted): the rows of the table.
TABLE = [
    ("GET", "/", "", None, True),                                  # an HTML page
    ("GET", "/", "type=application/xhtml%2Bxml", None, True),
    ("GET", "/", "type=TEXT/HTML;+charset=latin-1", None, True),
    ("GET", "/", "status=204", None, True),                        # any 2xx
    ("POST", "/", "", None, False),                                # not GET
    ("PUT", "/", "", None, False),
    ("HEAD", "/", "", None, False),                                # HEAD: never
    ("HEAD", "/", "status=304&type=text/html", BROWSER, False),
    ("GET", "/", "status=301", None, False),                       # redirects: never
    ("GET", "/", "status=302", BROWSER, False),
    ("GET", "/", "status=303", None, False),
    ("GET", "/", "status=307", None, False),
    ("GET", "/", "status=308", None, False),
    ("GET", "/", "status=304&type=text/html", None, True),         # 304 of a page
    ("GET", "/", "status=304&type=none", BROWSER, True),
    ("GET", "/", "status=304&type=none", "*/*", False),            # fetch(), images
    ("GET", "/", "status=304&type=none", None, False),
    ("GET", "/", "status=304&type=image/png", BROWSER, False),
    ("GET", "/", "status=404", None, False),                       # errors
    ("GET", "/", "status=500", None, False),
    ("GET", "/", "type=application/json", None, False),            # not HTML
    ("GET", "/", "type=text/plain", None, False),
    ("GET", "/", "type=none", None, False),
    ("GET", "/static/page.html", "", None, False),                 # static, health
    ("GET", "/media/page", "", None, False),
    ("GET", "/app.JS", "", None, False),
    ("GET", "/healthz", "", None, False),
    ("GET", "/robots.txt", "", None, False),
]


@pytest.mark.parametrize("framework", DRIVERS)
@pytest.mark.parametrize("method, path, query, accept, counted", TABLE)
def test_what_counts(worker_api, framework, method, path, query, accept, counted):
    """Each row of docs/webapps.rst's table, in WSGI, ASGI and Django."""
    DRIVERS[framework](method, path, query, accept=accept)
    assert total() == (1 if counted else 0)
    assert of("site-a.example") == total()


#: WSGI only: start_response's exc_info re-call, an application raising
#: after start_response, generators, write().
WSGI_TABLE = [
    ("/", "then=500", 500, False),                      # 200 restarted as 500
    ("/", "type=application/json&then=500", 500, False),
    ("/", "type=application/json&then=200", 200, True),  # the final status decides
    ("/", "status=404&then=500", 500, False),
    ("/", "raise=1", 500, False),                       # the server answers 500
    ("/", "write=1", 200, True),
    ("/", "write=1&status=500", 500, False),
    ("/gen/", "", 200, True),
    ("/gen/", "then=500", 500, False),
    ("/gen/", "status=304&type=text/html", 304, True),  # an empty body
    ("/gen/", "raise=1", 500, False),
    ("/gen/", "status=302", 302, False),
]


@pytest.mark.parametrize("path, query, status, counted", WSGI_TABLE)
def test_what_counts_wsgi_restarts(worker_api, path, query, status, counted):
    assert via_wsgi("GET", path, query) == status
    assert total() == (1 if counted else 0)


#: Host header -> account (None: the total only), with ALLOWED.
HOSTS = [
    ("site-a.example", "site-a.example"),
    ("Site-A.Example:8000", "site-a.example"),
    ("site-a.example.", "site-a.example"),
    ("SITE-A.EXAMPLE.:443", "site-a.example"),
    ("site-b.example", "site-b.example"),
    ("Shop.Site-B.example", "shop.site-b.example"),
    ("made-up.example", None),
    ("www.site-a.example", None),
    ("evilsite-b.example", None),
    ("site-b.example.evil", None),
]


@pytest.mark.parametrize("framework", DRIVERS)
@pytest.mark.parametrize("host, account", HOSTS)
def test_whose_page_view(worker_api, framework, host, account):
    """Normalised, then matched against the allow-list (Django: by default
    its ALLOWED_HOSTS); outside it, the total only and no new key."""
    DRIVERS[framework]("GET", "/", "", host=host)
    keys = {name for _, name, _ in trafficthreshold._counter._ensure().keys()}
    assert total() == 1
    if account is None:
        assert keys == {"~overflow", "all"}
    else:
        assert keys == {"~overflow", "all", account} and of(account) == 1


def test_django_allowed_hosts_option_narrows_allowed_hosts(worker_api):
    """ALLOWED_HOSTS = ["*"] lets Django serve any host; the option
    TRAFFICTHRESHOLD["allowed_hosts"] still keeps made-up names out."""
    settings = dict(ALLOWED_HOSTS=["*"],
                    TRAFFICTHRESHOLD={"account": "host", "allowed_hosts": ALLOWED})
    for host in ("made-up.example", "other.example", "site-a.example."):
        assert via_django("GET", "/", "", host=host, **settings) == 200
    keys = {name for _, name, _ in trafficthreshold._counter._ensure().keys()}
    assert keys == {"~overflow", "all", "site-a.example"}
    assert total() == 3
    # ["*"] as is: every host is an account, as Django serves every host.
    via_django("GET", "/", "", host="any.example", ALLOWED_HOSTS=["*"])
    assert of("any.example") == 1


def test_django_debug_with_empty_allowed_hosts_is_djangos_default(worker_api):
    settings = dict(ALLOWED_HOSTS=[], DEBUG=True)
    via_django("GET", "/", "", host="localhost:8000", **settings)
    via_django("GET", "/", "", host="app.localhost", **settings)
    assert (of("localhost"), of("app.localhost"), total()) == (1, 1, 2)


# ------------------------------------------------------------ unique visitors

def test_hit_unique_stays_available_to_applications(worker_api):
    """An application may count its own unique visitors (by a login, say):
    ``hit(account, "unique")`` counts the account and ``all``."""
    trafficthreshold.hit("site-a.example", pageviews.UNIQUE_EVENT)
    trafficthreshold.hit(None, "unique")
    assert trafficthreshold.count("site-a.example", "unique", window="60s") == 1
    assert trafficthreshold.count(None, "unique", window="60s") == 2


@pytest.mark.parametrize("zone, now, expected", [
    # 2026-12-01 12:00:00 UTC
    ("UTC", 1_796_126_400, ("20261201", 12 * 3600)),
    ("Europe/Zurich", 1_796_126_400, ("20261201", 11 * 3600)),
    ("Pacific/Kiritimati", 1_796_126_400, ("20261202", 22 * 3600)),  # UTC+14
    # 2026-03-29 in Zurich has 23 hours; 00:30 local, 22.5 hours to go.
    ("Europe/Zurich", 1_774_740_600, ("20260329", 22 * 3600 + 1800)),
    # 2026-10-25 in Zurich has 25 hours; 00:30 local, 24.5 hours to go.
    ("Europe/Zurich", 1_792_881_000, ("20261025", 24 * 3600 + 1800)),
])
def test_day_of_gives_the_stamp_and_the_seconds_to_local_midnight(zone, now, expected):
    assert pageviews.day_of(now, periods.resolve_timezone(zone)) == expected


@pytest.mark.parametrize("header, found", [
    ("tt_day=20261201", True), ("a=b; tt_day=20261201", True), ("tt_day=20261201;a=b", True),
    ("a=b;tt_day=20261201 ", True), (None, False), ("", False), ("tt_day=2026120", False),
    ("tt_day=202612011", False), ("xtt_day=20261201", False), ("a=tt_day=20261201", False),
    ("xtt_day=20261201; tt_day=20261201", True),
])
def test_has_cookie_matches_whole_pairs_only(header, found):
    assert pageviews.has_cookie(header, "tt_day=20261201") is found


def test_the_day_cookie_is_computed_once_per_second():
    calls = []
    cookie = pageviews.UniqueCookie("tt_day", periods.resolve_timezone("UTC"),
                                    clock=lambda: calls.append(1) or 1_796_126_400.7)
    first = cookie.today()
    assert cookie.today() is first and len(calls) == 2
    assert first == ("tt_day=20261201",
                     "tt_day=20261201; Max-Age=43200; Path=/; SameSite=Lax; HttpOnly",
                     "tt_day=20261201; Max-Age=43200; Path=/; SameSite=Lax; HttpOnly; Secure")
    assert cookie.set_cookie("a=1; tt_day=20261201", secure=True) is None
    assert cookie.set_cookie("tt_day=20261130", secure=True) == first[2]
    assert cookie.new_day(None) == ("20261201", 43200)


@pytest.mark.parametrize("name", ["", "tt day", "a;b", "a=b", "é", "x" * 65, 'a"b'])
def test_cookie_names_must_be_tokens(name):
    with pytest.raises(ValueError, match="not a valid cookie name"):
        pageviews.check_cookie_name(name)


# ------------------------------- one rule, two implementations (issue #22 item 5)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

#: The table every implementation of the rule is tested against (the PHP
#: extension's tests read it too).
CASES = json.loads((Path(__file__).parent / "data" / "pageview_cases.json").read_text())["cases"]


def python_rule(status: int, content_type: str | None, accept: str | None) -> bool:
    """The Python implementation (ASGI, Django): the media type of the
    header, then is_page_response."""
    return pageviews.is_page_response(status, pageviews.media_type(content_type), accept)


def c_rule(status: int, content_type: str | None, accept: str | None) -> bool:
    """The C implementation (_middleware.c), through the WSGI middleware:
    whether a GET answered so is counted."""
    from trafficthreshold.wsgi import TrafficThreshold

    headers = [] if content_type is None else [("Content-Type", content_type)]
    def app(environ, start_response):
        start_response(f"{status} Whatever", headers)
        return [b""]

    counting = TrafficThreshold(app, count_if=None)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http"}
    if accept is not None:
        environ["HTTP_ACCEPT"] = accept
    before = total()
    counting(environ, lambda *args: None)
    return total() - before == 1


@pytest.mark.parametrize("case", CASES, ids=[f"{c['status']}-{c['content_type']!r}-"
                                             f"{c['accept']!r}" for c in CASES])
def test_both_implementations_follow_the_table(worker_api, case):
    args = (case["status"], case["content_type"], case["accept"])
    assert python_rule(*args) is case["counted"], case["why"]
    assert c_rule(*args) is case["counted"], case["why"]


CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(["text/html", "application/xhtml+xml", "text/css", "", " ", ";", "image/png"]),
    st.builds(lambda pre, t, post, params: pre + t + post + params,
              st.sampled_from(["", " ", "\t", "\x0b"]),
              st.sampled_from(["", "text/html", "TEXT/Html", "text/plain", "application/json"]),
              st.sampled_from(["", " ", "\t"]),
              st.sampled_from(["", ";", "; charset=utf-8", ";q=1;x=y", ";charset=\"a;b\""])),
    st.text(max_size=12))
ACCEPTS = st.one_of(st.none(), st.sampled_from(["text/html", "*/*", "text/html;q=0",
                                                "image/*,*/*;q=0.8", ""]),
                    st.text(max_size=12))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.sampled_from([200, 204, 299, 301, 304, 404, 500]), content_type=CONTENT_TYPES,
       accept=ACCEPTS)
def test_the_c_and_python_rules_agree_on_any_response(worker_api, status, content_type, accept):
    """Whatever the status, Content-Type and Accept: the same verdict (the
    segment is shared by the examples; each looks at its own difference)."""
    assert python_rule(status, content_type, accept) is c_rule(status, content_type, accept)
