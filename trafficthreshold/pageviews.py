"""What a page view is, and whose: shared by the WSGI, ASGI and Django
middleware (``wsgi.py``, ``asgi.py``, ``django.py``).

The default rule (:func:`is_page_view`) counts the pages a visitor sees,
the web analytics convention: a ``GET`` answered ``2xx`` with an HTML body
(``Content-Type`` ``text/html`` or ``application/xhtml+xml``), or ``304 Not
Modified`` for such a page (:func:`is_page_response`), except static files
(:data:`STATIC_PREFIXES`, :data:`STATIC_EXTENSIONS`) and health checks
(:data:`HEALTH_PATHS`).  Never a ``HEAD`` (monitors and crawlers: nobody
sees a page), never another ``3xx`` (a redirect is not seen either; its
target is counted when it is served, so a navigation through a redirect is
one page view).  A ``count_if(info) -> bool`` predicate replaces the rule;
it receives a :class:`RequestInfo` and may call :func:`is_page_view` to
extend it.

The method and the path are known before the application runs, so the
middleware decide "certainly not a page view" there and leave those requests
alone (no wrapper, nothing but the throttle level added).  The status and
the content type are final when the response starts (WSGI: when the
application returns its body, after its last ``start_response`` call); the
hit is counted then, before the first byte of the body is sent.

``account="host"`` takes the account from the ``Host`` header
(:func:`host_name`), which any client can make up; an allow-list
(:func:`host_matcher`, Django's ``ALLOWED_HOSTS`` syntax) keeps made-up
names out of the key table: a page of a host outside it counts in the total
only.

Unique visitors (``uniques=True``, off by default): a page view whose
request does not carry today's day cookie (:class:`UniqueCookie`: its name
and the date ``YYYYMMDD`` in a configured zone, nothing else) also counts
:data:`UNIQUE_EVENT` for the same account (:func:`unique_recorder`), and
the middleware add the cookie to its response, valid until the local
midnight (:func:`day_of`).  docs/webapps.rst, "Unique visitors".

Everything here runs inside a request, so nothing here may raise into it:
:func:`make_recorder` and :func:`level` catch every error and log it once per
process (:func:`warn_once`), then at DEBUG.
"""
from __future__ import annotations

import datetime
import logging
import time
from typing import Any, Callable, Optional
from zoneinfo import ZoneInfo

import trafficthreshold
from . import _middleware, names, periods

log = logging.getLogger("trafficthreshold.pageviews")

#: Media types of an HTML page (compared without parameters, lower case).
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
#: Methods that can be page views.  Not ``HEAD``: monitors, link checkers
#: and crawlers send it, and no visitor sees a page from it.
COUNTED_METHODS = frozenset({"GET"})
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
    ASGI ``path``, Django ``request.path_info``); ``status`` (int, the
    final one); ``content_type``: the media type of the response, lower
    case, without parameters (``""`` if none); ``headers``: the response
    headers as ``(name, value)`` str pairs; ``request``: the WSGI environ,
    the ASGI scope or the Django ``HttpRequest``; ``accept``: the request's
    ``Accept`` header (``""`` if none).
    """

    __slots__ = ("method", "path", "status", "content_type", "headers", "request", "accept")

    def __init__(self, method: str, path: str, status: int, content_type: str,
                 headers: list[tuple[str, str]], request: Any, accept: str = "") -> None:
        self.method = method
        self.path = path
        self.status = status
        self.content_type = content_type
        self.headers = headers
        self.request = request
        self.accept = accept

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


def accepts_html(accept: str | bytes | None) -> bool:
    """Whether an ``Accept`` header lists an HTML media type (not ``*/*``
    alone, not with ``q=0``): what a browser sends when it loads a page,
    unlike images, scripts and ``fetch()``."""
    if not accept:
        return False
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    for item in accept.split(","):
        kind, _, params = item.partition(";")
        if kind.strip().lower() not in HTML_TYPES:
            continue
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    if float(value) <= 0:
                        break
                except ValueError:
                    pass
        else:
            return True
    return False


def is_page_response(status: int, content_type: str, accept: str | bytes | None = None) -> bool:
    """The default rule's verdict on a response (the method and the path
    aside): ``2xx`` with an HTML ``content_type`` (a media type, as
    :func:`media_type` returns it); or ``304 Not Modified`` with an HTML
    ``content_type``, or with none when the request's ``accept`` lists HTML
    (Django and Werkzeug drop ``Content-Type`` from a 304).  A 304 is a page
    the visitor sees, from the browser's cache: log analysers (AWStats'
    default ``200 304``) count it, and a page tag (JavaScript) runs on it.
    Any other ``3xx`` is a redirect: not counted (its target is, when
    served)."""
    if 200 <= status < 300:
        return content_type in HTML_TYPES
    if status == 304:
        return content_type in HTML_TYPES if content_type else accepts_html(accept)
    return False


def _setup_c(hit: Callable[..., None], throttle_status: Callable[[], int]) -> None:
    """Hand the rule's tables and the worker API to the C code (at import;
    tests hand it failing functions).  The tables are frozen, so the C and
    Python views of the rule cannot drift apart."""
    _middleware._setup(HEALTH_PATHS, STATIC_PREFIXES, STATIC_EXTENSIONS, COUNTED_METHODS,
                       _html_memo, is_html, accepts_html, hit, throttle_status)


_setup_c(_hit, _throttle_status)

#: ``is_excluded_path(path) -> bool``: whether a path is a static file or a
#: health check (never a page view): in :data:`HEALTH_PATHS`, under one of
#: :data:`STATIC_PREFIXES`, or with an extension (of its last segment, any
#: case) in :data:`STATIC_EXTENSIONS`.  C (``_middleware.c``): the WSGI
#: middleware runs it for every request; the ASGI and Django ones too.
is_excluded_path = _middleware.excluded_path


def is_page_view(info: RequestInfo) -> bool:
    """The default rule: GET, an HTML 2xx or a 304 of a page
    (:func:`is_page_response`), not static, not a health check."""
    return (info.method in COUNTED_METHODS
            and is_page_response(info.status, info.content_type, info.accept)
            and not is_excluded_path(info.path))


def host_name(host: str | bytes | None) -> str | None:
    """The Host header normalised: lower-cased, without its port and
    trailing dot: ``"Example.COM.:8080"`` -> ``"example.com"``,
    ``"[::1]:8000"`` -> ``"[::1]"``; None if absent or empty."""
    if not host:
        return None
    if isinstance(host, bytes):
        host = host.decode("latin-1")
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1] if end > 0 else host
    name, colon, port = host.rpartition(":")
    if colon and (not port or port.isdigit()):
        host = name
    return host.rstrip(".") or None


#: A host allow-list, compiled: ``allowed(host_name) -> bool``.
HostMatcher = Callable[[str], bool]


def host_matcher(patterns: object) -> Optional[HostMatcher]:
    """Compile an allow-list of hosts, in the syntax of Django's
    ``ALLOWED_HOSTS``: ``"example.com"`` exactly that host,
    ``".example.com"`` that host and every subdomain of it, ``"*"`` any
    host.  Patterns are compared lower-case, without a trailing dot, to
    :func:`host_name` results.

    Returns None for "every host" (a ``"*"`` among the patterns), else a
    function doing set lookups only: the host, then each parent domain
    against the wildcards (a few lookups, no regex).  Raises TypeError for
    a bare string or a non-string pattern, ValueError for an empty one (at
    start-up).
    """
    if isinstance(patterns, (str, bytes)):
        raise TypeError(f"allowed_hosts={patterns!r} is a single string; give a list, "
                        f"e.g. allowed_hosts=[{patterns!r}]")
    try:
        items = list(patterns)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"allowed_hosts={patterns!r} is not a list of host names; give e.g. "
                        "allowed_hosts=['example.com', '.example.org']") from None
    exact: set[str] = set()
    domains: set[str] = set()
    for pattern in items:
        if not isinstance(pattern, str):
            raise TypeError(f"allowed_hosts entry {pattern!r} is not a str")
        name = pattern.strip().lower()
        if name == "*":
            return None
        wildcard = name.startswith(".")
        name = name.lstrip(".").rstrip(".") if wildcard else name.rstrip(".")
        if not name:
            raise ValueError(f"allowed_hosts entry {pattern!r} is empty; give a host name "
                             "('example.com'), a domain with its subdomains "
                             "('.example.com') or '*'")
        (domains if wildcard else exact).add(name)

    def allowed(host: str) -> bool:
        if host in exact or host in domains:
            return True
        dot = host.find(".")
        while dot >= 0:
            if host[dot + 1:] in domains:
                return True
            dot = host.find(".", dot + 1)
        return False

    allowed.exact = frozenset(exact)  # type: ignore[attr-defined]  # to inspect
    allowed.domains = frozenset(domains)  # type: ignore[attr-defined]
    return allowed


#: How many distinct Host headers :func:`host_account` remembers; past
#: this (a flood of made-up hosts) the memo starts over.
HOST_MEMO_SIZE = 1024


def host_account(host_of: Callable[[Any], Any], allowed: Optional[HostMatcher] = None,
                 logger: logging.Logger = log) -> AccountFunc:
    """An account function: :func:`host_name` of ``host_of(request)`` if
    ``allowed`` (a :func:`host_matcher` result; None: every host) accepts
    it, else None (the total only; logged once per process).  Memoized per
    raw header value (a dict lookup per request instead of string work and
    matching), bounded by :data:`HOST_MEMO_SIZE`."""
    memo: dict[Any, Optional[str]] = {}

    def resolve(raw: Any) -> Optional[str]:
        name = host_name(raw)
        if name is not None and allowed is not None and not allowed(name):
            warn_once(logger, "host-not-allowed", "trafficthreshold: Host %r is not in "
                      "allowed_hosts; its page views (and those of every other host "
                      "outside the list) are counted in the total only", name)
            return None
        return name

    def account(request: Any) -> Optional[str]:
        raw = host_of(request)
        try:
            return memo[raw]
        except KeyError:
            pass
        except TypeError:  # unhashable: a broken server; no memo
            return resolve(raw)
        if len(memo) >= HOST_MEMO_SIZE:
            memo.clear()
        name = memo[raw] = resolve(raw)
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
    "unique": "a unique visitor was not counted (or its cookie not set)",
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


def account_resolver(account: object, host_of: Callable[[Any], Any],
                     allowed_hosts: object = None,
                     logger: logging.Logger = log) -> AccountFunc | None:
    """Turn the ``account`` option into a function of the request.

    ``None``: count the total only.  ``"host"``: the Host header (``host_of``
    extracts it from the framework's request), normalised
    (:func:`host_name`), if ``allowed_hosts`` (a list for
    :func:`host_matcher`; None: every host) has it, else None.  A callable:
    called with the request; returns the account name or None.
    ``allowed_hosts`` with another account raises TypeError.
    """
    if account == "host":
        allowed = None if allowed_hosts is None else host_matcher(allowed_hosts)
        return host_account(host_of, allowed, logger)
    if allowed_hosts is not None:
        raise TypeError(f"allowed_hosts applies to account='host' only, not to "
                        f"account={account!r}; remove allowed_hosts")
    if account is None:
        return None
    if callable(account):
        return account
    raise TypeError(f"account={account!r} is not valid; use None (the total only), "
                    "'host' (the Host header), or a callable receiving the request, "
                    "e.g. account=lambda environ: 'example.com'")


def middleware_recorder(account: object, host_of: Callable[[Any], Any], event: str,
                        count_if: object, logger: logging.Logger = log,
                        allowed_hosts: object = None) -> Callable[[Any], None]:
    """What the WSGI and ASGI middleware do at start-up: check ``count_if``,
    build the ``record(request)`` function (:func:`make_recorder`) and attach
    to the segment now (:func:`warm_up`).  Bad options raise here.
    ``account="host"`` without ``allowed_hosts`` logs a warning: every Host
    header a client makes up would take a key."""
    if count_if is not None and not callable(count_if):
        raise TypeError(f"count_if={count_if!r} is not callable; give a function "
                        "count_if(info) -> bool, or None for the default rule")
    record = make_recorder(account_resolver(account, host_of, allowed_hosts, logger),
                           event, logger)
    if account == "host" and allowed_hosts is None:
        warn_once(logger, "no-allowed-hosts", "trafficthreshold: account='host' without "
                  "allowed_hosts: every Host header a client makes up takes a key (for "
                  "the length of the minute ring, then the supervisor reclaims it) and "
                  "is stored as an account; give allowed_hosts=['example.com', "
                  "'.example.com'] (or ['*'] to accept this)")
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


# ------------------------------------------------------------ unique visitors

#: The event counted for a visitor's first page view of the day (Bootic's
#: tracker: ``unq``), for the page view's account and ``all``.
UNIQUE_EVENT = "unique"
#: The default name of the day cookie.
UNIQUE_COOKIE = "tt_day"
#: What a cookie name may hold: an RFC 6265 ``token`` (RFC 9110 ``tchar``).
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789"
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
#: The attributes of the day cookie (``Max-Age`` comes before them).
COOKIE_ATTRIBUTES = "Path=/; SameSite=Lax; HttpOnly"


def check_cookie_name(name: object) -> str:
    """Validate the ``unique_cookie`` option (at start-up): a non-empty
    RFC 6265 token.  Raises TypeError/ValueError saying what to use."""
    if not isinstance(name, str):
        raise TypeError(f"unique_cookie={name!r} is not a str; give a cookie name such as "
                        f"{UNIQUE_COOKIE!r}")
    bad = "".join(sorted(set(name) - _TOKEN_CHARS))
    problem = "is empty" if not name else f"has {bad!r}" if bad else \
        "is longer than 64 characters" if len(name) > 64 else ""
    if problem:
        raise ValueError(f"unique_cookie={name!r} is not a valid cookie name (it {problem}); "
                         "use letters, digits and !#$%&'*+-.^_`|~ (an RFC 6265 token), "
                         f"e.g. {UNIQUE_COOKIE!r}")
    return name


def day_of(now: float, tz: ZoneInfo) -> tuple[str, int]:
    """The local day of the epoch second ``now`` in ``tz`` as a stamp
    (``"20261201"``) and the seconds left until the next local midnight
    (at least 1): the cookie's ``Max-Age``, so it lives until the end of
    the day it names.  A day of 23 or 25 hours (DST) is measured on the
    real clock; a zone whose midnight is skipped ends the day at the
    transition (zoneinfo's reading of the missing time)."""
    local = datetime.datetime.fromtimestamp(now, tz)
    midnight = datetime.datetime.combine(local.date() + datetime.timedelta(days=1),
                                         datetime.time(0), tzinfo=tz)
    return local.strftime("%Y%m%d"), max(1, int(midnight.timestamp() - now + 0.999999))


def has_cookie(header: Optional[str], needle: str) -> bool:
    """Whether a ``Cookie`` request header holds exactly ``needle``
    (``"name=value"``) as one of its pairs: a substring search, then a look
    at the characters around it (a pair starts the header or follows
    ``;``/space, and ends it or is followed by ``;``/space), so
    ``xtt_day=...`` or ``tt_day=202612010`` do not pass."""
    if not header:
        return False
    start = header.find(needle)
    while start >= 0:
        end = start + len(needle)
        if ((start == 0 or header[start - 1] in "; ")
                and (end == len(header) or header[end] in "; ")):
            return True
        start = header.find(needle, start + 1)
    return False


class UniqueCookie:
    """The day cookie of the unique-visitor count, for one middleware.

    ``name``: the cookie's name (checked); ``tz``: the zone whose day
    counts; ``clock``: the epoch seconds now (tests drive it).  ``today()``
    gives ``(needle, set_cookie, set_cookie_secure)``: ``"tt_day=20261201"``
    to look for in the request's ``Cookie`` header, and the two values of
    the ``Set-Cookie`` header to send when it is not there (plain and
    ``Secure``, for https).  Computed once per second of ``clock``: the
    common request compares an int and searches a string.  No lock: a race
    between threads computes the same values twice.
    """

    __slots__ = ("name", "tz", "clock", "_state")

    def __init__(self, name: object = UNIQUE_COOKIE, tz: ZoneInfo | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = check_cookie_name(name)
        self.tz = tz if tz is not None else periods.resolve_timezone(None)
        self.clock = clock
        # (second, (needle, set_cookie, set_cookie_secure), (stamp, max_age)):
        # one tuple, replaced whole, so a thread never sees half of a day.
        self._state: tuple[int, tuple[str, str, str], tuple[str, int]] = (
            -1, ("", "", ""), ("", 0))

    def _at(self, second: int) -> tuple[int, tuple[str, str, str], tuple[str, int]]:
        state = self._state
        if state[0] != second:
            stamp, max_age = day_of(second, self.tz)
            needle = f"{self.name}={stamp}"
            value = f"{needle}; Max-Age={max_age}; {COOKIE_ATTRIBUTES}"
            state = self._state = (second, (needle, value, value + "; Secure"),
                                   (stamp, max_age))
        return state

    def at(self, second: int) -> tuple[str, str, str]:
        """``today()`` for the epoch second ``second`` (cached for it)."""
        return self._at(second)[1]

    def today(self) -> tuple[str, str, str]:
        """``(needle, set_cookie, set_cookie_secure)`` for now."""
        return self._at(int(self.clock()))[1]

    def set_cookie(self, cookie_header: Optional[str], secure: bool) -> Optional[str]:
        """The ``Set-Cookie`` value to send with a page view whose request
        carried ``cookie_header``: None if it holds today's stamp (not a
        unique visitor), else today's cookie (``Secure`` if ``secure``)."""
        needle, plain, with_secure = self.today()
        if has_cookie(cookie_header, needle):
            return None
        return with_secure if secure else plain

    def new_day(self, cookie_header: Optional[str]) -> Optional[tuple[str, int]]:
        """Like :meth:`set_cookie`, as the parts of the cookie to set:
        ``(stamp, max_age)``, or None if ``cookie_header`` holds today's."""
        _, today, parts = self._at(int(self.clock()))
        return None if has_cookie(cookie_header, today[0]) else parts


def unique_options(uniques: object, unique_cookie: object, timezone: object,
                   clock: Callable[[], float] | None = None) -> Optional[UniqueCookie]:
    """The middleware's unique-visitor options, checked at start-up: a
    :class:`UniqueCookie`, or None with ``uniques=False``.  ``timezone``:
    an IANA name, a ZoneInfo, or None for the system's zone
    (:func:`periods.resolve_timezone`)."""
    if not isinstance(uniques, bool):
        raise TypeError(f"uniques={uniques!r} must be True or False")
    check_cookie_name(unique_cookie)
    if timezone is not None and not isinstance(timezone, (str, ZoneInfo)):
        raise TypeError(f"timezone={timezone!r} is not a zone name; give e.g. "
                        "'Europe/Zurich', or None for the system's zone")
    if not uniques:
        if isinstance(timezone, str):
            periods.resolve_timezone(timezone)  # a wrong name is an error either way
        return None
    tz = timezone if isinstance(timezone, ZoneInfo) else periods.resolve_timezone(timezone)
    return UniqueCookie(unique_cookie, tz, clock or time.time)


def unique_recorder(account: AccountFunc | None,
                    logger: logging.Logger = log) -> Callable[[Any], None]:
    """``record(request)`` counting the :data:`UNIQUE_EVENT` of a request,
    for the same account as its page view (:func:`make_recorder`; never
    raises)."""
    return make_recorder(account, UNIQUE_EVENT, logger)
