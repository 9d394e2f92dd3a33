"""The WSGI app: the Bootic-compatible JSON stats API, /metrics, the dashboard.

A plain WSGI callable, so it runs under the daemon's own server
(:mod:`trafficthreshold.api.server`, waitress) or under any WSGI server::

    from trafficthreshold import api, config
    app = api.make_app(config.load())           # your own server, mounted anywhere
    gunicorn 'trafficthreshold.api:application' # built from config.load() on import

Routes (docs/api.rst has the JSON shapes; ``<prefix>`` is ``[http]
prefix``, ``/api/stats`` by default)::

  GET <prefix>/track/<account>/<event>/<year>[/<month>[/<day>[/<hour>]]]
  GET <prefix>[/track[/<account>[/<event>]]]   discovery: links to what exists
  GET <prefix>/funnels/<account>/<event>/<year>[/<month>]   counts per status
  GET <prefix>/funnels[/<account>[/<event>]]   discovery of the funnels
  GET <prefix>/live            the segment now: current minute, 60 s, 60 minutes
  GET <prefix>/live?scope=farm every host's live numbers, from the farm's Redis
  GET /metrics                 Prometheus text format 0.0.4
  GET /api/openapi.json        OpenAPI 3 description of the above
  GET /                        the dashboard (HTML)

Read-only: GET and HEAD only, no request bodies, URLs up to 2 KiB.  When
``http.token`` is set every route needs ``Authorization: Bearer <token>``.
With ``[http] cors_origins`` set, pages on those origins may read it from a
browser: a preflight ``OPTIONS`` from a listed origin is answered (before
the token check, as browsers never send it on a preflight); every other
OPTIONS is a 405.
Errors are JSON ``{"status": 404, "error": "Not Found", "message": ...}``;
every store error (sqlite3, or the farm's Redis not answering) is a 503
whose message says what to do (retry, or how to recover a damaged file), the dashboard's 503 an HTML page; an unexpected
exception is logged and answered 500, never with a traceback.

Threads: the app is shared by the server's threads.  Each thread opens its
own period store (:func:`trafficthreshold.store.open_reader`: a sqlite3
connection belongs to the thread that made it) on first use.  The segment attachment is shared:
its reads are lock-free and run under the GIL.
"""

from __future__ import annotations

import functools
import hmac
import http
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2

from trafficthreshold import alerts, names, segment, store as stores, subscribe
from trafficthreshold.alerts import store as alertstore
from trafficthreshold.api import cors
from trafficthreshold.api import metrics
from trafficthreshold.config import Config, is_loopback
from trafficthreshold.api.dashboard import dashboard_context, farm_section, num
from trafficthreshold.errors import ConfigError, SegmentError, TrafficThresholdError
from trafficthreshold.live import (  # noqa: F401  (re-exported)
    LIVE_MINUTES, Snapshot, farm_view, snapshot)
from trafficthreshold.api.openapi import JSON_TYPE, openapi_document
from trafficthreshold.periods import ImpossiblePeriod, segments
from trafficthreshold.store import StoreError

log = logging.getLogger("trafficthreshold.api")

#: Longest request target accepted (path and query, as sent).
MAX_URL_BYTES = 2048
HTML_TYPE = "text/html; charset=utf-8"
#: Bootic's headers: stats change every minute, nothing may cache them.
NO_CACHE = (
    ("Cache-Control", "no-cache, no-store, must-revalidate"),
    ("Pragma", "no-cache"),
    ("Expires", "0"),
)
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)
ALLOWED_METHODS = ("GET", "HEAD")
#: Bootic's root listed both.
CHARTS = ("track", "funnels")

#: The stats routes matched by pattern, after the prefix: handler name -> regex.
PATTERNS = {
    "track": (r"/track/(?P<account>[^/]+)/(?P<event>[^/]+)/(?P<year>[0-9]{1,9})"
              r"(?:/(?P<month>[0-9]{1,9})(?:/(?P<day>[0-9]{1,9})(?:/(?P<hour>[0-9]{1,9}))?)?)?"),
    "keys": r"/track/(?P<account>[^/]+)(?:/(?P<event>[^/]+))?",
    "funnels": (r"/funnels/(?P<account>[^/]+)/(?P<event>[^/]+)/(?P<year>[0-9]{1,9})"
                r"(?:/(?P<month>[0-9]{1,9}))?"),
    "funnel_keys": r"/funnels/(?P<account>[^/]+)(?:/(?P<event>[^/]+))?",
}
#: The stats routes matched exactly, after the prefix: path -> handler name.
EXACT = {"": "index", "/track": "keys", "/funnels": "funnel_keys", "/live": "live"}
#: The routes that never move.
FIXED = {"/": "dashboard", "/api/openapi.json": "openapi", "/metrics": "metrics"}

CounterFactory = Callable[[], Any]


class HttpError(Exception):
    """Answer the request with ``status`` and a JSON message."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(status, body.encode("utf-8"), JSON_TYPE, tuple(headers))


def error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
    reason = http.HTTPStatus(status).phrase
    payload = {"status": status, "error": reason, "message": message}
    return json_response(status, payload, (*NO_CACHE, *headers))


def public_url(config: Config) -> str:
    """Where clients reach the API, without a trailing slash:
    ``http.public_url`` if set, else ``http://<http.listen>`` (which
    already spells an IPv6 host in brackets, ``[::1]:8787``)."""
    if config.http.public_url:
        return config.http.public_url.rstrip("/")
    return f"http://{config.http.listen}"


def _links_base(config: Config) -> tuple[str, bool]:
    """The base of the ``links`` (:func:`public_url`) and whether the mount
    point (SCRIPT_NAME) follows it: only without ``http.public_url``."""
    return public_url(config), not config.http.public_url


def _script_name(environ: Mapping[str, Any]) -> str:
    """SCRIPT_NAME (latin-1 bytes in WSGI) re-quoted for a URL, no trailing slash."""
    raw = environ.get("SCRIPT_NAME", "").encode("latin-1", "replace")
    return urllib.parse.quote(raw, safe="/").rstrip("/")


class _NoPeriods:
    """Stands in for a store that did not answer, on the dashboard: every
    period reads as zeros, nothing is listed, nothing was rolled."""

    empty = None

    def __init__(self, tz: Any) -> None:
        self.tz = tz

    def closed_through(self) -> None:
        return None

    def last_roll_at(self) -> None:
        return None

    def gap_count(self) -> int:
        return 0

    def watermark_minutes(self, *args: Any, **kwargs: Any) -> dict[Any, int]:
        return {}

    def period(self, account: str, event: str, year: int, month: int | None = None,
               day: int | None = None, hour: int | None = None) -> dict[str, Any]:
        return {"data": dict.fromkeys(segments(year, month, day, hour), 0), "total": 0}

    def top_accounts(self, *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        return []

    def events(self, *args: Any) -> list[str]:
        return []

    def accounts(self, *args: Any) -> list[str]:
        return []


@dataclass
class Request:
    """What a handler needs of the WSGI environ."""

    environ: Mapping[str, Any]
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    #: ``[http] prefix`` when the request came in (a reload may change it).
    prefix: str = "/api/stats"

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default



@dataclass(frozen=True)
class Routing:
    """The routes of one ``[http] prefix`` (handler names, looked up on the
    app), swapped whole on a reload."""

    prefix: str
    exact: dict[str, str]
    patterns: tuple[tuple[re.Pattern[str], str], ...]
    openapi: bytes

    @classmethod
    def of(cls, prefix: str, farm: bool = True) -> Routing:
        exact = {prefix + path: name for path, name in EXACT.items()}
        exact.update(FIXED)  # the prefix is checked never to hide these
        patterns = tuple((re.compile(re.escape(prefix) + pattern), name)
                         for name, pattern in PATTERNS.items())
        return cls(prefix, exact, patterns,
                   json.dumps(openapi_document(prefix, farm), indent=1).encode("utf-8"))

    def find(self, path: str) -> tuple[str, dict[str, str]] | None:
        """(handler name, its path arguments) for ``path``, or None."""
        name = self.exact.get(path)
        if name is not None:
            return name, {}
        for pattern, name in self.patterns:
            match = pattern.fullmatch(path)
            if match is not None:
                return name, {k: v for k, v in match.groupdict().items() if v is not None}
        return None


# --------------------------------------------------------------------------
# the app


class StatsApp:
    """The WSGI application; make it with :func:`make_app`."""

    def __init__(
        self,
        config: Config,
        store_path: str | None,
        counter_factory: CounterFactory | None,
        now: Callable[[], float],
    ) -> None:
        self.config = config
        self.store_path = store_path or config.database
        # The store it reads (its backend, database and time zone): fixed
        # until a restart.
        self._store_config = config
        self.now = now
        self._token = config.http.token.encode("ascii")
        self._links = _links_base(config)
        self._counter_factory = counter_factory or functools.partial(
            segment.attach, config.key, config.backend
        )
        self._counter: Any = None
        self._counter_lock = threading.Lock()
        self._local = threading.local()
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("trafficthreshold", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # the package's templates do not change under us
        )
        self._templates.filters["num"] = num
        self._dashboard = self._templates.get_template("dashboard.html")
        self._error_page = self._templates.get_template("dashboard_error.html")
        self._routing: Routing | None = None
        self._public_host: str | None = None  # see serving_on
        self._set_http(config)

    def _set_http(self, config: Config) -> None:
        """Take ``[http]``'s prefix and origins.  Each is one attribute
        assignment, so a request running meanwhile sees the old or the new."""
        if self._routing is None or self._routing.prefix != config.http.prefix:
            self._routing = Routing.of(config.http.prefix,
                                       farm=stores.farm_host(config) is not None)
        self._cors = frozenset(config.http.cors_origins)

    def serving_on(self, host: str) -> None:
        """The server calls this with the host it is bound to: on an address
        other than loopback no reload may take the token away
        (:meth:`check_reload`), whatever the new ``listen`` says."""
        self._public_host = None if is_loopback(host) else host

    def check_reload(self, config: Config) -> None:
        """ConfigError if serving ``config`` where this app is served would
        break the token rule: no token on a public address."""
        if self._public_host is not None and not config.http.token:
            raise ConfigError(
                f"{config.source}: http.token is empty, but the stats API is served on "
                f"{self._public_host}, which is not a loopback address (http.listen only "
                "changes with a restart); keep http.token set, or restart the daemon to "
                "listen on 127.0.0.1")

    def reload(self, config: Config) -> None:
        """SIGHUP: new alert rules, token, public_url, prefix and CORS origins
        from the next request on.  The segment, the database and the time
        zone stay: changing those needs a restart (the supervisor says so).
        A config :meth:`check_reload` refuses raises ConfigError and
        changes nothing."""
        self.check_reload(config)
        # Everything is worked out first, then each setting is one
        # assignment: a request running meanwhile (another thread) reads
        # each one once, the old or the new, never half of one.
        token, links = config.http.token.encode("ascii"), _links_base(config)
        self.config = config
        self._token, self._links = token, links
        self._set_http(config)

    @property
    def requires_token(self) -> bool:
        """Whether every request must carry the bearer token."""
        return bool(self._token)

    # ------------------------------------------------------------------ WSGI

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        origins = self._cors
        try:
            response = self._handle(environ, method, origins)
        except HttpError as exc:
            response = self._error(environ, exc.status, exc.message, exc.headers)
        except StoreError as exc:
            # The store names the file and the recovery itself.
            log.warning("database error answering %s %r: %s", method,
                        environ.get("PATH_INFO"), exc)
            response = self._error(environ, 503, str(exc))
        except Exception as exc:
            # A locked or damaged database, a disk error, the farm's Redis
            # down or slow...: never a 500.  The message says what to do;
            # the log says which request.
            problem = stores.unavailable(exc, self.store_path)
            if problem is not None:
                log.warning("store error answering %s %r: %s", method,
                            environ.get("PATH_INFO"), exc)
                response = self._error(environ, 503, problem)
            else:
                log.exception("internal error answering %s %r", method,
                              environ.get("PATH_INFO"))
                response = error_response(500, "internal error; the server log has the details")
        status = f"{response.status} {http.HTTPStatus(response.status).phrase}"
        headers = [] if response.status == 204 else [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
        ]
        headers += [*SECURITY_HEADERS, *response.headers]
        if response.status != 204:  # a preflight has its own
            headers += cors.headers(origins, environ)
        start_response(status, headers)
        # HEAD: the headers of GET (Content-Length included), no body.
        return [b""] if method == "HEAD" else [response.body]

    def _error(self, environ: Mapping[str, Any], status: int, message: str,
               headers: Iterable[tuple[str, str]] = ()) -> Response:
        """The error answer: JSON, except a 503 of the dashboard, which is a
        page a person reads (templates/dashboard_error.html)."""
        if status == 503 and environ.get("PATH_INFO", "") in ("", "/"):
            reason = http.HTTPStatus(status).phrase
            html = self._error_page.render(status=status, error=reason, message=message)
            csp = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
            return Response(status, html.encode("utf-8"), HTML_TYPE,
                            (*NO_CACHE, ("Content-Security-Policy", csp), *headers))
        return error_response(status, message, headers)

    def _handle(self, environ: Mapping[str, Any], method: str,
                origins: frozenset[str]) -> Response:
        """Check limits, auth and method, then route.  Raises HttpError."""
        raw = environ.get("REQUEST_URI") or environ.get("RAW_URI") or ""
        target = raw or environ.get("PATH_INFO", "") + "?" + environ.get("QUERY_STRING", "")
        if len(target) > MAX_URL_BYTES:
            raise HttpError(414, f"the URL is longer than {MAX_URL_BYTES} bytes")
        if _has_body(environ):
            raise HttpError(413, "this API is read-only and takes no request body")
        preflight = cors.preflight(origins, environ)
        if preflight is not None:  # before the token: a preflight never has it
            return Response(204, b"", headers=tuple(preflight))
        self._authorize(environ)
        if method not in ALLOWED_METHODS:
            raise HttpError(405, f"{method} is not allowed; this API is read-only (GET, HEAD)",
                            [("Allow", ", ".join(ALLOWED_METHODS))])
        routing = self._routing
        assert routing is not None  # set by __init__
        request = Request(environ, _decode_path(environ, raw), _parse_query(environ),
                          routing.prefix)
        found = routing.find(request.path)
        if found is None:
            raise HttpError(404, f"no such page: {request.path}; see /api/openapi.json")
        name, arguments = found
        handler: Callable[..., Response] = getattr(self, name)
        return handler(request, **arguments)

    def _base_url(self, request: Request) -> str:
        """The base of the ``links``: ``http.public_url``, else the listen
        address plus the mount point (SCRIPT_NAME, which the server sets);
        never the request's Host header, which the client chooses."""
        base, mounted = self._links  # one read: see reload
        return base + _script_name(request.environ) if mounted else base

    def _authorize(self, environ: Mapping[str, Any]) -> None:
        """Raise 401 unless the bearer token matches (when one is set)."""
        token = self._token  # one read: see reload
        if not token:
            return
        scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        given = credentials.strip().encode("latin-1", "replace")
        # compare_digest: the time taken does not tell how much matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, token):
            raise HttpError(401, "send the token of http.token as 'Authorization: Bearer <token>'",
                            [("WWW-Authenticate", 'Bearer realm="trafficthreshold"')])

    # ------------------------------------------------------------ resources

    def _store(self) -> Any:
        """This thread's period store (:func:`store.open_reader`), opened
        on first use: read-only, a GET never writes, not even the schema
        into an empty file, and never takes the writer's lock."""
        store = getattr(self._local, "store", None)
        if store is None:
            try:
                store = stores.open_reader(self._store_config, database=self.store_path)
            except TrafficThresholdError as exc:
                raise HttpError(503, str(exc)) from None
            if store.empty:
                # A missing file, or one without tables yet (the daemon has
                # not made them, or its first migration failed): a 503, and
                # nothing kept, so the next request opens the file again and
                # sees the tables once they are made.
                store.close()
                raise HttpError(503, store.empty)
            self._local.store = store
        return store

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection to the local SQLite file, for
        the alert state, which stays local with either store."""
        conn = getattr(self._local, "reader", None)
        if conn is None:
            if self.store_path != ":memory:" and not os.path.exists(self.store_path):
                raise HttpError(503, f"the database {self.store_path} does not exist yet; "
                                     "start the daemon (`trafficthreshold run`)")
            conn = alertstore.open_reader(self.store_path)
            self._local.reader = conn
        return conn

    def _attach(self) -> Any:
        """The shared segment attachment, or None if no segment is live.

        A retired or removed segment is let go and attached afresh.  The old
        Counter is never detached here: another thread may still be reading
        it, and it unmaps itself when the last reference goes.
        """
        with self._counter_lock:
            counter = self._counter
            if counter is not None and counter.attached \
                    and counter.load(segment.H_STATE, 4) == segment.STATE_LIVE:
                return counter
            self._counter = None
            try:
                self._counter = self._counter_factory()
            except SegmentError as exc:
                log.debug("no segment: %s", exc)
            return self._counter

    def alert_state(self) -> alerts.AlertState | None:
        """The saved alert state, or None if the alert tables do not exist."""
        return alertstore.read_state(self._reader())

    # ----------------------------------------------------------------- track

    def track(self, request: Request, account: str, event: str, year: str,
              month: str | None = None, day: str | None = None,
              hour: str | None = None) -> Response:
        """One period of one key, Bootic's shape; segments zero-filled."""
        account = _url_name("account", account, names.ACCOUNT_MAX, names.OVERFLOW_ACCOUNT)
        event = _url_name("event", event, names.EVENT_MAX, names.OVERFLOW_EVENT)
        month_, day_, hour_ = (None if p is None else int(p) for p in (month, day, hour))
        parts = (int(year), month_, day_, hour_)
        try:
            period = self._store().period(account, event, parts[0], month_, day_, hour_)
        except ImpossiblePeriod as exc:
            raise HttpError(400, str(exc)) from None
        base = "/".join([self._base_url(request) + request.prefix, "track", _quote(account),
                         _quote(event),
                         *(str(p) for p in parts if p is not None)])
        # Bootic lists the child periods that hold data; an hour's minutes
        # are leaves.
        links = [] if hour is not None else [
            f"{base}/{segment_}" for segment_, count in period["data"].items() if count
        ]
        payload = {
            "type": "track", "account": account, "event": event,
            "year": parts[0], "month": parts[1], "day": parts[2], "hour": parts[3],
            "data": {str(k): v for k, v in period["data"].items()},
            "total": period["total"],
            "links": links,
        }
        return json_response(200, payload, NO_CACHE)

    # ------------------------------------------------------------- discovery

    def index(self, request: Request) -> Response:
        """Bootic's root: links to the charts, ``track`` and ``funnels``."""
        base = self._base_url(request) + request.prefix
        payload = {"type": None, "account": None, "event": None,
                   "links": [f"{base}/{chart}" for chart in CHARTS]}
        return json_response(200, payload, NO_CACHE)

    def keys(self, request: Request, account: str | None = None,
             event: str | None = None) -> Response:
        """Bootic's AllKeysHandler: the accounts, an account's events, or a
        key's years, as links; 404 for an account or key with no rows."""
        store = self._store()
        return self._discovery(request, "track", account, event, store.accounts,
                               store.events, store.years)

    def funnel_keys(self, request: Request, account: str | None = None,
                    event: str | None = None) -> Response:
        """The track discovery's twin for the funnels: the accounts with
        funnel counts, an account's events, an event's years."""
        store = self._store()
        return self._discovery(request, "funnels", account, event, store.funnel_accounts,
                               store.funnel_events, store.funnel_years)

    def _discovery(self, request: Request, chart: str, account: str | None,
                   event: str | None, accounts: Callable[[], list[str]],
                   events: Callable[[str], list[str]],
                   years: Callable[[str, str], list[int]]) -> Response:
        """The links one level below ``<prefix>/<chart>[/<account>[/<event>]]``;
        404 when nothing is stored there."""
        path = [self._base_url(request) + request.prefix, chart]
        if account is None:
            children: list[str] = _servable(accounts(), "account", names.ACCOUNT_MAX,
                                            names.OVERFLOW_ACCOUNT)
        else:
            account = _url_name("account", account, names.ACCOUNT_MAX, names.OVERFLOW_ACCOUNT)
            path.append(_quote(account))
            if event is None:
                # An event name of a funnel key is its event: the names rule.
                children = _servable(events(account), "event", names.EVENT_MAX,
                                     names.OVERFLOW_EVENT)
                what = f"account {account!r}"
            else:
                event = _url_name("event", event, names.EVENT_MAX, names.OVERFLOW_EVENT)
                path.append(_quote(event))
                children = [str(year) for year in years(account, event)]
                what = f"event {event!r} of account {account!r}"
            if not children:
                kind = "funnel counts" if chart == "funnels" else "counts"
                raise HttpError(404, f"no {kind} stored for {what}; "
                                     f"{request.prefix}/{chart} lists the accounts that have "
                                     "some (a period of any name answers zeros)")
        base = "/".join(path)
        payload = {"type": chart, "account": account, "event": event,
                   "links": [f"{base}/{_quote(child)}" for child in children]}
        return json_response(200, payload, NO_CACHE)

    # --------------------------------------------------------------- funnels

    def funnels(self, request: Request, account: str, event: str, year: str,
                month: str | None = None) -> Response:
        """Bootic's order funnels: the counts per status of one event in a
        year or a month; only the statuses counted there, by name."""
        account = _url_name("account", account, names.ACCOUNT_MAX, names.OVERFLOW_ACCOUNT)
        event = _url_name("event", event, names.EVENT_MAX, names.OVERFLOW_EVENT)
        year_, month_ = int(year), None if month is None else int(month)
        try:
            segments(year_, month_)  # 400 for month 13, year 0
        except ImpossiblePeriod as exc:
            raise HttpError(400, str(exc)) from None
        funnel = self._store().funnel(account, event, year_, month_)
        base = "/".join([self._base_url(request) + request.prefix, "funnels", _quote(account),
                         _quote(event), str(year_)])
        # A year links its months that hold counts (Bootic: KEYS <year>:*).
        links = [] if month_ is not None else [f"{base}/{m}" for m in funnel["months"]]
        payload = {
            "type": "funnels", "account": account, "event": event,
            "year": year_, "month": month_,
            "data": funnel["data"], "total": funnel["total"], "links": links,
        }
        return json_response(200, payload, NO_CACHE)

    # ------------------------------------------------------------------ live

    def live(self, request: Request) -> Response:
        """The segment now; 503 when no segment is installed.  With
        ``scope=farm`` the farm's live numbers from Redis instead."""
        account = _query_name(request, "account", names.ACCOUNT_MAX, names.OVERFLOW_ACCOUNT)
        event = _query_name(request, "event", names.EVENT_MAX, names.OVERFLOW_EVENT)
        scope = request.param("scope", "host")
        if scope == "farm":
            return json_response(200, self.farm_live(account, event), NO_CACHE)
        if scope != "host":
            raise HttpError(400, f"scope={scope!r} is not known; use scope=host (this host's "
                                 "segment, the default) or scope=farm (every host, from the "
                                 "farm's Redis)")
        counter = self._attach()
        if counter is None:
            raise HttpError(503, "no trafficthreshold segment is installed at key "
                                 f"{self.config.key:#x} ({self.config.backend}); "
                                 "run `trafficthreshold install`")
        now = self.now()
        snap = snapshot(counter, now)
        keys = [
            {k: entry[k] for k in ("account", "event", "current_minute", "last_60s", "minutes")}
            for entry in snap.keys
            if (account is None or entry["account"] == account)
            and (event is None or entry["event"] == event)
        ]
        payload = {
            "type": "live",
            "now": now,
            "minute": snap.minute,
            "first_minute": snap.minute - LIVE_MINUTES,
            "keys": keys,
            "throttle": snap.throttle,
            "supervisor": snap.supervisor,
            "segment": snap.segment,
            "damaged": snap.damaged,
        }
        return json_response(200, payload, NO_CACHE)

    def farm_live(self, account: str | None = None, event: str | None = None,
                  keep_only: bool = False) -> dict[str, Any]:
        """The farm's live numbers (:func:`live.farm_view`) from the farm's
        Redis; 400 naming the fix on a host whose store is SQLite.  A Redis
        error propagates (the app answers 503).  ``keep_only``: read by a
        reader that keeps that key alone (the dashboard's panel, refreshed
        again and again; an API question reads the reader of every key)."""
        if stores.farm_host(self.config) is None:
            raise HttpError(400, "scope=farm needs the farm's Redis: this host's [store] "
                                 f"backend is {self.config.store.backend!r}; set [store] "
                                 "backend = \"redis\" with the farm's url on every host "
                                 "(docs/redis.rst), or ask without scope=farm for this "
                                 "host's own numbers")
        now = self.now()
        # Both named: that key's rows alone (the dashboard's panel), not a
        # row per key of every host (hosts x keys) filtered afterwards.
        only = None if account is None or event is None else [(account, event)]
        reading = self._store().farm_live(now, only, keep_only)
        return farm_view(reading, now, self.config.store.host, account, event)

    # --------------------------------------------------------------- metrics

    def metrics(self, request: Request) -> Response:
        """The Prometheus text.  Every store read is one snapshot (a read
        transaction on this thread's read-only connection, or one MULTI on
        the farm's Redis), and the segment is read after it (see
        :func:`metrics.pending_hits`): counters never go down because the
        supervisor rolled during the scrape."""
        state = alertstore.read_state(self._reader())
        now = self.now()
        counter = self._attach()
        store = self._store()
        ring = 1 if counter is None else counter.load(segment.H_MINUTE_BUCKETS, 4)
        first, minute = metrics.pending_window(now, ring)
        # One snapshot of the store: the totals and this segment's
        # watermarks together (None without a segment).
        stored = metrics.StoreReading.of(store.metrics_reading(
            None if counter is None else counter.load(segment.H_INSTANCE, 8), first, minute))
        # The ring is read after the store: see metrics.pending_from.
        version = None if counter is None else segment.keys_version(counter)
        snap = None if counter is None else snapshot(counter, now)
        totals = stored.totals
        if snap is not None and stored.watermarks is not None:
            slots = {e["slot"]: (e["account"], e["event"]) for e in snap.keys}
            # first..minute as above: the ring's length is the segment's
            # geometry, fixed when it was made.
            for key, n in metrics.pending_from(stored.watermarks, counter, slots,
                                               first, minute, version).items():
                totals[key] = totals.get(key, 0) + n
        firing = None
        if state is not None:
            # Host rules only: a farm rule's episode is in the farm's Redis
            # (``trafficthreshold alerts`` shows it), not in this file.
            firing = {rule.name: rule.name in state.episodes
                      for rule in self.config.host_alerts}
            firing.update({name: True for name in state.episodes if name not in firing})
        families = metrics.collect(
            totals=totals,
            live=None if snap is None else snap.keys,
            header=None if snap is None else snap.header,
            throttle_level=None if snap is None else snap.throttle["level"],
            heartbeat_age=None if snap is None else snap.supervisor["heartbeat_age_seconds"],
            firing=firing,
            last_roll_at=stored.last_roll_at,
            gaps=stored.gaps,
            damaged=None if snap is None else len(snap.damaged),
            late_dropped=stored.late_dropped,
            bad_keys=stored.bad_keys,
            host=stores.farm_host(self.config),
            subscribers=subscribe.read_all(self.config.database, now),
        )
        body = metrics.render(families).encode("utf-8")
        return Response(200, body, metrics.CONTENT_TYPE, NO_CACHE)

    # --------------------------------------------------------------- openapi

    def openapi(self, request: Request) -> Response:
        return Response(200, self._routing.openapi, JSON_TYPE)

    # ------------------------------------------------------------- dashboard

    def dashboard(self, request: Request) -> Response:
        event = _query_name(request, "event", names.EVENT_MAX, names.OVERFLOW_EVENT)
        event = event or names.DEFAULT_EVENT
        store = self._store()
        now = self.now()
        counter = self._attach()
        snap = None if counter is None else snapshot(counter, now)
        state = self.alert_state()
        store_down = None
        try:
            context = dashboard_context(self.config, store, snap, state, event, now)
        except Exception as exc:
            if not stores.unreachable(exc):
                raise
            # The farm's Redis is down: show this host's live counts, and say so.
            store_down = str(exc)
            context = dashboard_context(self.config, _NoPeriods(store.tz), snap, state, event,
                                        now)
        nonce = secrets.token_urlsafe(16)
        html = self._dashboard.render(**context, nonce=nonce, store_down=store_down,
                                      farm=self._farm_section(event, now),
                                      throttle_scope=self.config.throttle.scope)
        csp = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
               f"script-src 'nonce-{nonce}'; connect-src 'self'; base-uri 'none'; "
               "form-action 'none'; frame-ancestors 'none'")
        return Response(200, html.encode("utf-8"), HTML_TYPE,
                        (*NO_CACHE, ("Content-Security-Policy", csp)))


    def _farm_section(self, event: str, now: float) -> dict[str, Any] | None:
        """The dashboard's farm panel: None without the farm's Redis; a
        Redis that does not answer is said in the panel, not a 503."""
        if stores.farm_host(self.config) is None:
            return None
        try:
            view = self.farm_live(names.ALL, event, keep_only=True)  # what the panel shows
        except Exception as exc:
            if not stores.unreachable(exc):
                raise
            return farm_section(None, str(exc), event, now)
        return farm_section(view, None, event, now)


def make_app(
    config: Config,
    *,
    store_path: str | None = None,
    counter_factory: CounterFactory | None = None,
    now: Callable[[], float] = time.time,
) -> StatsApp:
    """The WSGI app for ``config``.

    ``store_path`` overrides ``config.database``; ``counter_factory()``
    attaches to the segment (default: ``segment.attach(config.key,
    config.backend)``, and it may raise SegmentNotFound); ``now()`` is the
    clock (float Unix seconds), a parameter for tests.
    """
    return StatsApp(config, store_path, counter_factory, now)


def make_app_from_env(env: Mapping[str, str] = os.environ) -> StatsApp:
    """The app for the configuration :func:`trafficthreshold.config.load`
    finds (``$TRAFFICTHRESHOLD_CONFIG``, else /etc/trafficthreshold/config.toml)."""
    from trafficthreshold import config as config_module

    return make_app(config_module.load(env=env))


_application: StatsApp | None = None
_application_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``trafficthreshold.api:application``, built on first access (so that
    importing this module never reads the configuration)."""
    global _application
    if name != "application":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _application_lock:
        if _application is None:
            _application = make_app_from_env()
    return _application


# --------------------------------------------------------------------------
# request parsing


def _has_body(environ: Mapping[str, Any]) -> bool:
    length = environ.get("CONTENT_LENGTH") or "0"
    try:
        has_length = int(length) > 0
    except ValueError:
        has_length = True
    return has_length or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()


def _decode_path(environ: Mapping[str, Any], raw_uri: str) -> str:
    """PATH_INFO as text (WSGI hands over bytes as latin-1); 404 for bytes
    that are not UTF-8 and for a percent-encoded slash, which would let a
    name span two path segments."""
    raw_path = raw_uri.partition("?")[0]
    if "%2f" in raw_path.lower() or "%5c" in raw_path.lower():
        raise HttpError(404, "percent-encoded slashes are not allowed in stats URLs")
    try:
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise HttpError(404, "the URL path is not valid UTF-8") from None
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path or "/"


def _parse_query(environ: Mapping[str, Any]) -> dict[str, list[str]]:
    try:
        return urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True,
                                     max_num_fields=20,
                                     errors="strict")
    except (ValueError, UnicodeError):
        raise HttpError(400, "the query string is malformed or has too many fields") from None


def _url_name(kind: str, value: str, max_bytes: int, reserved: str) -> str:
    """A name from the path, by the rules of :mod:`trafficthreshold.names`
    (plus the reserved overflow key); 404 otherwise."""
    if value == reserved:
        return value
    try:
        return names.check_name(kind, value, max_bytes)
    except (TypeError, ValueError) as exc:
        raise HttpError(404, str(exc)) from None


def _servable(found: list[str], kind: str, max_bytes: int, reserved: str) -> list[str]:
    """The names of ``found`` that a URL can carry (:func:`_url_name`): a
    store written before a rule was added (``.``, ``..``, ``\\``) may hold
    others, which would be listed as links that answer 404."""
    kept = []
    for name in found:
        try:
            kept.append(_url_name(kind, name, max_bytes, reserved))
        except HttpError:
            log.debug("not listing the %s %r: no URL can carry it", kind, name)
    return kept


def _query_name(request: Request, kind: str, max_bytes: int, reserved: str) -> str | None:
    """An optional name from the query string; 404 if it is not valid (no
    key can have that name), like a name in the path."""
    value = request.param(kind)
    return None if value is None else _url_name(kind, value, max_bytes, reserved)


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")
