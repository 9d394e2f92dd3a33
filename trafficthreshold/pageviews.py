"""What a page view is, and whose: shared by the WSGI, ASGI and Django
middleware (``wsgi.py``, ``asgi.py``, ``django.py``).

The default rule (:func:`is_page_view`): a ``GET`` or ``HEAD`` answered
``2xx``/``3xx`` with an HTML body (``Content-Type`` ``text/html`` or
``application/xhtml+xml``), except static files (:data:`STATIC_PREFIXES`,
:data:`STATIC_EXTENSIONS`) and health checks (:data:`HEALTH_PATHS`).  A
``count_if(info) -> bool`` predicate replaces the rule; it receives a
:class:`RequestInfo` and may call :func:`is_page_view` to extend it.

The method and the path are known before the application runs, so the
middleware decide "certainly not a page view" there and leave those requests
alone (no wrapper, nothing but the throttle level added).  The status and
the content type are known when the response starts; the hit is counted
then, before the first byte of the body is sent.

Everything here runs inside a request, so nothing here may raise into it:
:func:`make_recorder` and :func:`level` catch every error and log it once per
process (:func:`warn_once`), then at DEBUG.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import trafficthreshold
from . import _middleware, names

log = logging.getLogger("trafficthreshold.pageviews")

#: Media types of an HTML page (compared without parameters, lower case).
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
#: Methods that can be page views.
COUNTED_METHODS = frozenset({"GET", "HEAD"})
#: Paths under these prefixes are static files, never page views.
STATIC_PREFIXES = ("/static/", "/media/")
#: Paths ending with these (case-insensitively) are assets, never page views.
STATIC_EXTENSIONS = frozenset({
    ".css", ".js", ".mjs", ".map", ".json", ".xml", ".txt", ".pdf", ".zip", ".gz",
    ".png", ".jpg", ".jpeg", ".gif", ".webp", ".avif", ".svg", ".ico", ".bmp",
    ".woff", ".woff2", ".ttf", ".otf", ".eot",
    ".mp3", ".mp4", ".webm", ".ogg", ".wav",
})
#: Health checks, probes and robot files, never page views.
HEALTH_PATHS = frozenset({
    "/health", "/healthz", "/health/", "/ready", "/readyz", "/livez", "/ping",
    "/favicon.ico", "/robots.txt",
})

#: An account resolver: the request (environ, scope or HttpRequest) -> a name or None.
AccountFunc = Callable[[Any], Optional[str]]

_hit = trafficthreshold.hit
_throttle_status = trafficthreshold.throttle_status
_warned: set[str] = set()
_html_memo: dict[str, bool] = {}


class RequestInfo:
    """What ``count_if`` sees of a request whose response has started.

    ``method`` and ``path`` (the application's path: WSGI ``PATH_INFO``,
    ASGI ``path``, Django ``request.path_info``); ``status`` (int);
    ``content_type``: the media type of the response, lower case, without
    parameters (``""`` if none); ``headers``: the response headers as
    ``(name, value)`` str pairs; ``request``: the WSGI environ, the ASGI
    scope or the Django ``HttpRequest``.
    """

    __slots__ = ("method", "path", "status", "content_type", "headers", "request")

    def __init__(self, method: str, path: str, status: int, content_type: str,
                 headers: list[tuple[str, str]], request: Any) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.content_type = content_type
        self.headers = headers
        self.request = request

    def __repr__(self) -> str:
        return (f"RequestInfo({self.method} {self.path!r} -> {self.status} "
                f"{self.content_type or '(no content type)'})")


def media_type(value: str | None) -> str:
    """``"text/HTML; charset=utf-8"`` -> ``"text/html"``."""
    if not value:
        return ""
    return value.partition(";")[0].strip().lower()


def is_html(content_type: str) -> bool:
    """Whether a Content-Type header value is an HTML media type; memoized
    per value (responses repeat a handful of values)."""
    try:
        return _html_memo[content_type]
    except KeyError:
        pass
    if len(_html_memo) >= 256:
        _html_memo.clear()
    answer = _html_memo[content_type] = media_type(content_type) in HTML_TYPES
    return answer


def _setup_c(hit: Callable[..., None], throttle_status: Callable[[], int]) -> None:
    """Hand the rule's tables and the worker API to the C code (at import;
    tests hand it failing functions).  The tables are frozen, so the C and
    Python views of the rule cannot drift apart."""
    _middleware._setup(HEALTH_PATHS, STATIC_PREFIXES, STATIC_EXTENSIONS, COUNTED_METHODS,
                       _html_memo, is_html, hit, throttle_status)


_setup_c(_hit, _throttle_status)

#: ``is_excluded_path(path) -> bool``: whether a path is a static file or a
#: health check (never a page view): in :data:`HEALTH_PATHS`, under one of
#: :data:`STATIC_PREFIXES`, or with an extension (of its last segment, any
#: case) in :data:`STATIC_EXTENSIONS`.  C (``_middleware.c``): the WSGI
#: middleware runs it for every request; the ASGI and Django ones too.
is_excluded_path = _middleware.excluded_path


def is_page_view(info: RequestInfo) -> bool:
    """The default rule: GET/HEAD, 2xx/3xx, HTML, not static, not a health check."""
    return (info.method in COUNTED_METHODS and 200 <= info.status < 400
            and info.content_type in HTML_TYPES and not is_excluded_path(info.path))


def host_name(host: str | bytes | None) -> str | None:
    """The Host header lower-cased without its port: ``"Example.COM:8080"``
    -> ``"example.com"``, ``"[::1]:8000"`` -> ``"[::1]"``; None if absent."""
    if not host:
        return None
    if isinstance(host, bytes):
        host = host.decode("latin-1")
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1] if end > 0 else host
    name, colon, port = host.rpartition(":")
    return name if colon and (not port or port.isdigit()) else host


#: How many distinct Host headers :func:`host_account` remembers; past
#: this (a flood of made-up hosts) the memo starts over.
HOST_MEMO_SIZE = 1024


def host_account(host_of: Callable[[Any], Any]) -> AccountFunc:
    """An account function: :func:`host_name` of ``host_of(request)``,
    memoized per raw header value (a dict lookup per request instead of
    string work), bounded by :data:`HOST_MEMO_SIZE`."""
    memo: dict[Any, Optional[str]] = {}

    def account(request: Any) -> Optional[str]:
        raw = host_of(request)
        try:
            return memo[raw]
        except KeyError:
            pass
        except TypeError:  # unhashable: a broken server; no memo
            return host_name(raw)
        if len(memo) >= HOST_MEMO_SIZE:
            memo.clear()
        name = memo[raw] = host_name(raw)
        return name

    account.memo = memo  # type: ignore[attr-defined]  # to inspect its size
    return account


def warn_once(logger: logging.Logger, kind: str, message: str, *args: object,
              exc_info: bool | BaseException = False) -> None:
    """Log a problem at WARNING the first time this ``kind`` occurs in the
    process, then at DEBUG (a broken setting must not flood the log at
    every request)."""
    if kind in _warned:
        logger.debug(message, *args, exc_info=exc_info)
        return
    _warned.add(kind)
    logger.warning(message + " (logged once per process)", *args, exc_info=exc_info)


#: What :func:`log_failure` says, by the kind of failure.
FAILURES = {
    "level": "cannot read the throttle level, using 0",
    "hit": "a page view was not counted",
    "decide": "could not decide whether a response is a page view",
}


def log_failure(logger: logging.Logger, kind: str, exc: BaseException) -> None:
    """Log an error caught inside a request, where it must not be raised
    (:data:`FAILURES` names the ``kind``): once per process at WARNING, then
    at DEBUG.  A failed decision comes with its traceback (a bug in a
    predicate or in the response's headers); the others say it in a line."""
    warn_once(logger, kind, f"trafficthreshold: {FAILURES[kind]}: %s: %s",
              type(exc).__name__, exc, exc_info=exc if kind == "decide" else False)


def level(logger: logging.Logger = log) -> int:
    """The throttle level 0..5 (0 if it cannot be read); never raises."""
    try:
        return _throttle_status()
    except Exception as exc:  # strict mode: the segment error; fail open here
        log_failure(logger, "level", exc)
        return 0


def warm_up(logger: logging.Logger = log) -> None:
    """Attach to the segment now, at start-up (with ``gunicorn --preload``:
    in the master, before the fork), so a missing segment is reported when
    the application starts rather than at the first request."""
    level(logger)


def check_event(event: object) -> str:
    """Validate the configured event name (at start-up: raises ValueError)."""
    names.check_name("event", event, names.EVENT_MAX)
    return event  # type: ignore[return-value]


def account_resolver(account: object, host_of: Callable[[Any], Any]) -> AccountFunc | None:
    """Turn the ``account`` option into a function of the request.

    ``None``: count the total only.  ``"host"``: the Host header (``host_of``
    extracts it from the framework's request), lower-cased, without port.
    A callable: called with the request; returns the account name or None.
    """
    if account is None:
        return None
    if account == "host":
        return host_account(host_of)
    if callable(account):
        return account
    raise TypeError(f"account={account!r} is not valid; use None (the total only), "
                    "'host' (the Host header), or a callable receiving the request, "
                    "e.g. account=lambda environ: 'example.com'")


def middleware_recorder(account: object, host_of: Callable[[Any], Any], event: str,
                        count_if: object, logger: logging.Logger = log) -> Callable[[Any], None]:
    """What the WSGI and ASGI middleware do at start-up: check ``count_if``,
    build the ``record(request)`` function (:func:`make_recorder`) and attach
    to the segment now (:func:`warm_up`).  Bad options raise here."""
    if count_if is not None and not callable(count_if):
        raise TypeError(f"count_if={count_if!r} is not callable; give a function "
                        "count_if(info) -> bool, or None for the default rule")
    record = make_recorder(account_resolver(account, host_of), event, logger)
    warm_up(logger)
    return record


def make_recorder(account: AccountFunc | None, event: str,
                  logger: logging.Logger = log) -> Callable[[Any], None]:
    """A function ``record(request)`` that counts one page view of a
    request and never raises.

    ``account`` is an :func:`account_resolver` result; ``event`` is checked
    here (ValueError at start-up).  A name that fails validation
    (names.validate) is not counted under that name: the hit goes to the
    total only and a warning is logged once per process.  (A closure, not
    a class: it runs for every page view, and calling a function costs less
    than calling an object's ``__call__``.)
    """
    event = check_event(event)

    def total_only() -> None:
        try:
            _hit(None, event)
        except Exception as exc:
            log_failure(logger, "hit", exc)

    def record(request: Any) -> None:
        name = None
        if account is not None:
            try:
                name = account(request)
            except Exception:
                warn_once(logger, "account-raised", "trafficthreshold: the account "
                          "function raised; the page view is counted in the total only",
                          exc_info=True)
        try:
            _hit(name, event)
        except (ValueError, TypeError) as exc:
            # Bad input raises even in fail-open mode; the C code adds
            # nothing before both names are valid, so retrying with the
            # total alone cannot count twice.
            warn_once(logger, "account-invalid", "trafficthreshold: account %r is not "
                      "a valid name (%s); its page views are counted in the total only",
                      name, exc)
            if name is not None:
                total_only()
        except Exception as exc:  # strict mode: the segment error
            log_failure(logger, "hit", exc)

    record.event = event  # type: ignore[attr-defined]
    record.account = account  # type: ignore[attr-defined]  # the resolver, to inspect
    return record
