"""The TOML configuration: defaults, validation, frozen dataclasses.

The file (default ``/etc/trafficthreshold/config.toml``) is described key by
key in ``docs/configuration.rst``; every key is optional.  :func:`load` finds
and reads it, :func:`parse` validates a text, :func:`default` is the
configuration without a file, :func:`check` adds warnings about the
environment (missing sendmail, readable secrets ...) and :func:`dump` renders
a configuration back to TOML for ``trafficthreshold config show``.

Validation is the point of this module.  Every problem becomes one line of a
:class:`~trafficthreshold.errors.ConfigError` naming the file, the key
(``alert[2].threshold``: alerts are numbered from 0 in file order), the bad
value and the fix; all problems are collected, not just the first::

    config.toml: throttle.window = 'hour' is not valid; use "60s" or "minute"
    config.toml: throttle.multipler = 60 is not a known key; did you mean "multiplier"?
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
import urllib.parse
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from trafficthreshold import names
# The segment's defaults and the environment's key live in env.py, which a
# worker loads without this module; config.parse_key and config.env_key
# stay importable from here.
from trafficthreshold.env import BACKENDS, DEFAULT_KEY, MAX_KEY, env_key, parse_key  # noqa: F401
from trafficthreshold.errors import ConfigError
from trafficthreshold.segment import WINDOWS as SEGMENT_WINDOWS
from trafficthreshold.throttle import POLICIES

#: Where :func:`load` looks when neither a path nor the environment names one.
DEFAULT_PATH = "/etc/trafficthreshold/config.toml"
#: The database directory of a daemon running as root.
SYSTEM_STATE_DIR = "/var/lib/trafficthreshold"
DATABASE_NAME = "stats.sqlite3"

#: The window names, in the order of the header's throttle_window values.
WINDOWS = tuple(SEGMENT_WINDOWS)
#: ``[throttle] scope``: whose count sets the level; the first is the default.
THROTTLE_SCOPES = ("host", "farm")
#: ``[[alert]] scope``: whose count a rule compares; the first is the default.
ALERT_SCOPES = ("host", "farm")
TRANSPORTS = ("sendmail", "smtp")


# --------------------------------------------------------------------------
# Environment-dependent defaults


#: Names that say nothing about which host a mail came from.
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "localhost6",
                         "localhost6.localdomain6", "ip6-localhost", "ip6-loopback"})


def host_name(getfqdn: Callable[[], str] = socket.getfqdn,
              gethostname: Callable[[], str] = socket.gethostname) -> str:
    """The host's name for alert mails: the one the subject and body name
    and the domain of the default From and of Message-IDs.

    The fully qualified name (``socket.getfqdn()``) if it is a real one; if
    it is ``localhost``-ish (``/etc/hosts`` maps the host name to 127.0.0.1
    after ``localhost``, as many images do) or a bare IP, the plain host
    name (``socket.gethostname()``); ``localhost`` only when neither says more.
    """
    for name in (getfqdn(), gethostname()):
        name = (name or "").strip().rstrip(".")
        if name and name.lower() not in LOCAL_NAMES and not _is_ip(name):
            return name
    return "localhost"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=1)
def default_host() -> str:
    """:func:`host_name` of this machine, looked up once."""
    return host_name()


def default_sender() -> str:
    """``trafficthreshold@<host>``, the host being :func:`default_host`, the
    one the mails' subject and body name."""
    return "trafficthreshold@" + default_host()


def default_database(env: Mapping[str, str] = os.environ, euid: int | None = None) -> str:
    """Return the default database path.

    ``$STATE_DIRECTORY`` (set by systemd's ``StateDirectory=``; the first of a
    colon-separated list) if set; else ``/var/lib/trafficthreshold`` for root
    (``euid`` 0, default: this process); else ``$XDG_STATE_HOME`` (if
    absolute) or ``~/.local/state``, plus ``/trafficthreshold``.
    """
    state_directory = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state_directory:
        directory = state_directory
    elif (os.geteuid() if euid is None else euid) == 0:
        directory = SYSTEM_STATE_DIR
    else:
        xdg = env.get("XDG_STATE_HOME", "")
        home = env.get("HOME") or os.path.expanduser("~")
        base = xdg if os.path.isabs(xdg) else os.path.join(home, ".local", "state")
        directory = os.path.join(base, "trafficthreshold")
    return os.path.join(directory, DATABASE_NAME)


# --------------------------------------------------------------------------
# The dataclasses, one per table


@dataclasses.dataclass(frozen=True)
class ThrottleConfig:
    """``[throttle]``: how the window count becomes a level 0..5."""

    multiplier: int = 60
    window: str = "60s"
    policy: str = "hysteresis"
    cooldown: int = 300
    cron_test: int = 10800
    #: "host": the level follows this host's count; "farm": the farm's total
    #: (``[store] backend = "redis"``; docs/redis.rst, "The farm's level").
    scope: str = "host"


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    """``[retention]``: days to keep each period level; 0 = forever."""

    minutes: int = 7
    hours: int = 0
    days: int = 0
    months: int = 0


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    """``[http]``: the JSON API, /metrics and the dashboard."""

    enabled: bool = True
    listen: str = "127.0.0.1:8787"
    token: str = dataclasses.field(default="", repr=False)
    #: The API's address as clients reach it (a proxy, a public name), the
    #: base of the ``links`` in responses; "" for ``http://<listen>``.
    public_url: str = ""
    #: Where the stats routes live (``<prefix>/track/...``, ``<prefix>/live``).
    prefix: str = "/api/stats"
    #: Origins whose pages may read the API (CORS); ``"*"`` for any.
    cors_origins: tuple[str, ...] = ()

    @property
    def address(self) -> tuple[str, int]:
        """``listen`` as ``(host, port)``; IPv6 hosts without brackets."""
        return parse_listen(self.listen)


@dataclasses.dataclass(frozen=True)
class MailConfig:
    """``[mail]``: how alert mails leave the machine."""

    transport: str = "sendmail"
    sendmail: str = "/usr/sbin/sendmail"
    smtp_host: str = "localhost"
    smtp_port: int = 25
    starttls: bool = False
    username: str = ""
    password_file: str = ""
    password_env: str = ""
    timeout: float = 30
    sender: str = dataclasses.field(default_factory=default_sender)  # TOML: from
    max_per_hour: int = 20
    templates: str = ""
    dashboard_url: str = ""


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """``[store]``: where the supervisor rolls the minutes (docs/redis.rst).

    ``backend = "sqlite"`` keeps the top-level ``database``; ``"redis"``
    writes the farm's Redis (``url``, or ``sentinels`` with ``service``).
    The password is never in the file: ``password_file`` or
    ``password_env``, as in ``[mail]``."""

    backend: str = "sqlite"
    url: str = ""
    sentinels: tuple[str, ...] = ()
    service: str = ""
    password_file: str = ""
    password_env: str = ""
    prefix: str = "track"
    funnels_prefix: str = "funnels"
    host: str = dataclasses.field(default_factory=socket.gethostname)
    #: Seconds the farm's alert leader keeps its lease without renewing it
    #: (it renews every second): how soon another host takes over.
    lease_ttl: float = 10.0
    #: Days after its last roll that a host that went away (a renamed,
    #: replaced or scaled-down machine) is forgotten in Redis: its host
    #: hash, its gaps, its entry in the farm's host list.
    forget_hosts_days: float = 30.0


@dataclasses.dataclass(frozen=True)
class AlertRule:
    """One ``[[alert]]`` table."""

    name: str
    account: str = names.ALL
    event: str = names.DEFAULT_EVENT
    threshold: int = 10
    window: str = "minute"
    to: tuple[str, ...] = ()
    sender: str = ""  # TOML: from; "" means mail.from
    repeat: int = 3600
    resolved: bool = True
    clear_minutes: int = 5
    #: "host": this host's count, on every host; "farm": the farm's total,
    #: by the lease holder only (docs/alerts.rst, "Farm rules").
    scope: str = "host"


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration; ``source`` is the file it came from."""

    key: int = DEFAULT_KEY
    backend: str = "sysv"
    database: str = dataclasses.field(default_factory=default_database)
    timezone: str | None = None
    throttle: ThrottleConfig = dataclasses.field(default_factory=ThrottleConfig)
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)
    http: HttpConfig = dataclasses.field(default_factory=HttpConfig)
    mail: MailConfig = dataclasses.field(default_factory=MailConfig)
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    alerts: tuple[AlertRule, ...] = ()
    source: str = dataclasses.field(default="<defaults>", compare=False)

    @property
    def host_alerts(self) -> tuple[AlertRule, ...]:
        """The ``[[alert]]`` rules every host evaluates on its own counts
        (``scope = "host"``); their state is this host's SQLite file."""
        return tuple(r for r in self.alerts if r.scope != "farm")

    @property
    def farm_alerts(self) -> tuple[AlertRule, ...]:
        """The rules of the farm's total (``scope = "farm"``): the lease
        holder's; their state is in the farm's Redis."""
        return tuple(r for r in self.alerts if r.scope == "farm")

    def sender_for(self, rule: AlertRule) -> str:
        """The From address of ``rule``'s mails: its own, else ``mail.from``."""
        return rule.sender or self.mail.sender

    @property
    def dashboard_link(self) -> str:
        """``mail.dashboard_url``, else ``http://<listen>/`` ("" if HTTP is off)."""
        if self.mail.dashboard_url or not self.http.enabled:
            return self.mail.dashboard_url
        host, port = self.http.address
        if host in ("0.0.0.0", "::"):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"


# --------------------------------------------------------------------------
# Public value checks (also used by other modules)

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS_RE = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*")
# "Display Name <addr>": a quoted name, or one without address specials.
_NAMED_RE = re.compile(r'(?P<name>"[^"\\]*"|[^<>",;:@\[\]()\\]*?)\s*<(?P<addr>[^<>]*)>')
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def is_valid_address(value: str) -> bool:
    """True for ``ops@example.com`` or ``Ops Team <ops@example.com>``.

    ASCII addresses only (write international domains in punycode); no
    control characters anywhere, so no header injection through CR/LF; no
    leading ``-``, which sendmail would read as an option (the mailer
    refuses such an address at send time: refused here, at ``config
    check``, instead of failing every mail of the rule).
    """
    if _has_control(value):
        return False
    value = value.strip()
    named = _NAMED_RE.fullmatch(value)
    address = named.group("addr") if named else value
    return (len(address) <= 254 and not address.startswith("-")
            and _ADDRESS_RE.fullmatch(address) is not None)


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``"host:port"`` or ``"[v6]:port"``; raise ValueError with a fix."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError('use "host:port", e.g. "127.0.0.1:8787" or "[::1]:8787"')
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if "%" in host:  # waitress: "Invalid host/port specified." at start
            raise ValueError(f"{host!r} has a zone id ({host[host.index('%'):]}), which the "
                             f"server cannot listen on: write the address without it, e.g. "
                             f'"[{host[:host.index("%")]}]:{port}" (a link-local fe80:: '
                             "address needs one: listen on another address)")
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        if mapped is not None:  # an IPv6 socket binds it with V6ONLY: EINVAL
            raise ValueError(f'{host!r} is an IPv4 address written as IPv6, which cannot be '
                             f'listened on: write "{mapped}:{port}"')
    elif ":" in host:
        raise ValueError(f'write IPv6 addresses in brackets: "[{host}]:{port}"')
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name or IP address")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` (in any case, as host names are) and loopback
    addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _has_control(value: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in value)


# --------------------------------------------------------------------------
# Checks for the schema: each returns the (converted) value or raises _Bad


class _Bad(Exception):
    """A value is invalid: ``problem`` ("is too small") and ``fix``."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


Check = Callable[[Any], Any]


def _kind(value: Any) -> str:
    """Name the TOML type of ``value`` for a message."""
    kinds = (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    )
    for cls, name in kinds:
        if isinstance(value, cls):
            return name
    return "a date/time"


def _wrong_type(value: Any, wanted: str, example: str) -> _Bad:
    unquote = " without quotes" if isinstance(value, str) else ""
    return _Bad(f"is {_kind(value)}", f"use {wanted}{unquote}, e.g. {example}")


def _integer(minimum: int, maximum: int, example: str = "60") -> Check:
    """A whole number from ``minimum`` to ``maximum``: every numeric key has a
    maximum that the daemon can live with (see :data:`LIMITS`)."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(value, "a whole number", example)
        if not minimum <= value <= maximum:
            raise _Bad("is out of range", f"use a whole number from {minimum} to {maximum}")
        return value

    return check


def _seconds(maximum: float) -> Check:
    """A positive, finite number of seconds (int or float) up to ``maximum``."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(value, "a number of seconds", "30")
        if not math.isfinite(value) or value <= 0:
            raise _Bad("is not a positive number", f"use a number of seconds > 0 and "
                                                   f"<= {maximum:g}, e.g. 30")
        if value > maximum:
            raise _Bad("is out of range", f"use a number of seconds > 0 and <= {maximum:g}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type(value, "true or false", "true")
    return value


def _choice(*choices: str) -> Check:
    listed = (
        " or ".join(f'"{c}"' for c in choices)
        if len(choices) == 2
        else ", ".join(f'"{c}"' for c in choices)
    )

    def check(value: Any) -> str:
        if value not in choices or not isinstance(value, str):
            raise _Bad("is not valid", f"use {listed}")
        return value

    return check


def _single_line(value: Any, empty_ok: bool = True) -> str:
    """A string without control characters ("" only if ``empty_ok``)."""
    if not isinstance(value, str):
        raise _wrong_type(value, "a string", '"text"')
    if _has_control(value):
        raise _Bad("contains control characters", "remove line breaks, tabs and NULs")
    if not value and not empty_ok:
        raise _Bad("is empty", "give a value or remove the key")
    return value


def _text(empty_ok: bool = True) -> Check:
    """The check of a single-line string key."""
    return lambda value: _single_line(value, empty_ok)


def _path(empty_ok: bool = True, example: str = "/etc/trafficthreshold/secret") -> Check:
    """An absolute path after ``~`` expansion ("" allowed if ``empty_ok``)."""

    def check(value: Any) -> str:
        text = _single_line(value, empty_ok)
        if not text:
            return text
        expanded = os.path.expanduser(text)
        if not os.path.isabs(expanded):
            raise _Bad("is a relative path", f'use an absolute path such as "{example}"')
        return expanded

    return check


def _address(empty_ok: bool = False) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _wrong_type(value, "a string", '"ops@example.com"')
        if _has_control(value):
            raise _Bad(
                "contains a line break or control character",
                "remove it: it would let the value add mail headers",
            )
        if (value or not empty_ok) and not is_valid_address(value):
            raise _Bad(
                "is not a valid e-mail address",
                'use one address such as "ops@example.com" or "Ops <ops@example.com>"',
            )
        return value.strip()

    return check


def _as_list(value: Any, what: str, example: str) -> list[Any]:
    """``value`` as a TOML array; a single string is taken as a list of one."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _wrong_type(value, what, example)
    return value


def _addresses(value: Any) -> tuple[str, ...]:
    """A list of addresses; a single string is taken as a list of one."""
    value = _as_list(value, "an array of addresses", '["ops@example.com"]')
    bad = [item for item in value if not isinstance(item, str) or not is_valid_address(item)]
    if bad:
        # is_valid_address refuses CR/LF, so nothing here can add mail headers.
        raise _Bad(
            f"contains an invalid e-mail address ({_show(bad[0])})",
            'use one address per string: ["ops@example.com", "Dev <dev@example.com>"]',
        )
    return tuple(item.strip() for item in value)


def _timezone(value: Any) -> str:
    if not isinstance(value, str):
        raise _wrong_type(value, "an IANA time zone name", '"Europe/Zurich"')
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        close = difflib.get_close_matches(value, zoneinfo.available_timezones(), n=1)
        hint = (
            f'did you mean "{close[0]}"?'
            if close
            else 'use an IANA name such as "Europe/Zurich", or remove the key for the system zone'
        )
        raise _Bad("is not a known time zone", hint) from None
    return value


def _listen(value: Any) -> str:
    if not isinstance(value, str):
        raise _wrong_type(value, '"host:port"', '"127.0.0.1:8787"')
    try:
        parse_listen(value)
    except ValueError as exc:
        raise _Bad("is not host:port", str(exc)) from None
    return value


def _token(value: Any) -> str:
    if not isinstance(value, str):
        raise _wrong_type(value, "a string", '"<output of openssl rand -hex 32>"')
    if not re.fullmatch(r"[\x21-\x7e]*", value):
        raise _Bad(
            "contains spaces or non-ASCII characters",
            "use printable ASCII only, e.g. the output of `openssl rand -hex 32`",
        )
    return value


def _split_url(url: str, fix: str, problem: str = "is not a valid URL") -> urllib.parse.SplitResult:
    """``urlsplit(url)`` with its port checked; a URL Python cannot split
    (an unclosed ``[``: "Invalid IPv6 URL") or a port out of 1..65535 is a
    :class:`_Bad` with ``fix``, never a bare ValueError."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _Bad(f"{problem} ({exc})", fix) from None
    if port == 0:
        raise _Bad(f"{problem} (port 0)", fix + "; a port is from 1 to 65535")
    return parts


def _url(value: Any) -> str:
    """An http(s) URL a person follows (``mail.dashboard_url``)."""
    url = _single_line(value)
    fix = 'use e.g. "https://stats.example.com/", or "" for the default'
    parts = _split_url(url, fix)
    if url and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise _Bad("is not an http(s) URL", fix)
    if " " in url:
        raise _Bad("contains a space", fix + "; write a space in a path as %20")
    return url


def _public_url(value: Any) -> str:
    """``http.public_url``: the base every ``links`` entry is built on, so
    nothing may follow the path (no query, no fragment), and no user name."""
    url = _url(value)
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)  # splits: _url checked it
    fix = 'use scheme://host[:port][/path] only, e.g. "https://stats.example.com/"'
    for what, present in (("a query (?...)", parts.query or url.endswith("?")),
                          ("a fragment (#...)", parts.fragment or url.endswith("#")),
                          ("a user name (...@)", "@" in parts.netloc)):
        if present:
            raise _Bad(f"has {what}, which every link would carry", fix)
    return url


#: Paths the app serves outside the prefix; a prefix may not shadow them.
FIXED_ROUTES = ("/metrics", "/api/openapi.json")


def _prefix(value: Any) -> str:
    """``[http] prefix``: ``/segment[/segment...]`` of unreserved URL characters."""
    if not isinstance(value, str):
        raise _wrong_type(value, "a path", '"/api/stats"')
    fix = 'use e.g. "/api/stats" or "/stats": a leading "/", no trailing "/"'
    if not value.startswith("/"):
        raise _Bad('does not start with "/"', fix)
    if value.endswith("/"):
        raise _Bad('ends with "/"', fix)
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
        raise _Bad("is not a path of letters, digits and . _ ~ - after a leading /", fix)
    if any(part in (".", "..") for part in value.split("/")):
        raise _Bad('has a "." or ".." segment', fix)
    for route in FIXED_ROUTES:
        if value == route or value.startswith(route + "/"):
            raise _Bad(f"would hide {route}, which stays where it is", fix)
    return value


#: The characters IDNA 2003 (Python's "idna" codec) maps or drops and
#: browsers keep (UTS 46 "deviations"): ß, final sigma, ZWJ, ZWNJ.
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200d\u200c")


def _origin(parts: urllib.parse.SplitResult, item: str, fix: str) -> str:
    """An origin as a browser sends it in ``Origin:``: scheme and host in
    lower case, the host in punycode, no default port (80, 443)."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    elif _IDNA_DEVIATIONS.intersection(host):
        # Python's "idna" is IDNA 2003 (ß -> ss); browsers keep these
        # (UTS 46, non-transitional): we cannot spell what they send.
        raise _Bad(f"has {_show(item)}, whose host browsers send in a punycode Python cannot "
                   "make (it holds ß, ς or a zero-width joiner)",
                   "write the host in punycode as the browser sends it in Origin: (e.g. "
                   "xn--strae-oqa.example for straße.example; see the Origin header in the "
                   "browser's developer tools)")
    else:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Bad(f"has {_show(item)}, whose host is not a valid domain name", fix) from None
    default = {"http": 80, "https": 443}[parts.scheme]
    port = "" if parts.port in (None, default) else f":{parts.port}"
    return f"{parts.scheme}://{host}{port}"


def _origins(value: Any) -> tuple[str, ...]:
    """``[http] cors_origins``: exact origins (``scheme://host[:port]``) or
    ``"*"``, normalized as browsers send them (:func:`_origin`)."""
    example = '["https://dash.example.com"]'
    if isinstance(value, str):
        raise _Bad("is a string, not a list", f"put it in brackets, e.g. {example}")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _wrong_type(value, "a list of strings", example)
    origins = []
    for item in value:
        if item == "*":
            origins.append(item)
            continue
        fix = (f'list origins as scheme://host[:port] without a path, e.g. {example}, '
               '"*" for any page (public)')
        if _has_control(item) or " " in item:
            raise _Bad(f"has {_show(item)}, which is not an origin", fix)
        parts = _split_url(item, fix, f"has {_show(item)}, which is not an origin")
        if (parts.scheme not in ("http", "https") or not parts.hostname
                or "@" in parts.netloc or item.endswith("/") or parts.path or parts.query
                or parts.fragment or item.endswith(("?", "#"))):
            raise _Bad(f"has {_show(item)}, which is not an origin", fix)
        origins.append(_origin(parts, item, fix))
    return tuple(dict.fromkeys(origins))


STORE_BACKENDS = ("sqlite", "redis")


#: Parts of a URL query argument's name that make it a secret.  redis-py's
#: ``parse_url`` passes every query argument on to the connection
#: (``password``, ``ssl_password``, ...; names percent-decoded), so any
#: spelling of one is one, whatever its case or separators.
SECRET_NAME_PARTS = ("pass", "pwd", "secret", "token", "credential", "auth")


def url_secrets(url: str) -> list[str]:
    """The query arguments of ``url`` that hold a secret (their names as
    written, decoded), e.g. ``["Password"]`` for ``...?db=0&Password=x``."""
    query = urllib.parse.urlsplit(url).query
    found = []
    for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True):
        plain = re.sub(r"[^a-z0-9]", "", name.lower())
        if any(part in plain for part in SECRET_NAME_PARTS) and name not in found:
            found.append(name)
    return found


def _redis_url(value: Any) -> str:
    """A Redis URL without a password in it (the file is no place for one):
    neither ``user:pass@`` nor any query argument that holds a secret
    (:func:`url_secrets`)."""
    url = _single_line(value)
    if not url:
        return url
    fix = 'use "redis://host:6379/0", "rediss://host:6380/0" or "unix:///run/redis/redis.sock"'
    parts = _split_url(url, fix)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise _Bad("is not a Redis URL", fix)
    if parts.password or url_secrets(url):
        raise _Bad("holds a password",
                   "remove it from the URL and set store.password_file (a file readable "
                   "only by the daemon) or store.password_env instead")
    return url


def _sentinels(value: Any) -> tuple[str, ...]:
    """A list of "host:port" strings."""
    value = _as_list(value, "an array of \"host:port\"", '["10.0.0.5:26379"]')
    for item in value:
        host, _, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) <= LIMITS["port"]:
            raise _Bad(f"contains {_show(item)}, which is not host:port",
                       'write each sentinel as "host:port", e.g. ["10.0.0.5:26379"]')
    return tuple(value)


def _store_word(what: str, example: str) -> Check:
    """A prefix or host name: a non-empty single line without ':' (Bootic's
    key separator) or spaces."""

    def check(value: Any) -> str:
        text = _single_line(value, empty_ok=False)
        if not re.fullmatch(r"[^\s:\x00]+", text):
            raise _Bad(f"is not a usable {what}",
                       f'use a name without ":" or spaces, e.g. "{example}"')
        return text

    return check


def _alert_name(value: Any) -> str:
    """An alert's name: 1..64 UTF-8 bytes without control characters."""
    if not isinstance(value, str):
        raise _wrong_type(value, "a name", '"burst"')
    if not 1 <= len(value.encode("utf-8")) <= 64 or _has_control(value):
        raise _Bad("is not a valid alert name", "use 1 to 64 bytes without control characters")
    return value


def _counter_name(kind: str, max_bytes: int, reserved: str) -> Check:
    """An account or event name by the rules of :mod:`trafficthreshold.names`;
    ``reserved`` (the overflow key) is allowed too: an alert may watch it."""

    def check(value: Any) -> str:
        if value == reserved:
            return reserved
        try:
            return names.check_name(kind, value, max_bytes)
        except TypeError:
            raise _wrong_type(value, f"an {kind} name", f'"{reserved}"') from None
        except ValueError as exc:
            raise _Bad(f"is not a valid {kind} name", str(exc)) from None

    return check


# --------------------------------------------------------------------------
# The schema: TOML key -> (dataclass attribute, check)


@dataclasses.dataclass(frozen=True)
class _Key:
    attr: str
    check: Check
    secret: bool = False


#: The largest value of each numeric key (docs/configuration.rst lists them):
#: what ``run`` can live with, not what TOML can write.
LIMITS = {
    "multiplier": 1_000_000,  # the header field is 32 bits; level 5 at 5 million a window
    "cooldown": 86_400,  # a day
    "cron_test": 604_800,  # a week
    "retention": 36_500,  # 100 years of days: dates stay within the calendar
    "port": 65_535,
    "timeout": 600.0,  # seconds; also keeps a stuck MTA within a bounded wait
    "max_per_hour": 3_600,  # one a second
    "threshold": 2**53 - 1,  # exact as a JSON number (the API, the alert state)
    "repeat": 604_800,  # a week
    "clear_minutes": 1_440,  # a day of closed minutes, read once a minute
    "lease_ttl": 600.0,  # ten minutes without a leader for the farm's alerts at most
    "forget_hosts_days": 3650.0,  # ten years
}
#: The shortest ``[store] lease_ttl``: the lease is renewed every second.
MIN_LEASE_TTL = 2.0

_TOP: dict[str, _Key] = {
    "key": _Key("key", _integer(1, MAX_KEY, example=f"{DEFAULT_KEY:#x}")),
    "backend": _Key("backend", _choice(*BACKENDS)),
    "database": _Key("database", _path(False, SYSTEM_STATE_DIR + "/" + DATABASE_NAME)),
    "timezone": _Key("timezone", _timezone),
}
_THROTTLE: dict[str, _Key] = {
    "multiplier": _Key("multiplier", _integer(1, LIMITS["multiplier"])),
    "window": _Key("window", _choice(*WINDOWS)),
    "policy": _Key("policy", _choice(*POLICIES)),
    "cooldown": _Key("cooldown", _integer(1, LIMITS["cooldown"], example="300")),
    "cron_test": _Key("cron_test", _integer(1, LIMITS["cron_test"], example="10800")),
    "scope": _Key("scope", _choice(*THROTTLE_SCOPES)),
}
_RETENTION: dict[str, _Key] = {
    name: _Key(name, _integer(0, LIMITS["retention"], example="7"))
    for name in ("minutes", "hours", "days", "months")
}
_HTTP: dict[str, _Key] = {
    "enabled": _Key("enabled", _boolean),
    "listen": _Key("listen", _listen),
    "token": _Key("token", _token, secret=True),
    "public_url": _Key("public_url", _public_url),
    "prefix": _Key("prefix", _prefix),
    "cors_origins": _Key("cors_origins", _origins),
}
_MAIL: dict[str, _Key] = {
    "transport": _Key("transport", _choice(*TRANSPORTS)),
    "sendmail": _Key("sendmail", _path(False, "/usr/sbin/sendmail")),
    "smtp_host": _Key("smtp_host", _text(False)),
    "smtp_port": _Key("smtp_port", _integer(1, LIMITS["port"], example="25")),
    "starttls": _Key("starttls", _boolean),
    "username": _Key("username", _text()),
    "password_file": _Key("password_file", _path()),
    "password_env": _Key("password_env", _text()),
    "timeout": _Key("timeout", _seconds(LIMITS["timeout"])),
    "from": _Key("sender", _address()),
    # 0 = no cap (docs/alerts.rst, "The hourly cap")
    "max_per_hour": _Key("max_per_hour", _integer(0, LIMITS["max_per_hour"], example="20")),
    "templates": _Key("templates", _path(example="/etc/trafficthreshold/templates")),
    "dashboard_url": _Key("dashboard_url", _url),
}
_STORE: dict[str, _Key] = {
    "backend": _Key("backend", _choice(*STORE_BACKENDS)),
    # secret: a URL written with a password is refused without showing it
    "url": _Key("url", _redis_url, secret=True),
    "sentinels": _Key("sentinels", _sentinels),
    "service": _Key("service", _text()),
    "password_file": _Key("password_file", _path()),
    "password_env": _Key("password_env", _text()),
    "prefix": _Key("prefix", _store_word("key prefix", "track")),
    "funnels_prefix": _Key("funnels_prefix", _store_word("key prefix", "funnels")),
    "host": _Key("host", _store_word("host name", "web1")),
    "lease_ttl": _Key("lease_ttl", _seconds(LIMITS["lease_ttl"])),
    "forget_hosts_days": _Key("forget_hosts_days", _seconds(LIMITS["forget_hosts_days"])),
}
_ALERT: dict[str, _Key] = {
    "name": _Key("name", _alert_name),
    "account": _Key("account", _counter_name("account", names.ACCOUNT_MAX, names.OVERFLOW_ACCOUNT)),
    "event": _Key("event", _counter_name("event", names.EVENT_MAX, names.OVERFLOW_EVENT)),
    "threshold": _Key("threshold", _integer(1, LIMITS["threshold"], example="10")),
    "window": _Key("window", _choice(*WINDOWS)),
    "to": _Key("to", _addresses),
    "from": _Key("sender", _address(empty_ok=True)),
    # 0 = no reminders (docs/alerts.rst, "One mail per episode")
    "repeat": _Key("repeat", _integer(0, LIMITS["repeat"], example="3600")),
    "resolved": _Key("resolved", _boolean),
    "clear_minutes": _Key("clear_minutes", _integer(1, LIMITS["clear_minutes"], example="5")),
    "scope": _Key("scope", _choice(*ALERT_SCOPES)),
}
#: The tables of the file: name -> (schema, dataclass).
_TABLES: dict[str, tuple[dict[str, _Key], type]] = {
    "throttle": (_THROTTLE, ThrottleConfig),
    "retention": (_RETENTION, RetentionConfig),
    "http": (_HTTP, HttpConfig),
    # [store] before [mail]: dump() comments on the last line, mail.dashboard_url.
    "store": (_STORE, StoreConfig),
    "mail": (_MAIL, MailConfig),
}


# --------------------------------------------------------------------------
# Collecting errors


def _show(value: Any) -> str:
    """Render a value for a message: strings quoted, booleans as in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, str) and len(value) > 60:
        value = value[:57] + "..."
    return repr(value)


class _Errors:
    """The problems found in one file, each a line of the ConfigError."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def bad(self, key: str, value: Any, problem: str, fix: str, secret: bool = False) -> None:
        shown = "(hidden)" if secret else _show(value)
        self.lines.append(f"{self.source}: {key} = {shown} {problem}; {fix}")

    def missing(self, key: str, fix: str) -> None:
        self.lines.append(f"{self.source}: {key} is missing; {fix}")

    def unknown(
        self, key: str, value: Any, name: str, known: Sequence[str], in_table: bool
    ) -> None:
        self.bad(key, value, "is not a known key", _suggest(name, known, in_table))

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError("\n".join(self.lines))


def _suggest(name: str, known: Sequence[str], in_table: bool) -> str:
    """The fix for an unknown key: a close name, or where the key belongs."""
    if in_table and name in _TOP:
        return "top-level keys must come before the first [table] header; move it up"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f'did you mean "{close[0]}"?'
    for table, (schema, _cls) in _TABLES.items():
        if name in schema:
            return f"it belongs in the [{table}] table"
    return "valid keys here: " + ", ".join(known)


def _read_table(
    raw: Mapping[str, Any],
    path: str,
    schema: Mapping[str, _Key],
    errors: _Errors,
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """Check every key of ``raw`` against ``schema``; return the good ones by attr."""
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{path}.{name}" if path else name
        if name in skip:
            continue
        entry = schema.get(name)
        if entry is None:
            errors.unknown(key, value, name, [*schema, *skip], in_table=bool(path))
            continue
        try:
            values[entry.attr] = entry.check(value)
        except _Bad as bad:
            errors.bad(key, value, bad.problem, bad.fix, entry.secret)
        except Exception as exc:  # noqa: BLE001 - a check's own slip still names the key
            errors.bad(key, value, f"cannot be checked ({type(exc).__name__}: {exc})",
                       "correct the value as docs/configuration.rst describes it",
                       entry.secret)
    return values


def _sub_table(raw: Mapping[str, Any], name: str, errors: _Errors) -> Mapping[str, Any]:
    """``raw[name]`` if it is a table (absent: empty); else report it."""
    value = raw.get(name, {})
    if not isinstance(value, dict):
        errors.bad(
            name, value, "is not a table", f"write a [{name}] header followed by key = value lines"
        )
        return {}
    return value


# --------------------------------------------------------------------------
# Building the Config


def parse(text: str, source: str = "<string>", *, env: Mapping[str, str] = os.environ) -> Config:
    """Validate TOML ``text`` (read from ``source``) and return the Config.

    ``env`` only supplies the default database path (see
    :func:`default_database`).  Raises ConfigError listing every problem.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{source}: TOML syntax error: {exc}; fix that line "
            "(strings need quotes, tables are [name], alerts [[alert]])"
        ) from None
    errors = _Errors(source)
    values = _read_table(raw, "", _TOP, errors, skip=[*_TABLES, "alert"])
    tables = {
        name: cls(**_read_table(_sub_table(raw, name, errors), name, schema, errors))
        for name, (schema, cls) in _TABLES.items()
    }
    values.setdefault("database", default_database(env))
    config = Config(**values, **tables, alerts=_alerts(raw.get("alert", []), errors), source=source)
    _cross_check(config, errors)
    errors.raise_if_any()
    return config


def _alerts(raw: Any, errors: _Errors) -> tuple[AlertRule, ...]:
    """Read the ``[[alert]]`` array; names must be unique, ``to`` non-empty."""
    if isinstance(raw, dict):
        errors.bad(
            "alert", raw, "is a single table", "write [[alert]] (double brackets) above each alert"
        )
        return ()
    if not isinstance(raw, list):
        errors.bad("alert", raw, f"is {_kind(raw)}", "write each alert as an [[alert]] table")
        return ()
    rules: list[AlertRule] = []
    first_use: dict[str, str] = {}
    for index, item in enumerate(raw):
        path = f"alert[{index}]"
        if not isinstance(item, dict):
            errors.bad(path, item, f"is {_kind(item)}", "write each alert as an [[alert]] table")
            continue
        values = _read_table(item, path, _ALERT, errors)
        if "name" not in item:
            errors.missing(f"{path}.name", 'add a unique name, e.g. name = "burst"')
        if "to" not in item:
            errors.missing(f"{path}.to", 'add the recipients, e.g. to = ["ops@example.com"]')
        elif values.get("to") == ():
            errors.bad(
                f"{path}.to",
                [],
                "is empty",
                'add at least one address, e.g. to = ["ops@example.com"]',
            )
        name = values.get("name")
        if name is not None and name in first_use:
            errors.bad(
                f"{path}.name",
                name,
                f"is already used by {first_use[name]}",
                "give every alert a unique name",
            )
        elif name is not None:
            first_use[name] = path
            rules.append(AlertRule(**values))
    return tuple(rules)


def cross_check(config: Config) -> None:
    """The checks that involve more than one key, on a Config made or
    changed in code (the supervisor's reload keeps restart-only keys from
    the running configuration); ConfigError naming the key and the fix."""
    errors = _Errors(config.source)
    _cross_check(config, errors)
    errors.raise_if_any()


def _cross_check(config: Config, errors: _Errors) -> None:
    """Checks that involve more than one key (invalid values are defaults here)."""
    http = config.http
    if http.enabled and not http.token:
        host, _port = http.address
        if not is_loopback(host):
            errors.bad(
                "http.listen",
                http.listen,
                "is not a loopback address and http.token is empty",
                'set http.token = "<output of openssl rand -hex 32>" or listen on "127.0.0.1:8787"',
            )
    mail = config.mail
    if mail.password_file and mail.password_env:
        errors.bad(
            "mail.password_env",
            mail.password_env,
            "is set as well as mail.password_file",
            "keep only one of the two",
        )
    _cross_check_store(config.store, errors)
    if config.throttle.scope == "farm" and config.store.backend != "redis":
        errors.bad("throttle.scope", "farm", f"needs the farm's Redis, but store.backend is "
                   f"{_show(config.store.backend)}",
                   'set [store] backend = "redis" with its url (docs/redis.rst), or '
                   'scope = "host"')
    farm_rules = [i for i, r in enumerate(config.alerts) if r.scope == "farm"]
    if farm_rules and config.store.backend != "redis":
        errors.bad(f"alert[{farm_rules[0]}].scope", "farm",
                   f"needs the farm's Redis (the lease and the farm's alert state live there), "
                   f"but store.backend is {_show(config.store.backend)}",
                   'set [store] backend = "redis" with its url (docs/redis.rst), or '
                   'scope = "host" in the rule')


def _cross_check_store(store: StoreConfig, errors: _Errors) -> None:
    """``[store]``: redis needs a url or sentinels (not both), sentinels a
    service; one password source."""
    if store.password_file and store.password_env:
        errors.bad("store.password_env", store.password_env,
                   "is set as well as store.password_file", "keep only one of the two")
    if store.funnels_prefix == store.prefix:
        errors.bad("store.funnels_prefix", store.funnels_prefix, "is the same as store.prefix",
                   'give the funnels their own, e.g. funnels_prefix = "funnels" (Bootic\'s)')
    if store.lease_ttl < MIN_LEASE_TTL:
        errors.bad("store.lease_ttl", store.lease_ttl, f"is under {MIN_LEASE_TTL:g} s",
                   f"the lease is renewed every second: use at least {MIN_LEASE_TTL:g}, "
                   f"e.g. 10 (the default)")
    if store.backend != "redis":
        return
    if store.url and store.sentinels:
        errors.bad("store.sentinels", list(store.sentinels), "is set as well as store.url",
                   "keep only one: url for one Redis, sentinels + service for Sentinel")
    elif not store.url and not store.sentinels:
        errors.missing("store.url", 'backend = "redis" needs url = "redis://host:6379/0" '
                       'or sentinels = ["host:26379", ...] with service')
    if store.sentinels and not store.service:
        errors.missing("store.service", 'sentinels need the master\'s name, e.g. service = '
                       '"mymaster" (the name in the sentinels\' `sentinel monitor` line)')


def default(env: Mapping[str, str] = os.environ) -> Config:
    """The configuration used when there is no file."""
    return Config(database=default_database(env))


def resolve_path(
    path: str | None = None, env: Mapping[str, str] = os.environ, default_path: str = DEFAULT_PATH
) -> str | None:
    """The file to read: ``path``, ``$TRAFFICTHRESHOLD_CONFIG``, ``default_path``
    if it exists, else None (embedded defaults)."""
    if path:
        return path
    if env.get("TRAFFICTHRESHOLD_CONFIG"):
        return env["TRAFFICTHRESHOLD_CONFIG"]
    return default_path if os.path.exists(default_path) else None


def load(
    path: str | None = None,
    env: Mapping[str, str] = os.environ,
    *,
    default_path: str = DEFAULT_PATH,
) -> Config:
    """Find, read and validate the configuration; apply ``$TRAFFICTHRESHOLD_KEY``.

    See :func:`resolve_path` for where it looks.  A file that was named (by
    ``path`` or the environment) must exist.  Raises ConfigError.
    """
    resolved = resolve_path(path, env, default_path)
    config = default(env) if resolved is None else parse(_read(resolved), resolved, env=env)
    key = env_key(env)
    if key is not None:
        config = dataclasses.replace(config, key=key)
    return config


def _read(path: str) -> str:
    """Read the file as UTF-8 text; every failure is a ConfigError with a fix."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; create it (see docs/configuration.rst) "
            "or name another one with --config / TRAFFICTHRESHOLD_CONFIG"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; name the config.toml file inside it") from None
    except PermissionError:
        raise ConfigError(
            f"{path}: permission denied; make it readable by the daemon's user, "
            f"e.g. chgrp www-data {path} && chmod 640 {path}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror}); check the path") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: is not UTF-8 (byte {exc.start}); save it as UTF-8") from None


# --------------------------------------------------------------------------
# Warnings about the environment


def check(path: str | None = None, env: Mapping[str, str] = os.environ) -> list[str]:
    """Load the configuration (ConfigError if invalid) and return warnings:
    things that are valid but will probably not work on this machine."""
    return warnings(load(path, env), env)


def warnings(config: Config, env: Mapping[str, str] = os.environ) -> list[str]:
    """Return one line per suspicious setting, prefixed like the errors."""
    found: list[str] = []
    for check_one in _WARNINGS:
        found.extend(f"{config.source}: {line}" for line in check_one(config, env))
    return found


def _warn_mail(config: Config, env: Mapping[str, str]) -> list[str]:
    mail, lines = config.mail, []
    if config.alerts and mail.transport == "sendmail":
        lines.extend(_sendmail_warnings(mail.sendmail))
    if mail.password_file:
        lines.extend(_secret_file_warnings("mail.password_file", mail.password_file))
    if mail.password_env and mail.password_env not in env:
        lines.append(
            f"mail.password_env = {mail.password_env!r} is not set in this environment; "
            "set it where the daemon runs (systemd: Environment= or EnvironmentFile=)"
        )
    if mail.username and not (mail.password_file or mail.password_env):
        lines.append(
            "mail.username is set but no password is; set mail.password_file or mail.password_env"
        )
    if mail.templates and not os.path.isdir(mail.templates):
        lines.append(
            f"mail.templates = {mail.templates!r} is not a directory; create it or remove the key"
        )
    return lines


def _sendmail_warnings(path: str) -> list[str]:
    """A missing MTA: every alert mail would fail (the daemon itself runs)."""
    fix = ('install an MTA (apt-get install postfix) or send through a server with '
           'mail.transport = "smtp"')
    if not os.path.lexists(path):
        return [f"mail.sendmail = {path!r} does not exist, so no alert mail can go out; {fix}"]
    if not os.path.exists(path):
        return [f"mail.sendmail = {path!r} is a broken symbolic link (to "
                f"{os.readlink(path)!r}), so no alert mail can go out; {fix}"]
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        return [f"mail.sendmail = {path!r} is not an executable program, so no alert mail "
                f"can go out; {fix}, or point mail.sendmail at the MTA's sendmail"]
    return []


def _secret_file_warnings(key: str, path: str) -> list[str]:
    if not os.access(path, os.R_OK):
        return [f"{key} = {path!r} is not readable; create it readable by the daemon's user"]
    if os.stat(path).st_mode & stat.S_IROTH:
        return [f"{key} = {path!r} is readable by everyone; chmod o-rwx {path}"]
    return []


def _warn_store(config: Config, env: Mapping[str, str]) -> list[str]:
    store, lines = config.store, []
    if store.password_file:
        lines.extend(_secret_file_warnings("store.password_file", store.password_file))
    if store.password_env and store.password_env not in env:
        lines.append(
            f"store.password_env = {store.password_env!r} is not set in this environment; "
            "set it where the daemon runs (systemd: Environment= or EnvironmentFile=)"
        )
    return lines


def _warn_http(config: Config, env: Mapping[str, str]) -> list[str]:
    token, lines = config.http.token, []
    if token and len(token) < 16:
        lines.append("http.token is shorter than 16 characters; use `openssl rand -hex 32`")
    if token and os.path.isfile(config.source) and os.stat(config.source).st_mode & stat.S_IROTH:
        lines.append(
            f"http.token is set and the file is readable by everyone; chmod o-rwx {config.source}"
        )
    if "*" in config.http.cors_origins and not token:
        lines.append('http.cors_origins has "*" and http.token is empty: any web page a '
                     "visitor opens can read the stats; list the origins instead, or set "
                     "http.token")
    return lines


def _warn_storage(config: Config, env: Mapping[str, str]) -> list[str]:
    lines = []
    directory = os.path.dirname(config.database)
    if not os.path.isdir(directory):
        lines.append(
            f"database = {config.database!r}: the directory does not exist yet; "
            "create it writable by the daemon (systemd's StateDirectory= does)"
        )
    if config.retention.minutes == 0:
        lines.append(
            "retention.minutes = 0 keeps minute rows forever (1440 a day per account "
            "and event); keep a few days, e.g. 7"
        )
    return lines


_WARNINGS: tuple[Callable[[Config, Mapping[str, str]], list[str]], ...] = (
    _warn_mail,
    _warn_http,
    _warn_storage,
    _warn_store,
)


# --------------------------------------------------------------------------
# Rendering back to TOML


def dump(config: Config, *, redact: bool = True) -> str:
    """Render ``config`` as TOML that :func:`parse` reads back to an equal Config.

    With ``redact`` (the default) ``http.token`` is shown as ``"<redacted>"``.
    """
    lines = [f"# effective configuration (source: {config.source})", f"key = {config.key:#x}"]
    lines += [f"backend = {_toml(config.backend)}", f"database = {_toml(config.database)}"]
    if config.timezone is None:
        lines.append("# timezone: not set, the system's zone is used")
    else:
        lines.append(f"timezone = {_toml(config.timezone)}")
    for name, (schema, _cls) in _TABLES.items():
        lines += ["", f"[{name}]"] + _dump_table(getattr(config, name), schema, redact)
    if not config.mail.dashboard_url and config.http.enabled:
        # The last line written is mail.dashboard_url: say what "" means.
        lines[-1] += f"  # default: {config.dashboard_link}"
    for rule in config.alerts:
        lines += ["", "[[alert]]"] + _dump_table(rule, _ALERT, redact)
    return "\n".join(lines) + "\n"


def _dump_table(obj: object, schema: Mapping[str, _Key], redact: bool) -> list[str]:
    lines = []
    for name, entry in schema.items():
        value = getattr(obj, entry.attr)
        if entry.secret and redact and value:
            value = "<redacted>"
        lines.append(f"{name} = {_toml(value)}")
    return lines


def _toml(value: Any) -> str:
    """A TOML literal for a bool, int, float, str or sequence of str."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return '"' + "".join(_toml_char(ch) for ch in str(value)) + '"'


def _toml_char(ch: str) -> str:
    """Escape one character of a TOML basic string."""
    if ch in '"\\':
        return "\\" + ch
    if ord(ch) < 32 or ord(ch) == 127:
        return f"\\u{ord(ch):04x}"
    return ch
