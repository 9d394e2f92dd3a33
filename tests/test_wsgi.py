"""Tests for trafficthreshold.wsgi: what is counted, when, and that the
response is never changed and no error ever reaches the request.

In process, against the test's own segment (``worker_api``); the same
middleware under a real gunicorn is tests/test_gunicorn.py.
"""
from __future__ import annotations

import logging
import sys
import wsgiref.util
import wsgiref.validate

import pytest

import trafficthreshold
from trafficthreshold import pageviews
from trafficthreshold.wsgi import TrafficThreshold

from apps import flask_app  # imported (its middleware created) before any test's segment
from apps.harness import fresh_warnings, of, total  # noqa: F401  (fresh_warnings: an autouse fixture)

HTML = [("Content-Type", "text/html; charset=utf-8")]




def environ(path: str = "/", method: str = "GET", host: str = "Site-A.example:8000",
            **extra) -> dict:
    env = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path,
           "QUERY_STRING": "", "HTTP_HOST": host}
    wsgiref.util.setup_testing_defaults(env)
    env.update(extra)
    return env


class Server:
    """A recording start_response, as a server provides it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def start_response(self, status, headers, exc_info=None):
        self.calls.append((status, headers, exc_info))
        return self.write


def app_answering(status: str = "200 OK", headers=HTML, body=(b"<p>hi</p>",)):
    def app(environ, start_response):
        start_response(status, headers)
        return list(body)
    return app


def restarted_as_500(environ, start_response):
    """A page that fails after starting its response: 200, then 500 through
    start_response's exc_info."""
    start_response("200 OK", HTML)
    try:
        raise RuntimeError("template failed")
    except RuntimeError:
        start_response("500 Internal Server Error", HTML, sys.exc_info())
    return [b"<p>error</p>"]


def serve(middleware, env=None):
    server = Server()
    result = middleware(env or environ(), server.start_response)
    body = b"".join(result)
    if hasattr(result, "close"):
        result.close()
    return server, body


def test_counts_an_html_page_by_host(worker_api):
    mw = TrafficThreshold(app_answering(), account="host")
    server, body = serve(mw)
    assert body == b"<p>hi</p>"
    assert server.calls == [("200 OK", HTML, None)]
    assert (of("site-a.example"), total()) == (1, 1)


def test_total_only_by_default(worker_api):
    serve(TrafficThreshold(app_answering()))
    assert total() == 1
    assert trafficthreshold._counter._ensure().keys() == [
        (0, "~overflow", "~any"), (1, "all", "pageview")]


@pytest.mark.parametrize("env, status, headers", [
    ({"method": "POST"}, "200 OK", HTML),
    ({"method": "DELETE"}, "200 OK", HTML),
    ({"method": "HEAD"}, "200 OK", HTML),
    ({}, "301 Moved Permanently", HTML),
    ({}, "302 Found", HTML),
    ({}, "304", []),  # no Accept: not a browser loading a page
    ({}, "3040 Odd", HTML),
    ({}, "404 Not Found", HTML),
    ({}, "500 Internal Server Error", HTML),
    ({}, "200 OK", [("Content-Type", "application/json")]),
    ({}, "200 OK", [("Content-Type", "text/plain")]),
    ({}, "200 OK", []),
    ({"path": "/static/page.html"}, "200 OK", HTML),
    ({"path": "/media/a.png"}, "200 OK", HTML),
    ({"path": "/bundle.JS"}, "200 OK", HTML),
    ({"path": "/healthz"}, "200 OK", HTML),
    ({"path": "/favicon.ico"}, "200 OK", HTML),
    ({"path": "/robots.txt"}, "200 OK", HTML),
])
def test_not_page_views(worker_api, env, status, headers):
    serve(TrafficThreshold(app_answering(status, headers)), environ(**env))
    assert total() == 0


@pytest.mark.parametrize("env, status, headers", [
    ({}, "304 Not Modified", HTML),
    ({}, "304", []),  # no Content-Type, as Django and Werkzeug send a 304
    ({}, "204 No Content", [("content-type", "TEXT/HTML")]),
    ({}, "200 OK", [("X-Other", "1"), ("Content-Type", "application/xhtml+xml")]),
])
def test_page_views(worker_api, env, status, headers):
    env.setdefault("HTTP_ACCEPT", "text/html,*/*;q=0.8")
    serve(TrafficThreshold(app_answering(status, headers)), environ(**env))
    assert total() == 1


def test_response_passes_unchanged(worker_api):
    """A body with a length is the application's own object (its close()
    and len() stay the server's business), start_response gets the same
    arguments and its write callable is returned."""
    class Body:
        closed = False

        def __iter__(self):
            return iter([b"a", b"b"])

        def __len__(self):
            return 2

        def close(self):
            self.closed = True

    body, seen = Body(), {}

    def app(environ, start_response):
        seen["write"] = start_response("200 OK", HTML)
        return body

    server = Server()
    result = TrafficThreshold(app)(environ(), server.start_response)
    assert result is body
    assert seen["write"] == server.write
    assert server.calls == [("200 OK", HTML, None)]
    assert server.calls[0][1] is HTML
    result.close()
    assert body.closed


@pytest.mark.parametrize("call, counted", [
    (lambda sr: sr("200 OK", HTML), 1),
    (lambda sr: sr("200 OK", HTML, None), 1),
    (lambda sr: sr("200 OK", HTML, exc_info=None), 1),
    (lambda sr: sr(headers=HTML, status="200 OK"), 1),
    (lambda sr: sr("200 OK", HTML, exc_info=sys.exc_info()), 1),  # (None, None, None)
])
def test_start_response_calling_conventions(worker_api, call, counted):
    def app(environ, start_response):
        call(start_response)
        return [b"<p>hi</p>"]

    server, body = serve(TrafficThreshold(app))
    assert [c[:2] for c in server.calls] == [("200 OK", HTML)]
    assert total() == counted


@pytest.mark.parametrize("status, headers", [
    ("200 OK", [["Content-Type", "text/html"]]),  # lists, not tuples (PEP 3333)
    ("200 OK", [("Content-Type", ["text/html"])]),  # an unhashable value
    ("200 OK", None),
])
def test_malformed_headers_are_logged_not_raised(worker_api, caplog, status, headers):
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        server, body = serve(TrafficThreshold(app_answering(status, headers)))
    assert body == b"<p>hi</p>" and server.calls == [(status, headers, None)]
    assert total() == 0
    assert "could not decide" in caplog.text


@pytest.mark.parametrize("status", [b"200 OK", "", 200])
def test_odd_statuses_are_not_counted(worker_api, status):
    server, body = serve(TrafficThreshold(app_answering(status)))
    assert body == b"<p>hi</p>" and total() == 0


def test_an_environ_that_is_not_a_dict_is_left_alone(worker_api):
    class Environ(dict):
        pass

    seen = []

    def app(environ, start_response):
        seen.append(("trafficthreshold.level" in environ, type(environ)))
        return app_answering()(environ, start_response)

    serve(TrafficThreshold(app), Environ(environ()))
    assert seen == [(True, Environ)] and total() == 1  # a dict subclass is a dict
    from collections import UserDict
    server, body = serve(TrafficThreshold(app), UserDict(environ()))
    assert body == b"<p>hi</p>" and seen[1] == (False, UserDict) and total() == 1


def test_an_application_may_replace_itself_while_it_runs(worker_api):
    def second(environ, start_response):
        return app_answering(body=(b"second",))(environ, start_response)

    mw = TrafficThreshold(None)

    def first(environ, start_response):
        mw.app = second  # the middleware's last reference to `first`
        return app_answering(body=(b"first",))(environ, start_response)

    mw.app = first
    del first
    assert serve(mw)[1] == b"first"
    assert serve(mw)[1] == b"second"
    assert total() == 2


def grown_over(requests: int, make_request, warm_up: int = 500, before_measure=lambda: None) -> int:
    """Bytes still allocated after ``requests`` calls of ``make_request()``
    (after ``warm_up`` calls first, and a collection): a leaked object per
    request shows as thousands of bytes per request."""
    import gc
    import tracemalloc

    for _ in range(warm_up):
        make_request()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(requests):
            make_request()
        before_measure()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_no_leak_and_cycles_are_collected(worker_api):
    """Each counted request allocates a start_response object; none
    survives its request, including through a reference cycle an
    application makes (environ -> start_response -> environ)."""
    import gc
    import weakref

    class Marker:
        pass

    markers = []

    def app(environ, start_response):
        environ["keep"] = start_response  # the cycle
        marker = environ["marker"] = Marker()
        markers.append(weakref.ref(marker))
        start_response("200 OK", HTML)
        return [b"x"]

    mw = TrafficThreshold(app, account="host")
    grown = grown_over(20000, lambda: serve(mw, environ()), warm_up=1000,
                       before_measure=markers.clear)
    assert grown < 50_000, grown  # a leaked object per request would be > 1 MB
    serve(mw, environ())
    gc.collect()
    assert markers[-1]() is None
    assert of("site-a.example") == 21001


def test_excluded_requests_get_the_servers_start_response(worker_api):
    server, seen = Server(), {}

    def app(environ, start_response):
        seen["start_response"] = start_response
        start_response("200 OK", HTML)
        return []

    TrafficThreshold(app)(environ("/static/x.css"), server.start_response)
    assert seen["start_response"] == server.start_response


def test_counted_when_the_status_is_known(worker_api):
    """A generator application starts its response at the first next():
    the count follows, not the middleware call."""
    def app(environ, start_response):
        start_response("200 OK", HTML)
        yield b"<p>one</p>"
        yield b"<p>two</p>"

    server = Server()
    result = TrafficThreshold(app)(environ(), server.start_response)
    assert total() == 0
    assert next(iter(result)) == b"<p>one</p>"
    assert total() == 1
    assert list(result) == [b"<p>two</p>"]
    result.close()
    assert total() == 1


def test_exc_info_restart_the_final_status_decides(worker_api):
    """An application that fails after starting its response calls
    start_response again with exc_info: both calls reach the server as
    they were made, and the final status (500) decides: not counted.
    (Regression: the first call's 200 used to be counted.)"""
    server = Server()
    serve_body = b"".join(TrafficThreshold(restarted_as_500)(environ(), server.start_response))
    assert serve_body == b"<p>error</p>"
    assert [call[0] for call in server.calls] == ["200 OK", "500 Internal Server Error"]
    assert server.calls[1][2][0] is RuntimeError
    assert total() == 0


def test_exc_info_restart_of_a_generator(worker_api):
    """The same in a generator (start_response while the body is
    iterated): decided at the first non-empty chunk, by the 500."""
    def app(environ, start_response):
        start_response("200 OK", HTML)
        yield b""
        try:
            raise RuntimeError("template failed")
        except RuntimeError:
            start_response("500 Internal Server Error", HTML, sys.exc_info())
        yield b"<p>error</p>"

    server = Server()
    result = TrafficThreshold(app)(environ(), server.start_response)
    assert next(iter(result)) == b"" and total() == 0
    assert list(result) == [b"<p>error</p>"]
    result.close()
    assert [call[0] for call in server.calls] == ["200 OK", "500 Internal Server Error"]
    assert total() == 0


def test_an_application_raising_after_start_response_is_not_counted(worker_api):
    """The server answers 500 for it (gunicorn does: see test_gunicorn)."""
    def app(environ, start_response):
        start_response("200 OK", HTML)
        raise LookupError("the view failed")

    def generator(environ, start_response):
        start_response("200 OK", HTML)
        raise LookupError("the view failed")
        yield b""

    with pytest.raises(LookupError):
        TrafficThreshold(app)(environ(), Server().start_response)
    result = TrafficThreshold(generator)(environ(), Server().start_response)
    with pytest.raises(LookupError):
        list(result)
    result.close()
    assert total() == 0


def test_write_is_counted_by_the_status_at_return(worker_api):
    def app(environ, start_response):
        write = start_response("200 OK", HTML)
        write(b"<p>one</p>")
        return []

    server = Server()
    assert list(TrafficThreshold(app)(environ(), server.start_response)) == []
    assert server.calls == [("200 OK", HTML, None), ("write", b"<p>one</p>")]
    assert total() == 1


def test_generator_body_passes_chunks_and_close(worker_api):
    """A generator application's body is wrapped: every chunk and close()
    pass through; an iterable without close() is fine; nothing is counted
    after close()."""
    closed = []

    class Chunks:
        def __init__(self, start_response):
            self.start_response = start_response

        def __iter__(self):
            self.start_response("200 OK", HTML)
            yield b"a"
            yield b"b"

    class Closable(Chunks):
        def close(self):
            closed.append(True)

    result = TrafficThreshold(lambda env, sr: Chunks(sr))(environ(), Server().start_response)
    assert type(result).__name__ == "Body"
    assert list(result) == [b"a", b"b"] and total() == 1
    result.close()  # Chunks has no close(): nothing to call
    result = TrafficThreshold(lambda env, sr: Closable(sr))(environ(), Server().start_response)
    result.close()
    assert closed == [True] and total() == 1  # closed before its first chunk: not sent


def test_generator_bodies_do_not_leak(worker_api):

    def app(environ, start_response):
        start_response("200 OK", HTML)
        yield b"x"

    mw = TrafficThreshold(app, account="host")
    grown = grown_over(10000, lambda: serve(mw, environ()), warm_up=1000)
    assert grown < 50_000, grown
    assert of("site-a.example") == 11000


def test_exc_info_recall_of_a_json_response_is_not_counted(worker_api):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        try:
            raise RuntimeError
        except RuntimeError:
            start_response("500 Internal Server Error", HTML, sys.exc_info())
        return [b""]

    serve(TrafficThreshold(app))
    assert total() == 0


def test_refused_start_response_is_not_counted(worker_api):
    """If the server raises in start_response (here: an exc_info re-call
    after the headers were sent), the exception reaches the application as
    it would without the middleware, and nothing more is counted."""
    def refuse(status, headers, exc_info=None):
        raise exc_info[1] if exc_info else ValueError("hop-by-hop header")

    def app(environ, start_response):
        start_response("200 OK", HTML)
        return []

    with pytest.raises(ValueError, match="hop-by-hop"):
        TrafficThreshold(app)(environ(), refuse)
    assert total() == 0


def test_app_errors_propagate_and_are_not_counted(worker_api):
    def app(environ, start_response):
        raise LookupError("the app's own bug")

    with pytest.raises(LookupError):
        TrafficThreshold(app)(environ(), Server().start_response)
    assert total() == 0


def test_level_in_environ(worker_api):
    seen = []

    def app(environ, start_response):
        seen.append(environ["trafficthreshold.level"])
        return app_answering()(environ, start_response)

    trafficthreshold.hit(n=130)  # 130 in the last 60 s, multiplier 60: level 2
    mw = TrafficThreshold(app)
    serve(mw)
    serve(mw, environ("/static/app.css"))
    assert seen == [2, 2]


def test_level_key_is_configurable(worker_api):
    seen = []

    def app(environ, start_response):
        seen.append(sorted(k for k in environ if "level" in k))
        return app_answering()(environ, start_response)

    serve(TrafficThreshold(app, environ_key="myapp.throttle_level"))
    serve(TrafficThreshold(app, environ_key=None))
    assert seen == [["myapp.throttle_level"], []]


def test_event_option(worker_api):
    serve(TrafficThreshold(app_answering(), event="landing"))
    assert (total("landing"), total()) == (1, 0)


def test_account_callable_receives_the_environ(worker_api):
    mw = TrafficThreshold(app_answering(), account=lambda env: env["PATH_INFO"].split("/")[1])
    serve(mw, environ("/shop/cart"))
    serve(mw, environ("/blog/post"))
    assert (of("shop"), of("blog"), total()) == (1, 1, 2)


def test_hosts_counted_exactly_as_the_memo_fills_and_starts_over(worker_api, monkeypatch):
    """account="host": record() resolves hosts through a bounded memo; a
    full memo starts over (HOST_MEMO_SIZE) and the counts stay exact."""
    monkeypatch.setattr(pageviews, "HOST_MEMO_SIZE", 4)
    mw = TrafficThreshold(app_answering(), account="host")
    hosts = [f"Site-{i}.example" + (":8000" if i % 2 else "") for i in range(10)]
    for round_ in range(3):
        for host in hosts:
            serve(mw, environ(host=host))
    assert [of(f"site-{i}.example") for i in range(10)] == [3] * 10
    assert total() == 30
    assert 0 < len(mw.record.account.memo) <= 4


@pytest.mark.parametrize("host", ["a/b.example", "ev\x01l", "x" * 80 + ".example"])
def test_invalid_host_counts_in_the_total_with_one_warning(worker_api, caplog, host):
    mw = TrafficThreshold(app_answering(), account="host", allowed_hosts=["*"])
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        for _ in range(3):
            server, _ = serve(mw, environ(host=host))
            assert server.calls == [("200 OK", HTML, None)]
    assert total() == 3
    assert len(caplog.records) == 1
    assert caplog.records[0].name == "trafficthreshold.wsgi"


def test_missing_host_counts_in_the_total(worker_api, caplog):
    env = environ()
    del env["HTTP_HOST"]
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        serve(TrafficThreshold(app_answering(), account="host", allowed_hosts=["*"]), env)
    assert total() == 1
    assert not caplog.records


def test_count_if_replaces_the_rule(worker_api):
    seen = []

    def only_api(info):
        seen.append(info)
        return info.path.startswith("/api/")

    api = TrafficThreshold(app_answering(headers=[("Content-Type", "application/json")]),
                           count_if=only_api)
    serve(api, environ("/api/items", method="POST"))
    serve(TrafficThreshold(app_answering(), count_if=only_api), environ("/"))
    assert total() == 1
    first = seen[0]
    assert (first.method, first.path, first.status, first.content_type) == (
        "POST", "/api/items", 200, "application/json")
    assert first.headers == [("Content-Type", "application/json")]
    assert first.request["PATH_INFO"] == "/api/items"


def test_count_if_can_extend_the_default(worker_api):
    def also_static_html(info):
        return pageviews.is_page_view(info) or info.path == "/static/landing.html"

    mw = TrafficThreshold(app_answering(), count_if=also_static_html)
    serve(mw, environ("/static/landing.html"))
    serve(mw, environ("/"))
    serve(mw, environ("/static/other.html"))
    assert total() == 2


def test_count_if_raising_is_logged_not_raised(worker_api, caplog):
    def broken(info):
        raise ZeroDivisionError

    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        server, body = serve(TrafficThreshold(app_answering(), count_if=broken))
    assert body == b"<p>hi</p>"
    assert total() == 0
    assert "could not decide" in caplog.text


@pytest.mark.parametrize("account", [None, "host"])
def test_never_raises_when_everything_fails(worker_api, monkeypatch, caplog, account):
    """hit() and throttle_status() raising (as a segment error does in
    strict mode), for the C code (the level, the total-only hit) and the
    Python record() (an account) alike: logged once each, never raised."""
    def explode(*args):
        raise RuntimeError("segment on fire")

    mw = TrafficThreshold(app_answering(), account=account,
                          allowed_hosts=None if account is None else ["*"])
    monkeypatch.setattr(pageviews, "_hit", explode)
    monkeypatch.setattr(pageviews, "_throttle_status", explode)
    pageviews._setup_c(explode, explode)
    seen = []

    def app(environ, start_response):
        seen.append(environ["trafficthreshold.level"])
        return app_answering()(environ, start_response)

    mw.app = app
    try:
        with caplog.at_level(logging.WARNING, "trafficthreshold"):
            server, body = serve(mw)
            serve(mw)
    finally:
        pageviews._setup_c(trafficthreshold.hit, trafficthreshold.throttle_status)
    assert body == b"<p>hi</p>" and seen == [0, 0]
    assert server.calls == [("200 OK", HTML, None)]
    assert total() == 0
    assert len(caplog.records) == 2, caplog.text  # the level once, the hit once
    assert "segment on fire" in caplog.text


def test_strict_mode_without_segment_does_not_raise(key, caplog):
    trafficthreshold.configure(key=key, backend="sysv", strict=True)
    try:
        with caplog.at_level(logging.WARNING, "trafficthreshold"):
            mw = TrafficThreshold(app_answering())
            server, body = serve(mw)
            serve(mw)
    finally:
        trafficthreshold._settings.clear()
        trafficthreshold.configure()
    assert body == b"<p>hi</p>"
    assert "SegmentNotFound" in caplog.text or "no trafficthreshold segment" in caplog.text


@pytest.mark.parametrize("kwargs, error", [
    ({"event": "a/b"}, ValueError), ({"event": ""}, ValueError),
    ({"account": "example.com"}, TypeError), ({"count_if": "yes"}, TypeError),
    ({"account": "host", "allowed_hosts": "example.com"}, TypeError),
    ({"account": "host", "allowed_hosts": ["example.com", ""]}, ValueError),
    ({"allowed_hosts": ["example.com"]}, TypeError),  # without account="host"
])
def test_bad_options_raise_at_start_up(kwargs, error):
    with pytest.raises(error):
        TrafficThreshold(app_answering(), **kwargs)


def generator_app(environ, start_response):
    start_response("200 OK", HTML)
    yield b"<p>hi</p>"


@pytest.mark.parametrize("generator", [False, True])
@pytest.mark.parametrize("path, method", [("/", "GET"), ("/", "HEAD"), ("/static/a.css", "GET"),
                                          ("/", "POST")])
def test_wsgiref_validator_is_satisfied(worker_api, path, method, generator):
    """wsgiref.validate checks both sides: the middleware as an application
    (inner validator) and as a server of the application (outer); also
    with a generator application (its body wrapped)."""
    inner = wsgiref.validate.validator(generator_app if generator else app_answering())
    app = wsgiref.validate.validator(TrafficThreshold(inner))
    env = environ(path, method)
    env.pop("HTTP_HOST")
    server = Server()
    result = app(env, server.start_response)
    assert list(result) == [b"<p>hi</p>"]
    result.close()
    assert server.calls[0][0] == "200 OK"
    assert total() == (1 if (path, method) == ("/", "GET") else 0)


# ------------------------------------------------------------------ Flask

@pytest.fixture
def flask_client(worker_api):
    return flask_app.app.test_client()


def test_flask_pages_and_the_rest(flask_client):
    home = flask_client.get("/", headers={"Host": "Shop.Example"})
    assert home.status_code == 200 and b"level 0" in home.data
    assert b"optional block" in home.data
    assert flask_client.get("/static/app.css").status_code == 200
    assert flask_client.get("/api/data").json == {"hello": "world"}
    assert flask_client.get("/go").status_code == 302           # a redirect: not counted
    assert flask_client.get("/missing").status_code == 404
    assert flask_client.get("/boom").status_code == 500
    assert flask_client.head("/").status_code == 200           # HEAD: not counted
    stream = flask_client.get("/stream")
    assert stream.data == b"<p>chunk 0</p><p>chunk 1</p><p>chunk 2</p>"
    assert flask_client.post("/").status_code == 405
    assert (of("shop.example"), of("localhost"), total()) == (1, 1, 2)


def test_flask_a_stream_failing_before_its_first_chunk_is_a_500_not_counted(worker_api):
    """docs/webapps.rst, "When": Flask's streaming body is decided at its
    first non-empty chunk, under a real server."""
    from apps.harness import statuses_under_waitress
    statuses = statuses_under_waitress(flask_app.app, ["/stream-fails", "/stream",
                                                       "/stream-fails"])
    assert statuses == [500, 200, 500]
    assert (of("site-a.example"), total()) == (1, 1)


def test_flask_a_navigation_through_a_redirect_is_one_view(flask_client):
    page = flask_client.get("/go", follow_redirects=True)
    assert page.status_code == 200 and [r.status_code for r in page.history] == [302]
    assert total() == 1


def test_flask_reads_the_level(flask_client):
    trafficthreshold.hit(n=200)
    page = flask_client.get("/")
    assert b"level 3" in page.data and b"optional block" not in page.data


def restarting_late(sized: bool = False):
    """An application that starts its response (200) in its call and
    returns a body that restarts it as 500 (exc_info) when iterated; with a
    length if ``sized``."""
    class Restarting:
        def __init__(self, start_response):
            self.start_response = start_response

        def __iter__(self):
            try:
                raise RuntimeError("late failure")
            except RuntimeError:
                self.start_response("500 Internal Server Error", HTML, sys.exc_info())
            yield b"<p>error</p>"

    class Sized(Restarting):
        def __len__(self):
            return 1

    def app(environ, start_response):
        start_response("200 OK", HTML)
        return (Sized if sized else Restarting)(start_response)
    return app


def test_a_restart_while_a_started_body_is_iterated_decides(worker_api):
    """An application that started its response in its call and returns a
    body still to be produced is decided at its first non-empty chunk: an
    exc_info restart while the server iterates it (500) decides."""
    server = Server()
    result = TrafficThreshold(restarting_late())(environ(), server.start_response)
    assert total() == 0
    assert list(result) == [b"<p>error</p>"]
    assert [call[0] for call in server.calls] == ["200 OK", "500 Internal Server Error"]
    assert total() == 0


def test_a_restart_while_a_sized_body_is_iterated_comes_after_the_decision(worker_api):
    """The documented limit: a body with a length (passed as it is, for the
    server's len()) is decided at the application's return; a later
    exc_info restart while it is iterated does not change the count."""
    result = TrafficThreshold(restarting_late(sized=True))(environ(), Server().start_response)
    assert total() == 1
    assert list(result) == [b"<p>error</p>"]
    assert total() == 1


# ------------------------------------------------------------ unique visitors

ZURICH = "Europe/Zurich"
#: 2026-12-01 23:59:58 in Zurich (22:59:58 UTC): two seconds before midnight.
BEFORE_MIDNIGHT = 1_796_165_998


def uniques(account: str | None = "site-a.example") -> tuple[int, int]:
    """The sliding-60 s ``unique`` events of one account, and of ``all``."""
    return (trafficthreshold.count(account, "unique", window="60s") if account else 0,
            total("unique"))


def set_cookie(call: tuple) -> list[str]:
    """The Set-Cookie values of one recorded start_response call."""
    return [value for name, value in call[1] if name.lower() == "set-cookie"]


def unique_mw(app=None, **options):
    options.setdefault("timezone", ZURICH)
    return TrafficThreshold(app or app_answering(), uniques=True, account="host",
                            allowed_hosts=["*"], **options)


def test_uniques_are_off_by_default(worker_api):
    server, _ = serve(TrafficThreshold(app_answering()))
    assert server.calls == [("200 OK", HTML, None)]
    assert total("unique") == 0


def test_first_page_view_of_the_day_is_unique_and_sets_the_day_cookie(worker_api):
    t = [BEFORE_MIDNIGHT - 3600]
    headers = list(HTML)
    mw = unique_mw(app_answering(headers=headers), clock=lambda: t[0])
    server, body = serve(mw)
    assert body == b"<p>hi</p>"
    assert set_cookie(server.calls[0]) == [
        "tt_day=20261201; Max-Age=3602; Path=/; SameSite=Lax; HttpOnly"]
    assert server.calls[0][1][:-1] == HTML and headers == HTML  # the app's list untouched
    assert (of("site-a.example"), total()) == (1, 1)
    assert uniques() == (1, 1)
    # The same visitor again, with the cookie among others: a page view only.
    for cookie in ("tt_day=20261201", "a=1; tt_day=20261201", "tt_day=20261201;b=2"):
        server, _ = serve(mw, environ(HTTP_COOKIE=cookie))
        assert server.calls == [("200 OK", HTML, None)], cookie
    assert (total(), uniques()) == (4, (1, 1))


def test_a_lookalike_or_stale_cookie_is_a_new_unique(worker_api):
    t = [BEFORE_MIDNIGHT]
    mw = unique_mw(clock=lambda: t[0])
    for cookie in ("tt_day=20261130", "xtt_day=20261201", "tt_day=202612011",
                   "tt_day=2026120", "other=tt_day=20261201x"):
        server, _ = serve(mw, environ(HTTP_COOKIE=cookie))
        assert set_cookie(server.calls[0])[0].startswith("tt_day=20261201;"), cookie
    assert uniques() == (5, 5)


def test_the_day_turns_at_local_midnight(worker_api):
    """The stamp is cached per second of the clock: at 00:00:00 local the
    cookie of a minute ago is yesterday's, and Max-Age is the whole day."""
    t = [BEFORE_MIDNIGHT + 1]
    mw = unique_mw(clock=lambda: t[0])
    server, _ = serve(mw)
    assert set_cookie(server.calls[0]) == [
        "tt_day=20261201; Max-Age=1; Path=/; SameSite=Lax; HttpOnly"]
    server, _ = serve(mw, environ(HTTP_COOKIE="tt_day=20261201"))
    assert set_cookie(server.calls[0]) == []
    t[0] += 1  # 00:00:00 on 2 December in Zurich
    server, _ = serve(mw, environ(HTTP_COOKIE="tt_day=20261201"))
    assert set_cookie(server.calls[0]) == [
        "tt_day=20261202; Max-Age=86400; Path=/; SameSite=Lax; HttpOnly"]
    assert uniques() == (2, 2) and total() == 3


def test_the_zone_decides_the_day(worker_api):
    """23:59:58 in Zurich is 07:59:58 the next day in Tokyo."""
    server, _ = serve(unique_mw(timezone="Asia/Tokyo", clock=lambda: BEFORE_MIDNIGHT))
    assert set_cookie(server.calls[0])[0].startswith("tt_day=20261202; Max-Age=57602;")


def test_secure_on_https_and_the_cookie_name_option(worker_api):
    mw = unique_mw(unique_cookie="__Host-visit")
    server, _ = serve(mw, environ(**{"wsgi.url_scheme": "https"}))
    value, = set_cookie(server.calls[0])
    assert value.startswith("__Host-visit=") and value.endswith("; HttpOnly; Secure")
    server, _ = serve(mw, environ(HTTP_COOKIE=value.partition(";")[0]))
    assert set_cookie(server.calls[0]) == []


@pytest.mark.parametrize("env, status, headers", [
    (environ("/api"), "200 OK", [("Content-Type", "application/json")]),
    (environ(method="HEAD"), "200 OK", HTML),
    (environ(method="POST"), "200 OK", HTML),
    (environ("/static/app.css"), "200 OK", HTML),
    (environ("/healthz"), "200 OK", HTML),
    (environ(), "302 Found", [("Location", "/next")] + HTML),
    (environ(), "404 Not Found", HTML),
])
def test_only_page_views_get_the_cookie(worker_api, env, status, headers):
    server, _ = serve(unique_mw(app_answering(status, headers)), env)
    assert server.calls == [(status, headers, None)]
    assert uniques() == (0, 0)


def test_an_exc_info_restart_drops_the_cookie_and_the_unique(worker_api):
    """200 (a unique page view: the cookie is added) restarted as 500: the
    server gets the 500's headers, without the cookie; nothing counted."""
    def generator(environ, start_response):
        yield from restarted_as_500(environ, start_response)

    for application in (restarted_as_500, generator):
        server = Server()
        result = unique_mw(application)(environ(), server.start_response)
        assert b"".join(result) == b"<p>error</p>"
        assert len(set_cookie(server.calls[0])) == 1
        assert server.calls[1] == ("500 Internal Server Error", HTML, server.calls[1][2])
    assert (total(), uniques()) == (0, (0, 0))


def test_a_restart_from_an_error_to_a_page_sets_the_cookie(worker_api):
    def app(environ, start_response):
        start_response("503 Service Unavailable", HTML)
        start_response("200 OK", HTML, (None, None, None))
        return [b"<p>ok</p>"]

    server, _ = serve(unique_mw(app))
    assert set_cookie(server.calls[0]) == [] and len(set_cookie(server.calls[1])) == 1
    assert (total(), uniques()) == (1, (1, 1))


def test_keyword_headers_and_count_if(worker_api):
    def app(environ, start_response):
        start_response(status="200 OK", headers=[("Content-Type", "application/json")])
        return [b"{}"]

    server, _ = serve(unique_mw(app, count_if=lambda info: info.path == "/"))
    assert len(set_cookie(server.calls[0])) == 1
    assert (total(), uniques()) == (1, (1, 1))


def test_unique_failures_are_logged_and_the_page_still_counts(worker_api, caplog):
    def broken_clock():
        raise RuntimeError("clock on fire")

    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        server, body = serve(unique_mw(clock=broken_clock))
        serve(unique_mw(clock=lambda: "not a time"))
    assert body == b"<p>hi</p>" and server.calls == [("200 OK", HTML, None)]
    assert (total(), uniques()) == (2, (0, 0))
    assert "a unique visitor was not counted" in caplog.text and "clock on fire" in caplog.text


def test_a_failing_unique_hit_is_logged_not_raised(worker_api, monkeypatch, caplog):
    real = pageviews._hit

    def hit(account, event="pageview"):
        if event == "unique":
            raise RuntimeError("segment on fire")
        real(account, event)

    monkeypatch.setattr(pageviews, "_hit", hit)
    with caplog.at_level(logging.WARNING, "trafficthreshold"):
        server, body = serve(unique_mw())
    assert body == b"<p>hi</p>" and len(set_cookie(server.calls[0])) == 1
    assert (total(), uniques()) == (1, (0, 0))
    assert "segment on fire" in caplog.text


@pytest.mark.parametrize("kwargs, error", [
    ({"unique_cookie": "tt day"}, ValueError), ({"unique_cookie": ""}, ValueError),
    ({"unique_cookie": "a;b"}, ValueError), ({"unique_cookie": 3}, TypeError),
    ({"uniques": "yes"}, TypeError), ({"timezone": "Mars/Olympus"}, ValueError),
    ({"timezone": 2}, TypeError),
])
def test_bad_unique_options_raise_at_start_up(kwargs, error):
    with pytest.raises(error, match="unique_cookie|uniques|time zone|timezone"):
        TrafficThreshold(app_answering(), **{"uniques": True, **kwargs})


def test_wsgiref_validator_with_uniques(worker_api):
    app = wsgiref.validate.validator(unique_mw(wsgiref.validate.validator(app_answering())))
    server, body = serve(app)
    assert body == b"<p>hi</p>" and len(set_cookie(server.calls[0])) == 1


@pytest.mark.parametrize("cookie", [None, "tt_day=20261201"])
def test_uniques_do_not_leak(worker_api, cookie):
    """The unique path (a copy of the headers, the Set-Cookie pair) and the
    returning visitor's path (the search) leave nothing behind; the clock
    moves every request, so the day is recomputed each time too."""

    t = [BEFORE_MIDNIGHT - 50_000]

    def clock():
        t[0] += 1
        return t[0]

    mw = unique_mw(clock=clock)
    env = environ(HTTP_COOKIE=cookie) if cookie else environ()
    grown = grown_over(5000, lambda: serve(mw, dict(env)))
    assert grown < 50_000, grown  # a leaked object per request would be > 250 kB
    assert uniques() == ((5500, 5500) if cookie is None else (0, 0))


# ------------------------------- a body that fails before its first byte (#22)


def failing_body(environ, start_response):
    """Starts its response in its call, then its body raises before its
    first byte: the server answers 500."""
    start_response("200 OK", HTML)

    def body():
        raise RuntimeError("the template failed")
        yield b""  # pragma: no cover

    return body()


class FailingIterable:
    """The same as an iterable object (an ORM's lazy rendering, say)."""

    def __init__(self, start_response):
        start_response("200 OK", HTML)

    def __iter__(self):
        raise RuntimeError("the template failed")

    def close(self):
        pass


@pytest.mark.parametrize("app", [failing_body, lambda env, sr: FailingIterable(sr)],
                         ids=["generator", "iterable"])
def test_a_body_raising_before_its_first_byte_is_not_counted(worker_api, app):
    """Issue #22 item 4: the status was decided when the application
    returned, so a page the visitor received as a 500 was counted."""
    result = TrafficThreshold(app)(environ(), Server().start_response)
    assert total() == 0
    with pytest.raises(RuntimeError):
        list(result)
    result.close()
    assert total() == 0


def test_a_list_body_is_decided_at_return_and_passed_as_it_is(worker_api):
    """Lists (the common case, and what the benchmark serves) cannot fail:
    counted at return, the list itself handed to the server."""
    body = [b"<p>hi</p>"]
    result = TrafficThreshold(lambda env, sr: (sr("200 OK", HTML), body)[1])(
        environ(), Server().start_response)
    assert result is body and total() == 1


def test_a_body_with_a_length_or_the_file_wrapper_is_passed_as_it_is(worker_api, tmp_path):
    """The server reads len() (Content-Length) and recognizes its own
    file_wrapper by type (sendfile): those are never wrapped."""
    class Sized:
        def __iter__(self):
            return iter([b"<p>hi</p>"])

        def __len__(self):
            return 1

    class FileWrapper:
        def __init__(self, file):
            self.file = file

        def __iter__(self):
            return iter([self.file.read()])

    sized = Sized()
    assert TrafficThreshold(lambda env, sr: (sr("200 OK", HTML), sized)[1])(
        environ(), Server().start_response) is sized
    page = tmp_path / "page.html"
    page.write_bytes(b"<p>hi</p>")
    wrapped = FileWrapper(open(page, "rb"))
    env = environ(**{"wsgi.file_wrapper": FileWrapper})
    assert TrafficThreshold(lambda env, sr: (sr("200 OK", HTML), wrapped)[1])(
        env, Server().start_response) is wrapped
    wrapped.file.close()
    assert total() == 2


def test_under_waitress_a_failing_body_is_a_500_and_not_counted(worker_api):
    """The same under a real server: waitress answers 500 for the failing
    body, 200 for the page; one page view counted."""
    from apps.harness import statuses_under_waitress

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/fails":
            return failing_body(environ, start_response)
        start_response("200 OK", HTML)
        return iter([b"<p>a page</p>"])   # an iterator: counted at its first chunk

    statuses = statuses_under_waitress(TrafficThreshold(app), ["/fails", "/page", "/fails"])
    assert statuses == [500, 200, 500]
    assert total() == 1


@pytest.mark.parametrize("server", ["gunicorn", "waitress"])
def test_the_real_servers_file_wrappers_are_passed_as_they_are(worker_api, tmp_path, server):
    """gunicorn recognizes its FileWrapper by isinstance (then sendfile),
    waitress its ReadOnlyFileBasedBuffer by its class: the middleware hands
    the very object back, and the page is counted at return."""
    if server == "gunicorn":
        from gunicorn.http.wsgi import FileWrapper
    else:
        from waitress.buffers import ReadOnlyFileBasedBuffer as FileWrapper
    page = tmp_path / "page.html"
    page.write_bytes(b"<p>hi</p>")
    with open(page, "rb") as file:
        wrapped = FileWrapper(file)
        env = environ(**{"wsgi.file_wrapper": FileWrapper})
        result = TrafficThreshold(lambda env, sr: (sr("200 OK", HTML), wrapped)[1])(
            env, Server().start_response)
        assert result is wrapped
    assert total() == 1


# ------------------------------------------ uWSGI's function-style file_wrapper


def start_uwsgi(worker_api, tmp_path, size: int):  # noqa: ANN001, ANN201
    """A real uWSGI (one worker) serving tests/apps/uwsgi_file.py, its page
    ``size`` random bytes: (the server, the page's bytes, the marks'
    directory)."""
    import os
    import re
    import shutil
    from pathlib import Path

    from apps.harness import Server, server_env
    binary = shutil.which("uwsgi") or str(Path(sys.executable).parent / "uwsgi")
    if not os.path.exists(binary):
        pytest.skip("uWSGI is not installed (pip install uwsgi: the test extra)")
    key, backend = worker_api
    page = tmp_path / "page.html"
    data = os.urandom(size)
    page.write_bytes(data)
    marks = tmp_path / "marks"
    marks.mkdir()
    return Server([binary, "--http-socket", "127.0.0.1:0", "--module", "apps.uwsgi_file:app",
                   "--master", "--processes", "1", "--need-app", "--die-on-term",
                   "--disable-logging"],
                  server_env(key, backend, TT_FILE=str(page), TT_MARKS=str(marks)),
                  tmp_path / "uwsgi.log",
                  port_pattern=re.compile(r"bound to TCP address 127\.0\.0\.1:(\d+)")), data, marks


def test_uwsgis_file_wrapper_of_a_file_like_without_a_file_is_served_and_counted(
        worker_api, tmp_path):
    """PEP 3333 lets an application hand wsgi.file_wrapper any object with
    read(); uWSGI's returns it and, when the application returns that very
    object, reads it with read().  Behind the middleware: an object with
    read() and close() only (not iterable, no fileno) and an io.BytesIO
    (whose fileno() raises) are served intact and counted once each, as
    without the middleware (before: the read()-only one was wrapped, the
    wrapper iterated it, and the page failed)."""
    import urllib.request
    server, data, _marks = start_uwsgi(worker_api, tmp_path, 100_000)
    try:
        url = f"http://127.0.0.1:{server.wait_port()}/"
        bodies = {}
        for path in ("readonly", "bytesio"):
            try:
                bodies[path] = urllib.request.urlopen(url + path, timeout=10).read()
            except Exception as exc:  # noqa: BLE001 - the page failed: said below
                bodies[path] = repr(exc)
    finally:
        server.stop()
    assert {p: b == data for p, b in bodies.items()} == {"readonly": True, "bytesio": True}, {
        p: b[:200] for p, b in bodies.items() if b != data}
    assert total() == 2


def test_uwsgis_function_file_wrapper_is_sent_as_a_file_counted_once(worker_api, tmp_path):
    """A real uWSGI serves a page through its wsgi.file_wrapper, which is a
    function (it returns the very file it was given, and sends it with
    sendfile() only when the application returns that object): behind the
    middleware each request is counted exactly once, the file arrives
    intact, close() is called on it, and it is sent as a file, never read
    through Python (before: the middleware wrapped it in its Body, and
    uWSGI read the file chunk by chunk).  A generator that raises before
    its first byte is not counted."""
    import http.client
    import urllib.error
    import urllib.request
    server, data, marks = start_uwsgi(worker_api, tmp_path, 300_000)
    try:
        url = f"http://127.0.0.1:{server.wait_port()}/"
        bodies = [urllib.request.urlopen(url + f"page/{i}", timeout=10).read()
                  for i in range(5)]
        try:  # uWSGI answers 500, or an empty 200 (the headers it sent already)
            urllib.request.urlopen(url + "fails", timeout=10).read()
        except (urllib.error.HTTPError, ConnectionError, http.client.HTTPException):
            pass
    finally:
        server.stop()
    assert all(body == data for body in bodies)
    assert total() == 5
    made = sorted(p.name for p in marks.iterdir())
    closed = [m for m in made if m.startswith("close-")]
    assert len(closed) == 5, made
    assert not [m for m in made if m.startswith("read-")], f"read through Python: {made}"


def test_a_uwsgi_file_body_is_counted_once_when_the_client_leaves_early(worker_api, tmp_path):
    """A client that reads the headers and a few bytes of a large file
    sent by uWSGI's sendfile() and hangs up: the page view is counted once
    (decided when the application returned the file, not by how much was
    sent), and the file is still closed."""
    import socket
    import time
    server, _data, marks = start_uwsgi(worker_api, tmp_path, 8_000_000)
    try:
        port = server.wait_port()
        for i in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(f"GET /page/{i} HTTP/1.1\r\nHost: site-a.example\r\n\r\n".encode())
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                                b"\x00\x00\x00\x00")               # a reset, not a clean close
        deadline = time.monotonic() + 10
        while len(list(marks.iterdir())) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
    assert total() == 3
    made = sorted(p.name for p in marks.iterdir())
    assert [m for m in made if m.startswith("close-")] == made and len(made) == 3, made
