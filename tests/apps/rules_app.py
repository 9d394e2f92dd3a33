"""An application that answers as the request asks, to test what counts as
a page view (docs/webapps.rst's table) in WSGI, ASGI and, through
``apps.rules_django``, Django; in process and under a real server::

    gunicorn --chdir tests apps.rules_app:app
    uvicorn --app-dir tests apps.rules_app:asgi_app

The query string says what to answer: ``status`` (default 200), ``type``
(the Content-Type; ``none``: no such header; default ``text/html;
charset=utf-8``), and for WSGI ``then`` (call ``start_response`` again with
``exc_info`` and this status after an error, as a framework's error handler
does), ``raise`` (``1``: raise after ``start_response``) and ``write``
(``1``: send the body with the legacy ``write()``).  Paths under ``/gen/``
answer from a generator (``start_response`` called while the body is
iterated).  The body is ``<p>STATUS</p>`` (empty for 204 and 304).

``app`` / ``asgi_app`` are wrapped with ``account="host"`` and
``allowed_hosts`` from ``TT_TEST_ALLOWED_HOSTS`` (comma-separated; unset:
``site-a.example,.site-b.example``).
"""
from __future__ import annotations

import os
import sys
from urllib.parse import parse_qs

from apps.asgi_app import lifespan
from trafficthreshold import asgi, wsgi

DEFAULT_TYPE = "text/html; charset=utf-8"
ALLOWED_HOSTS = (os.environ.get("TT_TEST_ALLOWED_HOSTS")
                 or "site-a.example,.site-b.example").split(",")
REASONS = {200: "OK", 204: "No Content", 301: "Moved Permanently", 302: "Found",
           303: "See Other", 304: "Not Modified", 307: "Temporary Redirect",
           308: "Permanent Redirect", 404: "Not Found", 500: "Internal Server Error"}


class Asked:
    """What the query string asks for."""

    def __init__(self, query: str) -> None:
        q = {k: v[-1] for k, v in parse_qs(query).items()}
        self.status = int(q.get("status", "200"))
        kind = q.get("type", DEFAULT_TYPE)
        self.headers = [] if kind == "none" else [("Content-Type", kind)]
        self.then = int(q["then"]) if "then" in q else None
        self.raise_ = q.get("raise") == "1"
        self.write = q.get("write") == "1"

    def line(self, status: int) -> str:
        return f"{status} {REASONS.get(status, 'Whatever')}"

    def body(self, status: int) -> bytes:
        return b"" if status in (204, 304) else f"<p>{status}</p>".encode()

    def location(self, status: int) -> list[tuple[str, str]]:
        return [("Location", "/")] if 300 <= status < 400 and status != 304 else []


def _respond(asked: Asked, start_response):
    """Start the response (and restart it after an error, if asked):
    (the final status, the write() callable)."""
    headers = asked.headers + asked.location(asked.status)
    write = start_response(asked.line(asked.status), headers)
    if asked.raise_:
        raise RuntimeError("the application failed after start_response")
    if asked.then is None:
        return asked.status, write
    try:
        raise RuntimeError("a template failed after start_response")
    except RuntimeError:
        write = start_response(asked.line(asked.then), [("Content-Type", DEFAULT_TYPE)],
                               sys.exc_info())
    return asked.then, write


def raw_app(environ, start_response):
    asked = Asked(environ.get("QUERY_STRING", ""))
    if environ.get("PATH_INFO", "").startswith("/gen/"):
        return _generate(asked, start_response)
    status, write = _respond(asked, start_response)
    body = asked.body(status)
    if asked.write:
        write(body)
        return []
    return [body] if body else []


def _generate(asked: Asked, start_response):
    status, _ = _respond(asked, start_response)
    body = asked.body(status)
    if body:
        yield body


async def raw_asgi(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    asked = Asked(scope.get("query_string", b"").decode("latin-1"))
    headers = [(n.lower().encode(), v.encode())
               for n, v in asked.headers + asked.location(asked.status)]
    await send({"type": "http.response.start", "status": asked.status, "headers": headers})
    await send({"type": "http.response.body", "body": asked.body(asked.status)})


app = wsgi.TrafficThreshold(raw_app, account="host", allowed_hosts=ALLOWED_HOSTS)
asgi_app = asgi.TrafficThreshold(raw_asgi, account="host", allowed_hosts=ALLOWED_HOSTS)
