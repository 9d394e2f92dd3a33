"""Django middleware: count page views, and hand the throttle level to views.

settings.py::

    MIDDLEWARE = [
        "trafficthreshold.django.TrafficThresholdMiddleware",   # first
        ...
    ]
    TRAFFICTHRESHOLD = {               # every key is optional
        "account": "host",             # or "myproject.traffic.account_of", or None
        "allowed_hosts": [...],        # default: settings.ALLOWED_HOSTS
        "event": "pageview",
        "count_if": "myproject.traffic.is_page_view",   # default: pageviews.is_page_view
        "uniques": False,              # True: count "unique" by a day cookie
        "unique_cookie": "tt_day",
        "timezone": None,              # the zone of the day; None: the system's
    }

``account`` and ``count_if`` are callables or dotted paths to them; the
account callable receives the ``HttpRequest``; ``"host"`` is
``request.get_host()`` lower-cased without its port and trailing dot, if it
is in ``allowed_hosts`` (Django's syntax; by default
``settings.ALLOWED_HOSTS`` as Django reads it, so with ``DEBUG`` and an
empty list ``.localhost``, ``127.0.0.1`` and ``[::1]``); the page views of
other hosts count in the total only.  ``STATIC_URL`` and
``MEDIA_URL``, when they are paths, are excluded like ``/static/``.

In views and templates the throttle level (0..5) is
``request.trafficthreshold_level``; add
``"trafficthreshold.django.context_processor"`` to the template
``context_processors`` to have ``{{ trafficthreshold_level }}``.

The request is decided when the view's response comes back through the
middleware: its status and ``Content-Type`` are final (an exception in a
view has become Django's 500 response by then) and nothing has been sent.
It is counted then, or, for a streaming response, when its first non-empty
chunk goes out (or at the end of empty content): content that raises
before its first chunk is the server's 500, not a page view.
The rule is :func:`pageviews.is_page_view` (GET, an HTML 2xx or a 304 of a
page).  Placed first in ``MIDDLEWARE``, it sees the final response of every
other middleware.  The response is returned unchanged (a streaming
response's content is wrapped, passing every chunk as it is).  Works for both sync and async stacks.  It never raises into a
request: counting errors are logged once per process
(``trafficthreshold.django`` logger).

With ``"uniques": True`` a page view whose request does not carry today's
day cookie also counts a ``unique`` event and gets the cookie, through
``response.set_cookie`` (so Django writes it with an ``expires`` next to
``Max-Age``), ``secure`` when ``request.is_secure()``; a response that
already sets a cookie of that name is left alone (docs/webapps.rst,
"Unique visitors").  ``"clock"`` (a callable or dotted path, epoch seconds)
is for tests.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import DisallowedHost, ImproperlyConfigured
from django.utils.module_loading import import_string

from . import pageviews
from .pageviews import RequestInfo

log = logging.getLogger("trafficthreshold.django")

SETTING = "TRAFFICTHRESHOLD"
OPTIONS = ("account", "allowed_hosts", "event", "count_if", "uniques", "unique_cookie",
           "timezone", "clock")
#: What Django allows when DEBUG is on and ALLOWED_HOSTS is empty.
DEBUG_HOSTS = (".localhost", "127.0.0.1", "[::1]")
#: The attribute of the HttpRequest holding the level.
REQUEST_ATTRIBUTE = "trafficthreshold_level"


def request_host(request: Any) -> Optional[str]:
    """``request.get_host()``, or None for a host Django refuses."""
    try:
        return request.get_host()
    except DisallowedHost:
        return None


def _callable_option(name: str, value: Any) -> Any:
    if isinstance(value, str) and name in ("account", "count_if", "clock") \
            and not (name == "account" and value == "host"):
        try:
            return import_string(value)
        except ImportError as exc:
            raise ImproperlyConfigured(f"{SETTING}[{name!r}] = {value!r} cannot be "
                                       f"imported: {exc}") from exc
    return value


def _url_prefixes() -> tuple[str, ...]:
    """STATIC_URL and MEDIA_URL as path prefixes (when they are paths)."""
    found = []
    for name in ("STATIC_URL", "MEDIA_URL"):
        url = getattr(settings, name, None)
        if not url or "://" in str(url) or str(url).startswith("//"):
            continue
        url = str(url) if str(url).startswith("/") else "/" + str(url)
        if url != "/":  # MEDIA_URL unset reads as "/": it would exclude everything
            found.append(url)
    return tuple(found)


def default_allowed_hosts() -> list[str]:
    """``settings.ALLOWED_HOSTS`` as Django applies it (``DEBUG`` with an
    empty list allows the local names)."""
    hosts = list(getattr(settings, "ALLOWED_HOSTS", None) or ())
    if not hosts and getattr(settings, "DEBUG", False):
        hosts = list(DEBUG_HOSTS)
    return hosts


def context_processor(request: Any) -> dict[str, int]:
    """``{{ trafficthreshold_level }}`` in templates."""
    return {REQUEST_ATTRIBUTE: getattr(request, REQUEST_ATTRIBUTE, 0)}


class TrafficThresholdMiddleware:
    """Count page views and set ``request.trafficthreshold_level``."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        config = getattr(settings, SETTING, None) or {}
        if not isinstance(config, dict):
            raise ImproperlyConfigured(f"settings.{SETTING} must be a dict, e.g. "
                                       "{'account': 'host'}")
        unknown = sorted(set(config) - set(OPTIONS))
        if unknown:
            raise ImproperlyConfigured(f"settings.{SETTING} has unknown keys {unknown}; "
                                       f"the keys are {', '.join(OPTIONS)}")
        account = _callable_option("account", config.get("account"))
        count_if = _callable_option("count_if", config.get("count_if"))
        if count_if is not None and not callable(count_if):
            raise ImproperlyConfigured(f"{SETTING}['count_if'] must be a callable or a "
                                       "dotted path to one")
        allowed_hosts = config.get("allowed_hosts")
        if allowed_hosts is None and account == "host":
            allowed_hosts = default_allowed_hosts()
        try:
            resolver = pageviews.account_resolver(account, request_host, allowed_hosts, log)
            self.record = pageviews.make_recorder(resolver, config.get("event", "pageview"), log)
            self.record_unique = pageviews.unique_recorder(resolver, log)
            self.uniques = pageviews.unique_options(
                config.get("uniques", False), config.get("unique_cookie", pageviews.UNIQUE_COOKIE),
                config.get("timezone"), _callable_option("clock", config.get("clock")))
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"settings.{SETTING}: {exc}") from exc
        self.get_response = get_response
        self.count_if = count_if
        self.url_prefixes = _url_prefixes()
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
        pageviews.warm_up(log)

    def __call__(self, request: Any) -> Any:
        if self.is_async:
            return self.__acall__(request)
        setattr(request, REQUEST_ATTRIBUTE, pageviews.level(log))
        response = self.get_response(request)
        self._count(request, response)
        return response

    async def __acall__(self, request: Any) -> Any:
        setattr(request, REQUEST_ATTRIBUTE, pageviews.level(log))
        response = await self.get_response(request)
        self._count(request, response)
        return response

    def _count(self, request: Any, response: Any) -> None:
        try:
            info = RequestInfo(request.method or "", request.path_info,
                               int(response.status_code),
                               pageviews.media_type(response.get("Content-Type")),
                               list(response.items()), request,
                               request.META.get("HTTP_ACCEPT") or "")
            if self.count_if is not None:
                counted = bool(self.count_if(info))
            else:
                counted = (pageviews.is_page_view(info)
                           and not info.path.startswith(self.url_prefixes))
        except Exception as exc:
            pageviews.log_failure(log, "decide", exc)
            return
        if not counted:
            return
        # The cookie goes with the headers, now; the counts when the page
        # goes out (a streaming response: at its first chunk).
        unique = self.uniques is not None and self._unique(request, response)

        def record() -> None:
            self.record(request)
            if unique:
                self.record_unique(request)

        if getattr(response, "streaming", False) \
                and getattr(response, "file_to_stream", None) is None:
            _at_first_chunk(response, record)
        else:
            record()

    def _unique(self, request: Any, response: Any) -> bool:
        """Set the day cookie of a unique visitor, unless the request
        carries today's cookie or the response sets one of that name
        itself; True if it was set (the unique is then counted with the
        page view).  Never raises."""
        assert self.uniques is not None
        try:
            if self.uniques.name in response.cookies:
                return False
            day = self.uniques.new_day(request.META.get("HTTP_COOKIE"))
            if day is None:
                return False
            stamp, max_age = day
            response.set_cookie(self.uniques.name, stamp, max_age=max_age, path="/",
                                secure=request.is_secure(), httponly=True, samesite="Lax")
        except Exception as exc:
            pageviews.log_failure(log, "unique", exc)
            return False
        return True


def _at_first_chunk(response: Any, record: Callable[[], None]) -> None:
    """Make ``record()`` run when the streaming ``response`` sends its first
    non-empty chunk, or at the end of empty content; not when the content
    raises before (the server answers 500) or is closed unsent.  Sync or
    async content, as the response has it (Django's GZipMiddleware wraps
    it the same way).  A FileResponse is not wrapped: the server may send
    its file itself (wsgi.file_wrapper)."""
    content, once = response.streaming_content, _Once(record)
    if getattr(response, "is_async", False):
        async def counted_async() -> Any:
            async for chunk in content:
                yield once.sent(chunk)
            once.sent(b"", end=True)
        response.streaming_content = counted_async()
        return

    def counted() -> Any:
        for chunk in content:
            yield once.sent(chunk)
        once.sent(b"", end=True)
    response.streaming_content = counted()


class _Once:
    """Calls ``record()`` at the first non-empty chunk sent, or at the end."""

    def __init__(self, record: Callable[[], None]) -> None:
        self.record: Callable[[], None] | None = record

    def sent(self, chunk: Any, end: bool = False) -> Any:
        if self.record is not None and (chunk or end):
            record, self.record = self.record, None
            record()
        return chunk
