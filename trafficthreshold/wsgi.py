"""WSGI middleware: count page views, and hand the throttle level to the app.

::

    from trafficthreshold.wsgi import TrafficThreshold
    application = TrafficThreshold(application, account="host",
                                   allowed_hosts=["example.com", ".example.org"])

    # in the application:
    if environ["trafficthreshold.level"] >= 2:
        skip_optional_blocks()

What it does per request:

* puts the throttle level (0..5, :func:`trafficthreshold.throttle_status`)
  in ``environ["trafficthreshold.level"]`` before calling the application;
* requests that cannot be page views (not GET, static files, health
  checks: :mod:`trafficthreshold.pageviews`) go to the application as they
  are, with the server's own ``start_response``;
* for the others it wraps ``start_response``, which passes every call on
  and remembers the status and headers of the latest.  The final status
  decides: an application may call ``start_response`` again with
  ``exc_info`` (200 restarted as 500) until a byte of the body is sent.  So
  the request is decided, and counted if the response is a page view, when
  the first byte of the body goes out: for a list (or tuple) body, which
  cannot fail, when the application returns it (the server has sent
  nothing of it yet); for any other body (a generator, an iterator), at its
  first non-empty chunk, or at the end of an empty body.  At most once per
  request; an application that raises, in its call or in its body before
  the first byte, is not counted (the server answers 500).  (A body with a
  length, or the server's ``wsgi.file_wrapper``, is handed over as it is
  and decided at the application's return: a restart while it is iterated
  comes after the decision.  A function-style file_wrapper, uWSGI's,
  cannot be checked by type: there a body with a ``read``, a file-like
  object, is handed over as it is, so that uWSGI sends a file with
  sendfile() and reads any other file-like object itself.)

With ``uniques=True`` it also counts a ``unique`` event at a visitor's
first page view of the day, by a day cookie (docs/webapps.rst, "Unique
visitors"): then each ``start_response`` call is decided when it is made,
and a unique visitor's page view reaches the server with a copy of its
headers plus the ``Set-Cookie`` (a later ``exc_info`` call is decided
afresh and replaces them, so a cookie of a call that did not stand is never
sent); ``unique`` is counted with the page view, by the last call.  That
header is the one change it ever makes to a response.

Otherwise it never changes the response: the status, the headers, the body iterable
(returned as it is when it is a list, a tuple, has a length or is the
server's ``wsgi.file_wrapper``, so ``close()``, ``len()`` and sendfile
behave exactly as without the middleware; any other body is wrapped, in a
C iterator that passes every chunk and ``close()`` on) and ``write()``.  It never raises
into a request: every counting error is logged once per process
(``trafficthreshold.wsgi`` logger) and the request goes on.  It does not
block: a hit is an atomic add in shared memory (the segment's lock, taken
with a 50 ms timeout, is needed only when a key or a minute is new).

All of this per-request path is C (``_middleware.c``): about 2,000 to
3,000 instructions per page, under 1 % of a hello-world page under gunicorn
(benchmarks/bench_middleware_instructions.py, docs/webapps.rst).  Python runs only for a
``count_if`` predicate, the account of a counted page, and errors.

The middleware attaches to the segment when it is created, which with
``gunicorn --preload`` is in the master before the fork; every forked
worker then takes its own stripe of the counters (``_counter.c``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

from . import _middleware, pageviews
from .pageviews import RequestInfo

log = logging.getLogger("trafficthreshold.wsgi")

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
CountIf = Callable[[RequestInfo], bool]

def environ_host(environ: Environ) -> Optional[str]:
    """The Host header of a WSGI request (None if the client sent none)."""
    return environ.get("HTTP_HOST")


class TrafficThreshold(_middleware.Middleware):
    """Wrap a WSGI application.

    ``account``: None (count the total only), ``"host"`` (the Host header,
    lower-cased, without port and trailing dot) or a callable
    ``account(environ) -> str | None``.  ``allowed_hosts`` (with
    ``account="host"``): the hosts that are accounts, in the syntax of
    Django's ``ALLOWED_HOSTS`` (``"example.com"``, ``".example.com"`` for
    it and its subdomains, ``"*"``); the pages of other hosts count in the
    total only.  None: every host (a warning is logged: made-up Host headers
    would fill the key table).  ``event``: the event name (default
    ``"pageview"``).
    ``count_if``: ``count_if(info: RequestInfo) -> bool`` replaces the
    default rule :func:`trafficthreshold.pageviews.is_page_view`.
    ``environ_key``: where the throttle level goes (None: nowhere).

    ``uniques``: count a ``unique`` event (for the page view's account and
    ``all``) at a visitor's first page view of the day, by a first-party
    cookie holding the day only (``tt_day=20261201``; docs/webapps.rst,
    "Unique visitors").  Off by default: it adds ``Set-Cookie`` to page
    views, which a cache in front of the site must be told about.
    ``unique_cookie``: the cookie's name; ``timezone``: the zone whose day
    counts (an IANA name; None: the system's zone); ``clock``: the epoch
    seconds now (for tests; None: the system clock, read in C).

    Invalid names raise here, at start-up (ValueError/TypeError); an
    account name that turns out invalid at request time is counted in the
    total only, with a warning logged once.

    Calling the instance, ``middleware(environ, start_response)``, is C
    (``_middleware.c``): the method and path check, the level, and the
    ``start_response`` that counts.  The Python methods below run only for
    a ``count_if`` predicate and for errors.
    """

    def __init__(self, app: WSGIApp, *, account: object = None,
                 allowed_hosts: Optional[Iterable[str]] = None,
                 event: str = "pageview", count_if: Optional[CountIf] = None,
                 environ_key: Optional[str] = "trafficthreshold.level",
                 uniques: bool = False, unique_cookie: str = pageviews.UNIQUE_COOKIE,
                 timezone: Optional[str] = None,
                 clock: Optional[Callable[[], float]] = None) -> None:
        cookie = pageviews.unique_options(uniques, unique_cookie, timezone, clock)
        record = pageviews.middleware_recorder(account, environ_host, event, count_if, log,
                                               allowed_hosts)
        self.count_if = count_if
        # With no account the C code calls hit(None, event) itself; an
        # account needs record(environ), which resolves it in Python.
        super().__init__(app, event=record.event,
                         record=None if account is None else record,
                         environ_key=environ_key, count_if=count_if is not None,
                         uniques=cookie,
                         unique_record=pageviews.unique_recorder(record.account, log),
                         unique_clock=clock)

    def _count_if(self, environ: Environ, status: str, headers: list) -> bool:
        """The ``count_if`` predicate's verdict on a response, by its final
        status and headers (the C code calls this when it settles)."""
        assert self.count_if is not None
        content_type = ""
        for name, value in headers:
            if name.lower() == "content-type":
                content_type = pageviews.media_type(value)
                break
        info = RequestInfo(environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""),
                           int(status[:3]), content_type, list(headers), environ,
                           environ.get("HTTP_ACCEPT") or "")
        return bool(self.count_if(info))

    def _failed(self, kind: str, exc: BaseException) -> None:
        """Log a failure inside a request (the C code calls this, then goes
        on as if nothing was counted): once per process at WARNING, then at
        DEBUG."""
        pageviews.log_failure(log, kind, exc)
