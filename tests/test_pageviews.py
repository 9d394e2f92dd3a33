"""Tests for trafficthreshold.pageviews: the page-view rule, the Host
account, and the recorder that never raises into a request."""
from __future__ import annotations

import logging
import random

import pytest

import trafficthreshold
from trafficthreshold import pageviews
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


def info(method="GET", path="/", status=200, content_type="text/html", request=None):
    return RequestInfo(method, path, status, content_type, [], request)


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
    ({"method": "HEAD"}, True),
    ({"status": 204}, True),
    ({"status": 301}, True),
    ({"status": 304}, True),
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


@pytest.mark.parametrize("header, expected", [
    ("Example.COM:8080", "example.com"), ("example.com", "example.com"),
    ("example.com:", "example.com"), (" example.org ", "example.org"),
    ("[::1]:8000", "[::1]"), ("[::1]", "[::1]"), (b"Site.Example:80", "site.example"),
    (None, None), ("", None), (b"", None),
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
