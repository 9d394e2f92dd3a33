"""ASGI middleware: count page views, and hand the throttle level to the app.

::

    from trafficthreshold.asgi import TrafficThreshold
    app = TrafficThreshold(app, account="host", allowed_hosts=["example.com"])

    # Starlette / FastAPI:   request.state.trafficthreshold_level
    # any ASGI application:  scope["trafficthreshold.level"]

Only ``http`` scopes are looked at.  ``lifespan`` and ``websocket`` scopes
are passed to the application untouched (the same scope, receive and send
objects).

For an ``http`` request the throttle level (0..5) is stored, before the
application is called, in ``scope["trafficthreshold.level"]`` and in the
request state ``scope["state"]["trafficthreshold_level"]`` (the dict behind
Starlette's ``request.state``; created if the server provides none).  The
request is counted when the application sends ``http.response.start`` (the
status and headers are known and final: ASGI has no way to restart a
response; no body has been sent), before that message is passed on; at
most once.  The rule is :func:`pageviews.is_page_view` (GET, an HTML 2xx or
a 304 of a page).  Messages are passed on unchanged, in order,
and ``receive`` is not wrapped.  Counting errors are logged once per process
(``trafficthreshold.asgi`` logger), never raised into the request.  A hit
does not await anything: it is an atomic add in shared memory.

With ``uniques=True`` a page view whose request does not carry today's day
cookie also counts a ``unique`` event, and its ``http.response.start``
message is passed on as a copy whose headers end with the cookie's
``set-cookie`` (the application's message and list are not changed); see
:class:`trafficthreshold.pageviews.UniqueCookie` and docs/webapps.rst.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Iterable, MutableMapping, Optional

import trafficthreshold

from . import pageviews
from .pageviews import COUNTED_METHODS, RequestInfo, is_excluded_path, warn_once

log = logging.getLogger("trafficthreshold.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
CountIf = Callable[[RequestInfo], bool]

_throttle_status = trafficthreshold.throttle_status

#: The request-state attribute holding the level (``request.state.<this>``).
STATE_KEY = "trafficthreshold_level"


def scope_header(scope: Scope, wanted: bytes) -> Optional[bytes]:
    """A request header (``wanted``: lower case, as ASGI gives names) of an
    ASGI request; None if the client sent none."""
    for name, value in scope.get("headers") or ():
        if name == wanted:
            return value
    return None


def scope_host(scope: Scope) -> Optional[bytes]:
    """The Host header of an ASGI request (None if the client sent none)."""
    return scope_header(scope, b"host")


def _content_type(headers: Any) -> str:
    """The media type of an ASGI response (:func:`pageviews.media_type`)."""
    for name, value in headers or ():
        if name.lower() == b"content-type":
            return pageviews.media_type(value.decode("latin-1"))
    return ""


def _keep_headers(message: dict) -> dict:
    """``message`` (a scope or ``http.response.start``) whose ``headers``
    can be read more than once: ASGI allows any iterable, and a one-shot
    one (a generator) that the middleware searched would reach the server
    (or the application) empty.  A list or tuple, as servers and frameworks
    send them, stays as it is; a scope is changed in place (it is the
    request's own), a message is copied.  An iterable that fails to be read
    is left as it is, for the server to meet (logged once)."""
    headers = message.get("headers")
    if headers is None or isinstance(headers, (list, tuple)):
        return message
    try:
        pairs = list(headers)
    except Exception as exc:
        pageviews.log_failure(log, "decide", exc)
        return message
    if message.get("type") == "http":  # the scope
        message["headers"] = pairs
        return message
    return {**message, "headers": pairs}


class TrafficThreshold:
    """Wrap an ASGI application.

    The options are those of :class:`trafficthreshold.wsgi.TrafficThreshold`
    (``account``, ``allowed_hosts``, ``event``, ``count_if``); an
    ``account`` callable receives the ASGI scope; and the unique-visitor
    options ``uniques``, ``unique_cookie``, ``timezone``, ``clock``.
    ``scope_key``: where
    the level goes in the scope (None: nowhere); ``state_key``: its name in
    the request state (None: not put there).
    """

    def __init__(self, app: ASGIApp, *, account: object = None,
                 allowed_hosts: Optional[Iterable[str]] = None, event: str = "pageview",
                 count_if: Optional[CountIf] = None,
                 scope_key: Optional[str] = "trafficthreshold.level",
                 state_key: Optional[str] = STATE_KEY, uniques: bool = False,
                 unique_cookie: str = pageviews.UNIQUE_COOKIE,
                 timezone: Optional[str] = None,
                 clock: Optional[Callable[[], float]] = None) -> None:
        self.uniques = pageviews.unique_options(uniques, unique_cookie, timezone, clock)
        self.app = app
        self.count_if = count_if
        self.scope_key = scope_key
        self.state_key = state_key
        self.record = pageviews.middleware_recorder(account, scope_host, event, count_if, log,
                                                    allowed_hosts)
        self.record_unique = pageviews.unique_recorder(self.record.account, log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        _keep_headers(scope)
        self._put_level(scope)
        if self.count_if is None and (scope.get("method") not in COUNTED_METHODS
                                      or is_excluded_path(scope.get("path") or "")):
            return await self.app(scope, receive, send)
        counted = False

        async def counting_send(message: Message) -> None:
            nonlocal counted
            if not counted and message.get("type") == "http.response.start":
                counted = True
                message = _keep_headers(message)
                try:
                    page = self._is_page_view(scope, message)
                except Exception as exc:
                    page = False
                    pageviews.log_failure(log, "decide", exc)
                if page:
                    self.record(scope)
                    if self.uniques is not None:
                        message = self._unique(scope, message)
            await send(message)

        return await self.app(scope, receive, counting_send)

    def _put_level(self, scope: Scope) -> None:
        try:
            value = _throttle_status()
        except Exception:
            value = pageviews.level(log)
        if self.scope_key is not None:
            scope[self.scope_key] = value
        if self.state_key is not None:
            try:
                state = scope.get("state")
                if state is None:
                    state = scope["state"] = {}
                state[self.state_key] = value
            except Exception:
                warn_once(log, "asgi-state", "trafficthreshold: cannot store the level in "
                          "scope['state']; read scope[%r] instead", self.scope_key)

    def _unique(self, scope: Scope, message: Message) -> Message:
        """A page view's ``http.response.start``: as it is if the request
        carries today's day cookie, else a copy with the cookie added to
        its headers, and the ``unique`` event counted.  Never raises."""
        assert self.uniques is not None
        try:
            cookies = [value.decode("latin-1") for name, value in scope.get("headers") or ()
                       if name == b"cookie"]  # HTTP/2 may split it in several
            value = self.uniques.set_cookie("; ".join(cookies),
                                            scope.get("scheme") in ("https", "wss"))
            if value is None:
                return message
            headers = [*(message.get("headers") or ()), (b"set-cookie", value.encode("latin-1"))]
            message = {**message, "headers": headers}
        except Exception as exc:
            pageviews.log_failure(log, "unique", exc)
            return message
        self.record_unique(scope)
        return message

    def _is_page_view(self, scope: Scope, message: Message) -> bool:
        status = int(message.get("status", 0))
        content_type = _content_type(message.get("headers"))
        if self.count_if is None:  # the method and path were checked before
            return pageviews.is_page_response(
                status, content_type,
                scope_header(scope, b"accept") if status == 304 else None)
        headers = [(bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
                   for n, v in message.get("headers") or ()]
        accept = scope_header(scope, b"accept")
        info = RequestInfo(scope.get("method", ""), scope.get("path", ""), status,
                           content_type, headers, scope,
                           accept.decode("latin-1") if accept else "")
        return bool(self.count_if(info))
