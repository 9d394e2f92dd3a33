"""WSGI middleware: count page views, and hand the throttle level to the app.

::

    from trafficthreshold.wsgi import TrafficThreshold
    application = TrafficThreshold(application, account="host")

    # in the application:
    if environ["trafficthreshold.level"] >= 2:
        skip_optional_blocks()

What it does per request:

* puts the throttle level (0..5, :func:`trafficthreshold.throttle_status`)
  in ``environ["trafficthreshold.level"]`` before calling the application;
* requests that cannot be page views (not GET/HEAD, static files, health
  checks: :mod:`trafficthreshold.pageviews`) go to the application as they
  are, with the server's own ``start_response``;
* for the others it wraps ``start_response``: when the application calls it
  (the status and headers are known, no byte of the body has been sent),
  the request is counted if the response is a page view.  At most once per
  request: a second call (the ``exc_info`` re-call of an application that
  failed after starting its response) is passed on, never counted again.

It never changes the response: the status, the headers, the body iterable
(returned as it is, so ``close()``, ``wsgi.file_wrapper`` and streaming
behave exactly as without the middleware) and ``write()``.  It never raises
into a request: every counting error is logged once per process
(``trafficthreshold.wsgi`` logger) and the request goes on.  It does not
block: a hit is an atomic add in shared memory (the semaphore, taken with a
50 ms timeout, is needed only when a key or a minute is new).

The middleware attaches to the segment when it is created, which with
``gunicorn --preload`` is in the master before the fork; every forked
worker then takes its own stripe of the counters (``_counter.c``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

from . import pageviews
from .pageviews import (COUNTED_METHODS, RequestInfo, _html_memo, is_excluded_path, is_html,
                         warn_once)

log = logging.getLogger("trafficthreshold.wsgi")

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
CountIf = Callable[[RequestInfo], bool]

_throttle_status = pageviews._throttle_status
_GOOD_STATUS = ("2", "3")


def environ_host(environ: Environ) -> Optional[str]:
    """The Host header of a WSGI request (None if the client sent none)."""
    return environ.get("HTTP_HOST")


class TrafficThreshold:
    """Wrap a WSGI application.

    ``account``: None (count the total only), ``"host"`` (the Host header,
    lower-cased, without port) or a callable ``account(environ) -> str |
    None``.  ``event``: the event name (default ``"pageview"``).
    ``count_if``: ``count_if(info: RequestInfo) -> bool`` replaces the
    default rule :func:`trafficthreshold.pageviews.is_page_view`.
    ``environ_key``: where the throttle level goes (None: nowhere).

    Invalid names raise here, at start-up (ValueError/TypeError); an
    account name that turns out invalid at request time is counted in the
    total only, with a warning logged once.
    """

    def __init__(self, app: WSGIApp, *, account: object = None,
                 event: str = "pageview", count_if: Optional[CountIf] = None,
                 environ_key: Optional[str] = "trafficthreshold.level") -> None:
        self.app = app
        self.count_if = count_if
        self.environ_key = environ_key
        self.record = pageviews.middleware_recorder(account, environ_host, event, count_if, log)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        key = self.environ_key
        if key is not None:
            try:
                environ[key] = _throttle_status()
            except Exception:
                environ[key] = pageviews.level(log)
        if self.count_if is not None:
            return self._call_with_predicate(environ, start_response)
        if (environ.get("REQUEST_METHOD") not in COUNTED_METHODS
                or is_excluded_path(environ.get("PATH_INFO", ""))):
            return self.app(environ, start_response)
        record = self.record

        # Kept lean on purpose (three free variables, no flag): this runs
        # for every page.  PEP 3333 allows a second start_response only with
        # exc_info, so counting only calls without exc_info counts once.
        def counting_start_response(status: str, headers: list, exc_info: Any = None) -> Any:
            """The server's start_response (same arguments, its ``write``
            returned); counts an HTML 2xx/3xx response."""
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            write = start_response(status, headers)
            try:
                if status[:1] in _GOOD_STATUS:
                    for name, value in headers:
                        if name == "Content-Type" or (
                                len(name) == 12 and name.lower() == "content-type"):
                            page = _html_memo.get(value)
                            if page is None:
                                page = is_html(value)
                            if page:
                                record(environ)
                            break
            except Exception:
                warn_once(log, "wsgi-decide", "trafficthreshold: could not decide "
                          "whether a response is a page view", exc_info=True)
            return write

        return self.app(environ, counting_start_response)

    def _call_with_predicate(self, environ: Environ, start_response: StartResponse
                             ) -> Iterable[bytes]:
        """The same with a ``count_if`` predicate (which sees every request)."""
        record = self.record

        def counting_start_response(status: str, headers: list, exc_info: Any = None) -> Any:
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            write = start_response(status, headers)
            try:
                if self._count_if(environ, status, headers):
                    record(environ)
            except Exception:
                warn_once(log, "wsgi-decide", "trafficthreshold: could not decide "
                          "whether a response is a page view", exc_info=True)
            return write

        return self.app(environ, counting_start_response)

    def _count_if(self, environ: Environ, status: str, headers: list) -> bool:
        assert self.count_if is not None
        content_type = ""
        for name, value in headers:
            if name.lower() == "content-type":
                content_type = pageviews.media_type(value)
                break
        info = RequestInfo(environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""),
                           int(status[:3]), content_type, list(headers), environ)
        return bool(self.count_if(info))
