"""A hello-world WSGI application, the smallest page there is.

``raw_app`` is the bare application, ``app`` the same wrapped by
:class:`trafficthreshold.wsgi.TrafficThreshold` (``account`` from the
environment variable ``TT_TEST_ACCOUNT``: ``host`` or unset for the total
only).  Served by tests/test_gunicorn.py and benchmarks/bench_middleware.py::

    gunicorn --chdir tests apps.hello:app       # with the middleware
    gunicorn --chdir tests apps.hello:raw_app   # without

Paths: ``/static/...`` a stylesheet, ``/healthz`` plain text, ``/api`` JSON,
``/level`` the throttle level the middleware put in the environ (HTML),
anything else the HTML hello page.
"""
from __future__ import annotations

import os

from trafficthreshold.wsgi import TrafficThreshold

PAGE = b"<!doctype html><title>hello</title><p>Hello, world!</p>\n"
CSS = b"body { color: #222; }\n"
HTML = "text/html; charset=utf-8"


def _answer(start_response, content_type: str, body: bytes, head: bool = False):
    start_response("200 OK", [("Content-Type", content_type),
                              ("Content-Length", str(len(body)))])
    return [] if head else [body]


def raw_app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    head = environ.get("REQUEST_METHOD") == "HEAD"
    if path.startswith("/static/"):
        return _answer(start_response, "text/css", CSS)
    if path == "/healthz":
        return _answer(start_response, "text/plain", b"ok\n")
    if path == "/api":
        return _answer(start_response, "application/json", b'{"hello": "world"}\n')
    if path == "/level":
        level = environ.get("trafficthreshold.level")
        return _answer(start_response, HTML, f"<p>level {level}</p>\n".encode())
    if path == "/pid":
        return _answer(start_response, "text/plain", f"{os.getpid()}\n".encode())
    return _answer(start_response, HTML, PAGE, head)


app = TrafficThreshold(raw_app, account=os.environ.get("TT_TEST_ACCOUNT") or None)
