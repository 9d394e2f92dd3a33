"""Django middleware: count page views, and hand the throttle level to views.

settings.py::

    MIDDLEWARE = [
        "trafficthreshold.django.TrafficThresholdMiddleware",   # first
        ...
    ]
    TRAFFICTHRESHOLD = {               # every key is optional
        "account": "host",             # or "myproject.traffic.account_of", or None
        "event": "pageview",
        "count_if": "myproject.traffic.is_page_view",   # default: pageviews.is_page_view
    }

``account`` and ``count_if`` are callables or dotted paths to them; the
account callable receives the ``HttpRequest``; ``"host"`` is
``request.get_host()`` lower-cased without its port (a host not in
``ALLOWED_HOSTS`` counts in the total only).  ``STATIC_URL`` and
``MEDIA_URL``, when they are paths, are excluded like ``/static/``.

In views and templates the throttle level (0..5) is
``request.trafficthreshold_level``; add
``"trafficthreshold.django.context_processor"`` to the template
``context_processors`` to have ``{{ trafficthreshold_level }}``.

The request is counted when the view's response comes back through the
middleware: its status and ``Content-Type`` are known and nothing has been
sent.  Placed first in ``MIDDLEWARE``, it sees the final response of every
other middleware.  The response is returned unchanged (streaming responses
included).  Works for both sync and async stacks.  It never raises into a
request: counting errors are logged once per process
(``trafficthreshold.django`` logger).
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
OPTIONS = ("account", "event", "count_if")
#: The attribute of the HttpRequest holding the level.
REQUEST_ATTRIBUTE = "trafficthreshold_level"


def request_host(request: Any) -> Optional[str]:
    """``request.get_host()``, or None for a host Django refuses."""
    try:
        return request.get_host()
    except DisallowedHost:
        return None


def _callable_option(name: str, value: Any) -> Any:
    if isinstance(value, str) and not (name == "account" and value == "host"):
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
        try:
            resolver = pageviews.account_resolver(account, request_host)
            self.record = pageviews.make_recorder(resolver, config.get("event", "pageview"), log)
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
                               list(response.items()), request)
            if self.count_if is not None:
                counted = bool(self.count_if(info))
            else:
                counted = (pageviews.is_page_view(info)
                           and not info.path.startswith(self.url_prefixes))
            if counted:
                self.record(request)
        except Exception as exc:
            pageviews.log_failure(log, "decide", exc)
